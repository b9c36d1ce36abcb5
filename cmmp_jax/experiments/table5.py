"""The paper's Table V in miniature: fusion strategies trained with the same budget.

  python -m cmmp_jax.experiments.table5 --config=configs/synthetic.py [--workdir runs/table5]
      [--models image_only,aux_only,early_fusion,late_fusion,cmmpnet] [--set num_epochs=12]

Trains each model (a preset of the config) in WORKDIR/<model> (resuming if interrupted), then
prints test A_IoU / G_IoU at the best-validation evaluation, side by side, and writes
WORKDIR/table5.json. Every run uses the same data, seed, schedule and number of steps.
"""
from __future__ import annotations

import argparse
import ast
import json
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


def format_table(rows) -> str:
  lines = [f"| {'model':36s} | test A_IoU | test G_IoU | val G_IoU | best step |",
           f"|{'-' * 38}|------------|------------|-----------|-----------|"]
  for name, s in rows:
    lines.append(f"| {LABELS.get(name, name):36s} | {100 * s['test']['a_iou']:10.2f} | "
                 f"{100 * s['test']['g_iou']:10.2f} | {100 * s['val']['g_iou']:9.2f} | "
                 f"{s['best_step']:9d} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--workdir", default="runs/table5")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--set", action="append", metavar="FIELD=VALUE",
                      help="config override applied to every run, e.g. num_epochs=12")
  args = parser.parse_args(argv)
  from cmmp_jax import configs, train  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(args.workdir)
  rows = []
  for name in [m.strip() for m in args.models.split(",") if m.strip()]:
    base, _, presets = args.config.partition(":")
    spec = f"{base}:{','.join(p for p in (presets, name) if p)}"
    config = configs.load_config(spec, _parse_overrides(args.set))
    print(f"=== {name}: {spec}", flush=True)
    summary = train.train_and_evaluate(config, str(workdir / name))
    if not summary.get("test"):
      raise RuntimeError(f"{name}: no test metrics (set eval_on_test=True)")
    rows.append((name, summary))
    table = format_table(rows)
    (workdir / "table5.json").write_text(json.dumps(dict(rows), indent=2))
  print(table)
  return rows


if __name__ == "__main__":
  main()
