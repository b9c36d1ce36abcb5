"""Tests of cmmp_jax.inference: window grid, exact stitching of pixelwise forwards, TTA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmmp_jax import inference


def _coordinate_raster(height, width):
  """Image whose channels encode (row, column, 0) and aux encoding row*width + column."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.float32)
  aux = (rows * width + cols)[..., None].astype(np.float32)
  return image, aux


def _pixelwise(image, aux):
  """A per-pixel function of the inputs, in [0, 1] for coordinates below 100."""
  return (0.5 * image[..., 0:1] + 0.3 * image[..., 1:2] + 0.2 * (aux[..., 0:1] % 7)) / 100.0


@pytest.mark.parametrize("height, width", [(5, 3), (8, 8), (8, 13), (17, 9), (23, 30)])
@pytest.mark.parametrize("overlap", [0, 3])
def test_stitching_a_pixelwise_forward_is_exact(height, width, overlap):
  image, aux = _coordinate_raster(height, width)
  calls = []

  def forward(image_batch, aux_batch):
    calls.append(image_batch.shape)
    assert image_batch.dtype == np.float32 and aux_batch.dtype == np.float32
    return _pixelwise(image_batch, aux_batch)

  stitched = inference.predict_large(forward, image, aux, window=8, overlap=overlap,
                                     batch_size=3, pad_mode="constant")
  assert stitched.shape == (height, width) and stitched.dtype == np.float32
  np.testing.assert_allclose(stitched, _pixelwise(image, aux)[..., 0], rtol=1e-6, atol=1e-7)
  assert all(shape == (3, 8, 8, 3) for shape in calls)


def test_window_grid_hand_values_and_call_count():
  assert inference.window_starts(11, 4, 3) == [0, 3, 6, 7]
  assert inference.window_starts(10, 4, 3) == [0, 3, 6]
  assert inference.window_starts(4, 4, 4) == [0]
  assert inference.window_starts(9, 4, 4) == [0, 4, 5]
  image, aux = _coordinate_raster(11, 10)
  batches = []

  def forward(image_batch, aux_batch):
    batches.append(image_batch.copy())
    return np.zeros(image_batch.shape[:3] + (1,), np.float32)

  inference.predict_large(forward, image, aux, window=4, overlap=1, batch_size=5)
  windows = np.concatenate(batches)
  assert windows.shape[0] == 15  # 4 row starts x 3 column starts = 12, padded to 3 x 5
  # Window corners are encoded in the top-left pixel (row, column), row-major order.
  corners = [tuple(w[0, 0, :2].astype(int)) for w in windows[:12]]
  assert corners == [(r, c) for r in (0, 3, 6, 7) for c in (0, 3, 6)]
  assert np.all(windows[12:] == 0)


def test_blend_weights():
  weights = inference.blend_weights_1d(8, 3)
  np.testing.assert_allclose(weights[:3], 0.5 * (1 - np.cos(np.pi * np.arange(1, 4) / 4)))
  np.testing.assert_allclose(weights, weights[::-1])
  np.testing.assert_array_equal(weights[3:5], 1.0)
  assert np.all(weights > 0)
  np.testing.assert_array_equal(inference.blend_weights_1d(5, 0), np.ones(5))


def test_overlapping_windows_are_blended_with_the_weights():
  # The forward returns a constant per window (its call index), so the stitched value is the
  # weight-normalised average of the window indices covering each pixel.
  image = np.zeros((4, 6, 3), np.float32)
  aux = np.zeros((4, 6, 1), np.float32)
  counter = iter(range(10))

  def forward(image_batch, aux_batch):
    return np.full(image_batch.shape[:3] + (1,), float(next(counter)), np.float32)

  stitched = inference.predict_large(forward, image, aux, window=4, overlap=2, batch_size=1)
  # Column starts 0 and 2; ramp of 2 pixels: w = [0.25, 0.75, 0.75, 0.25].
  # Column 2 is window 0's pixel 2 (0.75) and window 1's pixel 0 (0.25): 0.25 * 1 / 1.0.
  # Column 3: window 0's pixel 3 (0.25), window 1's pixel 1 (0.75) -> 0.75.
  np.testing.assert_allclose(stitched[0], [0, 0, 0.25, 0.75, 1, 1], rtol=1e-6)
  np.testing.assert_allclose(stitched, np.broadcast_to(stitched[0], (4, 6)))


def test_small_image_padding_modes():
  image, aux = _coordinate_raster(3, 5)
  seen = []

  def forward(image_batch, aux_batch):
    seen.append(image_batch[0, :, :, 1].copy())
    return _pixelwise(image_batch, aux_batch)

  for mode in ("reflect", "constant"):
    stitched = inference.predict_large(forward, image, aux, window=8, overlap=2, batch_size=1,
                                       pad_mode=mode)
    np.testing.assert_allclose(stitched, _pixelwise(image, aux)[..., 0], rtol=1e-6)
  np.testing.assert_array_equal(seen[0][0], [0, 1, 2, 3, 4, 3, 2, 1])  # reflected columns
  np.testing.assert_array_equal(seen[1][0], [0, 1, 2, 3, 4, 0, 0, 0])  # zero padding


def test_uint8_inputs_are_passed_unscaled():
  image = np.full((6, 6, 3), 200, np.uint8)
  aux = np.full((6, 6, 1), 7, np.uint8)
  stitched = inference.predict_large(lambda i, a: i[..., :1] / 255.0 + a / 1000.0, image, aux,
                                     window=4, overlap=1, batch_size=2)
  np.testing.assert_allclose(stitched, 200 / 255 + 7 / 1000, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
  image, aux = _coordinate_raster(6, 6)
  forward = _pixelwise
  with pytest.raises(inference.InferenceInputError, match="overlap"):
    inference.predict_large(forward, image, aux, window=4, overlap=4, batch_size=1)
  with pytest.raises(inference.InferenceInputError, match="aux size"):
    inference.predict_large(forward, image, aux[:5], window=4, overlap=0, batch_size=1)
  with pytest.raises(inference.InferenceInputError, match="image must be"):
    inference.predict_large(forward, image[..., :2], aux, window=4, overlap=0, batch_size=1)
  broken = image.copy()
  broken[2, 2, 0] = np.nan
  with pytest.raises(inference.InferenceInputError, match="image contains NaN"):
    inference.predict_large(forward, broken, aux, window=4, overlap=0, batch_size=1)
  with pytest.raises(inference.InferenceInputError, match="forward returned shape"):
    inference.predict_large(lambda i, a: i, image, aux, window=4, overlap=0, batch_size=1)
  with pytest.raises(inference.InferenceInputError, match="NaN or infinite"):
    inference.predict_large(lambda i, a: a * np.nan, image, aux, window=4, overlap=0,
                            batch_size=1)
  with pytest.raises(inference.InferenceInputError, match="pad_mode"):
    inference.predict_large(forward, image, aux, window=4, overlap=0, batch_size=1,
                            pad_mode="edge")


def test_tta_of_an_equivariant_forward_equals_the_forward():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.random((2, 6, 6, 3)), jnp.float32)
  aux = jnp.asarray(rng.random((2, 6, 6, 1)), jnp.float32)
  augmented = jax.jit(inference.tta_dihedral(_pixelwise))
  np.testing.assert_allclose(augmented(image, aux), _pixelwise(image, aux), rtol=1e-6)


def test_tta_averages_the_eight_inverse_transforms():
  # A forward that ignores its input and returns the row index i / (w - 1): the 8 inverse
  # transforms of that map are i, j, w-1-i and w-1-j (each twice), whose mean is 1/2.
  width = 5

  def row_index(image, aux):
    rows = jnp.arange(width, dtype=jnp.float32)[None, :, None, None] / (width - 1)
    return jnp.broadcast_to(rows, image.shape[:3] + (1,))

  image = jnp.zeros((1, width, width, 3))
  aux = jnp.zeros((1, width, width, 1))
  np.testing.assert_allclose(inference.tta_dihedral(row_index)(image, aux), 0.5, rtol=1e-6)
  # A forward picking a non-symmetric pixel of the input: TTA restores alignment exactly.
  ramp = jnp.arange(width * width, dtype=jnp.float32).reshape(1, width, width, 1)
  np.testing.assert_allclose(
      inference.tta_dihedral(lambda i, a: a)(image, ramp), ramp, rtol=1e-6)


def test_predict_large_with_tta_forward():
  image, aux = _coordinate_raster(10, 12)
  forward = jax.jit(inference.tta_dihedral(_pixelwise))
  stitched = inference.predict_large(forward, image, aux, window=4, overlap=1, batch_size=4)
  np.testing.assert_allclose(stitched, _pixelwise(image, aux)[..., 0], rtol=1e-5, atol=1e-6)
