"""Tests of the synthetic city generator, its TFDS builder and the build CLI."""
import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from cmmp_jax.data import synthetic
from data_builders import build as build_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = synthetic.SyntheticConfig(size=64, num_train=4, num_validation=2, num_test=2)

# Makes `import tensorflow` fail as if TensorFlow were not installed (importlib.util.find_spec
# returns None), without putting a None entry in sys.modules, which TFDS would take for "loaded".
HIDE_TENSORFLOW = textwrap.dedent('''
    import sys
    class _HideTensorFlow:
      def __init__(self, finder):
        self._finder = finder
      def find_spec(self, name, path=None, target=None):
        if name == 'tensorflow' or name.startswith('tensorflow.'):
          return None
        find = getattr(self._finder, 'find_spec', None)
        return find(name, path, target) if find else None
      def invalidate_caches(self):
        if hasattr(self._finder, 'invalidate_caches'):
          self._finder.invalidate_caches()
    sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
''')


def _run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES='',
             TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-c', code, *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def city_tiles():
  """24 default (128 px) tiles of the train split and 12 of the test split."""
  config = synthetic.SyntheticConfig()
  make = lambda split, i: synthetic.generate_tile(synthetic.tile_seed(0, split, i), 128, config)
  return ([make('train', i) for i in range(24)], [make('test', i) for i in range(12)])


def _stack(tiles, key):
  return np.stack([t[key] for t in tiles])


def _layer(tiles, name):
  return np.stack([t['layers'][name] for t in tiles])


def _iou(prediction, truth):
  return float((prediction & truth).sum() / max((prediction | truth).sum(), 1))


def _road_coloured(images, max_spread=18, low=60, high=150):
  """The image-only colour rule: grey (channel spread < max_spread) of asphalt brightness."""
  images = images.astype(np.float32)
  spread = images.max(-1) - images.min(-1)
  mean = images.mean(-1)
  return (spread < max_spread) & (mean >= low) & (mean <= high)


# ---------------------------------------------------------------------------------------------
# Generator.


def test_tile_is_deterministic_per_seed():
  a = synthetic.generate_tile(123, 64, TINY)
  b = synthetic.generate_tile(123, 64, TINY)
  c = synthetic.generate_tile(124, 64, TINY)
  for key in ('image', 'aux', 'lidar', 'mask', 'gps_cols', 'gps_rows', 'gps_speed',
              'gps_heading', 'gps_source', 'bounds'):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  for name in a['layers']:
    np.testing.assert_array_equal(a['layers'][name], b['layers'][name], err_msg=name)
  assert not np.array_equal(a['image'], c['image'])
  assert not np.array_equal(a['mask'], c['mask'])


def test_tile_seed_depends_on_base_seed_split_and_index():
  seeds = {synthetic.tile_seed(base, split, index)
           for base in (0, 1) for split in synthetic.SPLITS for index in range(20)}
  assert len(seeds) == 2 * 3 * 20
  assert synthetic.tile_seed(5, 'test', 3) == synthetic.tile_seed(5, 'test', 3)
  with pytest.raises(ValueError, match='split'):
    synthetic.tile_seed(0, 'holdout', 0)
  with pytest.raises(ValueError, match='>= 0'):
    synthetic.tile_seed(0, 'train', -1)


@pytest.mark.parametrize('size', [64, 96, 128])
def test_shapes_dtypes_and_binary_mask(size):
  tile = synthetic.generate_tile(7, size, synthetic.SyntheticConfig(size=size))
  assert tile['image'].shape == (size, size, 3) and tile['image'].dtype == np.uint8
  for key in ('aux', 'lidar', 'mask'):
    assert tile[key].shape == (size, size, 1) and tile[key].dtype == np.uint8, key
  assert set(np.unique(tile['mask'])) <= {0, 1}
  n = len(tile['gps_cols'])
  for key, dtype in (('gps_cols', np.float32), ('gps_rows', np.float32),
                     ('gps_speed', np.float32), ('gps_heading', np.float32),
                     ('gps_source', np.int8)):
    assert tile[key].shape == (n,) and tile[key].dtype == dtype, key
  assert np.all((tile['gps_cols'] >= 0) & (tile['gps_cols'] < size))
  assert np.all((tile['gps_rows'] >= 0) & (tile['gps_rows'] < size))
  assert np.all((tile['gps_heading'] >= 0) & (tile['gps_heading'] < 360))
  west, south, east, north = tile['bounds']
  assert tile['bounds'].dtype == np.float32 and west < east and south < north
  # A 256 m tile at 39.9 N spans about 0.0023 deg of latitude.
  assert north - south == pytest.approx(256 / 110_540, rel=1e-3)
  for name, layer in tile['layers'].items():
    assert layer.shape == (size, size) and layer.dtype == bool, name


def test_every_tile_has_roads(city_tiles):
  train, _ = city_tiles
  for tile in train:
    assert tile['num_roads'] >= 2
    assert 0.05 < tile['mask'].mean() < 0.5


def test_heatmap_is_the_render_of_the_gps_points():
  from cmmp_jax.data import heatmap
  tile = synthetic.generate_tile(11, 64, TINY)
  expected = heatmap.heatmap_to_uint8(
      heatmap.render_heatmap(tile['gps_cols'], tile['gps_rows'], 64, 64))
  np.testing.assert_array_equal(tile['aux'][..., 0], expected)


def test_gps_points_of_roads_lie_on_roads(city_tiles):
  train, _ = city_tiles
  on_road, total = 0, 0
  for tile in train:
    # Within 3 px of the road: lane offset + drift + noise stay well inside that.
    near = cv2.dilate(tile['mask'][..., 0], np.ones((7, 7), np.uint8)) > 0
    from_road = tile['gps_source'] == synthetic.GPS_SOURCE_ROAD
    rows = tile['gps_rows'][from_road].astype(int)
    cols = tile['gps_cols'][from_road].astype(int)
    on_road += int(near[rows, cols].sum())
    total += len(rows)
  assert total > 1000
  assert on_road / total > 0.9


def test_parking_lots_are_full_of_gps_points_but_not_roads(city_tiles):
  train, _ = city_tiles
  lots_seen = 0
  for tile in train:
    parking = tile['layers']['parking']
    assert not (parking & (tile['mask'][..., 0] > 0)).any()
    from_lot = tile['gps_source'] == synthetic.GPS_SOURCE_PARKING
    if not parking.any() or not from_lot.any():
      continue
    lots_seen += 1
    rows = tile['gps_rows'][from_lot].astype(int)
    cols = tile['gps_cols'][from_lot].astype(int)
    assert tile['mask'][rows, cols, 0].mean() < 0.05
    near_lot = cv2.dilate(parking.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert near_lot[rows, cols].mean() > 0.9
    # The heat-map lights the lot up: the GPS-only rule fires there.
    assert (tile['aux'][..., 0][parking] > 5).mean() > 0.7
  assert lots_seen >= 5


def test_lookalikes_look_like_roads_but_are_off_the_mask_and_undriven(city_tiles):
  train, _ = city_tiles
  lookalike = _layer(train, 'lookalike')
  mask = _stack(train, 'mask')[..., 0] > 0
  assert not (lookalike & mask).any()
  for kind in ('river', 'rail', 'grey_roof'):
    assert sum(t['layers'][kind].any() for t in train) >= 3, kind
  colour = _road_coloured(_stack(train, 'image'))
  assert colour[lookalike].mean() > 0.7  # the image rule takes them for roads
  assert colour[mask].mean() > 0.6
  assert (_stack(train, 'aux')[..., 0][lookalike] > 5).mean() < 0.15  # the GPS does not


def test_some_roads_have_no_gps_and_the_heatmap_is_blank_there(city_tiles):
  train, _ = city_tiles
  assert sum(t['num_roads_without_gps'] for t in train) >= 10
  gps_free = _layer(train, 'gps_free_road')
  assert gps_free.sum() > 0.05 * (_stack(train, 'mask') > 0).sum()
  assert np.all(_stack(train, 'aux')[..., 0][gps_free] == 0)
  # ... while the image still shows those roads.
  assert _road_coloured(_stack(train, 'image'))[gps_free].mean() > 0.6


def test_trees_hide_roads_in_the_image_but_not_in_the_gps(city_tiles):
  train, _ = city_tiles
  occluded = _layer(train, 'occluded_road')
  assert occluded.sum() > 0.02 * (_stack(train, 'mask') > 0).sum()
  assert _road_coloured(_stack(train, 'image'))[occluded].mean() < 0.05
  assert (_stack(train, 'aux')[..., 0][occluded] > 5).mean() > 0.4


def _histogram_classifier_iou(train_codes, train_mask, test_codes, test_mask, n_codes):
  """Per-code majority vote learnt on train tiles, IoU on test tiles."""
  positives = np.bincount(train_codes[train_mask], minlength=n_codes)
  totals = np.bincount(train_codes.ravel(), minlength=n_codes)
  is_road = positives / np.maximum(totals, 1) > 0.5
  return _iou(is_road[test_codes], test_mask)


def _pixel_codes(tiles):
  """Quantised per-pixel features: image code (512 values) and GPS code (64 values)."""
  images = _stack(tiles, 'image').astype(np.float32)
  aux = _stack(tiles, 'aux')[..., 0].astype(np.float32)
  spread = images.max(-1) - images.min(-1)
  mean = images.mean(-1)
  spread_7 = np.stack([cv2.blur(s, (7, 7)) for s in spread])
  aux_7 = np.stack([cv2.blur(a, (7, 7)) for a in aux])
  q = lambda x, lo, hi, n: np.clip(((x - lo) / (hi - lo) * n).astype(int), 0, n - 1)
  image_code = q(spread, 0, 60, 8) * 64 + q(mean, 40, 220, 8) * 8 + q(spread_7, 0, 60, 8)
  gps_code = q(aux, 0, 64, 8) * 8 + q(aux_7, 0, 64, 8)
  return image_code, gps_code


def test_neither_modality_alone_solves_the_task_and_fusion_helps(city_tiles):
  """Trivial per-pixel classifiers: each modality alone is mediocre, both together better.

  Printed numbers (pytest -s) are the ones quoted in the report; see the module docstring of
  cmmp_jax/data/synthetic.py for why each modality fails where it does.
  """
  train, test = city_tiles
  mask_train = _stack(train, 'mask')[..., 0] > 0
  mask_test = _stack(test, 'mask')[..., 0] > 0
  aux_test = _stack(test, 'aux')[..., 0]
  gps_threshold = max(_iou(aux_test > t, mask_test) for t in range(0, 250, 5))
  colour_rule = max(_iou(_road_coloured(_stack(test, 'image'), s, lo, hi), mask_test)
                    for s in (10, 18, 30) for lo in (50, 70, 90) for hi in (130, 150, 170))
  lidar_test = _stack(test, 'lidar')[..., 0]
  lidar_threshold = max(_iou(lidar_test <= t, mask_test) for t in range(5, 40))
  image_train, gps_train = _pixel_codes(train)
  image_test, gps_test = _pixel_codes(test)
  image_only = _histogram_classifier_iou(image_train, mask_train, image_test, mask_test, 512)
  gps_only = _histogram_classifier_iou(gps_train, mask_train, gps_test, mask_test, 64)
  fused = _histogram_classifier_iou(image_train * 64 + gps_train, mask_train,
                                    image_test * 64 + gps_test, mask_test, 512 * 64)
  print(f'\nroad IoU on 12 test tiles: aux>t (best t) {gps_threshold:.3f}, colour rule (best) '
        f'{colour_rule:.3f}, lidar<=t (best t) {lidar_threshold:.3f}; histogram classifier: '
        f'image {image_only:.3f}, gps {gps_only:.3f}, image+gps {fused:.3f}')
  for single in (gps_threshold, colour_rule, lidar_threshold, image_only, gps_only):
    assert single < 0.75
  assert fused > max(image_only, gps_only) + 0.03


def test_fog_changes_only_the_image():
  clear = synthetic.generate_tile(5, 64, TINY)
  foggy = synthetic.generate_tile(5, 64, dataclasses.replace(TINY, fog_strength=0.6))
  for key in ('aux', 'mask', 'gps_cols', 'lidar', 'bounds'):
    np.testing.assert_array_equal(clear[key], foggy[key], err_msg=key)
  assert foggy['image'].mean() > clear['image'].mean() + 20
  assert foggy['image'].std() < clear['image'].std()


def test_gps_channels_raster():
  tile = synthetic.generate_tile(3, 64, TINY)
  channels = synthetic.select_aux(tile, 'gps_channels')
  assert channels.shape == (64, 64, len(synthetic.GPS_CHANNEL_NAMES))
  assert channels.dtype == np.uint8
  np.testing.assert_array_equal(channels[..., 0], tile['aux'][..., 0])
  # Speed and heading are only set in pixels that hold a fix, and always where one was fast.
  rows, cols = tile['gps_rows'].astype(int), tile['gps_cols'].astype(int)
  hit = np.zeros((64, 64), bool)
  hit[rows, cols] = True
  assert not (channels[..., 1:] > 0)[~hit].any()
  fast = tile['gps_speed'] > 1.0
  assert fast.sum() > 20
  assert np.all(channels[rows[fast], cols[fast], 1] > 0)
  assert synthetic.select_aux(tile, 'lidar') is tile['lidar']
  with pytest.raises(ValueError, match='aux_kind'):
    synthetic.select_aux(tile, 'radar')


def test_lidar_raises_buildings_and_trees_and_lowers_water(city_tiles):
  train, _ = city_tiles
  lidar = _stack(train, 'lidar')[..., 0].astype(np.float32) / synthetic.LIDAR_SCALE
  lidar -= synthetic.LIDAR_OFFSET_M  # metres above ground
  roads = (_stack(train, 'mask')[..., 0] > 0) & ~_layer(train, 'canopy')
  assert abs(np.median(lidar[roads])) < 0.2
  assert np.median(lidar[_layer(train, 'building')]) > 4
  assert np.median(lidar[_layer(train, 'grey_roof')]) > 4  # the grey-roof look-alike is tall
  assert np.median(lidar[_layer(train, 'river') & ~_layer(train, 'canopy')]) < -1


@pytest.mark.parametrize('field, value, match', [
    ('size', 100, 'size'), ('size', 16, 'size'), ('num_train', -1, 'num_train'),
    ('river_probability', 1.5, 'river_probability'), ('gps_noise_px', float('nan'),
                                                        'gps_noise_px'),
    ('min_local_streets', 9, 'min_local_streets'), ('num_test', 2.5, 'num_test')])
def test_invalid_config_is_rejected_naming_the_field(field, value, match):
  with pytest.raises(synthetic.SyntheticConfigError, match=match):
    synthetic.SyntheticConfig(**{field: value})


def test_invalid_seed_and_size_are_rejected():
  with pytest.raises(ValueError, match='seed'):
    synthetic.generate_tile(-3, 64, TINY)
  with pytest.raises(ValueError, match='seed'):
    synthetic.generate_tile(1.5, 64, TINY)
  with pytest.raises(synthetic.SyntheticConfigError, match='size'):
    synthetic.generate_tile(1, 70, TINY)


# ---------------------------------------------------------------------------------------------
# TFDS builder and build tool.


def _read_split(data_dir, split, name='synthetic/tiny'):
  import tensorflow_datasets as tfds
  source = tfds.data_source(name, data_dir=os.fspath(data_dir), split=split)
  return [source[i] for i in range(len(source))]


def _assert_matches_generator(data_dir, config=TINY):
  for split in synthetic.SPLITS:
    records = _read_split(data_dir, split)
    assert len(records) == config.num_examples(split)
    for index, record in enumerate(records):
      tile = synthetic.generate_tile(synthetic.tile_seed(0, split, index), config.size, config)
      tile_id = record['tile_id']
      assert (tile_id.decode() if isinstance(tile_id, bytes) else tile_id) == (
          synthetic.tile_id(split, index))
      for key in ('image', 'aux', 'mask'):
        assert record[key].dtype == np.uint8
        np.testing.assert_array_equal(record[key], tile[key], err_msg=f'{split}[{index}] {key}')
      np.testing.assert_array_equal(record['bounds'], tile['bounds'])


def test_builder_reads_back_identical_pixels_without_tensorflow(tmp_path):
  # Build and read in a process where TensorFlow cannot be imported.
  code = HIDE_TENSORFLOW + textwrap.dedent('''
      import numpy as np
      from data_builders import build
      import tensorflow_datasets as tfds
      path = build.build('synthetic', sys.argv[1], config='tiny')
      record = tfds.data_source('synthetic/tiny', data_dir=sys.argv[1], split='train')[0]
      assert record['image'].shape == (64, 64, 3), record['image'].shape
      assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
      print('OK', path)
  ''')
  result = _run_python(code, str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'OK' in result.stdout
  _assert_matches_generator(tmp_path)


def test_builder_configs_lidar_and_gps_channels(tmp_path):
  from data_builders.synthetic import Synthetic, SyntheticBuilderConfig
  small = synthetic.SyntheticConfig(size=32, num_train=2, num_validation=1, num_test=1)
  for aux_kind, channels in (('lidar', 1), ('gps_channels', 4)):
    config = SyntheticBuilderConfig(name=f'test_{aux_kind}', city=small, aux_kind=aux_kind)
    builder = Synthetic(data_dir=os.fspath(tmp_path), config=config)
    builder.download_and_prepare(download_dir=os.fspath(tmp_path / 'downloads'))
    record = _read_split(tmp_path, 'validation', f'synthetic/test_{aux_kind}')[0]
    tile = synthetic.generate_tile(synthetic.tile_seed(0, 'validation', 0), 32, small)
    assert record['aux'].shape == (32, 32, channels)
    np.testing.assert_array_equal(record['aux'], synthetic.select_aux(tile, aux_kind))
  with pytest.raises(ValueError, match='aux_kind'):
    SyntheticBuilderConfig(name='bad', aux_kind='radar')


def test_default_builder_configs():
  from data_builders.synthetic import Synthetic
  configs = {c.name: c for c in Synthetic.BUILDER_CONFIGS}
  assert list(configs)[0] == 'default'
  assert configs['default'].city == synthetic.SyntheticConfig()
  assert (configs['default'].city.size, configs['default'].city.num_train,
          configs['default'].city.num_validation, configs['default'].city.num_test) == (
              128, 64, 16, 16)
  assert configs['large'].city.size == 512
  assert configs['lidar'].aux_kind == 'lidar' and configs['gps_channels'].aux_channels == 4
  assert str(Synthetic.VERSION) == '1.2.0'


def _version_dirs_that_look_built(root: pathlib.Path):
  """Folders under root that TFDS would read: dataset_info.json or features.json inside."""
  return sorted({p.parent for p in root.rglob('*.json') if p.name in (
      'dataset_info.json', 'features.json')})


def test_failed_build_leaves_nothing_that_looks_built(tmp_path, monkeypatch):
  real_generate = synthetic.generate_tile
  calls = []

  def failing_generate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('injected failure in the middle of generation')
    return real_generate(*args, **kwargs)

  monkeypatch.setattr(synthetic, 'generate_tile', failing_generate)
  with pytest.raises(RuntimeError, match='injected failure'):
    build_lib.build('synthetic', tmp_path, config='tiny')
  assert len(calls) == 3
  version_dir = tmp_path / 'synthetic' / 'tiny' / '1.2.0'
  assert not version_dir.exists()
  assert _version_dirs_that_look_built(tmp_path) == []
  assert not build_lib.is_built('synthetic', tmp_path, 'tiny')

  monkeypatch.setattr(synthetic, 'generate_tile', real_generate)
  build_lib.ensure_built('synthetic', tmp_path, 'tiny')
  assert build_lib.is_built('synthetic', tmp_path, 'tiny')
  assert _version_dirs_that_look_built(tmp_path) == [version_dir]
  _assert_matches_generator(tmp_path)


def test_killed_build_is_rebuilt_by_ensure_built(tmp_path):
  code = textwrap.dedent('''
      import os, signal, sys
      from cmmp_jax.data import synthetic
      from data_builders import build
      real = synthetic.generate_tile
      calls = []
      def generate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
          os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
      synthetic.generate_tile = generate_then_die
      build.build('synthetic', sys.argv[1], config='tiny')
  ''')
  result = _run_python(code, str(tmp_path))
  assert result.returncode == -9, result.stderr[-3000:]
  config_dir = tmp_path / 'synthetic' / 'tiny'
  leftovers = [p for p in config_dir.iterdir() if p.name.startswith('incomplete.')]
  assert leftovers, 'expected the killed build to leave its temporary folder'
  assert _version_dirs_that_look_built(tmp_path) == []
  assert not build_lib.is_built('synthetic', tmp_path, 'tiny')

  build_lib.ensure_built('synthetic', tmp_path, 'tiny')
  assert not any(p.exists() for p in leftovers)
  assert _version_dirs_that_look_built(tmp_path) == [config_dir / '1.2.0']
  _assert_matches_generator(tmp_path)


def test_failed_overwrite_keeps_the_previous_build(tmp_path, monkeypatch):
  version_dir = build_lib.build('synthetic', tmp_path, config='tiny')
  before = (version_dir / 'dataset_info.json').read_bytes()

  def broken(*args, **kwargs):
    raise RuntimeError('injected failure during overwrite')

  monkeypatch.setattr(synthetic, 'generate_tile', broken)
  with pytest.raises(RuntimeError, match='injected failure'):
    build_lib.build('synthetic', tmp_path, config='tiny', overwrite=True)
  assert (version_dir / 'dataset_info.json').read_bytes() == before
  assert not (version_dir.parent / '.replaced-1.2.0').exists()
  monkeypatch.undo()
  _assert_matches_generator(tmp_path)
  assert build_lib.build('synthetic', tmp_path, config='tiny', overwrite=True) == version_dir
  assert _version_dirs_that_look_built(tmp_path) == [version_dir]


def test_registry_is_lazy_and_reports_unknown_names(monkeypatch):
  assert set(build_lib.REGISTRY) == {'synthetic', 'bjroad', 'porto', 'tlcgis', 'custom'}
  from data_builders.synthetic import Synthetic
  assert build_lib.builder_class('synthetic') is Synthetic
  with pytest.raises(build_lib.UnknownDatasetError, match="unknown dataset 'nope'"):
    build_lib.builder_class('nope')
  monkeypatch.setitem(build_lib.REGISTRY, 'broken', ('data_builders.no_such_module', 'Broken'))
  with pytest.raises(build_lib.BuilderImportError, match='broken'):
    build_lib.builder_class('broken')
  assert build_lib.builder_class('synthetic') is Synthetic  # one bad entry breaks no other
  with pytest.raises(build_lib.UnknownConfigError, match="no config 'huge'"):
    build_lib.make_builder('synthetic', '/nonexistent', config='huge')


def test_cli_builds_reuses_and_reports_errors(tmp_path):
  command = [sys.executable, '-m', 'data_builders.build', 'synthetic', '--config', 'tiny',
             '--data_dir', str(tmp_path)]
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES='')
  first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
  assert first.returncode == 0, first.stderr[-3000:]
  version_dir = tmp_path / 'synthetic' / 'tiny' / '1.2.0'
  assert first.stdout.strip().splitlines()[-1] == str(version_dir)
  assert 'building synthetic/tiny 1.2.0' in first.stderr
  assert 'built synthetic/tiny 1.2.0' in first.stderr and 'train 4' in first.stderr
  second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
  assert second.returncode == 0 and 'already built' in second.stderr
  bad_config = subprocess.run(command[:4] + ['--config', 'huge', '--data_dir', str(tmp_path)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
  assert bad_config.returncode == 1 and "no config 'huge'" in bad_config.stderr
  bad_name = subprocess.run(command[:3] + ['nope', '--data_dir', str(tmp_path)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert bad_name.returncode == 2 and 'invalid choice' in bad_name.stderr
