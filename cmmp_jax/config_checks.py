"""Checks of a configuration before anything compiles, and the command-line pieces the entry
points share.

Every setting of configs/default.py whose wrong value would otherwise fail late (after a
compile, or silently) has a rule in `validate`; each failure is a `ConfigError`, one line naming
the field (`config.log_every_steps must be >= 1, got 0`). What needs the devices or the dataset
(a batch size that the device count does not divide, a batch larger than the training split) is
checked by `check_devices` once JAX is up, and the workdir by `check_workdir`. Entry points run
through `run` (instead of absl's app.run), which shows these errors, a misspelt
`--config.field`, and damaged or missing datasets as one line `error: ...` on stderr with a
non-zero exit status, not a traceback.
"""
from __future__ import annotations

import os
import pathlib
import re
import sys
import tempfile
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import ml_collections

from cmmp_jax import reporting
from cmmp_jax.models import MODELS
from cmmp_jax.models.backbones import BACKBONES

# Exit status of `run` for the errors it reports in one line (main.py's for the others it
# reports so).
EXIT_ERROR = 1


class ConfigError(ValueError):
  """A setting that cannot work; the message names the field (config.a.b) in one line."""


# -- rules: each returns None when `value` is fine, else what is wrong with it ------------------

Rule = Callable[[Any], "str | None"]


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _one_of(*allowed) -> Rule:
  return lambda v: None if v in allowed else f"is not one of {list(allowed)}"


def _int_at_least(low: int) -> Rule:
  def rule(v):
    if not _is_int(v):
      return "must be an integer"
    return None if v >= low else ("must be > 0" if low == 1 else f"must be >= {low}")
  return rule


def _number(low: float, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Rule:
  """A real number in [low, high] (either end open on request; high None: unbounded)."""
  text = (f"{'(' if low_open else '['}{low}, "
          f"{'inf)' if high is None else str(high) + (')' if high_open else ']')}")

  def rule(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
      return f"must be a number in {text}"
    ok = (v > low if low_open else v >= low) and (
        high is None or (v < high if high_open else v <= high))
    return None if ok else f"must be in {text}"
  return rule


def _positive_ints(length: int | None = None) -> Rule:
  def rule(v):
    values = tuple(v) if isinstance(v, (tuple, list)) else None
    if (values is None or not values or not all(_is_int(x) and x >= 1 for x in values)
        or (length is not None and len(values) != length)):
      return (f"must be {'a tuple of ' + str(length) if length else 'a non-empty tuple of'} "
              "integers >= 1")
    return None
  return rule


def _multiple_of_32_or_0(v):
  if not _is_int(v) or v < 0 or v % 32:
    return "must be 0 or a positive multiple of 32 (the model downsamples by 32)"
  return None


def _checkpoint_choice(v):
  if v in ("best", "latest") or (_is_int(v) and v >= 0) or (
      isinstance(v, str) and v.isdigit()):
    return None
  return "must be 'best', 'latest' or a step number"


def _non_empty_string(v):
  return None if isinstance(v, str) and v else "must be a non-empty string"


def _bool(v):
  return None if isinstance(v, bool) else "must be True or False"


def _string(v):
  return None if isinstance(v, str) else "must be a string"


# Every field of configs/default.py, with what its value must be (tests/test_config_checks.py
# checks that none is left out). Fields a later config adds are not checked until listed here.
RULES: dict[str, Rule] = {
    "seed": _int_at_least(0),  # grain's sampler seed is derived from a non-negative int
    "model.name": _one_of(*MODELS),
    "model.backbone": _one_of(*BACKBONES),
    "model.width": _number(0, low_open=True),
    "model.depths": _positive_ints(4),
    "model.aux_channels": _int_at_least(1),
    "model.use_local": _bool, "model.use_global": _bool, "model.use_gate": _bool,
    "model.spp_levels": _positive_ints(),
    "model.local_kernel_size": _int_at_least(1),
    "model.decoder": _one_of("linknet", "sun1d"),
    "model.upsample_method": _one_of("auto", "dilated", "subpixel"),
    # float64: parity checks only (tests/test_parity_train_step.py); needs jax_enable_x64.
    "model.dtype": _one_of("float32", "bfloat16", "float64"),
    "model.remat": _bool,
    "init.imagenet": _bool, "init.resnet34_checkpoint": _string, "init.cache_dir": _string,
    "init.download": _bool,
    "init.image_stem": _one_of("release", "rgb"),
    "data.name": _non_empty_string, "data.config": _string, "data.data_dir": _non_empty_string,
    "data.manual_dir": _string, "data.build_if_missing": _bool,
    "data.train_split": _non_empty_string, "data.eval_split": _non_empty_string,
    "data.test_split": _non_empty_string,
    "data.input_size": _multiple_of_32_or_0,
    "data.augment": _bool,
    "data.scaling": _one_of("reference", "unit"),
    "data.num_workers": _int_at_least(0),
    "batch_size": _int_at_least(1),
    "eval_batch_size": _int_at_least(1),
    "batch_norm_group_size": _int_at_least(0),
    "num_epochs": _int_at_least(0),
    "num_train_steps": lambda v: None if _is_int(v) else "must be an integer",
    "optimizer.learning_rate": _number(0, low_open=True),
    "optimizer.schedule": _one_of("plateau", "cosine", "constant"),
    "optimizer.plateau_patience": _int_at_least(0),
    "optimizer.plateau_factor": _number(1, low_open=True),  # lr /= factor must lower it
    "optimizer.min_learning_rate": _number(0),
    "optimizer.reset_learning_rate": _bool,
    "optimizer.warmup_steps": _int_at_least(0),
    "optimizer.b1": _number(0, 1, high_open=True),
    "optimizer.b2": _number(0, 1, high_open=True),
    "optimizer.eps": _number(0, low_open=True),
    "optimizer.grad_clip_norm": _number(0),
    "loss.dice": _bool,
    "eval_every_steps": _int_at_least(0),  # 0 = once per epoch
    "eval_on_test": _bool,
    "log_every_steps": _int_at_least(1),
    "checkpoint_every_steps": _int_at_least(0),  # 0 = at each evaluation
    "keep_checkpoints": _int_at_least(1),  # 0 would keep nothing: no run could resume
    "allow_changed_settings": _bool,
    "image_summaries": _int_at_least(0),
    "profile_start_step": _int_at_least(-1),  # -1 = no profile
    "profile_num_steps": _int_at_least(1),
    "xla_flags": _string,
    "eval.checkpoint": _checkpoint_choice,
    "eval.split": _non_empty_string,
    "eval.tta": _bool,
    "eval.graph_metrics": _bool,
    "eval.metres_per_pixel": _number(0),  # 0 = from the dataset (graph_eval.PixelSize)
    "predict.input_dir": _string, "predict.output_dir": _string, "predict.gps_csv": _string,
    "predict.window": _multiple_of_32_or_0,
    "predict.overlap": _int_at_least(0),
    "predict.threshold": _number(0, 1),
    "predict.num_examples": _int_at_least(0),
    "predict.blank_aux": _bool,
    "predict.preparation": _string,  # a JSON file; read (and checked) by prediction
    "predict.stream": _one_of("auto", "on", "off"),  # predict.STREAM_CHOICES
    "predict.block_size": _int_at_least(1),
    "predict.compress": _one_of("deflate", "lzw", "zstd", "none"),  # stream.COMPRESSIONS
    "predict.cog": _bool,
    "predict.stream_wait_s": _number(0),  # 0 = no limit
    # The other config.graph fields are GraphParams' (checked by its constructor in validate).
    "graph.enabled": _bool, "graph.wgs84": _bool,
}


def _get(config: ml_collections.ConfigDict, field: str, missing=None):
  node = config
  for part in field.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return missing
    node = node[part]
  return node


_MISSING = object()


def validate(config: ml_collections.ConfigDict) -> list[str]:
  """Checks every field with a rule in RULES, and the fields' combinations.

  Raises ConfigError (a ValueError) naming the first field that cannot work. Returns the
  warnings (settings that have no effect); `config_from_flags` prints them."""
  for field, rule in RULES.items():
    value = _get(config, field, _MISSING)
    if value is _MISSING:
      continue  # a trimmed config (a test's, a benchmark's): nothing to check
    problem = rule(value)
    if problem:
      raise ConfigError(f"config.{field} {problem}, got {value!r}")
  if config.model.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ConfigError("config.model.dtype = 'float64' is for parity checks only and needs "
                      "jax_enable_x64 (JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', "
                      "True)); without it JAX computes in float32")
  group = config.get("batch_norm_group_size", 0)
  if 0 < group < config.batch_size and config.batch_size % group:
    raise ConfigError(f"config.batch_norm_group_size = {group} must be 0 (the whole batch) or "
                      f"divide config.batch_size = {config.batch_size}")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("set config.num_epochs or config.num_train_steps to a positive number")
  if config.init.resnet34_checkpoint and not config.init.imagenet:
    raise ConfigError("config.init.resnet34_checkpoint is set but config.init.imagenet=False "
                      "(training from scratch); set --config.init.imagenet=True to load it")
  predict = config.get("predict")
  if predict is not None:
    window = predict.window or config.data.get("input_size", 0) or 512  # predict's default
    if predict.overlap >= window:
      raise ConfigError(f"config.predict.overlap = {predict.overlap} must be smaller than the "
                        f"prediction window ({window}: config.predict.window, else "
                        "config.data.input_size, else 512)")
  if config.get("graph") is not None:
    # Imported here: the graph package imports networkx and shapely, which training never needs.
    from cmmp_jax.graphs import params as graph_params  # pylint: disable=g-import-not-at-top
    try:
      graph_params.GraphParams.from_config(config.graph)
    except graph_params.GraphParamsError as error:
      raise ConfigError(str(error).replace("GraphParams.", "config.graph.")) from error
  warnings = []
  if config.num_train_steps not in (-1,) and config.num_train_steps <= 0:
    warnings.append(
        f"config.num_train_steps = {config.num_train_steps} has no effect (only a value > 0 "
        f"overrides config.num_epochs): training runs config.num_epochs = {config.num_epochs} "
        "epochs")
  return warnings


def check_devices(config: ml_collections.ConfigDict,
                  fields: Sequence[str] = ("batch_size", "eval_batch_size")) -> None:
  """Raises ConfigError when the device count does not divide a batch size (each device takes
  an equal share of every batch); call once JAX is initialised (after jax.distributed)."""
  devices, processes = jax.device_count(), jax.process_count()
  for field in fields:
    value = _get(config, field)
    if value % devices:
      raise ConfigError(
          f"config.{field} = {value} is not divisible by the {devices} devices "
          f"({processes} process(es)); every device takes an equal share of a batch: use a "
          f"multiple of {devices}")


def check_training_split(config: ml_collections.ConfigDict, num_train_examples: int) -> None:
  """Raises ConfigError when config.batch_size exceeds the training split (no step per epoch)."""
  if config.batch_size > num_train_examples:
    raise ConfigError(f"config.batch_size = {config.batch_size} exceeds the "
                      f"{num_train_examples} examples of split {config.data.train_split!r} of "
                      f"dataset {config.data.name}/{config.data.config}")


def check_before_training(config: ml_collections.ConfigDict, num_train_examples: int) -> None:
  """What `train` checks once JAX and the datasets are up, before compiling: the devices divide
  both batch sizes, and the training split holds one batch."""
  check_devices(config)
  check_training_split(config, num_train_examples)


def check_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """Makes `workdir` (and its parents) if needed and proves it writable by writing and
  deleting a file there; raises ConfigError (one line, naming --workdir and the cause) when it is
  a file, lies under a file, or cannot be created or written. Returns its absolute path."""
  path = pathlib.Path(workdir).expanduser().absolute()
  for parent in [path, *path.parents]:
    if parent.exists():
      if not parent.is_dir():
        where = "is a file" if parent == path else f"lies under {parent}, which is a file"
        raise ConfigError(f"--workdir {path} {where}, not a folder; give a folder")
      break
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
      pass
  except OSError as error:
    raise ConfigError(f"--workdir {path} is not writable ({error.strerror or error}); "
                      "checkpoints, logs and results go there: give a writable folder") from error
  return path


def config_from_flags(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """An absl entry point's parsed --config, validated (its warnings printed); the console
  quietened to this program's own lines (reporting.quiet_console). argv is what absl.app hands
  main(): arguments besides the program's name are a usage error. A --workdir flag, when the
  program defines one, is checked too (`check_workdir`)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  warnings = validate(config)
  if "workdir" in flags.FLAGS and flags.FLAGS.workdir:
    check_workdir(flags.FLAGS.workdir)
  reporting.quiet_console()
  for warning in warnings:
    print(f"WARNING: {warning}", file=sys.stderr, flush=True)
  return config


# -- one-line errors --------------------------------------------------------------------------


def unknown_field_message(error: BaseException, argv: Sequence[str]) -> str | None:
  """The plain message for ml_collections' error about an override of a field the config lacks
  (`KeyError("'widht'\\nDid you mean \"width\" instead of \"widht\"?")`, possibly wrapped in an
  AttributeError), or None when `error` is not about a --config.FIELD of argv."""
  inner = error
  while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError(message))
    inner = inner.args[0]
  text = str(inner)
  key = re.search(r"'([A-Za-z_][\w]*)'", text)
  if key is None:
    return None
  key = key.group(1)
  for arg in argv:
    match = re.match(r"^--?(config)\.([\w.]+)(=|$)", arg)
    if not match or key not in match.group(2).split("."):
      continue
    path = match.group(2).split(".")
    parent = ".".join(["config", *path[:path.index(key)]])
    hint = re.search(r'Did you mean "([^"]+)"', text)
    suggestion = f"; did you mean {parent}.{hint.group(1)}?" if hint else ""
    return (f"--config.{match.group(2)}: {parent} has no field {key!r}{suggestion} "
            "(see configs/default.py for every field)")
  return None


def _parse_flags(argv: Sequence[str]):
  """absl's flag parsing, with a misspelt --config.FIELD shown as one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    message = unknown_field_message(error, argv)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_ERROR)


def one_line_errors() -> tuple[type[BaseException], ...]:
  """The errors `run` reports as one line: bad settings, a missing or damaged dataset, an
  unknown dataset or builder config. Their messages name the field or file and what to do."""
  # Imported here: the data modules import TFDS, which validating a config does not need.
  from cmmp_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  from data_builders import build as build_lib  # pylint: disable=g-import-not-at-top
  return (ConfigError, sources.DatasetMissingError, pipeline.RecordReadError,
          build_lib.BuildError)


def run(main: Callable[[Sequence[str]], Any]) -> None:
  """absl's app.run(main), with the errors of `one_line_errors` and a misspelt --config.FIELD
  printed as one line `error: ...` on stderr (exit status 1) instead of a traceback."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except Exception as error:  # pylint: disable=broad-except
    if not isinstance(error, one_line_errors()):
      raise
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_ERROR)


class _IntegerListParser(flags.ListParser):
  """Comma-separated integers, e.g. `--seeds=0,1,2`."""

  def parse(self, argument):
    values = super().parse(argument)
    try:
      return [int(v) for v in values]
    except ValueError as error:
      raise ValueError(f"expected comma-separated integers, got {argument!r}") from error

  def flag_type(self):
    return "comma separated list of integers"


def define_integer_list(name: str, default: Sequence[int], help_string: str,
                        flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --NAME=1,2,3, parsed to a list of ints (absl's DEFINE_list gives strings). The flag
  belongs to the calling module (so --helpshort lists it with that program's flags)."""
  caller = sys._getframe(1).f_globals["__name__"]  # pylint: disable=protected-access
  flags.DEFINE(_IntegerListParser(), name, ",".join(str(v) for v in default), help_string,
               flag_values=flag_values, serializer=flags.CsvListSerializer(","),
               module_name=sys.argv[0] if caller == "__main__" else caller)
