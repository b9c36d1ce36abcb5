"""The whole extraction: probability map (+ optional GPS heat-map) -> cleaned road graph (pixels).

Steps: threshold and clean the mask (small blobs, small holes); with trajectories, paint in the
road pieces the heat-map shows but the image missed; pad the raster border (edge-replicated,
so roads leaving the raster keep their centrelines), skeletonise and take the road radius at
each skeleton pixel (distance transform) (all in blocks for rasters larger than
GraphParams.block_size, so memory stays bounded by the block size); build the junction / end
point graph (skan); merge junction clusters, prune spurs (both scaled by the road radius),
straighten edges inside junction discs, snap dead ends near the border onto it, split loops;
bridge gaps (with trajectories: only where vehicles drove); simplify polylines; renumber.
"""
from __future__ import annotations

import time

import networkx as nx

from cmmp_jax.graphs import bridging, completion, extract
from cmmp_jax.graphs.params import GraphParams


def extract_graph(probabilities, params: GraphParams | None = None,
                  heatmap=None) -> nx.MultiGraph:
  """Road graph of a probability map.

  Args:
    probabilities: (H, W) float in [0, 1] (a tile or a whole stitched mosaic); a bool or uint8
      mask works too (uint8 scaled by 1/255).
    params: GraphParams (defaults when None).
    heatmap: optional (H, W) or (H, W, 1) GPS heat-map on the same grid (float in [0, 1] or
      uint8 0..255); used only when params.use_trajectories.

  Returns:
    networkx.MultiGraph in pixel units (see cmmp_jax.graphs.extract for the attributes), with
    graph attributes 'units' = 'pixel', 'height', 'width', 'trajectories' (how the heat-map was
    used), 'recovered_pieces', 'bridges', 'bridges_rejected' and 'seconds'.

  Raises:
    GraphInputError: a non-2-D or non-finite input, or a heat-map of another shape.
  """
  start = time.perf_counter()
  params = params or GraphParams()
  probabilities = extract.check_probabilities(probabilities)
  height, width = probabilities.shape
  fixes = None
  if params.use_trajectories and heatmap is not None:
    fixes = completion.fix_pixels(heatmap, params)
    if fixes.shape != probabilities.shape:
      raise extract.GraphInputError(
          f'heatmap is {fixes.shape[0]} x {fixes.shape[1]} but the probability map is '
          f'{height} x {width}')
    if not fixes.any():
      fixes = None
  if params.use_trajectories:
    mode = 'used' if fixes is not None else (
        'no heat-map given' if heatmap is None else 'heat-map holds no fix')
  else:
    mode = 'off'

  extra, recovered = None, 0
  if fixes is not None and params.recover:
    extra, recovered = completion.recover_in_blocks(probabilities, fixes, params)
  skeleton, radius_halfpx = extract.skeleton_and_radius(probabilities, params, extra)
  del extra
  graph = extract.skeleton_to_graph(skeleton, radius_halfpx)
  del skeleton, radius_halfpx
  extract.clean_graph(graph, params, (height, width))
  evidence = completion.TrafficEvidence(fixes, params) if fixes is not None else None
  counts = bridging.bridge_gaps(graph, params, evidence)
  extract.simplify_graph(graph, params.simplify_tolerance)
  graph = extract.canonical(graph)
  graph.graph.update(units='pixel', height=height, width=width, trajectories=mode,
                     recovered_pieces=recovered, bridges=counts['bridges'],
                     bridges_rejected=counts['rejected'],
                     seconds=time.perf_counter() - start)
  return graph
