"""Sweeps: many training runs from one base config, each point in its own folder.

    python -m longax.train.sweep SWEEP.py --workdir DIR [--dry-run] [--jobs N] [--set k=v ...]
    python -m longax.train.sweep --config configs/mqar.py --grid model.d_model=32,64 \\
        --grid optim.lr=1e-3,3e-3 --workdir DIR

A sweep file defines `get_sweep() -> Sweep` (or a dict of Sweep's fields): a base config (a
config file's path, relative to the sweep file or the current folder, or an
`ExperimentConfig`), a `grid` (key -> values; every combination), `points` (a list of
{key: value} overrides; with a grid, each point is crossed with it), `seeds` (each point
runs once per `train.seed`) and `plots`. Keys and values are those of `--set`; tuple values
(a `layer_pattern`) go in sweep files. `--set` applies to every point and may not name a
swept key. Command-line `--grid` values split on commas.

Every point's config is checked before any runs; a bad input is one line, `error: ...`, exit
2, nothing written. Each point trains with the normal Trainer in DIR/<point>/ (its config,
metrics.jsonl, checkpoints); DIR/<point>/result.json marks it finished (skipped on rerun), an
interrupted point resumes from its checkpoints, and a failed one writes DIR/<point>/failed.json
(retried on rerun) while the sweep goes on. `--jobs N` runs N processes that claim points
through a lock file per point (DIR/locks/<point>.lock, an flock released when its holder dies);
with CUDA_VISIBLE_DEVICES listing >= N devices each process gets its own share of them.
Out: DIR/results.csv and DIR/results.md (one row per point: the swept keys, status, final
and best eval metrics, params, state size, wall time, tokens/s, peak memory where the device
reports it) and one PNG per plot.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import re
import shlex
import sys
import time

from longax.train.config import (ConfigError, ExperimentConfig, call_file, load, override,
                                 validate)

BEST = {"accuracy": max, "loss": min, "bits_per_byte": min}  # eval_<name>: which end is best


@dataclasses.dataclass(frozen=True)
class Plot:
  """One PNG: `y` against `x` (results.csv columns), one line per value of `hue`; points
  that share (hue, x), e.g. seeds, are averaged."""
  x: str
  y: str
  hue: str | tuple[str, ...] | None = None  # a column, or columns (labels join the set ones)
  logx: bool = False
  logy: bool = False
  file: str | None = None  # default "<y>_vs_<x>.png"
  title: str | None = None
  where: dict | None = None  # only rows whose columns have these values, e.g. {"status": "done"}


@dataclasses.dataclass(frozen=True)
class Sweep:
  base: str | ExperimentConfig
  grid: dict = dataclasses.field(default_factory=dict)
  points: tuple = ()
  seeds: tuple[int, ...] | None = None
  plots: tuple[Plot, ...] = ()


@dataclasses.dataclass(frozen=True)
class Point:
  name: str  # its folder under the sweep's workdir
  overrides: tuple[str, ...]  # `key=value`, as --set takes them
  cfg: ExperimentConfig


# ---------------------------------------------------------------------------- the points


def as_set(value) -> str:
  """A Python value as `--set` parses it back: none, true, 3, 0.5, text, a,b (tuple)."""
  if value is None:
    return "none"
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (tuple, list)):
    return ",".join(map(str, value))
  return str(value)


def expand(sweep: Sweep) -> list[dict[str, str]]:
  """Every point's overrides {key: raw value}: points x grid x seeds, in that order."""
  keys = list(sweep.grid)
  combos = [dict(zip(keys, vs)) for vs in itertools.product(*(sweep.grid[k] for k in keys))]
  points = [dict(p) for p in sweep.points] or [{}]
  out = [p | c for p in points for c in combos]
  if sweep.seeds is not None:
    out = [p | {"train.seed": s} for p in out for s in sweep.seeds]
  return [{k: as_set(v) for k, v in p.items()} for p in out]


def point_name(overrides: dict[str, str]) -> str:
  """A readable folder name (last key parts and values) plus a hash of the full overrides,
  so the same point maps to the same folder on every run."""
  text = ",".join(f"{k}={v}" for k, v in overrides.items())
  short = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"
  short = re.sub(r"[^A-Za-z0-9._=,+-]", "_", short)[:80]
  return f"{short}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def build_points(sweep: Sweep, sets: list[str], n_devices: int | None = None,
                 here: pathlib.Path | None = None) -> list[Point]:
  """Every point's validated config; the first bad one raises ConfigError naming it."""
  base = sweep.base if isinstance(sweep.base, ExperimentConfig) else load(_find(sweep.base, here))
  base = override(base, sets)
  set_keys = {s.split("=", 1)[0].strip() for s in sets}
  points = []
  for overrides in expand(sweep):
    clash = set_keys & set(overrides)
    if clash:
      raise ConfigError(f"--set {sorted(clash)[0]}: that key is swept; drop it from --set "
                        "or from the sweep")
    items = tuple(f"{k}={v}" for k, v in overrides.items())
    try:
      cfg = validate(override(base, list(items)), n_devices)
    except ConfigError as e:
      raise ConfigError(f"point {' '.join(items) or '(base)'}: {e}") from None
    points.append(Point(point_name(overrides), items, cfg))
  names = [p.name for p in points]
  if len(set(names)) < len(names):
    dup = next(n for n in names if names.count(n) > 1)
    raise ConfigError(f"two points are the same ({dup}): a grid or points list repeats a value")
  return points


def _find(path: str, here: pathlib.Path | None) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_absolute() and not p.exists() and here is not None and (here / p).exists():
    return here / p
  return p


def load_sweep(path: str | pathlib.Path) -> Sweep:
  """Runs a sweep file's `get_sweep()`; any failure is one ConfigError line naming the file."""
  return as_sweep(call_file(path, "get_sweep", "sweep"), str(path))


def as_sweep(sweep, where: str) -> Sweep:
  """A Sweep from a Sweep or a dict of its fields; checks the field types."""
  if isinstance(sweep, dict):
    fields = {f.name for f in dataclasses.fields(Sweep)}
    if set(sweep) - fields:
      raise ConfigError(f"{where}: get_sweep() has unknown field {sorted(set(sweep) - fields)[0]!r}; "
                        f"valid: {', '.join(sorted(fields))}")
    plots = tuple(Plot(**p) if isinstance(p, dict) else p for p in sweep.get("plots", ()))
    sweep = Sweep(**(sweep | dict(plots=plots)))
  if not isinstance(sweep, Sweep):
    raise ConfigError(f"{where}: get_sweep() returned {type(sweep).__name__}, not Sweep or dict")
  if not isinstance(sweep.base, (str, pathlib.Path, ExperimentConfig)):
    raise ConfigError(f"{where}: base must be a config file path or an ExperimentConfig")
  bad = next((k for k, v in sweep.grid.items() if not isinstance(v, (list, tuple)) or not v), None)
  if bad is not None:
    raise ConfigError(f"{where}: grid[{bad!r}] must be a non-empty list of values")
  if any(not isinstance(p, dict) for p in sweep.points):
    raise ConfigError(f"{where}: points must be a list of {{key: value}} dicts")
  return sweep


def parse_grid(items: list[str]) -> dict[str, list[str]]:
  """`key=v1,v2` -> {key: [v1, v2]}."""
  grid = {}
  for item in items:
    key, sep, raw = item.partition("=")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not sep or not key.strip() or not values:
      raise ConfigError(f"--grid expects key=v1,v2,..., got {item!r}")
    grid[key.strip()] = values
  return grid


# ---------------------------------------------------------------------------- one point


def status(workdir: pathlib.Path, point: Point) -> str:
  d = workdir / point.name
  return "done" if (d / "result.json").exists() else "failed" if (d / "failed.json").exists() else (
      "partial" if (d / "metrics.jsonl").exists() else "pending")


@contextlib.contextmanager
def claim(workdir: pathlib.Path, point: Point):
  """Yields True if this process holds the point's lock (no other process is running it)."""
  (workdir / "locks").mkdir(parents=True, exist_ok=True)
  with open(workdir / "locks" / f"{point.name}.lock", "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_point(workdir: pathlib.Path, point: Point) -> str:
  """Trains one point unless finished or held by another process; returns its status after
  ('done', 'failed', 'stopped', 'busy', 'interrupted')."""
  with claim(workdir, point) as mine:
    if not mine:
      return "busy"
    if status(workdir, point) == "done":
      return "done"
    return _train(workdir / point.name, point)


def _train(d: pathlib.Path, point: Point) -> str:
  from longax.train.trainer import Trainer
  from longax.train.workdir import reason
  d.mkdir(parents=True, exist_ok=True)
  (d / "failed.json").unlink(missing_ok=True)
  (d / "point.json").write_text(json.dumps(dict(overrides=point.overrides), indent=1))
  t0 = time.perf_counter()
  try:
    summary = Trainer(point.cfg, d).run()
  except Exception as e:  # noqa: BLE001 - a failed point is recorded; the sweep goes on
    (d / "failed.json").write_text(json.dumps(dict(error=reason(e), wall_s=time.perf_counter() - t0)))
    return "failed"
  stopped = summary.get("stopped")
  if stopped:
    return "interrupted" if stopped.startswith(("SIGINT", "SIGTERM")) else "stopped"
  result = dict(summarize(d / "metrics.jsonl"), **measure(point.cfg),
                wall_s=round(time.perf_counter() - t0, 2), resumed_from=summary["start_step"])
  (d / "result.json").write_text(json.dumps(result, indent=1))
  return "done"


def summarize(metrics: pathlib.Path) -> dict:
  """Final and best of each eval metric, the last step and the mean logged tokens/s."""
  records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
  evals = [r for r in records if any(k.startswith("eval_") for k in r)]
  out = dict(step=records[-1]["step"] if records else 0)
  for key in sorted({k for r in evals for k in r if k.startswith("eval_")}):
    values = [r[key] for r in evals if key in r]
    out[f"final_{key}"] = values[-1]
    out[f"best_{key}"] = BEST.get(key.removeprefix("eval_"), min)(values)
  speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first compiles
  out["tokens_per_s"] = sum(speeds) / len(speeds) if speeds else None
  return out


def measure(cfg: ExperimentConfig) -> dict:
  """Parameters, decode-state bytes after seq_len tokens, peak device memory (None on CPU)."""
  import jax
  from longax.models import count_params, state_size
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
  return dict(params=count_params(cfg.model), state_size=state_size(cfg.model, cfg.data.seq_len),
              peak_memory_bytes=stats.get("peak_bytes_in_use"), device=jax.devices()[0].device_kind)


# ---------------------------------------------------------------------------- the sweep


def run_all(workdir: pathlib.Path, points: list[Point], jobs: int = 1) -> list[str]:
  """Runs the points (in this process, or `jobs` processes claiming them); a progress bar
  over points. Returns each point's status; stops early on SIGINT/SIGTERM."""
  from tqdm import tqdm
  with tqdm(total=len(points), desc="sweep", unit="point", position=0, dynamic_ncols=True) as bar:
    if jobs == 1:
      for p in points:
        if run_point(workdir, p) == "interrupted":
          break
        bar.update(1)
    else:
      ctx = multiprocessing.get_context("spawn")
      procs = [ctx.Process(target=_worker, args=(workdir, points, _job_env(i, jobs)))
               for i in range(jobs)]
      for proc in procs:
        proc.start()
      try:
        while any(proc.is_alive() for proc in procs):
          time.sleep(0.5)
          bar.update(sum(status(workdir, p) in ("done", "failed") for p in points) - bar.n)
      except KeyboardInterrupt:  # the jobs got the signal too: their trainers save and stop
        pass
      for proc in procs:
        proc.join()
      bar.update(sum(status(workdir, p) in ("done", "failed") for p in points) - bar.n)
  return [status(workdir, p) for p in points]


def _job_env(i: int, jobs: int) -> dict[str, str]:
  """Job i's share of CUDA_VISIBLE_DEVICES (when it lists >= jobs devices: every job its own),
  and no GPU memory preallocation, so jobs on one device do not starve each other."""
  env = {"XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
  visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if len(visible) >= jobs:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i::jobs])
  return env


def _worker(workdir: pathlib.Path, points: list[Point], env: dict[str, str]) -> None:
  os.environ.update(env)  # before this process's first JAX backend use
  for p in points:
    if run_point(workdir, p) == "interrupted":
      return


def collect(workdir: pathlib.Path, points: list[Point]) -> tuple[list[str], list[dict]]:
  """results.csv's columns and rows: the swept keys, then the measured columns."""
  swept = list(dict.fromkeys(o.split("=", 1)[0] for p in points for o in p.overrides))
  rows = []
  for p in points:
    row = dict(point=p.name, **dict(o.split("=", 1) for o in p.overrides), status=status(workdir, p))
    for name in ("result.json", "failed.json"):
      f = workdir / p.name / name
      if f.exists():
        row.update(json.loads(f.read_text()))
    rows.append(row)
  metrics = sorted({k for r in rows for k in r if k.startswith(("final_", "best_"))})
  tail = ["step", *metrics, "params", "state_size", "wall_s", "tokens_per_s",
          "peak_memory_bytes", "device", "error"]
  columns = ["point", *swept, "status", *[c for c in tail if any(c in r for r in rows)]]
  return columns, rows


def _cell(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def write_results(workdir: pathlib.Path, points: list[Point], plots=()) -> list[pathlib.Path]:
  columns, rows = collect(workdir, points)
  with open(workdir / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, columns, extrasaction="ignore")
    w.writeheader()
    w.writerows({c: r.get(c, "") for c in columns} for r in rows)
  md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  md += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
  (workdir / "results.md").write_text("\n".join(md) + "\n")
  return [f for f in (plot(workdir, rows, spec) for spec in plots) if f is not None]


def default_plots(points: list[Point]) -> tuple[Plot, ...]:
  """With no plots given: the first eval metric's best against the first swept key."""
  swept = list(dict.fromkeys(o.split("=", 1)[0] for p in points for o in p.overrides))
  swept = [k for k in swept if k != "train.seed"]
  if not swept:
    return ()
  y = ("best_eval_accuracy" if points[0].cfg.data.task not in ("text_bytes", "tokens")
       else "best_eval_loss")
  return (Plot(x=swept[0], y=y, hue=swept[1] if len(swept) > 1 else None),)


def _number(v):
  try:
    x = float(v)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def _label(row: dict, hue) -> str:
  if not hue or isinstance(hue, str):
    return str(row.get(hue, "")) if hue else ""
  return " ".join(f"{k.split('.')[-1]}={row[k]}" if i else str(row[k])
                  for i, k in enumerate(hue) if row.get(k) not in (None, ""))


def plot(workdir: pathlib.Path, rows: list[dict], spec: Plot) -> pathlib.Path | None:
  """One PNG; rows without a number for x or y (failed, pending) are left out; None (no
  file) when no row is left."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  numeric_x = all(_number(r.get(spec.x)) is not None for r in rows if r.get(spec.x) not in (None, ""))
  rows = [r for r in rows if all(str(r.get(k)) == as_set(v) for k, v in (spec.where or {}).items())]
  groups: dict = {}
  for r in rows:
    y = _number(r.get(spec.y))
    if y is None or r.get(spec.x) in (None, ""):
      continue
    x = _number(r[spec.x]) if numeric_x else str(r[spec.x])
    groups.setdefault(_label(r, spec.hue), {}).setdefault(x, []).append(y)
  if not groups:
    return None
  categories = sorted({x for g in groups.values() for x in g}, key=str) if not numeric_x else None
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  if len(groups) > 10:  # tab10 would repeat its colours
    ax.set_prop_cycle(color=plt.cm.tab20.colors[:len(groups)])
  for label, by_x in sorted(groups.items()):
    xs = sorted(by_x, key=lambda v: v if numeric_x else categories.index(v))
    pos = xs if numeric_x else [categories.index(x) for x in xs]
    ax.plot(pos, [sum(by_x[x]) / len(by_x[x]) for x in xs], "o-", label=label or None)
  ax.set_xscale("log" if spec.logx and numeric_x else "linear")  # (resets the ticks: first)
  ax.set_yscale("log" if spec.logy else "linear")
  if categories:
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
  ax.set(xlabel=spec.x, ylabel=spec.y)
  ax.set_title(spec.title or workdir.name, fontsize=9)
  if spec.hue and groups:
    ax.legend(title=spec.hue if isinstance(spec.hue, str) else spec.hue[0], fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out = workdir / (spec.file or f"{spec.y}_vs_{spec.x}.png".replace("/", "_"))
  fig.savefig(out)
  plt.close(fig)
  return out


# ---------------------------------------------------------------------------- the CLI


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m longax.train.sweep",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("sweep", nargs="?", help="a sweep file defining get_sweep()")
  p.add_argument("--config", help="base config file (instead of a sweep file)")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                 help="a swept key and its values, split on commas (repeatable; with --config)")
  p.add_argument("--seeds", default=None, metavar="S1,S2", help="train.seed values (with --config)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field in every point (repeatable)")
  p.add_argument("--workdir", required=True, help="the sweep folder; re-using one resumes it")
  p.add_argument("--dry-run", action="store_true", help="print one line per point and exit")
  p.add_argument("--jobs", type=int, default=1, help="processes that run points at once")
  return p.parse_args(argv)


def _device_count() -> int:
  import jax
  return jax.device_count()


def sweep_from_args(args) -> tuple[Sweep, pathlib.Path | None]:
  if bool(args.sweep) == bool(args.config):
    raise ConfigError("give a sweep file or --config (one of them)")
  if args.sweep:
    if args.grid or args.seeds:
      raise ConfigError("--grid and --seeds go with --config; a sweep file has its own")
    return load_sweep(args.sweep), pathlib.Path(args.sweep).parent
  seeds = None
  if args.seeds:
    try:
      seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
      raise ConfigError(f"--seeds expects ints split on commas, got {args.seeds!r}") from None
  return Sweep(base=args.config, grid=parse_grid(args.grid), seeds=seeds), None


def main(argv=None) -> int:
  args = parse_args(argv)
  from longax.train.workdir import check_workdir
  try:
    if args.jobs < 1:
      raise ConfigError(f"--jobs {args.jobs}: must be >= 1")
    sweep, here = sweep_from_args(args)
    # --jobs > 1: the parent starts no JAX backend (it would hold the GPUs); each point's
    # trainer checks the mesh against its own devices.
    points = build_points(sweep, args.overrides, _device_count() if args.jobs == 1 else None, here)
    workdir = pathlib.Path(args.workdir)
    check_workdir(workdir)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    for p in points:
      print(f"{status(workdir, p):<8}{' '.join(shlex.quote(o) for o in p.overrides)}")
    return 0
  statuses = run_all(workdir, points, args.jobs)
  files = write_results(workdir, points, sweep.plots or default_plots(points))
  counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
  print(json.dumps(dict(workdir=str(workdir), points=len(points), **counts,
                        results=str(workdir / "results.csv"), plots=[str(f) for f in files])))
  return 0 if statuses.count("done") == len(points) else 1


if __name__ == "__main__":  # sweep files import longax.train.sweep: run that module, not __main__
  from longax.train.sweep import main as _main
  sys.exit(_main())
