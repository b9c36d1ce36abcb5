"""Benchmark of the streamed custom dataset build at growing raster sizes: time and peak memory.

    python -m benchmarks.stream_build [--sizes=5000,10000,20000 --points=10000000
        --tile_size=512 --in_memory_sizes=5000 --beam_sizes=5000
        --beam_pipeline_options=runner=DirectRunner --workdir=DIR --json=PATH --keep]

For each size S a synthetic area is generated in --workdir (not timed): an S x S RGB uint8
GeoTIFF in UTM 33N at 0.5 m, tiled 512 x 512, LZW, written block by block (never whole in
memory); a GeoJSON of road centerlines (a grid every 397 px and three diagonals), also drawn
into the imagery; and a CSV of --points GPS points in lon/lat (95% along the roads with 3 m of
noise, 5% anywhere), written 1M rows at a time. Then `data_builders.build.build('custom', ...)`
runs in a fresh subprocess, which reports its wall time and its own peak resident memory
(getrusage ru_maxrss: Python, numpy, rasterio, TFDS and the build together) and its resident
memory before the build (the imports alone). With --in_memory_sizes the same areas are also
built with `streaming: false` (the former in-memory build) for comparison, and with
--beam_sizes as an Apache Beam pipeline (--beam_pipeline_options; the default DirectRunner runs
in the build's process, so its peak RSS is the pipeline's; it keeps its shuffle in memory).

Prints one table and writes a JSON report (--json, default WORKDIR/stream_build.json). Timings
come from whatever machine runs this; on a shared machine they are noisy, memory is not.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

PIXEL_M = 0.5
ORIGIN = (400000.0, 5800000.0)  # UTM 33N (EPSG:32633), west/north of the raster
CRS = 'EPSG:32633'
ROAD_SPACING_PX = 397
GPS_CHUNK_ROWS = 1_000_000


def _road_lines(size: int) -> list[np.ndarray]:
  """Road centerlines in pixel coordinates (col, row): a grid and three diagonals, each
  reaching a little past the raster."""
  lines = []
  for offset in range(ROAD_SPACING_PX // 2, size, ROAD_SPACING_PX):
    lines.append(np.array([[-20.0, offset + 0.3], [size + 20.0, offset + 0.3]]))
    lines.append(np.array([[offset + 0.7, -20.0], [offset + 0.7, size + 20.0]]))
  lines.append(np.array([[-10.0, -10.0], [size + 10.0, size + 10.0]]))
  lines.append(np.array([[size * 0.1, size + 10.0], [size + 10.0, size * 0.3]]))
  lines.append(np.array([[size * 0.5, -10.0], [size * 0.2, size * 0.6], [size * 0.7, size + 10]]))
  return lines


def _pixels_to_utm(cols, rows):
  return ORIGIN[0] + np.asarray(cols) * PIXEL_M, ORIGIN[1] - np.asarray(rows) * PIXEL_M


def write_area(folder: pathlib.Path, size: int, points: int, tile_size: int, seed: int = 0):
  """Writes area.tif, roads.geojson, gps.csv and custom.json into folder (module docstring)."""
  import pandas as pd
  import rasterio
  import rasterio.transform
  import rasterio.warp
  import rasterio.windows
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  transform = rasterio.transform.from_origin(ORIGIN[0], ORIGIN[1], PIXEL_M, PIXEL_M)
  grid = np.arange(ROAD_SPACING_PX // 2, size, ROAD_SPACING_PX)
  block = 512
  profile = dict(driver='GTiff', height=size, width=size, count=3, dtype='uint8', crs=CRS,
                 transform=transform, tiled=True, blockxsize=block, blockysize=block,
                 compress='lzw', BIGTIFF='IF_SAFER')
  with rasterio.open(folder / 'area.tif', 'w', **profile) as dataset:
    for row0 in range(0, size, block):
      for col0 in range(0, size, block):
        rows = np.arange(row0, min(row0 + block, size))[:, None]
        cols = np.arange(col0, min(col0 + block, size))[None, :]
        field = 110 + 40 * np.sin(rows / 151.0) * np.cos(cols / 97.0)
        noise = rng.integers(0, 12, (3, rows.size, cols.size))
        road = ((np.abs(rows - grid[np.searchsorted(grid, rows).clip(0, grid.size - 1)]) < 4)
                | (np.abs(cols - grid[np.searchsorted(grid, cols).clip(0, grid.size - 1)]) < 4))
        pixels = np.where(road, 70.0, field) + noise
        dataset.write(pixels.clip(0, 255).astype(np.uint8),
                      window=rasterio.windows.Window(col0, row0, cols.size, rows.size))
  lines = _road_lines(size)
  features = []
  for line in lines:
    x, y = _pixels_to_utm(line[:, 0], line[:, 1])
    features.append({'type': 'Feature', 'properties': {}, 'geometry': {
        'type': 'LineString', 'coordinates': np.stack([x, y], 1).tolist()}})
  (folder / 'roads.geojson').write_text(json.dumps({
      'type': 'FeatureCollection',
      'crs': {'type': 'name', 'properties': {'name': 'urn:ogc:def:crs:EPSG::32633'}},
      'features': features}))
  lengths = np.array([np.hypot(*np.diff(line, axis=0).T).sum() for line in lines])
  with open(folder / 'gps.csv', 'w') as handle:
    handle.write('lon,lat\n')
    for start in range(0, points, GPS_CHUNK_ROWS):
      n = min(GPS_CHUNK_ROWS, points - start)
      on_road = rng.random(n) < 0.95
      which = rng.choice(len(lines), n, p=lengths / lengths.sum())
      cols = rng.uniform(-10, size + 10, n)
      rows = rng.uniform(-10, size + 10, n)
      along = rng.random(n)
      for k, line in enumerate(lines):
        chosen = np.flatnonzero(on_road & (which == k))
        if not chosen.size:
          continue
        segment_lengths = np.hypot(*np.diff(line, axis=0).T)
        position = along[chosen] * segment_lengths.sum()
        segment = np.searchsorted(np.cumsum(segment_lengths), position).clip(
            0, len(segment_lengths) - 1)
        start_len = np.concatenate([[0.0], np.cumsum(segment_lengths)])[segment]
        t = ((position - start_len) / segment_lengths[segment])[:, None]
        xy = line[segment] + t * (line[segment + 1] - line[segment])
        cols[chosen] = xy[:, 0] + rng.normal(0, 3.0 / PIXEL_M, chosen.size)
        rows[chosen] = xy[:, 1] + rng.normal(0, 3.0 / PIXEL_M, chosen.size)
      x, y = _pixels_to_utm(cols, rows)
      lon, lat = rasterio.warp.transform(CRS, 'EPSG:4326', x, y)
      pd.DataFrame({'lon': lon, 'lat': lat}).to_csv(handle, header=False, index=False,
                                                   float_format='%.8f')
  (folder / 'custom.json').write_text(json.dumps({
      'imagery': 'area.tif', 'roads': 'roads.geojson', 'gps': ['gps.csv'],
      'tile_size': tile_size, 'validation_fraction': 0.1, 'test_fraction': 0.1}))


def _rss_bytes() -> int:
  with open('/proc/self/statm') as handle:
    return int(handle.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


MODES = {'streamed': 'streamed', 'memory': 'in memory', 'beam': 'beam'}


def _child_build(manual_dir: str, data_dir: str, mode: str, beam_options: str) -> None:
  """Runs in the subprocess: one build; prints its report as the last stdout line."""
  from data_builders import build as build_lib
  spec_path = pathlib.Path(manual_dir) / 'custom.json'
  spec = json.loads(spec_path.read_text())
  spec['streaming'] = mode != 'memory'
  spec_path.write_text(json.dumps(spec))
  baseline = _rss_bytes()
  start = time.perf_counter()
  version_dir = build_lib.build('custom', data_dir, manual_dir=manual_dir, overwrite=True,
                                beam_pipeline_options=beam_options if mode == 'beam' else None)
  seconds = time.perf_counter() - start
  builder = build_lib.make_builder('custom', data_dir)
  counts = builder.info.metadata['custom_area']
  size_bytes = sum(p.stat().st_size for p in pathlib.Path(version_dir).rglob('*') if p.is_file())
  print(json.dumps({
      'seconds': seconds, 'tiles': counts['tiles'], 'gps_points': counts['gps_points'],
      'gps_points_on_raster': counts['gps_points_on_raster'],
      'road_pixels': counts['road_pixels'],
      'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      'rss_before_build_bytes': baseline, 'dataset_bytes': size_bytes,
      'tensorflow_imported': 'tensorflow' in sys.modules}))


def _run_build(area: pathlib.Path, data_dir: pathlib.Path, mode: str, beam_options: str,
               log_path: pathlib.Path) -> dict:
  shutil.rmtree(data_dir, ignore_errors=True)
  with open(log_path, 'a') as log:
    completed = subprocess.run(
        [sys.executable, '-m', 'benchmarks.stream_build', '--child_build', str(area),
         str(data_dir), mode, beam_options],
        stdout=subprocess.PIPE, stderr=log, text=True, check=False,
        cwd=pathlib.Path(__file__).resolve().parent.parent)
  if completed.returncode != 0:
    raise RuntimeError(f'build of {area} failed (exit {completed.returncode}); see {log_path}')
  return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.stream_build',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='5000,10000,20000')
  parser.add_argument('--points', type=int, default=10_000_000)
  parser.add_argument('--tile_size', type=int, default=512)
  parser.add_argument('--in_memory_sizes', default='5000',
                      help='sizes also built in memory (streaming: false); empty for none')
  parser.add_argument('--beam_sizes', default='',
                      help='sizes also built as an Apache Beam pipeline; empty for none')
  parser.add_argument('--beam_pipeline_options', default='runner=DirectRunner')
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--json', default=None)
  parser.add_argument('--keep', action='store_true', help='keep generated areas and datasets')
  parser.add_argument('--child_build', nargs=4, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child_build:
    _child_build(*args.child_build)
    return 0
  sizes = [int(s) for s in args.sizes.split(',') if s]
  in_memory = {int(s) for s in args.in_memory_sizes.split(',') if s}
  beam = {int(s) for s in args.beam_sizes.split(',') if s}
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='stream-build-bench-'))
  workdir.mkdir(parents=True, exist_ok=True)
  json_path = pathlib.Path(args.json) if args.json else workdir / 'stream_build.json'
  log_path = workdir / 'builds.log'
  report = {'meta': {'machine': platform.machine(), 'cpus': os.cpu_count(),
                     'load_average_start': os.getloadavg(), 'points': args.points,
                     'tile_size': args.tile_size, 'python': platform.python_version(),
                     'beam_pipeline_options': args.beam_pipeline_options},
            'results': []}
  print(f'workdir {workdir}; build logs in {log_path}', flush=True)
  for size in sizes:
    area = workdir / f'area_{size}'
    start = time.perf_counter()
    print(f'[{size}] generating a {size}x{size} raster, roads and {args.points:,} GPS points ...',
          flush=True)
    write_area(area, size, args.points, args.tile_size)
    generate_s = time.perf_counter() - start
    for kind, mode in MODES.items():
      if (kind == 'memory' and size not in in_memory) or (kind == 'beam' and size not in beam):
        continue
      print(f'[{size}] building ({mode}) ...', flush=True)
      result = _run_build(area, workdir / f'data_{size}', kind, args.beam_pipeline_options,
                          log_path)
      result.update(size=size, mode=mode, generate_s=generate_s,
                    megapixels=size * size / 1e6,
                    tiles_per_s=result['tiles'] / result['seconds'],
                    load_average=os.getloadavg())
      report['results'].append(result)
      print(f'[{size}] {mode}: {result["seconds"]:.1f} s, {result["tiles_per_s"]:.1f} tiles/s, '
            f'peak RSS {result["peak_rss_bytes"] / 2**20:.0f} MiB', flush=True)
      temp = json_path.with_suffix('.tmp')
      temp.write_text(json.dumps(report, indent=2))
      os.replace(temp, json_path)
    if not args.keep:
      shutil.rmtree(area, ignore_errors=True)
      shutil.rmtree(workdir / f'data_{size}', ignore_errors=True)
  print()
  header = (f'{"size":>7} {"mode":>9} {"Mpx":>6} {"tiles":>6} {"GPS pts":>11} {"build s":>8} '
            f'{"tiles/s":>8} {"peak RSS MiB":>13} {"RSS before MiB":>15}')
  print(header)
  print('-' * len(header))
  for r in report['results']:
    print(f'{r["size"]:>7} {r["mode"]:>9} {r["megapixels"]:>6.0f} {r["tiles"]:>6} '
          f'{r["gps_points"]:>11,} {r["seconds"]:>8.1f} {r["tiles_per_s"]:>8.1f} '
          f'{r["peak_rss_bytes"] / 2**20:>13.0f} {r["rss_before_build_bytes"] / 2**20:>15.0f}')
  print(f'\nreport: {json_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
