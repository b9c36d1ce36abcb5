"""Road graphs of rasters too large for memory: a probability GeoTIFF read back block by block.

`extract_streamed_graph` builds the same graph as graphs.extract_graph on the whole map (image
only, no trajectories) without holding the map or its skeleton: the raster is cut into the
cores of graphs.extract.skeleton_of (block_size - 2 * block_overlap px, read with block_overlap
px of context), each core's skeleton becomes a graph of its own (extract.skeleton_to_graph,
moved to raster coordinates), and the seams are stitched: every pair of skeleton pixels on two
sides of a seam that touch (8-neighbours) is joined by an edge, after splitting an edge whose
interior vertex is such a pixel. That is the pixel adjacency the whole-raster skeleton graph
has, so once degree-2 nodes are dissolved (extract.clean_graph) the stitched graph is the
whole one's. Cleaning, bridging and simplification then run on the graph (memory by road
length, not by raster area). Memory: one block of the map and its skeleton at a time.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Mapping

import networkx as nx
import numpy as np
import rasterio
import rasterio.windows

from cmmp_jax import stream
from cmmp_jax.graphs import bridging, export, extract
from cmmp_jax.graphs.params import GraphParams

DEFAULT_BLOCK = 4096


def _core_graph(thin: np.ndarray, radius: np.ndarray, row0: int, col0: int,
                ids) -> nx.MultiGraph:
  """skeleton_to_graph of a core skeleton (with its road radii, float (h, w)), nodes
  renumbered from `ids`, in raster pixels."""
  local = extract.skeleton_to_graph(thin, extract.radius_to_half_pixels(radius))
  graph = nx.MultiGraph()
  mapping = {node: next(ids) for node in local.nodes}
  offset = np.array([col0, row0], np.float64)
  for node, data in local.nodes(data=True):
    graph.add_node(mapping[node], x=data['x'] + col0, y=data['y'] + row0,
                   radius=data['radius'])
  for u, v, data in local.edges(data=True):
    extract._add_edge(graph, mapping[u], mapping[v], data['coords'] + offset)
  return graph


def _split_at(graph: nx.MultiGraph, u, v, key, indices: list[int], new_nodes: list[int]) -> None:
  """Replaces edge (u, v, key), coords running u -> v, by pieces cut at interior vertices."""
  coords = graph.edges[u, v, key]['coords']
  graph.remove_edge(u, v, key)
  ends = [u] + new_nodes + [v]
  cuts = [0] + indices + [len(coords) - 1]
  for node, index in zip(new_nodes, indices):
    graph.add_node(node, x=float(coords[index, 0]), y=float(coords[index, 1]))
  for a, b, start, stop in zip(ends[:-1], ends[1:], cuts[:-1], cuts[1:]):
    extract._add_edge(graph, a, b, coords[start:stop + 1])


def extract_streamed_graph(prob_path, params: GraphParams | None = None) -> nx.MultiGraph:
  """Road graph (pixel units, graphs.extract layout) of a probability GeoTIFF, block by block.

  params.block_size 0 means DEFAULT_BLOCK here (the map is never read whole); use_trajectories
  is not applied (the graph attribute 'trajectories' says 'off (streamed)').
  """
  start = time.perf_counter()
  params = params or GraphParams()
  block = int(params.block_size) or DEFAULT_BLOCK
  overlap = int(params.block_overlap)
  core = block - 2 * overlap
  if core < 1:
    raise extract.GraphInputError(f'block_size {block} leaves no core with block_overlap '
                                  f'{overlap}')
  graph = nx.MultiGraph()
  ids = itertools.count()
  border = {}  # (row, col) of a skeleton pixel on a core's edge -> its core
  radii = {}  # ... -> its road radius (skeleton_to_graph's rounding to half pixels)
  with stream.gdal_env(), rasterio.open(prob_path) as dataset:
    height, width = dataset.height, dataset.width
    for r0 in range(0, height, core):
      for c0 in range(0, width, core):
        r1, c1 = min(r0 + core, height), min(c0 + core, width)
        wr0, wc0 = max(0, r0 - overlap), max(0, c0 - overlap)
        wr1, wc1 = min(height, r1 + overlap), min(width, c1 + overlap)
        window = rasterio.windows.Window(wc0, wr0, wc1 - wc0, wr1 - wr0)
        values = extract.check_probabilities(dataset.read(1, window=window), str(prob_path))
        thin, radius = extract.thin_window(values, params, None,
                                           (wr0 == 0, wr1 == height, wc0 == 0, wc1 == width))
        core_slice = (slice(r0 - wr0, r1 - wr0), slice(c0 - wc0, c1 - wc0))
        thin, radius = thin[core_slice], radius[core_slice]
        if not thin.any():
          continue
        graph.update(_core_graph(thin, radius, r0, c0, ids))
        edge = np.zeros_like(thin)
        edge[[0, -1], :] = True
        edge[:, [0, -1]] = True
        for row, col in zip(*np.nonzero(thin & edge)):
          border[(int(row) + r0, int(col) + c0)] = (r0, c0)
          radii[(int(row) + r0, int(col) + c0)] = float(
              extract.radius_to_half_pixels(radius[row, col])) / 2.0
  _stitch(graph, border, ids, radii)
  extract.clean_graph(graph, params, (height, width))
  counts = bridging.bridge_gaps(graph, params, None)
  extract.simplify_graph(graph, params.simplify_tolerance)
  graph = extract.canonical(graph)
  graph.graph.update(units='pixel', height=height, width=width, trajectories='off (streamed)',
                     recovered_pieces=0, bridges=counts['bridges'],
                     bridges_rejected=counts['rejected'], seconds=time.perf_counter() - start)
  return graph


def _stitch(graph: nx.MultiGraph, border: dict, ids, radii: dict) -> None:
  """Joins touching skeleton pixels of different cores (module docstring), in place."""
  pairs = set()
  for (row, col), core in border.items():
    for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):  # each unordered neighbour pair once
      other = (row + dr, col + dc)
      if other in border and border[other] != core:
        pairs.add(((row, col), other))
  if not pairs:
    return
  wanted = {p for pair in pairs for p in pair}
  node_at = {(int(round(d['y'])), int(round(d['x']))): n for n, d in graph.nodes(data=True)
             if (int(round(d['y'])), int(round(d['x']))) in wanted}
  # Interior vertices of edges at wanted pixels become nodes.
  splits = []
  for u, v, key, data in graph.edges(keys=True, data=True):
    coords = data['coords']
    indices = [k for k in range(1, len(coords) - 1)
               if (int(round(coords[k, 1])), int(round(coords[k, 0]))) in wanted
               and (int(round(coords[k, 1])), int(round(coords[k, 0]))) not in node_at]
    if indices:
      splits.append((u, v, key, indices))
  for u, v, key, indices in splits:
    new_nodes = [next(ids) for _ in indices]
    # coords run u -> v as built (skeleton_to_graph, _core_graph keep the path's order).
    coords = graph.edges[u, v, key]['coords']
    for node, index in zip(new_nodes, indices):
      node_at[(int(round(coords[index, 1])), int(round(coords[index, 0])))] = node
    _split_at(graph, u, v, key, indices, new_nodes)
    for node in new_nodes:  # the radius skeleton_to_graph gives a node at that pixel
      pixel = (int(round(graph.nodes[node]['y'])), int(round(graph.nodes[node]['x'])))
      graph.nodes[node]['radius'] = radii.get(pixel, 0.0)
  for p, q in sorted(pairs):
    if p not in node_at or q not in node_at:  # not in a core graph (never expected)
      continue
    a, b = node_at[p], node_at[q]
    extract._add_edge(graph, a, b, np.array([[p[1], p[0]], [q[1], q[0]]], np.float64))


def write_streamed_graph(output_dir, stem: str, prob_path, *, geo=None,
                         config: Mapping[str, Any] | None = None):
  """{stem}_graph.geojson and {stem}_graph.graphml of a probability GeoTIFF (no overlay PNG:
  a raster this size is not drawn); returns (paths, graph)."""
  config = dict(config.items()) if config is not None else {}
  params = GraphParams.from_config(config)
  graph = extract_streamed_graph(prob_path, params)
  paths = export.graph_output_paths(output_dir, stem)
  wgs84 = bool(config.get('wgs84', False)) and geo is not None and geo.crs is not None
  export.write_geojson(paths['geojson'], graph, geo, wgs84=wgs84)
  export.write_graphml(paths['graphml'], graph, geo)
  return [paths['geojson'], paths['graphml']], graph
