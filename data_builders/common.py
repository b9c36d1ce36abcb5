"""Shared pieces of the TFDS builders of the published road data sets.

Every builder here writes examples of one contract (NHWC, uint8):

  'image':   uint8 (H, W, 3) RGB aerial tile, stored as PNG.
  'aux':     uint8 (H, W, C) auxiliary raster (GPS heat-map, lidar, extra GPS
             channels), stored as PNG when C is 1, 3 or 4, else as a
             zlib-compressed tensor (PNG has no other channel counts).
  'mask':    uint8 (H, W, 1) road label, 1 = road, 0 = background, stored as PNG.
  'tile_id': text, the tile's name in the source data set.
  'bounds':  float64 (4,) (west, south, east, north) in WGS84 degrees, NaN x4
             when the source does not say where the tile is. Stored as raw bytes:
             TFDS keeps float tensors as float32 otherwise, which moves a tile's
             edge by up to 1.4 pixels at 0.3 m resolution (8e-6 degrees at lon 116).

Builders with vector labels (ROAD_LINES = True: synthetic, custom) add

  'road_lines': text, JSON {"units": "pixel", "lines": [[[x, y], ...], ...]} (road_lines_json):
             road centrelines in tile pixels, x = column, y = row, pixel centres at integers
             (the tile covers x, y in [-0.5, size - 0.5]), 1e-4 px precision. Lines may run past
             the tile's edges and are not split at crossings; cmmp_jax.graph_eval clips and
             nodes them into the ground-truth road graph of APLS / TOPO.

Metadata: every build records how its inputs were prepared (bands, bit depth,
scaling, GPS reading, heat-map normalisation grid; cmmp_jax.data.preparation)
in the TFDS metadata (`metadata.json` in the version folder, key
preparation.PREPARATION_KEY, read back as builder.info.metadata); prediction
applies that record to new files. Builders set it with `record_preparation`.

Images are handed to TFDS as PNG bytes made with PIL, never as numpy arrays:
TFDS encodes numpy images with TensorFlow, PNG bytes need none, so building and
reading (array_record + `tfds.data_source`) stay TensorFlow-free.

Bad inputs raise a `DatasetFileError` subclass whose message starts with the
offending file. TFDS writes a build into an `incomplete.*` folder and renames it
only when every split was written, so an error leaves nothing that looks built.
"""
from __future__ import annotations

import inspect
import io
import json
import math
import os
import pathlib
from typing import Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cmmp_jax.data import preparation as preparation_lib
from cmmp_jax.data import reading

# Channel counts that PNG (and the TFDS Image feature) can hold.
PNG_CHANNELS = (1, 3, 4)
NAN_BOUNDS = np.full((4,), np.nan, dtype=np.float64)
DEFAULT_FILE_FORMAT = 'array_record'
# The feature holding vector labels (see the module docstring).
ROAD_LINES_FEATURE = 'road_lines'


class DatasetFileError(ValueError):
  """A source file or folder of a data set is missing, unreadable or inconsistent.

  The message starts with the path of the offending file.
  """

  def __init__(self, path: os.PathLike | str, problem: str):
    self.path = pathlib.Path(path)
    self.problem = problem
    super().__init__(f'{path}: {problem}')


class MissingFileError(DatasetFileError, FileNotFoundError):
  """A file that the layout requires does not exist."""

  def __init__(self, path: os.PathLike | str, problem: str = 'file not found'):
    DatasetFileError.__init__(self, path, problem)

  def __str__(self) -> str:
    # OSError's own __str__ would print only the errno fields, which are unset.
    return f'{self.path}: {self.problem}'


class UnreadableImageError(DatasetFileError):
  """An image file exists but cannot be decoded (corrupt, truncated, odd mode) or holds values
  that cannot become uint8 (a reading.ReadError, re-raised as this error)."""


class SizeMismatchError(DatasetFileError):
  """The image, auxiliary raster and mask of one tile differ in height/width."""


class UnknownTileError(DatasetFileError):
  """A split file names a tile that has no files in the layout."""


class SplitDefinitionError(DatasetFileError):
  """A split file or split request is malformed (duplicates, empty split)."""


class SpecError(DatasetFileError):
  """A configuration/spec file holds a missing or invalid field."""


# ---------------------------------------------------------------------------
# Features and encoding.


def aux_feature(aux_channels: int) -> tfds.features.FeatureConnector:
  """The TFDS feature storing the auxiliary raster, uint8 (H, W, aux_channels)."""
  if aux_channels < 1:
    raise ValueError(f'aux_channels must be >= 1, got {aux_channels}')
  if aux_channels in PNG_CHANNELS:
    return tfds.features.Image(
        shape=(None, None, aux_channels), dtype=np.uint8, encoding_format='png')
  return tfds.features.Tensor(
      shape=(None, None, aux_channels), dtype=np.uint8,
      encoding=tfds.features.Encoding.ZLIB)


def example_features(aux_channels: int = 1, *,
                     road_lines: bool = False) -> tfds.features.FeaturesDict:
  """The feature dict of the shared example contract (see module docstring), with the
  'road_lines' text feature when road_lines is True."""
  vector_labels = {ROAD_LINES_FEATURE: tfds.features.Text()} if road_lines else {}
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(
          shape=(None, None, 3), dtype=np.uint8, encoding_format='png'),
      'aux': aux_feature(aux_channels),
      'mask': tfds.features.Image(
          shape=(None, None, 1), dtype=np.uint8, encoding_format='png'),
      'tile_id': tfds.features.Text(),
      # Raw bytes: a float64 Tensor is otherwise stored as float32 (see module docstring).
      'bounds': tfds.features.Tensor(shape=(4,), dtype=np.float64,
                                     encoding=tfds.features.Encoding.BYTES),
      **vector_labels,
  })


def road_lines_json(lines: Iterable[np.ndarray | Sequence]) -> str:
  """The 'road_lines' feature: JSON of (N, 2) (x, y) pixel polylines, coordinates rounded to
  1e-4 px (see the module docstring)."""
  return json.dumps({'units': 'pixel',
                     'lines': [[[round(float(x), 4), round(float(y), 4)] for x, y in line]
                               for line in lines]}, separators=(',', ':'))


def encode_png(array: np.ndarray) -> bytes:
  """PNG bytes of a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'encode_png needs uint8, got {array.dtype}')
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    mode = 'L'
  elif array.ndim == 3 and array.shape[-1] in (3, 4):
    mode = 'RGB' if array.shape[-1] == 3 else 'RGBA'
  else:
    raise ValueError(f'encode_png cannot store an array of shape {array.shape}')
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buffer, format='png')
  return buffer.getvalue()


def make_example(
    tile_id: str,
    image: np.ndarray,
    aux: np.ndarray,
    mask: np.ndarray,
    bounds: Sequence[float] | np.ndarray | None = None,
    *,
    source: os.PathLike | str | None = None,
    road_lines: Sequence[np.ndarray] | None = None,
) -> dict:
  """Validates one tile and returns the dict TFDS encodes with example_features.

  Args:
    tile_id: the tile's name.
    image: uint8 (H, W, 3) RGB.
    aux: uint8 (H, W, C).
    mask: uint8 (H, W, 1) with values 0/1.
    bounds: (west, south, east, north) degrees, or None when unknown (NaN x4).
    source: path named in error messages (the tile's image file or source raster).
    road_lines: for builders with vector labels, the tile's road centrelines, each float
      (N >= 2, 2) (x, y) tile pixels (see the module docstring); None: no 'road_lines'.

  Returns:
    {'image': PNG bytes, 'aux': PNG bytes or uint8 array, 'mask': PNG bytes,
     'tile_id': str, 'bounds': float64 (4,)}, plus 'road_lines': JSON text when given.
  """
  where = source if source is not None else tile_id
  for name, array, channels in (('image', image, (3,)), ('aux', aux, None),
                                ('mask', mask, (1,))):
    if array.dtype != np.uint8 or array.ndim != 3:
      raise DatasetFileError(
          where, f'{name} must be uint8 (H, W, C), got {array.dtype} {array.shape}')
    if channels is not None and array.shape[-1] not in channels:
      raise DatasetFileError(
          where, f'{name} must have {channels[0]} channel(s), got {array.shape}')
  sizes = {name: a.shape[:2] for name, a in
           (('image', image), ('aux', aux), ('mask', mask))}
  if len(set(sizes.values())) != 1:
    raise SizeMismatchError(where, f'sizes differ between rasters: {sizes}')
  if mask.size and mask.max() > 1:
    raise DatasetFileError(where, f'mask values must be 0/1, found {mask.max()}')
  if bounds is None:
    bounds_array = NAN_BOUNDS.copy()
  else:
    bounds_array = np.asarray(bounds, dtype=np.float64).reshape(-1)
    if bounds_array.shape != (4,):
      raise DatasetFileError(where, f'bounds must be 4 numbers, got {bounds}')
    finite = np.isfinite(bounds_array)
    if not (finite.all() or np.isnan(bounds_array).all()):
      raise DatasetFileError(
          where, f'bounds must be 4 finite numbers or NaN x4 (unknown), got {bounds}')
  aux_value = encode_png(aux) if aux.shape[-1] in PNG_CHANNELS else aux
  example = {
      'image': encode_png(image),
      'aux': aux_value,
      'mask': encode_png(mask),
      'tile_id': str(tile_id),
      'bounds': bounds_array,
  }
  if road_lines is not None:
    for index, line in enumerate(road_lines):
      line = np.asarray(line, np.float64)
      if line.ndim != 2 or line.shape[0] < 2 or line.shape[1] != 2 or not np.all(
          np.isfinite(line)):
        raise DatasetFileError(where, f'road line {index} must be (N >= 2, 2) finite pixel '
                               f'coordinates, got shape {line.shape}')
    example[ROAD_LINES_FEATURE] = road_lines_json(road_lines)
  return example


# ---------------------------------------------------------------------------
# Reading source files.


def read_image(path: os.PathLike | str, *, mode: str) -> np.ndarray:
  """Reads an image file fully (cmmp_jax.data.reading), with errors that name the file.

  Args:
    path: image file, an extension of reading.IMAGE_EXTENSIONS.
    mode: 'rgb' -> uint8 (H, W, 3) (reading.to_rgb_uint8: gray is replicated,
      alpha dropped); 'gray' -> uint8 (H, W, 1) (reading.to_channels_uint8:
      colour becomes luma, 0.299 R + 0.587 G + 0.114 B, as OpenCV's
      IMREAD_GRAYSCALE does). Samples wider than 8 bits follow reading's
      'bit_depth' rule.

  Raises:
    MissingFileError: the file does not exist.
    UnreadableImageError: not an image, truncated, or values reading cannot map.
  """
  path = pathlib.Path(path)
  if mode not in ('rgb', 'gray'):
    raise ValueError(f"mode must be 'rgb' or 'gray', got {mode!r}")
  if not path.is_file():
    raise MissingFileError(path)
  try:
    raster = reading.read_raster(path)
    if mode == 'rgb':
      return reading.to_rgb_uint8(raster)
    return reading.to_channels_uint8(raster, 1)
  except reading.ReadError as error:
    raise UnreadableImageError(error.path, error.problem) from error


def binarize_mask(
    gray: np.ndarray, *, path: os.PathLike | str, road_is_zero: bool = False
) -> np.ndarray:
  """Turns a gray mask file's values into uint8 (H, W, 1) with 1 = road.

  Rule: a file whose values are all 0/1 is read as 0/1; any other file as 0/255
  thresholded at 128 (the release's x / 255 >= 0.5, which also cleans JPEG-ish
  edge values). With road_is_zero (TLCGIS, road stored as 0) the result is
  inverted after that.

  Args:
    gray: uint8 (H, W) or (H, W, 1).
    path: the mask file, for error messages.
    road_is_zero: True when road pixels are stored as 0.
  """
  gray = np.asarray(gray)
  if gray.ndim == 2:
    gray = gray[..., None]
  if gray.dtype != np.uint8 or gray.ndim != 3 or gray.shape[-1] != 1:
    raise UnreadableImageError(
        path, f'mask must be 8-bit gray, got {gray.dtype} {gray.shape}')
  if gray.size and gray.max() <= 1:
    foreground = gray == 1
  else:
    foreground = gray >= 128
  road = ~foreground if road_is_zero else foreground
  return road.astype(np.uint8)


def check_same_size(rasters: Mapping[str, np.ndarray]) -> None:
  """Raises SizeMismatchError naming the files whose heights/widths differ.

  Args:
    rasters: file path -> array (H, W, ...), in the order to report.
  """
  items = list(rasters.items())
  if not items:
    return
  first_path, first = items[0]
  for path, array in items[1:]:
    if array.shape[:2] != first.shape[:2]:
      raise SizeMismatchError(
          path, f'size {array.shape[1]}x{array.shape[0]} (WxH) differs from '
          f'{first.shape[1]}x{first.shape[0]} of {first_path}')


def find_tile_file(
    directory: os.PathLike | str,
    stems: Sequence[str],
    extensions: Sequence[str] = reading.IMAGE_EXTENSIONS,
) -> pathlib.Path:
  """The one file named {stem}{ext} in directory, for the given stems/extensions.

  Raises:
    MissingFileError: no candidate exists (the message lists what was tried).
    DatasetFileError: several candidates exist, so the tile is ambiguous.
  """
  directory = pathlib.Path(directory)
  candidates = [directory / f'{stem}{ext}' for stem in stems for ext in extensions]
  found = [path for path in candidates if path.is_file()]
  if not found:
    tried = ', '.join(f'{stem}{{{",".join(extensions)}}}' for stem in stems)
    raise MissingFileError(directory / f'{stems[0]}{extensions[0]}',
                           f'file not found (tried {tried} in {directory})')
  if len(found) > 1:
    raise DatasetFileError(
        found[0], f'ambiguous tile: several files match {[p.name for p in found]}')
  return found[0]


def require_dir(path: os.PathLike | str, what: str) -> pathlib.Path:
  """Returns path as a Path, raising MissingFileError when it is not a folder."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise MissingFileError(path, f'folder not found ({what})')
  return path


def read_id_list(path: os.PathLike | str) -> list[str]:
  """Tile ids of a split file: one per line, blanks skipped, order kept.

  A leading folder and a trailing image extension on a line ('rgb/a.png') are
  removed so lists of file names work too.

  Raises:
    MissingFileError: the file does not exist.
    SplitDefinitionError: the file lists no id, or an id twice.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingFileError(path, 'split file not found')
  ids = []
  for line in path.read_text().splitlines():
    tile_id = line.strip()
    if not tile_id:
      continue
    tile_id = tile_id.replace('\\', '/').rsplit('/', 1)[-1]  # 'rgb/a.png' -> 'a.png'
    stem, ext = os.path.splitext(tile_id)
    if ext.lower() in reading.IMAGE_EXTENSIONS:
      tile_id = stem
    ids.append(tile_id)
  if not ids:
    raise SplitDefinitionError(path, 'split file lists no tile id')
  seen = set()
  for tile_id in ids:
    if tile_id in seen:
      raise SplitDefinitionError(path, f'tile id {tile_id!r} is listed twice')
    seen.add(tile_id)
  return ids


def read_tile_files(
    tile_id: str,
    image_path: os.PathLike | str,
    aux_path: os.PathLike | str,
    mask_path: os.PathLike | str,
    *,
    road_is_zero: bool = False,
    bounds: Sequence[float] | None = None,
    image_transform=None,
) -> dict:
  """Reads one tile stored as three image files and returns its example dict.

  Args:
    tile_id: the tile's name.
    image_path: RGB image file; aux_path: 1-channel raster (heat-map, lidar),
      colour files are turned into luma; mask_path: road mask (see binarize_mask).
    road_is_zero: the mask stores road as 0 (TLCGIS).
    bounds: (west, south, east, north) degrees or None.
    image_transform: optional callable uint8 (H, W, 3) -> uint8 (H, W, 3)
      applied to the image after validation (e.g. fog).
  """
  image = read_image(image_path, mode='rgb')
  aux = read_image(aux_path, mode='gray')
  mask_gray = read_image(mask_path, mode='gray')
  check_same_size({image_path: image, aux_path: aux, mask_path: mask_gray})
  mask = binarize_mask(mask_gray, path=mask_path, road_is_zero=road_is_zero)
  if image_transform is not None:
    image = np.asarray(image_transform(image))
    if image.dtype != np.uint8 or image.shape[:2] != mask.shape[:2]:
      raise DatasetFileError(
          image_path, f'image transform returned {image.dtype} {image.shape}')
  return make_example(tile_id, image, aux, mask, bounds, source=image_path)


# ---------------------------------------------------------------------------
# Seeded splits.


def seeded_split(
    ids: Iterable[str], fractions: Mapping[str, float], seed: int,
    *, rest: str = 'train', source: os.PathLike | str = '<ids>',
) -> dict[str, list[str]]:
  """Splits ids by a seeded permutation that ignores the order they came in.

  The ids are sorted, permuted with numpy's default_rng(seed), and the split
  named first in `fractions` takes the first ceil(fraction * n) of them (as
  scikit-learn's train_test_split counts its test part), the next split the
  following ones, and `rest` takes what remains. Each returned list is sorted.

  Raises:
    SplitDefinitionError: duplicate ids, bad fractions, or an empty split.
  """
  ids = list(ids)
  unique = sorted(set(ids))
  if len(unique) != len(ids):
    raise SplitDefinitionError(source, 'ids contain duplicates')
  if any(not 0.0 <= f < 1.0 for f in fractions.values()):
    raise SplitDefinitionError(source, f'fractions must be in [0, 1): {dict(fractions)}')
  permuted = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
  result, start = {}, 0
  for name, fraction in fractions.items():
    count = math.ceil(fraction * len(unique) - 1e-9)
    result[name] = sorted(permuted[start:start + count])
    start += count
  result[rest] = sorted(permuted[start:])
  empty = [name for name, members in result.items()
           if not members and (name == rest or fractions[name] > 0)]
  if empty:
    raise SplitDefinitionError(
        source, f'{len(unique)} tile(s) are too few for splits {dict(fractions)} '
        f'(+ {rest!r}); empty: {empty}')
  return result


def seeded_validation_split(
    ids: Iterable[str], fraction: float, seed: int,
    *, source: os.PathLike | str = '<ids>',
) -> tuple[list[str], list[str]]:
  """(train_ids, validation_ids): `fraction` of ids, seeded (see seeded_split)."""
  parts = seeded_split(ids, {'validation': fraction}, seed, source=source)
  return parts['train'], parts['validation']


# ---------------------------------------------------------------------------
# Builder base class.


class RoadTileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """GeneratorBasedBuilder writing the shared example contract as array_record.

  Subclasses set VERSION, BUILDER_CONFIGS, MANUAL_DOWNLOAD_INSTRUCTIONS,
  implement _split_generators/_generate_examples, and give their builder config
  an `aux_channels` attribute (or override the property) when aux has C != 1.
  Those whose examples carry vector labels ('road_lines') set ROAD_LINES = True.
  """

  ROAD_LINES = False

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # array_record (random access for grain) unless the caller asks otherwise.
    super().__init__(file_format=file_format or DEFAULT_FILE_FORMAT, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS finds a builder's file through importlib.resources, which fails for
    # builders imported from a namespace package (no __init__.py above them);
    # the class's own source file is what it wants.
    return epath.Path(inspect.getfile(cls))

  @property
  def aux_channels(self) -> int:
    return int(getattr(self.builder_config, 'aux_channels', 1))

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=example_features(self.aux_channels, road_lines=self.ROAD_LINES),
        homepage=getattr(self, 'HOMEPAGE', None),
        citation=getattr(self, 'CITATION', None),
        # metadata.json in the version folder; loaded back with the dataset.
        metadata=tfds.core.MetadataDict(),
    )

  # What a build records when its _split_generators records nothing more specific: images read
  # by reading's rules (uint8 files), aux rasters read from files.
  DEFAULT_PREPARATION = preparation_lib.InputPreparation(aux='files')

  def _download_and_prepare(self, *args, **kwargs):
    # Set before the split generators run, which may replace it (record_preparation); TFDS
    # writes the metadata with dataset_info.json once every split is written. (A subclass
    # whose _info declares no metadata records nothing.)
    if self.info.metadata is not None:
      self.info.metadata[preparation_lib.PREPARATION_KEY] = self.DEFAULT_PREPARATION.to_json()
    return super()._download_and_prepare(*args, **kwargs)

  def record_preparation(self, preparation: preparation_lib.InputPreparation,
                         **extra) -> None:
    """Stores how the inputs were prepared (and `extra` JSON-ready facts of the build, e.g.
    counts) in the dataset's metadata; call from _split_generators, before any example."""
    if self.info.metadata is None:
      raise TypeError(f'{type(self).__name__}._info declares no metadata (MetadataDict) to '
                      'record the input preparation in')
    self.info.metadata[preparation_lib.PREPARATION_KEY] = preparation.to_json()
    for key, value in extra.items():
      self.info.metadata[key] = value
