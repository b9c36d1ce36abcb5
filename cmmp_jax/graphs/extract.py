"""Road probability map -> road graph in pixel units (threshold, clean, skeletonise, graph).

Graph representation, shared with cmmp_jax.topology (which takes the same graphs in metres):
a networkx.MultiGraph whose nodes are ints 0..n-1 with float attributes `x` (column) and `y`
(row) -- the centre of skeleton pixel (row=y, col=x), in pixel units -- and whose edges carry
`coords`, a float64 (N, 2) array of (x, y) vertices from the node with the smaller id to the
node with the larger (a graph built here lists its edges as (u, v) with u <= v, so `coords`
runs from u to v), `length` (pixels along the polyline) and `source` ('image', 'bridge' or
'trajectory_bridge'). An edge's first and last vertices are exactly its nodes' positions.

Defined results for degenerate input:
  * no road pixel (or nothing left after cleaning): an empty graph;
  * a road with no junction: one edge between its two end points;
  * a closed loop with no junction: two nodes (opposite points of the loop) joined by two edges,
    so that every edge is a simple polyline and shortest paths along the loop exist;
  * self-loops at a junction are split the same way (a new node halfway); zero-length edges
    (after merging junctions) are contracted into one node.
"""
from __future__ import annotations

import networkx as nx
import numpy as np
import scipy.ndimage
import shapely
from skimage import morphology

from cmmp_jax.graphs.params import GraphParams

# Edges shorter than this many pixels count as zero-length.
ZERO_LENGTH = 1e-6


class GraphInputError(ValueError):
  """An input array of the graph extraction (named in the message) is unusable."""


def check_probabilities(probabilities, name: str = 'probabilities') -> np.ndarray:
  """(H, W) float array in [0, 1] (or bool / uint8 0/1/255 masks, scaled) -> float32 (H, W)."""
  array = np.asarray(probabilities)
  if array.ndim == 3 and array.shape[2] == 1:
    array = array[..., 0]
  if array.ndim != 2:
    raise GraphInputError(f'{name} must be (H, W), got shape {array.shape}')
  if array.dtype == bool:
    return array.astype(np.float32)
  if np.issubdtype(array.dtype, np.integer):
    return array.astype(np.float32) / float(max(1, np.iinfo(array.dtype).max))
  if not np.issubdtype(array.dtype, np.floating):
    raise GraphInputError(f'{name} must be float, int or bool, got {array.dtype}')
  if array.size and not np.isfinite(array).all():
    raise GraphInputError(f'{name} contains NaN or inf')
  return array


def clean_mask(probabilities: np.ndarray, params: GraphParams) -> np.ndarray:
  """float (H, W) -> bool (H, W): probability > threshold, small blobs dropped, holes filled."""
  mask = np.asarray(probabilities) > params.threshold
  if params.min_blob_area > 1 and mask.any():
    mask = morphology.remove_small_objects(mask, min_size=int(params.min_blob_area),
                                           connectivity=2)
  if params.max_hole_area > 0 and mask.any():
    mask = morphology.remove_small_holes(mask, area_threshold=int(params.max_hole_area),
                                         connectivity=1)
  return mask


def thin_window(probabilities: np.ndarray, params: GraphParams,
                extra_road: np.ndarray | None = None,
                raster_sides=(True, True, True, True)) -> tuple[np.ndarray, np.ndarray]:
  """Cleaned road mask of a window (plus `extra_road`, bool, painted in after cleaning) -> its
  one-pixel skeleton (bool (h, w)) and the road radius at each skeleton pixel (float32 (h, w),
  the Euclidean distance to the nearest non-road pixel, scipy.ndimage.distance_transform_edt;
  0 off the skeleton).

  raster_sides (top, bottom, left, right): which sides of the window are the raster's border.
  There the map is padded by params.border_padding pixels that repeat the border pixels (numpy
  'edge' padding) before cleaning and thinning: a road that leaves the raster then runs on
  straight, so its centreline reaches the border instead of forking into the two corners of
  its cut end, and its radius at the border is its half-width, not the distance to the edge.
  (Padding before cleaning, not after: a small pocket of background between a road and the
  border then opens outwards instead of being filled as a hole; cleaning first lowered the
  synthetic city's APLS ceiling from 0.942 to 0.931.)
  """
  pad = int(params.border_padding)
  widths = [(pad if raster_sides[0] else 0, pad if raster_sides[1] else 0),
            (pad if raster_sides[2] else 0, pad if raster_sides[3] else 0)]
  padded = np.pad(probabilities, widths, mode='edge') if pad else probabilities
  mask = clean_mask(padded, params)
  if extra_road is not None:
    mask |= np.pad(extra_road, widths, mode='edge') if pad else extra_road
  height, width = probabilities.shape
  crop = (slice(widths[0][0], widths[0][0] + height), slice(widths[1][0], widths[1][0] + width))
  if not mask.any():
    return np.zeros((height, width), bool), np.zeros((height, width), np.float32)
  skeleton = morphology.skeletonize(mask)
  radius = np.where(skeleton, scipy.ndimage.distance_transform_edt(mask), 0.0)
  return skeleton[crop], radius[crop].astype(np.float32)


def skeleton_and_radius(probabilities: np.ndarray, params: GraphParams,
                        extra_road: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Cleaned road mask (plus `extra_road`, a bool (H, W) painted in after cleaning) -> its
  one-pixel skeleton, bool (H, W), and the road radius at every skeleton pixel in half pixels,
  uint8 (H, W) (round(2 * radius), at most 255; 0 off the skeleton) -- one byte per pixel, so a
  mosaic's radii cost no more than its skeleton.

  Rasters larger than params.block_size on a side are cleaned and thinned block by block: each
  block is processed with params.block_overlap pixels of context on every side and only its
  core is kept. Thinning, the distance transform (for roads narrower than the overlap) and
  blob/hole cleaning only look as far as a road is wide (plus the blob sizes), so with an
  overlap well above the widest road the seams match the whole-array result while memory stays
  bounded by the block size.
  """
  height, width = probabilities.shape
  block = int(params.block_size)
  if not block or (height <= block and width <= block):
    skeleton, radius = thin_window(probabilities, params, extra_road)
    return skeleton, radius_to_half_pixels(radius)
  overlap = int(params.block_overlap)
  core = block - 2 * overlap
  skeleton = np.zeros((height, width), bool)
  radius_halfpx = np.zeros((height, width), np.uint8)
  for r0 in range(0, height, core):
    for c0 in range(0, width, core):
      r1, c1 = min(r0 + core, height), min(c0 + core, width)
      wr0, wc0 = max(0, r0 - overlap), max(0, c0 - overlap)
      wr1, wc1 = min(height, r1 + overlap), min(width, c1 + overlap)
      window = probabilities[wr0:wr1, wc0:wc1]
      if not (window > params.threshold).any() and (
          extra_road is None or not extra_road[wr0:wr1, wc0:wc1].any()):
        continue
      thin, radius = thin_window(
          window, params, None if extra_road is None else extra_road[wr0:wr1, wc0:wc1],
          (wr0 == 0, wr1 == height, wc0 == 0, wc1 == width))
      core_slice = (slice(r0 - wr0, r1 - wr0), slice(c0 - wc0, c1 - wc0))
      skeleton[r0:r1, c0:c1] = thin[core_slice]
      radius_halfpx[r0:r1, c0:c1] = radius_to_half_pixels(radius[core_slice])
  return skeleton, radius_halfpx


def radius_to_half_pixels(radius: np.ndarray) -> np.ndarray:
  """float radii (pixels) -> uint8 round(2 * radius), clipped to 0..255 (skeleton_and_radius)."""
  return np.clip(np.rint(2.0 * radius), 0, 255).astype(np.uint8)


def skeleton_of(probabilities: np.ndarray, params: GraphParams,
                extra_road: np.ndarray | None = None) -> np.ndarray:
  """The bool (H, W) skeleton of `skeleton_and_radius`."""
  return skeleton_and_radius(probabilities, params, extra_road)[0]


# ----------------------------------------------------------------------------------------------
# Skeleton -> graph.


def polyline_length(coords: np.ndarray) -> float:
  """Length of a (N, 2) polyline."""
  if len(coords) < 2:
    return 0.0
  return float(np.sum(np.hypot(*np.diff(coords, axis=0).T)))


def oriented_coords(graph: nx.MultiGraph, u, v, key) -> np.ndarray:
  """The (N, 2) coords of edge (u, v, key) running from node u to node v."""
  data = graph.edges[u, v, key]
  coords = data['coords']
  if u == v:
    return coords
  start = np.array([graph.nodes[u]['x'], graph.nodes[u]['y']])
  if np.sum((coords[0] - start) ** 2) <= np.sum((coords[-1] - start) ** 2):
    return coords
  return coords[::-1]


def _add_edge(graph: nx.MultiGraph, u, v, coords: np.ndarray, source: str = 'image') -> None:
  coords = np.asarray(coords, np.float64)
  graph.add_edge(u, v, coords=coords, length=polyline_length(coords), source=source)


def skeleton_to_graph(skeleton: np.ndarray, radius_halfpx: np.ndarray | None = None
                      ) -> nx.MultiGraph:
  """bool (H, W) one-pixel skeleton -> raw MultiGraph: a node at every end point and junction
  pixel (skan's paths between pixels of degree != 2), an edge per path. Isolated rings become a
  node with a self-loop here (normalised by `clean_graph`). With `radius_halfpx` (uint8 (H, W),
  skeleton_and_radius) every node gets `radius`, the road's radius at its pixel (pixels), which
  the width-aware cleaning rules use; nodes without it count as radius 0."""
  from skan import csr  # numba-compiled; imported here so that importing the module is cheap

  graph = nx.MultiGraph()
  if not skeleton.any():
    return graph
  skel = csr.Skeleton(np.ascontiguousarray(skeleton, dtype=bool), keep_images=False)
  pixel_xy = np.asarray(skel.coordinates, np.float64)[:, ::-1]  # (row, col) -> (x, y)
  indptr, indices = skel.paths.indptr, skel.paths.indices
  for i in range(skel.n_paths):
    path = indices[indptr[i]:indptr[i + 1]]
    u, v = int(path[0]), int(path[-1])
    for node in (u, v):
      if node not in graph:
        graph.add_node(node, x=float(pixel_xy[node, 0]), y=float(pixel_xy[node, 1]))
        if radius_halfpx is not None:
          col, row = int(pixel_xy[node, 0]), int(pixel_xy[node, 1])
          graph.nodes[node]['radius'] = float(radius_halfpx[row, col]) / 2.0
    _add_edge(graph, u, v, pixel_xy[path])
  return graph


# ----------------------------------------------------------------------------------------------
# Graph cleaning.


def _radius(graph: nx.MultiGraph, node) -> float:
  return graph.nodes[node].get('radius', 0.0)


def _merge_junctions(graph: nx.MultiGraph, distance: float, radius_factor: float = 0.0) -> None:
  """Contracts groups of junctions (degree >= 3) joined by edges no longer than `distance` or
  than radius_factor times the sum of their road radii (their largest inscribed discs overlap:
  one crossing of wide roads) into one node at their mean position, with the largest radius;
  their other edges are re-attached to it."""
  limit = lambda u, v: max(distance, radius_factor * (_radius(graph, u) + _radius(graph, v)))
  short = [(u, v) for u, v, d in graph.edges(data=True)
           if u != v and graph.degree(u) >= 3 and graph.degree(v) >= 3
           and d['length'] <= limit(u, v)]
  for group in list(nx.connected_components(nx.Graph(short))):
    members = sorted(group)
    keep = members[0]
    centre = np.mean([[graph.nodes[n]['x'], graph.nodes[n]['y']] for n in members], axis=0)
    radius = max(_radius(graph, n) for n in members)
    internal = {(u, v, k) for u, v, k, d in graph.edges(members, keys=True, data=True)
                if u != v and u in group and v in group and d['length'] <= limit(u, v)}
    graph.remove_edges_from(internal)
    moved = []
    for node in members:
      for _, other, key, data in list(graph.edges(node, keys=True, data=True)):
        if not graph.has_edge(node, other, key):
          continue  # a self-loop listed twice
        coords = oriented_coords(graph, node, other, key).copy()
        graph.remove_edge(node, other, key)
        coords[0] = centre
        if other in group:
          coords[-1] = centre
        moved.append((keep if other in group else other, coords, data['source']))
    for node in members[1:]:
      graph.remove_node(node)
    graph.nodes[keep]['x'], graph.nodes[keep]['y'] = float(centre[0]), float(centre[1])
    if radius:
      graph.nodes[keep]['radius'] = radius
    for other, coords, source in moved:
      _add_edge(graph, keep, other, coords, source)


def _snap_edge_ends(graph: nx.MultiGraph, node) -> None:
  """Moves the end vertex at `node` of every edge of `node` onto the node's position."""
  position = np.array([graph.nodes[node]['x'], graph.nodes[node]['y']])
  for _, other, key, data in graph.edges(node, keys=True, data=True):
    coords = oriented_coords(graph, node, other, key).copy()
    if other == node:
      coords[0] = position
      coords[-1] = position
    else:
      coords[0] = position
    if len(coords) >= 3 and np.allclose(coords[0], coords[1]):
      coords = np.delete(coords, 1, axis=0)
    data['coords'] = coords
    data['length'] = polyline_length(coords)


def _dissolve_degree_two(graph: nx.MultiGraph, nodes=None) -> None:
  """Joins the two edges of every node of degree 2 (not a self-loop) into one edge."""
  for node in list(graph.nodes if nodes is None else nodes):
    if node not in graph or graph.degree(node) != 2:
      continue
    edges = list(graph.edges(node, keys=True, data=True))
    if len(edges) != 2 or any(other == node for _, other, _, _ in edges):
      continue
    (_, a, ka, da), (_, b, kb, db) = edges
    if da['source'] != db['source']:
      continue  # keep bridges as their own edges (explainable overlays)
    first = oriented_coords(graph, a, node, ka)
    second = oriented_coords(graph, node, b, kb)
    graph.remove_edge(node, a, ka)
    graph.remove_edge(node, b, kb)
    graph.remove_node(node)
    _add_edge(graph, a, b, np.concatenate([first, second[1:]]), da['source'])


def _on_border(graph: nx.MultiGraph, node, shape) -> bool:
  """Whether `node` lies on the outermost pixel ring of a raster of `shape` (H, W)."""
  if shape is None:
    return False
  x, y = graph.nodes[node]['x'], graph.nodes[node]['y']
  return min(x, y, shape[1] - 1 - x, shape[0] - 1 - y) <= 0.5


def _prune_spurs(graph: nx.MultiGraph, spur_length: float, radius_factor: float = 0.0,
                 shape=None) -> None:
  """Removes dead ends shorter than spur_length plus radius_factor times the road radius at
  their junction (repeatedly), and isolated segments shorter than spur_length. A dead end on
  the raster's border (`shape` (H, W), None = no border) is a road leaving the raster, not a
  spur, and stays."""
  changed = True
  while changed:
    changed = False
    touched = []
    for u, v, key, data in list(graph.edges(keys=True, data=True)):
      # (self-loops are left to _split_self_loops)
      if u == v or not graph.has_edge(u, v, key):
        continue
      du, dv = graph.degree(u), graph.degree(v)
      if min(du, dv) != 1:
        continue
      end, junction = (u, v) if du == 1 else (v, u)
      if max(du, dv) >= 3:
        if _on_border(graph, end, shape):
          continue
        limit = spur_length + radius_factor * _radius(graph, junction)
      else:
        limit = spur_length
      if data['length'] >= limit:
        continue
      if max(du, dv) == 1 or max(du, dv) >= 3:
        graph.remove_edge(u, v, key)
        changed = True
        touched += [u, v]
    graph.remove_nodes_from([n for n in set(touched) if graph.degree(n) == 0])
    _dissolve_degree_two(graph, [n for n in set(touched) if n in graph])


def _split_self_loops(graph: nx.MultiGraph) -> None:
  """A self-loop becomes two edges through a new node at the loop's halfway vertex; loops too
  short to split are removed (zero-length self-loops carry no road)."""
  next_id = max(graph.nodes, default=-1) + 1
  for u, _, key, data in list(nx.selfloop_edges(graph, keys=True, data=True)):
    coords = data['coords']
    graph.remove_edge(u, u, key)
    if len(coords) < 3 or data['length'] < 2.0:
      continue
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(coords, axis=0).T))])
    mid = int(np.clip(np.searchsorted(arc, arc[-1] / 2.0), 1, len(coords) - 2))
    graph.add_node(next_id, x=float(coords[mid, 0]), y=float(coords[mid, 1]))
    _add_edge(graph, u, next_id, coords[:mid + 1], data['source'])
    _add_edge(graph, next_id, u, coords[mid:], data['source'])
    next_id += 1
  graph.remove_nodes_from([n for n in list(graph.nodes) if graph.degree(n) == 0])


def _contract_zero_length(graph: nx.MultiGraph) -> None:
  """Edges of (near) zero length between two nodes merge the nodes (the first keeps)."""
  for u, v, key, data in list(graph.edges(keys=True, data=True)):
    if u == v or data['length'] > ZERO_LENGTH or u not in graph or v not in graph:
      continue
    if not graph.has_edge(u, v, key):
      continue
    graph.remove_edge(u, v, key)
    for _, other, k, d in list(graph.edges(v, keys=True, data=True)):
      coords = oriented_coords(graph, v, other, k)
      graph.remove_edge(v, other, k)
      _add_edge(graph, u, u if other == v else other, coords, d['source'])
    graph.remove_node(v)
    _snap_edge_ends(graph, u)


def _straighten_at_junctions(graph: nx.MultiGraph, radius_factor: float) -> None:
  """Inside the disc of radius_factor times its road radius around every junction (degree >=
  3) the skeleton bends towards the other arms (thinning of the crossing's widened area); each
  edge drops its vertices inside the disc, so it runs straight from the junction to where it
  leaves the disc."""
  if radius_factor <= 0:
    return
  for node in [n for n in graph.nodes if graph.degree(n) >= 3]:
    reach = radius_factor * _radius(graph, node)
    if reach <= 1.0:
      continue
    centre = np.array([graph.nodes[node]['x'], graph.nodes[node]['y']])
    for _, other, key, data in list(graph.edges(node, keys=True, data=True)):
      if other == node:
        continue
      coords = oriented_coords(graph, node, other, key)
      inside = np.hypot(*(coords - centre).T) < reach
      # keep the far end, and everything from the first vertex outside the disc on
      first_out = int(np.argmin(inside[1:])) + 1 if not inside[1:].all() else len(coords) - 1
      if first_out <= 1:
        continue
      coords = np.vstack([coords[:1], coords[first_out:]])
      data['coords'] = coords
      data['length'] = polyline_length(coords)


def _snap_to_border(graph: nx.MultiGraph, radius_factor: float, distance: float, shape) -> None:
  """Extends every dead end within radius_factor times its road radius plus `distance` of the
  raster border (`shape` (H, W)) straight onto the nearest border pixel, which becomes the end
  node. A skeleton stops about one radius short of its road's end, so with radius_factor 2 the
  road itself ended within its half-width (plus `distance`) of the border: it leaves the raster
  there and the prediction only faded out before the edge."""
  height, width = shape
  for node in [n for n in graph.nodes if graph.degree(n) == 1]:
    (_, other, key), = graph.edges(node, keys=True)
    if other == node:
      continue
    x, y = graph.nodes[node]['x'], graph.nodes[node]['y']
    gaps = (x, width - 1 - x, y, height - 1 - y)
    side = int(np.argmin(gaps))
    if gaps[side] <= 0.5 or gaps[side] > radius_factor * _radius(graph, node) + distance:
      continue
    target = [(0.0, y), (width - 1.0, y), (x, 0.0), (x, height - 1.0)][side]
    coords = oriented_coords(graph, other, node, key)
    data = graph.edges[other, node, key]
    graph.remove_edge(other, node, key)
    graph.nodes[node]['x'], graph.nodes[node]['y'] = float(target[0]), float(target[1])
    _add_edge(graph, other, node, np.vstack([coords, [target]]), data['source'])


def clean_graph(graph: nx.MultiGraph, params: GraphParams, shape=None) -> nx.MultiGraph:
  """Merges junction clusters, prunes spurs, dissolves degree-2 nodes, splits self-loops and
  contracts zero-length edges, in place; returns the graph. With the raster's `shape` (H, W),
  dead ends on its border are never spurs and dead ends near it are extended onto it
  (border_snap_radius_factor, border_snap_distance)."""
  # Pixel clusters of junctions first, then spurs (a ragged road edge sprouts many, each with a
  # junction on the centreline: merging those by road width first would chain them along the
  # road), then the junction clusters of wide crossings that remain.
  _merge_junctions(graph, params.junction_merge_distance)
  _prune_spurs(graph, params.spur_length, params.spur_radius_factor, shape)
  _dissolve_degree_two(graph)
  _merge_junctions(graph, params.junction_merge_distance, params.junction_merge_radius_factor)
  _prune_spurs(graph, params.spur_length, params.spur_radius_factor, shape)
  _straighten_at_junctions(graph, params.junction_straighten_radius_factor)
  if shape is not None:
    _snap_to_border(graph, params.border_snap_radius_factor, params.border_snap_distance, shape)
  _dissolve_degree_two(graph)
  _contract_zero_length(graph)
  _split_self_loops(graph)
  return graph


def simplify_graph(graph: nx.MultiGraph, tolerance: float) -> None:
  """Douglas-Peucker simplification of every edge polyline (end vertices kept), in place."""
  if tolerance <= 0 or graph.number_of_edges() == 0:
    return
  edges = list(graph.edges(keys=True, data=True))
  lines = np.array([shapely.LineString(d['coords'] if len(d['coords']) >= 2 else
                                       np.repeat(d['coords'], 2, axis=0))
                    for _, _, _, d in edges], dtype=object)
  simple = shapely.simplify(lines, tolerance, preserve_topology=False)
  for (_, _, _, data), line in zip(edges, simple):
    coords = shapely.get_coordinates(line)
    if len(coords) >= 2:
      data['coords'] = coords
      data['length'] = polyline_length(coords)


def canonical(graph: nx.MultiGraph) -> nx.MultiGraph:
  """A copy with nodes renumbered 0..n-1 (sorted by (y, x)) and every edge's coords running
  from its smaller node id to its larger, edges added in (u, v) order."""
  order = sorted(graph.nodes, key=lambda n: (graph.nodes[n]['y'], graph.nodes[n]['x'], n))
  new_id = {old: i for i, old in enumerate(order)}
  out = nx.MultiGraph()
  out.graph.update(graph.graph)
  for old in order:
    out.add_node(new_id[old], x=float(graph.nodes[old]['x']), y=float(graph.nodes[old]['y']))
  edges = []
  for u, v, key, data in graph.edges(keys=True, data=True):
    a, b = sorted((new_id[u], new_id[v]))
    coords = oriented_coords(graph, order[a], order[b], key) if a != b else data['coords']
    edges.append((a, b, coords, data))
  edges.sort(key=lambda e: (e[0], e[1], tuple(e[2][len(e[2]) // 2])))
  for a, b, coords, data in edges:
    extra = {k: v for k, v in data.items() if k not in ('coords', 'length')}
    coords = np.array(coords, np.float64)
    out.add_edge(a, b, coords=coords, length=polyline_length(coords), **extra)
  return out
