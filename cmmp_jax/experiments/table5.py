"""The paper's Table V in miniature: fusion strategies trained with the same budget.

  python -m cmmp_jax.experiments.table5 [--config=configs/synthetic.py[:presets]]
      [--workdir=runs/table5] [--models=image_only,aux_only,early_fusion,late_fusion,cmmpnet]
      [--seeds=0,1,2] [--config.num_epochs=12]

Trains each model (a preset of configs/presets.py, applied on top of --config and its overrides)
in WORKDIR/<model> (resuming if interrupted), then prints test A_IoU / G_IoU at the
best-validation evaluation, side by side (mean +- standard deviation over --seeds), and writes
WORKDIR/table5.json. Every model sees the same data, seeds, schedule and number of steps.

The test APLS column (road graphs: cmmp_jax.graph_eval, tile mean over the test tiles with
roads, in %) comes from `--mode=eval` of each run's best checkpoint on the test split (the
checkpoint whose test A_IoU / G_IoU the table shows), written as WORKDIR/<model>/eval_test_*.json;
--config.eval.graph_metrics=False leaves it out ("-").
"""
from __future__ import annotations

import copy
import pathlib

from absl import app
from absl import flags
from ml_collections import config_flags

from cmmp_jax import config_checks, evaluate, reporting, train
from configs import presets

MODELS = ("image_only", "aux_only", "early_fusion", "late_fusion", "cmmpnet")
LABELS = {"image_only": "image only (D-LinkNet)", "aux_only": "trajectory only (D-LinkNet)",
          "early_fusion": "early fusion", "late_fusion": "late fusion",
          "gated_fusion": "gated fusion (DeepDualMapper-style)", "cmmpnet": "CMMPNet"}


def _mean_std(values):
  if not values or any(v is None or v != v for v in values):  # not measured / undefined
    return "-"
  values = [100 * v for v in values]
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f"{mean:.2f}"
  std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
  return f"{mean:.2f} +- {std:.2f}"


def format_table(rows) -> str:
  """rows: (model name, [summary per seed]) with summaries as train_and_evaluate returns them,
  plus 'test_graph' (the best checkpoint's graph metrics on test, `run`) when measured.
  Percentages; with several seeds, mean +- sample standard deviation; '-' when not measured."""
  lines = [f"| {'model':36s} | {'test A_IoU':15s} | {'test G_IoU':15s} | {'val G_IoU':15s} | "
           f"{'test APLS':15s} | best steps |",
           f"|{'-' * 38}|{'-' * 17}|{'-' * 17}|{'-' * 17}|{'-' * 17}|------------|"]
  for name, runs in rows:
    runs = runs if isinstance(runs, (list, tuple)) else [runs]
    cells = [_mean_std([r[split][key] for r in runs])
             for split, key in (("test", "a_iou"), ("test", "g_iou"), ("val", "g_iou"))]
    cells.append(_mean_std([(r.get("test_graph") or {}).get("apls") for r in runs]))
    steps = ",".join(str(r["best_step"]) for r in runs)
    lines.append(f"| {LABELS.get(name, name):36s} | {cells[0]:15s} | {cells[1]:15s} | "
                 f"{cells[2]:15s} | {cells[3]:15s} | {steps:10s} |")
  return "\n".join(lines)


GRAPH_KEYS = ("apls", "apls_gt_onto_prop", "apls_prop_onto_gt", "topo_precision", "topo_recall",
              "topo_f1", "num_graph_tiles", "num_tiles_without_gt_roads", "graph_gt_source",
              "metres_per_pixel_source", "step")


def best_checkpoint_graph_metrics(run_config, run_dir) -> dict:
  """APLS / TOPO of run_dir's best checkpoint on the test split (`--mode=eval`; its JSON,
  per-tile records included, stays in run_dir)."""
  eval_config = copy.deepcopy(run_config)
  eval_config.eval.checkpoint = "best"
  result = evaluate.evaluate(eval_config, str(run_dir), split=run_config.data.test_split)
  return {key: result[key] for key in GRAPH_KEYS if key in result}


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
      summary = {"seed": seed, **summary}
      if run_config.eval.graph_metrics:
        summary["test_graph"] = best_checkpoint_graph_metrics(run_config, run_dir)
      results[name].append(summary)
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
