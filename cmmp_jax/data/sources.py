"""config.data -> the TFDS random-access sources and grain loaders a run reads.

`dataset_source(config, split)` opens a built dataset (building it first when
config.data.build_if_missing or manual_dir allows) and checks it before anything compiles
(`integrity`: its files against the dataset info, a split whose masks or aux rasters are all
zero); `train_loader` and `eval_batches` wrap `pipeline` with the run's settings and this
process's shard of every batch.
"""
from __future__ import annotations

import contextlib
import io
import pathlib
import time

from absl import logging
import jax
import tensorflow_datasets as tfds

from cmmp_jax import config_checks, reporting, sharding
from cmmp_jax.data import integrity, pipeline
from cmmp_jax.data.augment import AugmentConfig
from data_builders import build as build_lib


class DatasetMissingError(FileNotFoundError):
  """The configured dataset has not been built into data.data_dir."""


# A file of the dataset is missing, truncated or corrupted (raised by dataset_source, and by its
# sources' reads later); the message names the file, split, dataset and rebuild command.
DatasetDamagedError = integrity.DatasetDamagedError


def build_command(data, builder_config: str | None, *, overwrite: bool = False,
                  needs_manual_dir: bool = True) -> str:
  """The shell command that builds config.data's dataset (`overwrite`: replaces a build)."""
  return " ".join(
      ["python -m data_builders.build", data.name]
      + ([f"--config {builder_config}"] if builder_config else [])
      + ([f"--manual_dir={data.manual_dir or 'DOWNLOADS'}"] if needs_manual_dir else [])
      + [f"--data_dir={data.data_dir}"] + (["--overwrite"] if overwrite else []))


def dataset_source(config, split: str):
  """The random-access source of config.data for `split` (building it when allowed), checked:

  raises integrity.DatasetDamagedError (one line: file, split, dataset, rebuild command) when a
  file of the split is missing, truncated or corrupted, and wraps the source so that a record
  found damaged later says the same; prints a warning when every mask of the split is empty or
  every aux raster is zero (the aux check is skipped for config.model.name 'image_only')."""
  data = config.data
  data_dir = pathlib.Path(data.data_dir).expanduser().absolute()
  builder_config = data.config or None
  try:
    built = build_lib.is_built(data.name, data_dir, builder_config)
  except build_lib.BuildError:
    raise
  except Exception as error:  # a damaged dataset_info.json: TFDS reads it in the constructor
    raise _metadata_damaged(data, builder_config, data_dir, error) from error
  if not built:
    if data.build_if_missing or data.manual_dir:
      reporting.console(f"building dataset {data.name}/{builder_config} into {data_dir} ...")
      if sharding.is_primary():
        start = time.monotonic()
        _build_quietly(data, data_dir, builder_config)
        reporting.console(f"built in {time.monotonic() - start:.1f} s")
      sharding.sync_processes("dataset-built")
    else:
      raise DatasetMissingError(
          f"dataset {data.name!r} (builder config {builder_config!r}) is not built in "
          f"{data_dir}; build it with `{build_command(data, builder_config)}` or set "
          "config.data.data_dir")
  try:
    builder = build_lib.make_builder(data.name, data_dir, builder_config)
    splits = builder.info.splits
  except build_lib.BuildError:
    raise
  except Exception as error:
    raise _metadata_damaged(data, builder_config, data_dir, error) from error
  rebuild = build_command(data, builder_config, overwrite=True,
                          needs_manual_dir=_needs_manual_dir(builder))
  if split not in splits:
    fields = [f"config.{field}" for field in ("data.train_split", "data.eval_split",
                                              "data.test_split", "eval.split")
              if _field(config, field) == split] or ["split"]
    raise config_checks.ConfigError(
        f"{' / '.join(fields)} = {split!r} is not one of the splits {list(splits)} of dataset "
        f"{data.name}/{builder_config}")
  files = integrity.split_files(builder, split, rebuild)
  integrity.check_files(files)
  check_aux = config.model.name != "image_only"  # its model never reads the aux raster
  # Masks and aux only: the image (the largest feature) is not decoded for the scan.
  undecoded = {"image": tfds.decode.SkipDecoding(), "tile_id": tfds.decode.SkipDecoding()}
  counts = integrity.scan_content(
      integrity.CheckedSource(builder.as_data_source(split=split, decoders=undecoded), files),
      check_aux=check_aux)
  for warning in integrity.content_warnings(counts, files, check_aux=check_aux):
    reporting.console(f"WARNING: {warning}")  # stdout and the log file, not INFO-filtered
  return integrity.CheckedSource(builder.as_data_source(split=split), files)


def _field(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node.get(part) if hasattr(node, "get") else None
  return node


def _metadata_damaged(data, builder_config, data_dir: pathlib.Path,
                      error: Exception) -> integrity.DatasetDamagedError:
  cls = build_lib.builder_class(data.name)
  config_name = builder_config or cls.DEFAULT_BUILDER_CONFIG_NAME or cls.BUILDER_CONFIGS[0].name
  version_dir = data_dir / data.name / config_name / str(cls.VERSION)
  # TFDS reads the metadata when it makes the builder, so `build --overwrite` cannot start
  # either: the damaged build has to go first (moved aside, kept for inspection).
  rebuild = build_command(data, builder_config, needs_manual_dir=_needs_manual_dir(cls))
  return integrity.DatasetDamagedError(
      f"the metadata {version_dir / 'dataset_info.json'} of dataset {data.name}/{config_name} "
      f"cannot be read ({type(error).__name__}: {error}); move the damaged build aside and "
      f"rebuild: `mv {version_dir} {version_dir}.damaged && {rebuild}`")


def _needs_manual_dir(builder) -> bool:
  """Whether the builder (or its class) reads source files the user downloads (all but
  'synthetic')."""
  return bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))


def _build_quietly(data, data_dir: pathlib.Path, builder_config: str | None) -> None:
  """Builds the dataset with TFDS's progress bars and banners (written for the build command's
  console) sent to the run's log file instead."""
  captured = io.StringIO()
  tfds.display_progress_bar(False)  # a run's console has its own progress lines
  try:
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
      build_lib.build(data.name, data_dir, builder_config, manual_dir=data.manual_dir or None)
  finally:
    logging.info("dataset build output:\n%s", captured.getvalue())


def input_size(config) -> int | None:
  """The side the model sees (config.data.input_size), or None to keep the stored size."""
  return config.data.input_size or None


def train_loader(config, source):
  """The seeded, augmented, endlessly repeating grain loader of this process's rows."""
  return pipeline.make_train_loader(
      source, global_batch_size=config.batch_size, seed=config.seed,
      input_size=input_size(config), augment=AugmentConfig() if config.data.augment else None,
      scaling=config.data.scaling, num_workers=config.data.num_workers,
      shard_index=jax.process_index(), shard_count=jax.process_count())


def eval_batches(config, source):
  """Every example of `source` once, in batches of this process's rows (padding rows have
  valid=False)."""
  return pipeline.eval_batches(
      source, global_batch_size=config.eval_batch_size, input_size=input_size(config),
      scaling=config.data.scaling, shard_index=jax.process_index(),
      shard_count=jax.process_count())
