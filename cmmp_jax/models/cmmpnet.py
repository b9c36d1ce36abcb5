"""CMMPNet and the two-branch fusion models built on the same skeleton.

Every model maps (image (N, H, W, 3), aux (N, H, W, C)) floats, already scaled by the pipeline,
to logits (N, H, W, 1) float32 (pre-sigmoid; float64 when the compute dtype is float64, for
parity checks). H and W must be multiples of 32 (five stride-2 steps); any such size works,
including sizes whose deepest map is not a multiple of the SPP levels.

Intermediate features are sown into the 'intermediates' collection (apply with
`mutable=['intermediates']` to read them); otherwise sowing costs nothing.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmmp_jax.models.backbones import Autoencoder
from cmmp_jax.models.dem import DEMOptions, DualEnhancement
from cmmp_jax.models.layers import Conv

Dtype = Any
FUSIONS = ("dem", "none", "gated")


def check_inputs(image, aux, aux_channels: int, multiple: int = 32):
  """image (N, H, W, 3) and aux (N, H, W, aux_channels), H and W multiples of `multiple` (the
  encoder downsamples 32x and the decoder adds the skips back)."""
  h, w = image.shape[1:3]
  if h % multiple or w % multiple:
    raise ValueError(f"input height and width must be multiples of {multiple}, got {h}x{w}; "
                     "resize or pad the tiles (data.input_size)")
  if aux.shape[-1] != aux_channels:
    raise ValueError(f"aux has {aux.shape[-1]} channels but model.aux_channels is "
                     f"{aux_channels}")
  if image.shape[:3] != aux.shape[:3]:
    raise ValueError(f"image {image.shape} and aux {aux.shape} differ in batch or size")


def output_dtype(dtype):
  """The dtype of the final conv and the logits: float32 for float32 and bfloat16 compute,
  float64 for float64 compute (parity checks under jax_enable_x64)."""
  return jnp.promote_types(dtype, jnp.float32)


class GatedFusion(nn.Module):
  """DeepDualMapper-style gated fusion: per-pixel softmax weights over the two modalities,
  computed from both maps; both branches continue from the fused map."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_image, f_aux, train: bool):
    del train
    weights = nn.softmax(Conv(2, 3, dtype=self.dtype, name="gate")(
        jnp.concatenate([f_image, f_aux], axis=-1)).astype(output_dtype(self.dtype)), axis=-1)
    fused = (weights[..., :1] * f_image + weights[..., 1:] * f_aux).astype(f_image.dtype)
    return fused, fused


class DualBranchNet(nn.Module):
  """Two autoencoders (image, auxiliary raster) with separate weights, fused after each encoder
  layer e1..e4 and each decoder step d4..d1 by `fusion`, then a 3x3 conv over the concatenated
  heads. fusion 'dem' is CMMPNet; 'none' is late fusion; 'gated' is DeepDualMapper-style.

  Attributes:
    backbone: 'dlinknet34' | 'linknet34' | 'resunet'.
    width: channel multiplier (1.0 = ResNet-34 widths 64..512).
    depths: basic blocks per encoder layer ((3, 4, 6, 3) = ResNet-34).
    aux_channels: channels of the auxiliary raster (checked against the input).
    dem: the DEM's ablation switches (used by fusion 'dem' only; default = the release).
    decoder: 'linknet' or 'sun1d' (Sun et al.'s 1D transposed convolutions).
    upsample_method: 'dilated' or 'subpixel' transposed-conv formulation (same results).
    dtype: compute dtype; parameters stay float32.
    remat: rematerialise the stem, encoder/decoder blocks and fusion modules in the backward
      pass (less memory, more FLOPs).
  """
  backbone: str = "dlinknet34"
  width: float = 1.0
  depths: Sequence[int] = (3, 4, 6, 3)
  aux_channels: int = 1
  fusion: str = "dem"
  dem: DEMOptions = DEMOptions()
  decoder: str = "linknet"
  upsample_method: str = "dilated"
  dtype: Dtype = jnp.float32
  remat: bool = False

  def _branch(self, name: str, stem_bias: bool) -> Autoencoder:
    return Autoencoder(self.backbone, self.width, tuple(self.depths), stem_bias, self.decoder,
                       self.upsample_method, self.remat, self.dtype, name=name)

  def _fuse(self, name: str, f_image, f_aux, train: bool):
    # remat: a DEM keeps ~6 feature-sized tensors per branch for its backward (message
    # sources, gates, pooled maps); rematerialised it keeps only its two inputs.
    remat = (lambda cls: nn.remat(cls, static_argnums=(3,))) if self.remat else (lambda cls: cls)
    if self.fusion == "dem":
      return remat(DualEnhancement)(self.dem, self.dtype, name=name)(f_image, f_aux, train)
    if self.fusion == "gated":
      return remat(GatedFusion)(self.dtype, name=name)(f_image, f_aux, train)
    if self.fusion == "none":
      return f_image, f_aux
    raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")

  @nn.compact
  def __call__(self, image, aux, train: bool = False):
    check_inputs(image, aux, self.aux_channels)
    img, ax = self._branch("image", False), self._branch("aux", True)
    fi, fa = img.encode_stem(image, train), ax.encode_stem(aux, train)
    skips = [(None, None)]
    for level in range(1, 5):
      fi, fa = img.encode(level, fi, train), ax.encode(level, fa, train)
      self.sow("intermediates", f"encoder{level}", fi)
      self.sow("intermediates", f"encoder{level}_add", fa)
      fi, fa = self._fuse(f"dem_e{level}", fi, fa, train)
      self.sow("intermediates", f"fused_e{level}", (fi, fa))
      skips.append((fi, fa))
    fi, fa = img.bottleneck(fi), ax.bottleneck(fa)
    self.sow("intermediates", "dblock", fi)
    for level in (4, 3, 2, 1):
      skip_i, skip_a = skips[level - 1] if level > 1 else (None, None)
      fi, fa = img.decode(level, fi, skip_i, train), ax.decode(level, fa, skip_a, train)
      fi, fa = self._fuse(f"dem_d{level}", fi, fa, train)
      self.sow("intermediates", f"fused_d{level}", (fi, fa))
    heads = jnp.concatenate([img.final(fi), ax.final(fa)], axis=-1)
    # The one-channel fusion conv runs in float32 (negligible cost): the logits are thresholded.
    # (float64 compute, for parity checks, keeps float64.)
    out = output_dtype(self.dtype)
    return Conv(1, 3, dtype=out, name="finalconv")(heads).astype(out)


class CMMPNet(DualBranchNet):
  """CMMPNet: constructed with no arguments it is the reference model (DinkNet34_CMMPNet: D-LinkNet
  -34 backbone, DEM with local + global (SPP 1, 2, 4) messages and gates, 1x1 local conv)."""
  fusion: str = "dem"


class LateFusion(DualBranchNet):
  """Two D-LinkNets; their final 32-channel features are concatenated before the 3x3 conv."""
  fusion: str = "none"


class GatedFusionNet(DualBranchNet):
  """DeepDualMapper-style: the branches' features are fused by per-pixel softmax gates at every
  stage where CMMPNet has a DEM."""
  fusion: str = "gated"


class SingleBranchNet(nn.Module):
  """One D-LinkNet (or LinkNet / Res-UNet) on one input: 'image' (image only), 'aux' (auxiliary
  raster only) or 'early_fusion' (image and aux concatenated into a 3 + C channel input)."""
  inputs: str = "image"
  backbone: str = "dlinknet34"
  width: float = 1.0
  depths: Sequence[int] = (3, 4, 6, 3)
  aux_channels: int = 1
  decoder: str = "linknet"
  upsample_method: str = "dilated"
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, image, aux, train: bool = False):
    check_inputs(image, aux, self.aux_channels)
    x = {"image": lambda: image, "aux": lambda: aux,
         "early_fusion": lambda: jnp.concatenate([image, aux], axis=-1)}.get(self.inputs)
    if x is None:
      raise ValueError(f"SingleBranchNet.inputs must be image, aux or early_fusion, got "
                       f"{self.inputs!r}")
    net = Autoencoder(self.backbone, self.width, tuple(self.depths), self.inputs == "aux",
                      self.decoder, self.upsample_method, self.remat, self.dtype, name="net")
    out = output_dtype(self.dtype)
    return Conv(1, 3, dtype=out, name="finalconv")(net(x(), train)).astype(out)
