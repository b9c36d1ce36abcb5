"""Benchmark of road-graph extraction (cmmp_jax.graphs) and of trajectory-guided completion.

    python -m benchmarks.graphs [--sections=tile,mosaic,apls --tile_size=1024 --mosaic_size=10000
                                 --apls_tiles=16 --apls_size=512 --repeats=3 --json=PATH]

Sections:
  tile    extraction of one tile_size x tile_size probability map (synthetic city), image only
          and with trajectories: the first call in the process (what a one-shot job pays: the
          numba compilation of skan's graph builder, ~2 s, included) and the median of
          `repeats` further calls.
  mosaic  extraction of a mosaic_size x mosaic_size probability map assembled from synthetic
          tiles (1024 px, cycled over a grid; roads do not continue across tile seams, which
          only adds dead ends), skeletonised in blocks (GraphParams.block_size); with
          --compare_whole also on the whole array at once. Each variant runs in a forked child
          (the input shared copy-on-write) that reports seconds and the growth of its peak
          resident memory during the extraction (the input itself excluded).
  apls    APLS and TOPO of graphs extracted from a simulated image-only prediction, without and
          with trajectory-guided completion, against the graph of the ground-truth mask, on
          apls_tiles synthetic test tiles of apls_size px (256 m, so 0.5 m/px at 512).

The simulated prediction stands in for the image branch of a model: the ground-truth road mask
minus the road under tree canopy (occlusions the image cannot see), plus, on 70% of the tiles,
the river / railway / grey-roof look-alikes (what the image confuses with roads), blurred
(Gaussian, 1.5 px) with Gaussian noise (0.05). The heat-map is the tile's own GPS heat-map.

Everything runs on one CPU core (thread pools of OpenCV / numba / BLAS set to 1). The machine
may be shared: the load average is recorded.
"""
from __future__ import annotations

import os

for _name in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMBA_NUM_THREADS'):
  os.environ.setdefault(_name, '1')

import json
import multiprocessing
import platform
import resource
import statistics
import time

from absl import app
from absl import flags
import cv2
import numpy as np
import scipy.ndimage

from cmmp_jax import graphs
from cmmp_jax.data import synthetic

flags.DEFINE_list('sections', ['tile', 'mosaic', 'apls'], 'tile, mosaic, apls')
flags.DEFINE_integer('tile_size', 1024, 'side of the single-tile probability map')
flags.DEFINE_integer('mosaic_size', 10_000, 'side of the mosaic probability map')
flags.DEFINE_integer('apls_tiles', 16, 'synthetic test tiles for the APLS comparison')
flags.DEFINE_integer('apls_size', 512, 'their side in pixels (256 m per tile)')
flags.DEFINE_integer('repeats', 3, 'timed calls after the first (tile section)')
flags.DEFINE_bool('compare_whole', False, 'mosaic: also skeletonise the whole array at once')
flags.DEFINE_string('json', 'runs/graphs_benchmark.json', 'where the results go')
FLAGS = flags.FLAGS

TILE_EXTENT_M = synthetic.SyntheticConfig().tile_extent_m


def simulated_prediction(tile: dict, seed: int) -> np.ndarray:
  """float32 (S, S) stand-in for an image-only prediction (module docstring)."""
  rng = np.random.default_rng(seed)
  layers = tile['layers']
  road = (tile['mask'][..., 0] > 0) & ~layers['occluded_road']
  if rng.random() < 0.7:
    road |= layers['lookalike']
  probabilities = scipy.ndimage.gaussian_filter(road.astype(np.float32), 1.5)
  probabilities += rng.normal(0.0, 0.05, road.shape).astype(np.float32)
  return np.clip(probabilities, 0.0, 1.0)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _rss_mb() -> float:
  with open('/proc/self/statm') as statm:
    return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def bench_tile(size: int, repeats: int) -> dict:
  seed = synthetic.tile_seed(0, 'test', 0)
  tile = synthetic.generate_tile(seed, size=size)
  probabilities = simulated_prediction(tile, seed)
  heat = tile['aux'][..., 0]
  rows = {}
  for name, params in (('image only', graphs.GraphParams()),
                       ('with trajectories', graphs.GraphParams(use_trajectories=True))):
    times = []
    for _ in range(repeats + 1):
      start = time.perf_counter()
      graph = graphs.extract_graph(probabilities, params, heatmap=heat)
      times.append(time.perf_counter() - start)
    rows[name] = {'first_s': times[0], 'median_s': statistics.median(times[1:]),
                  'best_s': min(times[1:]), 'nodes': graph.number_of_nodes(),
                  'edges': graph.number_of_edges(), 'bridges': graph.graph['bridges'],
                  'recovered_pieces': graph.graph['recovered_pieces']}
  return {'size': size, 'rows': rows}


def _mosaic(size: int, tile_size: int = 1024, distinct: int = 6) -> tuple[np.ndarray, np.ndarray]:
  """(float32 probabilities, uint8 heat-map) of size x size from `distinct` synthetic tiles."""
  tiles = []
  for i in range(distinct):
    seed = synthetic.tile_seed(0, 'test', i)
    tile = synthetic.generate_tile(seed, size=tile_size)
    tiles.append((simulated_prediction(tile, seed), tile['aux'][..., 0]))
  probabilities = np.zeros((size, size), np.float32)
  heat = np.zeros((size, size), np.uint8)
  n = -(-size // tile_size)
  for r in range(n):
    for c in range(n):
      prob_tile, heat_tile = tiles[(r * n + c) % distinct]
      h, w = min(tile_size, size - r * tile_size), min(tile_size, size - c * tile_size)
      probabilities[r * tile_size:r * tile_size + h, c * tile_size:c * tile_size + w] = \
          prob_tile[:h, :w]
      heat[r * tile_size:r * tile_size + h, c * tile_size:c * tile_size + w] = heat_tile[:h, :w]
  return probabilities, heat


def _extract_in_child(probabilities, params, heatmap, queue) -> None:
  """Runs in a forked child (inputs shared copy-on-write), so that its peak resident memory
  measures this extraction alone."""
  before = _rss_mb()
  start = time.perf_counter()
  graph = graphs.extract_graph(probabilities, params, heatmap=heatmap)
  seconds = time.perf_counter() - start
  queue.put({'seconds': seconds, 'rss_before_mb': before,
             'peak_growth_mb': max(0.0, _peak_rss_mb() - before),
             'nodes': graph.number_of_nodes(), 'edges': graph.number_of_edges()})


def bench_mosaic(size: int, compare_whole: bool) -> dict:
  probabilities, heat = _mosaic(size)
  graphs.extract_graph(probabilities[:256, :256])  # compile skan's numba code outside the timing
  rows = {}
  variants = [('blocks of 4096, image only', graphs.GraphParams(), None),
              ('blocks of 4096, with trajectories', graphs.GraphParams(use_trajectories=True),
               heat)]
  if compare_whole:
    variants.insert(1, ('whole array, image only', graphs.GraphParams(block_size=0), None))
  context = multiprocessing.get_context('fork')
  for name, params, heatmap in variants:
    queue = context.Queue()
    child = context.Process(target=_extract_in_child,
                            args=(probabilities, params, heatmap, queue))
    child.start()
    rows[name] = queue.get()
    child.join()
  return {'size': size, 'input_mb': probabilities.nbytes / 2**20 + heat.nbytes / 2**20,
          'rows': rows}


def bench_apls(count: int, size: int) -> dict:
  from cmmp_jax import topology

  metres_per_pixel = TILE_EXTENT_M / size
  per_tile = []
  for index in range(count):
    seed = synthetic.tile_seed(0, 'test', index)
    tile = synthetic.generate_tile(seed, size=size)
    gt = graphs.pixel_graph_to_metres(
        graphs.extract_graph(tile['mask'][..., 0].astype(np.float32)), metres_per_pixel)
    probabilities = simulated_prediction(tile, seed)
    row = {'tile': index}
    for name, use in (('image_only', False), ('with_trajectories', True)):
      graph = graphs.extract_graph(probabilities, graphs.GraphParams(use_trajectories=use),
                                   heatmap=tile['aux'][..., 0])
      proposal = graphs.pixel_graph_to_metres(graph, metres_per_pixel)
      row[name] = {'apls': topology.apls(gt, proposal).apls,
                   'topo_f1': topology.topo(gt, proposal).f1,
                   'bridges': graph.graph['bridges'],
                   'bridges_rejected': graph.graph['bridges_rejected'],
                   'recovered_pieces': graph.graph['recovered_pieces']}
    per_tile.append(row)
    print(f'  apls tile {index}: image only {row["image_only"]["apls"]:.3f}, with trajectories '
          f'{row["with_trajectories"]["apls"]:.3f}', flush=True)
  summary = {}
  for name in ('image_only', 'with_trajectories'):
    summary[name] = {key: float(np.mean([row[name][key] for row in per_tile]))
                     for key in ('apls', 'topo_f1')}
  deltas = [row['with_trajectories']['apls'] - row['image_only']['apls'] for row in per_tile]
  summary['apls_wins'] = int(sum(d > 1e-9 for d in deltas))
  summary['apls_losses'] = int(sum(d < -1e-9 for d in deltas))
  return {'tiles': count, 'size': size, 'metres_per_pixel': metres_per_pixel,
          'summary': summary, 'per_tile': per_tile}


def main(argv):
  del argv
  cv2.setNumThreads(1)
  results = {'host': platform.node(), 'load_average': os.getloadavg(),
             'command': 'python -m benchmarks.graphs ' + ' '.join(
                 f'--{name}={FLAGS[name].value}' for name in
                 ('tile_size', 'mosaic_size', 'apls_tiles', 'apls_size', 'repeats')),
             'sections': {}}
  if 'tile' in FLAGS.sections:
    tile = bench_tile(FLAGS.tile_size, FLAGS.repeats)
    results['sections']['tile'] = tile
    print(f'\nTile {tile["size"]} x {tile["size"]} px, one core')
    print(f'{"variant":<20} {"first s":>8} {"median s":>9} {"nodes":>6} {"edges":>6} '
          f'{"bridges":>8} {"recovered":>9}')
    for name, row in tile['rows'].items():
      print(f'{name:<20} {row["first_s"]:>8.3f} {row["median_s"]:>9.3f} {row["nodes"]:>6} '
            f'{row["edges"]:>6} {row["bridges"]:>8} {row["recovered_pieces"]:>9}')
  if 'mosaic' in FLAGS.sections:
    mosaic = bench_mosaic(FLAGS.mosaic_size, FLAGS.compare_whole)
    results['sections']['mosaic'] = mosaic
    print(f'\nMosaic {mosaic["size"]} x {mosaic["size"]} px ({mosaic["input_mb"]:.0f} MB of '
          f'input), one core')
    print(f'{"variant":<36} {"seconds":>8} {"peak +MB":>9} {"nodes":>7} {"edges":>7}')
    for name, row in mosaic['rows'].items():
      print(f'{name:<36} {row["seconds"]:>8.1f} {row["peak_growth_mb"]:>9.0f} '
            f'{row["nodes"]:>7} {row["edges"]:>7}')
  if 'apls' in FLAGS.sections:
    if not os.path.exists(os.path.join(os.path.dirname(graphs.__file__), '..', 'topology.py')):
      print('\nAPLS: cmmp_jax/topology.py is missing; section skipped')
    else:
      apls = bench_apls(FLAGS.apls_tiles, FLAGS.apls_size)
      results['sections']['apls'] = apls
      summary = apls['summary']
      print(f'\nAPLS / TOPO on {apls["tiles"]} synthetic test tiles of {apls["size"]} px '
            f'({apls["metres_per_pixel"]} m/px), simulated image-only prediction')
      print(f'{"graph":<20} {"APLS":>6} {"TOPO F1":>8}')
      for name in ('image_only', 'with_trajectories'):
        print(f'{name:<20} {summary[name]["apls"]:>6.3f} {summary[name]["topo_f1"]:>8.3f}')
      print(f'trajectories raise APLS on {summary["apls_wins"]} tiles, lower it on '
            f'{summary["apls_losses"]}')
  results['load_average_after'] = os.getloadavg()
  os.makedirs(os.path.dirname(FLAGS.json) or '.', exist_ok=True)
  with open(FLAGS.json, 'w') as handle:
    json.dump(results, handle, indent=1)
  print(f'\nresults written to {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
