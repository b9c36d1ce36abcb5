"""Per-layer benchmark: forward, input gradient, weight gradient and forward + backward of every
layer kind of the full model, XLA's formulation beside the alternatives, in one process.

    python -m benchmarks.layers [--cases=SUBSTR,...] [--variants=xla,fast,...] [--rounds=7]
        [--batch=2 --size=256] [--issue] [--json=PATH] [--list]
    python -m benchmarks.layers --step=subpixel,dilated [--rounds=6] [--json=PATH]
    python -m benchmarks.layers --guard [--rounds=8] [--json=PATH]

The layers are those of the full CMMPNet (width 1.0, depths 3,4,6,3) on a batch x size x size
input (default 2 x 256 x 256, float32): each distinct convolution (kernel, stride, dilation,
channels, resolution) with the number of times it runs in one train step (both branches, the
DEMs, the decoders and head), the transposed convolutions in their 'dilated' and 'subpixel'
forms, BatchNorm in train mode and the stem's max pool; --issue adds the single layers of issue
14's table.

Variants (cmmp_jax.models.layers.conv_grad):
  xla      lax.conv_general_dilated differentiated by JAX/XLA (what runs on GPU/TPU);
  fast     the custom VJP with the routes `_auto_routes` picks per shape (the CPU default),
           1 x 1 stride-1 forwards as matmuls;
  fast/convfwd  the same with XLA's convolution forward for 1 x 1 kernels;
  im2col   custom VJP, weight gradient = one (kh*kw*Cin, N) @ (N, Cout) matmul, XLA's dx;
  taps     custom VJP, weight gradient = kh*kw matmuls (Cin, N) @ (N, Cout), XLA's dx;
  col2im   custom VJP, XLA's weight gradient, dx = col2im(dy @ W^T);
  im2col+col2im  both matmul routes.
  torch    the same layer in PyTorch (NCHW, autograd; what the release runs), timed in this
           process interleaved with the others; needs torch importable (e.g.
           PYTHONPATH=/path/to/torch-site), skipped with a message otherwise.
For transposed convolutions (layers.conv_transpose) the variant names are prefixed by the form
('dilated/xla', 'subpixel/fast', ...; with the custom VJP both forms share one backward, XLA's dx
of the dilated form and the chosen dW route); BatchNorm has 'flax' (nn.BatchNorm, XLA autodiff) only; the stem's max
pool 'xla' (XLA's select-and-scatter backward) and 'fast' (layers.max_pool_3x3_s2's VJP).

Columns: fwd = y = f(x, w); dx = the input gradient alone (jax.vjp in x; what remains after XLA
removes the unused forward); dw = the weight gradient alone; f+b = forward and both gradients
(only dW where the model needs no dx: the stems, whose input is the batch). Times are medians
over --rounds rounds; in each round every function of every case runs in turn (after one
untimed call), so load from other processes hits all variants alike: on a shared machine only
ratios within one run mean something. 'per step' = count x f+b, summed for the model's total.

--step times the full-size train step instead, after each change of the CPU backward in turn
(STEP_STAGES: XLA; + the transposed-conv VJP; + the convolution routes; + 1 x 1 forwards as
matmuls; + the max-pool VJP), and the train-mode forward and forward + backward (no optimizer:
what the release's timing covers) before and after, all compiled in one process and timed
interleaved.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import statistics
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cmmp_jax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")
CONV_VARIANTS = {  # name -> conv_grad(impl, dw, dx, fwd)
    "xla": ("xla", "auto", "auto", "auto"),
    "fast": ("fast", "auto", "auto", "auto"),
    "fast/convfwd": ("fast", "auto", "auto", "conv"),
    "im2col": ("fast", "im2col", "xla", "conv"),
    "taps": ("fast", "taps", "xla", "conv"),
    "col2im": ("fast", "xla", "col2im", "conv"),
    "im2col+col2im": ("fast", "im2col", "col2im", "conv"),
}
TORCH = "torch"  # a variant outside CONV_VARIANTS: the PyTorch layer (see _torch_fns)
DEFAULT_VARIANTS = ("xla", "fast", "im2col", "taps", "col2im")


@dataclasses.dataclass(frozen=True)
class LayerCase:
  """One layer shape. kind 'conv': kernel k x k, stride, dilation, cin -> cout at h x h (input);
  'deconv': ConvTranspose(k, stride, padding, output_padding) cin -> cout at h x h (input);
  'bn': BatchNorm over cin channels at h x h; 'pool': the stem's 3x3/2 max pool. count: times
  it runs per train step."""
  name: str
  kind: str
  h: int
  cin: int
  cout: int = 0
  k: int = 1
  stride: int = 1
  dilation: int = 1
  padding: int = 1
  output_padding: int = 1
  count: int = 1
  needs_dx: bool = True


def model_cases(size: int = 256) -> list[LayerCase]:
  """The layer shapes of the full CMMPNet (width 1, depths 3,4,6,3) at size x size, with their
  counts per train step (image + aux branch)."""
  s4, s8, s16, s32 = size // 4, size // 8, size // 16, size // 32
  c = [
      LayerCase("stem 7x7/2 3->64", "conv", size, 3, 64, k=7, stride=2, count=1, needs_dx=False),
      LayerCase("stem 7x7/2 1->64", "conv", size, 1, 64, k=7, stride=2, count=1, needs_dx=False),
      LayerCase(f"3x3 64->64 @{s4}", "conv", s4, 64, 64, k=3, count=12),
      LayerCase(f"3x3/2 64->128 @{s4}", "conv", s4, 64, 128, k=3, stride=2, count=2),
      LayerCase(f"3x3 128->128 @{s8}", "conv", s8, 128, 128, k=3, count=14),
      LayerCase(f"3x3/2 128->256 @{s8}", "conv", s8, 128, 256, k=3, stride=2, count=2),
      LayerCase(f"3x3 256->256 @{s16}", "conv", s16, 256, 256, k=3, count=22),
      LayerCase(f"3x3/2 256->512 @{s16}", "conv", s16, 256, 512, k=3, stride=2, count=2),
      LayerCase(f"3x3 512->512 @{s32}", "conv", s32, 512, 512, k=3, count=10 + 2),
      LayerCase(f"3x3 d2 512 @{s32}", "conv", s32, 512, 512, k=3, dilation=2, count=2),
      LayerCase(f"3x3 d4 512 @{s32}", "conv", s32, 512, 512, k=3, dilation=4, count=2),
      LayerCase(f"3x3 d8 512 @{s32}", "conv", s32, 512, 512, k=3, dilation=8, count=2),
      LayerCase(f"3x3 32->32 @{size} (head)", "conv", size, 32, 32, k=3, count=2),
      LayerCase(f"3x3 64->1 @{size} (final)", "conv", size, 64, 1, k=3, count=1),
      LayerCase(f"1x1/2 64->128 @{s4}", "conv", s4, 64, 128, stride=2, count=2),
      LayerCase(f"1x1/2 128->256 @{s8}", "conv", s8, 128, 256, stride=2, count=2),
      LayerCase(f"1x1/2 256->512 @{s16}", "conv", s16, 256, 512, stride=2, count=2),
      # DEM: per side a c->c local conv and two 2c->c gates; decoders: 1x1 in and out.
      LayerCase(f"1x1 64->64 @{s4}", "conv", s4, 64, 64, count=2 * 2),
      LayerCase(f"1x1 128->64 @{s4}", "conv", s4, 128, 64, count=2 * 2 * 2),
      LayerCase(f"1x1 64->64 @{size // 2}", "conv", size // 2, 64, 64, count=2),
      LayerCase(f"1x1 128->64 @{size // 2}", "conv", size // 2, 128, 64, count=2 * 2),
      LayerCase(f"1x1 128->128 @{s8}", "conv", s8, 128, 128, count=2 * 2),
      LayerCase(f"1x1 256->128 @{s8}", "conv", s8, 256, 128, count=2 * 2 * 2),
      LayerCase(f"1x1 256->256 @{s16}", "conv", s16, 256, 256, count=2 * 2),
      LayerCase(f"1x1 512->256 @{s16}", "conv", s16, 512, 256, count=2 * 2 * 2),
      LayerCase(f"1x1 512->512 @{s32}", "conv", s32, 512, 512, count=2),
      LayerCase(f"1x1 1024->512 @{s32}", "conv", s32, 1024, 512, count=2 * 2),
      LayerCase(f"1x1 512->128 @{s32}", "conv", s32, 512, 128, count=2),
      LayerCase(f"1x1 128->256 @{s16}", "conv", s16, 128, 256, count=2),
      LayerCase(f"1x1 256->64 @{s16}", "conv", s16, 256, 64, count=2),
      LayerCase(f"1x1 64->128 @{s8}", "conv", s8, 64, 128, count=2),
      LayerCase(f"1x1 128->32 @{s8}", "conv", s8, 128, 32, count=2),
      LayerCase(f"1x1 32->64 @{s4}", "conv", s4, 32, 64, count=2),
      LayerCase(f"1x1 64->16 @{s4}", "conv", s4, 64, 16, count=2),
      LayerCase(f"1x1 16->64 @{size // 2}", "conv", size // 2, 16, 64, count=2),
      LayerCase(f"deconv 3x3/2 128 @{s32}", "deconv", s32, 128, 128, k=3, stride=2, count=2),
      LayerCase(f"deconv 3x3/2 64 @{s16}", "deconv", s16, 64, 64, k=3, stride=2, count=2),
      LayerCase(f"deconv 3x3/2 32 @{s8}", "deconv", s8, 32, 32, k=3, stride=2, count=2),
      LayerCase(f"deconv 3x3/2 16 @{s4}", "deconv", s4, 16, 16, k=3, stride=2, count=2),
      LayerCase(f"deconv 4x4/2 64->32 @{size // 2} (head)", "deconv", size // 2, 64, 32, k=4,
                stride=2, padding=1, output_padding=0, count=2),
      LayerCase(f"bn 64 @{size // 2}", "bn", size // 2, 64, count=2 + 2 + 2),
      LayerCase(f"bn 64 @{s4}", "bn", s4, 64, count=2 * 7 + 4 + 2),
      LayerCase(f"bn 128 @{s8}", "bn", s8, 128, count=2 * 9 + 2 + 4),
      LayerCase(f"bn 256 @{s16}", "bn", s16, 256, count=2 * 13 + 2 + 4),
      LayerCase(f"bn 512 @{s32}", "bn", s32, 512, count=2 * 7 + 2),
      LayerCase(f"maxpool 3x3/2 64 @{size // 2} (stem)", "pool", size // 2, 64, count=2),
  ]
  return c


def issue_cases() -> list[LayerCase]:
  """The single layers of issue 14's table (batch 2; not layers of the model at these sizes, so
  count 0: they stay out of the per-step totals; 'deconv 3x3/2 128 @64' shows the dilated
  form's backward at its worst)."""
  return [
      LayerCase("issue: 3x3 128->128 @64", "conv", 64, 128, 128, k=3, count=0),
      LayerCase("issue: 3x3/2 128->256 @64", "conv", 64, 128, 256, k=3, stride=2, count=0),
      LayerCase("issue: 1x1 128->128 @64", "conv", 64, 128, 128, count=0),
      LayerCase("issue: deconv 3x3/2 128 @64", "deconv", 64, 128, 128, k=3, stride=2, count=0),
  ]


# ----------------------------------------------------------------------------- functions timed

def _conv_fn(case: LayerCase) -> Callable:
  pad = case.dilation * (case.k - 1) // 2
  return lambda x, w: layers.conv_general_dilated(
      x, w, (case.stride,) * 2, ((pad, pad), (pad, pad)), rhs_dilation=(case.dilation,) * 2,
      dimension_numbers=NHWC)


def _deconv_fn(case: LayerCase, form: str) -> Callable:
  lo = case.k - 1 - case.padding
  hi = case.k - 1 - case.padding + case.output_padding
  return lambda x, w: layers.conv_transpose(x, w, case.stride, lo, hi, form)


def _bn_fn() -> Callable:
  bn = layers.BatchNorm(train=True)

  def apply(x, w):
    y, _ = bn.apply({"params": {"scale": w[0], "bias": w[1]},
                     "batch_stats": {"mean": jnp.zeros_like(w[0]), "var": jnp.ones_like(w[0])}},
                    x, mutable=["batch_stats"])
    return y

  return apply


def _jitted(f: Callable, needs_dx: bool) -> dict[str, Callable]:
  """fwd, dx, dw, f+b of f(x, w), jitted (traced now, under the caller's conv_grad)."""
  def dx(x, w, dy):
    return jax.vjp(lambda x_: f(x_, w), x)[1](dy)[0]

  def dw(x, w, dy):
    return jax.vjp(lambda w_: f(x, w_), w)[1](dy)[0]

  def fb(x, w, dy):
    if needs_dx:
      y, vjp = jax.vjp(f, x, w)
      return y, vjp(dy)
    y, vjp = jax.vjp(lambda w_: f(x, w_), w)
    return y, vjp(dy)

  fns = {"fwd": jax.jit(f), "dx": jax.jit(dx), "dw": jax.jit(dw), "f+b": jax.jit(fb)}
  return fns


def _torch_fns(case: LayerCase, x: np.ndarray, w: np.ndarray, dy: np.ndarray,
               needs_dx: bool) -> dict:
  """fwd, dx, dw, f+b of the PyTorch layer (NCHW; weights OIHW, or IOHW for the transposed
  convolution) on the same values as the JAX variants, as {measure: (fn, ())}: PyTorch on the
  CPU is synchronous, so each fn returns when the work is done. Autograd computes only the
  gradients asked for, like the JAX dx / dw functions."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  xt = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
  dyt = torch.from_numpy(np.ascontiguousarray(np.asarray(dy).transpose(0, 3, 1, 2)))
  wn = np.asarray(w)
  if case.kind == "conv":
    wt = torch.from_numpy(np.ascontiguousarray(wn.transpose(3, 2, 0, 1)))
    pad = case.dilation * (case.k - 1) // 2
    layer = lambda x_, w_: F.conv2d(x_, w_, stride=case.stride, padding=pad,  # noqa: E731
                                    dilation=case.dilation)
  elif case.kind == "deconv":
    # Our HWIO kernel of the equivalent forward convolution is the flipped IOHW kernel.
    wt = torch.from_numpy(np.ascontiguousarray(wn[::-1, ::-1].transpose(2, 3, 0, 1)))
    layer = lambda x_, w_: F.conv_transpose2d(  # noqa: E731
        x_, w_, stride=case.stride, padding=case.padding, output_padding=case.output_padding)
  elif case.kind == "bn":
    wt = torch.from_numpy(wn)
    layer = lambda x_, w_: F.batch_norm(  # noqa: E731
        x_, torch.zeros(case.cin), torch.ones(case.cin), w_[0], w_[1], training=True,
        momentum=0.1, eps=1e-5)
  else:
    wt = torch.from_numpy(wn)
    layer = lambda x_, w_: F.max_pool2d(x_, 3, 2, 1) * w_[0]  # noqa: E731

  def fwd():
    with torch.no_grad():
      layer(xt, wt)

  def grad(wrt_x: bool, wrt_w: bool):
    x_ = xt.detach().requires_grad_(wrt_x)
    w_ = wt.detach().requires_grad_(wrt_w)
    y = layer(x_, w_)
    torch.autograd.grad(y, [t for t, on in ((x_, wrt_x), (w_, wrt_w)) if on], dyt)

  return {"fwd": (fwd, ()), "dx": (lambda: grad(True, False), ()),
          "dw": (lambda: grad(False, True), ()), "f+b": (lambda: grad(needs_dx, True), ())}


def build(case: LayerCase, variants: Sequence[str], batch: int, seed: int = 0):
  """[(variant, {measure: (compiled fn, args)})] for one case."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, case.h, case.h, case.cin)), jnp.float32)
  out = []
  if case.kind == "bn":
    w = jnp.stack([jnp.ones((case.cin,)), jnp.zeros((case.cin,))])
    names = [("flax", _bn_fn())]
  elif case.kind == "pool":
    w = jnp.ones((1,), jnp.float32)  # unused: the pool has no weights (dw is all zeros)
    names = [(v, lambda x, w: layers.max_pool_3x3_s2(x) * w[0]) for v in variants
             if v in ("xla", "fast")]
  else:
    w = jnp.asarray(rng.standard_normal((case.k, case.k, case.cin, case.cout))
                    / math.sqrt(case.k * case.k * case.cin), jnp.float32)
    if case.kind == "conv":
      names = [(v, _conv_fn(case)) for v in variants]
    else:
      names = [(f"{form}/{v}", _deconv_fn(case, form)) for form in ("dilated", "subpixel")
               for v in variants]
  use_torch = TORCH in variants
  names = [(n, f) for n, f in names if n.rsplit("/", 1)[-1] != TORCH]
  for name, f in names:
    setting = CONV_VARIANTS.get(name.split("/", 1)[-1] if case.kind == "deconv" else name,
                                ("xla", "auto", "auto", "auto"))
    with layers.conv_grad(*setting):
      y = jax.eval_shape(f, x, w)
      dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
      fns = _jitted(f, case.needs_dx)
      compiled = {}
      for measure, fn in fns.items():
        args = (x, w) if measure == "fwd" else (x, w, dy)
        compiled[measure] = (fn.lower(*args).compile(), args)
    out.append((name, compiled))
  if use_torch:
    y = jax.eval_shape(names[0][1], x, w)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    x, w = np.array(x), np.array(w)  # writable copies: torch.from_numpy warns on read-only
    out.append((TORCH, _torch_fns(case, x, w, dy, case.needs_dx)))
  return out


def _calibrate(fn, args, target_s: float) -> int:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  return max(1, min(50, int(target_s / max(once, 1e-6))))


def measure(built: list, rounds: int, target_s: float = 0.02) -> dict:
  """Interleaved timing: {case: {variant: {measure: median ms}}}."""
  entries = []  # (case, variant, measure, fn, args, reps)
  for case, variants in built:
    for variant, compiled in variants:
      for measure_name, (fn, args) in compiled.items():
        entries.append((case, variant, measure_name, fn, args, _calibrate(fn, args, target_s)))
  samples = {id(e): [] for e in entries}
  for _ in range(rounds):
    for e in entries:
      _, _, _, fn, args, reps = e
      start = time.perf_counter()
      for _ in range(reps):
        result = fn(*args)
      jax.block_until_ready(result)
      samples[id(e)].append((time.perf_counter() - start) / reps * 1e3)
  out: dict = {}
  for e in entries:
    case, variant, measure_name = e[:3]
    out.setdefault(case.name, {}).setdefault(variant, {})[measure_name] = statistics.median(
        samples[id(e)])
  return out


def format_table(cases: Sequence[LayerCase], results: dict) -> str:
  with_torch = any(TORCH in results.get(c.name, {}) for c in cases)
  lines = ["| layer | n/step | variant | fwd ms | dx ms | dw ms | f+b ms | f+b vs xla | "
           "per step ms |" + (" torch f+b / this |" if with_torch else ""),
           "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_torch else "")]
  for case in cases:
    rows = results.get(case.name, {})
    for variant, m in rows.items():
      if variant == TORCH:
        base_name = TORCH
      else:
        base_name = variant.split("/", 1)[0] + "/xla" if case.kind == "deconv" else "xla"
      base = rows.get(base_name, m)["f+b"]
      dx = m["dx"] if case.needs_dx else float("nan")
      line = (f"| {case.name} | {case.count} | {variant} | {m['fwd']:.2f} | {dx:.2f} | "
              f"{m['dw']:.2f} | {m['f+b']:.2f} | {base / m['f+b']:.2f}x | "
              f"{case.count * m['f+b']:.1f} |")
      if with_torch:
        line += f" {rows[TORCH]['f+b'] / m['f+b']:.2f} |" if TORCH in rows else " |"
      lines.append(line)
  return "\n".join(lines)


def totals(cases: Sequence[LayerCase], results: dict) -> dict[str, float]:
  """Sum over cases of count x f+b per variant family ('xla', 'fast', ...; deconvs counted under
  'dilated/...' and 'subpixel/...'); BatchNorm under 'flax'."""
  out: dict[str, float] = {}
  for case in cases:
    for variant, m in results.get(case.name, {}).items():
      out[variant] = out.get(variant, 0.0) + case.count * m["f+b"]
  return out


# ----------------------------------------------------------------------------- the full step

# Cumulative stages of the CPU backward (layers.conv_grad settings), S0 = XLA's autodiff.
STEP_STAGES = (
    ("S0 xla", dict(impl="xla")),
    ("S1 +conv_transpose VJP", dict(impl="fast", parts=("conv_transpose",), fwd="conv")),
    ("S2 +conv routes", dict(impl="fast", parts=("conv_transpose", "conv"), fwd="conv")),
    ("S3 +1x1 forward as dot", dict(impl="fast", parts=("conv_transpose", "conv"))),
    ("S4 +max-pool VJP (all)", dict(impl="fast")),
)


def measure_step_stages(method: str, rounds: int, *, batch: int = 2, size: int = 256,
                        width: float = 1.0, depths=(3, 4, 6, 3)) -> dict[str, list[float]]:
  """Seconds per train step (benchmarks.train_step's step, not donated) of the model at each of
  STEP_STAGES, and of the train-mode forward and the loss's forward + backward (no optimizer)
  at the first and last stage ('fwd S0', 'fwd+bwd S0', ...), all compiled in this process and
  timed interleaved: `rounds` rounds of 2 calls of each in turn. Returns {name: [seconds]}."""
  from benchmarks import train_step as ts  # pylint: disable=import-outside-toplevel
  from cmmp_jax import sharding  # pylint: disable=import-outside-toplevel
  from cmmp_jax import steps as step_fns  # pylint: disable=import-outside-toplevel
  mesh = ts.make_mesh()
  spec = ts.StepSpec(width=width, depths=tuple(depths), size=size, batch=batch,
                     upsample_method=method)
  model, state = ts.make_state(spec, ts.initial_variables(spec), mesh)
  data = sharding.to_global_batch(ts.synthetic_batch(batch, size), mesh)

  def forward(params, batch_stats, batch_):
    return model.apply({"params": params, "batch_stats": batch_stats}, batch_["image"],
                       batch_["aux"], train=True, mutable=["batch_stats"])

  calls = {}
  for i, (name, setting) in enumerate(STEP_STAGES):
    # Fresh function objects per stage: JAX reuses the trace of a function it has traced before,
    # and the conv_grad setting only acts while tracing.
    with layers.conv_grad(**setting):
      calls[name] = (ts.make_train_fn(model, spec.config(), mesh, donate=False).lower(
          state, data).compile(), (state, data))
      if i in (0, len(STEP_STAGES) - 1):
        args = (state.params, state.batch_stats, data)
        fwd = functools.partial(forward)
        grad_fn = jax.value_and_grad(step_fns.make_loss_fn(model, spec.config()), has_aux=True)
        calls[f"fwd {name[:2]}"] = (jax.jit(fwd).lower(*args).compile(), args)
        calls[f"fwd+bwd {name[:2]}"] = (jax.jit(grad_fn).lower(*args).compile(), args)
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, (fn, args) in calls.items():
      for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - start)
  return times


def measure_guard(rounds: int, *, batch: int = 2, size: int = 256) -> dict[str, list[float]]:
  """Seconds of the parts after the backward pass, full-size model (width 1, depths 3,4,6,3,
  subpixel, batch x size x size): the loss's forward + backward; + Adam (state.apply_gradients,
  donated, no guard); the real train step (+ gradient norm, isfinite, lax.cond); the same guard
  as a jnp.where over the state; and, isolated on the same parameters, Adam alone and the guard
  + Adam, with torch.optim.Adam.step on the same shapes when torch imports. Interleaved rounds."""
  import optax  # pylint: disable=import-outside-toplevel
  from benchmarks import train_step as ts  # pylint: disable=import-outside-toplevel
  from cmmp_jax import sharding  # pylint: disable=import-outside-toplevel
  from cmmp_jax import steps as step_fns  # pylint: disable=import-outside-toplevel
  spec = ts.StepSpec(width=1.0, depths=(3, 4, 6, 3), size=size, batch=batch,
                     upsample_method="subpixel")
  mesh = ts.make_mesh()
  config = spec.config()
  model, state = ts.make_state(spec, ts.initial_variables(spec), mesh)
  data = sharding.to_global_batch(ts.synthetic_batch(batch, size), mesh)
  loss_fn = step_fns.make_loss_fn(model, config)

  def plain(s, b):
    (_, u), g = jax.value_and_grad(loss_fn, has_aux=True)(s.params, s.batch_stats, b)
    return s.apply_gradients(grads=g, batch_stats=u["batch_stats"])

  def where_guard(s, b):
    (loss, u), g = jax.value_and_grad(loss_fn, has_aux=True)(s.params, s.batch_stats, b)
    ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(g))
    new = s.apply_gradients(grads=g, batch_stats=u["batch_stats"])
    return jax.tree.map(lambda a, b_: jnp.where(ok, a, b_), new, s)

  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)

  def adam(s, g):
    return s.apply_gradients(grads=g, batch_stats=s.batch_stats)

  def guarded_adam(s, g):
    finite = jnp.isfinite(optax.tree.norm(g))
    return jax.lax.cond(finite, adam, lambda s_, g_: s_, s, g)

  fb = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  jitted = {"fwd+bwd+adam (no guard)": jax.jit(plain, donate_argnums=(0,)),
            "train step (norm, isfinite, cond)": step_fns.make_train_step(model, config, mesh),
            "guard as jnp.where": jax.jit(where_guard, donate_argnums=(0,))}
  states = {name: jax.tree.map(jnp.copy, state) for name in jitted}
  isolated = {"adam alone": jax.jit(adam, donate_argnums=(0,)),
              "guard + adam alone": jax.jit(guarded_adam, donate_argnums=(0,))}
  states.update({name: jax.tree.map(jnp.copy, state) for name in isolated})

  def call_step(name):
    out = jitted[name](states[name], data)
    states[name] = out[0] if isinstance(out, tuple) else out
    return states[name]

  def call_isolated(name):
    states[name] = isolated[name](states[name], grads)
    return states[name]

  calls = {"fwd+bwd": lambda: fb(state.params, state.batch_stats, data)}
  calls.update({name: functools.partial(call_step, name) for name in jitted})
  calls.update({name: functools.partial(call_isolated, name) for name in isolated})
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("torch is not importable: PyTorch's Adam is not timed")
  else:
    tensors = [torch.zeros(x.shape, dtype=torch.float32, requires_grad=True)
               for x in jax.tree.leaves(state.params)]
    for t in tensors:
      t.grad = torch.full_like(t, 1e-3)
    optimizer = torch.optim.Adam(tensors, lr=1e-4)
    calls["torch Adam.step alone"] = optimizer.step
  for fn in calls.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("cases", [], "Substrings of case names to run (default: all model cases).")
  flags.DEFINE_list("variants", list(DEFAULT_VARIANTS), f"Of {', '.join(CONV_VARIANTS)}.")
  flags.DEFINE_integer("rounds", 7, "Timing rounds (median reported).", lower_bound=1)
  flags.DEFINE_integer("batch", 2, "Batch.", lower_bound=1)
  flags.DEFINE_integer("size", 256, "Model input side (the layers' resolutions follow).")
  flags.DEFINE_bool("issue", False, "Also the single layers of issue 14's table.")
  flags.DEFINE_bool("list", False, "List the cases and exit.")
  flags.DEFINE_list("step", [], "Instead of layers: time the full train step (width 1, depths "
                    "3,4,6,3, --batch x --size) at each of STEP_STAGES for these "
                    "upsample methods (dilated, subpixel), in this process.")
  flags.DEFINE_bool("guard", False, "Instead of layers: time the parts after the backward "
                    "(Adam, the NaN guard) of the full-size train step (measure_guard).")
  flags.DEFINE_string("json", None, "Write the results to this file.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = sorted(set(FLAGS.variants) - set(CONV_VARIANTS) - {TORCH})
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; choose from {', '.join(CONV_VARIANTS)}")
  if FLAGS.guard:
    times = measure_guard(FLAGS.rounds, batch=FLAGS.batch, size=FLAGS.size)
    for name, seconds in times.items():
      print(f"{name:36s} median {1e3 * statistics.median(seconds):8.1f} ms  "
            f"min {1e3 * min(seconds):8.1f} ms", flush=True)
    if FLAGS.json:
      pathlib.Path(FLAGS.json).write_text(json.dumps(times, indent=2))
    return
  if FLAGS.step:
    report = {}
    for method in FLAGS.step:
      times = measure_step_stages(method, FLAGS.rounds, batch=FLAGS.batch, size=FLAGS.size)
      report[method] = times
      previous = None
      for name, seconds in times.items():
        median = statistics.median(seconds)
        change = ""
        if name.startswith("S"):
          change = "" if previous is None else f"  ({1e3 * (median - previous):+.0f} ms)"
          previous = median
        print(f"{method:9s} {name:26s} median {median:.3f} s  min {min(seconds):.3f} s{change}",
              flush=True)
    if FLAGS.json:
      pathlib.Path(FLAGS.json).write_text(json.dumps(report, indent=2))
    return
  cases = model_cases(FLAGS.size) + (issue_cases() if FLAGS.issue else [])
  if FLAGS.cases:
    cases = [c for c in cases if any(s in c.name for s in FLAGS.cases)]
  if FLAGS.list:
    for c in cases:
      print(c)
    return
  if TORCH in FLAGS.variants:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      print("torch is not importable: the 'torch' variant is skipped (install PyTorch, or put "
            "it on PYTHONPATH, to time the release's layers beside ours)")
      FLAGS.variants = [v for v in FLAGS.variants if v != TORCH]
    else:
      print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  start = time.perf_counter()
  built = [(c, build(c, FLAGS.variants, FLAGS.batch)) for c in cases]
  compile_s = time.perf_counter() - start
  results = measure(built, FLAGS.rounds)
  print(format_table(cases, results))
  total = totals(cases, results)
  print("\nper-step totals (sum of count x f+b, ms): " + ", ".join(
      f"{k} {v:.0f}" for k, v in sorted(total.items())))
  print(f"(compiled in {compile_s:.0f} s; {FLAGS.rounds} rounds; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r})")
  if FLAGS.json:
    report = {"environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                              "xla_flags": os.environ.get("XLA_FLAGS", ""),
                              "host_cpus": os.cpu_count()},
              "batch": FLAGS.batch, "size": FLAGS.size, "rounds": FLAGS.rounds,
              "cases": [dataclasses.asdict(c) for c in cases], "results_ms": results,
              "per_step_totals_ms": total}
    pathlib.Path(FLAGS.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
