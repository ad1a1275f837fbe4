"""python -m longax.train --config configs/mqar.py [--workdir DIR] [--set key=value ...]

Multi-host: give --coordinator/--num-processes/--process-id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and every process runs the same command.

A bad config value, workdir or checkpoint folder exits 2 with one line on stderr,
before anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys


def _env_int(name: str):
  return int(os.environ[name]) if os.environ.get(name, "").strip().lstrip("-").isdigit() else None


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m longax.train", description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
  p.add_argument("--workdir", default=None,
                 help="run folder (None: a new one under runs/ named after the config and the "
                      "time); re-using one resumes from its last checkpoint")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set train.steps=100 (repeatable)")
  p.add_argument("--fresh", action="store_true",
                 help="start from step 0 even if DIR/checkpoints holds checkpoints (e.g. none "
                      "of them restores); the old folder is renamed "
                      "checkpoints.unreadable-<time> (or .old-<time>) and kept")
  p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                 help="multi-host: HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS)")
  p.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                 help="multi-host: number of processes (env JAX_NUM_PROCESSES)")
  p.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                 help="multi-host: this process's index (env JAX_PROCESS_ID)")
  return p.parse_args(argv)


def _error(message, code: int = 2) -> int:
  print(f"error: {message}", file=sys.stderr)
  return code


def main(argv=None) -> int:
  args = parse_args(argv)
  from longax.train.config import ConfigError, load, override, validate
  from longax.train.workdir import check_workdir
  try:
    cfg = validate(override(load(args.config), args.overrides))
    workdir = pathlib.Path(args.workdir or
                           f"runs/{cfg.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    check_workdir(workdir)
  except ConfigError as e:
    return _error(e)
  import jax
  if args.coordinator:
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from longax.train.trainer import CheckpointError, NonFiniteLoss, Trainer
  try:
    summary = Trainer(cfg, workdir, fresh=args.fresh).run()
  except (ConfigError, CheckpointError) as e:
    return _error(e)
  except NonFiniteLoss as e:
    return _error(e, 1)
  if jax.process_index() == 0:
    print(json.dumps(dict(workdir=str(workdir), **summary)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
