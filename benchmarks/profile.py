"""Where a traced run spends its accelerator time: kernels summed from a `jax.profiler` trace.

    python -m longax.benchmarks.train --config configs/hybrid_350m.py --steps 20 --profile DIR
    python -m longax.benchmarks.profile DIR [--steps 20] [--top 25]

Reads the newest `*.xplane.pb` under DIR (`jax.profiler.ProfileData`), keeps the kernels of the
device planes' streams (`/device:GPU:*`; on CPU the XLA ops of the host threads), drops what ran while compiling
(autotuning), and sums event durations two ways: by kernel name and by compiled program,
largest first, as ms per step and share of the total.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
import warnings


def _trace_file(trace_dir) -> pathlib.Path:
  files = sorted(pathlib.Path(trace_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise SystemExit(f"error: no *.xplane.pb under {trace_dir} (was the run traced?)")
  return files[-1]


def _module(stats: dict) -> str:
  """The compiled program an event belongs to (`jit_train_step`, ...)."""
  return re.sub(r"\(\d+\)$", "", str(stats.get("module") or stats.get("hlo_module") or "?"))


def options():
  """Trace options for a kernel summary: no Python tracer, minimal host events."""
  import jax
  opts = jax.profiler.ProfileOptions()
  opts.python_tracer_level = 0
  opts.host_tracer_level = 1
  return opts


def device_events(trace_dir, device: str = "/device:"):
  """(kernel name, program, duration ms) of every device event in the newest trace, on the
  planes whose name starts with `device` (e.g. "/device:GPU:0" for one GPU of several)."""
  from jax.profiler import ProfileData
  data = ProfileData.from_file(str(_trace_file(trace_dir)))
  planes = [p for p in data.planes if p.name.startswith(device)]
  host = not planes
  for plane in planes or [p for p in data.planes if p.name == "/host:CPU"]:
    for line in plane.lines:
      if not host and not line.name.startswith("Stream"):  # kernels only (not derived lines)
        continue
      for ev in line.events:
        with warnings.catch_warnings():  # jaxlib's stats type warns on iteration
          warnings.simplefilter("ignore", DeprecationWarning)
          stats = dict(ev.stats)
        if host and "hlo_op" not in stats:  # host threads: only XLA ops count
          continue
        if str(stats.get("tf_op", "")).startswith("XlaCompile"):  # autotuning while compiling
          continue
        yield ev.name, _module(stats), ev.duration_ns / 1e6


def summarize(trace_dir, steps: int = 1, top: int = 25, device: str = "/device:") -> dict:
  """{"total_ms_per_step", "by_kernel": [(name, ms/step, share)], "by_module": [...]}:
  kernel time summed over the planes `device` selects (all devices by default)."""
  by_kernel, by_module = collections.Counter(), collections.Counter()
  for name, path, ms in device_events(trace_dir, device):
    by_kernel[name] += ms
    by_module[path] += ms
  total = sum(by_kernel.values())
  rows = lambda c: [(k, v / steps, v / total if total else 0.0) for k, v in c.most_common(top)]
  return dict(total_ms_per_step=total / steps, by_kernel=rows(by_kernel), by_module=rows(by_module))


def device_time(run, reps: int, trace_dir=None, device: str | None = None) -> dict:
  """`summarize` of `reps` calls of run() (a zero-argument callable; one untimed call first),
  traced into trace_dir (a temporary folder if None). device: the first device's planes by
  default (on the CPU: the host's XLA ops)."""
  import tempfile

  import jax
  if device is None:
    device = ("/device:" if jax.default_backend() == "cpu"
              else f"/device:{jax.devices()[0].platform.upper()}:0")
  jax.block_until_ready(run())
  with tempfile.TemporaryDirectory() as tmp:
    trace_dir = trace_dir or tmp
    with jax.profiler.trace(trace_dir, profiler_options=options()):
      for _ in range(reps):
        out = run()
      jax.block_until_ready(out)
    return summarize(trace_dir, steps=reps, top=10**6, device=device)


def report(summary: dict) -> str:
  out = [f"device time per step: {summary['total_ms_per_step']:.2f} ms"]
  for title, key in (("by kernel", "by_kernel"), ("by program", "by_module")):
    out.append(f"-- {title}: ms/step  share")
    out += [f"{ms:9.3f}  {share:6.1%}  {name}" for name, ms, share in summary[key]]
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("trace_dir")
  p.add_argument("--steps", type=int, default=1, help="steps in the trace (for ms per step)")
  p.add_argument("--top", type=int, default=25)
  a = p.parse_args(argv)
  print(report(summarize(a.trace_dir, a.steps, a.top)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
