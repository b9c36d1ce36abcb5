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
file nor touches the outputs of other inputs; files get the usual permissions (0666 less the
umask), not the temporary file's 0600.

Input preparation (cmmp_jax.data.preparation): images and GPS become uint8 model inputs by the
same functions and settings the dataset builders used. `--mode=predict` applies the record of
config.data's dataset (its metadata.json) unless config.predict.preparation names another JSON
file; the record fixes the bands, the bit depth or percentile stretch, how GPS CSVs are read and
in which CRS, and the tile grid on which heat-maps are normalised (each tile_size tile by its own
maximum, from the image's top-left pixel), so a raster the dataset was built from gives inputs
bit-identical to the dataset's tiles.

Scale: a model trained on tile_size tiles resized to data.input_size sees every input resized by
s = input_size / tile_size to the model grid (round(H s), round(W s)), and its probabilities
are resized back to the input's grid, both by cmmp_jax.model_grid (bilinear with OpenCV's
arithmetic: a dataset tile gets exactly the training pipeline's cv2 resize; unlike a whole-image
cv2.resize, any window of the result is computed alone, which streaming relies on).

Inputs (one folder, not recursive; extensions case-insensitive):
  Images: .png .jpg .jpeg .tif .tiff, prepared as the dataset's images were
    (preparation.prepare_image: bands, then the 'bit_depth' rule or the recorded percentile
    stretch; a TIFF with a CRS is georeferenced). Files whose stem ends with the aux suffixes ('{aux_suffix}',
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
  2. With gps_csv: a trajectory heat-map rendered on the fly from every GPS point of the CSV
     file(s), as the builders render it (preparation.read_gps with the record's gps_format,
     columns and gps_crs; preparation.render_gps_aux on the record's tile grid). Points are
     projected with the image's georeference: a GeoTIFF's CRS and transform (any CRS), else a
     bounds sidecar `{stem}.bounds.json` (or `{base}.bounds.json`) holding lon/lat degrees as
     {"west": .., "south": .., "east": .., "north": ..} or [west, south, east, north]
     (heatmap.lonlat_to_pixel, north-up, the formula of builders that render tiles from their
     bounds). Points outside the image are dropped and counted.
  3. With blank_aux=True: all zeros (image-only prediction), stated in the log.
  Otherwise the image fails with an error naming it and the file names tried.

Georeference of the outputs: a GeoTIFF input's own; else a bounds sidecar's (EPSG:4326, north-up
transform spanning the bounds); else none (PNG outputs only). A GeoTIFF's georeference wins over
a sidecar.

Model inputs: image and aux are scaled by pipeline.scale_inputs (`scaling`, as in training)
window by window inside the forward wrapper, so a mosaic is held as uint8 plus predict_large's
float32 copy, not as a further full-size float32 copy. Peak host memory for an H x W mosaic
with C aux channels is about (3 + C) * 5 + 16 bytes per pixel (uint8 inputs, predict_large's
float32 copies and float64 blending sums): ~3.6 GB for 10,000 x 10,000 px with C = 1.

Streaming (cmmp_jax.stream; stream_mode, config.predict.stream): a georeferenced TIFF larger
than block_size on a side ('auto'), or every input ('on'), is read by rasterio windows and
predicted block by block on the tile grid of the heat-map normalisation, with the same windows
and blending as in memory (bit-identical outputs), and written as tiled, compressed GeoTIFFs
(BigTIFF when needed, COG with cog=True; no PNGs), so host memory depends on block, window and
batch size only. A killed run resumes from its finished blocks ({stem}.stream/ beside the
outputs). Several processes share one streamed raster in bands of block rows; process 0 writes
the GeoTIFFs once all bands are done. The road graph of a streamed raster is built from the
probability GeoTIFF read back block by block (cmmp_jax.stream_graph). A model trained at a scale
s != 1 streams too: blocks and windows run on the model grid, each model-grid window resized
from the raster window under it (plus its bilinear margin), and the GeoTIFFs are resized back
block by block, by the very rule the in-memory path uses (cmmp_jax.model_grid), so the outputs
are the same bits.
"""
from __future__ import annotations

import dataclasses
import io
import json
import numbers
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import rasterio
import rasterio.errors
import rasterio.warp
from PIL import Image

from cmmp_jax import evaluate, inference, model_grid, reporting, sharding, steps, stream
from cmmp_jax import stream_graph
from cmmp_jax import graphs as graphs_lib
from cmmp_jax.data import sources
from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import heatmap as heatmap_lib
from cmmp_jax.data import pipeline
from cmmp_jax.data import preparation as preparation_lib
from cmmp_jax.data import reading
from data_builders import build as build_lib

Forward = inference.Forward

# Image stems ending in one of these pair with aux files named after the stem without it.
IMAGE_STEM_SUFFIXES = ('_sat', '_rgb')
GENERIC_AUX_SUFFIX = '_aux'
# Stems that are never inputs besides the aux suffixes: labels and this module's outputs.
NON_INPUT_STEM_SUFFIXES = ('_mask', '_prob', '_road')
BOUNDS_SIDECAR_SUFFIX = '.bounds.json'
ON_ERROR_CHOICES = ('raise', 'skip')
STREAM_CHOICES = ('auto', 'on', 'off')


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


def render_gps_aux(x: np.ndarray, y: np.ndarray, height: int, width: int,
                   geo: geo_lib.GeoInfo, preparation: preparation_lib.InputPreparation, *,
                   bounds: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, heatmap_lib.RenderStats]:
  """Renders GPS points into an image's uint8 heat-map, as the builders do.

  Args:
    x, y: float64 (N,) coordinates in preparation.gps_crs.
    height, width: image size.
    geo: the image's georeference (any CRS; a bounds sidecar's is EPSG:4326).
    preparation: gps_crs and the tile grid of the normalisation.
    bounds: a bounds sidecar's lon/lat (west, south, east, north): points are then placed by
      heatmap.lonlat_to_pixel, the formula of the builders that render tiles from their bounds
      (bjroad), so that a tile comes out as theirs bit for bit.

  Returns:
    (aux, stats): aux uint8 (H, W, 1), the image's part of preparation.render_gps_aux; stats
    counts the points on the image (n_rendered), off it and non-finite. (Points past the image's
    edge but on its last tiles still count for those tiles' maxima, as in the builders.)
  """
  if bounds is not None:
    lon, lat = x, y
    if preparation_lib.gps_crs(preparation) != geo_lib.LONLAT_CRS:
      lon, lat = (np.asarray(v) for v in rasterio.warp.transform(
          preparation_lib.gps_crs(preparation), geo_lib.LONLAT_CRS, x, y))
    cols, rows = heatmap_lib.lonlat_to_pixel(lon, lat, bounds, height, width)
  else:
    cols, rows = preparation_lib.gps_to_raster_pixels(x, y, preparation.gps_crs, geo)
  aux, _ = preparation_lib.render_gps_aux(cols, rows, height, width, preparation)
  finite = np.isfinite(cols) & np.isfinite(rows)
  on_image = int(np.count_nonzero(finite & (cols >= 0) & (cols < width) & (rows >= 0)
                                  & (rows < height)))
  n_nonfinite = int(np.count_nonzero(~finite))
  stats = heatmap_lib.RenderStats(n_total=int(cols.size), n_rendered=on_image,
                                  n_outside=int(cols.size) - on_image - n_nonfinite,
                                  n_nonfinite=n_nonfinite)
  return np.ascontiguousarray(aux[:height, :width]), stats


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


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
  """(round(H * scale), round(W * scale)) (half to even), at least 1: the grid the model sees
  (model_grid.model_size with the scale as a ratio of integers)."""
  ratio = model_grid.as_ratio(scale)
  return model_grid.model_size(height, ratio), model_grid.model_size(width, ratio)


def predict_arrays(forward: Forward, image_uint8: np.ndarray, aux_uint8: np.ndarray, *,
                   window: int, overlap: int, batch_size: int, scaling: str = 'reference',
                   tta: bool = False, pad_mode: str = 'reflect',
                   scale: float = 1.0) -> np.ndarray:
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
    scale: the training scale, data.input_size / tile size: image and aux are resized to the
      model grid (round(H s), round(W s)) by model_grid.to_model_grid (bilinear with OpenCV's
      uint8 arithmetic: on one dataset tile, the training pipeline's resize bit for bit), window
      and overlap apply on that grid, and the probabilities come back to (H, W) by
      model_grid.to_raster_grid. The rule is the streamed path's (cmmp_jax.model_grid).

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
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < 1e3:
    raise PredictInputError(f'scale must be a positive number; got {scale!r}')
  height, width = image_uint8.shape[:2]
  ratio = model_grid.as_ratio(scale)
  if ratio != 1:  # the resize rule streaming shares (cmmp_jax.model_grid)
    image_uint8 = model_grid.to_model_grid(image_uint8, ratio)
    aux_uint8 = model_grid.to_model_grid(aux_uint8, ratio)
  model = inference.tta_dihedral(forward) if tta else forward
  probabilities = inference.predict_large(
      _scaled_forward(model, scaling), image_uint8, aux_uint8, window=window, overlap=overlap,
      batch_size=batch_size, pad_mode=pad_mode)
  if ratio != 1:
    probabilities = model_grid.to_raster_grid(probabilities, height, width, ratio)
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
  geo_lib.write_bytes_atomic(path, buffer.getvalue())


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
              gps_points: tuple[np.ndarray, np.ndarray] | None = None, blank_aux: bool = False,
              preparation: preparation_lib.InputPreparation | None = None,
              _aux_index: dict[str, list[pathlib.Path]] | None = None) -> TileInputs:
  """Reads an image and finds or renders its auxiliary raster (rules in the module docstring).

  Args:
    image_path: the image file.
    aux_channels: channels C the model's aux input has.
    aux_suffix, aux_dir: where the aux raster file is looked for.
    gps_points: (x, y) of GPS points in preparation.gps_crs (preparation.read_gps) to render
      when there is no aux file; needs aux_channels == 1.
    blank_aux: use zeros when there is neither an aux file nor GPS.
    preparation: how the image and GPS become inputs (the dataset's record); None = the
      defaults (reading's band rule, the file's bit depth, lon/lat GPS, the whole image one
      heat-map tile).

  Raises:
    PredictInputError: unreadable files, no auxiliary source, size or georeference mismatch.
  """
  image_path = pathlib.Path(image_path)
  preparation = preparation or preparation_lib.InputPreparation()
  try:
    image_raster = reading.read_raster(image_path)
    image, _ = preparation_lib.prepare_image(image_raster, preparation)
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

  if gps_points is not None:
    if aux_channels != 1:
      raise PredictInputError(f'{image_path}: GPS heat-maps have 1 channel but the model expects '
                              f'aux_channels={aux_channels}')
    if geo is not None:
      aux, stats = render_gps_aux(*gps_points, height, width, geo, preparation,
                                  bounds=sidecar_bounds if image_raster.geo is None else None)
      where = 'GeoTIFF georeference' if image_raster.geo is not None else f'bounds {sidecar}'
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
# Streaming one large raster (cmmp_jax.stream).


def stream_plan(image_path, *, mode: str, block_size: int, window: int, scale: float,
                preparation: preparation_lib.InputPreparation, uses_gps: bool
                ) -> tuple[bool, str]:
  """Whether an input is predicted by streaming, and why (for the log).

  'off' never streams; 'auto' streams a georeferenced TIFF larger than block_size on a side when
  streaming supports it; 'on' streams every input and raises when one cannot be.
  Streaming needs: a TIFF with a CRS, at least one window on each side of the grid the model
  sees (the raster's at scale 1, else the model grid, model_grid.model_size), a per-pixel image
  rule ('bit_depth' or a recorded percentile stretch) and, for GPS, the heat-map tile grid
  (preparation.tile_size). Any training scale streams (cmmp_jax.model_grid).

  Raises:
    PredictInputError: mode 'on' and the input cannot be streamed (the reason named).
  """
  image_path = pathlib.Path(image_path)
  if mode == 'off':
    return False, 'streaming off'
  reason = None
  if image_path.suffix.lower() not in reading.TIFF_EXTENSIONS:
    reason = 'not a TIFF'
  else:
    try:
      with rasterio.open(image_path) as dataset:
        height, width, crs = dataset.height, dataset.width, dataset.crs
    except rasterio.errors.RasterioError as error:
      raise PredictInputError(f'{image_path}: cannot open raster ({error})') from error
    ratio = model_grid.as_ratio(scale)
    model_height, model_width = (model_grid.model_size(n, ratio) for n in (height, width))
    if crs is None:
      reason = 'no CRS (GeoTIFF outputs need one)'
    elif min(model_height, model_width) < window:
      reason = (f'a side is shorter than the window {window}' if ratio == 1 else
                f'a side of the model grid ({model_height} x {model_width} px at scale '
                f'{scale:g}) is shorter than the window {window}')
    elif mode == 'auto' and max(height, width) <= block_size:
      return False, f'fits one block ({block_size} px)'
    elif preparation.scaling == 'percentile' and preparation.stretch_low is None:
      reason = 'percentile scaling without a recorded stretch'
    elif uses_gps and preparation.tile_size is None:
      reason = 'GPS heat-map without a tile grid (preparation tile_size)'
  if reason is None:
    return True, 'streamed'
  if mode == 'on':
    raise PredictInputError(f'{image_path}: cannot stream this input: {reason}')
  return False, f'in memory ({reason})'


def stream_inputs(image_path, *, aux_channels: int = 1, aux_suffix: str = '_gps', aux_dir=None,
                  gps_points: tuple[np.ndarray, np.ndarray] | None = None,
                  blank_aux: bool = False,
                  preparation: preparation_lib.InputPreparation | None = None,
                  _aux_index: dict[str, list[pathlib.Path]] | None = None
                  ) -> tuple[stream.RasterInputs, str]:
  """stream.RasterInputs of a georeferenced raster, with its aux found as load_tile finds it
  (an aux file first, then GPS projected with the GeoTIFF's georeference, then blank).

  Returns:
    (inputs, aux source for the log).

  Raises:
    PredictInputError: no aux source, an aux file of another size or georeference, or a raster
      streaming cannot read (stream.StreamError's message).
  """
  image_path = pathlib.Path(image_path)
  preparation = preparation or preparation_lib.InputPreparation()
  aux_path = find_aux_file(image_path, aux_suffix=aux_suffix, aux_dir=aux_dir, _index=_aux_index)
  try:
    if aux_path is not None:
      inputs = stream.RasterInputs(image_path, preparation=preparation,
                                   aux_channels=aux_channels, aux_path=aux_path)
      with rasterio.open(aux_path) as aux:
        if aux.crs is not None and (aux.crs != inputs.geo.crs or not np.allclose(
            tuple(aux.transform)[:6], tuple(inputs.geo.transform)[:6], rtol=0.0,
            atol=1e-3 * max(abs(inputs.geo.transform.a), abs(inputs.geo.transform.e)))):
          raise PredictInputError(f'{aux_path}: georeference differs from image {image_path}')
      return inputs, f'file {aux_path}'
    if gps_points is not None:
      inputs = stream.RasterInputs(image_path, preparation=preparation, aux_channels=aux_channels)
      cols, rows = preparation_lib.gps_to_raster_pixels(*gps_points, preparation.gps_crs,
                                                        inputs.geo)
      inputs = stream.RasterInputs(image_path, preparation=preparation,
                                   aux_channels=aux_channels, gps_pixels=(cols, rows))
      inside = int(np.count_nonzero((cols >= 0) & (cols < inputs.width) & (rows >= 0)
                                    & (rows < inputs.height)))
      return inputs, (f'GPS heat-map via GeoTIFF georeference: {inside} of {cols.size} points '
                      'inside')
    if blank_aux:
      inputs = stream.RasterInputs(image_path, preparation=preparation, aux_channels=aux_channels)
      return inputs, 'blank (all-zero aux)'
  except stream.StreamError as error:
    raise PredictInputError(str(error)) from error
  folder = pathlib.Path(aux_dir) if aux_dir is not None else image_path.parent
  raise PredictInputError(
      f'{image_path}: no auxiliary raster found in {folder} (tried '
      f'{", ".join(aux_candidate_names(image_path, aux_suffix))}); give gps_csv to render a '
      'heat-map, or blank_aux=True for an all-zero aux')


def predict_streamed(forward: Forward, inputs: stream.RasterInputs, output_dir, stem: str, *,
                     window: int, overlap: int, batch_size: int, scaling: str = 'reference',
                     tta: bool = False, threshold: float = 0.5, block_size: int = 4096,
                     scale: float = 1.0, compress: str = 'deflate', cog: bool = False,
                     model_id: str = '',
                     aux_source: str = '', band_index: int = 0, band_count: int = 1,
                     wait_timeout_s: float | None = None, graph_config=None,
                     on_block: Callable[[int, int], Any] | None = None,
                     log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Streams one raster: this process's band of blocks, then (band 0, once every band is done)
  the GeoTIFFs {stem}_prob.tif and {stem}_road.tif and, with graph_config enabled, the road
  graph read back from the probability GeoTIFF block by block (stream_graph).

  Args:
    forward: as predict_arrays (receives scaled windows).
    inputs, aux_source: from stream_inputs.
    window, overlap, batch_size, scaling, tta, threshold: as predict_arrays / write_prediction.
    block_size, compress, cog: stream.predict_raster_blocks / stream.assemble_outputs;
      block_size is in raster pixels (at a scale s != 1 the model-grid blocks are
      round(block_size * s) px, rounded up to whole model-grid heat-map tiles when T * s is a
      whole number).
    scale: the training scale (predict_arrays): at s != 1 blocks and windows run on the model
      grid (stream.ModelGridInputs) and the GeoTIFFs are resized back block by block, with the
      rule of predict_arrays (cmmp_jax.model_grid), so the outputs equal its bit for bit.
    model_id: the checkpoint, recorded so that a resumed run never mixes models.
    band_index, band_count: the share of this process (jax.process_index / process_count).
    wait_timeout_s: how long band 0 waits for the other bands without any new block landing
      (None: no limit; stream.wait_for_blocks).
    on_block: called after each finished block.

  Returns:
    {'written': paths (empty for bands > 0), 'height', 'width', 'road_fraction' (None for bands
     > 0), 'blocks', 'resumed', 'windows', 'seconds'}.
  """
  model = inference.tta_dihedral(forward) if tta else forward
  ratio = model_grid.as_ratio(scale)
  grid_inputs, grid_block = inputs, block_size
  if ratio != 1:
    grid_inputs = stream.ModelGridInputs(inputs, ratio)
    grid_block = max(1, round(block_size * ratio))
  result = stream.predict_raster_blocks(
      _scaled_forward(model, scaling), grid_inputs, output_dir, stem, window=window,
      overlap=overlap, batch_size=batch_size, block_size=grid_block, model_id=model_id,
      aux_source=aux_source, tta=tta, band_index=band_index, band_count=band_count,
      on_block=on_block, log=log)
  summary = {'written': [], 'height': inputs.height, 'width': inputs.width,
             'road_fraction': None, **{k: result[k] for k in ('blocks', 'resumed', 'windows',
                                                               'seconds')}}
  if band_index != 0:
    return summary
  if band_count > 1:
    stream.wait_for_blocks(result['folder'], result['grid'], timeout_s=wait_timeout_s, log=log)
  paths = output_paths(output_dir, stem, georeferenced=True)
  written, road_pixels = stream.assemble_outputs(
      result['folder'], result['grid'], inputs.geo, paths['prob_tif'], paths['road_tif'],
      threshold=threshold, compress=compress, cog=cog, ratio=ratio,
      raster_size=(inputs.height, inputs.width))
  summary['road_fraction'] = road_pixels / float(inputs.height * inputs.width)
  if graph_config is not None and graph_config.get('enabled', False):
    written = written + stream_graph.write_streamed_graph(output_dir, stem, paths['prob_tif'],
                                                        geo=inputs.geo, config=graph_config)[0]
  summary['written'] = written
  return summary


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


def _check_stream_options(stream_mode, block_size, compress) -> None:
  if stream_mode not in STREAM_CHOICES:
    raise PredictInputError(f'stream must be one of {STREAM_CHOICES}; got {stream_mode!r}')
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise PredictInputError(f'block_size must be a positive integer; got {block_size!r}')
  if compress not in stream.COMPRESSIONS:
    raise PredictInputError(f'compress must be one of {stream.COMPRESSIONS}; got {compress!r}')


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
                      limit: int | None = None,
                      preparation: preparation_lib.InputPreparation | None = None,
                      scale: float = 1.0, pad_mode: str = 'reflect', on_error: str = 'raise',
                      shard_index: int = 0, shard_count: int = 1, graph_config=None,
                      stream_mode: str = 'auto', block_size: int = 4096,
                      compress: str = 'deflate', cog: bool = False, model_id: str = '',
                      wait_timeout_s: float | None = None,
                      on_block: Callable[[int, int], Any] | None = None,
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
    preparation: how images and GPS become inputs (load_tile); None = the defaults.
    scale: training scale data.input_size / tile size (predict_arrays).
    on_error: 'raise' stops at the first input that cannot be read (outputs already written
      stay); 'skip' logs it, records it under 'failed' and goes on. Errors of the forward or
      of writing always stop.
    shard_index, shard_count: predict only inputs shard_index, shard_index + shard_count, ...
      of the sorted list (one share per process when several hosts predict one folder).
    graph_config: `config.graph`; when its 'enabled' is true, also writes each input's road
      graph ({stem}_graph.geojson, _graph.graphml, _overlay.png; cmmp_jax.graphs).
    stream_mode: 'auto' streams georeferenced TIFFs larger than block_size on a side
      (stream_plan), 'on' streams every input (an error when one cannot be), 'off' never.
      A streamed input writes only the GeoTIFFs (no PNGs), and is shared by every process in
      bands of blocks (shard_index / shard_count) instead of going to one process; process 0
      waits for the other bands (wait_timeout_s) and writes the files.
    block_size, compress, cog: streaming's block side, GeoTIFF compression, Cloud-Optimized
      GeoTIFF outputs.
    model_id: identifies the model in a streamed run's progress file (resume never mixes two).
    on_block: called with (i, j) after each streamed block (progress hooks, tests).
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
  _check_stream_options(stream_mode, block_size, compress)
  images = find_inputs(input_dir, aux_suffix=aux_suffix)
  if limit is not None:
    images = images[:int(limit)]
  _check_unique_stems(images)
  if not 0 <= shard_index < shard_count:
    raise PredictInputError(f'shard_index {shard_index} is not in [0, {shard_count})')
  preparation = preparation or preparation_lib.InputPreparation()
  plans = {}
  aux_indexes: dict[pathlib.Path, dict[str, list[pathlib.Path]]] = {}
  for path in images:
    uses_gps = False
    if gps_csv is not None and stream_mode != 'off' and (
        path.suffix.lower() in reading.TIFF_EXTENSIONS):
      aux_folder = pathlib.Path(aux_dir) if aux_dir is not None else path.parent
      if aux_folder not in aux_indexes:
        aux_indexes[aux_folder] = _files_by_stem(aux_folder)
      uses_gps = find_aux_file(path, aux_suffix=aux_suffix, aux_dir=aux_folder,
                               _index=aux_indexes[aux_folder]) is None
    plans[path] = stream_plan(path, mode=stream_mode, block_size=block_size, window=window,
                              scale=scale, preparation=preparation, uses_gps=uses_gps)
  # Streamed inputs are shared by every process (bands); the others go to one process each.
  images = [path for k, path in enumerate(images)
            if plans[path][0] or k % shard_count == shard_index]
  output_dir = pathlib.Path(output_dir)
  if output_dir.exists() and not output_dir.is_dir():
    raise PredictInputError(f'{output_dir}: output path exists and is not a folder')
  output_dir.mkdir(parents=True, exist_ok=True)

  gps_points = None
  if gps_csv is not None:
    if aux_channels != 1:
      raise PredictInputError(f'gps_csv renders 1-channel heat-maps but aux_channels='
                              f'{aux_channels}')
    try:
      gps_points = preparation_lib.read_gps(gps_csv, preparation)
    except reading.ReadError as error:
      raise PredictInputError(str(error)) from error
    log(f'GPS: {gps_points[0].size} points from {gps_csv} ({preparation.gps_crs})')

  summary: dict[str, Any] = {'written': [], 'tiles': [], 'failed': []}
  for number, image_path in enumerate(images, start=1):
    start = time.perf_counter()
    aux_folder = pathlib.Path(aux_dir) if aux_dir is not None else image_path.parent
    if aux_folder not in aux_indexes:
      aux_indexes[aux_folder] = _files_by_stem(aux_folder)
    if plans[image_path][0]:
      try:
        inputs, aux_source = stream_inputs(
            image_path, aux_channels=aux_channels, aux_suffix=aux_suffix, aux_dir=aux_folder,
            gps_points=gps_points, blank_aux=blank_aux, preparation=preparation,
            _aux_index=aux_indexes[aux_folder])
      except PredictInputError as error:
        if on_error == 'raise':
          raise
        log(f'[{number}/{len(images)}] {image_path.name}: SKIPPED: {error}')
        summary['failed'].append({'image': str(image_path), 'error': str(error)})
        continue
      result = predict_streamed(
          forward, inputs, output_dir, image_path.stem, window=window, overlap=overlap,
          batch_size=batch_size, scaling=scaling, tta=tta, threshold=threshold,
          block_size=block_size, scale=scale, compress=compress, cog=cog, model_id=model_id,
          aux_source=aux_source, band_index=shard_index, band_count=shard_count,
          wait_timeout_s=wait_timeout_s, graph_config=graph_config, on_block=on_block, log=log)
      seconds = time.perf_counter() - start
      summary['written'].extend(result['written'])
      summary['tiles'].append({
          'image': str(image_path), 'aux_source': aux_source, 'height': result['height'],
          'width': result['width'], 'road_fraction': result['road_fraction'],
          'seconds': seconds, 'outputs': result['written'], 'streamed': True,
          'blocks': result['blocks'], 'resumed_blocks': result['resumed']})
      road = ('' if result['road_fraction'] is None
              else f", road {result['road_fraction']:.1%}")
      log(f'[{number}/{len(images)}] {image_path.name}: {result["height"]} x '
          f'{result["width"]} px streamed ({result["blocks"]} blocks computed, '
          f'{result["resumed"]} resumed), aux {aux_source}{road}, {seconds:.2f} s')
      continue
    try:
      tile = load_tile(image_path, aux_channels=aux_channels, aux_suffix=aux_suffix,
                       aux_dir=aux_folder, gps_points=gps_points, blank_aux=blank_aux,
                       preparation=preparation, _aux_index=aux_indexes[aux_folder])
    except PredictInputError as error:
      if on_error == 'raise':
        raise
      log(f'[{number}/{len(images)}] {image_path.name}: SKIPPED: {error}')
      summary['failed'].append({'image': str(image_path), 'error': str(error)})
      continue
    probabilities = predict_arrays(
        forward, tile.image, tile.aux, window=window, overlap=overlap, batch_size=batch_size,
        scaling=scaling, tta=tta, pad_mode=pad_mode, scale=scale)
    written = write_prediction(output_dir, image_path.stem, probabilities, threshold=threshold,
                               geo=tile.geo)
    if graph_config is not None and graph_config.get('enabled', False):  # road graph files
      written += graphs_lib.write_graph_outputs(
          output_dir, image_path.stem, probabilities, image=tile.image,
          heatmap=tile.aux[..., 0], geo=tile.geo, config=graph_config)[0]
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


def training_preparation(config) -> tuple[preparation_lib.InputPreparation, int | None, str]:
  """The input preparation and tile size the model of `config` was trained on.

  config.predict.preparation, when set, is a JSON file (a dataset's metadata.json or a record
  alone, preparation.load_record); else the record in the metadata of config.data's built
  dataset. The tile size is the record's tile_size, else the image size of the dataset's first
  training example (datasets whose builders record none).

  Returns:
    (preparation, tile_size or None when unknown, where they came from, for the log).
    Without a record (no dataset built here, or one built before records existed): the
    default InputPreparation, with a warning on the console.
  """
  override = config.predict.get('preparation', '')
  data = config.data
  label = f'{data.name}/{data.config}'
  if override:
    record = preparation_lib.load_record(override)
    return record, record.tile_size, str(override)
  data_dir = pathlib.Path(data.data_dir).expanduser().absolute()
  if not build_lib.is_built(data.name, data_dir, data.config or None):
    reporting.console(
        f'WARNING: dataset {label} is not built in {data_dir}, so its input preparation is '
        'unknown: predicting with the defaults (reading\'s band and bit-depth rules, lon/lat '
        'GPS, one heat-map over each whole image, no resize); set config.predict.preparation '
        'to the metadata.json of the dataset the model was trained on')
    return preparation_lib.InputPreparation(), None, 'defaults'
  builder = build_lib.make_builder(data.name, data_dir, data.config or None)
  version_dir = pathlib.Path(os.fspath(builder.data_path))
  record = preparation_lib.from_metadata(builder.info.metadata, str(version_dir))
  tile_size = record.tile_size if record is not None else None
  if tile_size is None and data.train_split in builder.info.splits:
    source = builder.as_data_source(split=data.train_split)
    if len(source):
      tile_size = int(np.asarray(source[0]['image']).shape[0])
  if record is None:
    reporting.console(
        f'WARNING: dataset {label} at {version_dir} records no input preparation (built before '
        'records existed): predicting with the default preparation; rebuild it with '
        '--overwrite, or set config.predict.preparation')
    record = preparation_lib.InputPreparation()
  if record.tile_size is None and tile_size is not None:
    # Heat-maps rendered here are then normalised per dataset-sized tile, as the dataset's.
    record = dataclasses.replace(record, tile_size=tile_size)
  return record, tile_size, f'dataset {label} ({version_dir})'


def predict_from_checkpoint(config, workdir) -> dict:
  """`--mode=predict`: restores config.eval.checkpoint from workdir and predicts
  config.predict.input_dir into config.predict.output_dir (default WORKDIR/predictions). With no
  input_dir, predicts the first config.predict.num_examples tiles of the test split (the demo).
  Inputs are prepared by the training data's record (training_preparation) and seen at the
  training scale, data.input_size / tile size.
  """
  # Prediction is embarrassingly parallel: each process predicts its own share of the inputs on
  # its own devices (windows sharded over them, weights replicated), with no cross-process
  # computation, so processes never wait for each other (except that process 0 waits for the
  # other bands of a streamed raster before writing its GeoTIFFs).
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
    preparation, tile_size, origin = training_preparation(config)
    scale = 1.0
    if config.data.input_size and tile_size and config.data.input_size != tile_size:
      scale = config.data.input_size / tile_size
    reporting.console(f'input preparation from {origin}: {preparation.describe()}; model scale '
                      f'{scale:g} (input_size {config.data.input_size or "= tile"}, tile '
                      f'{tile_size or "unknown"})')
    summary = predict_directory(
        forward, pcfg.input_dir, output_dir, window=window, overlap=pcfg.overlap,
        batch_size=batch_size, scaling=config.data.scaling,
        aux_channels=config.model.aux_channels, gps_csv=pcfg.gps_csv or None,
        blank_aux=pcfg.blank_aux, threshold=pcfg.threshold, tta=config.eval.tta,
        preparation=preparation, scale=scale, graph_config=config.get('graph'),
        stream_mode=pcfg.get('stream', 'auto'), block_size=pcfg.get('block_size', 4096),
        compress=pcfg.get('compress', 'deflate'), cog=pcfg.get('cog', False),
        wait_timeout_s=pcfg.get('stream_wait_s', 3600.0) or None,
        model_id=f'{pathlib.Path(workdir).absolute()} step {step}', log=reporting.console,
        **shard)
  else:
    source = sources.dataset_source(config, config.data.test_split)
    written = []
    for i in range(shard['shard_index'], min(pcfg.num_examples, len(source)),
                   shard['shard_count']):
      example = source[i]
      tile_id = example['tile_id']
      tile_id = tile_id.decode() if isinstance(tile_id, bytes) else str(tile_id)
      image, aux = np.asarray(example['image']), np.asarray(example['aux'])
      # The model was trained on tiles resized to input_size: predict at that scale, write at
      # the label's size.
      scale = (config.data.input_size / image.shape[0]) if config.data.input_size else 1.0
      probs = predict_arrays(forward, image, aux, window=window, overlap=pcfg.overlap,
                             batch_size=batch_size, scaling=config.data.scaling,
                             tta=config.eval.tta, scale=scale)
      label = np.asarray(example['mask'])
      written += write_prediction(output_dir, tile_id, probs, threshold=pcfg.threshold)
      if config.get('graph') is not None and config.graph.enabled:  # road graph files
        written += graphs_lib.write_graph_outputs(output_dir, tile_id, probs, image=image,
                                                  heatmap=aux[..., 0], config=config.graph)[0]
      label_path = output_dir / f'{tile_id}_label.png'
      write_png_atomic(label_path, (label[..., 0] * 255).astype(np.uint8))
      written.append(label_path)
    summary = {'written': [str(p) for p in written]}
  who = f' by process {jax.process_index()}' if jax.process_count() > 1 else ''
  message = (f"predictions of step {step} written to {output_dir} "
             f"({len(summary['written'])} files{who})")
  reporting.console(message, every_process=True)
  return summary
