"""main.py as a user runs it: the console carries only the run's own lines, the rest goes to the
workdir's log file, and absl's --verbosity brings the library logs back."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = ["--config=configs/synthetic.py", "--config.data.config=tiny",
        "--config.num_train_steps=6", "--config.eval_every_steps=3",
        "--config.log_every_steps=3", "--config.batch_size=2", "--config.eval_batch_size=2",
        "--config.model.width=0.125", "--config.model.depths=(1,1,1,1)",
        "--config.optimizer.schedule=constant"]

# Every line the console may show during training, in the order of a fresh run.
CONSOLE_LINES = [
    r"building dataset synthetic/tiny into .* \.\.\.",
    r"built in [\d.]+ s",
    r"cmmpnet \(dlinknet34, width 0\.125, float32, transposed convolutions subpixel \(auto\)\): "
    r"[\d,]+ parameters, init random",
    r"data synthetic/tiny: \d+ train examples, \d+ steps/epoch of 2, 6 steps; 1 cpu device\(s\)",
    r"log .*log\.txt, parameter table .*parameters\.txt",
    r"step 1 compiled and ran in [\d.]+ s",
    r"step 3/6  loss [\d.]+  lr 1\.00e-03  [\d.]+ img/s  ETA \d+:\d\d",
    r"eval at step 3: val G_IoU [\d.]+ A_IoU [\d.]+ \| test G_IoU [\d.]+ A_IoU [\d.]+( \(best\))?",
    r"step 6/6  loss [\d.]+  lr 1\.00e-03  [\d.]+ img/s  ETA 0:00",
    r"eval at step 6: val G_IoU [\d.]+ A_IoU [\d.]+ \| test G_IoU [\d.]+ A_IoU [\d.]+( \(best\))?",
    r"best validation G_IoU [\d.]+ at step [36] \(test G_IoU [\d.]+ A_IoU [\d.]+\) -> .*"
    r"train_summary\.json; checkpoints in .*",
]


def run_main(*args):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900, check=False)


def test_console_is_for_people_and_the_log_file_has_the_rest(tmp_path):
  workdir = tmp_path / "run"
  train = run_main(*TINY, f"--config.data.data_dir={tmp_path / 'data'}", f"--workdir={workdir}")
  assert train.returncode == 0, train.stderr[-3000:]
  # No library INFO lines, banners or build progress bars (warnings may appear, e.g. orbax's
  # "Waiting for previous save" on a loaded machine).
  assert not re.search(r"^I\d{4} |oneDNN|Generating|Shuffling|%\|", train.stderr, re.MULTILINE), (
      train.stderr[-3000:])
  lines = train.stdout.splitlines()
  assert len(lines) == len(CONSOLE_LINES), train.stdout
  for line, pattern in zip(lines, CONSOLE_LINES):
    assert re.fullmatch(pattern, line), (line, pattern)

  log = (workdir / "log.txt").read_text()
  assert all(line in log for line in lines)  # the console's lines are in the log too
  assert "config:\n" in log and "orbax" in log  # and what the console leaves out
  table = (workdir / "parameters.txt").read_text()
  assert "finalconv/conv/kernel" in table and len(table.splitlines()) > 50

  evaluation = run_main(*TINY, f"--config.data.data_dir={tmp_path / 'data'}",
                        f"--workdir={workdir}", "--mode=eval", "--verbosity=0")
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  # The pixel metrics, then the road-graph metrics (APLS / TOPO) of the same split.
  assert re.fullmatch(r"test @ step [36]: G_IoU .* \(2 tiles\) -> .*eval_test_[36]\.json\n"
                      r"  graph metrics: APLS .*\n", evaluation.stdout), evaluation.stdout
  # --verbosity=0: absl's INFO records of the libraries (orbax restoring) reach the console.
  assert re.search(r"^I\d{4} .*orbax", evaluation.stderr, re.MULTILINE), evaluation.stderr[-2000:]
