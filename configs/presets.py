"""Config presets: the rows of the paper's Tables IV-VII and Fig. 8, and speed switches.

A preset string is one or more names joined by commas, applied in order at the end of a dataset
config's get_config: `--config=configs/bjroad.py:image_only`, `configs/porto.py:fold3,spp4`.
"""
from typing import Callable

import ml_collections


def _set(**fields) -> Callable[[ml_collections.ConfigDict], None]:
  """A preset that sets dotted fields, e.g. _set(**{'model.name': 'image_only'})."""
  def set_fields(config):
    config.update_from_flattened_dict(fields)
  return set_fields


def _dem(local=True, glob=True, gate=True):
  return _set(**{"model.name": "cmmpnet", "model.use_local": local, "model.use_global": glob,
                 "model.use_gate": gate})


def _foggy(config):
  if config.data.name not in ("bjroad", "synthetic"):
    raise ValueError(f"preset 'foggy' exists for bjroad and synthetic, not {config.data.name!r}")
  config.data.config = "foggy"


PRESETS: dict[str, tuple[str, Callable[[ml_collections.ConfigDict], None]]] = {
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
    "foggy": ("fogged images (bjroad: the 'foggy' builder config)", _foggy),
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


def apply(config: ml_collections.ConfigDict, preset: str = "") -> ml_collections.ConfigDict:
  """Applies the comma-separated presets in order, then locks the config (a misspelt field is an
  error from then on) and returns it. An unknown preset is a ValueError listing the known ones."""
  for name in [p.strip() for p in (preset or "").split(",") if p.strip()]:
    if name not in PRESETS:
      raise ValueError(f"unknown config preset {name!r}; known presets: "
                       f"{', '.join(sorted(PRESETS))}")
    PRESETS[name][1](config)
  config.lock()
  return config
