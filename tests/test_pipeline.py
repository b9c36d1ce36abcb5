"""grain pipeline: determinism, per-epoch shuffles, restore, sharding, eval padding, TFDS path."""
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_builders import common

from cmmp_jax.data import pipeline
from cmmp_jax.data.augment import AugmentConfig, ExampleError

NUM_RECORDS, SIZE = 24, 32


def make_example(index, size=SIZE, aux_channels=1):
  """Tiny contract example whose image channel 0 is the constant 10 * index (its identity)."""
  rng = np.random.default_rng(index)
  image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  image[..., 0] = 10 * index
  return {
      'image': image,
      'aux': rng.integers(0, 256, (size, size, aux_channels), dtype=np.uint8),
      'mask': rng.integers(0, 2, (size, size, 1), dtype=np.uint8),
      'tile_id': f'tile_{index}',
      'bounds': np.full(4, np.nan, np.float32),
  }


class InMemorySource:
  """Random-access source of contract examples (picklable, for grain worker processes)."""

  def __init__(self, examples):
    self._examples = list(examples)

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    return self._examples[index]


def make_source(num_records=NUM_RECORDS, **kwargs):
  return InMemorySource(make_example(i, **kwargs) for i in range(num_records))


def record_ids(batch, scaling='reference'):
  """Record indices of an unaugmented batch, read back from image channel 0."""
  pixels = batch['image'][:, 0, 0, 0]
  if scaling == 'reference':
    pixels = (pixels + 1.6) / 3.2
  return [int(i) for i in np.rint(pixels * 255 / 10)]


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def train_loader(source, **kwargs):
  kwargs = {'global_batch_size': 4, 'seed': 0, 'shard_index': 0, 'shard_count': 1, **kwargs}
  return pipeline.make_train_loader(source, **kwargs)


def test_scale_inputs_reference_and_unit():
  pixels = np.array([0, 51, 255], np.uint8)
  np.testing.assert_allclose(pipeline.scale_inputs(pixels), [-1.6, -0.96, 1.6], atol=1e-6)
  np.testing.assert_allclose(pipeline.scale_inputs(pixels, 'unit'), [0.0, 0.2, 1.0], atol=1e-7)
  assert pipeline.scale_inputs(pixels).dtype == np.float32
  with pytest.raises(pipeline.PipelineError, match="scaling must be one of"):
    pipeline.scale_inputs(pixels, 'imagenet')


def test_train_batches_have_contract_shapes_and_resize_keeps_mask_resolution():
  source = make_source(aux_channels=2)
  batch = next(iter(train_loader(source, input_size=16, global_batch_size=6)))
  assert batch.keys() == {'image', 'aux', 'mask'}
  assert batch['image'].shape == (6, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['aux'].shape == (6, 16, 16, 2) and batch['aux'].dtype == np.float32
  assert batch['mask'].shape == (6, SIZE, SIZE, 1) and batch['mask'].dtype == np.float32
  assert set(np.unique(batch['mask'])) <= {0.0, 1.0}
  assert batch['image'].min() >= -1.6 and batch['image'].max() <= 1.6
  # Without augmentation the mask is the source mask of the record, untouched by the resize.
  plain = next(iter(train_loader(source, input_size=(16, 8), augment=None)))
  assert plain['image'].shape == (4, 16, 8, 3)
  for row, index in enumerate(record_ids(plain)):
    np.testing.assert_array_equal(plain['mask'][row], source[index]['mask'])


def test_same_seed_same_batches_other_seed_other_batches():
  source = make_source()
  first = take(iter(train_loader(source, seed=5)), 8)  # 32 examples: crosses an epoch boundary
  again = take(iter(train_loader(source, seed=5)), 8)
  other = take(iter(train_loader(source, seed=6)), 8)
  assert_same_batches(first, again)
  assert not np.array_equal(first[0]['image'], other[0]['image'])
  assert not np.array_equal(first[0]['mask'], other[0]['mask'])


def test_each_epoch_is_a_fresh_permutation():
  loader = train_loader(make_source(), augment=None, num_epochs=2, seed=3)
  order = [i for batch in loader for i in record_ids(batch)]
  assert len(order) == 2 * NUM_RECORDS
  first_epoch, second_epoch = order[:NUM_RECORDS], order[NUM_RECORDS:]
  assert sorted(first_epoch) == sorted(second_epoch) == list(range(NUM_RECORDS))
  assert first_epoch != second_epoch
  assert first_epoch != list(range(NUM_RECORDS))


def test_augmentation_differs_between_epochs_for_the_same_record():
  source = make_source(num_records=4)
  no_hsv = AugmentConfig(hsv_prob=0.0)  # keeps image channel 0 constant, so records stay known
  batches = list(train_loader(source, augment=no_hsv, global_batch_size=4, num_epochs=3))
  seen = {}
  for batch in batches:
    for row in range(4):
      # Channel 0 is constant inside the tile; the warp's zero fill only lowers it.
      brightest = batch['image'][row, ..., 0].max()
      index = int(np.rint((brightest + 1.6) / 3.2 * 255 / 10))
      seen.setdefault(index, []).append(batch['mask'][row])
  assert sorted(seen) == [0, 1, 2, 3]
  assert any(not np.array_equal(masks[0], masks[1]) for masks in seen.values())


@pytest.mark.parametrize('num_workers', [0, 1])
def test_restored_iterator_continues_exactly(num_workers):
  source = make_source()
  uninterrupted = take(iter(train_loader(source, num_workers=num_workers, seed=9)), 10)
  iterator = iter(train_loader(source, num_workers=num_workers, seed=9))
  head = take(iterator, 4)
  state = iterator.get_state()
  del iterator
  restored = iter(train_loader(make_source(), num_workers=num_workers, seed=9))
  restored.set_state(state)
  tail = take(restored, 6)
  assert_same_batches(head + tail, uninterrupted)


def test_iterator_state_round_trips_through_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  source = make_source()
  uninterrupted = take(iter(train_loader(source, seed=4)), 5)
  iterator = iter(train_loader(source, seed=4))
  take(iterator, 2)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(2, args=ocp.args.Composite(
        **{pipeline.DATA_ITER_ITEM: pipeline.iterator_save_args(iterator)}))
    manager.wait_until_finished()
  restored = iter(train_loader(source, seed=4))
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.restore(2, args=ocp.args.Composite(
        **{pipeline.DATA_ITER_ITEM: pipeline.iterator_restore_args(restored)}))
  assert_same_batches(take(restored, 3), uninterrupted[2:])
  saved = list((tmp_path / 'ckpt' / '2' / pipeline.DATA_ITER_ITEM).glob('process_0-of-1.json'))
  assert len(saved) == 1 and json.loads(saved[0].read_text())['version'] == 2


def test_train_shards_split_each_epoch_disjointly():
  source = make_source()
  per_shard = []
  for shard_index in range(2):
    loader = train_loader(source, augment=None, global_batch_size=4, shard_index=shard_index,
                          shard_count=2, num_epochs=1)
    batches = list(loader)
    assert all(b['image'].shape[0] == 2 for b in batches)  # 4 // 2 per process
    per_shard.append([i for b in batches for i in record_ids(b)])
  assert len(per_shard[0]) == len(per_shard[1]) == NUM_RECORDS // 2
  assert sorted(per_shard[0] + per_shard[1]) == list(range(NUM_RECORDS))


@pytest.mark.parametrize('num_records,global_batch_size,shard_count', [
    (10, 4, 1), (10, 4, 2), (8, 4, 2), (3, 4, 2)])
def test_eval_visits_every_record_once_with_padding(num_records, global_batch_size, shard_count):
  source = make_source(num_records)
  num_steps = -(-num_records // global_batch_size)
  local = global_batch_size // shard_count
  per_process = []
  for shard_index in range(shard_count):
    batches = list(pipeline.eval_batches(
        source, global_batch_size=global_batch_size, input_size=16, scaling='unit',
        shard_index=shard_index, shard_count=shard_count))
    assert len(batches) == num_steps == pipeline.num_eval_batches(num_records, global_batch_size)
    for batch in batches:
      assert batch['image'].shape == (local, 16, 16, 3)
      assert batch['mask'].shape == (local, SIZE, SIZE, 1)
      assert batch['valid'].dtype == np.bool_ and batch['index'].dtype == np.int64
      for row in range(local):
        index = int(batch['index'][row])
        if batch['valid'][row]:
          assert record_ids(batch, 'unit')[row] == index
          np.testing.assert_array_equal(batch['mask'][row], source[index]['mask'])
        else:
          assert index == -1
          assert not batch['image'][row].any() and not batch['mask'][row].any()
    per_process.append(batches)
  # Concatenating the processes' batches of one step gives the global batch in record order.
  for step in range(num_steps):
    indices = np.concatenate([p[step]['index'] for p in per_process])
    valid = np.concatenate([p[step]['valid'] for p in per_process])
    expected = np.arange(step * global_batch_size, (step + 1) * global_batch_size)
    np.testing.assert_array_equal(valid, expected < num_records)
    np.testing.assert_array_equal(indices[valid], expected[expected < num_records])
  assert sum(int(p[s]['valid'].sum()) for p in per_process for s in range(num_steps)) == num_records


def test_bad_examples_and_arguments_raise_clear_errors():
  examples = [make_example(i) for i in range(8)]
  broken = make_example(5)
  broken['aux'] = broken['aux'][:16]
  with pytest.raises(ExampleError, match=r"tile 'tile_5': aux size \(16, 32\) does not match"):
    list(train_loader(InMemorySource(examples[:5] + [broken] + examples[6:]), num_epochs=1))
  odd = make_example(6, size=16)
  with pytest.raises(ExampleError, match=r"tile 'tile_6': size \(16, 16\) differs from"):
    list(pipeline.eval_batches(InMemorySource(examples[:6] + [odd]), global_batch_size=4,
                               shard_index=0, shard_count=1))
  with pytest.raises(pipeline.PipelineError, match="multiple of shard_count=2"):
    train_loader(make_source(), global_batch_size=3, shard_count=2)
  with pytest.raises(pipeline.PipelineError, match="shard_index < shard_count"):
    train_loader(make_source(), shard_index=2, shard_count=2)
  with pytest.raises(pipeline.PipelineError, match="input_size must be"):
    train_loader(make_source(), input_size=(16, 0))
  with pytest.raises(pipeline.PipelineError, match="has 0 records"):
    train_loader(InMemorySource([]))


def test_default_sharding_comes_from_jax():
  loader = pipeline.make_train_loader(make_source(), global_batch_size=2, seed=0)
  assert next(iter(loader))['image'].shape[0] == 2  # one CPU process: the whole batch


# A minimal array_record TFDS dataset with PNG-bytes images: decodes without TensorFlow.
class PipelineTestTiles(tfds.core.GeneratorBasedBuilder):
  """Six 16x16 tiles with a one-channel aux raster."""
  VERSION = tfds.core.Version('1.0.0')
  NUM_TILES = 6

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=common.example_features(1))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for index in range(self.NUM_TILES):
      example = make_example(index, size=16)
      yield example['tile_id'], {
          'image': png_bytes(example['image']), 'aux': png_bytes(example['aux']),
          'mask': png_bytes(example['mask']), 'tile_id': example['tile_id'],
          'bounds': np.array([116.0, 39.0, 116.01, 39.01], np.float64) + index}


def png_bytes(array):
  buffer = io.BytesIO()
  Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format='PNG')
  return buffer.getvalue()


def build_pipeline_test_tiles(data_dir):
  PipelineTestTiles(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return tfds.data_source('pipeline_test_tiles', data_dir=str(data_dir), split='train')


def test_tfds_array_record_source_feeds_the_pipeline(tmp_path):
  source = build_pipeline_test_tiles(tmp_path)
  assert len(source) == PipelineTestTiles.NUM_TILES
  batches = list(pipeline.eval_batches(source, global_batch_size=4, scaling='unit',
                                       shard_index=0, shard_count=1))
  assert [b['valid'].tolist() for b in batches] == [[True] * 4, [True, True, False, False]]
  for batch in batches:
    for row in np.flatnonzero(batch['valid']):
      stored = source[int(batch['index'][row])]
      original = make_example(int(stored['tile_id'].decode().split('_')[1]), size=16)
      for key in ('image', 'aux'):  # PNG is lossless: exact round trip through TFDS
        np.testing.assert_array_equal(np.rint(batch[key][row] * 255), original[key])
      np.testing.assert_array_equal(batch['mask'][row], original['mask'])
  train = take(iter(train_loader(source, seed=1, global_batch_size=2)), 4)
  assert train[0]['image'].shape == (2, 16, 16, 3)


def test_tfds_path_does_not_import_tensorflow(tmp_path):
  program = textwrap.dedent(f"""
      import sys
      import test_pipeline
      from cmmp_jax.data import pipeline
      source = test_pipeline.build_pipeline_test_tiles({str(tmp_path)!r})
      batch = next(iter(pipeline.make_train_loader(
          source, global_batch_size=2, seed=0, shard_index=0, shard_count=1)))
      assert batch['image'].shape == (2, 16, 16, 3)
      print('tensorflow imported:', 'tensorflow' in sys.modules)
  """)
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ,
         'PYTHONPATH': os.pathsep.join([os.path.dirname(tests_dir), tests_dir])}
  result = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tensorflow imported: False' in result.stdout


def test_a_failing_record_read_names_the_record_and_source():
  """The generic pipeline (any random-access source): the storage error gets the record and the
  source's name, and the pipeline's own errors pass unchanged."""

  class Flaky:
    def __len__(self):
      return 4

    def __getitem__(self, index):
      if index == 2:
        raise RuntimeError("Corrupted Riegeli/records file: chunk header hash mismatch")
      return {"image": np.zeros((8, 8, 3), np.uint8), "aux": np.zeros((8, 8, 1), np.uint8),
              "mask": np.zeros((8, 8, 1), np.uint8)}

    def __repr__(self):
      return "Flaky(split='train')"

  batches = pipeline.eval_batches(Flaky(), global_batch_size=2, shard_index=0, shard_count=1)
  next(batches)
  with pytest.raises(pipeline.RecordReadError,
                     match=r"^record 2 of Flaky\(split='train'\) cannot be read: RuntimeError: "
                           r"Corrupted Riegeli"):
    next(batches)
