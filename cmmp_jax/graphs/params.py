"""Parameters of road-graph extraction (cmmp_jax.graphs), all lengths in pixels.

Defaults suit imagery of about 0.5 m per pixel (BJRoad, Porto, the synthetic city at 512 px per
tile) and GPS heat-maps rendered on the same grid. `config.graph` (configs/default.py) mirrors
these fields plus the output switches; `GraphParams.from_config(config.graph)` builds one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


class GraphParamsError(ValueError):
  """A GraphParams field (named in the message) has an invalid value."""


@dataclasses.dataclass(frozen=True)
class GraphParams:
  """Every knob of mask -> graph extraction and trajectory-guided completion.

  Mask cleaning:
    threshold: a pixel is road where probability > threshold (predict.threshold's default).
    min_blob_area: connected road blobs (8-connected) smaller than this many pixels are dropped.
    max_hole_area: holes inside road blobs smaller than this many pixels are filled (so a car
      or a tree crown on a wide road does not split its centreline into a ring).
    border_padding: before thinning, the raster is padded by this many pixels that repeat its
      border pixels (numpy 'edge'), so that a road leaving the raster runs on straight and its
      centreline reaches the border, instead of forking into the two corners of its cut end
      (a wide road's fork arms are longer than any fixed spur length); at least the widest
      road's width (32 px = 16 m at 0.5 m/px); 0 = off.
  Graph cleaning (after skeletonising and building the junction / end point graph). Every node
  carries its road radius r (the distance transform of the cleaned mask at its skeleton pixel:
  the road's half-width on a plain stretch, up to sqrt(2) times that at a crossing), so that the
  rules scale with the road instead of being fixed pixel lengths:
    junction_merge_distance, junction_merge_radius_factor: junctions joined by an edge at most
      max(junction_merge_distance, junction_merge_radius_factor * (r_u + r_v)) long become one
      node (the skeleton of a crossing of wide roads splits into junctions up to about a road
      width apart, further at oblique angles). Pixel clusters (junction_merge_distance) are
      merged before spurs are pruned, the width rule after (merging a ragged edge's spur
      junctions along a road first would collapse the road). 0.5 (the two junctions within
      their mean radius) scored best on the synthetic city; 1 merges oblique crossings down to
      about 50 degrees but moves more junctions off the centrelines.
    spur_length, spur_radius_factor: dead-end edges (end point to junction) shorter than
      spur_length + spur_radius_factor * r_junction are pruned, repeatedly until none is left
      (a bump on the edge of a road of half-width r sprouts a branch about r + its own size
      long); isolated segments shorter than spur_length are dropped. A dead end on the raster's
      border is a road leaving the raster, never a spur.
    junction_straighten_radius_factor: inside the disc of this times r around a junction every
      edge runs straight from the junction to where it leaves the disc (thinning bends arms
      towards each other inside a wide crossing); 0 = off.
    border_snap_radius_factor, border_snap_distance: a dead end within
      border_snap_radius_factor * r + border_snap_distance of the raster border is extended
      straight onto the nearest border pixel (a skeleton stops about r short of its road's end,
      so factor 2 means: the road ended within its half-width of the border; it leaves the
      raster there). Both 0 = off.
    simplify_tolerance: Douglas-Peucker tolerance of every polyline (shapely simplify); 0 keeps
      every skeleton pixel.
  Gap bridging (between end points, and from an end point onto another edge):
    bridge_max_distance: longest bridge without trajectories.
    bridge_max_angle: degrees; the bridge must leave each end point within this angle of the
      end point's outward direction (the direction of its last bridge_direction_length pixels).
      For end-to-end bridges both ends must agree, so two parallel dead ends side by side or a
      dead end pointing away are never joined.
    bridge_direction_length: length of polyline that defines an end point's direction.
    bridge_min_detour: end points already connected through the graph are bridged only when
      the graph path between them is longer than this times the bridge (a real shortcut).
    bridge_to_edges: also extend an unmatched end point straight along its direction onto the
      nearest edge it meets within the maximum distance (T-junction gaps).
  Trajectory-guided completion (with a GPS heat-map on the same grid):
    use_trajectories: turn it on (needs a heat-map; a heat-map without any fix means no
      trajectory information, and extraction then runs as without one).
    heat_min: heat-map value (scaled to [0, 1]) at or above which a pixel holds a GPS fix.
    bridge_min_density: a point sees traffic when the traffic density there (the Gaussian
      average, recover_sigma, of the fix pixels: the share of nearby pixels holding a fix) is
      at least this: it lies on a ridge that vehicles drove, not in scattered GPS noise.
    bridge_min_heat_fraction: a bridge is kept only when at least this fraction of its samples
      (one per pixel) sees traffic; all others are dropped: no vehicle drove there.
    trajectory_bridge_max_distance: longest end-to-end bridge when trajectories decide (gaps
      under trees can be long when traffic shows the road); extensions onto edges keep
      bridge_max_distance.
    recover: add road segments the image missed: ridges of fix density (Gaussian of the fix
      pixels, recover_sigma, at or above recover_density) not covered by the prediction, kept
      when they join the predicted network at both ends, or at one end and the image border
      (roads go somewhere; parking-lot heat does not), and when they do not merely run
      alongside a predicted road.
    recover_sigma: Gaussian smoothing (pixels) of the fix pixels.
    recover_density: smoothed fix density at or above which a pixel is on a heat ridge.
    recover_cover_radius: ridge pixels within this distance of predicted road are covered.
    recover_min_length: recovered pieces shorter than this many skeleton pixels are ignored.
    recover_max_width: parts of a ridge wider than this (they hold a disk of this diameter)
      are parking lots or plazas, not roads, and are cut out before thinning.
    recover_width: width (pixels) a recovered piece is painted into the road mask with.
  Large rasters:
    block_size, block_overlap: skeletonise rasters larger than block_size in overlapping
      blocks of block_size (each block's core kept); 0 = always the whole array.
  """
  threshold: float = 0.5
  min_blob_area: int = 64
  max_hole_area: int = 64
  junction_merge_distance: float = 4.0
  junction_merge_radius_factor: float = 0.5
  spur_length: float = 12.0
  spur_radius_factor: float = 1.0
  junction_straighten_radius_factor: float = 1.0
  border_padding: int = 32
  border_snap_radius_factor: float = 2.0
  border_snap_distance: float = 0.0
  simplify_tolerance: float = 1.0
  bridge_max_distance: float = 24.0
  bridge_max_angle: float = 35.0
  bridge_direction_length: float = 10.0
  bridge_min_detour: float = 3.0
  bridge_to_edges: bool = True
  use_trajectories: bool = False
  heat_min: float = 0.004
  bridge_min_density: float = 0.05
  bridge_min_heat_fraction: float = 0.7
  trajectory_bridge_max_distance: float = 60.0
  recover: bool = True
  recover_sigma: float = 4.0
  recover_density: float = 0.08
  recover_cover_radius: float = 3.0
  recover_min_length: float = 20.0
  recover_max_width: float = 40.0
  recover_width: int = 5
  block_size: int = 4096
  block_overlap: int = 128

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.type in ('bool',):
        if not isinstance(value, bool):
          raise GraphParamsError(f'GraphParams.{field.name} must be a bool, got {value!r}')
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GraphParamsError(f'GraphParams.{field.name} must be a number, got {value!r}')
      if not math.isfinite(value) or value < 0:
        raise GraphParamsError(f'GraphParams.{field.name} must be finite and >= 0, got {value}')
      if field.type == 'int' and int(value) != value:
        raise GraphParamsError(f'GraphParams.{field.name} must be an integer, got {value}')
    for name in ('threshold', 'heat_min', 'bridge_min_density', 'bridge_min_heat_fraction',
                 'recover_density'):
      if getattr(self, name) > 1:
        raise GraphParamsError(f'GraphParams.{name} must be in [0, 1], got {getattr(self, name)}')
    if self.bridge_max_angle > 180:
      raise GraphParamsError(f'GraphParams.bridge_max_angle must be <= 180 degrees, got '
                             f'{self.bridge_max_angle}')
    if self.block_size and self.block_size <= 2 * self.block_overlap:
      raise GraphParamsError(f'GraphParams.block_size ({self.block_size}) must exceed twice '
                             f'block_overlap ({self.block_overlap}), or be 0')

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'GraphParams':
    """From `config.graph` (a ConfigDict or dict): its fields named like ours; others (the
    output switches) are ignored."""
    names = {field.name for field in dataclasses.fields(cls)}
    values = dict(config.items()) if hasattr(config, 'items') else dict(config)
    return cls(**{k: v for k, v in values.items() if k in names})
