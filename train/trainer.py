"""The training loop: one jitted step over a device mesh; checkpoints, metrics and the data
position hang off it.

    summary = Trainer(cfg, workdir).run()

- Mesh axes ("data", "fsdp", "tensor", "sequence"); the batch is split over data x fsdp,
  parameters over fsdp (first axis) and tensor (last axis) where the sizes divide.
- AdamW with linear warmup + cosine decay, global-norm clipping, gradient accumulation over
  microbatches, compute dtype from the model config, optional per-block remat.
- Orbax checkpoints (async, keep the last K) of params, optimiser state and step; the data
  position is the step. Re-running with the same workdir resumes; a checkpoint that fails
  to restore is skipped with a warning for the one before it. SIGTERM / SIGINT save and
  exit; a non-finite loss stops the run and keeps the last good checkpoint.
- DIR/metrics.jsonl, TensorBoard events in DIR/tb, DIR/config.json, a progress bar.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longax.models import LM, flops_per_token
from longax.models.sharding import shardings
from longax.train.config import ConfigError, ExperimentConfig, MeshConfig, to_dict
from longax.train.data import Dataset

AXES = ("data", "fsdp", "tensor", "sequence")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


class NonFiniteLoss(RuntimeError):
  pass


def make_mesh(mcfg: MeshConfig, devices=None) -> Mesh:
  """The 4-axis mesh; one size may be -1 (the devices left over)."""
  devices = list(devices or jax.devices())
  sizes = [getattr(mcfg, a) for a in AXES]
  if mcfg.sequence != 1:
    raise ConfigError("mesh.sequence must be 1: sequence parallelism is not implemented yet")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh sizes must be >= 1 with at most one -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"mesh {dict(zip(AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                      f"there are {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def make_optimizer(cfg: ExperimentConfig):
  o = cfg.optim
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.lr, max(o.warmup_steps, 1), max(cfg.train.steps, o.warmup_steps + 1),
      end_value=o.lr * o.min_lr_ratio)
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                   optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  return tx, schedule


def loss_and_metrics(model, batch, remat: bool):
  logits = model(batch["tokens"], segment_ids=batch.get("segment_ids"), remat=remat)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["mask"]
  count = jnp.maximum(mask.sum(), 1.0)
  correct = (jnp.argmax(logits, -1) == batch["targets"]) * mask
  return (nll * mask).sum() / count, dict(accuracy=correct.sum() / count)


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


class Trainer:
  def __init__(self, cfg: ExperimentConfig, workdir: str | pathlib.Path):
    self.cfg, self.workdir = cfg, pathlib.Path(workdir)
    if cfg.model.vocab_size < (256 if cfg.data.task == "text_bytes" else cfg.data.vocab_size):
      raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's "
                        f"vocabulary ({256 if cfg.data.task == 'text_bytes' else cfg.data.vocab_size})")
    accum = cfg.optim.grad_accum
    if accum < 1 or cfg.data.batch_size % accum:
      raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not a multiple of "
                        f"optim.grad_accum={accum}")
    if cfg.train.remat not in ("none", "block"):
      raise ConfigError(f"train.remat must be 'none' or 'block', got {cfg.train.remat!r}")
    self.mesh = make_mesh(cfg.mesh)
    self.data = Dataset(cfg.data, self.workdir.parent / ".cache")
    self.lead = jax.process_index() == 0
    self._stop_signal = None

  # ------------------------------------------------------------------ state and step
  def _init_state(self):
    model = LM(self.cfg.model, rngs=nnx.Rngs(self.cfg.train.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, self.schedule = make_optimizer(self.cfg)
    params = jax.device_put(params, shardings(params, self.mesh))
    state = dict(params=params, opt=tx.init(params), step=jnp.zeros((), jnp.int32))
    # Optimiser moments shard like their parameters; scalars are replicated.
    self.state_shardings = shardings(state, self.mesh)
    state = jax.device_put(state, self.state_shardings)
    self.graphdef, self.tx = graphdef, tx
    return state

  def _build_step(self):
    remat, accum = self.cfg.train.remat == "block", self.cfg.optim.grad_accum
    graphdef, tx = self.graphdef, self.tx

    def loss_fn(params, batch):
      model = nnx.merge(graphdef, params)
      return loss_and_metrics(model, batch, remat)

    def step(state, batch):
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

      def one(carry, mb):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], mb)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

      zeros = (jnp.zeros(()), dict(accuracy=jnp.zeros(())),
               jax.tree.map(jnp.zeros_like, state["params"]))
      (loss, metrics, grads), _ = jax.lax.scan(one, zeros, micro)
      loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))
      updates, opt = tx.update(grads, state["opt"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      out = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                 lr=self.schedule(state["step"]), **metrics)
      return dict(params=params, opt=opt, step=state["step"] + 1), out

    batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
    self.batch_sharding = batch_sharding
    self.train_step = jax.jit(step, in_shardings=(self.state_shardings, batch_sharding),
                              out_shardings=(self.state_shardings, None), donate_argnums=0)
    self.eval_step = jax.jit(lambda params, batch: loss_fn(params, batch),
                             in_shardings=(self.state_shardings["params"], batch_sharding))

  def _device_batch(self, batch: dict) -> dict:
    """Every process builds the same global batch; each device takes its slice."""
    return {k: jax.make_array_from_callback(v.shape, self.batch_sharding, lambda i, v=v: v[i])
            for k, v in batch.items()}

  # ------------------------------------------------------------------ checkpoints
  def _manager(self):
    opts = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.train.keep_checkpoints,
                                        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager((self.workdir / "checkpoints").absolute(), options=opts)

  def _save(self, mngr, state, wait=False):
    step = int(state["step"])
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(step=step, data_index=step, seed=self.cfg.train.seed))),
        force=True)
    if wait:
      mngr.wait_until_finished()

  def _restore(self, mngr, state):
    """The newest checkpoint that restores; corrupt ones are skipped with a warning."""
    steps = sorted(mngr.all_steps(), reverse=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    for step in steps:
      try:
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], step
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
        aside = mngr.directory / f"{step}.corrupt-{int(time.time())}"
        warnings.warn(f"checkpoint at step {step} in {self.workdir / 'checkpoints'} is corrupt "
                      f"or partial ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      f"falling back to the previous one (moved to {aside.name})")
        if self.lead:  # kept for inspection, out of the way of the next save of this step
          (mngr.directory / str(step)).rename(aside)
        mngr.reload()
    if steps:
      raise RuntimeError(f"no checkpoint in {self.workdir / 'checkpoints'} restores "
                         f"(tried steps {steps}); refusing to restart from scratch")
    return state, 0

  # ------------------------------------------------------------------ logging
  def _open_logs(self, start: int):
    self.workdir.mkdir(parents=True, exist_ok=True)
    if not self.lead:
      return None, None
    (self.workdir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=1))
    path = self.workdir / "metrics.jsonl"
    kept = []
    if path.exists():  # a resumed run rewrites what came after its checkpoint
      kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= start]
    path.write_text("".join(l + "\n" for l in kept))
    from tensorboardX import SummaryWriter
    return open(path, "a"), SummaryWriter(str(self.workdir / "tb"))

  def _log(self, files, record: dict):
    if files[0] is None:
      return
    files[0].write(json.dumps(record) + "\n")
    files[0].flush()
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        files[1].add_scalar(k, v, record["step"])

  def evaluate(self, params) -> dict:
    sums = dict(loss=0.0, accuracy=0.0)
    for i in range(self.cfg.train.eval_batches):
      loss, metrics = self.eval_step(params, self._device_batch(self.data.batch("val", i)))
      sums["loss"] += float(loss)
      sums["accuracy"] += float(metrics["accuracy"])
    out = {f"eval_{k}": v / self.cfg.train.eval_batches for k, v in sums.items()}
    if self.cfg.data.task == "text_bytes":
      out["eval_bits_per_byte"] = out["eval_loss"] / math.log(2)
    return out

  # ------------------------------------------------------------------ the loop
  def _on_signal(self, signum, frame):
    del frame
    self._stop_signal = signal.Signals(signum).name

  def run(self) -> dict:
    cfg, tc = self.cfg, self.cfg.train
    state = self._init_state()
    self._build_step()
    mngr = self._manager()
    state, start = self._restore(mngr, state)
    files = self._open_logs(start)
    handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(jax.devices()[0])
    summary = dict(start_step=start, stopped=None)
    from tqdm import tqdm
    bar = tqdm(total=tc.steps, initial=start, disable=not self.lead, desc=cfg.name,
               dynamic_ncols=True)
    last_saved, t0, since = start, time.perf_counter(), 0
    try:
      for step in range(start + 1, tc.steps + 1):
        state, out = self.train_step(state, self._device_batch(self.data.batch("train", step - 1)))
        out = {k: float(v) for k, v in jax.device_get(out).items()}
        since += 1
        if not math.isfinite(out["loss"]):
          raise NonFiniteLoss(f"non-finite loss ({out['loss']}) at step {step}; stopping. "
                              f"The last good checkpoint is step {last_saved} in "
                              f"{self.workdir / 'checkpoints'}")
        record = None
        if step % tc.log_every == 0 or step == tc.steps:
          dt = time.perf_counter() - t0
          record = dict(step=step, **out, tokens_per_s=since * tokens_per_step / dt)
          if peak:
            record["mfu"] = since * flops / dt / (peak * jax.device_count())
          t0, since = time.perf_counter(), 0
          bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step % tc.eval_every == 0 or step == tc.steps:
          record = dict(record or dict(step=step, **out), **self.evaluate(state["params"]))
        if record:
          self._log(files, record)
          summary["last"] = record
        bar.update(1)
        stop = self._stop_signal or (tc.stop_after is not None and step >= tc.stop_after
                                     and "stop_after")
        if step % tc.checkpoint_every == 0 or step == tc.steps or stop:
          self._save(mngr, state, wait=bool(stop) or step == tc.steps)
          last_saved = step
        if stop:
          summary["stopped"] = f"{stop} at step {step}"
          break
    finally:
      bar.close()
      mngr.wait_until_finished()
      mngr.close()
      for s, h in handlers.items():
        signal.signal(s, h)
      if files[0] is not None:
        files[0].close()
        files[1].close()
    summary["end_step"] = int(state["step"])
    return summary
