"""Tests of data_builders.porto: fake fold trees built in tmp_path."""
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_builders import common
from data_builders.porto import Porto
from data_builders.porto import porto as porto_lib
from builder_testing import decoded, read_split

SIZE = 24
IDS = [f'tile{i:02d}' for i in range(6)]


def make_tree(root: pathlib.Path, *, fold_names=(1, 2), gps_ext='.png', seed=0):
  """rgb/, gps/, mask/ for IDS and split_K/{train,valid,test}.txt for each K of fold_names."""
  rng = np.random.default_rng(seed)
  for folder in ('rgb', 'gps', 'mask'):
    (root / folder).mkdir(parents=True, exist_ok=True)
  for tile_id in IDS:
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
        root / 'rgb' / f'{tile_id}.png')
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(
        root / 'gps' / f'{tile_id}{gps_ext}')
    Image.fromarray((rng.random((SIZE, SIZE)) < 0.4).astype(np.uint8) * 255).save(
        root / 'mask' / f'{tile_id}.png')
  for k in fold_names:
    fold = root / f'split_{k}'
    fold.mkdir(exist_ok=True)
    rotated = IDS[k:] + IDS[:k]  # each fold tests different tiles
    (fold / 'train.txt').write_text('\n'.join(rotated[:3]) + '\n')
    (fold / 'valid.txt').write_text(rotated[3] + '\n\n')
    (fold / 'test.txt').write_text('\n'.join(f'{t}.png' for t in rotated[4:]))


def build(tmp_path, config):
  builder = Porto(data_dir=str(tmp_path / 'data'), config=config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))
  return builder




def test_folds_read_back_identical_pixels(tmp_path):
  root = tmp_path / 'manual'
  make_tree(root)
  builder = build(tmp_path, 'fold_2')
  assert builder.info.file_format.value == 'array_record'
  rotated = IDS[2:] + IDS[:2]
  splits = {name: read_split(builder, name) for name in ('train', 'validation', 'test')}
  assert sorted(splits['train']) == sorted(rotated[:3])
  assert list(splits['validation']) == [rotated[3]]
  assert sorted(splits['test']) == sorted(rotated[4:])
  for examples in splits.values():
    for tile_id, ex in examples.items():
      np.testing.assert_array_equal(ex['image'], decoded(root / 'rgb' / f'{tile_id}.png', 'RGB'))
      np.testing.assert_array_equal(
          ex['aux'][..., 0], decoded(root / 'gps' / f'{tile_id}.png', 'L'))
      np.testing.assert_array_equal(
          ex['mask'][..., 0], decoded(root / 'mask' / f'{tile_id}.png', 'L') // 255)
      assert ex['mask'].shape == (SIZE, SIZE, 1) and set(np.unique(ex['mask'])) <= {0, 1}
      assert np.all(np.isnan(ex['bounds']))
  fold_1 = read_split(build(tmp_path, 'fold_1'), 'test')
  assert sorted(fold_1) == sorted((IDS[1:] + IDS[:1])[4:])


def test_zero_based_fold_folders_and_jpg_heatmaps(tmp_path):
  make_tree(tmp_path / 'manual', fold_names=(0, 1, 2, 3, 4), gps_ext='.jpg')
  builder = build(tmp_path, 'fold_1')  # fold_1 -> split_0 when folders start at 0
  assert sorted(read_split(builder, 'test')) == sorted(IDS[4:])
  assert porto_lib.fold_dir(tmp_path / 'manual', 5).name == 'split_4'


def test_unknown_id_in_split_file_names_the_split_file(tmp_path):
  make_tree(tmp_path / 'manual')
  (tmp_path / 'manual' / 'split_1' / 'valid.txt').write_text('no_such_tile\n')
  with pytest.raises(common.UnknownTileError, match=r'split_1/valid\.txt.*no_such_tile'):
    build(tmp_path, 'fold_1')
  assert not (tmp_path / 'data' / 'porto' / 'fold_1').exists() or not any(
      (tmp_path / 'data' / 'porto' / 'fold_1').iterdir())


def test_broken_trees_give_named_errors(tmp_path):
  root = tmp_path / 'manual'
  make_tree(root)
  (root / 'mask' / 'tile03.png').unlink()
  with pytest.raises(common.MissingFileError, match=r'mask/tile03\.png'):
    build(tmp_path, 'fold_1')
  Image.fromarray(np.zeros((SIZE + 2, SIZE), np.uint8)).save(root / 'mask' / 'tile03.png')
  with pytest.raises(common.SizeMismatchError, match=r'mask/tile03\.png.*24x26'):
    build(tmp_path, 'fold_1')
  (root / 'mask' / 'tile03.png').write_bytes(b'not a png at all')
  with pytest.raises(common.UnreadableImageError, match=r'mask/tile03\.png'):
    build(tmp_path, 'fold_1')
  (root / 'split_1' / 'test.txt').write_text('tile04\ntile04\n')
  with pytest.raises(common.SplitDefinitionError, match=r'test\.txt.*twice'):
    build(tmp_path, 'fold_1')
  with pytest.raises(common.MissingFileError, match='split_3'):
    build(tmp_path, 'fold_3')
  folder = tmp_path / 'data' / 'porto'
  assert not any(p.name.endswith('1.0.0') for p in folder.rglob('*'))
  with pytest.raises(Exception):
    Porto(data_dir=str(tmp_path / 'data'), config='fold_1').as_data_source(split='train')
