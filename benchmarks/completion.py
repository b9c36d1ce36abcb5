"""Trajectory-guided graph completion on trained models: test APLS / TOPO with and without it.

    python -m benchmarks.completion --config=configs/synthetic.py --table5_dir=runs/table5_r2 \
        [--models=image_only,cmmpnet] [--seeds=0,1,2] [--config.a.b=v ...] [--json=PATH]

For each model and seed of a finished Table V run (`python -m cmmp_jax.experiments.table5`, the
same --config and overrides), the best checkpoint is scored on the test split twice by
`--mode=eval`'s code (cmmp_jax.evaluate.evaluate), with config.graph.use_trajectories False and
True; everything else (the prediction, the ground-truth graphs, metres per pixel) is the same.
The run folders are not written to: each run's best/ checkpoint is copied into a scratch folder.
Prints one table (mean +- sd over seeds, tiles where completion raised / lowered APLS) and
writes a JSON report with the per-tile APLS (--json, default TABLE5_DIR/completion.json).
"""
from __future__ import annotations

import copy
import pathlib
import shutil
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from cmmp_jax import config_checks, evaluate, reporting
from cmmp_jax.experiments import table5
from configs import presets


def score(run_config, run_dir: pathlib.Path, scratch: pathlib.Path, use_trajectories: bool):
  """evaluate.evaluate on the test split of run_dir's best checkpoint (copied to scratch)."""
  workdir = scratch / ('with' if use_trajectories else 'without')
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(run_dir / 'best', workdir / 'best')
  config = copy.deepcopy(run_config)
  config.eval.checkpoint = 'best'
  config.eval.graph_metrics = True
  config.graph.use_trajectories = use_trajectories
  return evaluate.evaluate(config, str(workdir), split=config.data.test_split)


def run(config, table5_dir, models, seeds) -> dict:
  table5_dir = pathlib.Path(table5_dir)
  report = {'table5_dir': str(table5_dir), 'models': {}}
  with tempfile.TemporaryDirectory(prefix='completion-') as scratch:
    for name in models:
      rows = []
      for seed in seeds:
        run_dir = table5_dir / name if seed == 0 else table5_dir / f'seed{seed}' / name
        if not (run_dir / 'best').is_dir():
          raise SystemExit(f'error: {run_dir}/best not found: run cmmp_jax.experiments.table5 '
                           'with the same --config and --seeds first')
        run_config = presets.apply(copy.deepcopy(config), name)
        run_config.seed = seed
        config_checks.validate(run_config)
        reporting.console(f'=== {name}, seed {seed}')
        results = {flag: score(run_config, run_dir, pathlib.Path(scratch), flag)
                   for flag in (False, True)}
        tiles = {flag: {t['tile_id']: t['apls'] for t in r['graph_tiles']
                        if t.get('apls') is not None} for flag, r in results.items()}
        common = sorted(set(tiles[False]) & set(tiles[True]))
        delta = np.array([tiles[True][k] - tiles[False][k] for k in common])
        rows.append({'seed': seed, 'step': results[False]['step'],
                     'apls': results[False]['apls'], 'apls_completed': results[True]['apls'],
                     'topo_f1': results[False]['topo_f1'],
                     'topo_f1_completed': results[True]['topo_f1'],
                     'tiles_up': int((delta > 1e-9).sum()), 'tiles_down': int((delta < -1e-9).sum()),
                     'tiles': len(common), 'per_tile_apls': tiles[False],
                     'per_tile_apls_completed': tiles[True]})
      report['models'][name] = rows
  return report


def format_table(report) -> str:
  def cell(rows, key):
    values = 100 * np.array([r[key] for r in rows], np.float64)
    return f'{values.mean():.2f} +- {values.std():.2f}'
  lines = ['| model | test APLS | with completion | TOPO F1 | with completion | tiles up / down |',
           '|---|---|---|---|---|---|']
  for name, rows in report['models'].items():
    lines.append(f'| {table5.LABELS.get(name, name)} | {cell(rows, "apls")} | '
                 f'{cell(rows, "apls_completed")} | {cell(rows, "topo_f1")} | '
                 f'{cell(rows, "topo_f1_completed")} | '
                 f'{sum(r["tiles_up"] for r in rows)} / {sum(r["tiles_down"] for r in rows)} '
                 f'of {sum(r["tiles"] for r in rows)} |')
  return '\n'.join(lines)


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      'config', 'configs/synthetic.py', 'Config file of the Table V run (same overrides).',
      lock_config=True)
  flags.DEFINE_string('table5_dir', 'runs/table5', 'The Table V run folder.')
  flags.DEFINE_list('models', ['image_only', 'cmmpnet'], 'Models (presets) to score.')
  config_checks.define_integer_list('seeds', [0], 'Seeds of the Table V run.')
  flags.DEFINE_string('json', None, 'Report path (default TABLE5_DIR/completion.json).')


def main(argv):
  config = config_checks.config_from_flags(argv)
  report = run(config, flags.FLAGS.table5_dir, flags.FLAGS.models, flags.FLAGS.seeds)
  path = pathlib.Path(flags.FLAGS.json or pathlib.Path(flags.FLAGS.table5_dir) / 'completion.json')
  path.write_text(reporting.to_json(report))
  print(format_table(report))
  print(f'\nreport: {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
