"""The accelerator check: its one command runs end to end on the CPU (--smoke), and the
arithmetic it predicts the largest batch with."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import accelerator_check

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_max_batch_prediction_by_hand():
  # 100 MiB of state (arguments less the inputs of 4 images of 64 x 64 x 5 float32), each image
  # 250 MiB: total = 100 + 4 * 250 MiB. Within 2 GiB less 3 %: (0.97 * 2048 - 100) // 250 = 7.
  mib = 2 ** 20
  inputs = 4 * 64 * 64 * 5 * 4
  memory = {"argument_bytes": 100 * mib + inputs, "total_bytes": 100 * mib + 4 * 250 * mib}
  predicted, per_image = accelerator_check.predict_max_batch(memory, 4, 64, 2048 * mib)
  assert per_image == 250 * mib
  assert predicted == 7
  # Never below one image, even when one image alone would not fit.
  assert accelerator_check.predict_max_batch(memory, 4, 64, 200 * mib)[0] == 1


@pytest.mark.slow
def test_the_one_command_runs_end_to_end_in_smoke_mode(tmp_path):
  out = tmp_path / "check"
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      ["benchmarks/accelerator_check.sh", "--smoke", f"--out={out}", "--budget_s=900",
       ], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=900, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  report = json.loads((out / "accelerator_check.json").read_text())
  assert report["errors"] == [] and report["skipped"] == [], report
  assert report["meta"]["smoke"] is True and report["meta"]["platform"] == "cpu"
  rows = {r["key"]: r for r in report["results"]}
  # Every kind of measurement ran once: both formulations' train steps (which the check
  # compares), an eval step, a remat step, both largest-batch searches, the pipeline.
  expected = {"train/64/dilated/remat=off", "train/64/subpixel/remat=off",
              "eval/64/subpixel/remat=off", "train/64/subpixel/remat=on", "pipeline",
              f"maxbatch/64/{report['summary']['fastest_method']}/remat=off",
              f"maxbatch/64/{report['summary']['fastest_method']}/remat=on"}
  assert expected <= set(rows), sorted(rows)
  for key in expected:
    if key.startswith(("train", "eval")):
      row = rows[key]
      assert row["steps_timed"] == 2 and row["images_per_s"] > 0 and row["compile_s"] > 0
      assert row["nonfinite_steps"] == 0 if row["kind"] == "train" else True
  train = rows["train/64/subpixel/remat=off"]
  assert train["images_per_s"] == pytest.approx(2 / (train["ms_per_step"] / 1e3))
  # A train step (forward + backward + Adam) costs more than the forward alone.
  assert train["flops_per_image"] > 2 * rows["eval/64/subpixel/remat=off"]["flops_per_image"]
  for remat in ("off", "on"):
    search = rows[f"maxbatch/64/{report['summary']['fastest_method']}/remat={remat}"]
    assert search["predicted"] == 2 and search["max_batch"] == 2 and search["capped"]
  assert rows["pipeline"]["results"][0]["examples_per_s"] > 0
  assert 0 < report["summary"]["pipeline_over_step"] < 1e4
  table = (out / "accelerator_check.md").read_text()
  assert "| train | 64 | subpixel | off | 2 |" in table
  assert "fastest formulation at 64 px" in table and "Input pipeline" in table
  # PyTorch is not a dependency: without it the release comparison says why it is missing.
  if "release" not in rows:
    assert "release: skipped" in done.stdout
