"""Parity with the authors' PyTorch release (../shared/parity): the proof that our model IS CMMPNet.

The reference weights are rebuilt with the fixture's recipe, converted with `convert.from_torch`
and run on the stored input. A second case, at sizes the stored one does not cover, checks the DEM
against an independent numpy implementation that uses the converted weights.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from cmmp_jax import convert
from cmmp_jax.models import CMMPNet, DualEnhancement
from cmmp_jax.models.layers import adaptive_bin_edges, adaptive_max_pool
from parity_fixture import nhwc, nhwc_rgb_inputs, rebuild_state_dict


@pytest.fixture(scope="module")
def parity(shared_dir):
  parity_dir = shared_dir / "parity"
  if not (parity_dir / "cmmpnet_dlinknet34_ref.npz").is_file():
    pytest.skip(f"{parity_dir} has no parity fixture")
  state_dict, ref = rebuild_state_dict(parity_dir)
  variables = convert.from_torch(state_dict)
  image, aux = nhwc_rgb_inputs(ref)
  return dict(state_dict=state_dict, ref=ref, variables=variables, image=image, aux=aux)


@pytest.fixture(scope="module")
def eval_outputs(parity):
  with jax.default_matmul_precision("highest"):
    logits, inter = jax.jit(lambda v, i, a: CMMPNet().apply(
        v, i, a, train=False, mutable=["intermediates"]))(parity["variables"], parity["image"],
                                                          parity["aux"])
  return np.asarray(logits), inter["intermediates"]


def test_converted_tree_matches_model(parity):
  shapes = jax.eval_shape(lambda: CMMPNet().init(jax.random.PRNGKey(0), parity["image"],
                                                 parity["aux"]))
  convert.check_variables_match(parity["variables"], shapes)


def test_logits_match_reference(parity, eval_outputs):
  logits, _ = eval_outputs
  ref = nhwc(parity["ref"]["logits"])
  assert logits.shape == ref.shape == (2, 128, 128, 1)
  assert np.abs(logits - ref).max() <= 1e-3
  prob = jax.nn.sigmoid(logits)
  assert np.abs(np.asarray(prob) - nhwc(parity["ref"]["prob"])).max() <= 1e-4


@pytest.mark.parametrize("tap", ["encoder1", "encoder1_add", "dblock", "dem_e1", "dem_e4",
                                 "dem_d4", "dem_d1"])
def test_taps_match_reference(parity, eval_outputs, tap):
  _, inter = eval_outputs
  ref = parity["ref"]
  if tap.startswith("dem_"):
    ours = inter["fused_" + tap[len("dem_"):]][0]
    pairs = [(ours[0], ref[f"tap/{tap}/image"]), (ours[1], ref[f"tap/{tap}/aux"])]
  else:
    pairs = [(inter[tap][0], ref[f"tap/{tap}"])]
  for got, want in pairs:
    want = nhwc(want)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * scale, tap


def test_module_prefix_and_wrong_architecture(parity):
  prefixed = {f"module.{k}": v for k, v in parity["state_dict"].items()}
  v = convert.from_torch(prefixed)
  a = jax.tree_util.tree_leaves(v)
  b = jax.tree_util.tree_leaves(parity["variables"])
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  # A LinkNet (no center block) does not take D-LinkNet weights: the error names the leaves.
  shapes = jax.eval_shape(lambda: CMMPNet(backbone="linknet34").init(
      jax.random.PRNGKey(0), parity["image"], parity["aux"]))
  with pytest.raises(convert.ConversionError, match="unexpected params/image/dblock"):
    convert.check_variables_match(parity["variables"], shapes)
  with pytest.raises(convert.ConversionError, match="not part of the CMMPNet release"):
    convert.from_torch({"backbone.fc.weight": np.zeros((2, 2))})


def test_bfloat16_close_to_float32(parity, eval_outputs):
  logits32, _ = eval_outputs
  logits16 = np.asarray(jax.jit(lambda v, i, a: CMMPNet(dtype=jnp.bfloat16).apply(
      v, i, a, train=False))(parity["variables"], parity["image"], parity["aux"]))
  assert logits16.dtype == np.float32
  rel = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
  assert rel <= 5e-2, rel


# ----- second case: the DEM against an independent numpy implementation ---------------------

def _np_adaptive_max_pool(x, bins):
  """(N, H, W, C) -> (N, bins, bins, C), PyTorch's bin edges, written independently."""
  n, h, w, c = x.shape
  out = np.empty((n, bins, bins, c), x.dtype)
  for i in range(bins):
    y0, y1 = int(np.floor(i * h / bins)), int(np.ceil((i + 1) * h / bins))
    for j in range(bins):
      x0, x1 = int(np.floor(j * w / bins)), int(np.ceil((j + 1) * w / bins))
      out[:, i, j] = x[:, y0:y1, x0:x1].max(axis=(1, 2))
  return out


def _np_bn(x, p, stats, train, eps=1e-5):
  if train:
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  else:
    mean, var = stats["mean"], stats["var"]
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_conv1x1(x, p):
  """A 1x1 `layers.Conv`: kernel under conv/, bias beside it."""
  return x @ p["conv"]["kernel"][0, 0] + p["bias"]


def _np_messages(f, p, stats, levels, train):
  local = _np_bn(_np_conv1x1(f, p["local_conv"]), p["local_bn"], stats["local_bn"], train)
  n, h, w, c = f.shape
  pooled = [np.transpose(_np_adaptive_max_pool(local, b), (0, 3, 1, 2)).reshape(n, -1)
            for b in levels]
  g = np.maximum(np.concatenate(pooled, 1) @ p["global_fc"]["kernel"] + p["global_fc"]["bias"], 0)
  glob = np.broadcast_to(g[:, None, None, :], f.shape)
  both = np.concatenate([local, glob], -1)
  sig = lambda z: 1 / (1 + np.exp(-z))
  return (sig(_np_conv1x1(both, p["local_gate"])) * local
          + sig(_np_conv1x1(both, p["global_gate"])) * glob)


@pytest.mark.parametrize("name,size,train", [("dem_e4", (3, 5), False), ("dem_e4", (3, 5), True),
                                              ("dem_d2", (7, 6), False), ("dem_d2", (2, 9), True)])
def test_dem_matches_numpy_reference(parity, name, size, train):
  params = parity["variables"]["params"][name]
  stats = parity["variables"]["batch_stats"][name]
  c = params["image"]["local_bn"]["scale"].shape[0]
  rng = np.random.default_rng(0)
  fi = rng.standard_normal((2, *size, c)).astype(np.float32)
  fa = rng.standard_normal((2, *size, c)).astype(np.float32)
  dem = DualEnhancement()
  variables = {"params": params, "batch_stats": stats}
  with jax.default_matmul_precision("highest"):
    if train:
      (oi, oa), _ = dem.apply(variables, fi, fa, True, mutable=["batch_stats"])
    else:
      oi, oa = dem.apply(variables, fi, fa, False)
  to64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
  np_i, np_a = to64(params["image"]), to64(params["aux"])
  want_i = fi + _np_messages(fa.astype(np.float64), np_a, stats["aux"], (1, 2, 4), train)
  want_a = fa + _np_messages(fi.astype(np.float64), np_i, stats["image"], (1, 2, 4), train)
  np.testing.assert_allclose(np.asarray(oi), want_i, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(np.asarray(oa), want_a, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("h,w,bins", [(3, 5, 4), (4, 4, 8), (7, 6, 2), (5, 3, 1), (9, 9, 4)])
def test_adaptive_max_pool_matches_pytorch_bins(h, w, bins):
  x = np.random.default_rng(1).standard_normal((2, h, w, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(adaptive_max_pool(jnp.asarray(x), bins)),
                                _np_adaptive_max_pool(x, bins))
  assert adaptive_bin_edges(5, 4) == [(0, 2), (1, 3), (2, 4), (3, 5)]


@pytest.mark.slow
def test_convert_cli_writes_a_checkpoint_that_eval_loads(parity, tmp_path):
  """`python -m cmmp_jax.convert` on an .npz state_dict -> Orbax checkpoint -> the restored model
  reproduces the release's logits."""
  from cmmp_jax import evaluate
  from configs import bjroad
  npz = tmp_path / "release.npz"
  np.savez(npz, **{f"module.{k}": v for k, v in parity["state_dict"].items()})
  workdir = tmp_path / "converted"
  repo = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run([sys.executable, "-m", "cmmp_jax.convert", f"--torch_checkpoint={npz}",
                         f"--workdir={workdir}", "--config=configs/bjroad.py"], cwd=repo,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "wrote converted weights as step 0" in done.stdout
  config = bjroad.get_config()
  model, state, step, _ = evaluate.restore_for_inference(config, str(workdir), "best")
  assert step == 0
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(lambda p, s, i, a: model.apply({"params": p, "batch_stats": s}, i, a))(
        state.params, state.batch_stats, parity["image"], parity["aux"])
  assert np.abs(np.asarray(logits) - nhwc(parity["ref"]["logits"])).max() <= 1e-3
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    convert.run(config, npz, workdir)
  pth = tmp_path / "release.pth"  # .pth files are read without torch (tests/test_convert_pth.py)
  pth.write_bytes(b"not a real file")
  with pytest.raises(convert.CheckpointFormatError, match="not a PyTorch checkpoint"):
    convert.load_state_dict_file(pth)


def test_torchvision_resnet34_weights_load_into_both_encoders(parity):
  """A torchvision ResNet-34 state_dict (here: the release's image encoder renamed to
  torchvision's keys) fills both branches; the aux stem keeps its 1-channel conv."""
  resnet = {}
  for key, value in parity["state_dict"].items():
    head, _, rest = key.partition(".")
    if head in ("firstconv1", "firstbn"):
      resnet[{"firstconv1": "conv1", "firstbn": "bn1"}[head] + "." + rest] = value
    elif head in ("encoder1", "encoder2", "encoder3", "encoder4"):
      resnet[f"layer{head[-1]}.{rest}"] = value
  resnet["fc.weight"] = np.zeros((1000, 512), np.float32)
  model = CMMPNet()
  fresh = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), parity["image"],
                                            parity["aux"]))
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fresh)
  loaded = convert.load_torchvision_resnet34(fresh, resnet, "image")
  loaded = convert.load_torchvision_resnet34(loaded, resnet, "aux")
  want = parity["variables"]["params"]["image"]
  for branch in ("image", "aux"):
    got = loaded["params"][branch]
    np.testing.assert_array_equal(got["encoder3"]["block5"]["conv2"]["conv"]["kernel"],
                                  want["encoder3"]["block5"]["conv2"]["conv"]["kernel"])
    np.testing.assert_array_equal(loaded["batch_stats"][branch]["encoder4"]["block0"][
        "downsample_bn"]["var"], parity["variables"]["batch_stats"]["image"]["encoder4"][
            "block0"]["downsample_bn"]["var"])
  # torchvision's stem is RGB like our input, so it is copied as is (no BGR flip) ...
  np.testing.assert_array_equal(loaded["params"]["image"]["stem"]["conv"]["conv"]["kernel"],
                                parity["state_dict"]["firstconv1.weight"].transpose(2, 3, 1, 0))
  # ... and the auxiliary stem (1 input channel) keeps its own conv.
  assert not loaded["params"]["aux"]["stem"]["conv"]["conv"]["kernel"].any()
  with pytest.raises(convert.ConversionError, match="not a torchvision ResNet-34 key"):
    convert.load_torchvision_resnet34(fresh, {"classifier.weight": np.zeros(3)}, "image")
