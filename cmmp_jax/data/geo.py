"""Geographic helpers: tile bounds, CRS-aware lon/lat <-> pixel, GeoTIFF I/O, GPS table readers.

Conventions: bounds are (west, south, east, north) in the units of their CRS (degrees for
EPSG:4326). Arrays are HWC (or HW). Pixel coordinates are continuous (col, row): the affine
transform maps (0, 0) to the north-west corner of pixel (0, 0), and pixel (r, c) covers
cols [c, c+1), rows [r, r+1) (rasterio's convention, and heatmap.lonlat_to_pixel's).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import sys
import tempfile

import affine
import numpy as np
import rasterio
import rasterio.crs
import rasterio.errors
import rasterio.transform
import rasterio.warp

from cmmp_jax.data.heatmap import check_bounds

LONLAT_CRS = rasterio.crs.CRS.from_epsg(4326)

# Porto taxi data (ECML/PKDD 2015): one GPS point every 15 s from the trip's TIMESTAMP.
PORTO_SAMPLE_PERIOD_S = 15
_PORTO_COLUMNS = ("TRIP_ID", "TIMESTAMP", "POLYLINE")

_GTIFF_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


class GeoTiffError(Exception):
  """A GeoTIFF could not be read or written; the message names the file."""


class TrajectoryFormatError(ValueError):
  """A GPS table is malformed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class GeoInfo:
  """Georeference of a raster.

  crs: rasterio CRS, or None for a file without one.
  transform: affine.Affine mapping (col, row) to CRS (x, y).
  bounds: (west, south, east, north) of the whole raster in CRS units.
  """
  crs: rasterio.crs.CRS | None
  transform: affine.Affine
  bounds: tuple[float, float, float, float]

  @classmethod
  def from_bounds(cls, bounds, height: int, width: int, crs="EPSG:4326") -> "GeoInfo":
    """North-up raster of height x width pixels spanning bounds exactly."""
    west, south, east, north = check_bounds(bounds)
    for name, value in (("height", height), ("width", width)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    transform = affine.Affine(
        (east - west) / width, 0.0, west, 0.0, -(north - south) / height, north)
    return cls(crs=_as_crs(crs), transform=transform, bounds=(west, south, east, north))


def _as_crs(crs) -> rasterio.crs.CRS | None:
  if crs is None or isinstance(crs, rasterio.crs.CRS):
    return crs
  try:
    return rasterio.crs.CRS.from_user_input(crs)
  except rasterio.errors.CRSError as error:
    raise ValueError(f"not a coordinate reference system: {crs!r} ({error})") from error


# ----------------------------------------------------------------------------------------------
# Tile bounds.


def grid_tile_bounds(bounds, n_rows: int, n_cols: int) -> np.ndarray:
  """Splits bounds into an n_rows x n_cols grid of equal tiles.

  Neighbouring tiles share bit-identical edges (each edge is computed once), so
  heatmap.render_tiles treats them as a regular grid and no point is counted twice.

  Returns:
    float64 (n_rows * n_cols, 4) of (west, south, east, north), row-major from the north-west
    tile (tile k is grid row k // n_cols, grid column k % n_cols).
  """
  west, south, east, north = check_bounds(bounds)
  for name, value in (("n_rows", n_rows), ("n_cols", n_cols)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  xs = west + (east - west) * np.arange(n_cols + 1) / n_cols
  ys = north - (north - south) * np.arange(n_rows + 1) / n_rows
  xs[-1], ys[-1] = east, south
  grid_row, grid_col = np.divmod(np.arange(n_rows * n_cols), n_cols)
  return np.stack([xs[grid_col], ys[grid_row + 1], xs[grid_col + 1], ys[grid_row]], axis=1)


def window_bounds(transform: affine.Affine, row0: float, col0: float, height: float,
                  width: float) -> tuple[float, float, float, float]:
  """CRS bounds (west, south, east, north) of the pixel window rows [row0, row0 + height),
  cols [col0, col0 + width).

  Uses the four corners, so it is also right for flipped or rotated transforms.
  """
  cols = np.array([col0, col0 + width, col0, col0 + width], dtype=np.float64)
  rows = np.array([row0, row0, row0 + height, row0 + height], dtype=np.float64)
  xs, ys = pixel_to_world(cols, rows, transform)
  return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def bounds_to_lonlat(bounds, crs) -> tuple[float, float, float, float]:
  """Reprojects CRS bounds to EPSG:4326 (west, south, east, north) in degrees.

  A geographic CRS is returned unchanged; otherwise rasterio.warp.transform_bounds densifies
  the edges (21 points each), so the result encloses the curved image of the box.
  """
  crs = _as_crs(crs)
  west, south, east, north = check_bounds(bounds)
  if crs is None:
    raise ValueError("bounds_to_lonlat needs a CRS; the raster has none")
  if crs.is_geographic:
    return west, south, east, north
  return tuple(float(v) for v in rasterio.warp.transform_bounds(
      crs, LONLAT_CRS, west, south, east, north, densify_pts=21))


def pixel_bounds_to_lonlat(transform: affine.Affine, crs, row0: float, col0: float,
                           height: float, width: float) -> tuple[float, float, float, float]:
  """lon/lat bounds (degrees) of a pixel window of a raster in any CRS (e.g. one tile)."""
  return bounds_to_lonlat(window_bounds(transform, row0, col0, height, width), crs)


# ----------------------------------------------------------------------------------------------
# Coordinates <-> pixels.


def world_to_pixel(x, y, transform: affine.Affine) -> tuple[np.ndarray, np.ndarray]:
  """CRS coordinates -> continuous pixel coordinates (cols, rows), float64, by ~transform."""
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  if transform.determinant == 0:
    raise ValueError(f"transform is not invertible: {transform!r}")
  inverse = ~transform
  cols = inverse.a * x + inverse.b * y + inverse.c
  rows = inverse.d * x + inverse.e * y + inverse.f
  return cols, rows


def pixel_to_world(cols, rows, transform: affine.Affine) -> tuple[np.ndarray, np.ndarray]:
  """Continuous pixel coordinates (cols, rows) -> CRS coordinates (x, y), float64."""
  cols = np.asarray(cols, dtype=np.float64)
  rows = np.asarray(rows, dtype=np.float64)
  if cols.shape != rows.shape:
    raise ValueError(f"cols and rows must have the same shape, got {cols.shape} and {rows.shape}")
  x = transform.a * cols + transform.b * rows + transform.c
  y = transform.d * cols + transform.e * rows + transform.f
  return x, y


def lonlat_to_raster_pixel(lon, lat, geo: GeoInfo) -> tuple[np.ndarray, np.ndarray]:
  """lon/lat (EPSG:4326 degrees) -> pixel (cols, rows) of a raster in any CRS."""
  if geo.crs is None:
    raise ValueError("lonlat_to_raster_pixel needs a georeferenced raster (crs is None)")
  lon = np.asarray(lon, dtype=np.float64)
  lat = np.asarray(lat, dtype=np.float64)
  if lon.shape != lat.shape:
    raise ValueError(f"lon and lat must have the same shape, got {lon.shape} and {lat.shape}")
  if geo.crs.is_geographic:
    return world_to_pixel(lon, lat, geo.transform)
  xs, ys = rasterio.warp.transform(LONLAT_CRS, geo.crs, lon.ravel(), lat.ravel())
  return world_to_pixel(np.reshape(xs, lon.shape), np.reshape(ys, lon.shape), geo.transform)


def raster_pixel_to_lonlat(cols, rows, geo: GeoInfo) -> tuple[np.ndarray, np.ndarray]:
  """Pixel (cols, rows) of a raster in any CRS -> lon/lat (EPSG:4326 degrees)."""
  if geo.crs is None:
    raise ValueError("raster_pixel_to_lonlat needs a georeferenced raster (crs is None)")
  xs, ys = pixel_to_world(cols, rows, geo.transform)
  if geo.crs.is_geographic:
    return xs, ys
  lon, lat = rasterio.warp.transform(geo.crs, LONLAT_CRS, xs.ravel(), ys.ravel())
  return np.reshape(lon, xs.shape), np.reshape(lat, xs.shape)


# ----------------------------------------------------------------------------------------------
# GeoTIFF I/O.


def read_geotiff(path) -> tuple[np.ndarray, GeoInfo]:
  """Reads a (Geo)TIFF.

  Returns:
    (array, geo): array is (H, W, C) in the file's dtype (bands last); geo holds the CRS (None
    when the file has none), the affine transform and the bounds in CRS units.

  Raises:
    FileNotFoundError: path does not exist.
    GeoTiffError: the file is not a readable raster (corrupt, truncated, not a TIFF).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GeoTIFF {path} does not exist")
  try:
    with rasterio.open(path) as dataset:
      bands = dataset.read()
      geo = GeoInfo(crs=dataset.crs, transform=dataset.transform,
                    bounds=tuple(float(v) for v in dataset.bounds))
  except rasterio.errors.RasterioError as error:
    raise GeoTiffError(f"{path}: cannot read raster: {error}") from error
  return np.ascontiguousarray(np.moveaxis(bands, 0, -1)), geo


def new_file_mode() -> int:
  """The permissions open() gives a new file here: 0o666 less the process's umask.

  Atomic writes go through tempfile.mkstemp, which creates files 0600; outputs get this mode
  before they replace their destination, so others can read them as they could any new file.
  """
  umask = os.umask(0)  # reading the umask means setting it; put it back at once
  os.umask(umask)
  return 0o666 & ~umask


def write_bytes_atomic(path, payload: bytes) -> None:
  """Writes `payload` to `path` through a temporary file in its folder, then os.replace, with
  new_file_mode(): a reader never sees a partial file and a failed write leaves the old one."""
  path = pathlib.Path(path)
  handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(handle, "wb") as temp_file:
      temp_file.write(payload)
    os.chmod(temp_name, new_file_mode())  # mkstemp's 0600 -> 0666 less the umask
    os.replace(temp_name, path)
  except BaseException:
    try:
      os.remove(temp_name)
    except FileNotFoundError:
      pass
    raise


def write_geotiff(path, array, geo: GeoInfo, *, compress: str | None = "lzw",
                  nodata: float | None = None) -> None:
  """Writes an (H, W) or (H, W, C) array as a GeoTIFF, atomically.

  The raster goes to a temporary file in the destination folder, which then replaces path with
  os.replace: readers never see a half-written file and a failed write leaves an existing file
  untouched. The file gets new_file_mode() (0666 less the umask).

  Args:
    path: destination .tif.
    array: (H, W) or (H, W, C) of uint8/int8/(u)int16/(u)int32/float32/float64 (bool -> uint8).
    geo: georeference; geo.bounds must match geo.transform and the array's H x W.
    compress: GDAL compression (None for none).
    nodata: optional nodata value stored in the file.

  Raises:
    ValueError: bad array shape/dtype, or bounds that do not match the array size.
    GeoTiffError: the destination cannot be written.
  """
  path = pathlib.Path(path)
  array = np.asarray(array)
  if array.dtype == np.bool_:
    array = array.astype(np.uint8)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
    raise ValueError(f"{path}: array must be (H, W) or (H, W, C) and non-empty, got shape "
                     f"{np.shape(array)}")
  if array.dtype.name not in _GTIFF_DTYPES:
    raise ValueError(f"{path}: dtype {array.dtype} cannot be written to a GeoTIFF; use one of "
                     f"{_GTIFF_DTYPES}")
  height, width, n_bands = array.shape
  expected = rasterio.transform.array_bounds(height, width, geo.transform)
  expected = (expected[0], expected[1], expected[2], expected[3])
  pixel = max(abs(geo.transform.a), abs(geo.transform.e), abs(geo.transform.b),
              abs(geo.transform.d))
  if not np.allclose(expected, geo.bounds, rtol=0.0, atol=1e-6 * pixel):
    raise ValueError(f"{path}: geo.bounds {geo.bounds} do not match a {height} x {width} array "
                     f"with transform {tuple(geo.transform)[:6]} (expected {expected})")
  if not path.parent.is_dir():
    raise GeoTiffError(f"{path}: destination folder {path.parent} does not exist")

  handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(handle)
  try:
    profile = dict(driver="GTiff", height=height, width=width, count=n_bands,
                   dtype=array.dtype.name, crs=geo.crs, transform=geo.transform)
    if compress:
      profile["compress"] = compress
    if nodata is not None:
      profile["nodata"] = nodata
    with rasterio.open(temp_name, "w", **profile) as dataset:
      dataset.write(np.moveaxis(array, -1, 0))
    os.chmod(temp_name, new_file_mode())  # mkstemp's 0600 -> the usual permissions
    os.replace(temp_name, path)
  except rasterio.errors.RasterioError as error:
    _remove_quietly(temp_name)
    raise GeoTiffError(f"{path}: cannot write GeoTIFF: {error}") from error
  except BaseException:
    _remove_quietly(temp_name)
    raise


def _remove_quietly(name: str) -> None:
  try:
    os.remove(name)
  except FileNotFoundError:
    pass


# ----------------------------------------------------------------------------------------------
# GPS tables.


def parse_porto_polylines(csv_path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Reads a Porto taxi CSV (ECML/PKDD 2015, Kaggle/UCI format) into flat per-point arrays.

  The POLYLINE column is a JSON list of [lon, lat] (WGS84); point i of a trip was recorded at
  TIMESTAMP + 15 * i seconds. Trips with an empty polyline contribute no point. Extra columns
  (e.g. POLYLINE_UTM) are ignored.

  Returns:
    (trip_ids int64, lon float64, lat float64, time int64), all of length N = number of points.

  Raises:
    FileNotFoundError: csv_path does not exist.
    TrajectoryFormatError: missing column, bad JSON, a point that is not a finite [lon, lat]
      pair inside [-180, 180] x [-90, 90], or a non-integer TRIP_ID/TIMESTAMP; the message
      names the file and the line.
  """
  csv_path = pathlib.Path(csv_path)
  if not csv_path.is_file():
    raise FileNotFoundError(f"Porto taxi CSV {csv_path} does not exist")
  # Full-size Porto polylines exceed csv's default 128 KiB field limit (a process-wide setting).
  if csv.field_size_limit() < 2**30:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  trip_parts, coord_parts, time_parts = [], [], []
  with open(csv_path, newline="", encoding="utf-8") as handle:
    reader = csv.DictReader(handle)
    missing = [name for name in _PORTO_COLUMNS if name not in (reader.fieldnames or ())]
    if missing:
      raise TrajectoryFormatError(f"{csv_path}: missing column(s) {missing}; header is "
                                  f"{reader.fieldnames}")
    try:
      for record in reader:
        where = f"{csv_path}:{reader.line_num}"
        trip_id = _parse_int(record["TRIP_ID"], "TRIP_ID", where)
        start = _parse_int(record["TIMESTAMP"], "TIMESTAMP", where)
        coords = _parse_polyline(record["POLYLINE"], where)
        trip_parts.append(np.full(len(coords), trip_id, dtype=np.int64))
        coord_parts.append(coords)
        time_parts.append(start + PORTO_SAMPLE_PERIOD_S * np.arange(len(coords), dtype=np.int64))
    except csv.Error as error:
      raise TrajectoryFormatError(f"{csv_path}:{reader.line_num}: {error}") from error
  if not coord_parts:
    empty = np.zeros(0)
    return empty.astype(np.int64), empty, empty.copy(), empty.astype(np.int64)
  coords = np.concatenate(coord_parts)
  return (np.concatenate(trip_parts), coords[:, 0].copy(), coords[:, 1].copy(),
          np.concatenate(time_parts))


def _parse_int(text, field: str, where: str) -> int:
  try:
    return int(text)
  except (TypeError, ValueError):
    raise TrajectoryFormatError(f"{where}: {field} is not an integer: {text!r}") from None


def _parse_polyline(text, where: str) -> np.ndarray:
  """POLYLINE JSON -> float64 (n, 2) of (lon, lat)."""
  try:
    points = json.loads(text)
  except (TypeError, json.JSONDecodeError) as error:
    raise TrajectoryFormatError(f"{where}: POLYLINE is not valid JSON ({error})") from None
  if not isinstance(points, list):
    raise TrajectoryFormatError(
        f"{where}: POLYLINE must be a JSON list, got {type(points).__name__}")
  if not points:
    return np.zeros((0, 2))
  try:
    coords = np.array(points, dtype=np.float64)
  except (TypeError, ValueError):
    raise TrajectoryFormatError(
        f"{where}: POLYLINE points must be [lon, lat] number pairs") from None
  if coords.ndim != 2 or coords.shape[1] != 2:
    raise TrajectoryFormatError(f"{where}: POLYLINE points must be [lon, lat] pairs, got array "
                                f"of shape {coords.shape}")
  if not np.all(np.isfinite(coords)):
    raise TrajectoryFormatError(f"{where}: POLYLINE holds NaN or inf")
  if np.any(np.abs(coords[:, 0]) > 180) or np.any(np.abs(coords[:, 1]) > 90):
    raise TrajectoryFormatError(f"{where}: POLYLINE point outside lon [-180, 180] / lat [-90, 90] "
                                f"(are lon and lat swapped?)")
  return coords

# Metres per degree on the WGS84 ellipsoid as a function of latitude (series of the
# meridian and parallel radii of curvature; error below 1 cm per degree).
_M_PER_DEG_LAT = (111132.954, -559.822, 1.175)
_M_PER_DEG_LON = (111412.84, -93.5, 0.118)


def metres_per_degree(lat_deg: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
  """(metres per degree of longitude, of latitude) on the WGS84 ellipsoid."""
  phi = np.deg2rad(lat_deg)
  lat_m = (_M_PER_DEG_LAT[0] + _M_PER_DEG_LAT[1] * np.cos(2 * phi)
           + _M_PER_DEG_LAT[2] * np.cos(4 * phi))
  lon_m = (_M_PER_DEG_LON[0] * np.cos(phi) + _M_PER_DEG_LON[1] * np.cos(3 * phi)
           + _M_PER_DEG_LON[2] * np.cos(5 * phi))
  return lon_m, lat_m
