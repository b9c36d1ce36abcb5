"""Tests of data_builders.tlcgis: a fake fusion_lidar_images_sigspatial18 tree in tmp_path."""
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_builders import common
from data_builders.tlcgis import Tlcgis
from builder_testing import decoded, read_split

SIZE = 20  # the real tiles are 500x500 and are kept at their size
SPLITS = {'train.txt': ['10078660_15', '10078660_16', '10078675_01'],
          'valid.txt': ['10093690_02'], 'test.txt': ['10108705_11', '10108705_12']}


def make_tree(manual: pathlib.Path, *, mask_background=1, seed=0) -> pathlib.Path:
  root = manual / 'fusion_lidar_images_sigspatial18'
  rng = np.random.default_rng(seed)
  for folder in ('rgb', 'depth_lpu', 'mask'):
    (root / folder).mkdir(parents=True, exist_ok=True)
  for file_name, ids in SPLITS.items():
    (root / file_name).write_text(''.join(f'{i}\n' for i in ids))
    for tile_id in ids:
      Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
          root / 'rgb' / f'{tile_id}.png')
      Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(
          root / 'depth_lpu' / f'{tile_id}.png')
      road = rng.random((SIZE, SIZE)) < 0.3
      # TLCGIS stores road as 0 and background as 1.
      Image.fromarray(np.where(road, 0, mask_background).astype(np.uint8)).save(
          root / 'mask' / f'{tile_id}.png')
  return root


def build(tmp_path):
  builder = Tlcgis(data_dir=str(tmp_path / 'data'))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))
  return builder




@pytest.mark.parametrize('mask_background', [1, 255])
def test_reads_back_pixels_with_road_inverted_to_one(tmp_path, mask_background):
  root = make_tree(tmp_path / 'manual', mask_background=mask_background)
  builder = build(tmp_path)
  for split, file_name in (('train', 'train.txt'), ('validation', 'valid.txt'),
                           ('test', 'test.txt')):
    examples = read_split(builder, split)
    assert sorted(examples) == sorted(SPLITS[file_name])
    for tile_id, ex in examples.items():
      np.testing.assert_array_equal(ex['image'], decoded(root / 'rgb' / f'{tile_id}.png', 'RGB'))
      np.testing.assert_array_equal(
          ex['aux'][..., 0], decoded(root / 'depth_lpu' / f'{tile_id}.png', 'L'))
      mask_file = decoded(root / 'mask' / f'{tile_id}.png', 'L')
      np.testing.assert_array_equal(ex['mask'][..., 0], (mask_file == 0).astype(np.uint8))
      assert ex['image'].shape == (SIZE, SIZE, 3) and ex['mask'].shape == (SIZE, SIZE, 1)
      assert np.all(np.isnan(ex['bounds']))


def test_broken_trees_give_named_errors_and_leave_nothing(tmp_path):
  root = make_tree(tmp_path / 'manual')
  (root / 'test.txt').write_text('10108705_11\nghost_tile\n')
  with pytest.raises(common.UnknownTileError, match=r'test\.txt.*ghost_tile'):
    build(tmp_path)
  (root / 'test.txt').write_text('10108705_11\n10108705_12\n')
  (root / 'depth_lpu' / '10093690_02.png').unlink()
  with pytest.raises(common.MissingFileError, match=r'depth_lpu/10093690_02\.png'):
    build(tmp_path)
  Image.fromarray(np.zeros((SIZE, SIZE - 1), np.uint8)).save(root / 'depth_lpu' / '10093690_02.png')
  with pytest.raises(common.SizeMismatchError, match=r'depth_lpu/10093690_02\.png'):
    build(tmp_path)
  png = root / 'rgb' / '10108705_12.png'
  png.write_bytes(png.read_bytes()[:60])
  Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(root / 'depth_lpu' / '10093690_02.png')
  with pytest.raises(common.UnreadableImageError, match=r'rgb/10108705_12\.png'):
    build(tmp_path)
  (root / 'valid.txt').unlink()
  with pytest.raises(common.MissingFileError, match=r'valid\.txt'):
    build(tmp_path)
  folder = tmp_path / 'data' / 'tlcgis'
  assert not folder.exists() or [p.name for p in folder.iterdir()] == []
  with pytest.raises(Exception):
    Tlcgis(data_dir=str(tmp_path / 'data')).as_data_source(split='train')
