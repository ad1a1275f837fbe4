"""Long-context evaluation: `infer.generate.score` against the full forward, and
`python -m longax.infer.evaluate` end to end on tiny tokens and MQAR runs."""

import json
import pathlib

import numpy as np
import pytest

from longax.infer.evaluate import main as evaluate
from longax.train import config as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny_train_config.py"


def _train(workdir, *sets):
  from longax.train import Trainer
  cfg = C.override(C.load(TINY), ["train.steps=2", "train.eval_every=100", *sets])
  Trainer(cfg, workdir).run()
  return workdir


@pytest.fixture(scope="module")
def tokens_run(tmp_path_factory):
  pytest.importorskip("tokenizers")
  from longax.train.prepare import main as prepare, train_bpe
  root = tmp_path_factory.mktemp("eval")
  rng = np.random.default_rng(0)
  words = "alpha beta gamma delta pass key value def return".split()
  for i in range(10):
    (root / f"d{i}.txt").write_text(" ".join(rng.choice(words, 200)))
  train_bpe([(root / f"d{i}.txt").read_text() for i in range(10)], 280, root / "tok.json")
  assert prepare(["--input", str(root), "--glob", "*.txt", "--tokenizer", str(root / "tok.json"),
                  "--out", str(root / "prepared"), "--val-fraction", "0.3"]) == 0
  return _train(root / "run", "data.task=tokens", f"data.path={root / 'prepared'}",
                "model.vocab_size=280")


def test_score_equals_the_full_forward(tokens_run):
  from longax.infer.__main__ import load_model
  from longax.infer.generate import score
  model, _ = load_model(tokens_run)
  tokens = np.random.default_rng(1).integers(0, 280, (2, 49))  # longer than max_len=32
  nll, hit = score(model, tokens[:, :-1], tokens[:, 1:], prefill_chunk=16)
  from flax import nnx  # the forward jitted: eagerly, each of its ops compiles on its own
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, tokens[:, :-1]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  want = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(nll, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(hit, logits.argmax(-1) == tokens[:, 1:])


def test_evaluate_a_tokens_run(tokens_run, capsys):
  out = tokens_run / "ev"
  assert evaluate(["--workdir", str(tokens_run), "--lengths", "16,48,128", "--samples", "2",
                   "--batch-size", "2", "--depths", "0,1", "--first-bucket", "8",
                   "--prefill-chunk", "16", "--out", str(out)]) == 0
  captured = capsys.readouterr()
  assert "note: mqar skipped: needs an mqar run (this one is 'tokens')" in captured.err
  r = json.loads((out / "results.json").read_text())
  ppl = r["tasks"]["ppl_by_position"]
  assert set(ppl) == {"16", "48", "128"} and [(b["start"], b["end"]) for b in ppl["48"]["buckets"]] == [
      (0, 8), (8, 16), (16, 32), (32, 48)]
  assert all(np.isfinite(b["ppl"]) and b["targets"] > 0 for b in ppl["48"]["buckets"])
  assert set(r["tasks"]["passkey"]["accuracy"]) == {f"{n},{d}" for n in (16, 48, 128) for d in (0.0, 1.0)}
  assert r["tasks"]["passkey"]["accuracy"]["16,0.0"] is None, "needle + question exceed 16"
  assert 0 <= r["tasks"]["passkey"]["accuracy"]["128,1.0"] <= 1
  assert r["train_seq_len"] == 32 and r["checkpoint_step"] == 2
  assert sorted(p.name for p in out.iterdir()) == ["passkey.png", "ppl_by_position.png",
                                                  "results.json"]


def test_evaluate_an_mqar_run(tokens_run, tmp_path, capsys):
  """The tokens run's checkpoint under an MQAR run config (the same model; no training)."""
  import shutil
  run = tmp_path / "run"
  shutil.copytree(tokens_run / "checkpoints", run / "checkpoints")
  cfg = json.loads((tokens_run / "config.json").read_text())
  cfg["data"].update(task="mqar", vocab_size=32, num_kv_pairs=4)
  (run / "config.json").write_text(json.dumps(cfg))
  assert evaluate(["--workdir", str(run), "--tasks", "mqar,ppl_by_position", "--lengths",
                   "32,64", "--pairs", "2,4,20", "--samples", "2", "--batch-size", "2"]) == 0
  assert "note: ppl_by_position skipped: needs a text_bytes or tokens run" in capsys.readouterr().err
  r = json.loads((run / "eval" / "results.json").read_text())
  acc = r["tasks"]["mqar"]["accuracy"]
  assert acc["32,20"] is None, "20 pairs need a vocabulary of 42 and 41 tokens"
  assert all(0 <= acc[k] <= 1 for k in ("32,2", "32,4", "64,2", "64,4"))
  assert (run / "eval" / "mqar.png").is_file() and "ppl_by_position" not in r["tasks"]


@pytest.mark.parametrize("argv,msg", [
    (["--tasks", "nope"], "--tasks nope: unknown task 'nope'; valid: ppl_by_position, passkey, mqar"),
    (["--lengths", "0,64"], "--lengths 0,64: each must be >= 1"),
    (["--depths", "0.5,2"], "--depths 0.5,2: each must be >= 0 and <= 1"),
    (["--samples", "0"], "--samples=0: must be an int >= 1"),
    (["--mesh", "data=3"], "--mesh data=3: mesh (data=3, fsdp=1, tensor=1, sequence=1): needs 3 devices"),
])
def test_evaluate_bad_input_is_one_line(tmp_path, capsys, argv, msg):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(C.to_dict(C.load(TINY))))
  (run / "checkpoints" / "2").mkdir(parents=True)
  assert evaluate(["--workdir", str(run), *argv]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and msg in err[0], err
  assert not (run / "eval").exists()
  assert evaluate(["--workdir", str(tmp_path / "nope")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_infer_prompt_uses_the_runs_tokenizer(tokens_run, capsys):
  from longax.infer.__main__ import main as infer
  from longax.train.tokens import TokenData
  assert infer(["--workdir", str(tokens_run), "--prompt", "alpha beta", "--max-new-tokens", "3"]) == 0
  text = capsys.readouterr().out.rstrip("\n")
  tok = TokenData(json.loads((tokens_run / "config.json").read_text())["data"]["path"]).tokenizer()
  assert text and len(tok.encode(text)) <= 3 + 1  # decoded text, not token ids
