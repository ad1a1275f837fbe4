"""Smoke tests for the README figures' script (fake results in tmp_path, no JAX work)."""

import json

import pytest

from longax.benchmarks import plots


def _png(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_mqar_curve(tmp_path):
  run = tmp_path / "mqar-run"
  run.mkdir()
  lines = [dict(step=s, loss=4.0 / s, accuracy=min(1.0, s / 100), lr=1e-3) for s in (25, 50, 75, 100)]
  lines[1].update(eval_loss=0.1, eval_accuracy=0.5)
  lines[3].update(eval_loss=0.01, eval_accuracy=0.99)
  (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
  out = tmp_path / "mqar.png"
  assert plots.main(["mqar", str(run), "--out", str(out)]) == 0
  _png(out)


def test_mqar_missing_metrics_is_one_line(tmp_path, capsys):
  assert plots.main(["mqar", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: cannot read") and err.count("\n") == 1


def test_kernels_json_and_printed_table(tmp_path):
  from longax.benchmarks.kernels import table
  shape = dict(B=2, T=64, H=2, D=16)
  rows = [dict(op="attention", shape=shape, impl="longax.xla", fwd_ms=5.0, fwd_bwd_ms=20.0),
          dict(op="attention", shape=shape, impl="cudnn", fwd_ms=0.6, fwd_bwd_ms=1.6)]
  js = tmp_path / "k.json"
  js.write_text(json.dumps(dict(meta={}, results=rows)))
  txt = tmp_path / "k.txt"  # what the benchmark prints; fla's row has no backward time
  txt.write_text("# date=...\n" + table(
      [dict(op="linear_attention[none]", shape=shape, impl="longax.xla", fwd_ms=2.0, fwd_bwd_ms=3.0),
       dict(op="linear_attention[none]", shape=shape, impl="fla.chunk", fwd_ms=0.4,
            fwd_vs_xla=5.0)]))
  got = plots.read_results([js, txt])
  fla = [r for r in got if r["impl"] == "fla.chunk"][0]
  assert fla["fwd_ms"] == pytest.approx(0.4) and "fwd_bwd_ms" not in fla
  assert fla["shape"] == shape
  out = tmp_path / "kernels.png"
  assert plots.main(["kernels", str(js), str(txt), "--out", str(out)]) == 0
  _png(out)


def test_kernels_benchmark_rows_and_no_check(tmp_path):
  """--rows keeps the named rows only; --no-check leaves out the reference's err."""
  from longax.benchmarks import kernels
  out = tmp_path / "k.json"
  assert kernels.main(["--quick", "--ops", "ssd", "--rows", "longax.xla", "--no-check",
                       "--reps", "1", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert [r["impl"] for r in rows] == ["longax.xla"] and "err" not in rows[0]


def test_kernels_benchmark_block_sparse_beside_dense(tmp_path):
  """Block-sparse rows are checked against their reference; the dense baseline is not."""
  from longax.benchmarks import kernels
  out = tmp_path / "k.json"
  assert kernels.main(["--quick", "--ops", "block_sparse_attention", "--reps", "1",
                       "--rows", "longax.xla,dense", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert {r["op"] for r in rows} == {"block_sparse[10%]", "block_sparse[25%]", "block_sparse[50%]"}
  assert all(r["err"] < 1e-5 for r in rows if r["impl"] == "longax.xla")
  assert all("err" not in r for r in rows if r["impl"].startswith("dense."))


def _sp_row(op, scaling, p, t, ms, **kw):
  return dict(op=op, layout="zigzag", scaling=scaling, P=p, T=t, impl="longax", ms_fwd=ms / 4,
              ms_fwd_bwd=ms, tokens_per_s_per_device=t / p / ms * 1e3, device="cpu", **kw)


def test_sp_figure(tmp_path):
  rows = [_sp_row("ring", "strong", 1, 4096, 8.0), _sp_row("ring", "strong", 2, 4096, 5.0,
                                                          efficiency_fwd_bwd=0.8),
          _sp_row("lasp2", "weak", 1, 1024, 1.0), _sp_row("lasp2", "weak", 2, 2048, 1.2,
                                                         efficiency_fwd_bwd=0.83),
          dict(op="ulysses", P=2, error="ValueError: ...")]  # a failed row is left out
  js = tmp_path / "sp.json"
  js.write_text(json.dumps(rows))
  out = tmp_path / "sp.png"
  assert plots.main(["sp", str(js), "--out", str(out)]) == 0
  _png(out)


@pytest.mark.parametrize("content,msg", [
    (None, "error: cannot read"),
    ("{not json", "not a `sequence_parallel --out` file (not JSON)"),
    ('{"results": []}', "no list of rows"),
    ('[{"op": "ring", "error": "x"}]', "no row has a time (ms_fwd_bwd)"),
])
def test_sp_bad_input_is_one_line(tmp_path, capsys, content, msg):
  js = tmp_path / "sp.json"
  if content is not None:
    js.write_text(content)
  assert plots.main(["sp", str(js), "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err
  assert msg in err and err.count("\n") == 1
