"""The CMMPNet model family (Flax linen, NHWC). `build_model(config.model)` picks one by name.

Every model is applied as `model.apply(variables, image, aux, train=...)` and returns logits
(N, H, W, 1) float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from cmmp_jax.models.backbones import Autoencoder
from cmmp_jax.models.cmmpnet import (CMMPNet, DualBranchNet, GatedFusionNet, LateFusion,
                                     SingleBranchNet)
from cmmp_jax.models.dem import DEMOptions, DualEnhancement

# name -> (class, fixed fields). Paper Tables II, V-VII.
MODELS = {
    "cmmpnet": (CMMPNet, {}),
    "image_only": (SingleBranchNet, {"inputs": "image"}),
    "aux_only": (SingleBranchNet, {"inputs": "aux"}),
    "early_fusion": (SingleBranchNet, {"inputs": "early_fusion"}),
    "late_fusion": (LateFusion, {}),
    "gated_fusion": (GatedFusionNet, {}),
}
# Compute dtypes (parameters stay float32 unless given otherwise). float64: parity checks only
# (tests/test_parity_train_step.py against the release's float64 training step); needs
# jax.config.update("jax_enable_x64", True) before the model is built and float64 parameters.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
# What upsample_method='auto' computes transposed convolutions with, per backend: the
# formulation measured faster there, else XLA's native one. CPU: 'subpixel' (benchmarks/NOTES.md
# C2 and the full-size rows there). GPU and TPU: 'dilated', not measured yet (NOTES.md G1;
# benchmarks/accelerator_check.sh times both). Both give the same outputs and parameters.
AUTO_UPSAMPLE_METHOD = {"cpu": "subpixel", "gpu": "dilated", "tpu": "dilated"}


def resolve_upsample_method(method: str, backend: str | None = None) -> str:
  """upsample_method with 'auto' replaced by AUTO_UPSAMPLE_METHOD's choice for the backend
  (default: JAX's default backend)."""
  if method != "auto":
    return method
  return AUTO_UPSAMPLE_METHOD.get(backend or jax.default_backend(), "dilated")


def build_model(model_config: Mapping[str, Any]):
  """Builds a model from a config mapping (e.g. `config.model`).

  Fields: name (one of MODELS), backbone, width, depths, aux_channels, decoder, upsample_method
  ('auto' resolved by resolve_upsample_method),
  dtype ('float32' | 'bfloat16'), remat, and the fields of DEMOptions (flat, e.g. use_local),
  which shape 'cmmpnet' only. Unknown names or dtypes raise ValueError.
  """
  cfg = dict(model_config)
  name = cfg.pop("name", "cmmpnet")
  if name not in MODELS:
    raise ValueError(f"config.model.name must be one of {sorted(MODELS)}, got {name!r}")
  cls, fixed = MODELS[name]
  dtype = cfg.pop("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  dem_fields = [field.name for field in dataclasses.fields(DEMOptions)]
  dem = {key: cfg.pop(key) for key in dem_fields if key in cfg}
  if "depths" in cfg:
    cfg["depths"] = tuple(int(v) for v in cfg["depths"])
  if "upsample_method" in cfg:
    cfg["upsample_method"] = resolve_upsample_method(cfg["upsample_method"])
  # The config holds the DEM switches flat; the model takes them as one DEMOptions field.
  known = set(cls.__dataclass_fields__) - {"parent", "name", "dem"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"config.model has fields {unknown} that model {name!r} does not take; "
                     f"known: {sorted(known | set(dem_fields))}")
  if name == "cmmpnet":  # DEM switches only shape CMMPNet
    cfg["dem"] = DEMOptions(**dem)
  return cls(**fixed, **cfg, dtype=DTYPES[dtype])


__all__ = ["Autoencoder", "CMMPNet", "DEMOptions", "DualBranchNet", "DualEnhancement",
           "GatedFusionNet", "LateFusion", "MODELS", "SingleBranchNet", "build_model",
           "resolve_upsample_method"]
