"""Ceiling of mask -> graph extraction: APLS and TOPO F1 of the graph extracted from the
synthetic city's ground-truth mask (exact, and blurred + noisy) against the exact centreline
graph of the same tile.

    python -m benchmarks.graph_ceiling [--first_seed=1000 --tiles=16 --sizes=512,128]
        [--set=spur_length=3 --set=min_blob_area=4 ...] [--json=PATH]

What a perfect prediction reaches through `cmmp_jax.graphs.extract_graph`: compare a model's
APLS with this, not with 1. The tile covers 256 m whatever its size (0.5 m/px at 512 px, 2 m/px
at 128 px). 'blurred' = the mask blurred (Gaussian, sigma 2 px) plus Gaussian noise (std 0.15,
seeded per tile), clipped to [0, 1] and thresholded by the extractor: a stand-in for a soft,
ragged prediction. --set overrides GraphParams fields (the defaults were chosen on seeds
2000-2015; the README's figures are seeds 1000-1015). Prints a table, writes JSON.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time
from typing import Sequence

from absl import app
from absl import flags
import numpy as np
import scipy.ndimage

from cmmp_jax import graph_eval, graphs, topology
from cmmp_jax.data import synthetic

FLAGS = flags.FLAGS
flags.DEFINE_integer("first_seed", 1000, "First tile seed.")
flags.DEFINE_integer("tiles", 16, "Tiles (consecutive seeds).", lower_bound=1)
flags.DEFINE_list("sizes", ["512", "128"], "Tile sides in pixels (each tile covers 256 m).")
flags.DEFINE_multi_string("set", [], "GraphParams overrides FIELD=VALUE.")
flags.DEFINE_string("json", None, "Write the results to this file.")
TILE_EXTENT_M = 256.0  # synthetic.SyntheticConfig.tile_extent_m


def graph_params(overrides: Sequence[str]) -> graphs.GraphParams:
  """GraphParams with FIELD=VALUE overrides (values parsed as the field's default's type)."""
  defaults = graphs.GraphParams()
  fields = {}
  for item in overrides:
    name, sep, value = item.partition("=")
    if not sep or not hasattr(defaults, name):
      raise app.UsageError(f"--set {item!r}: expected FIELD=VALUE with a GraphParams field")
    kind = type(getattr(defaults, name))
    fields[name] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return graphs.GraphParams(**fields)


def blurred(mask: np.ndarray, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  soft = scipy.ndimage.gaussian_filter(mask, 2.0) + rng.normal(0.0, 0.15, mask.shape)
  return np.clip(soft, 0.0, 1.0).astype(np.float32)


def measure(size: int, kind: str, seeds: Sequence[int], params: graphs.GraphParams) -> dict:
  apls, topo_f1, seconds = [], [], []
  mpp = TILE_EXTENT_M / size
  for seed in seeds:
    tile = synthetic.generate_tile(seed, size=size)
    gt = graph_eval.polylines_to_graph(tile["road_lines"], size, size)
    mask = tile["mask"][..., 0].astype(np.float32)
    if kind == "blurred":
      mask = blurred(mask, seed)
    start = time.perf_counter()
    prop = graphs.extract_graph(mask, params)
    seconds.append(time.perf_counter() - start)
    gt_m = graphs.pixel_graph_to_metres(gt, mpp)
    prop_m = graphs.pixel_graph_to_metres(prop, mpp)
    apls.append(topology.apls(gt_m, prop_m).apls)
    topo_f1.append(topology.topo(gt_m, prop_m).f1)
  return {"size": size, "metres_per_pixel": mpp, "mask": kind, "apls_mean": float(np.mean(apls)),
          "apls_min": float(np.min(apls)), "topo_f1_mean": float(np.mean(topo_f1)),
          "extract_s_median": statistics.median(seconds), "apls": apls, "topo_f1": topo_f1}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  params = graph_params(FLAGS.set)
  seeds = list(range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.tiles))
  rows = []
  print(f"graph ceiling: seeds {seeds[0]}-{seeds[-1]}, overrides {FLAGS.set or 'none'}")
  print("| tile | m/px | mask | APLS mean | APLS min | TOPO F1 mean | extract ms (median) |")
  print("|---|---|---|---|---|---|---|")
  for size in (int(s) for s in FLAGS.sizes):
    for kind in ("exact", "blurred"):
      row = measure(size, kind, seeds, params)
      rows.append(row)
      print(f"| {size} px | {row['metres_per_pixel']:.2f} | {kind} | {row['apls_mean']:.3f} | "
            f"{row['apls_min']:.3f} | {row['topo_f1_mean']:.3f} | "
            f"{1e3 * row['extract_s_median']:.0f} |", flush=True)
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(
        {"seeds": seeds, "params": dataclasses.asdict(params), "overrides": FLAGS.set,
         "rows": rows}, indent=2))


if __name__ == "__main__":
  app.run(main)
