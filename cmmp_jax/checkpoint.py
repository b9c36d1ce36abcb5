"""Orbax checkpoints of a training run.

Layout under the workdir:
  checkpoints/<step>/{state, data_iter, meta}   the latest K, saved asynchronously and atomically
                                                (orbax writes to a temporary folder and renames)
  best/<step>/{state, meta}                     the best by validation G_IoU, kept apart
  checkpoints_damaged/<step>-<part>/            steps of checkpoints/ that could not be read on
                                                resume, moved aside for inspection (never deleted)
`state` is the TrainState pytree (params, batch_stats, opt_state, step, rng); `data_iter` the grain
iterator state (one JSON per process); `meta` a JSON dict: the model config (to refuse a
checkpoint of another architecture before touching arrays), the run's config (to refuse resuming
with other trajectory settings), the schedule's plateau state, the evaluation history and whether
the step's evaluation has run (`evaluated`: a step is saved before it is evaluated).

Two kinds of unreadable checkpoint are kept apart: one of another model or optimizer (the
config's fault, `CheckpointMismatchError`: its files read fine without a target) and a damaged one
(the disk's fault, `CheckpointDamagedError`: its files cannot be read at all). Resuming skips the
second kind, never the first.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from cmmp_jax import reporting, sharding
from cmmp_jax.data import pipeline

STATE, DATA_ITER, META = "state", "data_iter", "meta"
DAMAGED_DIR = "checkpoints_damaged"

# Settings that change what a resumed run computes from its checkpoint on: resuming with other
# values would continue one run's trajectory with another's (config.allow_changed_settings
# overrides). optimizer.learning_rate has its own rule (train.learning_rate_on_resume: the
# plateau and constant schedules say which rate they continue at), except under 'cosine', where
# the schedule is rebuilt from it.
TRAJECTORY_FIELDS = (
    "seed", "data.name", "data.config", "data.train_split", "data.input_size", "data.augment",
    "data.scaling", "batch_size", "batch_norm_group_size", "loss.dice", "optimizer.schedule",
    "optimizer.b1", "optimizer.b2", "optimizer.eps", "optimizer.grad_clip_norm",
    "optimizer.warmup_steps", "optimizer.plateau_patience", "optimizer.plateau_factor",
    "optimizer.min_learning_rate")


class CheckpointMismatchError(ValueError):
  """A checkpoint was written by another model configuration than the one asked for (the
  config's fault: its files are intact)."""


class CheckpointNotFoundError(FileNotFoundError):
  """No checkpoint where one was expected."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint's files cannot be read (the disk's fault, not the config's). `part` is the item
  that failed: meta, state or data_iter."""

  def __init__(self, where: str, part: str, error: BaseException):
    self.where, self.part = where, part
    super().__init__(f"{where} is damaged: its {part} cannot be read ({one_line(error)})")


class CheckpointSettingsError(ValueError):
  """Resuming would continue a checkpoint whose trajectory settings differ from the config."""


def one_line(error: BaseException, limit: int = 200) -> str:
  """The first line of an error's root cause, shortened: orbax wraps tensorstore's error (which
  says what failed: OUT_OF_RANGE, a ZSTD error, a missing file) in one that only points at it,
  and tensorstore's messages run to kilobytes of spec."""
  seen = {id(error)}
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
    if id(error) in seen:
      break
    seen.add(id(error))
  lines = str(error).split(" [tensorstore_spec=")[0].strip().splitlines()
  text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def fingerprint(state) -> list[int]:
  """The sum mod 2**32 of each leaf's bytes read as unsigned words of its item size, in
  tree_leaves order: saved in `meta` with the arrays and checked after a restore. Orbax keeps no
  checksum of the array contents; tensorstore's zstd frames catch most damage, but random bytes
  written over an incompressible (raw) block, such as a float32 weight matrix's, decode without
  error into other weights. Any change of one word changes the sum; random damage to several
  goes unnoticed with probability 2**-32. Exact integer arithmetic, one host pass over the state
  (about 0.1 s per GB: the full-size CMMPNet's state with Adam's moments is ~0.6 GB)."""
  words = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}
  sums = []
  for leaf in jax.tree_util.tree_leaves(jax.device_get(state)):
    array = np.ascontiguousarray(np.asarray(leaf)).reshape(-1)
    sums.append(int(np.sum(array.view(words[array.dtype.itemsize]), dtype=np.uint32)))
  return sums


def model_signature(model_config: Mapping[str, Any]) -> dict:
  """The model fields that determine the parameter tree (compute dtype and remat do not)."""
  cfg = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in dict(model_config).items()}
  for k in ("dtype", "remat", "upsample_method"):
    cfg.pop(k, None)
  return cfg


def check_same_model(meta: Mapping[str, Any], model_config: Mapping[str, Any], where: str):
  saved = meta.get("model")
  wanted = model_signature(model_config)
  if saved is None:
    raise CheckpointMismatchError(f"{where} has no model description in its metadata")
  diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}"
           for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  if diffs:
    raise CheckpointMismatchError(
        f"{where} was written by another model than config.model describes:\n  "
        + "\n  ".join(diffs) + "\nUse the config it was trained with, or another --workdir.")


def changed_settings(saved_config: Mapping[str, Any] | None, config) -> list[str]:
  """'field: checkpoint X vs config Y' for each TRAJECTORY_FIELDS entry that differs between a
  checkpoint's meta['config'] and `config` (fields the checkpoint does not record are skipped)."""
  if not saved_config:
    return []
  saved = reporting.flatten(dict(saved_config))
  current = reporting.flatten(json.loads(config.to_json_best_effort()))
  fields = TRAJECTORY_FIELDS + (("optimizer.learning_rate",)
                                if current.get("optimizer.schedule") == "cosine" else ())
  return [f"{field}: checkpoint {saved[field]!r} vs config {current.get(field)!r}"
          for field in fields if field in saved and saved[field] != current.get(field)]


class Checkpoints:
  """The latest-K and best checkpoint managers of one workdir."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, asynchronous: bool = True):
    self.workdir = pathlib.Path(workdir).absolute()
    if jax.process_count() > 1:
      sharding.use_coordination_service_barriers()
    # With several processes the two managers' barriers (named after the step) would collide
    # when both save the same step: each gets its own prefix.
    options = lambda k, prefix: ocp.CheckpointManagerOptions(
        max_to_keep=k, create=True, enable_async_checkpointing=asynchronous,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=prefix))
    self.latest = ocp.CheckpointManager(self.workdir / "checkpoints",
                                        options=options(keep, "latest"),
                                        item_names=(STATE, DATA_ITER, META))
    self.best = ocp.CheckpointManager(self.workdir / "best", options=options(1, "best"),
                                      item_names=(STATE, META))

  def save(self, step: int, state, meta: Mapping[str, Any], data_iter=None, *,
           best: bool = False, latest: bool = True) -> None:
    """Saves `step` into best/ (when `best`) and checkpoints/ (when `latest`).

    A step that a manager already holds is replaced: it was written before an interruption
    (e.g. best/N committed and checkpoints/N not, then a resume from an earlier step trained to N
    again), and this run's state is the one that now belongs there."""
    meta = {**meta, "fingerprint": fingerprint(state)}
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    targets = ([(self.best, dict(items))] if best else []) + (
        [(self.latest, {**items, **({DATA_ITER: pipeline.iterator_save_args(data_iter)}
                                    if data_iter is not None else {})})] if latest else [])
    for manager, manager_items in targets:
      if step in manager.all_steps():
        manager.wait_until_finished()
        logging.warning("%s already holds step %d (written before an interruption): replacing it",
                        manager.directory, step)
        manager.delete(step)
      manager.save(step, args=ocp.args.Composite(**manager_items), force=True)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()

  def read_meta(self, which: str | int = "latest") -> tuple[int, dict]:
    manager, step = self._manager_and_step(which)
    return step, self._read_meta(manager, step)

  def _manager_and_step(self, which: str | int):
    if which == "best":
      manager, step = self.best, self.best.latest_step()
    elif which == "latest":
      manager, step = self.latest, self.latest.latest_step()
    else:
      step = int(which)
      manager = self.latest if step in self.latest.all_steps() else self.best
      if step not in manager.all_steps():
        raise CheckpointNotFoundError(
            f"no checkpoint of step {step} in {self.workdir}; have "
            f"{sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))}")
    if step is None:
      raise CheckpointNotFoundError(f"no {which} checkpoint in {self.workdir} (train first, or "
                                    "convert release weights with `python -m cmmp_jax.convert`)")
    return manager, step

  def _read_meta(self, manager, step) -> dict:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
      return dict(restored[META])
    except Exception as e:  # orbax / tensorstore / json: any failure to read is damage
      raise CheckpointDamagedError(f"checkpoint {manager.directory / str(step)}", META, e) from e

  def _read(self, manager, step: int, abstract_state, model_config, data_iter=None,
            run_config=None):
    """(state, meta) of one step; `data_iter` restored in place when given and saved.

    With `run_config` (resuming training), a step > 0 whose TRAJECTORY_FIELDS differ from it
    raises CheckpointSettingsError before any array is read, unless
    run_config.allow_changed_settings (then the data iterator is not restored: its order depends
    on those settings, and the data order restarts).

    Raises CheckpointMismatchError (its files are intact but do not fit the model or the data
    pipeline: the config's fault) or CheckpointDamagedError (its files cannot be read)."""
    where = f"checkpoint {manager.directory / str(step)}"
    meta = self._read_meta(manager, step)
    check_same_model(meta, model_config, where)
    changed = changed_settings(meta.get("config"), run_config) if run_config and step else []
    if changed and not run_config.get("allow_changed_settings", False):
      raise CheckpointSettingsError(
          f"the checkpoint of step {step} in {self.workdir} was trained with other settings ("
          + "; ".join(changed) + "): resuming would continue its run with another's; use "
          "another --workdir, or set --config.allow_changed_settings=True to continue anyway")
    if changed:
      data_iter = None
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      # Same model description but the arrays do not restore: either another tree (e.g. an
      # optimizer with gradient clipping) or damaged files. Only intact files read without a
      # target, so that decides.
      try:
        manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore()}))
      except Exception:  # pylint: disable=broad-except
        raise CheckpointDamagedError(where, STATE, e) from e
      raise CheckpointMismatchError(f"{where} does not fit the model: {one_line(e)}") from e
    saved = restored[META].get("fingerprint")
    if saved is not None:
      paths = [jax.tree_util.keystr(path) for path, _ in
               jax.tree_util.tree_flatten_with_path(restored[STATE])[0]]
      bad = [path for path, a, b in zip(paths, fingerprint(restored[STATE]), saved) if a != b]
      if bad or len(saved) != len(paths):
        raise CheckpointDamagedError(where, STATE, ValueError(
            f"the contents of {len(bad)} array(s) differ from the fingerprint saved with them "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"))
    if data_iter is not None and (manager.directory / str(step) / DATA_ITER).exists():
      try:
        manager.restore(step, args=ocp.args.Composite(
            **{DATA_ITER: pipeline.iterator_restore_args(data_iter)}))
      except Exception as e:
        try:  # readable files that grain refuses: another sampler (dataset size, seed, batch)
          for f in (manager.directory / str(step) / DATA_ITER).glob("*.json"):
            json.loads(f.read_text())
        except (OSError, ValueError):
          raise CheckpointDamagedError(where, DATA_ITER, e) from e
        raise CheckpointMismatchError(
            f"{where}: its data iterator state does not fit this run's data pipeline "
            f"({one_line(e)}); was the dataset or its order changed?") from e
    return restored[STATE], dict(restored[META])

  def restore(self, which: str | int, abstract_state, model_config, data_iter=None):
    """Restores (step, state, meta) of `which` (a step, 'latest' or 'best') for evaluation or
    prediction; `data_iter` (a grain iterator) is restored in place.

    'latest' is the newest step that restores (damaged newer ones are reported and skipped, and
    left where they are: training moves them aside, see restore_newest_intact). 'best' falls back
    to the latest, with a warning, when no best checkpoint was written (a validation split whose
    G_IoU is undefined at every evaluation) or when it is damaged. Raises
    CheckpointMismatchError before reading arrays when the checkpoint's model differs,
    CheckpointDamagedError when a step asked for by number is damaged, CheckpointNotFoundError
    when there is nothing to restore."""
    if which == "best":
      step = self.best.latest_step()
      if step is None and self.latest.latest_step() is not None:
        reporting.console(
            f"WARNING: no best checkpoint in {self.workdir / 'best'} (no evaluation gave a "
            "defined validation G_IoU, e.g. a validation split without road pixels): using the "
            "latest checkpoint instead")
        which = "latest"
      elif step is not None:
        try:
          return (step, *self._read(self.best, step, abstract_state, model_config, data_iter))
        except CheckpointDamagedError as e:
          if self.latest.latest_step() is None:
            raise
          reporting.console(f"WARNING: {e}; using the latest intact checkpoint instead")
          which = "latest"
    if which == "latest":
      found = self.restore_newest_intact(abstract_state, model_config, data_iter,
                                         move_damaged=False)
      if found is None:
        raise CheckpointNotFoundError(
            f"no intact checkpoint in {self.workdir / 'checkpoints'} (train first, or convert "
            "release weights with `python -m cmmp_jax.convert`)")
      return found
    manager, step = self._manager_and_step(which)
    return (step, *self._read(manager, step, abstract_state, model_config, data_iter))

  def restore_newest_intact(self, abstract_state, model_config, data_iter=None, *,
                            move_damaged: bool = True, run_config=None):
    """(step, state, meta) of the newest step of checkpoints/ that restores, or None when none
    does (or there is none). Each damaged step on the way gets one console line (which step,
    why) and, with `move_damaged` (training, which holds the workdir's lock), is moved to
    checkpoints_damaged/<step>-<part>/ so that the next save cannot collide with it. A
    checkpoint of another model (CheckpointMismatchError) or of other settings
    (CheckpointSettingsError, with `run_config`: see _read) is fatal, never skipped."""
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        return (step, *self._read(self.latest, step, abstract_state, model_config, data_iter,
                                  run_config))
      except CheckpointDamagedError as e:
        moved = self._move_aside(step, e.part) if move_damaged else None
        reporting.console(
            f"WARNING: skipping step {step}: {e}"
            + (f"; moved to {moved}" if moved else "; left in place")
            + "; trying the previous step")
    return None

  def _move_aside(self, step: int, part: str) -> pathlib.Path:
    source = self.latest.directory / str(step)
    target = self.workdir / DAMAGED_DIR / f"{step}-{part}"
    n = 1
    while target.exists():  # the same step damaged again after an earlier move
      n += 1
      target = self.workdir / DAMAGED_DIR / f"{step}-{part}-{n}"
    self.latest.wait_until_finished()
    sharding.sync_processes("checkpoint-damage-found")  # every process has finished reading it
    if sharding.is_primary():
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(source), str(target))
    sharding.sync_processes("checkpoint-damage-moved")
    self.latest.reload()
    return target
