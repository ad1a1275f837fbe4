"""LMConfig: a frozen dataclass; the model is built from it.

Every field has a range rule (`RULES`), checked with the cross-field rules on construction:
a bad value raises `FieldError`, one line `key=value: what is allowed`.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from longax.kernels._dispatch import IMPLS

MIXERS = ("softmax", "sigmoid", "linear", "based", "gla", "retnet", "lightning", "mamba",
          "mamba2", "nsa")
SSM_MIXERS = ("mamba", "mamba2")  # the rest but nsa take LMConfig.short_conv
DTYPES = ("float32", "bfloat16", "float16")


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
class NSAConfig:
  """nsa mixer (Native Sparse Attention): compressed, selected and sliding-window branches."""
  head_dim: int | None = None  # default d_model // n_heads
  block_size: int = 32  # l: tokens per compressed block
  stride: int = 16  # d: compressed blocks start every d tokens (d <= l)
  select_block: int = 64  # l': tokens per selectable key block
  n_selected: int = 16  # n: key blocks each query attends to (its own block included)
  window: int = 512  # sliding-window branch
  rope_theta: float = 10000.0


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
  # Kernel of a short causal depthwise conv on q, k, v of the attention and linear-attention
  # mixers (Zoology / Based; based: its linear part). 0: none. Mamba's is mamba(2).d_conv.
  short_conv: int = 0
  # The longest sequence (prompt + generated tokens) the model is built for: the positions
  # a full (unwindowed) attention KV cache holds, and sigmoid attention's bias -log(max_len).
  # Windowed attention, linear and SSM layers are not bounded by it.
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
  nsa: NSAConfig = NSAConfig()

  def __post_init__(self):
    try:
      check(self)
    except FieldError as e:
      raise FieldError(e.key, e.value, e.allowed, owner="LMConfig: ") from None

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

  def sequence_parallel_problem(self, p: int, attention: str) -> tuple[str, str] | None:
    """Why this model cannot run its sequence split over p > 1 devices with `attention`
    ("ring" | "ulysses") for its attention layers: (the setting to change, "sequence" or
    "sp_attention"; the reason), or None. One rule for training and the prefill."""
    mixers = set(self.layer_mixers)
    if "nsa" in mixers:
      return "sequence", "an nsa layer has no sequence-parallel form (no sparse ring yet)"
    attn = mixers & {"softmax", "sigmoid", "based"}
    a = self.attention
    if attn and (a.sinks or a.softcap is not None):
      return "sequence", (f"the {'/'.join(sorted(attn))} layers have attention sinks or a "
                          f"softcap (sinks={a.sinks}, softcap={a.softcap}), which ring and "
                          "Ulysses attention do not take")
    if attention == "ulysses" and attn:
      if self.n_heads % p:
        return "sp_attention", (f"splits the heads: needs model.n_heads={self.n_heads} "
                                f"divisible by the sequence axis {p} (or use ring)")
      if attn - {"based"} and self.kv_heads % p and p % self.kv_heads:
        return "sp_attention", (f"needs model.n_kv_heads={self.kv_heads} to divide or be "
                                f"divisible by the sequence axis {p} (or use ring)")
    return None

  @property
  def conv_reach(self) -> int:
    """How many tokens back the layers' short causal convs read (kernel - 1; 0: none)."""
    mixers = set(self.layer_mixers)
    kernels = [getattr(self, m).d_conv for m in SSM_MIXERS if m in mixers]
    if mixers - set(SSM_MIXERS) and self.short_conv:
      kernels.append(self.short_conv)
    return max(kernels, default=1) - 1


# ---------------------------------------------------------------------------- validation


class ConfigError(ValueError):
  """A bad config file, key or value; the message (one line) names it."""


class FieldError(ConfigError):
  """A value out of range: `key=value: what is allowed`; `key` is dotted from its config."""

  def __init__(self, key: str, value, allowed: str, owner: str = ""):
    self.key, self.value, self.allowed = key, value, allowed
    super().__init__(f"{owner}{key}={show(value)}: {allowed}")

  def under(self, prefix: str) -> FieldError:
    """The same error, its key seen from a parent config (`model` + `.n_heads`)."""
    return FieldError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.allowed)


def show(value) -> str:
  """A value as `--set` takes it: none, 3, 0.5, 'text', ('a', 'b')."""
  return "none" if value is None else repr(value)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def at_least(lo: int, none: bool = False):
  """Rule: an int >= lo (or None)."""
  want = f"must be an int >= {lo}" + (" or none" if none else "")
  return lambda v: None if (none and v is None) or (_is_int(v) and v >= lo) else want


def number(lo=None, hi=None, *, lo_open=False, hi_open=False, none=False):
  """Rule: a finite number in the interval given (or None)."""
  lo_s, hi_s = ("(" if lo_open else "[") + str(lo), str(hi) + (")" if hi_open else "]")
  if lo is not None and hi is not None:
    want = f"must be a number in {lo_s}, {hi_s}"
  elif lo is not None:
    want = f"must be a number {'>' if lo_open else '>='} {lo}"
  else:
    want = "must be a finite number"
  want += " or none" if none else ""

  def rule(v):
    if none and v is None:
      return None
    ok = _is_number(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (
        hi is None or (v < hi if hi_open else v <= hi))
    return None if ok else want
  return rule


def one_of(*options, what: str = "one of"):
  return lambda v: None if v in options else f"must be {what} {', '.join(map(str, options))}"


def flag(v):
  return None if isinstance(v, bool) else "must be true or false"


def text(none: bool = False):
  want = "must be a non-empty string" + (" or none" if none else "")
  return lambda v: None if (none and v is None) or (isinstance(v, str) and v) else want


def _mixer(v):
  if v in MIXERS:
    return None
  return f"unknown mixer {v!r}; valid: {', '.join(MIXERS)}"


def _pattern(v):
  if v is None:
    return None
  if not isinstance(v, tuple) or not v:
    return f"must be a non-empty tuple of mixers ({', '.join(MIXERS)}) or none"
  return next((_mixer(m) for m in v if _mixer(m)), None)


_SSM_RULES = dict(d_conv=at_least(1), expand=at_least(1), dt_min=number(0, lo_open=True),
                  dt_max=number(0, lo_open=True), chunk_size=at_least(1))
RULES = {
    AttentionConfig: dict(head_dim=at_least(1, none=True), window=at_least(1, none=True),
                          sinks=at_least(0), qk_norm=flag, rope_theta=number(0, lo_open=True),
                          softcap=number(0, lo_open=True, none=True),
                          sigmoid_bias=number(none=True)),
    LinearConfig: dict(head_dim=at_least(1, none=True), feature_dim=at_least(1),
                       based_window=at_least(1), gate_rank=at_least(1),
                       gate_norm=number(0, lo_open=True), chunk_size=at_least(1)),
    MambaConfig: _SSM_RULES | dict(d_state=at_least(1), dt_rank=at_least(1, none=True)),
    Mamba2Config: _SSM_RULES | dict(d_state=at_least(1), head_dim=at_least(1),
                                    n_groups=at_least(1)),
    NSAConfig: dict(head_dim=at_least(1, none=True), block_size=at_least(1), stride=at_least(1),
                    select_block=at_least(1), n_selected=at_least(1), window=at_least(1),
                    rope_theta=number(0, lo_open=True)),
    LMConfig: dict(vocab_size=at_least(1), d_model=at_least(1), n_layers=at_least(1),
                   n_heads=at_least(1), mixer=_mixer, n_kv_heads=at_least(1, none=True),
                   layer_pattern=_pattern, d_ff=at_least(0, none=True), short_conv=at_least(0),
                   max_len=at_least(1),
                   dtype=one_of(*DTYPES), param_dtype=one_of(*DTYPES), impl=one_of(*IMPLS),
                   tie_embeddings=flag, norm_eps=number(0, lo_open=True)),
}


def check_fields(obj, rules: dict = RULES) -> None:
  """Every field of dataclass `obj` (and its sub-configs) against its rule in `rules`."""
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value) and type(value) in rules:
      try:
        check_fields(value, rules)
      except FieldError as e:
        raise e.under(f.name) from None
      continue
    problem = rules[type(obj)][f.name](value)
    if problem:
      raise FieldError(f.name, value, problem)


def check(cfg: LMConfig) -> None:
  """Every field's range, then the rules between fields; raises FieldError."""
  check_fields(cfg)
  mixers = set(cfg.layer_mixers)
  if cfg.n_heads % cfg.kv_heads:
    raise FieldError("n_kv_heads", cfg.n_kv_heads, f"must divide n_heads={cfg.n_heads}")
  if cfg.layer_pattern is not None and cfg.mixer not in cfg.layer_pattern:
    raise FieldError("mixer", cfg.mixer, f"is not in layer_pattern={cfg.layer_pattern}, which "
                     "decides every layer's mixer (mixer would be ignored): set mixer to one of "
                     "the pattern's, or layer_pattern=none")
  _check_heads(cfg, mixers)
  _check_attention(cfg.attention, mixers)
  _check_ssm(cfg, mixers)
  if "nsa" in mixers and cfg.nsa.stride > cfg.nsa.block_size:
    raise FieldError("nsa.stride", cfg.nsa.stride, f"must be <= nsa.block_size="
                     f"{cfg.nsa.block_size} (else tokens between blocks are never compressed)")


def _check_heads(cfg: LMConfig, mixers: set) -> None:
  """Head dims that default to d_model // n_heads need n_heads to divide d_model; RoPE
  (softmax, sigmoid, retnet, based's window) rotates pairs, so its head dim is even."""
  derived = cfg.d_model // cfg.n_heads
  for group, head_dim, used, rope in (
      ("attention", cfg.attention.head_dim, mixers & {"softmax", "sigmoid"}, True),
      ("nsa", cfg.nsa.head_dim, mixers & {"nsa"}, True),
      ("linear", cfg.linear.head_dim, mixers & {"linear", "gla", "retnet", "lightning", "based"},
       "retnet" in mixers)):
    if used and head_dim is None and cfg.d_model % cfg.n_heads:
      raise FieldError("n_heads", cfg.n_heads, f"must divide d_model={cfg.d_model} (the "
                       f"{group} head dim defaults to d_model // n_heads), or set {group}.head_dim")
    if used and rope and (head_dim or derived) % 2:
      raise FieldError(f"{group}.head_dim", head_dim, f"the head dim {head_dim or derived} must "
                       "be even (RoPE rotates pairs)")
  if "based" in mixers and derived % 2:
    raise FieldError("n_heads", cfg.n_heads, f"based's sliding window needs an even "
                     f"d_model // n_heads (RoPE), got {derived}")


def _check_attention(a: AttentionConfig, mixers: set) -> None:
  if "sigmoid" in mixers and (a.sinks or a.softcap is not None):
    key, value = ("attention.sinks", a.sinks) if a.sinks else ("attention.softcap", a.softcap)
    raise FieldError(key, value, "sigmoid attention takes no sinks or softcap: must be 0 / none")
  if a.sinks and a.window is None:
    raise FieldError("attention.sinks", a.sinks, "sinks only matter with a sliding window: "
                     "set attention.window, or sinks=0")


def _check_ssm(cfg: LMConfig, mixers: set) -> None:
  for name in ("mamba", "mamba2"):
    m = getattr(cfg, name)
    if m.dt_max < m.dt_min:
      raise FieldError(f"{name}.dt_max", m.dt_max, f"must be >= {name}.dt_min={m.dt_min}")
  m2, d_inner = cfg.mamba2, cfg.mamba2.expand * cfg.d_model
  if "mamba2" in mixers and d_inner % m2.head_dim:
    raise FieldError("mamba2.head_dim", m2.head_dim, f"must divide mamba2.expand * d_model = {d_inner}")
  if "mamba2" in mixers and (d_inner // m2.head_dim) % m2.n_groups:
    raise FieldError("mamba2.n_groups", m2.n_groups, f"must divide the {d_inner // m2.head_dim} "
                     "Mamba-2 heads (expand * d_model / head_dim)")


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
