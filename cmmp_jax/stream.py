"""Streaming prediction of one raster of any size: windows in, tiled GeoTIFFs out, bounded memory.

`predict_raster_blocks` computes the road probabilities of a georeferenced raster block by block
and `assemble_outputs` writes them as tiled, compressed GeoTIFFs (BigTIFF when needed, optionally
Cloud-Optimized). Peak host memory depends on the block, window and batch sizes, never on the
raster: inputs are read with rasterio windows, the GPS heat-map is rendered per tile of the
dataset's grid, and outputs are written window by window.

Output grid: the raster is cut into `block` x `block` output blocks from its top-left pixel,
`block` a multiple of the heat-map tile size (preparation.tile_size) so that a block is a union
of whole dataset tiles. Sliding windows stay on the GLOBAL grid of inference.predict_large
(starts 0, stride, ..., last one at the far border). A block is computed from every window that
intersects it, added in predict_large's order (row-major over window corners) with the same
float64 arithmetic, so each pixel equals the in-memory path bit for bit (given a forward whose
output for one window does not depend on the other windows of its batch). Windows that also
intersect the next block of the same block row are kept for it; windows crossing a block-row
border are computed once per block row (about (block + window) / block of the work).

Training scale s != 1 (a model trained on T px dataset tiles resized to s T): blocks and windows
run on the MODEL grid (round(H s), round(W s)) through ModelGridInputs, which computes each
model-grid window from the raster window under it (plus the bilinear margin) by the resize rule
of cmmp_jax.model_grid, the one predict.predict_arrays applies to the whole raster; the blocks
hold model-grid values, and assemble_outputs resizes them back to the raster grid block by block
(each raster block from the model-grid window its taps read, across block borders). The outputs
equal the in-memory path's bit for bit; memory stays bounded by block, window and batch size.

Layout of a run, beside the outputs (output_dir/{stem}.stream/):
  progress.json   signature (input, size, settings) and the list of finished blocks
  prob_{i}_{j}.npy  float32 probabilities of block (i, j) (of the model grid at s != 1, before
                    clipping to [0, 1]), written atomically
A killed run resumes from the finished blocks; a run with another signature starts over.
Several processes share one raster by taking bands of block rows (band_index / band_count);
the folder must be shared (one filesystem). Once every block exists, `assemble_outputs` (one
process) writes {stem}_prob.tif (float32) and {stem}_road.tif (uint8 0/255) and removes the
folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil
import rasterio.windows

from cmmp_jax import inference, model_grid
from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import heatmap as heatmap_lib
from cmmp_jax.data import preparation as preparation_lib
from cmmp_jax.data import reading

PROGRESS_FORMAT = 1
PROGRESS_NAME = 'progress.json'
STREAM_SUFFIX = '.stream'
# Internal tile side of the written GeoTIFFs (GDAL needs a multiple of 16).
GEOTIFF_TILE = 256
COMPRESSIONS = ('deflate', 'lzw', 'zstd', 'none')
# GDAL's block cache (default 5% of physical memory) would otherwise hold written tiles up to
# gigabytes on a large machine; streamed reads and writes bound it.
GDAL_CACHE_MB = 256


def gdal_env() -> rasterio.Env:
  """The rasterio environment of every streamed read and write (bounded block cache)."""
  return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


class StreamError(ValueError):
  """A raster cannot be streamed with these settings, or a run's files are inconsistent; the
  message names the file or setting."""


# ----------------------------------------------------------------------------------------------
# Inputs by window.


class RasterInputs:
  """Model inputs (uint8 image and aux) of any pixel window of a georeferenced raster.

  The image is read with a rasterio window and prepared by preparation.prepare_image (per-pixel
  rules only: 'bit_depth', or 'percentile' with a recorded stretch). The aux is one of:
  an aligned aux raster file (read by window, reading.to_channels_uint8), GPS points already
  projected to raster pixels (rendered tile by tile on the preparation's tile grid, exactly as
  preparation.render_gps_aux renders the whole raster), or zeros.

  Attributes:
    height, width: raster size; geo: its GeoInfo; tile: the heat-map tile side (GPS) or None.
  """

  def __init__(self, image_path, *, preparation: preparation_lib.InputPreparation,
               aux_channels: int = 1, aux_path=None,
               gps_pixels: tuple[np.ndarray, np.ndarray] | None = None):
    self.image_path = pathlib.Path(image_path)
    self.preparation = preparation
    self.aux_channels = int(aux_channels)
    self.aux_path = pathlib.Path(aux_path) if aux_path is not None else None
    if preparation.scaling == 'percentile' and preparation.stretch_low is None:
      raise StreamError(
          f'{self.image_path}: streaming prediction needs the percentile stretch of the input '
          'preparation (stretch_low/high, recorded by the dataset builders); a whole-raster '
          'percentile cannot be computed window by window')
    try:
      with rasterio.open(self.image_path) as dataset:
        self.height, self.width = dataset.height, dataset.width
        self.count, self.dtype = dataset.count, np.dtype(dataset.dtypes[0])
        if dataset.crs is None:
          raise StreamError(f'{self.image_path}: streaming prediction writes GeoTIFFs and needs '
                            'a georeferenced input (a GeoTIFF with a CRS)')
        self.geo = geo_lib.GeoInfo(crs=dataset.crs, transform=dataset.transform,
                                   bounds=tuple(float(v) for v in dataset.bounds))
    except rasterio.errors.RasterioError as error:
      raise StreamError(f'{self.image_path}: cannot open raster ({error})') from error
    self.bits = (reading._tiff_nbits(self.image_path) if np.issubdtype(self.dtype, np.integer)
                 else None) or reading._dtype_bits(self.dtype)
    if self.aux_path is not None:
      with rasterio.open(self.aux_path) as aux:
        if (aux.height, aux.width) != (self.height, self.width):
          raise StreamError(f'{self.aux_path}: auxiliary raster is {aux.height} x {aux.width} '
                            f'pixels but image {self.image_path} is {self.height} x {self.width}')
    self.tile = None
    self._gps = None
    if gps_pixels is not None:
      if self.aux_channels != 1:
        raise StreamError(f'GPS heat-maps have 1 channel but the model expects aux_channels='
                          f'{self.aux_channels}')
      if preparation.tile_size is None:
        raise StreamError(
            f'{self.image_path}: streaming a GPS heat-map needs the tile grid of its '
            'normalisation (input preparation tile_size, recorded by the dataset builders); '
            'without it the whole raster is one heat-map tile')
      self.tile = int(preparation.tile_size)
      cols, rows = (np.asarray(v, np.float64).ravel() for v in gps_pixels)
      order = np.argsort(rows, kind='stable')  # NaN rows sort last and are never selected
      self._gps = (cols[order], rows[order])

  def _read_window(self, path, row0, row1, col0, col1) -> np.ndarray:
    window = rasterio.windows.Window(col0, row0, col1 - col0, row1 - row0)
    try:
      with gdal_env(), rasterio.open(path) as dataset:
        return np.moveaxis(dataset.read(window=window), 0, -1)
    except rasterio.errors.RasterioError as error:
      raise StreamError(f'{path}: cannot read window {window} ({error})') from error

  def image(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
    """uint8 (row1 - row0, col1 - col0, 3) prepared image of rows [row0, row1), cols [col0, col1)."""
    pixels = self._read_window(self.image_path, row0, row1, col0, col1)
    raster = reading.Raster(pixels=pixels, geo=None, path=self.image_path, bits=self.bits)
    image, _ = preparation_lib.prepare_image(raster, self.preparation)
    return image

  def aux(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
    """uint8 (row1 - row0, col1 - col0, C) aux of the same window."""
    if self.aux_path is not None:
      pixels = self._read_window(self.aux_path, row0, row1, col0, col1)
      raster = reading.Raster(pixels=pixels, geo=None, path=self.aux_path,
                              bits=reading._dtype_bits(pixels.dtype))
      return reading.to_channels_uint8(raster, self.aux_channels)
    if self._gps is None:
      return np.zeros((row1 - row0, col1 - col0, self.aux_channels), np.uint8)
    # The whole tiles covering the window, rendered alone (each tile depends on its own points
    # only; coordinates shifted by whole tiles stay exact), then cropped.
    tile = self.tile
    tile_row0, tile_col0 = row0 // tile * tile, col0 // tile * tile
    tile_row1, tile_col1 = -(-row1 // tile) * tile, -(-col1 // tile) * tile
    cols, rows = self._gps
    first, last = np.searchsorted(rows, [tile_row0, tile_row1], side='left')
    cols, rows = cols[first:last], rows[first:last]
    keep = (cols >= tile_col0) & (cols < tile_col1)
    heat, _ = heatmap_lib.render_tiled_heatmap_uint8(
        cols[keep] - tile_col0, rows[keep] - tile_row0, tile_row1 - tile_row0,
        tile_col1 - tile_col0, tile)
    return np.ascontiguousarray(heat[row0 - tile_row0:row1 - tile_row0,
                                     col0 - tile_col0:col1 - tile_col0, None])


class ModelGridInputs:
  """The model inputs of a raster seen at a training scale s != 1 (cmmp_jax.model_grid), by
  window of the MODEL grid: the same interface as RasterInputs, so that blocks and sliding
  windows run on the grid the model sees, exactly as predict.predict_arrays runs on it in memory.

  A model-grid window is computed from the raster window its bilinear taps read (the window
  plus a pixel or two around it, clipped at the raster's edges), read by the RasterInputs: the
  image prepared per pixel, the GPS heat-map rendered per dataset tile on the raster grid, then
  both resized (model_grid.resize_uint8), so each pixel equals the whole-raster resize's.

  Attributes:
    height, width: the model grid (model_grid.model_size of the raster's); raster: the
    RasterInputs; ratio: s as p / q; geo, image_path, preparation, aux_channels: the raster's;
    tile: the heat-map tile on the model grid (T * s) when it is a whole number of pixels, else
    None (blocks then need not be unions of tiles: any window resizes exactly).
  """

  def __init__(self, raster: RasterInputs, ratio):
    self.raster = raster
    self.ratio = ratio
    self.height = model_grid.model_size(raster.height, ratio)
    self.width = model_grid.model_size(raster.width, ratio)
    self.image_path, self.preparation = raster.image_path, raster.preparation
    self.aux_channels, self.geo = raster.aux_channels, raster.geo
    model_tile = raster.tile * ratio if raster.tile else None
    self.tile = int(model_tile) if model_tile is not None and model_tile.denominator == 1 else None

  def _taps(self, row0, row1, col0, col1):
    step = 1 / self.ratio
    return (model_grid.axis_taps(row0, row1, self.raster.height, step, fixed_point=True,
                                 vertical=True),
            model_grid.axis_taps(col0, col1, self.raster.width, step, fixed_point=True,
                                 vertical=False))

  def _resized(self, read, row0, row1, col0, col1) -> np.ndarray:
    rows, cols = self._taps(row0, row1, col0, col1)
    (source_row0, source_row1), (source_col0, source_col1) = rows.source_range, cols.source_range
    source = read(source_row0, source_row1, source_col0, source_col1)
    return model_grid.resize_uint8(source, rows, cols, row_offset=source_row0,
                                   col_offset=source_col0)

  def image(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
    """uint8 (row1 - row0, col1 - col0, 3): model-grid rows [row0, row1), cols [col0, col1)."""
    return self._resized(self.raster.image, row0, row1, col0, col1)

  def aux(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
    """uint8 (row1 - row0, col1 - col0, C) aux of the same model-grid window."""
    return self._resized(self.raster.aux, row0, row1, col0, col1)


# ----------------------------------------------------------------------------------------------
# Block grid and bands.


@dataclasses.dataclass(frozen=True)
class BlockGrid:
  """Output blocks of block x block pixels from the raster's top-left (the last ones cut)."""
  height: int
  width: int
  block: int

  @property
  def rows(self) -> int:
    return -(-self.height // self.block)

  @property
  def cols(self) -> int:
    return -(-self.width // self.block)

  def bounds(self, i: int, j: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of block (i, j)."""
    return (i * self.block, min((i + 1) * self.block, self.height),
            j * self.block, min((j + 1) * self.block, self.width))


def block_side(block_size: int, tile: int | None) -> int:
  """block_size rounded up to whole heat-map tiles (blocks are unions of dataset tiles)."""
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise StreamError(f'block_size must be a positive integer; got {block_size!r}')
  return -(-block_size // tile) * tile if tile else block_size


def band_block_rows(n_block_rows: int, band_index: int, band_count: int) -> range:
  """Block rows of band `band_index` of `band_count` (contiguous, sizes differing by <= 1)."""
  if not (isinstance(band_count, int) and band_count >= 1 and isinstance(band_index, int)
          and 0 <= band_index < band_count):
    raise StreamError(f'band_index {band_index!r} is not in [0, band_count={band_count!r})')
  first = n_block_rows * band_index // band_count
  last = n_block_rows * (band_index + 1) // band_count
  return range(first, last)


# ----------------------------------------------------------------------------------------------
# Progress.


def stream_dir(output_dir, stem: str) -> pathlib.Path:
  return pathlib.Path(output_dir) / f'{stem}{STREAM_SUFFIX}'


def _save_block(path: pathlib.Path, values: np.ndarray) -> None:
  handle, temp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(handle, 'wb') as file:
      np.save(file, values, allow_pickle=False)
    os.replace(temp, path)
  except BaseException:
    if os.path.exists(temp):
      os.remove(temp)
    raise


def block_path(folder: pathlib.Path, i: int, j: int) -> pathlib.Path:
  return folder / f'prob_{i}_{j}.npy'


def _progress_path(folder: pathlib.Path, band_index: int) -> pathlib.Path:
  # One progress file per band, so that processes never write the same file.
  return folder / (PROGRESS_NAME if band_index == 0 else f'progress.band{band_index}.json')


def _read_done(folder: pathlib.Path, signature: dict) -> set[tuple[int, int]]:
  """Finished blocks of earlier runs with this signature, whichever band (process) wrote them."""
  done = set()
  for path in folder.glob('progress*.json'):
    try:
      progress = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, json.JSONDecodeError):
      continue
    if progress.get('signature') == signature:
      done |= {(int(i), int(j)) for i, j in progress.get('done', [])
               if block_path(folder, int(i), int(j)).is_file()}
  return done


def _write_progress(folder: pathlib.Path, signature: dict, band_index: int,
                    done: set[tuple[int, int]]) -> None:
  data = {'format': PROGRESS_FORMAT, 'signature': signature, 'done': sorted(done)}
  geo_lib.write_bytes_atomic(_progress_path(folder, band_index), json.dumps(data).encode())


def _signature_matches_folder(folder: pathlib.Path, signature: dict) -> bool:
  """Whether every progress file of the folder has this signature (blocks are reusable)."""
  for path in folder.glob('progress*.json'):
    try:
      if json.loads(path.read_text(encoding='utf-8')).get('signature') != signature:
        return False
    except (OSError, json.JSONDecodeError):
      return False
  return True


def make_signature(inputs: RasterInputs | ModelGridInputs, *, window: int, overlap: int,
                   block: int, tta: bool, model_id: str, aux_source: str) -> dict[str, Any]:
  """What a run's blocks depend on: resuming with another value starts over."""
  stat = inputs.image_path.stat()
  return {'image': str(inputs.image_path.resolve()), 'image_size': stat.st_size,
          'image_mtime_ns': stat.st_mtime_ns, 'height': inputs.height, 'width': inputs.width,
          'scale': str(getattr(inputs, 'ratio', 1)),
          'window': window, 'overlap': overlap, 'block': block, 'tta': bool(tta),
          'model': model_id, 'aux': aux_source,
          'preparation': hashlib.sha256(json.dumps(inputs.preparation.to_json(),
                                                   sort_keys=True).encode()).hexdigest()[:16]}


# ----------------------------------------------------------------------------------------------
# Prediction.


def _check_probabilities(values: np.ndarray) -> np.ndarray:
  # As predict.predict_arrays: blending averages window outputs, so values outside [0, 1] come
  # from the forward itself.
  tolerance = 1e-6
  low, high = float(values.min()), float(values.max())
  if low < -tolerance or high > 1 + tolerance:
    raise inference.InferenceInputError(
        f'forward returned values in [{low}, {high}], outside [0, 1]: it must return '
        'probabilities (apply a sigmoid to logits)')
  return np.clip(values, 0.0, 1.0)


def predict_raster_blocks(forward: inference.Forward, inputs: RasterInputs | ModelGridInputs,
                          output_dir, stem: str, *, window: int, overlap: int, batch_size: int,
                          block_size: int = 4096, model_id: str = '', aux_source: str = '',
                          tta: bool = False, band_index: int = 0, band_count: int = 1,
                          on_block: Callable[[int, int], Any] | None = None,
                          log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Computes the probability blocks of this process's band (module docstring).

  Args:
    forward: the predict_large forward: (B, w, w, 3) and (B, w, w, C) float32 windows holding
      uint8 values -> (B, w, w, 1) probabilities (predict.py wraps the model with the input
      scaling and, with tta, the dihedral average).
    inputs: the raster (RasterInputs), or its model grid at a training scale != 1
      (ModelGridInputs): blocks, windows and block_size are then on the model grid, and the
      blocks hold the blended values BEFORE clipping to [0, 1] (checked, as in memory: the
      in-memory path clips after resizing back; assemble_outputs resizes, then clips).
    output_dir, stem: blocks go to output_dir/{stem}.stream/.
    window, overlap, batch_size: as inference.predict_large; the (model) grid must be at least
      one window on each side (smaller ones are predicted in memory).
    block_size: output block side, rounded up to whole heat-map tiles (inputs.tile).
    model_id: identifies the model (checkpoint) in the run's signature.
    aux_source: describes the aux (file, GPS, blank) in the signature.
    tta: recorded in the signature (the forward already includes it).
    band_index, band_count: this process computes the block rows of its band only.
    on_block: called with (i, j) after each block is saved (progress, tests).
    log: progress lines.

  Returns:
    {'blocks': blocks computed now, 'resumed': blocks found done, 'windows': forward windows,
     'seconds': ..., 'folder': the stream folder, 'grid': BlockGrid}.
  """
  inference.check_settings(window, overlap, batch_size)
  height, width = inputs.height, inputs.width
  if height < window or width < window:
    raise StreamError(f'{inputs.image_path}: {height} x {width} px is smaller than the window '
                      f'{window}; predict it in memory')
  grid = BlockGrid(height, width, block_side(block_size, inputs.tile))
  on_model_grid = isinstance(inputs, ModelGridInputs)
  folder = stream_dir(output_dir, stem)
  folder.mkdir(parents=True, exist_ok=True)
  signature = make_signature(inputs, window=window, overlap=overlap, block=grid.block, tta=tta,
                             model_id=model_id, aux_source=aux_source)
  done = _read_done(folder, signature)
  if not _signature_matches_folder(folder, signature):
    if band_count == 1:  # another run's leftovers: start over
      for path in folder.iterdir():
        path.unlink()
      done = set()
    else:
      raise StreamError(f'{folder}: holds blocks of a run with other settings; remove the folder '
                        'before starting a multi-process run')

  stride = window - overlap
  row_starts = inference.window_starts(height, window, stride)
  col_starts = np.asarray(inference.window_starts(width, window, stride))
  weight_1d = inference.blend_weights_1d(window, overlap)
  weight_2d = weight_1d[:, None] * weight_1d[None, :]
  aux_channels = inputs.aux_channels
  band = band_block_rows(grid.rows, band_index, band_count)
  todo = [(i, j) for i in band for j in range(grid.cols) if (i, j) not in done]
  done = {block for block in done if block[0] in band}  # this band's progress file lists these
  _write_progress(folder, signature, band_index, done)
  where = (f'model grid {height} x {width} px (scale {inputs.ratio}, raster '
           f'{inputs.raster.height} x {inputs.raster.width} px)' if on_model_grid
           else f'{height} x {width} px')
  log(f'{stem}: {where} in {grid.rows} x {grid.cols} blocks of {grid.block} px; '
      f'band {band_index + 1}/{band_count}: block rows {band.start}..{band.stop - 1}, '
      f'{len(todo)} to do, {len(done)} done before')
  start = time.perf_counter()
  n_windows = 0
  cache: dict[tuple[int, int], np.ndarray] = {}  # window outputs for the next block of the row
  pixels_done = 0
  for number, (i, j) in enumerate(todo, start=1):
    row0, row1, col0, col1 = grid.bounds(i, j)
    tops = [t for t in row_starts if t < row1 and t + window > row0]
    lefts = [int(l) for l in col_starts if l < col1 and l + window > col0]
    corners = [(t, l) for t in tops for l in lefts]  # predict_large's (row-major) order
    needed = [c for c in corners if c not in cache]
    image = aux = None
    if needed:
      # The inputs under every window still to compute, read once.
      region_row0, region_row1 = min(t for t, _ in needed), max(t for t, _ in needed) + window
      region_col0, region_col1 = min(l for _, l in needed), max(l for _, l in needed) + window
      image = inputs.image(region_row0, region_row1, region_col0, region_col1)
      aux = inputs.aux(region_row0, region_row1, region_col0, region_col1)
    next_col0 = col1 if j + 1 < grid.cols and (i, j + 1) not in done else None
    kept = {}  # window outputs the next block of this row needs
    outputs = {}  # computed windows not yet added, at most one batch
    weighted_sum = np.zeros((row1 - row0, col1 - col0), np.float64)
    weight_sum = np.zeros((row1 - row0, col1 - col0), np.float64)
    next_needed = 0
    for corner in corners:
      if corner in cache:
        values = cache.pop(corner)
      else:
        if corner not in outputs:  # the next batch of windows to compute, in corner order
          batch = needed[next_needed:next_needed + batch_size]
          next_needed += len(batch)
          image_batch = np.zeros((batch_size, window, window, 3), np.float32)
          aux_batch = np.zeros((batch_size, window, window, aux_channels), np.float32)
          for row, (t, l) in enumerate(batch):
            t, l = t - region_row0, l - region_col0
            image_batch[row] = image[t:t + window, l:l + window]
            aux_batch[row] = aux[t:t + window, l:l + window]
          probs = np.asarray(forward(image_batch, aux_batch))
          if probs.shape != (batch_size, window, window, 1):
            raise inference.InferenceInputError(
                f'forward returned shape {probs.shape}; expected '
                f'{(batch_size, window, window, 1)}')
          outputs.update((c, probs[row, :, :, 0]) for row, c in enumerate(batch))
          n_windows += len(batch)
        values = outputs.pop(corner)
      t, l = corner
      if next_col0 is not None and l + window > next_col0:
        kept[corner] = values
      probs = values.astype(np.float64)
      if not np.all(np.isfinite(probs)):
        raise inference.InferenceInputError('forward returned NaN or infinite probabilities')
      # The part of the window inside the block, with the matching part of the weights.
      a0, a1 = max(t, row0), min(t + window, row1)
      b0, b1 = max(l, col0), min(l + window, col1)
      part = (slice(a0 - t, a1 - t), slice(b0 - l, b1 - l))
      target = (slice(a0 - row0, a1 - row0), slice(b0 - col0, b1 - col0))
      weighted_sum[target] += probs[part] * weight_2d[part]
      weight_sum[target] += weight_2d[part]
    del image, aux, outputs
    cache = kept
    stitched = (weighted_sum / weight_sum).astype(np.float32)
    checked = _check_probabilities(stitched)
    stitched = stitched if on_model_grid else checked
    del checked
    del weighted_sum, weight_sum
    _save_block(block_path(folder, i, j), stitched)
    done.add((i, j))
    _write_progress(folder, signature, band_index, done)
    pixels_done += stitched.size
    del stitched
    if on_block is not None:
      on_block(i, j)
    if number % max(1, len(todo) // 10) == 0 or number == len(todo):
      elapsed = time.perf_counter() - start
      log(f'{stem}: block {number}/{len(todo)} ({elapsed:.1f} s, '
          f'{pixels_done / max(elapsed, 1e-9) / 1e6:.3f} Mpx/s)')
  return {'blocks': len(todo), 'resumed': len(done) - len(todo), 'windows': n_windows,
          'seconds': time.perf_counter() - start, 'folder': folder, 'grid': grid}


def missing_blocks(folder: pathlib.Path, grid: BlockGrid) -> list[tuple[int, int]]:
  return [(i, j) for i in range(grid.rows) for j in range(grid.cols)
          if not block_path(folder, i, j).is_file()]


# ----------------------------------------------------------------------------------------------
# Writing.


def output_profile(height: int, width: int, dtype: str, geo: geo_lib.GeoInfo,
                   compress: str) -> dict[str, Any]:
  """A tiled, compressed GTiff profile; BigTIFF when the file could pass 4 GB."""
  if compress not in COMPRESSIONS:
    raise StreamError(f'compress must be one of {COMPRESSIONS}; got {compress!r}')
  profile = dict(driver='GTiff', height=height, width=width, count=1, dtype=dtype,
                 crs=geo.crs, transform=geo.transform, tiled=True, blockxsize=GEOTIFF_TILE,
                 blockysize=GEOTIFF_TILE, BIGTIFF='IF_SAFER')
  if compress != 'none':
    profile['compress'] = compress
    profile['predictor'] = 3 if dtype == 'float32' else 2
  return profile


def _load_block(folder: pathlib.Path, grid: BlockGrid, i: int, j: int, *,
                mmap: bool = False) -> np.ndarray:
  row0, row1, col0, col1 = grid.bounds(i, j)
  path = block_path(folder, i, j)
  try:
    values = np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
  except (OSError, ValueError) as error:
    raise StreamError(f'{path}: cannot read block ({error})') from error
  if values.shape != (row1 - row0, col1 - col0) or values.dtype != np.float32:
    raise StreamError(f'{path}: block is {values.dtype} {values.shape}, expected float32 '
                      f'{(row1 - row0, col1 - col0)}')
  return values


def read_grid_window(folder: pathlib.Path, grid: BlockGrid, row0: int, row1: int, col0: int,
                     col1: int) -> np.ndarray:
  """float32 (row1 - row0, col1 - col0): rows [row0, row1), cols [col0, col1) of the grid's
  values, copied from the blocks that hold them (memory-mapped: only those pixels are read)."""
  out = np.empty((row1 - row0, col1 - col0), np.float32)
  for i in range(row0 // grid.block, (row1 - 1) // grid.block + 1):
    for j in range(col0 // grid.block, (col1 - 1) // grid.block + 1):
      block_row0, _, block_col0, _ = grid.bounds(i, j)
      values = _load_block(folder, grid, i, j, mmap=True)
      a0, a1 = max(row0, block_row0), min(row1, block_row0 + values.shape[0])
      b0, b1 = max(col0, block_col0), min(col1, block_col0 + values.shape[1])
      out[a0 - row0:a1 - row0, b0 - col0:b1 - col0] = values[a0 - block_row0:a1 - block_row0,
                                                             b0 - block_col0:b1 - block_col0]
      del values
  return out


def _raster_blocks(folder: pathlib.Path, grid: BlockGrid, ratio, raster_size):
  """Yields ((row0, row1, col0, col1), float32 probabilities in [0, 1]) of the raster grid.

  At scale 1 these are the blocks themselves. At a scale s != 1 the blocks are on the model
  grid: the raster is cut into blocks of ceil(block / s) px, and each is resized back from the
  model-grid window its taps read (model_grid.resize_float32: exactly the pixels of
  model_grid.to_raster_grid over the whole grid), then clipped to [0, 1] as in memory.
  """
  if ratio is None or ratio == 1:
    for i in range(grid.rows):
      for j in range(grid.cols):
        yield grid.bounds(i, j), _load_block(folder, grid, i, j)
    return
  height, width = raster_size
  raster_grid = BlockGrid(height, width, -(-grid.block * ratio.denominator // ratio.numerator))
  for i in range(raster_grid.rows):
    for j in range(raster_grid.cols):
      row0, row1, col0, col1 = raster_grid.bounds(i, j)
      rows = model_grid.axis_taps(row0, row1, grid.height, ratio, fixed_point=False,
                                  vertical=True)
      cols = model_grid.axis_taps(col0, col1, grid.width, ratio, fixed_point=False,
                                  vertical=False)
      (model_row0, model_row1), (model_col0, model_col1) = rows.source_range, cols.source_range
      model = read_grid_window(folder, grid, model_row0, model_row1, model_col0, model_col1)
      values = model_grid.resize_float32(model, rows, cols, row_offset=model_row0,
                                         col_offset=model_col0)
      del model
      yield (row0, row1, col0, col1), np.clip(values, 0.0, 1.0)


def assemble_outputs(folder: pathlib.Path, grid: BlockGrid, geo: geo_lib.GeoInfo,
                     prob_path, road_path, *, threshold: float = 0.5,
                     compress: str = 'deflate', cog: bool = False,
                     remove_blocks: bool = True, ratio=None,
                     raster_size: tuple[int, int] | None = None
                     ) -> tuple[list[pathlib.Path], int]:
  """Writes the probability (float32) and road (uint8 0/255, p > threshold) GeoTIFFs from the
  blocks of `folder`, block by block, each to a temporary file then os.replace'd.

  With ratio (the training scale p / q, != 1) the blocks are on the model grid (ModelGridInputs)
  and the files on the raster grid of raster_size (height, width): see _raster_blocks.

  Returns:
    (the two paths, the number of road pixels).

  Raises:
    StreamError: blocks are missing (names them) or have the wrong size.
  """
  on_model_grid = ratio is not None and ratio != 1
  if on_model_grid and raster_size is None:
    raise StreamError(f'{folder}: blocks on the model grid (scale {ratio}) need the raster size')
  height, width = raster_size if on_model_grid else (grid.height, grid.width)
  missing = missing_blocks(folder, grid)
  if missing:
    shown = ', '.join(str(block_path(folder, i, j).name) for i, j in missing[:5])
    raise StreamError(f'{folder}: {len(missing)} block(s) not computed yet ({shown}'
                      f'{", ..." if len(missing) > 5 else ""}); run the remaining bands first')
  paths = [pathlib.Path(prob_path), pathlib.Path(road_path)]
  temps = []
  road_pixels = 0
  try:
    for path, dtype in zip(paths, ('float32', 'uint8')):
      handle, temp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp.tif',
                                      dir=path.parent)
      os.close(handle)
      temps.append(temp)
    profiles = [output_profile(height, width, d, geo, compress) for d in ('float32', 'uint8')]
    with gdal_env(), rasterio.open(temps[0], 'w', **profiles[0]) as prob_file, \
        rasterio.open(temps[1], 'w', **profiles[1]) as road_file:
      for (row0, row1, col0, col1), values in _raster_blocks(
          folder, grid, ratio if on_model_grid else None, (height, width)):
        window = rasterio.windows.Window(col0, row0, col1 - col0, row1 - row0)
        prob_file.write(values[None], window=window)
        road = np.where(values > threshold, 255, 0).astype(np.uint8)
        road_pixels += int(np.count_nonzero(road))
        road_file.write(road[None], window=window)
        del values, road
    if cog:
      for k, temp in enumerate(temps):
        cog_temp = temp + '.cog.tif'
        options = {} if compress == 'none' else {'compress': compress}
        with gdal_env():
          rasterio.shutil.copy(temp, cog_temp, driver='COG', BIGTIFF='IF_SAFER', **options)
        os.replace(cog_temp, temp)
    for temp, path in zip(temps, paths):
      os.chmod(temp, geo_lib.new_file_mode())
      os.replace(temp, path)
    temps = []
  except rasterio.errors.RasterioError as error:
    raise StreamError(f'{paths[0].parent}: cannot write the GeoTIFFs ({error})') from error
  finally:
    for temp in temps:
      for name in (temp, temp + '.cog.tif'):
        if os.path.exists(name):
          os.remove(name)
  if remove_blocks:
    shutil.rmtree(folder, ignore_errors=True)
  return paths, road_pixels


def wait_for_blocks(folder: pathlib.Path, grid: BlockGrid, *, timeout_s: float | None = None,
                    poll_s: float = 2.0, log: Callable[[str], Any] = print) -> None:
  """Waits until every block of the grid exists (other processes computing their bands).

  timeout_s bounds a stall, not the wait: the clock restarts whenever another block lands, so
  a long band that keeps progressing is waited for. None or 0: no limit.

  Raises:
    StreamError: timeout_s passed without a new block (names how many are missing).
  """
  last_progress = time.monotonic()
  reported = None
  while True:
    missing = missing_blocks(folder, grid)
    if not missing:
      return
    if reported != len(missing):
      log(f'{folder.name}: waiting for {len(missing)} block(s) of other processes')
      reported = len(missing)
      last_progress = time.monotonic()
    elif timeout_s and time.monotonic() - last_progress > timeout_s:
      raise StreamError(f'{folder}: no new block for {timeout_s:g} s with {len(missing)} block(s) '
                        'of other processes still missing; did another process fail? (rerun '
                        'to resume: finished blocks are kept)')
    time.sleep(poll_s)
