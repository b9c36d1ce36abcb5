"""Sliding-window prediction over large rasters and dihedral test-time augmentation.

`predict_large` cuts an (H, W) image/auxiliary pair into window x window crops on a regular
grid, runs a caller-supplied (usually jitted) batch forward on them and stitches the
probabilities back with a smooth blending weight, so that seams between windows vanish.

Layout conventions: NHWC; image (H, W, 3), aux (H, W, C), forward batches (B, w, w, 3) and
(B, w, w, C) float32 with the input VALUES UNCHANGED (uint8 0..255 stay 0..255 as float32:
normalisation is the forward's job), forward output (B, w, w, 1) probabilities.
"""
from typing import Callable, List

import jax.numpy as jnp
import numpy as np

Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]
PAD_MODES = ("reflect", "constant")


class InferenceInputError(ValueError):
  """The image, auxiliary raster, window settings or forward output are unusable."""


def window_starts(length: int, window: int, stride: int) -> List[int]:
  """Start offsets of windows along one axis.

  Windows start at 0, stride, 2 * stride, ... and the last one is aligned to the far border
  (start = length - window), so no window leaves the raster and every pixel is covered.

  Args:
    length: axis length, >= window (smaller rasters are padded by the caller).
    window: window side.
    stride: step between window starts, 1 <= stride <= window.

  Returns:
    Sorted list of distinct start offsets, e.g. length 11, window 4, stride 3 -> [0, 3, 6, 7].
  """
  if length < window:
    raise InferenceInputError(f"axis length {length} is smaller than the window {window}")
  if not 1 <= stride <= window:
    raise InferenceInputError(f"stride must be in [1, window={window}]; got {stride}")
  return list(range(0, length - window, stride)) + [length - window]


def blend_weights_1d(window: int, overlap: int) -> np.ndarray:
  """Raised-cosine ramp used to blend overlapping windows along one axis.

  Args:
    window: window side.
    overlap: ramp length at each end; 0 gives uniform weights.

  Returns:
    (window,) float64 weights: 1 in the middle, rising as 0.5 * (1 - cos(pi * k / (n + 1))),
    k = 1..n, over the first and last n = min(overlap, window // 2) pixels (capped so the two
    ramps never cross); strictly > 0 everywhere, so a pixel seen by a single window (e.g. at
    the raster border) keeps its value after normalisation by the summed weights.
  """
  weights = np.ones((window,), np.float64)
  ramp_length = min(overlap, window // 2)
  if ramp_length > 0:
    steps = np.arange(1, ramp_length + 1, dtype=np.float64)
    ramp = 0.5 * (1.0 - np.cos(np.pi * steps / (ramp_length + 1)))
    weights[:ramp_length] = ramp
    weights[window - ramp_length:] = ramp[::-1]
  return weights


def check_settings(window, overlap, batch_size, pad_mode="reflect") -> None:
  """Raises InferenceInputError for window settings predict_large refuses (also used by
  cmmp_jax.stream, which cuts the same windows from a raster it never loads)."""
  for name, value in (("window", window), ("overlap", overlap), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise InferenceInputError(f"{name} must be an integer; got {value!r}")
  if window < 1:
    raise InferenceInputError(f"window must be >= 1; got {window}")
  if not 0 <= overlap < window:
    raise InferenceInputError(f"overlap must be in [0, window={window}); got {overlap}")
  if batch_size < 1:
    raise InferenceInputError(f"batch_size must be >= 1; got {batch_size}")
  if pad_mode not in PAD_MODES:
    raise InferenceInputError(f"pad_mode must be one of {PAD_MODES}; got {pad_mode!r}")


def _check_inputs(image, aux, window, overlap, batch_size, pad_mode):
  check_settings(window, overlap, batch_size, pad_mode)
  if image.ndim != 3 or image.shape[2] != 3:
    raise InferenceInputError(f"image must be (H, W, 3); got shape {image.shape}")
  if aux.ndim != 3 or aux.shape[2] < 1:
    raise InferenceInputError(f"aux must be (H, W, C) with C >= 1; got shape {aux.shape}")
  if image.shape[:2] != aux.shape[:2]:
    raise InferenceInputError(
        f"image size {image.shape[:2]} and aux size {aux.shape[:2]} differ")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise InferenceInputError(f"image is empty: shape {image.shape}")
  for name, array in (("image", image), ("aux", aux)):
    if array.dtype.kind not in "uif":
      raise InferenceInputError(f"{name} has non-numeric dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
      raise InferenceInputError(f"{name} contains NaN or infinity")


def predict_large(forward: Forward,
                  image: np.ndarray,
                  aux: np.ndarray,
                  *,
                  window: int,
                  overlap: int,
                  batch_size: int,
                  pad_mode: str = "reflect") -> np.ndarray:
  """Sliding-window road probabilities for a raster of any size.

  Args:
    forward: callable (image (B, w, w, 3) float32, aux (B, w, w, C) float32) -> (B, w, w, 1)
      probabilities, with B == batch_size and w == window on every call (the last batch is
      filled up with zero windows whose outputs are discarded) so a jitted forward compiles
      once.
    image: (H, W, 3) RGB raster, uint8 or float; passed to forward as float32, values unchanged.
    aux: (H, W, C) auxiliary raster aligned with image, same treatment.
    window: square window side w.
    overlap: pixels shared by neighbouring windows, 0 <= overlap < window; the grid stride is
      window - overlap, and the last window of each axis is aligned to the raster border.
    batch_size: windows per forward call.
    pad_mode: how an axis shorter than the window is padded at its far end before cutting:
      'reflect' (default; mirrors the content without repeating the edge row, which looks
      more like real imagery to a conv net than a black band) or 'constant' (zeros). The
      padding is cropped from the result.

  Returns:
    (H, W) float32 probabilities: the per-pixel average of the overlapping window outputs,
    weighted by the separable raised-cosine ramp of `blend_weights_1d`.

  Raises:
    InferenceInputError: bad shapes, settings, NaN/inf inputs, or a forward output of the
      wrong shape or with NaN/inf values.
  """
  image = np.asarray(image)
  aux = np.asarray(aux)
  _check_inputs(image, aux, window, overlap, batch_size, pad_mode)
  height, width = image.shape[:2]
  aux_channels = aux.shape[2]

  padded_height, padded_width = max(height, window), max(width, window)
  pad = ((0, padded_height - height), (0, padded_width - width), (0, 0))
  image = np.pad(image.astype(np.float32), pad, mode=pad_mode)
  aux = np.pad(aux.astype(np.float32), pad, mode=pad_mode)

  stride = window - overlap
  corners = [(top, left)
             for top in window_starts(padded_height, window, stride)
             for left in window_starts(padded_width, window, stride)]
  weight_1d = blend_weights_1d(window, overlap)
  weight_2d = weight_1d[:, None] * weight_1d[None, :]

  # Accumulate in float64 so that many overlapping windows add up without rounding drift.
  weighted_sum = np.zeros((padded_height, padded_width), np.float64)
  weight_sum = np.zeros((padded_height, padded_width), np.float64)
  for first in range(0, len(corners), batch_size):
    batch_corners = corners[first:first + batch_size]
    image_batch = np.zeros((batch_size, window, window, 3), np.float32)
    aux_batch = np.zeros((batch_size, window, window, aux_channels), np.float32)
    for row, (top, left) in enumerate(batch_corners):
      image_batch[row] = image[top:top + window, left:left + window]
      aux_batch[row] = aux[top:top + window, left:left + window]
    probs = np.asarray(forward(image_batch, aux_batch))
    if probs.shape != (batch_size, window, window, 1):
      raise InferenceInputError(
          f"forward returned shape {probs.shape}; expected {(batch_size, window, window, 1)}")
    probs = probs[:len(batch_corners), :, :, 0].astype(np.float64)
    if not np.all(np.isfinite(probs)):
      raise InferenceInputError("forward returned NaN or infinite probabilities")
    for row, (top, left) in enumerate(batch_corners):
      weighted_sum[top:top + window, left:left + window] += probs[row] * weight_2d
      weight_sum[top:top + window, left:left + window] += weight_2d

  stitched = weighted_sum / weight_sum
  return stitched[:height, :width].astype(np.float32)


def _dihedral(x: jnp.ndarray, rotations: int, flip: bool) -> jnp.ndarray:
  """Applies a flip of the width axis, then `rotations` quarter turns, to an NHWC batch."""
  if flip:
    x = jnp.flip(x, axis=2)
  return jnp.rot90(x, rotations, axes=(1, 2))


def _inverse_dihedral(x: jnp.ndarray, rotations: int, flip: bool) -> jnp.ndarray:
  x = jnp.rot90(x, -rotations, axes=(1, 2))
  if flip:
    x = jnp.flip(x, axis=2)
  return x


def tta_dihedral(forward: Forward) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
  """Wraps a forward with 8-fold dihedral test-time augmentation.

  Args:
    forward: callable (image (B, h, w, 3), aux (B, h, w, C)) -> (B, h, w, 1) probabilities.
      With rotations the spatial axes swap, so non-square inputs need a forward accepting
      (B, w, h, .) too; sliding windows are square.

  Returns:
    A callable with the same signature returning the mean over the 8 symmetries g of the
    square (4 rotations, each with and without a flip) of g^-1(forward(g(image), g(aux))).
    It is pure jax.numpy (jit-able) and calls forward 8 times on same-sized batches.
  """
  def augmented_forward(image, aux):
    image = jnp.asarray(image)
    aux = jnp.asarray(aux)
    total = None
    for flip in (False, True):
      for rotations in range(4):
        output = forward(_dihedral(image, rotations, flip), _dihedral(aux, rotations, flip))
        restored = _inverse_dihedral(jnp.asarray(output, jnp.float32), rotations, flip)
        total = restored if total is None else total + restored
    return total / 8.0

  return augmented_forward
