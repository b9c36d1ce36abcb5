"""End to end on the tiny synthetic city: train, checkpoint, resume, evaluate, bad input."""
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
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
  assert summary["test"]["num_tiles"] == 2
  assert json.loads((workdir / "train_summary.json").read_text())["best_step"] in (3, 6)
  step, params, _ = params_of(workdir, config)
  assert step == 6 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_a_short_run_learns_roads(data_dir, tmp_path, capsys):
  """48 steps of the tiny model (the `trained` run's program, so no new compilation): the
  training loss falls and the validation predictions beat both trivial answers. All background
  has recall 0; all road has precision = the road fraction of the validation masks (and recall
  1). An untrained model is one or the other, or noise at about the road fraction's precision.
  Measured (with the release's augmentations): loss 1.34 -> 1.19, precision 0.65 and recall
  0.28-0.45 against a road fraction of 0.29."""
  config = tiny_config(data_dir, num_train_steps=48, eval_every_steps=48,
                       checkpoint_every_steps=48, log_every_steps=8)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [float(v) for v in re.findall(r"step \d+/48  loss ([\d.]+)", capsys.readouterr().out)]
  assert len(losses) == 6 and losses[-1] < 0.92 * losses[0], losses
  masks = [example["mask"] for example in sources.dataset_source(config, config.data.eval_split)]
  road_fraction = float(np.mean([m > 0 for m in masks]))
  assert 0.05 < road_fraction < 0.4
  val = summary["val"]
  assert val["precision"] > 1.6 * road_fraction and val["recall"] > 0.15, (val, road_fraction)


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
  # graph metrics (config.eval.graph_metrics, on by default; tests/test_graph_eval.py)
  for key in ("apls", "topo_precision", "topo_recall", "topo_f1"):
    assert 0.0 <= saved[key] <= 1.0
  assert saved["graph_gt_source"] == "from vector labels" and saved["num_graph_tiles"] == 2
  assert [t["tile_id"] for t in saved["graph_tiles"]] == ["test_00000", "test_00001"]
  assert saved["metres_per_pixel_source"].startswith("synthetic city generator")


@pytest.mark.slow
def test_predict_writes_road_maps_of_test_tiles(trained, tmp_path):
  from cmmp_jax import predict
  config, workdir, _ = trained
  config = tiny_config(config.data.data_dir, **{"predict.output_dir": str(tmp_path / "pred"),
                                                "predict.num_examples": 2,
                                                "predict.window": 64, "predict.overlap": 16})
  summary = predict.predict_from_checkpoint(config, str(workdir))
  names = sorted(pathlib.Path(p).name for p in summary["written"])
  # config.graph.enabled (default): each tile's road graph (cmmp_jax.graphs) too.
  assert names == [f"test_0000{i}_{name}" for i in (0, 1) for name in (
      "graph.geojson", "graph.graphml", "label.png", "overlay.png", "prob.png", "road.png")]
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
  """framework.py's `fit` from lr 1e-4, patience 5, factor 10, stop below 1e-8: the first
  evaluation sets the best, every later one is worse. After 6 bad evaluations (more than 5) the
  lr is divided; the stop test comes BEFORE the division, so the run trains through 1e-9."""
  plateau = state_lib.PlateauSchedule(patience=5, factor=10.0, min_lr=1e-8, lr=1e-4)
  changes, stop_at = [], None
  lr = 1e-4
  for evaluation in range(1, 100):
    new_lr, stop = plateau.update(0.5 if evaluation == 1 else 0.1)
    if stop:
      stop_at = evaluation
      break
    if new_lr != lr:
      changes.append((evaluation, new_lr))
      lr = new_lr
  # The release's sequence, lr in Python floats (1e-4 / 10 / 10 ... as PyTorch keeps it).
  expected = [(7, 1e-4 / 10), (13, 1e-4 / 10 / 10), (19, 1e-4 / 10 / 10 / 10),
              (25, 1e-4 / 10 / 10 / 10 / 10), (31, 1e-4 / 10 / 10 / 10 / 10 / 10)]
  assert changes == expected
  assert stop_at == 37 and lr == pytest.approx(1e-9)
  # An improvement resets the count: 5 bad evaluations, a better one, 5 bad: no change.
  plateau = state_lib.PlateauSchedule(patience=5, factor=10.0, min_lr=1e-8, lr=1e-4)
  for value in [0.5, *[0.4] * 5, 0.6, *[0.4] * 5]:
    assert plateau.update(value) == (1e-4, False)
  # A checkpoint written before the schedule kept its rate: the state's rate is used.
  old = state_lib.PlateauSchedule(patience=0, factor=10.0, min_lr=1e-8)
  assert old.update(0.5, 2e-4) == (2e-4, False) and old.update(0.1, 2e-4) == (2e-5, False)


def _tiny_state(config):
  return state_lib.create_state(config, {"params": {"w": np.zeros((2,), np.float32)}})[1]


@pytest.mark.parametrize("schedule,step,reset,expected_lr,message", [
    ("plateau", 5, False, 1e-5, "differs from the 1.00e-04 this run started with"),
    ("plateau", 5, True, 3e-4, "config.optimizer.reset_learning_rate; the checkpoint held 1.00e-05"),
    ("plateau", 0, False, 3e-4, "fine-tuning from step 0"),
    ("constant", 5, False, 3e-4, "constant schedule"),
])
def test_a_resumed_run_says_which_learning_rate_it_uses(capsys, schedule, step, reset,
                                                        expected_lr, message):
  """The run started at 1e-4 and its plateau schedule had reached 1e-5; the command line now
  asks for 3e-4."""
  saved = synthetic.get_config()
  saved.update_from_flattened_dict({"optimizer.schedule": schedule,
                                    "optimizer.learning_rate": 1e-4})
  state = state_lib.set_learning_rate(_tiny_state(saved), 1e-5)
  plateau = state_lib.PlateauSchedule(5, 10.0, 1e-8, best=0.4, bad_evals=3, lr=1e-5)
  meta = {"config": json.loads(saved.to_json_best_effort())}
  config = synthetic.get_config()
  config.update_from_flattened_dict({"optimizer.schedule": schedule,
                                     "optimizer.learning_rate": 3e-4,
                                     "optimizer.reset_learning_rate": reset})
  state, plateau = train.learning_rate_on_resume(config, state, plateau, meta, step)
  assert float(state_lib.current_learning_rate(state)) == pytest.approx(expected_lr)
  if schedule == "plateau":
    assert plateau.lr == expected_lr and plateau.best == 0.4
    assert plateau.bad_evals == (3 if expected_lr == 1e-5 else 0)
  assert message in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("at_step", [2, 3])
def test_sigterm_saves_and_exits(trained, tmp_path, monkeypatch, at_step):
  """Preemption: SIGTERM during step 2 -> the run saves step 2 and raises PreemptedError (main.py
  exits with status 143, tests/test_reliability.py); a rerun resumes.
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
  with pytest.raises(train.PreemptedError, match=f"saved step {at_step} in"):
    train.train_and_evaluate(config, str(run))
  assert not (run / "train_summary.json").exists()  # the run did not finish
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


@pytest.mark.slow
def test_batch_norm_statistics_per_group_of_images_like_the_release():
  """batch_norm_group_size=2 on a batch of 4: the loss is that of the two halves run through
  the model separately (each BatchNorm sees 2 images) and concatenated; the running statistics
  are the first half's (DataParallel keeps device 0's replica's buffers)."""
  from cmmp_jax import losses  # pylint: disable=g-import-not-at-top
  config = synthetic_config(**{"model.name": "image_only", "model.width": 0.125,
                               "model.depths": (1, 1, 1, 1), "batch_size": 4,
                               "batch_norm_group_size": 2})
  variables, _ = state_lib.init_variables(config, (1, 32, 32, 3), (1, 32, 32, 1))
  model = state_lib.model_from_config(config)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
           "aux": rng.normal(size=(4, 32, 32, 1)).astype(np.float32),
           "mask": (rng.uniform(size=(4, 32, 32, 1)) > 0.7).astype(np.float32)}
  batch["image"][2:] = batch["image"][2:] * 3 + 2  # halves with other statistics
  params, stats = variables["params"], variables["batch_stats"]
  grouped = jax.jit(jax.value_and_grad(steps.make_loss_fn(model, config), has_aux=True))
  (loss, updates), grads = grouped(params, stats, batch)

  def halves_loss(params):
    halves = [model.apply({"params": params, "batch_stats": stats}, batch["image"][i:i + 2],
                          batch["aux"][i:i + 2], train=True, mutable=["batch_stats"])
              for i in (0, 2)]
    logits = jnp.concatenate([h[0] for h in halves])
    return losses.bce_dice_loss(logits, batch["mask"]), halves[0][1]

  (expected, first_half), expected_grads = jax.jit(jax.value_and_grad(halves_loss, has_aux=True))(
      params)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  leaves = lambda tree: jax.tree_util.tree_leaves(tree)
  for got, want in zip(leaves(grads), leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)
  for got, want in zip(leaves(updates["batch_stats"]), leaves(first_half["batch_stats"])):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)  # float32 reduction order
  # Statistics over the whole batch give other gradients and running statistics (so the
  # comparisons above can fail).
  config.batch_norm_group_size = 0
  (_, whole_updates), whole_grads = jax.jit(jax.value_and_grad(
      steps.make_loss_fn(model, config), has_aux=True))(params, stats, batch)
  difference = lambda a, b: max(float(np.max(np.abs(x - y))) / (float(np.max(np.abs(y))) + 1e-12)
                                for x, y in zip(leaves(a), leaves(b)))
  assert difference(whole_grads, grads) > 0.05
  assert difference(whole_updates["batch_stats"], updates["batch_stats"]) > 0.05
  config.batch_norm_group_size = 3
  with pytest.raises(ValueError, match="batch_norm_group_size = 3 must be 0"):
    config_checks.validate(config)
