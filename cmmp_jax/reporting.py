"""What a run tells people and files: the console, the log file, JSON results, summaries.

The console is for people: one line per logging interval (step, loss, learning rate, images/s,
ETA), one per evaluation, the results and where files went (`console`). Everything else (library
INFO logs from orbax, TFDS, grain, the parameter table, every scalar) goes to WORKDIR/log.txt
(`log_to_workdir`) and behind absl's `--verbosity` on the console (`-v 0` shows INFO).
"""
from __future__ import annotations

import contextlib
import json
import logging as py_logging
import math
import os
import pathlib
import time
from typing import Iterator

from absl import flags
from absl import logging
from clu import parameter_overview
import jax

LOG_FILE = "log.txt"
PARAMETERS_FILE = "parameters.txt"
_LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"


def console(message: str, *, every_process: bool = False) -> None:
  """One line for people, also kept in the log file. With several processes only process 0
  prints, unless the line is about each process's own work (`every_process`)."""
  logging.info("%s", message)
  if every_process or jax.process_index() == 0:
    print(message, flush=True)


def quiet_console() -> None:
  """Library logs reach the console only at WARNING and above, unless absl's --verbosity is given
  (0: INFO, 1: DEBUG). Python's root logger still passes INFO on to the log file."""
  verbosity = flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else -1
  console_level = py_logging.WARNING if verbosity < 0 else logging.converter.absl_to_standard(
      verbosity)
  logging.get_absl_handler().setLevel(console_level)
  py_logging.getLogger().setLevel(min(console_level, py_logging.INFO))
  logging.get_absl_logger().setLevel(min(console_level, py_logging.INFO))


def log_path(workdir: str | os.PathLike) -> pathlib.Path:
  """WORKDIR/log.txt (process i > 0 of a multi-host run: log.<i>.txt)."""
  index = jax.process_index()
  return pathlib.Path(workdir).absolute() / (LOG_FILE if index == 0 else f"log.{index}.txt")


@contextlib.contextmanager
def log_to_workdir(workdir: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Within the block, appends every log record of INFO and above to log_path(workdir) (nested
  blocks for the same workdir share one file handler). Yields the file's path."""
  path = log_path(workdir)
  root = py_logging.getLogger()
  if any(isinstance(h, py_logging.FileHandler) and pathlib.Path(h.baseFilename) == path
         for h in root.handlers):
    yield path
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  handler = py_logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(py_logging.INFO)
  handler.setFormatter(py_logging.Formatter(_LOG_FORMAT))
  root.addHandler(handler)
  try:
    yield path
  finally:
    root.removeHandler(handler)
    handler.close()


def metric_writer(workdir) -> metric_writers.MetricWriter:
  """TensorBoard summaries in workdir (process 0) and every scalar in the log file."""
  # Imported here: clu's writers need TensorFlow, which nothing else that imports this module
  # (the benchmarks, an accelerator machine without TensorFlow) needs.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:  # clu's writers run on TensorFlow: keep it off the accelerators JAX uses
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow's devices were initialised already (a second run)
    pass
  return metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0,
                                              asynchronous=True)


def write_parameter_table(workdir, params) -> pathlib.Path:
  """clu's parameter overview (one row per array: name, shape, size, mean, std) as a file."""
  path = pathlib.Path(workdir) / PARAMETERS_FILE
  if jax.process_index() == 0:
    path.write_text(parameter_overview.get_parameter_overview(params) + "\n")
  return path


class Progress:
  """The console's progress line: step, loss, learning rate, images/s and ETA over the last
  logging interval (wall time between calls, so it includes input and host work)."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.monotonic()

  def line(self, step: int, loss: float, learning_rate: float) -> str:
    now = time.monotonic()
    steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
    return (f"step {step}/{self.total_steps}  loss {loss:.4f}  lr {learning_rate:.2e}  "
            f"{steps_per_s * self.batch_size:.1f} img/s  ETA {format_seconds(eta)}")

  def elapsed(self) -> float:
    """Seconds since the last line or restart."""
    return time.monotonic() - self._last_time

  def restart_clock(self, step: int) -> None:
    """Measures from `step` now on (compilation, evaluations and checkpoints are not training
    speed)."""
    self._last_step, self._last_time = step, time.monotonic()


def format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def to_json(obj) -> str:
  """Standard JSON (undefined metrics, NaN in Python, become null; json.dumps would write NaN,
  which strict parsers such as jq reject)."""
  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x
  return json.dumps(clean(obj), indent=2, allow_nan=False)


def write_json(path: str | os.PathLike, obj) -> None:
  """Writes `to_json(obj)` atomically (a temporary file renamed over the target)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(to_json(obj))
  tmp.replace(path)


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
