"""Token corpora: `longax.train.prepare` (every input kind, every bad input) and
data.task=tokens (windows, segment ids, determinism, per-host rows, vocab check, resume)."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from longax.train import config as C
from longax.train.data import Dataset
from longax.train.prepare import LLMC_HEADER, LLMC_MAGIC, main as prepare
from longax.train.tokens import TokenData, Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta def return import class self value pass key".split()


def docs(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, 30 + 7 * i)) + f"\n# doc {i}\n" for i in range(n)]


def run(capsys, *argv):
  """prepare's exit status and its stderr's lines (the progress bar's \\r redraws dropped)."""
  code = prepare([str(a) for a in argv])
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and "prepare:" not in l]
  return code, err


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> pathlib.Path:
  """A tiny byte-level BPE (300 tokens) trained on the test documents."""
  from longax.train.prepare import train_bpe
  pytest.importorskip("tokenizers")
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  train_bpe(docs(8), 300, path)
  return path


def split_tokens(out, name):
  meta = json.loads((out / "meta.json").read_text())
  return np.fromfile(out / f"{name}.bin", meta["dtype"]), np.load(out / f"{name}.docs.npy")


# ------------------------------------------------------------------------------ prepare


def _write_inputs(kind: str, folder: pathlib.Path, texts):
  """The documents `texts` as one input of `kind`; returns (paths, extra flags, ids or None)."""
  ids = [np.frombuffer(t.encode(), np.uint8).astype(np.int64) for t in texts]
  if kind == "text":
    for i, t in enumerate(texts):
      (folder / f"d{i}.txt").write_text(t)
    (folder / "skip.log").write_text("not matched by --glob")
    return [folder], ["--glob", "*.txt"], None
  if kind == "jsonl":
    (folder / "a.jsonl").write_text("".join(json.dumps(dict(body=t, n=1)) + "\n" for t in texts))
    return [folder / "a.jsonl"], ["--field", "body"], None
  if kind == "parquet":
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": texts}), folder / "a.parquet", row_group_size=2)
    return [folder / "a.parquet"], ["--column", "content"], None
  eot = 0
  flat = np.concatenate([np.append(x, eot) for x in ids])
  want = [np.append(x, eot) for x in ids]
  if kind == "npy":
    np.save(folder / "a.npy", flat.astype(np.int32))
    return [folder / "a.npy"], ["--eot", eot, "--vocab-size", 256], want
  if kind == "bin_raw":  # nanoGPT: raw uint16
    flat.astype(np.uint16).tofile(folder / "a.bin")
    return [folder / "a.bin"], ["--dtype", "uint16", "--eot", eot, "--vocab-size", 256], want
  header = np.zeros(LLMC_HEADER, np.int32)  # llm.c: magic, version 1 (uint16), count
  header[:3] = LLMC_MAGIC, 1, len(flat)
  (folder / "a.bin").write_bytes(header.tobytes() + flat.astype(np.uint16).tobytes())
  return [folder / "a.bin"], ["--eot", eot, "--vocab-size", 256], want


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet", "npy", "bin_raw", "bin_llmc"])
def test_prepare_reads_each_input_kind(tmp_path, capsys, kind):
  texts = docs(5)
  paths, extra, want = _write_inputs(kind, tmp_path, texts)
  tok = [] if want is not None else ["--tokenizer", "bytes"]
  code, err = run(capsys, "--input", *paths, *tok, *extra, "--out", tmp_path / "out",
                  "--val-fraction", 0.4)
  assert code == 0, err
  out = tmp_path / "out"
  meta = json.loads((out / "meta.json").read_text())
  want = want or [np.frombuffer(t.encode(), np.uint8) for t in texts]
  assert meta["vocab_size"] == 256 and meta["dtype"] == "uint16"
  assert meta["splits"] == {"train": dict(tokens=sum(map(len, want[:3])), documents=3),
                            "val": dict(tokens=sum(map(len, want[3:])), documents=2)}
  for name, part in (("train", want[:3]), ("val", want[3:])):
    tokens, starts = split_tokens(out, name)
    np.testing.assert_array_equal(tokens, np.concatenate(part))
    np.testing.assert_array_equal(starts, np.cumsum([0] + [len(p) for p in part[:-1]]))
  assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "train.docs.npy",
                                                  "val.bin", "val.docs.npy"]


def test_prepare_with_a_bpe_round_trips(tmp_path, capsys, bpe):
  texts = docs(6, seed=1)
  for i, t in enumerate(texts):
    (tmp_path / f"d{i}.md").write_text(t)
  code, err = run(capsys, "--input", tmp_path, "--tokenizer", bpe, "--out", tmp_path / "out",
                  "--val-fraction", 0.3)
  assert code == 0, err
  data = TokenData(tmp_path / "out")
  tok = data.tokenizer()
  assert data.meta["tokenizer"] == "tokenizer.json" and tok.vocab_size == 300
  tokens, starts = data.split("train")
  assert tokens.dtype == np.uint16 and len(tokens) < sum(map(len, texts[:4])), "BPE merges"
  assert [tok.decode(tokens[a:b]) for a, b in zip(starts, [*starts[1:], len(tokens)])] == texts[:4]
  # bpe:N trains one on the inputs and keeps it beside the data
  code, err = run(capsys, "--input", tmp_path, "--glob", "*.md", "--tokenizer", "bpe:280",
                  "--out", tmp_path / "out2")
  assert code == 0, err
  assert Tokenizer(tmp_path / "out2" / "tokenizer.json").vocab_size == 280


def _bad(tmp, case):
  (tmp / "ok.txt").write_text(docs(3)[0])
  np.arange(10, dtype=np.uint16).tofile(tmp / "odd.bin")
  with open(tmp / "odd.bin", "ab") as f:
    f.write(b"\0")
  np.save(tmp / "big.npy", np.array([1, 2, 300, 4], np.int32))
  (tmp / "garbage.json").write_text("{not json")
  return {
      "no tokenizer file": (["--input", tmp / "ok.txt", "--tokenizer", tmp / "nope.json"],
                            "nope.json: no such file"),
      "unreadable tokenizer": (["--input", tmp / "ok.txt", "--tokenizer", tmp / "garbage.json"],
                               "garbage.json: not a readable tokenizers file"),
      "size not a multiple": (["--input", tmp / "odd.bin", "--dtype", "uint16", "--vocab-size", 64],
                              "odd.bin: 21 bytes is not a multiple of --dtype uint16"),
      "raw bin without dtype": (["--input", tmp / "odd.bin", "--vocab-size", 64], "needs --dtype"),
      "id beyond vocab": (["--input", tmp / "big.npy", "--vocab-size", 256],
                          "big.npy: token id 300 is outside the vocabulary [0, 256)"),
      "empty split": (["--input", tmp / "ok.txt", "--tokenizer", "bytes"],
                      "the train split is empty (1 documents"),
      "missing input": (["--input", tmp / "none.txt", "--tokenizer", "bytes"],
                        "none.txt: no such file or folder"),
      "text without tokenizer": (["--input", tmp / "ok.txt"], "--tokenizer is needed"),
      "bad bpe size": (["--input", tmp / "ok.txt", "--tokenizer", "bpe:12"], "bpe:N needs"),
  }[case]


@pytest.mark.parametrize("case", ["no tokenizer file", "unreadable tokenizer",
                                  "size not a multiple", "raw bin without dtype",
                                  "id beyond vocab", "empty split", "missing input",
                                  "text without tokenizer", "bad bpe size"])
def test_prepare_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
  argv, msg = _bad(tmp_path, case)
  code, err = run(capsys, *argv, "--out", tmp_path / "out")
  assert code == 2 and len(err) == 1 and msg in err[0], err
  assert not (tmp_path / "out").exists(), "nothing half-written"
  (tmp_path / "kept").mkdir()  # an existing folder keeps only what it had
  (tmp_path / "kept" / "mine").write_text("x")
  assert run(capsys, *argv, "--out", tmp_path / "kept")[0] == 2
  assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mine"]


# ---------------------------------------------------------------------------- the task


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bpe) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("corpus")
  for i, t in enumerate(docs(12, seed=2)):
    (folder / f"d{i:02d}.txt").write_text(t * 3)
  assert prepare(["--input", str(folder), "--tokenizer", str(bpe), "--out",
                  str(folder / "prepared"), "--val-fraction", "0.25"]) == 0
  return folder / "prepared"


def test_tokens_task_windows_and_segments(corpus):
  cfg = C.DataConfig(task="tokens", path=str(corpus), seq_len=48, batch_size=6)
  d = Dataset(cfg)
  tokens, starts = TokenData(corpus).split("train")
  a, b = d.batch("train", 5), d.batch("train", 5)
  assert d.vocab_size == 300 and set(a) == {"tokens", "targets", "mask", "segment_ids"}
  for k in a:
    assert a[k].shape == (6, 48)
    np.testing.assert_array_equal(a[k], b[k])  # a pure function of (seed, split, index)
  assert not np.array_equal(a["tokens"], d.batch("train", 6)["tokens"])
  assert not np.array_equal(a["tokens"], d.batch("val", 5)["tokens"])
  np.testing.assert_array_equal(a["tokens"][:, 1:], a["targets"][:, :-1])
  for row in a["tokens"]:  # each row is a window of the split
    hits = [o for o in range(len(tokens) - 48) if np.array_equal(tokens[o:o + 48], row)]
    assert hits
  # documents: segment ids count boundaries in the row, the loss skips exactly those targets
  assert np.all(np.diff(a["segment_ids"], axis=1) >= 0) and a["segment_ids"].max() > 0
  np.testing.assert_array_equal(a["mask"][:, :-1] == 0, np.diff(a["segment_ids"], axis=1) > 0)
  # a host reads only its rows: the same rows, the others zero
  part = d.batch("train", 5, rows=[1, 4])
  for k in a:
    np.testing.assert_array_equal(part[k][[1, 4]], a[k][[1, 4]])
    assert not part[k][[0, 2, 3, 5]].any()


def test_tokens_config_checks(corpus, tmp_path):
  cfg = C.load(ROOT / "configs" / "tokens_small.py")
  ok = C.override(cfg, [f"data.path={corpus}", "model.vocab_size=300"])
  C.validate(ok)
  with pytest.raises(C.ConfigError, match=r"model.vocab_size=299: must be >= the vocabulary of "
                     r"data.path='.*' \(300 tokens\)"):
    C.validate(C.override(ok, ["model.vocab_size=299"]))
  with pytest.raises(C.ConfigError, match=r"data.path=.*nope.*: holds no meta.json"):
    C.validate(C.override(ok, [f"data.path={tmp_path / 'nope'}"]))
  with pytest.raises(C.ConfigError, match=r"data.path=none: must name a folder written by"):
    C.validate(C.override(ok, ["data.path=none"]))
  broken = tmp_path / "broken"
  broken.mkdir()
  for f in corpus.iterdir():
    (broken / f.name).write_bytes(f.read_bytes())
  with open(broken / "val.bin", "ab") as f:
    f.write(b"\0")
  with pytest.raises(C.ConfigError, match=r"val.bin holds \d+ bytes; meta.json says"):
    Dataset(dataclasses.replace(ok.data, path=str(broken)))


def test_a_restarted_reader_gives_the_same_batches(corpus):
  """What exact resume needs of the data: batch i from freshly opened files is batch i."""
  cfg = C.DataConfig(task="tokens", path=str(corpus), seq_len=40, batch_size=4)
  first = [Dataset(cfg).batch(split, i) for split in ("train", "val") for i in (0, 7)]
  again = [Dataset(cfg).batch(split, i) for split in ("train", "val") for i in (0, 7)]
  for a, b in zip(first, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow  # three short training runs (the trainer's resume is tested on MQAR too)
def test_tokens_run_resumes_exactly(corpus, tmp_path):
  from longax.train import Trainer
  cfg = C.override(C.load(ROOT / "tests" / "tiny_train_config.py"), [
      "data.task=tokens", f"data.path={corpus}", "model.vocab_size=300", "train.steps=4",
      "train.eval_every=2", "train.checkpoint_every=2"])
  Trainer(cfg, tmp_path / "full").run()
  Trainer(C.override(cfg, ["train.stop_after=2"]), tmp_path / "resumed").run()
  assert Trainer(cfg, tmp_path / "resumed").run()["start_step"] == 2
  read = lambda p: [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"}
                    for l in (p / "metrics.jsonl").read_text().splitlines()]
  assert read(tmp_path / "resumed") == read(tmp_path / "full")
  assert len(read(tmp_path / "full")) == 4 and "eval_loss" in read(tmp_path / "full")[-1]
