"""A damaged dataset names itself: the file, the split, the dataset and the command that rebuilds
it, at startup (before anything compiles) for what a cheap check finds, and when a record is
read for what it does not (damage inside a file). A split whose masks, or whose aux rasters, are
all zero is a prominent warning with the counts.

Each test damages a copy of one tiny synthetic build (8 tiles of 64 px; one array_record file
per split, one record per chunk) the way disks and interrupted copies do: a deleted shard, a
truncated one, bytes overwritten in its first chunk or in the middle, a shard of another split
put in its place, an unreadable dataset_info.json."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cmmp_jax import config_checks
from cmmp_jax.data import integrity, sources
from configs import synthetic
from data_builders import build as build_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A tiny synthetic build, never modified (tests damage copies)."""
  data_dir = tmp_path_factory.mktemp("pristine")
  version_dir = build_lib.build("synthetic", data_dir, "tiny")
  return data_dir, version_dir.relative_to(data_dir)


@pytest.fixture
def dataset(pristine, tmp_path):
  """(config reading a fresh copy of the build, its version folder)."""
  data_dir, version = pristine
  copy = tmp_path / "data"
  shutil.copytree(data_dir, copy)
  config = synthetic.get_config()
  config.update_from_flattened_dict({"data.config": "tiny", "data.data_dir": str(copy),
                                     "data.build_if_missing": False, "batch_size": 2,
                                     "eval_batch_size": 2, "data.augment": False})
  return config, copy / version


def shard(version_dir: pathlib.Path, split: str) -> pathlib.Path:
  (path,) = version_dir.glob(f"synthetic-{split}.array_record-*")
  return path


def rebuild_command(config) -> str:
  return (f"python -m data_builders.build synthetic --config tiny "
          f"--data_dir={config.data.data_dir} --overwrite")


def expect_one_line(error: BaseException, path: pathlib.Path, split: str, problem: str):
  text = str(error)
  assert "\n" not in text
  assert text.startswith(f"dataset file {path} (split {split!r} of dataset synthetic/tiny "), text
  assert re.search(problem, text), text
  assert text.endswith(f"; rebuild the dataset with `{rebuild_command_from(text)}`")
  return text


def rebuild_command_from(text: str) -> str:
  return text.rsplit("`", 2)[-2]


def overwrite(path: pathlib.Path, offset: int, length: int = 64) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(np.random.default_rng(0).integers(0, 256, length, np.uint8).tobytes())


def test_a_healthy_build_opens_without_warnings(dataset, capsys):
  config, _ = dataset
  for split in SPLITS:
    source = sources.dataset_source(config, split)
    assert len(source) == {"train": 4, "validation": 2, "test": 2}[split]
    # grain compares this repr when it restores an iterator: it must stay the TFDS source's.
    assert repr(source) == f"ArrayRecordDataSource(name=synthetic, split={split!r}, decoders=None)"
  assert capsys.readouterr().out == ""


@pytest.mark.parametrize("damage, problem", [
    ("delete", r"the file is missing"),
    ("truncate_64k", r"the file is damaged: its record index \(the footer\) cannot be read; "
                     r"the file has 65,536 bytes, truncated\?"),
    ("truncate_0", r"its record index \(the footer\) cannot be read; the file has 0 bytes"),
    ("first_chunk", r"the file is damaged: record 0 does not read back \(Corrupted "
                    r"Riegeli/records file: chunk header hash mismatch"),
    ("other_split", r"the file holds 2 records where the dataset info records 4"),
])
def test_damage_found_at_startup_names_file_split_and_rebuild(dataset, damage, problem):
  config, version_dir = dataset
  path = shard(version_dir, "train")
  if damage == "delete":
    path.unlink()
  elif damage.startswith("truncate"):
    os.truncate(path, 65536 if damage == "truncate_64k" else 0)
  elif damage == "first_chunk":
    overwrite(path, 100)  # inside the header of the first chunk (it starts at byte 64)
  else:  # a copy gone wrong: validation's shard (2 records) where train's (4) belongs
    shutil.copy(shard(version_dir, "validation"), path)
  with pytest.raises(integrity.DatasetDamagedError) as raised:
    sources.dataset_source(config, "train")
  text = expect_one_line(raised.value, path, "train", problem)
  assert rebuild_command_from(text) == rebuild_command(config)
  for split in ("validation", "test"):  # the other splits are fine and open
    assert len(sources.dataset_source(config, split)) == 2


def test_the_rebuild_command_repairs_the_dataset(dataset):
  config, version_dir = dataset
  path = shard(version_dir, "train")
  os.truncate(path, 65536)
  with pytest.raises(integrity.DatasetDamagedError) as raised:
    sources.dataset_source(config, "train")
  command = rebuild_command_from(str(raised.value)).split()
  assert command[:3] == ["python", "-m", "data_builders.build"]
  assert build_lib.main(command[3:]) == 0  # the command as printed, run in-process
  assert len(sources.dataset_source(config, "train")) == 4


def _corrupt_inside(version_dir: pathlib.Path, split: str) -> pathlib.Path:
  """Overwrites bytes inside the data of the split's record 1 (neither the first nor the last
  record of the file, which the startup check reads); returns the file."""
  path = shard(version_dir, split)
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
  sizes = [len(r) for r in reader.read_all()]
  reader.close()
  assert len(sizes) >= 3
  # Chunks follow the 64-byte file signature in record order, each a little longer than its
  # record: record 1's chunk starts after record 0's, and its data lies well past that.
  overwrite(path, 64 + sizes[0] + 64 + sizes[1] // 2)
  return path


def test_damage_inside_a_file_is_named_when_training_reads_it(dataset):
  config, version_dir = dataset
  path = _corrupt_inside(version_dir, "train")
  source = sources.dataset_source(config, "train")  # the cheap check cannot see it
  batches = iter(sources.train_loader(config, source))
  with pytest.raises(integrity.DatasetDamagedError) as raised:
    for _ in range(4):  # two epochs of two batches: every record is read
      next(batches)
  expect_one_line(raised.value, path, "train",
                  r"record 1 of the file \(record 1 of the split\) cannot be read, the file is "
                  r"damaged \(Corrupted Riegeli/records file: chunk (data|header) hash mismatch")


def test_damage_inside_a_file_is_named_when_evaluation_reads_it(dataset):
  config, version_dir = dataset
  path = _corrupt_inside(version_dir, "train")  # the only split with 3 records or more
  source = sources.dataset_source(config, "train")
  with pytest.raises(integrity.DatasetDamagedError) as raised:
    list(sources.eval_batches(config, source))
  expect_one_line(raised.value, path, "train", r"record 1 of the file \(record 1 of the split\)")


def test_an_unreadable_dataset_info_names_itself_and_how_to_rebuild(dataset):
  config, version_dir = dataset
  info = version_dir / "dataset_info.json"
  info.write_text('{"name": "synth')  # cut off mid-write
  with pytest.raises(integrity.DatasetDamagedError) as raised:
    sources.dataset_source(config, "train")
  text = str(raised.value)
  assert "\n" not in text
  assert text.startswith(f"the metadata {info} of dataset synthetic/tiny cannot be read (")
  move, build = text.rsplit("`", 2)[-2].split(" && ")
  assert move == f"mv {version_dir} {version_dir}.damaged"
  # The advice works: the damaged build moved aside (kept), the dataset rebuilt.
  version_dir.rename(f"{version_dir}.damaged")
  assert build_lib.main(build.split()[3:]) == 0
  assert len(sources.dataset_source(config, "train")) == 4
  assert (pathlib.Path(f"{version_dir}.damaged") / "dataset_info.json").read_text() == (
      '{"name": "synth')


def _rewrite_split(config, version_dir: pathlib.Path, split: str, change) -> None:
  """Rewrites the split's file with change(example) for every example (same record count, so
  the file check passes): a build whose content, not its bytes, is wrong."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  builder = build_lib.make_builder("synthetic", config.data.data_dir, "tiny")
  source = builder.as_data_source(split=split)
  examples = []
  for i in range(len(source)):
    example = dict(source[i])
    tile_id = example["tile_id"]
    example["tile_id"] = tile_id.decode() if isinstance(tile_id, bytes) else tile_id
    examples.append(change(example))
  path = shard(version_dir, split)
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for example in examples:
    writer.write(builder.info.features.serialize_example(example))
  writer.close()


def _zero(key):
  def change(example):
    example[key] = np.zeros_like(example[key])
    return example
  return change


def test_a_split_without_any_road_pixel_is_a_prominent_warning(dataset, capsys):
  config, version_dir = dataset
  _rewrite_split(config, version_dir, "validation", _zero("mask"))
  sources.dataset_source(config, "train")
  assert capsys.readouterr().out == ""
  source = sources.dataset_source(config, "validation")
  assert len(source) == 2  # a warning, not an error: the run goes on
  (line,) = capsys.readouterr().out.splitlines()
  assert re.match(r"WARNING: all 2 masks of split 'validation' of dataset synthetic/tiny \S+ are "
                  r"empty \(0 road pixels in 2 of 2 tiles\): a model cannot learn or be scored "
                  r"on it", line), line
  assert line.endswith(f"rebuild with `{rebuild_command(config)}`")


def test_a_split_whose_heat_maps_are_all_zero_is_a_prominent_warning(dataset, capsys):
  config, version_dir = dataset
  _rewrite_split(config, version_dir, "train", _zero("aux"))
  sources.dataset_source(config, "train")
  (line,) = capsys.readouterr().out.splitlines()
  assert re.match(r"WARNING: all 4 aux rasters \(GPS heat-maps or lidar\) of split 'train' of "
                  r"dataset synthetic/tiny \S+ are zero \(0 non-zero pixels in 4 of 4 tiles\): "
                  r"the GPS points fall outside every tile \(wrong gps_crs", line), line
  # A model that never reads the aux raster does not care.
  config.model.name = "image_only"
  sources.dataset_source(config, "train")
  assert capsys.readouterr().out == ""


def test_content_scan_stops_at_the_first_road_and_heat_map():
  """A healthy split costs a few records, whatever its size."""
  road = {"mask": np.ones((4, 4, 1), np.uint8), "aux": np.ones((4, 4, 1), np.uint8)}
  empty = {"mask": np.zeros((4, 4, 1), np.uint8), "aux": np.zeros((4, 4, 1), np.uint8)}
  counts = integrity.scan_content([empty, road] + [empty] * 1000)
  assert counts == integrity.ContentCounts(num_read=2, num_examples=1002, with_road=1,
                                           with_aux=1)
  split = integrity.SplitFiles("d/c 1.0.0", "train", (), "REBUILD")
  assert integrity.content_warnings(counts, split) == []
  counts = integrity.scan_content([empty] * 3)
  assert counts == integrity.ContentCounts(3, 3, 0, 0)
  assert len(integrity.content_warnings(counts, split)) == 2
  assert len(integrity.content_warnings(counts, split, check_aux=False)) == 1
  assert integrity.content_warnings(integrity.scan_content([]), split) == []


def test_records_are_located_in_their_files():
  files = tuple(integrity.ShardFile(pathlib.Path(f"f{i}"), 10, skip, take)
                for i, (skip, take) in enumerate([(0, 10), (0, 10), (3, 5)]))
  split = integrity.SplitFiles("d", "train", files, "cmd")
  assert [(f.path.name, r) for f, r in map(split.locate, [0, 9, 10, 19, 20, 24])] == [
      ("f0", 0), ("f0", 9), ("f1", 0), ("f1", 9), ("f2", 3), ("f2", 7)]


@pytest.mark.slow  # main.py imports TensorFlow (clu's summary writers): ~10 s on a 2-core CPU
def test_main_reports_a_damaged_dataset_in_one_line_before_compiling(dataset, tmp_path):
  config, version_dir = dataset
  path = shard(version_dir, "validation")
  overwrite(path, 100)
  done = subprocess.run(
      [sys.executable, "main.py", "--config=configs/synthetic.py", "--config.data.config=tiny",
       f"--config.data.data_dir={config.data.data_dir}", "--config.batch_size=2",
       "--config.eval_batch_size=2", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
      timeout=300, check=False)
  assert done.returncode == 1, done.stderr[-3000:]
  (line,) = [l for l in done.stderr.splitlines() if l.strip()]
  assert line.startswith(f"error: dataset file {path} (split 'validation' of dataset "
                         "synthetic/tiny "), line
  assert line.endswith(f"rebuild the dataset with `{rebuild_command(config)}`")
  assert "compiled" not in done.stdout
  # The traceback is in the run's log, for whoever debugs it.
  assert "Traceback" in (tmp_path / "run" / "log.txt").read_text()


def test_an_unknown_split_names_the_field(dataset):
  config, _ = dataset
  config.data.eval_split = "valid"
  with pytest.raises(config_checks.ConfigError,
                     match=r"^config.data.eval_split = 'valid' is not one of the splits "
                           r"\['train', 'validation', 'test'\] of dataset synthetic/tiny$"):
    sources.dataset_source(config, config.data.eval_split)
