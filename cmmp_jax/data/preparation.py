"""Input preparation: how source files become model inputs, defined once and recorded.

The dataset builders (data_builders/) and prediction (cmmp_jax.predict) both turn an image file
and GPS tables into the uint8 arrays the model sees, through the functions of this module, with
the settings of one `InputPreparation`. A builder stores the settings it used, resolved against
its data (the bit depth actually applied, the percentile stretch actually computed, the tile
size), in the dataset's metadata (TFDS `metadata.json` in the version folder, key
PREPARATION_KEY); prediction reads that record back and applies it to new files, so a raster of
the dataset comes out of prediction bit-identical to the dataset's tiles.

Steps (each one function here):
  image   prepare_image: band selection (`bands`, 1-based; None = reading's band rule), then
          `scaling`: 'bit_depth' maps integers x -> round(x * 255 / (2**b - 1)) with b the
          `bit_depth` setting, else the bit depth the file records (TIFF NBITS; 8 for uint8),
          else an error asking for the setting (reading.samples_to_uint8); 'percentile' maps
          each band linearly from its `percentiles` (default 2, 98 over the whole raster) to
          0..255, and the record keeps the values (stretch_low/high), which prediction reuses.
  GPS     read_gps: CSV files (reading.read_gps_csv) with `gps_format`, `lon_column`,
          `lat_column`, in `gps_crs` (any CRS rasterio knows; default EPSG:4326 lon/lat);
          gps_to_raster_pixels projects them onto a georeferenced raster.
  aux     render_gps_aux: heatmap.render_tiled_heatmap_uint8 over the grid of `tile_size`
          tiles from the raster's top-left pixel, each tile normalised by its own maximum (the
          builders' tiles); tile_size None normalises the whole raster at once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import rasterio.crs
import rasterio.errors
import rasterio.warp

from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import heatmap as heatmap_lib
from cmmp_jax.data import reading

PREPARATION_KEY = 'input_preparation'
RECORD_FORMAT = 1
SCALINGS = ('bit_depth', 'percentile')
# Where a dataset's aux raster came from: rendered from GPS here, or read from aux files.
AUX_SOURCES = ('gps_heatmap', 'files')


class PreparationError(ValueError):
  """An InputPreparation field, or a record of one, is invalid; the message names the field and
  where it came from."""


@dataclasses.dataclass(frozen=True)
class InputPreparation:
  """How images and GPS become the model's uint8 image and aux (module docstring).

  bands: 1-based band numbers making gray (1) or RGB (3); None = reading's band rule.
  scaling: 'bit_depth' or 'percentile'.
  bit_depth: bits of integer samples; None = the file's recorded bits. A record holds the bit
    depth that was applied (8 for uint8 imagery).
  percentiles: (low, high) of the 'percentile' stretch.
  stretch_low, stretch_high: per selected band, the sample values mapped to 0 and 255 by
    'percentile'; None = compute from the raster (a record holds the computed values).
  gps_format, lon_column, lat_column: how GPS CSVs are read (reading.read_gps_csv).
  gps_crs: the CRS of the GPS coordinates (e.g. 'EPSG:4326', 'EPSG:32611').
  tile_size: the grid of the heat-map normalisation and the dataset's tile side; None = the
    whole raster is one tile.
  aux: 'gps_heatmap' (rendered from GPS) or 'files' (aux rasters read from files).
  """
  bands: tuple[int, ...] | None = None
  scaling: str = 'bit_depth'
  bit_depth: int | None = None
  percentiles: tuple[float, float] = (2.0, 98.0)
  stretch_low: tuple[float, ...] | None = None
  stretch_high: tuple[float, ...] | None = None
  gps_format: str = 'auto'
  lon_column: str | None = None
  lat_column: str | None = None
  gps_crs: str = 'EPSG:4326'
  tile_size: int | None = None
  aux: str = 'gps_heatmap'

  def validate(self, source: str = 'input preparation') -> 'InputPreparation':
    """Returns self; raises PreparationError naming `source` and the field otherwise."""
    def fail(problem):
      raise PreparationError(f'{source}: {problem}')
    if self.scaling not in SCALINGS:
      fail(f'scaling must be one of {SCALINGS}, got {self.scaling!r}')
    if self.aux not in AUX_SOURCES:
      fail(f'aux must be one of {AUX_SOURCES}, got {self.aux!r}')
    if self.gps_format not in reading.GPS_FORMATS:
      fail(f'gps_format must be one of {reading.GPS_FORMATS}, got {self.gps_format!r}')
    try:
      reading.check_bit_depth(self.bit_depth)
    except ValueError as error:
      fail(str(error))
    if self.bands is not None and (len(self.bands) not in (1, 3) or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.bands)):
      fail(f'bands must list 1 or 3 band numbers (1-based), got {self.bands!r}')
    if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
      fail(f'percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles!r}')
    if (self.stretch_low is None) != (self.stretch_high is None):
      fail('stretch_low and stretch_high must be given together')
    if self.stretch_low is not None and (
        len(self.stretch_low) != len(self.stretch_high)
        or not all(math.isfinite(v) for v in (*self.stretch_low, *self.stretch_high))):
      fail(f'stretch_low/high must be finite and of one length, got {self.stretch_low!r}, '
           f'{self.stretch_high!r}')
    if self.tile_size is not None and (isinstance(self.tile_size, bool) or not isinstance(
        self.tile_size, int) or self.tile_size < 1):
      fail(f'tile_size must be a positive integer or None, got {self.tile_size!r}')
    try:
      rasterio.crs.CRS.from_user_input(self.gps_crs)
    except rasterio.errors.CRSError as error:
      fail(f'gps_crs {self.gps_crs!r} is not a CRS ({error})')
    return self

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict (tuples as lists) with the record format."""
    values = dataclasses.asdict(self)
    return {'format': RECORD_FORMAT, **{k: list(v) if isinstance(v, tuple) else v
                                        for k, v in values.items()}}

  @classmethod
  def from_json(cls, values: Mapping[str, Any], source: str) -> 'InputPreparation':
    """Inverse of to_json; unknown fields or a newer format are errors naming `source`."""
    if not isinstance(values, Mapping):
      raise PreparationError(f'{source}: an input preparation must be a JSON object, got '
                             f'{type(values).__name__}')
    values = dict(values)
    version = values.pop('format', RECORD_FORMAT)
    if version != RECORD_FORMAT:
      raise PreparationError(f'{source}: input preparation format {version!r}; this version '
                             f'reads format {RECORD_FORMAT}')
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise PreparationError(f'{source}: unknown input preparation field(s) {unknown}; known: '
                             f'{sorted(fields)}')
    for name in ('bands', 'percentiles', 'stretch_low', 'stretch_high'):
      if values.get(name) is not None:
        values[name] = tuple(values[name])
    return cls(**values).validate(source)

  def describe(self) -> str:
    """One line for logs, e.g. 'bands auto, bit_depth 11, GPS EPSG:4326, heat-map per 512 px'."""
    bands = 'auto' if self.bands is None else ','.join(str(b) for b in self.bands)
    if self.scaling == 'bit_depth':
      scaling = f'bit_depth {self.bit_depth if self.bit_depth is not None else "from file"}'
    else:
      scaling = f'percentile {self.percentiles[0]:g}-{self.percentiles[1]:g}'
    tiles = f'per {self.tile_size} px tile' if self.tile_size else 'over the whole raster'
    aux = (f'GPS in {self.gps_crs}, heat-map normalised {tiles}' if self.aux == 'gps_heatmap'
           else 'aux from files')
    return f'bands {bands}, {scaling}, {aux}'


def load_record(path: os.PathLike | str) -> InputPreparation:
  """An InputPreparation from a JSON file: a dataset's metadata.json (its PREPARATION_KEY
  member) or a file holding the record alone.

  Raises:
    PreparationError: missing or unparsable file, or an invalid record.
  """
  path = pathlib.Path(path)
  try:
    values = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise PreparationError(f'{path}: cannot read input preparation ({error})') from error
  if isinstance(values, Mapping) and PREPARATION_KEY in values:
    values = values[PREPARATION_KEY]
  return InputPreparation.from_json(values, str(path))


def from_metadata(metadata: Mapping[str, Any] | None, source: str) -> InputPreparation | None:
  """The record in a dataset's metadata (builder.info.metadata), or None when it has none."""
  if not metadata or PREPARATION_KEY not in metadata:
    return None
  return InputPreparation.from_json(metadata[PREPARATION_KEY], source)


# ----------------------------------------------------------------------------------------------
# Image.


def prepare_image(raster: reading.Raster, preparation: InputPreparation
                  ) -> tuple[np.ndarray, InputPreparation]:
  """Raster -> uint8 (H, W, 3) RGB by the preparation's bands and scaling.

  Returns:
    (rgb, applied): applied is the preparation with what was resolved from this raster filled
    in: bit_depth for integer samples under 'bit_depth'; stretch_low/high under 'percentile'.

  Raises:
    reading.ReadError: bands the raster lacks, samples without a bit depth, uint8 samples with
      a bit depth above 8 (e.g. a dataset of 11-bit imagery applied to an 8-bit file), NaN-only
      bands, or a recorded stretch of another band count.
  """
  if preparation.scaling == 'bit_depth':
    bits = None
    if np.issubdtype(raster.pixels.dtype, np.integer):
      bits = preparation.bit_depth if preparation.bit_depth is not None else raster.bits
      if raster.pixels.dtype == np.uint8 and bits is not None and bits > 8:
        raise reading.ReadError(
            raster.path, f'uint8 samples but bit_depth {bits}: the input preparation was made '
            f'for {bits}-bit imagery; give a preparation for this file (bit_depth 8)')
    rgb = reading.to_rgb_uint8(raster, bands=preparation.bands, bit_depth=bits)
    return rgb, dataclasses.replace(preparation, bit_depth=bits)
  values = reading.select_rgb_bands(raster, preparation.bands).astype(np.float64)
  if preparation.stretch_low is None:
    finite = np.isfinite(values).all(axis=2)
    if not finite.any():
      raise reading.ReadError(raster.path, 'no pixel with finite values in the bands used')
    low = np.percentile(values[finite], preparation.percentiles[0], axis=0)
    high = np.percentile(values[finite], preparation.percentiles[1], axis=0)
  else:
    low = np.asarray(preparation.stretch_low, np.float64)
    high = np.asarray(preparation.stretch_high, np.float64)
    if low.size != values.shape[2]:
      raise reading.ReadError(raster.path, f'the recorded percentile stretch has {low.size} '
                              f'band(s); {values.shape[2]} band(s) are selected')
  stretched = np.clip(np.nan_to_num((values - low) / np.maximum(high - low, 1e-12)), 0.0, 1.0)
  # Floats in [0, 1] go to round(x * 255), gray is replicated to RGB.
  rgb = reading.to_rgb_uint8(dataclasses.replace(raster, pixels=stretched))
  return rgb, dataclasses.replace(preparation, stretch_low=tuple(float(v) for v in low),
                                  stretch_high=tuple(float(v) for v in high))


# ----------------------------------------------------------------------------------------------
# GPS.


def gps_crs(preparation: InputPreparation) -> rasterio.crs.CRS:
  return rasterio.crs.CRS.from_user_input(preparation.gps_crs)


def read_gps(paths: os.PathLike | str | Sequence[os.PathLike | str],
             preparation: InputPreparation) -> tuple[np.ndarray, np.ndarray]:
  """Every GPS point of the CSV file(s), (x, y) float64 (N,) in preparation.gps_crs.

  Raises:
    reading.ReadError: a file problem; for a geographic gps_crs, a value outside lon/lat range
      (the message names the CRS and how to declare projected coordinates).
  """
  crs = gps_crs(preparation)
  return reading.read_gps_csv(paths, gps_format=preparation.gps_format,
                              lon_column=preparation.lon_column,
                              lat_column=preparation.lat_column, degrees=crs.is_geographic,
                              crs_name=preparation.gps_crs)


def gps_to_raster_pixels(x: np.ndarray, y: np.ndarray, crs: str | rasterio.crs.CRS,
                         geo: geo_lib.GeoInfo) -> tuple[np.ndarray, np.ndarray]:
  """GPS coordinates in `crs` -> continuous pixel (cols, rows) of a raster in any CRS."""
  source = rasterio.crs.CRS.from_user_input(crs)
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.size == 0:
    return x.copy(), y.copy()
  if geo.crs is None:
    raise ValueError('gps_to_raster_pixels needs a raster with a CRS')
  if source != geo.crs:
    x, y = rasterio.warp.transform(source, geo.crs, x, y)
  return geo_lib.world_to_pixel(np.asarray(x), np.asarray(y), geo.transform)


def render_gps_aux(cols: np.ndarray, rows: np.ndarray, height: int, width: int,
                   preparation: InputPreparation
                   ) -> tuple[np.ndarray, heatmap_lib.RenderStats]:
  """uint8 (Hg, Wg, 1) heat-map of the tile grid over an H x W raster (render_tiled_heatmap_uint8
  with preparation.tile_size; the whole raster when None), and its RenderStats. Crop
  [:height, :width] for the raster itself; builders cut their tiles from the full grid."""
  tile_size = preparation.tile_size or max(height, width)
  heatmap, stats = heatmap_lib.render_tiled_heatmap_uint8(cols, rows, height, width, tile_size)
  return heatmap[..., None], stats
