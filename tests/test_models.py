"""Model family: ablation switches, every model forward+backward under jit at tiny size, the
transposed-conv formulations, remat and the model builder's errors."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

from cmmp_jax.models import MODELS, build_model
from cmmp_jax.models.cmmpnet import CMMPNet
from cmmp_jax.models.dem import DEMOptions
from cmmp_jax.models.layers import ConvTranspose

TINY = dict(width=0.125, depths=(1, 1, 1, 1))


def _inputs(n=2, size=64, aux_channels=1, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1.6, 1.6, (n, size, size, 3)).astype(np.float32)
  aux = rng.uniform(-1.6, 1.6, (n, size, size, aux_channels)).astype(np.float32)
  return jnp.asarray(image), jnp.asarray(aux)


def _init(model, image, aux, seed=0):
  """model.init(PRNGKey(seed), image, aux, train=False), run op by op.

  A jitted initialiser is one XLA program per model, 7-20 s to compile on a 2-core CPU (most of
  this file's time once); op by op, XLA compiles each distinct operation once per process and the
  models share most of them. jax.eval_shape still traces the initialiser as jit does, without
  compiling it, so a model whose init cannot be jitted fails here as before."""
  init = functools.partial(model.init, train=False)
  key = jax.random.PRNGKey(seed)
  jax.eval_shape(jax.jit(init), key, image, aux)
  return init(key, image, aux)


def _apply(model, variables, image, aux):
  return jax.jit(lambda v, i, a: model.apply(v, i, a, train=False))(variables, image, aux)


def _paths(variables):
  return set(traverse_util.flatten_dict(variables["params"], sep="/"))


def _forward_backward(model, variables, image, aux):
  def loss_fn(params):
    logits, updates = model.apply({**variables, "params": params}, image, aux, train=True,
                                  mutable=["batch_stats"])
    return jnp.mean(jax.nn.sigmoid(logits)), (logits, updates)
  (loss, (logits, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables["params"])
  return loss, logits, grads


@pytest.mark.slow
@pytest.mark.parametrize("name,backbone", [(name, "dlinknet34") for name in sorted(MODELS)] + [
    ("cmmpnet", "linknet34"), ("cmmpnet", "resunet")])
def test_every_model_runs_forward_and_backward(name, backbone):
  image, aux = _inputs(size=32)
  model = build_model(dict(name=name, backbone=backbone, **TINY))
  variables = _init(model, image, aux)
  loss, logits, grads = _forward_backward(model, variables, image, aux)
  assert logits.shape == (2, 32, 32, 1) and logits.dtype == jnp.float32
  assert np.isfinite(float(loss))
  norms = [float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)
  paths = _paths(variables)
  assert any(p.startswith("image/dblock") or p.startswith("net/dblock") for p in paths) == (
      backbone == "dlinknet34")


@pytest.mark.slow
def test_single_modality_models_ignore_the_other_input():
  image, aux = _inputs()
  image2, aux2 = _inputs(seed=1)
  for name, same in (("image_only", (image, aux2)), ("aux_only", (image2, aux))):
    model = build_model(dict(name=name, **TINY))
    v = _init(model, image, aux)
    np.testing.assert_array_equal(_apply(model, v, image, aux), _apply(model, v, *same))
  early = build_model(dict(name="early_fusion", **TINY))
  v = _init(early, image, aux)
  # The early-fusion stem sees 3 + C channels.
  assert v["params"]["net"]["stem"]["conv"]["conv"]["kernel"].shape[2] == 4


@pytest.fixture(scope="module")
def full_tiny_cmmpnet():
  """The full tiny CMMPNet, its variables and logits, shared by the ablation tests."""
  image, aux = _inputs(size=32)
  model = CMMPNet(**TINY)
  variables = _init(model, image, aux)
  return image, aux, variables, _apply(model, variables, image, aux)


@pytest.mark.parametrize("switch,absent,present", [
    (dict(use_gate=False), "_gate", "global_fc"),
    (dict(use_global=False), "global_", "local_gate"),
    (dict(use_local=False), "local_gate", "global_gate"),
])
def test_dem_ablations_change_tree_and_output(full_tiny_cmmpnet, switch, absent, present):
  image, aux, v_full, out_full = full_tiny_cmmpnet
  ablated = CMMPNet(**TINY, dem=DEMOptions(**switch))
  v_abl = jax.eval_shape(lambda: ablated.init(jax.random.PRNGKey(0), image, aux))
  assert any(absent in p for p in _paths(v_full))
  assert not any(absent in p for p in _paths(v_abl))
  assert any(present in p for p in _paths(v_abl))
  # Every leaf the ablated model shares with the full one is copied over (the others are
  # absent), so the output differs only by the ablated mechanism.
  flat_full = {c: traverse_util.flatten_dict(v) for c, v in v_full.items()}
  # (Gates that lose the global half of their input keep the local half of the kernel.)
  crop = lambda full, want: np.asarray(full)[tuple(slice(0, d) for d in want.shape)]
  variables = {c: traverse_util.unflatten_dict({k: crop(flat_full[c][k], want) for k, want in
                                                traverse_util.flatten_dict(v).items()})
               for c, v in v_abl.items()}
  out_abl = _apply(ablated, variables, image, aux)
  assert float(jnp.abs(out_full - out_abl).max()) > 1e-6


@pytest.mark.parametrize("levels", [(1,), (1, 2), (1, 2, 4),
                                    pytest.param((1, 2, 4, 8), marks=pytest.mark.slow)])
def test_spp_levels_set_global_fc_inputs(levels):
  image, aux = _inputs(size=32)
  model = CMMPNet(**TINY, dem=DEMOptions(spp_levels=levels))
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, aux))
  c = v["params"]["dem_e4"]["image"]["local_bn"]["scale"].shape[0]
  fc = v["params"]["dem_e4"]["image"]["global_fc"]["kernel"]
  assert fc.shape == (c * sum(b * b for b in levels), c)
  if levels == (1, 2, 4, 8):  # 8x8 bins over maps as small as 1x1 (bins repeat pixels)
    assert np.isfinite(np.asarray(_apply(model, _init(model, image, aux), image, aux))).all()


def test_local_kernel_3x3_option_and_aux_channels():
  image, aux = _inputs(size=32, aux_channels=5)
  model = CMMPNet(**TINY, dem=DEMOptions(local_kernel_size=3), aux_channels=5)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, aux))
  assert v["params"]["dem_e1"]["aux"]["local_conv"]["conv"]["kernel"].shape[:2] == (3, 3)
  assert v["params"]["aux"]["stem"]["conv"]["conv"]["kernel"].shape[2] == 5
  with pytest.raises(ValueError, match="aux_channels"):
    jax.eval_shape(lambda: model.apply(v, image, aux[..., :1]))


def test_no_dem_is_late_fusion_and_without_messages_raises():
  image, aux = _inputs()
  with pytest.raises(ValueError, match="use_local or use_global"):
    build_model(dict(use_local=False, use_global=False, **TINY))
  late = build_model(dict(name="late_fusion", **TINY))
  assert not any(p.startswith("dem_") for p in _paths(_init(late, image, aux)))


def test_build_model_gathers_the_flat_dem_fields_into_options():
  model = build_model(dict(spp_levels=[1, 2], local_kernel_size=3, use_gate=False))
  assert model.dem == DEMOptions(use_gate=False, spp_levels=(1, 2), local_kernel_size=3)
  assert CMMPNet().dem == DEMOptions() == DEMOptions(True, True, True, (1, 2, 4), 1)
  # Other models ignore the DEM fields, even ones a DEM would reject.
  late = build_model(dict(name="late_fusion", use_local=False, use_global=False))
  assert late.dem == DEMOptions()


@pytest.mark.parametrize("k,s,p,op,size", [(3, 2, 1, 1, 5), (4, 2, 1, 0, 6), (3, 2, 1, 1, 4)])
def test_subpixel_transposed_conv_equals_dilated(k, s, p, op, size):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, size, size + 1, 3)), jnp.float32)
  dilated = ConvTranspose(4, k, s, p, op, method="dilated")
  v = dilated.init(jax.random.PRNGKey(0), x)
  want = dilated.apply(v, x)
  got = ConvTranspose(4, k, s, p, op, method="subpixel").apply(v, x)
  assert want.shape == got.shape == (2, 2 * size, 2 * (size + 1), 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_transposed_conv_matches_direct_definition():
  """PyTorch's ConvTranspose2d: y[o] += x[i] * w[i, o, t] at o = i*s - p + t (cropped)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 3, 4, 2)).astype(np.float32)
  layer = ConvTranspose(3, 3, 2, 1, 1, use_bias=False)
  v = layer.init(jax.random.PRNGKey(1), x)
  w = np.asarray(v["params"]["kernel"])  # (kh, kw, in, out)
  full = np.zeros((1, 3 * 2 + 3, 4 * 2 + 3, 3), np.float32)
  for i in range(3):
    for j in range(4):
      for ty in range(3):
        for tx in range(3):
          full[0, i * 2 + ty, j * 2 + tx] += x[0, i, j] @ w[ty, tx]
  want = full[:, 1:1 + 6, 1:1 + 8]  # crop padding p=1 at the start; output_padding adds one row
  np.testing.assert_allclose(np.asarray(layer.apply(v, x)), want, atol=1e-5)


def test_subpixel_upsampling_gives_the_same_model_output():
  image, aux = _inputs(size=32)
  v = _init(CMMPNet(**TINY), image, aux)
  np.testing.assert_allclose(
      np.asarray(_apply(CMMPNet(**TINY, upsample_method="subpixel"), v, image, aux)),
      np.asarray(_apply(CMMPNet(**TINY), v, image, aux)), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [dict(name="image_only", backbone="resunet"),
                                    dict(name="cmmpnet")], ids=["resunet", "cmmpnet"])
def test_remat_gives_the_same_parameters_logits_and_gradients(fields):
  """Rematerialised stem, blocks and DEMs (Res-UNet: its decoders too): the same parameter tree,
  logits and gradients. (What remat saves is measured in test_benchmarks.)"""
  image, aux = _inputs(size=32)
  base = build_model(dict(**fields, **TINY))
  v = _init(base, image, aux)
  remat = build_model(dict(**fields, remat=True, **TINY))
  # (The parameter tree of the remat model's initialiser, traced without compiling it.)
  assert (jax.tree_util.tree_structure(jax.eval_shape(lambda: _init(remat, image, aux)))
          == jax.tree_util.tree_structure(v))
  _, logits, grads = _forward_backward(base, v, image, aux)
  _, logits2, grads2 = _forward_backward(remat, v, image, aux)
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads2), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_sun1d_decoder_shapes_and_bfloat16_compute():
  image, aux = _inputs(size=32)
  model = build_model(dict(name="image_only", decoder="sun1d", dtype="bfloat16", width=0.25,
                           depths=(1, 1, 1, 1)))
  v = _init(model, image, aux)
  assert "vertical" in v["params"]["net"]["decoder4"]["deconv2"]
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(v))
  loss, logits, grads = _forward_backward(model, v, image, aux)
  assert logits.dtype == jnp.float32 and np.isfinite(float(loss))
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def test_build_model_errors_name_the_field():
  with pytest.raises(ValueError, match="config.model.name"):
    build_model(dict(name="unet"))
  with pytest.raises(ValueError, match="config.model.dtype"):
    build_model(dict(dtype="float16"))
  with pytest.raises(ValueError, match="widht"):
    build_model(dict(widht=0.5))
  with pytest.raises(ValueError, match="multiples of 32"):
    image, aux = _inputs(size=48)
    _init(CMMPNet(**TINY), image, aux)


@pytest.mark.slow
def test_shape_and_size_generality():
  """Non-square sizes whose deepest map (3x5) is not a multiple of the SPP levels."""
  image = jnp.zeros((1, 96, 160, 3))
  aux = jnp.zeros((1, 96, 160, 1))
  model = CMMPNet(**TINY)
  v = _init(model, image, aux)
  assert _apply(model, v, image, aux).shape == (1, 96, 160, 1)


def test_summary_counts_params_and_flops():
  from cmmp_jax.models import summary
  rows = summary.summarize(dict(width=0.125, depths=(1, 1, 1, 1)), ["cmmpnet", "image_only"],
                           [32, 64])
  cmmp, single = rows
  image, aux = _inputs(size=32)
  v = jax.eval_shape(lambda: CMMPNet(**TINY).init(jax.random.PRNGKey(0), image, aux))
  assert cmmp["params"] == sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))
  # FLOPs grow ~4x with 2x the side; the two-branch model costs about twice the single one.
  assert 3.5 < cmmp["gflops_64"] / cmmp["gflops_32"] < 4.5
  assert 1.8 < cmmp["gflops_64"] / single["gflops_64"] < 3.0


def test_table5_formats_percentages():
  from cmmp_jax.experiments import table5
  row = {"best_step": 24, "val": {"g_iou": 0.5}, "test": {"a_iou": 0.6123, "g_iou": 0.625}}
  table = table5.format_table([("cmmpnet", [row])])
  assert "| CMMPNet" in table and "61.23" in table and "62.50" in table and "50.00" in table
  other = {"best_step": 48, "val": {"g_iou": 0.7}, "test": {"a_iou": 0.6323, "g_iou": 0.645}}
  table = table5.format_table([("early_fusion", [row, other])])
  # mean and sample standard deviation over seeds: (62.5 + 64.5) / 2 = 63.50, std 1.41
  assert "| early fusion" in table and "63.50 +- 1.41" in table and "24,48" in table


def test_bfloat16_bias_gradient_is_accumulated_in_float32():
  """Regression: a bias gradient summed in bfloat16 stalls (1024 instead of 8192 on XLA:CPU)."""
  from cmmp_jax.models.layers import Conv
  conv = Conv(1, 3, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 64, 64, 1), jnp.bfloat16)
  v = conv.init(jax.random.PRNGKey(0), x)
  grads = jax.grad(lambda p: conv.apply({"params": p}, x).astype(jnp.float32).sum())(v["params"])
  assert float(grads["bias"][0]) == 2 * 64 * 64
