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
            gps_crs (default EPSG:4326; for a geographic CRS, values outside
            [-180, 180] / [-90, 90] are errors). Without gps the aux heat-map is
            all zero (image-only data).

Processing:
  - Image to uint8 ('scaling'): 'bit_depth' (default) is reading's rule
    (reading.samples_to_uint8): x -> round(x * 255 / (2**b - 1)), clipped, with
    b = bit_depth, or when unset the smallest b >= 8 with 2**b > max value of
    the selected bands (an 11-bit image whose maximum is 2047 gives b = 11);
    uint8 data is kept as is and float data in [0, 1] is multiplied by 255.
    'percentile' stretches each band linearly from its `percentiles` (default
    2, 98) over the whole raster to 0..255.
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
  - Heat-map: GPS points projected to raster pixels (rasterio), bucketed per
    tile and rendered by cmmp_jax.data.heatmap.render_heatmap (1 channel).
  - Tiles of tile_size x tile_size pixels from the top-left corner; partial
    tiles at the right/bottom edge are zero-padded (edge='pad', mask 0 there)
    or skipped (edge='drop'). Tile id '{name}_{tile_row}_{tile_col}'. Bounds
    are the lon/lat box (degrees) of the full tile window.
  - Splits: tiles are shared out by a seeded permutation of their sorted ids
    (common.seeded_split): validation_fraction, test_fraction, rest = train.
    Splits left empty by a zero fraction are not written.

Spec: a CustomConfig(spec=CustomSpec(...)) or, with the default config, a file
{manual_dir}/custom.json (or custom.yaml / custom.yml), e.g.
  {"imagery": "area.tif", "roads": "roads.geojson", "gps": ["trips.csv"],
   "road_width_m": 4.0, "tile_size": 512}
Relative paths are relative to manual_dir. Every CustomSpec field may appear.

The whole raster, its mask and all GPS points are held in memory while building
(about 5 bytes per pixel plus 16 per GPS point): split very large areas into
several GeoTIFFs and builds.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import rasterio.crs
import rasterio.errors
import rasterio.features
import rasterio.warp
import tensorflow_datasets as tfds
import yaml

from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import heatmap as heatmap_lib
from cmmp_jax.data import reading
from data_builders import common

SPEC_FILE_NAMES = ('custom.json', 'custom.yaml', 'custom.yml')
DEFAULT_ROAD_WIDTH_M = 4.0
# Metres per degree on the WGS84 ellipsoid as a function of latitude (series of the
# meridian and parallel radii of curvature; error below 1 cm per degree).
_M_PER_DEG_LAT = (111132.954, -559.822, 1.175)
_M_PER_DEG_LON = (111412.84, -93.5, 0.118)
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
  validation_fraction: float = 0.1
  test_fraction: float = 0.1
  split_seed: int = 0
  bands: tuple[int, ...] | None = None
  scaling: str = 'bit_depth'        # 'bit_depth' or 'percentile'
  bit_depth: int | None = None
  percentiles: tuple[float, float] = (2.0, 98.0)
  name: str | None = None

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
    if self.edge not in ('pad', 'drop'):
      fail(f"edge must be 'pad' or 'drop', got {self.edge!r}")
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
# Imagery.


def imagery_to_uint8_rgb(raster: reading.Raster, spec: CustomSpec) -> np.ndarray:
  """Imagery -> uint8 (H, W, 3) RGB by the spec's bands and scaling (module docstring).

  Raises:
    reading.ReadError: missing bands, or values the 'bit_depth' rule cannot map.
  """
  if spec.scaling == 'bit_depth':
    return reading.to_rgb_uint8(raster, bands=spec.bands, bit_depth=spec.bit_depth)
  values = reading.select_rgb_bands(raster, spec.bands).astype(np.float64)
  finite = np.isfinite(values).all(axis=2)
  low = np.percentile(values[finite], spec.percentiles[0], axis=0)
  high = np.percentile(values[finite], spec.percentiles[1], axis=0)
  stretched = np.clip(np.nan_to_num((values - low) / np.maximum(high - low, 1e-12)), 0.0, 1.0)
  # Floats in [0, 1] go to round(x * 255), gray is replicated to RGB.
  return reading.to_rgb_uint8(dataclasses.replace(raster, pixels=stretched))


# ---------------------------------------------------------------------------
# Road mask.


def metres_per_degree(lat_deg: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
  """(metres per degree of longitude, of latitude) on the WGS84 ellipsoid."""
  phi = np.deg2rad(lat_deg)
  lat_m = (_M_PER_DEG_LAT[0] + _M_PER_DEG_LAT[1] * np.cos(2 * phi)
           + _M_PER_DEG_LAT[2] * np.cos(4 * phi))
  lon_m = (_M_PER_DEG_LON[0] * np.cos(phi) + _M_PER_DEG_LON[1] * np.cos(3 * phi)
           + _M_PER_DEG_LON[2] * np.cos(5 * phi))
  return lon_m, lat_m


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
                            radius_m: float, units_to_m) -> None:
  """Sets mask pixels whose centre is within radius_m of the polyline points_xy (CRS units).

  Args:
    mask: bool (H, W), updated in place.
    points_xy: float64 (N, 2) vertices in the raster CRS; N == 1 is a point.
    transform: raster affine (pixel -> CRS).
    radius_m: buffer radius in metres.
    units_to_m: callable lat/y array -> (metres per x unit, metres per y unit).
  """
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
    col0 = max(int(math.floor(cols_ab.min() - margin_cols)), 0)
    col1 = min(int(math.ceil(cols_ab.max() + margin_cols)), width)
    row0 = max(int(math.floor(rows_ab.min() - margin_rows)), 0)
    row1 = min(int(math.ceil(rows_ab.max() + margin_rows)), height)
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
    mask[row0:row1, col0:col1] |= distance2 <= radius_m * radius_m


def rasterize_roads(geometries: Sequence[dict], geometries_crs, geo: geo_lib.GeoInfo,
                    height: int, width: int, road_width_m: float) -> np.ndarray:
  """uint8 (H, W) road mask (0/1) of centerlines buffered to road_width_m (see docstring)."""
  crs = geo.crs
  if crs.is_geographic:
    def units_to_m(y):
      return metres_per_degree(y)
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
    _segments_distance_mask(mask, vertices, geo.transform, road_width_m / 2.0, units_to_m)
  if polygons:
    filled = rasterio.features.rasterize(
        [(p, 1) for p in polygons], out_shape=(height, width), transform=geo.transform,
        fill=0, dtype=np.uint8)
    mask |= filled.astype(bool)
  return mask.astype(np.uint8)


# ---------------------------------------------------------------------------
# GPS.


def gps_to_pixels(x: np.ndarray, y: np.ndarray, gps_crs: str | rasterio.crs.CRS,
                  geo: geo_lib.GeoInfo) -> tuple[np.ndarray, np.ndarray]:
  """GPS coordinates in gps_crs -> continuous raster pixel (cols, rows)."""
  source = rasterio.crs.CRS.from_user_input(gps_crs)
  if x.size == 0:
    return x.copy(), y.copy()
  if source != geo.crs:
    x, y = rasterio.warp.transform(source, geo.crs, x, y)
  return geo_lib.world_to_pixel(np.asarray(x), np.asarray(y), geo.transform)


# ---------------------------------------------------------------------------
# The area: imagery, mask and GPS of one spec, cut into tiles.


@dataclasses.dataclass(frozen=True)
class Tile:
  tile_id: str
  row0: int
  col0: int


class Area:
  """Everything one spec describes, loaded and ready to be cut into tiles."""

  def __init__(self, spec: CustomSpec, base_dir: pathlib.Path | None, source: str):
    self.spec = spec
    self.imagery_path = resolve(spec.imagery, base_dir, source)
    if not self.imagery_path.is_file():
      raise common.MissingFileError(self.imagery_path, 'imagery GeoTIFF not found')
    try:
      raster = reading.read_raster(self.imagery_path)
      if raster.geo is None:
        raise common.UnreadableImageError(self.imagery_path, 'GeoTIFF has no CRS')
      self.image = imagery_to_uint8_rgb(raster, spec)
    except reading.ReadError as error:
      raise common.UnreadableImageError(error.path, error.problem) from error
    self.geo = raster.geo
    self.height, self.width = self.image.shape[:2]
    del raster
    roads_path = resolve(spec.roads, base_dir, source)
    geometries, roads_crs = read_road_geometries(roads_path)
    self.mask = rasterize_roads(geometries, roads_crs, self.geo, self.height, self.width,
                                spec.road_width_m)
    gps_crs = rasterio.crs.CRS.from_user_input(spec.gps_crs)
    try:
      x, y = reading.read_gps_csv(
          [resolve(gps, base_dir, source) for gps in spec.gps], gps_format=spec.gps_format,
          lon_column=spec.lon_column, lat_column=spec.lat_column,
          degrees=gps_crs.is_geographic)
    except reading.ReadError as error:
      raise common.DatasetFileError(error.path, error.problem) from error
    self.gps_cols, self.gps_rows = gps_to_pixels(x, y, gps_crs, self.geo)
    self.tiles = self._make_tiles()
    self._points_by_tile = self._bucket_points()
    logging.info('custom: %s: %dx%d px, %d tiles, %d GPS points (%d on tiles)',
                 self.imagery_path, self.width, self.height, len(self.tiles),
                 self.gps_cols.size, sum(v.size for v in self._points_by_tile.values()))

  def _make_tiles(self) -> list[Tile]:
    size = self.spec.tile_size
    name = self.spec.name or self.imagery_path.stem
    tiles = []
    for tile_row, row0 in enumerate(range(0, self.height, size)):
      for tile_col, col0 in enumerate(range(0, self.width, size)):
        partial = row0 + size > self.height or col0 + size > self.width
        if partial and self.spec.edge == 'drop':
          continue
        tiles.append(Tile(f'{name}_{tile_row}_{tile_col}', row0, col0))
    if not tiles:
      raise common.SpecError(
          self.imagery_path, f'a {self.width}x{self.height} raster has no full '
          f'{size}x{size} tile; lower tile_size or use edge: pad')
    return tiles

  def _bucket_points(self) -> dict[tuple[int, int], np.ndarray]:
    """{(row0, col0) of a tile: indices of the GPS points inside its window}."""
    size = self.spec.tile_size
    finite = np.isfinite(self.gps_cols) & np.isfinite(self.gps_rows)
    index = np.flatnonzero(finite)
    tile_rows = np.floor(self.gps_rows[index] / size).astype(np.int64)
    tile_cols = np.floor(self.gps_cols[index] / size).astype(np.int64)
    wanted = {(t.row0 // size, t.col0 // size) for t in self.tiles}
    buckets: dict[tuple[int, int], list] = {}
    order = np.lexsort((tile_cols, tile_rows))
    keys = np.stack([tile_rows[order], tile_cols[order]], axis=1)
    if keys.size:
      starts = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
      for chunk in np.split(np.arange(keys.shape[0]), starts):
        key = (int(keys[chunk[0], 0]), int(keys[chunk[0], 1]))
        if key in wanted:
          buckets[(key[0] * size, key[1] * size)] = index[order[chunk]]
    return buckets

  def example(self, tile: Tile) -> dict:
    """The example dict of one tile (zero-padded past the raster's edge)."""
    size = self.spec.tile_size
    window = (slice(tile.row0, tile.row0 + size), slice(tile.col0, tile.col0 + size))
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size, 1), np.uint8)
    piece = self.image[window]
    image[:piece.shape[0], :piece.shape[1]] = piece
    mask[:piece.shape[0], :piece.shape[1], 0] = self.mask[window]
    points = self._points_by_tile.get((tile.row0, tile.col0), np.zeros(0, np.int64))
    heatmap = heatmap_lib.render_heatmap(self.gps_cols[points] - tile.col0,
                                         self.gps_rows[points] - tile.row0, size, size)
    aux = heatmap_lib.heatmap_to_uint8(heatmap)[..., None]
    bounds = geo_lib.pixel_bounds_to_lonlat(self.geo.transform, self.geo.crs,
                                            tile.row0, tile.col0, size, size)
    return common.make_example(tile.tile_id, image, aux, mask, bounds,
                               source=self.imagery_path)


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

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
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
    area = Area(spec, manual_dir, source)
    by_id = {tile.tile_id: tile for tile in area.tiles}
    parts = common.seeded_split(
        by_id, {'validation': spec.validation_fraction, 'test': spec.test_fraction},
        spec.split_seed, source=area.imagery_path)
    return {name: self._generate_examples(area, [by_id[i] for i in ids])
            for name, ids in parts.items() if ids}

  def _generate_examples(self, area: Area, tiles: list[Tile]):
    for tile in tiles:
      yield tile.tile_id, area.example(tile)
