"""Where a traced run spends its accelerator time: kernels summed from a `jax.profiler` trace.

    python -m longax.benchmarks.train --config configs/hybrid_350m.py --steps 20 --profile DIR
    python -m longax.benchmarks.profile DIR [--steps 20] [--top 25]

Reads the newest `*.xplane.pb` under DIR (`jax.profiler.ProfileData`), keeps the kernels of the
device planes' streams (`/device:GPU:*`; on CPU the XLA ops of the host threads), and sums event
durations two ways: by kernel name and by the JAX op path (`tf_op`/`hlo_op` stat, the name
stack with its numbers stripped), largest first, as ms per step and share of the total.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys


def _trace_file(trace_dir) -> pathlib.Path:
  files = sorted(pathlib.Path(trace_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise SystemExit(f"error: no *.xplane.pb under {trace_dir} (was the run traced?)")
  return files[-1]


def _op_path(stats: dict, name: str) -> str:
  """A readable category: the JAX name stack without numbers and jit wrappers."""
  path = str(stats.get("tf_op") or stats.get("long_name") or stats.get("hlo_op") or name)
  path = re.sub(r"\d+", "", path.split(":")[0])
  return re.sub(r"(jit\([^)]*\)/)+", "", path)[:120]


def options():
  """Trace options for a kernel summary: no Python tracer, minimal host events."""
  import jax
  opts = jax.profiler.ProfileOptions()
  opts.python_tracer_level = 0
  opts.host_tracer_level = 1
  return opts


def device_events(trace_dir):
  """(kernel name, op path, duration ms) of every device event in the newest trace."""
  from jax.profiler import ProfileData
  data = ProfileData.from_file(str(_trace_file(trace_dir)))
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  host = not planes
  for plane in planes or [p for p in data.planes if p.name == "/host:CPU"]:
    for line in plane.lines:
      if not host and not line.name.startswith("Stream"):  # kernels only (not derived lines)
        continue
      for ev in line.events:
        stats = dict(ev.stats)
        if host and "hlo_op" not in stats:  # host threads: only XLA ops count
          continue
        yield ev.name, _op_path(stats, ev.name), ev.duration_ns / 1e6


def summarize(trace_dir, steps: int = 1, top: int = 25) -> dict:
  """{"total_ms_per_step", "by_kernel": [(name, ms/step, share)], "by_op": [...]}."""
  by_kernel, by_op = collections.Counter(), collections.Counter()
  for name, path, ms in device_events(trace_dir):
    by_kernel[name] += ms
    by_op[path] += ms
  total = sum(by_kernel.values())
  rows = lambda c: [(k, v / steps, v / total if total else 0.0) for k, v in c.most_common(top)]
  return dict(total_ms_per_step=total / steps, by_kernel=rows(by_kernel), by_op=rows(by_op))


def report(summary: dict) -> str:
  out = [f"device time per step: {summary['total_ms_per_step']:.2f} ms"]
  for title, key in (("by kernel", "by_kernel"), ("by op path", "by_op")):
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
