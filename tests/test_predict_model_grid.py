"""Tests of cmmp_jax.model_grid, the resize between a raster's grid and a model's training scale.

The rule must (1) give a dataset tile exactly the training pipeline's cv2.resize, and (2) let any
window of the result be computed alone from the source pixels under it, which streaming needs
and a whole-image cv2.resize does not offer (its coordinates lose bits as indices grow).
"""
import fractions

import cv2
import numpy as np
import pytest

from cmmp_jax import model_grid

F = fractions.Fraction


@pytest.mark.parametrize('tile, model_tile', [(32, 24), (16, 12), (32, 16), (20, 15), (500, 300),
                                              (16, 24), (64, 128)])
def test_a_dataset_tile_gets_the_training_pipelines_cv2_resize(tile, model_tile):
  rng = np.random.default_rng(tile + model_tile)
  image = rng.integers(0, 256, size=(tile, tile, 3)).astype(np.uint8)
  image[::7] = 255  # sharp edges, where rounding differences would show
  ratio = model_grid.as_ratio(model_tile / tile)
  assert ratio == F(model_tile, tile)
  expected = cv2.resize(image, (model_tile, model_tile), interpolation=cv2.INTER_LINEAR)
  np.testing.assert_array_equal(model_grid.to_model_grid(image, ratio), expected)
  gray = image[..., :1]
  np.testing.assert_array_equal(model_grid.to_model_grid(gray, ratio)[..., 0],
                                cv2.resize(gray[..., 0], (model_tile, model_tile),
                                           interpolation=cv2.INTER_LINEAR))


def test_hand_computed_samples_and_grid_sizes():
  # s = 3/4: model pixel x' samples the source at (x' + 0.5) * 4/3 - 0.5.
  row = np.array([0, 60, 120, 180, 240, 250, 10, 20], np.uint8)
  image = np.repeat(row[None, :, None], 4, axis=0)
  out = model_grid.to_model_grid(image, F(3, 4))[0, :, 0]
  assert out.shape == (6,)
  # x' = 1 -> u = 1.5: halfway between 60 and 120; x' = 0 -> u = 1/6: 5/6 * 0 + 1/6 * 60 = 10
  # (weights 1707 and 341 in 1/2048: 341 * 60 / 2048 = 9.99); x' = 5 -> u = 6.833: 1/6 * 10 +
  # 5/6 * 20 = 18.33.
  assert (out[0], out[1], out[5]) == (10, 90, 18)
  back = model_grid.to_raster_grid(np.array([[0.0, 1.0]], np.float32), 1, 4, F(1, 2))[0]
  # Raster pixel x samples (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25: clamped at both ends.
  np.testing.assert_array_equal(back, np.float32([0.0, 0.25, 0.75, 1.0]))
  assert model_grid.model_size(301, F(1, 2)) == 150  # 150.5, half to even, as cv2's cvRound
  assert model_grid.model_size(303, F(1, 2)) == 152
  assert model_grid.model_size(173, F(3, 4)) == 130  # 129.75
  assert model_grid.as_ratio(512 / 1024) == F(1, 2) and model_grid.as_ratio(0.6) == F(3, 5)


@pytest.mark.parametrize('height, width, scale', [(301, 517, 0.5), (211, 3001, 0.75),
                                                  (97, 2003, 0.6), (101, 203, 4 / 3)])
def test_any_window_equals_the_whole_resize_cut(height, width, scale):
  """Windows anywhere (odd offsets and sizes, at the edges, far from the origin) computed from
  the source window their taps read equal the whole-raster result: both directions."""
  rng = np.random.default_rng(int(width * scale))
  ratio = model_grid.as_ratio(scale)
  image = rng.integers(0, 256, size=(height, width, 2)).astype(np.uint8)
  whole = model_grid.to_model_grid(image, ratio)
  model_height, model_width = whole.shape[:2]
  probabilities = rng.random((model_height, model_width)).astype(np.float32)
  back = model_grid.to_raster_grid(probabilities, height, width, ratio)
  assert back.shape == (height, width)
  for _ in range(40):
    row0 = int(rng.integers(0, model_height))
    row1 = int(rng.integers(row0 + 1, model_height + 1))
    col0 = int(rng.integers(0, model_width))
    col1 = int(rng.integers(col0 + 1, model_width + 1))
    rows = model_grid.axis_taps(row0, row1, height, 1 / ratio, fixed_point=True,
                                vertical=True)
    cols = model_grid.axis_taps(col0, col1, width, 1 / ratio, fixed_point=True,
                                vertical=False)
    (a, b), (c, d) = rows.source_range, cols.source_range
    np.testing.assert_array_equal(
        model_grid.resize_uint8(image[a:b, c:d], rows, cols, row_offset=a, col_offset=c),
        whole[row0:row1, col0:col1])
    row0, col0 = int(rng.integers(0, height)), int(rng.integers(0, width))
    row1, col1 = int(rng.integers(row0 + 1, height + 1)), int(rng.integers(col0 + 1, width + 1))
    rows = model_grid.axis_taps(row0, row1, model_height, ratio, fixed_point=False,
                                vertical=True)
    cols = model_grid.axis_taps(col0, col1, model_width, ratio, fixed_point=False,
                                vertical=False)
    (a, b), (c, d) = rows.source_range, cols.source_range
    np.testing.assert_array_equal(
        model_grid.resize_float32(probabilities[a:b, c:d], rows, cols, row_offset=a,
                                  col_offset=c),
        back[row0:row1, col0:col1])


def test_a_source_window_missing_tap_pixels_is_refused():
  image = np.zeros((40, 40, 1), np.uint8)
  rows = model_grid.axis_taps(10, 20, 40, F(4, 3), fixed_point=True, vertical=True)
  cols = model_grid.axis_taps(0, 30, 40, F(4, 3), fixed_point=True, vertical=False)
  a, b = rows.source_range
  with pytest.raises(ValueError, match=r'misses rows \[13, 27\) or columns \[0, 40\)'):
    model_grid.resize_uint8(image[a + 1:b], rows, cols, row_offset=a + 1)
