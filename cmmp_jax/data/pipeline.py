"""grain input pipeline: shuffled, augmented, scaled, sharded training batches and padded eval.

Sources: any random-access source with __len__ and __getitem__ returning examples of the
shared data contract, e.g. `tfds.data_source(name, data_dir=..., split=...)` over an
array_record TFDS dataset (PNG/JPEG image features decode without TensorFlow).

Training (`make_train_loader`), per example and in this order:
  contract check -> paired augmentation (grain RandomMap: the generator is
  Philox(key=sampler_seed + position in the sample stream), so it depends on the seed and the
  record position only; deterministic, different each epoch, and reproducible after a restore)
  -> optional resize of image and aux to `input_size` (the mask keeps the label resolution; the
  loss resizes the label) -> float32 scaling -> batching with drop_remainder.
The sampler shuffles with a fresh permutation per epoch and shards the records by JAX process.

Batches (NHWC): 'image' float32 (B, h, w, 3), 'aux' float32 (B, h, w, C), 'mask' float32
(B, H, W, 1) in {0, 1}; evaluation batches add 'valid' bool (B,) and 'index' int64 (B,) (record
index, -1 on padding rows). B = global_batch_size // shard_count per process.

Checkpointing the training iterator with orbax-checkpoint: grain registers
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` (its own CheckpointHandler, one JSON
file per JAX process) with orbax, so the iterator is one more item of a Composite:

  iterator = iter(loader)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state), **{DATA_ITER_ITEM: iterator_save_args(iterator)}))
  manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      **{DATA_ITER_ITEM: iterator_restore_args(iterator)}))   # restores `iterator` in place

A restored iterator must come from a loader built with the same source, seed, batch size,
sharding and num_workers (grain validates the sampler, the source's repr and the worker count).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import cv2
import grain
import jax
import numpy as np

from cmmp_jax import sharding
from cmmp_jax.data import augment as augment_lib
from cmmp_jax.data.augment import AugmentConfig, ExampleError

DATA_ITER_ITEM = 'data_iter'
SCALINGS = ('reference', 'unit')

# Parallel reads (and PNG decoding) per process. The prefetch buffer holds decoded full-size
# examples, so it is sized in batches: grain's default of 500 examples would hold ~2.5 GB of
# 1024x1024 tiles per process.
_READ_THREADS = 4
_PREFETCH_BATCHES = 2


class PipelineError(ValueError):
  """Invalid pipeline arguments (batch size, sharding, sizes, scaling) or an unusable source."""


class RecordReadError(RuntimeError):
  """A record of a source could not be read or decoded (a damaged file, typically); the message
  names the record and the source (data.integrity.DatasetDamagedError, a subclass, names the
  file, split, dataset and the command that rebuilds it)."""


def scale_inputs(array: np.ndarray, scaling: str = 'reference') -> np.ndarray:
  """Scales uint8 pixels to float32 model inputs.

  Args:
    array: uint8 array of any shape.
    scaling: 'reference' = x / 255 * 3.2 - 1.6 (the release's scaling, range [-1.6, 1.6]) or
      'unit' = x / 255 (range [0, 1]).

  Returns:
    float32 array of the same shape.
  """
  if scaling not in SCALINGS:
    raise PipelineError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
  if array.dtype != np.uint8:
    raise PipelineError(f"scale_inputs expects uint8 pixels, got {array.dtype}")
  unit = array.astype(np.float32) / np.float32(255.0)
  if scaling == 'unit':
    return unit
  return unit * np.float32(3.2) - np.float32(1.6)


def _as_hw(input_size: int | Sequence[int] | None) -> tuple[int, int] | None:
  """Normalises `input_size` (int side or (height, width)) to (height, width)."""
  if input_size is None:
    return None
  if isinstance(input_size, (int, np.integer)):
    size = (int(input_size), int(input_size))
  else:
    size = tuple(int(s) for s in input_size)
  if len(size) != 2 or min(size) <= 0:
    raise PipelineError(f"input_size must be a positive int or (height, width), got {input_size!r}")
  return size


def _resize(array: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a uint8 (H, W, C) array to (h, w, C) (cv2.resize, OpenCV's default)."""
  if array.shape[:2] == size_hw:
    return array
  resized = cv2.resize(array, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)
  return resized.reshape(size_hw[0], size_hw[1], array.shape[2])


class _NamedSource:
  """Random-access source with a stable repr.

  grain checks `repr(source)` when an iterator state is restored; an object's default repr
  contains its memory address and would fail that check in a new process.
  """

  def __init__(self, source: Any):
    self._source = source
    try:
      self._num_records = len(source)
    except TypeError as e:
      raise PipelineError(f"source {type(source).__name__} has no len(); need random access") from e
    source_repr = repr(source)
    if isinstance(source, (list, tuple)) or re.search(r' at 0x[0-9a-fA-F]+>$', source_repr):
      source_repr = f"{type(source).__qualname__}(num_records={self._num_records})"
    self._repr = source_repr

  def __len__(self) -> int:
    return self._num_records

  def __getitem__(self, index: int) -> Any:
    try:
      return self._source[index]
    except (RecordReadError, ExampleError, IndexError):
      raise
    except Exception as error:  # e.g. RuntimeError('Corrupted Riegeli/records file: ...')
      # Reads run in grain's threads, far from the source's name: say which record of which
      # source failed, not only what the storage library saw.
      raise RecordReadError(
          f"record {index} of {self._repr} cannot be read: {type(error).__name__}: "
          f"{error}") from error

  def __repr__(self) -> str:
    return self._repr


@dataclasses.dataclass(frozen=True)
class TileSpec:
  """What every example of a source must look like: tile size and aux channel count."""
  height: int
  width: int
  aux_channels: int

  @classmethod
  def from_source(cls, source: Any) -> TileSpec:
    """Reads record 0 (one decode) and checks it against the data contract."""
    if len(source) == 0:
      raise PipelineError(f"source {source!r} is empty")
    example = source[0]
    height, width = augment_lib.validate_example(example)
    return cls(height, width, int(example['aux'].shape[2]))

  def check(self, example: Mapping[str, Any]) -> None:
    """Raises ExampleError naming the tile when the example does not fit this spec."""
    height, width = augment_lib.validate_example(example)
    if (height, width) != (self.height, self.width):
      raise ExampleError(
          f"tile {augment_lib.tile_id_of(example)!r}: size {(height, width)} differs from the "
          f"dataset's tile size {(self.height, self.width)} (record 0); tiles of one dataset "
          "must share a size to be batched")
    if example['aux'].shape[2] != self.aux_channels:
      raise ExampleError(
          f"tile {augment_lib.tile_id_of(example)!r}: aux has {example['aux'].shape[2]} "
          f"channel(s), record 0 has {self.aux_channels}")


@dataclasses.dataclass(frozen=True)
class _CheckExample(grain.transforms.Map):
  """Contract and tile-size check before anything else touches the example."""
  spec: TileSpec

  def map(self, example):
    self.spec.check(example)
    return example


@dataclasses.dataclass(frozen=True)
class _Augment(grain.transforms.RandomMap):
  """Paired augmentation with the generator grain derives from the seed and record position."""
  config: AugmentConfig

  def random_map(self, example, rng: np.random.Generator):
    return augment_lib.augment_example(example, rng, self.config)


@dataclasses.dataclass(frozen=True)
class _ToModelInputs(grain.transforms.Map):
  """Resizes image and aux to `input_size_hw`, scales them to float32, mask to float32 0/1.

  Drops 'tile_id' and 'bounds' so that batches hold only device-ready arrays.
  """
  input_size_hw: tuple[int, int] | None
  scaling: str

  def map(self, example):
    image, aux = example['image'], example['aux']
    if self.input_size_hw is not None:
      image = _resize(image, self.input_size_hw)
      aux = _resize(aux, self.input_size_hw)
    return {
        'image': scale_inputs(image, self.scaling),
        'aux': scale_inputs(aux, self.scaling),
        'mask': example['mask'].astype(np.float32),
    }


def _resolve_sharding(global_batch_size: int, shard_index: int | None,
                      shard_count: int | None) -> tuple[int, int, int]:
  """Returns (shard_index, shard_count, per-process batch size); defaults come from JAX."""
  if shard_index is None or shard_count is None:
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise PipelineError(
        f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
        f"shard_count={shard_count}")
  if global_batch_size < 1 or global_batch_size % shard_count:
    raise PipelineError(
        f"global_batch_size={global_batch_size} must be a positive multiple of "
        f"shard_count={shard_count}")
  return int(shard_index), int(shard_count), global_batch_size // shard_count


def _sampler_seed(seed: int) -> int:
  """Maps the user's seed to grain's 32-bit seed through a hash.

  grain derives the per-epoch shuffle seed as seed + epoch and the per-record generator as
  Philox(seed + position); hashing keeps runs with seeds s and s + 1 from sharing streams.
  """
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise PipelineError(f"seed must be a non-negative int, got {seed!r}")
  return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])


def _check_scaling(scaling: str) -> None:
  if scaling not in SCALINGS:
    raise PipelineError(f"scaling must be one of {SCALINGS}, got {scaling!r}")


def make_train_loader(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    input_size: int | Sequence[int] | None = None,
    augment: AugmentConfig | None = AugmentConfig(),
    scaling: str = 'reference',
    num_workers: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    read_options: grain.ReadOptions | None = None,
    worker_buffer_size: int = 1,
) -> grain.DataLoader:
  """Builds the training DataLoader.

  Args:
    source: random-access source of contract examples (all tiles of one size).
    global_batch_size: examples per step over all processes; each process gets
      global_batch_size // shard_count.
    seed: non-negative int; fixes the per-epoch shuffles and every augmentation draw.
    input_size: int or (height, width) for image and aux; None keeps the tile size. The mask
      always keeps the tile (label) size.
    augment: AugmentConfig, or None for no augmentation.
    scaling: 'reference' (x / 255 * 3.2 - 1.6) or 'unit' (x / 255) for image and aux.
    num_workers: grain worker processes; 0 runs everything in this process.
    shard_index, shard_count: this process's shard; default jax.process_index() and
      jax.process_count(). Every shard gets the same number of records (remainder dropped).
    num_epochs: passes over the data; None repeats forever. Batches may span an epoch boundary
      (the sampler is one stream); the last incomplete batch is dropped.
    read_options: grain.ReadOptions for reading/decoding; default 4 threads and a prefetch
      buffer of two per-process batches.
    worker_buffer_size: batches each worker prepares ahead.

  Returns:
    grain.DataLoader; `iter(loader)` gives a DataLoaderIterator with get_state/set_state.

  Raises:
    PipelineError: bad arguments or fewer records than shards.
    ExampleError: (while iterating, also for record 0 here) an example breaks the contract.
  """
  shard_index, shard_count, local_batch_size = _resolve_sharding(
      global_batch_size, shard_index, shard_count)
  _check_scaling(scaling)
  input_size_hw = _as_hw(input_size)
  if num_epochs is not None and num_epochs < 1:
    raise PipelineError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if num_workers < 0:
    raise PipelineError(f"num_workers must be >= 0, got {num_workers}")
  named_source = _NamedSource(source)
  if len(named_source) < shard_count:
    raise PipelineError(
        f"source {named_source!r} has {len(named_source)} records, fewer than the "
        f"{shard_count} shards")
  spec = TileSpec.from_source(named_source)

  shard_options = grain.sharding.ShardOptions(
      shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(named_source), shard_options=shard_options, shuffle=True,
      num_epochs=num_epochs, seed=_sampler_seed(seed))
  operations: list[Any] = [_CheckExample(spec)]
  if augment is not None:
    operations.append(_Augment(augment))
  operations += [
      _ToModelInputs(input_size_hw, scaling),
      grain.transforms.Batch(batch_size=local_batch_size, drop_remainder=True),
  ]
  if read_options is None:
    read_options = grain.ReadOptions(
        num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES * local_batch_size)
  if num_workers > 0:
    sharding.ensure_absl_flags_parsed()  # grain 0.2.18 reads an absl flag in its workers
  return grain.DataLoader(
      data_source=named_source, sampler=sampler, operations=operations,
      worker_count=num_workers, worker_buffer_size=worker_buffer_size,
      shard_options=shard_options, read_options=read_options)


def iterator_save_args(iterator: grain.DataLoaderIterator) -> Any:
  """orbax save args for the DataLoader iterator (Composite item DATA_ITER_ITEM)."""
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DataLoaderIterator) -> Any:
  """orbax restore args: the state is set on `iterator` in place (Composite item DATA_ITER_ITEM)."""
  return grain.checkpoint.CheckpointRestore(iterator)


def num_eval_batches(num_records: int, global_batch_size: int) -> int:
  """Steps `eval_batches` takes on every process: ceil(num_records / global_batch_size)."""
  return math.ceil(num_records / global_batch_size)


@dataclasses.dataclass(frozen=True)
class _EvalRecord:
  """Maps this process's position in the padded eval stream to a model-ready example.

  Global step b holds records b*G .. b*G+G-1 (G = global batch size); process p takes the
  slice p*B .. p*B+B-1 of it (B = G // shard_count), so concatenating the processes' batches
  in process order gives the global batch in record order. Positions >= num_records are
  padding: zero pixels, 'valid' False, 'index' -1.
  """
  source: Any
  spec: TileSpec
  to_inputs: _ToModelInputs
  global_batch_size: int
  local_batch_size: int
  shard_index: int

  def record_index(self, local_position: int) -> int:
    step, row = divmod(local_position, self.local_batch_size)
    return step * self.global_batch_size + self.shard_index * self.local_batch_size + row

  def __call__(self, local_position: int) -> dict[str, Any]:
    index = self.record_index(local_position)
    if index < len(self.source):
      example = self.source[index]
      self.spec.check(example)
      valid = True
    else:
      example = {
          'image': np.zeros((self.spec.height, self.spec.width, 3), np.uint8),
          'aux': np.zeros((self.spec.height, self.spec.width, self.spec.aux_channels), np.uint8),
          'mask': np.zeros((self.spec.height, self.spec.width, 1), np.uint8),
      }
      index, valid = -1, False
    inputs = self.to_inputs.map(example)
    inputs['valid'] = np.bool_(valid)
    inputs['index'] = np.int64(index)
    return inputs


def eval_batches(
    source: Any,
    *,
    global_batch_size: int,
    input_size: int | Sequence[int] | None = None,
    scaling: str = 'reference',
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Iterates the source once, in record order, sharded by process, padded to full batches.

  Every process yields num_eval_batches(len(source), global_batch_size) batches of
  global_batch_size // shard_count rows (same step count everywhere, as multi-process jitted
  evaluation needs); over all processes each record appears exactly once with 'valid' True.

  Args: as make_train_loader (no shuffling, augmentation or workers; reads use threads).

  Returns:
    Iterator of dicts: 'image' float32 (B, h, w, 3), 'aux' float32 (B, h, w, C), 'mask'
    float32 (B, H, W, 1), 'valid' bool (B,), 'index' int64 (B,) (-1 on padding rows).
  """
  shard_index, shard_count, local_batch_size = _resolve_sharding(
      global_batch_size, shard_index, shard_count)
  _check_scaling(scaling)
  named_source = _NamedSource(source)
  spec = TileSpec.from_source(named_source)
  to_record = _EvalRecord(
      source=named_source, spec=spec, to_inputs=_ToModelInputs(_as_hw(input_size), scaling),
      global_batch_size=global_batch_size, local_batch_size=local_batch_size,
      shard_index=shard_index)
  num_positions = num_eval_batches(len(named_source), global_batch_size) * local_batch_size
  if read_options is None:
    read_options = grain.ReadOptions(
        num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES * local_batch_size)
  dataset = (
      grain.MapDataset.range(num_positions)
      .map(to_record)
      .to_iter_dataset(read_options)
      .batch(local_batch_size, drop_remainder=False))
  return iter(dataset)
