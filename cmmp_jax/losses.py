"""Training loss of CMMPNet: binary cross-entropy plus a batch-wide soft Dice loss.

All functions are pure jax.numpy, jit-friendly and use NHWC layouts:
  logits: (B, h, w, 1) float (float32 or bfloat16), pre-sigmoid road scores.
  labels: (B, H, W, 1) uint8 or float with values in [0, 1] (1 = road); (H, W) may differ
          from (h, w).
The loss is computed in float32 for float32 and bfloat16 logits; float64 logits (model.dtype
'float64', parity checks under jax_enable_x64) keep float64 throughout.

Faithfulness to the reference release:
  * BCE is the mean over every pixel of every (valid) example, as torch's BCELoss does; here
    it is computed from logits in the log-sigmoid form softplus(x) - x * y, which equals
    -[y log p + (1 - y) log(1 - p)] with p = sigmoid(x) but stays finite for huge |x|.
  * Soft Dice is computed over the WHOLE batch at once (not per example, then averaged),
    with smooth = 1: dice = (2 * sum(p * y) + 1) / (sum(p) + sum(y) + 1); loss = 1 - dice.
  * When the labels' resolution differs from the logits' (BJRoad trains at 512 x 512 with
    1024 x 1024 labels) the LABEL is resized to the prediction's size with bilinear
    interpolation and NOT re-thresholded: the release uses cv2.resize (INTER_LINEAR,
    half-pixel centres, no anti-aliasing) on the 0/1 float mask and feeds the resulting soft
    values (e.g. 0.25, 0.5, 0.75 at road borders) to BCE and Dice. `resize_labels_to` uses
    jax.image.resize 'bilinear' with antialias=False, which matches cv2's INTER_LINEAR to
    float rounding (an anti-aliased resize would average over 4 x 4 source pixels per output
    pixel for a 2x reduction instead of cv2's 2 x 2).
"""
from typing import Optional

import jax
import jax.numpy as jnp


class LossShapeError(ValueError):
  """Logits, labels or per-example weights have incompatible shapes."""


def _check_nhwc(name: str, array: jnp.ndarray) -> None:
  if array.ndim != 4:
    raise LossShapeError(
        f"{name} must be NHWC with 4 dimensions (B, H, W, C); got shape {tuple(array.shape)}")


def compute_dtype(logits: jnp.ndarray):
  """The loss's dtype: float32, or float64 for float64 logits (never below float32)."""
  return jnp.promote_types(logits.dtype, jnp.float32)


def resize_labels_to(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Resizes labels to the logits' spatial size, as the reference loss does.

  Args:
    logits: (B, h, w, C) array of any float dtype; only its shape is used.
    labels: (B, H, W, C) array, uint8 or float, values in [0, 1].

  Returns:
    (B, h, w, C) float32 labels (float64 for float64 logits): bilinear (half-pixel centres,
    no anti-aliasing, i.e. cv2 INTER_LINEAR) resampling of `labels`, not re-thresholded, so
    values at road borders lie strictly between 0 and 1. Returned unchanged (cast) when sizes
    already agree.

  Raises:
    LossShapeError: when either array is not 4-D, or batch or channel counts differ.
  """
  _check_nhwc("logits", logits)
  _check_nhwc("labels", labels)
  if logits.shape[0] != labels.shape[0] or logits.shape[3] != labels.shape[3]:
    raise LossShapeError(
        f"labels shape {tuple(labels.shape)} does not match logits shape "
        f"{tuple(logits.shape)} in batch size or channel count")
  labels = jnp.asarray(labels, compute_dtype(logits))
  if labels.shape[1:3] == logits.shape[1:3]:
    return labels
  target_shape = (labels.shape[0], logits.shape[1], logits.shape[2], labels.shape[3])
  return jax.image.resize(labels, target_shape, method="bilinear", antialias=False)


def _example_weights(valid: Optional[jnp.ndarray], batch_size: int,
                     dtype=jnp.float32) -> jnp.ndarray:
  """Returns (B,) weights of `dtype`, 1 for real examples and 0 for padded rows."""
  if valid is None:
    return jnp.ones((batch_size,), dtype)
  valid = jnp.asarray(valid)
  if valid.shape != (batch_size,):
    raise LossShapeError(
        f"valid must have shape ({batch_size},) to match the batch; got {tuple(valid.shape)}")
  return valid.astype(dtype)


def bce_dice_loss(logits: jnp.ndarray,
                  labels: jnp.ndarray,
                  *,
                  valid: Optional[jnp.ndarray] = None,
                  dice: bool = True) -> jnp.ndarray:
  """BCE (+ batch-wide soft Dice) loss of the reference release.

  Args:
    logits: (B, h, w, 1) float32 or bfloat16 pre-sigmoid scores.
    labels: (B, H, W, 1) uint8 or float in [0, 1]; resized to (h, w) by `resize_labels_to`
      when (H, W) != (h, w).
    valid: optional (B,) bool or float per-example weights; rows with weight 0 (padding of
      the last batch) contribute nothing to either term. Fractional weights scale a row's
      pixels in both the BCE mean and the Dice sums.
    dice: when False, return BCE alone.

  Returns:
    Scalar float32 loss (float64 for float64 logits): mean BCE over the valid pixels, plus
    1 - soft Dice (smooth = 1) over all valid pixels of the batch together. A batch with no
    valid row gives 0.
  """
  dtype = compute_dtype(logits)
  labels = resize_labels_to(logits, labels)
  logits = jnp.asarray(logits, dtype)
  batch_size, height, width, channels = logits.shape
  weights = _example_weights(valid, batch_size, dtype)[:, None, None, None]

  # softplus(x) - x*y == -[y*log(sigmoid(x)) + (1-y)*log(1-sigmoid(x))], without overflow.
  pixel_bce = jax.nn.softplus(logits) - logits * labels
  pixel_count = jnp.sum(weights) * (height * width * channels)
  # An all-padding batch has pixel_count 0 and a zero sum; max() keeps it at 0, not NaN.
  bce = jnp.sum(pixel_bce * weights) / jnp.maximum(pixel_count, 1.0)
  if not dice:
    return bce

  probs = jax.nn.sigmoid(logits)
  smooth = 1.0
  intersection = jnp.sum(probs * labels * weights)
  total = jnp.sum(probs * weights) + jnp.sum(labels * weights)
  dice_coefficient = (2.0 * intersection + smooth) / (total + smooth)
  return bce + (1.0 - dice_coefficient)
