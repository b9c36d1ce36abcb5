"""Training input pipeline throughput: decoded + augmented examples per second.

  python -m benchmarks.pipeline [--size=512] [--workers=0,2] [--num_examples=64]
      [--batch_size=4] [--input_size=256] [--json=PATH]
      [--data_dir=DIR --dataset=NAME --split=train]

Without --data_dir it builds a synthetic array_record TFDS dataset of `num_examples` PNG tiles
of size x size in a temporary folder (image, one-channel heat-map aux, mask), so the numbers
include PNG decoding, the reference augmentations, the optional resize and float32 scaling and
batching, i.e. everything `make_train_loader` does. workers = 0 runs in this process; N > 0
uses N grain worker processes. The first batch of every worker (start-up) is not timed.
"""
from __future__ import annotations

import json
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import cv2
import numpy as np
import tensorflow_datasets as tfds

from data_builders import common

from cmmp_jax import config_checks
from cmmp_jax.data import pipeline
from cmmp_jax.data.augment import AugmentConfig


def synthetic_tile(index: int, size: int) -> dict[str, np.ndarray]:
  """A tile that compresses roughly like an aerial photo: smooth colour fields plus noise,
  a sparse line heat-map as aux and a road mask, all uint8 (size, size, C)."""
  rng = np.random.default_rng(index)
  coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
  noise = rng.integers(-12, 13, (size, size, 3))
  image = np.clip(smooth.astype(np.int32) + noise, 0, 255).astype(np.uint8)
  mask = np.zeros((size, size), np.uint8)
  for _ in range(6):
    start, end = rng.integers(0, size, 2), rng.integers(0, size, 2)
    cv2.line(mask, tuple(int(v) for v in start), tuple(int(v) for v in end), 1,
             thickness=max(1, size // 64))
  aux = (cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 2.0) * 200).astype(np.uint8)
  return {'image': image, 'aux': aux[..., None], 'mask': mask[..., None]}


class SyntheticTiles(tfds.core.GeneratorBasedBuilder):
  """Synthetic tiles in the shared data contract, PNG-encoded in array_record files."""
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, tile_size: int = 512, num_tiles: int = 64, **kwargs):
    self._tile_size = tile_size
    self._num_tiles = num_tiles
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=common.example_features(1))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for index in range(self._num_tiles):
      tile_id = f'synthetic_{index}'
      yield tile_id, common.make_example(tile_id, **synthetic_tile(index, self._tile_size))


def build_synthetic_source(data_dir: str, size: int, num_examples: int) -> Any:
  """Builds the synthetic dataset under data_dir and returns its TFDS data source."""
  builder = SyntheticTiles(tile_size=size, num_tiles=num_examples, data_dir=data_dir,
                           file_format='array_record')
  builder.download_and_prepare()
  # Reopen read-only: a source that references this module's builder class would be pickled
  # by value into spawned grain workers when run as __main__, and TFDS refuses to register
  # the class a second time there.
  return tfds.builder_from_directory(builder.data_dir).as_data_source(split='train')


def measure(source: Any, num_workers: int, num_examples: int, batch_size: int,
            input_size: int | None) -> dict[str, float]:
  """Times `num_examples` examples (rounded up to whole batches) after one warm-up batch per
  worker (worker start-up is not timed)."""
  loader = pipeline.make_train_loader(
      source, global_batch_size=batch_size, seed=0, input_size=input_size,
      augment=AugmentConfig(), num_workers=num_workers, shard_index=0, shard_count=1)
  iterator = iter(loader)
  # Workers hand out batches round-robin: one batch from each means every worker has started.
  for _ in range(max(1, num_workers)):
    next(iterator)
  num_batches = max(1, -(-num_examples // batch_size))
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  seconds = time.perf_counter() - start
  del iterator
  rate = num_batches * batch_size / seconds
  return {'workers': num_workers, 'examples': num_batches * batch_size, 'seconds': seconds,
          'examples_per_s': rate, 'examples_per_s_per_worker': rate / max(num_workers, 1)}


def run(size: int, workers: Sequence[int], num_examples: int, *, batch_size: int = 4,
        input_size: int | None = None, source: Any = None) -> dict[str, Any]:
  """Measures the pipeline for each worker count.

  Args:
    size: tile side of the synthetic dataset (read from record 0 when `source` is given).
    workers: worker counts to try (0 = in-process).
    num_examples: synthetic dataset size and number of timed examples per worker count.
    batch_size: examples per batch.
    input_size: optional model input side (the reference trains BJRoad at 512 from 1024 tiles).
    source: an existing random-access source; None builds the synthetic one.

  Returns:
    {'size', 'batch_size', 'input_size', 'num_examples', 'results': [per worker count:
    {'workers', 'examples', 'seconds', 'examples_per_s', 'examples_per_s_per_worker'}]}.
  """
  with tempfile.TemporaryDirectory(prefix='cmmp_pipeline_bench_') as data_dir:
    if source is None:
      source = build_synthetic_source(data_dir, size, num_examples)
    else:
      size = int(source[0]['image'].shape[0])
    results = [measure(source, w, num_examples, batch_size, input_size) for w in workers]
  return {'size': size, 'batch_size': batch_size, 'input_size': input_size,
          'num_examples': num_examples, 'results': results}


def define_flags() -> None:
  """The command line's flags (defined only when this module runs as the program)."""
  flags.DEFINE_integer('size', 512, 'Synthetic tile side.', lower_bound=1)
  config_checks.define_integer_list('workers', [0, 2], 'Grain worker counts.')
  flags.DEFINE_integer('num_examples', 64, 'Examples timed.', lower_bound=1)
  flags.DEFINE_integer('batch_size', 4, 'Batch size.', lower_bound=1)
  flags.DEFINE_integer('input_size', None, 'Resize to this side (default: keep).',
                       lower_bound=1)
  flags.DEFINE_string('json', None, 'Also write the results to this file.')
  flags.DEFINE_string('data_dir', None, 'Read an existing TFDS dataset instead.')
  flags.DEFINE_string('dataset', None, 'TFDS name under --data_dir.')
  flags.DEFINE_string('split', 'train', 'Split of --dataset.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  source = None
  if args.data_dir is not None:
    if args.dataset is None:
      raise app.UsageError('--data_dir needs --dataset')
    source = tfds.data_source(args.dataset, data_dir=args.data_dir, split=args.split)
  report = run(args.size, args.workers, args.num_examples, batch_size=args.batch_size,
               input_size=args.input_size, source=source)
  for row in report['results']:
    print(f"workers={row['workers']}: {row['examples_per_s']:.1f} examples/s "
          f"({row['examples_per_s_per_worker']:.1f} per worker; {row['examples']} examples in "
          f"{row['seconds']:.2f} s; tile {report['size']}, batch {report['batch_size']}, "
          f"input_size {report['input_size']})")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)


if __name__ == '__main__':
  define_flags()
  app.run(main)
