"""Speed, XLA cost and memory of the jitted train step and evaluation (forward) step.

  python -m benchmarks.train_step [--config=configs/default.py[:presets] --config.model.width=0.25
      --config.model.depths='(1,1,1,1)' --config.model.dtype=bfloat16 --size=128 --batch=2
      --steps=20 --warmup=2 --sections=train,eval --no_donate --variables=PATH --json=PATH]

The model is --config's (config.model with its presets and overrides; the optimizer and loss are
configs/default.py's). Without --size: 1024 px, or on a CPU-only machine 128 px with a small
model (CPU_DEFAULTS; --config.model.width / depths on the command line still apply).

The steps measured are exactly `cmmp_jax.steps.make_train_step` / `make_eval_step` on a mesh of
all visible devices (data parallel, global batch sharded on 'data'), fed one synthetic batch in
the pipeline's layout (image float32 (B, S, S, 3) and aux float32 (B, S, S, C) scaled to
[-1.6, 1.6], mask float32 (B, S, S, 1) in {0, 1}). The input pipeline is timed separately
(benchmarks.pipeline).

Per step it reports the median of `steps` timings after `warmup` untimed calls, each call ended by
`jax.block_until_ready`; XLA's cost analysis of the compiled program ('flops', 'bytes accessed');
model FLOPs utilisation against the device's peak (`PEAK_TABLE`, or a measured matmul and copy
when the device is not in the table, e.g. a CPU); the compiled program's memory (arguments,
outputs, temporaries, donated aliases) and the device's peak memory when the runtime reports it.

XLA's counts: a multiply-add is 2 FLOPs; a transposed convolution written as a convolution of
the zero-dilated input (model.upsample_method 'dilated') is counted without the multiplications
by the inserted zeros, i.e. as useful work, although a CPU executes them (benchmarks/NOTES.md);
'bytes accessed' sums operand and result bytes of every (fused) HLO, a proxy for memory traffic
that ignores caches. Numbers are per device program; per-step totals multiply by the device count.

`benchmarks.run` calls this module in-process, and as a subprocess for its scaling section
(XLA_FLAGS=--xla_force_host_platform_device_count=N), handing it the parameters in a .npz file
(--variables) so that every device count trains the same weights and skips initialisation.
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
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from cmmp_jax import config_checks, convert, models, sharding
from cmmp_jax import state as state_lib
from cmmp_jax import steps as step_fns
from configs import default as default_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.py"
# Without --size on a CPU-only machine: a model and input side that run in minutes.
CPU_DEFAULTS = dict(size=128, width=0.25, depths=(1, 1, 1, 1))
SECTIONS = ("train", "eval")
# Substrings of an XLA runtime error that mean the program did not fit in device memory.
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


class BenchmarkError(RuntimeError):
  """A benchmark could not run as asked (bad arguments, mismatched variables, failed run)."""


# ----------------------------------------------------------------------------- device peaks

@dataclasses.dataclass(frozen=True)
class DevicePeak:
  """Peak dense throughput and memory bandwidth of ONE JAX device.

  bf16_flops / fp32_flops: FLOP/s for bfloat16 and float32 convolutions and matmuls at JAX's
  default precision (NVIDIA Ampere and later: float32 runs on TF32 tensor cores; TPU: float32
  runs as one bfloat16 pass, so the two columns are equal). bytes_per_s: main-memory (HBM)
  bandwidth. source: 'table' (vendor data sheet, dense, no sparsity) or 'measured'.
  """
  name: str
  bf16_flops: float
  fp32_flops: float
  bytes_per_s: float
  source: str

  def flops(self, dtype: str) -> float:
    return self.bf16_flops if dtype == "bfloat16" else self.fp32_flops


# (lower-case substring of device.device_kind, peak). First match wins, so specific names first.
# Per JAX device: a GPU, a TPU v4/v5/v6 chip (one device per chip), a TPU v3 core (two per chip).
PEAK_TABLE: tuple[tuple[str, DevicePeak], ...] = (
    ("h200", DevicePeak("NVIDIA H200", 989.4e12, 494.7e12, 4.8e12, "table")),
    ("h100 pcie", DevicePeak("NVIDIA H100 PCIe", 756.0e12, 378.0e12, 2.0e12, "table")),
    ("h100", DevicePeak("NVIDIA H100 SXM", 989.4e12, 494.7e12, 3.35e12, "table")),
    ("a100-sxm4-80gb", DevicePeak("NVIDIA A100 SXM 80GB", 312e12, 156e12, 2.039e12, "table")),
    ("a100-pcie-80gb", DevicePeak("NVIDIA A100 PCIe 80GB", 312e12, 156e12, 1.935e12, "table")),
    ("a100", DevicePeak("NVIDIA A100 40GB", 312e12, 156e12, 1.555e12, "table")),
    ("l4", DevicePeak("NVIDIA L4", 121e12, 60e12, 0.3e12, "table")),
    ("tpu v6", DevicePeak("TPU v6e", 918e12, 918e12, 1.64e12, "table")),
    ("tpu v5 lite", DevicePeak("TPU v5e", 197e12, 197e12, 0.819e12, "table")),
    ("tpu v5e", DevicePeak("TPU v5e", 197e12, 197e12, 0.819e12, "table")),
    ("tpu v5", DevicePeak("TPU v5p", 459e12, 459e12, 2.765e12, "table")),
    ("tpu v4", DevicePeak("TPU v4", 275e12, 275e12, 1.2e12, "table")),
    ("tpu v3", DevicePeak("TPU v3 (per core)", 61.5e12, 61.5e12, 0.45e12, "table")),
)


def table_peak(device_kind: str) -> DevicePeak | None:
  """The PEAK_TABLE entry whose key is a substring of device_kind (case-insensitive), or None."""
  kind = device_kind.lower()
  for key, peak in PEAK_TABLE:
    if key in kind:
      return peak
  return None


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def measure_peak(device: jax.Device | None = None, *, matmul_size: int = 2048,
                 copy_mib: int = 256, repeats: int = 5) -> DevicePeak:
  """Measures a device's attainable peak: the best of `repeats` (n x n) @ (n x n) matmuls in
  float32 and bfloat16 (2 n^3 FLOPs each) and of an elementwise `x * 2 + 1` over `copy_mib` MiB
  of float32 (reads and writes that many bytes). On a shared machine other load lowers it."""
  device = device or jax.devices()[0]
  flops = {}
  for dtype in ("float32", "bfloat16"):
    a = jax.device_put(jnp.ones((matmul_size, matmul_size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    flops[dtype] = 2 * matmul_size ** 3 / _best_seconds(functools.partial(matmul, a), repeats)
    del a
  # The input is donated and the output fed back: a fresh output buffer every call would time
  # the operating system's page faults (about 10x slower than the memory on a CPU), not memory.
  stream = jax.jit(lambda v: v * 2 + 1, donate_argnums=0)
  holder = [jax.device_put(jnp.ones((copy_mib * 2 ** 18,), jnp.float32), device)]
  num_bytes = holder[0].nbytes

  def stream_once():
    holder[0] = stream(holder[0])
    return holder[0]

  bandwidth = 2 * num_bytes / _best_seconds(stream_once, repeats)
  del holder
  return DevicePeak(f"{device.device_kind} (measured)", flops["bfloat16"], flops["float32"],
                    bandwidth, "measured")


def device_peak(device: jax.Device | None = None, *, measure_if_unknown: bool = True
                ) -> DevicePeak | None:
  """PEAK_TABLE's entry for the device, else a measured one (or None when not measuring)."""
  device = device or jax.devices()[0]
  peak = table_peak(device.device_kind)
  if peak is None and measure_if_unknown:
    peak = measure_peak(device)
  return peak


# ----------------------------------------------------------------------------- what is measured

@dataclasses.dataclass(frozen=True)
class StepSpec:
  """One model configuration and input size to benchmark (fields of config.model plus sizes).

  size: square input side in pixels (a multiple of 32); batch: GLOBAL batch (all devices).
  model_extras: the other config.model fields where they differ from configs/default.py, as
  sorted (field, value) pairs, e.g. (('backbone', 'resunet'),).
  """
  model: str = "cmmpnet"
  width: float = 0.25
  depths: tuple[int, ...] = (1, 1, 1, 1)
  dtype: str = "float32"
  upsample_method: str = "dilated"
  remat: bool = False
  aux_channels: int = 1
  size: int = 128
  batch: int = 2
  model_extras: tuple[tuple[str, Any], ...] = ()

  def model_fields(self) -> dict[str, Any]:
    """The config.model fields this spec sets."""
    return {**dict(self.model_extras), "name": self.model, "width": float(self.width),
            "depths": tuple(int(d) for d in self.depths), "dtype": self.dtype,
            "upsample_method": self.upsample_method, "remat": bool(self.remat),
            "aux_channels": int(self.aux_channels)}

  def config(self) -> ml_collections.ConfigDict:
    """configs/default.py with these model fields and batch, validated."""
    if self.size <= 0 or self.size % 32:
      raise BenchmarkError(f"size must be a positive multiple of 32, got {self.size}")
    if self.batch <= 0:
      raise BenchmarkError(f"batch must be positive, got {self.batch}")
    config = default_config.get_config()
    config.update_from_flattened_dict({
        **{f"model.{k}": v for k, v in self.model_fields().items()},
        "batch_size": int(self.batch), "eval_batch_size": int(self.batch)})
    config_checks.validate(config)
    return config

  def flags(self) -> list[str]:
    """The command-line flags of benchmarks.train_step that describe this spec."""
    return ([f"--config={DEFAULT_CONFIG}"]
            + [f"--config.model.{k}={v}" for k, v in self.model_fields().items()]
            + [f"--size={self.size}", f"--batch={self.batch}"])

  def replace(self, **fields) -> StepSpec:
    return dataclasses.replace(self, **fields)

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out["depths"] = list(self.depths)
    out["model_extras"] = {k: list(v) if isinstance(v, tuple) else v
                           for k, v in self.model_extras}
    return out


def synthetic_batch(batch: int, size: int, aux_channels: int = 1, *, seed: int = 0,
                    with_valid: bool = False) -> dict[str, np.ndarray]:
  """A batch in the pipeline's layout: 'image' float32 (B, S, S, 3) and 'aux' float32
  (B, S, S, C) uniform in [-1.6, 1.6] (the reference scaling), 'mask' float32 (B, S, S, 1) with
  ~10% road pixels; with_valid adds 'valid' bool (B,) all True (evaluation batches)."""
  rng = np.random.default_rng(seed)
  out = {"image": rng.uniform(-1.6, 1.6, (batch, size, size, 3)).astype(np.float32),
         "aux": rng.uniform(-1.6, 1.6, (batch, size, size, aux_channels)).astype(np.float32),
         "mask": (rng.uniform(size=(batch, size, size, 1)) < 0.1).astype(np.float32)}
  if with_valid:
    out["valid"] = np.ones((batch,), bool)
  return out


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """The training mesh over all devices, or over the first num_devices devices."""
  if num_devices is None:
    return sharding.make_mesh()
  if not 0 < num_devices <= jax.device_count():
    raise BenchmarkError(f"asked for {num_devices} devices; {jax.device_count()} are visible")
  return sharding.make_mesh(jax.devices()[:num_devices])


def initial_variables(spec: StepSpec) -> dict:
  """Host (numpy) {'params', 'batch_stats'} of a fresh model, via state.init_state (the seeded
  random init of training). Parameters do not depend on dtype, remat or upsample_method, so one
  set serves every variant of a model, width, depths and aux_channels."""
  config = spec.config()
  # Initialised on 64 px inputs whatever spec.size: the values are the same (they depend on the
  # seed and the shapes of the parameters only), and initialising at 1024 px would compile (and
  # on a GPU autotune) a full-size forward pass for nothing.
  shape = (1, 64, 64)
  _, state = state_lib.init_state(config, (*shape, 3), (*shape, spec.aux_channels))
  return jax.device_get({"params": flax.core.unfreeze(state.params),
                         "batch_stats": flax.core.unfreeze(state.batch_stats)})


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
  """Writes variables to a .npz of '/'-joined paths (e.g. 'params/image/stem/conv/kernel')."""
  flat = traverse_util.flatten_dict(variables, sep="/")
  np.savez(path, **{key: np.asarray(value) for key, value in flat.items()})


def load_variables(path: str | os.PathLike) -> dict:
  """Reads save_variables' file back into nested dicts of numpy arrays."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise BenchmarkError(f"variables file {path} does not exist")
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as error:
    raise BenchmarkError(f"variables file {path} is not a readable .npz: {error}") from error
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise BenchmarkError(f"variables file {path} holds one array, not save_variables' .npz")
  with data:
    try:
      flat = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as error:
      raise BenchmarkError(f"variables file {path} is corrupt: {error}") from error
  return traverse_util.unflatten_dict(flat, sep="/")


def _check_variables(spec: StepSpec, variables: Mapping[str, Any]) -> None:
  """Raises BenchmarkError when variables' shapes differ from spec's model."""
  try:
    convert.check_variables_match(
        variables, flax.core.unfreeze(state_lib.abstract_variables(spec.config(), size=64)),
        source="variables")
  except convert.ConversionError as error:
    raise BenchmarkError(
        f"variables do not match model {spec.model!r} width {spec.width} depths {spec.depths} "
        f"aux_channels {spec.aux_channels}: {error}") from error


def make_state(spec: StepSpec, variables: Mapping[str, Any],
               mesh) -> tuple[Any, state_lib.TrainState]:
  """(model, TrainState) from host variables, replicated over mesh."""
  config = spec.config()
  model, state = state_lib.create_state(config, jax.tree.map(np.asarray, dict(variables)))
  return model, sharding.put_replicated(state, mesh)


def make_train_fn(model, config, mesh, *, donate: bool = True):
  """steps.make_train_step; donate=False re-jits the same step function with the same shardings
  and no donated state (make_train_step always donates; jax.jit keeps the wrapped function as
  __wrapped__)."""
  step = step_fns.make_train_step(model, config, mesh)
  if donate:
    return step
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step.__wrapped__, in_shardings=(rep, {k: data for k in ("image", "aux", "mask")}),
                 out_shardings=(rep, rep))


# ----------------------------------------------------------------------------- analysis helpers

def compiled_cost(compiled) -> dict[str, float]:
  """{'flops', 'bytes_accessed'} of one device's program from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per program
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {"flops": float(analysis.get("flops", float("nan"))),
          "bytes_accessed": float(analysis.get("bytes accessed", float("nan")))}


def compiled_memory(compiled) -> dict[str, int | None]:
  """Bytes of one device's compiled program: arguments, outputs, temporaries, donated aliases,
  and their total (arguments + outputs + temporaries - aliases: what the program holds at once
  at worst). None values where the backend gives no analysis."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {k: None for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
                              "total_bytes")}
  out = {"argument_bytes": int(stats.argument_size_in_bytes),
         "output_bytes": int(stats.output_size_in_bytes),
         "temp_bytes": int(stats.temp_size_in_bytes),
         "alias_bytes": int(stats.alias_size_in_bytes)}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out


def residual_bytes(spec: StepSpec, batch_size: int | None = None) -> dict[str, int]:
  """What the backward pass keeps from the forward, per the program JAX builds (before XLA):
  the residuals of `jax.vjp` of the training loss, by abstract evaluation (no compute, any
  backend). 'residual_bytes' counts them all (parameters included, since the backward needs
  them too); 'activation_bytes' leaves out the parameters and the input batch. This is what
  remat changes; how much of it a compiled program holds at its peak depends on the backend's
  scheduler (XLA:CPU re-orders recomputation so that its temporaries do not shrink, see
  NOTES.md C3)."""
  batch_size = batch_size or spec.batch
  config = spec.config()
  variables = state_lib.abstract_variables(config, spec.size)
  model = state_lib.model_from_config(config)
  loss_fn = step_fns.make_loss_fn(model, config)
  batch = {k: jax.ShapeDtypeStruct((batch_size, spec.size, spec.size, c), jnp.float32)
           for k, c in (("image", 3), ("aux", spec.aux_channels), ("mask", 1))}

  def backward_closure(params, batch_stats, batch):
    return jax.vjp(lambda p: loss_fn(p, batch_stats, batch), params, has_aux=True)[1]

  residuals = jax.eval_shape(backward_closure, variables["params"],
                             variables.get("batch_stats", {}), batch)
  nbytes = lambda tree: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                            for x in jax.tree_util.tree_leaves(tree))
  total = nbytes(residuals)
  return {"residual_bytes": total,
          "activation_bytes": max(total - nbytes(variables["params"]) - nbytes(batch), 0)}


def device_memory_peak(devices: Sequence[jax.Device]) -> int | None:
  """Largest 'peak_bytes_in_use' over devices since the process started, or None when the
  runtime keeps no statistics (the CPU backend)."""
  peaks = []
  for device in devices:
    stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def device_memory_limit(devices: Sequence[jax.Device]) -> int | None:
  limits = [int(s["bytes_limit"]) for s in (d.memory_stats() for d in devices)
            if s and "bytes_limit" in s]
  return min(limits) if limits else None


def is_out_of_memory(error: BaseException) -> bool:
  return any(marker in str(error) for marker in _OOM_MARKERS)


def timed_calls(call: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` calls after `warmup` untimed ones; every call is waited for
  with jax.block_until_ready, so a time is the device's, not the dispatch's."""
  if steps < 1 or warmup < 0:
    raise BenchmarkError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
  for _ in range(warmup):
    jax.block_until_ready(call())
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    seconds.append(time.perf_counter() - start)
  return seconds


def speed_report(seconds: Sequence[float], batch: int, flops: float, bytes_accessed: float,
                 num_devices: int, peak: DevicePeak | None, dtype: str,
                 model_flops: float | None = None) -> dict[str, Any]:
  """Throughput, roofline and utilisation numbers of a step.

  flops, bytes_accessed: one device's program per step (XLA); model_flops: the useful FLOPs of
  that program when they differ from what runs (remat recomputation), else None = flops.
  """
  median = statistics.median(seconds)
  model_flops = flops if model_flops is None else model_flops
  report = {
      "steps_timed": len(seconds), "ms_per_step": 1e3 * median,
      "ms_per_step_min": 1e3 * min(seconds), "ms_per_step_max": 1e3 * max(seconds),
      "images_per_s": batch / median,
      "flops_per_step_per_device": flops, "model_flops_per_step_per_device": model_flops,
      "flops_per_image": model_flops * num_devices / batch,
      "bytes_accessed_per_step_per_device": bytes_accessed,
      "bytes_accessed_per_image": bytes_accessed * num_devices / batch,
      "arithmetic_intensity": flops / bytes_accessed if bytes_accessed > 0 else float("nan"),
      "achieved_flops_per_s_per_device": flops / median,
      "achieved_bytes_per_s_per_device": bytes_accessed / median,
      "mfu": None, "hfu": None, "bandwidth_utilisation": None, "compute_bound_ms": None,
      "memory_bound_ms": None, "ridge_intensity": None,
  }
  if peak is not None:
    peak_flops = peak.flops(dtype)
    report.update(
        mfu=model_flops / median / peak_flops, hfu=flops / median / peak_flops,
        bandwidth_utilisation=bytes_accessed / median / peak.bytes_per_s,
        compute_bound_ms=1e3 * flops / peak_flops,
        memory_bound_ms=1e3 * bytes_accessed / peak.bytes_per_s,
        ridge_intensity=peak_flops / peak.bytes_per_s)
  return report


# ----------------------------------------------------------------------------- measurements

def _prepare(spec: StepSpec, variables, mesh):
  mesh = mesh or make_mesh()
  if spec.batch % mesh.size:
    raise BenchmarkError(f"global batch {spec.batch} is not divisible by the {mesh.size} devices")
  if variables is None:
    variables = initial_variables(spec)
  else:
    _check_variables(spec, variables)
  model, state = make_state(spec, variables, mesh)
  return mesh, model, state


def _lowered_flops(lowered) -> float:
  analysis = lowered.cost_analysis() or {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float(analysis.get("flops", float("nan")))


def _model_flops_without_remat(spec: StepSpec, lowered_remat, compiled_flops: float, state,
                               batch, mesh, donate: bool) -> float:
  """Per-device useful FLOPs of a remat step: its compiled FLOPs scaled by the ratio of the
  lowered (unoptimised) programs' FLOPs without and with remat. Tracing only, no second
  compilation; the ratio cancels what XLA's optimisations change in both."""
  config = spec.replace(remat=False).config()
  model = state_lib.model_from_config(config)
  lowered = make_train_fn(model, config, mesh, donate=donate).lower(state, batch)
  return compiled_flops * _lowered_flops(lowered) / _lowered_flops(lowered_remat)


@dataclasses.dataclass
class PreparedStep:
  """A train or eval step traced and lowered for one spec, its inputs on the devices, not yet
  compiled: compile() can run in a worker thread (XLA compiles with the GIL released), so that
  several programs compile at once, and time() measures it afterwards on an idle device."""
  kind: str  # 'train' or 'eval'
  spec: StepSpec
  mesh: Any
  state: Any
  batch: Any
  lowered: Any
  donate: bool = True
  compiled: Any = None
  compile_s: float | None = None

  def compile(self) -> PreparedStep:
    start = time.perf_counter()
    self.compiled = self.lowered.compile()
    self.compile_s = time.perf_counter() - start
    return self

  def time(self, *, steps: int = 20, warmup: int = 2,
           peak: DevicePeak | None = None) -> dict[str, Any]:
    """Times the compiled step (compiling it first if needed); see measure_train/measure_eval
    for the keys. A train step consumes its (donated) state: time it once."""
    if self.compiled is None:
      self.compile()
    cost = compiled_cost(self.compiled)
    common = dict(spec=self.spec.to_dict(), devices=self.mesh.size, compile_s=self.compile_s,
                  memory=compiled_memory(self.compiled))
    if self.kind == "eval":
      seconds = timed_calls(lambda: self.compiled(self.state, self.batch), steps, warmup)
      report = speed_report(seconds, self.spec.batch, cost["flops"], cost["bytes_accessed"],
                            self.mesh.size, peak, self.spec.dtype)
      report.update(common, device_peak_bytes=device_memory_peak(self.mesh.devices.flat))
      return report
    model_flops = (_model_flops_without_remat(self.spec, self.lowered, cost["flops"], self.state,
                                              self.batch, self.mesh, self.donate)
                   if self.spec.remat else None)
    metrics = []
    holder = {"state": self.state}
    self.state = None  # donated to the first call

    def call():
      holder["state"], step_metrics = self.compiled(holder["state"], self.batch)
      metrics.append(step_metrics)
      return holder["state"], step_metrics

    seconds = timed_calls(call, steps, warmup)
    fetched = jax.device_get(metrics)
    report = speed_report(seconds, self.spec.batch, cost["flops"], cost["bytes_accessed"],
                          self.mesh.size, peak, self.spec.dtype, model_flops)
    report.update(
        common, donate=self.donate, device_peak_bytes=device_memory_peak(self.mesh.devices.flat),
        **residual_bytes(self.spec),
        first_loss=float(fetched[0]["loss"]), last_loss=float(fetched[-1]["loss"]),
        nonfinite_steps=int(sum(not bool(m["finite"]) for m in fetched)))
    return report


def prepare_train(spec: StepSpec, *, mesh=None, variables: Mapping[str, Any] | None = None,
                  donate: bool = True) -> PreparedStep:
  """steps.make_train_step for spec, lowered on one synthetic batch (state and batch placed on
  mesh, default all devices)."""
  mesh, model, state = _prepare(spec, variables, mesh)
  batch = sharding.to_global_batch(synthetic_batch(spec.batch, spec.size, spec.aux_channels), mesh)
  step = make_train_fn(model, spec.config(), mesh, donate=donate)
  return PreparedStep("train", spec, mesh, state, batch, step.lower(state, batch), donate)


def prepare_eval(spec: StepSpec, *, mesh=None,
                 variables: Mapping[str, Any] | None = None) -> PreparedStep:
  """steps.make_eval_step (forward, sigmoid, per-tile counts) for spec, lowered like
  prepare_train."""
  mesh, model, state = _prepare(spec, variables, mesh)
  batch = sharding.to_global_batch(
      synthetic_batch(spec.batch, spec.size, spec.aux_channels, with_valid=True), mesh)
  step = step_fns.make_eval_step(model, mesh)
  return PreparedStep("eval", spec, mesh, state, batch, step.lower(state, batch), donate=False)


def measure_train(spec: StepSpec, *, steps: int = 20, warmup: int = 2, mesh=None,
                  variables: Mapping[str, Any] | None = None, donate: bool = True,
                  peak: DevicePeak | None = None) -> dict[str, Any]:
  """Times steps.make_train_step on one synthetic batch (see speed_report for the keys), plus
  'compile_s', 'memory' (compiled_memory), 'device_peak_bytes' (None on CPU), 'losses' first
  and last, 'nonfinite_steps' (steps whose loss or gradient was not finite: the step keeps the
  old state, the timing is still that of a full step), 'devices', 'spec', 'donate'."""
  prepared = prepare_train(spec, mesh=mesh, variables=variables, donate=donate)
  return prepared.compile().time(steps=steps, warmup=warmup, peak=peak)


def measure_eval(spec: StepSpec, *, steps: int = 20, warmup: int = 2, mesh=None,
                 variables: Mapping[str, Any] | None = None,
                 peak: DevicePeak | None = None) -> dict[str, Any]:
  """Times steps.make_eval_step (forward, sigmoid, per-tile counts) like measure_train."""
  prepared = prepare_eval(spec, mesh=mesh, variables=variables)
  return prepared.compile().time(steps=steps, warmup=warmup, peak=peak)


def _time_model_pass(kind: str, spec: StepSpec, fn, args, *, steps: int, warmup: int,
                     mesh) -> dict[str, Any]:
  """Compiles jitted fn on args, times it (timed_calls) and reports like speed_report without
  the device-peak figures (the passes are compared with the release's, not with a roofline)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  cost = compiled_cost(compiled)
  seconds = timed_calls(lambda: compiled(*args), steps, warmup)
  report = speed_report(seconds, spec.batch, cost["flops"], cost["bytes_accessed"], mesh.size,
                        None, spec.dtype)
  report.update(kind=kind, spec=spec.to_dict(), devices=mesh.size, compile_s=compile_s,
                seconds=list(seconds))
  return report


def measure_forward(spec: StepSpec, *, train: bool = True, steps: int = 20, warmup: int = 2,
                    mesh=None, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Times the model's forward pass alone on one synthetic batch: train=True in training mode
  (BatchNorm with the batch's statistics, updated statistics returned, nothing kept for a
  backward pass), else in evaluation mode (running statistics; logits only, unlike the eval
  step no sigmoid or counts). The release comparison (benchmarks.run's 'release' section) uses
  it beside benchmarks.release_torch's forward. Keys as speed_report's (peak-free) plus 'kind',
  'compile_s', 'seconds'."""
  mesh, model, state = _prepare(spec, variables, mesh)
  batch = sharding.to_global_batch(synthetic_batch(spec.batch, spec.size, spec.aux_channels), mesh)

  def forward(params, batch_stats, image, aux):
    v = {"params": params, "batch_stats": batch_stats}
    if train:
      return model.apply(v, image, aux, train=True, mutable=["batch_stats"])
    return model.apply(v, image, aux, train=False)

  args = (state.params, state.batch_stats, batch["image"], batch["aux"])
  return _time_model_pass("forward_train" if train else "forward_eval", spec, jax.jit(forward),
                          args, steps=steps, warmup=warmup, mesh=mesh)


def measure_forward_backward(spec: StepSpec, *, steps: int = 20, warmup: int = 2, mesh=None,
                             variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Times the training loss's forward and backward pass (steps.make_loss_fn: train-mode
  forward, BCE + Dice, gradients of every parameter) without the optimizer update, gradient
  norm or finiteness check of the train step; keys as measure_forward's."""
  mesh, model, state = _prepare(spec, variables, mesh)
  batch = sharding.to_global_batch(synthetic_batch(spec.batch, spec.size, spec.aux_channels), mesh)
  grad_fn = jax.jit(jax.value_and_grad(step_fns.make_loss_fn(model, spec.config()), has_aux=True))
  args = (state.params, state.batch_stats, batch)
  return _time_model_pass("forward_backward", spec, grad_fn, args, steps=steps, warmup=warmup,
                          mesh=mesh)


def search_max_batch(fits: Callable[[int], bool], *, start: int, cap: int,
                     multiple: int = 1) -> tuple[int, list[tuple[int, bool]]]:
  """Largest batch b (a multiple of `multiple`, start <= b <= cap) with fits(b), assuming
  fits is monotone: doubling from `start` until a failure or the cap, then bisecting between
  the last fit and the first failure. Returns (b, [(batch, fits) in the order tried]); b = 0
  when `start` itself does not fit."""
  if multiple < 1:
    raise BenchmarkError(f"multiple must be >= 1, got {multiple}")
  start = max(multiple, -(-start // multiple) * multiple)
  cap = cap // multiple * multiple
  if cap < start:
    raise BenchmarkError(f"batch cap {cap} is below the smallest batch {start} "
                         f"(a multiple of {multiple})")
  tried: list[tuple[int, bool]] = []

  def probe(b: int) -> bool:
    ok = bool(fits(b))
    tried.append((b, ok))
    return ok

  if not probe(start):
    return 0, tried
  good, bad = start, None
  while good < cap:
    b = min(2 * good, cap)
    if probe(b):
      good = b
    else:
      bad = b
      break
  while bad is not None and bad - good > multiple:
    middle = (good + bad) // 2 // multiple * multiple
    if middle <= good:
      break
    if probe(middle):
      good = middle
    else:
      bad = middle
  return good, tried


def measure_max_batch(spec: StepSpec, *, cap: int, budget_bytes: int | None = None,
                      mesh=None, variables: Mapping[str, Any] | None = None,
                      start: int | None = None) -> dict[str, Any]:
  """The largest global batch whose train step fits at spec.size (spec.remat as given).

  A batch fits when it compiles, its compiled memory (compiled_memory 'total_bytes') is within
  budget_bytes (when given: a stand-in for device memory on a CPU, where running out of host
  memory kills the process instead of raising) and one step runs; an XLA out-of-memory error at
  either stage means it does not fit. Other errors propagate. Returns {'max_batch', 'capped'
  (True when the cap, not memory, stopped the search), 'cap', 'budget_bytes', 'remat',
  'probes': [{'batch', 'fits', 'reason', 'memory', 'flops_per_step_per_device', 'compile_s'}]}.
  """
  mesh = mesh or make_mesh()
  if variables is None:
    variables = initial_variables(spec)
  else:
    _check_variables(spec, variables)
  host_variables = jax.tree.map(np.asarray, dict(variables))
  limit = device_memory_limit(mesh.devices.flat)
  probes = []

  def fits(b: int) -> bool:
    probe_spec = spec.replace(batch=b)
    config = probe_spec.config()
    row = {"batch": b, "fits": False, "reason": "", "memory": None,
           "flops_per_step_per_device": None, "compile_s": None}
    probes.append(row)
    state = batch = None
    try:
      model, state = make_state(probe_spec, host_variables, mesh)
      batch = sharding.to_global_batch(synthetic_batch(b, spec.size, spec.aux_channels), mesh)
      start_s = time.perf_counter()
      compiled = make_train_fn(model, config, mesh).lower(state, batch).compile()
      row["compile_s"] = time.perf_counter() - start_s
      row["memory"] = compiled_memory(compiled)
      row["flops_per_step_per_device"] = compiled_cost(compiled)["flops"]
      total = row["memory"]["total_bytes"]
      for name, bound in (("budget", budget_bytes), ("device limit", limit)):
        if bound is not None and total is not None and total > bound:
          row["reason"] = f"compiled memory {total} B > {name} {bound} B"
          return False
      jax.block_until_ready(compiled(state, batch))
    except Exception as error:  # pylint: disable=broad-except
      if not is_out_of_memory(error):
        raise
      row["reason"] = f"out of memory: {str(error).splitlines()[0][:200]}"
      return False
    finally:
      del state, batch
    row["fits"] = True
    return True

  best, _ = search_max_batch(fits, start=start or mesh.size, cap=cap, multiple=mesh.size)
  capped = best == cap // mesh.size * mesh.size and all(p["fits"] for p in probes)
  return {"max_batch": best, "capped": capped, "cap": cap, "budget_bytes": budget_bytes,
          "device_limit_bytes": limit, "remat": spec.remat, "size": spec.size, "probes": probes,
          "bytes_per_image_at_max": (_probe_total_bytes(probes, best) / best if best else None)}


def _probe_total_bytes(probes: Sequence[Mapping[str, Any]], batch: int) -> float:
  """Compiled total bytes of the probe at `batch` (nan when absent)."""
  for row in probes:
    if row["batch"] == batch and row["memory"] and row["memory"]["total_bytes"] is not None:
      return float(row["memory"]["total_bytes"])
  return float("nan")


# ----------------------------------------------------------------------------- CLI

def environment() -> dict[str, Any]:
  """Device kind and count, backend and library versions."""
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(), "process_count": jax.process_count(),
          "jax_version": jax.__version__, "flax_version": flax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "host_cpus": os.cpu_count()}


def define_spec_flags(flag_values: flags.FlagValues = flags.FLAGS,
                      argv: Sequence[str] | None = None) -> None:
  """The model and size flags shared with benchmarks.run: --config (its config.model), --size,
  --batch, --steps, --warmup. argv: the command line --config reads its overrides from (default
  sys.argv)."""
  config_flags.DEFINE_config_file(
      "config", str(DEFAULT_CONFIG), "Config file (with :presets) whose model (config.model, "
      "--config.model.* overrides) is benchmarked.", flag_values=flag_values, sys_argv=argv,
      lock_config=True)
  flags.DEFINE_integer("size", None, "Input side (multiple of 32). Default 1024; on a CPU-only "
                       "machine 128 with a small model (CPU_DEFAULTS).", flag_values=flag_values)
  flags.DEFINE_integer("batch", 2, "Global batch.", lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("steps", 20, "Timed steps (median reported).", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", lower_bound=0,
                       flag_values=flag_values)


def spec_from_config(config: ml_collections.ConfigDict, size: int | None = None, batch: int = 2,
                     *, cpu_defaults: bool = False, overridden=()) -> StepSpec:
  """StepSpec of config.model at this input side and global batch. Without a size: 1024 px, or
  with cpu_defaults (a CPU-only machine) CPU_DEFAULTS: 128 px and the small width and depths,
  except for the fields named in `overridden` ('model.width', as config_flags reports the
  command line's overrides)."""
  model = config.model.to_dict()
  if size is None and cpu_defaults:
    model.update({k: v for k, v in CPU_DEFAULTS.items()
                  if k != "size" and f"model.{k}" not in overridden})
  named = StepSpec().model_fields()  # the fields StepSpec has a name for
  reference = default_config.get_config().model.to_dict()
  extras = tuple(sorted((k, v) for k, v in model.items()
                        if k not in named and v != reference.get(k)))
  return StepSpec(model=model["name"], width=model["width"], depths=tuple(model["depths"]),
                  dtype=model["dtype"],
                  upsample_method=models.resolve_upsample_method(model["upsample_method"]),
                  remat=model["remat"], aux_channels=model["aux_channels"],
                  size=size or (CPU_DEFAULTS["size"] if cpu_defaults else 1024), batch=batch,
                  model_extras=extras)


def spec_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> StepSpec:
  """The StepSpec of parsed define_spec_flags flags (the CPU defaults on a CPU backend); a bad
  config or size is an app.UsageError naming it."""
  try:
    config_checks.validate(flag_values.config)
    spec = spec_from_config(flag_values.config, flag_values.size, flag_values.batch,
                            cpu_defaults=jax.default_backend() == "cpu",
                            overridden=config_flags.get_override_values(flag_values["config"]))
    spec.config()  # checks the size and the model fields before any work
  except (BenchmarkError, ValueError, KeyError) as error:
    raise app.UsageError(str(error)) from error
  return spec


def parse_sections(values: Sequence[str], known: Sequence[str]) -> list[str]:
  """The --sections list checked against the known names, in their order."""
  sections = [s.strip() for s in values if s.strip()]
  unknown = sorted(set(sections) - set(known))
  if unknown or not sections:
    raise app.UsageError(f"--sections: unknown {unknown}; choose from {','.join(known)}")
  return [s for s in known if s in sections]


def define_flags() -> None:
  """This module's command line (defined only when it runs as the program)."""
  define_spec_flags()
  flags.DEFINE_list("sections", ["train"], f"Subset of {','.join(SECTIONS)}.")
  flags.DEFINE_bool("no_donate", False, "Train step without donation.")
  flags.DEFINE_string("variables", None, ".npz of parameters (save_variables).")
  flags.DEFINE_bool("no_peak", False, "Skip the peak measurement of devices missing from "
                    "PEAK_TABLE.")
  flags.DEFINE_string("json", None, "Write the results to this file.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  sections = parse_sections(args.sections, SECTIONS)
  spec = spec_from_flags(args)
  variables = load_variables(args.variables) if args.variables else initial_variables(spec)
  peak = device_peak(measure_if_unknown=not args.no_peak)
  report: dict[str, Any] = {"environment": environment(), "spec": spec.to_dict(),
                            "peak": dataclasses.asdict(peak) if peak else None}
  if "train" in sections:
    report["train"] = measure_train(spec, steps=args.steps, warmup=args.warmup,
                                    variables=variables, donate=not args.no_donate, peak=peak)
  if "eval" in sections:
    report["eval"] = measure_eval(spec, steps=args.steps, warmup=args.warmup,
                                  variables=variables, peak=peak)
  for name in sections:
    row = report[name]
    print(f"{name}: {row['images_per_s']:.2f} images/s, {row['ms_per_step']:.1f} ms/step, "
          f"{row['flops_per_image'] / 1e9:.3f} GFLOP/image, {jax.device_count()} device(s)",
          flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
