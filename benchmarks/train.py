"""Training throughput: runs a config for a few hundred steps, reports tokens/s and MFU.

    python -m longax.benchmarks.train --config configs/hybrid_350m.py --steps 200 [--set k=v]

The first logged interval (compilation) is dropped; the rest give median tokens/s and MFU
(MFU where the device's peak is known: `longax.train.trainer.PEAK_FLOPS`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile

import jax

from longax.models import count_params, flops_per_token
from longax.train.config import load, override
from longax.train.trainer import Trainer


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--set", dest="overrides", action="append", default=[])
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  cfg = override(load(a.config), [f"train.steps={a.steps}", "train.log_every=10",
                                  f"train.eval_every={a.steps}", "train.eval_batches=1",
                                  f"train.checkpoint_every={a.steps}", *a.overrides])
  with tempfile.TemporaryDirectory() as workdir:
    Trainer(cfg, f"{workdir}/run").run()
    rows = [json.loads(l) for l in open(f"{workdir}/run/metrics.jsonl")][1:]
  out = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
             n_devices=jax.device_count(), config=a.config, overrides=a.overrides,
             params=count_params(cfg.model), seq_len=cfg.data.seq_len,
             batch=cfg.data.batch_size, flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
             tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows),
             mfu=statistics.median(r["mfu"] for r in rows) if rows and "mfu" in rows[0] else None,
             final_loss=rows[-1]["loss"] if rows else None)
  print(json.dumps(out, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
