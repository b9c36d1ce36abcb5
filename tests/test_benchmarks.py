"""The benchmark suite (benchmarks.run, benchmarks.train_step): the entry point end to end at a
tiny size, the scaling subprocesses, the report arithmetic, the largest-batch search, and that
bfloat16 and remat variants of a train step agree with the float32 one. No timing assertions."""
import json
import math

from absl import app
from absl import flags
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import run as run_lib
from benchmarks import train_step as step_lib
from cmmp_jax import sharding
from cmmp_jax import state as state_lib

# The cheapest model to compile (one branch, one block per layer): the suite's logic does not
# depend on which model it times.
TINY = ["--config.model.name=image_only", "--config.model.width=0.125",
        "--config.model.depths=(1,1,1,1)", "--size=64", "--batch=2", "--steps=2", "--warmup=1"]
TINY_SPEC = step_lib.StepSpec(model="image_only", width=0.125, depths=(1, 1, 1, 1), size=64,
                              batch=2, upsample_method="subpixel")  # the config's 'auto' on CPU


def _command_line(*args):
  """benchmarks.run's command line `prog ARGS`, parsed on a fresh FlagValues as the program
  parses it: (spec, options)."""
  argv = ["benchmarks.run", *args]
  flag_values = flags.FlagValues()
  run_lib.define_flags(flag_values, argv)
  flag_values(argv)
  return step_lib.spec_from_flags(flag_values), run_lib.options_from_flags(flag_values, argv)


def _positive_finite(value, name):
  assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)


@pytest.mark.slow
def test_entry_point_runs_end_to_end_and_writes_the_report(tmp_path):
  path = tmp_path / "report.json"
  spec, options = _command_line(
      *TINY, "--sections=train,eval,pipeline,render,scaling", f"--json={path}",
      "--pipeline_workers=0", "--pipeline_examples=4",
      "--render_points=20000", "--render_tiles=4", "--render_size=64",
      "--scaling_devices=2", "--scaling_batch=2")
  assert spec == TINY_SPEC
  returned = run_lib.run(spec, options)
  report = json.loads(path.read_text())
  assert set(report) == {"meta", "train", "eval", "pipeline", "render", "scaling"}
  assert report["meta"]["spec"] == returned["meta"]["spec"]
  meta = report["meta"]
  assert meta["device_count"] == jax.device_count() and meta["platform"] == "cpu"
  assert meta["jax_version"] == jax.__version__
  assert (meta["size"], meta["batch"], meta["dtype"], meta["model"]) == (
      64, 2, "float32", "image_only")
  assert meta["peak"]["source"] == "measured"  # a CPU is not in PEAK_TABLE
  for key in ("fp32_flops", "bf16_flops", "bytes_per_s"):
    _positive_finite(meta["peak"][key], key)
  for section in ("train", "eval"):
    result = report[section]
    assert result["steps_timed"] == 2
    for key in ("images_per_s", "ms_per_step", "flops_per_image", "bytes_accessed_per_image",
                "arithmetic_intensity", "mfu", "bandwidth_utilisation", "compute_bound_ms",
                "memory_bound_ms", "compile_s"):
      _positive_finite(result[key], f"{section}.{key}")
    assert result["images_per_s"] == pytest.approx(2 / (result["ms_per_step"] / 1e3))
    assert result["mfu"] < 1.5  # not a timing claim: catches FLOPs counted per step vs image
    _positive_finite(result["memory"]["total_bytes"], f"{section}.memory")
    assert result["device_peak_bytes"] is None  # the CPU runtime keeps no statistics
  # A train step (forward + backward + Adam) costs more than the forward alone.
  assert report["train"]["flops_per_image"] > 2 * report["eval"]["flops_per_image"]
  assert report["train"]["memory"]["alias_bytes"] > 0  # the state is donated
  assert report["pipeline"]["results"][0]["workers"] == 0
  _positive_finite(report["pipeline"]["results"][0]["examples_per_s"], "pipeline")
  assert report["render"]["points"] == 20000 and report["render"]["naive_equal"] is True
  _positive_finite(report["render"]["bulk_points_per_second"], "render")
  scaling = report["scaling"]
  # Two simulated devices only (one more compilation in a subprocess; the train section is the
  # same step on this process's single device).
  (row,) = scaling["simulated_cpu"]
  assert (row["devices"], row["global_batch"], row["per_device_batch"]) == (2, 2, 1)
  _positive_finite(row["images_per_s"], "scaling.images_per_s")
  assert row["nonfinite_steps"] == 0 and row["relative_to_1_device"] is None
  # Each of the 2 devices runs half the batch: its program has about half the FLOPs.
  ratio = row["flops_per_step_per_device"] / report["train"]["flops_per_step_per_device"]
  assert 0.4 < ratio < 0.8
  assert scaling["real"] is None
  table = run_lib.format_report(report)
  assert "render: 20,000 points" in table and "simulated CPU devices" in table


def test_speed_report_arithmetic():
  peak = step_lib.DevicePeak("test", bf16_flops=2e10, fp32_flops=1e10, bytes_per_s=1e10,
                             source="table")
  r = step_lib.speed_report([0.3, 0.1, 0.2], batch=4, flops=1e9, bytes_accessed=5e8,
                            num_devices=2, peak=peak, dtype="float32")
  assert r["ms_per_step"] == pytest.approx(200.0)
  assert r["images_per_s"] == pytest.approx(20.0)
  assert r["flops_per_image"] == pytest.approx(5e8)  # 1e9 per device x 2 devices / 4 images
  assert r["arithmetic_intensity"] == pytest.approx(2.0)
  assert r["mfu"] == pytest.approx(0.5)  # 1e9 / 0.2 s / 1e10
  assert r["bandwidth_utilisation"] == pytest.approx(0.25)
  assert (r["compute_bound_ms"], r["memory_bound_ms"]) == pytest.approx((100.0, 50.0))
  bf16 = step_lib.speed_report([0.2], 4, 1e9, 5e8, 2, peak, "bfloat16", model_flops=5e8)
  assert bf16["mfu"] == pytest.approx(0.125) and bf16["hfu"] == pytest.approx(0.25)
  unknown = step_lib.speed_report([0.2], 4, 1e9, 5e8, 1, None, "float32")
  assert unknown["mfu"] is None and unknown["images_per_s"] == pytest.approx(20.0)


def test_peak_table_matches_device_kinds():
  assert step_lib.table_peak("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
  assert step_lib.table_peak("NVIDIA H100 PCIe").name == "NVIDIA H100 PCIe"
  assert step_lib.table_peak("NVIDIA H200").bytes_per_s == 4.8e12
  assert step_lib.table_peak("NVIDIA A100-SXM4-80GB").name == "NVIDIA A100 SXM 80GB"
  assert step_lib.table_peak("TPU v5 lite").name == "TPU v5e"
  assert step_lib.table_peak("TPU v5").name == "TPU v5p"
  assert step_lib.table_peak("TPU v4").bf16_flops == 275e12
  assert step_lib.table_peak("cpu") is None
  for _, peak in step_lib.PEAK_TABLE:
    assert peak.bf16_flops >= peak.fp32_flops > 0 and peak.bytes_per_s > 0


def test_search_max_batch_doubles_then_bisects():
  best, tried = step_lib.search_max_batch(lambda b: b <= 13, start=1, cap=64)
  assert best == 13
  assert tried == [(1, True), (2, True), (4, True), (8, True), (16, False), (12, True),
                   (14, False), (13, True)]
  assert step_lib.search_max_batch(lambda b: b <= 13, start=2, cap=64, multiple=2)[0] == 12
  best, tried = step_lib.search_max_batch(lambda b: True, start=3, cap=10, multiple=4)
  assert best == 8 and tried == [(4, True), (8, True)]  # the cap, rounded to the multiple
  assert step_lib.search_max_batch(lambda b: False, start=2, cap=8) == (0, [(2, False)])
  with pytest.raises(step_lib.BenchmarkError, match="cap 1 is below"):
    step_lib.search_max_batch(lambda b: True, start=2, cap=1)


def test_the_model_comes_from_the_config_with_cpu_defaults_without_a_size():
  # upsample_method: configs/default.py's 'auto', which is 'subpixel' on this CPU.
  small = step_lib.StepSpec(model="cmmpnet", width=0.25, depths=(1, 1, 1, 1), size=128, batch=2,
                            upsample_method="subpixel")
  assert _command_line()[0] == small  # this CPU, no --size: CPU_DEFAULTS
  # Overrides on the command line still apply; presets and other model fields come along.
  spec, _ = _command_line("--config=configs/bjroad.py:resunet,bf16", "--config.model.width=0.5",
                          "--config.model.spp_levels=(1,2)", "--batch=4")
  assert spec == small.replace(width=0.5, dtype="bfloat16", batch=4, model_extras=(
      ("backbone", "resunet"), ("spp_levels", (1, 2))))
  assert spec.config().model.backbone == "resunet" and spec.config().batch_size == 4
  # With --size, the config's model as it is (here the full ResNet-34 widths and depths).
  assert _command_line("--size=256")[0] == step_lib.StepSpec(width=1.0, depths=(3, 4, 6, 3),
                                                             size=256, upsample_method="subpixel")
  # The scaling subprocesses get a spec as flags: they parse back to the same spec.
  assert _command_line(*spec.flags())[0] == spec


def test_fullsize_section_measures_the_configs_model_beside_the_cpu_stand_in():
  # On this CPU without --size the main sections run the small stand-in; the fullsize section
  # the config's own model (width, depths, overrides) at 2 x 256 x 256 in float32.
  spec, options = _command_line("--config=configs/default.py:bf16", "--config.model.width=0.5")
  assert spec.width == 0.5 and spec.depths == (1, 1, 1, 1) and spec.size == 128
  assert options.full_spec == step_lib.StepSpec(width=0.5, depths=(3, 4, 6, 3), size=256,
                                                batch=2, upsample_method="subpixel")
  _, options = _command_line("--fullsize_size=512", "--fullsize_batch=4")
  assert (options.full_spec.size, options.full_spec.batch, options.full_spec.width) == (
      512, 4, 1.0)
  # Already the config's model at that size: nothing to add (no compile, one skip line).
  spec, options = _command_line("--size=256", "--batch=2")
  section = run_lib.fullsize_section(spec, options, peak=None)
  assert "already measured" in section["skipped"]
  assert run_lib.format_fullsize(section) == [f"fullsize: skipped ({section['skipped']})"]
  assert _command_line("--sections=train")[1].full_spec is None


def test_scaling_environment_replaces_only_the_device_count():
  env = run_lib.simulated_cpu_env(4, {"XLA_FLAGS": "--xla_cpu_foo=1 "
                                      "--xla_force_host_platform_device_count=2", "HOME": "/h"})
  assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/h"


def test_bad_arguments_and_files_raise_clear_errors(tmp_path):
  with pytest.raises(app.UsageError, match=r"--sections: unknown \['warp'\]"):
    _command_line("--sections=train,warp")
  with pytest.raises(app.UsageError, match="--scaling_batch 6 is not divisible by device "
                     r"counts \[4\]"):
    _command_line("--sections=scaling", "--scaling_devices=1,4", "--scaling_batch=6")
  with pytest.raises(flags.IllegalFlagValueError, match="--steps"):
    _command_line("--steps=0")
  with pytest.raises(app.UsageError, match="multiple of 32"):
    _command_line("--size=70")
  with pytest.raises(app.UsageError, match="config.model.dtype"):
    _command_line("--config.model.dtype=float16")
  with pytest.raises(step_lib.BenchmarkError, match="multiple of 32"):
    TINY_SPEC.replace(size=70).config()
  with pytest.raises(step_lib.BenchmarkError, match="does not exist"):
    step_lib.load_variables(tmp_path / "missing.npz")
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"not a zip file")
  with pytest.raises(step_lib.BenchmarkError, match="corrupt.npz"):
    step_lib.load_variables(corrupt)
  wrong = tmp_path / "wrong.npz"
  step_lib.save_variables(wrong, {"params": {"dense": {"kernel": np.zeros((2, 2), np.float32)}}})
  with pytest.raises(step_lib.BenchmarkError, match="do not match model 'image_only'"):
    step_lib.measure_train(TINY_SPEC, steps=1, variables=step_lib.load_variables(wrong))


def _one_step(spec, variables, batch_np):
  """(compiled train step, new state, metrics) of one donated step from `variables`."""
  mesh = step_lib.make_mesh()
  model, state = step_lib.make_state(spec, variables, mesh)
  batch = sharding.to_global_batch(batch_np, mesh)
  compiled = step_lib.make_train_fn(model, spec.config(), mesh).lower(state, batch).compile()
  new_state, metrics = compiled(state, batch)
  return compiled, jax.device_get(new_state), jax.device_get(metrics)


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def _he_normal_variables(spec, seed=0):
  """Variables of spec's model without compiling its initialiser (seconds on a CPU): shapes
  from state.abstract_variables, kernels He-normal, BatchNorm scales and variances 1, biases
  and means 0."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(
      flax.core.unfreeze(state_lib.abstract_variables(spec.config(), size=spec.size)))
  values = {}
  for path, leaf in flat.items():
    if path[-1] == "kernel":
      values[path] = rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif path[-1] in ("scale", "var"):
      values[path] = np.ones(leaf.shape)
    else:
      values[path] = np.zeros(leaf.shape)
  return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in values.items()})


@pytest.mark.slow
def test_bfloat16_step_agrees_and_remat_step_matches_float32():
  """One test, so that the float32 step is compiled once per run."""
  variables = _he_normal_variables(TINY_SPEC)
  batch = step_lib.synthetic_batch(2, 64, seed=3)
  compiled32, state32, metrics32 = _one_step(TINY_SPEC, variables, batch)
  assert bool(metrics32["finite"])

  # bfloat16 compute: the same loss, BatchNorm statistics and update directions to bfloat16
  # precision. (Not the gradient norm: it is dominated by the final conv's bias gradient, a sum
  # over every pixel of the batch that XLA:CPU accumulates in bfloat16; see benchmarks/NOTES.md.)
  _, state16, metrics16 = _one_step(TINY_SPEC.replace(dtype="bfloat16"), variables, batch)
  assert bool(metrics16["finite"])
  np.testing.assert_allclose(metrics16["loss"], metrics32["loss"], rtol=2e-2)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state16.params))
  for a, b in zip(_leaves(state16.batch_stats), _leaves(state32.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=2e-2)
  before = _leaves(variables["params"])
  delta16 = np.concatenate([(a - p).ravel() for a, p in zip(_leaves(state16.params), before)])
  delta32 = np.concatenate([(a - p).ravel() for a, p in zip(_leaves(state32.params), before)])
  # Adam's first step moves every parameter by about lr * sign(gradient), so agreement means the
  # same signs: all but parameters whose gradient is at rounding level (random signs: 50%).
  assert np.abs(delta32).max() > 0
  same_sign = np.mean(np.sign(delta16) == np.sign(delta32))
  assert same_sign > 0.75, same_sign

  # remat: more FLOPs (recomputation) and other buffers, the same step to float32 rounding.
  compiled_remat, state_remat, metrics_remat = _one_step(TINY_SPEC.replace(remat=True),
                                                         variables, batch)
  assert (step_lib.compiled_cost(compiled_remat)["flops"]
          > 1.02 * step_lib.compiled_cost(compiled32)["flops"])
  np.testing.assert_allclose(metrics_remat["loss"], metrics32["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_remat["grad_norm"], metrics32["grad_norm"], rtol=1e-5)
  for a, b in zip(_leaves(state_remat.params), _leaves(state32.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(_leaves(state_remat.batch_stats), _leaves(state32.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model,most", [("image_only", 0.5), ("cmmpnet", 0.35)])
def test_remat_shrinks_what_the_backward_keeps(model, most):
  """residual_bytes: the activations jax keeps for the backward pass (abstract evaluation, no
  compile). remat (stem, blocks, DEMs) keeps only their inputs: at 256 px, CMMPNet keeps under
  35 % of what it keeps without remat; image_only, without DEMs, under half."""
  spec = step_lib.StepSpec(model=model, width=0.25, depths=(2, 2, 2, 2), size=256, batch=1)
  plain = step_lib.residual_bytes(spec)
  remat = step_lib.residual_bytes(spec.replace(remat=True))
  assert 0 < remat["activation_bytes"] < most * plain["activation_bytes"]
  assert remat["residual_bytes"] < plain["residual_bytes"]
