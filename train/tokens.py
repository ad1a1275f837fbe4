"""Token corpora on disk and the tokenizers that made them.

A prepared folder (written by `python -m longax.train.prepare`) holds

  train.bin, val.bin            the split's tokens, concatenated (uint16, or uint32 when the
                                vocabulary exceeds 65536), read memory-mapped
  train.docs.npy, val.docs.npy  int64 offsets where each document starts (the first is 0)
  tokenizer.json                the Hugging Face `tokenizers` file, if one was used
  meta.json                     format, tokenizer ("bytes", "tokenizer.json" or null),
                                vocab_size, dtype, and per split its tokens and documents

`Tokenizer` is bytes (ids 0..255, UTF-8) or a `tokenizers` JSON file; `run_tokenizer(run)`
gives the one a training run's data was made with (for `longax.infer --prompt`).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from longax.models.config import ConfigError, FieldError

FORMAT = "longax-tokens-1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class Tokenizer:
  """`Tokenizer("bytes")` or `Tokenizer(path_to_tokenizer_json)`; `encode(text) -> ids`,
  `encode_batch(texts) -> [ids]`, `decode(ids) -> str`, `vocab_size`."""

  def __init__(self, spec: str | pathlib.Path, flag: str = "--tokenizer"):
    self.name = str(spec)
    if self.name == "bytes":
      self.hf, self.vocab_size = None, 256
      return
    path = pathlib.Path(spec)
    if not path.is_file():
      raise ConfigError(f"{flag} {spec}: no such file (give 'bytes' or a tokenizers .json file)")
    try:
      from tokenizers import Tokenizer as HF
    except ImportError:
      raise ConfigError(f"{flag} {spec}: needs the `tokenizers` package "
                        "(pip install 'longax[data]')") from None
    try:
      self.hf = HF.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - unreadable or not a tokenizer: one line
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
      raise ConfigError(f"{flag} {spec}: not a readable tokenizers file ({first})") from None
    self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
    if self.hf is None:
      return [np.frombuffer(t if isinstance(t, bytes) else t.encode("utf-8"), np.uint8)
              for t in texts]
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
    return [np.asarray(e.ids, np.int64) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

  def encode(self, text: str | bytes) -> list[int]:
    return self.encode_batch([text])[0].tolist()

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.hf is None:
      return bytes(ids).decode("utf-8", errors="replace")
    return self.hf.decode(ids, skip_special_tokens=False)


def read_meta(path: str | pathlib.Path, key: str = "data.path") -> dict:
  """DIR/meta.json of a prepared folder; one line (FieldError on `key`) if it is not one."""
  meta_file = pathlib.Path(path) / "meta.json"
  if not meta_file.is_file():
    raise FieldError(key, str(path), "holds no meta.json: not a folder written by "
                     "python -m longax.train.prepare")
  try:
    meta = json.loads(meta_file.read_text())
    assert meta["format"] == FORMAT and int(meta["vocab_size"]) >= 1
    np.dtype(meta["dtype"])
  except (ValueError, KeyError, TypeError, AssertionError, OSError):
    raise FieldError(key, str(path), f"{meta_file} is not a {FORMAT} meta.json") from None
  return meta


class TokenData:
  """The memory-mapped splits of a prepared folder: `split(name) -> (tokens, doc starts)`.
  Every file is checked against meta.json (size, dtype) before use."""

  def __init__(self, path: str | pathlib.Path, key: str = "data.path"):
    self.path = pathlib.Path(path)
    self.meta = meta = read_meta(path, key)
    self.vocab_size, dtype = int(meta["vocab_size"]), np.dtype(meta["dtype"])
    self.splits = {}
    for name in SPLITS:
      data_file, docs_file = self.path / f"{name}.bin", self.path / f"{name}.docs.npy"
      want = int(meta["splits"][name]["tokens"])
      if not data_file.is_file() or not docs_file.is_file():
        raise FieldError(key, str(path), f"{data_file.name} or {docs_file.name} is missing")
      if data_file.stat().st_size != want * dtype.itemsize:
        raise FieldError(key, str(path), f"{data_file.name} holds {data_file.stat().st_size} "
                         f"bytes; meta.json says {want} {dtype} tokens")
      if want == 0:
        raise FieldError(key, str(path), f"the {name} split is empty")
      self.splits[name] = (np.memmap(data_file, dtype, "r"), np.load(docs_file))

  def split(self, name: str):
    return self.splits[name]

  def tokenizer(self) -> Tokenizer | None:
    spec = self.meta.get("tokenizer")
    if spec is None:
      return None
    return Tokenizer("bytes" if spec == "bytes" else self.path / spec, flag="tokenizer")


def run_tokenizer(run: dict) -> Tokenizer | None:
  """The tokenizer of a training run's data (run = its config.json): bytes for text_bytes,
  the prepared folder's for tokens, None for the synthetic tasks."""
  data = run.get("data", {})
  if data.get("task") == "text_bytes":
    return Tokenizer("bytes")
  if data.get("task") == "tokens":
    return TokenData(data.get("path") or "").tokenizer()
  return None
