"""The jitted steps: pure functions of (state, batch), compiled once per run.

Batches are dicts of global arrays sharded on the mesh's 'data' axis (`sharding.to_global_batch`):
image (N, H, W, 3) and aux (N, H, W, C) float32 scaled by the pipeline, mask (N, h, w, 1) in
{0, 1} at label resolution, and for evaluation valid (N,) (False on padding rows).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cmmp_jax import inference, losses
from cmmp_jax import metrics as metrics_lib
from cmmp_jax import sharding
from cmmp_jax.state import TrainState, current_learning_rate


def make_loss_fn(model, config):
  """(params, batch_stats, batch) -> (loss, {'batch_stats': updated}): the training forward
  (BatchNorm in train mode) and config.loss, differentiated by the train step.

  config.batch_norm_group_size = g > 0 computes BatchNorm's batch statistics over groups of g
  consecutive images instead of the whole global batch: the release ran DataParallel on 2 GPUs
  with 4 images each, so each BatchNorm saw 4 images, and its running statistics are those of
  the first GPU's replica (DataParallel shares only device 0's buffers with the module). Here the
  model is vmapped over the groups (each instance sees g images) and the running statistics of
  the first group are kept. The loss stays over the whole batch (the release's batch Dice).
  """
  dice = bool(config.loss.dice)
  group = int(config.get("batch_norm_group_size", 0) or 0)

  def forward(variables, image, aux):
    if not group or group >= image.shape[0]:
      return model.apply(variables, image, aux, train=True, mutable=["batch_stats"])
    groups = image.shape[0] // group
    split = lambda x: x.reshape(groups, group, *x.shape[1:])
    logits, updates = jax.vmap(
        lambda i, a: model.apply(variables, i, a, train=True, mutable=["batch_stats"]))(
            split(image), split(aux))
    return (logits.reshape(image.shape[0], *logits.shape[2:]),
            jax.tree.map(lambda x: x[0], updates))

  def loss_fn(params, batch_stats, batch):
    logits, updates = forward({"params": params, "batch_stats": batch_stats},
                              batch["image"], batch["aux"])
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

  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  batch_shardings = {"image": data, "aux": data, "mask": data}
  return jax.jit(step, in_shardings=(rep, batch_shardings), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def make_eval_step(model, mesh, tta: bool = False):
  """(state, batch) -> (per-tile counts, probabilities (N, H, W, 1)); counts exclude padded
  rows. tta averages the 8 dihedral views."""

  def step(state: TrainState, batch):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    forward = lambda image, aux: jax.nn.sigmoid(model.apply(variables, image, aux, train=False))
    if tta:
      forward = inference.tta_dihedral(forward)
    probs = forward(batch["image"], batch["aux"])
    counts = metrics_lib.tile_counts_from_probs(probs, batch["mask"], batch["valid"])
    return counts, probs

  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, {k: data for k in sharding.DEVICE_KEYS}),
                 out_shardings=(data, data))


def make_predict_fn(model, mesh):
  """(variables, image, aux) -> probabilities (N, H, W, 1), windows sharded over the mesh."""
  windows = sharding.batch_sharding(mesh)
  return jax.jit(lambda v, image, aux: jax.nn.sigmoid(model.apply(v, image, aux, train=False)),
                 in_shardings=(sharding.replicated(mesh), windows, windows),
                 out_shardings=windows)
