"""Parity of our TRAINING STEP with the authors' PyTorch release, in float64 (../shared/parity,
`train_step_ref.npz`; its README describes the file).

The release ran in train mode (BatchNorm with batch statistics) in float64 on the reference
weights: its loss (BCE + batch soft Dice), a fingerprint of every parameter's gradient and the
loss before and after each of three Adam steps (lr 1e-4, PyTorch's defaults). Here the full
CMMPNet of configs/default.py, with those weights converted by `convert.from_torch` and
model.dtype 'float64', goes through the project's own code, not a copy of it:

(a) `steps.make_loss_fn` (what the train step differentiates) under `jax.value_and_grad`: the
    loss; for each parameter of rank >= 2 the gradient's L2 norm (`gnorm/K`) and its dot product
    with a fixed random tensor P_K (`gdot/K`; P_K regenerated from the README's recipe in the
    state_dict layout and converted with the same converter, its sum checked against `psum/K`);
    for each rank-1 parameter the whole gradient (`grad/K`);
(b) `steps.make_train_step` (jitted, state donated) on a 1-device mesh with the optimizer of
    `state.create_state`: the losses it reports at four calls on the same batch (before the first
    Adam step and after each of three) against `adam_losses`, and its first gradient norm against
    the release's.

Everything runs in one module fixture with jax_enable_x64 switched on and restored before the
fixture returns (host numbers only leave it), so that float64 never leaks into other tests.
Cost on a 2-core CPU (hence `slow`): two compilations of the full-width model's backward pass in
float64 (the loss gradient, then the train step; ~25 s and ~35 s of CPU) and five forward +
backward passes at 2 x 128 x 128 (~1.5 s of CPU each): 60 s of wall time on a quiet machine,
120-135 s on a shared one; 5.2 GB peak memory (85 M float64 parameters and their Adam moments).
"""
import json
import zlib

import numpy as np
import pytest

import jax
from flax import traverse_util

from cmmp_jax import config_checks, convert, sharding, steps
from cmmp_jax import state as state_lib
from configs import default as default_config
from parity_fixture import nhwc, nhwc_rgb_inputs, rebuild_state_dict


def _to64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _convert64(state_dict):
  """convert.from_torch's params for float64 tensors in the state_dict layout, without its
  float32 cast: the converter only permutes and reverses axes, so converting the float32 head
  and the float32 remainder of each tensor and adding them in float64 gives the exact float64
  conversion (to ~1e-15). Returns {flat path 'a/b/c': array}."""
  hi = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  lo = {k: np.asarray(np.asarray(v, np.float64) - hi[k], np.float32) for k, v in state_dict.items()}
  a = traverse_util.flatten_dict(convert.from_torch(hi)["params"], sep="/")
  b = traverse_util.flatten_dict(convert.from_torch(lo)["params"], sep="/")
  return {k: a[k].astype(np.float64) + b[k].astype(np.float64) for k in a}


def _projection(key, shape):
  """P_K of the README: float64, the state_dict layout."""
  return np.random.default_rng(zlib.crc32(key.encode("utf-8")) + 7).standard_normal(shape)


def _release_config():
  """configs/default.py (the release's DinkNet34_CMMPNet, Adam lr 1e-4, BCE + Dice), float64."""
  config = default_config.get_config()
  config.model.dtype = "float64"
  config_checks.validate(config)  # float64 needs jax_enable_x64: checked here
  return config


def _gradient_errors(grads, ref, shapes):
  """Per-leaf comparisons of our gradients (flat 'a/b/c' paths) with the release's
  fingerprints."""
  gscale = max(float(np.abs(ref[k]).max()) for k in ref.files if k.startswith("grad/"))
  rows = {"gnorm": {}, "gdot": {}, "psum": {}, "grad_abs": {}, "grad_rel": {}, "grad_rel64": {}}
  paths = set()
  for name in ref.files:
    kind, _, key = name.partition("/")
    if kind == "gnorm":
      (path, p), = _convert64({key: _projection(key, shapes[key])}).items()
      g = np.asarray(grads[path], np.float64)
      gnorm, gdot = float(ref[name]), float(ref[f"gdot/{key}"])
      rows["gnorm"][key] = abs(np.linalg.norm(g) - gnorm) / gnorm
      # A dot product with a standard normal tensor has spread |g|: relative to that (the
      # stored value itself can come arbitrarily close to 0).
      rows["gdot"][key] = abs(float(np.vdot(g, p)) - gdot) / gnorm
      # The fingerprint pairs the converted leaf with the release's key.
      rows["psum"][key] = abs(float(p.sum()) - float(ref[f"psum/{key}"])) / np.sqrt(p.size)
    elif kind == "grad":
      (path, want), = _convert64({key: ref[name]}).items()
      got = np.asarray(grads[path], np.float64)
      assert got.shape == want.shape, key
      rows["grad_abs"][key] = float(np.abs(got - want).max()) / gscale
      # Biases in front of a BatchNorm have a zero gradient in exact arithmetic (~1e-17 here):
      # only the absolute comparison is meaningful for them.
      if np.abs(want).max() > 1e-6 * gscale:
        rows["grad_rel"][key] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        if grads[path].dtype == np.float64:  # not a float32-reduced conv bias (see the test)
          rows["grad_rel64"][key] = rows["grad_rel"][key]
    else:
      continue
    paths.add(path)
  return rows, paths


def _run(parity_dir):
  ref = np.load(parity_dir / "train_step_ref.npz")
  shapes = json.loads((parity_dir / "state_dict_shapes.json").read_text())
  state_dict, _ = rebuild_state_dict(parity_dir)
  # float32 weights: exact in float64. On the device once (85 M parameters: 0.7 GB).
  variables = jax.device_put(_to64(convert.from_torch(state_dict)))
  del state_dict
  image, aux = nhwc_rgb_inputs(ref)
  batch = _to64({"image": image, "aux": aux, "mask": nhwc(ref["labels_nchw"])})
  config = _release_config()
  model = state_lib.model_from_config(config)
  out = {"adam": config.optimizer.to_dict()}

  # (a) The loss function the train step differentiates.
  loss_and_grad = jax.jit(jax.value_and_grad(steps.make_loss_fn(model, config), has_aux=True))
  (loss, _), grads = loss_and_grad(variables["params"], variables["batch_stats"], batch)
  out["loss"] = float(loss)
  out["loss_dtype"] = str(loss.dtype)
  grads = traverse_util.flatten_dict(jax.device_get(grads), sep="/")
  out["float32_grad_leaves"] = sorted(k for k, g in grads.items() if g.dtype != np.float64)
  out["errors"], paths = _gradient_errors(grads, ref, shapes)
  out["unchecked_leaves"] = sorted(set(grads) - paths)
  del grads, loss_and_grad

  # (b) The jitted train step, as train.py runs it (which places the state with
  # sharding.put_replicated: a host round trip that on one device is this device_put).
  mesh = sharding.make_mesh(jax.devices()[:1])
  _, state = state_lib.create_state(config, variables)
  del variables
  state = jax.device_put(state, sharding.replicated(mesh))
  train_step = steps.make_train_step(model, config, mesh)
  global_batch = sharding.to_global_batch(batch, mesh)
  reported = []
  for _ in range(4):  # the 4th call's loss is the loss after the third Adam step
    state, metrics = train_step(state, global_batch)
    reported.append(jax.device_get(metrics))
  out["step_losses"] = [float(m["loss"]) for m in reported]
  out["step_loss_dtype"] = str(reported[0]["loss"].dtype)
  out["first_grad_norm"] = float(reported[0]["grad_norm"])
  out["finite"] = [bool(m["finite"]) for m in reported]
  out["param_dtypes"] = sorted({str(p.dtype) for p in jax.tree.leaves(state.params)})
  return ref, out


@pytest.fixture(scope="module")
def measured(shared_dir):
  """(the reference npz, our numbers): computed under jax_enable_x64, which is restored before
  the fixture returns."""
  parity_dir = shared_dir / "parity"
  for name in ("train_step_ref.npz", "cmmpnet_dlinknet34_ref.npz", "state_dict_shapes.json"):
    if not (parity_dir / name).is_file():
      pytest.skip(f"{parity_dir / name} is absent (the float64 train-step reference)")
  x64 = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    return _run(parity_dir)
  finally:
    jax.config.update("jax_enable_x64", x64)


def test_float64_is_for_parity_checks_only():
  """model.dtype 'float64' is accepted only with jax_enable_x64 (else JAX would compute in
  float32 without a word)."""
  config = default_config.get_config()
  config.model.dtype = "float64"
  assert not jax.config.jax_enable_x64
  with pytest.raises(ValueError, match="jax_enable_x64"):
    config_checks.validate(config)
  assert np.dtype(state_lib.model_from_config(config).dtype) == np.float64


# One test for the one expensive fixture (xdist hands tests to workers one by one: several tests
# could build it twice).
@pytest.mark.slow
def test_train_step_matches_the_release_in_float64(measured):
  ref, out = measured
  assert not jax.config.jax_enable_x64  # restored
  assert jax.numpy.asarray(1.0).dtype == np.float32

  # The release's optimizer: Adam, lr 1e-4, PyTorch's b1, b2, eps; no clipping
  # (state.make_optimizer builds it from these fields).
  adam = out["adam"]
  assert (adam["learning_rate"], adam["b1"], adam["b2"], adam["eps"]) == (1e-4, 0.9, 0.999, 1e-8)
  assert adam["grad_clip_norm"] == 0.0 and adam["schedule"] == "plateau"

  # (a) The loss. Measured: 2.9e-16 relative.
  assert out["loss_dtype"] == "float64"
  assert abs(out["loss"] - float(ref["loss"])) <= 1e-10 * float(ref["loss"])

  # Every parameter is compared, paired by the converter (checked by the psum fingerprints).
  errors = out["errors"]
  assert out["unchecked_leaves"] == []
  n_matrix = len([k for k in ref.files if k.startswith("gnorm/")])
  n_vector = len([k for k in ref.files if k.startswith("grad/")])
  assert (n_matrix, n_vector) == (173, 326)  # all 499 parameters of the release
  assert len(errors["gnorm"]) == n_matrix and len(errors["grad_abs"]) == n_vector
  assert max(errors["psum"].values()) <= 1e-12  # measured 1.7e-15

  # Rank 2 and 4 (conv, transposed-conv, linear kernels): norm and projection. Float64 end to
  # end, the final conv and the loss included. Measured: at most 7.5e-15 (norm) and 1.3e-13
  # (projection, relative to the norm); the former float32 final conv alone gave 4.5e-8, so a
  # float32 cast anywhere on the path fails this.
  for kind in ("gnorm", "gdot"):
    worst = max(errors[kind].items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-9, (kind, worst)

  # Rank 1 (biases, BatchNorm scales and offsets), in full, every one computed in float64
  # (layers.add_bias reduces a bias gradient in float32 only under 16-bit compute). Measured:
  # at most 1.1e-13 relative (L2), 3.3e-15 of the largest rank-1 gradient absolutely.
  assert out["float32_grad_leaves"] == [], out["float32_grad_leaves"]
  worst_rel = max(errors["grad_rel"].items(), key=lambda kv: kv[1])
  worst_abs = max(errors["grad_abs"].items(), key=lambda kv: kv[1])
  assert len(errors["grad_rel"]) > 150
  assert worst_rel[1] <= 1e-9, worst_rel
  assert worst_abs[1] <= 1e-9, worst_abs

  # (b) steps.make_train_step, four calls on the same batch: the losses before and after each
  # of three Adam steps. Measured: at most 3.7e-12 relative (the README expects ~1e-6).
  assert out["finite"] == [True] * 4
  assert out["step_loss_dtype"] == "float64" and out["param_dtypes"] == ["float64"]
  np.testing.assert_allclose(out["step_losses"], ref["adam_losses"], rtol=1e-8, atol=0)
  # The step's gradient is (a)'s: its global norm is the release's, from the fingerprints.
  # Measured: 7.5e-12 relative.
  release_norm = np.sqrt(sum(float(ref[k]) ** 2 for k in ref.files if k.startswith("gnorm/"))
                         + sum(float(np.sum(ref[k] ** 2)) for k in ref.files
                               if k.startswith("grad/")))
  assert abs(out["first_grad_norm"] - release_norm) <= 1e-9 * release_norm
