"""benchmarks/profile.py: device time summed from a jax.profiler trace."""

import jax
import jax.numpy as jnp
import pytest

from longax.benchmarks import profile


def test_summarize_a_traced_program(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), profiler_options=profile.options()):
    for _ in range(3):
      f(x).block_until_ready()
  s = profile.summarize(tmp_path, steps=3)
  assert s["total_ms_per_step"] > 0
  assert s["by_kernel"] and s["by_module"]
  assert abs(sum(share for _, _, share in s["by_module"]) - 1.0) < 1e-6
  assert "device time per step" in profile.report(s)


def test_no_trace_is_one_line(tmp_path):
  with pytest.raises(SystemExit, match="no \\*.xplane.pb under"):
    profile.summarize(tmp_path)


def test_train_benchmark_says_why_no_rate(monkeypatch, capsys):
  """No timed interval (a run stopped early, or too few steps): a warning, rate null."""
  from longax.benchmarks import train as bench
  monkeypatch.setattr(bench, "run_longax", lambda cfg, workdir: [])
  bench.main(["--config", "tests/tiny_train_config.py", "--steps", "4"])
  out = capsys.readouterr()
  assert "warning: no timed interval" in out.err
  assert '"tokens_per_s": null' in out.out


@pytest.mark.parametrize("module,args,msg", [
    ("dkv_splits", ["--shapes", "1x"], "--shapes 1x: comma-separated BxT"),
    ("dkv_splits", ["--shapes", "1x1024"], "needs a Hopper GPU"),
    ("nsa_branches", ["--sections", "parts,nope"], "'nope' is not one of parts, splits, variants, groups, xla"),
    ("nsa_branches", ["--length", "1000"], "--length 1000: a multiple of 64, >= 1024"),
    ("nsa_branches", ["--sections", "splits"], "need a Hopper GPU"),
    ("nsa_branches", ["--sections", "parts,groups"], "splits / variants / groups need a Hopper GPU"),
    ("nsa_branches", ["--sections", "xla,nope"], "'nope' is not one of parts, splits, variants, groups, xla"),
    ("nsa_branches", ["--groups", "1,3"], "--groups 1,3: a comma list of 1, 2, 4, 8, 16"),
    ("nsa_branches", ["--forms", "tiles,nope"], "--forms tiles,nope: a comma list of tiles, gathered, lists"),
    ("topk", ["--shapes", "64x"], "--shapes '64x': comma-separated ROWSxN"),
    ("topk", ["--chunks", "100"], "--chunks 100: multiples of 64"),
    ("topk", ["--k", "17"], "the top-k kernel does not run here"),
])
def test_gpu_timing_scripts_bad_flags_are_one_line(module, args, msg, capsys):
  """The device-only timing scripts refuse bad flags (and the CPU) in one line, exit 2."""
  import importlib
  assert importlib.import_module(f"longax.benchmarks.{module}").main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and msg in err[0], err
