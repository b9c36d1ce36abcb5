"""APLS and TOPO of predicted road maps on an evaluation split, tile by tile (`--mode=eval`).

For each tile of the split: the predicted probability map (at label resolution) becomes a road
graph with `graphs.extract_graph(prob, GraphParams.from_config(config.graph), heat-map)` (the
heat-map only with config.graph.use_trajectories); the ground-truth graph comes from the
dataset's vector labels where it stores them (the 'road_lines' feature of the synthetic city and
of custom areas: road centrelines in tile pixels, noded here by `polylines_to_graph`), otherwise
from the ground-truth mask by the same extraction (without trajectories). A custom area whose
GeoJSON also holds polygons or points on the raster (no centreline: in the masks, not in the
lines; its metadata counts them) takes its ground truth from the masks (`gt_graph_source`).
The evaluation names the source (GT_FROM_VECTORS / GT_FROM_MASKS) in its summary
('graph_gt_source') and console line. Both graphs go to metres with the tile's metres per pixel
(`PixelSize`) and are scored with `topology.apls` and `topology.topo` (default parameters:
control points every 50 m, 4 m snapping; TOPO radius 150 m, 30 m spacing, 4 m holes).

Aggregates are means over the tiles whose ground-truth graph has at least one edge; tiles without
any ground-truth road are left out of the means (APLS and TOPO are undefined there: nothing to
route on) and counted, with the predicted road length on them reported. An empty prediction on
a tile with roads scores 0.

Where metres per pixel come from (`PixelSize.for_dataset`, first that applies):
  1. config.eval.metres_per_pixel > 0 (the user's value, for every tile);
  2. the synthetic city: its generator's tile_extent_m over the tile size (256 m per tile);
  3. a custom area in a projected CRS: the ground size of the raster's pixel (its affine
     transform) at each tile's centre: a one-pixel step along rows and columns taken to WGS84
     and measured on the ellipsoid. (The transform's own size in CRS units is not the ground
     size in every projection: Web Mercator's is 1 / cos(latitude) times too large.)
  4. the tile's stored bounds (WGS84 degrees; BJRoad with coordinate files, custom areas in a
     geographic CRS): extent in metres at the tile's latitude over its pixels;
  5. the dataset's documented value (DOCUMENTED_METRES_PER_PIXEL, with where it is stated).
A dataset for which none applies is a ConfigError naming config.eval.metres_per_pixel.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Sequence

from absl import logging
import cv2
import networkx as nx
import numpy as np
import shapely
import tensorflow_datasets as tfds

from cmmp_jax import config_checks, sharding, topology
from cmmp_jax import graphs as graphs_lib
from cmmp_jax.data import geo as geo_lib
from data_builders import build as build_lib
from data_builders import common as builders_common

# Per-dataset pixel sizes where tiles carry no usable bounds: (metres per pixel, where it is
# stated).
DOCUMENTED_METRES_PER_PIXEL = {
    'bjroad': (0.5, 'BJRoad documented value 0.5 m/px (CMMPNet paper, Sec. V-A: "each pixel '
                    'denotes a 0.5m x 0.5m region"; ../shared/REFERENCE.md)'),
    # 6,048 non-overlapping 512 x 512 tiles cut from an area of about 209 km^2.
    'porto': (math.sqrt(209e6 / 6048) / 512,
              'Porto value 0.363 m/px derived from the CMMPNet paper, Sec. V-A (about 209 km^2 '
              'cut into 6,048 non-overlapping 512 x 512 tiles: sqrt(209e6 / 6048) / 512)'),
    'tlcgis': (0.5 * 0.3048, 'TLCGIS documented value 0.5 ft = 0.1524 m/px (CMMPNet paper, '
                             'Sec. VI)'),
}
# The feature holding vector labels (data_builders/common.py: JSON of pixel polylines).
ROAD_LINES_FEATURE = builders_common.ROAD_LINES_FEATURE
GT_FROM_VECTORS = 'from vector labels'
GT_FROM_MASKS = 'extracted from masks'


# ---------------------------------------------------------------------------------------------
# Metres per pixel.


def _metres_per_degree(lat_deg: float) -> tuple[float, float]:
  lon_m, lat_m = geo_lib.metres_per_degree(lat_deg)
  return float(lon_m), float(lat_m)


def metres_per_pixel_from_bounds(bounds, height: int, width: int) -> float | None:
  """Pixel size (m) of a tile from its (west, south, east, north) WGS84 bounds: the geometric
  mean of the east-west and north-south pixel sizes at the tile's mid latitude; None when the
  bounds are missing (NaN) or degenerate."""
  bounds = np.asarray(bounds, np.float64).reshape(-1)
  if bounds.size != 4 or not np.all(np.isfinite(bounds)):
    return None
  west, south, east, north = bounds
  if east <= west or north <= south or abs(south) > 90 or abs(north) > 90:
    return None
  lon_m, lat_m = _metres_per_degree((south + north) / 2)
  return math.sqrt((east - west) * lon_m / width * (north - south) * lat_m / height)


def ground_metres_per_pixel(crs, transform: Sequence[float], lon: float, lat: float) -> float:
  """Ground size (m) of a pixel of a raster in a projected CRS, at (lon, lat) degrees.

  Args:
    crs: the raster's CRS (anything rasterio.crs.CRS.from_user_input reads).
    transform: its affine transform (a, b, c, d, e, f), pixel -> CRS.
    lon, lat: where (WGS84 degrees).

  Returns:
    The geometric mean of the lengths of one step along a row and one along a column, taken to
    WGS84 lon/lat (rasterio.warp) and measured there on the ellipsoid (metres per degree).
  """
  import rasterio.warp  # pylint: disable=g-import-not-at-top
  (x,), (y,) = rasterio.warp.transform('EPSG:4326', crs, [lon], [lat])
  a, b, _, d, e, _ = transform
  lons, lats = rasterio.warp.transform(crs, 'EPSG:4326', [x, x + a, x + b], [y, y + d, y + e])
  lon_m, lat_m = _metres_per_degree(lats[0])
  along_row = math.hypot((lons[1] - lons[0]) * lon_m, (lats[1] - lats[0]) * lat_m)
  along_column = math.hypot((lons[2] - lons[0]) * lon_m, (lats[2] - lats[0]) * lat_m)
  return math.sqrt(along_row * along_column)


@dataclasses.dataclass(frozen=True)
class PixelSize:
  """How a dataset's tiles get their metres per pixel.

  constant: one value for every tile (None: per tile, from `projected` or else from its
    bounds, falling back to `fallback`); source: where the value comes from, in words;
    fallback: (value, source) for tiles without bounds, or None; projected: (CRS, affine
    transform (a, b, c, d, e, f)) of a raster in a projected CRS: ground_metres_per_pixel at
    the centre of the tile's bounds.
  """
  constant: float | None
  source: str
  fallback: tuple[float, str] | None = None
  projected: tuple[str, tuple[float, ...]] | None = None

  def for_tile(self, bounds, height: int, width: int) -> tuple[float, str]:
    """(metres per pixel, source) of one tile; raises ConfigError when it cannot be known."""
    if self.constant is not None:
      return self.constant, self.source
    value = metres_per_pixel_from_bounds(bounds, height, width)
    if value is not None and self.projected is not None:
      west, south, east, north = np.asarray(bounds, np.float64).reshape(-1)
      value = ground_metres_per_pixel(*self.projected, (west + east) / 2, (south + north) / 2)
    if value is not None:
      return value, self.source
    if self.fallback is not None:
      return self.fallback
    raise config_checks.ConfigError(
        'config.eval.metres_per_pixel: a tile has no usable bounds and the dataset has no '
        'documented pixel size; set config.eval.metres_per_pixel (or '
        'config.eval.graph_metrics=False)')

  @classmethod
  def for_dataset(cls, config, builder, first_bounds) -> 'PixelSize':
    """The rule for config.data's dataset (see the module docstring); `first_bounds`: record
    0's bounds (whether the dataset stores any)."""
    override = float(config.eval.get('metres_per_pixel', 0.0) or 0.0)
    if override > 0:
      return cls(override, f'config.eval.metres_per_pixel = {override:g}')
    name = config.data.name
    documented = DOCUMENTED_METRES_PER_PIXEL.get(name)
    city = getattr(builder.builder_config, 'city', None)
    if city is not None:  # the synthetic city: its bounds are fake, its extent is defined
      return cls(city.tile_extent_m / city.size,
                 f'synthetic city generator: tile_extent_m {city.tile_extent_m:g} m over '
                 f'{city.size} px')
    area = (builder.info.metadata or {}).get('custom_area')
    if area and area.get('crs') and area.get('transform'):
      import rasterio.crs  # pylint: disable=g-import-not-at-top
      import rasterio.warp  # pylint: disable=g-import-not-at-top
      crs = rasterio.crs.CRS.from_user_input(area['crs'])
      if crs.is_projected:
        transform = tuple(float(v) for v in area['transform'][:6])
        source = (f"raster transform of {area.get('imagery', 'the imagery')} "
                  f"({crs.to_string()}), ground size at each tile's centre")
        # For a tile without bounds (custom tiles always have them): the raster centre's size.
        a, b, c, d, e, f = transform
        col, row = area.get('raster_width', 0) / 2, area.get('raster_height', 0) / 2
        (lon,), (lat,) = rasterio.warp.transform(crs, 'EPSG:4326', [a * col + b * row + c],
                                                 [d * col + e * row + f])
        centre = ground_metres_per_pixel(crs, transform, lon, lat)
        return cls(None, source, fallback=(centre, f"{source} (the raster's centre)"),
                   projected=(crs.to_string(), transform))
    if metres_per_pixel_from_bounds(first_bounds, 1, 1) is not None:
      return cls(None, 'tile bounds (WGS84)', documented)
    if documented is not None:
      return cls(documented[0], documented[1])
    raise config_checks.ConfigError(
        f'config.eval.metres_per_pixel: dataset {name!r} stores no tile bounds and has no '
        'documented pixel size; set config.eval.metres_per_pixel (or '
        'config.eval.graph_metrics=False)')


# ---------------------------------------------------------------------------------------------
# Vector labels -> graph.


def _point_segment_distances(point: np.ndarray, coords: np.ndarray) -> np.ndarray:
  a, b = coords[:-1], coords[1:]
  ab = b - a
  t = np.clip(np.einsum('ij,ij->i', point - a, ab) / np.maximum(np.einsum('ij,ij->i', ab, ab),
                                                                1e-300), 0.0, 1.0)
  return np.linalg.norm(a + t[:, None] * ab - point, axis=1)


def _snap_end_points(pieces: list[np.ndarray], tolerance: float) -> list[np.ndarray]:
  """Inserts each polyline end point lying within `tolerance` of another polyline (but not on a
  vertex of it) into that polyline as a vertex, so that noding joins them exactly (a street
  that starts on its parent road, stored with rounded coordinates)."""
  pieces = [p.copy() for p in pieces]
  for i in range(len(pieces)):
    for end in (pieces[i][0], pieces[i][-1]):
      for j in range(len(pieces)):
        if j == i:
          continue
        target = pieces[j]
        if np.min(np.linalg.norm(target - end, axis=1)) == 0.0:
          continue
        distances = _point_segment_distances(end, target)
        k = int(np.argmin(distances))
        if distances[k] <= tolerance:
          pieces[j] = np.concatenate([target[:k + 1], end[None], target[k + 1:]])
  return pieces


def polylines_to_graph(lines: Sequence[Any], height: int, width: int, *,
                       snap_tolerance: float = 0.01) -> nx.MultiGraph:
  """Road graph (pixels) of centreline polylines: clipped to the tile, noded at crossings.

  Args:
    lines: polylines, each (N >= 2, 2) (x, y) = (col, row), pixel centres at integers; they
      may run past the tile and cross each other.
    height, width: the tile (its area is x, y in [-0.5, size - 0.5]).
    snap_tolerance: end points this close (px) to another polyline join it (T-junctions).

  Returns:
    networkx.MultiGraph in the layout of graphs.extract_graph: nodes x, y; edges coords
    (float64 (N, 2) from node to node), length (px), source 'vector'; junctions and end points
    (including where roads leave the tile) are nodes.

  Raises:
    ValueError: a polyline that is not (N >= 2, 2) finite numbers (names its index).
  """
  tile = shapely.box(-0.5, -0.5, width - 0.5, height - 0.5)
  pieces = []
  for index, line in enumerate(lines):
    coords = np.asarray(line, np.float64)
    if coords.ndim != 2 or coords.shape[0] < 2 or coords.shape[1] != 2 or not np.all(
        np.isfinite(coords)):
      raise ValueError(f'road line {index} must be (N >= 2, 2) finite coordinates, got shape '
                       f'{coords.shape}')
    clipped = shapely.intersection(shapely.LineString(coords), tile)
    for part in shapely.get_parts(clipped):
      if isinstance(part, shapely.LineString) and part.length > 0:
        pieces.append(np.asarray(part.coords, np.float64))
  graph = nx.MultiGraph()
  graph.graph.update(units='pixel', height=height, width=width)
  if not pieces:
    return graph
  pieces = _snap_end_points(pieces, snap_tolerance)
  noded = shapely.line_merge(shapely.unary_union([shapely.LineString(p) for p in pieces]))
  ids: dict[tuple[float, float], int] = {}

  def node(xy) -> int:
    key = (round(float(xy[0]), 6), round(float(xy[1]), 6))
    if key not in ids:
      ids[key] = len(ids)
      graph.add_node(ids[key], x=float(xy[0]), y=float(xy[1]))
    return ids[key]

  for part in shapely.get_parts(noded):
    coords = np.asarray(part.coords, np.float64)
    length = float(np.linalg.norm(np.diff(coords, axis=0), axis=1).sum())
    if len(coords) < 2 or length <= 0:
      continue
    u, v = node(coords[0]), node(coords[-1])
    coords[0] = (graph.nodes[u]['x'], graph.nodes[u]['y'])
    coords[-1] = (graph.nodes[v]['x'], graph.nodes[v]['y'])
    graph.add_edge(u, v, coords=coords, length=length, source='vector')
  return graph


def parse_road_lines(text) -> list[np.ndarray]:
  """The 'road_lines' feature (JSON bytes or str) -> list of (N, 2) float64 pixel polylines."""
  if isinstance(text, (bytes, np.bytes_)):
    text = bytes(text).decode('utf-8')
  record = json.loads(text)
  if record.get('units', 'pixel') != 'pixel':
    raise ValueError(f"road_lines must be in pixel units, got {record.get('units')!r}")
  return [np.asarray(line, np.float64) for line in record.get('lines', [])]


# ---------------------------------------------------------------------------------------------
# One tile.


def _length_m(graph: nx.MultiGraph) -> float:
  return float(sum(np.linalg.norm(np.diff(d['coords'], axis=0), axis=1).sum()
                   for _, _, d in graph.edges(data=True)))


def score_tile(probabilities: np.ndarray, gt_graph_px: nx.MultiGraph, metres_per_pixel: float,
               params: graphs_lib.GraphParams, heatmap: np.ndarray | None = None) -> dict:
  """APLS and TOPO of one tile.

  Args:
    probabilities: (H, W) float road probabilities at the ground truth's resolution.
    gt_graph_px: ground-truth road graph in pixels (polylines_to_graph or extract_graph).
    metres_per_pixel: the tile's pixel size.
    params: extraction of the predicted graph.
    heatmap: (H, W) GPS heat-map for params.use_trajectories, or None.

  Returns:
    dict: gt / prop node and edge counts and lengths (m), 'has_gt_roads', and (None without
    ground-truth roads) 'apls', 'apls_gt_onto_prop', 'apls_prop_onto_gt', 'topo_precision',
    'topo_recall', 'topo_f1', 'topo_tp', 'topo_fp', 'topo_fn'.
  """
  prop_px = graphs_lib.extract_graph(probabilities, params, heatmap)
  gt = graphs_lib.pixel_graph_to_metres(gt_graph_px, metres_per_pixel)
  prop = graphs_lib.pixel_graph_to_metres(prop_px, metres_per_pixel)
  record = {
      'metres_per_pixel': float(metres_per_pixel),
      'gt_nodes': gt.number_of_nodes(), 'gt_edges': gt.number_of_edges(),
      'gt_length_m': _length_m(gt),
      'prop_nodes': prop.number_of_nodes(), 'prop_edges': prop.number_of_edges(),
      'prop_length_m': _length_m(prop),
      'has_gt_roads': gt.number_of_edges() > 0,
  }
  if not record['has_gt_roads']:
    record.update({key: None for key in ('apls', 'apls_gt_onto_prop', 'apls_prop_onto_gt',
                                         'topo_precision', 'topo_recall', 'topo_f1', 'topo_tp',
                                         'topo_fp', 'topo_fn')})
    return record
  apls = topology.apls(gt, prop)
  topo = topology.topo(gt, prop)
  record.update(apls=apls.apls, apls_gt_onto_prop=apls.gt_onto_prop,
                apls_prop_onto_gt=apls.prop_onto_gt, topo_precision=topo.precision,
                topo_recall=topo.recall, topo_f1=topo.f1, topo_tp=topo.tp, topo_fp=topo.fp,
                topo_fn=topo.fn)
  return record


def summarize(tiles: Sequence[dict]) -> dict:
  """Aggregates of per-tile records (score_tile's): means over tiles with ground-truth roads
  (NaN when there are none), TOPO also pooled (precision / recall / F1 of the summed counts)."""
  scored = [t for t in tiles if t['has_gt_roads']]
  mean = lambda key: float(np.mean([t[key] for t in scored])) if scored else float('nan')
  tp, fp, fn = (sum(t[f'topo_{k}'] for t in scored) for k in ('tp', 'fp', 'fn'))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  return {
      'apls': mean('apls'), 'apls_gt_onto_prop': mean('apls_gt_onto_prop'),
      'apls_prop_onto_gt': mean('apls_prop_onto_gt'),
      'topo_precision': mean('topo_precision'), 'topo_recall': mean('topo_recall'),
      'topo_f1': mean('topo_f1'),
      'topo_pooled': {'tp': tp, 'fp': fp, 'fn': fn, 'precision': precision, 'recall': recall,
                      'f1': 2 * precision * recall / (precision + recall)
                            if precision + recall else 0.0},
      'num_graph_tiles': len(scored),
      'num_tiles_without_gt_roads': len(tiles) - len(scored),
      'prop_length_m_on_tiles_without_gt_roads': float(
          sum(t['prop_length_m'] for t in tiles if not t['has_gt_roads'])),
  }


# ---------------------------------------------------------------------------------------------
# A whole split.


def gt_graph_source(builder) -> tuple[bool, str]:
  """(whether ground-truth graphs come from the dataset's 'road_lines', that source in words).

  Vectors when the dataset stores 'road_lines', unless it is a custom area whose build counted
  road geometries without a centreline on the raster (metadata 'custom_area',
  road_geometries_without_centreline: polygons, points), which are in the masks only: then the
  masks, which hold every road.
  """
  if ROAD_LINES_FEATURE not in builder.info.features:
    return False, GT_FROM_MASKS
  area = (builder.info.metadata or {}).get('custom_area') or {}
  without = int(area.get('road_geometries_without_centreline') or 0)
  if without:
    return False, (f'{GT_FROM_MASKS} ({without} road polygons/points of the custom area have '
                   'no centreline)')
  return True, GT_FROM_VECTORS


class GraphScorer:
  """Scores the probability maps of an evaluation, batch by batch (evaluate.evaluate_split's
  on_probs hook), against the split's ground truth read from the dataset by record index.

  Every process calls `add` with each global batch (a collective gather); process 0 scores.
  """

  def __init__(self, config, split: str, num_records: int):
    self.params = graphs_lib.GraphParams.from_config(config.graph)
    self.gt_params = dataclasses.replace(self.params, use_trajectories=False)
    self.global_batch_size = int(config.eval_batch_size)
    self.num_records = int(num_records)
    data = config.data
    builder = build_lib.make_builder(
        data.name, pathlib.Path(data.data_dir).expanduser().absolute(), data.config or None)
    self.has_vectors, self.gt_source = gt_graph_source(builder)
    decoders = {'image': tfds.decode.SkipDecoding()}
    if not self.params.use_trajectories:
      decoders['aux'] = tfds.decode.SkipDecoding()
    self.source = builder.as_data_source(split=split, decoders=decoders)
    self.pixel_size = PixelSize.for_dataset(config, builder, self.source[0]['bounds'])
    self.tiles: list[dict] = []
    self.seconds = 0.0

  def add(self, batch_number: int, probs) -> None:
    """Scores global batch `batch_number`: probs (G, h, w, 1) for records batch_number * G..."""
    probs = sharding.gather(probs)
    if not sharding.is_primary():
      return
    probs = np.asarray(probs)
    start = time.perf_counter()
    for row in range(probs.shape[0]):
      index = batch_number * self.global_batch_size + row
      if index < self.num_records:
        self.tiles.append(self.score_record(index, probs[row, ..., 0]))
    self.seconds += time.perf_counter() - start

  def gt_graph(self, example) -> nx.MultiGraph:
    """The record's ground-truth graph (pixels): its vector labels, else from its mask."""
    mask = np.asarray(example['mask'])[..., 0]
    if self.has_vectors:
      return polylines_to_graph(parse_road_lines(example[ROAD_LINES_FEATURE]), *mask.shape)
    return graphs_lib.extract_graph(mask > 0, self.gt_params)

  def score_record(self, index: int, probs: np.ndarray) -> dict:
    start = time.perf_counter()
    example = self.source[index]
    mask = np.asarray(example['mask'])[..., 0]
    height, width = mask.shape
    if probs.shape != mask.shape:  # the metrics' convention: the prediction is resized
      probs = cv2.resize(np.asarray(probs, np.float32), (width, height),
                         interpolation=cv2.INTER_LINEAR)
    heat = np.asarray(example['aux'])[..., 0] if self.params.use_trajectories else None
    m_per_px, _ = self.pixel_size.for_tile(example['bounds'], height, width)
    gt_graph = self.gt_graph(example)
    record = score_tile(probs, gt_graph, m_per_px, self.params, heat)
    if self.has_vectors and record['has_gt_roads']:
      # The ceiling of the extraction: the ground-truth mask itself, scored like a prediction.
      ceiling = score_tile(mask > 0, gt_graph, m_per_px, self.gt_params)
      record.update(ceiling_apls=ceiling['apls'], ceiling_topo_f1=ceiling['topo_f1'])
    tile_id = example.get('tile_id', b'')
    record = {'index': index,
              'tile_id': tile_id.decode() if isinstance(tile_id, bytes) else str(tile_id),
              **record, 'seconds': time.perf_counter() - start}
    logging.info('graph metrics %s: %s', record['tile_id'],
                 {k: v for k, v in record.items() if k not in ('index', 'tile_id')})
    return record

  def summary(self) -> dict:
    """Aggregates (summarize), how they were made and the per-tile records (primary only)."""
    values = [t['metres_per_pixel'] for t in self.tiles]
    out = summarize(self.tiles)
    ceiling = [t for t in self.tiles if 'ceiling_apls' in t]
    if ceiling:  # what a perfect road mask would score against the vector labels
      out.update(ceiling_apls=float(np.mean([t['ceiling_apls'] for t in ceiling])),
                 ceiling_topo_f1=float(np.mean([t['ceiling_topo_f1'] for t in ceiling])))
    out.update(
        graph_gt_source=self.gt_source, metres_per_pixel_source=self.pixel_size.source,
        metres_per_pixel=(min(values), max(values)) if values else None,
        graph_seconds=self.seconds, graph_trajectories=bool(self.params.use_trajectories),
        graph_tiles=self.tiles)
    return out

  def console_line(self, summary: dict) -> str:
    low, high = summary['metres_per_pixel'] or (float('nan'),) * 2
    size = f'{low:.3f}' if abs(high - low) < 5e-4 else f'{low:.3f}-{high:.3f}'
    skipped = summary['num_tiles_without_gt_roads']
    return (f"  graph metrics: APLS {summary['apls']:.4f}  TOPO P {summary['topo_precision']:.4f}"
            f"  R {summary['topo_recall']:.4f}  F1 {summary['topo_f1']:.4f}  (tile means over "
            f"{summary['num_graph_tiles']} tiles with roads"
            + (f'; {skipped} without ground-truth roads left out' if skipped else '')
            + f"; {size} m/px from {self.pixel_size.source}; gt graphs: {self.gt_source}"
            + (f"; the ground-truth mask itself scores APLS {summary['ceiling_apls']:.4f}, "
               f"TOPO F1 {summary['ceiling_topo_f1']:.4f}" if 'ceiling_apls' in summary else '')
            + f"; {summary['graph_seconds']:.1f} s)")
