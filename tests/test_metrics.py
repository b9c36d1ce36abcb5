"""Tests of cmmp_jax.metrics on crafted masks with hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmmp_jax import metrics


def _logits_from(pred_mask):
  """+5 where road is predicted, -5 elsewhere; (B, H, W) 0/1 -> (B, H, W, 1) float32."""
  return np.where(np.asarray(pred_mask)[..., None] > 0, 5.0, -5.0).astype(np.float32)


def _tile(pred_pixels, label_pixels, size=3):
  """Pred and label 0/1 masks of size x size with road on the given flat pixel indices."""
  pred = np.zeros(size * size, np.uint8)
  label = np.zeros(size * size, np.uint8)
  pred[list(pred_pixels)] = 1
  label[list(label_pixels)] = 1
  return pred.reshape(size, size), label.reshape(size, size)


# Per tile (intersection, union): A (1, 2), B (3, 3), C (0, 0) empty, D (1, 4).
TILES = {
    "A": _tile([0, 1], [0]),
    "B": _tile([0, 1, 2], [0, 1, 2]),
    "C": _tile([], []),
    "D": _tile([4, 5], [5, 6, 7]),
}


def _batch(names):
  preds = np.stack([TILES[name][0] for name in names])
  labels = np.stack([TILES[name][1] for name in names])[..., None]
  return _logits_from(preds), labels


def test_tile_counts_hand_values_and_dtypes():
  logits, labels = _batch("ABCD")
  counts = jax.jit(metrics.tile_counts)(logits, labels)
  for key in ("intersection", "union", "tp", "fp", "fn", "valid"):
    assert counts[key].shape == (4,) and counts[key].dtype == jnp.int32
  np.testing.assert_array_equal(counts["intersection"], [1, 3, 0, 1])
  np.testing.assert_array_equal(counts["union"], [2, 3, 0, 4])
  np.testing.assert_array_equal(counts["fp"], [1, 0, 0, 1])
  np.testing.assert_array_equal(counts["fn"], [0, 0, 0, 2])


def test_g_iou_a_iou_and_tile_mean_differ_as_computed_by_hand():
  logits, labels = _batch("ABCD")
  accumulator = metrics.SegmentationMetrics()
  accumulator.update(metrics.tile_counts(logits[:2], labels[:2]))
  accumulator.update(metrics.tile_counts(logits[2:], labels[2:]))
  results = accumulator.compute(2)
  assert results["num_tiles"] == 4
  assert results["g_iou"] == pytest.approx(5 / 9)
  # Batches (A, B) -> 4/5 and (C, D) -> 1/4.
  assert results["a_iou"] == pytest.approx((0.8 + 0.25) / 2)
  # Tiles with a non-empty union: 1/2, 1, 1/4.
  assert results["mean_tile_iou"] == pytest.approx((0.5 + 1 + 0.25) / 3)
  # tp 5, fp 2, fn 2.
  assert results["precision"] == pytest.approx(5 / 7)
  assert results["recall"] == pytest.approx(5 / 7)
  assert results["f1"] == pytest.approx(5 / 7)
  # A_IoU depends on the batch size: 3 -> (A, B, C) 4/5 and (D) 1/4; 1 -> per tile, C scores 0.
  assert accumulator.compute(3)["a_iou"] == pytest.approx((0.8 + 0.25) / 2)
  assert accumulator.compute(4)["a_iou"] == pytest.approx(5 / 9)
  assert accumulator.compute(1)["a_iou"] == pytest.approx((0.5 + 1 + 0 + 0.25) / 4)
  assert accumulator.compute(1, empty_batch="skip")["a_iou"] == pytest.approx(1.75 / 3)


def test_empty_union_batch_zero_vs_skip():
  logits, labels = _batch("ABCCD")
  accumulator = metrics.SegmentationMetrics().update(metrics.tile_counts(logits, labels))
  # Batches of 2: (A, B) 0.8, (C, C) empty, (D) 0.25.
  assert accumulator.compute(2)["a_iou"] == pytest.approx((0.8 + 0.0 + 0.25) / 3)
  assert accumulator.compute(2, empty_batch="skip")["a_iou"] == pytest.approx((0.8 + 0.25) / 2)
  # Empty tiles change neither G_IoU nor the per-tile mean.
  assert accumulator.compute(2)["g_iou"] == pytest.approx(5 / 9)
  assert accumulator.compute(2)["mean_tile_iou"] == pytest.approx(1.75 / 3)
  assert accumulator.compute(2)["num_tiles"] == 5


def test_padded_rows_are_ignored():
  logits, labels = _batch("ABDA")
  valid = np.array([True, True, True, False])
  counts = metrics.tile_counts(logits, labels, valid)
  np.testing.assert_array_equal(counts["union"], [2, 3, 4, 0])
  np.testing.assert_array_equal(counts["valid"], [1, 1, 1, 0])
  accumulator = metrics.SegmentationMetrics().update(counts)
  results = accumulator.compute(2)
  assert results["num_tiles"] == 3
  assert results["g_iou"] == pytest.approx(5 / 9)
  assert results["a_iou"] == pytest.approx((0.8 + 0.25) / 2)


def test_prediction_is_resized_bilinearly_to_a_larger_label():
  # Probabilities [[0.55, 0.3], [0.3, 0.3]] upsampled 2x (half-pixel centres): pixel (0, 0)
  # stays 0.55; (0, 1) = 0.75*0.55 + 0.25*0.3 = 0.4875; (1, 1) = 0.5625*0.55 + 0.4375*0.3 =
  # 0.44. Only (0, 0) exceeds 0.5, whereas a nearest-neighbour upsampling would predict the
  # whole top-left 2x2 block.
  probs = np.array([[0.55, 0.3], [0.3, 0.3]])
  logits = np.log(probs / (1 - probs)).astype(np.float32).reshape(1, 2, 2, 1)
  label = np.zeros((1, 4, 4, 1), np.uint8)
  label[0, :2, :2] = 1
  counts = metrics.tile_counts(logits, label)
  assert int(counts["intersection"][0]) == 1
  assert int(counts["union"][0]) == 4
  assert int(counts["fn"][0]) == 3


def test_labels_thresholded_strictly_above_half():
  probs = np.full((1, 1, 3, 1), 0.9, np.float32)
  labels = np.array([0.5, 0.51, 1.0], np.float32).reshape(1, 1, 3, 1)
  counts = metrics.tile_counts_from_probs(probs, labels)
  assert int(counts["tp"][0]) == 2 and int(counts["fp"][0]) == 1


def test_merge_keeps_dataset_order():
  logits, labels = _batch("ABCD")
  first = metrics.SegmentationMetrics().update(metrics.tile_counts(logits[:1], labels[:1]))
  second = metrics.SegmentationMetrics().update(metrics.tile_counts(logits[1:], labels[1:]))
  merged = first.merge(second)
  np.testing.assert_array_equal(merged.counts()["union"], [2, 3, 0, 4])
  assert merged.compute(2)["a_iou"] == pytest.approx(0.525)
  assert first.num_tiles == 1  # merge does not modify its operands


def test_undefined_values_are_nan_and_empty_raises():
  empty = metrics.SegmentationMetrics()
  with pytest.raises(metrics.NoTilesError):
    empty.compute(4)
  logits, labels = _batch("C")
  results = metrics.SegmentationMetrics().update(metrics.tile_counts(logits, labels)).compute(1)
  assert np.isnan(results["g_iou"]) and np.isnan(results["precision"])
  assert results["a_iou"] == 0.0
  assert np.isnan(metrics.SegmentationMetrics().update(
      metrics.tile_counts(logits, labels)).compute(1, empty_batch="skip")["a_iou"])


def test_bad_counts_are_rejected_without_changing_the_accumulator():
  logits, labels = _batch("AB")
  accumulator = metrics.SegmentationMetrics().update(metrics.tile_counts(logits, labels))
  good = {key: np.asarray(value) for key, value in metrics.tile_counts(logits, labels).items()}
  with pytest.raises(metrics.MetricsInputError, match="fn"):
    accumulator.update({k: v for k, v in good.items() if k != "fn"})
  with pytest.raises(metrics.MetricsInputError, match="lengths"):
    accumulator.update(dict(good, tp=good["tp"][:1]))
  with pytest.raises(metrics.MetricsInputError, match="NaN"):
    accumulator.update(dict(good, union=np.array([np.nan, 3.0])))
  with pytest.raises(metrics.MetricsInputError, match="negative"):
    accumulator.update(dict(good, fp=np.array([-1, 0])))
  with pytest.raises(metrics.MetricsInputError, match="union"):
    accumulator.update(dict(good, union=good["union"] + 1))
  with pytest.raises(ValueError, match="batch_size_for_a_iou"):
    accumulator.compute(0)
  with pytest.raises(ValueError, match="empty_batch"):
    accumulator.compute(2, empty_batch="drop")
  assert accumulator.num_tiles == 2
  assert accumulator.compute(2)["g_iou"] == pytest.approx(4 / 5)


def test_tile_counts_shape_errors():
  with pytest.raises(metrics.MetricsInputError, match="batch size"):
    metrics.tile_counts(jnp.zeros((2, 4, 4, 1)), jnp.zeros((3, 4, 4, 1)))
  with pytest.raises(metrics.MetricsInputError, match="valid"):
    metrics.tile_counts(jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 4, 4, 1)), jnp.ones(3, bool))


def test_train_metrics_average_loss():
  collected = metrics.TrainMetrics.empty()
  for loss in (1.0, 2.0, 6.0):
    collected = collected.merge(metrics.TrainMetrics.single_from_model_output(loss=jnp.array(loss)))
  assert float(collected.compute()["loss"]) == pytest.approx(3.0)
