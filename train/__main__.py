"""python -m longax.train --config configs/mqar.py [--workdir DIR] [--set key=value ...]

Multi-host: give --coordinator/--num-processes/--process-id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and every process runs the same command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m longax.train", description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
  p.add_argument("--workdir", default=None,
                 help="run folder (default: a new one under runs/ named after the config); "
                      "re-using one resumes from its last checkpoint")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set train.steps=100 (repeatable)")
  p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
  p.add_argument("--num-processes", type=int,
                 default=int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None)
  p.add_argument("--process-id", type=int,
                 default=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from longax.train.config import ConfigError, load, override
  try:
    cfg = override(load(args.config), args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import jax
  if args.coordinator:
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from longax.train.trainer import NonFiniteLoss, Trainer
  workdir = pathlib.Path(args.workdir or
                         f"runs/{cfg.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  try:
    summary = Trainer(cfg, workdir).run()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(json.dumps(dict(workdir=str(workdir), **summary)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
