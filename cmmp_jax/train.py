"""The training loop: `train_and_evaluate(config, workdir)`.

One jitted train step (`steps.make_train_step`), a pure function of (state, batch), over a mesh of
all devices (`sharding`: the batch sharded on 'data', the state replicated; BatchNorm sees the
global batch). Around it, in order: datasets (`data.sources`), the initial state (`state`, ImageNet
encoders as config.init says via `convert.init_encoders`), resume from the latest checkpoint
(`checkpoint`), then steps with a progress line every config.log_every_steps, an evaluation of
validation (and test) every config.eval_every_steps (`evaluate`) that drives the plateau schedule
and keeps the best checkpoint, and a final checkpoint. SIGTERM saves and exits; a non-finite
loss stops the run with the last good checkpoint intact.

What a crash cannot lose (README "Reliability"): the workdir is locked for one run
(`workdir.WorkdirLock`); a step is saved before it is evaluated (a failing evaluation keeps the
step, and a resume from it runs the evaluation again); resuming skips damaged checkpoints
(`checkpoint.Checkpoints.restore_newest_intact`) and refuses one whose trajectory settings differ
from the config (config.allow_changed_settings overrides); SIGTERM saves and raises
`PreemptedError` (main.py exits with status 143).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import signal
import threading

from absl import logging
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from cmmp_jax import checkpoint as ckpt_lib
from cmmp_jax import config_checks, convert, evaluate, models, reporting, sharding
from cmmp_jax import state as state_lib, steps
from cmmp_jax import workdir as workdir_lib
from cmmp_jax.data import sources


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; training stopped and the last good checkpoint is intact."""


# 128 + SIGTERM, what a shell reports for a process that SIGTERM ended: schedulers (SLURM,
# Kubernetes, Borg) read any non-zero status as "not finished" and run the job again.
PREEMPTED_EXIT_CODE = 143


class PreemptedError(Exception):
  """SIGTERM stopped training after saving `step` (the run is not finished: rerun to resume)."""

  def __init__(self, step: int, workdir):
    self.step = step
    super().__init__(f"SIGTERM: saved step {step} in {workdir}; exiting before the run's end "
                     "(the same command resumes from there)")


class Preemption:
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
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def initial_state(config, example, total_steps: int, mesh, *, pretrained: bool = True):
  """(model, state replicated on mesh, description of the initialisation) for a fresh run.

  `example` is one training example (its image / aux shapes size the model). With
  config.init.imagenet the encoders start from torchvision's ImageNet ResNet-34, as the
  release's do (convert.init_encoders: a local file, the cache, or a one-time download);
  `pretrained=False` skips that (a resumed run restores its own weights over these)."""
  size = sources.input_size(config)
  image_shape = (1, *((size, size) if size else np.asarray(example["image"]).shape[:2]), 3)
  aux_shape = image_shape[:3] + (np.asarray(example["aux"]).shape[-1],)
  variables, run_key = state_lib.init_variables(config, image_shape, aux_shape)
  init = "random"
  if pretrained:
    variables, init = convert.init_encoders(variables, config)
  model, state = state_lib.create_state(config, variables, total_steps, run_key)
  return model, sharding.put_replicated(state, mesh), init


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config.model on config.data, evaluating and checkpointing; resumes from the latest
  checkpoint in workdir. Returns the final summary (best validation and its test metrics), also
  written to WORKDIR/train_summary.json. Everything logged meanwhile also goes to
  WORKDIR/log.txt."""
  with workdir_lib.WorkdirLock(workdir, jax.process_index()) as lock:
    with reporting.log_to_workdir(workdir):
      if lock.previous_holder:
        reporting.console(workdir_lib.describe_previous(lock.previous_holder))
      return _train_and_evaluate(config, pathlib.Path(workdir).absolute())


def learning_rate_on_resume(config, state, plateau, meta, step: int):
  """The learning rate a restored run continues with (returns (state, plateau)), printed when it
  is not the obvious one:

  - 'plateau': the checkpoint's rate (what the schedule had reached: exact resume), unless
    config.optimizer.reset_learning_rate, or the checkpoint is step 0 (converted release weights:
    fine-tuning starts at config.optimizer.learning_rate). A config whose rate differs from the
    one the run started with is told so, since the command line alone does not change it.
  - 'constant': config.optimizer.learning_rate (nothing decays it; the state's copy is replaced).
  - 'cosine': the schedule rebuilt from the config at the restored step (nothing to do).
  """
  opt = config.optimizer
  configured = float(opt.learning_rate)
  if opt.schedule == "cosine":
    return state, plateau
  held = float(jax.device_get(state_lib.current_learning_rate(state)))
  current = plateau.lr if (opt.schedule == "plateau" and plateau.lr is not None) else held
  started = meta.get("config", {}).get("optimizer", {}).get("learning_rate")
  reset = opt.schedule == "constant" or step == 0 or opt.reset_learning_rate
  if not reset:
    if started is not None and float(started) != configured:
      reporting.console(
          f"config.optimizer.learning_rate {configured:.2e} differs from the {float(started):.2e} "
          f"this run started with: continuing at the checkpoint's {current:.2e} (set "
          f"config.optimizer.reset_learning_rate=True to restart the schedule at {configured:.2e})")
    return state, plateau
  if configured != current:
    why = ("config.optimizer.reset_learning_rate" if opt.reset_learning_rate and step
           else "fine-tuning from step 0" if step == 0 else "constant schedule")
    reporting.console(f"learning rate {configured:.2e} from config.optimizer.learning_rate "
                      f"({why}; the checkpoint held {current:.2e})")
  state = state_lib.set_learning_rate(state, configured)
  if opt.schedule == "plateau":  # a fresh schedule at the configured rate; the best score stays
    plateau = dataclasses.replace(plateau, lr=configured, bad_evals=0)
  return state, plateau


def _train_and_evaluate(config, workdir: pathlib.Path) -> dict:
  mesh = sharding.make_mesh()

  train_source = sources.dataset_source(config, config.data.train_split)
  val_source = sources.dataset_source(config, config.data.eval_split)
  test_source = (sources.dataset_source(config, config.data.test_split)
                 if config.eval_on_test else None)
  # Before anything compiles: the devices divide both batch sizes, the split holds one batch.
  config_checks.check_before_training(config, len(train_source))
  steps_per_epoch = len(train_source) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size {config.batch_size} exceeds the {len(train_source)} "
                     "training examples")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  eval_every = config.eval_every_steps or steps_per_epoch
  ckpt_every = config.checkpoint_every_steps or eval_every

  data_iter = iter(sources.train_loader(config, train_source))
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
  model, state, init = initial_state(config, train_source[0], total_steps, mesh,
                                     pretrained=ckpts.latest.latest_step() is None)
  plateau = state_lib.PlateauSchedule.from_config(config)
  history = []
  resumed = None
  evaluate_first = False  # the restored step was saved before its evaluation ran
  if ckpts.latest.latest_step() is not None:
    resumed = ckpts.restore_newest_intact(jax.device_get(state), config.model, data_iter,
                                          run_config=config)
    if resumed is None:
      reporting.console(f"no intact checkpoint left in {workdir / 'checkpoints'}: starting "
                        "from step 0")
      data_iter = iter(sources.train_loader(config, train_source))  # (a failed restore's)
      model, state, init = initial_state(config, train_source[0], total_steps, mesh)
  if resumed is not None:
    step0, restored, meta = resumed
    changed = ckpt_lib.changed_settings(meta.get("config"), config) if step0 else []
    if changed:  # (refused in the restore unless config.allow_changed_settings)
      reporting.console("continuing with changed settings (config.allow_changed_settings): "
                        + "; ".join(changed) + "; the data order restarts")
    evaluate_first = meta.get("evaluated") is False
    state = sharding.put_replicated(restored, mesh)
    plateau = state_lib.PlateauSchedule(**meta.get("plateau", dataclasses.asdict(plateau)))
    history = meta.get("history", [])
    init = f"from checkpoint step {step0}"
    reporting.console(f"Resumed from step {step0} in {workdir}")
    state, plateau = learning_rate_on_resume(config, state, plateau, meta, step0)
  start_step = int(jax.device_get(state.step))
  writer = reporting.metric_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in reporting.flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  params_path = reporting.write_parameter_table(workdir, state.params)
  logging.info("config:\n%s", config)
  reporting.console(
      f"{config.model.name} ({config.model.backbone}, width {config.model.width}, "
      f"{config.model.dtype}, transposed convolutions "
      f"{models.resolve_upsample_method(config.model.upsample_method)}"
      f"{' (auto)' if config.model.upsample_method == 'auto' else ''}): "
      f"{state_lib.count_params(state):,} parameters, init {init}\n"
      f"data {config.data.name}/{config.data.config}: {len(train_source)} train examples, "
      f"{steps_per_epoch} steps/epoch of {config.batch_size}, {total_steps} steps; "
      f"{jax.device_count()} {jax.devices()[0].platform} device(s)\n"
      f"log {reporting.log_path(workdir)}, parameter table {params_path}")

  train_step = steps.make_train_step(model, config, mesh)
  eval_step = steps.make_eval_step(model, mesh)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)]
  if config.profile_start_step >= 0 and sharding.is_primary():
    hooks.append(periodic_actions.Profile(logdir=str(workdir),
                                          first_profile=config.profile_start_step,
                                          num_profile_steps=config.profile_num_steps))
  progress = reporting.Progress(total_steps, config.batch_size, start_step)

  def meta_dict(evaluated: bool = True):
    return {"model": ckpt_lib.model_signature(config.model), "plateau": dataclasses.asdict(plateau),
            "history": history, "config": json.loads(config.to_json_best_effort()),
            "evaluated": evaluated}

  def log_pending(pending):
    """Fetches the metrics of the steps since the last log (one host sync per interval)."""
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not m["finite"]:
        last = ckpts.latest.latest_step()
        kept = (f"The last good checkpoint in {workdir / 'checkpoints'} is intact (step {last})"
                if last is not None else "No checkpoint had been written yet")
        raise NonFiniteLossError(
            f"loss became {float(m['loss'])} (gradient norm {float(m['grad_norm'])}) at step {s}; "
            f"training stopped. {kept}; lower optimizer.learning_rate or set "
            "optimizer.grad_clip_norm")
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm")}
    scalars["learning_rate"] = float(fetched[-1]["learning_rate"])
    writer.write_scalars(pending[-1][0], scalars)
    return scalars

  def run_evaluation(step, state):
    """Scores validation (and test), steps the plateau schedule. Returns (state, improved,
    stop)."""
    val, examples = evaluate.evaluate_split(eval_step, state, val_source, config, mesh,
                                            keep_examples=config.image_summaries)
    record = {"step": step, "val": val}
    if test_source is not None:
      record["test"], _ = evaluate.evaluate_split(eval_step, state, test_source, config, mesh)
    history.append(record)
    writer.write_scalars(step, {f"{split}/{k}": v for split in ("val", "test")
                                if split in record for k, v in record[split].items()})
    if examples:
      writer.write_images(step, {"val/panels": evaluate.summary_panels(examples,
                                                                       config.data.scaling)})
    # No road pixel in the validation labels (recall undefined): G_IoU is NaN or 0 whatever the
    # model does, so it can neither select a best checkpoint nor drive the plateau schedule.
    selectable = selects_a_model(val)
    if not selectable and not undefined_warned:
      undefined_warned.append(step)
      reporting.console(
          f"WARNING: validation G_IoU is undefined at step {step}: split "
          f"{config.data.eval_split!r} of {config.data.name}/{config.data.config} has no road "
          "pixel. No best checkpoint is kept from such evaluations, the plateau schedule does "
          "not count them, and eval/predict fall back to the latest checkpoint")
    improved = selectable and val["g_iou"] > plateau.best
    stop = False
    if config.optimizer.schedule == "plateau" and selectable:
      lr = (plateau.lr if plateau.lr is not None
            else float(jax.device_get(state_lib.current_learning_rate(state))))
      new_lr, stop = plateau.update(val["g_iou"], lr)
      if new_lr != lr:
        state = state_lib.set_learning_rate(state, new_lr)
        reporting.console(f"val G_IoU has not improved for {plateau.patience + 1} evaluations: "
                          f"lr {lr:.2e} -> {new_lr:.2e}")
    elif improved:
      plateau.best = val["g_iou"]
    reporting.console(
        f"eval at step {step}: val G_IoU {val['g_iou']:.4f} A_IoU {val['a_iou']:.4f}"
        + (f" | test G_IoU {record['test']['g_iou']:.4f} A_IoU {record['test']['a_iou']:.4f}"
           if "test" in record else "")
        + (" (best)" if improved else ""))
    return state, improved, stop

  def evaluation_point(step, state, saved: bool):
    """Evaluates `step` (already in checkpoints/ when `saved`), keeps it as the best when it
    improved. Returns (state, stop)."""
    state, improved, stop = run_evaluation(step, state)
    if improved:
      ckpts.save(step, state, meta_dict(), consumed, best=True, latest=not saved)
    return state, stop

  undefined_warned = []
  stop = False
  preempted = False
  pending = []
  batches = sharding.prefetch_to_mesh(data_iter, mesh)
  consumed = sharding.IteratorSnapshot(data_iter.get_state())  # the data position of `state`
  step = start_step
  try:
    if jax.process_count() > 1:
      # Compile before the first collective and meet there: gloo (CPU) gives up on a peer that
      # is more than 30 s late, and processes compile at different speeds.
      first = next(batches)
      train_step = train_step.lower(state, first[0]).compile()
      sharding.sync_processes("train-step-compiled")
      batches = itertools.chain([first], batches)
    if evaluate_first:  # interrupted (or failed) between its save and its evaluation
      state, stop = evaluation_point(step, state, saved=True)
    with Preemption() as preemption:
      while step < total_steps and not stop:
        if preemption.should_stop(step):
          reporting.console(f"SIGTERM: saving step {step} and exiting", every_process=True)
          if ckpts.latest.latest_step() != step:  # unless this step was just saved
            ckpts.save(step, state, meta_dict(), consumed)
          preempted = True
          break
        batch, consumed = next(batches)
        state, step_metrics = train_step(state, batch)
        step += 1
        pending.append((step, step_metrics))
        if step == start_step + 1:  # one host sync, so that compilation is not counted as speed
          jax.block_until_ready(step_metrics["loss"])
          reporting.console(f"step {step} compiled and ran in {progress.elapsed():.1f} s")
          progress.restart_clock(step)
        for hook in hooks:
          hook(step)
        if step % config.log_every_steps == 0 or step == total_steps:
          scalars = log_pending(pending)
          pending = []
          reporting.console(progress.line(step, scalars["loss"], scalars["learning_rate"]))
        if step % eval_every == 0 or step == total_steps:
          if pending:
            log_pending(pending)
            pending = []
          # Save first: an evaluation that fails (a damaged validation file) or is killed does
          # not lose the interval; a resume from this step evaluates it again.
          saved = step % ckpt_every == 0 or step == total_steps
          if saved:
            ckpts.save(step, state, meta_dict(evaluated=False), consumed)
          state, stop = evaluation_point(step, state, saved)
          if stop:
            reporting.console(
                f"val G_IoU has not improved for {plateau.patience + 1} evaluations and the "
                f"learning rate {plateau.lr:.2e} is below {config.optimizer.min_learning_rate}: "
                "stopping (the release's rule)")
          progress.restart_clock(step)
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
  if preempted:
    raise PreemptedError(step, workdir)
  if not history:
    return {}
  summary_path = workdir / "train_summary.json"
  summary = summarize(history, step)
  if sharding.is_primary():
    reporting.write_json(summary_path, summary)
  if summary["best_step"] is None:
    reporting.console(
        "validation G_IoU was undefined at every evaluation (no road pixel in the validation "
        f"split): no best checkpoint was written; eval and predict use the latest (step {step}) "
        f"-> {summary_path}; checkpoints in {workdir / 'checkpoints'}")
    return summary
  test = summary.get("test")
  reporting.console(
      f"best validation G_IoU {summary['val']['g_iou']:.4f} at step {summary['best_step']}"
      + (f" (test G_IoU {test['g_iou']:.4f} A_IoU {test['a_iou']:.4f})" if test else "")
      + f" -> {summary_path}; checkpoints in {workdir / 'checkpoints'} and {workdir / 'best'}")
  return summary


def selects_a_model(val: dict) -> bool:
  """Whether a validation result can rank checkpoints: G_IoU and recall defined (recall is
  undefined exactly when the labels have no road pixel; G_IoU is then NaN or 0 whatever the model
  predicts). Values read back from JSON may be None for NaN."""
  return all(val.get(k) is not None and math.isfinite(val[k]) for k in ("g_iou", "recall"))


def summarize(history: list[dict], last_step: int) -> dict:
  """The run's summary from its evaluation history: the best validation G_IoU (the first of
  equals, as the loop keeps it) among the evaluations that could select one, and its test
  metrics. When none could (no road pixel in validation), best_step is None and the metrics are
  the last evaluation's, that of the latest checkpoint (`last_step`), which eval and predict
  then use."""
  selectable = [r for r in history if selects_a_model(r["val"])]
  if not selectable:
    last = history[-1]
    return {"best_step": None, "latest_step": last_step, "selection": "latest",
            "val": last["val"], "test": last.get("test")}
  best = max(selectable, key=lambda r: r["val"]["g_iou"])
  return {"best_step": best["step"], "val": best["val"], "test": best.get("test")}
