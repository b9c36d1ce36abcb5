"""TFDS builder of BJRoad (Sun et al., CVPR 2019): Beijing, 348 tiles of 1024x1024.

Configs
  release           CMMPNet release layout, pre-rendered heat-maps:
                      {manual_dir}/{train_val,test}/image/{x}_{y}_sat.png
                      {manual_dir}/{train_val,test}/mask/{x}_{y}_mask.png   (0/255)
                      {manual_dir}/{train_val,test}/gps/{x}_{y}_gps.jpg
  raw_gps           Sun et al.'s original layout, heat-map rendered here by
                    cmmp_jax.data.heatmap from the raw GPS records:
                      {manual_dir}/{train_val,test}/{image,mask}/ as above, and either
                      {manual_dir}/GPS/patch/{x}_{y}_gps.pkl   per-tile tables, lat = pixel
                          ROW and lon = pixel COLUMN in [0, tile size)       ('patch'), or
                      {manual_dir}/GPS/beijing_gps_dir_speed_interval_sorted.pkl (city
                          table, lat/lon WGS84 degrees) plus
                      {manual_dir}/coordinate/{x}_{y}_coor.txt (tile corners, WGS84) ('table').
                    Patches win when both exist (config field gps_source='auto').
  raw_gps_channels  as raw_gps, aux = heatmap.CHANNEL_NAMES (heat-map, mean/max speed,
                    mean interval, heading sin/cos), 6 channels.
  foggy             release layout, image fogged by cmmp_jax.data.fog.add_fog with a
                    per-tile seed crc32(f'{fog_seed}/{tile_id}').

GPS tables (patch or city): pandas pickles (.pkl/.pickle; needs pandas, which this
project does not install), or the same columns as .npz (one array per column) or
.csv (header row). Columns, case-insensitive: lat, lon (required), speed (m/min),
timeinterval (s), dir (degrees) (required by the channels they feed); others are
ignored. NaN lat/lon, or a patch point outside its tile, stops the build.

Coordinate files (_coor.txt; the format is not published): every number in the
file is read (decimal/scientific, any separators; digits glued to a word, as in
'lat1', are not numbers); 4 numbers or 2-5 corner pairs.
Numbers above 90 in magnitude are longitudes, the others latitudes (true for
Beijing, 116E 40N), so any order works there; when that cannot decide (|lon| <= 90)
the numbers are read as (lon, lat) pairs, e.g. west south east north. The tile's
bounds are the min/max of the longitudes and latitudes. _coor2.txt (GCJ-02) is
not used. Release/foggy builds use the coordinate files for 'bounds' when the
coordinate/ folder exists (NaN for tiles without a file); raw 'table' builds
require them.

Splits: train and validation = train_val split by a seeded permutation of the
sorted tile ids (validation_fraction 0.1, i.e. 28 of 278, split_seed 0); test.
Masks are stored as 0/1 (files 0/255, thresholded at 128).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import pickle
import re
import zlib
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cmmp_jax.data import fog as fog_lib
from cmmp_jax.data import heatmap as heatmap_lib
from cmmp_jax.data import preparation as preparation_lib
from cmmp_jax.data import reading
from data_builders import common

SOURCE_SPLITS = ('train_val', 'test')
TABLE_NAME = 'beijing_gps_dir_speed_interval_sorted'
TABLE_EXTENSIONS = ('.pkl', '.pickle', '.npz', '.csv')
# Column of the GPS table each render_channels input comes from.
ATTRIBUTE_COLUMNS = {'speed': 'speed', 'interval': 'timeinterval', 'heading_deg': 'dir'}
# Which render_channels input each channel needs (None: positions only).
CHANNEL_INPUTS = {
    'heatmap': None, 'mean_speed': 'speed', 'max_speed': 'speed',
    'mean_interval': 'interval', 'heading_sin': 'heading_deg', 'heading_cos': 'heading_deg',
}
# A number not glued to a word ('lat1=40.1' yields 40.1 only).
_NUMBER = re.compile(r'(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?')


@dataclasses.dataclass
class BjroadConfig(tfds.core.BuilderConfig):
  """How to build BJRoad.

  Attributes:
    gps: 'release' (read {id}_gps.jpg heat-maps) or 'raw' (render raw GPS records).
    gps_source: for gps='raw': 'auto', 'patch' or 'table' (see module docstring).
    channels: aux channels rendered from raw GPS (names of heatmap.CHANNEL_NAMES).
    fog: fog the images (cmmp_jax.data.fog.add_fog, seeded per tile).
    fog_seed: mixed into every tile's fog seed.
    validation_fraction: share of train_val held out as validation.
    split_seed: seed of the validation permutation.
    table_name: stem of the city-wide GPS table in {manual_dir}/GPS/ or manual_dir.
  """
  gps: str = 'release'
  gps_source: str = 'auto'
  channels: tuple[str, ...] = ('heatmap',)
  fog: bool = False
  fog_seed: int = 0
  validation_fraction: float = 0.1
  split_seed: int = 0
  table_name: str = TABLE_NAME

  @property
  def aux_channels(self) -> int:
    return len(self.channels) if self.gps == 'raw' else 1


# ---------------------------------------------------------------------------
# Layout.


def find_root(manual_dir: pathlib.Path) -> pathlib.Path:
  """The folder holding train_val/ and test/ (manual_dir or one level below)."""
  manual_dir = pathlib.Path(manual_dir)
  if (manual_dir / 'train_val').is_dir():
    return manual_dir
  nested = [p for p in sorted(manual_dir.glob('*/train_val')) if p.is_dir()]
  if len(nested) == 1:
    return nested[0].parent
  raise common.MissingFileError(manual_dir / 'train_val',
                                'BJRoad folder not found (expected train_val/ and test/)')


def list_ids(folder: pathlib.Path, suffix: str) -> dict[str, pathlib.Path]:
  """{tile id: file} of the files {id}_{suffix}.{image extension} in folder."""
  common.require_dir(folder, f'BJRoad {folder.name}/ folder')
  pattern = re.compile(rf'^(.+)_{suffix}(\.[A-Za-z]+)$')
  found: dict[str, pathlib.Path] = {}
  for path in sorted(folder.iterdir()):
    match = pattern.match(path.name)
    if not match or match.group(2).lower() not in reading.IMAGE_EXTENSIONS:
      continue
    tile_id = match.group(1)
    if tile_id in found:
      raise common.DatasetFileError(
          path, f'tile {tile_id!r} has two {suffix} files ({found[tile_id].name})')
    found[tile_id] = path
  return found


def list_tiles(split_dir: pathlib.Path, with_gps_images: bool) -> list[dict]:
  """Tiles of one source split: [{'id', 'image', 'mask', 'gps' (or None)}], sorted by id.

  Raises MissingFileError when an image has no mask (or heat-map) or vice versa.
  """
  images = list_ids(split_dir / 'image', 'sat')
  masks = list_ids(split_dir / 'mask', 'mask')
  gps = list_ids(split_dir / 'gps', 'gps') if with_gps_images else {}
  if not images and not masks:
    raise common.MissingFileError(split_dir / 'image', 'no {id}_sat.png tiles found')
  tiles = []
  for tile_id in sorted(set(images) | set(masks)):
    if tile_id not in images:
      raise common.MissingFileError(split_dir / 'image' / f'{tile_id}_sat.png',
                                    f'image missing for mask {masks[tile_id].name}')
    if tile_id not in masks:
      raise common.MissingFileError(split_dir / 'mask' / f'{tile_id}_mask.png',
                                    f'mask missing for image {images[tile_id].name}')
    if with_gps_images and tile_id not in gps:
      raise common.MissingFileError(split_dir / 'gps' / f'{tile_id}_gps.jpg',
                                    f'GPS heat-map missing for image {images[tile_id].name}')
    tiles.append({'id': tile_id, 'image': images[tile_id], 'mask': masks[tile_id],
                  'gps': gps.get(tile_id)})
  return tiles


def image_size(path: pathlib.Path) -> tuple[int, int]:
  """(height, width) of an image file from its header."""
  try:
    with Image.open(path) as image:
      width, height = image.size
  except (OSError, ValueError, SyntaxError) as error:
    raise common.UnreadableImageError(path, f'cannot read image header ({error})') from error
  return height, width


# ---------------------------------------------------------------------------
# Coordinate files.


def parse_corner_file(path: pathlib.Path) -> tuple[float, float, float, float]:
  """(west, south, east, north) degrees of a {x}_{y}_coor.txt (see module docstring)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise common.MissingFileError(path, 'tile coordinate file not found')
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as error:
    raise common.DatasetFileError(path, f'cannot read coordinate file ({error})') from error
  numbers = np.array([float(n) for n in _NUMBER.findall(text)], dtype=np.float64)
  if numbers.size < 4 or numbers.size % 2 or numbers.size > 10:
    raise common.DatasetFileError(
        path, f'expected 4 numbers or 2-5 corner pairs, found {numbers.size} numbers')
  if not np.all(np.isfinite(numbers)):
    raise common.DatasetFileError(path, 'coordinates hold NaN or inf')
  is_lon = np.abs(numbers) > 90
  if is_lon.sum() * 2 == numbers.size:
    lons, lats = numbers[is_lon], numbers[~is_lon]
  else:
    lons, lats = numbers[0::2], numbers[1::2]
  west, east, south, north = lons.min(), lons.max(), lats.min(), lats.max()
  if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
    raise common.DatasetFileError(
        path, f'corners {numbers.tolist()} do not give a lon/lat box '
        f'(west {west}, south {south}, east {east}, north {north})')
  return float(west), float(south), float(east), float(north)


def find_coordinate_file(root: pathlib.Path, split_dir: pathlib.Path,
                         tile_id: str) -> pathlib.Path | None:
  for folder in (root / 'coordinate', split_dir / 'coordinate'):
    path = folder / f'{tile_id}_coor.txt'
    if path.is_file():
      return path
  return None


def coordinate_folder_exists(root: pathlib.Path) -> bool:
  return any((folder / 'coordinate').is_dir()
             for folder in [root] + [root / s for s in SOURCE_SPLITS])


# ---------------------------------------------------------------------------
# GPS tables.


def read_gps_table(path: pathlib.Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
  """Reads the named columns of a GPS table (.pkl/.pickle, .npz or .csv) as float64.

  Args:
    path: table file.
    columns: lower-case column names that must exist ('lat', 'lon', ...).

  Returns:
    {column: float64 (N,)}.

  Raises:
    MissingFileError, DatasetFileError (unreadable, missing column, ragged columns,
    NaN lat/lon, pandas needed but not installed).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise common.MissingFileError(path, 'GPS table not found')
  suffix = path.suffix.lower()
  if suffix in ('.pkl', '.pickle'):
    raw = _read_pickle_table(path)
  elif suffix == '.npz':
    try:
      with np.load(path, allow_pickle=False) as archive:
        raw = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
      raise common.DatasetFileError(path, f'cannot read .npz table ({error})') from error
  elif suffix == '.csv':
    raw = _read_csv_table(path)
  else:
    raise common.DatasetFileError(path, f'unknown GPS table format {suffix!r}')
  by_name = {str(name).strip().lower(): value for name, value in raw.items()}
  missing = [c for c in columns if c not in by_name]
  if missing:
    raise common.DatasetFileError(
        path, f'GPS table lacks column(s) {missing}; it has {sorted(by_name)}')
  table = {}
  for column in columns:
    try:
      values = np.asarray(by_name[column], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
      raise common.DatasetFileError(path, f'column {column!r} is not numeric') from error
    table[column] = values
  lengths = {c: v.size for c, v in table.items()}
  if len(set(lengths.values())) > 1:
    raise common.DatasetFileError(path, f'columns differ in length: {lengths}')
  for column in ('lat', 'lon'):
    if column in table:
      bad = np.flatnonzero(~np.isfinite(table[column]))
      if bad.size:
        raise common.DatasetFileError(
            path, f'{bad.size} record(s) have a NaN/inf {column} (first at row {bad[0]})')
  return table


def _read_pickle_table(path: pathlib.Path) -> dict:
  try:
    with open(path, 'rb') as handle:
      loaded = pickle.load(handle)  # the user's own data set file
  except ModuleNotFoundError as error:
    raise common.DatasetFileError(
        path, f'this pickle needs the {error.name!r} package, which is not installed; '
        f'`pip install pandas`, or save the table as .npz (one array per column) or .csv '
        f'with columns ID,time,lat,lon,dir,speed,timeinterval next to it') from error
  except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as error:
    raise common.DatasetFileError(path, f'cannot unpickle GPS table ({error})') from error
  if isinstance(loaded, dict):
    return loaded
  if hasattr(loaded, 'columns') and hasattr(loaded, '__getitem__'):  # pandas DataFrame
    return {name: np.asarray(loaded[name]) for name in loaded.columns}
  raise common.DatasetFileError(
      path, f'expected a DataFrame or a dict of columns, got {type(loaded).__name__}')


def _read_csv_table(path: pathlib.Path) -> dict:
  try:
    with open(path, newline='') as handle:
      header = handle.readline().strip().split(',')
    data = np.genfromtxt(path, delimiter=',', skip_header=1, dtype=np.float64,
                         ndmin=2, invalid_raise=True)
  except (OSError, ValueError) as error:
    raise common.DatasetFileError(path, f'cannot read .csv table ({error})') from error
  if data.size == 0:
    data = np.zeros((0, len(header)))
  if data.shape[1] != len(header):
    raise common.DatasetFileError(
        path, f'header has {len(header)} columns, rows have {data.shape[1]}')
  return {name: data[:, index] for index, name in enumerate(header) if name.strip()}


def table_columns(channels: Sequence[str]) -> list[str]:
  """Table columns needed to render the channels."""
  columns = ['lat', 'lon']
  for channel in channels:
    source = CHANNEL_INPUTS[channel]
    if source is not None and ATTRIBUTE_COLUMNS[source] not in columns:
      columns.append(ATTRIBUTE_COLUMNS[source])
  return columns


def render_aux(cols, rows, height: int, width: int, table: dict,
               selection, channels: Sequence[str]) -> np.ndarray:
  """uint8 (H, W, C) of the channels from points (cols, rows) = table rows `selection`."""
  attributes = {key: table[column][selection] for key, column in ATTRIBUTE_COLUMNS.items()
                if column in table}
  needed = {CHANNEL_INPUTS[c] for c in channels} - {None}
  rendered = heatmap_lib.render_channels(
      cols, rows, height, width, channels=list(channels),
      **{key: value for key, value in attributes.items() if key in needed})
  return heatmap_lib.heatmap_to_uint8(rendered)


def find_table(root: pathlib.Path, name: str) -> pathlib.Path | None:
  for folder in (root / 'GPS', root):
    for ext in TABLE_EXTENSIONS:
      if (folder / f'{name}{ext}').is_file():
        return folder / f'{name}{ext}'
  return None


def find_patch(root: pathlib.Path, tile_id: str) -> pathlib.Path:
  return common.find_tile_file(root / 'GPS' / 'patch', [f'{tile_id}_gps'], TABLE_EXTENSIONS)


class LonSortedTable:
  """A city GPS table sorted by longitude, to pick one tile's points quickly."""

  def __init__(self, table: dict[str, np.ndarray]):
    self.order = np.argsort(table['lon'], kind='stable')
    self.sorted_lon = table['lon'][self.order]
    self.table = table

  def rows_in(self, bounds) -> np.ndarray:
    """Indices of the table rows with west <= lon <= east and south <= lat <= north."""
    west, south, east, north = bounds
    start = np.searchsorted(self.sorted_lon, west, side='left')
    stop = np.searchsorted(self.sorted_lon, east, side='right')
    candidates = self.order[start:stop]
    lat = self.table['lat'][candidates]
    return np.sort(candidates[(lat >= south) & (lat <= north)])


# ---------------------------------------------------------------------------
# Builder.


def tile_fog_seed(fog_seed: int, tile_id: str) -> int:
  """Per-tile fog seed: crc32 of '{fog_seed}/{tile_id}' (stable across runs)."""
  return zlib.crc32(f'{fog_seed}/{tile_id}'.encode('utf-8'))


class Bjroad(common.RoadTileBuilder):
  """BJRoad aerial images + GPS (Sun et al., CVPR 2019)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'float64 bounds; input preparation recorded in the metadata.'}
  BUILDER_CONFIGS = [
      BjroadConfig(name='release', gps='release',
                   description='CMMPNet release layout with pre-rendered heat-maps.'),
      BjroadConfig(name='raw_gps', gps='raw', channels=('heatmap',),
                   description='Heat-map rendered from the raw GPS records.'),
      BjroadConfig(name='raw_gps_channels', gps='raw',
                   channels=tuple(heatmap_lib.CHANNEL_NAMES),
                   description='Heat-map + speed, interval and heading channels from raw GPS.'),
      BjroadConfig(name='foggy', gps='release', fog=True,
                   description='Release layout, images fogged per tile (seeded).'),
  ]
  CITATION = """@inproceedings{sun2019leveraging,
  title={Leveraging Crowdsourced GPS Data for Road Extraction from Aerial Imagery},
  author={Sun, Tao and Di, Zonglin and Che, Pengyu and Liu, Chun and Wang, Yin},
  booktitle={CVPR}, pages={7509--7518}, year={2019}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  BJRoad is distributed on request by Sun et al. (CVPR 2019). Place it in manual_dir:
    release / foggy:  {train_val,test}/{image,mask,gps}/{x}_{y}_{sat,mask,gps}.{png,png,jpg}
    raw_gps*:         {train_val,test}/{image,mask}/ as above and either
                      GPS/patch/{x}_{y}_gps.pkl, or
                      GPS/beijing_gps_dir_speed_interval_sorted.pkl + coordinate/{x}_{y}_coor.txt
  Pickles need pandas; .npz or .csv tables with the same columns work without it.
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    if config.gps not in ('release', 'raw'):
      raise ValueError(f"BjroadConfig.gps must be 'release' or 'raw', got {config.gps!r}")
    unknown = [c for c in config.channels if c not in CHANNEL_INPUTS]
    if unknown:
      raise ValueError(f'unknown channel(s) {unknown}; known: {list(CHANNEL_INPUTS)}')
    root = find_root(pathlib.Path(dl_manager.manual_dir))
    source = {name: list_tiles(root / name, with_gps_images=config.gps == 'release')
              for name in SOURCE_SPLITS}
    by_id = {tile['id']: tile for tile in source['train_val']}
    train_ids, val_ids = common.seeded_validation_split(
        by_id, config.validation_fraction, config.split_seed, source=root / 'train_val')
    splits = {
        'train': [by_id[i] for i in train_ids],
        'validation': [by_id[i] for i in val_ids],
        'test': source['test'],
    }
    splits = {name: tiles for name, tiles in splits.items() if tiles}  # fraction 0: no split
    for name, tiles in splits.items():
      split_dir = root / ('test' if name == 'test' else 'train_val')
      for tile in tiles:
        tile['split_dir'] = split_dir
    if config.gps == 'release':
      return {name: self._generate_examples(self._release_examples(root, tiles))
              for name, tiles in splits.items()}
    if tuple(config.channels) == ('heatmap',):
      # Heat-maps rendered here from lon/lat GPS, each tile normalised by its own maximum:
      # what prediction renders from a GPS CSV on a tile with a bounds sidecar. (The tile
      # size is not known before the images are read; prediction takes the dataset's.)
      self.record_preparation(preparation_lib.InputPreparation(aux='gps_heatmap'))
    return self._raw_split_generators(root, splits)

  def _generate_examples(self, examples: Iterator):
    """Yields (tile id, example dict) from one of the *_examples generators below."""
    yield from examples

  # Release layout (optionally fogged).

  def _release_examples(self, root: pathlib.Path, tiles: list[dict]):
    config = self.builder_config
    with_bounds = coordinate_folder_exists(root)
    for tile in tiles:
      bounds = None
      if with_bounds:
        path = find_coordinate_file(root, tile['split_dir'], tile['id'])
        bounds = parse_corner_file(path) if path is not None else None
      transform = None
      if config.fog:
        seed = tile_fog_seed(config.fog_seed, tile['id'])
        transform = lambda image, seed=seed: fog_lib.add_fog(image, seed=seed)
      yield tile['id'], common.read_tile_files(
          tile['id'], tile['image'], tile['gps'], tile['mask'], bounds=bounds,
          image_transform=transform)

  # Raw GPS.

  def _raw_split_generators(self, root: pathlib.Path, splits: dict[str, list[dict]]):
    config = self.builder_config
    columns = table_columns(config.channels)
    patch_dir = root / 'GPS' / 'patch'
    table_path = find_table(root, config.table_name)
    kind = config.gps_source
    if kind == 'auto':
      kind = 'patch' if patch_dir.is_dir() else 'table' if table_path else None
      if kind is None:
        raise common.MissingFileError(
            patch_dir, f'no raw GPS found: neither GPS/patch/ nor '
            f'GPS/{config.table_name}{{{",".join(TABLE_EXTENSIONS)}}} exists in {root}')
    if kind == 'patch':
      common.require_dir(patch_dir, 'BJRoad per-tile GPS patches')
      for tiles in splits.values():
        for tile in tiles:
          tile['patch'] = find_patch(root, tile['id'])
      return {name: self._generate_examples(self._patch_examples(tiles, columns))
              for name, tiles in splits.items()}
    if kind != 'table':
      raise ValueError(f"gps_source must be 'auto', 'patch' or 'table', got {kind!r}")
    if table_path is None:
      raise common.MissingFileError(root / 'GPS' / f'{config.table_name}.pkl',
                                    'city-wide GPS table not found')
    for tiles in splits.values():
      for tile in tiles:
        path = find_coordinate_file(root, tile['split_dir'], tile['id'])
        if path is None:
          raise common.MissingFileError(root / 'coordinate' / f'{tile["id"]}_coor.txt',
                                        'tile coordinate file not found')
        tile['bounds'] = parse_corner_file(path)
    table = read_gps_table(table_path, columns)
    logging.info('BJRoad: %d GPS records from %s', table['lat'].size, table_path)
    # The heat-map alone is rendered in bulk; attribute channels need each tile's rows.
    index = None if tuple(config.channels) == ('heatmap',) else LonSortedTable(table)
    return {name: self._generate_examples(self._table_examples(tiles, table, index))
            for name, tiles in splits.items()}

  def _read_image_and_mask(self, tile: dict):
    image = common.read_image(tile['image'], mode='rgb')
    mask_gray = common.read_image(tile['mask'], mode='gray')
    common.check_same_size({tile['image']: image, tile['mask']: mask_gray})
    return image, common.binarize_mask(mask_gray, path=tile['mask'])

  def _patch_examples(self, tiles: list[dict], columns: list[str]):
    channels = self.builder_config.channels
    for tile in tiles:
      image, mask = self._read_image_and_mask(tile)
      height, width = mask.shape[:2]
      table = read_gps_table(tile['patch'], columns)
      rows, cols = table['lat'], table['lon']
      outside = np.flatnonzero((cols < 0) | (cols >= width) | (rows < 0) | (rows >= height))
      if outside.size:
        first = outside[0]
        raise common.DatasetFileError(
            tile['patch'], f'{outside.size} point(s) lie outside the {width}x{height} tile '
            f'(first at row {first}: lat/row={rows[first]}, lon/col={cols[first]})')
      aux = render_aux(cols, rows, height, width, table, slice(None), channels)
      yield tile['id'], common.make_example(tile['id'], image, aux, mask, None,
                                            source=tile['image'])

  def _table_examples(self, tiles: list[dict], table: dict, index: LonSortedTable | None):
    channels = tuple(self.builder_config.channels)
    if index is None:
      yield from self._bulk_heatmap_examples(tiles, table)
      return
    for tile in tiles:
      image, mask = self._read_image_and_mask(tile)
      height, width = mask.shape[:2]
      selection = index.rows_in(tile['bounds'])
      cols, rows = heatmap_lib.lonlat_to_pixel(
          table['lon'][selection], table['lat'][selection], tile['bounds'], height, width)
      aux = render_aux(cols, rows, height, width, table, selection, channels)
      yield tile['id'], common.make_example(tile['id'], image, aux, mask, tile['bounds'],
                                            source=tile['image'])

  def _bulk_heatmap_examples(self, tiles: list[dict], table: dict) -> Iterator:
    """One bucketing pass of the city table per tile size (heatmap.iter_render_tiles)."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for tile in tiles:
      groups.setdefault(image_size(tile['image']), []).append(tile)
    for (height, width), group in groups.items():
      bounds = np.array([tile['bounds'] for tile in group], dtype=np.float64)
      for index, heatmap in heatmap_lib.iter_render_tiles(
          table['lon'], table['lat'], bounds, height, width):
        tile = group[index]
        image, mask = self._read_image_and_mask(tile)
        aux = heatmap_lib.heatmap_to_uint8(heatmap)[..., None]
        yield tile['id'], common.make_example(tile['id'], image, aux, mask, tile['bounds'],
                                              source=tile['image'])
