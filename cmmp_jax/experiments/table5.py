"""The paper's Table V in miniature: fusion strategies trained with the same budget.

  python -m cmmp_jax.experiments.table5 [--config=configs/synthetic.py[:presets]]
      [--workdir=runs/table5] [--models=image_only,aux_only,early_fusion,late_fusion,cmmpnet]
      [--seeds=0,1,2] [--config.num_epochs=12]

Trains each model (a preset of configs/presets.py, applied on top of --config and its overrides)
in WORKDIR/<model> (resuming if interrupted), then prints test A_IoU / G_IoU at the
best-validation evaluation, side by side (mean +- standard deviation over --seeds), and writes
WORKDIR/table5.json. Every model sees the same data, seeds, schedule and number of steps.
"""
from __future__ import annotations

import copy
import pathlib

from absl import app
from absl import flags
from ml_collections import config_flags

from cmmp_jax import config_checks, reporting, train
from configs import presets

MODELS = ("image_only", "aux_only", "early_fusion", "late_fusion", "cmmpnet")
LABELS = {"image_only": "image only (D-LinkNet)", "aux_only": "trajectory only (D-LinkNet)",
          "early_fusion": "early fusion", "late_fusion": "late fusion",
          "gated_fusion": "gated fusion (DeepDualMapper-style)", "cmmpnet": "CMMPNet"}


def _mean_std(values):
  values = [100 * v for v in values]
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f"{mean:.2f}"
  std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
  return f"{mean:.2f} +- {std:.2f}"


def format_table(rows) -> str:
  """rows: (model name, [summary per seed]) with summaries as train_and_evaluate returns them.
  Percentages; with several seeds, mean +- sample standard deviation."""
  lines = [f"| {'model':36s} | {'test A_IoU':15s} | {'test G_IoU':15s} | {'val G_IoU':15s} | "
           "best steps |",
           f"|{'-' * 38}|{'-' * 17}|{'-' * 17}|{'-' * 17}|------------|"]
  for name, runs in rows:
    runs = runs if isinstance(runs, (list, tuple)) else [runs]
    cells = [_mean_std([r[split][key] for r in runs])
             for split, key in (("test", "a_iou"), ("test", "g_iou"), ("val", "g_iou"))]
    steps = ",".join(str(r["best_step"]) for r in runs)
    lines.append(f"| {LABELS.get(name, name):36s} | {cells[0]:15s} | {cells[1]:15s} | "
                 f"{cells[2]:15s} | {steps:10s} |")
  return "\n".join(lines)


def run(config, workdir, models=MODELS, seeds=(0,)) -> list:
  """The CLI's work: trains config with each model's preset and each seed, prints the table and
  returns its rows (model name, [summary per seed])."""
  workdir = pathlib.Path(workdir)
  results = {name: [] for name in models}
  for seed in seeds:
    for name in models:
      run_config = presets.apply(copy.deepcopy(config), name)
      run_config.seed = seed
      config_checks.validate(run_config)
      reporting.console(f"=== {name}, seed {seed}")
      # Seed 0 runs in WORKDIR/<model> (the single-seed layout), others in WORKDIR/seed<k>/<model>.
      run_dir = workdir / name if seed == 0 else workdir / f"seed{seed}" / name
      summary = train.train_and_evaluate(run_config, str(run_dir))
      if not summary.get("test"):
        raise RuntimeError(f"{name}: no test metrics (set eval_on_test=True)")
      results[name].append({"seed": seed, **summary})
      (workdir / "table5.json").write_text(reporting.to_json(results))
  rows = [(name, runs) for name, runs in results.items() if runs]
  print(format_table(rows))
  return rows


def define_flags() -> None:
  """The command line's flags (defined only when this module runs as the program)."""
  config_flags.DEFINE_config_file(
      "config", "configs/synthetic.py", "Config file (with :presets) of every run; "
      "--config.a.b=value overrides apply to every run.", lock_config=True)
  flags.DEFINE_string("workdir", "runs/table5", "One subfolder per model (and seed).")
  flags.DEFINE_list("models", list(MODELS), "Presets, one row each (configs/presets.py).")
  config_checks.define_integer_list("seeds", [0], "Seeds (initialisation and data order); the "
                                    "table gives mean +- standard deviation over them.")


def main(argv):
  config = config_checks.config_from_flags(argv)
  run(config, flags.FLAGS.workdir, flags.FLAGS.models, flags.FLAGS.seeds)


if __name__ == "__main__":
  define_flags()
  app.run(main)
