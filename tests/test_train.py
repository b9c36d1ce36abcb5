"""End to end on the tiny synthetic city: train, checkpoint, resume, evaluate, bad input."""
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from cmmp_jax import checkpoint as ckpt_lib
from cmmp_jax import config_checks, evaluate, reporting, sharding, steps, train
from cmmp_jax import state as state_lib
from cmmp_jax.data import sources
from configs import synthetic

# One residual block per encoder stage (as in tests/test_models.py, test_sharding.py and
# test_main.py): what is tested here (checkpoints, resume, evaluation, errors) does not depend on
# the depth, it compiles in a fraction of the time, and the compiled initialiser and steps of this
# tiny CMMPNet are shared with test_sharding and test_main through the session's compilation cache
# (tests/conftest.py).
TINY_OVERRIDES = {
    "data.config": "tiny", "num_train_steps": 6, "eval_every_steps": 3,
    "checkpoint_every_steps": 3, "log_every_steps": 3, "batch_size": 2, "eval_batch_size": 2,
    "model.width": 0.125, "model.depths": (1, 1, 1, 1), "optimizer.schedule": "constant",
    "image_summaries": 2,
}


def synthetic_config(**overrides):
  """configs/synthetic.py with {dotted.field: value} overrides, validated as main.py does."""
  config = synthetic.get_config()
  config.update_from_flattened_dict(overrides)
  config_checks.validate(config)
  return config


def tiny_config(data_dir, **overrides):
  return synthetic_config(**{**TINY_OVERRIDES, "data.data_dir": str(data_dir), **overrides})


def params_of(workdir, config, which="latest"):
  _, state, step, _ = evaluate.restore_for_inference(config, workdir, which)
  return step, jax.device_get(state.params), jax.device_get(state.batch_stats)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(data_dir)
  summary = train.train_and_evaluate(config, str(workdir))
  return config, workdir, summary


@pytest.mark.slow
def test_training_writes_checkpoints_summaries_and_metrics(trained):
  config, workdir, summary = trained
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      3, 6]
  assert any(p.name.isdigit() for p in (workdir / "best").iterdir())
  assert list(workdir.glob("events.out.tfevents*"))  # TensorBoard summaries
  assert 0.0 <= summary["val"]["g_iou"] <= 1.0 and summary["test"]["num_tiles"] == 2
  assert json.loads((workdir / "train_summary.json").read_text())["best_step"] in (3, 6)
  step, params, _ = params_of(workdir, config)
  assert step == 6 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_resume_continues_exactly(trained, tmp_path):
  """Kill after step 3 (here: drop the later checkpoint), resume: the same step-6 state as the
  uninterrupted run (params, BatchNorm statistics, optimizer, data order)."""
  config, workdir, _ = trained
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  for f in resumed.glob("events.out.tfevents*"):
    f.unlink()
  train.train_and_evaluate(config, str(resumed))
  step_a, params_a, stats_a = params_of(workdir, config)
  step_b, params_b, stats_b = params_of(resumed, config)
  assert step_a == step_b == 6
  for a, b in zip(jax.tree_util.tree_leaves((params_a, stats_a)),
                  jax.tree_util.tree_leaves((params_b, stats_b))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_eval_mode_writes_metrics_json(trained):
  config, workdir, _ = trained
  result = evaluate.evaluate(config, str(workdir), split="test")
  saved = json.loads((workdir / f"eval_test_{result['step']}.json").read_text())
  assert saved["num_tiles"] == 2 and saved["g_iou"] == pytest.approx(result["g_iou"])
  for key in ("g_iou", "a_iou", "mean_tile_iou", "precision", "recall", "f1"):
    assert key in saved


@pytest.mark.slow
def test_predict_writes_road_maps_of_test_tiles(trained, tmp_path):
  from cmmp_jax import predict
  config, workdir, _ = trained
  config = tiny_config(config.data.data_dir, **{"predict.output_dir": str(tmp_path / "pred"),
                                                "predict.num_examples": 2,
                                                "predict.window": 64, "predict.overlap": 16})
  summary = predict.predict_from_checkpoint(config, str(workdir))
  names = sorted(pathlib.Path(p).name for p in summary["written"])
  assert names == ["test_00000_prob.png", "test_00000_road.png", "test_00001_prob.png",
                   "test_00001_road.png"]
  from PIL import Image
  road = np.asarray(Image.open(tmp_path / "pred" / "test_00000_road.png"))
  assert road.shape == (64, 64) and set(np.unique(road)) <= {0, 255}


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_without_damage(trained):
  config, workdir, _ = trained
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  other = tiny_config(config.data.data_dir, **{"model.backbone": "linknet34"})
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="model.backbone"):
    evaluate.restore_for_inference(other, str(workdir))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="model.backbone"):
    train.train_and_evaluate(other, str(workdir))
  after = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  assert before == after


def test_missing_dataset_is_named(tmp_path):
  """(Config typos: tests/test_configs.py.)"""
  config = tiny_config(tmp_path / "nowhere", **{"data.build_if_missing": False})
  with pytest.raises(sources.DatasetMissingError, match="python -m data_builders.build synthetic"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(trained, tmp_path):
  """Adam with lr 1e38 moves every weight to +-1e38 in step 1; step 2's activations overflow."""
  config, _, _ = trained
  exploding = tiny_config(config.data.data_dir, **{
      "optimizer.learning_rate": 1e38, "checkpoint_every_steps": 1, "log_every_steps": 1,
      "eval_every_steps": 100})
  run = tmp_path / "nan"
  with pytest.raises(train.NonFiniteLossError, match=r"at step 2;.*intact \(step 1\)"):
    train.train_and_evaluate(exploding, str(run))
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
  step, params, _ = params_of(run, exploding)
  assert step == 1 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_plateau_schedule_follows_the_release():
  plateau = state_lib.PlateauSchedule(patience=2, factor=10.0, min_lr=1e-3)
  lr = 0.1
  trace = []
  for value in [0.5, 0.6, 0.6, 0.6, 0.59, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]:
    lr, stop = plateau.update(value, lr)
    trace.append((round(lr, 6), stop))
  # Not improved for more than 2 evaluations (the 3rd bad one) -> lr / 10; below min -> stop.
  assert trace[4] == (0.01, False) and trace[5] == (0.01, False)
  assert trace[8] == (0.001, False) and trace[11] == (0.0001, True)


@pytest.mark.slow
@pytest.mark.parametrize("at_step", [2, 3])
def test_sigterm_saves_and_exits(trained, tmp_path, monkeypatch, at_step):
  """Preemption: SIGTERM during step 2 -> the run saves step 2 and returns; a rerun resumes.
  During step 3, whose regular checkpoint is written just before the signal is seen, that
  checkpoint is the preemption save (no second save of the same step)."""
  import os
  import signal
  config, _, _ = trained
  make_step = steps.make_train_step

  def make_step_that_gets_preempted(*args, **kwargs):
    step = make_step(*args, **kwargs)
    calls = []

    def run(state, batch):
      calls.append(1)
      if len(calls) == at_step:
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's handler, not fatal
      return step(state, batch)
    return run

  monkeypatch.setattr(steps, "make_train_step", make_step_that_gets_preempted)
  run = tmp_path / "preempted"
  train.train_and_evaluate(config, str(run))
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
      str(at_step)]
  if at_step == 2:  # resuming from either save is the same code path: test it once
    monkeypatch.setattr(steps, "make_train_step", make_step)
    train.train_and_evaluate(config, str(run))
    assert "6" in [p.name for p in (run / "checkpoints").iterdir()]


@pytest.mark.slow
def test_a_non_finite_step_leaves_the_whole_state_unchanged():
  """The guard in steps.make_train_step: a NaN input gives a NaN loss; params, Adam moments, BatchNorm
  statistics and the step count stay what they were (and a finite batch does change them)."""
  config = synthetic_config(**{
      "model.name": "image_only", "model.width": 0.125, "model.depths": (1, 1, 1, 1)})
  mesh = sharding.make_mesh()
  model, state = state_lib.init_state(config, (1, 32, 32, 3), (1, 32, 32, 1), 10)
  state = sharding.put_replicated(state, mesh)
  step = steps.make_train_step(model, config, mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
           "aux": rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32),
           "mask": (rng.uniform(size=(2, 32, 32, 1)) > 0.7).astype(np.float32)}
  state, metrics = step(state, sharding.to_global_batch(batch, mesh))  # Adam moments become nonzero
  assert bool(metrics["finite"])
  before = jax.device_get(state)
  batch["image"][1, 3, 4, 0] = np.nan
  state, metrics = step(state, sharding.to_global_batch(batch, mesh))
  assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(a, b)
  batch["image"][1, 3, 4, 0] = 0.0
  state, metrics = step(state, sharding.to_global_batch(batch, mesh))
  assert bool(metrics["finite"]) and int(jax.device_get(state.step)) == 2
  assert not np.array_equal(jax.device_get(state.params["finalconv"]["conv"]["kernel"]),
                            before.params["finalconv"]["conv"]["kernel"])


def test_metric_json_is_standard_json_with_null_for_undefined():
  text = reporting.to_json({"precision": float("nan"), "g_iou": 0.5, "h": [{"x": float("inf")}]})
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"precision": None, "g_iou": 0.5, "h": [{"x": None}]}
