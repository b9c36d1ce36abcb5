"""The custom VJPs of cmmp_jax.models.layers (`conv_general_dilated`, `conv_transpose`,
`max_pool_3x3_s2`, selected by `conv_grad`) give the gradients of jax.grad of the plain
formulations: checked in float64 on every convolution configuration the models use (kernel,
stride, padding, dilation, lhs dilation of the 'dilated' transposed conv, the 'subpixel' phases),
through every weight- and input-gradient route; the max pool's choices, ties included.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

from cmmp_jax.models import layers
from cmmp_jax.models.layers import Conv, ConvTranspose, conv_grad

NHWC = ("NHWC", "HWIO", "NHWC")

# (name, input (B, H, W, Cin), kernel (kh, kw, Cin, Cout), strides, padding, lhs dil, rhs dil)
CASES = [
    ("3x3 s1", (2, 9, 8, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    ("3x3 s2 even", (2, 8, 8, 5), (3, 3, 5, 6), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    ("3x3 s2 odd", (1, 9, 7, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    ("1x1 s1", (2, 6, 6, 7), (1, 1, 7, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1)),
    ("1x1 s2", (2, 7, 6, 4), (1, 1, 4, 5), (2, 2), ((0, 0), (0, 0)), (1, 1), (1, 1)),
    ("stem 7x7 s2", (1, 16, 14, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3)), (1, 1), (1, 1)),
    ("dblock d2", (1, 4, 4, 3), (3, 3, 3, 3), (1, 1), ((2, 2), (2, 2)), (1, 1), (2, 2)),
    ("dblock d8 > map", (1, 4, 4, 3), (3, 3, 3, 3), (1, 1), ((8, 8), (8, 8)), (1, 1), (8, 8)),
    ("1x9 line", (1, 6, 10, 3), (1, 9, 3, 2), (1, 1), ((0, 0), (4, 4)), (1, 1), (1, 1)),
    ("negative pad", (1, 8, 8, 2), (3, 2, 2, 3), (1, 2), ((-1, 2), (0, -1)), (1, 1), (1, 1)),
    # ConvTranspose 'dilated': k3 s2 p1 op1 (decoders) and k4 s2 p1 op0 (head).
    ("deconv k3", (2, 5, 4, 3), (3, 3, 3, 4), (1, 1), ((1, 2), (1, 2)), (2, 2), (1, 1)),
    ("deconv k4", (2, 4, 4, 3), (4, 4, 3, 2), (1, 1), ((2, 2), (2, 2)), (2, 2), (1, 1)),
    ("lhs dil, rhs dil, neg pad", (1, 5, 5, 2), (3, 3, 2, 2), (1, 1), ((-1, 3), (2, 0)), (3, 2),
     (2, 1)),
    # ConvTranspose 'subpixel' phases: VALID convs with 1 or 2 taps per axis.
    ("subpixel 2x2", (2, 5, 5, 3), (2, 2, 3, 4), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1)),
    ("subpixel 1x2", (2, 4, 5, 3), (1, 2, 3, 4), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1)),
]
ROUTES = [("im2col", "xla"), ("taps", "col2im"), ("xla", "col2im")]  # (dw, dx)


def _plain(x, w, strides, padding, lhs_dil, rhs_dil):
  return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dil,
                                  rhs_dilation=rhs_dil, dimension_numbers=NHWC)


def _fast(x, w, strides, padding, lhs_dil, rhs_dil):
  return layers.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dil,
                                     rhs_dilation=rhs_dil, dimension_numbers=NHWC)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("name,x_shape,w_shape,strides,padding,lhs_dil,rhs_dil", CASES,
                         ids=[c[0] for c in CASES])
def test_fast_gradients_equal_jax_grad_in_float64(name, x_shape, w_shape, strides, padding,
                                                  lhs_dil, rhs_dil):
  del name
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape))
    w = jnp.asarray(rng.standard_normal(w_shape))
    args = (strides, padding, lhs_dil, rhs_dil)
    y, vjp = jax.vjp(lambda x, w: _plain(x, w, *args), x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape))
    want_dx, want_dw = vjp(dy)
    for dw_route, dx_route in ROUTES:
      with conv_grad("fast", dw=dw_route, dx=dx_route):
        got_y, got_vjp = jax.vjp(lambda x, w: _fast(x, w, *args), x, w)
        got_dx, got_dw = jax.jit(got_vjp)(dy)
      assert got_y.dtype == jnp.float64 and got_dw.dtype == jnp.float64
      if w_shape[:2] == (1, 1) and strides == (1, 1):  # the forward is a matmul there
        assert _rel(got_y, y) < 1e-12
      else:
        np.testing.assert_array_equal(np.asarray(got_y), np.asarray(y))  # same forward
      assert _rel(got_dw, want_dw) < 1e-12, (dw_route, dx_route)
      assert _rel(got_dx, want_dx) < 1e-12, (dw_route, dx_route)


@pytest.mark.parametrize("method", ["dilated", "subpixel"])
@pytest.mark.parametrize("k,p,op,size", [(3, 1, 1, 5), (4, 1, 0, 4)])
def test_conv_transpose_gradients_equal_jax_grad_in_float64(method, k, p, op, size):
  """layers.conv_transpose's shared backward (XLA's dx of the dilated form, matmul dW) against
  jax.grad of the plain dilated formulation, through each weight-gradient route."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, size, size + 1, 3)))
    w = jnp.asarray(rng.standard_normal((k, k, 3, 4)))
    lo, hi = k - 1 - p, k - 1 - p + op
    plain = lambda x, w: _plain(x, w[::-1, ::-1], (1, 1), ((lo, hi), (lo, hi)), (2, 2), (1, 1))
    if method == "subpixel" and (size * 2) % 2:
      pytest.skip("subpixel needs an even output")
    y, vjp = jax.vjp(plain, x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape))
    want_dx, want_dw = vjp(dy)
    for route in ("im2col", "taps", "xla"):
      with conv_grad("fast", dw=route):
        got_y, got_vjp = jax.vjp(lambda x, w: layers.conv_transpose(x, w, 2, lo, hi, method), x, w)
        got_dx, got_dw = jax.jit(got_vjp)(dy)
      assert _rel(got_y, y) < 1e-12
      assert _rel(got_dw, want_dw) < 1e-12, route
      assert _rel(got_dx, want_dx) < 1e-12, route


def test_auto_routes_follow_the_measured_policy():
  """The per-shape choices NOTES.md measured (full model, batch 2, 256 px)."""
  def routes(x_shape, w_shape, stride=1, dilation=1, lhs=1):
    k = w_shape[0]
    pad = dilation * (k - 1) // 2 if lhs == 1 else 1
    spec = layers._ConvSpec((stride,) * 2, ((pad, pad), (pad, pad)), (lhs,) * 2,
                            (dilation,) * 2, None, "xla", "xla")
    return layers._auto_routes(x_shape, w_shape, spec)
  assert routes((2, 128, 128, 128), (1, 1, 128, 64)) == ("im2col", "col2im")  # 1x1: matmuls
  assert routes((2, 64, 64, 64), (3, 3, 64, 64)) == ("xla", "xla")  # large map: XLA's
  assert routes((2, 256, 256, 32), (3, 3, 32, 32)) == ("xla", "xla")
  assert routes((2, 16, 16, 256), (3, 3, 256, 256)) == ("xla", "col2im")
  assert routes((2, 8, 8, 512), (3, 3, 512, 512)) == ("im2col", "col2im")
  assert routes((2, 8, 8, 512), (3, 3, 512, 512), dilation=8) == ("taps", "col2im")
  assert routes((2, 8, 8, 128), (3, 3, 128, 128), lhs=2)[0] == "im2col"  # small deconv
  assert routes((2, 128, 128, 64), (4, 4, 64, 32), lhs=2)[0] == "taps"  # the head's deconv


def test_the_custom_vjp_is_in_the_program_only_where_selected():
  x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((1, 1, 4, 4))  # 1x1: matmul routes when fast
  conv = lambda w: _fast(x, w, (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1))
  # The custom VJP shows in the forward's jaxpr; its weight gradient is a dot_general. (Fresh
  # lambdas: JAX caches traces per function, and the setting applies when tracing.)
  uses_fast = lambda: "custom_vjp" in str(jax.make_jaxpr(lambda w: conv(w))(w))
  grad_has_dot = lambda: "dot_general" in str(
      jax.make_jaxpr(jax.grad(lambda w: conv(w).sum()))(w))
  with conv_grad("fast"):
    assert uses_fast() and grad_has_dot()
  with conv_grad("xla"):
    assert not uses_fast() and not grad_has_dot()
  with conv_grad("auto"):  # the CPU backend (tests run on it) takes the fast route
    assert uses_fast() == (jax.default_backend() == "cpu")
  with conv_grad("fast", parts=("conv_transpose", "max_pool")):  # convs left to XLA
    assert not uses_fast()
  with pytest.raises(ValueError):
    with conv_grad("fast", dw="nope"):
      pass
  with pytest.raises(ValueError):
    with conv_grad("fast", parts=("conv", "bn")):
      pass


def test_bfloat16_weight_gradient_keeps_dtype_and_matches_float32():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.bfloat16)
  f = lambda fn: jax.grad(lambda w: fn(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1))
                          .astype(jnp.float32).sum())(w)
  with conv_grad("fast"):
    got = f(_fast)
  want = f(_plain)
  assert got.dtype == jnp.bfloat16
  assert _rel(got.astype(jnp.float32), want.astype(jnp.float32)) < 2e-2


@pytest.mark.parametrize("method", ["dilated", "subpixel"])
def test_modules_gradients_equal_xla_in_float64(method):
  """Conv (every stride/kernel of the models) and ConvTranspose through flax, both routes."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)))
    modules = [Conv(5, 3, dtype=jnp.float64), Conv(5, 3, strides=2, dtype=jnp.float64),
               Conv(5, 1, strides=2, dtype=jnp.float64), Conv(5, 7, strides=2, dtype=jnp.float64),
               Conv(5, 3, dilation=4, dtype=jnp.float64),
               ConvTranspose(3, 3, method=method, dtype=jnp.float64),
               ConvTranspose(3, 4, 2, 1, 0, method=method, dtype=jnp.float64)]
    for module in modules:
      params = jax.tree.map(lambda p: p.astype(jnp.float64),
                            module.init(jax.random.PRNGKey(0), x)["params"])
      loss = lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x)))
      with conv_grad("xla"):
        want = jax.grad(loss, argnums=(0, 1))(params, x)
      with conv_grad("fast"):
        got = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
      for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert _rel(g, r) < 1e-12, module


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
def test_max_pool_gradient_is_xlas(dtype, size):
  """Ties (ReLU zeros, repeated integers) go to the first maximum in row-major window order,
  as XLA's select-and-scatter does; odd sizes exercise the padded border. (With real-valued
  cotangents a pixel that wins two windows sums them in another order: 1 ulp.)"""
  with jax.enable_x64(dtype == jnp.float64):
    rng = np.random.default_rng(5)
    x = jnp.asarray(np.maximum(rng.integers(-3, 4, (2, *size, 3)), 0), dtype)  # many ties
    # Integer cotangents: sums are exact in any order, so any difference is a different choice.
    dy = jnp.asarray(rng.integers(-50, 50, (2, (size[0] + 1) // 2, (size[1] + 1) // 2, 3)), dtype)
    grads = {}
    for impl in ("xla", "fast"):
      with conv_grad(impl):
        y, vjp = jax.vjp(lambda x: layers.max_pool_3x3_s2(x), x)
        grads[impl] = (np.asarray(y), np.asarray(jax.jit(vjp)(dy)[0]))
    np.testing.assert_array_equal(grads["fast"][0], grads["xla"][0])
    np.testing.assert_array_equal(grads["fast"][1], grads["xla"][1])


def test_layer_benchmark_runs_on_a_tiny_case():
  from benchmarks import layers as bench
  cases = bench.model_cases(size=32)
  assert {c.kind for c in cases} == {"conv", "deconv", "bn", "pool"}
  case = bench.LayerCase("tiny deconv", "deconv", 4, 3, 2, k=4, stride=2, padding=1,
                         output_padding=0, count=2)
  results = bench.measure([(case, bench.build(case, ["xla", "fast"], batch=1))], rounds=1,
                          target_s=0.0)
  assert set(results["tiny deconv"]) == {"dilated/xla", "dilated/fast", "subpixel/xla",
                                         "subpixel/fast"}
  assert "| tiny deconv | 2 | subpixel/fast |" in bench.format_table([case], results)
  assert set(bench.totals([case], results)) == set(results["tiny deconv"])
