"""The accelerator check: what a user's GPU or TPU does with the full model, in one command.

  benchmarks/accelerator_check.sh [--wheels=DIR] [--out=DIR] [--budget_s=480] [--smoke]
  python -m benchmarks.accelerator_check [same flags]

Measures, on the first device, the model users run (configs/default.py: CMMPNet, width 1.0,
ResNet-34 depths) in bfloat16 compute with float32 parameters, in order of importance, each
result written as soon as it exists (OUT/accelerator_check.json, rewritten atomically, and
OUT/accelerator_check.md, the README's table):

  1. train step images/s and MFU at 1024 px for model.upsample_method 'dilated' and 'subpixel',
     the evaluation step (forward, sigmoid, counts) at 1024, and the train step at 512;
  2. the same train steps with remat on;
  3. the largest global batch whose train step fits at 1024, without and with remat (predicted
     from the compiled memory of the 1024 steps above, then verified: the predicted batch must
     compile within the device's memory and run one step, the next multiple must not fit);
  4. in a CPU-only subprocess started first, the training input pipeline (PNG decoding,
     augmentation, batching of 1024 px tiles) in examples/s per grain worker count, against
     the fastest 1024 train step's images/s (goal: >= 2x);
  5. when PyTorch and benchmarks.release_torch import (a subprocess, run before JAX takes the
     device), the authors' release model's train step (float32, as released) at the same sizes,
     for the ratio cmmp-jax / release (goal: >= 3x).

The programs of a group are traced one after another, compiled concurrently in threads (XLA
compiles with the GIL released; a full CMMPNet step takes tens of seconds to compile on a GPU)
and then timed one at a time on an otherwise idle device. A time budget (--budget_s) skips the
groups that would not finish, saying so in the report, so that the check ends inside a lease.

--smoke runs the same code path with a tiny model at 64 and 128 px and two timed steps: a test
runs it on the CPU (tests/test_benchmarks.py), so the command is known to work end to end
before an accelerator is at hand.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Sequence

from absl import app
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("dilated", "subpixel")
# The full model at real sizes; global batches per input side (a 1024 px bfloat16 step keeps
# about 5.2 GiB per image for the backward pass without remat, 1.1 GiB with it).
FULL = dict(model=dict(model="cmmpnet", width=1.0, depths=(3, 4, 6, 3), dtype="bfloat16"),
            sizes=(512, 1024), batch={512: 32, 1024: 8}, steps=10, warmup=2,
            eval_methods=METHODS, remat_methods=METHODS, maxbatch_cap=None,
            pipeline=dict(size=1024, examples=96))
# The same code path in a minute on a CPU: the cheapest model to compile (one branch, one block
# per layer), one size, each kind of program once (both formulations only where the check
# compares them), two timed steps, the largest batch capped at 2 (one probe each).
SMOKE = dict(model=dict(model="image_only", width=0.125, depths=(1, 1, 1, 1), dtype="bfloat16"),
             sizes=(64,), batch={64: 2}, steps=2, warmup=1,
             eval_methods=METHODS[-1:], remat_methods=METHODS[-1:], maxbatch_cap=2,
             pipeline=dict(size=64, examples=8))
# Goals the issue sets (MFU of the bfloat16 1024 px train step, pipeline over step rate, speed
# over the release on the same device).
GOALS = {"mfu_1024": 0.40, "pipeline_over_step": 2.0, "over_release": 3.0}
# Seconds one program (trace, compile, time) is assumed to need before one has been timed here.
DEFAULT_JOB_S = 90.0

flags.DEFINE_string("out", "accelerator_check", "Folder for accelerator_check.json and .md.")
flags.DEFINE_float("budget_s", 480.0, "Wall-clock budget: groups that would end after it are "
                   "skipped (and listed as skipped).")
flags.DEFINE_bool("smoke", False, "Tiny model and sizes: the same path in seconds on a CPU.")
flags.DEFINE_integer("compile_threads", 1, "Programs of a group compiled at once. 1: each "
                     "program is compiled and timed before the next (results arrive one by "
                     "one); on an H200 six concurrent compilations of the full model did not "
                     "finish in 6.5 minutes (benchmarks/NOTES.md G1).", lower_bound=1)
flags.DEFINE_string("cache_dir", None, "JAX's persistent compilation cache (default "
                    "OUT/jax_cache): a second run on the same machine skips compilation.")
flags.DEFINE_integer("gpu_autotune_level", None, "XLA:GPU autotuning level (0-4, added to "
                     "XLA_FLAGS as --xla_gpu_autotune_level before JAX starts; default: XLA's "
                     "own). On an H200 one full-size 1024 px train step had not compiled after "
                     "180 s with XLA's default (NOTES.md G1); lower levels trade kernel choice "
                     "for compile time. Not yet measured.", lower_bound=0, upper_bound=4)
flags.DEFINE_bool("release", True, "Time the PyTorch release when it imports.")
flags.DEFINE_bool("pipeline", True, "Time the input pipeline (CPU subprocess).")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- report

class Report:
  """The JSON report and its Markdown table, rewritten after every result."""

  def __init__(self, out: pathlib.Path, meta: dict[str, Any]):
    self.out = out
    self.data: dict[str, Any] = {"meta": meta, "results": [], "skipped": [], "errors": [],
                                 "summary": {}}
    out.mkdir(parents=True, exist_ok=True)

  def add(self, key: str, result: dict[str, Any]) -> None:
    self.data["results"].append({"key": key, **result})
    self.write()

  def skip(self, key: str, reason: str) -> None:
    self.data["skipped"].append({"key": key, "reason": reason})
    print(f"  skipped {key}: {reason}", flush=True)
    self.write()

  def error(self, key: str, error: BaseException) -> None:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    self.data["errors"].append({"key": key, "error": text[-2000:]})
    print(f"  FAILED {key}: {text.splitlines()[-1][:300] if text else type(error).__name__}",
          flush=True)
    self.write()

  def find(self, key: str) -> dict[str, Any] | None:
    return next((r for r in self.data["results"] if r["key"] == key), None)

  def write(self) -> None:
    from benchmarks import run as suite  # pylint: disable=g-import-not-at-top
    suite.write_json(self.out / "accelerator_check.json", self.data)
    tmp = self.out / "accelerator_check.md.tmp"
    tmp.write_text(format_markdown(self.data))
    tmp.replace(self.out / "accelerator_check.md")


def _pct(value) -> str:
  return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f} %"


def _num(value, digits: int = 1) -> str:
  return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_markdown(data: dict[str, Any]) -> str:
  """The README's table: one row per timed step, then max batch, pipeline, release, summary."""
  meta = data["meta"]
  lines = [f"Device: {meta.get('device_count', '?')} x {meta.get('device_kind', '?')} "
           f"({meta.get('platform', '?')}), jax {meta.get('jax_version', '?')}, "
           f"{meta.get('host_cpus', '?')} host CPUs; model {meta['model']['model']} width "
           f"{meta['model']['width']} depths "
           f"{tuple(meta['model']['depths'])}, {meta['model']['dtype']} compute, float32 "
           f"parameters; {meta.get('time_utc', '')}.", "",
           "| step | px | method | remat | batch | images/s | ms/step | GFLOP/image | MFU | "
           "compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in data["results"]:
    if r.get("kind") not in ("train", "eval"):
      continue
    lines.append(
        f"| {r['kind']} | {r['size']} | {r['method']} | {'on' if r['remat'] else 'off'} | "
        f"{r['batch']} | {_num(r['images_per_s'])} | {_num(r['ms_per_step'])} | "
        f"{_num(r['flops_per_image'] / 1e9, 0)} | {_pct(r['mfu'])} | {_num(r['compile_s'], 0)} |")
  for r in data["results"]:
    if r.get("kind") == "maxbatch":
      lines.append(f"\nLargest batch at {r['size']} px, remat {'on' if r['remat'] else 'off'}: "
                   f"{r['summary']}")
    elif r.get("kind") == "pipeline":
      rows = ", ".join(f"{p['workers']} workers {p['examples_per_s']:.1f}"
                       for p in r["results"])
      lines.append(f"\nInput pipeline ({r['size']} px PNG tiles, batch {r['batch_size']}, "
                   f"examples/s): {rows}")
    elif r.get("kind") == "release":
      rows = "; ".join(
          f"{s['size']} px batch {s['batch']}: forward {_num(s['forward_images_per_s'])}, "
          f"train step {_num(s['train_images_per_s'])} images/s" for s in r["sizes"])
      lines.append(f"\nRelease model (PyTorch {r.get('torch_version', '?')}, float32 as "
                   f"released): {rows}")
  summary = data.get("summary") or {}
  if summary:
    lines.append("")
    lines.extend(f"- {line}" for line in summary.get("lines", []))
  for s in data["skipped"]:
    lines.append(f"- skipped {s['key']}: {s['reason']}")
  for e in data["errors"]:
    lines.append(f"- failed {e['key']}: {e['error'].splitlines()[-1][:200]}")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- subprocesses

def start_pipeline(plan: dict[str, Any], batch: int, folder: pathlib.Path) -> tuple[Any, Any]:
  """benchmarks.pipeline in a CPU-only subprocess (it needs no accelerator and its grain
  workers stay out of this process); returns (process, json path)."""
  cpus = os.cpu_count() or 2
  workers = sorted({0, max(1, cpus // 4), max(1, cpus // 2), max(1, cpus - 2)})
  if FLAGS.smoke:
    workers = [0]
  out = folder / "pipeline.json"
  cmd = [sys.executable, "-m", "benchmarks.pipeline", "--size", str(plan["size"]),
         "--workers", ",".join(map(str, workers)), "--num_examples", str(plan["examples"]),
         "--batch_size", str(batch), "--json", str(out)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  log = open(folder / "pipeline.log", "w")  # pylint: disable=consider-using-with
  return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), out


_RELEASE_SCRIPT = """
import json, sys
import torch
from benchmarks import release_torch
sizes = json.loads(sys.argv[1])
device = 'cuda' if torch.cuda.is_available() else 'cpu'
torch.backends.cudnn.benchmark = True  # the release's best convolution algorithms
out = {'torch_version': torch.__version__, 'device': device, 'sizes': []}
for size, batch in sizes:
  try:
    row = release_torch.time_release_step(batch=batch, size=size, aux_channels=1, device=device,
                                          steps=int(sys.argv[2]), warmup=int(sys.argv[3]))
  except Exception as error:  # out of memory at this size: say so, go on
    row = {'error': repr(error)[:500]}
  out['sizes'].append({'size': size, 'batch': batch, **row})
  if device == 'cuda':
    torch.cuda.empty_cache()
print('RELEASE_JSON ' + json.dumps(out))
"""


def time_release(plan: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
  """The release's steps in a subprocess (before this process's JAX takes the device); None
  with a printed reason when PyTorch or benchmarks.release_torch does not import."""
  probe = subprocess.run([sys.executable, "-c", "import torch; from benchmarks import "
                          "release_torch"], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=False)
  if probe.returncode != 0:
    reason = (probe.stderr.strip().splitlines() or ["?"])[-1]
    print(f"release: skipped (PyTorch or benchmarks.release_torch not importable: {reason})",
          flush=True)
    return None
  sizes = [[s, max(1, plan["batch"][s] // 2)] for s in plan["sizes"]]  # float32: half batch
  done = subprocess.run(
      [sys.executable, "-c", _RELEASE_SCRIPT, json.dumps(sizes), str(plan["steps"]),
       str(plan["warmup"])], cwd=REPO_ROOT, capture_output=True, text=True, check=False,
      timeout=timeout_s)
  line = next((l for l in done.stdout.splitlines() if l.startswith("RELEASE_JSON ")), None)
  if done.returncode != 0 or line is None:
    raise RuntimeError(f"release timing failed (exit {done.returncode}): "
                       + "\n".join(done.stderr.strip().splitlines()[-10:]))
  result = json.loads(line[len("RELEASE_JSON "):])
  for row in result["sizes"]:
    # step_s: forward, the release's loss, backward and Adam, what our train step does.
    for name, timed in (("forward", "forward_s"), ("train", "step_s")):
      seconds = row.get(timed)
      row[f"{name}_images_per_s"] = row["batch"] / seconds if seconds else None
  return result


# ----------------------------------------------------------------------------- JAX groups

@dataclasses.dataclass
class Job:
  key: str
  kind: str  # 'train' or 'eval'
  spec: Any


def _elapsed() -> str:
  return f"[+{time.monotonic() - _STARTED:.0f} s]"


_STARTED = time.monotonic()


def _record(report: Report, job: Job, prepared, plan, peak) -> None:
  """Times one compiled program, adds its row, frees its device buffers."""
  try:
    result = prepared.time(steps=plan["steps"], warmup=plan["warmup"], peak=peak)
  except Exception as error:  # pylint: disable=broad-except
    report.error(job.key, error)
    return
  finally:
    prepared.state = prepared.batch = prepared.compiled = prepared.lowered = None
  row = {"kind": job.kind, "size": job.spec.size, "method": job.spec.upsample_method,
         "remat": job.spec.remat, "batch": job.spec.batch, **result}
  report.add(job.key, row)
  print(f"{_elapsed()} {job.key}: {row['images_per_s']:.2f} images/s, "
        f"{row['ms_per_step']:.1f} ms/step, MFU {_pct(row['mfu'])}, compiled in "
        f"{row['compile_s']:.0f} s", flush=True)


def run_group(name: str, jobs: Sequence[Job], report: Report, variables, peak, plan,
              deadline: float, timing: dict[str, float]) -> None:
  """Traces, compiles and times the jobs in order, skipping those the budget left cannot hold
  (estimated from the last job). With --compile_threads > 1 the group's programs compile
  concurrently first, then are timed one by one (all-or-nothing within the group)."""
  from benchmarks import train_step as step_lib  # pylint: disable=g-import-not-at-top
  threads = FLAGS.compile_threads or 1

  def prepare(job):
    started = time.monotonic()
    make = step_lib.prepare_train if job.kind == "train" else step_lib.prepare_eval
    prepared = make(job.spec, variables=variables)
    print(f"{_elapsed()} {job.key}: traced in {time.monotonic() - started:.0f} s", flush=True)
    return prepared

  def affordable(job, count=1) -> bool:
    left = deadline - time.monotonic()
    needed = count * timing.get("job_s", DEFAULT_JOB_S)
    if left < needed:
      report.skip(job.key, f"time budget: {left:.0f} s left, a program takes about "
                  f"{needed / count:.0f} s")
      return False
    return True

  print(f"{_elapsed()} [{name}] {len(jobs)} programs, {threads} compiled at a time", flush=True)
  if threads == 1:
    for job in jobs:
      if not affordable(job):
        continue
      started = time.monotonic()
      try:
        prepared = prepare(job).compile()
      except Exception as error:  # pylint: disable=broad-except
        report.error(job.key, error)
        continue
      _record(report, job, prepared, plan, peak)
      timing["job_s"] = time.monotonic() - started
    return
  jobs = [job for job in jobs if affordable(job, len(jobs))]
  started = time.monotonic()
  prepared = []
  for job in jobs:
    try:
      prepared.append((job, prepare(job)))
    except Exception as error:  # pylint: disable=broad-except
      report.error(job.key, error)
  compiled = []
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    futures = {pool.submit(p.compile): (job, p) for job, p in prepared}
    for future in concurrent.futures.as_completed(futures):
      job, p = futures[future]
      try:
        future.result()
        compiled.append((job, p))
        print(f"{_elapsed()} {job.key}: compiled in {p.compile_s:.0f} s", flush=True)
      except Exception as error:  # pylint: disable=broad-except
        report.error(job.key, error)
  order = {job.key: i for i, job in enumerate(jobs)}
  for job, p in sorted(compiled, key=lambda jp: order[jp[0].key]):
    _record(report, job, p, plan, peak)
  if jobs:
    timing["job_s"] = (time.monotonic() - started) / len(jobs) * threads


def max_batch(report: Report, variables, plan, deadline: float, timing: dict[str, float],
              method: str) -> None:
  """For remat off and on at the largest size: predict the largest batch from the compiled
  memory of the timed step, then verify it (it runs) and its next multiple (it does not fit)."""
  from benchmarks import train_step as step_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  size = max(plan["sizes"])
  limit = step_lib.device_memory_limit(jax.devices()[:1])
  budget = None
  if limit is None:  # a CPU: a quarter of the host's RAM stands in for device memory
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
  bound = limit or budget
  for remat in (False, True):
    key = f"maxbatch/{size}/{method}/remat={'on' if remat else 'off'}"
    rows = [r for r in report.data["results"] if r.get("kind") == "train"
            and r["size"] == size and r["remat"] == remat]
    timed = next((r for r in rows if r["method"] == method), rows[0] if rows else None)
    left = deadline - time.monotonic()
    needed = 2 * timing.get("compile_s", DEFAULT_JOB_S)
    if timed is not None and timed["memory"]["total_bytes"] is None:
      report.skip(key, "the backend reports no compiled memory to predict from")
      continue
    if timed is None or left < needed:
      report.skip(key, "no timed step to predict from" if timed is None else
                  f"time budget: {left:.0f} s left, two compilations take about {needed:.0f} s")
      continue
    predicted, per_image = predict_max_batch(timed["memory"], timed["batch"], size, bound)
    if plan["maxbatch_cap"]:
      predicted = min(predicted, plan["maxbatch_cap"])
    spec = dataclasses.replace(timed_spec(timed), remat=remat, upsample_method=method)
    started = time.monotonic()
    try:
      # One probe at the prediction, one at the next batch (it should not fit), unless capped.
      cap = predicted if plan["maxbatch_cap"] else predicted + 1
      result = step_lib.measure_max_batch(spec, cap=cap, budget_bytes=budget,
                                          variables=variables, start=predicted)
      if result["max_batch"] == 0 and predicted > 1:  # the prediction did not fit: bisect below
        below = step_lib.measure_max_batch(spec, cap=predicted - 1, budget_bytes=budget,
                                           variables=variables, start=max(1, predicted // 2))
        below["probes"] = result["probes"] + below["probes"]
        result = below
    except Exception as error:  # pylint: disable=broad-except
      report.error(key, error)
      continue
    timing["compile_s"] = (time.monotonic() - started) / max(1, len(result["probes"]))
    best = result["max_batch"]
    failed = [p for p in result["probes"] if not p["fits"]]
    summary = (f"{best} (predicted {predicted} from {per_image / 2**30:.2f} GiB per image; "
               + (f"{failed[0]['batch']} did not fit: {failed[0]['reason'][:120]})" if failed
                  else "the cap was reached: a lower bound)"))
    report.add(key, {"kind": "maxbatch", "size": size, "method": method, "remat": remat,
                     "predicted": predicted, "bytes_per_image": per_image,
                     "summary": summary, **result})
    print(f"  {key}: {summary}", flush=True)


def predict_max_batch(memory: dict[str, int], batch: int, size: int, bound: int,
                      aux_channels: int = 1) -> tuple[int, float]:
  """(largest batch, bytes per image) for a train step whose compiled memory at `batch` is
  `memory` (train_step.compiled_memory), within `bound` bytes less 3 % for fragmentation.
  Everything scales with the batch but the state: the arguments less the batch's float32
  inputs (image 3, aux, mask 1 channel per pixel)."""
  inputs = batch * size * size * (3 + aux_channels + 1) * 4
  state = max(0, memory["argument_bytes"] - inputs)
  per_image = (memory["total_bytes"] - state) / batch
  return max(1, int((0.97 * bound - state) // per_image)), per_image


def timed_spec(row: dict[str, Any]):
  from benchmarks import train_step as step_lib  # pylint: disable=g-import-not-at-top
  spec = dict(row["spec"])
  spec["depths"] = tuple(spec["depths"])
  spec["model_extras"] = tuple(sorted(spec.get("model_extras", {}).items()))
  return step_lib.StepSpec(**spec)


# ----------------------------------------------------------------------------- summary

def summarise(report: Report, release: dict[str, Any] | None) -> None:
  data = report.data
  size = max(report.data["meta"]["sizes"])
  lines = []
  train = {m: report.find(f"train/{size}/{m}/remat=off") for m in METHODS}
  timed = {m: r for m, r in train.items() if r}
  if timed:
    fastest = max(timed, key=lambda m: timed[m]["images_per_s"])
    best = timed[fastest]
    data["summary"]["fastest_method"] = fastest
    data["summary"]["platform"] = data["meta"]["platform"]
    lines.append(f"fastest formulation at {size} px on {data['meta']['device_kind']}: "
                 f"{fastest} ({best['images_per_s']:.1f} images/s"
                 + "".join(f", {m} {r['images_per_s']:.1f}" for m, r in timed.items()
                           if m != fastest) + ")")
    if best["mfu"] is not None:
      goal = GOALS["mfu_1024"]
      lines.append(f"MFU of the {size} px bfloat16 train step: {_pct(best['mfu'])} "
                   f"(goal {_pct(goal)}: {'met' if best['mfu'] >= goal else 'not met'})")
    pipe = next((r for r in data["results"] if r.get("kind") == "pipeline"), None)
    if pipe:
      rate = max(p["examples_per_s"] for p in pipe["results"])
      ratio = rate / best["images_per_s"]
      data["summary"]["pipeline_over_step"] = ratio
      lines.append(f"input pipeline: {rate:.1f} examples/s at best = {ratio:.2f}x the step's "
                   f"images/s (goal {GOALS['pipeline_over_step']}x: "
                   f"{'met' if ratio >= GOALS['pipeline_over_step'] else 'not met'})")
    if release:
      row = next((s for s in release["sizes"] if s["size"] == size), None)
      if row and row.get("train_images_per_s"):
        ratio = best["images_per_s"] / row["train_images_per_s"]
        data["summary"]["over_release"] = ratio
        lines.append(f"train step over the release's (float32, PyTorch) at {size} px: "
                     f"{ratio:.2f}x (goal {GOALS['over_release']}x: "
                     f"{'met' if ratio >= GOALS['over_release'] else 'not met'})")
  data["summary"]["lines"] = lines
  report.write()


# ----------------------------------------------------------------------------- main

def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  global _STARTED
  started = _STARTED = time.monotonic()
  deadline = started + FLAGS.budget_s
  plan = SMOKE if FLAGS.smoke else FULL
  out = pathlib.Path(FLAGS.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  # JAX takes 75 % of a GPU's memory by default; the max-batch search wants nearly all of it.
  # Set before JAX starts its backend, i.e. before anything below asks for devices.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  if FLAGS.gpu_autotune_level is not None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_gpu_autotune_level={FLAGS.gpu_autotune_level}").strip()
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="cmmp_accel_"))
  biggest = max(plan["sizes"])
  pipeline = start_pipeline(plan["pipeline"], plan["batch"][biggest], scratch) \
      if FLAGS.pipeline else None
  release, release_error = None, None
  if FLAGS.release:
    print(f"{_elapsed()} [release] timing the PyTorch release model ...", flush=True)
    try:
      release = time_release(plan, timeout_s=max(30.0, FLAGS.budget_s / 4))
    except Exception as error:  # pylint: disable=broad-except
      release_error = error

  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step as step_lib  # pylint: disable=g-import-not-at-top
  # A rerun on the same machine (after a timeout, say) reuses every compiled program.
  jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir or str(out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  environment = step_lib.environment()
  peak = step_lib.device_peak()
  meta = {**environment, "model": {**plan["model"], "depths": list(plan["model"]["depths"])},
          "sizes": list(plan["sizes"]), "batch": {str(k): v for k, v in plan["batch"].items()},
          "steps": plan["steps"], "warmup": plan["warmup"], "smoke": FLAGS.smoke,
          "budget_s": FLAGS.budget_s, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "peak": dataclasses.asdict(peak) if peak else None,
          "goals": GOALS,
          "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  report = Report(out, meta)
  print(f"accelerator check: {environment['device_count']} x {environment['device_kind']} "
        f"({environment['platform']}), jax {environment['jax_version']}; writing {out}",
        flush=True)
  if release is not None:
    report.add("release", {"kind": "release", **release})
  elif release_error is not None:
    report.error("release", release_error)

  base = step_lib.StepSpec(**plan["model"], size=64, batch=1)
  variables = step_lib.initial_variables(base)  # parameters do not depend on the input size
  print(f"{_elapsed()} initial parameters ready", flush=True)

  def spec(size, method, remat=False):
    return base.replace(size=size, batch=plan["batch"][size], upsample_method=method,
                        remat=remat)

  def key(kind, size, method, remat=False):
    return f"{kind}/{size}/{method}/remat={'on' if remat else 'off'}"

  smaller = [s for s in plan["sizes"] if s != biggest]
  timing: dict[str, float] = {}
  first = ([Job(key("train", biggest, m), "train", spec(biggest, m)) for m in METHODS]
           + [Job(key("eval", biggest, m), "eval", spec(biggest, m))
              for m in plan["eval_methods"]]
           + [Job(key("train", s, m), "train", spec(s, m)) for s in smaller for m in METHODS])
  run_group("plain", first, report, variables, peak, plan, deadline, timing)
  timing["compile_s"] = max((r["compile_s"] for r in report.data["results"]
                             if r.get("compile_s")), default=DEFAULT_JOB_S)
  second = [Job(key("train", s, m, True), "train", spec(s, m, True))
            for s in (biggest, *smaller) for m in plan["remat_methods"]]
  run_group("remat", second, report, variables, peak, plan, deadline, timing)
  timed = [r for r in report.data["results"]
           if r.get("kind") == "train" and r["size"] == biggest and not r["remat"]]
  method = max(timed, key=lambda r: r["images_per_s"])["method"] if timed else METHODS[0]
  max_batch(report, variables, plan, deadline, timing, method)

  if pipeline is not None:
    process, path = pipeline
    try:
      process.wait(timeout=max(10.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      process.kill()
    if process.returncode == 0 and path.is_file():
      result = json.loads(path.read_text())
      report.add("pipeline", {"kind": "pipeline", **result})
    else:
      tail = (scratch / "pipeline.log").read_text().strip().splitlines()[-10:]
      report.error("pipeline", RuntimeError(
          f"pipeline benchmark failed (exit {process.returncode}): " + " | ".join(tail)))
  summarise(report, release)
  print(format_markdown(report.data), flush=True)
  print(f"accelerator check done in {time.monotonic() - started:.0f} s: "
        f"{out / 'accelerator_check.json'}, {out / 'accelerator_check.md'}", flush=True)


if __name__ == "__main__":
  app.run(main)
