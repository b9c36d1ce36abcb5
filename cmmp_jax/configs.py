"""Config presets (the rows of the paper's Tables IV-VII and Fig. 8), validation and loading.

A preset string is one or more names joined by commas, applied in order on top of a dataset
config: `configs/bjroad.py:image_only`, `configs/porto.py:fold3,spp4`.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys
from typing import Callable

import ml_collections

from cmmp_jax.models import MODELS
from cmmp_jax.models.backbones import BACKBONES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _set(**fields) -> Callable[[ml_collections.ConfigDict], None]:
  """A preset that sets dotted fields, e.g. _set(**{'model.name': 'image_only'})."""
  def apply(config):
    for dotted, value in fields.items():
      node = config
      *parents, leaf = dotted.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return apply


def _dem(local=True, glob=True, gate=True):
  return _set(**{"model.name": "cmmpnet", "model.use_local": local, "model.use_global": glob,
                 "model.use_gate": gate})


PRESETS: dict[str, tuple[str, Callable]] = {
    # Table V (fusion strategies) and Table II (unimodal baselines).
    "cmmpnet": ("CMMPNet (D-LinkNet-34, full DEM)", _set(**{"model.name": "cmmpnet"})),
    "image_only": ("D-LinkNet on the image alone", _set(**{"model.name": "image_only"})),
    "aux_only": ("D-LinkNet on the trajectory heat-map / lidar alone",
                 _set(**{"model.name": "aux_only"})),
    "early_fusion": ("one D-LinkNet on the 4-channel concatenation",
                     _set(**{"model.name": "early_fusion"})),
    "late_fusion": ("two D-LinkNets, final features concatenated",
                    _set(**{"model.name": "late_fusion"})),
    "gated_fusion": ("DeepDualMapper-style gated fusion", _set(**{"model.name": "gated_fusion"})),
    # Table IV (DEM ablations).
    "local": ("DEM: local messages only", _dem(glob=False, gate=False)),
    "local_gate": ("DEM: local messages with gates", _dem(glob=False)),
    "local_global": ("DEM: local + global messages, no gates", _dem(gate=False)),
    "full": ("DEM: local + global + gates (the reference)", _dem()),
    "local3x3": ("DEM with the paper's 3x3 local conv", _set(**{"model.local_kernel_size": 3})),
    # Fig. 8 (SPP levels N = 1..4).
    "spp1": ("SPP levels (1,)", _set(**{"model.spp_levels": (1,)})),
    "spp2": ("SPP levels (1, 2)", _set(**{"model.spp_levels": (1, 2)})),
    "spp3": ("SPP levels (1, 2, 4)", _set(**{"model.spp_levels": (1, 2, 4)})),
    "spp4": ("SPP levels (1, 2, 4, 8)", _set(**{"model.spp_levels": (1, 2, 4, 8)})),
    # Table VI (backbones).
    "dlinknet": ("D-LinkNet-34 backbone", _set(**{"model.backbone": "dlinknet34"})),
    "linknet": ("LinkNet-34 backbone", _set(**{"model.backbone": "linknet34"})),
    "resunet": ("Res-UNet backbone", _set(**{"model.backbone": "resunet"})),
    "sun1d": ("Sun et al.'s 1D transposed-conv decoder", _set(**{"model.decoder": "sun1d"})),
    # Table VII (foggy BJRoad): combine with a model preset, e.g. foggy,early_fusion.
    "foggy": ("fogged images (bjroad: the 'foggy' builder config)", lambda c: _foggy(c)),
    # Porto folds.
    **{f"fold{k}": (f"Porto fold {k}", _set(**{"data.config": f"fold_{k}"})) for k in range(1, 6)},
    # Speed.
    "bf16": ("bfloat16 compute, float32 parameters", _set(**{"model.dtype": "bfloat16"})),
    "remat": ("rematerialised stem, blocks and fusion modules", _set(**{"model.remat": True})),
    # NVIDIA's recommendation for JAX on GPUs (JAX-Toolbox images set it): lets XLA overlap the
    # gradient all-reduce with the backward pass. Applied by main.py before JAX starts.
    "gpu": ("XLA GPU flags: latency-hiding scheduler",
            _set(**{"xla_flags": "--xla_gpu_enable_latency_hiding_scheduler=true"})),
}


def _foggy(config):
  if config.data.name == "bjroad":
    config.data.config = "foggy"
  elif config.data.name == "synthetic":
    config.data.config = "foggy"
  else:
    raise ValueError(f"preset 'foggy' exists for bjroad and synthetic, not {config.data.name!r}")


def apply_presets(config: ml_collections.ConfigDict, preset: str) -> None:
  for name in [p.strip() for p in (preset or "").split(",") if p.strip()]:
    if name not in PRESETS:
      raise ValueError(f"unknown config preset {name!r}; known presets: "
                       f"{', '.join(sorted(PRESETS))}")
    PRESETS[name][1](config)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks enumerated fields early, with the field's name in the message."""
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


def finalize(config: ml_collections.ConfigDict, preset: str = "") -> ml_collections.ConfigDict:
  """Applies presets, validates and locks (so a misspelt field is an error)."""
  config.unlock()
  apply_presets(config, preset)
  validate(config)
  config.lock()
  return config


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:presets]` outside absl (for CLIs and notebooks), then applies
  {dotted.field: value} overrides; unknown fields raise a KeyError naming them."""
  path, _, preset = spec.partition(":")
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
  module_spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset) if preset else module.get_config()
  for dotted, value in (overrides or {}).items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config has no field {dotted!r}")
    node[leaf] = value
  validate(config)
  return config
