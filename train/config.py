"""Experiment configs: frozen dataclasses, and `--set a.b=value` overrides type-checked in
one place. A config file (`configs/*.py`) defines `get_config() -> ExperimentConfig`.

`validate(cfg, n_devices)` checks every field's range (`RULES`) and the rules between
fields before anything runs; each failure is one line, `key=value: what is allowed`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import pathlib
import traceback
import types
import typing

from longax.models import LMConfig
from longax.models import config as model_config
from longax.models.config import ConfigError, FieldError, at_least, flag, number, one_of, text
from longax.models.config import from_dict as dataclass_from_dict

TASKS = ("mqar", "selective_copy", "induction", "passkey", "text_bytes", "tokens")
PASSKEY_DIGITS = 4


@dataclasses.dataclass(frozen=True)
class DataConfig:
  task: str = "mqar"  # mqar | selective_copy | induction | passkey | text_bytes | tokens
  seq_len: int = 64
  batch_size: int = 32
  seed: int = 0
  vocab_size: int = 64  # synthetic tasks; must not exceed model.vocab_size
  num_kv_pairs: int = 8  # mqar
  num_tokens: int = 8  # selective_copy: tokens to copy
  # passkey: where in the context the key sits (0..1); None: uniform, per sequence (the model
  # must find the key, not learn its place: what carries to longer contexts)
  depth: float | None = 0.5
  # text_bytes: a file or directory (default: Python's stdlib); tokens: a folder written by
  # `python -m longax.train.prepare` (its vocabulary must fit model.vocab_size)
  path: str | None = None
  val_fraction: float = 0.05  # text_bytes: last documents held out
  # text_bytes: where the corpus cache goes (default $LONGAX_CACHE_DIR, else
  # $XDG_CACHE_HOME/longax or ~/.cache/longax)
  cache_dir: str | None = None


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
  sp_attention: str = "ring"  # ring | ulysses: attention layers when mesh.sequence > 1
  sp_layout: str = "contiguous"  # contiguous | zigzag: how the sequence splits over devices
  init_from: str | None = None  # a run folder: a fresh run starts from the parameters of its
  #   newest checkpoint (same shapes; optimizer and step anew), e.g. a longer seq_len next


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; -1 takes the devices left over."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1  # sequence parallelism: the sequence splits over this many devices


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  name: str
  model: LMConfig
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()


AXES = ("data", "fsdp", "tensor", "sequence")
_MESH_SIZE = lambda v: None if v == -1 or (model_config._is_int(v) and v >= 1) else (
    "must be an int >= 1, or -1 (the devices left over)")
RULES = model_config.RULES | {
    DataConfig: dict(task=one_of(*TASKS), seq_len=at_least(1), batch_size=at_least(1),
                     seed=at_least(0), vocab_size=at_least(1), num_kv_pairs=at_least(1),
                     num_tokens=at_least(1), depth=number(0, 1, none=True),
                     path=text(none=True), val_fraction=number(0, 1, hi_open=True),
                     cache_dir=text(none=True)),
    OptimConfig: dict(lr=number(0, lo_open=True), warmup_steps=at_least(0),
                      min_lr_ratio=number(0, 1), weight_decay=number(0),
                      b1=number(0, 1, hi_open=True), b2=number(0, 1, hi_open=True),
                      clip_norm=number(0, lo_open=True), grad_accum=at_least(1)),
    TrainConfig: dict(steps=at_least(1), log_every=at_least(1), eval_every=at_least(1),
                      eval_batches=at_least(1), checkpoint_every=at_least(1),
                      keep_checkpoints=at_least(1), seed=at_least(0),
                      remat=one_of("none", "block"), stop_after=at_least(1, none=True),
                      sp_attention=one_of("ring", "ulysses"),
                      sp_layout=one_of("contiguous", "zigzag"), init_from=text(none=True)),
    MeshConfig: dict(data=_MESH_SIZE, fsdp=_MESH_SIZE, tensor=_MESH_SIZE,
                     sequence=_MESH_SIZE),
    ExperimentConfig: dict(name=lambda v: None if isinstance(v, str) and v and "/" not in v
                           else "must be a non-empty string without '/'"),
}


def validate(cfg: ExperimentConfig, n_devices: int | None = None) -> ExperimentConfig:
  """Every field's range and every rule between fields; `n_devices` (when known) checks the
  mesh and the batch split. Returns cfg; raises ConfigError naming the key."""
  model_config.check_fields(cfg, RULES)
  try:
    model_config.check(cfg.model)
  except FieldError as e:
    raise e.under("model") from None
  check_data(cfg.data)
  d, m = cfg.data, cfg.model
  data_vocab, what = (256, "256 bytes (data.task='text_bytes')") if d.task == "text_bytes" else (
      d.vocab_size, f"data.vocab_size={d.vocab_size}")
  if d.task == "tokens":
    from longax.train.tokens import read_meta
    data_vocab = int(read_meta(d.path)["vocab_size"])
    what = f"the vocabulary of data.path={d.path!r} ({data_vocab} tokens)"
  if m.vocab_size < data_vocab:
    raise FieldError("model.vocab_size", m.vocab_size, f"must be >= {what}")
  if d.task in ("text_bytes", "tokens") and "nsa" in m.layer_mixers:
    raise FieldError("data.task", d.task, "packs documents (segment_ids), which the nsa mixer "
                     "does not take: use a synthetic task, or another mixer")
  if m.short_conv and "nsa" in m.layer_mixers:
    raise FieldError("model.short_conv", m.short_conv, "must be 0 with an nsa layer (the nsa "
                     "mixer takes no short conv)")
  if d.seq_len > m.max_len:
    raise FieldError("data.seq_len", d.seq_len, f"must be <= model.max_len={m.max_len}, the "
                     "longest sequence the model is built for")
  if d.batch_size % cfg.optim.grad_accum:
    raise FieldError("data.batch_size", d.batch_size,
                     f"must be a multiple of optim.grad_accum={cfg.optim.grad_accum}")
  sizes = mesh_sizes(cfg.mesh, n_devices)
  if n_devices is not None and d.batch_size % (sizes["data"] * sizes["fsdp"]):
    raise FieldError("data.batch_size", d.batch_size, f"must be a multiple of mesh data x fsdp "
                     f"= {sizes['data'] * sizes['fsdp']} (the batch is split over them)")
  if sizes.get("sequence", 1) > 1:
    check_sequence_parallel(cfg, sizes["sequence"])
  src = cfg.train.init_from
  if src is not None and not any(p.name.isdigit() for p in (pathlib.Path(src) / "checkpoints").glob("*")):
    raise FieldError("train.init_from", src, "must be a run folder with a checkpoint "
                     "(checkpoints/<step>)")
  return cfg


def check_sequence_parallel(cfg: ExperimentConfig, p: int) -> None:
  """The rules of mesh.sequence = p > 1: the length splits into p (zigzag: 2p) chunks, each
  at least a short conv's reach; then the model's own rule (`LMConfig.sequence_parallel_problem`)."""
  m, zig = cfg.model, cfg.train.sp_layout == "zigzag"
  parts = 2 * p if zig else p
  if cfg.data.seq_len % parts:
    raise FieldError("data.seq_len", cfg.data.seq_len, f"must be a multiple of {parts} = "
                     f"{'2 x ' if zig else ''}mesh.sequence (train.sp_layout={cfg.train.sp_layout!r})")
  if m.conv_reach > cfg.data.seq_len // parts:
    raise FieldError("data.seq_len", cfg.data.seq_len, f"must give each of the {parts} sequence "
                     f"chunks at least a short conv's reach (kernel - 1) = {m.conv_reach} tokens")
  if problem := m.sequence_parallel_problem(p, cfg.train.sp_attention):
    setting, why = problem
    key, value = (("mesh.sequence", p) if setting == "sequence" else
                  ("train.sp_attention", cfg.train.sp_attention))
    raise FieldError(key, value, why)


def check_data(d: DataConfig) -> None:
  """DataConfig's fields, then what its task needs of seq_len and vocab_size."""
  try:
    model_config.check_fields(d, RULES)
  except FieldError as e:
    raise e.under("data") from None
  need_len, need_vocab = {
      "mqar": (2 * d.num_kv_pairs + 1, 2 * d.num_kv_pairs + 2),  # pairs, then >= 1 query
      "selective_copy": (2 * d.num_tokens, 3),  # blanks among which to scatter, then a copy
      "induction": (3, 3),
      "passkey": (2 * PASSKEY_DIGITS + 1, 16),  # marker + key, question + key
      "text_bytes": (1, 1), "tokens": (1, 1)}[d.task]
  if d.seq_len < need_len:
    raise FieldError("data.seq_len", d.seq_len, f"must be >= {need_len} for data.task={d.task!r}"
                     + (f" with num_kv_pairs={d.num_kv_pairs}" if d.task == "mqar" else "")
                     + (f" with num_tokens={d.num_tokens}" if d.task == "selective_copy" else ""))
  if d.task == "tokens" and not d.path:
    raise FieldError("data.path", d.path, "must name a folder written by python -m "
                     "longax.train.prepare for data.task='tokens'")
  if d.task not in ("text_bytes", "tokens") and d.vocab_size < need_vocab:
    raise FieldError("data.vocab_size", d.vocab_size, f"must be >= {need_vocab} for "
                     f"data.task={d.task!r}" + (f" with num_kv_pairs={d.num_kv_pairs}"
                                                if d.task == "mqar" else ""))


def mesh_sizes(mcfg: MeshConfig, n_devices: int | None = None) -> dict[str, int]:
  """Axis sizes with -1 filled from `n_devices` (left as -1 when that is None)."""
  try:
    model_config.check_fields(mcfg, RULES)
  except FieldError as e:
    raise e.under("mesh") from None
  sizes = {a: getattr(mcfg, a) for a in AXES}
  shown = ", ".join(f"{a}={s}" for a, s in sizes.items())
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError(f"mesh ({shown}): at most one axis may be -1")
  if n_devices is None:
    return sizes
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if n_devices % known:
      raise ConfigError(f"mesh ({shown}): {known} does not divide the {n_devices} devices")
    sizes = {a: n_devices // known if s == -1 else s for a, s in sizes.items()}
  if math.prod(sizes.values()) != n_devices:
    raise ConfigError(f"mesh ({shown}): needs {math.prod(sizes.values())} devices, there "
                      f"are {n_devices}")
  return sizes


def call_file(path: str | pathlib.Path, fn: str, what: str):
  """Runs a Python file's `fn()` (a config's get_config, a sweep's get_sweep) and returns its
  result; a missing file, a missing function or any exception is one ConfigError line naming
  the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"{what} file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"longax_{what}_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, fn):
      raise ConfigError(f"{path} defines no {fn}()")
    return getattr(module, fn)()
  except ConfigError as e:
    raise ConfigError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
  except Exception as e:  # noqa: BLE001 - a broken file: say where, in one line
    raise ConfigError(f"{path}{_line_in(e, path)}: {type(e).__name__}: {_first_line(e)}") from None


def load(path: str | pathlib.Path) -> ExperimentConfig:
  """Runs a config file's `get_config()`; any failure is one line naming the file."""
  cfg = call_file(path, "get_config", "config")
  if not isinstance(cfg, ExperimentConfig):
    raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not ExperimentConfig")
  return cfg


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:200]


def _line_in(e: BaseException, path: pathlib.Path) -> str:
  """`:LINE` of the deepest frame of the traceback that lies in `path`."""
  if isinstance(e, SyntaxError) and e.lineno:
    return f":{e.lineno}"
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
           if pathlib.Path(f.filename).resolve() == path.resolve()]
  return f":{lines[-1]}" if lines else ""


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
  except FieldError as e:  # LMConfig's own validation: its key, seen from the top
    raise e.under(".".join(full_key.split(".")[:-len(path)])) from None
  except ValueError as e:
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
