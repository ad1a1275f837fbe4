"""LMConfig: a frozen dataclass; the model is built from it."""

from __future__ import annotations

import dataclasses
import typing

MIXERS = ("softmax", "sigmoid", "linear", "based", "gla", "retnet", "lightning", "mamba",
          "mamba2")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """softmax / sigmoid mixers (and based's sliding-window part: `window` there)."""
  head_dim: int | None = None  # default d_model // n_heads
  window: int | None = None
  sinks: int = 0
  qk_norm: bool = False
  rope_theta: float = 10000.0
  softcap: float | None = None
  sigmoid_bias: float | None = None  # default -log(max_len)


@dataclasses.dataclass(frozen=True)
class LinearConfig:
  """linear / based / gla / retnet / lightning mixers."""
  head_dim: int | None = None
  feature_dim: int = 16  # based: q/k projection before the Taylor map
  based_window: int = 64
  gate_rank: int = 16  # gla: low-rank decay projection
  gate_norm: float = 16.0  # gla: log-decay divisor
  chunk_size: int = 64


@dataclasses.dataclass(frozen=True)
class _SSMConfig:
  """What the Mamba blocks share: short conv, expansion, dt initialisation, scan chunk."""
  d_conv: int = 4
  expand: int = 2
  dt_min: float = 1e-3
  dt_max: float = 0.1
  chunk_size: int = 64


@dataclasses.dataclass(frozen=True)
class MambaConfig(_SSMConfig):
  d_state: int = 16
  dt_rank: int | None = None  # default ceil(d_model / 16)


@dataclasses.dataclass(frozen=True)
class Mamba2Config(_SSMConfig):
  d_state: int = 64
  head_dim: int = 64
  n_groups: int = 1


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  mixer: str
  n_kv_heads: int | None = None  # default n_heads
  layer_pattern: tuple[str, ...] | None = None  # repeated to n_layers; default (mixer,)
  d_ff: int | None = None  # SwiGLU width; default ~8/3 d_model rounded to 64; 0: no MLP
  max_len: int = 2048
  dtype: str = "float32"  # compute
  param_dtype: str = "float32"
  impl: str = "auto"
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  attention: AttentionConfig = AttentionConfig()
  linear: LinearConfig = LinearConfig()
  mamba: MambaConfig = MambaConfig()
  mamba2: Mamba2Config = Mamba2Config()

  def __post_init__(self):
    for name in self.layer_mixers:
      if name not in MIXERS:
        raise ValueError(f"LMConfig: unknown mixer {name!r}; valid: {', '.join(MIXERS)}")
    kv = self.kv_heads
    if self.n_heads % kv:
      raise ValueError(f"LMConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"LMConfig: `{name}` must be >= 1, got {getattr(self, name)}")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def ff_dim(self) -> int:
    if self.d_ff is not None:
      return self.d_ff
    return max(64, round(8 * self.d_model / 3 / 64) * 64)

  @property
  def layer_mixers(self) -> tuple[str, ...]:
    pattern = tuple(self.layer_pattern or (self.mixer,))
    return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))


def from_dict(cls, d: dict):
  """Rebuilds dataclass `cls` (nested dataclasses, tuples) from `dataclasses.asdict` output."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in d:
      continue
    v, hint = d[f.name], hints[f.name]
    if dataclasses.is_dataclass(hint):
      v = from_dict(hint, v)
    elif isinstance(v, list):
      v = tuple(v)
    kwargs[f.name] = v
  return cls(**kwargs)
