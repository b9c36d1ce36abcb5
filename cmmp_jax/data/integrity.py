"""Can a built dataset split be trusted? Checks of its array_record files and of its content.

A truncated or overwritten array_record file otherwise shows up as a bare
`Corrupted Riegeli/records file: chunk header hash mismatch` from a reader thread, with no file,
split or dataset named, possibly after the train step has compiled. Three layers, all run by
`cmmp_jax.data.sources.dataset_source` before anything compiles:

  * `check_files`: every shard file of the split exists, its footer (the record index) reads,
    it holds the number of records TFDS recorded for it (dataset_info.json's shardLengths), and
    its first and last records read back (their chunk hashes verified). Cost: one footer and two
    records per shard, milliseconds, whatever the dataset's size. Damage inside the file is not
    found here (that would mean reading every byte) but by the next layer when it is read.
  * `CheckedSource`: the split's random-access source whose read errors name the file, the
    record, the split, the dataset and the rebuild command (`DatasetDamagedError`).
  * `scan_content` / `content_warnings`: a split whose every mask has no road pixel, or whose
    every aux raster (GPS heat-map or lidar) is zero, cannot train or score a model; reading stops
    at the first example of each kind, so a healthy split costs a few records and only a
    degenerate one is read whole (its size is then the count the warning gives).
"""
from __future__ import annotations

import bisect
import dataclasses
import os
import pathlib
from typing import Any, Iterator, Sequence

import numpy as np

from cmmp_jax.data import pipeline


class DatasetDamagedError(pipeline.RecordReadError):
  """A file of a built dataset is missing, truncated or corrupted. One line: the file, the
  split, the dataset and the command that rebuilds it."""


@dataclasses.dataclass(frozen=True)
class ShardFile:
  """One array_record file of a split: it holds `num_records` records, of which the split reads
  `take` starting at `skip` (all of them, unless the split is a slice like 'train[:80%]')."""
  path: pathlib.Path
  num_records: int
  skip: int
  take: int


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """Where the records of one split of a built dataset live, and how to rebuild it.

  dataset: e.g. 'synthetic/tiny 1.0.0'; rebuild: the shell command that rebuilds the dataset.
  """
  dataset: str
  split: str
  files: tuple[ShardFile, ...]
  rebuild: str

  def damaged(self, path: os.PathLike | str, problem: str) -> DatasetDamagedError:
    return DatasetDamagedError(
        f"dataset file {path} (split {self.split!r} of dataset {self.dataset}): {problem}; "
        f"rebuild the dataset with `{self.rebuild}`")

  def locate(self, index: int) -> tuple[ShardFile, int]:
    """(file, record number within that file) of record `index` of the split."""
    starts = np.cumsum([0] + [f.take for f in self.files[:-1]]).tolist()
    file_number = bisect.bisect_right(starts, index) - 1
    shard = self.files[file_number]
    return shard, shard.skip + index - starts[file_number]


def split_files(builder: Any, split: str, rebuild: str) -> SplitFiles:
  """The SplitFiles of `split` of a prepared TFDS builder (from its dataset_info.json)."""
  info = builder.info
  name = f"{info.name}/{info.config_name} {info.version}" if info.config_name else (
      f"{info.name} {info.version}")
  files = tuple(
      ShardFile(pathlib.Path(os.fspath(fi.filename)), int(fi.examples_in_shard), int(fi.skip),
                int(fi.take))
      for fi in info.splits[split].file_instructions)
  return SplitFiles(dataset=name, split=split, files=files, rebuild=rebuild)


def check_files(split: SplitFiles) -> None:
  """Raises DatasetDamagedError for the first shard file of `split` that is missing, whose
  footer does not read, whose record count differs from the dataset info, or whose first or
  last record does not read back."""
  # array_record's reader is a C++ extension; importing it here keeps this module importable
  # (and its errors testable) where only the pipeline is used.
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  for shard in split.files:
    if not shard.path.is_file():
      raise split.damaged(shard.path, "the file is missing")
    size = shard.path.stat().st_size
    try:
      with open(shard.path, "rb"):  # the reader reports a file it may not open as a bad footer
        pass
      reader = ArrayRecordReader(os.fspath(shard.path), "readahead_buffer_size:0")
    except (RuntimeError, OSError, ValueError) as error:
      raise split.damaged(shard.path, f"the file cannot be opened "
                                      f"({getattr(error, 'strerror', None) or error})") from error
    try:
      if not reader.ok():
        raise split.damaged(shard.path, f"the file is damaged: its record index (the footer) "
                                        f"cannot be read; the file has {size:,} bytes, "
                                        "truncated?")
      found = reader.num_records()
      if found != shard.num_records:
        raise split.damaged(shard.path, f"the file holds {found} records where the dataset "
                                        f"info records {shard.num_records}")
      for record in sorted({0, found - 1}) if found else ():
        try:
          reader.read([record])
        except (RuntimeError, OSError, ValueError) as error:
          raise split.damaged(shard.path, f"the file is damaged: record {record} does not "
                                          f"read back ({error})") from error
    finally:
      try:
        reader.close()
      except RuntimeError:  # a reader that failed to read the footer fails to close as well
        pass


class CheckedSource:
  """A split's random-access source whose read errors name the file and the split.

  `repr` is the wrapped source's: grain records it in iterator checkpoints and compares it on
  restore, so wrapping a source does not invalidate checkpoints made without the wrapper."""

  def __init__(self, source: Any, split: SplitFiles):
    self._source = source
    self._split = split

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return repr(self._source)

  def __iter__(self) -> Iterator[Any]:
    return (self[i] for i in range(len(self)))

  def __getitem__(self, index: int) -> Any:
    index = int(index)
    if not 0 <= index < len(self._source):
      raise IndexError(f"record {index} of {self!r}, which has {len(self._source)}")
    try:
      return self._source[index]
    except Exception as error:
      shard, record = self._split.locate(index)
      where = f"record {record} of the file (record {index} of the split)"
      if isinstance(error, (RuntimeError, OSError)):  # 'Corrupted Riegeli/records file: ...'
        problem = f"{where} cannot be read, the file is damaged ({error})"
      else:  # the record reads, its features do not decode with the builder's features
        problem = (f"{where} does not decode ({type(error).__name__}: {error}); the dataset "
                   "was perhaps built by an older version of its builder")
      raise self._split.damaged(shard.path, problem) from error


@dataclasses.dataclass(frozen=True)
class ContentCounts:
  """What `scan_content` read: examples, and how many had a road pixel / a non-zero aux."""
  num_read: int
  num_examples: int
  with_road: int
  with_aux: int


def scan_content(source: Any, *, check_aux: bool = True) -> ContentCounts:
  """Reads examples of `source` (dicts with 'mask' and 'aux' arrays; other features may be left
  undecoded) until one has a road pixel and (with check_aux) one has a non-zero aux raster, or
  the split ends."""
  with_road = with_aux = num_read = 0
  for index in range(len(source)):
    example = source[index]
    num_read += 1
    with_road += bool(np.any(np.asarray(example["mask"])))
    with_aux += bool(np.any(np.asarray(example["aux"])))
    if with_road and (with_aux or not check_aux):
      break
  return ContentCounts(num_read, len(source), with_road, with_aux)


def content_warnings(counts: ContentCounts, split: SplitFiles, *,
                     check_aux: bool = True) -> Sequence[str]:
  """One line per thing in `counts` that means the split cannot be right (all masks empty, all
  aux rasters zero); empty when the split is fine or has no examples."""
  if counts.num_read < counts.num_examples or not counts.num_examples:
    return []
  where = f"split {split.split!r} of dataset {split.dataset}"
  warnings = []
  if not counts.with_road:
    warnings.append(
        f"all {counts.num_examples} masks of {where} are empty (0 road pixels in "
        f"{counts.num_examples} of {counts.num_examples} tiles): a model cannot learn or be "
        "scored on it (G_IoU is undefined); check the road files the dataset was built from "
        f"(do they overlap the imagery?) and rebuild with `{split.rebuild}`")
  if check_aux and not counts.with_aux:
    warnings.append(
        f"all {counts.num_examples} aux rasters (GPS heat-maps or lidar) of {where} are zero "
        f"(0 non-zero pixels in {counts.num_examples} of {counts.num_examples} tiles): the GPS "
        "points fall outside every tile (wrong gps_crs, projected metres read as degrees, or "
        f"swapped columns?); check the inputs and rebuild with `{split.rebuild}`")
  return warnings
