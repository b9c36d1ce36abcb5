"""Fault injection: what kills, damaged checkpoints, a second run and failing evaluations must not
lose (issue 12; README "Reliability").

Every case runs the tiny synthetic run of tests/test_train.py (its config and compiled programs,
shared through the session's compilation cache) or its checkpoints: an uninterrupted reference
run is made once per module, and each case damages or interrupts a copy and checks that the
resumed run ends in the reference's state (the loop is deterministic on the CPU).
"""
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cmmp_jax import checkpoint as ckpt_lib
from cmmp_jax import evaluate, train
from cmmp_jax import state as state_lib
from cmmp_jax import workdir as workdir_lib
from cmmp_jax.data import sources
from test_train import TINY_OVERRIDES, params_of, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]

# A restore of damaged files leaves orbax's other read coroutines un-awaited when the first one
# fails; Python reports each at garbage collection (thousands of lines, nothing to act on).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """(config, workdir) of the uninterrupted tiny run: checkpoints/3 and /6, best/<3 or 6>."""
  workdir = tmp_path_factory.mktemp("reference")
  config = tiny_config(data_dir)
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def copy_run(reference, tmp_path, name="run"):
  config, workdir = reference
  copy = tmp_path / name
  shutil.copytree(workdir, copy)
  return config, copy


def steps_in(folder: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def assert_same_final_state(reference, workdir):
  config, reference_dir = reference
  step_a, params_a, stats_a = params_of(reference_dir, config)
  step_b, params_b, stats_b = params_of(workdir, config)
  assert step_a == step_b == 6
  for a, b in zip(jax.tree_util.tree_leaves((params_a, stats_a)),
                  jax.tree_util.tree_leaves((params_b, stats_b))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- damaged checkpoints -------------------------------------------------------------------------

def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  os.truncate(path, path.stat().st_size // 2)


def _random_bytes(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(path.stat().st_size // 3)
    f.write(np.random.default_rng(0).bytes(4096))


DAMAGE = {  # what the hostile user did to the newest step, and which part then fails
    "truncated_data_file": (_truncate, "state"),
    "random_bytes_in_data_file": (_random_bytes, "state"),
    "deleted_state_metadata": (lambda d: (d / "state" / "_METADATA").unlink(), "state"),
    "deleted_meta_metadata": (lambda d: (d / "meta" / "metadata").unlink(), "meta"),
    "garbage_data_iterator": (lambda d: next((d / "data_iter").glob("*.json")).write_text("{x"),
                              "data_iter"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_moved_aside(reference, tmp_path, capsys,
                                                                damage):
  config, workdir = copy_run(reference, tmp_path)
  damage_fn, part = DAMAGE[damage]
  damage_fn(workdir / "checkpoints" / "6")
  _, target = state_lib.abstract_state(config)
  data_iter = iter(sources.train_loader(config, sources.dataset_source(config, "train")))
  ckpts = ckpt_lib.Checkpoints(workdir, asynchronous=False)
  try:
    step, state, meta = ckpts.restore_newest_intact(target, config.model, data_iter)
    assert ckpts.latest.all_steps() == [3]
  finally:
    ckpts.close()
  assert step == 3 and int(state.step) == 3 and meta["evaluated"] is False
  moved = workdir / ckpt_lib.DAMAGED_DIR / f"6-{part}"
  assert moved.is_dir() and not (workdir / "checkpoints" / "6").exists()  # kept, not deleted
  lines = [l for l in capsys.readouterr().out.splitlines() if "skipping" in l]
  assert len(lines) == 1 and re.match(
      rf"WARNING: skipping step 6: checkpoint .*checkpoints/6 is damaged: its {part} cannot be "
      rf"read \(.+\); moved to {re.escape(str(moved))}; trying the previous step$", lines[0]), lines


def test_eval_skips_a_damaged_step_without_moving_it_and_a_named_step_is_an_error(reference,
                                                                                  tmp_path):
  config, workdir = copy_run(reference, tmp_path)
  _truncate(workdir / "checkpoints" / "6")
  _, state, step, _ = evaluate.restore_for_inference(config, str(workdir), "latest")
  assert step == 3 and (workdir / "checkpoints" / "6").is_dir()  # eval leaves it in place
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match=r"checkpoints/6 is damaged: its "
                     r"state cannot be read \(ValueError: OUT_OF_RANGE"):
    evaluate.restore_for_inference(config, str(workdir), 6)


def test_a_checkpoint_of_another_optimizer_or_data_order_is_a_mismatch_not_damage(reference,
                                                                                 tmp_path):
  """Gradient clipping adds a state to the optimizer chain, another seed another sampler: the
  files are intact but do not fit. That is the config's fault: refused, nothing moved or
  skipped."""
  config, workdir = copy_run(reference, tmp_path)
  other = tiny_config(config.data.data_dir, **{"optimizer.grad_clip_norm": 1.0})
  _, target = state_lib.abstract_state(other)
  reseeded = tiny_config(config.data.data_dir, seed=1)
  data_iter = iter(sources.train_loader(reseeded, sources.dataset_source(reseeded, "train")))
  ckpts = ckpt_lib.Checkpoints(workdir, asynchronous=False)
  try:
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="checkpoints/6 does not fit"):
      ckpts.restore_newest_intact(target, other.model)
    _, target = state_lib.abstract_state(config)
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match="checkpoints/6: its data iterator state does not fit"):
      ckpts.restore_newest_intact(target, config.model, data_iter)
  finally:
    ckpts.close()
  assert steps_in(workdir / "checkpoints") == [3, 6]
  assert not (workdir / ckpt_lib.DAMAGED_DIR).exists()


# --- best/ and checkpoints/ out of step ---------------------------------------------------------

@pytest.mark.slow
def test_a_kill_between_the_best_and_the_latest_commit_is_no_dead_end(reference, tmp_path,
                                                                      monkeypatch):
  """best/6 committed, checkpoints/6 not (the kill): the resumed run trains to 6 again and must
  save best/6 again (here every evaluation improves, so best/3 is saved again too). Before, this
  raised StepAlreadyExistsError on every resume."""
  config, workdir = copy_run(reference, tmp_path)
  shutil.rmtree(workdir / "best")
  (workdir / "best").mkdir()
  shutil.move(workdir / "checkpoints" / "6", workdir / "best" / "6")
  shutil.rmtree(workdir / "best" / "6" / "data_iter")
  real = evaluate.evaluate_split

  def improving(eval_step, state, *args, **kwargs):  # G_IoU = step / 100: always a new best
    result, examples = real(eval_step, state, *args, **kwargs)
    return {**result, "g_iou": int(jax.device_get(state.step)) / 100}, examples

  monkeypatch.setattr(evaluate, "evaluate_split", improving)
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary["best_step"] == 6 and steps_in(workdir / "best") == [6]
  assert steps_in(workdir / "checkpoints") == [3, 6]
  assert_same_final_state(reference, workdir)
  _, best_params, _ = params_of(workdir, config, "best")
  _, latest_params, _ = params_of(workdir, config, "latest")
  for a, b in zip(jax.tree_util.tree_leaves(best_params), jax.tree_util.tree_leaves(latest_params)):
    np.testing.assert_array_equal(a, b)


def test_saving_a_step_that_a_manager_already_holds_replaces_it(tmp_path):
  config = tiny_config(tmp_path / "unused")
  _, state = state_lib.create_state(config, {"params": {"w": np.zeros((3,), np.float32)}})
  ckpts = ckpt_lib.Checkpoints(tmp_path / "run", asynchronous=False)
  try:
    ckpts.save(4, state, {"n": 1}, best=True)
    second = state.replace(params={"w": np.ones((3,), np.float32)})
    ckpts.save(4, second, {"n": 2}, best=True)
    for manager in (ckpts.best, ckpts.latest):
      assert manager.all_steps() == [4]
    for which in ("best", "latest"):
      step, meta = ckpts.read_meta(which)
      assert step == 4 and meta["n"] == 2
      assert meta["fingerprint"] == ckpt_lib.fingerprint(second) != ckpt_lib.fingerprint(state)
  finally:
    ckpts.close()


# --- save before evaluation, SIGTERM, SIGKILL ----------------------------------------------------

@pytest.mark.slow
def test_training_resumes_past_a_damaged_checkpoint_and_a_failing_evaluation_loses_nothing(
    reference, tmp_path, monkeypatch, capsys):
  """Random bytes in checkpoints/6: training skips it (moved aside) and resumes from step 3; at
  step 6 the evaluation fails (a damaged validation file), after step 6 was saved; the next
  resume evaluates step 6 without training. The end state is the uninterrupted run's."""
  config, workdir = copy_run(reference, tmp_path)
  _random_bytes(workdir / "checkpoints" / "6")
  real = evaluate.evaluate_split

  def damaged_at_step_6(eval_step, state, *args, **kwargs):
    if int(jax.device_get(state.step)) == 6:
      raise OSError("validation-00000-of-00001.array_record: chunk header hash mismatch")
    return real(eval_step, state, *args, **kwargs)

  monkeypatch.setattr(evaluate, "evaluate_split", damaged_at_step_6)
  with pytest.raises(OSError, match="hash mismatch"):
    train.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert "WARNING: skipping step 6" in out and "Resumed from step 3" in out
  assert (workdir / ckpt_lib.DAMAGED_DIR / "6-state").is_dir()
  assert steps_in(workdir / "checkpoints") == [3, 6]  # saved before the evaluation failed
  monkeypatch.setattr(evaluate, "evaluate_split", real)
  train.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert re.search(r"Resumed from step 6 .*\n(.*\n)*eval at step 6: ", out), out
  assert "compiled and ran" not in out  # no training step
  assert_same_final_state(reference, workdir)


def _run_main(*args, **kwargs):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def _tiny_flags(data_dir, workdir, **overrides):
  flags = {**TINY_OVERRIDES, "data.data_dir": str(data_dir), **overrides}
  as_flag = lambda v: "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)
  return ["--config=configs/synthetic.py", f"--workdir={workdir}"] + [
      f"--config.{k}={as_flag(v)}" for k, v in flags.items()]


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_status_143_without_the_summary(reference, tmp_path):
  config, _ = reference
  workdir = tmp_path / "run"
  job = _run_main(*_tiny_flags(config.data.data_dir, workdir, num_train_steps=10_000,
                               eval_every_steps=10_000, checkpoint_every_steps=10_000))
  for line in job.stdout:
    if line.startswith("step 1 compiled"):
      break
  start = time.monotonic()
  job.send_signal(signal.SIGTERM)
  out, _ = job.communicate(timeout=120)
  assert job.returncode == train.PREEMPTED_EXIT_CODE == 143, out[-3000:]
  assert time.monotonic() - start < 60
  saved = re.search(r"SIGTERM: saved step (\d+) in .*; exiting before the run's end", out)
  assert saved, out
  assert steps_in(workdir / "checkpoints") == [int(saved.group(1))]
  assert not (workdir / "train_summary.json").exists() and "eval at step" not in out
  assert (workdir / "run.lock").read_text() == ""  # released cleanly


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from cmmp_jax import train
    from test_train import tiny_config
    train.train_and_evaluate(tiny_config(sys.argv[1]), sys.argv[2])
""")


def _start_training(tmp_path, data_dir, workdir):
  script = tmp_path / "train_tiny.py"
  script.write_text(KILL_SCRIPT)
  env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
  return subprocess.Popen([sys.executable, str(script), str(data_dir), str(workdir)], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.mark.slow
def test_sigkill_during_an_async_save_and_at_a_random_moment_then_resume_is_exact(
    reference, tmp_path, capsys):
  """kill -9 while orbax writes checkpoints/3 (its temporary folder exists), then kill -9 a
  resumed run at a random moment after compilation; a last resume ends in the uninterrupted
  run's state, and reports the lock that the killed run left."""
  config, _ = reference
  workdir = tmp_path / "run"
  job = _start_training(tmp_path, config.data.data_dir, workdir)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and job.poll() is None:
    if any("tmp" in p.name for p in workdir.glob("*/*")):  # checkpoints/ or best/
      job.kill()
      break
    time.sleep(0.005)
  assert job.wait(timeout=60) == -signal.SIGKILL, "the run ended before its first save"
  assert (workdir / "run.lock").read_text()  # the killed run's name is left behind

  seed = random.randrange(1 << 30)
  delay = random.Random(seed).uniform(0.0, 2.0)
  job = _start_training(tmp_path, config.data.data_dir, workdir)
  for line in job.stdout:
    if line.startswith("step ") and "compiled" in line:
      break
  time.sleep(delay)
  job.kill()
  job.wait(timeout=60)
  print(f"second kill {delay:.2f} s after compilation (seed {seed}), steps saved "
        f"{steps_in(workdir / 'checkpoints')}")
  capsys.readouterr()
  train.train_and_evaluate(config, str(workdir))
  assert "ended without releasing its lock" in capsys.readouterr().out
  assert_same_final_state(reference, workdir)


# --- one run per workdir, and its settings -------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from cmmp_jax.workdir import WorkdirLock
    with WorkdirLock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(600)
""")


@pytest.mark.slow
def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
    tmp_path):
  """The holder is a process that only takes the lock (a training run holds it the same way);
  the second run is main.py, which must refuse in one line before touching anything."""
  workdir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)], env=env,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    second = _run_main(*_tiny_flags(tmp_path / "data", workdir))
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert re.search(rf"^error: {re.escape(str(workdir))} is in use by another run \(pid "
                     rf"{holder.pid} on host .+, started .+; lock file .+run\.lock\): wait for "
                     "it to finish, stop it, or give another --workdir$", out, re.MULTILINE), out
    assert sorted(p.name for p in workdir.iterdir()) == ["run.lock"]  # nothing else touched
  finally:
    holder.kill()
    holder.wait()
  with workdir_lib.WorkdirLock(workdir) as lock:  # the kernel released the killed holder's lock
    assert lock.previous_holder["pid"] == holder.pid
    assert "ended without releasing its lock" in workdir_lib.describe_previous(
        lock.previous_holder)
  with workdir_lib.WorkdirLock(workdir) as lock:  # and a clean exit leaves nothing to report
    assert lock.previous_holder is None


def test_processes_of_one_multi_host_run_lock_their_own_files(tmp_path):
  """(Another process taking a held file is refused: the test above.) Within one process the lock
  is re-entrant: main.py takes it before the log file opens, train_and_evaluate again."""
  with workdir_lib.WorkdirLock(tmp_path, 0), workdir_lib.WorkdirLock(tmp_path, 1):
    with workdir_lib.WorkdirLock(tmp_path, 0):
      pass
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert json.loads((tmp_path / "run.lock.process_1").read_text())["pid"] == os.getpid()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock", "run.lock.process_1"]
  assert (tmp_path / "run.lock").read_text() == ""  # released


@pytest.mark.slow
def test_resuming_with_other_trajectory_settings_is_refused_unless_allowed(reference, tmp_path,
                                                                           capsys):
  config, workdir = copy_run(reference, tmp_path)
  other = tiny_config(config.data.data_dir, seed=1, batch_size=4, **{"optimizer.b1": 0.8})
  with pytest.raises(ckpt_lib.CheckpointSettingsError,
                     match=r"step 6 .*\(seed: checkpoint 0 vs config 1; batch_size: checkpoint 2 "
                     r"vs config 4; optimizer.b1: checkpoint 0.9 vs config 0.8\).*"
                     r"allow_changed_settings=True"):
    train.train_and_evaluate(other, str(workdir))
  # Settings that do not change the trajectory are free (more steps, evaluation cadence).
  assert not ckpt_lib.changed_settings(
      json.loads(config.to_json_best_effort()),
      tiny_config(config.data.data_dir, num_train_steps=600, eval_every_steps=7))
  assert steps_in(workdir / "checkpoints") == [3, 6]
  assert not (workdir / ckpt_lib.DAMAGED_DIR).exists()
  allowed = tiny_config(config.data.data_dir, seed=1, allow_changed_settings=True)
  capsys.readouterr()
  train.train_and_evaluate(allowed, str(workdir))  # step 6 of 6: evaluates it, trains nothing
  assert ("continuing with changed settings (config.allow_changed_settings): seed: checkpoint 0 "
          "vs config 1; the data order restarts") in capsys.readouterr().out


# --- a validation split without roads (issue 11) ------------------------------------------------

class _WithoutRoads:
  """A split's source whose masks are all background."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __repr__(self):
    return f"WithoutRoads({len(self)})"

  def __getitem__(self, index):
    example = dict(self._source[index])
    example["mask"] = np.zeros_like(np.asarray(example["mask"]))
    return example


@pytest.mark.slow
def test_a_validation_split_without_roads_falls_back_to_the_latest_checkpoint(reference, tmp_path,
                                                                              monkeypatch, capsys):
  config, _ = reference
  real = sources.dataset_source
  monkeypatch.setattr(sources, "dataset_source", lambda config, split: (
      _WithoutRoads(real(config, split)) if split == config.data.eval_split else real(config, split)))
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert out.count("WARNING: validation G_IoU is undefined") == 1  # at the first evaluation only
  assert "has no road pixel" in out and "(best)" not in out
  assert summary["best_step"] is None and summary["latest_step"] == 6
  saved = json.loads((workdir / "train_summary.json").read_text())
  assert saved["best_step"] is None and saved["val"]["recall"] is None
  assert steps_in(workdir / "best") == [] and steps_in(workdir / "checkpoints") == [3, 6]
  monkeypatch.setattr(sources, "dataset_source", real)
  result = evaluate.evaluate(config, str(workdir), split="test")  # config.eval.checkpoint 'best'
  assert result["step"] == 6
  assert "WARNING: no best checkpoint" in capsys.readouterr().out
  assert result["checkpoint"] == "latest (no usable best checkpoint)"  # the JSON says so too


def test_the_summary_names_no_best_step_when_no_evaluation_could_select_one():
  nan = float("nan")
  undefined = [{"step": 3, "val": {"g_iou": nan, "recall": nan}},
               {"step": 6, "val": {"g_iou": 0.0, "recall": None}, "test": {"g_iou": 0.4}}]
  assert train.summarize(undefined, 6) == {
      "best_step": None, "latest_step": 6, "selection": "latest",
      "val": {"g_iou": 0.0, "recall": None}, "test": {"g_iou": 0.4}}
  mixed = [{"step": 3, "val": {"g_iou": 0.2, "recall": 0.5}},
           {"step": 6, "val": {"g_iou": 0.2, "recall": 0.6}},
           {"step": 9, "val": {"g_iou": nan, "recall": nan}}]
  assert train.summarize(mixed, 9)["best_step"] == 3  # the first of equals, as the loop keeps it
