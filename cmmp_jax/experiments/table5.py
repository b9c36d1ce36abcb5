"""The paper's Table V in miniature: fusion strategies trained with the same budget.

  python -m cmmp_jax.experiments.table5 --config=configs/synthetic.py [--workdir runs/table5]
      [--models image_only,aux_only,early_fusion,late_fusion,cmmpnet] [--seeds 0,1,2]
      [--set num_epochs=12]

Trains each model (a preset of the config) in WORKDIR/<model> (resuming if interrupted), then
prints test A_IoU / G_IoU at the best-validation evaluation, side by side (mean +- standard
deviation over --seeds), and writes WORKDIR/table5.json. Every model sees the same data,
seeds, schedule and number of steps.
"""
from __future__ import annotations

import argparse
import ast
import pathlib

MODELS = ("image_only", "aux_only", "early_fusion", "late_fusion", "cmmpnet")
LABELS = {"image_only": "image only (D-LinkNet)", "aux_only": "trajectory only (D-LinkNet)",
          "early_fusion": "early fusion", "late_fusion": "late fusion",
          "gated_fusion": "gated fusion (DeepDualMapper-style)", "cmmpnet": "CMMPNet"}


def _parse_overrides(items):
  overrides = {}
  for item in items or []:
    key, _, value = item.partition("=")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return overrides


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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--workdir", default="runs/table5")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--seeds", default="0",
                      help="comma-separated seeds (initialisation and data order); the table "
                      "gives mean +- standard deviation over them")
  parser.add_argument("--set", action="append", metavar="FIELD=VALUE",
                      help="config override applied to every run, e.g. num_epochs=12")
  args = parser.parse_args(argv)
  from cmmp_jax import configs, train  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(args.workdir)
  seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  results = {name: [] for name in models}
  base, _, presets = args.config.partition(":")
  for seed in seeds:
    for name in models:
      spec = f"{base}:{','.join(p for p in (presets, name) if p)}"
      config = configs.load_config(spec, {**_parse_overrides(args.set), "seed": seed})
      print(f"=== {name}, seed {seed}: {spec}", flush=True)
      # Seed 0 runs in WORKDIR/<model> (the single-seed layout), others in WORKDIR/seed<k>/<model>.
      run_dir = workdir / name if seed == 0 else workdir / f"seed{seed}" / name
      summary = train.train_and_evaluate(config, str(run_dir))
      if not summary.get("test"):
        raise RuntimeError(f"{name}: no test metrics (set eval_on_test=True)")
      results[name].append({"seed": seed, **summary})
      (workdir / "table5.json").write_text(train.to_json(results))
  rows = [(name, runs) for name, runs in results.items() if runs]
  table = format_table(rows)
  print(table)
  return rows


if __name__ == "__main__":
  main()
