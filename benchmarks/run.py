"""The benchmark suite: train and eval steps, largest batch, input pipeline, rendering, scaling.

  python -m benchmarks.run [--config=configs/default.py[:presets] --config.model.dtype=bfloat16
      --config.model.width=1.0 --config.model.depths='(3,4,6,3)' --config.model.remat=True
      --size=1024 --batch=2 --steps=20 --json=PATH
      --sections=train,eval,release,fullsize,maxbatch,pipeline,render,scaling]

Prints one table and writes a JSON report ('meta': device kind and count, platform, JAX and Flax
versions, model, sizes, dtype, device peak; then one entry per section). The JSON is rewritten
(atomically) after every section, so a failure later keeps the finished sections.

The model is --config's (config.model; default configs/default.py, the full CMMPNet). Defaults:
without --size, on a CPU-only machine a small model (128 px, width 0.25, one block per encoder
layer: train_step.CPU_DEFAULTS; --config.model.width / depths on the command line still apply;
maxbatch capped at 4) so that the suite finishes in minutes; on GPU/TPU the config's model at
1024 px.

Sections:
  train     benchmarks.train_step.measure_train: images/s, ms/step (median after warm-up, timed
            with block_until_ready), FLOPs and bytes per image from XLA's cost analysis,
            arithmetic intensity, MFU against the device peak, compiled and device memory.
  eval      the same for the evaluation step (forward, sigmoid, per-tile counts).
  release   the authors' PyTorch release model (benchmarks.release_torch, rebuilt; an optional
            dependency: without torch the section prints one skip line) at the same batch,
            size, width, depths and aux channels, on the same machine, float32 NCHW, train mode:
            its forward, forward + loss + backward, and full step (+ Adam), beside ours
            (train_step.measure_forward / measure_forward_backward, and the train section's step
            when it ran), and the ratios cmmp-jax / release. CPU, or CUDA when JAX runs on a
            GPU and torch sees one.
  fullsize  on a CPU, when the sections above ran the small CPU model: the config's own model
            (width, depths, upsample method; float32) at batch 2 x 256 x 256 (--fullsize_batch,
            --fullsize_size), the train section and the release section again at that size, so
            that the suite always shows the model users run beside the small stand-in. Skipped
            (one line) when the main model already is the config's model.
  maxbatch  the largest global batch whose train step fits, without and with remat (doubling
            from --batch, then bisecting; out-of-memory errors caught; on CPU bounded by
            --maxbatch_cap and a compiled-memory budget, since host OOM cannot be caught).
  pipeline  benchmarks.pipeline.run: decoded + augmented examples/s per grain worker count.
  render    benchmarks.render.run: GPS points/s of bulk heat-map rendering.
  scaling   images/s of the train step at a fixed global batch on 1, 2, 4, 8 simulated CPU
            devices (subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=N,
            JAX_PLATFORMS=cpu, the same weights), and on 1, 2, 4, ... real devices when the
            machine has several accelerators.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Sequence

from absl import app
from absl import flags
import jax

from benchmarks import render
from benchmarks import train_step as step_lib
from cmmp_jax import config_checks

SECTIONS = ("train", "eval", "release", "fullsize", "maxbatch", "pipeline", "render", "scaling")
RELEASE_SKIPPED = "PyTorch not importable; pip install torch to compare"
REPO_ROOT = step_lib.REPO_ROOT
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Sequence[str] | None = None) -> None:
  """The suite's flags on flag_values (argv: the command line --config reads its overrides from,
  default sys.argv). Defined only when this module runs as the program, or on a fresh
  flags.FlagValues() by a caller."""
  step_lib.define_spec_flags(flag_values, argv)
  flags.adopt_module_key_flags(step_lib, flag_values)  # --helpshort lists them too
  def define(kind, *args, **kwargs):
    kind(*args, flag_values=flag_values, **kwargs)

  define(flags.DEFINE_list, "sections", list(SECTIONS), f"Subset of {','.join(SECTIONS)}.")
  define(flags.DEFINE_string, "json", None, "Write the report to this file.")
  define(flags.DEFINE_bool, "no_donate", False, "Train step without donation.")
  define(flags.DEFINE_integer, "maxbatch_cap", None,
         "Largest batch tried (default 4 on CPU, 256 elsewhere).", lower_bound=1)
  define(flags.DEFINE_float, "maxbatch_budget_mb", None,
         "Compiled-memory budget per device (default on CPU: a quarter of the host's RAM; "
         "elsewhere the device's own limit).")
  define(flags.DEFINE_integer, "pipeline_size", None, "Tile side (default --size).",
         lower_bound=1)
  define(config_checks.define_integer_list, "pipeline_workers", [0, 2], "Grain worker counts.")
  define(flags.DEFINE_integer, "pipeline_examples", 32, "Examples timed.", lower_bound=1)
  define(flags.DEFINE_integer, "pipeline_batch", None, "Default --batch.", lower_bound=1)
  define(flags.DEFINE_integer, "render_points", 2_000_000, "GPS points.", lower_bound=1)
  define(flags.DEFINE_integer, "render_tiles", 16, "Tiles.", lower_bound=1)
  define(flags.DEFINE_integer, "render_size", 256, "Tile side.", lower_bound=1)
  define(config_checks.define_integer_list, "scaling_devices", [1, 2, 4, 8],
         "Simulated CPU device counts.")
  define(flags.DEFINE_integer, "scaling_batch", 8, "Fixed global batch.", lower_bound=1)
  define(flags.DEFINE_float, "scaling_timeout_s", 900.0, "Limit per scaling subprocess.")
  define(flags.DEFINE_integer, "fullsize_size", 256, "fullsize section: input side.",
         lower_bound=32)
  define(flags.DEFINE_integer, "fullsize_batch", 2, "fullsize section: global batch.",
         lower_bound=1)


def _counts(values: Sequence[int], flag: str, least: int) -> list[int]:
  if not values or min(values) < least:
    raise app.UsageError(f"--{flag} must list integers >= {least}, got {values}")
  return list(values)


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS,
                       argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  """The suite's knobs from parsed flags (sections in suite order, counts as integers, argv
  without the program for the report); inconsistent ones are an app.UsageError."""
  options = types.SimpleNamespace(**{
      name: flag_values[name].value for name in (
          "json", "no_donate", "maxbatch_cap", "maxbatch_budget_mb", "pipeline_size",
          "pipeline_examples", "pipeline_batch", "render_points", "render_tiles", "render_size",
          "scaling_batch", "scaling_timeout_s", "steps", "warmup")})
  options.full_spec = None
  if "fullsize" in step_lib.parse_sections(flag_values.sections, SECTIONS):
    # The config's model as configured (no CPU stand-in), at the fullsize size and batch.
    options.full_spec = step_lib.spec_from_config(
        flag_values.config, flag_values.fullsize_size, flag_values.fullsize_batch,
        cpu_defaults=False, overridden=step_lib.config_flags.get_override_values(
            flag_values["config"])).replace(dtype="float32")
  options.sections = step_lib.parse_sections(flag_values.sections, SECTIONS)
  options.pipeline_workers = _counts(flag_values.pipeline_workers, "pipeline_workers", 0)
  options.scaling_devices = _counts(flag_values.scaling_devices, "scaling_devices", 1)
  options.argv = list(sys.argv if argv is None else argv)[1:]
  bad = [n for n in options.scaling_devices if options.scaling_batch % n]
  if "scaling" in options.sections and bad:
    raise app.UsageError(f"--scaling_batch {options.scaling_batch} is not divisible by device "
                         f"counts {bad}")
  return options


# ----------------------------------------------------------------------------- sections

def maxbatch_section(spec, args, variables, on_cpu: bool) -> dict[str, Any]:
  """measure_max_batch without and with remat, from --batch up to the cap."""
  cap = args.maxbatch_cap or (4 if on_cpu else 256)
  budget = None
  if args.maxbatch_budget_mb is not None:
    budget = int(args.maxbatch_budget_mb * 2 ** 20)
  elif on_cpu:
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
  start = min(spec.batch, cap)
  out = {}
  for remat in (False, True):
    result = step_lib.measure_max_batch(spec.replace(remat=remat), cap=cap, budget_bytes=budget,
                                        variables=variables, start=start)
    if result["max_batch"] == 0 and start > jax.device_count():
      # --batch itself does not fit: search below it.
      result = step_lib.measure_max_batch(spec.replace(remat=remat), cap=start - 1,
                                          budget_bytes=budget, variables=variables)
    # What the backward keeps per image, as JAX builds the program: comparable on any backend
    # (XLA:CPU's compiled temporaries do not show remat's saving, see NOTES.md C3).
    result["activation_bytes_per_image"] = step_lib.residual_bytes(
        spec.replace(remat=remat), batch_size=1)["activation_bytes"]
    out["remat" if remat else "no_remat"] = result
  return out


def pipeline_section(spec, args) -> dict[str, Any]:
  """benchmarks.pipeline.run through its command line, in a CPU-only subprocess: TFDS can only
  build that module's synthetic dataset class when the module runs as __main__ (imported as
  benchmarks.pipeline, TFDS's builder code_path lookup needs the absent importlib_resources
  package), and grain's worker processes stay out of this one."""
  with tempfile.TemporaryDirectory(prefix="cmmp_pipeline_") as folder:
    out = pathlib.Path(folder) / "pipeline.json"
    cmd = [sys.executable, "-m", "benchmarks.pipeline",
           "--size", str(args.pipeline_size or spec.size),
           "--workers", ",".join(str(w) for w in args.pipeline_workers),
           "--num_examples", str(args.pipeline_examples),
           "--batch_size", str(args.pipeline_batch or spec.batch), "--json", str(out)]
    # The pipeline needs no accelerator; this process may hold most of its memory already.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0 or not out.is_file():
      tail = "\n".join(done.stderr.strip().splitlines()[-15:])
      raise step_lib.BenchmarkError(
          f"pipeline benchmark failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(out.read_text())


def fullsize_section(spec, args, peak) -> dict[str, Any]:
  """The config's model at args.full_spec's size on a CPU: the train step and the release
  comparison (see the module docstring); {'skipped': why} when the main spec already is it."""
  full = args.full_spec
  if full is None or spec.replace(size=full.size, batch=full.batch, dtype=full.dtype) == full:
    return {"skipped": "the main sections already measured the config's model"}
  print(f"[fullsize] {full.model} width {full.width} depths {tuple(full.depths)}, "
        f"{full.batch} x {full.size} x {full.size}, {full.dtype}, {full.upsample_method}",
        flush=True)
  variables = step_lib.initial_variables(full)
  out: dict[str, Any] = {"spec": full.to_dict()}
  out["train"] = step_lib.measure_train(full, steps=args.steps, warmup=args.warmup,
                                        variables=variables, donate=not args.no_donate,
                                        peak=peak)
  out["release"] = release_section(full, args, variables, out)
  return out


def release_mismatch(spec) -> str | None:
  """Why spec's model is not the release's architecture (None when it is): the release is
  CMMPNet on D-LinkNet-34 with the default DEM and decoder; width, depths, aux channels, dtype,
  upsample method and remat may differ (ours vary how, not what, is computed)."""
  if spec.model != "cmmpnet":
    return f"model {spec.model!r} is not the release's CMMPNet"
  if spec.model_extras:
    fields = ", ".join(f"{k}={v}" for k, v in spec.model_extras)
    return f"model fields differ from the release's: {fields}"
  return None


def _release_device(torch_module) -> tuple[str | None, str | None]:
  """(torch device for the release, None) on JAX's platform, or (None, why not)."""
  platform = jax.default_backend()
  if platform == "cpu":
    return "cpu", None
  if platform == "gpu" and torch_module.cuda.is_available():
    return "cuda", None
  return None, f"JAX runs on {platform}; PyTorch has no device of that kind here"


def release_section(spec, args, variables, report) -> dict[str, Any]:
  """The release model's forward, forward + backward and step beside ours, and the ratios
  cmmp-jax / release (see the module docstring). Skipped, with the reason in 'skipped', when
  torch is not importable, the model is not the release's, or torch has no matching device."""
  try:  # torch is imported here, only when the section runs
    release_torch = importlib.import_module("benchmarks.release_torch")
  except ImportError as error:
    return {"skipped": RELEASE_SKIPPED, "error": f"{type(error).__name__}: {error}"}
  reason = release_mismatch(spec)
  device, why = _release_device(release_torch.torch)
  if reason or why:
    return {"skipped": reason or why}
  ours = {"forward": step_lib.measure_forward(spec, train=True, steps=args.steps,
                                              warmup=args.warmup, variables=variables),
          "forward_backward": step_lib.measure_forward_backward(
              spec, steps=args.steps, warmup=args.warmup, variables=variables)}
  ours_s = {k: v["ms_per_step"] / 1e3 for k, v in ours.items()}
  train = report.get("train")
  ours_s["step"] = train["ms_per_step"] / 1e3 if train else None
  release = release_torch.time_release_step(
      spec.batch, spec.size, spec.aux_channels, device, args.steps, args.warmup,
      width=spec.width, depths=spec.depths)
  release_s = {k: release[f"{k}_s"] for k in ("forward", "forward_backward", "step")}
  ours_s["backward"] = ours_s["forward_backward"] - ours_s["forward"]
  release_s["backward"] = release_s["forward_backward"] - release_s["forward"]
  # (None where a time is missing, or a derived backward time is not positive: timing noise
  # at tiny sizes.)
  ratio = {k: (ours_s[k] / release_s[k] if ours_s[k] is not None and ours_s[k] > 0
               and release_s[k] > 0 else None) for k in release_s}
  return {"release": release, "release_seconds": release_s, "cmmp_jax_seconds": ours_s,
          "ratio": ratio, "cmmp_jax": ours, "dtype": spec.dtype,
          "upsample_method": spec.upsample_method, "remat": spec.remat,
          "note": ("all passes in train mode (BatchNorm batch statistics); forward without "
                   "gradients; forward_backward = forward + BCE/Dice loss + parameter "
                   "gradients; step = forward_backward + Adam (ours: the train section's "
                   "step, also gradient norm and finiteness check); backward = "
                   "forward_backward - forward")}


def render_section(args) -> dict[str, Any]:
  return render.run(args.render_points, args.render_tiles, args.render_size)


def simulated_cpu_env(num_devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of a subprocess that sees num_devices CPU devices: JAX_PLATFORMS=cpu and
  XLA_FLAGS with any earlier device-count flag replaced (other flags kept)."""
  env = dict(os.environ if base is None else base)
  flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={num_devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["CUDA_VISIBLE_DEVICES"] = ""
  return env


def simulated_scaling(spec, args, variables) -> list[dict[str, Any]]:
  """Train-step images/s on N simulated CPU devices per subprocess (fixed global batch)."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="cmmp_scaling_") as folder:
    variables_path = pathlib.Path(folder) / "variables.npz"
    step_lib.save_variables(variables_path, variables)
    for n in args.scaling_devices:
      out = pathlib.Path(folder) / f"devices_{n}.json"
      cmd = [sys.executable, "-m", "benchmarks.train_step", "--sections", "train",
             *spec.flags(), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--variables", str(variables_path), "--no_peak", "--json", str(out)]
      if args.no_donate:
        cmd.append("--no_donate")
      try:
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=simulated_cpu_env(n), capture_output=True,
                              text=True, timeout=args.scaling_timeout_s, check=False)
      except subprocess.TimeoutExpired as error:
        raise step_lib.BenchmarkError(
            f"scaling with {n} simulated CPU devices ran past {args.scaling_timeout_s} s "
            "(--scaling_timeout_s)") from error
      if done.returncode != 0 or not out.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise step_lib.BenchmarkError(
            f"scaling subprocess with {n} simulated CPU devices failed (exit "
            f"{done.returncode}): {' '.join(cmd)}\n{tail}")
      result = json.loads(out.read_text())
      if result["environment"]["device_count"] != n:
        raise step_lib.BenchmarkError(
            f"the scaling subprocess saw {result['environment']['device_count']} devices, not "
            f"{n}: is {_DEVICE_COUNT_FLAG} overridden?")
      rows.append(_scaling_row(n, result["train"], spec.batch))
  return _relative(rows)


def real_device_scaling(spec, args, variables, peak) -> list[dict[str, Any]]:
  """Train-step images/s on the first N real devices (N in --scaling_devices, N <= count)."""
  rows = []
  for n in args.scaling_devices:
    if n > jax.device_count():
      continue
    try:
      result = step_lib.measure_train(spec, steps=args.steps, warmup=args.warmup,
                                      mesh=step_lib.make_mesh(n), variables=variables,
                                      donate=not args.no_donate, peak=peak)
    except Exception as error:  # pylint: disable=broad-except
      if not step_lib.is_out_of_memory(error):
        raise
      rows.append({"devices": n, "global_batch": spec.batch, "per_device_batch": spec.batch // n,
                   "images_per_s": None, "error": f"out of memory: {str(error)[:200]}"})
      continue
    rows.append(_scaling_row(n, result, spec.batch))
  return _relative(rows)


def _scaling_row(n: int, train_result: dict[str, Any], batch: int) -> dict[str, Any]:
  return {"devices": n, "global_batch": batch, "per_device_batch": batch // n,
          "images_per_s": train_result["images_per_s"],
          "ms_per_step": train_result["ms_per_step"],
          "flops_per_step_per_device": train_result["flops_per_step_per_device"],
          "compile_s": train_result["compile_s"],
          "nonfinite_steps": train_result["nonfinite_steps"]}


def _relative(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Adds images/s relative to the 1-device row (None without one)."""
  base = next((r["images_per_s"] for r in rows if r["devices"] == 1), None)
  for row in rows:
    row["relative_to_1_device"] = (row["images_per_s"] / base
                                   if base and row["images_per_s"] else None)
  return rows


def scaling_section(spec, args, variables, on_cpu: bool, peak) -> dict[str, Any]:
  # When the main backend is an accelerator, the simulated-CPU check uses the CPU defaults: the
  # full model at 1024 px would take hours on a CPU.
  cpu_spec = spec if on_cpu else spec.replace(**step_lib.CPU_DEFAULTS)
  cpu_spec = cpu_spec.replace(batch=args.scaling_batch)
  cpu_variables = variables if on_cpu else step_lib.initial_variables(cpu_spec)
  out = {"global_batch": args.scaling_batch, "simulated_cpu_spec": cpu_spec.to_dict(),
         "simulated_cpu": simulated_scaling(cpu_spec, args, cpu_variables), "real": None}
  if not on_cpu and jax.device_count() > 1:
    out["real"] = real_device_scaling(spec.replace(batch=args.scaling_batch), args, variables,
                                      peak)
  return out


# ----------------------------------------------------------------------------- report

def _fmt(value, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return f"{value / scale:.{digits}f}{suffix}"


def _mib(value) -> str:
  return _fmt(value, 2 ** 20, 1, " MiB")


def format_report(report: dict[str, Any]) -> str:
  """The printed table of a report."""
  meta = report["meta"]
  spec = meta["spec"]
  peak = meta["peak"]
  lines = [
      f"cmmp-jax benchmarks: {spec['model']} width {spec['width']} depths "
      f"{tuple(spec['depths'])}, {spec['size']}x{spec['size']}, batch {spec['batch']}, "
      f"{spec['dtype']}, {spec['upsample_method']}, remat {'on' if spec['remat'] else 'off'}",
      f"devices: {meta['device_count']} x {meta['device_kind']} ({meta['platform']}), "
      f"jax {meta['jax_version']}, flax {meta['flax_version']}",
  ]
  if peak:
    lines.append(f"peak per device ({peak['source']}: {peak['name']}): "
                 f"{peak['fp32_flops'] / 1e12:.3f} TFLOP/s fp32, "
                 f"{peak['bf16_flops'] / 1e12:.3f} TFLOP/s bf16, "
                 f"{peak['bytes_per_s'] / 1e9:.1f} GB/s")
  steps = [s for s in ("train", "eval") if s in report]
  if steps:
    lines.append(f"{'step':<6}{'images/s':>10}{'ms/step':>10}{'GFLOP/img':>11}{'MB/img':>9}"
                 f"{'FLOP/B':>8}{'MFU':>8}{'BW use':>8}{'roofline ms':>13}{'compiled':>13}"
                 f"{'dev peak':>12}")
    for name in steps:
      r = report[name]
      bound = (None if r["compute_bound_ms"] is None
               else max(r["compute_bound_ms"], r["memory_bound_ms"]))
      lines.append(
          f"{name:<6}{r['images_per_s']:>10.2f}{r['ms_per_step']:>10.1f}"
          f"{r['flops_per_image'] / 1e9:>11.3f}{r['bytes_accessed_per_image'] / 1e6:>9.1f}"
          f"{r['arithmetic_intensity']:>8.2f}{_fmt(r['mfu'], 0.01, 1, '%'):>8}"
          f"{_fmt(r['bandwidth_utilisation'], 0.01, 1, '%'):>8}{_fmt(bound, 1, 1):>13}"
          f"{_mib(r['memory']['total_bytes']):>13}{_mib(r['device_peak_bytes']):>12}")
    if any(report[s]["nonfinite_steps"] for s in steps if "nonfinite_steps" in report[s]):
      lines.append(f"  note: {report['train']['nonfinite_steps']} train steps had a non-finite "
                   "loss or gradient (state kept; timing unaffected)")
  if "release" in report:
    lines.extend(format_release(report["release"]))
  if "fullsize" in report:
    lines.extend(format_fullsize(report["fullsize"]))
  if "maxbatch" in report:
    parts = []
    for key, label in (("no_remat", "remat off"), ("remat", "remat on")):
      r = report["maxbatch"][key]
      parts.append(f"{label}: {r['max_batch']}{' (cap)' if r['capped'] else ''}, "
                   f"{_mib(r['bytes_per_image_at_max'])}/image compiled, "
                   f"{_mib(r['activation_bytes_per_image'])}/image kept for backward")
    lines.append(f"maxbatch at {spec['size']} px: " + "; ".join(parts))
  if "pipeline" in report:
    p = report["pipeline"]
    lines.append(f"pipeline ({p['size']} px tiles, batch {p['batch_size']}): " + ", ".join(
        f"{r['workers']} workers {r['examples_per_s']:.1f} ex/s" for r in p["results"]))
  if "render" in report:
    r = report["render"]
    lines.append(f"render: {r['points']:,} points into {r['tiles']} tiles of {r['size']} px: "
                 f"{r['bulk_points_per_second'] / 1e6:.2f} M points/s ({r['bulk_seconds']:.2f} s)")
  if "scaling" in report:
    s = report["scaling"]
    for key, label in (("simulated_cpu", "simulated CPU devices"), ("real", "real devices")):
      if s.get(key):
        lines.append(f"scaling, {label}, global batch {s['global_batch']}: " + ", ".join(
            f"{r['devices']}: {_fmt(r['images_per_s'])} img/s"
            + (f" ({r['relative_to_1_device']:.2f}x)" if r["relative_to_1_device"] else "")
            for r in s[key]))
  return "\n".join(lines)


def format_release(release: dict[str, Any]) -> list[str]:
  """The release section's lines: one skip line, or a small table of seconds and ratios."""
  if release.get("skipped"):
    return [f"release: skipped ({release['skipped']})"]
  r = release["release"]
  lines = [f"release (PyTorch {r['torch_version']} on {r['device']}, {r['threads']} threads, "
           f"float32 NCHW) vs cmmp-jax ({release['dtype']}, {release['upsample_method']}, "
           f"remat {'on' if release['remat'] else 'off'}), train mode, batch {r['batch']}, "
           f"{r['size']} px:",
           f"  {'pass':<28}{'release ms':>12}{'cmmp-jax ms':>13}{'cmmp-jax/release':>18}"]
  labels = (("forward", "forward"), ("backward", "backward (fwd+bwd - fwd)"),
            ("forward_backward", "forward + backward"), ("step", "train step (+ Adam)"))
  for key, label in labels:
    ours = release["cmmp_jax_seconds"][key]
    ratio = release["ratio"][key]
    lines.append(f"  {label:<28}{_fmt(release['release_seconds'][key], 1e-3, 1):>12}"
                 f"{_fmt(ours, 1e-3, 1):>13}{_fmt(ratio, 1, 2, 'x'):>18}")
  return lines


def format_fullsize(fullsize: dict[str, Any]) -> list[str]:
  """The fullsize section's lines: one skip line, or its train step and release table."""
  if fullsize.get("skipped"):
    return [f"fullsize: skipped ({fullsize['skipped']})"]
  spec, train = fullsize["spec"], fullsize["train"]
  return [f"fullsize: {spec['model']} width {spec['width']} depths {tuple(spec['depths'])}, "
          f"{spec['batch']} x {spec['size']} px, {spec['dtype']}, {spec['upsample_method']}: "
          f"train {train['images_per_s']:.2f} images/s, {train['ms_per_step']:.0f} ms/step, "
          f"{train['flops_per_image'] / 1e9:.1f} GFLOP/image, MFU "
          f"{_fmt(train['mfu'], 0.01, 1, '%')}"] + format_release(fullsize["release"])


def write_json(path: str | os.PathLike, report: dict[str, Any]) -> None:
  """Writes the report atomically (a temporary file renamed over the target)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(report, indent=2, default=str))
  tmp.replace(path)


def run(spec: step_lib.StepSpec, args: types.SimpleNamespace) -> dict[str, Any]:
  """The suite for spec (train_step.spec_from_flags) with options_from_flags' knobs: prints the
  table, returns the report (and rewrites args.json after every section)."""
  on_cpu = jax.default_backend() == "cpu"
  started = time.perf_counter()
  peak = step_lib.device_peak()
  peak_seconds = time.perf_counter() - started
  environment = step_lib.environment()
  report: dict[str, Any] = {"meta": {
      **environment, "spec": spec.to_dict(), "size": spec.size, "batch": spec.batch,
      "dtype": spec.dtype, "model": spec.model, "width": spec.width,
      "peak": dataclasses.asdict(peak), "peak_seconds": peak_seconds,
      "sections": args.sections, "steps": args.steps, "warmup": args.warmup,
      "donate": not args.no_donate, "argv": args.argv,
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
  model_sections = {"train", "eval", "maxbatch", "scaling"} & set(args.sections)
  if "release" in args.sections and importlib.util.find_spec("torch") is not None:
    model_sections.add("release")  # (without torch the section only prints its skip line)
  started = time.perf_counter()
  variables = step_lib.initial_variables(spec) if model_sections else None
  report["meta"]["init_seconds"] = time.perf_counter() - started
  report["meta"]["section_seconds"] = section_seconds = {}
  for section in args.sections:
    print(f"[{section}] ...", flush=True)
    started = time.perf_counter()
    if section == "train":
      report[section] = step_lib.measure_train(spec, steps=args.steps, warmup=args.warmup,
                                               variables=variables, donate=not args.no_donate,
                                               peak=peak)
    elif section == "eval":
      report[section] = step_lib.measure_eval(spec, steps=args.steps, warmup=args.warmup,
                                              variables=variables, peak=peak)
    elif section == "release":
      report[section] = release_section(spec, args, variables, report)
    elif section == "fullsize":
      report[section] = fullsize_section(spec, args, peak)
    elif section == "maxbatch":
      report[section] = maxbatch_section(spec, args, variables, on_cpu)
    elif section == "pipeline":
      report[section] = pipeline_section(spec, args)
    elif section == "render":
      report[section] = render_section(args)
    elif section == "scaling":
      report[section] = scaling_section(spec, args, variables, on_cpu, peak)
    section_seconds[section] = time.perf_counter() - started
    if args.json:
      write_json(args.json, report)
  print(format_report(report), flush=True)
  return report


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(step_lib.spec_from_flags(flags.FLAGS), options_from_flags(flags.FLAGS))


if __name__ == "__main__":
  define_flags()
  app.run(main)
