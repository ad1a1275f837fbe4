"""Training: configs, data tasks, the loop, checkpoint/resume, signals, NaN, meshes, hosts."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longax.train import config as C
from longax.train.data import Dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_train_config.py")


def cli(workdir, *sets, devices=1, extra=(), env=None, wait=True):
  """Runs `python -m longax.train` on the tiny config in a fresh process."""
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
  cmd = [sys.executable, "-m", "longax.train", "--config", TINY, "--workdir", str(workdir),
         *extra, *(a for s in sets for a in ("--set", s))]
  if not wait:
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)


def metrics(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- configs


def test_overrides_parse_and_check_types():
  cfg = C.load(TINY)
  cfg = C.override(cfg, ["train.steps=3", "optim.lr=0.5", "model.layer_pattern=mamba2,softmax",
                         "model.attention.window=none", "model.tie_embeddings=true",
                         "data.path=/tmp/x"])
  assert (cfg.train.steps, cfg.optim.lr, cfg.model.layer_pattern) == (3, 0.5, ("mamba2", "softmax"))
  assert cfg.model.attention.window is None and cfg.model.tie_embeddings is True
  assert C.from_dict(json.loads(json.dumps(C.to_dict(cfg)))) == cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                                         if p.stem != "__init__"))
def test_shipped_configs_load_and_validate(name):
  cfg = C.load(str(ROOT / "configs" / f"{name}.py"))
  if cfg.data.task == "tokens":  # a prepared corpus first: the check says so, naming the key
    with pytest.raises(C.FieldError, match=r"data.path='runs/corpus': holds no meta.json"):
      C.validate(cfg, n_devices=1)
    return
  C.validate(cfg, n_devices=1)
  assert C.from_dict(json.loads(json.dumps(C.to_dict(cfg)))) == cfg


@pytest.mark.parametrize("assignment,msg", [
    ("train.stepz=3", r"unknown config key 'train.stepz': TrainConfig has .*steps"),
    ("optimizer.lr=1", r"unknown config key 'optimizer.lr': ExperimentConfig has data, mesh"),
    ("train.steps=lots", r"bad value for 'train.steps': 'lots' is not int"),
    ("model.tie_embeddings=maybe", r"bad value for 'model.tie_embeddings'"),
    ("model.layer_pattern=softmax,rwkv", r"unknown mixer 'rwkv'; valid: softmax"),
    ("optim=3", r"'optim' is a group"),
    ("train.steps", r"--set expects key=value"),
])
def test_override_errors(assignment, msg):
  with pytest.raises(C.ConfigError, match=msg):
    C.override(C.load(TINY), [assignment])


def test_cli_errors_are_one_line(tmp_path, capsys):
  r = cli(tmp_path / "a", "train.stepz=1")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      r.stderr.strip().splitlines()[0]] and "train.stepz" in r.stderr
  assert not (tmp_path / "a").exists(), "nothing is written for a bad config"
  # The rest through the CLI's main in this process (a subprocess costs a Python + JAX start).
  from longax.train.__main__ import main
  capsys.readouterr()
  assert main(["--config", str(tmp_path / "no.py")]) == 2
  assert "config file not found" in capsys.readouterr().err
  assert main(["--config", TINY, "--workdir", str(tmp_path / "b"), "--set",
               "train.sp_layout=spiral"]) == 2
  assert "train.sp_layout='spiral': must be one of contiguous, zigzag" in capsys.readouterr().err


# ------------------------------------------------------------------------------- data


@pytest.mark.parametrize("task", ["mqar", "selective_copy", "induction", "passkey"])
def test_synthetic_tasks_are_deterministic(task):
  cfg = C.DataConfig(task=task, seq_len=40, batch_size=4, vocab_size=32, num_kv_pairs=6,
                     num_tokens=5)
  d = Dataset(cfg)
  a, b, c = d.batch("train", 3), d.batch("train", 3), d.batch("train", 4)
  assert set(a) == {"tokens", "targets", "mask"}
  for k in a:
    assert a[k].shape == (4, 40)
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["tokens"], c["tokens"])
  assert not np.array_equal(a["tokens"], d.batch("val", 3)["tokens"])
  np.testing.assert_array_equal(a["tokens"][:, 1:], a["targets"][:, :-1])
  assert a["tokens"].max() < 32 and a["mask"].sum() > 0


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, None])
def test_passkey_answer_is_the_key_after_the_marker(depth):
  """The masked targets are the key's digits after the one marker (2); the marker sits at
  `depth` of the context, or anywhere (None: a place per sequence, several different in a
  batch)."""
  n = C.PASSKEY_DIGITS
  d = Dataset(C.DataConfig(task="passkey", seq_len=60, batch_size=16, vocab_size=32, depth=depth))
  bt = d.batch("train", 1)
  toks = np.concatenate([bt["tokens"], bt["targets"][:, -1:]], 1)  # the whole sequence
  marks = np.argwhere(toks == 2)
  assert list(marks[:, 0]) == list(range(16)), "one marker per sequence"
  at = marks[:, 1]
  for row in range(16):
    key = toks[row, at[row] + 1:at[row] + 1 + n]
    assert ((key >= 3) & (key < 13)).all()
    np.testing.assert_array_equal(bt["targets"][row][bt["mask"][row] > 0], key)
    assert toks[row, -n - 1] == 1  # the question
  last = 61 - n - 1 - n - 1  # the marker's last place
  if depth is None:
    assert len(set(at)) > 4 and at.min() >= 0 and at.max() <= last
  else:
    assert set(at) == {round(depth * last)}


def test_mqar_answers_are_the_bound_values():
  d = Dataset(C.DataConfig(task="mqar", seq_len=40, batch_size=3, vocab_size=32, num_kv_pairs=6))
  bt = d.batch("train", 0)
  for row in range(3):
    pairs = dict(zip(bt["tokens"][row, 0:12:2], bt["tokens"][row, 1:12:2]))
    assert len(pairs) == 6 and all(k < 16 <= v for k, v in pairs.items())
    for t in np.nonzero(bt["mask"][row])[0]:
      assert bt["targets"][row, t] == pairs[bt["tokens"][row, t]]


def test_text_bytes_packs_documents(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(6):
    (corpus / f"d{i}.py").write_text(f"doc {i} " * (20 + 5 * i))
  cfg = C.DataConfig(task="text_bytes", seq_len=64, batch_size=4, path=str(corpus), val_fraction=0.2)
  d = Dataset(cfg, tmp_path / "cache")
  bt = d.batch("train", 0)
  assert d.vocab_size == 256 and bt["segment_ids"].shape == (4, 64)
  assert np.all(np.diff(bt["segment_ids"], axis=1) >= 0)
  # The loss skips exactly the targets that start a new document.
  np.testing.assert_array_equal(bt["mask"][:, :-1] == 0, np.diff(bt["segment_ids"], axis=1) > 0)
  again = Dataset(cfg, tmp_path / "cache").batch("train", 0)  # from the memory-mapped cache
  np.testing.assert_array_equal(bt["tokens"], again["tokens"])
  with pytest.raises(C.ConfigError, match="data.path=.*: does not exist"):
    Dataset(C.DataConfig(task="text_bytes", path=str(tmp_path / "nope")), tmp_path / "cache")


# ------------------------------------------------------------------------------ loop


@pytest.mark.long
def test_few_steps_lower_the_loss_and_log(tmp_path):
  r = cli(tmp_path / "run", "train.steps=30", "optim.lr=1e-2", "train.eval_every=30")
  assert r.returncode == 0, r.stderr
  m = metrics(tmp_path / "run")
  assert [x["step"] for x in m] == list(range(1, 31))
  assert m[-1]["loss"] < m[0]["loss"] - 0.3
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "accuracy"):
    assert key in m[0]
  assert "eval_accuracy" in m[-1]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 30
  assert list((tmp_path / "run" / "tb").iterdir()), "tensorboard events"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """The tiny config's whole run (8 steps, checkpoints at 4 and 8), made once for the two
  tests that start from it (the long tests run first, together: tests/conftest.py).
  Read-only: a test that changes it works on a copy."""
  workdir = tmp_path_factory.mktemp("full") / "run"
  r = cli(workdir)
  assert r.returncode == 0, r.stderr
  return workdir


@pytest.mark.long
def test_resume_is_bit_identical(tmp_path, full_run):
  first = cli(tmp_path / "resumed", "train.stop_after=3")
  assert first.returncode == 0 and "stop_after at step 3" in first.stdout, first.stderr
  second = cli(tmp_path / "resumed")
  assert second.returncode == 0 and '"start_step": 3' in second.stdout, second.stderr
  strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]
  assert strip(metrics(tmp_path / "resumed")) == strip(metrics(full_run))


@pytest.mark.long
def test_sigterm_saves_and_exits(tmp_path):
  proc = cli(tmp_path / "run", "train.steps=100000", "train.checkpoint_every=100000", wait=False)
  path = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= 3):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  stopped_at = json.loads(out.strip().splitlines()[-1])["end_step"]
  assert "SIGTERM" in out and stopped_at >= 3
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == stopped_at


@pytest.mark.long
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  r = cli(tmp_path / "run", "optim.lr=1e30", "optim.clip_norm=1e30", "optim.warmup_steps=1",
          "train.checkpoint_every=1", "train.steps=50")
  assert r.returncode == 1
  line = r.stderr.strip().splitlines()[-1]
  assert "non-finite loss" in line and "at step" in line
  bad = int(line.split("at step ")[1].split(";")[0])
  good = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert good and good[-1] == bad - 1


@pytest.mark.long
def test_corrupt_checkpoint_falls_back_with_a_warning(tmp_path, full_run):
  shutil.copytree(full_run, tmp_path / "run")  # checkpoints at 4 and 8
  latest = tmp_path / "run" / "checkpoints" / "8" / "state"
  for f in latest.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  r = cli(tmp_path / "run", "train.steps=10")
  assert r.returncode == 0, r.stderr
  assert "warning: checkpoint step 8 in" in r.stderr and "is unreadable" in r.stderr
  assert "; using step 4" in r.stderr and '"start_step": 4' in r.stdout
  # saving step 8 again keeps the unreadable one (renamed) beside the new one
  kept = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
  assert "8" in kept and any(k.startswith("8.unreadable-") for k in kept)


# ------------------------------------------------------------------------ meshes, hosts


def _losses(workdir):
  return np.array([m["loss"] for m in metrics(workdir)])


@pytest.mark.long
def test_2x2_mesh_and_two_processes_equal_one_device(tmp_path):
  """A (data, fsdp) = (2, 2) mesh on 4 devices of one process gives the losses of one
  device; the same mesh over 2 processes x 2 devices gives those of the one process.
  (One test, so the 4-device run serves both comparisons: it was run twice.)"""
  one = cli(tmp_path / "one", "train.steps=4")
  four = cli(tmp_path / "four", "train.steps=4", "mesh.data=2", "mesh.fsdp=2", devices=4)
  assert one.returncode == 0 and four.returncode == 0, four.stderr
  np.testing.assert_allclose(_losses(tmp_path / "four"), _losses(tmp_path / "one"), rtol=2e-5)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [cli(tmp_path / "multi", "train.steps=4", "mesh.data=2", "mesh.fsdp=2", devices=2,
               extra=["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                      "--process-id", str(i)], wait=False) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
  np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "four"), rtol=2e-5)


HYBRID = ["model.layer_pattern=mamba2,gla,softmax,mamba", "model.n_layers=4",
          "model.mamba2.head_dim=16", "model.mamba2.d_state=8", "model.short_conv=3",
          "train.steps=3"]


@pytest.mark.long
def test_sequence_parallel_equals_one_device(tmp_path):
  """A hybrid (Mamba-2, GLA, softmax, Mamba-1, each with a short conv) with the sequence split
  2 ways (ring attention, zigzag) and 2 ways beside data=2 (Ulysses, contiguous): the losses
  of one device."""
  one = cli(tmp_path / "one", *HYBRID)
  ring = cli(tmp_path / "ring", *HYBRID, "mesh.sequence=2", "train.sp_layout=zigzag", devices=2)
  uly = cli(tmp_path / "uly", *HYBRID, "mesh.sequence=2", "mesh.data=2",
            "train.sp_attention=ulysses", devices=4)
  for r in (one, ring, uly):
    assert r.returncode == 0, r.stderr[-3000:]
  np.testing.assert_allclose(_losses(tmp_path / "ring"), _losses(tmp_path / "one"), rtol=2e-5)
  np.testing.assert_allclose(_losses(tmp_path / "uly"), _losses(tmp_path / "one"), rtol=2e-5)


@pytest.mark.parametrize("sets,msg", [
    (["mesh.sequence=2", "train.sp_layout=zigzag", "data.seq_len=30"],
     "data.seq_len=30: must be a multiple of 4 = 2 x mesh.sequence"),
    (["mesh.sequence=4", "train.sp_layout=zigzag", "model.layer_pattern=mamba,softmax",
      "data.seq_len=16"], "data.seq_len=16: must give each of the 8 sequence chunks at least"),
    (["mesh.sequence=2", "model.attention.softcap=30.0"], "mesh.sequence=2: the softmax layers have attention sinks or a softcap"),
    (["mesh.sequence=4", "train.sp_attention=ulysses"], "train.sp_attention='ulysses': splits the heads: needs model.n_heads=2 divisible by the sequence axis 4"),
])
def test_sequence_parallel_config_errors(sets, msg):
  with pytest.raises(C.ConfigError, match=msg):
    C.validate(C.override(C.load(TINY), sets), 4)


@pytest.mark.long
def test_grad_accum_and_remat_match_the_plain_step(tmp_path):
  """MQAR rows carry equal answer counts, so the mean over microbatch means is the batch
  mean: accumulation and remat change memory, not the losses."""
  from longax.train import Trainer
  base = C.override(C.load(TINY), ["train.steps=3", "train.eval_every=100"])
  runs = {"plain": [], "accum": ["optim.grad_accum=2"], "remat": ["train.remat=block"]}
  losses = {}
  for name, sets in runs.items():
    Trainer(C.override(base, sets), tmp_path / name).run()
    losses[name] = _losses(tmp_path / name)
  np.testing.assert_allclose(losses["accum"], losses["plain"], rtol=1e-5)
  np.testing.assert_allclose(losses["remat"], losses["plain"], rtol=1e-5)
  with pytest.raises(C.ConfigError, match="must be a multiple of optim.grad_accum=3"):
    Trainer(C.override(base, ["optim.grad_accum=3"]), tmp_path / "bad")


def test_config_file_errors(tmp_path):
  (tmp_path / "none.py").write_text("x = 1\n")
  (tmp_path / "wrong.py").write_text("def get_config():\n  return {}\n")
  with pytest.raises(C.ConfigError, match="defines no get_config"):
    C.load(tmp_path / "none.py")
  with pytest.raises(C.ConfigError, match="returned dict, not ExperimentConfig"):
    C.load(tmp_path / "wrong.py")
  with pytest.raises(C.ConfigError, match="'train.steps.x': steps has no sub-keys"):
    C.override(C.load(TINY), ["train.steps.x=1"])


@pytest.mark.parametrize("kw,msg", [
    (dict(task="copying"), "data.task='copying': must be one of mqar, selective_copy"),
    (dict(task="mqar", seq_len=10, num_kv_pairs=8),
     "data.seq_len=10: must be >= 17 for data.task='mqar' with num_kv_pairs=8"),
    (dict(task="mqar", seq_len=64, num_kv_pairs=20, vocab_size=32),
     "data.vocab_size=32: must be >= 42 for data.task='mqar' with num_kv_pairs=20"),
])
def test_data_config_errors(kw, msg):
  with pytest.raises(C.ConfigError, match=msg):
    Dataset(C.DataConfig(**kw))


def test_data_content_errors(tmp_path):
  with pytest.raises(C.ConfigError, match="data.vocab_size=12: must be >= 16 for data.task='passkey'"):
    Dataset(C.DataConfig(task="passkey", vocab_size=12)).batch("train", 0)
  tiny_corpus = tmp_path / "c"
  tiny_corpus.mkdir()
  (tiny_corpus / "a.py").write_text("x")
  (tiny_corpus / "b.py").write_text("y")
  with pytest.raises(C.ConfigError, match="too little text"):
    Dataset(C.DataConfig(task="text_bytes", path=str(tiny_corpus)), tmp_path / "cache")


@pytest.mark.parametrize("mesh,msg", [
    (C.MeshConfig(data=-1, fsdp=-1), "at most one axis may be -1"),
    (C.MeshConfig(data=-1, fsdp=3), "3 does not divide the 2 devices"),
    (C.MeshConfig(data=2, fsdp=2), "needs 4 devices, there are 2"),
    (C.MeshConfig(data=0), r"mesh.data=0: must be an int >= 1, or -1"),
])
def test_mesh_errors(mesh, msg):
  import jax
  from longax.train import make_mesh
  with pytest.raises(C.ConfigError, match=msg):
    make_mesh(mesh, devices=jax.devices()[:1] * 2)


@pytest.mark.parametrize("sets,msg", [
    (["model.vocab_size=16"], "model.vocab_size=16: must be >= data.vocab_size=32"),
    (["train.remat=all"], "train.remat='all': must be one of none, block"),
])
def test_trainer_config_errors(tmp_path, sets, msg):
  from longax.train import Trainer
  with pytest.raises(C.ConfigError, match=msg):
    Trainer(C.override(C.load(TINY), sets), tmp_path / "run")


def test_jla_peer_mapping_keeps_the_model_shape(tmp_path):
  from longax.benchmarks import train as bench
  cfg = C.load(str(ROOT / "configs/hybrid_350m.py"))
  m = bench.jla_mapping(cfg, tmp_path)
  assert m["model"]["layer_types"][:3] == ["mamba2", "mamba2", "attention"]
  assert len(m["model"]["layer_types"]) == cfg.model.n_layers == m["model"]["n_layers"]
  assert (m["model"]["attention"]["num_kv_heads"], m["model"]["ssm"]["d_state"]) == (4, 128)
  assert m["train"]["seq_len"] * m["train"]["micro_batch_per_replica"] == 2048 * 16
  with pytest.raises(SystemExit, match="gla"):
    bench.jla_mapping(C.override(C.load(str(ROOT / "configs/mqar.py")), []), tmp_path)


def test_train_benchmark_errors(tmp_path, monkeypatch):
  from longax.benchmarks import train as bench
  with pytest.raises(SystemExit, match="error: unknown config key .model.nope.: LMConfig has"):
    bench.main(["--config", str(ROOT / "configs/mqar.py"), "--set", "model.nope=1"])
  monkeypatch.setitem(sys.modules, "jla.config", None)  # as if jla were not installed
  cfg = C.load(str(ROOT / "configs/hybrid_350m.py"))
  with pytest.raises(SystemExit, match="--peer jla: jax-linear-attention is not installed"):
    bench.run_jla(cfg, tmp_path)


def test_train_benchmark_warns_on_a_peer_of_another_size(tmp_path, capsys):
  from longax.benchmarks import train as bench
  cfg = C.load(str(ROOT / "configs/hybrid_350m.py"))
  (tmp_path / "run.json").write_text(json.dumps(dict(parameters=123)))
  bench.check_param_count(cfg, tmp_path / "run.json")
  assert "warning: jla's model has 123 parameters, longax's 365270208" in capsys.readouterr().err
  (tmp_path / "run.json").write_text(json.dumps(dict(parameters=365270208)))
  bench.check_param_count(cfg, tmp_path / "run.json")
  assert capsys.readouterr().err == ""


def test_init_from_starts_from_another_runs_parameters(tmp_path, capsys):
  """train.init_from: a fresh run at a longer seq_len takes the short run's newest parameters
  (every leaf equal), a new optimizer state and step 0; a resume ignores it."""
  from longax.train import Trainer
  from longax.train import config as C
  from longax.train.workdir import read_params
  base = C.load(str(ROOT / "tests" / "tiny_train_config.py"))
  Trainer(C.override(base, ["train.steps=2", "train.eval_every=100"]), tmp_path / "short").run()
  src, step, _ = read_params(tmp_path / "short")
  assert step == 2
  long = C.override(base, ["data.seq_len=64", "model.max_len=64", "train.steps=1",
                           "train.eval_every=100", f"train.init_from={tmp_path / 'short'}"])
  t = Trainer(long, tmp_path / "long")
  state = t._params_from(t._init_state(), str(tmp_path / "short"))
  flat = lambda tree: {jax.tree_util.keystr(p).replace("'", ""): np.asarray(x)
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  mine, theirs = flat(state["params"]), flat(src)
  assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
  assert int(state["step"]) == 0
  assert all(float(jnp.sum(jnp.abs(x))) == 0 for x in jax.tree.leaves(state["opt"])
             if jnp.issubdtype(x.dtype, jnp.floating))  # Adam's moments start at zero
  capsys.readouterr()
  assert Trainer(long, tmp_path / "long").run()["start_step"] == 0
  assert f"parameters from {tmp_path / 'short'} (step 2)" in capsys.readouterr().err
  resumed = C.override(long, ["train.steps=2"])
  assert Trainer(resumed, tmp_path / "long").run()["start_step"] == 1
  assert "parameters from" not in capsys.readouterr().err


def test_init_from_errors_are_one_line(tmp_path):
  from longax.train import Trainer
  from longax.train import config as C
  from longax.train.trainer import CheckpointError
  base = C.load(str(ROOT / "tests" / "tiny_train_config.py"))
  with pytest.raises(C.ConfigError, match="train.init_from=.*: must be a run folder with a checkpoint"):
    C.validate(C.override(base, [f"train.init_from={tmp_path / 'none'}"]))
  Trainer(C.override(base, ["train.steps=1", "train.eval_every=100"]), tmp_path / "short").run()
  wider = C.override(base, ["model.d_ff=96", f"train.init_from={tmp_path / 'short'}"])
  with pytest.raises(CheckpointError, match=r"parameter blocks/0/mlp/down/kernel has shape \(64, 32\) there, \(96, 32\) here"):
    Trainer(wider, tmp_path / "wide").run()
  assert not (tmp_path / "wide").exists()  # refused before anything was written
