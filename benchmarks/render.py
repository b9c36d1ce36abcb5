"""Benchmark of bulk trajectory rendering (cmmp_jax.data.heatmap.iter_render_tiles).

    python -m benchmarks.render [--points=N --tiles=T --size=S --chunk_size=C --repeats=R
                                 --json=PATH]

Synthetic city: T tiles of S x S pixels on a regular grid (about 0.47 m per pixel, BJRoad's
zoom-18 tiles near Beijing), N seeded GPS points of which ~10% fall outside every tile. Times
the one-pass bucketing plus per-tile heat-maps; tiles are consumed one by one (never T x S x S
in memory). The whole pass runs R times in the same process: the first run (what a one-shot
job pays, one-time costs included) and the median and best of all R are reported, with the
load average, because the machine may be shared. When N x T is small it also times the naive
per-tile loop (one scan of the table per tile) and checks both give the same heat-maps. The
BJRoad-scale job is `--points 50000000 --tiles 350 --size 1024`.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import time

from absl import app
from absl import flags
import numpy as np

from cmmp_jax.data import heatmap

# Tile size in degrees at BJRoad's scale (1024 px of ~0.457 m near 40 N).
_TILE_DEGREES_PER_PIXEL = (5.366e-6, 4.11e-6)
# Run the naive per-tile loop only below this many point-tile scans.
_NAIVE_LIMIT = 2e8


def _synthetic_city(points: int, tiles: int, size: int, seed: int = 0):
  """(lon, lat, tile_bounds) for a grid of `tiles` tiles and `points` points around it."""
  n_cols = math.ceil(math.sqrt(tiles))
  n_rows = math.ceil(tiles / n_cols)
  tile_w, tile_h = (step * size for step in _TILE_DEGREES_PER_PIXEL)
  xs = 116.2 + tile_w * np.arange(n_cols + 1)
  ys = 40.1 - tile_h * np.arange(n_rows + 1)
  index = np.arange(tiles)
  grid_row, grid_col = index // n_cols, index % n_cols
  tile_bounds = np.stack([xs[grid_col], ys[grid_row + 1], xs[grid_col + 1], ys[grid_row]], axis=1)
  rng = np.random.default_rng(seed)
  margin_x, margin_y = 0.05 * (xs[-1] - xs[0]), 0.05 * (ys[0] - ys[-1])
  lon = rng.uniform(xs[0] - margin_x, xs[-1] + margin_x, points)
  lat = rng.uniform(ys[-1] - margin_y, ys[0] + margin_y, points)
  return lon, lat, tile_bounds


def _bulk_pass(lon, lat, tile_bounds, size, chunk_size):
  """One bulk rendering pass, every tile consumed: (total s, bucketing s, checksum, nonzero)."""
  start = time.perf_counter()
  rendered = heatmap.iter_render_tiles(lon, lat, tile_bounds, size, size, chunk_size=chunk_size)
  bucket_seconds = time.perf_counter() - start  # the bucketing pass runs at the call
  checksum = 0.0
  nonzero_tiles = 0
  for _, tile in rendered:
    checksum += float(tile.sum(dtype=np.float64))
    nonzero_tiles += bool(tile.any())
  return time.perf_counter() - start, bucket_seconds, checksum, nonzero_tiles


def _rate(points: int, seconds: float) -> float:
  return points / seconds if seconds > 0 else float("inf")


def run(points: int, tiles: int, size: int, *, chunk_size: int = heatmap.DEFAULT_CHUNK_SIZE,
        naive: bool | None = None, repeats: int = 5) -> dict:
  """Runs the benchmark and returns its numbers (seconds, points per second, checksums).

  bulk_seconds, bucket_seconds and tile_render_seconds are medians over `repeats` passes
  (bulk_seconds_all lists every pass, the first one first).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  lon, lat, tile_bounds = _synthetic_city(points, tiles, size)
  load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  passes = [_bulk_pass(lon, lat, tile_bounds, size, chunk_size) for _ in range(repeats)]
  totals = [total for total, _, _, _ in passes]
  bulk_seconds = float(np.median(totals))
  bucket_seconds = float(np.median([bucket for _, bucket, _, _ in passes]))
  _, _, checksum, nonzero_tiles = passes[0]
  result = {
      "points": points, "tiles": tiles, "size": size, "chunk_size": chunk_size,
      "repeats": repeats, "bulk_seconds": bulk_seconds, "bucket_seconds": bucket_seconds,
      "tile_render_seconds": float(np.median([total - bucket for total, bucket, _, _ in passes])),
      "bulk_points_per_second": _rate(points, bulk_seconds),
      "bulk_seconds_first": totals[0], "bulk_points_per_second_first": _rate(points, totals[0]),
      "bulk_seconds_best": min(totals), "bulk_points_per_second_best": _rate(points, min(totals)),
      "bulk_seconds_all": totals, "load_average_1min": load_average, "cpu_count": os.cpu_count(),
      "nonzero_tiles": nonzero_tiles, "checksum": checksum,
      "naive_seconds": None, "naive_points_per_second": None, "naive_equal": None,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
  }
  if naive is None:
    naive = points * tiles <= _NAIVE_LIMIT
  if naive:
    equal = True
    bulk = heatmap.iter_render_tiles(lon, lat, tile_bounds, size, size, chunk_size=chunk_size)
    naive_seconds = 0.0
    for bounds, (_, bulk_tile) in zip(tile_bounds, bulk):
      start = time.perf_counter()
      cols, rows = heatmap.lonlat_to_pixel(lon, lat, bounds, size, size)
      tile = heatmap.render_heatmap(cols, rows, size, size)
      naive_seconds += time.perf_counter() - start
      equal &= bool(np.array_equal(tile, bulk_tile))
    result.update(naive_seconds=naive_seconds, naive_points_per_second=points / naive_seconds,
                  naive_equal=equal)
  return result


def _table(result: dict) -> str:
  load = result.get("load_average_1min")
  load_text = "" if load is None else f", load average {load:.1f} on {result['cpu_count']} CPUs"
  lines = [f"render: {result['points']:,} points, {result['tiles']} tiles of "
           f"{result['size']}x{result['size']} "
           f"(peak RSS {result['peak_rss_mb']:.0f} MB{load_text})",
           f"{'method':<34}{'seconds':>10}{'points/s':>16}"]
  lines.append(f"{'bulk, median of ' + str(result['repeats']) + ' passes':<34}"
               f"{result['bulk_seconds']:>10.3f}{result['bulk_points_per_second']:>16,.0f}")
  lines.append(f"{'  of which bucketing':<34}{result['bucket_seconds']:>10.3f}")
  lines.append(f"{'  of which tile heat-maps':<34}{result['tile_render_seconds']:>10.3f}")
  lines.append(f"{'bulk, first pass':<34}{result['bulk_seconds_first']:>10.3f}"
               f"{result['bulk_points_per_second_first']:>16,.0f}")
  lines.append(f"{'bulk, best pass':<34}{result['bulk_seconds_best']:>10.3f}"
               f"{result['bulk_points_per_second_best']:>16,.0f}")
  if result["naive_seconds"] is not None:
    lines.append(f"{'naive (one scan per tile)':<34}{result['naive_seconds']:>10.3f}"
                 f"{result['naive_points_per_second']:>16,.0f}")
    lines.append(f"identical heat-maps: {result['naive_equal']}")
  return "\n".join(lines)


def define_flags() -> None:
  """The command line's flags (defined only when this module runs as the program)."""
  flags.DEFINE_integer("points", 2_000_000, "GPS points.", lower_bound=1)
  flags.DEFINE_integer("tiles", 16, "Tiles on a regular grid.", lower_bound=1)
  flags.DEFINE_integer("size", 256, "Tile side in pixels.", lower_bound=1)
  flags.DEFINE_integer("chunk_size", heatmap.DEFAULT_CHUNK_SIZE, "Points per bucketing chunk.",
                       lower_bound=1)
  flags.DEFINE_integer("repeats", 5, "Bulk passes timed (first, median and best reported).",
                       lower_bound=1)
  flags.DEFINE_string("json", None, "Write the results to this JSON file.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  result = run(args.points, args.tiles, args.size, chunk_size=args.chunk_size,
               repeats=args.repeats)
  print(_table(result))
  if args.json:
    with open(args.json, "w") as handle:
      json.dump(result, handle, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
