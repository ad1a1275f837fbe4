"""python -m longax.train.prepare --input PATH... --tokenizer bytes|TOKENIZER.json|bpe:N --out DIR

Tokenizes a corpus into a prepared folder (`longax.train.tokens`) for `data.task=tokens`.

Inputs (files, or folders searched recursively and filtered by --glob), one document each:
  text files (any other suffix)  the whole file
  .jsonl                         each line's --field (default text)
  .parquet                       each row's --column (default text; needs pyarrow)
  .npy / .bin token files        already tokenized (nanoGPT, llm.c): .npy and llm.c's headed
                                 .bin carry their dtype, a raw .bin needs --dtype; --eot ID
                                 splits them into documents after each ID
`--tokenizer bpe:N` first trains a byte-level BPE of N tokens on the text inputs (saved as
DIR/tokenizer.json). The last --val-fraction of the documents is the val split.

Bad input (a missing input or tokenizer, a token file whose size is not a multiple of its
dtype, an id outside the vocabulary, an empty split) exits 2 with one line on stderr and
leaves nothing behind: files are written under temporary names and renamed at the end.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import pathlib
import shutil
import sys

import numpy as np

from longax.models.config import ConfigError
from longax.train.tokens import FORMAT, Tokenizer, token_dtype

TOKEN_SUFFIXES = (".npy", ".bin")
LLMC_MAGIC, LLMC_HEADER = 20240520, 256  # llm.c: 256 int32 header, then the tokens
BATCH_BYTES = 1 << 20  # documents per encode_batch call (the tokenizer threads over them)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m longax.train.prepare",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                 help="files or folders (searched recursively)")
  p.add_argument("--tokenizer", default=None,
                 help="'bytes', a tokenizers .json file, or bpe:N (train a byte-level BPE of N "
                      "tokens on the inputs); needed for text inputs")
  p.add_argument("--out", required=True, help="the prepared folder to write")
  p.add_argument("--glob", default="*", help="comma-separated name patterns for files in folders")
  p.add_argument("--field", default="text", help=".jsonl: the field holding a document")
  p.add_argument("--column", default="text", help=".parquet: the column holding a document")
  p.add_argument("--dtype", default=None, choices=("uint16", "uint32", "int32"),
                 help="dtype of raw .bin token files (nanoGPT writes uint16)")
  p.add_argument("--eot", type=int, default=None,
                 help="token files: a new document starts after each of these ids")
  p.add_argument("--vocab-size", type=int, default=None,
                 help="vocabulary of token-file inputs when no --tokenizer is given")
  p.add_argument("--val-fraction", type=float, default=0.05, help="last documents held out")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------- inputs


def list_inputs(paths, globs: str) -> list[pathlib.Path]:
  patterns = [g.strip() for g in globs.split(",") if g.strip()] or ["*"]
  files = []
  for raw in paths:
    p = pathlib.Path(raw)
    if p.is_dir():
      files += sorted(f for f in p.rglob("*") if f.is_file()
                      and not any(part.startswith(".") for part in f.relative_to(p).parts)
                      and any(fnmatch.fnmatch(f.name, g) for g in patterns))
    elif p.is_file():
      files.append(p)
    else:
      raise ConfigError(f"--input {raw}: no such file or folder")
  if not files:
    raise ConfigError(f"--input {' '.join(map(str, paths))}: no files (--glob {globs!r})")
  return files


def token_file(path: pathlib.Path, dtype: str | None) -> np.ndarray:
  """A token file as a read-only array: .npy, llm.c's headed .bin, or a raw .bin of --dtype."""
  if path.suffix == ".npy":
    try:
      arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
      raise ConfigError(f"{path}: not a readable .npy file ({e})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
      raise ConfigError(f"{path}: a token .npy must be 1-D integers, got {arr.dtype} {arr.shape}")
    return arr
  size = path.stat().st_size
  head = np.fromfile(path, np.int32, 3) if size >= 4 * LLMC_HEADER else np.zeros(3, np.int32)
  if head[0] == LLMC_MAGIC:
    dt = np.dtype({1: np.uint16, 2: np.uint32}.get(int(head[1]), np.uint16))
    body = size - 4 * LLMC_HEADER
    if body != int(head[2]) * dt.itemsize:
      raise ConfigError(f"{path}: llm.c header says {int(head[2])} {dt} tokens, the file holds "
                        f"{body} bytes after it")
    return np.memmap(path, dt, "r", offset=4 * LLMC_HEADER)
  if dtype is None:
    raise ConfigError(f"{path}: a raw token file needs --dtype (uint16 for nanoGPT)")
  dt = np.dtype(dtype)
  if size % dt.itemsize:
    raise ConfigError(f"{path}: {size} bytes is not a multiple of --dtype {dtype} "
                      f"({dt.itemsize} bytes)")
  return np.memmap(path, dt, "r") if size else np.zeros(0, dt)


def documents(path: pathlib.Path, args):
  """Yields a file's documents: ('text', str | bytes) or ('ids', int array)."""
  if path.suffix in TOKEN_SUFFIXES:
    arr = token_file(path, args.dtype)
    cuts = [0] + ([] if args.eot is None else (np.flatnonzero(arr == args.eot) + 1).tolist())
    for a, b in zip(cuts, cuts[1:] + [len(arr)]):
      if b > a:
        yield "ids", arr[a:b]
  elif path.suffix == ".jsonl":
    with open(path, encoding="utf-8", errors="replace") as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except ValueError:
          raise ConfigError(f"{path}:{i}: not a JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get(args.field), str):
          raise ConfigError(f"{path}:{i}: no string field {args.field!r} (--field)")
        yield "text", row[args.field]
  elif path.suffix == ".parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise ConfigError(f"{path}: reading .parquet needs pyarrow (pip install 'longax[data]')") from None
    try:
      pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - not parquet: one line
      raise ConfigError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    if args.column not in pf.schema_arrow.names:
      raise ConfigError(f"{path}: no column {args.column!r} (--column); it has "
                        f"{', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=[args.column]):
      for text in batch.column(0).to_pylist():
        if text:
          yield "text", text
  else:
    try:
      yield "text", path.read_bytes()
    except OSError as e:
      raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None


def text_files_only(files) -> list[pathlib.Path]:
  return [f for f in files if f.suffix not in TOKEN_SUFFIXES]


# --------------------------------------------------------------------------- tokenizer


def train_bpe(texts, vocab_size: int, out: pathlib.Path) -> None:
  """A byte-level BPE of `vocab_size` tokens trained on `texts`, saved to `out`."""
  try:
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers
  except ImportError:
    raise ConfigError("--tokenizer bpe:N needs the `tokenizers` package "
                      "(pip install 'longax[data]')") from None
  tok = HF(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator((t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t
                           for t in texts), trainer=trainer)
  tok.save(str(out))


def bpe_size(spec: str) -> int | None:
  if not spec.startswith("bpe:"):
    return None
  n = spec[4:]
  if not n.isdigit() or not 257 <= int(n) <= 1 << 20:
    raise ConfigError(f"--tokenizer {spec}: bpe:N needs an integer N in [257, 1048576]")
  return int(n)


# ------------------------------------------------------------------------------ writing


class Writer:
  """Appends documents to DIR/.all.bin.tmp; `finish` splits off the val documents and renames
  every file into place (meta.json last); `abort` removes what was written."""

  def __init__(self, out: pathlib.Path, vocab_size: int):
    self.out, self.vocab = out, vocab_size
    self.dtype = token_dtype(vocab_size)
    self.tmp = out / ".all.bin.tmp"
    self.file = open(self.tmp, "wb")
    self.starts, self.total = [], 0

  def add(self, ids: np.ndarray, where: str) -> None:
    if len(ids) == 0:
      return
    top = int(ids.max())
    if top >= self.vocab or int(ids.min()) < 0:
      bad = top if top >= self.vocab else int(ids.min())
      raise ConfigError(f"{where}: token id {bad} is outside the vocabulary [0, {self.vocab})")
    self.starts.append(self.total)
    self.file.write(np.asarray(ids, self.dtype).tobytes())
    self.total += len(ids)

  def finish(self, meta: dict, val_fraction: float, extra=()) -> dict:
    self.file.close()
    n = len(self.starts)
    n_val = min(n, max(1, round(n * val_fraction))) if val_fraction > 0 else 0
    cut_doc = n - n_val
    cut = self.starts[cut_doc] if cut_doc < n else self.total
    counts = {"train": (cut, cut_doc), "val": (self.total - cut, n_val)}
    for name, (tokens, docs) in counts.items():
      if tokens == 0:
        raise ConfigError(f"the {name} split is empty ({n} documents, {self.total} tokens, "
                          f"--val-fraction {val_fraction}): give more input or change "
                          "--val-fraction")
    size = self.dtype.itemsize
    with open(self.tmp, "rb") as src, open(self.out / ".val.bin.tmp", "wb") as dst:
      src.seek(cut * size)
      shutil.copyfileobj(src, dst)
    os.truncate(self.tmp, cut * size)
    starts = np.asarray(self.starts, np.int64)
    np.save(self.out / ".train.docs.tmp.npy", starts[:cut_doc])
    np.save(self.out / ".val.docs.tmp.npy", starts[cut_doc:] - cut)
    meta = dict(format=FORMAT, **meta, vocab_size=self.vocab, dtype=self.dtype.name,
                splits={k: dict(tokens=int(t), documents=int(d)) for k, (t, d) in counts.items()})
    (self.out / ".meta.json.tmp").write_text(json.dumps(meta, indent=1))
    for tmp, final in [(".all.bin.tmp", "train.bin"), (".val.bin.tmp", "val.bin"),
                       (".train.docs.tmp.npy", "train.docs.npy"),
                       (".val.docs.tmp.npy", "val.docs.npy"), *extra,
                       (".meta.json.tmp", "meta.json")]:
      os.replace(self.out / tmp, self.out / final)
    return meta

  def abort(self) -> None:
    self.file.close()


TEMPS = (".all.bin.tmp", ".val.bin.tmp", ".train.docs.tmp.npy", ".val.docs.tmp.npy",
         ".meta.json.tmp", ".tokenizer.json.tmp")


def prepare(args) -> dict:
  """Runs the whole preparation; returns meta.json's content. Raises ConfigError (one line)."""
  from tqdm import tqdm
  files = list_inputs(args.input, args.glob)
  if not 0 <= args.val_fraction < 1:
    raise ConfigError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
  out = pathlib.Path(args.out)
  if out.exists() and not out.is_dir():
    raise ConfigError(f"--out {out}: is a file, not a folder")
  texts = text_files_only(files)
  spec = args.tokenizer
  n_bpe = bpe_size(spec) if spec else None
  tokenizer = Tokenizer(spec) if spec and n_bpe is None else None
  if texts and spec is None:
    raise ConfigError(f"--tokenizer is needed for text inputs ({texts[0]}, ...): 'bytes', a "
                      "tokenizers .json file, or bpe:N")
  if not spec and args.vocab_size is None:
    raise ConfigError("token-file inputs without --tokenizer need --vocab-size")
  for f in files:  # token files: sizes and dtypes checked before anything is written
    if f.suffix in TOKEN_SUFFIXES:
      token_file(f, args.dtype)
  created = not out.exists()
  out.mkdir(parents=True, exist_ok=True)
  writer = None
  try:
    if n_bpe is not None:
      docs = (d for f in texts for kind, d in documents(f, args) if kind == "text")
      train_bpe(docs, n_bpe, out / ".tokenizer.json.tmp")
      tokenizer = Tokenizer(out / ".tokenizer.json.tmp")
    vocab = tokenizer.vocab_size if tokenizer else args.vocab_size
    writer = Writer(out, vocab)
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True) as bar:
      for f in files:
        pending, size = [], 0
        for kind, doc in documents(f, args):
          if kind == "ids":
            writer.add(np.asarray(doc), str(f))
            continue
          pending.append(doc)
          size += len(doc)
          if size >= BATCH_BYTES:
            for ids in tokenizer.encode_batch(pending):
              writer.add(ids, str(f))
            pending, size = [], 0
        for ids in tokenizer.encode_batch(pending) if pending else ():
          writer.add(ids, str(f))
        bar.update(f.stat().st_size)
    name = None
    if tokenizer is not None:
      name = "bytes" if tokenizer.hf is None else "tokenizer.json"
    meta = dict(tokenizer=name, sources=[str(p) for p in args.input], files=len(files))
    if tokenizer is not None and tokenizer.hf is not None:
      src = out / ".tokenizer.json.tmp"
      if n_bpe is None:
        shutil.copyfile(tokenizer.name, src)
    extra = [(".tokenizer.json.tmp", "tokenizer.json")] if name == "tokenizer.json" else []
    return writer.finish(meta, args.val_fraction, extra)
  except BaseException:
    if writer is not None:
      writer.abort()
    for t in TEMPS:
      (out / t).unlink(missing_ok=True)
    if created and not any(out.iterdir()):
      out.rmdir()
    raise


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    meta = prepare(args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  s = meta["splits"]
  print(f"{args.out}: vocab {meta['vocab_size']} ({meta['dtype']}), train {s['train']['tokens']} "
        f"tokens in {s['train']['documents']} documents, val {s['val']['tokens']} tokens in "
        f"{s['val']['documents']} documents")
  return 0


if __name__ == "__main__":
  sys.exit(main())
