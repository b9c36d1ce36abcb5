"""Tests of cmmp_jax.losses against numpy/hand computations."""
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmmp_jax import losses


def _numpy_bce_dice(logits, labels, dice=True):
  """Reference in float64: mean BCE over pixels + (1 - batch soft Dice, smooth 1)."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.float64)
  probs = 1.0 / (1.0 + np.exp(-logits))
  bce = np.mean(-(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)))
  if not dice:
    return bce
  dice_coefficient = (2 * np.sum(probs * labels) + 1) / (np.sum(probs) + np.sum(labels) + 1)
  return bce + 1 - dice_coefficient


def test_bce_dice_matches_numpy_on_tiny_batch():
  logits = np.array([0.0, 2.0, -1.0, 3.0, -0.5, 1.5, 0.25, -2.0], np.float32).reshape(2, 2, 2, 1)
  labels = np.array([1, 0, 0, 1, 1, 1, 0, 0], np.uint8).reshape(2, 2, 2, 1)
  got = losses.bce_dice_loss(jnp.asarray(logits), jnp.asarray(labels))
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), _numpy_bce_dice(logits, labels), rtol=1e-6)
  bce_only = losses.bce_dice_loss(jnp.asarray(logits), jnp.asarray(labels), dice=False)
  np.testing.assert_allclose(float(bce_only), _numpy_bce_dice(logits, labels, dice=False),
                             rtol=1e-6)


def test_hand_computed_single_pixel_values():
  # logit 0 -> p = 0.5; label 1: BCE = ln 2; dice = (2*0.5 + 1) / (0.5 + 1 + 1) = 0.8.
  logits = jnp.zeros((1, 1, 1, 1))
  labels = jnp.ones((1, 1, 1, 1), jnp.uint8)
  np.testing.assert_allclose(float(losses.bce_dice_loss(logits, labels)),
                             np.log(2.0) + 0.2, rtol=1e-6)


def test_dice_is_over_whole_batch_not_per_example():
  logits = np.array([4.0, -4.0, 1.0, 0.0], np.float32).reshape(2, 1, 2, 1)
  labels = np.array([1, 0, 0, 0], np.float32).reshape(2, 1, 2, 1)
  dice_part = float(losses.bce_dice_loss(logits, labels)) - float(
      losses.bce_dice_loss(logits, labels, dice=False))
  probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
  batch_dice = (2 * np.sum(probs * labels) + 1) / (probs.sum() + labels.sum() + 1)
  per_example = np.mean([(2 * np.sum(p * y) + 1) / (p.sum() + y.sum() + 1)
                         for p, y in zip(probs, labels)])
  np.testing.assert_allclose(dice_part, 1 - batch_dice, rtol=1e-5)
  assert abs((1 - per_example) - (1 - batch_dice)) > 1e-2  # the two conventions differ here


def test_all_zero_labels():
  logits = np.array([-1.0, 0.5, 2.0, -3.0], np.float32).reshape(1, 2, 2, 1)
  labels = np.zeros((1, 2, 2, 1), np.uint8)
  probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
  expected = np.mean(-np.log(1 - probs)) + 1 - 1 / (probs.sum() + 1)
  np.testing.assert_allclose(float(losses.bce_dice_loss(logits, labels)), expected, rtol=1e-6)


def test_bce_is_stable_for_huge_logits_and_bfloat16():
  logits = jnp.array([1e4, -1e4, 200.0, -200.0], jnp.float32).reshape(1, 2, 2, 1)
  right = jnp.array([1, 0, 1, 0], jnp.float32).reshape(1, 2, 2, 1)
  wrong = 1 - right
  assert float(losses.bce_dice_loss(logits, right, dice=False)) == pytest.approx(0.0, abs=1e-6)
  # Wrong with full confidence costs |x| per pixel: (1e4 + 1e4 + 200 + 200) / 4.
  assert float(losses.bce_dice_loss(logits, wrong, dice=False)) == pytest.approx(5100.0)
  grads = jax.grad(lambda x: losses.bce_dice_loss(x, wrong))(logits)
  assert np.all(np.isfinite(np.asarray(grads)))
  half = losses.bce_dice_loss(logits.astype(jnp.bfloat16), right)
  assert half.dtype == jnp.float32 and np.isfinite(float(half))


def test_valid_rows_contribute_nothing():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 4, 1)).astype(np.float32)
  labels = (rng.random((3, 4, 4, 1)) > 0.5).astype(np.uint8)
  valid = np.array([True, False, True])
  garbage = logits.copy()
  garbage[1] = 1e3  # a padded row's content must not matter
  got = losses.bce_dice_loss(garbage, labels, valid=valid)
  expected = _numpy_bce_dice(logits[[0, 2]], labels[[0, 2]])
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  all_padding = losses.bce_dice_loss(logits, labels, valid=np.zeros(3, bool))
  assert float(all_padding) == 0.0
  jitted = jax.jit(lambda x, y, v: losses.bce_dice_loss(x, y, valid=v))
  np.testing.assert_allclose(float(jitted(garbage, labels, valid)), expected, rtol=1e-5)


def test_resize_labels_to_prediction_size_is_bilinear_without_rethreshold():
  labels = np.array([[1, 1, 0, 0],
                     [1, 0, 0, 0],
                     [0, 0, 1, 1],
                     [0, 0, 1, 1]], np.uint8).reshape(1, 4, 4, 1)
  logits = jnp.zeros((1, 2, 2, 1), jnp.bfloat16)
  resized = losses.resize_labels_to(logits, labels)
  assert resized.dtype == jnp.float32 and resized.shape == (1, 2, 2, 1)
  # A 2x reduction averages each 2x2 block (cv2 INTER_LINEAR), values kept soft.
  np.testing.assert_allclose(np.asarray(resized)[0, :, :, 0], [[0.75, 0.0], [0.0, 1.0]])
  # The loss uses exactly these soft labels.
  np.testing.assert_allclose(
      float(losses.bce_dice_loss(logits, labels)),
      _numpy_bce_dice(np.zeros((1, 2, 2, 1)), np.asarray(resized)), rtol=1e-5)


@pytest.mark.parametrize("source, target", [((8, 8), (4, 4)), ((10, 6), (8, 8)),
                                            ((3, 5), (6, 10))])
def test_resize_labels_matches_cv2_inter_linear(source, target):
  rng = np.random.default_rng(1)
  labels = (rng.random((2,) + source + (1,)) > 0.5).astype(np.float32)
  logits = jnp.zeros((2,) + target + (1,))
  resized = np.asarray(losses.resize_labels_to(logits, labels))
  for index in range(2):
    expected = cv2.resize(labels[index, :, :, 0], (target[1], target[0]),
                          interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(resized[index, :, :, 0], expected, atol=1e-6)


def test_shape_errors_name_the_field():
  with pytest.raises(losses.LossShapeError, match="labels"):
    losses.bce_dice_loss(jnp.zeros((2, 4, 4, 1)), jnp.zeros((3, 4, 4, 1)))
  with pytest.raises(losses.LossShapeError, match="logits"):
    losses.bce_dice_loss(jnp.zeros((4, 4, 1)), jnp.zeros((1, 4, 4, 1)))
  with pytest.raises(losses.LossShapeError, match="valid"):
    losses.bce_dice_loss(jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 4, 4, 1)), valid=jnp.ones(3))
