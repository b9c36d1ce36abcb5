"""Procedural synthetic city: aerial image, GPS trajectories, lidar-like heights and road mask.

The project's embedded default data set. Each tile is generated from one integer seed with numpy
and OpenCV only, so it needs no download and is identical wherever the pinned numpy and OpenCV
versions are installed.

The city is built so that neither modality alone solves the task:

* The image is ambiguous where the GPS is clear: rivers, railway lines and flat grey roofs are
  painted in the same asphalt greys as roads (look-alikes, never in the mask, never driven), and
  street trees, tree groves and shadows hide parts of real roads (occlusions, always driven when
  the road has GPS coverage).
* The GPS is ambiguous where the image is clear: some roads carry no traffic at all and a random
  disc of the tile can lose every fix (dropout), while parking lots are full of slow GPS points
  yet are not roads (they are painted as light concrete with stalls and parked cars).
* GPS fixes carry per-trip drift and per-point noise, and a few outliers land anywhere.

All lengths in this module are given in pixels of a 128 px tile and scale with `size / 128`, so a
512 px tile shows the same kind of city at four times the resolution. Coordinates follow the image
convention: col = x grows to the east (right), row = y grows to the south (down).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import cv2
import numpy as np

from cmmp_jax.data import heatmap

BASE_SIZE = 128
SPLITS = ('train', 'validation', 'test')
AUX_KINDS = ('gps', 'lidar', 'gps_channels')
GPS_CHANNEL_NAMES = ('heatmap', 'mean_speed', 'heading_sin', 'heading_cos')

# Codes of `tile['gps_source']`: where each GPS fix came from.
GPS_SOURCE_ROAD = 0
GPS_SOURCE_PARKING = 1
GPS_SOURCE_OUTLIER = 2

# Lidar encoding: uint8 value = LIDAR_SCALE * (height above ground in metres + LIDAR_OFFSET_M),
# clipped to [0, 255]; bare ground is 12, water 3, a 20 m building 132.
LIDAR_SCALE = 6.0
LIDAR_OFFSET_M = 2.0


class SyntheticConfigError(ValueError):
  """A SyntheticConfig field (named in the message) has an invalid value."""


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size, split sizes and difficulty knobs of the synthetic city.

  Probabilities are per tile unless stated otherwise; densities are per pixel of road length in
  a 128 px tile.
  """
  size: int = 128
  num_train: int = 64
  num_validation: int = 16
  num_test: int = 16
  base_seed: int = 0
  # Fake geographic placement (for 'bounds'): tiles lie within placement_radius_m of the origin.
  tile_extent_m: float = 256.0
  origin_lon: float = 116.30
  origin_lat: float = 39.90
  placement_radius_m: float = 5000.0
  # Road network.
  max_arterials_per_direction: int = 2
  min_local_streets: int = 2
  max_local_streets: int = 5
  # GPS.
  arterial_gps_coverage: float = 0.9  # probability that an arterial carries any traffic
  local_gps_coverage: float = 0.5  # same for a local street
  trips_per_road: float = 6.0  # mean number of trips on a covered road
  gps_spacing_px: float = 3.0  # mean distance between consecutive fixes of a trip
  gps_noise_px: float = 1.0  # std of independent per-fix noise
  gps_drift_px: float = 1.5  # std of the slowly varying per-trip drift
  gps_outlier_fraction: float = 0.02
  gps_dropout_probability: float = 0.3  # a disc of the tile loses every fix
  parking_lots_mean: float = 1.0
  parking_points_per_lot: float = 250.0
  # Image.
  street_tree_density: float = 0.03
  grove_probability: float = 0.5  # a cluster of trees hides a stretch of road
  river_probability: float = 0.35
  rail_probability: float = 0.35
  grey_roof_probability: float = 0.3  # per building: asphalt-grey flat roof
  building_attempts: int = 60
  image_noise: float = 5.0
  fog_strength: float = 0.0  # 0 = clear; 0.6 looks like the paper's foggy images

  def __post_init__(self):
    for name in ('size', 'num_train', 'num_validation', 'num_test', 'base_seed',
                 'max_arterials_per_direction', 'min_local_streets', 'max_local_streets',
                 'building_attempts'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SyntheticConfigError(f'SyntheticConfig.{name} must be an int, got {value!r}')
      if value < 0:
        raise SyntheticConfigError(f'SyntheticConfig.{name} must be >= 0, got {value}')
    if self.size < 32 or self.size % 32:
      raise SyntheticConfigError(
          f'SyntheticConfig.size must be a multiple of 32 and >= 32 (the networks downsample '
          f'by 32), got {self.size}')
    if self.max_arterials_per_direction < 1:
      raise SyntheticConfigError('SyntheticConfig.max_arterials_per_direction must be >= 1')
    if self.min_local_streets > self.max_local_streets:
      raise SyntheticConfigError(
          f'SyntheticConfig.min_local_streets ({self.min_local_streets}) exceeds '
          f'max_local_streets ({self.max_local_streets})')
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, float) and not math.isfinite(value):
        raise SyntheticConfigError(f'SyntheticConfig.{field.name} must be finite, got {value}')
    for name in ('arterial_gps_coverage', 'local_gps_coverage', 'gps_outlier_fraction',
                 'gps_dropout_probability', 'grove_probability', 'river_probability',
                 'rail_probability', 'grey_roof_probability', 'fog_strength'):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise SyntheticConfigError(f'SyntheticConfig.{name} must be in [0, 1], got {value}')
    for name in ('tile_extent_m', 'gps_spacing_px'):
      if getattr(self, name) <= 0:
        raise SyntheticConfigError(f'SyntheticConfig.{name} must be > 0, got {getattr(self, name)}')
    for name in ('placement_radius_m', 'trips_per_road', 'gps_noise_px', 'gps_drift_px',
                 'parking_lots_mean', 'parking_points_per_lot', 'street_tree_density',
                 'image_noise'):
      if getattr(self, name) < 0:
        raise SyntheticConfigError(f'SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}')
    if not -90.0 < self.origin_lat < 90.0 or not -180.0 <= self.origin_lon <= 180.0:
      raise SyntheticConfigError(
          f'SyntheticConfig.origin_lon/origin_lat out of range: ({self.origin_lon}, {self.origin_lat})')

  def num_examples(self, split: str) -> int:
    """Number of tiles in `split` ('train', 'validation' or 'test')."""
    if split not in SPLITS:
      raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
    return {'train': self.num_train, 'validation': self.num_validation,
            'test': self.num_test}[split]


def tile_seed(base_seed: int, split: str, index: int) -> int:
  """Seed of tile `index` of `split`, derived from (base_seed, split, index); a 64-bit int.

  Uses numpy's SeedSequence so neighbouring indices and splits give unrelated streams; the
  split name enters through its CRC-32 so the mapping never depends on Python's hash seed.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  if index < 0 or base_seed < 0:
    raise ValueError(f'base_seed and index must be >= 0, got {base_seed}, {index}')
  sequence = np.random.SeedSequence(
      entropy=int(base_seed), spawn_key=(zlib.crc32(split.encode()), int(index)))
  return int(sequence.generate_state(1, np.uint64)[0])


def tile_id(split: str, index: int) -> str:
  """Identifier of tile `index` of `split`, e.g. 'train_00007'."""
  return f'{split}_{index:05d}'


# ---------------------------------------------------------------------------------------------
# Geometry helpers. Polylines are float64 arrays (N, 2) of (x, y) = (col, row) pixel positions.


@dataclasses.dataclass
class _Road:
  points: np.ndarray  # (N, 2) float64 (x, y)
  width: float  # pixels
  kind: str  # 'arterial' or 'local'
  has_gps: bool = False
  grey: float = 105.0


def _chaikin(points: np.ndarray, iterations: int = 2) -> np.ndarray:
  """Corner-cutting smoothing that keeps both end points; (N, 2) -> (~N * 2**iterations, 2)."""
  for _ in range(iterations):
    a, b = points[:-1], points[1:]
    q = 0.75 * a + 0.25 * b
    r = 0.25 * a + 0.75 * b
    middle = np.stack([q, r], axis=1).reshape(-1, 2)
    points = np.concatenate([points[:1], middle, points[-1:]], axis=0)
  return points


def _arc_lengths(points: np.ndarray) -> np.ndarray:
  """Cumulative arc length at each vertex, (N,) float64 starting at 0."""
  steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
  return np.concatenate([[0.0], np.cumsum(steps)])


def _sample_polyline(points: np.ndarray, arc: np.ndarray, positions: np.ndarray):
  """Points and unit tangents at arc-length `positions`: two (M, 2) float64 arrays."""
  positions = np.clip(positions, 0.0, arc[-1])
  xy = np.stack([np.interp(positions, arc, points[:, 0]),
                 np.interp(positions, arc, points[:, 1])], axis=1)
  segment = np.clip(np.searchsorted(arc, positions, side='right') - 1, 0, len(points) - 2)
  tangent = points[segment + 1] - points[segment]
  tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
  return xy, tangent


def _inside(xy: np.ndarray, size: int, margin: float = 0.0) -> np.ndarray:
  """Boolean (M,) : which points lie in [-margin, size + margin) on both axes."""
  return np.all((xy >= -margin) & (xy < size + margin), axis=1)


def _in_tile_arc_range(points: np.ndarray, arc: np.ndarray, size: int):
  """(start, end) arc lengths of the part of a polyline inside the tile; None if it misses."""
  inside = _inside(points, size)
  if not inside.any():
    return None
  idx = np.flatnonzero(inside)
  return arc[max(idx[0] - 1, 0)], arc[min(idx[-1] + 1, len(arc) - 1)]


def _random_walk(rng, start, heading, length, step, curvature_std, size, margin):
  """A smoothly curving path: (N, 2) float64; stops after `length` px or outside the margin."""
  points = [np.asarray(start, np.float64)]
  curvature = rng.normal(0.0, curvature_std)
  for _ in range(int(length / step)):
    curvature = float(np.clip(curvature + rng.normal(0.0, curvature_std * 0.3),
                              -3 * curvature_std, 3 * curvature_std))
    heading += curvature * step
    nxt = points[-1] + step * np.array([math.cos(heading), math.sin(heading)])
    points.append(nxt)
    if not _inside(nxt[None], size, margin)[0]:
      break
  return np.stack(points)


def _to_cv(points: np.ndarray) -> np.ndarray:
  """Polyline to OpenCV int32 (N, 1, 2) with 4 fractional bits (draw with shift=4)."""
  return np.round(points * 16.0).astype(np.int32).reshape(-1, 1, 2)


def _draw_polyline(layer: np.ndarray, points: np.ndarray, width: float, value=1) -> None:
  """Draws a thick polyline into `layer` in place; thickness round(width) >= 1 px."""
  cv2.polylines(layer, [_to_cv(points)], False, value, max(1, int(round(width))),
                cv2.LINE_8, 4)


def _fill_polygon(layer: np.ndarray, corners: np.ndarray, value=1) -> None:
  cv2.fillPoly(layer, [_to_cv(corners)], value, cv2.LINE_8, 4)


def _box(center, length, depth, angle) -> np.ndarray:
  """Corners (4, 2) of a rectangle: `length` along direction `angle` (radians), `depth` across."""
  u = np.array([math.cos(angle), math.sin(angle)]) * length / 2
  v = np.array([-math.sin(angle), math.cos(angle)]) * depth / 2
  c = np.asarray(center, np.float64)
  return np.stack([c - u - v, c + u - v, c + u + v, c - u + v])


def _disc(layer: np.ndarray, center, radius: float, value=1) -> None:
  cv2.circle(layer, tuple(int(v) for v in np.round(np.asarray(center) * 16)),
             max(1, int(round(radius * 16))), value, -1, cv2.LINE_8, 4)


def _value_noise(rng, size: int, cell: float) -> np.ndarray:
  """Smooth random field in [0, 1], (size, size) float32, features about `cell` px wide."""
  n = max(2, int(math.ceil(size / max(cell, 1.0))) + 2)
  coarse = rng.random((n, n)).astype(np.float32)
  return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)


def _spaced_positions(rng, count, low, high, min_gap) -> list[float]:
  """Up to `count` sorted values in [low, high] at least `min_gap` apart (rejection sampling)."""
  chosen: list[float] = []
  for _ in range(50 * count):
    if len(chosen) == count:
      break
    candidate = rng.uniform(low, high)
    if all(abs(candidate - c) >= min_gap for c in chosen):
      chosen.append(candidate)
  return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# City layout.


def _make_roads(rng, size: int, scale: float, config: SyntheticConfig):
  """Arterials on a tilted grid plus curved local streets; returns (roads, grid angle)."""
  grid_angle = rng.uniform(-0.4, 0.4)
  roads: list[_Road] = []
  center = np.array([size / 2, size / 2])
  for axis_angle in (math.pi / 2, 0.0):  # roads running north-south, then east-west
    count = int(rng.integers(1, config.max_arterials_per_direction + 1))
    for offset in _spaced_positions(rng, count, 0.15 * size, 0.85 * size, 0.3 * size):
      angle = grid_angle + axis_angle + rng.normal(0.0, 0.05)
      direction = np.array([math.cos(angle), math.sin(angle)])
      normal = np.array([-direction[1], direction[0]])
      through = center + normal * (offset - size / 2)
      t = np.linspace(-0.8 * size, 0.8 * size, 7)
      control = through + t[:, None] * direction
      control += normal * rng.normal(0.0, 1.5 * scale, (len(t), 1))
      roads.append(_Road(_chaikin(control, 3), rng.uniform(5.0, 8.0) * scale, 'arterial'))
  n_local = int(rng.integers(config.min_local_streets, config.max_local_streets + 1))
  for _ in range(n_local):
    parent = roads[int(rng.integers(len(roads)))]
    arc = _arc_lengths(parent.points)
    span = _in_tile_arc_range(parent.points, arc, size)
    if span is None:
      continue
    start, tangent = _sample_polyline(parent.points, arc,
                                      np.array([rng.uniform(*span)]))
    if not _inside(start, size, -0.05 * size)[0]:
      continue
    side = 1.0 if rng.random() < 0.5 else -1.0
    heading = math.atan2(tangent[0, 1], tangent[0, 0]) + side * math.pi / 2 + rng.normal(0, 0.3)
    path = _random_walk(rng, start[0], heading, rng.uniform(0.3, 0.8) * size, 2.0 * scale,
                        0.02 / scale, size, 4.0)
    if len(path) >= 4:
      roads.append(_Road(path, rng.uniform(2.5, 4.0) * scale, 'local'))
  for road in roads:
    coverage = (config.arterial_gps_coverage if road.kind == 'arterial'
                else config.local_gps_coverage)
    road.has_gps = bool(rng.random() < coverage)
    road.grey = rng.uniform(88.0, 125.0)
  return roads, grid_angle


def _edge_to_edge_path(rng, size, scale, curvature_std):
  """A path entering from a random tile edge and heading across: (N, 2) float64."""
  edge = int(rng.integers(4))
  u = rng.uniform(0.1, 0.9) * size
  start, heading = {0: ((u, -2.0), math.pi / 2), 1: ((size + 2.0, u), math.pi),
                    2: ((u, size + 2.0), -math.pi / 2), 3: ((-2.0, u), 0.0)}[edge]
  heading += rng.normal(0.0, 0.35)
  return _random_walk(rng, start, heading, 2.0 * size, 2.0 * scale, curvature_std, size, 6.0)


def _place_parking_lots(rng, roads, road_mask, size, scale, config):
  """Rectangles beside roads, off the road mask; list of (4, 2) corner arrays."""
  lots = []
  keep_out = cv2.dilate(road_mask, np.ones((3, 3), np.uint8))
  for _ in range(int(rng.poisson(config.parking_lots_mean))):
    for _attempt in range(10):
      road = roads[int(rng.integers(len(roads)))]
      arc = _arc_lengths(road.points)
      span = _in_tile_arc_range(road.points, arc, size)
      if span is None:
        continue
      xy, tangent = _sample_polyline(road.points, arc, np.array([rng.uniform(*span)]))
      length, depth = rng.uniform(16, 28) * scale, rng.uniform(10, 16) * scale
      side = 1.0 if rng.random() < 0.5 else -1.0
      normal = np.array([-tangent[0, 1], tangent[0, 0]]) * side
      gap = rng.uniform(2.0, 5.0) * scale
      centre = xy[0] + normal * (road.width / 2 + gap + depth / 2)
      corners = _box(centre, length, depth, math.atan2(tangent[0, 1], tangent[0, 0]))
      if not _inside(centre[None], size, -0.1 * size)[0]:
        continue
      layer = np.zeros_like(road_mask)
      _fill_polygon(layer, corners)
      if (layer & keep_out).any():
        continue
      lots.append(corners)
      keep_out |= cv2.dilate(layer, np.ones((5, 5), np.uint8))
      break
  return lots


# ---------------------------------------------------------------------------------------------
# GPS.


def _road_trips(rng, road: _Road, size, scale, config):
  """Fixes of all trips along one road: cols, rows, speed (m/s), heading (deg) as (M,) arrays."""
  arc = _arc_lengths(road.points)
  span = _in_tile_arc_range(road.points, arc, size)
  mean_trips = config.trips_per_road * (1.5 if road.kind == 'arterial' else 0.7)
  n_trips = max(1, int(rng.poisson(mean_trips)))
  if span is None:
    return [np.zeros(0, np.float64)] * 4
  lo, hi = span
  out = [[], [], [], []]
  for _ in range(n_trips):
    if rng.random() < 0.7:
      a, b = lo, hi
    else:  # the trip enters or leaves the road inside the tile
      a, b = np.sort(rng.uniform(lo, hi, 2))
      b = max(b, a + 0.3 * (hi - lo))
    spacing = config.gps_spacing_px * scale * rng.uniform(0.7, 1.3)
    positions = np.arange(a + rng.uniform(0, spacing), b, spacing)
    if len(positions) == 0:
      continue
    xy, tangent = _sample_polyline(road.points, arc, positions)
    if rng.random() < 0.5:  # drive the other way
      xy, tangent = xy[::-1], -tangent[::-1]
    right = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)  # right-hand traffic
    xy = xy + right * (road.width / 4)
    # Drift: AR(1) process, correlated over about ten fixes, stationary std gps_drift_px.
    rho = 0.9
    shocks = rng.normal(0.0, config.gps_drift_px * scale * math.sqrt(1 - rho * rho),
                        (len(xy), 2))
    drift = np.empty_like(shocks)
    drift[0] = rng.normal(0.0, config.gps_drift_px * scale, 2)
    for k in range(1, len(xy)):
      drift[k] = rho * drift[k - 1] + shocks[k]
    xy = xy + drift + rng.normal(0.0, config.gps_noise_px * scale, xy.shape)
    cruise = rng.uniform(8, 16) if road.kind == 'arterial' else rng.uniform(4, 9)
    speed = np.maximum(cruise * (1 + rng.normal(0.0, 0.1, len(xy))), 0.0)
    # Heading: 0 = north (up, -row), clockwise, like the BJRoad 'dir' column.
    heading = np.degrees(np.arctan2(tangent[:, 0], -tangent[:, 1])) % 360.0
    for dst, src in zip(out, (xy[:, 0], xy[:, 1], speed, heading)):
      dst.append(src)
  return [np.concatenate(v) if v else np.zeros(0, np.float64) for v in out]


def _make_gps(rng, roads, lots, size, scale, config):
  """All fixes of a tile, in-tile only; dict of (N,) arrays cols, rows, speed, heading, source."""
  parts = []
  for road in roads:
    if road.has_gps:
      cols, rows, speed, heading = _road_trips(rng, road, size, scale, config)
      parts.append((cols, rows, speed, heading, np.full(len(cols), GPS_SOURCE_ROAD)))
  for corners in lots:
    n = int(rng.poisson(config.parking_points_per_lot))
    # Uniform in the rectangle: bilinear combination of its corners.
    u, v = rng.random((2, n))
    a, b, c, d = corners
    xy = (a[None] * ((1 - u) * (1 - v))[:, None] + b[None] * (u * (1 - v))[:, None]
          + c[None] * (u * v)[:, None] + d[None] * ((1 - u) * v)[:, None])
    xy += rng.normal(0.0, 0.7 * scale, xy.shape)
    speed = rng.uniform(0.0, 1.5, n)
    # Parked or crawling: BJRoad writes heading 0 for a stopped vehicle.
    heading = np.where(speed < 0.3, 0.0, rng.uniform(0, 360, n))
    parts.append((xy[:, 0], xy[:, 1], speed, heading, np.full(n, GPS_SOURCE_PARKING)))
  n_real = sum(len(p[0]) for p in parts)
  n_out = int(round(config.gps_outlier_fraction * n_real))
  parts.append((rng.uniform(0, size, n_out), rng.uniform(0, size, n_out),
                rng.uniform(0, 15, n_out), rng.uniform(0, 360, n_out),
                np.full(n_out, GPS_SOURCE_OUTLIER)))
  cols, rows, speed, heading, source = (np.concatenate(v) for v in zip(*parts))
  # Test inside-ness on the float32 values returned, so rounding cannot push a fix to `size`.
  cols, rows = cols.astype(np.float32), rows.astype(np.float32)
  keep = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
  if rng.random() < config.gps_dropout_probability:
    # A disc with no fixes at all (urban canyon, receiver outage): roads in it look unused.
    centre = rng.uniform(0.2, 0.8, 2) * size
    radius = rng.uniform(15, 30) * scale
    keep &= np.hypot(cols - centre[0], rows - centre[1]) > radius
  return {
      'gps_cols': cols[keep],
      'gps_rows': rows[keep],
      'gps_speed': speed[keep].astype(np.float32),
      'gps_heading': heading[keep].astype(np.float32),
      'gps_source': source[keep].astype(np.int8),
  }


def render_gps_channels(tile: dict[str, Any]) -> np.ndarray:
  """Sun et al.'s multi-channel trajectory raster of a generated tile: uint8 (S, S, 4).

  Channels GPS_CHANNEL_NAMES, rendered by `heatmap.render_channels` (speed in m/min as in
  BJRoad, heading 0 treated as 'stopped') and mapped to uint8 by round(v * 255).
  """
  size = tile['image'].shape[0]
  planes = heatmap.render_channels(
      tile['gps_cols'], tile['gps_rows'], size, size,
      speed=tile['gps_speed'].astype(np.float64) * 60.0, heading_deg=tile['gps_heading'],
      channels=GPS_CHANNEL_NAMES)
  return heatmap.heatmap_to_uint8(planes)


# ---------------------------------------------------------------------------------------------
# Painting. Small objects are drawn into a window around them, not into full-tile layers, so a
# 512 px tile with hundreds of trees and cars stays fast.


@dataclasses.dataclass
class _Scene:
  """Mutable state of a tile being painted."""
  rng: np.random.Generator
  size: int
  scale: float  # size / BASE_SIZE
  gsd_m: float  # metres per pixel
  canvas: np.ndarray  # float32 (S, S, 3) RGB, unclipped
  height: np.ndarray  # float32 (S, S) metres above ground
  grain: np.ndarray  # float32 (S, S) standard-normal texture shared by all surfaces


def _patch(extent_min, extent_max, size):
  """Integer window covering a box, clipped to the tile: ((row slice, col slice), origin xy)."""
  lo = np.clip(np.floor(extent_min).astype(int) - 1, 0, size)
  hi = np.clip(np.ceil(extent_max).astype(int) + 2, 0, size)
  if np.any(hi <= lo):
    return None
  return (slice(lo[1], hi[1]), slice(lo[0], hi[0])), lo.astype(np.float64)


def _polygon_patch(corners: np.ndarray, size: int):
  """A filled polygon as (window, bool patch), or None when it misses the tile."""
  found = _patch(corners.min(0), corners.max(0), size)
  if found is None:
    return None
  window, origin = found
  patch = np.zeros((window[0].stop - window[0].start, window[1].stop - window[1].start), np.uint8)
  _fill_polygon(patch, corners - origin)
  return window, patch.astype(bool)


def _disc_patch(centre, radius: float, size: int):
  """A filled disc as (window, bool patch), or None when it misses the tile."""
  centre = np.asarray(centre, np.float64)
  found = _patch(centre - radius, centre + radius, size)
  if found is None:
    return None
  window, origin = found
  patch = np.zeros((window[0].stop - window[0].start, window[1].stop - window[1].start), np.uint8)
  _disc(patch, centre - origin, radius)
  return window, patch.astype(bool)


def _paint(scene: _Scene, window, where, colour, texture_std, texture=None) -> None:
  """canvas[window][where] = colour + texture * std; texture defaults to the shared grain."""
  texture = scene.grain if texture is None else texture
  view = scene.canvas[window]
  view[where] = np.asarray(colour, np.float32) + texture[window][where][:, None] * texture_std


_FULL = (slice(None), slice(None))

_CAR_COLOURS = np.array([(235, 235, 232), (30, 30, 34), (175, 178, 182), (110, 112, 118),
                         (160, 35, 30), (35, 55, 120), (200, 190, 150)], np.float32)

_ROOF_COLOURS = np.array([(155, 78, 60), (176, 104, 72), (120, 70, 55), (205, 203, 196),
                          (185, 180, 170), (140, 120, 150)], np.float32)


def _car_colour(rng) -> np.ndarray:
  """A common car paint, RGB float32 (3,), slightly varied."""
  return _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))] * rng.uniform(0.9, 1.05)


def _paint_car(scene: _Scene, centre, angle, length, width, allowed: np.ndarray) -> None:
  """A car as a small rectangle, clipped to `allowed` (bool (S, S), e.g. the road)."""
  found = _polygon_patch(_box(centre, length, width, angle), scene.size)
  if found is not None:
    window, patch = found
    _paint(scene, window, patch & allowed[window], _car_colour(scene.rng), 3.0)


def _paint_ground(scene: _Scene) -> None:
  """Grass, dry grass and soil blended by smooth fields, plus darker bushy vegetation."""
  rng, size, scale = scene.rng, scene.size, scene.scale
  w_dry = _value_noise(rng, size, 32 * scale)[..., None]
  w_soil = _value_noise(rng, size, 12 * scale)[..., None] * 0.6
  lawn, dry, soil = (np.array(c, np.float32) for c in
                     ((96, 122, 70), (150, 145, 105), (160, 140, 112)))
  canvas = lawn * (1 - w_dry) + dry * w_dry
  scene.canvas[...] = canvas * (1 - w_soil) + soil * w_soil + scene.grain[..., None] * 6.0
  vegetation = _value_noise(rng, size, 24 * scale) > 0.7
  leaves = _value_noise(rng, size, 3 * scale) - 0.5
  _paint(scene, _FULL, vegetation, (70, 100, 55), 30.0, leaves)
  # Bushes are rough and up to about a metre high; open ground is flat within lidar noise.
  scene.height[...] = np.where(vegetation, leaves * 0.6 + 0.4, scene.grain * 0.05)


def _paint_rail(scene: _Scene, rail: np.ndarray, path: np.ndarray) -> None:
  """Grey ballast with two dark steel rails on a low embankment."""
  rng = scene.rng
  _paint(scene, _FULL, rail > 0, rng.uniform(-5, 5, 3) + rng.uniform(100, 122), 5.0)
  tangent = np.gradient(path, axis=0)
  tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
  normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
  steel = np.zeros_like(rail)
  for sign in (-1.0, 1.0):
    _draw_polyline(steel, path + normal * 0.8 * scene.scale * sign, 1)
  scene.canvas[(steel & rail) > 0] *= 0.6
  scene.height[rail > 0] = 0.5


def _paint_parking_lot(scene: _Scene, corners: np.ndarray) -> None:
  """Light concrete, two rows of stalls facing inward, about 60 % of them occupied."""
  rng, scale = scene.rng, scene.scale
  found = _polygon_patch(corners, scene.size)
  if found is None:
    return
  window, lot = found
  _paint(scene, window, lot, rng.uniform(-5, 5, 3) + rng.uniform(165, 185), 4.0)
  a, b, _, d = corners  # a->b runs along the road, a->d across it
  along, across = b - a, d - a
  n_stalls = max(1, int(np.linalg.norm(along) / (3.0 * scale)))
  origin = np.array([window[1].start, window[0].start], np.float64)
  markings = np.zeros(lot.shape, np.uint8)
  allowed = np.zeros((scene.size, scene.size), bool)
  allowed[window] = lot
  for k in range(n_stalls + 1):
    for row_start, direction in ((a, across), (d, -across)):
      base = row_start + along * (k / n_stalls)
      _draw_polyline(markings, np.stack([base, base + direction * 0.35]) - origin, 1)
      if k < n_stalls and rng.random() < 0.6:
        centre = base + along * (0.5 / n_stalls) + direction * 0.17
        _paint_car(scene, centre, math.atan2(direction[1], direction[0]),
                   0.28 * np.linalg.norm(direction), 1.6 * scale, allowed)
  scene.canvas[window][(markings > 0) & lot] = (222, 222, 215)
  scene.height[window][lot] = 0.0


def _paint_roads(scene: _Scene, roads: list[_Road], road_mask: np.ndarray) -> None:
  """One asphalt grey per road, dashed centre lines on some arterials, a few cars."""
  rng, scale = scene.rng, scene.scale
  on_road = road_mask > 0
  for road in roads:
    layer = np.zeros_like(road_mask)
    _draw_polyline(layer, road.points, road.width)
    _paint(scene, _FULL, layer > 0, road.grey + rng.uniform(-4, 4, 3), 4.0)
  for road in roads:
    arc = _arc_lengths(road.points)
    if road.kind == 'arterial' and road.width >= 5 * scale and rng.random() < 0.6:
      dash = 3.0 * scale
      starts = np.arange(0.0, arc[-1] - dash, 2 * dash)
      ends, _ = _sample_polyline(road.points, arc, starts + dash)
      begins, _ = _sample_polyline(road.points, arc, starts)
      lines = np.zeros_like(road_mask)
      cv2.polylines(lines, [_to_cv(np.stack([p, q])) for p, q in zip(begins, ends)], False, 1, 1,
                    cv2.LINE_8, 4)
      scene.canvas[(lines > 0) & on_road] = (225, 225, 212)
    for s in rng.uniform(0.0, arc[-1], int(rng.poisson(arc[-1] / scale * 0.01))):
      xy, tangent = _sample_polyline(road.points, arc, np.array([s]))
      side = road.width / 4 * (1 if rng.random() < 0.5 else -1)
      centre = xy[0] + np.array([-tangent[0, 1], tangent[0, 0]]) * side
      _paint_car(scene, centre, math.atan2(tangent[0, 1], tangent[0, 0]), 3.6 * scale,
                 1.8 * scale, on_road)
  scene.height[on_road] = 0.0


def _place_buildings(rng, scene: _Scene, occupied: np.ndarray, grid_angle: float, config):
  """Rectangles aligned with the street grid, never on `occupied` (uint8 (S, S), updated).

  Returns a list of (corners (4, 2), is_grey_roof, height in metres).
  """
  size, scale = scene.size, scene.scale
  buildings = []
  for _ in range(config.building_attempts):  # the tile is always tile_extent_m wide
    is_grey = bool(rng.random() < config.grey_roof_probability)
    if is_grey and rng.random() < 0.6:  # long thin warehouses read as road segments
      length, depth = rng.uniform(18, 34) * scale, rng.uniform(5, 8) * scale
    else:
      length, depth = rng.uniform(7, 18) * scale, rng.uniform(7, 14) * scale
    angle = grid_angle + (math.pi / 2 if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.04)
    corners = _box(rng.uniform(0, size, 2), length, depth, angle)
    found = _polygon_patch(corners, size)
    if found is None or (found[1] & (occupied[found[0]] > 0)).any():
      continue
    occupied[found[0]][found[1]] = 1
    metres = rng.uniform(5, 12) if is_grey else rng.uniform(6, 30)
    buildings.append((corners, is_grey, metres))
  return buildings


def _paint_buildings(scene: _Scene, buildings, sun_dir: np.ndarray):
  """Shadows first (darkening whatever is below), then roofs; returns (building, grey_roof)."""
  rng, size = scene.rng, scene.size
  building = np.zeros((size, size), bool)
  grey_roof = np.zeros((size, size), bool)
  shadow = np.zeros((size, size), np.uint8)
  for corners, _, metres in buildings:
    # Sun about 65 degrees high: a shadow 0.45 times the building height long.
    offset = sun_dir * metres / scene.gsd_m * 0.45
    hull = cv2.convexHull(np.concatenate([corners, corners + offset]).astype(np.float32))
    _fill_polygon(shadow, hull.reshape(-1, 2).astype(np.float64))
  footprints = [_polygon_patch(corners, size) for corners, _, _ in buildings]
  for found, (_, is_grey, _) in zip(footprints, buildings):
    if found is not None:
      building[found[0]] |= found[1]
      grey_roof[found[0]] |= found[1] & is_grey
  scene.canvas[(shadow > 0) & ~building] *= 0.55
  for found, (corners, is_grey, metres) in zip(footprints, buildings):
    if found is None:
      continue
    window, roof = found
    if is_grey:  # flat roof in asphalt greys: an image-only look-alike
      _paint(scene, window, roof, rng.uniform(-4, 4, 3) + rng.uniform(90, 125), 4.0)
    else:
      colour = _ROOF_COLOURS[int(rng.integers(len(_ROOF_COLOURS)))] * rng.uniform(0.9, 1.1)
      _paint(scene, window, roof, colour, 4.0)
      a, b, c, d = corners  # pitched roof: the half on one side of the ridge is lit
      if np.linalg.norm(b - a) >= np.linalg.norm(d - a):
        half = np.stack([a, b, (b + c) / 2, (a + d) / 2])
      else:
        half = np.stack([a, (a + b) / 2, (d + c) / 2, d])
      origin = np.array([window[1].start, window[0].start], np.float64)
      lit = np.zeros(roof.shape, np.uint8)
      _fill_polygon(lit, half - origin)
      scene.canvas[window][(lit > 0) & roof] *= 1.12
    scene.height[window][roof] = metres
  return building, grey_roof


def _plant_trees(rng, scene: _Scene, roads: list[_Road], building: np.ndarray, config):
  """Street trees (partly over the road), an optional grove hiding a stretch of road, and
  scattered trees; list of (centre (2,), radius px, height m)."""
  size, scale = scene.size, scene.scale
  trees = []
  for road in roads:
    arc = _arc_lengths(road.points)
    span = _in_tile_arc_range(road.points, arc, size)
    if span is None:
      continue
    n = int(rng.poisson((span[1] - span[0]) / scale * config.street_tree_density))
    for s in rng.uniform(span[0], span[1], n):
      xy, tangent = _sample_polyline(road.points, arc, np.array([s]))
      radius = rng.uniform(2.0, 4.5) * scale
      side = 1.0 if rng.random() < 0.5 else -1.0
      lateral = side * (road.width / 2 + rng.uniform(-0.6, 0.6) * radius)
      centre = xy[0] + np.array([-tangent[0, 1], tangent[0, 0]]) * lateral
      trees.append((centre, radius, rng.uniform(5, 14)))
  if rng.random() < config.grove_probability:
    road = roads[int(rng.integers(len(roads)))]
    arc = _arc_lengths(road.points)
    span = _in_tile_arc_range(road.points, arc, size)
    if span is not None:
      xy, _ = _sample_polyline(road.points, arc, np.array([rng.uniform(*span)]))
      for _ in range(int(rng.integers(6, 13))):
        centre = xy[0] + rng.normal(0.0, 4.0 * scale, 2)
        trees.append((centre, rng.uniform(3.0, 5.0) * scale, rng.uniform(8, 16)))
  for _ in range(int(rng.poisson(15))):
    centre = rng.uniform(0, size, 2)
    col, row = np.clip(centre.astype(int), 0, size - 1)
    if not building[row, col]:
      trees.append((centre, rng.uniform(2.0, 4.5) * scale, rng.uniform(4, 14)))
  return trees


def _paint_trees(scene: _Scene, trees, sun_dir: np.ndarray) -> np.ndarray:
  """Tree shadows, then textured canopies lit on the sun side; returns canopy bool (S, S)."""
  rng, size = scene.rng, scene.size
  canopy = np.zeros((size, size), bool)
  tree_shadow = np.zeros((size, size), bool)
  crowns = []
  for centre, radius, metres in trees:
    found = _disc_patch(centre + sun_dir * metres / scene.gsd_m * 0.45, radius, size)
    if found is not None:
      tree_shadow[found[0]] |= found[1]
    crown = _disc_patch(centre, radius, size)
    crowns.append(crown)
    if crown is not None:
      canopy[crown[0]] |= crown[1]
  scene.canvas[tree_shadow & ~canopy] *= 0.6
  leaves = _value_noise(rng, size, 1.5 * scene.scale) - 0.5
  for crown, (centre, radius, metres) in zip(crowns, trees):
    if crown is None:
      continue
    window, disc = crown
    colour = np.array([52, 92, 45], np.float32) * rng.uniform(0.8, 1.2)
    _paint(scene, window, disc, colour, 40.0, leaves)
    origin = np.array([window[1].start, window[0].start], np.float64)
    lit = np.zeros(disc.shape, np.uint8)  # the crown's sunny side
    _disc(lit, centre - sun_dir * radius * 0.3 - origin, radius * 0.55)
    scene.canvas[window][(lit > 0) & disc] *= 1.15
    rows, cols = np.mgrid[window]
    dist2 = (cols + 0.5 - centre[0]) ** 2 + (rows + 0.5 - centre[1]) ** 2
    dome = metres * np.sqrt(np.clip(1 - dist2 / max(radius * radius, 1e-6), 0.05, 1.0))
    view = scene.height[window]
    view[disc] = np.maximum(view[disc], dome[disc])
  return canopy


def _bounds(rng, config: SyntheticConfig) -> np.ndarray:
  """Fake (west, south, east, north) degrees: a tile_extent_m square near the origin."""
  east_m, north_m = rng.uniform(-config.placement_radius_m, config.placement_radius_m, 2)
  metres_per_deg_lat = 110_540.0
  metres_per_deg_lon = 111_320.0 * math.cos(math.radians(config.origin_lat))
  west = config.origin_lon + east_m / metres_per_deg_lon
  south = config.origin_lat + north_m / metres_per_deg_lat
  return np.array([west, south, west + config.tile_extent_m / metres_per_deg_lon,
                   south + config.tile_extent_m / metres_per_deg_lat], np.float32)


def generate_tile(seed: int, size: int | None = None,
                  config: SyntheticConfig | None = None) -> dict[str, Any]:
  """Generates one synthetic city tile; deterministic in (seed, size, config).

  Args:
    seed: non-negative int (see `tile_seed`).
    size: tile side in pixels (multiple of 32); defaults to config.size.
    config: difficulty knobs; defaults to SyntheticConfig().

  Returns:
    dict with
      'image': uint8 (S, S, 3) RGB aerial image.
      'aux': uint8 (S, S, 1) GPS heat-map (heatmap.render_heatmap of the fixes).
      'lidar': uint8 (S, S, 1) height above ground, LIDAR_SCALE * (metres + LIDAR_OFFSET_M).
      'mask': uint8 (S, S, 1) 1 = road, 0 = not road.
      'gps_cols', 'gps_rows': float32 (N,) pixel coordinates of the fixes (all inside the tile).
      'gps_speed': float32 (N,) m/s; 'gps_heading': float32 (N,) degrees, 0 = north, clockwise
        (0 also for a stopped vehicle, as in BJRoad).
      'gps_source': int8 (N,) GPS_SOURCE_ROAD / _PARKING / _OUTLIER.
      'bounds': float32 (4,) fake (west, south, east, north) in degrees.
      'layers': dict of bool (S, S) ground-truth layers for analysis: 'lookalike' (river, rail,
        grey roof pixels off the road mask), 'parking', 'occluded_road' (road pixels under tree
        canopy), 'gps_free_road' (road pixels with no fix within 3 px * S/128), 'canopy',
        'building', 'river', 'rail', 'grey_roof'.
      'num_roads', 'num_roads_without_gps': ints, counting roads that enter the tile.
      'road_lines': list of float64 (N, 2) (x, y) = (col, row) centrelines of the roads that
        enter the tile, as drawn into the mask (pixel centres at integers; they run past the
        tile's edges). A local street starts exactly on its parent road's polyline; crossing
        roads are not split at their crossings (cmmp_jax.graph_eval nodes them).
  """
  config = config or SyntheticConfig()
  if size is None:
    size = config.size
  elif size != config.size:
    config = dataclasses.replace(config, size=size)  # validates the new size
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  # Independent streams, so that e.g. fog or GPS knobs change only the image or only the GPS.
  rng, paint_rng, lidar_rng, gps_rng, place_rng = (
      np.random.default_rng(child) for child in np.random.SeedSequence(int(seed)).spawn(5))
  scale = size / BASE_SIZE
  shape = (size, size)
  scene = _Scene(rng=paint_rng, size=size, scale=scale, gsd_m=config.tile_extent_m / size,
                 canvas=np.zeros(shape + (3,), np.float32),
                 height=np.zeros(shape, np.float32),
                 grain=paint_rng.normal(0.0, 1.0, shape).astype(np.float32))

  roads, grid_angle = _make_roads(rng, size, scale, config)
  road_mask = np.zeros(shape, np.uint8)
  for road in roads:
    _draw_polyline(road_mask, road.points, road.width)

  # Look-alikes that roads may cross (bridges and level crossings keep the road on top).
  river = np.zeros(shape, np.uint8)
  if rng.random() < config.river_probability:
    _draw_polyline(river, _edge_to_edge_path(rng, size, scale, 0.012 / scale),
                   rng.uniform(7.0, 12.0) * scale)
  rail = np.zeros(shape, np.uint8)
  rail_path = None
  if rng.random() < config.rail_probability:
    rail_path = _edge_to_edge_path(rng, size, scale, 0.002 / scale)
    _draw_polyline(rail, rail_path, rng.uniform(4.0, 5.5) * scale)
  river &= 1 - road_mask
  rail &= 1 - road_mask

  lots = _place_parking_lots(rng, roads, road_mask, size, scale, config)
  parking = np.zeros(shape, np.uint8)
  for corners in lots:
    _fill_polygon(parking, corners)
  parking &= 1 - road_mask

  _paint_ground(scene)
  # Muddy grey water, in the asphalt range on purpose; the water surface lies below the banks.
  _paint(scene, _FULL, river > 0, paint_rng.uniform(-6, 6, 3) + paint_rng.uniform(95, 112), 3.0)
  scene.height[river > 0] = -1.5
  if rail_path is not None:
    _paint_rail(scene, rail, rail_path)
  for corners in lots:
    _paint_parking_lot(scene, corners)
  _paint_roads(scene, roads, road_mask)

  sun = rng.uniform(0, 2 * math.pi)
  sun_dir = np.array([math.cos(sun), math.sin(sun)])  # direction shadows fall, in pixels
  occupied = cv2.dilate(road_mask | river | rail | parking,
                        np.ones((2 * int(2 * scale) + 1,) * 2, np.uint8))
  buildings = _place_buildings(rng, scene, occupied, grid_angle, config)
  building, grey_roof = _paint_buildings(scene, buildings, sun_dir)
  canopy = _paint_trees(scene, _plant_trees(rng, scene, roads, building, config), sun_dir)

  canvas = scene.canvas
  if config.fog_strength > 0:  # haze brightens and flattens contrast unevenly
    haze = _value_noise(paint_rng, size, 48 * scale)
    alpha = config.fog_strength * (0.6 + 0.4 * haze)[..., None]
    canvas = canvas * (1 - alpha) + 215.0 * alpha
  canvas = canvas + paint_rng.normal(0.0, config.image_noise, canvas.shape).astype(np.float32)
  canvas = cv2.GaussianBlur(canvas, (3, 3), 0.6)  # optics: no pixel-sharp edges
  image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)

  height = scene.height + lidar_rng.normal(0.0, 0.05, shape).astype(np.float32)
  lidar = np.clip(np.round(LIDAR_SCALE * (height + LIDAR_OFFSET_M)), 0, 255).astype(np.uint8)

  gps = _make_gps(gps_rng, roads, lots, size, scale, config)
  aux = heatmap.heatmap_to_uint8(
      heatmap.render_heatmap(gps['gps_cols'], gps['gps_rows'], size, size))

  hits = np.zeros(shape, np.uint8)
  hits[gps['gps_rows'].astype(int), gps['gps_cols'].astype(int)] = 1
  reach = 2 * int(round(3 * scale)) + 1
  near_fix = cv2.dilate(hits, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (reach, reach)))
  road = road_mask > 0
  layers = {
      'lookalike': (((river | rail) > 0) | grey_roof) & ~road,
      'parking': parking > 0,
      'occluded_road': canopy & road,
      'gps_free_road': road & (near_fix == 0),
      'canopy': canopy,
      'building': building,
      'river': river > 0,
      'rail': rail > 0,
      'grey_roof': grey_roof,
  }
  in_tile = [r for r in roads if _in_tile_arc_range(r.points, _arc_lengths(r.points), size)]
  return {
      'image': image,
      'aux': aux.reshape(size, size, 1),
      'lidar': lidar[..., None],
      'mask': road_mask[..., None].copy(),
      **gps,
      'bounds': _bounds(place_rng, config),
      'layers': layers,
      'num_roads': len(in_tile),
      'num_roads_without_gps': sum(not r.has_gps for r in in_tile),
      'road_lines': [r.points.astype(np.float64) for r in in_tile],
  }


def select_aux(tile: dict[str, Any], aux_kind: str) -> np.ndarray:
  """The auxiliary raster of a generated tile: uint8 (S, S, C).

  aux_kind 'gps' -> heat-map (C=1), 'lidar' -> heights (C=1), 'gps_channels' ->
  render_gps_channels (C=len(GPS_CHANNEL_NAMES)).
  """
  if aux_kind == 'gps':
    return tile['aux']
  if aux_kind == 'lidar':
    return tile['lidar']
  if aux_kind == 'gps_channels':
    return render_gps_channels(tile)
  raise ValueError(f'unknown aux_kind {aux_kind!r}; expected one of {AUX_KINDS}')


def aux_channels(aux_kind: str) -> int:
  """Number of channels of the auxiliary raster for `aux_kind`."""
  if aux_kind not in AUX_KINDS:
    raise ValueError(f'unknown aux_kind {aux_kind!r}; expected one of {AUX_KINDS}')
  return len(GPS_CHANNEL_NAMES) if aux_kind == 'gps_channels' else 1
