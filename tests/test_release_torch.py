"""benchmarks.release_torch: the PyTorch rebuild of the release model is the release.

Needs PyTorch, an optional benchmark dependency: without it the whole file is skipped.
- The default model has the release's state_dict, key for key, shape for shape, in order.
- With the parity weights (../shared/parity) it reproduces the release's stored logits and
  intermediate taps (eval mode), and its float64 training step (loss, every gradient, three
  Adam steps).
- Against our JAX CMMPNet, converted with cmmp_jax.convert.from_torch: the same logits in eval
  and train mode (and the same updated BatchNorm statistics), and the same loss and gradients in
  float64, at a small width with random BatchNorm statistics.
- time_release_step and benchmarks.run's 'release' section, including its skip lines.
"""
import copy
import json
import math
import sys
import types
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from flax import traverse_util  # pylint: disable=wrong-import-position

from benchmarks import release_torch  # pylint: disable=wrong-import-position
from benchmarks import run as run_lib  # pylint: disable=wrong-import-position
from benchmarks import train_step as step_lib  # pylint: disable=wrong-import-position
from cmmp_jax import convert  # pylint: disable=wrong-import-position
from cmmp_jax import state as state_lib  # pylint: disable=wrong-import-position
from cmmp_jax import steps as step_fns  # pylint: disable=wrong-import-position
from configs import default as default_config  # pylint: disable=wrong-import-position
from parity_fixture import nhwc, rebuild_state_dict  # pylint: disable=wrong-import-position

# A small model for the JAX comparisons: two blocks in encoder1 (identity shortcuts), strided
# blocks with 1x1 shortcuts in the others, 16..64 channels; input 64 px, batch 2.
SMALL = dict(width=0.25, depths=(2, 1, 1, 1))
BATCH, SIZE = 2, 64


def _to_torch(state_dict):
  return {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def parity_dir(shared_dir):
  path = shared_dir / "parity"
  if not (path / "cmmpnet_dlinknet34_ref.npz").is_file():
    pytest.skip(f"{path} has no parity fixture")
  return path


@pytest.fixture(scope="module")
def release_weights(parity_dir):
  state_dict, ref = rebuild_state_dict(parity_dir)
  return state_dict, ref


def test_default_model_has_the_release_state_dict(parity_dir):
  shapes = json.loads((parity_dir / "state_dict_shapes.json").read_text())
  state_dict = release_torch.ReleaseCMMPNet().state_dict()
  assert list(state_dict) == list(shapes)  # the same keys in the same order
  assert {k: list(v.shape) for k, v in state_dict.items()} == shapes
  assert len(shapes) == 835


def test_reproduces_the_release_outputs_and_taps(release_weights):
  """Eval mode, float32, the release's weights and input: logits, probabilities and the
  intermediate taps of cmmpnet_dlinknet34_ref.npz."""
  state_dict, ref = release_weights
  model = release_torch.ReleaseCMMPNet().eval()
  model.load_state_dict(_to_torch(state_dict), strict=True)
  taps = {}

  def keep(name):
    def hook(_, __, output):
      taps[name] = output
    return hook

  for name in ("encoder1", "encoder1_add", "dblock", "dem_e1", "dem_e4", "dem_d4", "dem_d1"):
    getattr(model, name).register_forward_hook(keep(name))
  x = torch.from_numpy(ref["input_nchw_bgr_aux"])
  with torch.no_grad():
    logits = model(x, logits=True).numpy()
    prob = model(x).numpy()
  scale = float(np.abs(ref["logits"]).max())
  assert logits.shape == ref["logits"].shape == (2, 1, 128, 128)
  assert np.abs(logits - ref["logits"]).max() <= 1e-5 * scale  # measured 5e-6 at scale 1.9
  assert np.abs(prob - ref["prob"]).max() <= 1e-5
  for name, value in taps.items():
    if name.startswith("dem_"):
      pairs = [(value[0], ref[f"tap/{name}/image"]), (value[1], ref[f"tap/{name}/aux"])]
    else:
      pairs = [(value, ref[f"tap/{name}"])]
    for got, want in pairs:
      got = got.numpy()
      assert got.shape == want.shape, name
      assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max())), name


@pytest.fixture(scope="module")
def release_train_step(parity_dir, release_weights):
  path = parity_dir / "train_step_ref.npz"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  state_dict, _ = release_weights
  ref = np.load(path)
  model = release_torch.ReleaseCMMPNet()
  model.load_state_dict(_to_torch(state_dict), strict=True)
  model = model.double().train()
  x = torch.from_numpy(ref["input_nchw_bgr_aux"]).double()
  y = torch.from_numpy(ref["labels_nchw"]).double()
  return model, x, y, ref


def test_reproduces_the_release_float64_loss_and_gradients(release_train_step):
  """train_step_ref.npz: the release's loss and gradient fingerprints, train mode, float64."""
  model, x, y, ref = release_train_step
  model = copy.deepcopy(model)
  loss = release_torch.dice_bce_loss(model(x), y)
  loss.backward()
  assert abs(loss.item() - float(ref["loss"])) <= 1e-12  # measured: equal
  grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
  gscale = max(np.abs(ref[k]).max() for k in ref.files if k.startswith("grad/"))
  checked = 0
  for name in ref.files:
    kind, _, key = name.partition("/")
    if kind == "gnorm":
      g = grads[key]
      np.testing.assert_allclose(np.linalg.norm(g), ref[name], rtol=1e-10, err_msg=key)
      proj = np.random.default_rng(zlib.crc32(key.encode("utf-8")) + 7).standard_normal(g.shape)
      assert abs((g * proj).sum() - ref[f"gdot/{key}"]) <= 1e-10 * np.linalg.norm(g) * (
          np.linalg.norm(proj)), key
      checked += 1
    elif kind == "grad":
      # Rank-1 gradients in full (biases before a BatchNorm are ~1e-17: compared absolutely).
      assert np.abs(grads[key] - ref[name]).max() <= 1e-12 * gscale, key
      checked += 1
  assert checked == len([k for k in ref.files if k.split("/")[0] in ("gnorm", "grad")]) > 400


@pytest.mark.slow
def test_reproduces_the_release_adam_steps(release_train_step):
  """Three Adam steps (lr 1e-4, PyTorch defaults): time_release_step's 'step' is the release's
  training step."""
  model, x, y, ref = release_train_step
  model = copy.deepcopy(model)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
  losses = []
  for i in range(4):
    optimizer.zero_grad()
    loss = release_torch.dice_bce_loss(model(x), y)
    losses.append(loss.item())
    if i < 3:
      loss.backward()
      optimizer.step()
  np.testing.assert_allclose(losses, ref["adam_losses"], rtol=1e-12)


# ----- against our JAX model ---------------------------------------------------------------

def _randomize_statistics(model, seed=0):
  """BatchNorm affine parameters and running statistics away from 1/0 (a swapped field would
  go unnoticed at the defaults), and the dblocks' zero-initialised biases non-zero."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(c, generator=gen) * 0.2)
        module.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
        module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
      elif isinstance(module, torch.nn.Conv2d) and name.startswith("dblock"):
        module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)


def _jax_model(upsample_method="dilated", **fields):
  """configs/default.py's model (the release's CMMPNet) at SMALL's width and depths."""
  config = default_config.get_config()
  config.model.update(dict(SMALL, upsample_method=upsample_method, **fields))
  return state_lib.model_from_config(config), config


@pytest.fixture(scope="module")
def small():
  """A small release model with random weights and statistics, its converted variables, and one
  batch in both layouts (NCHW BGR + aux for torch; NHWC RGB and aux for JAX)."""
  torch.manual_seed(0)
  model = release_torch.ReleaseCMMPNet(**SMALL)
  _randomize_statistics(model)
  variables = convert.from_torch(model.state_dict())
  jax_model, config = _jax_model()
  convert.check_variables_match(variables, state_lib.abstract_variables(config, SIZE))
  rng = np.random.default_rng(0)
  x = rng.uniform(-1.6, 1.6, (BATCH, 4, SIZE, SIZE)).astype(np.float32)
  y = (rng.uniform(size=(BATCH, 1, SIZE, SIZE)) < 0.1).astype(np.float32)
  return dict(model=model, variables=variables, x=x, y=y,
              image=np.ascontiguousarray(nhwc(x[:, 2::-1])),
              aux=np.ascontiguousarray(nhwc(x[:, 3:])),
              mask=np.ascontiguousarray(nhwc(y)))


def _bn_positions(path, batch, size):
  """How many values each BatchNorm of the model normalises over (N * H * W), by its path."""
  top, name = path[0], path[-2]
  level = lambda key: int(next(p for p in path if p.startswith(key))[len(key):])
  if top.startswith("dem_e"):
    side = size >> (int(top[-1]) + 1)
  elif top.startswith("dem_d"):
    side = size >> int(top[-1])
  elif path[1] == "stem":
    side = size >> 1
  elif path[1].startswith("encoder"):
    side = size >> (level("encoder") + 1)
  else:  # decoder: norm1 at its input's side, norm2 and norm3 at twice that
    side = size >> (level("decoder") + (1 if name == "norm1" else 0))
  return batch * side * side


@pytest.mark.parametrize("train,upsample_method", [(False, "dilated"), (True, "dilated"),
                                                   (True, "subpixel")])
def test_matches_the_jax_model(small, train, upsample_method):
  """The same logits as our CMMPNet on the converted weights (train mode: BatchNorm with batch
  statistics, and the same updated running statistics)."""
  model = copy.deepcopy(small["model"]).train(train)
  with torch.no_grad():
    want = nhwc(model(torch.from_numpy(small["x"]), logits=True).numpy())
  jax_model, _ = _jax_model(upsample_method)
  with jax.default_matmul_precision("highest"):
    if train:
      got, updates = jax.jit(lambda v, i, a: jax_model.apply(
          v, i, a, train=True, mutable=["batch_stats"]))(small["variables"], small["image"],
                                                         small["aux"])
    else:
      got = jax.jit(lambda v, i, a: jax_model.apply(v, i, a, train=False))(
          small["variables"], small["image"], small["aux"])
  got = np.asarray(got)
  scale = float(np.abs(want).max())
  assert got.shape == want.shape == (BATCH, SIZE, SIZE, 1)
  # Measured: 2.4e-8 (eval, scale 0.04), 9e-7 (train, scale 0.42).
  assert np.abs(got - want).max() <= 1e-4 * scale, (np.abs(got - want).max(), scale)
  if not train:
    return
  old = traverse_util.flatten_dict(small["variables"]["batch_stats"])
  theirs = traverse_util.flatten_dict(convert.from_torch(model.state_dict())["batch_stats"])
  ours = traverse_util.flatten_dict(jax.device_get(updates["batch_stats"]))
  assert set(theirs) == set(ours) == set(old)
  for path, value in theirs.items():
    if path[-1] == "mean":
      np.testing.assert_allclose(ours[path], value, rtol=1e-4, atol=1e-5, err_msg=str(path))
      continue
    # PyTorch's running variance takes the UNBIASED batch variance (n / (n - 1)); flax's
    # BatchNorm the biased one. Either ours matches torch's, or it does after that factor.
    n = _bn_positions(path, BATCH, SIZE)
    unbiased = 0.9 * old[path] + (ours[path] - 0.9 * old[path]) * n / (n - 1)
    assert (np.allclose(ours[path], value, rtol=1e-4, atol=1e-6)
            or np.allclose(unbiased, value, rtol=1e-4, atol=1e-6)), path


def test_matches_the_jax_loss_and_gradients_in_float64(small):
  """forward + release loss + backward, train mode, float64 on both sides (float32 gradients of
  random weights are ill-conditioned at the SPP max pooling, see ../shared/parity/README.md):
  the same loss and the same gradient for every parameter."""
  model = copy.deepcopy(small["model"]).double().train()
  loss = release_torch.dice_bce_loss(model(torch.from_numpy(small["x"]).double()),
                                     torch.from_numpy(small["y"]).double())
  loss.backward()
  # from_torch maps gradients like the weights they belong to (it casts them to float32).
  want = traverse_util.flatten_dict(convert.from_torch(
      {k: p.grad for k, p in model.named_parameters()})["params"])
  jax_model, config = _jax_model()
  jax_model = jax_model.clone(dtype=jnp.float64)
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    v64 = to64(small["variables"])
    batch = to64({k: small[k] for k in ("image", "aux", "mask")})
    (jax_loss, _), grads = jax.jit(jax.value_and_grad(
        step_fns.make_loss_fn(jax_model, config), has_aux=True))(
            v64["params"], v64["batch_stats"], batch)
    got = traverse_util.flatten_dict(jax.device_get(grads))
  # Our final conv runs in float32 (cmmpnet.py): that sets the floor. Measured: 1.2e-8.
  assert abs(float(jax_loss) - loss.item()) <= 1e-6 * loss.item()
  assert set(got) == set(want)
  scale = max(float(np.abs(g).max()) for g in want.values())
  for path, value in want.items():
    diff = np.abs(np.asarray(got[path]) - value).max()
    assert diff <= 1e-6 * scale, (path, diff, scale)  # measured: 2e-8 of the scale
    if np.abs(value).max() > 1e-6 * scale:  # not a bias before a BatchNorm (zero gradient)
      rel = np.linalg.norm(np.asarray(got[path]) - value) / np.linalg.norm(value)
      assert rel <= 1e-5, (path, rel)  # measured: at most 9e-7


# ----- timing and the benchmark suite ------------------------------------------------------

def test_time_release_step_reports_each_pass():
  result = release_torch.time_release_step(1, 64, 1, "cpu", steps=1, warmup=0, width=0.125,
                                           depths=(1, 1, 1, 1))
  for key in ("forward_s", "forward_backward_s", "step_s"):
    assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0
    assert len(result[key.replace("_s", "_seconds")]) == 1
  assert (result["batch"], result["size"], result["mode"], result["dtype"]) == (
      1, 64, "train", "float32")
  assert result["parameters"] == sum(
      p.numel() for p in release_torch.ReleaseCMMPNet(0.125, (1, 1, 1, 1)).parameters())


def test_release_section_skips_with_a_reason(monkeypatch):
  spec = step_lib.StepSpec(model="image_only", width=0.125, size=64)
  args = types.SimpleNamespace(steps=1, warmup=0)
  skipped = run_lib.release_section(spec, args, None, {})
  assert skipped == {"skipped": "model 'image_only' is not the release's CMMPNet"}
  resunet = spec.replace(model="cmmpnet", model_extras=(("backbone", "resunet"),))
  assert "backbone=resunet" in run_lib.release_section(resunet, args, None, {})["skipped"]
  # Without PyTorch (an import of a None entry in sys.modules raises ImportError): one line.
  monkeypatch.setitem(sys.modules, "benchmarks.release_torch", None)
  skipped = run_lib.release_section(spec.replace(model="cmmpnet"), args, None, {})
  assert run_lib.format_release(skipped) == [
      "release: skipped (PyTorch not importable; pip install torch to compare)"]


@pytest.mark.slow
def test_release_section_reports_the_ratios():
  spec = step_lib.StepSpec(model="cmmpnet", width=0.125, depths=(1, 1, 1, 1), size=64, batch=2)
  args = types.SimpleNamespace(steps=1, warmup=0)
  fake_train = {"ms_per_step": 100.0}
  result = run_lib.release_section(spec, args, step_lib.initial_variables(spec),
                                   {"train": fake_train})
  assert "skipped" not in result
  for key in ("forward", "backward", "forward_backward", "step"):
    ours, theirs = result["cmmp_jax_seconds"][key], result["release_seconds"][key]
    if key == "backward" and min(ours, theirs) <= 0:  # a difference of two noisy times
      assert result["ratio"][key] is None
    else:
      assert result["ratio"][key] == pytest.approx(ours / theirs)
  assert result["cmmp_jax_seconds"]["step"] == 0.1
  assert result["cmmp_jax"]["forward"]["kind"] == "forward_train"
  assert result["release"]["width"] == 0.125 and result["release"]["size"] == 64
  lines = run_lib.format_release(result)
  assert lines[0].startswith("release (PyTorch ") and "batch 2, 64 px" in lines[0]
  assert [line.split()[0] for line in lines[2:]] == ["forward", "backward", "forward", "train"]
