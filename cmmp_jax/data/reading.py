"""Reading source files: rasters to uint8 arrays, GPS CSV tables to coordinates.

The one place where the dataset builders (data_builders/) and prediction (cmmp_jax.predict)
read their inputs, so that both turn the same file into the same array. No TensorFlow.

Rasters (extensions in IMAGE_EXTENSIONS, case-insensitive):
  .png .jpg .jpeg are decoded with PIL; .tif .tiff are read with rasterio (geo.read_geotiff), and
  a TIFF with a CRS keeps its georeference. read_raster returns the samples as stored, (H, W, C)
  bands last, in the file's dtype (uint8, uint16, int32, float32, ...).

Bands -> RGB (to_rgb_uint8), unless bands are named explicitly: 1 band = gray (replicated to
  R, G, B); 2 bands = gray + alpha (alpha dropped); 3 = RGB; 4 = RGB + alpha or RGB + NIR (4th
  band dropped); more bands are an error (name the bands).

Sample values -> uint8, the 'bit_depth' rule (samples_to_uint8): uint8 is kept; other
  non-negative integers (e.g. 11-bit values in uint16) map x -> round(x * 255 / (2**b - 1)),
  clipped, where the bit depth b is, first match wins: the bit_depth setting; the bit depth the
  file records (Raster.bits: a TIFF's NBITS tag, 8 for uint8 samples); else the samples are
  refused with an error that asks for a bit_depth setting. b is never guessed from the data
  (a dark 11-bit raster would come out twice as bright as a bright one, and two rasters of one
  sensor could disagree). bool maps to 0/255; floats must lie in [0, 1] and map to
  round(x * 255). Negative values, NaN and out-of-range floats are errors.

Bands -> C channels (to_channels_uint8): a raster with exactly C bands is kept; for C = 1 a
  gray + alpha raster drops alpha and an RGB(A) raster becomes luma 0.299 R + 0.587 G +
  0.114 B (PIL's 'L', as OpenCV's IMREAD_GRAYSCALE).

GPS tables (read_gps_csv): a CSV whose header has a POLYLINE column is Porto/Kaggle taxi data
  (geo.parse_porto_polylines, WGS84 lon/lat); any other CSV has x/lon and y/lat columns, named
  explicitly or found among LON_COLUMNS / LAT_COLUMNS (case-insensitive).

Every problem with a file raises ReadError, whose message starts with the file.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import pathlib
import warnings
from typing import Sequence

import numpy as np
import rasterio.errors
from PIL import Image

from cmmp_jax.data import geo as geo_lib

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
TIFF_EXTENSIONS = ('.tif', '.tiff')
LON_COLUMNS = ('lon', 'longitude', 'lng', 'x')
LAT_COLUMNS = ('lat', 'latitude', 'y')
GPS_FORMATS = ('auto', 'porto', 'columns')

# PIL modes read as they are (np.array gives uint8, uint16, int32 or float32 samples).
_PIL_DIRECT_MODES = ('L', 'LA', 'RGB', 'RGBA', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F')
# PIL modes converted first: bilevel to 0/255 gray, palette and other colour spaces to RGB(A).
_PIL_CONVERSIONS = {'1': 'L', 'P': 'RGBA', 'PA': 'RGBA', 'CMYK': 'RGB', 'YCbCr': 'RGB',
                    'LAB': 'RGB', 'HSV': 'RGB', 'RGBX': 'RGB', 'RGBa': 'RGBA', 'La': 'LA'}


class ReadError(ValueError):
  """A raster or GPS table is missing, cannot be decoded, or holds values that cannot be used.

  Attributes:
    path: the file.
    problem: what is wrong with it ('line N: ...' for a line of a table).
  str(error) is '{path}: {problem}'.
  """

  def __init__(self, path: os.PathLike | str, problem: str):
    self.path = pathlib.Path(path)
    self.problem = problem
    super().__init__(f'{path}: {problem}')


@dataclasses.dataclass(frozen=True)
class Raster:
  """A raster file as stored.

  pixels: (H, W, C) samples in the file's dtype, bands last (RGB order for PNG/JPEG).
  geo: the georeference of a TIFF with a CRS, else None.
  path: the file.
  bits: significant bits per sample that the file records: a TIFF's NBITS tag (GDAL's
    IMAGE_STRUCTURE metadata, e.g. 11 or 12), else 8 for uint8 samples, else None (unknown:
    a uint16 file says only that its samples fit in 16 bits).
  """
  pixels: np.ndarray
  geo: geo_lib.GeoInfo | None
  path: pathlib.Path
  bits: int | None = None


# ----------------------------------------------------------------------------------------------
# Rasters.


def read_raster(path: os.PathLike | str) -> Raster:
  """Reads a PNG/JPEG (PIL) or TIFF (rasterio) fully.

  Returns:
    Raster with pixels (H, W, C), H, W >= 1, in the stored dtype; geo only for a TIFF with a CRS.

  Raises:
    ReadError: missing file, unknown extension, or a file that cannot be decoded.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ReadError(path, 'file not found')
  extension = path.suffix.lower()
  if extension not in IMAGE_EXTENSIONS:
    raise ReadError(path, f'unsupported extension {path.suffix!r}; expected one of '
                    f'{IMAGE_EXTENSIONS}')
  if extension in TIFF_EXTENSIONS:
    return _read_tiff(path)
  pixels = _read_pil(path)
  return Raster(pixels=pixels, geo=None, path=path, bits=_dtype_bits(pixels.dtype))


def _dtype_bits(dtype: np.dtype) -> int | None:
  """8 for uint8 samples (their range is their bit depth), else None."""
  return 8 if dtype == np.uint8 else None


def _tiff_nbits(path: pathlib.Path) -> int | None:
  """A TIFF's NBITS (significant bits of band 1, GDAL IMAGE_STRUCTURE metadata), or None."""
  try:
    with rasterio.open(path) as dataset:
      value = dataset.tags(1, ns='IMAGE_STRUCTURE').get('NBITS')
  except rasterio.errors.RasterioError:
    return None
  try:
    bits = int(value) if value is not None else None
  except ValueError:
    return None
  return bits if bits is not None and 1 <= bits <= 32 else None


def _read_tiff(path: pathlib.Path) -> Raster:
  with warnings.catch_warnings():
    # A plain TIFF without georeference is a valid input; rasterio warns about it.
    warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
    try:
      pixels, geo = geo_lib.read_geotiff(path)
    except geo_lib.GeoTiffError as error:
      raise ReadError(path, f'cannot decode TIFF ({error.__cause__ or error})') from error
  if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
    raise ReadError(path, f'empty raster of shape {pixels.shape}')
  bits = _tiff_nbits(path) if np.issubdtype(pixels.dtype, np.integer) else None
  return Raster(pixels=pixels, geo=geo if geo.crs is not None else None, path=path,
                bits=bits or _dtype_bits(pixels.dtype))


def _read_pil(path: pathlib.Path) -> np.ndarray:
  """(H, W, C) samples of a PIL-readable file: uint8 for 8-bit modes, else uint16/int32/float32."""
  try:
    with Image.open(path) as opened:
      opened.load()  # decode now so that truncated files fail here
      image = opened
      if image.mode in _PIL_CONVERSIONS:
        image = image.convert(_PIL_CONVERSIONS[image.mode])
      if image.mode not in _PIL_DIRECT_MODES:
        raise ReadError(path, f'unsupported PIL image mode {image.mode!r}')
      pixels = np.array(image)
  except ReadError:
    raise
  except (OSError, ValueError, SyntaxError) as error:
    # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError for truncated
    # data and SyntaxError/ValueError for some malformed headers.
    raise ReadError(path, f'cannot decode image ({error})') from error
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.shape[0] == 0 or pixels.shape[1] == 0:
    raise ReadError(path, f'empty image of shape {pixels.shape}')
  return pixels


# ----------------------------------------------------------------------------------------------
# Samples and bands to uint8.


def check_bit_depth(bit_depth, what: str = 'bit_depth') -> None:
  """Raises ValueError unless bit_depth is None or an integer in [1, 32]."""
  if bit_depth is not None and (isinstance(bit_depth, bool) or not isinstance(
      bit_depth, (int, np.integer)) or not 1 <= bit_depth <= 32):
    raise ValueError(f'{what} must be an integer in [1, 32] or None; got {bit_depth!r}')


def samples_to_uint8(samples: np.ndarray, path: os.PathLike | str, *,
                     bit_depth: int | None = None,
                     recorded_bits: int | None = None) -> np.ndarray:
  """Maps raster samples to uint8 by the 'bit_depth' rule (module docstring).

  Args:
    samples: (H, W, C) array of any integer, bool or float dtype.
    path: the file they came from (named in errors).
    bit_depth: integer data's bit depth b (x -> round(x * 255 / (2**b - 1)), clipped), the
      setting; None uses recorded_bits.
    recorded_bits: the bit depth the file records (Raster.bits); used when bit_depth is None.

  Returns:
    uint8 (H, W, C). uint8 input is returned unchanged when the bit depth is 8 (or unset).

  Raises:
    ValueError: bit_depth is not None or an integer in [1, 32].
    ReadError: integers wider than 8 bits with neither bit_depth nor recorded_bits, negative
      integers, NaN/inf, floats outside [0, 1], or another dtype.
  """
  check_bit_depth(bit_depth)
  if samples.dtype == np.bool_:
    return samples.astype(np.uint8) * np.uint8(255)
  bits = bit_depth if bit_depth is not None else recorded_bits
  if samples.dtype == np.uint8 and bits in (None, 8):
    return samples
  if np.issubdtype(samples.dtype, np.integer):
    if samples.size and samples.min() < 0:
      raise ReadError(path, f'negative sample values (min {samples.min()}); cannot map them '
                      'to 8 bits')
    if bits is None:
      largest = int(samples.max()) if samples.size else 0
      raise ReadError(path, f'{samples.dtype} samples (largest {largest}) and the file records '
                      'no bit depth (no NBITS tag): set bit_depth to the sensor\'s bit depth '
                      '(e.g. 11 for WorldView/SpaceNet 11-bit data, 16 for full-range 16-bit), '
                      "or use scaling 'percentile'")
    full_scale = float(2**int(bits) - 1)
    scaled = np.clip(samples.astype(np.float64) / full_scale, 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)
  if np.issubdtype(samples.dtype, np.floating):
    if not np.all(np.isfinite(samples)):
      raise ReadError(path, 'raster contains NaN or infinity')
    if samples.size and (samples.min() < 0 or samples.max() > 1):
      raise ReadError(path, f'float samples must lie in [0, 1], got [{samples.min()}, '
                      f'{samples.max()}]')
    return np.rint(samples.astype(np.float64) * 255.0).astype(np.uint8)
  raise ReadError(path, f'unsupported sample type {samples.dtype}')


def select_rgb_bands(raster: Raster, bands: Sequence[int] | None = None) -> np.ndarray:
  """The samples that make up RGB: (H, W, 1) gray or (H, W, 3), in the stored dtype.

  Args:
    raster: the raster.
    bands: 1-based band numbers, 1 (gray) or 3 (R, G, B); None applies the rule of the module
      docstring (1-2 bands: band 1; 3-4 bands: bands 1, 2, 3).

  Raises:
    ReadError: a band the raster does not have, or more than 4 bands and no `bands`.
  """
  n_bands = raster.pixels.shape[2]
  if bands is None:
    if n_bands in (1, 2):
      bands = (1,)  # gray, or gray + alpha
    elif n_bands in (3, 4):
      bands = (1, 2, 3)  # RGB, RGB + alpha or RGB + NIR
    else:
      raise ReadError(raster.path, f'{n_bands} bands; expected 1 (gray), 2 (gray + alpha), '
                      '3 (RGB) or 4 (RGB + alpha/NIR), or name the RGB bands')
  if len(bands) not in (1, 3) or min(bands) < 1 or max(bands) > n_bands:
    raise ReadError(raster.path, f'bands {tuple(bands)} requested; the raster has {n_bands} '
                    'band(s), and 1 or 3 band numbers from 1 are needed')
  return raster.pixels[..., [band - 1 for band in bands]]


def to_rgb_uint8(raster: Raster, *, bands: Sequence[int] | None = None,
                 bit_depth: int | None = None) -> np.ndarray:
  """Raster -> uint8 (H, W, 3) RGB: select_rgb_bands, then samples_to_uint8 (bit_depth, else
  the file's recorded bits), gray replicated."""
  rgb = samples_to_uint8(select_rgb_bands(raster, bands), raster.path, bit_depth=bit_depth,
                         recorded_bits=raster.bits)
  if rgb.shape[2] == 1:
    rgb = np.repeat(rgb, 3, axis=2)
  return np.ascontiguousarray(rgb)


def to_channels_uint8(raster: Raster, channels: int) -> np.ndarray:
  """Raster -> uint8 (H, W, channels), e.g. an auxiliary raster or a gray mask.

  samples_to_uint8 over all bands, then: exactly `channels` bands are kept; for channels == 1
  a gray + alpha raster drops alpha and an RGB(A) raster becomes luma (PIL 'L').

  Raises:
    ReadError: the band count cannot give `channels` channels, or samples_to_uint8 fails.
  """
  values = samples_to_uint8(raster.pixels, raster.path, recorded_bits=raster.bits)
  n_bands = values.shape[2]
  if n_bands == channels:
    return np.ascontiguousarray(values)
  if channels == 1 and n_bands == 2:
    return np.ascontiguousarray(values[..., :1])
  if channels == 1 and n_bands in (3, 4):
    luma = Image.fromarray(np.ascontiguousarray(values[..., :3])).convert('L')
    return np.asarray(luma, dtype=np.uint8)[..., None]
  raise ReadError(raster.path, f'{n_bands} band(s); expected {channels} channel(s)')


# ----------------------------------------------------------------------------------------------
# GPS tables.


def read_gps_csv(csv_paths: os.PathLike | str | Sequence[os.PathLike | str], *,
                 gps_format: str = 'auto', lon_column: str | None = None,
                 lat_column: str | None = None, degrees: bool = True,
                 crs_name: str = 'EPSG:4326') -> tuple[np.ndarray, np.ndarray]:
  """Every GPS point of one or more CSV files.

  Args:
    csv_paths: a path or a sequence of paths (files concatenated in the given order; an empty
      sequence gives no points).
    gps_format: 'porto' (POLYLINE column of [lon, lat] lists, geo.parse_porto_polylines),
      'columns' (one point a row), or 'auto' ('porto' when the header has a POLYLINE column).
    lon_column, lat_column: the x and y column names of a 'columns' table, case-insensitive;
      None looks for LON_COLUMNS / LAT_COLUMNS.
    degrees: the columns hold lon/lat degrees, so a value outside lon [-180, 180] / lat
      [-90, 90] is an error (projected coordinates such as UTM metres read as degrees, or
      swapped columns); False for projected coordinates.
    crs_name: the CRS the coordinates are declared in, named in that error.

  Returns:
    (x, y) float64 (N,) arrays: lon, lat for degrees (always for 'porto').

  Raises:
    ValueError: an unknown gps_format.
    ReadError: a missing or empty file, a missing column, or a value that is not a finite
      number (in range, for degrees); problems of a row name its line.
  """
  if gps_format not in GPS_FORMATS:
    raise ValueError(f'gps_format must be one of {GPS_FORMATS}; got {gps_format!r}')
  if isinstance(csv_paths, (str, os.PathLike)):
    csv_paths = [csv_paths]
  xs, ys = [np.zeros(0)], [np.zeros(0)]
  for path in (pathlib.Path(p) for p in csv_paths):
    x, y = _read_one_gps_csv(path, gps_format, lon_column, lat_column, degrees, crs_name)
    xs.append(x)
    ys.append(y)
  return np.concatenate(xs), np.concatenate(ys)


def _read_one_gps_csv(path: pathlib.Path, gps_format: str, lon_column: str | None,
                      lat_column: str | None, degrees: bool,
                      crs_name: str = 'EPSG:4326') -> tuple[np.ndarray, np.ndarray]:
  if not path.is_file():
    raise ReadError(path, 'GPS CSV not found')
  try:
    with open(path, newline='', encoding='utf-8') as handle:
      header = next(csv.reader(handle), None)
  except (OSError, UnicodeDecodeError, csv.Error) as error:
    raise ReadError(path, f'cannot read GPS CSV ({error})') from error
  if not header:
    raise ReadError(path, 'GPS CSV is empty')
  if gps_format == 'auto':
    has_polyline = 'POLYLINE' in [name.strip().upper() for name in header]
    gps_format = 'porto' if has_polyline else 'columns'
  if gps_format == 'porto':
    try:
      _, lon, lat, _ = geo_lib.parse_porto_polylines(path)
    except geo_lib.TrajectoryFormatError as error:
      raise ReadError(path, f'bad Porto taxi table ({error})') from error
    return lon, lat
  x_name = _find_column(header, lon_column, LON_COLUMNS, path, 'longitude')
  y_name = _find_column(header, lat_column, LAT_COLUMNS, path, 'latitude')
  xs, ys = [], []
  with open(path, newline='', encoding='utf-8') as handle:
    reader = csv.DictReader(handle)
    try:
      for record in reader:
        try:
          x, y = float(record[x_name]), float(record[y_name])
        except (TypeError, ValueError):
          raise ReadError(path, f'line {reader.line_num}: {x_name}/{y_name} are not numbers: '
                          f'{record[x_name]!r}, {record[y_name]!r}') from None
        if not (math.isfinite(x) and math.isfinite(y)):
          raise ReadError(path, f'line {reader.line_num}: NaN/inf coordinate')
        if degrees and (abs(x) > 180 or abs(y) > 90):
          raise ReadError(
              path, f'line {reader.line_num}: ({x}, {y}) is outside lon [-180, 180] / lat '
              f'[-90, 90], but the GPS CRS is {crs_name} (degrees): if these are projected '
              'coordinates (e.g. UTM metres), set gps_crs to their CRS (e.g. EPSG:32611); '
              f'else check that {x_name}/{y_name} are not swapped')
        xs.append(x)
        ys.append(y)
    except csv.Error as error:
      raise ReadError(path, f'line {reader.line_num}: {error}') from error
  return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def _find_column(header: Sequence[str], wanted: str | None, candidates: Sequence[str],
                 path: os.PathLike | str, what: str) -> str:
  """The header's spelling of column `wanted`, or of the first of `candidates` when wanted is
  None; names compare case-insensitively and without surrounding blanks.

  Raises:
    ReadError: no such column (the message lists the names tried and the header).
  """
  by_lower = {name.strip().lower(): name for name in header}
  names = [wanted] if wanted else list(candidates)
  for name in names:
    if name.strip().lower() in by_lower:
      return by_lower[name.strip().lower()]
  raise ReadError(path, f'no {what} column (tried {", ".join(names)}, case-insensitive); '
                  f'header is {list(header)}')
