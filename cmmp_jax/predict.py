"""Road prediction on new tiles and whole mosaics: files in, probability and road maps out.

`predict_directory` runs a trained model over every image of a folder (or one image file, e.g. a
city mosaic GeoTIFF) with `inference.predict_large` (sliding windows, seamless blending) and
writes, per input `{stem}.{ext}`:

  {stem}_prob.png   uint8 (H, W): round(probability * 255)
  {stem}_road.png   uint8 (H, W): 255 where probability > threshold, else 0
  {stem}_prob.tif   float32 (H, W) probabilities in [0, 1]     } only when the input has a
  {stem}_road.tif   uint8 (H, W), the same 0/255 as the PNG    } georeference (see below)

The GeoTIFFs carry the input's CRS and affine transform. Every file is written atomically
(temporary file in the output folder, then os.replace), so a failure never leaves a half-written
file nor touches the outputs of other inputs.

Inputs (one folder, not recursive; extensions case-insensitive):
  Images: .png .jpg .jpeg .tif .tiff, read as the dataset builders read them
    (cmmp_jax.data.reading: its band rule gives RGB, its 'bit_depth' rule gives uint8; a TIFF
    with a CRS is georeferenced). Files whose stem ends with the aux suffixes ('{aux_suffix}',
    '_aux'), '_mask', '_prob' or '_road' are not inputs (auxiliary rasters, labels, and this
    module's own outputs when output_dir == input_dir).

Auxiliary raster of an image, first match wins:
  1. A raster file `{base}{suffix}{ext}` in aux_dir (default: the image's folder), where base is
     the image stem or, for a stem ending in '_sat' or '_rgb', the stem without it; suffix is
     aux_suffix (default '_gps') or '_aux'; ext as for images. So `0_8_sat.png` pairs with
     `0_8_gps.png` / `0_8_gps.jpg` (BJRoad; pass aux_dir for the release's separate gps/ folder),
     `area.tif` with `area_aux.tif`; aux_suffix='' with aux_dir='depth_lpu/' pairs TLCGIS's
     rgb/{id}.png with depth_lpu/{id}.png. Two matching files are an error (ambiguous).
     It becomes uint8 (H, W, aux_channels) by reading.to_channels_uint8 (for aux_channels == 1
     a colour file becomes luma and a gray + alpha file drops alpha, as in the builders).
  2. With gps_csv: a trajectory heat-map rendered on the fly (heatmap.render_heatmap, then
     heatmap_to_uint8, as the builders store it) from every GPS point of the CSV file(s)
     (reading.read_gps_csv: WGS84 lon/lat; Porto/Kaggle POLYLINE format, or any CSV with lon/lat
     columns named lon, longitude, lng or x / lat, latitude or y, case-insensitive). Points are
     projected with the image's georeference: a GeoTIFF's CRS and transform
     (geo.lonlat_to_raster_pixel, any CRS), else a bounds sidecar `{stem}.bounds.json` (or
     `{base}.bounds.json`) holding lon/lat degrees as {"west": .., "south": .., "east": ..,
     "north": ..} or [west, south, east, north] (heatmap.lonlat_to_pixel, north-up). Points
     outside the image are dropped and counted.
  3. With blank_aux=True: all zeros (image-only prediction), stated in the log.
  Otherwise the image fails with an error naming it and the file names tried.

Georeference of the outputs: a GeoTIFF input's own; else a bounds sidecar's (EPSG:4326, north-up
transform spanning the bounds); else none (PNG outputs only). A GeoTIFF's georeference wins over
a sidecar.

Model inputs: image and aux are scaled by pipeline.scale_inputs (`scaling`, as in training)
window by window inside the forward wrapper, so a mosaic is held as uint8 plus predict_large's
float32 copy, not as a further full-size float32 copy. Peak host memory for an H x W mosaic
with C aux channels is about (3 + C) * 5 + 16 bytes per pixel (uint8 inputs, predict_large's
float32 copies and float64 blending sums): ~3.6 GB for 10,000 x 10,000 px with C = 1; split
larger mosaics.
"""
from __future__ import annotations

import dataclasses
import io
import json
import numbers
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Sequence

import cv2
import jax
import numpy as np
from PIL import Image

from cmmp_jax import evaluate, inference, reporting, sharding, steps
from cmmp_jax.data import sources
from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import heatmap as heatmap_lib
from cmmp_jax.data import pipeline
from cmmp_jax.data import reading

Forward = inference.Forward

# Image stems ending in one of these pair with aux files named after the stem without it.
IMAGE_STEM_SUFFIXES = ('_sat', '_rgb')
GENERIC_AUX_SUFFIX = '_aux'
# Stems that are never inputs besides the aux suffixes: labels and this module's outputs.
NON_INPUT_STEM_SUFFIXES = ('_mask', '_prob', '_road')
BOUNDS_SIDECAR_SUFFIX = '.bounds.json'
ON_ERROR_CHOICES = ('raise', 'skip')


class PredictInputError(ValueError):
  """An input image, auxiliary raster, GPS table or bounds sidecar is missing, unreadable or
  inconsistent with its image; the message names the file(s). A reading.ReadError of an input
  is raised as this error, from it."""


@dataclasses.dataclass(frozen=True)
class TileInputs:
  """One input ready for the model.

  image: uint8 (H, W, 3) RGB.
  aux: uint8 (H, W, C) auxiliary raster.
  geo: georeference of the outputs, or None.
  aux_source: how aux was obtained, for the log ('file <path>', 'GPS heat-map ...', 'blank').
  """
  image: np.ndarray
  aux: np.ndarray
  geo: geo_lib.GeoInfo | None
  aux_source: str


# ----------------------------------------------------------------------------------------------
# Finding files.


def _check_aux_suffix(aux_suffix: str) -> None:
  if not isinstance(aux_suffix, str) or any(sep in aux_suffix for sep in ('/', os.sep)):
    raise PredictInputError(f'aux_suffix must be a file-name suffix string; got {aux_suffix!r}')


def _aux_suffixes(aux_suffix: str) -> list[str]:
  return list(dict.fromkeys([aux_suffix, GENERIC_AUX_SUFFIX]))


def _stem_bases(stem: str) -> list[str]:
  """The image stem and, for '_sat'/'_rgb' stems, the stem without that suffix."""
  bases = [stem]
  for suffix in IMAGE_STEM_SUFFIXES:
    if stem.endswith(suffix) and len(stem) > len(suffix):
      bases.append(stem[:-len(suffix)])
  return bases


def _is_input_name(path: pathlib.Path, aux_suffix: str) -> bool:
  if path.suffix.lower() not in reading.IMAGE_EXTENSIONS or path.name.startswith('.'):
    return False
  excluded = [s for s in _aux_suffixes(aux_suffix) if s] + list(NON_INPUT_STEM_SUFFIXES)
  return not any(path.stem.endswith(suffix) for suffix in excluded)


def find_inputs(input_path, *, aux_suffix: str = '_gps') -> list[pathlib.Path]:
  """The images to predict: input_path itself when it is a file, else the folder's images.

  Returns:
    Sorted list of image paths (see the module docstring for what is not an input).

  Raises:
    PredictInputError: input_path does not exist, or the folder holds no image.
  """
  _check_aux_suffix(aux_suffix)
  input_path = pathlib.Path(input_path)
  if input_path.is_file():
    return [input_path]
  if not input_path.is_dir():
    raise PredictInputError(f'{input_path}: input folder or file not found')
  images = sorted(p for p in input_path.iterdir() if p.is_file() and _is_input_name(p, aux_suffix))
  if not images:
    extensions = ', '.join(reading.IMAGE_EXTENSIONS)
    raise PredictInputError(f'{input_path}: no input images ({extensions}; '
                            f'stems ending in {_aux_suffixes(aux_suffix)} or '
                            f'{list(NON_INPUT_STEM_SUFFIXES)} are not inputs)')
  return images


def _files_by_stem(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """Raster files of a folder keyed by stem (extension case-insensitive)."""
  index: dict[str, list[pathlib.Path]] = {}
  if folder.is_dir():
    for path in sorted(folder.iterdir()):
      if path.is_file() and path.suffix.lower() in reading.IMAGE_EXTENSIONS:
        index.setdefault(path.stem, []).append(path)
  return index


def aux_candidate_names(image_path, aux_suffix: str = '_gps') -> list[str]:
  """Stems (without extension) an image's auxiliary raster may have, in lookup order."""
  stem = pathlib.Path(image_path).stem
  return list(dict.fromkeys(base + suffix for base in _stem_bases(stem)
                            for suffix in _aux_suffixes(aux_suffix)))


def find_aux_file(image_path, *, aux_suffix: str = '_gps', aux_dir=None,
                  _index: dict[str, list[pathlib.Path]] | None = None) -> pathlib.Path | None:
  """The auxiliary raster file of an image, or None when there is none.

  Raises:
    PredictInputError: more than one file matches (ambiguous).
  """
  _check_aux_suffix(aux_suffix)
  image_path = pathlib.Path(image_path)
  folder = pathlib.Path(aux_dir) if aux_dir is not None else image_path.parent
  index = _index if _index is not None else _files_by_stem(folder)
  matches = [path for name in aux_candidate_names(image_path, aux_suffix)
             for path in index.get(name, ()) if path.resolve() != image_path.resolve()]
  if len(matches) > 1:
    raise PredictInputError(f'{image_path}: ambiguous auxiliary raster, several files match: '
                            f'{", ".join(str(p) for p in matches)}')
  return matches[0] if matches else None


def find_bounds_sidecar(image_path) -> pathlib.Path | None:
  """`{stem}.bounds.json` or `{base}.bounds.json` beside the image, or None."""
  image_path = pathlib.Path(image_path)
  matches = [image_path.parent / (base + BOUNDS_SIDECAR_SUFFIX)
             for base in _stem_bases(image_path.stem)]
  matches = [path for path in matches if path.is_file()]
  if len(matches) > 1:
    raise PredictInputError(f'{image_path}: ambiguous bounds sidecar, several files match: '
                            f'{", ".join(str(p) for p in matches)}')
  return matches[0] if matches else None


def read_bounds_sidecar(path) -> tuple[float, float, float, float]:
  """(west, south, east, north) in degrees from a bounds JSON (object or 4-list)."""
  path = pathlib.Path(path)
  try:
    values = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise PredictInputError(f'{path}: cannot read bounds JSON ({error})') from error
  if isinstance(values, dict):
    missing = [key for key in ('west', 'south', 'east', 'north') if key not in values]
    if missing:
      raise PredictInputError(f'{path}: bounds JSON misses key(s) {missing}')
    values = [values['west'], values['south'], values['east'], values['north']]
  if not isinstance(values, list) or len(values) != 4 or any(
      isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
    raise PredictInputError(f'{path}: bounds must be {{"west", "south", "east", "north"}} '
                            f'numbers or a list of 4 numbers; got {values!r}')
  try:
    west, south, east, north = heatmap_lib.check_bounds(values, name=str(path))
  except ValueError as error:
    raise PredictInputError(str(error)) from error
  if not (-180 <= west and east <= 180 and -90 <= south and north <= 90):
    raise PredictInputError(f'{path}: bounds {values} are not lon/lat degrees')
  return west, south, east, north


# ----------------------------------------------------------------------------------------------
# GPS heat-maps.


def render_gps_aux(lon: np.ndarray, lat: np.ndarray, height: int, width: int, *,
                   geo: geo_lib.GeoInfo | None = None,
                   bounds: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, heatmap_lib.RenderStats]:
  """Renders GPS points into an image's uint8 heat-map.

  Args:
    lon, lat: float64 (N,) WGS84 degrees.
    height, width: image size.
    geo: the image's georeference (any CRS; projection by geo.lonlat_to_raster_pixel), or
    bounds: lon/lat (west, south, east, north) of a north-up image (heatmap.lonlat_to_pixel).
      Exactly one of geo and bounds.

  Returns:
    (aux, stats): aux uint8 (H, W, 1) = heatmap_to_uint8(render_heatmap(...)); stats counts the
    points rendered, outside the image and non-finite.
  """
  if (geo is None) == (bounds is None):
    raise ValueError('render_gps_aux needs exactly one of geo and bounds')
  if geo is not None:
    cols, rows = geo_lib.lonlat_to_raster_pixel(lon, lat, geo)
  else:
    cols, rows = heatmap_lib.lonlat_to_pixel(lon, lat, bounds, height, width)
  heatmap, stats = heatmap_lib.render_heatmap(cols, rows, height, width, return_stats=True)
  return heatmap_lib.heatmap_to_uint8(heatmap)[..., None], stats


# ----------------------------------------------------------------------------------------------
# Prediction on arrays.


def _scaled_forward(forward: Forward, scaling: str) -> Forward:
  """Wraps forward so that it receives pipeline.scale_inputs(uint8 window, scaling).

  predict_large hands over float32 windows holding the uint8 values unchanged (and zero padding
  windows), so the cast back to uint8 is exact and the scaling is bit-identical to training's.
  """
  def scaled(image_batch, aux_batch):
    image_batch = np.asarray(image_batch).astype(np.uint8)
    aux_batch = np.asarray(aux_batch).astype(np.uint8)
    return forward(pipeline.scale_inputs(image_batch, scaling),
                   pipeline.scale_inputs(aux_batch, scaling))
  return scaled


def predict_arrays(forward: Forward, image_uint8: np.ndarray, aux_uint8: np.ndarray, *,
                   window: int, overlap: int, batch_size: int, scaling: str = 'reference',
                   tta: bool = False, pad_mode: str = 'reflect') -> np.ndarray:
  """Road probabilities of one image of any size.

  Args:
    forward: (image (B, w, w, 3) float32, aux (B, w, w, C) float32) -> (B, w, w, 1)
      probabilities; it receives SCALED inputs (pipeline.scale_inputs with `scaling`), B ==
      batch_size, w == window on every call (jit it once outside; with tta it is called 8 times
      per batch on rotated/flipped windows).
    image_uint8: uint8 (H, W, 3) RGB.
    aux_uint8: uint8 (H, W, C) auxiliary raster aligned with the image.
    window, overlap, batch_size, pad_mode: as inference.predict_large.
    scaling: 'reference' (x / 255 * 3.2 - 1.6) or 'unit' (x / 255), as the model was trained.
    tta: average over the 8 dihedral symmetries (inference.tta_dihedral).

  Returns:
    float32 (H, W) probabilities in [0, 1].

  Raises:
    PredictInputError: arrays of the wrong dtype or shape, or of different sizes.
    inference.InferenceInputError: bad window settings, or a forward output of the wrong shape,
      non-finite, or outside [0, 1] (a model returning logits).
  """
  image_uint8 = np.asarray(image_uint8)
  aux_uint8 = np.asarray(aux_uint8)
  if image_uint8.dtype != np.uint8 or image_uint8.ndim != 3 or image_uint8.shape[2] != 3:
    raise PredictInputError(f'image must be uint8 (H, W, 3); got {image_uint8.dtype} '
                            f'{image_uint8.shape}')
  if aux_uint8.dtype != np.uint8 or aux_uint8.ndim != 3 or aux_uint8.shape[2] < 1:
    raise PredictInputError(f'aux must be uint8 (H, W, C); got {aux_uint8.dtype} '
                            f'{aux_uint8.shape}')
  if image_uint8.shape[:2] != aux_uint8.shape[:2]:
    raise PredictInputError(f'image size {image_uint8.shape[:2]} and aux size '
                            f'{aux_uint8.shape[:2]} differ')
  if scaling not in pipeline.SCALINGS:
    raise PredictInputError(f'scaling must be one of {pipeline.SCALINGS}; got {scaling!r}')
  model = inference.tta_dihedral(forward) if tta else forward
  probabilities = inference.predict_large(
      _scaled_forward(model, scaling), image_uint8, aux_uint8, window=window, overlap=overlap,
      batch_size=batch_size, pad_mode=pad_mode)
  # Blending averages window outputs, so values outside [0, 1] come from the forward itself.
  tolerance = 1e-6
  low, high = float(probabilities.min()), float(probabilities.max())
  if low < -tolerance or high > 1 + tolerance:
    raise inference.InferenceInputError(
        f'forward returned values in [{low}, {high}], outside [0, 1]: it must return '
        'probabilities (apply a sigmoid to logits)')
  return np.clip(probabilities, 0.0, 1.0)


def probabilities_to_uint8(probabilities: np.ndarray) -> np.ndarray:
  """float (H, W) probabilities in [0, 1] -> uint8 round(p * 255) (round half to even)."""
  probabilities = np.asarray(probabilities, np.float64)
  return np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)


def road_mask_uint8(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """float (H, W) probabilities -> uint8 (H, W): 255 where p > threshold, else 0."""
  return np.where(np.asarray(probabilities) > threshold, 255, 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Writing.


def write_png_atomic(path, array: np.ndarray) -> None:
  """Writes a uint8 (H, W) or (H, W, 1|3) array as a PNG: temporary file, then os.replace."""
  path = pathlib.Path(path)
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'{path}: PNG outputs are uint8, got {array.dtype}')
  if array.ndim == 3 and array.shape[2] == 1:
    array = array[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buffer, format='PNG')
  handle, temp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(handle, 'wb') as temp_file:
      temp_file.write(buffer.getvalue())
    os.replace(temp_name, path)
  except BaseException:
    try:
      os.remove(temp_name)
    except FileNotFoundError:
      pass
    raise


def output_paths(output_dir, stem: str, georeferenced: bool) -> dict[str, pathlib.Path]:
  """Output files of one input: keys 'prob_png', 'road_png' (+ 'prob_tif', 'road_tif')."""
  output_dir = pathlib.Path(output_dir)
  paths = {'prob_png': output_dir / f'{stem}_prob.png', 'road_png': output_dir / f'{stem}_road.png'}
  if georeferenced:
    paths['prob_tif'] = output_dir / f'{stem}_prob.tif'
    paths['road_tif'] = output_dir / f'{stem}_road.tif'
  return paths


def write_prediction(output_dir, stem: str, probabilities: np.ndarray, *,
                     threshold: float = 0.5,
                     geo: geo_lib.GeoInfo | None = None) -> list[pathlib.Path]:
  """Writes one input's outputs (see the module docstring), each atomically.

  Returns:
    The paths written, in order prob PNG, road PNG, then (with geo) prob GeoTIFF, road GeoTIFF.
  """
  paths = output_paths(output_dir, stem, geo is not None)
  road = road_mask_uint8(probabilities, threshold)
  write_png_atomic(paths['prob_png'], probabilities_to_uint8(probabilities))
  write_png_atomic(paths['road_png'], road)
  if geo is not None:
    geo_lib.write_geotiff(paths['prob_tif'], probabilities.astype(np.float32), geo)
    geo_lib.write_geotiff(paths['road_tif'], road, geo)
  return list(paths.values())


# ----------------------------------------------------------------------------------------------
# Loading one input.


def _check_aligned(image: reading.Raster, aux: reading.Raster) -> None:
  if image.pixels.shape[:2] != aux.pixels.shape[:2]:
    raise PredictInputError(
        f'{aux.path}: auxiliary raster is {aux.pixels.shape[0]} x {aux.pixels.shape[1]} pixels '
        f'but image {image.path} is {image.pixels.shape[0]} x {image.pixels.shape[1]}')
  if image.geo is not None and aux.geo is not None:
    pixel = max(abs(image.geo.transform.a), abs(image.geo.transform.e), 1e-300)
    same_transform = np.allclose(tuple(image.geo.transform)[:6], tuple(aux.geo.transform)[:6],
                                 rtol=0.0, atol=1e-3 * pixel)
    if image.geo.crs != aux.geo.crs or not same_transform:
      raise PredictInputError(
          f'{aux.path}: georeference ({aux.geo.crs}, {tuple(aux.geo.transform)[:6]}) differs '
          f'from image {image.path} ({image.geo.crs}, {tuple(image.geo.transform)[:6]})')


def load_tile(image_path, *, aux_channels: int = 1, aux_suffix: str = '_gps', aux_dir=None,
              gps_lonlat: tuple[np.ndarray, np.ndarray] | None = None, blank_aux: bool = False,
              bit_depth: int | None = None,
              _aux_index: dict[str, list[pathlib.Path]] | None = None) -> TileInputs:
  """Reads an image and finds or renders its auxiliary raster (rules in the module docstring).

  Args:
    image_path: the image file.
    aux_channels: channels C the model's aux input has.
    aux_suffix, aux_dir: where the aux raster file is looked for.
    gps_lonlat: (lon, lat) degrees of GPS points (reading.read_gps_csv) to render when there is
      no aux file; needs aux_channels == 1.
    blank_aux: use zeros when there is neither an aux file nor GPS.
    bit_depth: image bit depth for non-uint8 images (None: from the data).

  Raises:
    PredictInputError: unreadable files, no auxiliary source, size or georeference mismatch.
  """
  image_path = pathlib.Path(image_path)
  try:
    image_raster = reading.read_raster(image_path)
    image = reading.to_rgb_uint8(image_raster, bit_depth=bit_depth)
  except reading.ReadError as error:
    raise PredictInputError(str(error)) from error
  height, width = image.shape[:2]

  geo = image_raster.geo
  sidecar = find_bounds_sidecar(image_path) if geo is None else None
  sidecar_bounds = None
  if sidecar is not None:
    sidecar_bounds = read_bounds_sidecar(sidecar)
    geo = geo_lib.GeoInfo.from_bounds(sidecar_bounds, height, width)

  aux_path = find_aux_file(image_path, aux_suffix=aux_suffix, aux_dir=aux_dir, _index=_aux_index)
  if aux_path is not None:
    try:
      aux_raster = reading.read_raster(aux_path)
    except reading.ReadError as error:
      raise PredictInputError(str(error)) from error
    _check_aligned(image_raster, aux_raster)
    try:
      aux = reading.to_channels_uint8(aux_raster, aux_channels)
    except reading.ReadError as error:
      raise PredictInputError(f'{error}; the model expects aux_channels={aux_channels}') from error
    return TileInputs(image=image, aux=aux, geo=geo, aux_source=f'file {aux_path}')

  if gps_lonlat is not None:
    if aux_channels != 1:
      raise PredictInputError(f'{image_path}: GPS heat-maps have 1 channel but the model expects '
                              f'aux_channels={aux_channels}')
    if image_raster.geo is not None:
      aux, stats = render_gps_aux(*gps_lonlat, height, width, geo=image_raster.geo)
      where = 'GeoTIFF georeference'
    elif sidecar_bounds is not None:
      aux, stats = render_gps_aux(*gps_lonlat, height, width, bounds=sidecar_bounds)
      where = f'bounds {sidecar}'
    else:
      raise PredictInputError(
          f'{image_path}: cannot place GPS points: the image has no georeference (not a GeoTIFF '
          f'with a CRS) and no bounds sidecar {image_path.stem}{BOUNDS_SIDECAR_SUFFIX}')
    return TileInputs(image=image, aux=aux, geo=geo, aux_source=(
        f'GPS heat-map via {where}: {stats.n_rendered} of {stats.n_total} points inside'))

  if blank_aux:
    aux = np.zeros((height, width, aux_channels), np.uint8)
    return TileInputs(image=image, aux=aux, geo=geo, aux_source='blank (all-zero aux)')

  folder = pathlib.Path(aux_dir) if aux_dir is not None else image_path.parent
  tried = ', '.join(f'{name}{{{",".join(reading.IMAGE_EXTENSIONS)}}}'
                    for name in aux_candidate_names(image_path, aux_suffix))
  raise PredictInputError(
      f'{image_path}: no auxiliary raster found in {folder} (tried {tried}); give gps_csv to '
      'render a heat-map, or blank_aux=True for an all-zero aux')


# ----------------------------------------------------------------------------------------------
# Folders.


def _check_options(threshold, limit, on_error, aux_channels, aux_suffix, aux_dir) -> None:
  if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (
      0.0 <= threshold <= 1.0):
    raise PredictInputError(f'threshold must be a number in [0, 1]; got {threshold!r}')
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral)
                            or limit < 1):
    raise PredictInputError(f'limit must be a positive integer or None; got {limit!r}')
  if on_error not in ON_ERROR_CHOICES:
    raise PredictInputError(f'on_error must be one of {ON_ERROR_CHOICES}; got {on_error!r}')
  if isinstance(aux_channels, bool) or not isinstance(aux_channels, int) or aux_channels < 1:
    raise PredictInputError(f'aux_channels must be a positive integer; got {aux_channels!r}')
  _check_aux_suffix(aux_suffix)
  if aux_suffix == '' and aux_dir is None:
    raise PredictInputError("aux_suffix '' pairs {stem}.ext with {stem}.ext: it needs a "
                            'separate aux_dir')
  if aux_dir is not None and not pathlib.Path(aux_dir).is_dir():
    raise PredictInputError(f'{aux_dir}: aux_dir is not a folder')


def _check_unique_stems(images: Sequence[pathlib.Path]) -> None:
  seen: dict[str, pathlib.Path] = {}
  for path in images:
    if path.stem in seen:
      raise PredictInputError(f'{seen[path.stem]} and {path} would write the same outputs '
                              f'({path.stem}_prob.png, ...); rename one')
    seen[path.stem] = path


def predict_directory(forward: Forward, input_dir, output_dir, *, window: int, overlap: int,
                      batch_size: int, scaling: str = 'reference', aux_channels: int = 1,
                      aux_suffix: str = '_gps', aux_dir=None, gps_csv=None,
                      blank_aux: bool = False, threshold: float = 0.5, tta: bool = False,
                      limit: int | None = None, bit_depth: int | None = None,
                      pad_mode: str = 'reflect', on_error: str = 'raise',
                      shard_index: int = 0, shard_count: int = 1,
                      log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Predicts every image of a folder (or one image file) and writes the road maps.

  Args:
    forward: as predict_arrays (receives scaled float32 windows).
    input_dir: folder of images, or one image file (e.g. a mosaic GeoTIFF).
    output_dir: folder for the outputs; created when missing, may already hold files.
    window, overlap, batch_size, pad_mode: sliding-window settings (inference.predict_large).
    scaling: input scaling the model was trained with ('reference' or 'unit').
    aux_channels: the model's auxiliary channels C.
    aux_suffix, aux_dir: auxiliary raster naming and folder (module docstring).
    gps_csv: CSV path or paths of GPS records, rendered for images without an aux file.
    blank_aux: all-zero aux for images with neither an aux file nor GPS.
    threshold: road where probability > threshold.
    tta: 8-fold dihedral test-time augmentation.
    limit: predict only the first `limit` images (sorted by name).
    bit_depth: bit depth of non-uint8 images (None: from each image's largest value).
    on_error: 'raise' stops at the first input that cannot be read (outputs already written
      stay); 'skip' logs it, records it under 'failed' and goes on. Errors of the forward or
      of writing always stop.
    shard_index, shard_count: predict only inputs shard_index, shard_index + shard_count, ...
      of the sorted list (one share per process when several hosts predict one folder).
    log: called with one progress line per input (size, aux source, road share, seconds).

  Returns:
    {'written': [paths of all files written], 'tiles': [per input: {'image', 'aux_source',
     'height', 'width', 'road_fraction', 'seconds', 'outputs'}], 'failed': [{'image',
     'error'}]}.

  Raises:
    PredictInputError: bad options, no inputs, or (on_error='raise') an unusable input; the
      message names the file(s).
    inference.InferenceInputError: bad window settings or forward outputs.
  """
  _check_options(threshold, limit, on_error, aux_channels, aux_suffix, aux_dir)
  images = find_inputs(input_dir, aux_suffix=aux_suffix)
  if limit is not None:
    images = images[:int(limit)]
  _check_unique_stems(images)
  if not 0 <= shard_index < shard_count:
    raise PredictInputError(f'shard_index {shard_index} is not in [0, {shard_count})')
  images = images[shard_index::shard_count]
  output_dir = pathlib.Path(output_dir)
  if output_dir.exists() and not output_dir.is_dir():
    raise PredictInputError(f'{output_dir}: output path exists and is not a folder')
  output_dir.mkdir(parents=True, exist_ok=True)

  gps_lonlat = None
  if gps_csv is not None:
    if aux_channels != 1:
      raise PredictInputError(f'gps_csv renders 1-channel heat-maps but aux_channels='
                              f'{aux_channels}')
    try:
      gps_lonlat = reading.read_gps_csv(gps_csv)
    except reading.ReadError as error:
      raise PredictInputError(str(error)) from error
    log(f'GPS: {gps_lonlat[0].size} points from {gps_csv}')

  aux_indexes: dict[pathlib.Path, dict[str, list[pathlib.Path]]] = {}
  summary: dict[str, Any] = {'written': [], 'tiles': [], 'failed': []}
  for number, image_path in enumerate(images, start=1):
    start = time.perf_counter()
    aux_folder = pathlib.Path(aux_dir) if aux_dir is not None else image_path.parent
    if aux_folder not in aux_indexes:
      aux_indexes[aux_folder] = _files_by_stem(aux_folder)
    try:
      tile = load_tile(image_path, aux_channels=aux_channels, aux_suffix=aux_suffix,
                       aux_dir=aux_folder, gps_lonlat=gps_lonlat, blank_aux=blank_aux,
                       bit_depth=bit_depth, _aux_index=aux_indexes[aux_folder])
    except PredictInputError as error:
      if on_error == 'raise':
        raise
      log(f'[{number}/{len(images)}] {image_path.name}: SKIPPED: {error}')
      summary['failed'].append({'image': str(image_path), 'error': str(error)})
      continue
    probabilities = predict_arrays(
        forward, tile.image, tile.aux, window=window, overlap=overlap, batch_size=batch_size,
        scaling=scaling, tta=tta, pad_mode=pad_mode)
    written = write_prediction(output_dir, image_path.stem, probabilities, threshold=threshold,
                               geo=tile.geo)
    seconds = time.perf_counter() - start
    height, width = probabilities.shape
    road_fraction = float(np.mean(probabilities > threshold))
    summary['written'].extend(written)
    summary['tiles'].append({
        'image': str(image_path), 'aux_source': tile.aux_source, 'height': height,
        'width': width, 'road_fraction': road_fraction, 'seconds': seconds,
        'outputs': written})
    log(f'[{number}/{len(images)}] {image_path.name}: {height} x {width} px, aux '
        f'{tile.aux_source}, road {road_fraction:.1%}, {seconds:.2f} s'
        f'{", GeoTIFF" if tile.geo is not None else ""}')
  return summary


def predict_from_checkpoint(config, workdir) -> dict:
  """`--mode=predict`: restores config.eval.checkpoint from workdir and predicts
  config.predict.input_dir into config.predict.output_dir (default WORKDIR/predictions). With no
  input_dir, predicts the first config.predict.num_examples tiles of the test split (the demo).
  """
  # Prediction is embarrassingly parallel: each process predicts its own share of the inputs on
  # its own devices (windows sharded over them, weights replicated), with no cross-process
  # computation, so processes never wait for each other.
  mesh = sharding.make_mesh(jax.local_devices())
  model, state, step, _ = evaluate.restore_for_inference(config, workdir, mesh=mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  apply = steps.make_predict_fn(model, mesh)
  forward = lambda image, aux: apply(variables, image, aux)
  pcfg = config.predict
  window = pcfg.window or config.data.input_size or 512
  output_dir = pathlib.Path(pcfg.output_dir or pathlib.Path(workdir) / 'predictions')
  output_dir.mkdir(parents=True, exist_ok=True)
  local = mesh.size
  batch_size = max(local, config.eval_batch_size // jax.process_count() // local * local)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  if pcfg.input_dir:
    summary = predict_directory(
        forward, pcfg.input_dir, output_dir, window=window, overlap=pcfg.overlap,
        batch_size=batch_size, scaling=config.data.scaling,
        aux_channels=config.model.aux_channels, gps_csv=pcfg.gps_csv or None,
        blank_aux=pcfg.blank_aux, threshold=pcfg.threshold, tta=config.eval.tta,
        log=reporting.console, **shard)
  else:
    source = sources.dataset_source(config, config.data.test_split)
    written = []
    for i in range(shard['shard_index'], min(pcfg.num_examples, len(source)),
                   shard['shard_count']):
      example = source[i]
      tile_id = example['tile_id']
      tile_id = tile_id.decode() if isinstance(tile_id, bytes) else str(tile_id)
      image, aux = np.asarray(example['image']), np.asarray(example['aux'])
      if config.data.input_size and config.data.input_size != image.shape[0]:
        # The model was trained on resized tiles: predict at that scale, write at full size.
        size = (config.data.input_size, config.data.input_size)
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        aux = cv2.resize(aux, size, interpolation=cv2.INTER_LINEAR).reshape(*size, -1)
      probs = predict_arrays(forward, image, aux, window=window, overlap=pcfg.overlap,
                             batch_size=batch_size, scaling=config.data.scaling,
                             tta=config.eval.tta)
      label = np.asarray(example['mask'])
      if probs.shape != label.shape[:2]:
        probs = cv2.resize(probs, label.shape[1::-1], interpolation=cv2.INTER_LINEAR)
      written += write_prediction(output_dir, tile_id, probs, threshold=pcfg.threshold)
      label_path = output_dir / f'{tile_id}_label.png'
      write_png_atomic(label_path, (label[..., 0] * 255).astype(np.uint8))
      written.append(label_path)
    summary = {'written': [str(p) for p in written]}
  who = f' by process {jax.process_index()}' if jax.process_count() > 1 else ''
  message = (f"predictions of step {step} written to {output_dir} "
             f"({len(summary['written'])} files{who})")
  reporting.console(message, every_process=True)
  return summary
