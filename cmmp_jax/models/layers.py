"""Building blocks shared by every model: PyTorch-faithful conv, BatchNorm, transposed conv and
adaptive max pooling, all NHWC.

Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16). Initialisers follow
PyTorch's defaults so that training from scratch behaves like the reference release.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
from jax import lax
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


# ----------------------------------------------------------------------------- fast conv gradients
#
# XLA:CPU computes a convolution's weight gradient as another convolution whose "batch" is the
# input channels and whose "features" are the batch (dim_labels 01fb_o01i->f01b): a window as
# large as the feature map over a tiny output (the kernel), contracting 2 features at a time.
# For a transposed convolution written as a convolution of the zero-dilated input
# (ConvTranspose 'dilated') that gradient also has a dilated window and falls to a generic loop:
# 1.2 s per step for the head's 4x4 deconvolution alone at 2 x 256 x 256 (benchmarks/NOTES.md).
# The same gradient is a plain matmul of shifted views:
#   dW[i, j] = sum over output pixels o of x_pad[o * s + (i, j) * d]^T dy[o]    (kh*kw taps),
# i.e. (kh*kw*Cin, N) @ (N, Cout) with N = B * H' * W' when the taps are stacked along channels
# ('im2col'), or kh*kw matmuls (Cin, N) @ (N, Cout) ('taps'). For an lhs-dilated convolution
# (a transposed conv) the taps slide over dy instead of x:
#   dW[i, j] = sum over input pixels p of x[p]^T dy[p * l + pad_lo - (i, j) * d].
# The shifted views are copies, and XLA:CPU copies slowly (1-5 GB/s for strided slices, pads and
# concatenations), so the matmul wins only where the copies are small next to the kernel: 1 x 1
# kernels (no copy at all), transposed convs, and the deep layers (B*H'*W' <= Cout). The input
# gradient stays XLA's (a convolution as fast as the forward), except 'col2im' where the kernel
# is large: dx = scatter-add of the taps of dy @ W^T, which avoids XLA's transposed-and-reversed
# copy of the kernel (slow for 3x3x512x512 kernels). `_auto_routes` holds the measured choice.
#
# `conv_general_dilated` below is a drop-in for lax.conv_general_dilated (flax's nn.Conv takes it
# as `conv_general_dilated=`): the same forward (the identical lax call; for 1 x 1 stride-1
# kernels a matmul, equal up to float rounding), the same gradients up to float rounding
# (tests/test_fast_conv.py checks them against jax.grad in float64; the full CMMPNet's float64
# gradients match the release's train_step_ref.npz to 8e-15), different backward programs. It
# applies to 2-D NHWC/HWIO convolutions without feature or batch groups; anything else goes to
# lax unchanged. `conv_transpose` and `max_pool_3x3_s2` have custom VJPs under the same switch.

CONV_GRAD_IMPLS = ("auto", "xla", "fast")
DW_ROUTES = ("auto", "xla", "im2col", "taps")
DX_ROUTES = ("auto", "xla", "col2im")
FWD_ROUTES = ("auto", "conv", "dot")
PARTS = ("conv", "conv_transpose", "max_pool")


class _ConvGradSetting(NamedTuple):
  impl: str = "auto"
  dw: str = "auto"
  dx: str = "auto"
  fwd: str = "auto"
  parts: tuple[str, ...] = PARTS


def _setting_from_env() -> _ConvGradSetting:
  impl = os.environ.get("CMMP_CONV_GRAD", "auto")
  if impl not in CONV_GRAD_IMPLS:
    raise ValueError(f"CMMP_CONV_GRAD must be one of {CONV_GRAD_IMPLS}, got {impl!r}")
  return _ConvGradSetting(impl)


_CONV_GRAD = [_setting_from_env()]


@contextlib.contextmanager
def conv_grad(impl: str = "auto", dw: str = "auto", dx: str = "auto", fwd: str = "auto",
              parts: Sequence[str] = PARTS):
  """Selects how Conv, ConvTranspose and the stem's max pool differentiate, for what is TRACED
  inside the block.

  impl: 'auto' (default; environment CMMP_CONV_GRAD): the custom VJP on the CPU backend
    (jax.default_backend() at trace time), XLA's own gradient elsewhere (cuDNN and the TPU
    compiler are good at convolution gradients); 'xla': always XLA's autodiff; 'fast': always
    the custom VJP.
  dw / dx: the custom VJP's weight- and input-gradient routes ('auto' = the measured choice per
    shape, `_auto_routes`); fwd: its forward for 1 x 1 stride-1 kernels ('auto' = 'dot', a
    plain matmul, 1.2-1.7x faster than XLA:CPU's 1 x 1 convolution on large maps; 'conv');
    parts: which of PARTS take the custom VJP when it applies (default all); for benchmarks
    and tests.
  A jitted function keeps the setting it was traced with: change the setting before tracing.
  """
  parts = tuple(parts)
  if (impl not in CONV_GRAD_IMPLS or dw not in DW_ROUTES or dx not in DX_ROUTES
      or fwd not in FWD_ROUTES or not set(parts) <= set(PARTS)):
    raise ValueError(f"conv_grad: impl in {CONV_GRAD_IMPLS}, dw in {DW_ROUTES}, dx in "
                     f"{DX_ROUTES}, fwd in {FWD_ROUTES}, parts in {PARTS}; got {impl!r}, "
                     f"{dw!r}, {dx!r}, {fwd!r}, {parts!r}")
  _CONV_GRAD.append(_ConvGradSetting(impl, dw, dx, fwd, parts))
  try:
    yield
  finally:
    _CONV_GRAD.pop()


def _use_fast_grad(part: str) -> bool:
  """Whether `part` (one of PARTS) takes its custom VJP under the current `conv_grad`."""
  setting = _CONV_GRAD[-1]
  if part not in setting.parts:
    return False
  return setting.impl == "fast" or (setting.impl == "auto" and jax.default_backend() == "cpu")


class _ConvSpec(NamedTuple):
  """Static description of one 2-D NHWC/HWIO convolution (hashable: a nondiff argument)."""
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  lhs_dilation: tuple[int, int]
  rhs_dilation: tuple[int, int]
  precision: Any
  dw: str  # resolved route: 'xla' | 'im2col' | 'taps'
  dx: str  # resolved route: 'xla' | 'col2im'
  fwd: str = "conv"  # 'conv' (lax) | 'dot' (1x1, stride 1, no padding: a plain matmul)


_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """lax.conv_general_dilated with the gradient route of `conv_grad` (see above)."""
  plain = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  setting = _CONV_GRAD[-1]
  if not _use_fast_grad("conv"):
    return plain()
  if (lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1
      or preferred_element_type is not None or lhs.dtype != rhs.dtype):
    return plain()
  if dimension_numbers is None or lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers) != lax.conv_dimension_numbers(
          lhs.shape, rhs.shape, _NHWC):
    return plain()
  strides = tuple(int(v) for v in window_strides)
  lhs_dil = tuple(int(v) for v in (lhs_dilation or (1, 1)))
  rhs_dil = tuple(int(v) for v in (rhs_dilation or (1, 1)))
  if isinstance(padding, str):
    dilated_in = tuple((n - 1) * d + 1 for n, d in zip(lhs.shape[1:3], lhs_dil))
    dilated_k = tuple((k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dil))
    padding = lax.padtype_to_pads(dilated_in, dilated_k, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if lhs_dil != (1, 1) and strides != (1, 1):
    return plain()  # not used by these models
  spec = _ConvSpec(strides, pads, lhs_dil, rhs_dil, precision, "xla", "xla")
  dw, dx = _auto_routes(lhs.shape, rhs.shape, spec)
  dw = dw if setting.dw == "auto" else setting.dw
  dx = dx if setting.dx == "auto" else setting.dx
  if lhs_dil != (1, 1):
    dx = "xla"  # col2im is written for ordinary convolutions only
  pointwise = (rhs.shape[:2] == (1, 1) and strides == (1, 1) and rhs_dil == (1, 1)
               and lhs_dil == (1, 1) and pads == ((0, 0), (0, 0)))
  fwd = "dot" if pointwise and setting.fwd in ("auto", "dot") else "conv"
  if dw == "xla" and dx == "xla" and fwd == "conv":
    return plain()
  return _conv_fast_grad(lhs, rhs, spec._replace(dw=dw, dx=dx, fwd=fwd))


def _out_hw(x_shape, w_shape, spec: _ConvSpec) -> tuple[int, int]:
  out = []
  for a in range(2):
    size = (x_shape[1 + a] - 1) * spec.lhs_dilation[a] + 1 + sum(spec.padding[a])
    window = (w_shape[a] - 1) * spec.rhs_dilation[a] + 1
    out.append(max(0, (size - window) // spec.strides[a] + 1))
  return out[0], out[1]


def _dead_taps(x_shape, w_shape, spec: _ConvSpec) -> bool:
  """Whether some kernel tap only ever reads padding (dilated convs on small maps: D-LinkNet's
  dilation 8 on an 8 x 8 map); the 'taps' route then drops those matmuls altogether."""
  ho, wo = _out_hw(x_shape, w_shape, spec)
  for a, n_out in ((0, ho), (1, wo)):
    lo = spec.padding[a][0]
    for t in range(w_shape[a]):
      first = t * spec.rhs_dilation[a] - lo  # input row read by output 0
      last = first + (n_out - 1) * spec.strides[a]
      if last < 0 or first > x_shape[1 + a] - 1:
        return True
  return False


# Above this many bytes of stacked shifted copies, the weight gradient of a transposed conv uses
# per-tap matmuls instead of one matmul of the stacked copies (XLA:CPU moves data at 1-5 GB/s).
_IM2COL_MAX_BYTES = 16 * 2 ** 20


def _auto_routes(x_shape, w_shape, spec: _ConvSpec) -> tuple[str, str]:
  """The weight- and input-gradient routes measured fastest on XLA:CPU for this shape
  (`python -m benchmarks.layers`, benchmarks/NOTES.md):

  - 1 x 1 kernels: both gradients are plain matmuls of the (reshaped) activations, no copies
    (XLA's weight gradient of a 1 x 1 conv is 1.5-4.7x slower);
  - transposed convs (lhs dilation): matmul weight gradient, always (XLA's takes a generic loop,
    17-35x slower), one stacked matmul when the copies are small, per tap otherwise;
  - other kernels: XLA's weight gradient on large maps (its convolution reads the shifted windows
    in place; a matmul needs shifted copies, and XLA:CPU copies slowly), a matmul one where the
    output map has fewer pixels than output channels (B*H'*W' <= Cout: the deep 8 x 8 and
    16 x 16 layers), per tap when some taps only read padding (dilation 8 on 8 x 8);
    col2im for the input gradient where the kernel is at least as large as one tap's columns
    (kh*kw*Cout >= B*H'*W'), since XLA's input gradient first copies the kernel transposed and
    reversed, at 1-4 GB/s.
  """
  b = x_shape[0]
  kh, kw, cin, cout = w_shape
  ho, wo = _out_hw(x_shape, w_shape, spec)
  n_out = b * ho * wo
  if spec.lhs_dilation != (1, 1):
    cols_bytes = 4 * b * x_shape[1] * x_shape[2] * kh * kw * cout
    return ("taps" if cols_bytes > _IM2COL_MAX_BYTES else "im2col"), "xla"
  if kh * kw == 1:
    return "im2col", "col2im"
  dw = "xla"
  if n_out <= cout:
    dw = "taps" if _dead_taps(x_shape, w_shape, spec) else "im2col"
  dx = "col2im" if kh * kw * cout >= n_out else "xla"
  return dw, dx


def _plain_conv(x, w, spec: _ConvSpec):
  return lax.conv_general_dilated(x, w, spec.strides, spec.padding, lhs_dilation=spec.lhs_dilation,
                                  rhs_dilation=spec.rhs_dilation, dimension_numbers=_NHWC,
                                  precision=spec.precision)


def _forward(x, w, spec: _ConvSpec):
  if spec.fwd == "dot":  # 1 x 1, stride 1, no padding: (B*H*W, Cin) @ (Cin, Cout)
    y = lax.dot_general(x.reshape(-1, x.shape[-1]), w.reshape(w.shape[2], w.shape[3]),
                        (((1,), (0,)), ((), ())), precision=spec.precision)
    return y.reshape(x.shape[:-1] + (w.shape[3],))
  return _plain_conv(x, w, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_fast_grad(x, w, spec: _ConvSpec):
  return _forward(x, w, spec)


def _conv_fast_grad_fwd(x, w, spec):
  return _forward(x, w, spec), (x, w)


def _conv_fast_grad_bwd(spec, residuals, dy):
  x, w = residuals
  if spec.dx == "col2im":
    dx = _input_grad_col2im(dy, w, x.shape, spec)
  else:
    dx, = jax.linear_transpose(lambda x_: _plain_conv(x_, w, spec),
                               jax.ShapeDtypeStruct(x.shape, x.dtype))(dy)
  if spec.dw == "xla":
    dw, = jax.linear_transpose(lambda w_: _plain_conv(x, w_, spec),
                               jax.ShapeDtypeStruct(w.shape, w.dtype))(dy)
  else:
    dw = _weight_grad_matmul(x, dy, w.shape, spec)
  return dx, dw


_conv_fast_grad.defvjp(_conv_fast_grad_fwd, _conv_fast_grad_bwd)


def _matmul_tn(a, b, precision, out_dtype):
  """a (N, P)^T @ b (N, Q) -> (P, Q), accumulated in float32 at least."""
  acc = jnp.float32 if jnp.dtype(a.dtype).itemsize < 4 else None
  out = lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=acc)
  return out.astype(out_dtype)


def _weight_grad_matmul(x, dy, w_shape, spec: _ConvSpec):
  """dW (kh, kw, Cin, Cout) as matmuls of shifted views (see the section comment)."""
  kh, kw, cin, cout = w_shape
  b = x.shape[0]
  (plo_h, phi_h), (plo_w, phi_w) = spec.padding
  (sh, sw), (lh, lw), (dh, dw) = spec.strides, spec.lhs_dilation, spec.rhs_dilation
  taps = [(i, j) for i in range(kh) for j in range(kw)]
  if (lh, lw) == (1, 1):
    # Slide over the padded input: tap (i, j) of output o reads x_pad[o * s + (i, j) * d].
    ho, wo = dy.shape[1:3]
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (plo_h, phi_h, 0), (plo_w, phi_w, 0), (0, 0, 0)))
    views = [lax.slice(xp, (0, i * dh, j * dw, 0),
                       (b, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, cin),
                       (1, sh, sw, 1)) for i, j in taps]
    n = b * ho * wo
    dy2 = dy.reshape(n, cout)
    if spec.dw == "taps" or len(taps) == 1:
      grads = [_matmul_tn(v.reshape(n, cin), dy2, spec.precision, x.dtype) for v in views]
      return jnp.stack(grads).reshape(kh, kw, cin, cout)
    patches = jnp.concatenate(views, axis=-1).reshape(n, kh * kw * cin)
    return _matmul_tn(patches, dy2, spec.precision, x.dtype).reshape(kh, kw, cin, cout)
  # lhs-dilated (transposed) convolution, stride 1: input pixel p sits at p * l + pad_lo of the
  # dilated, padded input, so tap (i, j) pairs it with output p * l + pad_lo - (i, j) * d.
  h, w = x.shape[1:3]
  ho, wo = dy.shape[1:3]
  lo_h = max(0, (kh - 1) * dh - plo_h)
  hi_h = max(0, plo_h + (h - 1) * lh - (ho - 1))
  lo_w = max(0, (kw - 1) * dw - plo_w)
  hi_w = max(0, plo_w + (w - 1) * lw - (wo - 1))
  dyp = lax.pad(dy, jnp.zeros((), dy.dtype),
                ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))
  views = []
  for i, j in taps:
    top, left = plo_h - i * dh + lo_h, plo_w - j * dw + lo_w
    views.append(lax.slice(dyp, (0, top, left, 0),
                           (b, top + (h - 1) * lh + 1, left + (w - 1) * lw + 1, cout),
                           (1, lh, lw, 1)))
  n = b * h * w
  x2 = x.reshape(n, cin)
  if spec.dw == "taps" or len(taps) == 1:
    grads = [_matmul_tn(x2, v.reshape(n, cout), spec.precision, x.dtype) for v in views]
    return jnp.stack(grads).reshape(kh, kw, cin, cout)
  cols = jnp.concatenate(views, axis=-1).reshape(n, kh * kw * cout)
  dw_ = _matmul_tn(x2, cols, spec.precision, x.dtype).reshape(cin, kh, kw, cout)
  return jnp.transpose(dw_, (1, 2, 0, 3))


def _input_grad_col2im(dy, w, x_shape, spec: _ConvSpec):
  """dx of an ordinary convolution: cols = dy @ W^T (one matmul, no kernel transpose copy),
  then each tap's columns added back at its shifted, strided positions of the padded input."""
  kh, kw, cin, cout = w.shape
  b, h, wd, _ = x_shape
  (plo_h, phi_h), (plo_w, phi_w) = spec.padding
  (sh, sw), (dh, dw) = spec.strides, spec.rhs_dilation
  ho, wo = dy.shape[1:3]
  hp, wp = h + plo_h + phi_h, wd + plo_w + phi_w
  acc = jnp.float32 if jnp.dtype(dy.dtype).itemsize < 4 else None
  cols = lax.dot_general(dy.reshape(-1, cout), w.reshape(kh * kw * cin, cout),
                         (((1,), (1,)), ((), ())), precision=spec.precision,
                         preferred_element_type=acc)
  cols = cols.reshape(b, ho, wo, kh * kw, cin)
  zero = jnp.zeros((), cols.dtype)
  dxp = None
  for t, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw)):
    placed = lax.pad(cols[:, :, :, t], zero, (
        (0, 0, 0), (i * dh, hp - i * dh - (ho - 1) * sh - 1, sh - 1),
        (j * dw, wp - j * dw - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))
    dxp = placed if dxp is None else dxp + placed
  dx = lax.pad(dxp, zero, ((0, 0, 0), (-plo_h, -phi_h, 0), (-plo_w, -phi_w, 0), (0, 0, 0)))
  return dx.astype(dy.dtype)


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
        kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=jnp.float32,
        conv_general_dilated=conv_general_dilated, name="conv")(x)
    if not self.use_bias:
      return y
    return add_bias(y, self.param("bias", bias_init, (self.features,), jnp.float32))


def add_bias(y, bias):
  """y + bias in y's dtype, with the bias gradient reduced in float32 for 16-bit compute.

  With bfloat16 compute the bias gradient is a sum over N*H*W positions; reduced in bfloat16 it
  stops growing once the sum dwarfs each term (XLA:CPU gave 1024 for a sum of 8192 ones). The
  forward pass is the plain bfloat16 add.
  """
  if jnp.dtype(y.dtype).itemsize >= 4:  # float32, or float64 (parity checks): plain
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
    if self.method not in ("dilated", "subpixel"):
      raise ValueError(f"ConvTranspose.method must be 'dilated' or 'subpixel', got {self.method!r}")
    y = conv_transpose(x, kernel, s, lo, hi, self.method)
    if self.use_bias:
      y = add_bias(y, self.param("bias", torch_default_bias_init(fan_in), (self.features,),
                                 jnp.float32))
    return y


def _dilated_conv_transpose(x, kernel, s, lo, hi, conv=None):
  """The transposed conv as one convolution of the zero-dilated input with the flipped kernel."""
  return (conv or lax.conv_general_dilated)(
      x, kernel[::-1, ::-1], (1, 1), ((lo, hi), (lo, hi)), lhs_dilation=(s, s),
      dimension_numbers=_NHWC)


def conv_transpose(x, kernel, s: int, lo: int, hi: int, method: str = "dilated"):
  """Transposed convolution (kernel (k, k, in, out), unflipped, as ConvTranspose stores it) in
  the `method` formulation ('dilated' | 'subpixel'), differentiated per `conv_grad`.

  With the custom VJP both formulations share one backward: the input gradient is XLA's
  transpose of the dilated form (a stride-s convolution of dy: no zeros, no interleaving
  copies; 2.3x faster than differentiating the sub-pixel form for the head on XLA:CPU) and the
  weight gradient the matmul route of `conv_general_dilated` (XLA's own is a generic loop for
  the dilated form: 1.2 s for the head's 4x4 deconvolution at 2 x 256 x 256).
  """
  forward = _dilated_conv_transpose if method == "dilated" else _subpixel_conv_transpose
  setting = _CONV_GRAD[-1]
  if not _use_fast_grad("conv_transpose") or x.dtype != kernel.dtype or x.ndim != 4:
    return forward(x, kernel, s, lo, hi, conv_general_dilated)
  spec = _ConvSpec((1, 1), ((lo, hi), (lo, hi)), (s, s), (1, 1), None, "xla", "xla")
  dw, _ = _auto_routes(x.shape, kernel.shape, spec)
  dw = dw if setting.dw == "auto" else setting.dw
  return _conv_transpose_fast_grad(x, kernel, (s, lo, hi, method, dw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_transpose_fast_grad(x, kernel, config):
  s, lo, hi, method, _ = config
  forward = _dilated_conv_transpose if method == "dilated" else _subpixel_conv_transpose
  return forward(x, kernel, s, lo, hi, lax.conv_general_dilated)


def _conv_transpose_fast_grad_fwd(x, kernel, config):
  return _conv_transpose_fast_grad(x, kernel, config), (x, kernel)


def _conv_transpose_fast_grad_bwd(config, residuals, dy):
  s, lo, hi, _, dw_route = config
  x, kernel = residuals
  flipped = kernel[::-1, ::-1]
  spec = _ConvSpec((1, 1), ((lo, hi), (lo, hi)), (s, s), (1, 1), None, dw_route, "xla")
  dx, = jax.linear_transpose(lambda x_: _plain_conv(x_, flipped, spec),
                             jax.ShapeDtypeStruct(x.shape, x.dtype))(dy)
  if dw_route == "xla":
    d_flipped, = jax.linear_transpose(lambda w_: _plain_conv(x, w_, spec),
                                      jax.ShapeDtypeStruct(flipped.shape, flipped.dtype))(dy)
  else:
    d_flipped = _weight_grad_matmul(x, dy, flipped.shape, spec)
  return dx, d_flipped[::-1, ::-1]


_conv_transpose_fast_grad.defvjp(_conv_transpose_fast_grad_fwd, _conv_transpose_fast_grad_bwd)


def _subpixel_conv_transpose(x, kernel, s, lo, hi, conv=None):
  """Transposed conv as s*s stride-1 convs on the undilated input, interleaved (depth-to-space).

  Output pixel o (per axis) of the dilated formulation reads dilated-input positions o + t - lo
  for kernel taps t of the flipped kernel; only positions divisible by s hold input pixels. For
  output phase r = o mod s, the taps that hit real pixels are t = (lo - r) mod s + s*j, reading
  input pixel o//s + ((r + t - lo) // s). We gather those taps into a small kernel per phase.
  """
  conv = conv or lax.conv_general_dilated
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
      row.append(conv(
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
  """nn.MaxPool2d(kernel 3, stride 2, padding 1): padding never wins the max.

  Under `conv_grad`'s fast setting (the CPU default) its gradient is computed by
  `_max_pool_3x3_s2_bwd` instead of XLA's select-and-scatter (same values, bit for bit: the
  first maximum of each window in row-major order takes the window's gradient).
  """
  if x.ndim == 4 and _use_fast_grad("max_pool"):
    return _max_pool_3x3_s2_fast_grad(x)
  return _max_pool_3x3_s2_plain(x)


def _max_pool_3x3_s2_plain(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@jax.custom_vjp
def _max_pool_3x3_s2_fast_grad(x):
  return _max_pool_3x3_s2_plain(x)


def _max_pool_3x3_s2_fwd(x):
  y = _max_pool_3x3_s2_plain(x)
  return y, (x, y)


def _max_pool_3x3_s2_bwd(residuals, dy):
  """XLA:CPU's select-and-scatter took 25-50 ms per stem pool at 2 x 128 x 128 x 64. Here each
  of the 9 taps is a strided view of the (-inf padded) input compared with the window max; the
  first tap that equals it (row-major order, as select-and-scatter's `ge` keeps the first)
  gets dy, placed back at stride 2 by an interior pad; XLA fuses it into one elementwise loop."""
  x, y = residuals
  n, h, w, c = x.shape
  ho, wo = y.shape[1:3]
  xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (1, 1, 0), (1, 1, 0), (0, 0, 0)))
  zero = jnp.zeros((), dy.dtype)
  found = dxp = None
  for di in range(3):
    for dj in range(3):
      view = lax.slice(xp, (0, di, dj, 0), (n, di + 2 * (ho - 1) + 1, dj + 2 * (wo - 1) + 1, c),
                       (1, 2, 2, 1))
      hit = view == y
      chosen = hit if found is None else hit & ~found
      found = hit if found is None else found | hit
      placed = lax.pad(jnp.where(chosen, dy, zero), zero, (
          (0, 0, 0), (di, h + 2 - di - 2 * (ho - 1) - 1, 1), (dj, w + 2 - dj - 2 * (wo - 1) - 1, 1),
          (0, 0, 0)))
      dxp = placed if dxp is None else dxp + placed
  return (dxp[:, 1:1 + h, 1:1 + w],)


_max_pool_3x3_s2_fast_grad.defvjp(_max_pool_3x3_s2_fwd, _max_pool_3x3_s2_bwd)


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
