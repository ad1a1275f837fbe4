"""Data: synthetic recall tasks generated on the fly, byte-level text and prepared token
corpora (`data.task=tokens`, `longax.train.prepare`), all stateless.

A batch is a pure function of (seed, split, index): the input pipeline's position is the
batch index, which the checkpoint stores, so a resumed run sees exactly the batches an
uninterrupted one would. Every batch is a dict of numpy arrays:
  tokens [B, T] int32, targets [B, T] int32, mask [B, T] float32 (where the loss counts),
  segment_ids [B, T] int32 (text_bytes, tokens: document ids of packed windows).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import sysconfig

import numpy as np

from longax.train.config import (PASSKEY_DIGITS, TASKS, ConfigError, DataConfig, FieldError,
                                 check_data)
from longax.train.tokens import TokenData

_SPLITS = {"train": 0, "val": 1}


def _rng(cfg: DataConfig, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([cfg.seed, _SPLITS[split], index])


def _pack(seqs: np.ndarray, mask: np.ndarray) -> dict:
  """[B, T+1] sequences and a [B, T+1] answer mask -> next-token batch."""
  return dict(tokens=seqs[:, :-1].astype(np.int32), targets=seqs[:, 1:].astype(np.int32),
              mask=mask[:, 1:].astype(np.float32))


def mqar(cfg: DataConfig, rng) -> dict:
  """Multi-query associative recall (Zoology): n key-value pairs, then queries `k` whose
  answer is the value bound to `k`; the loss counts only the answers. Keys come from the
  lower half of the vocabulary, values from the upper half."""
  b, t, n, v = cfg.batch_size, cfg.seq_len + 1, cfg.num_kv_pairs, cfg.vocab_size
  n_queries = (t - 2 * n) // 2
  keys = np.argsort(rng.random((b, v // 2 - 1)), axis=1)[:, :n] + 1  # distinct keys
  values = rng.integers(v // 2, v, (b, n))
  seqs = np.zeros((b, t), np.int64)
  seqs[:, 0:2 * n:2], seqs[:, 1:2 * n:2] = keys, values
  pick = rng.integers(0, n, (b, n_queries))
  q0 = 2 * n
  seqs[:, q0:q0 + 2 * n_queries:2] = np.take_along_axis(keys, pick, 1)
  seqs[:, q0 + 1:q0 + 2 * n_queries:2] = np.take_along_axis(values, pick, 1)
  mask = np.zeros((b, t), bool)
  mask[:, q0 + 1:q0 + 2 * n_queries:2] = True
  return _pack(seqs, mask)


def selective_copy(cfg: DataConfig, rng) -> dict:
  """Selective copying (Mamba): `num_tokens` data tokens scattered among blanks (0), then a
  marker (1) after which the data tokens are reproduced in order."""
  b, t, n, v = cfg.batch_size, cfg.seq_len + 1, cfg.num_tokens, cfg.vocab_size
  ctx = t - n - 1
  data = rng.integers(2, v, (b, n))
  where = np.sort(np.argsort(rng.random((b, ctx)), axis=1)[:, :n], axis=1)
  seqs = np.zeros((b, t), np.int64)
  np.put_along_axis(seqs[:, :ctx], where, data, 1)
  seqs[:, ctx], seqs[:, ctx + 1:] = 1, data
  mask = np.zeros((b, t), bool)
  mask[:, ctx + 1:] = True
  return _pack(seqs, mask)


def induction(cfg: DataConfig, rng) -> dict:
  """Induction heads: random tokens with a trigger (1) followed by X somewhere; the
  sequence ends with the trigger again and the answer X."""
  b, t, v = cfg.batch_size, cfg.seq_len + 1, cfg.vocab_size
  seqs = rng.integers(2, v, (b, t))
  pos = rng.integers(0, t - 3, b)
  rows = np.arange(b)
  seqs[rows, pos] = 1
  seqs[:, -2] = 1
  seqs[:, -1] = seqs[rows, pos + 1]
  mask = np.zeros((b, t), bool)
  mask[:, -1] = True
  return _pack(seqs, mask)


def passkey(cfg: DataConfig, rng, digits: int = PASSKEY_DIGITS) -> dict:
  """Passkey retrieval: filler tokens (13..v), then at `depth` of the context (None: a uniform
  place per sequence) a marker (2) and a key of `digits` digit tokens (3..12); the sequence
  ends with the question token (1) and the key, on which the loss counts."""
  b, t, v = cfg.batch_size, cfg.seq_len + 1, cfg.vocab_size
  seqs = rng.integers(13, v, (b, t))
  key = rng.integers(3, 13, (b, digits))
  ctx = t - digits - 1
  last = ctx - digits - 1  # the marker's last place
  rows = np.arange(b)[:, None]
  at = (np.full((b, 1), int(round(cfg.depth * last))) if cfg.depth is not None
        else rng.integers(0, last + 1, (b, 1)))  # [B, 1]
  seqs[rows, at], seqs[rows, at + 1 + np.arange(digits)] = 2, key
  seqs[:, ctx], seqs[:, ctx + 1:] = 1, key
  mask = np.zeros((b, t), bool)
  mask[:, ctx + 1:] = True
  return _pack(seqs, mask)


def cache_dir(cfg: DataConfig) -> pathlib.Path:
  """Where the byte corpus cache goes: data.cache_dir, else $LONGAX_CACHE_DIR, else
  $XDG_CACHE_HOME/longax, else ~/.cache/longax."""
  if cfg.cache_dir:
    return pathlib.Path(cfg.cache_dir).expanduser()
  if os.environ.get("LONGAX_CACHE_DIR"):
    return pathlib.Path(os.environ["LONGAX_CACHE_DIR"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "longax"


class TextBytes:
  """Byte-level text from a file or a directory (default: the Python standard library's
  source), concatenated once into a cache file and memory-mapped. The last
  `val_fraction` of documents is the validation split. A batch holds windows at random
  offsets; `segment_ids` mark document boundaries and the loss skips cross-document targets."""

  def __init__(self, cfg: DataConfig, cache: str | pathlib.Path, max_bytes: int = 64 << 20):
    root = pathlib.Path(cfg.path or sysconfig.get_paths()["stdlib"])
    if not root.exists():
      raise FieldError("data.path", cfg.path, "does not exist")
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    if root.is_dir() and not files:
      files = sorted(p for p in root.rglob("*") if p.is_file())
    key = hashlib.sha1(f"{root.resolve()}:{len(files)}:{max_bytes}".encode()).hexdigest()[:12]
    cache = pathlib.Path(cache)
    data_file, starts_file = cache / f"bytes-{key}.bin", cache / f"bytes-{key}.starts.npy"
    if not (data_file.exists() and starts_file.exists()):
      try:
        cache.mkdir(parents=True, exist_ok=True)
        self._build(files, data_file, starts_file, max_bytes)
      except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot write the byte corpus cache in {cache} "
                          f"({e.strerror or e}); set data.cache_dir or LONGAX_CACHE_DIR") from None
    self.data = np.memmap(data_file, np.uint8, "r")
    self.starts = np.load(starts_file)
    n_docs = len(self.starts)
    if n_docs < 2 or len(self.data) < 4 * (cfg.seq_len + 1):
      raise FieldError("data.path", str(root), f"too little text ({len(self.data)} bytes in "
                       f"{n_docs} files; needs >= 2 files and {4 * (cfg.seq_len + 1)} bytes)")
    split_doc = max(1, min(n_docs - 1, int(round(n_docs * (1 - cfg.val_fraction)))))
    cut = int(self.starts[split_doc])
    self.ranges = {"train": (0, cut), "val": (cut, len(self.data))}
    self.cfg = cfg

  @staticmethod
  def _build(files, data_file, starts_file, max_bytes):
    tmp = data_file.with_suffix(".tmp")
    starts, total = [], 0
    with open(tmp, "wb") as out:
      for path in files:
        try:
          blob = path.read_bytes()
        except OSError:
          continue
        if not blob:
          continue
        blob = blob[:max_bytes - total]
        starts.append(total)
        out.write(blob)
        total += len(blob)
        if total >= max_bytes:
          break
    np.save(starts_file, np.asarray(starts, np.int64))
    tmp.replace(data_file)  # atomic: a half-written cache is never picked up
    print(f"longax: caching the byte corpus ({total / 1e6:.1f} MB) in {data_file}", file=sys.stderr)

  def corpus(self, split: str):
    """(bytes [N] of the split, document starts in it)."""
    lo, hi = self.ranges[split]
    return self.data[lo:hi], self.starts[(self.starts >= lo) & (self.starts < hi)] - lo

  def batch(self, split: str, rng, rows=None) -> dict:
    return windows(*self.corpus(split), self.cfg, split, rng, rows)


class Tokens:
  """A prepared token folder (`python -m longax.train.prepare`, `longax.train.tokens`):
  packed windows of each split, as text_bytes."""

  def __init__(self, cfg: DataConfig):
    self.source = TokenData(cfg.path or "")
    self.cfg, self.vocab_size = cfg, self.source.vocab_size

  def corpus(self, split: str):
    """(tokens [N] of the split, document starts in it)."""
    return self.source.split(split)

  def batch(self, split: str, rng, rows=None) -> dict:
    return windows(*self.corpus(split), self.cfg, split, rng, rows)


def windows(data: np.ndarray, starts: np.ndarray, cfg: DataConfig, split: str, rng,
            rows=None) -> dict:
  """Windows of seq_len + 1 tokens at random offsets of `data` (one split, documents
  starting at `starts`); `segment_ids` number the documents within a row and the loss skips
  cross-document targets. `rows` (default all): the only rows read; the others stay zero
  (a host of a multi-host run reads only its own), the offsets being drawn for every row."""
  t, b = cfg.seq_len + 1, cfg.batch_size
  if len(data) < t:
    raise ConfigError(f"the {split} split holds {len(data)} tokens, fewer than seq_len+1={t}")
  offsets = rng.integers(0, len(data) - t + 1, b)
  rows = np.arange(b) if rows is None else np.asarray(rows, np.int64)
  idx = offsets[rows, None] + np.arange(t)
  seqs = np.zeros((b, t), np.int64)
  seqs[rows] = data[idx]
  docs = np.zeros((b, t), np.int64)
  docs[rows] = np.searchsorted(starts, idx, side="right") - 1
  out = _pack(seqs, np.ones_like(seqs, bool))
  out["mask"] = (docs[:, 1:] == docs[:, :-1]).astype(np.float32)  # no cross-document targets
  out["mask"][np.setdiff1d(np.arange(b), rows)] = 0.0
  out["segment_ids"] = (docs[:, :-1] - docs[:, :1]).astype(np.int32)
  return out


class Dataset:
  """`Dataset(cfg).batch(split, index)`: the index-th batch of a split. The byte corpus
  cache goes to `cache` (default `cache_dir(cfg)`). `rows`: the batch rows this process
  needs (the corpora read only those; the synthetic tasks make them all)."""

  def __init__(self, cfg: DataConfig, cache: str | pathlib.Path | None = None):
    check_data(cfg)
    self.cfg = cfg
    self.text = (TextBytes(cfg, cache or cache_dir(cfg)) if cfg.task == "text_bytes" else
                 Tokens(cfg) if cfg.task == "tokens" else None)
    self.vocab_size = (256 if cfg.task == "text_bytes" else self.text.vocab_size if self.text
                       else cfg.vocab_size)

  def batch(self, split: str, index: int, rows=None) -> dict:
    rng = _rng(self.cfg, split, index)
    if self.text is not None:
      return self.text.batch(split, rng, rows)
    return getattr(sys.modules[__name__], self.cfg.task)(self.cfg, rng)
