"""The resize between a raster's grid and the grid a model trained at scale s sees.

A model trained on dataset tiles of T px resized to input_size px sees every input at scale
s = input_size / T. This module is the ONE rule both prediction paths use (predict.predict_arrays
in memory, cmmp_jax.stream block by block), so that they agree bit for bit:

  model grid: (round(H s), round(W s)) (round half to even), s taken as the ratio p / q of small
    integers nearest to it (denominator <= MAX_DENOMINATOR; input_size / T exactly).
  to the model grid (uint8 image and aux): bilinear, half-pixel centres: model pixel x' samples
    the source at u = (x' + 0.5) q / p - 0.5, with OpenCV's uint8 INTER_LINEAR fixed-point
    arithmetic (11-bit weights; a horizontal pass, then OpenCV's vectorised vertical pass;
    borders clamped as OpenCV clamps them). Weights come from the exact fraction of u (integer
    arithmetic), so a pixel depends only on its own source neighbourhood, never on its position
    in the raster or on the window it is computed in: any window of the result equals the whole
    result cut. On one dataset tile (H = W = T) this equals cv2.resize(tile, (sT, sT),
    INTER_LINEAR), the training pipeline's resize, down or up
    (tests/test_predict_model_grid.py checks it).
  back to the raster grid (float32 probabilities): the same bilinear sampling the other way
    (raster pixel x samples the model grid at (x + 0.5) p / q - 0.5, clamped to the grid), with
    float32 weights and float32 arithmetic (horizontal, then vertical), as cv2.resize's float
    path up to its fused multiply-adds (measured within 1.8e-7 of cv2.resize on [0, 1] values).

cv2.resize itself cannot be cut into windows: it derives its source coordinates in float32 from
the destination index, so their fraction loses bits as the index grows (past ~1,300 px at
s = 0.75), and a window's pixels then differ from the whole raster's by one grey level here and
there.

Taps: `axis_taps` gives, for a range of destination indices along one axis, the two source
indices and the two weights of each; the source range a window needs is
AxisTaps.source_range.
"""
from __future__ import annotations

import dataclasses
import fractions

import numpy as np

MAX_DENOMINATOR = 1_000_000
COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
COEF_SCALE = 1 << COEF_BITS


@dataclasses.dataclass(frozen=True)
class AxisTaps:
  """Bilinear taps of destination indices [start, stop) along one axis.

  first, second: int64 (n,) source indices (second == first at a clamped border);
  weight_first, weight_second: (n,) int32 fixed-point (sum 2048) or float32 weights.
  """
  first: np.ndarray
  second: np.ndarray
  weight_first: np.ndarray
  weight_second: np.ndarray

  @property
  def source_range(self) -> tuple[int, int]:
    """[lo, hi): the source indices these taps read."""
    return int(self.first.min()), int(self.second.max()) + 1


def as_ratio(scale: float) -> fractions.Fraction:
  """The scale as p / q (denominator <= MAX_DENOMINATOR): input_size / tile_size exactly."""
  ratio = fractions.Fraction(scale).limit_denominator(MAX_DENOMINATOR)
  if ratio <= 0:
    raise ValueError(f'scale must be positive; got {scale!r}')
  return ratio


def model_size(length: int, ratio: fractions.Fraction) -> int:
  """round(length * p / q), half to even (Python's round, as cv2's cvRound), at least 1."""
  return max(1, round(length * ratio))


def axis_taps(start: int, stop: int, source_length: int, step: fractions.Fraction, *,
              fixed_point: bool, vertical: bool) -> AxisTaps:
  """Taps of destination indices [start, stop) sampling a source axis of source_length pixels
  at u = (x + 0.5) * step - 0.5 (step = source pixels per destination pixel).

  The fraction of u is exact (u = ((2x + 1) a - b) / 2b for step = a / b, in integers), then
  rounded to float32 as OpenCV rounds its fx; fixed-point weights are rint(w * 2048).
  Borders as OpenCV's INTER_LINEAR: along columns (vertical=False) u < 0 reads pixel 0 with
  weights (1, 0) and floor(u) >= source_length - 1 the last pixel likewise; along rows
  (vertical=True) both indices are clamped to the axis and the weights kept (OpenCV's vertical
  pass; with fixed-point rounding the two halves do not always add up to the pixel itself).
  """
  a, b = step.numerator, step.denominator
  x = np.arange(start, stop, dtype=np.int64)
  # u = ((2x + 1) a - b) / (2b): floor and remainder in integers.
  numerator = (2 * x + 1) * a - b
  denominator = 2 * b
  first = numerator // denominator
  remainder = numerator - first * denominator  # in [0, 2b)
  fraction = (remainder / denominator).astype(np.float32)  # as cv2's float fx
  if vertical:
    second = np.clip(first + 1, 0, source_length - 1)
    first = np.clip(first, 0, source_length - 1)
  else:
    border = (first < 0) | (first >= source_length - 1)
    fraction[border] = 0.0
    first = np.clip(first, 0, source_length - 1)
    second = np.minimum(first + 1, source_length - 1)
    second[border] = first[border]
  one_minus = (np.float32(1.0) - fraction).astype(np.float32)
  if fixed_point:
    # saturate_cast<short>(float * 2048): round half to even.
    weight_first = np.rint(one_minus * np.float32(COEF_SCALE)).astype(np.int32)
    weight_second = np.rint(fraction * np.float32(COEF_SCALE)).astype(np.int32)
  else:
    weight_first, weight_second = one_minus, fraction
  return AxisTaps(first, second, weight_first, weight_second)



def _check_window(shape, rows: AxisTaps, cols: AxisTaps, row_offset: int, col_offset: int):
  row_lo, row_hi = rows.source_range
  col_lo, col_hi = cols.source_range
  if (row_lo < row_offset or col_lo < col_offset or row_hi > row_offset + shape[0]
      or col_hi > col_offset + shape[1]):
    raise ValueError(f'source window {tuple(shape[:2])} at ({row_offset}, {col_offset}) misses '
                     f'rows [{row_lo}, {row_hi}) or columns [{col_lo}, {col_hi}) of the taps')


def _row_chunks(rows: AxisTaps, chunk: int):
  for start in range(0, rows.first.size, chunk):
    part = slice(start, start + chunk)
    yield part, AxisTaps(rows.first[part], rows.second[part], rows.weight_first[part],
                         rows.weight_second[part])


def resize_uint8(source: np.ndarray, rows: AxisTaps, cols: AxisTaps, *, row_offset: int = 0,
                 col_offset: int = 0, chunk_rows: int = 256) -> np.ndarray:
  """uint8 (h, w, C) source window -> uint8 (len(rows), len(cols), C), fixed-point bilinear.

  The taps index the whole source axis (fixed_point=True); the window starts at
  (row_offset, col_offset) and must hold every row and column the taps read. OpenCV's uint8
  INTER_LINEAR arithmetic: horizontal sums H = S[first] * w_first + S[second] * w_second
  (weights in 1/2048), then vertical ((((H[first] >> 4) * b_first) >> 16)
  + (((H[second] >> 4) * b_second) >> 16) + 2) >> 2, clipped to 0..255. Works on chunk_rows
  output rows at a time (int32 temporaries of about 3 x chunk_rows x len(cols) x C).
  """
  source = np.asarray(source)
  _check_window(source.shape, rows, cols, row_offset, col_offset)
  out = np.empty((rows.first.size, cols.first.size) + source.shape[2:], np.uint8)
  extra = (None,) * (source.ndim - 2)
  weight_first = cols.weight_first[(slice(None),) + extra]
  weight_second = cols.weight_second[(slice(None),) + extra]
  for part, taps in _row_chunks(rows, chunk_rows):
    needed = np.unique(np.concatenate([taps.first, taps.second]))
    first, second = np.searchsorted(needed, taps.first), np.searchsorted(needed, taps.second)
    picked = source[needed - row_offset]
    horizontal = (picked[:, cols.first - col_offset].astype(np.int32) * weight_first
                  + picked[:, cols.second - col_offset].astype(np.int32) * weight_second)
    horizontal >>= 4
    # OpenCV's vertical pass (VResizeLinearVec_32s8u): 16-bit products keeping the high half,
    # then a rounding shift by 2.
    values = ((horizontal[first] * taps.weight_first[(slice(None), None) + extra]) >> 16) + (
        (horizontal[second] * taps.weight_second[(slice(None), None) + extra]) >> 16)
    values += 2
    values >>= 2
    out[part] = np.clip(values, 0, 255)
  return out


def resize_float32(source: np.ndarray, rows: AxisTaps, cols: AxisTaps, *, row_offset: int = 0,
                   col_offset: int = 0, chunk_rows: int = 512) -> np.ndarray:
  """float32 (h, w) source window -> float32 (len(rows), len(cols)), bilinear in float32.

  Taps with fixed_point=False. S[first] * w_first + S[second] * w_second along columns, then
  along rows, each product and sum rounded to float32 (no fused multiply-add: the same result
  on every machine).
  """
  source = np.asarray(source, np.float32)
  _check_window(source.shape, rows, cols, row_offset, col_offset)
  out = np.empty((rows.first.size, cols.first.size), np.float32)
  for part, taps in _row_chunks(rows, chunk_rows):
    needed = np.unique(np.concatenate([taps.first, taps.second]))
    first, second = np.searchsorted(needed, taps.first), np.searchsorted(needed, taps.second)
    picked = source[needed - row_offset]
    horizontal = (picked[:, cols.first - col_offset] * cols.weight_first
                  + picked[:, cols.second - col_offset] * cols.weight_second)
    out[part] = (horizontal[first] * taps.weight_first[:, None]
                 + horizontal[second] * taps.weight_second[:, None])
  return out


def to_model_grid(array: np.ndarray, ratio: fractions.Fraction) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (model_size(H), model_size(W), C): the whole-raster resize."""
  height, width = array.shape[:2]
  rows = axis_taps(0, model_size(height, ratio), height, 1 / ratio, fixed_point=True,
                   vertical=True)
  cols = axis_taps(0, model_size(width, ratio), width, 1 / ratio, fixed_point=True,
                   vertical=False)
  return resize_uint8(array, rows, cols)


def to_raster_grid(probabilities: np.ndarray, height: int, width: int,
                   ratio: fractions.Fraction) -> np.ndarray:
  """float32 (H', W') model-grid values -> float32 (height, width) on the raster grid."""
  model_height, model_width = probabilities.shape
  rows = axis_taps(0, height, model_height, ratio, fixed_point=False, vertical=True)
  cols = axis_taps(0, width, model_width, ratio, fixed_point=False, vertical=False)
  return resize_float32(probabilities, rows, cols)
