"""Road-segmentation metrics: per-tile pixel counts on device, IoU variants on the host.

Protocol of the reference release (REFERENCE.md, "Metrics"):
  * The predicted probability map is resized to the LABEL's resolution (bilinear, half-pixel
    centres, no anti-aliasing: cv2 INTER_LINEAR, as the release does) and thresholded with
    p > 0.5; the label is thresholded with y > 0.5.
  * Per tile: intersection = tp, union = tp + fp + fn.
  * G_IoU = sum of intersections / sum of unions over all tiles. (The release skips tiles with
    an empty union, which changes neither sum.)
  * A_IoU as published (Sun et al.'s convention) = mean over evaluation batches of the batch's
    summed intersection / summed union. It depends on the batch size and on the dataset order,
    so it is recomputed on the host from the per-tile counts grouped into consecutive chunks of
    the configured batch size (the last chunk may be smaller, as with drop_last=False). The
    release scores a batch whose intersection is 0 as IoU 0 and still counts it in the mean;
    this includes a batch whose union is empty (no road predicted or labelled). That is the
    default ('zero'); 'skip' leaves empty-union batches out of the mean instead.
  * mean_tile_iou = mean over tiles with a non-empty union of I / U (the stricter variant).
  * precision, recall, f1 are micro-averaged: computed from tp, fp, fn summed over all tiles.

All metric values are fractions in [0, 1] (the paper prints percentages). An undefined value
(e.g. precision when nothing was predicted as road) is NaN (null in the JSON files).

Also defines `TrainMetrics`, a clu.metrics Collection averaging the training loss.
"""
from typing import Dict, Mapping, Optional

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np

COUNT_KEYS = ("intersection", "union", "tp", "fp", "fn")
EMPTY_BATCH_MODES = ("zero", "skip")


class MetricsInputError(ValueError):
  """Counts or arrays handed to the metrics have the wrong shape, type or values."""


class NoTilesError(ValueError):
  """Metrics were computed before any (valid) tile was accumulated."""


def tile_counts_from_probs(probs: jnp.ndarray,
                           labels: jnp.ndarray,
                           valid: Optional[jnp.ndarray] = None,
                           threshold: float = 0.5) -> Dict[str, jnp.ndarray]:
  """Per-tile pixel counts from road probabilities (jit-able).

  Args:
    probs: (B, h, w, 1) float road probabilities in [0, 1].
    labels: (B, H, W, 1) uint8 or float labels (1 = road).
    valid: optional (B,) bool; False marks a padded row.
    threshold: a pixel is road when its value is strictly greater than this, for both the
      (resized) prediction and the label.

  Returns:
    dict of (B,) int32 arrays: 'intersection', 'union', 'tp', 'fp', 'fn', and 'valid' (1 for
    real rows, 0 for padding; the counts of padded rows are zeroed too).
  """
  if probs.ndim != 4 or labels.ndim != 4:
    raise MetricsInputError(
        f"probs and labels must be NHWC (4-D); got shapes {tuple(probs.shape)} and "
        f"{tuple(labels.shape)}")
  if probs.shape[0] != labels.shape[0] or probs.shape[3] != labels.shape[3]:
    raise MetricsInputError(
        f"probs shape {tuple(probs.shape)} and labels shape {tuple(labels.shape)} differ in "
        "batch size or channel count")
  batch_size = probs.shape[0]
  probs = jnp.asarray(probs, jnp.float32)
  if probs.shape[1:3] != labels.shape[1:3]:
    # The release resizes the prediction (not the label) for evaluation, with cv2's bilinear.
    probs = jax.image.resize(
        probs, labels.shape[:3] + probs.shape[3:], method="bilinear", antialias=False)
  predicted_road = probs > threshold
  labelled_road = jnp.asarray(labels, jnp.float32) > threshold

  if valid is None:
    valid_rows = jnp.ones((batch_size,), jnp.int32)
  else:
    valid = jnp.asarray(valid)
    if valid.shape != (batch_size,):
      raise MetricsInputError(
          f"valid must have shape ({batch_size},); got {tuple(valid.shape)}")
    valid_rows = valid.astype(bool).astype(jnp.int32)

  def count(mask):
    return jnp.sum(mask, axis=(1, 2, 3), dtype=jnp.int32) * valid_rows

  tp = count(predicted_road & labelled_road)
  fp = count(predicted_road & ~labelled_road)
  fn = count(~predicted_road & labelled_road)
  return {
      "intersection": tp,
      "union": tp + fp + fn,
      "tp": tp,
      "fp": fp,
      "fn": fn,
      "valid": valid_rows,
  }


def tile_counts(logits: jnp.ndarray,
                labels: jnp.ndarray,
                valid: Optional[jnp.ndarray] = None) -> Dict[str, jnp.ndarray]:
  """Per-tile pixel counts from logits (jit-able); see `tile_counts_from_probs`.

  Args:
    logits: (B, h, w, 1) float32 or bfloat16 pre-sigmoid scores. They are turned into
      probabilities BEFORE the bilinear resize to the label's size, as the release resizes its
      sigmoid outputs.
    labels: (B, H, W, 1) uint8 or float labels (1 = road).
    valid: optional (B,) bool; False marks a padded row.

  Returns:
    dict of (B,) int32 arrays 'intersection', 'union', 'tp', 'fp', 'fn', 'valid'.
  """
  probs = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
  return tile_counts_from_probs(probs, labels, valid)


def _ratio(numerator: float, denominator: float) -> float:
  return float(numerator) / float(denominator) if denominator > 0 else float("nan")


class SegmentationMetrics:
  """Host-side (numpy) accumulator of per-tile counts, in dataset order.

  Usage:
    metrics = SegmentationMetrics()
    for batch in eval_batches:
      metrics.update(jitted_tile_counts(logits, batch['mask'], batch_valid))
    results = metrics.compute(batch_size_for_a_iou=8)
  """

  def __init__(self):
    self._chunks = {key: [] for key in COUNT_KEYS}

  @property
  def num_tiles(self) -> int:
    return int(sum(chunk.shape[0] for chunk in self._chunks["union"]))

  def counts(self) -> Dict[str, np.ndarray]:
    """Returns the accumulated per-tile counts: dict of (N,) int64 arrays, dataset order."""
    return {
        key: (np.concatenate(chunks) if chunks else np.zeros((0,), np.int64))
        for key, chunks in self._chunks.items()
    }

  def update(self, counts: Mapping[str, np.ndarray]) -> "SegmentationMetrics":
    """Appends one batch of per-tile counts (the output of `tile_counts`).

    Rows whose 'valid' entry is 0 (padding) are dropped. The batch is checked completely
    before anything is appended, so a bad batch leaves the accumulator unchanged.

    Args:
      counts: mapping with (B,) integer arrays for 'intersection', 'union', 'tp', 'fp', 'fn'
        and optionally 'valid'; device arrays are copied to the host.

    Returns:
      self, to allow chaining.

    Raises:
      MetricsInputError: a key is missing, shapes differ, a value is not a finite
        non-negative integer, or the counts are inconsistent (intersection != tp,
        union != tp + fp + fn).
    """
    missing = [key for key in COUNT_KEYS if key not in counts]
    if missing:
      raise MetricsInputError(f"counts lack the field(s) {missing}; got {sorted(counts)}")
    host = {}
    for key in COUNT_KEYS + (("valid",) if "valid" in counts else ()):
      values = np.asarray(jax.device_get(counts[key]))
      if values.ndim != 1:
        raise MetricsInputError(
            f"counts['{key}'] must be a 1-D per-tile array; got shape {values.shape}")
      if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
          raise MetricsInputError(f"counts['{key}'] contains NaN or infinity")
        if not np.all(values == np.round(values)):
          raise MetricsInputError(f"counts['{key}'] contains non-integer values")
      elif values.dtype.kind not in "iub":
        raise MetricsInputError(f"counts['{key}'] has non-numeric dtype {values.dtype}")
      if np.any(values < 0):
        raise MetricsInputError(f"counts['{key}'] contains negative values")
      host[key] = values.astype(np.int64)
    sizes = {key: values.shape[0] for key, values in host.items()}
    if len(set(sizes.values())) != 1:
      raise MetricsInputError(f"count fields have different lengths: {sizes}")
    if not np.array_equal(host["intersection"], host["tp"]):
      raise MetricsInputError("counts['intersection'] differs from counts['tp']")
    if not np.array_equal(host["union"], host["tp"] + host["fp"] + host["fn"]):
      raise MetricsInputError("counts['union'] differs from tp + fp + fn")

    keep = host.pop("valid", None)
    keep = np.ones(sizes["union"], bool) if keep is None else keep > 0
    for key in COUNT_KEYS:
      self._chunks[key].append(host[key][keep])
    return self

  def merge(self, other: "SegmentationMetrics") -> "SegmentationMetrics":
    """Returns a new accumulator holding self's tiles followed by other's tiles."""
    if not isinstance(other, SegmentationMetrics):
      raise MetricsInputError(f"cannot merge SegmentationMetrics with {type(other).__name__}")
    merged = SegmentationMetrics()
    for key in COUNT_KEYS:
      merged._chunks[key] = list(self._chunks[key]) + list(other._chunks[key])
    return merged

  def compute(self, batch_size_for_a_iou: int, *, empty_batch: str = "zero") -> Dict[str, float]:
    """Computes the metrics over all accumulated tiles.

    Args:
      batch_size_for_a_iou: evaluation batch size that defines A_IoU's batches (the release
        evaluates with 4 per GPU times the number of GPUs); tiles are grouped in dataset order,
        the last group may be smaller.
      empty_batch: how A_IoU treats a batch with an empty union: 'zero' (the release: IoU 0,
        counted in the mean) or 'skip' (left out of the mean).

    Returns:
      dict of Python floats in [0, 1] (NaN where undefined): 'g_iou', 'a_iou',
      'mean_tile_iou', 'precision', 'recall', 'f1', and 'num_tiles' (int, valid tiles).

    Raises:
      NoTilesError: no valid tile has been accumulated.
      ValueError: batch_size_for_a_iou < 1 or an unknown empty_batch mode.
    """
    is_integer = (isinstance(batch_size_for_a_iou, (int, np.integer))
                  and not isinstance(batch_size_for_a_iou, bool))
    if not is_integer or batch_size_for_a_iou < 1:
      raise ValueError(
          f"batch_size_for_a_iou must be a positive integer; got {batch_size_for_a_iou!r}")
    batch_size = int(batch_size_for_a_iou)
    if empty_batch not in EMPTY_BATCH_MODES:
      raise ValueError(f"empty_batch must be one of {EMPTY_BATCH_MODES}; got {empty_batch!r}")
    counts = self.counts()
    num_tiles = counts["union"].shape[0]
    if num_tiles == 0:
      raise NoTilesError("no valid tiles were accumulated; cannot compute metrics")
    intersection, union = counts["intersection"], counts["union"]

    batch_ious = []
    for start in range(0, num_tiles, batch_size):
      batch_intersection = intersection[start:start + batch_size].sum()
      batch_union = union[start:start + batch_size].sum()
      if batch_union == 0:
        if empty_batch == "zero":
          batch_ious.append(0.0)
        continue
      batch_ious.append(batch_intersection / batch_union)
    a_iou = float(np.mean(batch_ious)) if batch_ious else float("nan")

    nonempty = union > 0
    mean_tile_iou = (float(np.mean(intersection[nonempty] / union[nonempty]))
                     if np.any(nonempty) else float("nan"))

    tp, fp, fn = counts["tp"].sum(), counts["fp"].sum(), counts["fn"].sum()
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    # 2PR/(P+R) == 2tp/(2tp+fp+fn); the count form is defined whenever anything is road.
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "g_iou": _ratio(intersection.sum(), union.sum()),
        "a_iou": a_iou,
        "mean_tile_iou": mean_tile_iou,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "num_tiles": int(num_tiles),
    }


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """clu Collection averaging the scalar 'loss' output over steps (and devices).

  Example: TrainMetrics.single_from_model_output(loss=loss) inside the train step, then
  `.merge` on the host and `.compute()['loss']`.
  """
  loss: clu_metrics.Average.from_output("loss")
