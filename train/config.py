"""Experiment configs: frozen dataclasses, and `--set a.b=value` overrides type-checked in
one place. A config file (`configs/*.py`) defines `get_config() -> ExperimentConfig`."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
import types
import typing

from longax.models import LMConfig
from longax.models.config import from_dict as dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class DataConfig:
  task: str = "mqar"  # mqar | selective_copy | induction | passkey | text_bytes
  seq_len: int = 64
  batch_size: int = 32
  seed: int = 0
  vocab_size: int = 64  # synthetic tasks; must not exceed model.vocab_size
  num_kv_pairs: int = 8  # mqar
  num_tokens: int = 8  # selective_copy: tokens to copy
  depth: float = 0.5  # passkey: where in the context the key sits (0..1)
  path: str | None = None  # text_bytes: a file or directory (default: Python's stdlib)
  val_fraction: float = 0.05  # text_bytes: last documents held out


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  clip_norm: float = 1.0
  grad_accum: int = 1  # microbatches per step (batch_size is split among them)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  seed: int = 0
  remat: str = "none"  # none | block
  stop_after: int | None = None  # stop cleanly (checkpoint, exit) after this step, as if signalled


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; -1 takes the devices left over."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1  # reserved for sequence parallelism: must be 1 for now


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  name: str
  model: LMConfig
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()


class ConfigError(ValueError):
  """A bad config file, key or value; the message names it."""


def load(path: str | pathlib.Path) -> ExperimentConfig:
  """Runs a config file's `get_config()`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"longax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config()")
  cfg = module.get_config()
  if not isinstance(cfg, ExperimentConfig):
    raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not ExperimentConfig")
  return cfg


def override(cfg, assignments: list[str]):
  """Applies `a.b=value` assignments; every key and value is checked before any is used."""
  for item in assignments:
    if "=" not in item:
      raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    cfg = _set(cfg, key.strip().split("."), raw.strip(), key.strip())
  return cfg


def _set(obj, path: list[str], raw: str, full_key: str):
  fields = {f.name: f for f in dataclasses.fields(obj)}
  name = path[0]
  if name not in fields:
    raise ConfigError(f"unknown config key {full_key!r}: {type(obj).__name__} has "
                      f"{', '.join(sorted(fields))}")
  hint = typing.get_type_hints(type(obj))[name]
  current = getattr(obj, name)
  if len(path) > 1:
    if not dataclasses.is_dataclass(current):
      raise ConfigError(f"unknown config key {full_key!r}: {name} has no sub-keys")
    value = _set(current, path[1:], raw, full_key)
  else:
    if dataclasses.is_dataclass(current):
      raise ConfigError(f"config key {full_key!r} is a group; set one of its fields")
    value = parse(raw, hint, full_key)
  try:
    return dataclasses.replace(obj, **{name: value})
  except ValueError as e:  # a dataclass's own validation (LMConfig.__post_init__)
    raise ConfigError(f"--set {full_key}={raw}: {e}") from None


def parse(raw: str, hint, key: str):
  """Parses `raw` as type `hint` (int, float, bool, str, None-able, tuple[str, ...])."""
  options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
  if raw.lower() in ("none", "null") and type(None) in options:
    return None
  for t in (o for o in options if o is not type(None)):
    if t is bool:
      if raw.lower() in ("true", "1", "yes"):
        return True
      if raw.lower() in ("false", "0", "no"):
        return False
    elif t is int:
      try:
        return int(raw)
      except ValueError:
        pass
    elif t is float:
      try:
        return float(raw)
      except ValueError:
        pass
    elif t is str:
      return raw
    elif typing.get_origin(t) is tuple:
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = tuple(s.strip() for s in raw.strip("()").split(",") if s.strip())
      if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
  raise ConfigError(f"bad value for {key!r}: {raw!r} is not {_type_name(hint)}")


def _type_name(hint) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(d: dict) -> ExperimentConfig:
  """Inverse of `to_dict` (for config.json)."""
  return dataclass_from_dict(ExperimentConfig, d)
