"""Streaming inputs for builders of large areas: imagery by windows, roads by window, GPS on disk.

The custom builder (data_builders/custom) holds, with these pieces, about one row of tiles of an
area at a time instead of the whole raster, mask and GPS table:

  ImageryWindows  a GeoTIFF read by rasterio windows. One pass over the raster (strips of
                  `strip_rows` rows) resolves the input preparation as preparation.prepare_image
                  would on the whole raster: the bit depth, and the errors it raises (with the
                  whole raster's minimum/maximum in their messages); the 'percentile' stretch is
                  exact for integer samples of up to 16 bits (per-band histograms: the same
                  order statistics and the same linear interpolation as np.percentile over
                  every pixel), and for float or wider samples comes from a decimated read of at
                  most PERCENTILE_SAMPLE_PIXELS pixels (nearest, which GDAL serves from
                  overviews when the file has them). `read(window)` then gives uint8 RGB equal
                  to the whole raster's prepare_image cut to that window.
  RoadIndex       bounding boxes of road geometries (pixel coordinates) in a shapely STRtree, to
                  find the few geometries that can mark a window.
  GpsTileRows     GPS CSV files read in chunks (iter_gps_chunks: pyarrow's streaming CSV
                  reader for lon/lat columns, the csv module row by row for Porto polylines;
                  the values and errors of reading.read_gps_csv), projected onto the raster
                  chunk by chunk and appended to one file per row of tiles in a work folder
                  (GpsTileRows); each row of tiles is
                  then rendered alone by heatmap.render_tiled_heatmap_uint8, which gives the
                  same bytes as rendering the whole grid at once (each tile is normalised by its
                  own maximum, and a row's coordinates shifted by whole tiles are exact).

Memory: one strip or window of imagery, one row of tiles of mask and heat-map, one chunk of GPS
rows, and the GPS points of one row of tiles (16 bytes each) while that row is rendered. Also
bounded here, for the builds that use these pieces: GDAL's block cache (GDAL_CACHE_BYTES) and
the encoded examples TFDS's writer holds before spilling to disk (bounded_tfds_shuffle_buffer).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import math
import os
import pathlib
import sys
import types
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import rasterio
import rasterio.enums
import rasterio.errors
import rasterio.windows
import shapely
from tensorflow_datasets.core import shuffle as tfds_shuffle

from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import heatmap as heatmap_lib
from cmmp_jax.data import preparation as preparation_lib
from cmmp_jax.data import reading

# A decimated read of at most this many pixels gives the percentile stretch of float samples.
PERCENTILE_SAMPLE_PIXELS = 1 << 22
SCAN_STRIP_PIXELS = 1 << 22
# Integer samples whose range needs at most this many histogram bins get an exact stretch.
_MAX_HISTOGRAM_BINS = 1 << 16
DEFAULT_GPS_CHUNK_ROWS = 1 << 19
# GDAL's block cache (bytes): GDAL's default is 5% of the machine's memory, which a streamed
# build would otherwise fill with blocks it reads once.
GDAL_CACHE_BYTES = 64 << 20
# Encoded examples TFDS's writer keeps in memory per split before it spills them to its sorted
# bucket files on disk (tfds.core.shuffle; its default is 1 GB). The files come out the same.
TFDS_SHUFFLE_BUFFER_BYTES = 64 << 20


def _is_local(path) -> bool:
  return '://' not in os.fspath(path)


class _ResourceExhaustedError(Exception):
  """Never raised: stands for TensorFlow's error in the except clause of TFDS's bucket writer."""


class _PythonFilesAsTf:
  """What tfds.core.shuffle uses of TensorFlow (tf.io.gfile on its bucket files, one error
  class), on Python's own files for local paths; other paths (gs://...) go to `real_tf`."""

  def __init__(self, real_tf):
    self._real_tf = real_tf
    self.io = types.SimpleNamespace(gfile=types.SimpleNamespace(
        GFile=self._open, exists=self._exists, remove=self._remove))
    self.errors = types.SimpleNamespace(ResourceExhaustedError=_ResourceExhaustedError)

  def _open(self, path, mode):
    if not _is_local(path):
      return self._real_tf.io.gfile.GFile(path, mode)
    try:
      return open(path, mode)
    except OSError as error:
      if error.errno != errno.EMFILE:
        raise
      # TFDS keeps its 1000 bucket files open, and raises the limit on TensorFlow's error.
      tfds_shuffle._increase_open_files_limit()
      return open(path, mode)

  def _exists(self, path) -> bool:
    return os.path.exists(path) if _is_local(path) else self._real_tf.io.gfile.exists(path)

  def _remove(self, path) -> None:
    if _is_local(path):
      os.remove(path)
    else:
      self._real_tf.io.gfile.remove(path)


@contextlib.contextmanager
def bounded_tfds_shuffle_buffer(max_bytes: int | None = None):
  """Within the block, TFDS's writer holds at most max_bytes (default TFDS_SHUFFLE_BUFFER_BYTES)
  of encoded examples per split in memory, and spills the rest to its bucket files with
  Python's file functions.

  tfds.core.shuffle has no setting for either: it reads the module constant
  MAX_MEM_BUFFER_SIZE (1 GB) at every example, and opens, tests and deletes its bucket files
  (in the build's folder) through a lazily imported TensorFlow, whose import alone costs 0.7 GB
  of memory here (it is still used for remote folders, e.g. gs://). Both module attributes are
  replaced for the block and restored on exit; the files written are the same
  (tests/test_stream_build.py).
  """
  if max_bytes is None:
    max_bytes = TFDS_SHUFFLE_BUFFER_BYTES
  previous_size, previous_tf = tfds_shuffle.MAX_MEM_BUFFER_SIZE, tfds_shuffle.tf
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = min(previous_size, int(max_bytes))
  tfds_shuffle.tf = _PythonFilesAsTf(previous_tf)
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE, tfds_shuffle.tf = previous_size, previous_tf


# ----------------------------------------------------------------------------------------------
# Imagery.


def _tiff_bits(dataset) -> int | None:
  """The NBITS a GeoTIFF records for band 1 (as reading.read_raster reads it), or None."""
  value = dataset.tags(1, ns='IMAGE_STRUCTURE').get('NBITS')
  try:
    bits = int(value) if value is not None else None
  except ValueError:
    return None
  return bits if bits is not None and 1 <= bits <= 32 else None


def exact_percentile(histogram: np.ndarray, offset: int, q: float) -> np.float64:
  """np.percentile(values, q) (method 'linear') of integer values given by their histogram.

  histogram[i] counts the value offset + i. Same float64 arithmetic as numpy: virtual index
  (n - 1) * (q / 100), the two order statistics around it, and numpy's _lerp.
  """
  n = int(histogram.sum())
  cumulative = np.cumsum(histogram, dtype=np.int64)
  quantile = np.true_divide(np.float64(q), 100)
  virtual = np.float64(n - 1) * quantile
  if virtual >= n - 1:
    previous = following = n - 1
  elif virtual < 0:
    previous = following = 0
  else:
    previous = int(np.floor(virtual))
    following = previous + 1

  def order_statistic(k: int) -> np.float64:
    return np.float64(offset + int(np.searchsorted(cumulative, k, side='right')))

  a, b = order_statistic(previous), order_statistic(following)
  gamma = virtual - np.float64(previous)
  difference = b - a
  if gamma >= 0.5:
    return b - difference * (1 - gamma)
  return a + difference * gamma


class ImageryWindows:
  """A georeferenced GeoTIFF read window by window as the model's uint8 RGB (module docstring).

  Attributes:
    path, height, width, geo (GeoInfo), bits (the NBITS the file records, or None),
    preparation: the InputPreparation resolved against the whole raster (what the in-memory
      build records: bit_depth applied, stretch_low/high computed).

  Args (constructor): path, preparation (the spec's), strip_rows (rows per strip of the pass),
    resolved: preparation was already resolved by this class on the same file (no pass).

  Raises (from the constructor):
    reading.ReadError: not a readable TIFF, no CRS, or what prepare_image raises on the whole
      raster (bands it lacks, samples without a bit depth, negative values, ...).
  """

  def __init__(self, path: os.PathLike | str, preparation: preparation_lib.InputPreparation,
               *, strip_rows: int = 512, resolved: bool = False):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise reading.ReadError(self.path, 'file not found')
    if self.path.suffix.lower() not in reading.IMAGE_EXTENSIONS:
      raise reading.ReadError(self.path, f'unsupported extension {self.path.suffix!r}; expected '
                              f'one of {reading.IMAGE_EXTENSIONS}')
    if self.path.suffix.lower() not in reading.TIFF_EXTENSIONS:
      raise reading.ReadError(self.path, 'GeoTIFF has no CRS')  # PNG/JPEG carry none
    try:
      self._dataset = rasterio.open(self.path)
    except rasterio.errors.RasterioError as error:
      raise reading.ReadError(self.path, f'cannot decode TIFF ({error})') from error
    dataset = self._dataset
    if dataset.crs is None:
      self.close()
      raise reading.ReadError(self.path, 'GeoTIFF has no CRS')
    self.height, self.width = dataset.height, dataset.width
    self.geo = geo_lib.GeoInfo(crs=dataset.crs, transform=dataset.transform,
                               bounds=tuple(float(v) for v in dataset.bounds))
    self.dtype = np.dtype(dataset.dtypes[0])
    self.bits = _tiff_bits(dataset) if np.issubdtype(self.dtype, np.integer) else None
    if self.bits is None and self.dtype == np.uint8:
      self.bits = 8
    # Strips of the pass over the raster: at most SCAN_STRIP_PIXELS pixels (its per-band
    # temporaries are 8 bytes a pixel).
    self.strip_rows = max(1, min(int(strip_rows), SCAN_STRIP_PIXELS // self.width))
    # Which bands make RGB: reading's rule, applied to a one-pixel raster of band numbers.
    numbered = reading.Raster(pixels=np.arange(dataset.count).reshape(1, 1, -1),
                              geo=None, path=self.path)
    self.band_indexes = [int(i) + 1 for i in
                         reading.select_rgb_bands(numbered, preparation.bands)[0, 0]]
    # resolved: the preparation comes from this class on the same file (a Beam worker given the
    # launcher's), so the pass over the raster is not made again.
    self.preparation = preparation if resolved else self._resolve(preparation)

  def close(self) -> None:
    self._dataset.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _raster(self, pixels: np.ndarray) -> reading.Raster:
    return reading.Raster(pixels=pixels, geo=None, path=self.path, bits=self.bits)

  def _strips(self) -> Iterator[np.ndarray]:
    """(rows, W, bands) samples of the RGB bands, strip by strip."""
    for row0 in range(0, self.height, self.strip_rows):
      rows = min(self.strip_rows, self.height - row0)
      window = rasterio.windows.Window(0, row0, self.width, rows)
      try:
        data = self._dataset.read(self.band_indexes, window=window)
      except rasterio.errors.RasterioError as error:
        raise reading.ReadError(self.path, f'cannot decode TIFF ({error})') from error
      yield np.moveaxis(data, 0, -1)

  def _scan(self, with_histograms: bool):
    """One pass over the RGB bands: per band minimum, maximum (of finite values), whether any
    value is NaN/inf, and (with_histograms, integers) the histogram of values from dtype min."""
    n = len(self.band_indexes)
    low, high = np.full(n, np.inf), np.full(n, -np.inf)
    nonfinite = np.zeros(n, bool)
    integer = np.issubdtype(self.dtype, np.integer)
    offset = int(np.iinfo(self.dtype).min) if integer else 0
    histograms = None
    if with_histograms:
      info = np.iinfo(self.dtype)
      histograms = np.zeros((n, int(info.max) - offset + 1), np.int64)
    for strip in self._strips():
      for band in range(n):
        values = strip[..., band]
        if not integer:
          finite = np.isfinite(values)
          if not finite.all():
            nonfinite[band] = True
            values = values[finite]
        if values.size:
          low[band] = min(low[band], float(values.min()))
          high[band] = max(high[band], float(values.max()))
        if histograms is not None:
          histograms[band] += np.bincount(values.ravel().astype(np.int64) - offset,
                                          minlength=histograms.shape[1])
    return low, high, nonfinite, histograms

  def _resolve(self, preparation: preparation_lib.InputPreparation
               ) -> preparation_lib.InputPreparation:
    """The preparation prepare_image would apply to the whole raster, or its error."""
    selected = dataclasses.replace(preparation, bands=None)
    n = len(self.band_indexes)
    integer = np.issubdtype(self.dtype, np.integer)
    if preparation.scaling == 'percentile' and preparation.stretch_low is None:
      low_q, high_q = preparation.percentiles
      bins = int(np.iinfo(self.dtype).max) - int(np.iinfo(self.dtype).min) + 1 if integer else 0
      if integer and bins <= _MAX_HISTOGRAM_BINS:
        offset = int(np.iinfo(self.dtype).min)
        histograms = self._scan(with_histograms=True)[3]
        stretch_low = tuple(float(exact_percentile(h, offset, low_q)) for h in histograms)
        stretch_high = tuple(float(exact_percentile(h, offset, high_q)) for h in histograms)
      else:
        stretch_low, stretch_high = self._sampled_percentiles(preparation.percentiles)
      return dataclasses.replace(preparation, stretch_low=stretch_low,
                                 stretch_high=stretch_high)
    probe = np.zeros((1, 1, n), self.dtype)
    # Under 'bit_depth', samples that can fail a check of samples_to_uint8 (floats, signed
    # integers, integers of unknown bit depth) are scanned first; prepare_image on a 1 x 2
    # raster holding each band's extremes then raises what it would raise on the whole raster
    # (its checks and messages depend on nothing else). Otherwise (and for a recorded stretch,
    # whose band count it checks) a one-pixel probe resolves the preparation.
    if preparation.scaling == 'bit_depth' and (
        not integer or np.issubdtype(self.dtype, np.signedinteger)
        or (preparation.bit_depth is None and self.bits is None)):
      low, high, nonfinite, _ = self._scan(with_histograms=False)
      probe = np.stack([low, high])[None]
      if integer:
        probe = probe.astype(self.dtype)
      else:
        probe[:, :, nonfinite] = np.nan
        probe = probe.astype(self.dtype)
    _, applied = preparation_lib.prepare_image(self._raster(probe), selected)
    return dataclasses.replace(applied, bands=preparation.bands)

  def _sampled_percentiles(self, percentiles) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Percentiles of a decimated read (float samples, or integers too wide for a histogram)."""
    step = max(1, math.ceil(math.sqrt(self.height * self.width / PERCENTILE_SAMPLE_PIXELS)))
    shape = (len(self.band_indexes), max(1, self.height // step), max(1, self.width // step))
    try:
      sample = self._dataset.read(self.band_indexes, out_shape=shape,
                                  resampling=rasterio.enums.Resampling.nearest)
    except rasterio.errors.RasterioError as error:
      raise reading.ReadError(self.path, f'cannot decode TIFF ({error})') from error
    values = np.moveaxis(sample, 0, -1).reshape(-1, len(self.band_indexes)).astype(np.float64)
    finite = np.isfinite(values).all(axis=1)
    if not finite.any():
      raise reading.ReadError(self.path, 'no pixel with finite values in the bands used')
    low = np.percentile(values[finite], percentiles[0], axis=0)
    high = np.percentile(values[finite], percentiles[1], axis=0)
    return tuple(float(v) for v in low), tuple(float(v) for v in high)

  def read(self, row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """uint8 (height, width, 3) RGB of a window inside the raster."""
    window = rasterio.windows.Window(col0, row0, width, height)
    try:
      data = self._dataset.read(self.band_indexes, window=window)
    except rasterio.errors.RasterioError as error:
      raise reading.ReadError(self.path, f'cannot decode TIFF ({error})') from error
    rgb, _ = preparation_lib.prepare_image(
        self._raster(np.moveaxis(data, 0, -1)),
        dataclasses.replace(self.preparation, bands=None))
    return rgb


# ----------------------------------------------------------------------------------------------
# Roads.


class RoadIndex:
  """Which geometries can mark a window: an STRtree of their pixel bounding boxes.

  Args:
    pixel_boxes: float64 (N, 4) (col_min, row_min, col_max, row_max) of each geometry's vertices.
    margin_px: how far past its vertices a geometry can mark pixels (half the road width).
  """

  def __init__(self, pixel_boxes: np.ndarray, margin_px: float):
    pixel_boxes = np.asarray(pixel_boxes, np.float64).reshape(-1, 4)
    self.margin_px = float(margin_px)
    self._tree = shapely.STRtree(shapely.box(*pixel_boxes.T)) if len(pixel_boxes) else None

  def query(self, row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Sorted indices of the geometries whose grown box meets the window."""
    if self._tree is None:
      return np.zeros(0, np.int64)
    m = self.margin_px
    window = shapely.box(col0 - m, row0 - m, col0 + width + m, row0 + height + m)
    return np.sort(self._tree.query(window)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# GPS.


def _iter_columns_exact(path: pathlib.Path, skip: int, x_name: str, y_name: str, degrees: bool,
                        crs_name: str, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Records skip, skip + 1, ... of a lon/lat table read row by row with the csv module and
  float(), with reading.read_gps_csv's checks and messages (line numbers included)."""
  xs, ys = [], []
  with open(path, newline='', encoding='utf-8') as handle:
    reader = csv.DictReader(handle)
    try:
      for index, record in enumerate(reader):
        if index < skip:
          continue
        try:
          x, y = float(record[x_name]), float(record[y_name])
        except (TypeError, ValueError):
          raise reading.ReadError(path, f'line {reader.line_num}: {x_name}/{y_name} are not '
                                  f'numbers: {record[x_name]!r}, {record[y_name]!r}') from None
        if not (math.isfinite(x) and math.isfinite(y)):
          raise reading.ReadError(path, f'line {reader.line_num}: NaN/inf coordinate')
        if degrees and (abs(x) > 180 or abs(y) > 90):
          raise reading.ReadError(
              path, f'line {reader.line_num}: ({x}, {y}) is outside lon [-180, 180] / lat '
              f'[-90, 90], but the GPS CRS is {crs_name} (degrees): if these are projected '
              'coordinates (e.g. UTM metres), set gps_crs to their CRS (e.g. EPSG:32611); '
              f'else check that {x_name}/{y_name} are not swapped')
        xs.append(x)
        ys.append(y)
        if len(xs) >= chunk_rows:
          yield np.asarray(xs, np.float64), np.asarray(ys, np.float64)
          xs, ys = [], []
    except csv.Error as error:
      raise reading.ReadError(path, f'line {reader.line_num}: {error}') from error
  if xs:
    yield np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def _iter_columns_chunks(path: pathlib.Path, header: Sequence[str],
                         preparation: preparation_lib.InputPreparation, degrees: bool,
                         chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """A lon/lat table in chunks: parsed by pyarrow's streaming CSV reader (its float parser
  rounds correctly, as float() does, so the values are the same), checked vectorised; from the
  first record arrow cannot parse as plain numbers, or that fails a check, read row by row by
  _iter_columns_exact, which gives reading's exact error (or reads on, for text float() takes
  and arrow does not, e.g. ' 2.5 ')."""
  x_name = reading._find_column(header, preparation.lon_column, reading.LON_COLUMNS, path,
                                'longitude')
  y_name = reading._find_column(header, preparation.lat_column, reading.LAT_COLUMNS, path,
                                'latitude')
  exact = lambda skip: _iter_columns_exact(path, skip, x_name, y_name, degrees,
                                           preparation.gps_crs, chunk_rows)
  start = 0
  try:
    reader = pa_csv.open_csv(
        path, read_options=pa_csv.ReadOptions(block_size=max(1 << 20, 32 * chunk_rows),
                                                use_threads=False),
        convert_options=pa_csv.ConvertOptions(
            include_columns=[x_name, y_name], column_types={x_name: pa.float64(),
                                                            y_name: pa.float64()},
            null_values=[], strings_can_be_null=False))
  except (pa.ArrowException, KeyError):
    yield from exact(0)
    return
  while True:
    try:
      batch = reader.read_next_batch()
    except StopIteration:
      return
    except (pa.ArrowException, KeyError):
      yield from exact(start)
      return
    x = batch.column(x_name).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    y = batch.column(y_name).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if degrees:
      bad |= (np.abs(x) > 180) | (np.abs(y) > 90)
    if bad.any():
      yield from exact(start)  # raises at the first bad record
      return
    for offset in range(0, x.size, chunk_rows):
      yield x[offset:offset + chunk_rows], y[offset:offset + chunk_rows]
    start += x.size


def _iter_porto_chunks(path: pathlib.Path, chunk_points: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Porto polylines row by row (geo.parse_porto_polylines' checks and messages)."""
  if csv.field_size_limit() < 2**30:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  parts, size = [], 0
  with open(path, newline='', encoding='utf-8') as handle:
    reader = csv.DictReader(handle)
    missing = [name for name in geo_lib._PORTO_COLUMNS if name not in (reader.fieldnames or ())]
    if missing:
      raise reading.ReadError(path, f'bad Porto taxi table ({path}: missing column(s) '
                              f'{missing}; header is {reader.fieldnames})')
    try:
      for record in reader:
        where = f'{path}:{reader.line_num}'
        geo_lib._parse_int(record['TRIP_ID'], 'TRIP_ID', where)
        geo_lib._parse_int(record['TIMESTAMP'], 'TIMESTAMP', where)
        coords = geo_lib._parse_polyline(record['POLYLINE'], where)
        if len(coords):
          parts.append(coords)
          size += len(coords)
        if size >= chunk_points:
          coords = np.concatenate(parts)
          parts, size = [], 0
          yield coords[:, 0].copy(), coords[:, 1].copy()
    except csv.Error as error:
      raise reading.ReadError(path, f'bad Porto taxi table ({path}:{reader.line_num}: '
                              f'{error})') from error
    except geo_lib.TrajectoryFormatError as error:
      raise reading.ReadError(path, f'bad Porto taxi table ({error})') from error
  if parts:
    coords = np.concatenate(parts)
    yield coords[:, 0].copy(), coords[:, 1].copy()


def iter_gps_chunks(paths: Sequence[os.PathLike | str],
                    preparation: preparation_lib.InputPreparation,
                    chunk_rows: int = DEFAULT_GPS_CHUNK_ROWS
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The points of preparation.read_gps(paths, preparation), (x, y) float64 chunks in file order,
  about chunk_rows rows (or Porto points) at a time; the same values and the same errors."""
  crs = preparation_lib.gps_crs(preparation)
  for path in (pathlib.Path(p) for p in paths):
    if not path.is_file():
      raise reading.ReadError(path, 'GPS CSV not found')
    try:
      with open(path, newline='', encoding='utf-8') as handle:
        header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
      raise reading.ReadError(path, f'cannot read GPS CSV ({error})') from error
    if not header:
      raise reading.ReadError(path, 'GPS CSV is empty')
    gps_format = preparation.gps_format
    if gps_format == 'auto':
      has_polyline = 'POLYLINE' in [name.strip().upper() for name in header]
      gps_format = 'porto' if has_polyline else 'columns'
    if gps_format == 'porto':
      yield from _iter_porto_chunks(path, chunk_rows)
    else:
      yield from _iter_columns_chunks(path, header, preparation, crs.is_geographic, chunk_rows)


@dataclasses.dataclass
class GpsCounts:
  """What the in-memory build learns from the whole table: counts and the coordinate extent."""
  points: int = 0
  on_raster: int = 0
  x_min: float = math.inf
  x_max: float = -math.inf
  y_min: float = math.inf
  y_max: float = -math.inf

  def add(self, x: np.ndarray, y: np.ndarray, cols: np.ndarray, rows: np.ndarray,
          height: int, width: int) -> None:
    """Counts a chunk: (x, y) as read, (cols, rows) on an H x W raster."""
    if x.size:
      self.points += int(x.size)
      self.x_min, self.x_max = min(self.x_min, float(x.min())), max(self.x_max, float(x.max()))
      self.y_min, self.y_max = min(self.y_min, float(y.min())), max(self.y_max, float(y.max()))
    self.on_raster += int(np.count_nonzero(
        (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)))

  def merge(self, other: 'GpsCounts') -> 'GpsCounts':
    """The counts of both tables together (a new object)."""
    return GpsCounts(points=self.points + other.points,
                     on_raster=self.on_raster + other.on_raster,
                     x_min=min(self.x_min, other.x_min), x_max=max(self.x_max, other.x_max),
                     y_min=min(self.y_min, other.y_min), y_max=max(self.y_max, other.y_max))


def points_by_tile(cols: np.ndarray, rows: np.ndarray, grid_height: int, grid_width: int,
                   tile_size: int) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
  """((tile_row, tile_col), float64 (n, 2) (col, row) raster pixels) for each tile of the grid
  with points: the points render_tiled_heatmap_uint8 renders (finite, inside the grid's extent),
  in their input order within a tile."""
  inside = (np.isfinite(cols) & np.isfinite(rows) & (cols >= 0) & (cols < grid_width)
            & (rows >= 0) & (rows < grid_height))
  index = np.flatnonzero(inside)
  if not index.size:
    return
  n_tile_cols = grid_width // tile_size
  keys = ((rows[index] // tile_size).astype(np.int64) * n_tile_cols
          + (cols[index] // tile_size).astype(np.int64))
  order = np.argsort(keys, kind='stable')
  index, keys = index[order], keys[order]
  for part in np.split(np.arange(index.size), np.flatnonzero(np.diff(keys)) + 1):
    points = index[part]
    yield divmod(int(keys[part[0]]), n_tile_cols), np.stack([cols[points], rows[points]], axis=1)


class GpsTileRows:
  """GPS points bucketed on disk by row of tiles, each row rendered alone (module docstring).

  Args:
    work_dir: folder for the bucket files (one per row of tiles with points).
    height, width: raster size; tile_size: the heat-map grid's step.
  """

  def __init__(self, work_dir: os.PathLike | str, height: int, width: int, tile_size: int):
    self.work_dir = pathlib.Path(work_dir)
    self.work_dir.mkdir(parents=True, exist_ok=True)
    self.height, self.width, self.tile_size = height, width, tile_size
    self.grid_height, self.grid_width = heatmap_lib.grid_extent(height, width, tile_size)
    self.counts = GpsCounts()

  def _bucket(self, tile_row: int) -> pathlib.Path:
    return self.work_dir / f'gps_row_{tile_row:06d}.f64'

  def add(self, x: np.ndarray, y: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> None:
    """Counts a chunk ((x, y) as read, (cols, rows) on the raster) and appends its points on the
    tile grid to their rows' bucket files."""
    self.counts.add(x, y, cols, rows, self.height, self.width)
    # The points render_tiled_heatmap_uint8 renders: finite and inside the grid's extent.
    inside = (np.isfinite(cols) & np.isfinite(rows) & (cols >= 0) & (cols < self.grid_width)
              & (rows >= 0) & (rows < self.grid_height))
    index = np.flatnonzero(inside)
    if not index.size:
      return
    tile_rows = (rows[index] // self.tile_size).astype(np.int64)
    order = np.argsort(tile_rows, kind='stable')
    index, tile_rows = index[order], tile_rows[order]
    starts = np.flatnonzero(np.diff(tile_rows)) + 1
    for part in np.split(np.arange(index.size), starts):
      tile_row = int(tile_rows[part[0]])
      points = index[part]
      with open(self._bucket(tile_row), 'ab') as handle:
        np.stack([cols[points], rows[points]], axis=1).tofile(handle)

  def render_row(self, tile_row: int) -> np.ndarray:
    """uint8 (tile_size, grid_width) heat-map of one row of tiles: rows
    [tile_row * T, (tile_row + 1) * T) of render_tiled_heatmap_uint8 over the whole raster."""
    path = self._bucket(tile_row)
    if not path.exists():
      return np.zeros((self.tile_size, self.grid_width), np.uint8)
    points = np.fromfile(path, np.float64).reshape(-1, 2)
    # Exact: rows in [r T, (r + 1) T) minus r T (Sterbenz), so every tile sees the same
    # coordinates (rows - row0, cols - col0) as in the whole grid's rendering.
    rows = points[:, 1] - float(tile_row * self.tile_size)
    heatmap, _ = heatmap_lib.render_tiled_heatmap_uint8(
        points[:, 0], rows, self.tile_size, self.width, self.tile_size)
    return heatmap
