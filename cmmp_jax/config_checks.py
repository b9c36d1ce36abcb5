"""Checks of a configuration's values that need the library (the model and backbone names).

Every entry point calls `validate(config)` once its flags are parsed; the config files in
configs/ only describe settings.
"""
import ml_collections

from cmmp_jax.models import MODELS
from cmmp_jax.models.backbones import BACKBONES


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks enumerated and positive fields early, with the field's name in the ValueError."""
  checks = [
      ("model.name", config.model.name, tuple(MODELS)),
      ("model.backbone", config.model.backbone, BACKBONES),
      ("model.dtype", config.model.dtype, ("float32", "bfloat16")),
      ("model.decoder", config.model.decoder, ("linknet", "sun1d")),
      ("model.upsample_method", config.model.upsample_method, ("dilated", "subpixel")),
      ("optimizer.schedule", config.optimizer.schedule, ("plateau", "cosine", "constant")),
      ("data.scaling", config.data.scaling, ("reference", "unit")),
  ]
  for field, value, allowed in checks:
    if value not in allowed:
      raise ValueError(f"config.{field} = {value!r} is not one of {list(allowed)}")
  positive = [("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size),
              ("optimizer.learning_rate", config.optimizer.learning_rate)]
  for field, value in positive:
    if not value > 0:
      raise ValueError(f"config.{field} must be > 0, got {value!r}")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_epochs or config.num_train_steps to a positive number")
