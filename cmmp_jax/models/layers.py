"""Building blocks shared by every model: PyTorch-faithful conv, BatchNorm, transposed conv and
adaptive max pooling, all NHWC.

Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16). Initialisers follow
PyTorch's defaults so that training from scratch behaves like the reference release.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# PyTorch's default Conv2d / Linear weight init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torchvision ResNet convs: kaiming_normal(mode='fan_out', nonlinearity='relu').
resnet_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias init, U(+-1/sqrt(fan_in)); fan_in is the weight's, not the bias's."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  """Conv2d with PyTorch semantics: symmetric padding `dilation*(k-1)//2` and PyTorch init.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    strides: stride.
    dilation: kernel dilation.
    use_bias: add a bias (PyTorch default init).
    kernel_init: weight initialiser, kernel layout (kh, kw, in, out).
    zero_bias: initialise the bias at zero (D-LinkNet's center block does this).
  Input (N, H, W, Cin) -> output (N, H', W', features).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  use_bias: bool = True
  kernel_init: Any = torch_default_kernel_init
  zero_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = self.dilation * (self.kernel_size - 1) // 2
    fan_in = x.shape[-1] * self.kernel_size * self.kernel_size
    bias_init = nn.initializers.zeros if self.zero_bias else torch_default_bias_init(fan_in)
    y = nn.Conv(
        self.features, (self.kernel_size, self.kernel_size), strides=self.strides,
        padding=((pad, pad), (pad, pad)), kernel_dilation=self.dilation, use_bias=False,
        kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    if not self.use_bias:
      return y
    return add_bias(y, self.param("bias", bias_init, (self.features,), jnp.float32))


def add_bias(y, bias):
  """y + bias in y's dtype, with the bias gradient reduced in float32.

  With bfloat16 compute the bias gradient is a sum over N*H*W positions; reduced in bfloat16 it
  stops growing once the sum dwarfs each term (XLA:CPU gave 1024 for a sum of 8192 ones). The
  forward pass is the plain bfloat16 add.
  """
  if y.dtype == jnp.float32:
    return y + bias
  return _add_bias_f32_grad(y, bias)


@jax.custom_vjp
def _add_bias_f32_grad(y, bias):
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return _add_bias_f32_grad(y, bias), None


def _add_bias_bwd(_, dy):
  axes = tuple(range(dy.ndim - 1))
  return dy, jnp.sum(dy.astype(jnp.float32), axis=axes)


_add_bias_f32_grad.defvjp(_add_bias_fwd, _add_bias_bwd)


def BatchNorm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None):
  """BatchNorm2d with PyTorch's defaults (eps 1e-5, momentum 0.1 == flax momentum 0.9).

  In training it normalises with the statistics of the (global, when sharded) batch.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class ConvTranspose(nn.Module):
  """ConvTranspose2d with PyTorch semantics (kernel k, stride s, padding p, output_padding op).

  Output size: (H - 1) * s - 2p + k + op. The kernel is stored (kh, kw, in, out): PyTorch's
  (in, out, kh, kw) weight transposed, unflipped, so conversion is a pure transpose.

  `method`:
    'dilated': one convolution of the zero-dilated input with the flipped kernel (what XLA emits
      for a transposed convolution);
    'subpixel': the equivalent sub-pixel form for s=2: four stride-1 convolutions on the
      undilated input (one per output phase) whose outputs are interleaved. It does 1/4 of the
      multiply-adds of 'dilated' (no multiplications by inserted zeros) and gives the same result
      up to float rounding.
  """
  features: int
  kernel_size: int = 3
  strides: int = 2
  padding: int = 1
  output_padding: int = 1
  use_bias: bool = True
  method: str = "dilated"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.strides
    cin = x.shape[-1]
    # PyTorch computes fan_in of a ConvTranspose2d weight (in, out, kh, kw) from dim 1: out*k*k.
    fan_in = self.features * k * k
    kernel = self.param("kernel", nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2), (k, k, cin, self.features),
                        jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    lo = k - 1 - self.padding
    hi = k - 1 - self.padding + self.output_padding
    if self.method == "dilated":
      y = jax.lax.conv_general_dilated(
          x, kernel[::-1, ::-1], window_strides=(1, 1), padding=((lo, hi), (lo, hi)),
          lhs_dilation=(s, s), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif self.method == "subpixel":
      y = _subpixel_conv_transpose(x, kernel, s, lo, hi)
    else:
      raise ValueError(f"ConvTranspose.method must be 'dilated' or 'subpixel', got {self.method!r}")
    if self.use_bias:
      y = add_bias(y, self.param("bias", torch_default_bias_init(fan_in), (self.features,),
                                 jnp.float32))
    return y


def _subpixel_conv_transpose(x, kernel, s, lo, hi):
  """Transposed conv as s*s stride-1 convs on the undilated input, interleaved (depth-to-space).

  Output pixel o (per axis) of the dilated formulation reads dilated-input positions o + t - lo
  for kernel taps t of the flipped kernel; only positions divisible by s hold input pixels. For
  output phase r = o mod s, the taps that hit real pixels are t = (lo - r) mod s + s*j, reading
  input pixel o//s + ((r + t - lo) // s). We gather those taps into a small kernel per phase.
  """
  n, h, w, _ = x.shape
  k = kernel.shape[0]
  out_h = (h - 1) * s + 1 + lo + hi - k + 1
  out_w = (w - 1) * s + 1 + lo + hi - k + 1
  flipped = kernel[::-1, ::-1]

  def phase_taps(r):
    first = (lo - r) % s
    taps = list(range(first, k, s))
    offsets = [(r + t - lo) // s for t in taps]  # input offset relative to o // s
    return taps, offsets

  phases = []
  for ry in range(s):
    taps_y, offs_y = phase_taps(ry)
    row = []
    for rx in range(s):
      taps_x, offs_x = phase_taps(rx)
      sub = flipped[np.array(taps_y)][:, np.array(taps_x)]
      # Offsets are consecutive integers; pad so that output index q reads q + offs[0] ....
      ny = -(-(out_h - ry) // s)  # number of outputs in this phase
      nx = -(-(out_w - rx) // s)
      pad_y = (max(0, -offs_y[0]), max(0, ny - 1 + offs_y[-1] - (h - 1)))
      pad_x = (max(0, -offs_x[0]), max(0, nx - 1 + offs_x[-1] - (w - 1)))
      xp = jnp.pad(x, ((0, 0), pad_y, pad_x, (0, 0)))
      start_y = offs_y[0] + pad_y[0]
      start_x = offs_x[0] + pad_x[0]
      xs = xp[:, start_y:start_y + ny - 1 + len(taps_y), start_x:start_x + nx - 1 + len(taps_x)]
      row.append(jax.lax.conv_general_dilated(
          xs, sub, window_strides=(1, 1), padding="VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC")))
    phases.append(row)
  # All phases have equal sizes when out_h, out_w are multiples of s (the case for every layer of
  # these models: exact 2x upsampling); interleave them.
  ny, nx = phases[0][0].shape[1:3]
  if any(p.shape[1:3] != (ny, nx) for row in phases for p in row) or out_h != ny * s or (
      out_w != nx * s):
    raise ValueError("subpixel transposed conv needs an output size that is a multiple of the "
                     f"stride; got {(out_h, out_w)} for stride {s}")
  y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # n, ny, sy, nx, sx, c
  return y.reshape(n, ny * s, nx * s, y.shape[-1])


def max_pool_3x3_s2(x):
  """nn.MaxPool2d(kernel 3, stride 2, padding 1): padding never wins the max."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def adaptive_bin_edges(size: int, bins: int) -> list[tuple[int, int]]:
  """PyTorch's adaptive pooling bins: [floor(i*size/bins), ceil((i+1)*size/bins))."""
  return [((i * size) // bins, -(-((i + 1) * size) // bins)) for i in range(bins)]


def adaptive_max_pool(x, bins: int):
  """AdaptiveMaxPool2d(bins) with PyTorch's bin edges: (N, H, W, C) -> (N, bins, bins, C).

  Works for any H, W (bins may overlap or repeat pixels when H or W is not a multiple of bins,
  or smaller than bins), exactly as PyTorch does.
  """
  n, h, w, c = x.shape
  if h % bins == 0 and w % bins == 0:
    return x.reshape(n, bins, h // bins, bins, w // bins, c).max(axis=(2, 4))
  rows = []
  for y0, y1 in adaptive_bin_edges(h, bins):
    band = x[:, y0:y1].max(axis=1)  # (N, W, C)
    rows.append(jnp.stack([band[:, x0:x1].max(axis=1) for x0, x1 in adaptive_bin_edges(w, bins)],
                          axis=1))
  return jnp.stack(rows, axis=1)


def spatial_pyramid_max_pool(x, levels: Sequence[int]):
  """Adaptive max pooling at each level, flattened CHANNEL-MAJOR (c, i, j) as the reference's
  `view(N, -1)` on NCHW, levels concatenated: (N, H, W, C) -> (N, C * sum(n*n)).
  """
  n, _, _, c = x.shape
  flat = []
  for bins in levels:
    pooled = adaptive_max_pool(x, bins)  # (N, bins, bins, C)
    flat.append(jnp.transpose(pooled, (0, 3, 1, 2)).reshape(n, c * bins * bins))
  return jnp.concatenate(flat, axis=-1)
