"""The run folder: checked before any work is done, and its checkpoints read safely.

- `check_workdir(path)`: one line (ConfigError) if the folder can't hold a run: a file
  in the way, no write permission, or less free space than LONGAX_MIN_FREE_MB (100 MB).
- `restore_newest(steps, restore, where)`: the newest checkpoint that restores; each
  unreadable one is named in one warning line and left where it is (never moved, never
  deleted), so a later run sees the same checkpoints.
- `move_aside(folder, tag)`: `checkpoints` -> `checkpoints.<tag>-<timestamp>` (kept), for
  `--fresh`.
- `read_params(path)`: the parameters of a run folder's newest readable checkpoint
  (inference, and a run's `train.init_from`).
"""

from __future__ import annotations

import datetime
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import warnings

from longax.train.config import ConfigError

MIN_FREE_MB = 100.0


def check_workdir(path: str | pathlib.Path, min_free_mb: float | None = None) -> None:
  """Raises ConfigError (one line) unless a run can write in `path`; creates nothing."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir {path}: is a file, not a folder")
  base = path.absolute()
  while not base.exists():
    base = base.parent
  if not base.is_dir():
    raise ConfigError(f"--workdir {path}: {base} is a file, so no folder can be made under it")
  try:
    with tempfile.TemporaryFile(dir=base):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir {path}: cannot write in {base} ({e.strerror or e})") from None
  need = _min_free_mb() if min_free_mb is None else min_free_mb
  free = shutil.disk_usage(base).free / 1e6
  if free < need:
    raise ConfigError(f"--workdir {path}: only {free:.1f} MB free in {base}; a run needs at "
                      f"least {need:g} MB (LONGAX_MIN_FREE_MB sets this)")


def _min_free_mb() -> float:
  raw = os.environ.get("LONGAX_MIN_FREE_MB", str(MIN_FREE_MB))
  try:
    return float(raw)
  except ValueError:
    raise ConfigError(f"LONGAX_MIN_FREE_MB={raw!r}: must be a number of megabytes") from None


def reason(e: BaseException, width: int = 160) -> str:
  """A short human reason for a failure: the exception type and its first line, without
  the object reprs (`<... object at 0x...>`) that native (pybind11) errors carry."""
  lines = (re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "", l).strip(" :") for l in str(e).splitlines())
  line = next((l for l in lines if l), "")
  line = line if len(line) <= width else line[:width - 3] + "..."
  return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _drop_closed_loop_noise() -> None:
  """A failed orbax restore leaves tensorstore reads behind: their callbacks later hit
  orbax's closed event loop (an unraisable RuntimeError 'Event loop is closed' each) and
  their futures die unread (asyncio logs '... exception was never retrieved'), each a
  traceback; and at exit an orbax metadata read that never ran is reported as
  "RuntimeWarning: coroutine 'Store._get_array_metadatas' was never awaited" (two lines).
  Drop exactly those; anything else still prints."""
  previous = sys.unraisablehook
  if getattr(previous, "_longax", False):
    return
  unread = ("Future exception was never retrieved", "Task exception was never retrieved")
  logging.getLogger("asyncio").addFilter(lambda r: not str(r.msg).startswith(unread))
  warnings.filterwarnings("ignore", message=r"coroutine 'Store\._get_array_metadatas' was never awaited",
                          category=RuntimeWarning)

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)

  hook._longax = True
  sys.unraisablehook = hook


def restore_newest(steps, restore, where, *, say: bool = True):
  """Calls `restore(step)` from the newest step down until one succeeds.

  Returns (result, step, unreadable steps); (None, None, unreadable) when none restores.
  With `say`, prints `warning: checkpoint step N in DIR is unreadable (REASON); using
  step M` for each step it skipped."""
  failed = []
  _drop_closed_loop_noise()
  for step in sorted(steps, reverse=True):
    try:
      out = restore(step)
    except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
      failed.append((step, reason(e)))
      continue
    for bad, why in failed if say else ():
      print(f"warning: checkpoint step {bad} in {where} is unreadable ({why}); using step {step}",
            file=sys.stderr)
    return out, step, [s for s, _ in failed]
  return None, None, [s for s, _ in failed]


def move_aside(folder: pathlib.Path, tag: str) -> pathlib.Path:
  """Renames `folder` to `folder.<tag>-<timestamp>` next to it (kept, not deleted)."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  target = folder.with_name(f"{folder.name}.{tag}-{stamp}")
  n = 1
  while target.exists():
    target = folder.with_name(f"{folder.name}.{tag}-{stamp}-{n}")
    n += 1
  folder.rename(target)
  return target


def read_params(workdir: str | pathlib.Path):
  """(parameters as a pure dict, step, unreadable steps) of a run folder's newest checkpoint
  that restores; (None, None, tried) when none does (or there is none)."""
  import orbax.checkpoint as ocp
  ckpt = pathlib.Path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
  if not steps:
    return None, None, []
  logging.getLogger("absl").setLevel(logging.ERROR)
  mngr = ocp.CheckpointManager(ckpt.absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
  restore = lambda step: mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  try:
    out, step, tried = restore_newest(steps, restore, ckpt)
  finally:
    mngr.close()
  return (None if out is None else out["state"]["params"]), step, tried
