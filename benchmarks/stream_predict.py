"""Benchmark of streaming prediction (cmmp_jax.stream): throughput and peak memory vs raster size.

    python -m benchmarks.stream_predict [--sizes=5000,10000,20000 --width=0.25 --window=512
        --overlap=64 --batch_size=4 --block_size=4096 --points_per_mpx=5000 --scale=1
        --workdir=runs/stream_bench --json=runs/stream_predict.json]

For each size S, in a fresh child process (so that each size has its own peak RSS):
  1. generates an S x S 3-band uint8 GeoTIFF (UTM 11N, 1 m px; a road grid every 300 px on
     noise), tiled and compressed, written block by block, and a GPS CSV of
     points_per_mpx * S^2 / 1e6 points (UTM metres) on its roads, written in chunks;
  2. predicts it with predict.predict_directory(stream_mode='on'): a CMMPNet of the given width
     (random weights: throughput and memory only), jitted on batch_size windows, the heat-map
     rendered per 1024 px tile (the dataset grid of the input preparation), at the training
     scale --scale (e.g. 0.5: BJRoad's 1024 px tiles trained at 512; windows then run on the
     model grid, S * scale px a side, and the outputs are resized back to S);
  3. reports generation and prediction seconds, megapixels per second of prediction (raster
     pixels / prediction seconds, compilation excluded: the forward is compiled and run once
     before timing) and the child's peak RSS (ru_maxrss) after generation and at the end.
The parent prints a table and writes the JSON. Goal: peak RSS under 2 GB whatever the size.
The machine may be shared (load average recorded); times are CPU times of this machine.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_list('sizes', ['5000', '10000'], 'raster sides in pixels')
flags.DEFINE_float('width', 0.25, 'model channel multiplier')
flags.DEFINE_integer('window', 512, 'sliding window side')
flags.DEFINE_integer('overlap', 64, 'window overlap')
flags.DEFINE_integer('batch_size', 4, 'windows per forward call')
flags.DEFINE_integer('block_size', 4096, 'streaming block side')
flags.DEFINE_integer('tile_size', 1024, 'heat-map tile grid (the dataset tile size)')
flags.DEFINE_integer('points_per_mpx', 5000, 'GPS points per megapixel')
flags.DEFINE_float('scale', 1.0, 'training scale data.input_size / tile size')
flags.DEFINE_string('workdir', 'runs/stream_bench', 'where rasters and outputs go')
flags.DEFINE_string('json', 'runs/stream_predict.json', 'where the results go')
flags.DEFINE_integer('one_size', 0, 'internal: run one size in this process')
flags.DEFINE_bool('keep', False, 'keep the generated rasters and outputs')
FLAGS = flags.FLAGS

UTM = 'EPSG:32611'
ROAD_SPACING = 300


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate(folder: pathlib.Path, size: int, points_per_mpx: int, tile: int = 1024):
  """Writes scene.tif (block by block) and gps.csv (in chunks); returns (paths, n_points)."""
  import numpy as np
  import rasterio
  import rasterio.windows
  from cmmp_jax.data import geo as geo_lib

  folder.mkdir(parents=True, exist_ok=True)
  geo = geo_lib.GeoInfo.from_bounds((600000.0, 4000000.0 - size, 600000.0 + size, 4000000.0),
                                    size, size, UTM)
  profile = dict(driver='GTiff', height=size, width=size, count=3, dtype='uint8', crs=geo.crs,
                 transform=geo.transform, tiled=True, blockxsize=256, blockysize=256,
                 compress='deflate', BIGTIFF='IF_SAFER')
  rng = np.random.default_rng(0)
  image_path = folder / 'scene.tif'
  with rasterio.open(image_path, 'w', **profile) as dataset:
    for row in range(0, size, tile):
      for col in range(0, size, tile):
        h, w = min(tile, size - row), min(tile, size - col)
        block = rng.integers(60, 120, size=(3, h, w), dtype=np.uint8)
        rows = (np.arange(row, row + h) % ROAD_SPACING) < 8
        cols = (np.arange(col, col + w) % ROAD_SPACING) < 8
        block[:, rows, :] = 200
        block[:, :, cols] = 200
        dataset.write(block, window=rasterio.windows.Window(col, row, w, h))
  n_points = int(points_per_mpx * size * size / 1e6)
  csv_path = folder / 'gps.csv'
  lines_per_road = ROAD_SPACING
  with open(csv_path, 'w') as handle:
    handle.write('x,y\n')
    chunk = 200_000
    for first in range(0, n_points, chunk):
      n = min(chunk, n_points - first)
      along = rng.uniform(0, size, n)
      road = rng.integers(0, size // lines_per_road + 1, n) * ROAD_SPACING + rng.uniform(0, 8, n)
      horizontal = rng.random(n) < 0.5
      cols = np.where(horizontal, along, road)
      rows = np.where(horizontal, road, along)
      x, y = geo_lib.pixel_to_world(cols, rows, geo.transform)
      handle.write(''.join(f'{a:.2f},{b:.2f}\n' for a, b in zip(x, y)))
  return image_path, csv_path, n_points


def random_variables(model):
  """He-normal kernels, zero biases, unit BatchNorm: a random model for throughput and memory.

  Built from the variables' shapes (jax.eval_shape) with numpy: jitting model.init compiles a
  program whose peak memory (~750 MB here) is not what prediction (with restored weights) pays.
  """
  import jax
  import numpy as np
  small = np.zeros((1, 64, 64, 3), np.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), small, small[..., :1],
                                             train=False))
  rng = np.random.default_rng(0)

  def make(path, leaf):
    name = str(path[-1].key) if hasattr(path[-1], 'key') else str(path[-1])
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(make, shapes)


def run_one(size: int) -> dict:
  """One size in this process; returns its row."""
  import jax
  import numpy as np
  from cmmp_jax import predict
  from cmmp_jax.data import preparation as preparation_lib
  from cmmp_jax.models import build_model

  folder = pathlib.Path(FLAGS.workdir) / f'{size}'
  start = time.perf_counter()
  image_path, csv_path, n_points = generate(folder / 'in', size, FLAGS.points_per_mpx,
                                            FLAGS.tile_size)
  generate_s = time.perf_counter() - start
  rss_after_generate = peak_rss_mb()

  model = build_model(dict(name='cmmpnet', width=FLAGS.width))
  window = FLAGS.window
  image = np.zeros((FLAGS.batch_size, window, window, 3), np.float32)
  variables = random_variables(model)
  apply = jax.jit(lambda i, a: jax.nn.sigmoid(model.apply(variables, i, a, train=False)))
  start = time.perf_counter()
  jax.block_until_ready(apply(image, image[..., :1]))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(apply(image, image[..., :1]))
  batch_s = time.perf_counter() - start

  record = preparation_lib.InputPreparation(gps_crs=UTM, tile_size=FLAGS.tile_size)
  start = time.perf_counter()
  summary = predict.predict_directory(
      apply, image_path, folder / 'out', gps_csv=csv_path, preparation=record, stream_mode='on',
      window=window, overlap=FLAGS.overlap, batch_size=FLAGS.batch_size,
      block_size=FLAGS.block_size, scale=FLAGS.scale, log=lambda line: print(line, flush=True))
  predict_s = time.perf_counter() - start
  tile = summary['tiles'][0]
  out_bytes = sum(os.path.getsize(p) for p in summary['written'])
  if not FLAGS.keep:
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
  return {'size': size, 'scale': FLAGS.scale, 'megapixels': size * size / 1e6,
          'gps_points': n_points,
          'generate_s': generate_s, 'compile_s': compile_s, 'batch_s': batch_s,
          'predict_s': predict_s, 'mpx_per_s': size * size / 1e6 / predict_s,
          'blocks': tile['blocks'], 'peak_rss_mb_after_generate': rss_after_generate,
          'peak_rss_mb': peak_rss_mb(), 'output_mb': out_bytes / 1e6,
          'road_fraction': tile['road_fraction']}


def main(argv):
  del argv
  if FLAGS.one_size:
    row = run_one(FLAGS.one_size)
    print('RESULT ' + json.dumps(row), flush=True)
    return
  rows = []
  for size in (int(s) for s in FLAGS.sizes):
    args = [sys.executable, '-m', 'benchmarks.stream_predict', f'--one_size={size}'] + [
        f'--{name}={getattr(FLAGS, name)}' for name in (
            'width', 'window', 'overlap', 'batch_size', 'block_size', 'tile_size',
            'points_per_mpx', 'scale', 'workdir', 'keep')]
    print(f'--- {size} x {size} px', flush=True)
    process = subprocess.run(args, capture_output=True, text=True)
    result = [line for line in process.stdout.splitlines() if line.startswith('RESULT ')]
    if process.returncode != 0 or not result:
      sys.stderr.write(process.stdout[-3000:] + process.stderr[-3000:])
      raise SystemExit(f'size {size} failed (exit {process.returncode})')
    rows.append(json.loads(result[0][len('RESULT '):]))
    print(f"{size}: {rows[-1]['mpx_per_s']:.3f} Mpx/s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB",
          flush=True)
  header = (f"{'side px':>8} {'scale':>6} {'Mpx':>7} {'GPS pts':>10} {'gen s':>7} "
            f"{'predict s':>10} {'Mpx/s':>7} {'blocks':>6} {'peak RSS MB':>12}")
  print(header)
  for row in rows:
    print(f"{row['size']:>8} {row['scale']:>6g} {row['megapixels']:>7.1f} "
          f"{row['gps_points']:>10} {row['generate_s']:>7.1f} {row['predict_s']:>10.1f} "
          f"{row['mpx_per_s']:>7.3f} "
          f"{row['blocks']:>6} {row['peak_rss_mb']:>12.0f}")
  settings = {name: getattr(FLAGS, name) for name in (
      'width', 'window', 'overlap', 'batch_size', 'block_size', 'tile_size', 'points_per_mpx',
      'scale')}
  payload = {'benchmark': 'stream_predict', 'settings': settings, 'rows': rows,
             'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(),
                         'load_average': os.getloadavg()}}
  path = pathlib.Path(FLAGS.json)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2))
  print(f'results written to {path}')


if __name__ == '__main__':
  app.run(main)
