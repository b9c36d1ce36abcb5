"""Tests of data_builders.bjroad (and the shared helpers of data_builders.common).

Every test builds a tiny fake BJRoad tree in tmp_path in the published layouts.
"""
import math
import pathlib
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cmmp_jax.data import fog as fog_lib
from cmmp_jax.data import heatmap as heatmap_lib
from data_builders import common
from data_builders.bjroad import Bjroad, BjroadConfig
from data_builders.bjroad import bjroad as bjroad_lib
from builder_testing import decoded, read_split

SIZE = 32


def write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def make_release_tree(root: pathlib.Path, train_val_ids, test_ids, *, gps=True, seed=0):
  """{train_val,test}/{image,mask,gps}/ with random tiles; returns {id: split folder}."""
  rng = np.random.default_rng(seed)
  folders = {}
  for split, ids in (('train_val', train_val_ids), ('test', test_ids)):
    for tile_id in ids:
      base = root / split
      write_png(base / 'image' / f'{tile_id}_sat.png',
                rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
      write_png(base / 'mask' / f'{tile_id}_mask.png',
                (rng.random((SIZE, SIZE)) < 0.3).astype(np.uint8) * 255)
      if gps:
        (base / 'gps').mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(
            base / 'gps' / f'{tile_id}_gps.jpg', quality=90)
      folders[tile_id] = base
  return folders


def build(tmp_path, manual, config):
  builder = Bjroad(data_dir=str(tmp_path / 'data'), config=config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder




TRAIN_VAL = [f'{x}_{y}' for x in range(3) for y in range(4)]  # 12 tiles -> 2 validation
TEST = ['9_0', '9_1']


def test_release_reads_back_identical_pixels(tmp_path):
  folders = make_release_tree(tmp_path / 'manual', TRAIN_VAL, TEST)
  builder = build(tmp_path, tmp_path / 'manual', 'release')
  assert builder.info.file_format.value == 'array_record'
  splits = {name: read_split(builder, name) for name in ('train', 'validation', 'test')}
  assert len(splits['validation']) == math.ceil(0.1 * len(TRAIN_VAL)) == 2
  assert len(splits['train']) == 10 and sorted(splits['test']) == TEST
  assert sorted(set(splits['train']) | set(splits['validation'])) == sorted(TRAIN_VAL)
  expected_train, expected_val = common.seeded_validation_split(TRAIN_VAL, 0.1, 0)
  assert sorted(splits['validation']) == expected_val
  for examples in splits.values():
    for tile_id, ex in examples.items():
      base = folders[tile_id]
      np.testing.assert_array_equal(
          ex['image'], decoded(base / 'image' / f'{tile_id}_sat.png', 'RGB'))
      np.testing.assert_array_equal(
          ex['aux'][..., 0], decoded(base / 'gps' / f'{tile_id}_gps.jpg', 'L'))
      mask_file = decoded(base / 'mask' / f'{tile_id}_mask.png', 'L')
      np.testing.assert_array_equal(ex['mask'][..., 0], (mask_file == 255).astype(np.uint8))
      assert ex['image'].dtype == ex['aux'].dtype == ex['mask'].dtype == np.uint8
      assert ex['aux'].shape == (SIZE, SIZE, 1) and ex['mask'].shape == (SIZE, SIZE, 1)
      assert ex['bounds'].dtype == np.float64 and np.all(np.isnan(ex['bounds']))


def test_seeded_split_ignores_listing_order_and_counts_like_sklearn():
  ids = [f'{x}_{y}' for x in range(20) for y in range(14)][:278]
  train, val = common.seeded_validation_split(ids, 0.1, seed=3)
  shuffled = list(np.random.default_rng(1).permutation(ids))
  assert common.seeded_validation_split(shuffled, 0.1, seed=3) == (train, val)
  assert len(val) == 28 and len(train) == 250 and not set(train) & set(val)
  assert common.seeded_validation_split(ids, 0.1, seed=4)[1] != val
  with pytest.raises(common.SplitDefinitionError, match='too few'):
    common.seeded_validation_split(['only'], 0.1, seed=0)
  with pytest.raises(common.SplitDefinitionError, match='duplicates'):
    common.seeded_validation_split(['a', 'a', 'b'], 0.1, seed=0)


def test_foggy_images_are_the_seeded_fog_of_the_originals(tmp_path):
  folders = make_release_tree(tmp_path / 'manual', TRAIN_VAL[:4], TEST[:1])
  builder = build(tmp_path, tmp_path / 'manual', 'foggy')
  for tile_id, ex in read_split(builder, 'train').items():
    original = decoded(folders[tile_id] / 'image' / f'{tile_id}_sat.png', 'RGB')
    expected = fog_lib.add_fog(original, seed=bjroad_lib.tile_fog_seed(0, tile_id))
    np.testing.assert_array_equal(ex['image'], expected)
    assert np.abs(ex['image'].astype(int) - original).mean() > 10
  assert bjroad_lib.tile_fog_seed(0, '0_1') != bjroad_lib.tile_fog_seed(0, '0_2')


def write_patch(path, rows, cols, **extra):
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, lat=np.asarray(rows, float), lon=np.asarray(cols, float),
           **{k: np.asarray(v, float) for k, v in extra.items()})


def test_raw_gps_patches_render_hand_computed_heatmap(tmp_path):
  manual = tmp_path / 'manual'
  make_release_tree(manual, ['0_0', '0_1'], ['1_0'], gps=False)
  # Tile 0_0: three records in pixel (row 5, col 7), one in (20, 10). log1p normalisation
  # gives 1 and log 2 / log 4 = 0.5; the 3x3 blur's centre weight is 4/16, edge weight 2/16.
  write_patch(manual / 'GPS' / 'patch' / '0_0_gps.npz', [5, 5.5, 5.9, 20], [7, 7.2, 7.9, 10])
  write_patch(manual / 'GPS' / 'patch' / '0_1_gps.npz', [], [])
  write_patch(manual / 'GPS' / 'patch' / '1_0_gps.npz', [0], [31.5])
  builder = build(tmp_path, manual, 'raw_gps')
  examples = {**read_split(builder, 'train'), **read_split(builder, 'validation')}
  aux = examples['0_0']['aux'][..., 0]
  assert aux[5, 7] == 64          # round(255 * 1 * 4/16) = round(63.75)
  assert aux[5, 8] == 32          # round(255 * 1 * 2/16) = round(31.875)
  assert aux[20, 10] == 32        # round(255 * 0.5 * 4/16)
  assert aux[0, 0] == 0 and aux.sum() == heatmap_lib.heatmap_to_uint8(
      heatmap_lib.render_heatmap([7, 7.2, 7.9, 10], [5, 5.5, 5.9, 20], SIZE, SIZE)).sum()
  assert examples['0_1']['aux'].max() == 0
  assert read_split(builder, 'test')['1_0']['aux'][0, 31, 0] == 64


def test_raw_gps_channels_from_patches(tmp_path):
  manual = tmp_path / 'manual'
  make_release_tree(manual, ['0_0', '0_1'], ['1_0'], gps=False)
  for tile_id in ('0_0', '0_1', '1_0'):
    write_patch(manual / 'GPS' / 'patch' / f'{tile_id}_gps.npz', [3, 3], [4, 4],
                speed=[1275.0, 2550.0], timeinterval=[np.nan, 255.0], dir=[90.0, 90.0])
  builder = build(tmp_path, manual, 'raw_gps_channels')
  ex = read_split(builder, 'test')['1_0']
  assert ex['aux'].shape == (SIZE, SIZE, 6) and ex['aux'].dtype == np.uint8
  by_name = dict(zip(heatmap_lib.CHANNEL_NAMES, ex['aux'][3, 4]))
  assert by_name['mean_speed'] == 191     # mean(0.5, 1.0) * 255 = 191.25
  assert by_name['max_speed'] == 255
  assert by_name['mean_interval'] == 128  # NaN ignored; 255 / 510 * 255 = 127.5 -> 128
  assert by_name['heading_sin'] == 255    # heading 90 deg = east: (1 + sin) / 2 = 1
  assert by_name['heading_cos'] == 128    # (1 + cos 90) / 2 = 0.5


# Nine real rows of BJRoad tile 0_8 (pixel row, col | WGS84 lon, lat), printed by public
# notebooks of iwcyou/TCRender-A-GPS-rendering-method-combing-remote-sensing-and-GPS-data-in-
# road-extraction (see ../shared/realdata/bjroad_format/NOTES.md); the fitted tile mapping
# there is lon = 116.265015 + 5.366e-6 col, lat = 40.024277 - 4.11e-6 row.
BJROAD_0_8_ROWS = [
    (116, 27, 116.26516, 40.02380), (121, 29, 116.26517, 40.02378),
    (131, 31, 116.26518, 40.02374), (948, 819, 116.26941, 40.02038),
    (926, 886, 116.26977, 40.02047), (909, 925, 116.26998, 40.02054),
    (952, 653, 116.26852, 40.02036), (77, 396, 116.26714, 40.02396),
    (80, 396, 116.26714, 40.02395),
]


def test_raw_gps_city_table_with_coordinate_files_places_real_rows(tmp_path):
  manual = tmp_path / 'manual'
  big = 1024
  for split, tile_id in (('train_val', '0_8'), ('train_val', '0_9'), ('test', '5_5')):
    write_png(manual / split / 'image' / f'{tile_id}_sat.png', np.full((big, big, 3), 90, np.uint8))
    write_png(manual / split / 'mask' / f'{tile_id}_mask.png', np.zeros((big, big), np.uint8))
  west, north = 116.265015, 40.024277
  east, south = west + 5.366e-6 * big, north - 4.11e-6 * big
  coordinate = manual / 'coordinate'
  coordinate.mkdir()
  # Three spellings of the corners: (lat, lon) pairs, (west south east north), labelled text.
  (coordinate / '0_8_coor.txt').write_text(f'{north} {west}\n{south} {east}\n')
  (coordinate / '0_9_coor.txt').write_text(f'{east},{south},{east + 0.005},{north}')
  (coordinate / '5_5_coor.txt').write_text(f'top-left: ({west + 1}, {north})\n'
                                           f'bottom-right: ({east + 1}, {south})\n')
  rows = np.array(BJROAD_0_8_ROWS)
  header = 'ID,time,lat,lon,dir,speed,timeinterval'
  lines = [f'{i},1228723854,{lat},{lon},0,0,' for i, (_, _, lon, lat) in enumerate(rows)]
  lines.append('99,1228723854,39.9,116.1,0,0,5')  # far from every tile
  (manual / 'GPS').mkdir()
  (manual / 'GPS' / f'{bjroad_lib.TABLE_NAME}.csv').write_text('\n'.join([header] + lines))
  builder = build(tmp_path, manual, 'raw_gps')
  examples = {**read_split(builder, 'train'), **read_split(builder, 'validation')}
  tile = examples['0_8']
  # float64 bounds (the contract) hold the corner file's degrees exactly (float32 would be
  # 8e-6 off at 116 E, 1.4 px of 0.3 m).
  np.testing.assert_allclose(tile['bounds'], [west, south, east, north], rtol=0, atol=1e-12)
  aux = tile['aux'][..., 0]
  for row, col, _, _ in BJROAD_0_8_ROWS:  # within the 2 px the 5-decimal rounding allows
    assert aux[int(row) - 3:int(row) + 4, int(col) - 3:int(col) + 4].max() > 0, (row, col)
  assert np.count_nonzero(aux) <= 9 * 9
  assert examples['0_9']['aux'].max() == 0
  np.testing.assert_allclose(read_split(builder, 'test')['5_5']['bounds'],
                             [west + 1, south, east + 1, north], rtol=0, atol=1e-5)
  # The per-tile path of the channel config renders the same heat-map as the bulk path.
  channels = build(tmp_path, manual, BjroadConfig(
      name='table_channels', gps='raw', gps_source='table',
      channels=tuple(heatmap_lib.CHANNEL_NAMES)))
  tile_channels = {**read_split(channels, 'train'), **read_split(channels, 'validation')}['0_8']
  assert tile_channels['aux'].shape == (big, big, 6)
  np.testing.assert_array_equal(tile_channels['aux'][..., 0], aux)


def test_parse_corner_file_tolerates_orders_and_rejects_garbage(tmp_path):
  path = tmp_path / 'c.txt'
  for text in ('116.1 40.2 116.2 40.1', '40.2,116.1\n40.1,116.2', '116.1 116.2 40.1 40.2',
               'lon1=116.1 lat1=40.1 lon2=116.2 lat2=40.2 lon3=116.1 lat3=40.2'):
    path.write_text(text)
    assert bjroad_lib.parse_corner_file(path) == (116.1, 40.1, 116.2, 40.2), text
  path.write_text('-8.6 41.1 -8.5 41.2')  # |lon| < 90: read as (lon, lat) pairs
  assert bjroad_lib.parse_corner_file(path) == (-8.6, 41.1, -8.5, 41.2)
  for text in ('116.1 40.2 116.2', 'no numbers', '116.1 40.2 116.1 40.2'):
    path.write_text(text)
    with pytest.raises(common.DatasetFileError, match='c.txt'):
      bjroad_lib.parse_corner_file(path)


def assert_nothing_built(tmp_path, config):
  folder = tmp_path / 'data' / 'bjroad' / config
  leftovers = [p.name for p in folder.iterdir()] if folder.exists() else []
  assert leftovers == [], leftovers
  again = Bjroad(data_dir=str(tmp_path / 'data'), config=config)
  with pytest.raises(Exception):
    again.as_data_source(split='train')


def test_missing_mask_names_the_file_and_leaves_nothing(tmp_path):
  make_release_tree(tmp_path / 'manual', TRAIN_VAL[:4], TEST[:1])
  (tmp_path / 'manual' / 'train_val' / 'mask' / '0_2_mask.png').unlink()
  with pytest.raises(common.MissingFileError, match=r'0_2_mask\.png'):
    build(tmp_path, tmp_path / 'manual', 'release')
  assert_nothing_built(tmp_path, 'release')


def test_size_mismatch_and_corrupt_png_fail_mid_build_and_leave_nothing(tmp_path):
  manual = tmp_path / 'manual'
  make_release_tree(manual, TRAIN_VAL[:4], TEST[:1])
  gps = manual / 'test' / 'gps' / '9_0_gps.jpg'
  Image.fromarray(np.zeros((SIZE, SIZE + 1), np.uint8)).save(gps)
  with pytest.raises(common.SizeMismatchError, match=r'9_0_gps\.jpg.*33x32'):
    build(tmp_path, manual, 'release')
  assert_nothing_built(tmp_path, 'release')
  Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(gps)
  image = manual / 'test' / 'image' / '9_0_sat.png'
  image.write_bytes(image.read_bytes()[:100])  # truncated PNG
  with pytest.raises(common.UnreadableImageError, match=r'9_0_sat\.png'):
    build(tmp_path, manual, 'release')
  assert_nothing_built(tmp_path, 'release')


def test_raw_gps_errors_name_the_file(tmp_path):
  manual = tmp_path / 'manual'
  make_release_tree(manual, ['0_0', '0_1'], ['1_0'], gps=False)
  write_patch(manual / 'GPS' / 'patch' / '0_0_gps.npz', [1], [1])
  write_patch(manual / 'GPS' / 'patch' / '1_0_gps.npz', [1], [1])
  with pytest.raises(common.MissingFileError, match=r'0_1_gps'):
    build(tmp_path, manual, 'raw_gps')
  write_patch(manual / 'GPS' / 'patch' / '0_1_gps.npz', [3, 40], [3, 3])
  with pytest.raises(common.DatasetFileError, match=r'0_1_gps\.npz.*outside the 32x32 tile'):
    build(tmp_path, manual, 'raw_gps')
  write_patch(manual / 'GPS' / 'patch' / '0_1_gps.npz', [3, np.nan], [3, 3])
  with pytest.raises(common.DatasetFileError, match=r'0_1_gps\.npz.*NaN'):
    build(tmp_path, manual, 'raw_gps')
  assert_nothing_built(tmp_path, 'raw_gps')


def test_pandas_pickle_without_pandas_gives_install_hint(tmp_path):
  try:
    import pandas  # noqa: F401
    pytest.skip('pandas is installed here; the hint is for environments without it')
  except ModuleNotFoundError:
    pass
  # A pickle that refers to pandas, as BJRoad's DataFrame pickles do.
  payload = pickle.dumps(None)[:2] + b'cpandas.core.frame\nDataFrame\n)\x81.'
  path = tmp_path / 'x_gps.pkl'
  path.write_bytes(payload)
  with pytest.raises(common.DatasetFileError, match=r'x_gps\.pkl.*pip install pandas'):
    bjroad_lib.read_gps_table(path, ['lat', 'lon'])
  path.write_bytes(pickle.dumps({'lat': [1.0, 2.0], 'lon': [3.0, 4.0]}))
  table = bjroad_lib.read_gps_table(path, ['lat', 'lon'])
  np.testing.assert_array_equal(table['lon'], [3.0, 4.0])


def test_custom_config_object_and_release_bounds_from_coordinate_files(tmp_path):
  make_release_tree(tmp_path / 'manual', TRAIN_VAL[:5], TEST[:1])
  (tmp_path / 'manual' / 'coordinate').mkdir()
  (tmp_path / 'manual' / 'coordinate' / '9_0_coor.txt').write_text('116.25 40.0 116.26 40.01')
  config = BjroadConfig(name='release_val40', gps='release', validation_fraction=0.4,
                        split_seed=7)
  builder = build(tmp_path, tmp_path / 'manual', config)
  assert len(read_split(builder, 'validation')) == 2
  np.testing.assert_allclose(read_split(builder, 'test')['9_0']['bounds'],
                             [116.25, 40.0, 116.26, 40.01], rtol=0, atol=1e-5)
  assert all(np.isnan(ex['bounds']).all() for ex in read_split(builder, 'train').values())
  no_validation = build(tmp_path, tmp_path / 'manual', BjroadConfig(
      name='release_all_train', gps='release', validation_fraction=0.0))
  assert set(no_validation.info.splits) == {'train', 'test'}
  assert len(read_split(no_validation, 'train')) == 5
