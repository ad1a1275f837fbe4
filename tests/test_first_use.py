"""First use and failure (issue #11): a bad value, workdir, checkpoint folder, cache or
flag stops before any work with ONE line on stderr naming it, and writes nothing."""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

from longax.train import config as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_train_config.py")


def run(module, *args, cwd, env=None):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=e,
                        capture_output=True, text=True, timeout=300)


def train(cwd, workdir, *sets, extra=(), env=None):
  args = ["--config", TINY, *(["--workdir", str(workdir)] if workdir else []), *extra]
  return run("longax.train", *args, *(a for s in sets for a in ("--set", s)), cwd=cwd, env=env)


def one_error(r, *words) -> str:
  """The single stderr line of a run that exited 2; it names every one of `words`."""
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  assert all(w in lines[0] for w in words), lines[0]
  return lines[0]


def steps_in(folder) -> list[str]:
  return sorted(p.name for p in pathlib.Path(folder).iterdir())


# ------------------------------------------------------------------- config values

OUT_OF_RANGE = [
    ("model.attention.window=0", "model.attention.window=0: must be an int >= 1 or none"),
    ("model.mixer=foo", "model.mixer='foo': unknown mixer 'foo'"),
    ("model.mixer=mamba", "model.mixer='mamba': is not in layer_pattern=('gla', 'softmax')"),
    ("model.layer_pattern=softmax,rwkv", "model.layer_pattern=('softmax', 'rwkv'): unknown mixer"),
    ("model.n_kv_heads=3", "model.n_kv_heads=3: must divide n_heads=2"),
    ("model.n_heads=3", "model.n_heads=3: must divide d_model=32"),
    ("model.attention.sinks=2", "model.attention.sinks=2: sinks only matter with a sliding window"),
    ("model.attention.sinks=-1", "model.attention.sinks=-1: must be an int >= 0"),
    ("model.d_ff=-1", "model.d_ff=-1: must be an int >= 0 or none"),
    ("model.dtype=float64", "model.dtype='float64': must be one of float32, bfloat16"),
    ("model.impl=fast", "model.impl='fast': must be one of auto"),
    ("model.max_len=0", "model.max_len=0: must be an int >= 1"),
    ("model.vocab_size=16", "model.vocab_size=16: must be >= data.vocab_size=32"),
    ("model.linear.chunk_size=0", "model.linear.chunk_size=0: must be an int >= 1"),
    ("model.mamba2.dt_min=0", "model.mamba2.dt_min=0.0: must be a number > 0"),
    ("optim.lr=0", "optim.lr=0.0: must be a number > 0"),
    ("optim.lr=nan", "optim.lr=nan: must be a number > 0"),
    ("optim.b2=1", "optim.b2=1.0: must be a number in [0, 1)"),
    ("optim.grad_accum=0", "optim.grad_accum=0: must be an int >= 1"),
    ("optim.grad_accum=3", "data.batch_size=8: must be a multiple of optim.grad_accum=3"),
    ("data.val_fraction=1", "data.val_fraction=1.0: must be a number in [0, 1)"),
    ("data.depth=1.5", "data.depth=1.5: must be a number in [0, 1]"),
    ("data.batch_size=0", "data.batch_size=0: must be an int >= 1"),
    ("data.seed=-1", "data.seed=-1: must be an int >= 0"),
    ("data.seq_len=64", "data.seq_len=64: must be <= model.max_len=32"),
    ("data.seq_len=8", "data.seq_len=8: must be >= 9 for data.task='mqar' with num_kv_pairs=4"),
    ("data.task=copying", "data.task='copying': must be one of mqar"),
    ("data.cache_dir=", "data.cache_dir='': must be a non-empty string or none"),
    ("data.depth=2", "data.depth=2.0: must be a number in [0, 1] or none"),
    ("train.steps=0", "train.steps=0: must be an int >= 1"),
    ("train.log_every=0", "train.log_every=0: must be an int >= 1"),
    ("train.eval_every=0", "train.eval_every=0: must be an int >= 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0: must be an int >= 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0: must be an int >= 1"),
    ("train.remat=all", "train.remat='all': must be one of none, block"),
    ("train.stop_after=0", "train.stop_after=0: must be an int >= 1 or none"),
    ("mesh.fsdp=0", "mesh.fsdp=0: must be an int >= 1, or -1"),
    ("mesh.sequence=0", "mesh.sequence=0: must be an int >= 1, or -1"),
    ("train.sp_attention=mesh", "train.sp_attention='mesh': must be one of ring, ulysses"),
    ("mesh.data=2", "mesh (data=2, fsdp=1, tensor=1, sequence=1): needs 2 devices, there are 1"),
    ("name=a/b", "name='a/b': must be a non-empty string without '/'"),
]


@pytest.mark.parametrize("assignment,msg", OUT_OF_RANGE, ids=[c[0] for c in OUT_OF_RANGE])
def test_out_of_range_values_are_one_line_and_write_nothing(tmp_path, capsys, assignment, msg):
  """Through the CLI's main (in process: fast); the subprocess test below runs a few."""
  from longax.train.__main__ import main
  code = main(["--config", TINY, "--workdir", str(tmp_path / "run"), "--set", assignment])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err == [f"error: {err[0][7:]}"] and msg in err[0], err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("assignment,key", [
    ("model.attention.window=0", "model.attention.window=0"),
    ("model.mixer=foo", "model.mixer='foo'"),
    ("model.mixer=mamba", "model.mixer='mamba': is not in layer_pattern"),
    ("mesh.data=2", "needs 2 devices")])
def test_cli_config_errors_in_a_subprocess(tmp_path, assignment, key):
  r = train(tmp_path, None, assignment)  # default workdir: runs/... under cwd
  one_error(r, key)
  assert list(tmp_path.iterdir()) == [], "nothing is written, not even runs/"


def test_every_config_field_has_a_rule():
  for cls, rules in C.RULES.items():
    fields = {f.name for f in dataclasses.fields(cls)}
    nested = {f for f in fields if cls.__dataclass_fields__[f].type in
              {c.__name__ for c in C.RULES}}
    assert fields - nested == set(rules), cls.__name__


def test_shipped_configs_validate():
  for name in ("mqar", "text_bytes", "hybrid_350m", "attention_350m", "gla_350m"):
    C.validate(C.load(ROOT / "configs" / f"{name}.py"))


def test_350m_configs_match_in_size():
  """The pure-attention and pure-GLA baselines are within 2% of the hybrid's parameters."""
  from longax.models import count_params
  sizes = {n: count_params(C.load(ROOT / "configs" / f"{n}.py").model)
           for n in ("hybrid_350m", "attention_350m", "gla_350m")}
  assert all(abs(v / sizes["hybrid_350m"] - 1) < 0.02 for v in sizes.values()), sizes


def test_a_broken_config_file_is_one_line(tmp_path, capsys):
  from longax.train.__main__ import main
  (tmp_path / "bad.py").write_text(
      "from longax.models import LMConfig\n\ndef get_config():\n"
      "  return LMConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=3, mixer='softmax')\n")
  assert main(["--config", str(tmp_path / "bad.py"), "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "bad.py" in err[0] and "n_kv_heads=none: must divide" not in err[0]
  assert "n_heads=3: must divide d_model=8" in err[0], err
  (tmp_path / "boom.py").write_text("def get_config():\n  return 1 / 0\n")
  assert main(["--config", str(tmp_path / "boom.py")]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: {tmp_path / 'boom.py'}:2: ZeroDivisionError: division by zero")


# --------------------------------------------------------------------------- workdir


def _workdir_cases(tmp_path):
  (tmp_path / "file").write_text("x")
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  return {"a file": (tmp_path / "file", {}, "is a file, not a folder"),
          "under a file": (tmp_path / "file" / "run", {}, "is a file, so no folder can be made"),
          "read-only": (ro / "run", {}, "cannot write in"),
          "no space": (tmp_path / "run", {"LONGAX_MIN_FREE_MB": "1e12"}, "MB free in")}


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only", "no space"])
def test_workdir_problems_before_any_work(tmp_path, case):
  if case == "read-only" and os.geteuid() == 0:
    pytest.skip("root writes through permissions")
  workdir, env, msg = _workdir_cases(tmp_path)[case]
  before = sorted(tmp_path.rglob("*"))
  one_error(train(tmp_path, workdir, extra=(), env=env), f"--workdir {workdir}", msg)
  assert sorted(tmp_path.rglob("*")) == before


def test_workdir_threshold_env_must_be_a_number(tmp_path):
  one_error(train(tmp_path, tmp_path / "run", env={"LONGAX_MIN_FREE_MB": "lots"}),
            "LONGAX_MIN_FREE_MB='lots'")
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- checkpoints


def _corrupt(step_dir):
  for f in pathlib.Path(step_dir).rglob("*"):
    if f.is_file() and f.parent.name == "d":  # the array data; the metadata still parses
      f.write_bytes(b"garbage")


@pytest.mark.long
def test_unreadable_checkpoints_are_kept_and_never_push_out_good_ones(tmp_path):
  wd = tmp_path / "run"
  _train_in_process(wd, "train.steps=4", "train.checkpoint_every=2")
  ck = wd / "checkpoints"
  _corrupt(ck / "4")
  # keep_checkpoints=1 while the unreadable step 4 is the newest: the good ones the run
  # saves must stay (orbax's own max_to_keep would keep step 4 and delete them).
  r = train(tmp_path, wd, "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=1")
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and re.fullmatch(
      rf"warning: checkpoint step 4 in {re.escape(str(ck))} is unreadable \(\w+: [^\n]+\); "
      r"using step 2", warnings[0]), warnings
  assert "0x" not in warnings[0] and len(warnings[0]) < 400
  assert '"start_step": 2' in r.stdout and steps_in(ck) == ["3", "4"]
  assert all(f.read_bytes() == b"garbage" for f in (ck / "4").rglob("*") if f.parent.name == "d")
  # Saving step 4 again keeps the unreadable one beside the new one, and says so.
  r = train(tmp_path, wd, "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=1")
  assert r.returncode == 0 and "using step 3" in r.stderr, r.stderr[-3000:]
  assert "saving step 4 again; its unreadable checkpoint is kept as" in r.stderr
  assert [s for s in steps_in(ck) if not s.startswith("4.unreadable-")] == ["5"]
  assert len(steps_in(ck)) == 2


def _train_in_process(wd, *sets):
  from longax.train import Trainer
  Trainer(C.override(C.load(TINY), ["train.eval_every=100", *sets]), wd).run()


def _main_in_process(capsys, *args):
  """(exit code, stdout, stderr) of `python -m longax.train --config TINY ARGS` run through
  its main in this process (a subprocess costs a JAX start and the model's eager init)."""
  from longax.train.__main__ import main
  capsys.readouterr()
  code = main(["--config", TINY, *args])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.long
def test_no_readable_checkpoint_refuses_until_fresh(tmp_path, capsys):
  """The first refusal and the first --fresh in a subprocess, their repeats in process."""
  wd = tmp_path / "run"
  _train_in_process(wd, "train.steps=2", "train.checkpoint_every=1")
  ck = wd / "checkpoints"
  for step in ("1", "2"):
    _corrupt(ck / step)
  before = sorted(p.relative_to(wd) for p in wd.rglob("*"))
  line = one_error(train(tmp_path, wd, "train.steps=3"), f"no checkpoint in {ck} restores",
                   "tried steps 2, 1", "--fresh")
  assert sorted(p.relative_to(wd) for p in wd.rglob("*")) == before, line
  # nothing was moved: the second try refuses the same way
  code, _, err = _main_in_process(capsys, "--workdir", str(wd), "--set", "train.steps=3")
  assert code == 2 and err.strip().splitlines() == [line], err
  assert sorted(p.relative_to(wd) for p in wd.rglob("*")) == before, line
  r = train(tmp_path, wd, "train.steps=1", extra=["--fresh"])
  assert r.returncode == 0 and '"start_step": 0' in r.stdout, r.stderr[-3000:]
  kept = [p for p in wd.iterdir() if p.name.startswith("checkpoints.unreadable-")]
  assert len(kept) == 1 and steps_in(kept[0]) == ["1", "2"]
  assert f"longax: --fresh: moved the unreadable checkpoints (steps 1, 2) to {kept[0]}" in r.stderr
  # --fresh over readable checkpoints keeps them too, as checkpoints.old-<time>.
  code, out, err = _main_in_process(capsys, "--workdir", str(wd), "--set", "train.steps=1",
                                    "--fresh")
  assert code == 0 and '"start_step": 0' in out and "moved the checkpoints (steps 1)" in err, err
  assert [p.name for p in wd.iterdir() if p.name.startswith("checkpoints.old-")]


# ---------------------------------------------------------------------------- caches


def test_cache_dir_defaults(monkeypatch, tmp_path):
  from longax.train.data import cache_dir
  d = C.DataConfig(task="text_bytes")
  monkeypatch.setenv("LONGAX_CACHE_DIR", str(tmp_path / "env"))
  assert cache_dir(d) == tmp_path / "env"
  assert cache_dir(C.DataConfig(cache_dir=str(tmp_path / "key"))) == tmp_path / "key"
  monkeypatch.delenv("LONGAX_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache_dir(d) == tmp_path / "xdg" / "longax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cache_dir(d) == tmp_path / "home" / ".cache" / "longax"


def _corpus(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(4):
    (corpus / f"d{i}.py").write_text(f"doc {i} " * 200)
  return corpus


def test_the_byte_cache_is_announced_once(tmp_path, capsys):
  from longax.train.data import Dataset
  cfg = C.DataConfig(task="text_bytes", seq_len=32, path=str(_corpus(tmp_path)),
                     cache_dir=str(tmp_path / "cache"))
  Dataset(cfg)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and re.fullmatch(
      rf"longax: caching the byte corpus \(0\.0 MB\) in {re.escape(str(tmp_path / 'cache'))}/bytes-\w+\.bin",
      err[0]), err
  Dataset(cfg)
  assert capsys.readouterr().err == ""


def test_an_unwritable_cache_dir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  r = run("longax.train", "--config", str(ROOT / "configs" / "text_bytes.py"), "--workdir",
          str(tmp_path / "run"), "--set", f"data.path={_corpus(tmp_path)}", "--set",
          f"data.cache_dir={tmp_path / 'file' / 'cache'}", cwd=tmp_path)
  one_error(r, "data.cache_dir: cannot write the byte corpus cache in", "LONGAX_CACHE_DIR")
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 1-step tiny run (max_len 32, a softmax layer with a full KV cache)."""
  from longax.train import Trainer
  wd = tmp_path_factory.mktemp("infer") / "run"
  Trainer(C.override(C.load(TINY), ["train.steps=1", "train.eval_every=100"]), wd).run()
  return wd


INFER_BAD = [
    (["--temperature", "-1"], "--temperature=-1.0: must be a number >= 0"),
    (["--top-k", "0"], "--top-k=0: must be an int >= 1 or none"),
    (["--top-k", "33"], "--top-k=33: must be in [1, 32]"),
    (["--top-p", "0"], "--top-p=0.0: must be a number in (0, 1] or none"),
    (["--top-p", "1.5"], "--top-p=1.5: must be a number in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0: must be an int >= 1"),
    (["--prefill-chunk", "0"], "--prefill-chunk=0: must be an int >= 1"),
    (["--stop-tokens", "1,x"], "--stop-tokens must be comma-separated integers"),
    (["--stop-tokens", "99"], "--stop-tokens=[99]: token 99 is outside the vocabulary [0, 32)"),
    (["--streaming", "4"], "--streaming expects SINKS,WINDOW"),
    (["--streaming=-1,4"], "--streaming -1,4: SINKS must be >= 0 and WINDOW >= 1"),
    (["--streaming", "1,0"], "--streaming 1,0: SINKS must be >= 0 and WINDOW >= 1"),
    (["--prompt-tokens", "1,500"], "token 500 is outside [0, 32)"),
    (["--max-new-tokens", "30"], "--max-new-tokens=30: the prompt (3 tokens) + 30 new = 33 exceeds "
                                 "model.max_len=32"),
]


@pytest.mark.parametrize("flags,msg", INFER_BAD, ids=[" ".join(c[0]) for c in INFER_BAD])
def test_infer_flags_are_checked_before_loading(trained, capsys, flags, msg):
  from longax.infer.__main__ import main
  base = ["--workdir", str(trained), "--max-new-tokens", "4"]
  if "--prompt-tokens" not in flags:
    base += ["--prompt-tokens", "1,17,2"]
  assert main(base + flags) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err


def test_infer_length_error_in_a_subprocess(trained, tmp_path):
  r = run("longax.infer", "--workdir", str(trained), "--prompt-tokens", ",".join(["1"] * 30),
          "--max-new-tokens", "8", cwd=tmp_path)
  one_error(r, "--max-new-tokens=8", "exceeds model.max_len=32", "--streaming")
  r = run("longax.infer", "--workdir", str(trained), "--prompt-tokens", ",".join(["1"] * 30),
          "--max-new-tokens", "8", "--streaming", "1,4", cwd=tmp_path)
  assert r.returncode == 0 and len(r.stdout.strip().split(",")) == 8, r.stderr[-2000:]
  warning = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
  assert warning == ["warning: --streaming 1,4: the model was trained with full attention; past "
                     "5 of these 38 tokens its attention layers see only the first 1 and the last 4"]


def test_max_len_binds_only_full_kv_caches():
  from flax import nnx
  from longax.infer import generate
  from longax.models import LM, AttentionConfig, LMConfig
  from longax.models.config import FieldError
  base = dict(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_len=8, d_ff=0)
  full = LM(LMConfig(mixer="softmax", **base), rngs=nnx.Rngs(0))
  with pytest.raises(FieldError, match=r"^generate: max_new_tokens=4: the prompt \(5 tokens\) \+ "
                                       r"4 new = 9 exceeds model.max_len=8"):
    generate(full, [[1, 2, 3, 4, 5]], max_new_tokens=4)
  for cfg in (LMConfig(mixer="softmax", attention=AttentionConfig(window=4), **base),
              LMConfig(mixer="gla", **base)):
    out = generate(LM(cfg, rngs=nnx.Rngs(0)), [[1, 2, 3, 4, 5]], max_new_tokens=6)
    assert len(out[0]) == 6


def test_help_shows_defaults(capsys):
  from longax.infer.__main__ import parse_args as infer_args
  from longax.train.__main__ import parse_args as train_args
  for parse, wants in ((train_args, ["(default: [])", "--fresh"]),
                       (infer_args, ["(default: 64)", "(default: 0.0)", "--prefill-chunk"])):
    with pytest.raises(SystemExit):
      parse(["--help"])
    out = capsys.readouterr().out
    assert all(w in out for w in wants), out
