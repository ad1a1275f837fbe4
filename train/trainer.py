"""The training loop: one jitted step over a device mesh; checkpoints, metrics and the data
position hang off it.

    summary = Trainer(cfg, workdir).run()

- Mesh axes ("data", "fsdp", "tensor", "sequence"); the batch is split over data x fsdp,
  parameters over fsdp (first axis) and tensor (last axis) where the sizes divide.
- AdamW with linear warmup + cosine decay, global-norm clipping, gradient accumulation over
  microbatches, compute dtype from the model config, optional per-block remat.
- Orbax checkpoints (async, keep the last K readable ones) of params, optimiser state and
  step; the data position is the step. Re-running with the same workdir resumes; a
  checkpoint that fails to restore is skipped with a one-line warning for the one before
  it and left in place. If none restores, the run refuses to start (CheckpointError) on
  every try until `fresh=True` (`--fresh`) moves the folder aside and starts from step 0.
  SIGTERM / SIGINT save and exit; a non-finite loss stops the run and keeps the last good
  checkpoint.
- DIR/metrics.jsonl, TensorBoard events in DIR/tb, DIR/config.json, a progress bar.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longax.kernels.sequence_parallel import to_zigzag
from longax.layers.sequence import SequenceParallel, sequence_parallel
from longax.models import LM, flops_per_token
from longax.models.sharding import shardings
from longax.train.config import AXES, ExperimentConfig, MeshConfig, mesh_sizes, to_dict, validate
from longax.train.data import Dataset
from longax.train.workdir import move_aside, read_params, restore_newest
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


class NonFiniteLoss(RuntimeError):
  pass


class CheckpointError(RuntimeError):
  """Checkpoints exist but none restores; nothing was changed on disk."""


def make_mesh(mcfg: MeshConfig, devices=None) -> Mesh:
  """The 4-axis mesh; one size may be -1 (the devices left over)."""
  devices = list(devices or jax.devices())
  sizes = mesh_sizes(mcfg, len(devices))
  return Mesh(np.asarray(devices).reshape([sizes[a] for a in AXES]), AXES)


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
  """`fresh`: start from step 0 even if the workdir holds checkpoints; its `checkpoints`
  folder is renamed `checkpoints.unreadable-<time>` (none restores) or `checkpoints.old-<time>`
  and kept."""

  def __init__(self, cfg: ExperimentConfig, workdir: str | pathlib.Path, fresh: bool = False):
    self.cfg, self.workdir, self.fresh = validate(cfg, jax.device_count()), pathlib.Path(workdir), fresh
    self.mesh = make_mesh(cfg.mesh)
    self.sp = SequenceParallel(self.mesh, cfg.train.sp_attention, cfg.train.sp_layout)
    self.data = Dataset(cfg.data)
    self.lead = jax.process_index() == 0
    self._stop_signal = None
    self.unreadable: set[int] = set()

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
      with sequence_parallel(self.sp):  # mixers take the sequence-parallel ops
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

    batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp"), "sequence"))
    self.batch_sharding = batch_sharding
    self.train_step = jax.jit(step, in_shardings=(self.state_shardings, batch_sharding),
                              out_shardings=(self.state_shardings, None), donate_argnums=0)
    self.eval_step = jax.jit(lambda params, batch: loss_fn(params, batch),
                             in_shardings=(self.state_shardings["params"], batch_sharding))

  def _device_batch(self, batch: dict) -> dict:
    """Every process builds the same global batch; each device takes its slice. The zigzag
    layout permutes every [B, T] array once here (the loss is a mean over tokens)."""
    if self.sp.size > 1 and self.sp.layout == "zigzag":
      batch = {k: np.asarray(to_zigzag(np.asarray(v), self.sp.size)) for k, v in batch.items()}
    return {k: jax.make_array_from_callback(v.shape, self.batch_sharding, lambda i, v=v: v[i])
            for k, v in batch.items()}

  def _batch(self, split: str, index: int) -> dict:
    """The global batch with only this process's rows read (all of them on one host)."""
    rows = None
    if jax.process_count() > 1:  # rows split over hosts; zigzag permutes only within a row
      b, t = self.cfg.data.batch_size, self.cfg.data.seq_len
      where = self.batch_sharding.addressable_devices_indices_map((b, t)).values()
      rows = sorted({r for idx in where for r in range(*idx[0].indices(b))})
    return self.data.batch(split, index, rows)

  # ------------------------------------------------------------------ checkpoints
  def _manager(self):
    # max_to_keep=None: orbax deletes nothing; `_prune` keeps the newest readable ones, so
    # an unreadable newest step never pushes the good older ones out.
    opts = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=True,
                                        create=True)
    return ocp.CheckpointManager((self.workdir / "checkpoints").absolute(), options=opts)

  def _prune(self, mngr):
    """Deletes readable checkpoints beyond the newest `train.keep_checkpoints`; unreadable
    ones are never touched."""
    readable = sorted(s for s in mngr.all_steps() if s not in self.unreadable)
    for step in readable[:-self.cfg.train.keep_checkpoints]:
      mngr.delete(step)

  def _save(self, mngr, state, wait=False):
    step = int(state["step"])
    mngr.wait_until_finished()
    self._prune(mngr)
    if step in self.unreadable:  # a new checkpoint of this step: keep the old one beside it
      old = mngr.directory / str(step)
      kept = old.with_name(f"{step}.unreadable-{int(time.time())}")
      if self.lead:
        old.rename(kept)
        print(f"longax: saving step {step} again; its unreadable checkpoint is kept as {kept}",
              file=sys.stderr)
      self.unreadable.discard(step)
      mngr.reload()
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(step=step, data_index=step, seed=self.cfg.train.seed))),
        force=True)
    if wait:
      mngr.wait_until_finished()
      self._prune(mngr)

  def _restore(self, mngr, state):
    """(state, step) of the newest checkpoint that restores; unreadable ones are named in
    a warning and left in place. None restoring raises CheckpointError, unless `fresh`."""
    steps = mngr.all_steps()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restore = lambda step: mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))["state"]
    where = self.workdir / "checkpoints"
    if self.fresh and steps:
      return self._start_fresh(mngr, state, restore, steps)
    out, step, unreadable = restore_newest(steps, restore, where, say=self.lead)
    self.unreadable = set(unreadable)
    if out is not None:
      return out, step
    if steps:
      raise CheckpointError(
          f"no checkpoint in {where} restores (tried steps {', '.join(map(str, unreadable))}); "
          "nothing was changed: fix them, or pass --fresh to start from step 0 (they are kept "
          "as checkpoints.unreadable-<time>)")
    return state, 0

  def _start_fresh(self, mngr, state, restore, steps):
    """--fresh: the old checkpoints folder is renamed (kept) and the run starts at step 0."""
    _, good, _ = restore_newest(steps, restore, "", say=False)
    folder = mngr.directory
    mngr.close()
    if self.lead:
      kept = move_aside(pathlib.Path(folder), "old" if good is not None else "unreadable")
      print(f"longax: --fresh: moved the {'checkpoints' if good is not None else 'unreadable checkpoints'} "
            f"(steps {', '.join(map(str, sorted(steps)))}) to {kept}; starting from step 0",
            file=sys.stderr)
    self._mngr = self._manager()
    return state, 0

  def _params_from(self, state, src: str):
    """A fresh run's state with `train.init_from`'s newest parameters (every name and shape
    as this model's; cast to its dtypes) and a new optimizer state."""
    params, step, tried = read_params(src)
    if params is None:
      raise CheckpointError(f"train.init_from={src!r}: no checkpoint there restores"
                            + (f" (tried steps {', '.join(map(str, tried))})" if tried else ""))
    name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    flat = lambda tree: {name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    mine, theirs = flat(state["params"]), flat(params)  # by name: restored list keys are strings
    problem = next((f"parameter {n} is {'missing there' if n in mine else 'not in this model'}"
                    for n in sorted(set(mine) ^ set(theirs))), None) or next(
        (f"parameter {n} has shape {tuple(theirs[n].shape)} there, {tuple(x.shape)} here"
         for n, x in mine.items() if tuple(theirs[n].shape) != tuple(x.shape)), None)
    if problem:
      raise CheckpointError(f"train.init_from={src!r}: {problem}")
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(theirs[name(p)], x.dtype), state["params"])
    state = dict(params=params, opt=self.tx.init(params), step=state["step"])
    if self.lead:
      print(f"longax: parameters from {src} (step {step}); optimizer and step start anew",
            file=sys.stderr)
    return jax.device_put(state, self.state_shardings)

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
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # metrics.jsonl still has every number
      print("longax: tensorboardX is not installed: no TensorBoard logs (metrics.jsonl only)",
            file=sys.stderr)
      return open(path, "a"), None
    return open(path, "a"), SummaryWriter(str(self.workdir / "tb"))

  def _log(self, files, record: dict):
    if files[0] is None:
      return
    files[0].write(json.dumps(record) + "\n")
    files[0].flush()
    for k, v in record.items():
      if files[1] is not None and k != "step" and isinstance(v, (int, float)):
        files[1].add_scalar(k, v, record["step"])

  def evaluate(self, params) -> dict:
    sums = dict(loss=0.0, accuracy=0.0)
    for i in range(self.cfg.train.eval_batches):
      loss, metrics = self.eval_step(params, self._device_batch(self._batch("val", i)))
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
    own = self.workdir / "checkpoints"
    if tc.init_from is not None and (self.fresh or not (
        own.is_dir() and any(p.name.isdigit() for p in own.iterdir()))):  # a resume ignores it
      state = self._params_from(state, tc.init_from)  # checked before anything is written
    self._build_step()
    self._mngr = self._manager()
    try:
      state, start = self._restore(self._mngr, state)
    except CheckpointError:
      self._mngr.close()
      raise
    mngr = self._mngr
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
        state, out = self.train_step(state, self._device_batch(self._batch("train", step - 1)))
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
      for f in files:
        if f is not None:
          f.close()
    summary["end_step"] = int(state["step"])
    return summary
