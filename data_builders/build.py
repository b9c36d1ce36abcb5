"""Builds a TFDS data set by name, atomically; command line and Python API.

  python -m data_builders.build NAME [--config CFG] --data_dir DIR [--manual_dir DIR] [--overwrite]

NAME is a key of REGISTRY; builder modules are imported only when asked for, so a builder that
is missing or broken does not stop the others. The result lands in DIR/NAME/CFG/VERSION/ in the
array_record format, readable without TensorFlow with
`tfds.data_source(f'{NAME}/{CFG}', data_dir=DIR, split=...)`.

Atomicity. TFDS writes a build into a sibling folder `incomplete.XXXXXX_VERSION/` and renames it
to `VERSION/` only after every split and dataset_info.json / features.json were written; an
exception deletes that folder. A killed process (SIGKILL, power loss) leaves it behind, but
nothing reads it: TFDS only lists folders named like a version, and a version folder only counts
as built with dataset_info.json and features.json in it. On top of that, this module
  * takes an exclusive lock (`.build-VERSION.lock` beside the version folder) so that two
    processes never build the same variant at once, and the second one reuses the first's result;
  * under that lock, deletes stale `incomplete.*_VERSION` folders of killed builds;
  * with --overwrite, moves the old version aside (`.replaced-VERSION`) and deletes it only once
    the new build has succeeded; a failed build puts the old one back, and a build killed in
    between is rolled back by the next call.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Sequence

import tensorflow_datasets as tfds

from cmmp_jax.data import preparation as preparation_lib

# Dataset name -> (module, class). Imported on demand only.
REGISTRY: dict[str, tuple[str, str]] = {
    'synthetic': ('data_builders.synthetic', 'Synthetic'),
    'bjroad': ('data_builders.bjroad', 'Bjroad'),
    'porto': ('data_builders.porto', 'Porto'),
    'tlcgis': ('data_builders.tlcgis', 'Tlcgis'),
    'custom': ('data_builders.custom', 'Custom'),
}

_INCOMPLETE_PREFIX = 'incomplete.'  # tensorflow_datasets.core.constants.INCOMPLETE_PREFIX
_REPLACED_PREFIX = '.replaced-'
_LOCK_PREFIX = '.build-'


class BuildError(RuntimeError):
  """Base class of the errors of this module."""


class UnknownDatasetError(BuildError, KeyError):
  """NAME is not in REGISTRY."""

  def __str__(self) -> str:  # KeyError would quote the whole message
    return str(self.args[0])


class BuilderImportError(BuildError, ImportError):
  """The builder module of a registered name cannot be imported or lacks its class."""


class BeamPipelineError(BuildError):
  """A step of a Beam build failed (the message is the step's error and the step's name)."""


class UnknownConfigError(BuildError, ValueError):
  """The builder has no builder config of the requested name."""


def _log(message: str) -> None:
  print(f'[data_builders.build] {message}', file=sys.stderr, flush=True)


def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
  """The builder class registered under `name`, importing its module now."""
  if name not in REGISTRY:
    raise UnknownDatasetError(f'unknown dataset {name!r}; known: {sorted(REGISTRY)}')
  module_name, class_name = REGISTRY[name]
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise BuilderImportError(
        f'the builder of {name!r} ({module_name}.{class_name}) cannot be imported: '
        f'{error}') from error
  cls = getattr(module, class_name, None)
  if cls is None:
    raise BuilderImportError(f'{module_name} defines no {class_name} (builder of {name!r})')
  return cls


def make_builder(name: str, data_dir: os.PathLike | str,
                 config: str | None = None) -> tfds.core.DatasetBuilder:
  """An instance of the builder of `name` for `data_dir` (config None = the default one)."""
  cls = builder_class(name)
  known = [c.name for c in (cls.BUILDER_CONFIGS or [])]
  if config is not None and config not in known:
    raise UnknownConfigError(
        f'dataset {name!r} has no config {config!r}; known: {known or "(none)"}')
  return cls(data_dir=os.fspath(data_dir), config=config)


def _is_prepared(version_dir: pathlib.Path) -> bool:
  """What TFDS requires of a finished build: both metadata files in the version folder."""
  return ((version_dir / 'dataset_info.json').is_file()
          and (version_dir / 'features.json').is_file())


@contextlib.contextmanager
def _exclusive_lock(version_dir: pathlib.Path):
  """Holds an exclusive flock on a file beside `version_dir` (released on exit or death)."""
  version_dir.parent.mkdir(parents=True, exist_ok=True)
  lock_path = version_dir.parent / f'{_LOCK_PREFIX}{version_dir.name}.lock'
  with open(lock_path, 'a+') as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      _log(f'waiting for another build of {version_dir} to finish ...')
      fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _recover(version_dir: pathlib.Path) -> None:
  """Cleans up after killed builds; must run under the lock.

  Deletes `incomplete.*_VERSION` folders (no live build of ours can own them while we hold the
  lock), and undoes an interrupted --overwrite: if the old version was moved aside and no
  complete new version exists, the old one is put back.
  """
  parent = version_dir.parent
  if not parent.is_dir():
    return
  for entry in parent.iterdir():
    if (entry.is_dir() and entry.name.startswith(_INCOMPLETE_PREFIX)
        and entry.name.endswith(f'_{version_dir.name}')):
      _log(f'removing leftover of an interrupted build: {entry}')
      shutil.rmtree(entry)
  backup = parent / f'{_REPLACED_PREFIX}{version_dir.name}'
  if backup.exists():
    if _is_prepared(version_dir):
      shutil.rmtree(backup)
    else:
      if version_dir.exists():
        shutil.rmtree(version_dir)
      _log(f'restoring {version_dir} from an interrupted --overwrite')
      backup.rename(version_dir)


def beam_options(text: str | None):
  """Apache Beam PipelineOptions from tfds build's syntax, comma-separated flags without their
  dashes ('runner=DirectRunner,direct_num_workers=2'); None for None or ''."""
  if not text:
    return None
  try:
    from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise BuildError(f'--beam_pipeline_options needs Apache Beam ({error})') from error
  return pipeline_options.PipelineOptions(flags=[f'--{flag}' for flag in text.split(',')])


def build(name: str, data_dir: os.PathLike | str, config: str | None = None,
          manual_dir: os.PathLike | str | None = None, overwrite: bool = False,
          beam_pipeline_options: str | None = None) -> pathlib.Path:
  """Builds data set `name` (builder config `config`) into data_dir; returns its version folder.

  An existing complete build is reused unless `overwrite`. Nothing that looks complete is left
  behind by a failed or killed build (see the module docstring).

  Args:
    name: a key of REGISTRY.
    data_dir: root folder of TFDS data sets.
    config: builder config name; None = the builder's default config.
    manual_dir: folder holding the source files of builders that need them (bjroad, porto,
      tlcgis, custom); passed to TFDS as DownloadConfig.manual_dir.
    overwrite: rebuild even when a complete build exists (the old one is kept until the new
      one is complete).
    beam_pipeline_options: build with Apache Beam through TFDS, with these pipeline options
      (beam_options' syntax; builders that support it: custom). None: no Beam.

  Returns:
    pathlib.Path of DIR/NAME/CONFIG/VERSION.
  """
  data_dir = pathlib.Path(data_dir).expanduser().absolute()
  if manual_dir is not None:
    manual_dir = pathlib.Path(manual_dir).expanduser().absolute()
    if not manual_dir.is_dir():
      raise FileNotFoundError(f'{manual_dir}: --manual_dir is not a folder')
  options = beam_options(beam_pipeline_options)
  builder = make_builder(name, data_dir, config)
  version_dir = pathlib.Path(os.fspath(builder.data_path))
  label = f'{name}/{builder.builder_config.name}' if builder.builder_config else name
  with _exclusive_lock(version_dir):
    _recover(version_dir)
    backup = version_dir.parent / f'{_REPLACED_PREFIX}{version_dir.name}'
    if _is_prepared(version_dir):
      if not overwrite:
        _log(f'{label} {builder.version} is already built at {version_dir}')
        return version_dir
      version_dir.rename(backup)
    elif version_dir.exists():
      # A version folder without metadata is no build (e.g. copied in by hand): replace it.
      _log(f'{version_dir} has no dataset_info.json/features.json; rebuilding it')
      shutil.rmtree(version_dir)
    _log(f'building {label} {builder.version} into {version_dir} ...')
    start = time.monotonic()
    try:
      # A fresh builder: the first one may have read the old build's metadata.
      builder = make_builder(name, data_dir, config)
      try:
        builder.download_and_prepare(
            download_dir=os.fspath(data_dir / 'downloads'),
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
                beam_options=options))
      except RuntimeError as error:
        if options is None:
          raise
        # Beam wraps what a step raised: 'module.Class: message [while running 'step']'.
        raise BeamPipelineError(re.sub(r'^[\w.]+: ', '', str(error))) from error
    except BaseException:
      if backup.exists():
        if version_dir.exists():
          shutil.rmtree(version_dir)
        backup.rename(version_dir)
        _log(f'build failed; kept the previous build at {version_dir}')
      raise
    if backup.exists():
      shutil.rmtree(backup)
  splits = ', '.join(f'{split} {info.num_examples}'
                     for split, info in builder.info.splits.items())
  _log(f'built {label} {builder.version} in {time.monotonic() - start:.1f} s ({splits})')
  record = (builder.info.metadata or {}).get(preparation_lib.PREPARATION_KEY)
  if record is not None:
    described = preparation_lib.InputPreparation.from_json(record, str(version_dir)).describe()
    _log(f'input preparation ({described}) recorded in {version_dir / "metadata.json"}')
  return version_dir


def is_built(name: str, data_dir: os.PathLike | str, config: str | None = None) -> bool:
  """Whether a complete build of `name`/`config` exists under data_dir."""
  builder = make_builder(name, pathlib.Path(data_dir).expanduser().absolute(), config)
  return _is_prepared(pathlib.Path(os.fspath(builder.data_path)))


def ensure_built(name: str, data_dir: os.PathLike | str, config: str | None = None) -> None:
  """Builds `name`/`config` into data_dir unless a complete build is already there."""
  if not is_built(name, data_dir, config):
    build(name, data_dir, config)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m data_builders.build',
      description='Build a road data set as TFDS array_record files.')
  parser.add_argument('name', choices=sorted(REGISTRY), help='data set to build')
  parser.add_argument('--config', default=None,
                      help="builder config, e.g. 'default', 'lidar', 'tiny' (default: the "
                           "builder's default config)")
  parser.add_argument('--data_dir', required=True, help='root folder of TFDS data sets')
  parser.add_argument('--manual_dir', default=None,
                      help='folder with the source files (real data sets)')
  parser.add_argument('--overwrite', action='store_true',
                      help='rebuild even if a complete build exists')
  parser.add_argument('--beam_pipeline_options', default=None,
                      help='build as an Apache Beam pipeline (custom areas) with these '
                           "comma-separated options, as tfds build takes them, e.g. "
                           "'runner=DirectRunner,direct_num_workers=2'")
  args = parser.parse_args(argv)
  try:
    path = build(args.name, args.data_dir, config=args.config, manual_dir=args.manual_dir,
                 overwrite=args.overwrite, beam_pipeline_options=args.beam_pipeline_options)
  except (BuildError, FileNotFoundError, ValueError, AssertionError) as error:
    # AssertionError: TFDS reports a missing manual_dir that way.
    print(f'error: {error}', file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
