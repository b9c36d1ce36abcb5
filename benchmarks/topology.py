"""Benchmark of the topology metrics (cmmp_jax.topology.apls and .topo) on one CPU core.

    python -m benchmarks.topology [--grid=10,20] [--repeats=5] [--cpu=N] [--json=PATH]
        [--cases_dir=../shared/metrics/cases]

Times APLS and TOPO (default parameters; TOPO with every gt node as an origin) on:
  * synthetic tile pairs: a seeded jittered grid of G x G nodes about 55 m apart (G = 10: 100
    nodes on about 500 m x 500 m, a 1024-pixel tile at 0.5 m/px), curved polylines, 15% of the
    streets left out; the proposal moves every vertex by up to 1.5 m, loses 10% of the gt
    edges and gains 5 dead-end spurs;
  * every reference case in --cases_dir (skipped when absent), the real ones being SpaceNet /
    OpenStreetMap / Sat2Graph tiles of 10 to 83 nodes.
Each call runs once untimed, then --repeats times in one process; the median and best are
reported with the load average, since the machine may be shared. The process is pinned to one
CPU (--cpu, default the first one it may use): the metrics are meant to run on one core.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import time

from absl import app
from absl import flags
import networkx as nx
import numpy as np

from cmmp_jax import topology

_DEFAULT_CASES_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "metrics" / \
    "cases"


def _wiggly(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """(k, 2) polyline from a to b with 3 inner vertices moved up to 3 m sideways."""
  t = np.linspace(0, 1, 5)[:, None]
  line = a * (1 - t) + b * t
  direction = (b - a) / max(np.hypot(*(b - a)), 1e-9)
  normal = np.array([-direction[1], direction[0]])
  line[1:-1] += normal * rng.uniform(-3, 3, (3, 1))
  return line


def synthetic_pair(grid: int, seed: int = 0) -> tuple[nx.MultiGraph, nx.MultiGraph]:
  """(gt, prop) road graphs in metres: a grid x grid street network and a degraded copy."""
  rng = np.random.default_rng(seed)
  spacing = 55.0
  xy = {(i, j): np.array([i * spacing, j * spacing]) + rng.uniform(-8, 8, 2)
        for i in range(grid) for j in range(grid)}
  node_id = {key: n for n, key in enumerate(xy)}
  streets = [((i, j), (i + 1, j)) for i in range(grid - 1) for j in range(grid)]
  streets += [((i, j), (i, j + 1)) for i in range(grid) for j in range(grid - 1)]
  keep = rng.random(len(streets)) >= 0.15
  gt = nx.MultiGraph()
  for key, p in xy.items():
    gt.add_node(node_id[key], x=float(p[0]), y=float(p[1]))
  for (a, b), ok in zip(streets, keep):
    if ok:
      gt.add_edge(node_id[a], node_id[b], coords=_wiggly(xy[a], xy[b], rng))

  shift = {n: rng.uniform(-1.5, 1.5, 2) for n in gt.nodes}
  prop = nx.MultiGraph()
  for n, data in gt.nodes(data=True):
    prop.add_node(n, x=data["x"] + shift[n][0], y=data["y"] + shift[n][1])
  for a, b, data in gt.edges(data=True):
    if rng.random() < 0.10:
      continue
    coords = data["coords"].copy()
    coords[0] += shift[a]
    coords[-1] += shift[b]
    coords[1:-1] += rng.uniform(-1.5, 1.5, coords[1:-1].shape)
    prop.add_edge(a, b, coords=coords)
  next_id = max(prop.nodes) + 1
  for n in rng.choice(list(prop.nodes), 5, replace=False).tolist():
    start = np.array([prop.nodes[n]["x"], prop.nodes[n]["y"]])
    end = start + rng.uniform(-40, 40, 2)
    prop.add_node(next_id, x=float(end[0]), y=float(end[1]))
    prop.add_edge(n, next_id, coords=np.stack([start, end]))
    next_id += 1
  return gt, prop


def _time(function, repeats: int):
  """(result, seconds of every call), after one untimed call (one-time costs left out)."""
  function()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = function()
    seconds.append(time.perf_counter() - start)
  return result, seconds


def measure(name: str, gt: nx.MultiGraph, prop: nx.MultiGraph, repeats: int) -> dict:
  apls_result, apls_seconds = _time(lambda: topology.apls(gt, prop), repeats)
  topo_result, topo_seconds = _time(lambda: topology.topo(gt, prop), repeats)
  return {
      "name": name, "gt_nodes": gt.number_of_nodes(), "gt_edges": gt.number_of_edges(),
      "prop_nodes": prop.number_of_nodes(), "prop_edges": prop.number_of_edges(),
      "apls": apls_result.apls, "topo_f1": topo_result.f1,
      "control_points": [apls_result.n_control_points_gt, apls_result.n_control_points_prop],
      "routes": [apls_result.n_routes_gt_onto_prop, apls_result.n_routes_prop_onto_gt],
      "apls_seconds_median": float(np.median(apls_seconds)),
      "apls_seconds_best": min(apls_seconds), "apls_seconds_all": apls_seconds,
      "topo_seconds_median": float(np.median(topo_seconds)),
      "topo_seconds_best": min(topo_seconds), "topo_seconds_all": topo_seconds,
  }


def run(grids, repeats: int = 5, cases_dir: pathlib.Path | None = _DEFAULT_CASES_DIR) -> dict:
  rows = []
  for grid in grids:
    gt, prop = synthetic_pair(grid)
    rows.append(measure(f"synthetic {grid}x{grid}", gt, prop, repeats))
  if cases_dir is not None and pathlib.Path(cases_dir).is_dir():
    for path in sorted(pathlib.Path(cases_dir).glob("*.json")):
      with open(path) as f:
        case = json.load(f)
      gt = topology.graph_from_lists(case["gt"]["nodes"], case["gt"]["edges"])
      prop = topology.graph_from_lists(case["prop"]["nodes"], case["prop"]["edges"])
      rows.append(measure(case["name"], gt, prop, repeats))
  return {
      "rows": rows, "repeats": repeats,
      "cpus_allowed": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else None,
      "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "cpu_count": os.cpu_count(),
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "python": platform.python_version(), "networkx": nx.__version__,
  }


def _table(report: dict) -> str:
  lines = [f"topology metrics: median (best) of {report['repeats']} calls, seconds, on CPUs "
           f"{report['cpus_allowed']} (load average {report['load_average_1min']:.1f} on "
           f"{report['cpu_count']} CPUs)",
           f"{'pair':<26}{'gt n/e':>9}{'prop n/e':>10}{'ctrl pts':>10}{'APLS s':>16}"
           f"{'TOPO s':>16}{'APLS':>8}{'TOPO F1':>9}"]
  for row in report["rows"]:
    lines.append(
        f"{row['name']:<26}{row['gt_nodes']:>4}/{row['gt_edges']:<4}"
        f"{row['prop_nodes']:>5}/{row['prop_edges']:<4}"
        f"{'/'.join(map(str, row['control_points'])):>10}"
        f"{row['apls_seconds_median']:>9.3f} ({row['apls_seconds_best']:.3f})"
        f"{row['topo_seconds_median']:>9.3f} ({row['topo_seconds_best']:.3f})"
        f"{row['apls']:>8.4f}{row['topo_f1']:>9.4f}")
  return "\n".join(lines)


def define_flags() -> None:
  """The command line's flags (defined only when this module runs as the program)."""
  flags.DEFINE_list("grid", ["10", "20"], "Synthetic pairs of G x G nodes, one per value.")
  flags.DEFINE_integer("repeats", 5, "Calls timed per metric and pair.", lower_bound=1)
  flags.DEFINE_integer("cpu", None, "Pin the process to this CPU (default: the first allowed).")
  flags.DEFINE_string("cases_dir", str(_DEFAULT_CASES_DIR),
                      "Reference cases to time as well ('' for none; skipped when absent).")
  flags.DEFINE_string("json", None, "Write the results to this JSON file.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  if hasattr(os, "sched_setaffinity"):
    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
  grids = [int(g) for g in args.grid]
  if any(g < 2 for g in grids):
    raise app.UsageError(f"--grid values must be >= 2, got {args.grid}")
  report = run(grids, args.repeats, pathlib.Path(args.cases_dir) if args.cases_dir else None)
  print(_table(report))
  if args.json:
    with open(args.json, "w") as handle:
      json.dump(report, handle, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
