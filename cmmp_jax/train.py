"""Training, evaluation and the glue between data, model, checkpoints and reporting.

`train_and_evaluate(config, workdir)` trains with one jitted step, a pure function of
(state, batch), over a `jax.sharding.Mesh` of all devices (data parallel: the batch is sharded on
the 'data' axis, parameters replicated; BatchNorm statistics are those of the global batch since
the step sees one global array). Multi-host: each process loads its own shard of every batch
and `jax.make_array_from_process_local_data` assembles the global array.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import math
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cmmp_jax import checkpoint as ckpt_lib
from cmmp_jax import losses, metrics as metrics_lib
from cmmp_jax.data import pipeline
from cmmp_jax.data.augment import AugmentConfig
from cmmp_jax.models import build_model


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; training stopped and the last good checkpoint is intact."""


class DatasetMissingError(FileNotFoundError):
  """The configured dataset has not been built into data.data_dir."""


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and step (flax's TrainState) plus BatchNorm statistics and the
  PRNG key of the run."""
  batch_stats: Any = None
  rng: jax.Array | None = None


# ----------------------------------------------------------------------------- model and state

def model_config_dict(config) -> dict:
  return dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)


def abstract_variables(config, size: int = 64):
  """Shapes of {'params', 'batch_stats'} of config.model (no compute)."""
  model = build_model(model_config_dict(config))
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  aux = jax.ShapeDtypeStruct((1, size, size, config.model.aux_channels), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        image, aux)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """Adam with the learning rate as an injected hyper-parameter, so that the plateau schedule
  (a host decision after each evaluation) changes it without recompiling the step."""
  opt = config.optimizer
  if opt.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 0),
                                            max(total_steps, opt.warmup_steps + 1))
  else:  # plateau (host-driven) or constant
    lr = opt.learning_rate

  def chain(learning_rate):
    parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
    return optax.chain(*parts, optax.adam(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps))

  return optax.inject_hyperparams(chain)(learning_rate=lr)


def current_learning_rate(state: TrainState) -> jax.Array:
  return state.opt_state.hyperparams["learning_rate"]


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
  hyper = dict(state.opt_state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(lr, dtype=jnp.asarray(hyper["learning_rate"]).dtype)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def create_state_from_variables(config, variables, total_steps: int = 1, rng=None):
  model = build_model(model_config_dict(config))
  tx = make_optimizer(config, total_steps)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats", {}),
                            rng=rng if rng is not None else jax.random.PRNGKey(config.seed))
  return model, state


def init_state(config, image_shape, aux_shape, total_steps: int, mesh=None):
  """A fresh TrainState (random init, optional ResNet-34 ImageNet encoders), replicated on mesh."""
  model = build_model(model_config_dict(config))
  key = jax.random.PRNGKey(config.seed)
  init_key, run_key = jax.random.split(key)
  image = jnp.zeros((1, *image_shape[1:]), jnp.float32)
  aux = jnp.zeros((1, *aux_shape[1:]), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(init_key, image, aux)
  variables = flax.core.unfreeze(variables)
  if config.init.resnet34_checkpoint:
    from cmmp_jax import convert  # pylint: disable=import-outside-toplevel
    weights = convert.load_state_dict_file(config.init.resnet34_checkpoint)
    branches = [b for b in ("image", "aux", "net") if b in variables["params"]]
    for branch in branches:
      variables = convert.load_torchvision_resnet34(variables, weights, branch)
    logging.info("loaded ImageNet ResNet-34 weights from %s into %s",
                 config.init.resnet34_checkpoint, branches)
  _, state = create_state_from_variables(config, variables, total_steps, run_key)
  if mesh is not None:
    state = put_replicated(jax.device_get(state), mesh)
  return model, state


# ----------------------------------------------------------------------------- sharding

def make_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def put_replicated(tree, mesh):
  """Host arrays (the same on every process) -> global arrays replicated over `mesh`.

  Each process fills its own devices from its own copy. `jax.device_put` would do the same but,
  with several processes, first checks with one cross-process collective per leaf that the
  copies agree; those collectives then run wherever each process happens to be, and on CPU
  (gloo) one that waits more than 30 s for a slower process fails."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def batch_sharding(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the mesh's 'data' axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items() if k in ("image", "aux", "mask", "valid")}


class IteratorSnapshot:
  """A grain iterator's state at one point, for `pipeline.iterator_save_args` (grain's orbax
  handler only calls get_state()). Device prefetch reads batches ahead, so the live iterator is
  ahead of training; checkpoints save the state right after the last batch the step consumed."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


def prefetch_to_mesh(data_iter, mesh, size: int = 2):
  """Yields (global batch, iterator snapshot after that batch), putting the next `size` batches
  on the devices ahead of use (host-to-device copies overlap the running step, since dispatch
  is asynchronous)."""
  queue = collections.deque()
  for batch in data_iter:
    queue.append((to_global_batch(batch, mesh), IteratorSnapshot(data_iter.get_state())))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# ----------------------------------------------------------------------------- steps

def make_loss_fn(model, config):
  """(params, batch_stats, batch) -> (loss, {'batch_stats': updated}): the training forward
  (BatchNorm in train mode) and config.loss, differentiated by the train step."""
  dice = bool(config.loss.dice)

  def loss_fn(params, batch_stats, batch):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                  batch["image"], batch["aux"], train=True,
                                  mutable=["batch_stats"])
    return losses.bce_dice_loss(logits, batch["mask"], dice=dice), updates

  return loss_fn


def make_train_step(model, config, mesh):
  """The jitted train step: (state, batch) -> (state, metrics). The state is donated. A
  non-finite loss or gradient leaves the state unchanged (metrics report it) so that the run can
  stop with its last good state intact."""
  loss_fn = make_loss_fn(model, config)

  def step(state: TrainState, batch):
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # lax.cond rather than jnp.where(finite, new, old) over the whole state: with the state
    # donated, the update then writes in place and the skip branch forwards the old buffers,
    # while a select keeps the old and the new state alive together (benchmarks/NOTES.md, C4).
    new_state = jax.lax.cond(
        finite,
        lambda s, g, bs: s.apply_gradients(grads=g, batch_stats=bs),
        lambda s, g, bs: s,
        state, grads, updates["batch_stats"])
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                       "learning_rate": current_learning_rate(state)}

  rep, data = replicated(mesh), batch_sharding(mesh)
  batch_shardings = {"image": data, "aux": data, "mask": data}
  return jax.jit(step, in_shardings=(rep, batch_shardings), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def make_eval_step(model, mesh, tta: bool = False):
  """(state, batch) -> (per-tile counts, probabilities); counts exclude padded rows."""
  from cmmp_jax import inference  # pylint: disable=import-outside-toplevel

  def step(state: TrainState, batch):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    forward = lambda image, aux: jax.nn.sigmoid(model.apply(variables, image, aux, train=False))
    if tta:
      forward = inference.tta_dihedral(forward)
    probs = forward(batch["image"], batch["aux"])
    counts = metrics_lib.tile_counts_from_probs(probs, batch["mask"], batch["valid"])
    return counts, probs

  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, {k: data for k in ("image", "aux", "mask", "valid")}),
                 out_shardings=(data, data))


# ----------------------------------------------------------------------------- data

def dataset_source(config, split: str):
  """The TFDS random-access source of config.data for `split` (building it when allowed)."""
  from data_builders import build as build_lib  # pylint: disable=import-outside-toplevel
  data = config.data
  data_dir = pathlib.Path(data.data_dir).expanduser().absolute()
  builder_config = data.config or None
  if not build_lib.is_built(data.name, data_dir, builder_config):
    if data.build_if_missing or data.manual_dir:
      logging.info("building dataset %s/%s into %s", data.name, builder_config, data_dir)
      print(f"Building dataset {data.name}/{builder_config} into {data_dir} ...", flush=True)
      if jax.process_index() == 0:
        build_lib.build(data.name, data_dir, builder_config, manual_dir=data.manual_dir or None)
      _sync_processes("dataset-built")
    else:
      cmd = (f"python -m data_builders.build {data.name}"
             + (f" --config {builder_config}" if builder_config else "")
             + f" --manual_dir=DOWNLOADS --data_dir={data.data_dir}")
      raise DatasetMissingError(
          f"dataset {data.name!r} (builder config {builder_config!r}) is not built in "
          f"{data_dir}; build it with `{cmd}` or set config.data.data_dir")
  builder = build_lib.make_builder(data.name, data_dir, builder_config)
  if split not in builder.info.splits:
    raise ValueError(f"config.data split {split!r} is not one of {list(builder.info.splits)} "
                     f"of dataset {data.name}")
  return builder.as_data_source(split=split)


_BARRIERS = collections.Counter()


def _sync_processes(name: str, timeout_s: int = 3600):
  """Waits until every process reaches this point. A barrier of the coordination service, not a
  device collective: processes may arrive minutes apart (one builds the dataset, or compiles
  slower), which a collective's own connection timeout (30 s with gloo on CPU) does not allow."""
  if jax.process_count() > 1:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    ckpt_lib.use_coordination_service_barriers()
    _BARRIERS[name] += 1  # barrier names must be unique
    ocp.multihost.sync_global_processes(f"cmmp_{name}_{_BARRIERS[name]}", timeout=timeout_s)


def _input_size(config):
  return config.data.input_size or None


def train_loader(config, source):
  return pipeline.make_train_loader(
      source, global_batch_size=config.batch_size, seed=config.seed,
      input_size=_input_size(config), augment=AugmentConfig() if config.data.augment else None,
      scaling=config.data.scaling, num_workers=config.data.num_workers,
      shard_index=jax.process_index(), shard_count=jax.process_count())


# ----------------------------------------------------------------------------- evaluation

def evaluate_split(eval_step, state, source, config, mesh, *, keep_examples: int = 0):
  """Runs `eval_step` over every example of `source` once. Returns (metrics dict, examples),
  examples being up to keep_examples (image, aux, prob, label) tuples for summaries."""
  accumulator = metrics_lib.SegmentationMetrics()
  examples = []
  batches = pipeline.eval_batches(
      source, global_batch_size=config.eval_batch_size, input_size=_input_size(config),
      scaling=config.data.scaling, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  pending, kept = [], []
  for local in batches:
    counts, probs = eval_step(state, to_global_batch(local, mesh))
    pending.append(counts)
    if sum(int(np.sum(k["valid"])) for k, _ in kept) < keep_examples:
      kept.append((local, probs))
  _sync_processes("evaluated")  # the gathers below are collectives: start them together
  for local, probs in kept:
    # Process 0 writes the summaries; its rows come first in the gathered batch.
    probs = np.asarray(_gather(probs))
    for i in range(local["image"].shape[0]):
      if len(examples) < keep_examples and local["valid"][i]:
        examples.append((local["image"][i], local["aux"][i], probs[i], local["mask"][i]))
  for counts in pending:  # one host transfer per batch, after all steps are dispatched
    counts = {k: np.asarray(_gather(v)) for k, v in counts.items()}
    accumulator.update(counts)
  return accumulator.compute(config.eval_batch_size), examples


def _gather(array):
  if jax.process_count() == 1:
    return array
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(array, tiled=True)


def summary_panels(examples, scaling: str) -> np.ndarray:
  """(N, H, 4W, 3) uint8 panels: image | aux | prediction | label, for image summaries."""
  import cv2  # pylint: disable=import-outside-toplevel
  panels = []
  for image, aux, prob, label in examples:
    h, w = label.shape[:2]
    unscale = (lambda x: (x + 1.6) / 3.2) if scaling == "reference" else (lambda x: x)
    gray = lambda x: np.repeat(np.clip(x, 0, 1)[..., :1], 3, axis=-1)
    resize = lambda x: cv2.resize(np.asarray(x, np.float32), (w, h),
                                  interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
    row = [np.clip(resize(unscale(image)), 0, 1), gray(resize(unscale(aux))),
           gray(resize(prob)), gray(label)]
    panels.append((np.concatenate(row, axis=1) * 255).round().astype(np.uint8))
  return np.stack(panels)


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class PlateauSchedule:
  """The release's schedule: lr /= factor when val G_IoU has not improved for more than
  `patience` evaluations; stop when lr < min_lr."""
  patience: int
  factor: float
  min_lr: float
  best: float = -1.0
  bad_evals: int = 0

  def update(self, value: float, lr: float) -> tuple[float, bool]:
    """Returns (new lr, stop)."""
    if value > self.best:
      self.best, self.bad_evals = value, 0
      return lr, False
    self.bad_evals += 1
    if self.bad_evals > self.patience:
      lr, self.bad_evals = lr / self.factor, 0
      logging.info("val G_IoU has not improved for %d evaluations: lr -> %g", self.patience + 1,
                   lr)
    return lr, lr < self.min_lr


class _Preemption:
  """SIGTERM sets a flag; the loop checks it between steps (a host bool, no device sync).

  With several processes the notice reaches them at different steps, and every process must
  save the same step: jax's preemption sync point (the coordination service agrees on the step
  after the latest one any process has reached) decides, and its own SIGTERM handler must stay
  installed, so this class installs none then."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._synced = False

  def __enter__(self):
    self._synced = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
    if not self._synced and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if self._synced:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def _writer(workdir):
  try:  # clu's writers import TensorFlow: keep it off the accelerators JAX uses
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], "GPU")
  except (ImportError, RuntimeError):
    pass
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                              asynchronous=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config.model on config.data, evaluating and checkpointing; resumes from the latest
  checkpoint in workdir. Returns the final summary (best validation and its test metrics)."""
  from clu import parameter_overview, periodic_actions  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh()
  train_source = dataset_source(config, config.data.train_split)
  val_source = dataset_source(config, config.data.eval_split)
  test_source = dataset_source(config, config.data.test_split) if config.eval_on_test else None
  steps_per_epoch = len(train_source) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size {config.batch_size} exceeds the {len(train_source)} "
                     "training examples")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  eval_every = config.eval_every_steps or steps_per_epoch
  ckpt_every = config.checkpoint_every_steps or eval_every

  loader = train_loader(config, train_source)
  data_iter = iter(loader)
  first = train_source[0]
  image_shape = (1, *(2 * [_input_size(config)] if _input_size(config) else
                      np.asarray(first["image"]).shape[:2]), 3)
  aux_shape = image_shape[:3] + (np.asarray(first["aux"]).shape[-1],)
  model, state = init_state(config, image_shape, aux_shape, total_steps, mesh)
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
  plateau = PlateauSchedule(config.optimizer.plateau_patience, config.optimizer.plateau_factor,
                            config.optimizer.min_learning_rate)
  history = []
  if ckpts.latest.latest_step() is not None:
    step0, restored, meta = ckpts.restore("latest", jax.device_get(state), config.model, data_iter)
    state = put_replicated(restored, mesh)
    plateau = PlateauSchedule(**meta.get("plateau", dataclasses.asdict(plateau)))
    history = meta.get("history", [])
    print(f"Resumed from step {step0} in {workdir}", flush=True)
  else:
    parameter_overview.log_parameter_overview(state.params)
  start_step = int(jax.device_get(state.step))
  writer = _writer(str(workdir))
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  print(f"{config.model.name} ({config.model.backbone}, width {config.model.width}): "
        f"{n_params:,} parameters; {len(train_source)} train examples, {steps_per_epoch} "
        f"steps/epoch, {total_steps} steps; {jax.device_count()} device(s) "
        f"({jax.devices()[0].platform})", flush=True)

  train_step = make_train_step(model, config, mesh)
  eval_step = make_eval_step(model, mesh)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)]
  if config.profile_start_step >= 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=str(workdir),
                                          first_profile=config.profile_start_step,
                                          num_profile_steps=config.profile_num_steps))

  def meta_dict():
    return {"model": ckpt_lib.model_signature(config.model), "plateau": dataclasses.asdict(plateau),
            "history": history, "config": json.loads(config.to_json_best_effort())}

  def log_pending(pending):
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not m["finite"]:
        raise NonFiniteLossError(
            f"loss became {float(m['loss'])} (gradient norm {float(m['grad_norm'])}) at step {s}; "
            f"training stopped. The last good checkpoint in {workdir / 'checkpoints'} is intact "
            f"(step {ckpts.latest.latest_step()}); lower optimizer.learning_rate or set "
            "optimizer.grad_clip_norm")
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm")}
    scalars["learning_rate"] = float(fetched[-1]["learning_rate"])
    writer.write_scalars(pending[-1][0], scalars)
    return scalars

  summary = {}
  stop = False
  pending = []
  batches = prefetch_to_mesh(data_iter, mesh)
  consumed = IteratorSnapshot(data_iter.get_state())  # the data position of `state`
  step = start_step
  try:
    if jax.process_count() > 1:
      # Compile before the first collective and meet there: gloo (CPU) gives up on a peer that
      # is more than 30 s late, and processes compile at different speeds.
      first = next(batches)
      train_step = train_step.lower(state, first[0]).compile()
      _sync_processes("train-step-compiled")
      batches = itertools.chain([first], batches)
    with _Preemption() as preemption:
      while step < total_steps and not stop:
        if preemption.should_stop(step):
          print(f"SIGTERM: saving step {step} and exiting", flush=True)
          if ckpts.latest.latest_step() != step:  # unless this step was just saved
            ckpts.save(step, state, meta_dict(), consumed)
          break
        batch, consumed = next(batches)
        state, step_metrics = train_step(state, batch)
        step += 1
        pending.append((step, step_metrics))
        for hook in hooks:
          hook(step)
        if step % config.log_every_steps == 0 or step == total_steps:
          scalars = log_pending(pending)
          pending = []
          print(f"step {step}/{total_steps}  loss {scalars['loss']:.4f}  "
                f"lr {scalars['learning_rate']:.2e}", flush=True)
        if step % eval_every == 0 or step == total_steps:
          if pending:
            log_pending(pending)
            pending = []
          val, examples = evaluate_split(eval_step, state, val_source, config, mesh,
                                         keep_examples=config.image_summaries)
          record = {"step": step, "val": val}
          if test_source is not None:
            record["test"], _ = evaluate_split(eval_step, state, test_source, config, mesh)
          history.append(record)
          writer.write_scalars(step, {f"{split}/{k}": v for split in ("val", "test")
                                      if split in record for k, v in record[split].items()})
          if examples:
            writer.write_images(step, {"val/panels": summary_panels(examples, config.data.scaling)})
          improved = val["g_iou"] > plateau.best
          if config.optimizer.schedule == "plateau":
            lr = float(jax.device_get(current_learning_rate(state)))
            new_lr, stop = plateau.update(val["g_iou"], lr)
            if new_lr != lr:
              state = set_learning_rate(state, new_lr)
          elif improved:
            plateau.best = val["g_iou"]
          print(f"eval at step {step}: val G_IoU {val['g_iou']:.4f} A_IoU {val['a_iou']:.4f}"
                + (f" | test G_IoU {record['test']['g_iou']:.4f} A_IoU "
                   f"{record['test']['a_iou']:.4f}" if "test" in record else "")
                + (" (best)" if improved else ""), flush=True)
          if improved:
            ckpts.save(step, state, meta_dict(), consumed, best=True)
          elif step % ckpt_every == 0:
            ckpts.save(step, state, meta_dict(), consumed)
          if stop:
            print(f"learning rate fell below {config.optimizer.min_learning_rate}: stopping",
                  flush=True)
        elif step % ckpt_every == 0:
          ckpts.save(step, state, meta_dict(), consumed)
      if step == total_steps or stop:
        if ckpts.latest.latest_step() != step:
          ckpts.save(step, state, meta_dict(), consumed)
  finally:
    # Pending asynchronous saves complete even when training stops on an error.
    ckpts.wait()
    ckpts.close()
    writer.flush()
  if history:
    best = max(history, key=lambda r: r["val"]["g_iou"])
    summary = {"best_step": best["step"], "val": best["val"], "test": best.get("test")}
    if jax.process_index() == 0:
      (workdir / "train_summary.json").write_text(to_json(summary))
  return summary


def to_json(obj) -> str:
  """Standard JSON (undefined metrics, NaN in Python, become null; json.dumps would write NaN,
  which strict parsers such as jq reject)."""
  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x
  return json.dumps(clean(obj), indent=2, allow_nan=False)


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def restore_for_inference(config, workdir, which=None, mesh=None):
  """(model, state, step, mesh) from workdir's `which` checkpoint (default
  config.eval.checkpoint), the state replicated over `mesh` (default: all devices)."""
  which = which if which is not None else config.eval.checkpoint
  mesh = mesh if mesh is not None else make_mesh()
  abstract = abstract_variables(config)
  model, state = create_state_from_variables(config, jax.tree.map(
      lambda s: np.zeros(s.shape, s.dtype), abstract))
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints, asynchronous=False)
  try:
    step, restored, _ = ckpts.restore(which, jax.device_get(state), config.model)
  finally:
    ckpts.close()
  return model, put_replicated(restored, mesh), step, mesh


def evaluate(config, workdir, split: str | None = None) -> dict:
  """Scores a checkpoint (config.eval.checkpoint) on a split; writes eval_<split>_<step>.json."""
  split = split or config.eval.split
  model, state, step, mesh = restore_for_inference(config, workdir)
  source = dataset_source(config, split)
  result, _ = evaluate_split(make_eval_step(model, mesh, tta=config.eval.tta), state, source,
                             config, mesh)
  result.update(step=step, split=split, checkpoint=str(config.eval.checkpoint),
                tta=bool(config.eval.tta))
  path = pathlib.Path(workdir) / f"eval_{split}_{step}.json"
  if jax.process_index() == 0:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(to_json(result))
    tmp.replace(path)
  print(f"{split} @ step {step}: G_IoU {result['g_iou']:.4f}  A_IoU {result['a_iou']:.4f}  "
        f"tile-mean IoU {result['mean_tile_iou']:.4f}  P {result['precision']:.4f}  "
        f"R {result['recall']:.4f}  F1 {result['f1']:.4f}  ({result['num_tiles']} tiles) -> {path}",
        flush=True)
  return result
