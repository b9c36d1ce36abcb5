"""The training state: model variables, optimizer, learning rate and its plateau schedule.

A `TrainState` is flax's (params, opt_state, step, apply_fn, tx) plus BatchNorm statistics and the
run's PRNG key. The optimizer is Adam with the learning rate injected as a hyper-parameter, so
that the release's plateau schedule (a host decision after each evaluation) changes it without
recompiling the step.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from absl import logging
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cmmp_jax.models import build_model


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and step (flax's TrainState) plus BatchNorm statistics and the
  PRNG key of the run."""
  batch_stats: Any = None
  rng: jax.Array | None = None


def model_from_config(config):
  """The flax module described by config.model."""
  return build_model(config.model.to_dict() if hasattr(config.model, "to_dict")
                     else dict(config.model))


def abstract_variables(config, size: int = 64):
  """Shapes of {'params', 'batch_stats'} of config.model (no compute)."""
  model = model_from_config(config)
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  aux = jax.ShapeDtypeStruct((1, size, size, config.model.aux_channels), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        image, aux)


def init_variables(config, image_shape, aux_shape) -> tuple[dict, jax.Array]:
  """Random {'params', 'batch_stats'} for inputs of (N, H, W, 3) / (N, H, W, C) shapes, and the
  PRNG key of the run (both derived from config.seed)."""
  model = model_from_config(config)
  init_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
  image = jnp.zeros((1, *image_shape[1:]), jnp.float32)
  aux = jnp.zeros((1, *aux_shape[1:]), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(init_key, image, aux)
  return flax.core.unfreeze(variables), run_key


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """Adam (config.optimizer) with an injected learning rate: constant for the plateau and
  constant schedules, warm-up + cosine decay over total_steps for 'cosine'."""
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


def create_state(config, variables, total_steps: int = 1, rng=None):
  """(model, TrainState at step 0) from {'params', 'batch_stats'} variables (host arrays)."""
  model = model_from_config(config)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            tx=make_optimizer(config, total_steps),
                            batch_stats=variables.get("batch_stats", {}),
                            rng=rng if rng is not None else jax.random.PRNGKey(config.seed))
  return model, state


def init_state(config, image_shape, aux_shape, total_steps: int = 1):
  """(model, host TrainState) of a randomly initialised config.model (config.seed)."""
  variables, run_key = init_variables(config, image_shape, aux_shape)
  return create_state(config, variables, total_steps, run_key)


def abstract_state(config):
  """A host TrainState of config.model's shapes, filled with zeros: the target of a restore."""
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_variables(config))
  return create_state(config, zeros)


def current_learning_rate(state: TrainState) -> jax.Array:
  return state.opt_state.hyperparams["learning_rate"]


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
  hyper = dict(state.opt_state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(lr, dtype=jnp.asarray(hyper["learning_rate"]).dtype)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def count_params(state: TrainState) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(state.params))


@dataclasses.dataclass
class PlateauSchedule:
  """The release's schedule (framework.py `fit`): when val G_IoU has not improved for more than
  `patience` evaluations, stop if the CURRENT lr is already below min_lr, else lr /= factor and
  count again. The check comes before the division, so a run from 1e-4 trains through a 1e-9
  phase and stops at the plateau after it. `lr` is the rate in float64 on the host, as PyTorch
  keeps it (the optimizer state's float32 copy of 1e-8 is below 1e-8 and would stop a phase
  early). Its fields are saved in every checkpoint."""
  patience: int
  factor: float
  min_lr: float
  best: float = -1.0
  bad_evals: int = 0
  lr: float | None = None  # None in checkpoints written before it was kept: the state's rate

  @classmethod
  def from_config(cls, config) -> PlateauSchedule:
    opt = config.optimizer
    return cls(opt.plateau_patience, opt.plateau_factor, opt.min_learning_rate,
               lr=float(opt.learning_rate))

  def update(self, value: float, lr: float | None = None) -> tuple[float, bool]:
    """Records one evaluation's val G_IoU. Returns (lr for the next phase, stop); `lr` (the
    state's rate) is used only when the schedule holds none."""
    if self.lr is None:
      self.lr = float(lr)
    if value > self.best:
      self.best, self.bad_evals = value, 0
      return self.lr, False
    self.bad_evals += 1
    if self.bad_evals <= self.patience:
      return self.lr, False
    if self.lr < self.min_lr:
      return self.lr, True
    self.lr, self.bad_evals = self.lr / self.factor, 0
    logging.info("val G_IoU has not improved for %d evaluations: lr -> %g", self.patience + 1,
                 self.lr)
    return self.lr, False
