"""Backbone pieces: ResNet-34 encoder stages, D-LinkNet center, LinkNet / Res-UNet / Sun et al.
decoders and the per-branch head. One `Autoencoder` holds a branch's stages so that CMMPNet and
the comparison models can interleave or skip steps between them.

All tensors NHWC. Widths follow ResNet-34 ([64, 128, 256, 512]) times `width`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmmp_jax.models.layers import (BatchNorm, Conv, ConvTranspose, max_pool_3x3_s2,
                                    resnet_kernel_init, torch_default_bias_init,
                                    torch_default_kernel_init)

Dtype = Any
BACKBONES = ("dlinknet34", "linknet34", "resunet")


def stage_widths(width: float) -> tuple[int, int, int, int]:
  """Encoder stage widths for a width multiplier (ResNet-34: 64, 128, 256, 512 at width 1)."""
  return tuple(max(4, int(round(c * width))) for c in (64, 128, 256, 512))


class Stem(nn.Module):
  """7x7/2 conv -> BN -> ReLU -> 3x3/2 max pool: (N, H, W, Cin) -> (N, H/4, W/4, features).

  The image stem has no bias (ResNet); the auxiliary stem of the release has one.
  """
  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(self.features, 7, strides=2, use_bias=self.use_bias, kernel_init=resnet_kernel_init,
             dtype=self.dtype, name="conv")(x)
    x = nn.relu(BatchNorm(train, self.dtype, name="bn")(x))
    return max_pool_3x3_s2(x)


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut, ReLU after the sum."""
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda name, k=3, s=1: Conv(self.features, k, strides=s, use_bias=False,
                                       kernel_init=resnet_kernel_init, dtype=self.dtype, name=name)
    y = nn.relu(BatchNorm(train, self.dtype, name="bn1")(conv("conv1", s=self.strides)(x)))
    y = BatchNorm(train, self.dtype, name="bn2")(conv("conv2")(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = BatchNorm(train, self.dtype, name="downsample_bn")(
          conv("downsample_conv", k=1, s=self.strides)(x))
    return nn.relu(x + y)


class ResLayer(nn.Module):
  """A ResNet layer: `depth` basic blocks, the first one with `strides`."""
  features: int
  depth: int
  strides: int = 1
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    block = nn.remat(BasicBlock, static_argnums=(2,)) if self.remat else BasicBlock
    for i in range(self.depth):
      x = block(self.features, self.strides if i == 0 else 1, self.dtype,
                name=f"block{i}")(x, train)
    return x


class DilatedCenter(nn.Module):
  """D-LinkNet's DBlock: cascaded 3x3 convs (dilation 1, 2, 4, 8) each followed by ReLU; returns
  x + d1 + d2 + d4 + d8. Biases start at zero as in D-LinkNet.
  """
  dilations: Sequence[int] = (1, 2, 4, 8)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out, y = x, x
    for i, d in enumerate(self.dilations):
      y = nn.relu(Conv(x.shape[-1], 3, dilation=d, zero_bias=True, dtype=self.dtype,
                       name=f"dilate{i + 1}")(y))
      out = out + y
    return out


class LinkNetDecoderBlock(nn.Module):
  """1x1 conv to in/4 -> BN -> ReLU -> 3x3/2 transposed conv -> BN -> ReLU -> 1x1 conv -> BN ->
  ReLU: (N, H, W, Cin) -> (N, 2H, 2W, features).

  `sun1d` replaces the 3x3 transposed conv by `SunTransposedConv1D` (Sun et al.'s 1D decoder).
  """
  features: int
  sun1d: bool = False
  upsample_method: str = "dilated"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    mid = max(1, x.shape[-1] // 4)
    x = nn.relu(BatchNorm(train, self.dtype, name="norm1")(
        Conv(mid, 1, dtype=self.dtype, name="conv1")(x)))
    if self.sun1d:
      x = SunTransposedConv1D(mid, self.upsample_method, self.dtype, name="deconv2")(x)
    else:
      x = ConvTranspose(mid, 3, method=self.upsample_method, dtype=self.dtype, name="deconv2")(x)
    x = nn.relu(BatchNorm(train, self.dtype, name="norm2")(x))
    return nn.relu(BatchNorm(train, self.dtype, name="norm3")(
        Conv(self.features, 1, dtype=self.dtype, name="conv3")(x)))


def _row_shifts(h: int, direction: int):
  """Per-row column shift of a shear: row i moves right by i (direction +1) or h-1-i (-1)."""
  i = jnp.arange(h)
  return i if direction > 0 else h - 1 - i


def _shear(x, direction: int):
  """Shear (N, H, W, C) into (N, H, W+H-1, C): row i shifted right by its row shift, so that a
  diagonal (direction -1) or anti-diagonal (direction +1) of x becomes a column."""
  _, h, w, _ = x.shape
  cols = jnp.arange(w + h - 1)[None, :] - _row_shifts(h, direction)[:, None]  # (H, W+H-1)
  valid = (cols >= 0) & (cols < w)
  g = jnp.take_along_axis(x, jnp.clip(cols, 0, w - 1)[None, :, :, None], axis=2)
  return jnp.where(valid[None, :, :, None], g, 0)


def _unshear(y, direction: int, w: int):
  """Inverse of `_shear`: (N, H, W+H-1, C) -> (N, H, W, C)."""
  h = y.shape[1]
  cols = jnp.arange(w)[None, :] + _row_shifts(h, direction)[:, None]
  return jnp.take_along_axis(y, cols[None, :, :, None], axis=2)


class SunTransposedConv1D(nn.Module):
  """Sun et al.'s 1D-decoder upsampling: (N, H, W, C) -> (N, 2H, 2W, features).

  Half the channels come from the usual 3x3/2 transposed conv; the other half (features // 8
  each) from four 9-tap 1D
  convolutions at the input resolution (1x9 horizontal, 9x1 vertical, and the two diagonals,
  computed by shearing the map so a diagonal becomes a column, a 9x1 conv, and unshearing),
  concatenated and upsampled 2x by nearest neighbour. The 1D kernels follow long thin roads.
  """
  features: int
  upsample_method: str = "dilated"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, _, w, _ = x.shape
    part = self.features // 8  # each 1D direction; the square transposed conv gets the rest
    square = ConvTranspose(self.features - 4 * part, 3, method=self.upsample_method,
                           dtype=self.dtype, name="square")(x)
    if part == 0:
      return square
    line = lambda k, name: Conv1D(part, k, dtype=self.dtype, name=name)
    lines = [line((1, 9), "horizontal")(x), line((9, 1), "vertical")(x)]
    for direction, name in ((1, "antidiagonal"), (-1, "diagonal")):
      lines.append(_unshear(line((9, 1), name)(_shear(x, direction)), direction, w))
    lines = jnp.concatenate(lines, axis=-1)
    lines = jnp.repeat(jnp.repeat(lines, 2, axis=1), 2, axis=2)
    return jnp.concatenate([square, lines.astype(square.dtype)], axis=-1)


class Conv1D(nn.Module):
  """A (kh, kw) conv with bias and 'same' zero padding, one of kh/kw being 1."""
  features: int
  kernel: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    return nn.Conv(self.features, (kh, kw), padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
                   kernel_init=torch_default_kernel_init,
                   bias_init=torch_default_bias_init(x.shape[-1] * kh * kw), dtype=self.dtype,
                   param_dtype=jnp.float32, name="conv")(x)


class ResUNetDecoderBlock(nn.Module):
  """Res-UNet decoder step: 2x transposed-conv upsampling, concat the skip (if any), then a
  residual unit (two 3x3 conv+BN with a 1x1 projection shortcut): -> (N, 2H, 2W, features)."""
  features: int
  upsample_method: str = "dilated"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skip, train: bool):
    x = ConvTranspose(x.shape[-1] // 2, 3, method=self.upsample_method, dtype=self.dtype,
                      name="up")(x)
    if skip is not None:
      x = jnp.concatenate([x, skip], axis=-1)
    y = nn.relu(BatchNorm(train, self.dtype, name="bn1")(
        Conv(self.features, 3, use_bias=False, dtype=self.dtype, name="conv1")(x)))
    y = BatchNorm(train, self.dtype, name="bn2")(
        Conv(self.features, 3, use_bias=False, dtype=self.dtype, name="conv2")(y))
    x = BatchNorm(train, self.dtype, name="shortcut_bn")(
        Conv(self.features, 1, use_bias=False, dtype=self.dtype, name="shortcut")(x))
    return nn.relu(x + y)


class Head(nn.Module):
  """Per-branch head: 4x4/2 transposed conv -> ReLU -> 3x3 conv -> ReLU: (N, H/2, W/2, C) ->
  (N, H, W, features)."""
  features: int
  upsample_method: str = "dilated"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(ConvTranspose(self.features, 4, strides=2, padding=1, output_padding=0,
                              method=self.upsample_method, dtype=self.dtype, name="finaldeconv1")(x))
    return nn.relu(Conv(self.features, 3, dtype=self.dtype, name="finalconv2")(x))


class Autoencoder(nn.Module):
  """One modality's encoder-decoder, exposed step by step so that fusion models can act between
  steps. Shapes for input (N, H, W, Cin), widths (c1, c2, c3, c4):
    stem: (N, H/4, W/4, c1); encode(i): e1 (H/4, c1), e2 (H/8, c2), e3 (H/16, c3), e4 (H/32, c4);
    center: (H/32, c4); decode(i, x, skip): d4 (H/16, c3), d3 (H/8, c2), d2 (H/4, c1),
    d1 (H/2, c1); head: (N, H, W, c1 // 2).
  LinkNet-style decoders add the skip after the block (d = dec(x) + e); Res-UNet concatenates it
  inside the block.
  """
  backbone: str = "dlinknet34"
  width: float = 1.0
  depths: Sequence[int] = (3, 4, 6, 3)
  stem_bias: bool = False
  decoder: str = "linknet"  # 'linknet' or 'sun1d' (ignored for resunet)
  upsample_method: str = "dilated"
  remat: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
    if len(self.depths) != 4:
      raise ValueError(f"model.depths needs 4 block counts, got {tuple(self.depths)}")
    c = stage_widths(self.width)
    self.widths = c
    # The stem's full- and half-resolution tensors are among the largest the backward keeps.
    stem = nn.remat(Stem, static_argnums=(2,)) if self.remat else Stem
    self.stem = stem(c[0], use_bias=self.stem_bias, dtype=self.dtype, name="stem")
    self.encoders = [
        ResLayer(c[i], self.depths[i], strides=1 if i == 0 else 2, remat=self.remat,
                 dtype=self.dtype, name=f"encoder{i + 1}") for i in range(4)]
    self.center = (DilatedCenter(dtype=self.dtype, name="dblock")
                   if self.backbone == "dlinknet34" else None)
    outs = (c[2], c[1], c[0], c[0])  # decoder4 .. decoder1
    if self.backbone == "resunet":
      block = nn.remat(ResUNetDecoderBlock, static_argnums=(3,)) if self.remat else (
          ResUNetDecoderBlock)
      self.decoders = [block(outs[j], self.upsample_method, self.dtype, name=f"decoder{4 - j}")
                       for j in range(4)]
    else:
      if self.decoder not in ("linknet", "sun1d"):
        raise ValueError(f"model.decoder must be 'linknet' or 'sun1d', got {self.decoder!r}")
      block = nn.remat(LinkNetDecoderBlock, static_argnums=(2,)) if self.remat else (
          LinkNetDecoderBlock)
      self.decoders = [block(outs[j], self.decoder == "sun1d", self.upsample_method, self.dtype,
                             name=f"decoder{4 - j}") for j in range(4)]
    self.head = Head(max(4, c[0] // 2), self.upsample_method, self.dtype)

  def encode_stem(self, x, train: bool):
    return self.stem(x.astype(self.dtype), train)

  def encode(self, level: int, x, train: bool):
    """Encoder layer `level` (1..4)."""
    return self.encoders[level - 1](x, train)

  def bottleneck(self, x):
    return x if self.center is None else self.center(x)

  def decode(self, level: int, x, skip, train: bool):
    """Decoder `level` (4..1). `skip` is e{level-1} (None for level 1)."""
    block = self.decoders[4 - level]
    if self.backbone == "resunet":
      return block(x, skip, train)
    y = block(x, train)
    return y if skip is None else y + skip

  def final(self, x):
    return self.head(x)

  def __call__(self, x, train: bool = False):
    """Unfused pass: input (N, H, W, Cin) -> head features (N, H, W, c1 // 2)."""
    e = [self.encode_stem(x, train)]
    for level in range(1, 5):
      e.append(self.encode(level, e[-1], train))
    d = self.bottleneck(e[4])
    for level in (4, 3, 2, 1):
      d = self.decode(level, d, e[level - 1] if level > 1 else None, train)
    return self.final(d)
