"""Figures for the README from results already on disk (nothing is re-measured).

    python -m longax.benchmarks.plots mqar RUN_DIR [RUN_DIR ...] --out mqar.png   # or metrics.jsonl files
    python -m longax.benchmarks.plots kernels RESULTS [RESULTS ...] --out kernels.png
    python -m longax.benchmarks.plots sp SP.json [SP.json ...] --out sp.png
    python -m longax.benchmarks.plots sparse RESULTS [RESULTS ...] --out sparse.png
    python -m longax.benchmarks.plots prefill ROWS.json [--prompts L=1024,depth=0.5] --out prefill.png

`mqar`: a training run's learning curve from RUN_DIR/metrics.jsonl: loss and answer
accuracy against step, train (every `log_every`) and eval (every `eval_every`); with several
runs, one eval line per run (labelled by its folder), for comparisons.
`kernels`: forward and forward+backward ms per op and implementation, log scale, from
`python -m longax.benchmarks.kernels` results: its `--json` files or the table it prints
(`--stream` lines included); rows of later files replace earlier ones with the same
(op, shape, impl).
`sparse`: the speedup of sparse attention over dense attention at the same shape against
the sequence length T, from `kernels --ops nsa,vertical_slash` results: one line per (op,
pass) (NSA forward, NSA forward+backward, vertical-slash forward), a dashed line at 1; from
`kernels --ops sparse_prefill --profile` results, the sparse prefill's device times (block
top-k, with the summary, vertical-slash; the dense rows of `prefill.topk` at the same shape).
The sparse row is `--impl` (default longax.auto, else longax.xla), the dense one `--dense`
(default: the case's fastest `dense.*` row); a case missing either (e.g. `oom`) is no point.
`prefill`: a sparse prefill's recall against the share of causal pairs it keeps, from
`python -m longax.benchmarks.sparse_prefill --out` files: accuracy and agreement with the
dense prefill's answers, one line per kind (the dense prefill a point at 1), for one group
of prompts (`--prompts`, default the first).
`sp`: sequence-parallel scaling from `python -m longax.benchmarks.sequence_parallel --out`
files: forward+backward efficiency and tokens/s per device against the device count P, one
line per (op, layout, implementation), strong and weak scaling side by side.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

PEERS = {"longax.xla": "longax.xla", "longax.auto": "longax.auto", "cudnn": "cuDNN",
         "tokamax": "tokamax", "jla": "jla", "fla": "fla"}
OPS = {"attention": "causal\nattention", "sigmoid_attention": "sigmoid\nattention",
       "linear_attention[none]": "linear attn\nno decay",
       "linear_attention[scalar]": "linear attn\nscalar decay",
       "linear_attention[vector]": "linear attn\nGLA decay",
       "ssd": "Mamba-2\nSSD", "selective_scan": "Mamba-1\nsel. scan"}


class PlotError(Exception):
  pass


def _figure():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  """A run's logged steps; `run_dir` is the run folder or a metrics.jsonl file itself."""
  path = run_dir if run_dir.is_file() else run_dir / "metrics.jsonl"
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
  rows = []
  for i, line in enumerate(lines, 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except ValueError:
        raise PlotError(f"{path}:{i}: not a JSON object") from None
  rows = [r for r in rows if isinstance(r, dict) and "step" in r]
  if not rows:
    raise PlotError(f"{path} holds no logged steps")
  return rows


def _run_title(run_dir: pathlib.Path) -> str:
  """`name: mixers, width, depth, batch` from the run's config.json where there is one."""
  folder = run_dir.parent if run_dir.is_file() else run_dir
  try:
    cfg = json.loads((folder / "config.json").read_text())
    m, d = cfg["model"], cfg["data"]
    mixers = ",".join(m.get("layer_pattern") or [m["mixer"]])
    return (f"{folder.name}: {d['task']}, {mixers}, d_model {m['d_model']}, {m['n_layers']} layers, "
            f"batch {d['batch_size']} x {d['seq_len']}")
  except (OSError, ValueError, KeyError, TypeError):
    return f"learning curve: {folder.name if run_dir.is_dir() else run_dir.name}"


def plot_mqar(run_dir, out: pathlib.Path, title: str | None = None) -> None:
  """run_dir: one run folder (train and eval curves) or a list of them (eval curves)."""
  runs = list(run_dir) if isinstance(run_dir, (list, tuple)) else [run_dir]
  many = len(runs) > 1
  rows_of = [read_metrics(r) for r in runs]
  plt = _figure()
  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
  for ax, key, label in ((a, "loss", "loss (answers only)"), (b, "accuracy", "answer accuracy")):
    for run, rows in zip(runs, rows_of):
      name = (run.parent if run.is_file() else run).name
      train = [(r["step"], r[key]) for r in rows if key in r]
      evals = [(r["step"], r[f"eval_{key}"]) for r in rows if f"eval_{key}" in r]
      if train and not many:
        ax.plot(*zip(*train), label="train batch", lw=1.2)
      if evals:
        ax.plot(*zip(*evals), "o-", label=f"{name} eval" if many else "eval", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  a.set_yscale("log")
  b.set_ylim(0, 1.02)
  b.axhline(0.9, color="gray", ls=":", lw=1)
  b.legend(fontsize=8, loc="lower right")
  fig.suptitle(title or _run_title(runs[0]), fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def _text_rows(text: str) -> list[dict]:
  """Rows of the table `longax.benchmarks.kernels` prints (fixed-width columns)."""
  from longax.benchmarks.kernels import COLUMNS
  rows = []
  for line in text.splitlines():
    if not line.strip() or line.startswith("#") or line.split()[0] == "op":
      continue
    rec, at = {}, 0
    for name, width in COLUMNS:
      cell = line[at:at + width].strip()
      at += width + 1
      if not cell:
        continue
      if name == "shape":
        rec[name] = {k: int(v) if v.isdigit() else v  # a cut-off last piece is left out
                     for k, v in (kv.split("=", 1) for kv in cell.split(",") if "=" in kv)}
      elif name in ("op", "impl"):
        rec[name] = cell
      else:
        try:
          rec[name] = float(cell)
        except ValueError:
          pass
    if "op" in rec and "impl" in rec:
      rows.append(rec)
  return rows


def read_meta(paths: list[pathlib.Path]) -> dict:
  """The runs' settings: a --json file's `meta`, or a printed table's `# key=value, ...` line."""
  meta = {}
  for path in paths:
    try:
      text = path.read_text()
    except OSError:
      continue
    if path.suffix == ".json":
      try:
        meta.update(json.loads(text).get("meta", {}))
      except (ValueError, AttributeError):
        pass
      continue
    for line in text.splitlines():
      if line.startswith("#") and "=" in line:
        for part in line[1:].split(","):
          k, eq, v = part.strip().partition("=")
          if eq and " " not in k:
            meta.setdefault(k, v.split(" (")[0].strip())
  return meta


def read_results(paths: list[pathlib.Path]) -> list[dict]:
  rows: dict[tuple, dict] = {}
  for path in paths:
    try:
      text = path.read_text()
    except OSError as e:
      raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
    if path.suffix == ".json":
      try:
        got = json.loads(text)["results"]
      except (ValueError, KeyError, TypeError):
        raise PlotError(f"{path}: not a `kernels --json` file (no 'results' list)") from None
    else:
      got = _text_rows(text)
    for r in got:
      shape = ",".join(f"{k}={v}" for k, v in sorted(r.get("shape", {}).items()))
      rows[(r["op"], shape, r["impl"])] = r
  if not rows:
    raise PlotError(f"no result rows in {', '.join(map(str, paths))}")
  return list(rows.values())


def _peer(impl: str) -> str:
  return PEERS.get(impl, PEERS.get(impl.split(".")[0], impl))


def plot_kernels(paths: list[pathlib.Path], out: pathlib.Path, title: str | None = None) -> None:
  rows = [r for r in read_results(paths) if "fwd_ms" in r]
  if not rows:
    raise PlotError("no row has a time (fwd_ms)")
  seen = list(dict.fromkeys(r["op"] for r in rows))
  ops = [op for op in OPS if op in seen] + [op for op in seen if op not in OPS]
  present = list(dict.fromkeys(_peer(r["impl"]) for r in rows))
  impls = [i for i in PEERS.values() if i in present] + [i for i in present if i not in PEERS.values()]
  times = {(r["op"], _peer(r["impl"])): r for r in rows}
  plt = _figure()
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
  width = 0.8 / len(impls)
  for ax, key, label in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwd_bwd_ms", "forward + backward")):
    for j, impl in enumerate(impls):
      xs, ys = [], []
      for i, op in enumerate(ops):
        r = times.get((op, impl))
        if r is not None and key in r:
          xs.append(i + (j - (len(impls) - 1) / 2) * width)
          ys.append(r[key])
      ax.bar(xs, ys, width, label=impl, color="black" if impl == "longax.xla" else None)
    ax.set_yscale("log")
    ax.set_title(label, fontsize=9)
    ax.set_xticks(range(len(ops)), [OPS.get(op, op) for op in ops], fontsize=7)
    ax.grid(axis="y", alpha=0.3, which="both")
  axes[0].set_ylabel("ms (log scale)")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=8, ncol=len(impls), loc="lower center", frameon=False)
  if title is None:
    meta = read_meta(paths)
    where = ", ".join(str(meta[k]) for k in ("device", "dtype", "date") if k in meta)
    title = f"kernel times{': ' + where if where else ''} (no bar: no such op, or it did not run)"
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(out, dpi=100)
  plt.close(fig)


SPARSE = (("nsa", "fwd_ms", "NSA forward"), ("nsa", "fwd_bwd_ms", "NSA forward+backward"),
          ("vertical_slash", "fwd_ms", "vertical-slash forward"),
          ("vertical_slash[band]", "fwd_ms", "vertical-slash forward, band pattern"),
          ("prefill.topk", "fwd_dev_ms", "prefill: block top-k"),
          ("prefill.topk+summary", "fwd_dev_ms", "prefill: block top-k + summary"),
          ("prefill.vertical_slash", "fwd_dev_ms", "prefill: vertical-slash"))
# ops whose dense rows sit in another op's case of the same shape (`kernels --ops sparse_prefill`)
DENSE_FROM = {"prefill.topk+summary": "prefill.topk", "prefill.vertical_slash": "prefill.topk"}


def sparse_speedups(rows: list[dict], impl: str | None = None, dense: str | None = None
                    ) -> dict[str, list[tuple[int, float, str, str]]]:
  """{line label: [(T, dense ms / sparse ms, sparse impl, dense impl)] ascending in T} for
  SPARSE's (op, time); see the module docstring for which rows."""
  cases: dict[tuple, dict[str, dict]] = {}
  for r in rows:
    shape = r.get("shape", {})
    key = (r["op"], ",".join(f"{k}={v}" for k, v in sorted(shape.items())))
    cases.setdefault(key, {})[r["impl"]] = r
  lines: dict[str, list] = {}
  for op, col, label in SPARSE:
    for (case_op, shape_key), by_impl in cases.items():
      if case_op != op:
        continue
      if op in DENSE_FROM:
        by_impl = {**{n: r for n, r in cases.get((DENSE_FROM[op], shape_key), {}).items()
                      if n.startswith("dense.")}, **by_impl}
      timed = {name: r[col] for name, r in by_impl.items() if isinstance(r.get(col), (int, float))}
      sparse = impl or next((i for i in ("longax.auto", "longax.xla") if i in timed), None)
      dense_ms = {n: ms for n, ms in timed.items() if n.startswith("dense.")}
      base = dense or (min(dense_ms, key=dense_ms.get) if dense_ms else None)
      if sparse in timed and base in timed:
        t = int(next(iter(by_impl.values()))["shape"]["T"])
        lines.setdefault(label, []).append((t, timed[base] / timed[sparse], sparse, base))
  return {label: sorted(pts) for label, pts in lines.items()}


def plot_sparse(paths: list[pathlib.Path], out: pathlib.Path, title: str | None = None,
                impl: str | None = None, dense: str | None = None) -> None:
  lines = sparse_speedups(read_results(paths), impl, dense)
  if not lines:
    raise PlotError("no nsa / vertical_slash / prefill case has both a sparse and a dense time "
                    f"(sparse: {impl or 'longax.auto or longax.xla'}, dense: {dense or 'dense.*'})")
  plt = _figure()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for label, pts in lines.items():
    ts = [p[0] for p in pts]
    pairs = sorted({f"{p[2]} vs {p[3]}" for p in pts})
    ax.plot(ts, [p[1] for p in pts], "o-", label=f"{label} ({'; '.join(pairs)})")
  ax.axhline(1.0, color="gray", ls="--", lw=1)
  ts = sorted({p[0] for pts in lines.values() for p in pts})
  ax.set_xscale("log", base=2)
  ax.set_xticks(ts, [f"{t // 1024}k" if t >= 1024 else str(t) for t in ts])
  ax.set_yscale("log")
  from matplotlib.ticker import FuncFormatter
  for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
    axis(FuncFormatter(lambda y, _: f"{y:g}"))
  ax.set_xlabel("sequence length T")
  ax.set_ylabel("speedup over dense (x, log scale)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  if title is None:
    meta = read_meta(paths)
    where = ", ".join(str(meta[k]) for k in ("device", "dtype", "date") if k in meta)
    title = f"sparse attention vs dense{': ' + where if where else ''}"
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def plot_prefill(path: pathlib.Path, out: pathlib.Path, title: str | None = None,
                 prompts: str | None = None) -> None:
  try:
    run = json.loads(path.read_text())
    rows = run["rows"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise PlotError(f"{path}: not a `benchmarks.sparse_prefill --out` file ({type(e).__name__})") from None
  groups = list(dict.fromkeys(r["prompts"] for r in rows))
  prompts = prompts or groups[0]
  rows = [r for r in rows if r["prompts"] == prompts]
  if not rows:
    raise PlotError(f"--prompts {prompts}: not in {path} (it has {', '.join(groups)})")
  plt = _figure()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
  kinds = list(dict.fromkeys(r["prefill"] for r in rows))
  for ax, key, label in zip(axes, ("accuracy", "agrees"), ("accuracy", "answers = dense")):
    for kind in kinds:
      pts = sorted((r["pairs_kept"], r[key]) for r in rows if r["prefill"] == kind)
      style = "s" if kind == "dense" else "o-"
      ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=kind)
      if kind != "dense":
        for r in rows:
          if r["prefill"] == kind:
            ax.annotate(str(r["budget"]), (r["pairs_kept"], r[key]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("causal (query, key) pairs kept")
    ax.set_ylabel(label)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title or f"sparse prefill: {run.get('task', '?')}, {prompts} "
               f"(labels: keys per query)", fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def read_sp(paths: list[pathlib.Path]) -> list[dict]:
  """The timed rows of `sequence_parallel --out` files."""
  rows = []
  for path in paths:
    try:
      got = json.loads(path.read_text())
    except OSError as e:
      raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:
      raise PlotError(f"{path}: not a `sequence_parallel --out` file (not JSON)") from None
    if not isinstance(got, list) or not all(isinstance(r, dict) for r in got):
      raise PlotError(f"{path}: not a `sequence_parallel --out` file (no list of rows)")
    rows += [r for r in got if "ms_fwd_bwd" in r]
  if not rows:
    raise PlotError(f"no row has a time (ms_fwd_bwd) in {', '.join(map(str, paths))}")
  return rows


def plot_sp(paths: list[pathlib.Path], out: pathlib.Path, title: str | None = None) -> None:
  rows = read_sp(paths)
  scalings = list(dict.fromkeys(r["scaling"] for r in rows))
  plt = _figure()
  fig, axes = plt.subplots(2, len(scalings), figsize=(5.5 * len(scalings), 6.5), squeeze=False)
  for col, scaling in enumerate(scalings):
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
      if r["scaling"] == scaling:
        lines.setdefault((r["op"], r["layout"], r["impl"], r["T"] // r["P"] if scaling == "weak"
                          else r["T"]), []).append(r)
    for (op, layout, impl, t), rs in lines.items():
      rs = sorted(rs, key=lambda r: r["P"])
      n = f"{t // 1024}k" if t >= 1024 else str(t)
      label = f"{impl} {op}{' ' + layout if op != 'ulysses' else ''}, T{'/P' if scaling == 'weak' else ''}={n}"
      style = dict(ls="--" if impl != "longax" else "-", marker="o", label=label)
      effs = [(r["P"], r.get("efficiency_fwd_bwd", 1.0)) for r in rs
              if r["P"] == 1 or "efficiency_fwd_bwd" in r]  # none without its 1-device row
      if effs:
        axes[0][col].plot(*zip(*effs), **style)
      axes[1][col].plot([r["P"] for r in rs], [r["tokens_per_s_per_device"] / 1e3 for r in rs],
                        **style)
    ps = sorted({r["P"] for r in rows})
    axes[0][col].axhline(1.0, color="gray", lw=0.8)
    axes[0][col].set_title(f"{scaling} scaling", fontsize=10)
    axes[0][col].set_ylabel("efficiency (fwd+bwd)")
    axes[1][col].set_ylabel("k tokens/s per device (fwd+bwd)")
    axes[1][col].set_yscale("log")
    for ax in (axes[0][col], axes[1][col]):
      ax.set_xscale("log", base=2)
      ax.set_xticks(ps, [str(p) for p in ps])
      ax.set_xlabel("devices P")
      ax.grid(alpha=0.3)
    axes[0][col].legend(fontsize=6)
  if title is None:
    r0 = rows[0]
    title = f"sequence parallelism: {r0.get('device', '')}, bf16"
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m longax.benchmarks.plots",
                              description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="what", required=True)
  m = sub.add_parser("mqar", help="learning curve of a training run (RUN_DIR/metrics.jsonl)")
  m.add_argument("run_dir", type=pathlib.Path, nargs="+")
  k = sub.add_parser("kernels", help="kernel timings from `longax.benchmarks.kernels` results")
  k.add_argument("results", type=pathlib.Path, nargs="+", help="--json files or printed tables")
  sp = sub.add_parser("sp", help="sequence-parallel scaling from `benchmarks.sequence_parallel`")
  sp.add_argument("results", type=pathlib.Path, nargs="+", help="its --out JSON files")
  sa = sub.add_parser("sparse", help="sparse-over-dense speedup against T from "
                                     "`longax.benchmarks.kernels --ops nsa,vertical_slash`")
  sa.add_argument("results", type=pathlib.Path, nargs="+", help="--json files or printed tables")
  sa.add_argument("--impl", default=None,
                  help="the sparse row (default longax.auto, else longax.xla)")
  sa.add_argument("--dense", default=None, help="the dense row (default: the fastest dense.*)")
  pf = sub.add_parser("prefill", help="sparse prefill recall from `benchmarks.sparse_prefill --out`")
  pf.add_argument("results", type=pathlib.Path, help="its --out JSON file")
  pf.add_argument("--prompts", default=None, help="the group of prompts (default the first)")
  for q in (m, k, sp, sa, pf):
    q.add_argument("--out", type=pathlib.Path, required=True, help="the PNG to write")
    q.add_argument("--title", default=None)
  a = p.parse_args(argv)
  try:
    if a.what == "mqar":
      plot_mqar(a.run_dir if len(a.run_dir) > 1 else a.run_dir[0], a.out, a.title)
    elif a.what == "sp":
      plot_sp(a.results, a.out, a.title)
    elif a.what == "prefill":
      plot_prefill(a.results, a.out, a.title, a.prompts)
    elif a.what == "sparse":
      plot_sparse(a.results, a.out, a.title, a.impl, a.dense)
    else:
      plot_kernels(a.results, a.out, a.title)
  except PlotError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
