"""config.data -> the TFDS random-access sources and grain loaders a run reads.

`dataset_source(config, split)` opens a built dataset (building it first when
config.data.build_if_missing or manual_dir allows); `train_loader` and `eval_batches` wrap
`pipeline` with the run's settings and this process's shard of every batch.
"""
from __future__ import annotations

import contextlib
import io
import pathlib
import time

from absl import logging
import jax
import tensorflow_datasets as tfds

from cmmp_jax import reporting, sharding
from cmmp_jax.data import pipeline
from cmmp_jax.data.augment import AugmentConfig
from data_builders import build as build_lib


class DatasetMissingError(FileNotFoundError):
  """The configured dataset has not been built into data.data_dir."""


def dataset_source(config, split: str):
  """The TFDS random-access source of config.data for `split` (building it when allowed)."""
  data = config.data
  data_dir = pathlib.Path(data.data_dir).expanduser().absolute()
  builder_config = data.config or None
  if not build_lib.is_built(data.name, data_dir, builder_config):
    if data.build_if_missing or data.manual_dir:
      reporting.console(f"building dataset {data.name}/{builder_config} into {data_dir} ...")
      if sharding.is_primary():
        start = time.monotonic()
        _build_quietly(data, data_dir, builder_config)
        reporting.console(f"built in {time.monotonic() - start:.1f} s")
      sharding.sync_processes("dataset-built")
    else:
      cmd = (f"python -m data_builders.build {data.name}"
             + (f" --config {builder_config}" if builder_config else "")
             + f" --manual_dir=DOWNLOADS --data_dir={data.data_dir}")
      raise DatasetMissingError(
          f"dataset {data.name!r} (builder config {builder_config!r}) is not built in "
          f"{data_dir}; build it with `{cmd}` or set config.data.data_dir")
  builder = build_lib.make_builder(data.name, data_dir, builder_config)
  if split not in builder.info.splits:
    raise ValueError(f"config.data split {split!r} is not one of {list(builder.info.splits)} "
                     f"of dataset {data.name}")
  return builder.as_data_source(split=split)


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
