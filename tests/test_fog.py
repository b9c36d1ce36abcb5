"""Tests for cmmp_jax.data.fog: seeded, spatially varying fog by the scattering model."""
import numpy as np
import pytest

from cmmp_jax.data import fog


def _image(height=48, width=64, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_add_fog_is_deterministic_per_seed():
  image = _image()
  first = fog.add_fog(image, seed=3)
  assert first.dtype == np.uint8 and first.shape == image.shape
  np.testing.assert_array_equal(first, fog.add_fog(image, seed=3))
  np.testing.assert_array_equal(first, fog.add_fog(image, seed=np.random.default_rng(3)))
  assert not np.array_equal(first, fog.add_fog(image, seed=4))


def test_add_fog_follows_scattering_model():
  image = _image()
  foggy, transmission = fog.add_fog(image, seed=1, beta=1.0, airlight=(0.8, 0.9, 1.0),
                                    return_transmission=True)
  t = transmission[..., None]
  expected = np.rint(255 * (image / 255.0 * t + np.array([0.8, 0.9, 1.0]) * (1 - t)))
  np.testing.assert_array_equal(foggy, expected.astype(np.uint8))


def test_fog_density_is_smooth_and_in_range():
  transmission = fog.fog_transmission(128, 96, seed=2, beta=1.2, density_variation=0.6)
  # d in [0.4, 1] -> t in [exp(-1.2), exp(-0.48)], both ends reached after rescaling.
  assert transmission.min() == pytest.approx(np.exp(-1.2))
  assert transmission.max() == pytest.approx(np.exp(-0.48))
  # Smooth: neighbouring pixels differ far less than the overall range.
  step = np.abs(np.diff(transmission, axis=1)).max()
  assert step < 0.1 * (transmission.max() - transmission.min())
  uniform = fog.fog_transmission(16, 16, seed=2, beta=0.7, density_variation=0.0)
  np.testing.assert_allclose(uniform, np.exp(-0.7))


def test_fog_is_monotone_in_density():
  image = _image()
  airlight = 0.9 * 255
  previous = fog.add_fog(image, seed=5, beta=0.0)
  np.testing.assert_array_equal(previous, image)  # beta 0: no fog at all
  for beta in (0.5, 1.0, 2.0, 4.0):
    current = fog.add_fog(image, seed=5, beta=beta)
    # Every pixel moves towards the airlight (allowing 1 for rounding)...
    assert np.all(np.abs(current - airlight) <= np.abs(previous.astype(float) - airlight) + 1)
    # ...and the contrast drops.
    assert current.astype(float).std() < previous.astype(float).std()
    previous = current


def test_add_fog_rejects_bad_inputs():
  with pytest.raises(ValueError, match="uint8"):
    fog.add_fog(_image().astype(np.float32), seed=0)
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    fog.add_fog(_image()[..., :2], seed=0)
  with pytest.raises(ValueError, match="airlight"):
    fog.add_fog(_image(), seed=0, airlight=1.5)
  with pytest.raises(ValueError, match="beta"):
    fog.add_fog(_image(), seed=0, beta=-1.0)
  with pytest.raises(TypeError, match="seed"):
    fog.add_fog(_image(), seed=None)
