"""Gap bridging: join dead ends of a road graph across small gaps (distance + direction rules),
optionally accepting a bridge only where GPS trajectories pass.

Rules (lengths in pixels, see GraphParams):
  * end point to end point: the two dead ends are at most `max_distance` apart, the bridge
    leaves each within `bridge_max_angle` of its outward direction (so the two roads point at
    each other), and, when they are already connected, the graph path between them is longer
    than `bridge_min_detour` times the bridge. Pairs are taken greedily, shortest first; each
    end point is bridged at most once.
  * end point onto an edge (bridge_to_edges): an unmatched dead end is extended straight along
    its outward direction; if the ray meets another edge within `max_distance`, that edge is
    split there by a new node and the bridge ends on it (a side road stopping short of the road
    it joins).
  * with a heat-map (`evidence`), each bridge is kept only when at least
    `bridge_min_heat_fraction` of its one-per-pixel samples see traffic (smoothed heat >=
    heat_min); the others are dropped: no vehicle drove there.
"""
from __future__ import annotations

import math
from typing import Callable

import networkx as nx
import numpy as np
import scipy.spatial
import shapely

from cmmp_jax.graphs import extract
from cmmp_jax.graphs.params import GraphParams

# evidence(points) -> fraction of the (K, 2) (x, y) sample points that see traffic.
Evidence = Callable[[np.ndarray], float]


def _position(graph: nx.MultiGraph, node) -> np.ndarray:
  return np.array([graph.nodes[node]['x'], graph.nodes[node]['y']], np.float64)


def outward_direction(graph: nx.MultiGraph, node, direction_length: float) -> np.ndarray | None:
  """Unit (x, y) vector pointing out of dead end `node` (degree 1), from the point
  `direction_length` pixels back along its edge towards the end; None for a zero-length edge."""
  (_, other, key), = graph.edges(node, keys=True)
  coords = extract.oriented_coords(graph, other, node, key)[::-1]  # from the end inwards
  steps = np.hypot(*np.diff(coords, axis=0).T)
  arc = np.concatenate([[0.0], np.cumsum(steps)])
  if arc[-1] <= extract.ZERO_LENGTH:
    return None
  # The last pixels of a skeleton often hook sideways (thinning of a road's blunt end): the
  # direction runs from `direction_length` back to 2 px before the end.
  target = min(direction_length, arc[-1])
  at = lambda s: np.array([np.interp(s, arc, coords[:, 0]), np.interp(s, arc, coords[:, 1])])
  vector = at(min(2.0, target / 4.0)) - at(target)
  norm = np.hypot(*vector)
  return vector / norm if norm > extract.ZERO_LENGTH else None


def sample_segment(start: np.ndarray, end: np.ndarray) -> np.ndarray:
  """(K, 2) points every pixel (at least 2) on the segment start -> end, both included."""
  count = max(2, int(math.ceil(np.hypot(*(end - start)))) + 1)
  t = np.linspace(0.0, 1.0, count)[:, None]
  return start[None] * (1 - t) + end[None] * t


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
  cos = float(np.dot(a, b) / (np.hypot(*a) * np.hypot(*b)))
  return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _accepts(evidence: Evidence | None, params: GraphParams, start, end, counts) -> bool:
  if evidence is None:
    return True
  if evidence(sample_segment(start, end)) >= params.bridge_min_heat_fraction:
    return True
  counts['rejected'] += 1
  return False


def _end_to_end(graph, ends, directions, max_distance, params, evidence, counts) -> set:
  """Adds end-to-end bridges; returns the end points used."""
  if len(ends) < 2:
    return set()
  points = np.array([_position(graph, n) for n in ends])
  pairs = scipy.spatial.cKDTree(points).query_pairs(max_distance, output_type='ndarray')
  candidates = []
  for i, j in pairs:
    vector = points[j] - points[i]
    distance = float(np.hypot(*vector))
    if distance <= extract.ZERO_LENGTH:
      continue
    di, dj = directions[ends[i]], directions[ends[j]]
    if di is None or dj is None:
      continue
    if (_angle_deg(di, vector) > params.bridge_max_angle or
        _angle_deg(dj, -vector) > params.bridge_max_angle):
      continue
    candidates.append((distance, int(i), int(j)))
  used = set()
  for distance, i, j in sorted(candidates):
    u, v = ends[i], ends[j]
    if u in used or v in used:
      continue
    # Already connected within bridge_min_detour * distance: no real shortcut, skip.
    nearby = nx.single_source_dijkstra_path_length(
        graph, u, cutoff=params.bridge_min_detour * distance, weight='length')
    if v in nearby:
      continue
    if not _accepts(evidence, params, points[i], points[j], counts):
      continue
    coords = np.array([points[i], points[j]])
    extract._add_edge(graph, u, v, coords,
                      'trajectory_bridge' if evidence is not None else 'bridge')
    counts['bridges'] += 1
    used.update((u, v))
  return used


def _split_edge(graph: nx.MultiGraph, u, v, key, at: np.ndarray, new_node) -> None:
  """Splits edge (u, v, key) at the point of its polyline nearest `at` by node `new_node`."""
  data = graph.edges[u, v, key]
  coords = extract.oriented_coords(graph, u, v, key)
  line = shapely.LineString(coords)
  distance = line.project(shapely.Point(at))
  arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(coords, axis=0).T))])
  index = int(np.clip(np.searchsorted(arc, distance, side='right'), 1, len(coords) - 1))
  point = np.asarray(line.interpolate(distance).coords[0])
  first = np.vstack([coords[:index], point])
  second = np.vstack([point, coords[index:]])
  graph.remove_edge(u, v, key)
  graph.add_node(new_node, x=float(point[0]), y=float(point[1]))
  extract._add_edge(graph, u, new_node, first, data['source'])
  extract._add_edge(graph, new_node, v, second, data['source'])


def _end_to_edge(graph, ends, directions, max_distance, params, evidence, counts) -> None:
  """Extends each dead end along its direction onto the first edge it meets."""
  ends = [n for n in ends if graph.degree(n) == 1 and directions[n] is not None]
  if not ends:
    return
  edges = list(graph.edges(keys=True))
  tree = shapely.STRtree([shapely.LineString(graph.edges[e]['coords']) for e in edges])
  starts = np.array([_position(graph, n) for n in ends])
  stops = starts + np.array([directions[n] for n in ends]) * max_distance
  rays = shapely.linestrings(np.stack([starts, stops], axis=1))
  ray_index, edge_index = tree.query(rays, predicate='intersects')
  hits = {}
  for r, e in zip(ray_index, edge_index):
    node, (u, v, key) = ends[r], edges[e]
    if node in (u, v):
      continue  # its own edge, or another edge of the same dead end's neighbour
    points = shapely.get_coordinates(
        rays[r].intersection(shapely.LineString(graph.edges[u, v, key]['coords'])))
    if not len(points):
      continue
    distances = np.hypot(*(points - starts[r]).T)
    k = int(np.argmin(distances))
    if distances[k] > 1.0 and (node not in hits or distances[k] < hits[node][0]):
      hits[node] = (float(distances[k]), points[k], (u, v, key))
  # An edge hit by several rays is split several times: track its current pieces.
  pieces = {}
  next_id = max(graph.nodes) + 1
  source = 'trajectory_bridge' if evidence is not None else 'bridge'
  for node, (_, point, edge) in sorted(hits.items(), key=lambda item: item[1][0]):
    start = _position(graph, node)
    if not _accepts(evidence, params, start, point, counts):
      continue
    current = [p for p in pieces.get(edge, [edge]) if graph.has_edge(*p)]
    if not current:
      continue
    target = min(current, key=lambda p: shapely.LineString(graph.edges[p]['coords']).distance(
        shapely.Point(point)))
    u, v, key = target
    _split_edge(graph, u, v, key, point, next_id)
    pieces[edge] = [p for p in current if p != target] + [
        (u, next_id, k) for k in graph[u][next_id]] + [(next_id, v, k) for k in graph[next_id][v]]
    extract._add_edge(graph, node, next_id, np.array([start, _position(graph, next_id)]), source)
    counts['bridges'] += 1
    next_id += 1


def bridge_gaps(graph: nx.MultiGraph, params: GraphParams,
                evidence: Evidence | None = None) -> dict[str, int]:
  """Adds gap bridges to `graph` in place (see the module docstring).

  Returns:
    {'bridges': bridges added, 'rejected': candidate bridges dropped for lack of traffic}.
  """
  counts = {'bridges': 0, 'rejected': 0}
  # Trajectories may justify longer end-to-end bridges (two dead ends of one road facing each
  # other across an occlusion); extensions onto edges keep the image-only reach, because GPS
  # scatter beside every road would otherwise pull any nearby blob onto it.
  pair_distance = (max(params.trajectory_bridge_max_distance, params.bridge_max_distance)
                   if evidence is not None else params.bridge_max_distance)
  ends = [n for n in graph.nodes if graph.degree(n) == 1]
  directions = {n: outward_direction(graph, n, params.bridge_direction_length) for n in ends}
  used = set()
  if pair_distance > 0:
    used = _end_to_end(graph, ends, directions, pair_distance, params, evidence, counts)
  if params.bridge_to_edges and params.bridge_max_distance > 0:
    _end_to_edge(graph, [n for n in ends if n not in used], directions,
                 params.bridge_max_distance, params, evidence, counts)
  return counts
