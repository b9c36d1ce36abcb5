"""Checks of a configuration's values that need the library (the model and backbone names), and
the command-line pieces the entry points share.

Every entry point validates its --config once absl has parsed the flags (`config_from_flags`);
the config files in configs/ only describe settings.
"""
import sys
from typing import Sequence

from absl import app
from absl import flags
import jax
import ml_collections

from cmmp_jax import reporting
from cmmp_jax.models import MODELS
from cmmp_jax.models.backbones import BACKBONES


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks enumerated and positive fields early, with the field's name in the ValueError."""
  checks = [
      ("model.name", config.model.name, tuple(MODELS)),
      ("model.backbone", config.model.backbone, BACKBONES),
      # float64: parity checks only (tests/test_parity_train_step.py); needs jax_enable_x64.
      ("model.dtype", config.model.dtype, ("float32", "bfloat16", "float64")),
      ("model.decoder", config.model.decoder, ("linknet", "sun1d")),
      ("model.upsample_method", config.model.upsample_method,
       ("auto", "dilated", "subpixel")),
      ("optimizer.schedule", config.optimizer.schedule, ("plateau", "cosine", "constant")),
      ("data.scaling", config.data.scaling, ("reference", "unit")),
      ("init.image_stem", config.init.image_stem, ("release", "rgb")),
  ]
  for field, value, allowed in checks:
    if value not in allowed:
      raise ValueError(f"config.{field} = {value!r} is not one of {list(allowed)}")
  if config.model.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("config.model.dtype = 'float64' is for parity checks only and needs "
                     "jax_enable_x64 (JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', "
                     "True)); without it JAX computes in float32")
  positive = [("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size),
              ("optimizer.learning_rate", config.optimizer.learning_rate)]
  for field, value in positive:
    if not value > 0:
      raise ValueError(f"config.{field} must be > 0, got {value!r}")
  group = config.get("batch_norm_group_size", 0)
  if group < 0 or (0 < group < config.batch_size and config.batch_size % group):
    raise ValueError(f"config.batch_norm_group_size = {group} must be 0 (the whole batch) or "
                     f"divide config.batch_size = {config.batch_size}")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_epochs or config.num_train_steps to a positive number")
  if config.init.resnet34_checkpoint and not config.init.imagenet:
    raise ValueError("config.init.resnet34_checkpoint is set but config.init.imagenet=False "
                     "(training from scratch); set --config.init.imagenet=True to load it")


def config_from_flags(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """An absl entry point's parsed --config, validated; the console quietened to this program's
  own lines (reporting.quiet_console). argv is what absl.app hands main(): arguments besides the
  program's name are a usage error."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  validate(config)
  reporting.quiet_console()
  return config


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
