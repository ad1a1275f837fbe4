"""The sweep runner (longax.train.sweep): points, dry runs, errors, results, reruns, --jobs.

Every training run is a 1-layer d=16 model on 2-pair MQAR for 3 steps (seconds on CPU)."""

import csv
import json
import pathlib
import textwrap

import pytest

from longax.models import LMConfig
from longax.train import sweep as sw
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from longax.train.sweep import Plot, Point, Sweep

TINY = """
from longax.models import LMConfig
from longax.train.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from longax.train.sweep import Plot, Sweep


def base():
  return ExperimentConfig(
      name="tiny", model=LMConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2,
                                  mixer="softmax", d_ff=0, max_len=16),
      data=DataConfig(task="mqar", seq_len=16, batch_size=4, vocab_size=16, num_kv_pairs=2),
      optim=OptimConfig(warmup_steps=1),
      train=TrainConfig(steps=3, log_every=1, eval_every=3, eval_batches=1, checkpoint_every=3))
"""


def tiny() -> ExperimentConfig:
  namespace = {}
  exec(TINY, namespace)
  return namespace["base"]()


def write_sweep(tmp_path, body: str) -> pathlib.Path:
  path = tmp_path / "s.py"
  path.write_text(TINY + textwrap.dedent(body))
  return path


MIXERS = """
def get_sweep():
  return Sweep(base=base(), grid={"model.mixer": ["softmax", "gla"]},
               plots=[Plot(x="model.mixer", y="final_eval_accuracy", file="acc.png")])
"""


@pytest.mark.parametrize("grid, points, seeds, n", [
    ({"a.b": [1, 2]}, (), None, 2),
    ({"a.b": [1, 2], "c": ["x", "y", "z"]}, (), None, 6),
    ({}, ({"a.b": 1}, {"c": "x"}), None, 2),
    ({"a.b": [1, 2]}, ({"c": "x"}, {"c": "y"}), (0, 1), 8),
])
def test_expand_counts(grid, points, seeds, n):
  out = sw.expand(Sweep(base="x", grid=grid, points=points, seeds=seeds))
  assert len(out) == n and len({tuple(p.items()) for p in out}) == n
  assert all(("train.seed" in p) == (seeds is not None) for p in out)


@pytest.mark.parametrize("value, raw", [(None, "none"), (True, "true"), (3, "3"), (0.5, "0.5"),
                                        ("gla", "gla"), (("gla", "softmax"), "gla,softmax")])
def test_as_set_round_trips_through_override(value, raw):
  assert sw.as_set(value) == raw
  key = {None: "train.stop_after", True: "model.tie_embeddings", 3: "model.n_layers",
         0.5: "optim.b1", "gla": "model.mixer"}.get(value, "model.layer_pattern")
  cfg = sw.override(tiny(), [f"{key}={raw}"] + (["model.mixer=gla"] if key == "model.layer_pattern" else []))
  assert sw.as_set(eval(f"cfg.{key}")) == raw


def test_point_names_are_stable_and_distinct():
  a = sw.point_name({"model.mixer": "gla", "model.layer_pattern": "gla,softmax"})
  assert a == sw.point_name({"model.mixer": "gla", "model.layer_pattern": "gla,softmax"})
  assert a != sw.point_name({"model.mixer": "gla", "model.layer_pattern": "gla"})
  assert "/" not in a and "(" not in a


def test_dry_run_prints_a_line_per_point_and_writes_nothing(tmp_path, capsys):
  path = write_sweep(tmp_path, """
      def get_sweep():
        return Sweep(base=base(), grid={"model.mixer": ["softmax", "gla"], "model.d_model": [16, 32]},
                     points=[{"model.layer_pattern": None}], seeds=(0, 1))
      """)
  assert sw.main([str(path), "--workdir", str(tmp_path / "out"), "--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 8
  assert lines[0].split() == ["pending", "model.layer_pattern=none", "model.mixer=softmax",
                              "model.d_model=16", "train.seed=0"]
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, body, message", [
    (["--grid", "model.nope=1,2"], None, "unknown config key 'model.nope'"),
    (["--grid", "model.d_model=16,abc"], None, "bad value for 'model.d_model'"),
    (["--grid", "model.n_heads=2,3"], None, "model.n_heads=3"),  # 3 does not divide 16
    (["--grid", "model.d_model"], None, "--grid expects key=v1,v2"),
    (["--grid", "model.mixer=gla", "--set", "model.mixer=softmax"], None, "that key is swept"),
    (["--jobs", "0"], None, "--jobs 0"),
    ([], "x = 1\n", "defines no get_sweep()"),
    ([], "def get_sweep():\n  return 3\n", "not Sweep or dict"),
    ([], "def get_sweep():\n  return dict(base=base(), grids={})\n", "unknown field 'grids'"),
    ([], "def get_sweep():\n  return dict(base=base(), grid={'model.mixer': ['gla', 'nope']})\n",
     "unknown mixer 'nope'"),
    ([], "def get_sweep():\n  raise KeyError('boom')\n", "KeyError"),
    (["missing.py"], None, "sweep file not found"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, body, message):
  (tmp_path / "base.py").write_text(TINY + "\ndef get_config():\n  return base()\n")
  if body is not None:
    argv = [str(write_sweep(tmp_path, body))]
  elif args[:1] == ["missing.py"]:
    argv = [str(tmp_path / "missing.py")]
    args = args[1:]
  else:
    argv = ["--config", str(tmp_path / "base.py")]
  assert sw.main(argv + args + ["--workdir", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert not (tmp_path / "out").exists()


def test_sweep_records_failure_goes_on_and_skips_finished_on_rerun(tmp_path, monkeypatch):
  import longax.train.trainer as trainer
  real, runs = trainer.Trainer, []

  def fake(cfg, workdir, **kw):
    runs.append(cfg.model.mixer)
    if cfg.model.mixer == "gla":
      raise RuntimeError("boom\nsecond line")
    return real(cfg, workdir, **kw)

  monkeypatch.setattr(trainer, "Trainer", fake)
  path, out = write_sweep(tmp_path, MIXERS), tmp_path / "out"
  assert sw.main([str(path), "--workdir", str(out)]) == 1  # not every point finished
  assert runs == ["softmax", "gla"]
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  columns = list(rows[0])
  assert columns[:3] == ["point", "model.mixer", "status"]
  for c in ("final_eval_accuracy", "best_eval_accuracy", "final_eval_loss", "params",
            "state_size", "wall_s", "error"):
    assert c in columns
  done, failed = rows
  assert (done["model.mixer"], done["status"], done["step"]) == ("softmax", "done", "3")
  assert int(done["params"]) > 0 and int(done["state_size"]) > 0
  assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom"
  assert (out / "acc.png").stat().st_size > 0
  assert (out / "results.md").read_text().count("\n") == 4  # header, rule, two rows

  monkeypatch.setattr(trainer, "Trainer", real)
  runs.clear()
  first = (out / done["point"] / "result.json").read_text()
  assert sw.main([str(path), "--workdir", str(out)]) == 0  # the failed point is retried
  assert (out / done["point"] / "result.json").read_text() == first  # the finished one is not
  assert not (out / failed["point"] / "failed.json").exists()


def test_interrupted_point_resumes(tmp_path):
  cfg = tiny()
  stopped = Point("p", ("model.mixer=softmax",), sw.override(cfg, ["train.stop_after=2"]))
  assert sw.run_point(tmp_path, stopped) == "stopped"
  assert sw.status(tmp_path, stopped) == "partial"
  assert sw.run_point(tmp_path, Point("p", stopped.overrides, cfg)) == "done"
  result = json.loads((tmp_path / "p" / "result.json").read_text())
  assert result["resumed_from"] == 2 and result["step"] == 3


def test_a_claimed_point_is_busy_for_others(tmp_path):
  p = Point("p", (), tiny())
  with sw.claim(tmp_path, p) as first, sw.claim(tmp_path, p) as second:
    assert first and not second
  with sw.claim(tmp_path, p) as again:
    assert again


@pytest.mark.long
def test_jobs_2_run_every_point_once(tmp_path):
  path = write_sweep(tmp_path, """
      def get_sweep():
        return Sweep(base=base(), grid={"model.mixer": ["softmax", "gla"], "optim.lr": [1e-3, 3e-3]})
      """)
  out = tmp_path / "out"
  assert sw.main([str(path), "--workdir", str(out), "--jobs", "2"]) == 0
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["status"] for r in rows] == ["done"] * 4
  for r in rows:
    steps = [json.loads(l)["step"] for l in (out / r["point"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one run wrote it, from step 0
    assert json.loads((out / r["point"] / "result.json").read_text())["resumed_from"] == 0
  assert (out / "best_eval_accuracy_vs_model.mixer.png").exists()  # the default plot


SHIPPED = pathlib.Path(__file__).resolve().parents[1] / "configs" / "sweeps"


@pytest.mark.parametrize("name, env, n", [
    ("mqar_state.py", {}, 24), ("mqar_state.py", {"MQAR_SWEEP": "smoke"}, 12),
    ("mqar_state.py", {"MQAR_SWEEP": "full"}, 144), ("sigmoid_bias.py", {}, 6),
    ("throughput.py", {}, 27), ("throughput.py", {"THROUGHPUT_SWEEP": "gpu"}, 45),
])
def test_shipped_sweeps_dry_run(tmp_path, capsys, monkeypatch, name, env, n):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert sw.main([str(SHIPPED / name), "--workdir", str(tmp_path / "out"), "--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == n and all(l.startswith("pending ") for l in lines)


def test_throughput_points_have_about_equal_params():
  from longax.models import count_params
  namespace = {}
  exec((SHIPPED / "throughput.py").read_text(), namespace)
  sweep = namespace["get_sweep"]()
  points = sw.build_points(sweep, [])
  counts = {p.cfg.model.mixer: count_params(p.cfg.model) for p in points}
  target = counts["softmax"]
  assert all(abs(c - target) / target < 0.05 for c in counts.values()), counts


def test_plot_filters_rows_and_joins_hue_columns(tmp_path):
  rows = [{"x": "1", "y": 0.5, "m": "mamba", "m.d_conv": "", "n": "4"},
          {"x": "2", "y": 0.7, "m": "mamba", "m.d_conv": "1", "n": "4"},
          {"x": "2", "y": 0.9, "m": "gla", "m.d_conv": "", "n": "8"}]
  assert sw._label(rows[1], ("m", "m.d_conv")) == "mamba d_conv=1"
  out = sw.plot(tmp_path, rows, Plot(x="x", y="y", hue=("m", "m.d_conv"), where={"n": 4}, logx=True))
  assert out.name == "y_vs_x.png" and out.stat().st_size > 0


@pytest.mark.parametrize("visible, jobs, want", [
    ("0,1,2,3", 2, ["0,2", "1,3"]), ("0,1", 2, ["0", "1"]), ("0", 2, [None, None]),
    (None, 3, [None, None, None]),
])
def test_jobs_split_the_visible_devices(monkeypatch, visible, jobs, want):
  if visible is None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  else:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  envs = [sw._job_env(i, jobs) for i in range(jobs)]
  assert [e.get("CUDA_VISIBLE_DEVICES") for e in envs] == want
  assert all(e["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for e in envs)


def test_plot_without_rows_writes_nothing(tmp_path):
  rows = [{"x": "1", "y": "", "status": "failed"}]
  assert sw.plot(tmp_path, rows, Plot(x="x", y="y")) is None
  assert list(tmp_path.iterdir()) == []
