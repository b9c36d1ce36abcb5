"""TFDS builder `custom`: a user's own area from a GeoTIFF, road centerlines and GPS.

Inputs (paths in a spec, see below):
  imagery   GeoTIFF (.tif/.tiff) in any CRS, uint8, uint16 (e.g. 11-bit) or
            float, read by cmmp_jax.data.reading: 1 band (gray, replicated to
            RGB), 2 (gray + alpha), 3 (RGB) or 4 (RGB + alpha/NIR) bands; with
            more, or another choice, set `bands`.
  roads     GeoJSON of road centerlines (LineString/MultiLineString; Polygons are
            filled as they are, Points become discs). CRS: the legacy "crs" member
            when present (e.g. urn:ogc:def:crs:EPSG::32611), else WGS84 lon/lat
            (RFC 7946).
  gps       optional CSV file(s): Porto/Kaggle taxi format (a POLYLINE column of
            [lon, lat] lists) or any CSV with lon/lat columns (names: lon,
            longitude, lng, x / lat, latitude, y, case-insensitive; or set
            lon_column/lat_column), read by reading.read_gps_csv. Coordinates in
            gps_crs (default EPSG:4326 lon/lat; UTM metres need e.g. EPSG:32611;
            for a geographic CRS, values outside [-180, 180] / [-90, 90] are
            errors that name the CRS). Without gps the aux heat-map is all zero
            (image-only data).

Preparation: the image, GPS and heat-map steps below are cmmp_jax.data.preparation's
(the functions prediction uses), with the spec's bands, scaling, bit_depth,
percentiles, gps_format, lon/lat_column, gps_crs and tile_size; what was applied
(the bit depth, the percentile stretch values) is recorded in the dataset's
metadata (metadata.json, key 'input_preparation'), with the build's counts
under 'custom_area'. `--mode=predict` reuses the record.

Processing:
  - Image to uint8 ('scaling'): 'bit_depth' (default) is reading's rule
    (reading.samples_to_uint8): x -> round(x * 255 / (2**b - 1)), clipped, with
    b = bit_depth, or when unset the bit depth the GeoTIFF records (its NBITS
    tag); integer imagery wider than 8 bits with neither is an error (set
    bit_depth: 11 for SpaceNet/WorldView 11-bit data). uint8 data is kept as is
    and float data in [0, 1] is multiplied by 255. 'percentile' stretches each
    band linearly from its `percentiles` (default 2, 98) over the whole raster
    to 0..255; the record keeps the stretch values.
  - Road mask: a pixel is road when its centre lies within road_width_m / 2
    metres of a centerline (a round-capped buffer of total width road_width_m,
    like solaris' road_mask(width, meters=True)); a centerline leaving the
    raster is clipped by it. Distances are measured in a
    local metric frame: metres per CRS unit from the WGS84 ellipsoid at each
    segment's latitude for a geographic CRS, the CRS's linear unit otherwise.
    The default width, 4.0 m, reproduces SpaceNet-3's road masks (solaris
    road_mask(width=4, meters=True)): on the AOI_2_Vegas gray sample tile with
    its centerlines the mask built here agrees with the published mask on all
    but 3 of 1.69M pixels (IoU 0.9999).
  - Road lines ('road_lines', the vector labels of graph metrics): each tile
    stores the LineStrings of the GeoJSON that cross its part on the raster,
    clipped there, in tile pixels with the pixel centre of mask[r, c] at
    x = c, y = r (tile_road_lines; JSON of common.road_lines_json, 1e-4 px).
    Polygons and Points have no centreline: they are in the mask only, the
    build counts those on the raster (metadata 'custom_area',
    road_geometries_without_centreline) and warns, and cmmp_jax.graph_eval
    then takes the ground-truth graphs from the masks instead.
  - Heat-map: GPS points projected to raster pixels (rasterio) and rendered by
    heatmap.render_tiled_heatmap_uint8 on the grid of tiles (1 channel), each
    tile normalised by its own maximum count.
  - Tiles of tile_size x tile_size pixels from the top-left corner. Partial
    tiles at the right/bottom edge (the raster is not a multiple of tile_size)
    are zero-padded (edge='pad': image, heat-map and mask 0 past the raster)
    when at least min_valid_fraction (default 0: every one) of their pixels lie
    on the raster, else left out; edge='drop' leaves out every partial tile.
    The build logs how many padded tiles it kept; with small areas they can be
    a large share of a split. Tile id '{name}_{tile_row}_{tile_col}'. Bounds
    are the lon/lat box (float64 degrees) of the full tile window.
  - Checks: GPS given but no point on the raster (coordinates in another CRS
    than gps_crs, e.g. UTM metres declared as degrees or the wrong UTM zone),
    and road geometries none of which overlaps the raster (a GeoJSON in another
    CRS than it declares) are errors with the counts and extents; less than
    half of the GPS points on the raster, or some road geometries off it, are
    warnings with the counts.
  - Splits: tiles are shared out by a seeded permutation of their sorted ids
    (common.seeded_split): validation_fraction, test_fraction, rest = train.
    Splits left empty by a zero fraction are not written.

Spec: a CustomConfig(spec=CustomSpec(...)) or, with the default config, a file
{manual_dir}/custom.json (or custom.yaml / custom.yml), e.g.
  {"imagery": "area.tif", "roads": "roads.geojson", "gps": ["trips.csv"],
   "road_width_m": 4.0, "tile_size": 512}
Relative paths are relative to manual_dir. Every CustomSpec field may appear.

Memory. By default (streaming: true) the build streams (StreamingArea, with the pieces of
data_builders.streaming): the imagery is read by rasterio windows (a pass over strips of one
row of tiles resolves the preparation: bit depth, errors, and an exact percentile stretch of
integer imagery from histograms), road masks are computed one row of tiles at a time for the
geometries an STRtree finds there, GPS CSVs are read in chunks and bucketed on disk by row of
tiles, and each row's heat-map is rendered from its bucket. Rows of mask and heat-map wait,
compressed, in a work folder beside the downloads (deleted after the build); examples are
made tile by tile, in raster order within each split, and TFDS's writer spills them to disk
beyond 64 MB. Peak memory then depends on the width of a row of tiles, the GPS chunk and the
busiest row of tiles' GPS points (16 bytes each), not on the raster's size: measured 535-543 MiB
from 5k x 5k to 20k x 20k px with 10 million GPS points (benchmarks/stream_build.py). The
examples, splits, recorded preparation and counts are bit-identical to those of
streaming: false, which holds the whole raster, its mask and every GPS point in memory (Area;
about 5 bytes per pixel plus ~100 per GPS point while reading them: 1.6 GB at 5k x 5k, 1.8 GB
at 10k x 10k with 10M points) and is slower (it parses CSVs row by row). Float imagery under
'percentile' is the exception: streamed, its stretch comes from a decimated read of at most 4M
pixels (the recorded values are what was applied).

Apache Beam. With Beam pipeline options (`python -m data_builders.build custom
--beam_pipeline_options=runner=...`, TFDS's DownloadConfig.beam_options or beam_runner), the
build is one Beam pipeline run by TFDS (BeamArea, data_builders.beam_tiles): the launcher
resolves the preparation and the tiles; workers read GPS files in chunks, group the points by
tile (one shuffle) and make each tile's example; the counts return as Beam metrics. The same
examples, splits, record and counts as the streamed build (tests/test_beam_build.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
import tempfile
import threading
import zlib
from typing import Any, Mapping, Sequence

import affine
import numpy as np
import rasterio
import rasterio.crs
import rasterio.errors
import rasterio.features
import rasterio.warp
import shapely
import tensorflow_datasets as tfds
import yaml

from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import heatmap as heatmap_lib
from cmmp_jax.data import preparation as preparation_lib
from cmmp_jax.data import reading
from data_builders import common
from data_builders import streaming

SPEC_FILE_NAMES = ('custom.json', 'custom.yaml', 'custom.yml')
DEFAULT_ROAD_WIDTH_M = 4.0
# Longest centerline piece handled at once, in pixels (bounds a search window's size).
_PIECE_PX = 256


# ---------------------------------------------------------------------------
# Spec.


@dataclasses.dataclass(frozen=True)
class CustomSpec:
  """What to build (see the module docstring for the meaning of every field)."""
  imagery: str
  roads: str
  gps: tuple[str, ...] = ()
  gps_format: str = 'auto'          # one of reading.GPS_FORMATS
  lon_column: str | None = None
  lat_column: str | None = None
  gps_crs: str = 'EPSG:4326'
  road_width_m: float = DEFAULT_ROAD_WIDTH_M
  tile_size: int = 512
  edge: str = 'pad'                 # 'pad' or 'drop'
  min_valid_fraction: float = 0.0   # 'pad': leave out edge tiles with less on the raster
  validation_fraction: float = 0.1
  test_fraction: float = 0.1
  split_seed: int = 0
  bands: tuple[int, ...] | None = None
  scaling: str = 'bit_depth'        # 'bit_depth' or 'percentile'
  bit_depth: int | None = None
  percentiles: tuple[float, float] = (2.0, 98.0)
  name: str | None = None
  streaming: bool = True            # False: hold the whole area in memory (Area)

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any], source: str | pathlib.Path) -> 'CustomSpec':
    """Builds a spec from a parsed JSON/YAML mapping; errors name the source file."""
    if not isinstance(values, Mapping):
      raise common.SpecError(source, f'spec must be a mapping, got {type(values).__name__}')
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise common.SpecError(source, f'unknown field(s) {unknown}; known: {sorted(fields)}')
    missing = [name for name in ('imagery', 'roads') if not values.get(name)]
    if missing:
      raise common.SpecError(source, f'required field(s) {missing} missing')
    values = dict(values)
    if isinstance(values.get('gps'), str):
      values['gps'] = [values['gps']]
    for name in ('gps', 'bands', 'percentiles'):
      if values.get(name) is not None:
        values[name] = tuple(values[name])
    spec = cls(**values)
    spec.validate(source)
    return spec

  def validate(self, source) -> None:
    """Raises SpecError naming source for out-of-range or ill-typed fields."""
    def fail(problem):
      raise common.SpecError(source, problem)
    if self.gps_format not in reading.GPS_FORMATS:
      fail(f'gps_format must be one of {reading.GPS_FORMATS}, got {self.gps_format!r}')
    if not isinstance(self.streaming, bool):
      fail(f'streaming must be true or false, got {self.streaming!r}')
    if self.edge not in ('pad', 'drop'):
      fail(f"edge must be 'pad' or 'drop', got {self.edge!r}")
    if (isinstance(self.min_valid_fraction, bool)
        or not isinstance(self.min_valid_fraction, (int, float))
        or not 0 <= self.min_valid_fraction <= 1):
      fail(f'min_valid_fraction must be a number in [0, 1], got {self.min_valid_fraction!r}')
    if self.scaling not in ('bit_depth', 'percentile'):
      fail(f"scaling must be 'bit_depth' or 'percentile', got {self.scaling!r}")
    if not (isinstance(self.road_width_m, (int, float)) and math.isfinite(self.road_width_m)
            and self.road_width_m > 0):
      fail(f'road_width_m must be a positive number, got {self.road_width_m!r}')
    if not isinstance(self.tile_size, int) or self.tile_size < 8:
      fail(f'tile_size must be an integer >= 8, got {self.tile_size!r}')
    for name in ('validation_fraction', 'test_fraction'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not 0 <= value < 1:
        fail(f'{name} must be in [0, 1), got {value!r}')
    if self.validation_fraction + self.test_fraction >= 1:
      fail('validation_fraction + test_fraction must leave tiles for train')
    if self.bit_depth is not None and not (isinstance(self.bit_depth, int)
                                           and 1 <= self.bit_depth <= 32):
      fail(f'bit_depth must be an integer in [1, 32], got {self.bit_depth!r}')
    if self.bands is not None and (len(self.bands) not in (1, 3) or any(
        not isinstance(b, int) or b < 1 for b in self.bands)):
      fail(f'bands must list 1 or 3 band numbers (1-based), got {self.bands!r}')
    low, high = self.percentiles
    if not 0 <= low < high <= 100:
      fail(f'percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles!r}')
    try:
      self.preparation().validate('spec')
    except preparation_lib.PreparationError as error:
      fail(str(error).removeprefix('spec: '))

  def preparation(self) -> preparation_lib.InputPreparation:
    """The input preparation this spec asks for (resolved against the imagery by Area)."""
    return preparation_lib.InputPreparation(
        bands=self.bands, scaling=self.scaling, bit_depth=self.bit_depth,
        percentiles=tuple(self.percentiles), gps_format=self.gps_format,
        lon_column=self.lon_column, lat_column=self.lat_column, gps_crs=self.gps_crs,
        tile_size=self.tile_size, aux='gps_heatmap')


def load_spec_file(manual_dir: pathlib.Path, name: str | None) -> tuple[CustomSpec, pathlib.Path]:
  """Reads custom.json / custom.yaml (or `name`) from manual_dir."""
  candidates = [name] if name else list(SPEC_FILE_NAMES)
  for candidate in candidates:
    path = manual_dir / candidate
    if path.is_file():
      break
  else:
    raise common.MissingFileError(
        manual_dir / candidates[0],
        f'spec file not found (tried {", ".join(candidates)} in {manual_dir})')
  try:
    text = path.read_text()
    values = json.loads(text) if path.suffix == '.json' else yaml.safe_load(text)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
    raise common.SpecError(path, f'cannot parse spec ({error})') from error
  return CustomSpec.from_mapping(values, path), path


# ---------------------------------------------------------------------------
# Road mask.


def geojson_crs(collection: Mapping, path: pathlib.Path) -> rasterio.crs.CRS:
  """The CRS of a GeoJSON (legacy 'crs' member), WGS84 lon/lat when absent."""
  member = collection.get('crs')
  if not member:
    return geo_lib.LONLAT_CRS
  name = (member.get('properties') or {}).get('name') if isinstance(member, Mapping) else None
  if not name:
    raise common.DatasetFileError(path, f'cannot understand its "crs" member {member!r}')
  try:
    return rasterio.crs.CRS.from_user_input(name)
  except rasterio.errors.CRSError as error:
    raise common.DatasetFileError(path, f'unknown CRS {name!r} ({error})') from error


def _iter_geometries(geometry: Mapping):
  """Flattens Multi* and GeometryCollection into simple geometries."""
  kind = geometry.get('type')
  if kind == 'GeometryCollection':
    for part in geometry.get('geometries', []):
      yield from _iter_geometries(part)
  elif kind in ('MultiLineString', 'MultiPolygon', 'MultiPoint'):
    for coordinates in geometry.get('coordinates', []):
      yield {'type': kind[len('Multi'):], 'coordinates': coordinates}
  else:
    yield geometry


def read_road_geometries(path: pathlib.Path) -> tuple[list[dict], rasterio.crs.CRS]:
  """Simple geometries (LineString, Polygon, Point) of a GeoJSON, and its CRS."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise common.MissingFileError(path, 'road GeoJSON not found')
  try:
    collection = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise common.DatasetFileError(path, f'cannot parse GeoJSON ({error})') from error
  if not isinstance(collection, Mapping):
    raise common.DatasetFileError(path, 'GeoJSON must be an object')
  if collection.get('type') == 'FeatureCollection':
    geometries = [f.get('geometry') for f in collection.get('features', [])]
  elif collection.get('type') == 'Feature':
    geometries = [collection.get('geometry')]
  else:
    geometries = [collection]
  simple = []
  for index, geometry in enumerate(geometries):
    if geometry is None:
      continue  # GeoJSON allows features without geometry
    for part in _iter_geometries(geometry):
      if part.get('type') not in ('LineString', 'Polygon', 'Point'):
        raise common.DatasetFileError(
            path, f'feature {index}: unsupported geometry type {part.get("type")!r}')
      try:
        flat = np.asarray(_flatten(part['coordinates']), dtype=np.float64)
      except (TypeError, ValueError, KeyError) as error:
        raise common.DatasetFileError(path, f'feature {index}: bad coordinates') from error
      if flat.size == 0:
        continue
      if not np.all(np.isfinite(flat)):
        raise common.DatasetFileError(path, f'feature {index}: NaN/inf coordinates')
      simple.append(part)
  return simple, geojson_crs(collection, path)


def _flatten(coordinates) -> list[float]:
  if isinstance(coordinates, (int, float)):
    return [coordinates]
  values = []
  for item in coordinates:
    values.extend(_flatten(item))
  return values


def _segments_distance_mask(mask: np.ndarray, points_xy: np.ndarray, transform,
                            radius_m: float, units_to_m, offset: tuple[int, int] = (0, 0)
                            ) -> None:
  """Sets mask pixels whose centre is within radius_m of the polyline points_xy (CRS units).

  Args:
    mask: bool (h, w) window of the raster whose top-left pixel is `offset` (row, col), updated
      in place. Pixel centres are computed from their raster indices, so a window gets the
      values the whole raster's mask has there, bit for bit.
    points_xy: float64 (N, 2) vertices in the raster CRS; N == 1 is a point.
    transform: raster affine (pixel -> CRS).
    radius_m: buffer radius in metres.
    units_to_m: callable lat/y array -> (metres per x unit, metres per y unit).
  """
  row_off, col_off = offset
  height, width = mask.shape
  if len(points_xy) == 1:
    pieces = [(points_xy[0], points_xy[0])]
  else:
    # Long diagonal segments are cut into pieces of at most _PIECE_PX pixels, so that the
    # search window of each piece (its bounding box) stays small.
    cols, rows = geo_lib.world_to_pixel(points_xy[:, 0], points_xy[:, 1], transform)
    pieces = []
    for i in range(len(points_xy) - 1):
      length_px = math.hypot(cols[i + 1] - cols[i], rows[i + 1] - rows[i])
      n = max(1, int(math.ceil(length_px / _PIECE_PX)))
      fractions = np.linspace(0.0, 1.0, n + 1)[:, None]
      cuts = points_xy[i] + fractions * (points_xy[i + 1] - points_xy[i])
      pieces.extend(zip(cuts[:-1], cuts[1:]))
  for a, b in pieces:
    mid_y = 0.5 * (a[1] + b[1])
    kx, ky = (float(v) for v in units_to_m(mid_y))
    # Metres per pixel step along each pixel axis, to size the search window.
    pixel_dx = math.hypot(transform.a * kx, transform.d * ky)  # metres per column step
    pixel_dy = math.hypot(transform.b * kx, transform.e * ky)  # metres per row step
    margin_cols = radius_m / pixel_dx + 1
    margin_rows = radius_m / pixel_dy + 1
    cols_ab, rows_ab = geo_lib.world_to_pixel(np.array([a[0], b[0]]), np.array([a[1], b[1]]),
                                              transform)
    col0 = max(int(math.floor(cols_ab.min() - margin_cols)), col_off)
    col1 = min(int(math.ceil(cols_ab.max() + margin_cols)), col_off + width)
    row0 = max(int(math.floor(rows_ab.min() - margin_rows)), row_off)
    row1 = min(int(math.ceil(rows_ab.max() + margin_rows)), row_off + height)
    if col0 >= col1 or row0 >= row1:
      continue
    cc, rr = np.meshgrid(np.arange(col0, col1) + 0.5, np.arange(row0, row1) + 0.5)
    xs, ys = geo_lib.pixel_to_world(cc, rr, transform)
    # Local metric frame centred on a: scale CRS units to metres.
    px, py = (xs - a[0]) * kx, (ys - a[1]) * ky
    vx, vy = (b[0] - a[0]) * kx, (b[1] - a[1]) * ky
    length2 = vx * vx + vy * vy
    if length2 > 0:
      t = np.clip((px * vx + py * vy) / length2, 0.0, 1.0)
    else:
      t = np.zeros_like(px)
    distance2 = (px - t * vx) ** 2 + (py - t * vy) ** 2
    mask[row0 - row_off:row1 - row_off, col0 - col_off:col1 - col_off] |= (
        distance2 <= radius_m * radius_m)


def rasterize_roads(geometries: Sequence[dict], geometries_crs, geo: geo_lib.GeoInfo,
                    height: int, width: int, road_width_m: float,
                    window: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """uint8 (H, W) road mask (0/1) of centerlines buffered to road_width_m (see docstring).

  window: (row0, col0, rows, cols) inside the H x W raster: only that window's mask,
  uint8 (rows, cols), equal to the whole mask cut there (polygons are burnt by GDAL with the
  window's transform).
  """
  row_off, col_off = (window[0], window[1]) if window is not None else (0, 0)
  if window is not None:
    height, width = window[2], window[3]
  crs = geo.crs
  if crs.is_geographic:
    def units_to_m(y):
      return geo_lib.metres_per_degree(y)
  else:
    factor = crs.linear_units_factor[1]
    def units_to_m(y):
      return factor, factor
  mask = np.zeros((height, width), dtype=bool)
  polygons = []
  for geometry in geometries:
    if geometries_crs != crs:
      geometry = rasterio.warp.transform_geom(geometries_crs, crs, geometry)
    if geometry['type'] == 'Polygon':
      polygons.append(geometry)
      continue
    # LineString (N, 2 or 3) or Point (2 or 3,); a z coordinate is ignored.
    vertices = np.atleast_2d(np.asarray(geometry['coordinates'], dtype=np.float64))[:, :2]
    _segments_distance_mask(mask, vertices, geo.transform, road_width_m / 2.0, units_to_m,
                            (row_off, col_off))
  if polygons:
    transform = geo.transform @ affine.Affine.translation(col_off, row_off)
    filled = rasterio.features.rasterize(
        [(p, 1) for p in polygons], out_shape=(height, width), transform=transform,
        fill=0, dtype=np.uint8)
    mask |= filled.astype(bool)
  return mask.astype(np.uint8)


# ---------------------------------------------------------------------------
# Checks of where roads lie.


def count_geometries_on_raster(geometries: Sequence[dict], geometries_crs, geo: geo_lib.GeoInfo,
                               height: int, width: int, margin_px: float) -> int:
  """How many geometries have a vertex-bounding box that reaches the raster (grown by
  margin_px pixels, the road's half width): the others cannot mark any pixel."""
  count = 0
  for geometry in geometries:
    if geometries_crs != geo.crs:
      geometry = rasterio.warp.transform_geom(geometries_crs, geo.crs, geometry)
    points = _vertices_xy(geometry)
    cols, rows = geo_lib.world_to_pixel(points[:, 0], points[:, 1], geo.transform)
    if (cols.max() >= -margin_px and cols.min() <= width + margin_px
        and rows.max() >= -margin_px and rows.min() <= height + margin_px):
      count += 1
  return count


def _vertices_xy(geometry: dict) -> np.ndarray:
  """(N, 2) x/y of every vertex of a simple geometry (a z coordinate is ignored)."""
  coordinates = geometry['coordinates']
  if geometry['type'] == 'Point':
    return np.asarray([coordinates[:2]], np.float64)
  if geometry['type'] == 'LineString':
    return np.asarray([c[:2] for c in coordinates], np.float64)
  return np.asarray([c[:2] for ring in coordinates for c in ring], np.float64)


def _half_width_px(geo: geo_lib.GeoInfo, road_width_m: float) -> float:
  """Half a road's width in pixels (of the larger pixel side), for overlap margins."""
  crs = geo.crs
  pixel = max(abs(geo.transform.a), abs(geo.transform.e))
  if crs.is_geographic:
    lon_m, lat_m = geo_lib.metres_per_degree(geo.bounds[1])
    pixel_m = pixel * min(float(lon_m), float(lat_m))
  else:
    pixel_m = pixel * crs.linear_units_factor[1]
  return road_width_m / 2.0 / max(pixel_m, 1e-12) + 1.0


def _max_half_width_px(geo: geo_lib.GeoInfo, road_width_m: float) -> float:
  """An upper bound of half a road's width in pixels anywhere on the raster (for a geographic
  CRS, at the edge latitude where a degree of longitude is shortest), plus 2 pixels."""
  crs, t = geo.crs, geo.transform
  if crs.is_geographic:
    farthest = max(abs(geo.bounds[1]), abs(geo.bounds[3]))
    kx, ky = (float(v) for v in geo_lib.metres_per_degree(min(farthest, 89.9)))
  else:
    kx = ky = crs.linear_units_factor[1]
  pixel_m = min(math.hypot(t.a * kx, t.d * ky), math.hypot(t.b * kx, t.e * ky))
  return road_width_m / 2.0 / max(pixel_m, 1e-12) + 2.0


# ---------------------------------------------------------------------------
# Road centrelines of each tile (the 'road_lines' vector labels).


def geometries_in_crs(geometries: Sequence[dict], geometries_crs, crs) -> list[dict]:
  """Simple GeoJSON geometries transformed from geometries_crs to crs (rasterio.warp), or as
  they are when the two are equal."""
  if geometries_crs == crs:
    return list(geometries)
  return [rasterio.warp.transform_geom(geometries_crs, crs, g) for g in geometries]


def _centreline_xy(geometry: dict) -> np.ndarray | None:
  """float64 (N, 2) x/y vertices of a LineString with at least two distinct vertices; None for
  geometries without a centreline (Polygon, Point, a LineString of one repeated point)."""
  if geometry['type'] != 'LineString':
    return None
  xy = _vertices_xy(geometry)
  if len(xy) < 2 or np.all(xy == xy[0]):
    return None
  return xy


def road_lines_px(geometries: Sequence[dict], transform: affine.Affine) -> list[np.ndarray | None]:
  """The centrelines of simple geometries (in the raster's CRS) in continuous raster pixels.

  Args:
    geometries: simple GeoJSON geometries (read_road_geometries' LineString / Polygon / Point)
      already in the raster's CRS (geometries_in_crs).
    transform: the raster's affine transform (pixel -> CRS).

  Returns:
    one entry per geometry: float64 (N, 2) (col, row) of a LineString's vertices by ~transform,
    in rasterio's convention (pixel (r, c) covers [c, c + 1) x [r, r + 1), centre at
    (c + 0.5, r + 0.5)), or None for a geometry without a centreline (Polygon, Point, a
    LineString of one repeated point: they mark the mask but are no road lines).
  """
  lines = []
  for geometry in geometries:
    xy = _centreline_xy(geometry)
    lines.append(None if xy is None else
                 np.stack(geo_lib.world_to_pixel(xy[:, 0], xy[:, 1], transform), axis=1))
  return lines


def tile_road_lines(lines_px: Sequence[np.ndarray], row0: int, col0: int, rows: int,
                    cols: int) -> list[np.ndarray]:
  """The road lines of one tile: centrelines clipped to its part on the raster, in its pixels.

  Args:
    lines_px: centrelines, each float64 (N >= 2, 2) (col, row) in continuous raster pixels
      (road_lines_px; None entries are skipped); lines off the tile are dropped.
    row0, col0: the tile's top-left pixel in the raster.
    rows, cols: how many of its rows / columns lie on the raster (tile_size, or less for an
      edge tile: roads are clipped at the raster's edge, as the mask is, not at the padding's).

  Returns:
    The tile's 'road_lines' (common.road_lines_json): float64 (M, 2) (x, y) with
    x = col - col0 - 0.5, y = row - row0 - 0.5, i.e. the pixel centre of mask[r, c] at x = c,
    y = r (cmmp_jax.graph_eval.polylines_to_graph's convention; the mask marks a pixel whose
    centre lies within road_width_m / 2 of a line). Each line is the part of a centreline in
    x in [-0.5, cols - 0.5], y in [-0.5, rows - 0.5] (shapely intersection, the clipping
    polylines_to_graph does: a road leaving the tile ends exactly on its border), in the order
    of lines_px, a line that leaves and re-enters the tile giving several.
  """
  window = shapely.box(-0.5, -0.5, cols - 0.5, rows - 0.5)
  offset = np.array([col0 + 0.5, row0 + 0.5])
  lines = []
  for line in lines_px:
    if line is None:
      continue
    clipped = shapely.intersection(shapely.LineString(np.asarray(line) - offset), window)
    for part in shapely.get_parts(clipped):
      if isinstance(part, shapely.LineString) and part.length > 0:
        lines.append(np.asarray(part.coords, np.float64)[:, :2])
  return lines


class RoadLineIndex:
  """An area's road centrelines in raster pixels (road_lines_px), found per tile by an STRtree
  of their bounding boxes (data_builders.streaming.RoadIndex), so that a tile's lines cost a
  query, not a pass over every geometry.

  Args:
    geometries: simple GeoJSON geometries in the raster's CRS (geometries_in_crs).
    transform: the raster's affine transform.
  """

  def __init__(self, geometries: Sequence[dict], transform: affine.Affine):
    lines = road_lines_px(geometries, transform)
    self._lines = [line for line in lines if line is not None]
    boxes = np.array([(*line.min(axis=0), *line.max(axis=0)) for line in self._lines],
                     np.float64).reshape(-1, 4)
    # A one-pixel margin: lines running along a tile's border are candidates too.
    self._index = streaming.RoadIndex(boxes, margin_px=1.0)
    self.num_lines = len(self._lines)

  def tile(self, row0: int, col0: int, rows: int, cols: int) -> list[np.ndarray]:
    """tile_road_lines of the window rows x cols at (row0, col0) (GeoJSON order kept)."""
    chosen = self._index.query(row0, col0, rows, cols)
    return tile_road_lines([self._lines[i] for i in chosen], row0, col0, rows, cols)


# ---------------------------------------------------------------------------
# The area: imagery, mask and GPS of one spec, cut into tiles.


def roads_in_raster(geometries: Sequence[dict], geometries_crs, geo: geo_lib.GeoInfo,
                    road_width_m: float) -> tuple[list[dict], streaming.RoadIndex]:
  """The geometries in the raster's CRS, and the index that finds those that can mark a window
  (their vertices' pixel boxes grown by the widest half road width in pixels)."""
  roads = geometries_in_crs(geometries, geometries_crs, geo.crs)
  boxes = np.zeros((len(roads), 4))
  for i, geometry in enumerate(roads):
    cols, rows = geo_lib.world_to_pixel(*_vertices_xy(geometry).T, geo.transform)
    boxes[i] = cols.min(), rows.min(), cols.max(), rows.max()
  return roads, streaming.RoadIndex(boxes, _max_half_width_px(geo, road_width_m))


@dataclasses.dataclass(frozen=True)
class Tile:
  tile_id: str
  row0: int
  col0: int
  valid_fraction: float  # share of the tile's pixels on the raster (1 for whole tiles)


class _AreaChecks:
  """What both kinds of area share: the checks of roads and GPS against the imagery (from
  counts, so that a streamed area need not hold the arrays) and the tiles. Subclasses set spec,
  imagery_path, geo, height, width, preparation and counts."""

  def _set_spec(self, spec: CustomSpec, base_dir: pathlib.Path | None, source: str) -> None:
    """spec and the imagery's path (which must exist)."""
    self.spec = spec
    self.imagery_path = resolve(spec.imagery, base_dir, source)
    if not self.imagery_path.is_file():
      raise common.MissingFileError(self.imagery_path, 'imagery GeoTIFF not found')

  def _extent_text(self, crs) -> str:
    """The raster's bounds in `crs`, for messages."""
    west, south, east, north = self.geo.bounds
    if crs != self.geo.crs:
      west, south, east, north = rasterio.warp.transform_bounds(
          self.geo.crs, crs, west, south, east, north, densify_pts=21)
    return f'x {west:.6g}..{east:.6g}, y {south:.6g}..{north:.6g}'

  def _check_roads(self, roads_path: pathlib.Path, geometries, roads_crs,
                   road_pixels: int) -> None:
    n_geometries = len(geometries)
    self.counts.update(road_geometries=n_geometries, road_pixels=road_pixels)
    self._count_geometries_without_centreline(roads_path, geometries, roads_crs)
    if n_geometries == 0:
      logging.warning('custom: %s holds no road geometry: every mask is all zero', roads_path)
      self.counts['road_geometries_on_raster'] = 0
      return
    on_raster = count_geometries_on_raster(
        geometries, roads_crs, self.geo, self.height, self.width,
        _half_width_px(self.geo, self.spec.road_width_m))
    self.counts['road_geometries_on_raster'] = on_raster
    if road_pixels == 0:
      raise common.DatasetFileError(
          roads_path, f'none of its {n_geometries} road geometries overlaps the imagery '
          f'{self.imagery_path} (roads read in {roads_crs.to_string()}, where the imagery '
          f'spans {self._extent_text(roads_crs)}): is the GeoJSON in the CRS it declares (its '
          '"crs" member, else WGS84 lon/lat), and does it cover this area?')
    if on_raster < n_geometries:
      logging.warning('custom: %d of %d road geometries of %s lie outside the imagery %s',
                      n_geometries - on_raster, n_geometries, roads_path, self.imagery_path)

  def _count_geometries_without_centreline(self, roads_path: pathlib.Path, geometries,
                                           roads_crs) -> None:
    """Counts (in counts['road_geometries_without_centreline']) the Polygons and Points on the
    raster: they mark the mask but are not in the tiles' 'road_lines', so graph metrics take
    their ground truth from the masks of such a build (cmmp_jax.graph_eval)."""
    without = [g for g in geometries if _centreline_xy(g) is None]
    count = count_geometries_on_raster(
        without, roads_crs, self.geo, self.height, self.width,
        _half_width_px(self.geo, self.spec.road_width_m)) if without else 0
    self.counts['road_geometries_without_centreline'] = count
    if count:
      logging.warning('custom: %d road geometries of %s on the imagery are polygons or points '
                      'without a centreline: they are in the masks but not in the road_lines, '
                      'so graph metrics (APLS, TOPO) will take their ground truth from the '
                      'masks', count, roads_path)

  def _check_gps(self, gps_paths, gps: streaming.GpsCounts) -> None:
    n_points, on_raster = gps.points, gps.on_raster
    self.counts.update(gps_points=n_points, gps_points_on_raster=on_raster)
    if n_points == 0:
      if gps_paths:
        logging.warning('custom: the GPS file(s) %s hold no point: every heat-map is all zero',
                        ', '.join(str(p) for p in gps_paths))
      return
    crs = self.preparation.gps_crs
    if on_raster == 0:
      raise common.DatasetFileError(
          gps_paths[0], f'none of the {n_points} GPS points of {len(gps_paths)} file(s) falls '
          f'on the imagery {self.imagery_path}: read as gps_crs {crs}, the points span x '
          f'{gps.x_min:.6g}..{gps.x_max:.6g}, y {gps.y_min:.6g}..{gps.y_max:.6g}, and the '
          f'imagery spans {self._extent_text(preparation_lib.gps_crs(self.preparation))} in '
          f'{crs}. Set gps_crs to the CRS of the coordinates (e.g. EPSG:32611 for UTM 11N '
          'metres, EPSG:4326 for lon/lat degrees), or check lon_column/lat_column (swapped?)')
    if on_raster < 0.5 * n_points:
      logging.warning('custom: only %d of %d GPS points (%.1f%%) fall on the imagery %s '
                      '(gps_crs %s); the others are dropped', on_raster, n_points,
                      100.0 * on_raster / n_points, self.imagery_path, crs)

  def _make_tiles(self) -> list[Tile]:
    size = self.spec.tile_size
    name = self.spec.name or self.imagery_path.stem
    tiles, padded, left_out = [], [], 0
    for tile_row, row0 in enumerate(range(0, self.height, size)):
      for tile_col, col0 in enumerate(range(0, self.width, size)):
        rows_on, cols_on = min(size, self.height - row0), min(size, self.width - col0)
        valid = rows_on * cols_on / float(size * size)
        if valid < 1.0 and (self.spec.edge == 'drop' or valid < self.spec.min_valid_fraction):
          left_out += 1
          continue
        tile = Tile(f'{name}_{tile_row}_{tile_col}', row0, col0, valid)
        tiles.append(tile)
        if valid < 1.0:
          padded.append(tile)
    self.counts.update(tiles=len(tiles), padded_tiles=len(padded), tiles_left_out=left_out)
    if not tiles:
      raise common.SpecError(
          self.imagery_path, f'a {self.width}x{self.height} raster has no {size}x{size} tile '
          f'to write (edge {self.spec.edge!r}, min_valid_fraction '
          f'{self.spec.min_valid_fraction}); lower tile_size or min_valid_fraction')
    if padded:
      fractions = [t.valid_fraction for t in padded]
      message = ('custom: %d of %d tiles are zero-padded edge tiles (%.0f-%.0f%% of their '
                 'pixels on the raster); set min_valid_fraction (or edge: drop) to leave out '
                 'mostly padded ones')
      log = logging.warning if len(padded) > 0.25 * len(tiles) else logging.info
      log(message, len(padded), len(tiles), 100 * min(fractions), 100 * max(fractions))
    return tiles


class Area(_AreaChecks):
  """Everything one spec describes, loaded whole into memory and ready to be cut into tiles
  (the build with `streaming: false`, and the reference of StreamingArea).

  Attributes:
    preparation: the spec's InputPreparation as applied to the imagery (the record).
    image: uint8 (H, W, 3); mask: uint8 (H, W) 0/1; aux: uint8 (Hg, Wg, 1) heat-map of the
      tile grid (Hg, Wg = H, W rounded up to whole tiles).
    tiles: the tiles to write; counts: facts of the build for the metadata and the log.
  """

  def __init__(self, spec: CustomSpec, base_dir: pathlib.Path | None, source: str):
    self._set_spec(spec, base_dir, source)
    try:
      raster = reading.read_raster(self.imagery_path)
      if raster.geo is None:
        raise common.UnreadableImageError(self.imagery_path, 'GeoTIFF has no CRS')
      self.image, self.preparation = preparation_lib.prepare_image(raster, spec.preparation())
    except reading.ReadError as error:
      raise common.UnreadableImageError(error.path, error.problem) from error
    self.geo = raster.geo
    self.height, self.width = self.image.shape[:2]
    del raster
    self.counts: dict[str, Any] = {'raster_height': self.height, 'raster_width': self.width}
    roads_path = resolve(spec.roads, base_dir, source)
    geometries, roads_crs = read_road_geometries(roads_path)
    roads = geometries_in_crs(geometries, roads_crs, self.geo.crs)
    self.mask = rasterize_roads(roads, self.geo.crs, self.geo, self.height, self.width,
                                spec.road_width_m)
    self.road_lines = RoadLineIndex(roads, self.geo.transform)
    self._check_roads(roads_path, geometries, roads_crs, int(np.count_nonzero(self.mask)))
    gps_paths = [resolve(gps, base_dir, source) for gps in spec.gps]
    try:
      x, y = preparation_lib.read_gps(gps_paths, self.preparation)
    except reading.ReadError as error:
      raise common.DatasetFileError(error.path, error.problem) from error
    cols, rows = preparation_lib.gps_to_raster_pixels(x, y, self.preparation.gps_crs, self.geo)
    gps = streaming.GpsCounts()
    if x.size:
      gps = streaming.GpsCounts(
          points=int(x.size), x_min=float(x.min()), x_max=float(x.max()),
          y_min=float(y.min()), y_max=float(y.max()))
    gps.on_raster = int(np.count_nonzero(
        (cols >= 0) & (cols < self.width) & (rows >= 0) & (rows < self.height)))
    self._check_gps(gps_paths, gps)
    self.aux, _ = preparation_lib.render_gps_aux(cols, rows, self.height, self.width,
                                                 self.preparation)
    self.tiles = self._make_tiles()
    logging.info('custom: %s: %dx%d px, %d tiles, %d GPS points (%d on the raster), '
                 'preparation: %s', self.imagery_path, self.width, self.height,
                 len(self.tiles), self.counts['gps_points'],
                 self.counts['gps_points_on_raster'], self.preparation.describe())

  def example(self, tile: Tile) -> dict:
    """The example dict of one tile (zero-padded past the raster's edge)."""
    size = self.spec.tile_size
    window = (slice(tile.row0, tile.row0 + size), slice(tile.col0, tile.col0 + size))
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size, 1), np.uint8)
    aux = np.zeros((size, size, 1), np.uint8)
    piece = self.image[window]
    image[:piece.shape[0], :piece.shape[1]] = piece
    mask[:piece.shape[0], :piece.shape[1], 0] = self.mask[window]
    # The heat-map of the whole grid tile (points past the raster's edge count for the tile's
    # maximum) but, like image and mask, zero past the raster.
    aux[:piece.shape[0], :piece.shape[1]] = self.aux[window][:piece.shape[0], :piece.shape[1]]
    bounds = geo_lib.pixel_bounds_to_lonlat(self.geo.transform, self.geo.crs,
                                            tile.row0, tile.col0, size, size)
    lines = self.road_lines.tile(tile.row0, tile.col0, piece.shape[0], piece.shape[1])
    return common.make_example(tile.tile_id, image, aux, mask, bounds,
                               source=self.imagery_path, road_lines=lines)


class StreamingArea(_AreaChecks):
  """The area of one spec read window by window (data_builders.streaming): the same tiles,
  examples, recorded preparation and counts as Area, in memory bounded by a row of tiles.

  Construction makes three passes, each a row of tiles at a time, and keeps their results in
  work_dir: the road mask (bits) and the heat-map of every row of tiles, and the GPS points
  bucketed by row of tiles (data_builders.streaming.GpsTileRows). example() then reads the
  tile's imagery window and cuts the mask and heat-map from its row (the last row is cached:
  iterate tiles by row). close() closes the imagery and deletes work_dir.
  """

  def __init__(self, spec: CustomSpec, base_dir: pathlib.Path | None, source: str,
               work_dir: pathlib.Path | str, gps_chunk_rows: int | None = None):
    self.work_dir = pathlib.Path(work_dir)
    self.work_dir.mkdir(parents=True, exist_ok=True)
    self._set_spec(spec, base_dir, source)
    try:
      self.imagery = streaming.ImageryWindows(self.imagery_path, spec.preparation(),
                                              strip_rows=spec.tile_size)
    except reading.ReadError as error:
      raise common.UnreadableImageError(error.path, error.problem) from error
    self._row_cache: tuple[int, np.ndarray, np.ndarray] | None = None
    if gps_chunk_rows is None:
      gps_chunk_rows = streaming.DEFAULT_GPS_CHUNK_ROWS
    try:
      self._prepare(base_dir, source, gps_chunk_rows)
    except BaseException:
      self.close()
      raise

  def _prepare(self, base_dir, source, gps_chunk_rows: int) -> None:
    spec, size = self.spec, self.spec.tile_size
    self.preparation = self.imagery.preparation
    self.geo = self.imagery.geo
    self.height, self.width = self.imagery.height, self.imagery.width
    self.n_tile_rows = -(-self.height // size)
    self.counts: dict[str, Any] = {'raster_height': self.height, 'raster_width': self.width}
    # Roads: geometries in the raster's CRS, found per row of tiles by their pixel boxes.
    roads_path = resolve(spec.roads, base_dir, source)
    geometries, roads_crs = read_road_geometries(roads_path)
    self._roads, road_index = roads_in_raster(geometries, roads_crs, self.geo,
                                              spec.road_width_m)
    self.road_lines = RoadLineIndex(self._roads, self.geo.transform)
    road_pixels = 0
    for tile_row in range(self.n_tile_rows):
      row0 = tile_row * size
      rows_on = min(size, self.height - row0)
      chosen = road_index.query(row0, 0, rows_on, self.width)
      band = rasterize_roads([self._roads[i] for i in chosen], self.geo.crs, self.geo,
                             self.height, self.width, spec.road_width_m,
                             window=(row0, 0, rows_on, self.width))
      road_pixels += int(np.count_nonzero(band))
      self._write_row('mask', tile_row, np.packbits(band.astype(bool), axis=None))
    self._check_roads(roads_path, geometries, roads_crs, road_pixels)
    # GPS: chunks projected and bucketed by row of tiles, then each row rendered.
    gps_paths = [resolve(gps, base_dir, source) for gps in spec.gps]
    buckets = streaming.GpsTileRows(self.work_dir / 'gps', self.height, self.width, size)
    try:
      for x, y in streaming.iter_gps_chunks(gps_paths, self.preparation, gps_chunk_rows):
        cols, rows = preparation_lib.gps_to_raster_pixels(x, y, self.preparation.gps_crs,
                                                          self.geo)
        buckets.add(x, y, cols, rows)
    except reading.ReadError as error:
      raise common.DatasetFileError(error.path, error.problem) from error
    self._check_gps(gps_paths, buckets.counts)
    self.grid_width = buckets.grid_width
    for tile_row in range(self.n_tile_rows):
      self._write_row('aux', tile_row, buckets.render_row(tile_row))
    shutil.rmtree(buckets.work_dir)
    self.tiles = self._make_tiles()
    logging.info('custom: %s: %dx%d px, %d tiles, %d GPS points (%d on the raster), '
                 'preparation: %s (streamed)', self.imagery_path, self.width, self.height,
                 len(self.tiles), self.counts['gps_points'],
                 self.counts['gps_points_on_raster'], self.preparation.describe())

  def _row_path(self, kind: str, tile_row: int) -> pathlib.Path:
    return self.work_dir / f'{kind}_row_{tile_row:06d}.zlib'

  def _write_row(self, kind: str, tile_row: int, array: np.ndarray) -> None:
    self._row_path(kind, tile_row).write_bytes(zlib.compress(array.tobytes(), 1))

  def _read_row(self, tile_row: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask uint8 (rows_on, W), aux uint8 (T, Wg)) of one row of tiles, cached."""
    if self._row_cache is None or self._row_cache[0] != tile_row:
      size = self.spec.tile_size
      rows_on = min(size, self.height - tile_row * size)
      bits = np.frombuffer(zlib.decompress(self._row_path('mask', tile_row).read_bytes()),
                           np.uint8)
      mask = np.unpackbits(bits, count=rows_on * self.width).reshape(rows_on, self.width)
      aux = np.frombuffer(zlib.decompress(self._row_path('aux', tile_row).read_bytes()),
                          np.uint8).reshape(size, self.grid_width)
      self._row_cache = (tile_row, mask, aux)
    return self._row_cache[1], self._row_cache[2]

  def example(self, tile: Tile) -> dict:
    """The example dict of one tile, equal to Area.example's."""
    size = self.spec.tile_size
    rows_on = min(size, self.height - tile.row0)
    cols_on = min(size, self.width - tile.col0)
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size, 1), np.uint8)
    aux = np.zeros((size, size, 1), np.uint8)
    try:
      image[:rows_on, :cols_on] = self.imagery.read(tile.row0, tile.col0, rows_on, cols_on)
    except reading.ReadError as error:
      raise common.UnreadableImageError(error.path, error.problem) from error
    mask_row, aux_row = self._read_row(tile.row0 // size)
    mask[:rows_on, :cols_on, 0] = mask_row[:, tile.col0:tile.col0 + cols_on]
    aux[:rows_on, :cols_on, 0] = aux_row[:rows_on, tile.col0:tile.col0 + cols_on]
    bounds = geo_lib.pixel_bounds_to_lonlat(self.geo.transform, self.geo.crs,
                                            tile.row0, tile.col0, size, size)
    lines = self.road_lines.tile(tile.row0, tile.col0, rows_on, cols_on)
    return common.make_example(tile.tile_id, image, aux, mask, bounds,
                               source=self.imagery_path, road_lines=lines)

  def close(self) -> None:
    """Closes the imagery and deletes the work folder."""
    self._row_cache = None
    self.imagery.close()
    shutil.rmtree(self.work_dir, ignore_errors=True)


def resolve(path: str, base_dir: pathlib.Path | None, source) -> pathlib.Path:
  """An absolute path, or path relative to base_dir (manual_dir)."""
  candidate = pathlib.Path(path).expanduser()
  if candidate.is_absolute():
    return candidate
  if base_dir is None:
    raise common.SpecError(source, f'relative path {path!r} needs a manual_dir')
  return base_dir / candidate


# ---------------------------------------------------------------------------
# Builder.


@dataclasses.dataclass
class CustomConfig(tfds.core.BuilderConfig):
  """A custom area: `spec` given here, or read from `spec_file` in manual_dir.

  Attributes:
    spec: the CustomSpec; None reads the spec file.
    spec_file: file name in manual_dir; empty tries custom.json, .yaml, .yml.
  """
  spec: CustomSpec | None = None
  spec_file: str = ''


class Custom(common.RoadTileBuilder):
  """A user's own area: GeoTIFF imagery + GeoJSON road centerlines + GPS CSV."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'float64 bounds; input preparation and build counts in the '
                            'metadata; explicit bit depth; min_valid_fraction; heat-map cut '
                            'from the tile grid; checks of GPS and roads against the imagery.',
                   '1.2.0': "road centrelines of each tile ('road_lines', from the GeoJSON) "
                            'for graph metrics; polygons/points without a centreline counted '
                            'in the metadata.'}
  ROAD_LINES = True  # examples carry 'road_lines' (common.example_features)
  BUILDER_CONFIGS = [CustomConfig(
      name='default', description='Spec read from custom.json/custom.yaml in manual_dir.')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in manual_dir a GeoTIFF of the area, a GeoJSON of its road centerlines,
  optional GPS CSV files (Porto POLYLINE format or lon/lat columns), and a spec
  custom.json (or custom.yaml), e.g.
    {"imagery": "area.tif", "roads": "roads.geojson", "gps": ["trips.csv"],
     "road_width_m": 4.0, "tile_size": 512}
  Every field is described in data_builders/custom/custom.py (CustomSpec).
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    try:
      manual_dir = pathlib.Path(dl_manager.manual_dir)
    except AssertionError:
      # TFDS asserts when manual_dir is missing or empty; a spec with absolute
      # paths does not need one.
      if config.spec is None:
        raise
      manual_dir = None
    if config.spec is not None:
      spec, source = config.spec, f'CustomConfig {config.name!r}'
      spec.validate(source)
    else:
      spec, source = load_spec_file(manual_dir, config.spec_file or None)
    if self._beam_build:
      area = BeamArea(spec, manual_dir, source)
      self._beam_area = area
      self._areas.append(area)
    elif spec.streaming:
      # Beside the downloads (on the data's disk, not /tmp); deleted by _download_and_prepare.
      download_dir = pathlib.Path(dl_manager.download_dir)
      download_dir.mkdir(parents=True, exist_ok=True)
      work_dir = tempfile.mkdtemp(prefix='custom-stream-', dir=download_dir)
      # Closed by _download_and_prepare (the only caller, normally).
      areas = self.__dict__.setdefault('_areas', [])
      areas.append(_PendingWorkDir(pathlib.Path(work_dir)))
      area = StreamingArea(spec, manual_dir, source, work_dir)
      areas.append(area)
    else:
      area = Area(spec, manual_dir, source)
    self.record_preparation(area.preparation, custom_area={
        'imagery': str(area.imagery_path), 'crs': area.geo.crs.to_string(),
        'transform': list(tuple(area.geo.transform)[:6]), **area.counts})
    by_id = {tile.tile_id: tile for tile in area.tiles}
    parts = common.seeded_split(
        by_id, {'validation': spec.validation_fraction, 'test': spec.test_fraction},
        spec.split_seed, source=area.imagery_path)
    if self._beam_build:
      # Imported here: Apache Beam is only needed (and its import only paid) by Beam builds.
      from data_builders import beam_tiles  # pylint: disable=import-outside-toplevel
      return beam_tiles.split_transforms(area, {name: [by_id[i] for i in sorted(ids)]
                                                for name, ids in parts.items() if ids})
    # Tiles in raster order within a split: a streamed area reads each row of tiles once.
    return {name: self._generate_examples(
                area, sorted((by_id[i] for i in ids), key=lambda t: (t.row0, t.col0)))
            for name, ids in parts.items() if ids}

  def _download_and_prepare(self, dl_manager, download_config):
    # GDAL's block cache and TFDS's in-memory example buffer bounded (their defaults are 5% of
    # the machine's memory and 1 GB; data_builders.streaming); streamed areas closed and their
    # work folders deleted however the build ends.
    self._areas = []  # what _split_generators opens: closed below
    # Beam pipeline options or a runner given to the build (e.g. `python -m data_builders.build
    # custom --beam_pipeline_options=runner=DirectRunner`): TFDS runs the Beam pipeline that
    # _split_generators returns (BeamArea, data_builders.beam_tiles).
    self._beam_build = (download_config.beam_runner is not None
                        or download_config.beam_options is not None)
    self._beam_area = None
    try:
      with rasterio.Env(GDAL_CACHEMAX=streaming.GDAL_CACHE_BYTES), \
          streaming.bounded_tfds_shuffle_buffer():
        return super()._download_and_prepare(dl_manager=dl_manager,
                                             download_config=download_config)
    finally:
      for area in self._areas:
        area.close()
      self._areas = []

  def _process_pipeline_result(self, pipeline_result) -> None:
    """After a Beam build's pipeline, before TFDS finalises the splits: the counts it returned
    (Beam metrics) in the metadata, and the road checks on them (an error fails the build)."""
    from data_builders import beam_tiles  # pylint: disable=import-outside-toplevel
    area = self._beam_area
    counts = beam_tiles.counter_values(pipeline_result,
                                       ['gps_points', 'gps_on_raster', 'road_pixels'])
    area.finish(counts['gps_points'], counts['gps_on_raster'], counts['road_pixels'])
    record = self.info.metadata['custom_area']
    self.info.metadata['custom_area'] = {
        **{key: value for key, value in record.items() if key not in area.counts}, **area.counts}

  def _generate_examples(self, area, tiles: list[Tile]):
    for tile in tiles:
      yield tile.tile_id, area.example(tile)


@dataclasses.dataclass
class _PendingWorkDir:
  """A streamed area's work folder, deleted even when the area fails to construct."""
  path: pathlib.Path

  def close(self) -> None:
    shutil.rmtree(self.path, ignore_errors=True)


class BeamArea(_AreaChecks):
  """The area of one spec for a build by Apache Beam (data_builders.beam_tiles): the launcher
  resolves what needs the whole raster once (the imagery's preparation, from one streamed pass:
  streaming.ImageryWindows) and the tiles; this object then travels to the workers, which read
  imagery windows, road geometries and GPS files themselves, so every input must be on a path
  all workers can read. Examples, splits, recorded preparation and counts are those of Area and
  StreamingArea (tests/test_beam_build.py).

  The road and GPS counts come back from the pipeline as Beam metrics: finish() records them and
  makes the road checks that need the whole mask (the GPS checks run in the pipeline).
  """

  def __init__(self, spec: CustomSpec, base_dir: pathlib.Path | None, source: str):
    self._set_spec(spec, base_dir, source)
    try:
      with streaming.ImageryWindows(self.imagery_path, spec.preparation(),
                                    strip_rows=spec.tile_size) as imagery:
        self.preparation, self.geo = imagery.preparation, imagery.geo
        self.height, self.width = imagery.height, imagery.width
    except reading.ReadError as error:
      raise common.UnreadableImageError(error.path, error.problem) from error
    self.roads_path = resolve(spec.roads, base_dir, source)
    if not self.roads_path.is_file():
      raise common.MissingFileError(self.roads_path, 'road GeoJSON not found')
    self.gps_paths = [resolve(gps, base_dir, source) for gps in spec.gps]
    for path in self.gps_paths:
      if not path.is_file():
        raise common.MissingFileError(path, 'GPS CSV not found')
    self.grid_height, self.grid_width = heatmap_lib.grid_extent(self.height, self.width,
                                                                spec.tile_size)
    self.counts: dict[str, Any] = {'raster_height': self.height, 'raster_width': self.width}
    self.tiles = self._make_tiles()
    self._local = threading.local()  # per worker thread: open imagery, road index

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_local']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  # What the workers do (data_builders.beam_tiles's `work`).

  def gps_sources(self) -> list[str]:
    return [str(path) for path in self.gps_paths]

  def read_gps(self, source: str):
    """GpsCounts per chunk and ((tile_row, tile_col), points) of one GPS file."""
    size = self.spec.tile_size
    try:
      for x, y in streaming.iter_gps_chunks([source], self.preparation):
        cols, rows = preparation_lib.gps_to_raster_pixels(x, y, self.preparation.gps_crs,
                                                          self.geo)
        counts = streaming.GpsCounts()
        counts.add(x, y, cols, rows, self.height, self.width)
        yield counts
        yield from streaming.points_by_tile(cols, rows, self.grid_height, self.grid_width, size)
    except reading.ReadError as error:
      raise common.DatasetFileError(error.path, error.problem) from error

  def check_gps(self, counts: streaming.GpsCounts) -> None:
    self._check_gps(self.gps_paths, counts)

  def tile_cell(self, tile: Tile) -> tuple[int, int]:
    return tile.row0 // self.spec.tile_size, tile.col0 // self.spec.tile_size

  def _resources(self):
    """(imagery windows, road geometries in the raster's CRS, their index) of this thread."""
    local = self._local
    if not hasattr(local, 'imagery'):
      try:
        local.imagery = streaming.ImageryWindows(self.imagery_path, self.preparation,
                                                 strip_rows=self.spec.tile_size, resolved=True)
      except reading.ReadError as error:
        raise common.UnreadableImageError(error.path, error.problem) from error
      geometries, roads_crs = read_road_geometries(self.roads_path)
      local.roads, local.road_index = roads_in_raster(geometries, roads_crs, self.geo,
                                                      self.spec.road_width_m)
      local.road_lines = RoadLineIndex(local.roads, self.geo.transform)
    return local.imagery, local.roads, local.road_index

  def road_window(self, row0: int, col0: int, rows: int, cols: int) -> np.ndarray:
    """uint8 (rows, cols) road mask of a window of the raster (the whole mask cut there)."""
    _, roads, road_index = self._resources()
    chosen = road_index.query(row0, col0, rows, cols)
    return rasterize_roads([roads[i] for i in chosen], self.geo.crs, self.geo, self.height,
                           self.width, self.spec.road_width_m, window=(row0, col0, rows, cols))

  def example(self, tile: Tile, points: Sequence[np.ndarray]) -> tuple[str, dict, dict]:
    """(tile id, example, counts) of one tile with the GPS points of its grid tile; the example
    equals StreamingArea.example's; counts: {'road_pixels': road pixels of the tile}."""
    size = self.spec.tile_size
    rows_on = min(size, self.height - tile.row0)
    cols_on = min(size, self.width - tile.col0)
    imagery, _, _ = self._resources()
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size, 1), np.uint8)
    aux = np.zeros((size, size, 1), np.uint8)
    try:
      image[:rows_on, :cols_on] = imagery.read(tile.row0, tile.col0, rows_on, cols_on)
    except reading.ReadError as error:
      raise common.UnreadableImageError(error.path, error.problem) from error
    mask[:rows_on, :cols_on, 0] = self.road_window(tile.row0, tile.col0, rows_on, cols_on)
    if points:
      xy = np.concatenate(points)
      heat, _ = heatmap_lib.render_tiled_heatmap_uint8(
          xy[:, 0] - float(tile.col0), xy[:, 1] - float(tile.row0), size, size, size)
      aux[:rows_on, :cols_on, 0] = heat[:rows_on, :cols_on]
    lines = self._local.road_lines.tile(tile.row0, tile.col0, rows_on, cols_on)
    bounds = geo_lib.pixel_bounds_to_lonlat(self.geo.transform, self.geo.crs,
                                            tile.row0, tile.col0, size, size)
    return (tile.tile_id,
            common.make_example(tile.tile_id, image, aux, mask, bounds, source=self.imagery_path,
                                road_lines=lines),
            {'road_pixels': int(np.count_nonzero(mask))})

  # Back on the launcher.

  def finish(self, gps_points: int, gps_on_raster: int, road_pixels_in_tiles: int) -> None:
    """Records the pipeline's counts and makes the road checks (raises what Area raises)."""
    size = self.spec.tile_size
    written = {(t.row0, t.col0) for t in self.tiles}
    road_pixels = road_pixels_in_tiles
    for row0 in range(0, self.height, size):  # the tiles left out count for the raster's mask
      for col0 in range(0, self.width, size):
        if (row0, col0) not in written:
          road_pixels += int(np.count_nonzero(self.road_window(
              row0, col0, min(size, self.height - row0), min(size, self.width - col0))))
    tile_counts = {key: self.counts.pop(key)
                   for key in ('tiles', 'padded_tiles', 'tiles_left_out')}
    geometries, roads_crs = read_road_geometries(self.roads_path)
    self._check_roads(self.roads_path, geometries, roads_crs, road_pixels)
    self.counts.update(gps_points=gps_points, gps_points_on_raster=gps_on_raster, **tile_counts)
    logging.info('custom: %s: %dx%d px, %d tiles, %d GPS points (%d on the raster), '
                 'preparation: %s (Apache Beam)', self.imagery_path, self.width, self.height,
                 len(self.tiles), gps_points, gps_on_raster, self.preparation.describe())

  def close(self) -> None:
    imagery = getattr(self._local, 'imagery', None)
    if imagery is not None:
      imagery.close()
      del self._local.imagery
