"""Orbax checkpoints of a training run.

Layout under the workdir:
  checkpoints/<step>/{state, data_iter, meta}   the latest K, saved asynchronously and atomically
                                                (orbax writes to a temporary folder and renames)
  best/<step>/{state, meta}                     the best by validation G_IoU, kept apart
`state` is the TrainState pytree (params, batch_stats, opt_state, step, rng); `data_iter` the grain
iterator state (one JSON per process); `meta` a JSON dict: the model config (to refuse a
checkpoint of another architecture before touching arrays), the schedule's plateau state and the
evaluation history.
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from cmmp_jax import sharding
from cmmp_jax.data import pipeline

STATE, DATA_ITER, META = "state", "data_iter", "meta"


class CheckpointMismatchError(ValueError):
  """A checkpoint was written by another model configuration than the one asked for."""


class CheckpointNotFoundError(FileNotFoundError):
  """No checkpoint where one was expected."""


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
           best: bool = False) -> None:
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(meta))}
    if best:
      self.best.save(step, args=ocp.args.Composite(**items), force=True)
    if data_iter is not None:
      items[DATA_ITER] = pipeline.iterator_save_args(data_iter)
    self.latest.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()

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

  def read_meta(self, which: str | int = "latest") -> tuple[int, dict]:
    manager, step = self._manager_and_step(which)
    restored = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return step, dict(restored[META])

  def restore(self, which: str | int, abstract_state, model_config, data_iter=None):
    """Restores (step, state, meta); `data_iter` (a grain iterator) is restored in place.

    Raises CheckpointMismatchError before reading arrays when the checkpoint's model differs.
    """
    manager, step = self._manager_and_step(which)
    where = f"checkpoint {manager.directory / str(step)}"
    _, meta = step, dict(manager.restore(
        step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])
    check_same_model(meta, model_config, where)
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    if data_iter is not None and (manager.directory / str(step) / DATA_ITER).exists():
      items[DATA_ITER] = pipeline.iterator_restore_args(data_iter)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(f"{where} does not fit the model: {e}") from e
    return step, restored[STATE], dict(restored[META])
