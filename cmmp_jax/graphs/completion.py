"""Trajectory-guided completion: what the GPS heat-map tells the road graph.

Two uses, both explainable from the fixes alone (GraphParams documents the knobs):
  * evidence for gap bridges (`TrafficEvidence`): a bridge sample sees traffic when it lies on
    a traffic ridge: the Gaussian-smoothed density of GPS fixes (heat-map pixels >= heat_min)
    is at least bridge_min_density there;
  * recovery of roads the image missed (`recover_missed_roads`): the skeleton of the ridges of
    fix density, minus what the prediction already covers, kept where a piece joins the
    predicted network at both ends (or at one end and the image border), painted into the road
    mask before skeletonising.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import scipy.ndimage
from skimage import morphology

from cmmp_jax.graphs import extract
from cmmp_jax.graphs.params import GraphParams

_EIGHT = np.ones((3, 3), bool)


def fix_pixels(heatmap, params: GraphParams) -> np.ndarray:
  """(H, W) or (H, W, 1) heat-map, float in [0, 1] or uint8 0..255 (compared without a float
  copy, which a mosaic cannot spare) -> bool (H, W): pixels holding a GPS fix (>= heat_min)."""
  heat = np.asarray(heatmap)
  if heat.ndim == 3 and heat.shape[2] == 1:
    heat = heat[..., 0]
  if heat.ndim != 2:
    raise extract.GraphInputError(f'heatmap must be (H, W), got shape {heat.shape}')
  level = max(params.heat_min, 1e-12)
  if heat.dtype == bool:
    return heat.copy()
  if np.issubdtype(heat.dtype, np.integer):
    return heat >= math.ceil(level * np.iinfo(heat.dtype).max - 1e-9)
  if not np.issubdtype(heat.dtype, np.floating):
    raise extract.GraphInputError(f'heatmap must be float, int or bool, got {heat.dtype}')
  if not np.isfinite(heat).all():
    raise extract.GraphInputError('heatmap contains NaN or inf')
  return heat >= level


def fix_density(fixes: np.ndarray, params: GraphParams) -> np.ndarray:
  """bool (H, W) fix pixels -> float32 (H, W) traffic density: their Gaussian average
  (recover_sigma), i.e. the share of nearby pixels holding a fix. Roads that vehicles drive form
  ridges of it; GPS noise and outliers scattered beside them do not."""
  return scipy.ndimage.gaussian_filter(fixes.astype(np.float32), params.recover_sigma)


class TrafficEvidence:
  """Callable: (K, 2) (x, y) points -> fraction of them on a traffic ridge (fix density >=
  bridge_min_density at their pixel).

  The density is computed on a crop around the points only (the Gaussian's reach, 4 sigma,
  beyond them), which gives the same values as the whole-array `fix_density` without holding a
  float copy of a mosaic.
  """

  def __init__(self, fixes: np.ndarray, params: GraphParams):
    self._fixes = fixes
    self._params = params
    self._margin = int(math.ceil(4.0 * params.recover_sigma)) + 1

  def __call__(self, points: np.ndarray) -> float:
    if not len(points):
      return 0.0
    height, width = self._fixes.shape
    cols = np.clip(np.rint(points[:, 0]).astype(np.int64), 0, width - 1)
    rows = np.clip(np.rint(points[:, 1]).astype(np.int64), 0, height - 1)
    r0, c0 = max(0, rows.min() - self._margin), max(0, cols.min() - self._margin)
    r1 = min(height, rows.max() + self._margin + 1)
    c1 = min(width, cols.max() + self._margin + 1)
    density = fix_density(self._fixes[r0:r1, c0:c1], self._params)
    return float(np.mean(density[rows - r0, cols - c0] >= self._params.bridge_min_density))


def _disk(radius: float) -> np.ndarray:
  radius = max(0, int(round(radius)))
  return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
  if radius <= 0:
    return mask.copy()
  return cv2.dilate(mask.astype(np.uint8), _disk(radius)) > 0


def recover_missed_roads(road: np.ndarray, density: np.ndarray,
                         params: GraphParams) -> tuple[np.ndarray, int]:
  """Road pieces the trajectories show but the prediction missed.

  Args:
    road: bool (H, W) cleaned predicted road mask.
    density: float (H, W) traffic density (`fix_density`).
    params: the recover_* fields.

  Returns:
    (bool (H, W) pixels to add to the road mask, number of pieces recovered).
  """
  ridge = density >= params.recover_density
  if not ridge.any():
    return np.zeros_like(road), 0
  # Roads are narrow ridges; a parking lot or a plaza full of fixes is a wide one. Cut out
  # every part of a ridge that holds a disk of diameter recover_max_width (a morphological
  # opening), with a margin, before thinning, so no recovered piece runs through a lot.
  diameter = int(round(params.recover_max_width))
  if diameter >= 1:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter + 1, diameter + 1))
    wide = cv2.morphologyEx(ridge.astype(np.uint8), cv2.MORPH_OPEN, kernel) > 0
    ridge &= ~_dilate(wide, params.recover_cover_radius + 2)
  ridge = morphology.remove_small_objects(ridge, min_size=max(1, int(params.min_blob_area)),
                                          connectivity=2)
  ridge_skeleton = morphology.skeletonize(ridge)
  covered = _dilate(road, params.recover_cover_radius)
  missed = ridge_skeleton & ~covered
  labels, count = scipy.ndimage.label(missed, structure=_EIGHT)
  if count == 0:
    return np.zeros_like(road), 0
  sizes = np.bincount(labels.ravel(), minlength=count + 1)
  # Contact clusters: missed pixels next to the covered band, grouped; a piece that fills a gap
  # touches the band at two separate places.
  contact = missed & _dilate(covered, 1)
  contact_labels, contact_count = scipy.ndimage.label(contact, structure=_EIGHT)
  contacts = np.zeros(count + 1, np.int64)
  contact_pixels = np.bincount(labels[contact], minlength=count + 1)
  if contact_count:
    pairs = np.unique(np.stack([labels[contact], contact_labels[contact]]), axis=1)
    contacts = np.bincount(pairs[0], minlength=count + 1)
  border = np.zeros(count + 1, bool)
  margin = 2
  for strip in (labels[:margin], labels[-margin:], labels[:, :margin], labels[:, -margin:]):
    border[np.unique(strip)] = True
  ids = np.arange(count + 1)
  keep = ((ids > 0) & (sizes >= params.recover_min_length)
          & ((contacts >= 2) | ((contacts >= 1) & border))
          & (contact_pixels <= 0.5 * sizes))
  if not keep.any():
    return np.zeros_like(road), 0
  kept = keep[labels]
  # Carry each kept piece through the covered band along its ridge so it meets the road.
  reach = _dilate(kept, params.recover_cover_radius + 2) & ridge_skeleton
  extra = _dilate(kept | reach, params.recover_width / 2.0) & ~road
  return extra, int(keep.sum())


def _clean_window(probabilities: np.ndarray, params: GraphParams, cut_sides) -> np.ndarray:
  """extract.clean_mask of a block, except that blobs cut by a block edge inside the raster
  (cut_sides: top, bottom, left, right) stay: they go on in the next block, so their size here
  says nothing, and the pieces that reach them must still see them."""
  road = extract.clean_mask(probabilities, params)
  dropped = (probabilities > params.threshold) & ~road
  if not dropped.any():
    return road
  labels, _ = scipy.ndimage.label(dropped, structure=_EIGHT)
  edges = [strip for strip, cut in zip((labels[0], labels[-1], labels[:, 0], labels[:, -1]),
                                       cut_sides) if cut]
  if edges:
    touching = np.unique(np.concatenate(edges))
    road |= np.isin(labels, touching[touching > 0])
  return road


def recover_in_blocks(probabilities: np.ndarray, fixes: np.ndarray,
                      params: GraphParams) -> tuple[np.ndarray, int]:
  """`recover_missed_roads` over a whole raster, block by block like extract.skeleton_of
  (block_size with block_overlap of context, cores kept), so that a mosaic's float density and
  label images exist one block at a time.

  A block edge inside the raster counts as a border for the piece rules (the piece goes on in
  the next block), so a piece crossing a seam is judged a little more leniently than on the
  whole array; pieces reach a core only from at least block_overlap pixels inside their block.

  Returns:
    (bool (H, W) pixels to add to the road mask, pieces recovered, counted per block).
  """
  height, width = probabilities.shape
  block = int(params.block_size)
  if not block or (height <= block and width <= block):
    return recover_missed_roads(extract.clean_mask(probabilities, params),
                                fix_density(fixes, params), params)
  overlap = int(params.block_overlap)
  core = block - 2 * overlap
  extra = np.zeros((height, width), bool)
  total = 0
  for r0 in range(0, height, core):
    for c0 in range(0, width, core):
      r1, c1 = min(r0 + core, height), min(c0 + core, width)
      wr0, wc0 = max(0, r0 - overlap), max(0, c0 - overlap)
      wr1, wc1 = min(height, r1 + overlap), min(width, c1 + overlap)
      window_fixes = fixes[wr0:wr1, wc0:wc1]
      if not window_fixes.any():
        continue
      road = _clean_window(probabilities[wr0:wr1, wc0:wc1], params,
                           (wr0 > 0, wr1 < height, wc0 > 0, wc1 < width))
      piece, count = recover_missed_roads(road, fix_density(window_fixes, params), params)
      extra[r0:r1, c0:c1] = piece[r0 - wr0:r1 - wr0, c0 - wc0:c1 - wc0]
      total += count
  return extra, total
