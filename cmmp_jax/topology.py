"""Road-network topology metrics APLS and TOPO, equal to the CosmiQ reference (CosmiQ/apls).

Both compare a ground-truth graph `gt` with a proposal graph `prop`. A graph is an undirected
`networkx.MultiGraph` in metres:
  * node attributes `x`, `y` (float);
  * edge attribute `coords`: float (N >= 2, 2) polyline whose end points are the coordinates of
    the edge's two nodes, in either orientation (it is reversed as needed; a missing `coords`
    means the straight segment). Edge length = Euclidean length of the polyline.
Node ids may be any hashable; gt and prop may share ids (everything is relabelled internally,
the reference instead needs disjoint ids). The caller's graphs are never modified.

APLS (Van Etten et al., SpaceNet 3), as `apls.make_graphs` + `apls.compute_apls_metric` with the
command-line defaults of apls.py (control points every 50 m on every edge, 4 m snapping, minimum
path length 0.001 m):
  1. Control points of a graph: every node, plus points injected along each edge of length L:
     none if L < 0.75 * spacing, the midpoint if L <= spacing, else ceil(L / spacing) - 1 evenly
     spaced points (numpy's `linspace(0, L, len(arange(0, L, spacing)) + 1)[1:-1]`).
  2. "Native" route lengths: all-pairs shortest paths on the graph with its own control points.
  3. "Prime" graph: the other graph's control points are snapped, in order, onto this graph
     (without its own injected points): nearest edge (first in networkx edge order on exact
     ties), dropped if farther than `max_snap_dist`; the projection splits the edge, or renames
     the end node when it falls exactly on it (a later point renaming the same node takes the
     name over: routes to the earlier one then count as missing, as in the reference).
  4. gt -> prop: for every ordered pair (s, t) of gt control points with t reachable from s in
     gt: penalty 1 if s was not snapped; else, skipping pairs with L_gt < min_path_length, the
     penalty min(1, |L_gt - L_prime| / L_gt), 1 when t is missing or unreachable in the prime
     graph. Score = 1 - mean penalty (0 without penalties). prop -> gt likewise.
  5. APLS = harmonic mean of the two directions; 0 if either graph is empty or either score <= 0.

TOPO (Biagioni & Eriksson), as `topo_metric.compute_topo` with subgraph radius 150 m, hole /
marble interval 30 m and hole size 4 m, but deterministic: the reference draws its origins at
random (unseeded, with replacement); here they default to every gt node once, in node order.
For each origin o: holes = the nodes of the gt subgraph (nodes closer than the radius to o,
the 500 nearest at most, connected component of o) plus points every `interval` along each of
its edges, measured from the edge end nearer to o. The proposal origin is the nearest proposal
node closer than `hole_size` to o (none: all holes are false negatives); marbles are built
around it in the same way. Marbles, in proposal node order then insertion order, each take the
nearest unmatched hole within `hole_size` (tp) or count as fp; fn = holes - tp, summed over
origins. Precision / recall / F1 from the sums (0 when undefined); all zero when either graph
has no nodes.

The exact semantics, including networkx's node and edge orders that decide ties, are those of
../shared/metrics/README.md, whose 13 reference cases tests/test_topology.py checks (APLS
within 3e-16, TOPO counts exact). Deliberate differences, none of which touches those cases:
  * TOPO origins are deterministic (above), and marbles follow the proposal's node list. The
    reference iterates a networkx subgraph view, which for subgraphs under half the graph runs
    in Python's set order of the node ids, so its result depends on the id values; ours does
    not (reversing the node and edge lists moves F1 by up to 1.3e-3 on the real cases).
  * A zero-length edge joins its two nodes; exact duplicate parallel edges count once.
  * No switch at 500 gt nodes (the reference's make_graphs_yuge samples control nodes at random
    and injects none): the same metric at every size.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Hashable, Iterable, List, Optional, Sequence, Tuple

import networkx as nx
import numpy as np
import scipy.sparse
import scipy.spatial
from scipy.sparse import csgraph
import shapely
from shapely.geometry import LineString, Point

# The polyline's end vertices must lie this close (metres) to their nodes; they are then set
# exactly onto them.
ENDPOINT_TOLERANCE_M = 0.01
# The reference's test for "the projection falls on an existing node" (insert_point_into_G).
_RENAME_BUFFER_M = 0.05
# TOPO's kd-tree query of the subgraph nodes returns at most this many (topo_metric.py).
_TOPO_MAX_SUBGRAPH_NODES = 500


class GraphInputError(ValueError):
  """A graph handed to the topology metrics is malformed (names the graph and the node/edge)."""


@dataclasses.dataclass(frozen=True)
class AplsResult:
  """APLS and its two directions, with the counts behind them.

  apls: harmonic mean of the two directions (0 if either is <= 0 or either graph is empty).
  gt_onto_prop: 1 - mean penalty of gt routes measured on the proposal.
  prop_onto_gt: 1 - mean penalty of proposal routes measured on the ground truth.
  n_control_points_*: nodes plus injected points of each graph.
  n_routes_*: number of penalties averaged in each direction.
  """
  apls: float
  gt_onto_prop: float
  prop_onto_gt: float
  n_control_points_gt: int
  n_control_points_prop: int
  n_routes_gt_onto_prop: int
  n_routes_prop_onto_gt: int


@dataclasses.dataclass(frozen=True)
class TopoResult:
  """TOPO precision, recall and F1 from tp / fp / fn summed over all origins."""
  precision: float
  recall: float
  f1: float
  tp: int
  fp: int
  fn: int


# ------------------------------------------------------------------------------------------
# Input


@dataclasses.dataclass
class _Network:
  """A graph relabelled to 0..n-1 in node order; edges in networkx edge order.

  xy: (n, 2) float64 node positions. ids: the caller's node ids, in order.
  index: caller's node id -> node (several ids map to one node joined by zero-length edges).
  u, v: (m,) int edge ends (u comes first in node order, as networkx reports it).
  coords: m polylines (k, 2) float64 running u -> v. lengths: (m,) polyline lengths.
  """
  xy: np.ndarray
  ids: List[Hashable]
  index: dict
  u: np.ndarray
  v: np.ndarray
  coords: List[np.ndarray]
  lengths: np.ndarray

  @property
  def n_nodes(self) -> int:
    return len(self.ids)

  @property
  def n_edges(self) -> int:
    return len(self.coords)

  def multigraph(self) -> nx.MultiGraph:
    """The relabelled graph (edge attribute 'eid' = index into the edge arrays), built as the
    reference's graphs were: nodes in order, then edges in order. networkx's edge order of the
    result is the input's, which decides ties."""
    g = nx.MultiGraph()
    g.add_nodes_from(range(self.n_nodes))
    for eid, (a, b) in enumerate(zip(self.u.tolist(), self.v.tolist())):
      g.add_edge(a, b, eid=eid)
    return g


def _polyline_length(coords: np.ndarray) -> float:
  return float(np.sqrt((np.diff(coords, axis=0) ** 2).sum(axis=1)).sum())


def _read_graph(graph: Any, role: str) -> _Network:
  """Validates `graph` and copies it into a _Network (the caller's graph is not touched).

  Two clean-ups, both of inputs the reference mishandles:
    * a zero-length edge (all its vertices at one point) joins its two nodes into one, the
      earlier in node order (the reference would snap both nodes' control points onto that one
      point and rename it twice, so identical graphs would score below 1);
    * exact duplicates of a parallel edge (same nodes, same polyline) are dropped, as the
      reference's create_edge_linestrings does.
  """
  if not isinstance(graph, nx.Graph):
    raise GraphInputError(f"{role}: expected a networkx MultiGraph, got {type(graph).__name__}")
  if graph.is_directed():
    raise GraphInputError(f"{role}: the graph is directed; road graphs here are undirected "
                          "(convert with .to_undirected())")
  ids = list(graph.nodes)
  index = {n: i for i, n in enumerate(ids)}
  xy = np.empty((len(ids), 2), np.float64)
  for i, (n, data) in enumerate(graph.nodes(data=True)):
    try:
      xy[i] = (float(data["x"]), float(data["y"]))
    except (KeyError, TypeError, ValueError):
      raise GraphInputError(f"{role}: node {n!r} needs numeric 'x' and 'y' attributes, "
                            f"has {sorted(data)}") from None
    if not np.all(np.isfinite(xy[i])):
      raise GraphInputError(f"{role}: node {n!r} has a non-finite position {tuple(xy[i])}")
  raw = []  # (a, b, coords running a -> b)
  edges = (graph.edges(keys=True, data=True) if graph.is_multigraph() else
           ((a, b, None, d) for a, b, d in graph.edges(data=True)))
  for a, b, key, data in edges:
    name = f"{role}: edge ({a!r}, {b!r}" + ("" if key is None else f", key={key!r}") + ")"
    ia, ib = index[a], index[b]
    pa, pb = xy[ia], xy[ib]
    if data.get("coords") is None:
      coords = np.stack([pa, pb])
    else:
      try:
        coords = np.array(data["coords"], dtype=np.float64)
      except (TypeError, ValueError):
        raise GraphInputError(f"{name}: 'coords' is not a numeric array") from None
      if coords.ndim != 2 or coords.shape[0] < 2 or coords.shape[1] != 2:
        raise GraphInputError(f"{name}: 'coords' must have shape (N >= 2, 2), "
                              f"got {coords.shape}")
      if not np.all(np.isfinite(coords)):
        raise GraphInputError(f"{name}: 'coords' holds non-finite values")
      forward = max(np.hypot(*(coords[0] - pa)), np.hypot(*(coords[-1] - pb)))
      backward = max(np.hypot(*(coords[0] - pb)), np.hypot(*(coords[-1] - pa)))
      if backward < forward:
        coords = coords[::-1].copy()
      mismatch = min(forward, backward)
      if mismatch > ENDPOINT_TOLERANCE_M:
        raise GraphInputError(
            f"{name}: the polyline's ends are {mismatch:.4g} m from the edge's nodes "
            f"(at most {ENDPOINT_TOLERANCE_M} m allowed)")
      coords[0], coords[-1] = pa, pb
    raw.append((ia, ib, coords))

  # Zero-length edges: union-find, the earliest node of each group represents it.
  parent = list(range(len(ids)))

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for a, b, coords in raw:
    if not np.any(coords != coords[0]):
      ra, rb = root(a), root(b)
      parent[max(ra, rb)] = min(ra, rb)
  kept = [i for i in range(len(ids)) if root(i) == i]
  new_index = {old: new for new, old in enumerate(kept)}
  index = {n: new_index[root(i)] for n, i in index.items()}

  us, vs, all_coords, lengths, seen = [], [], [], [], set()
  for a, b, coords in raw:
    if not np.any(coords != coords[0]):
      continue
    a, b = new_index[root(a)], new_index[root(b)]
    if b < a:  # networkx reports an edge from its earlier node
      a, b, coords = b, a, coords[::-1].copy()
    signature = (a, b, min(coords.tobytes(), coords[::-1].tobytes()) if a == b
                 else coords.tobytes())
    if signature in seen:
      continue
    seen.add(signature)
    us.append(a)
    vs.append(b)
    all_coords.append(coords)
    lengths.append(_polyline_length(coords))
  return _Network(xy=xy[kept], ids=[ids[i] for i in kept], index=index,
                  u=np.array(us, np.int64), v=np.array(vs, np.int64),
                  coords=all_coords, lengths=np.array(lengths, np.float64))


def graph_from_lists(nodes: Iterable[Sequence[Any]],
                     edges: Iterable[Sequence[Any]]) -> nx.MultiGraph:
  """MultiGraph from `nodes` = [[id, x, y], ...] and `edges` = [[u, v, [[x, y], ...]], ...]
  (the format of ../shared/metrics/cases/*.json), added in list order."""
  graph = nx.MultiGraph()
  for node_id, x, y in nodes:
    graph.add_node(node_id, x=float(x), y=float(y))
  for a, b, coords in edges:
    if a not in graph or b not in graph:
      raise GraphInputError(f"edge ({a!r}, {b!r}): node {a if a not in graph else b!r} "
                            "is not in the node list")
    graph.add_edge(a, b, coords=np.asarray(coords, np.float64))
  return graph


# ------------------------------------------------------------------------------------------
# Polyline helpers


def _interpolate(coords: np.ndarray, distances: np.ndarray) -> np.ndarray:
  """(k, 2) points at arc-length `distances` along the polyline `coords` (clamped to its ends)."""
  cum = np.concatenate([[0.0], np.cumsum(np.sqrt((np.diff(coords, axis=0) ** 2).sum(axis=1)))])
  seg = np.clip(np.searchsorted(cum, distances, side="right") - 1, 0, len(coords) - 2)
  seg_len = cum[seg + 1] - cum[seg]
  frac = np.where(seg_len > 0, (distances - cum[seg]) / np.where(seg_len > 0, seg_len, 1.0), 0.0)
  frac = np.clip(frac, 0.0, 1.0)[:, None]
  return coords[seg] * (1.0 - frac) + coords[seg + 1] * frac


def _cut(line: LineString, distance: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """The reference's cut_linestring: the polyline split at arc length `distance` from its start,
  at an existing vertex when one projects exactly there; None when `distance` is at an end."""
  if distance <= 0.0 or distance >= line.length:
    return None
  coords = shapely.get_coordinates(line)
  # The reference locates each vertex by projecting it onto the line. On a polyline that runs
  # back over itself a vertex projects to its first passage, possibly never past `distance`:
  # then the vertices' own arc lengths decide.
  for along in (shapely.line_locate_point(line, shapely.points(coords)),
                np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(coords, axis=0).T))])):
    for i, pd in enumerate(along):
      if pd == distance:
        return coords[:i + 1], coords[i:]
      if pd > distance:
        cut = shapely.get_coordinates(line.interpolate(distance))
        return np.vstack([coords[:i], cut]), np.vstack([cut, coords[i:]])
  return None  # not reached: the last vertex lies at arc length line.length > distance


def _control_offsets(length: float, spacing: float) -> np.ndarray:
  """Arc lengths of the control points injected on an edge (reference create_graph_midpoints)."""
  if length < 0.75 * spacing:
    return np.zeros(0)
  if length <= spacing:
    return np.array([0.5 * length])
  n_points = len(np.arange(0, length, spacing)) + 1
  return np.linspace(0, length, n_points)[1:-1]


def _all_pairs_lengths(n_nodes: int, u: np.ndarray, v: np.ndarray,
                       lengths: np.ndarray) -> np.ndarray:
  """(n, n) shortest-path lengths (inf where unreachable) of an undirected multigraph."""
  if n_nodes == 0:
    return np.zeros((0, 0))
  keep = u != v  # self-loops never shorten a path
  a, b, w = np.minimum(u, v)[keep], np.maximum(u, v)[keep], lengths[keep]
  # Parallel edges: keep the shortest (a sparse matrix would sum duplicates). Explicit zeros
  # (zero-length edges) stay edges in scipy's csgraph.
  order = np.lexsort((w, b, a))
  a, b, w = a[order], b[order], w[order]
  first = np.ones(len(a), bool)
  first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
  matrix = scipy.sparse.csr_array((w[first], (a[first], b[first])), shape=(n_nodes, n_nodes))
  return csgraph.dijkstra(matrix, directed=False)


# ------------------------------------------------------------------------------------------
# APLS


@dataclasses.dataclass
class _ControlGraph:
  """A graph with its own control points injected (the "native" graph).

  xy: (c, 2) control point positions: the nodes in order, then the injected points in edge
  order. lengths: (c, c) all-pairs route lengths.
  """
  xy: np.ndarray
  lengths: np.ndarray


def _control_graph(net: _Network, spacing: float) -> _ControlGraph:
  xy = [net.xy]
  u, v, w = [], [], []
  next_id = net.n_nodes
  for eid in range(net.n_edges):
    length = float(net.lengths[eid])
    a, b = int(net.u[eid]), int(net.v[eid])
    offsets = _control_offsets(length, spacing)
    if len(offsets) == 0:
      u.append(a), v.append(b), w.append(length)
      continue
    # As the reference: each point is taken on the whole edge, then projected onto (and cuts)
    # the remaining piece, whose split polylines give the lengths.
    line = LineString(net.coords[eid])
    rest, prev = line, a
    for offset in offsets.tolist():
      point = line.interpolate(offset)
      along = rest.project(point)
      pieces = _cut(rest, along)
      if pieces is None:  # (only on a polyline that comes back onto itself)
        continue
      xy.append(shapely.get_coordinates(rest.interpolate(along)))
      u.append(prev), v.append(next_id), w.append(LineString(pieces[0]).length)
      rest, prev = LineString(pieces[1]), next_id
      next_id += 1
    u.append(prev), v.append(b), w.append(rest.length)
  all_xy = np.concatenate(xy) if net.n_nodes else np.zeros((0, 2))
  lengths = _all_pairs_lengths(len(all_xy), np.array(u, np.int64), np.array(v, np.int64),
                               np.array(w, np.float64))
  return _ControlGraph(xy=all_xy, lengths=lengths)


def control_points(graph: nx.Graph, *, control_spacing: float = 50.0) -> np.ndarray:
  """(c, 2) APLS control points of `graph` in metres: its nodes in node order, then the points
  injected along its edges, edge by edge in networkx edge order (nodes joined by a zero-length
  edge count once)."""
  if not (math.isfinite(control_spacing) and control_spacing > 0):
    raise ValueError(f"control_points: control_spacing must be a positive number, "
                     f"got {control_spacing!r}")
  return _control_graph(_read_graph(graph, "graph"), control_spacing).xy


class _PrimeGraph:
  """A graph (without its own injected points) into which the other graph's control points are
  snapped one by one, as the reference's insert_control_points does.

  Edges live in a networkx MultiGraph (for the reference's edge order, which breaks distance
  ties) with attribute 'eid'; geometries, ends and lengths in lists indexed by eid. Node names:
  `name_to_node` maps a control point's index to the graph node that carries it.
  """

  def __init__(self, net: _Network):
    self.graph = net.multigraph()
    self.xy: List[Tuple[float, float]] = [tuple(p) for p in net.xy.tolist()]
    self.geoms: List[LineString] = [LineString(c) for c in net.coords]
    self.ends: List[Tuple[int, int]] = list(zip(net.u.tolist(), net.v.tolist()))
    self.lengths: List[float] = net.lengths.tolist()
    self.alive: List[bool] = [True] * net.n_edges
    # Pieces of each original edge still in the graph: the nearest current edge is a piece of
    # an original edge within the snap distance, which an STR-tree finds quickly.
    self.pieces: List[List[int]] = [[eid] for eid in range(net.n_edges)]
    self.source: List[int] = list(range(net.n_edges))
    self.tree = shapely.STRtree(self.geoms)
    self.name_to_node: dict = {}
    self.node_name: dict = {}

  def _first_in_edge_order(self, tied: set) -> int:
    for _, _, eid in self.graph.edges(data="eid"):
      if eid in tied:
        return eid
    raise AssertionError("tied edges not in graph")

  def insert(self, name: int, x: float, y: float, max_snap_dist: float) -> None:
    point = Point(x, y)
    # A small margin so that no floating-point disagreement between an original edge and its
    # pieces can drop a candidate; the exact test below uses the pieces' own distances.
    near = self.tree.query(point, predicate="dwithin", distance=max_snap_dist + 1e-6)
    if len(near) == 0:
      return
    candidates = [eid for orig in near.tolist() for eid in self.pieces[orig]]
    dists = shapely.distance(np.array([self.geoms[e] for e in candidates], object), point)
    best = float(dists.min())
    if best > max_snap_dist:
      return
    tied = [candidates[i] for i in np.flatnonzero(dists == best)]
    eid = tied[0] if len(tied) == 1 else self._first_in_edge_order(set(tied))
    a, b = self.ends[eid]
    u, v = (a, b) if a <= b else (b, a)  # networkx reports the earlier node first
    line = self.geoms[eid]
    along = line.project(point)
    proj = line.interpolate(along)
    pieces = _cut(line, along)
    if pieces is None:  # the projection is an end of the edge: rename that node
      node = None
      for end in (u, v):
        ex, ey = self.xy[end]
        if abs(proj.x - ex) <= _RENAME_BUFFER_M and abs(proj.y - ey) <= _RENAME_BUFFER_M:
          node = end
          break
      if node is None:  # (the polyline's ends are its nodes: not expected) the nearer one
        node = min((u, v), key=lambda end: math.dist(self.xy[end], (proj.x, proj.y)))
      old = self.node_name.pop(node, None)
      if old is not None:
        del self.name_to_node[old]
      self.name_to_node[name] = node
      self.node_name[node] = name
      return
    first, second = pieces
    start = np.asarray(line.coords[0])
    if np.hypot(*(start - self.xy[v])) < np.hypot(*(start - self.xy[u])):
      first, second = second, first  # the first piece is the one that touches u
    new = len(self.xy)
    self.xy.append((proj.x, proj.y))
    self.graph.add_node(new)
    self.name_to_node[name] = new
    self.node_name[new] = name
    key = next(k for k, d in self.graph[a][b].items() if d["eid"] == eid)
    self.graph.remove_edge(a, b, key)
    self.alive[eid] = False
    orig = self.source[eid]
    self.pieces[orig].remove(eid)
    for (p, q), coords in (((u, new), first), ((new, v), second)):
      piece = len(self.geoms)
      self.geoms.append(LineString(coords))
      self.ends.append((p, q))
      self.lengths.append(self.geoms[-1].length)
      self.alive.append(True)
      self.source.append(orig)
      self.pieces[orig].append(piece)
      self.graph.add_edge(p, q, eid=piece)

  def route_lengths(self) -> np.ndarray:
    live = [e for e, ok in enumerate(self.alive) if ok]
    u = np.array([self.ends[e][0] for e in live], np.int64)
    v = np.array([self.ends[e][1] for e in live], np.int64)
    w = np.array([self.lengths[e] for e in live], np.float64)
    return _all_pairs_lengths(len(self.xy), u, v, w)


def _prime_graph(net: _Network, control_xy: np.ndarray, max_snap_dist: float):
  """(name_to_node, route lengths) of `net` with the other graph's control points snapped."""
  prime = _PrimeGraph(net)
  if net.n_nodes > 0:
    for name, (x, y) in enumerate(control_xy.tolist()):
      prime.insert(name, x, y, max_snap_dist)
  return prime.name_to_node, prime.route_lengths()


def _path_similarity(native: np.ndarray, name_to_node: dict, prime: np.ndarray,
                     min_path_length: float) -> Tuple[float, int]:
  """(1 - mean penalty, number of penalties) of the reference's path_sim_metric; control point i
  is native node i, and prime node name_to_node[i] when it was snapped."""
  n = native.shape[0]
  mapped = np.full(n, -1, np.int64)
  for name, node in name_to_node.items():
    mapped[name] = node
  total, count = 0.0, 0
  for s in range(n):
    row = native[s]
    reachable = np.isfinite(row)
    if mapped[s] < 0:  # not snapped: every route from s is missing (no length filter here)
      missing = int(reachable.sum()) - 1
      total += missing
      count += missing
      continue
    targets = np.flatnonzero(reachable & (row >= min_path_length))
    if len(targets) == 0:
      continue
    l_gt = row[targets]
    t_prime = mapped[targets]
    l_prime = np.full(len(targets), np.inf)
    present = t_prime >= 0
    l_prime[present] = prime[mapped[s], t_prime[present]]
    penalty = np.minimum(1.0, np.abs(l_gt - l_prime) / l_gt)
    penalty[~np.isfinite(l_prime)] = 1.0
    total += float(penalty.sum())
    count += len(targets)
  return (1.0 - total / count if count else 0.0), count


def apls(gt: nx.Graph, prop: nx.Graph, *, control_spacing: float = 50.0,
         max_snap_dist: float = 4.0, min_path_length: float = 0.001) -> AplsResult:
  """APLS of `prop` against `gt` (graphs in metres: see the module docstring).

  Args:
    gt, prop: undirected networkx (Multi)Graphs with node 'x', 'y' and edge 'coords'.
    control_spacing: largest spacing (m) of the control points injected along edges; edges
      shorter than 0.75 * control_spacing get none (the reference's linestring_delta).
    max_snap_dist: control points farther (m) than this from the other graph are dropped.
    min_path_length: routes shorter (m) than this are not scored (must be > 0).

  Returns:
    AplsResult. Empty graphs give 0 (with the counts of the non-empty side's control points).
  Raises:
    GraphInputError: a malformed graph; ValueError: a non-positive parameter.
  """
  for name, value in (("control_spacing", control_spacing), ("max_snap_dist", max_snap_dist),
                      ("min_path_length", min_path_length)):
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f"apls: {name} must be a positive number, got {value!r}")
  gt_net, prop_net = _read_graph(gt, "gt"), _read_graph(prop, "prop")
  gt_cp = _control_graph(gt_net, control_spacing)
  prop_cp = _control_graph(prop_net, control_spacing)
  counts = dict(n_control_points_gt=len(gt_cp.xy), n_control_points_prop=len(prop_cp.xy))
  if gt_net.n_nodes == 0 or prop_net.n_nodes == 0:
    return AplsResult(apls=0.0, gt_onto_prop=0.0, prop_onto_gt=0.0, n_routes_gt_onto_prop=0,
                      n_routes_prop_onto_gt=0, **counts)
  prop_names, prop_prime = _prime_graph(prop_net, gt_cp.xy, max_snap_dist)
  gt_names, gt_prime = _prime_graph(gt_net, prop_cp.xy, max_snap_dist)
  gt_onto_prop, n_gt = _path_similarity(gt_cp.lengths, prop_names, prop_prime, min_path_length)
  prop_onto_gt, n_prop = _path_similarity(prop_cp.lengths, gt_names, gt_prime, min_path_length)
  if gt_onto_prop <= 0 or prop_onto_gt <= 0:
    total = 0.0
  else:
    total = 2.0 * gt_onto_prop * prop_onto_gt / (gt_onto_prop + prop_onto_gt)
  return AplsResult(apls=total, gt_onto_prop=gt_onto_prop, prop_onto_gt=prop_onto_gt,
                    n_routes_gt_onto_prop=n_gt, n_routes_prop_onto_gt=n_prop, **counts)


# ------------------------------------------------------------------------------------------
# TOPO


class _TopoSide:
  """One graph prepared for TOPO: kd-tree of nodes, networkx-ordered adjacency, and the points
  every `interval` along each edge in both orientations."""

  def __init__(self, net: _Network, interval: float):
    self.net = net
    self.tree = scipy.spatial.cKDTree(net.xy) if net.n_nodes else None
    graph = net.multigraph()
    # adjacency[n] = [(neighbour, [eids of the parallel edges])] in networkx order
    self.adjacency = [[(nbr, [d["eid"] for d in keyed.values()])
                       for nbr, keyed in graph.adj[n].items()] for n in range(net.n_nodes)]
    self.forward, self.backward = [], []
    for coords, length in zip(net.coords, net.lengths.tolist()):
      offsets = np.arange(0, length, interval)[1:]
      self.forward.append(_interpolate(coords, offsets))
      self.backward.append(_interpolate(coords[::-1], offsets))

  def points_around(self, origin: int, radius: float) -> np.ndarray:
    """(k, 2) holes / marbles around node `origin`: the subgraph's nodes in node order, then
    the points along its edges, edge by edge in networkx edge order."""
    net = self.net
    center = net.xy[origin]
    k = min(_TOPO_MAX_SUBGRAPH_NODES, net.n_nodes)
    dist, idx = self.tree.query(center, k=k, distance_upper_bound=radius)
    inside = set(np.atleast_1d(idx)[np.isfinite(np.atleast_1d(dist))].tolist())
    inside.add(origin)
    component, frontier = {origin}, [origin]
    while frontier:
      n = frontier.pop()
      for nbr, _ in self.adjacency[n]:
        if nbr in inside and nbr not in component:
          component.add(nbr)
          frontier.append(nbr)
    nodes = sorted(component)  # node order = relabelled index order
    parts = [net.xy[nodes]]
    seen = set()
    for n in nodes:
      for nbr, eids in self.adjacency[n]:
        if nbr in component and nbr not in seen:
          for eid in eids:
            coords = net.coords[eid]
            # orient from the end nearer to the origin
            if np.hypot(*(coords[-1] - center)) < np.hypot(*(coords[0] - center)):
              parts.append(self.backward[eid])
            else:
              parts.append(self.forward[eid])
      seen.add(n)
    return np.concatenate(parts)


def _match(marbles: np.ndarray, holes: np.ndarray, hole_size: float) -> Tuple[int, int, int]:
  """(tp, fp, fn): marbles in order each take the nearest unmatched hole within hole_size."""
  dists = scipy.spatial.distance.cdist(marbles, holes)
  dists[dists > hole_size] = np.inf
  tp = fp = 0
  for row in dists:
    j = int(np.argmin(row))
    if np.isfinite(row[j]):
      tp += 1
      dists[:, j] = np.inf
    else:
      fp += 1
  return tp, fp, len(holes) - tp


def topo(gt: nx.Graph, prop: nx.Graph, *, subgraph_radius: float = 150.0,
         interval: float = 30.0, hole_size: float = 4.0,
         origins: Optional[Sequence[Hashable]] = None) -> TopoResult:
  """TOPO of `prop` against `gt` (graphs in metres: see the module docstring).

  Args:
    gt, prop: undirected networkx (Multi)Graphs with node 'x', 'y' and edge 'coords'.
    subgraph_radius: nodes closer (m) than this to an origin form its neighbourhood.
    interval: spacing (m) of holes / marbles along edges.
    hole_size: a marble matches a hole within this distance (m); the proposal origin must be a
      proposal node closer than this to the gt origin.
    origins: gt node ids to measure around, in order (repeats allowed); default every gt node
      once, in gt node order.

  Returns:
    TopoResult (all zero when either graph has no nodes).
  Raises:
    GraphInputError: a malformed graph or an origin that is not a gt node; ValueError: a
    non-positive parameter.
  """
  for name, value in (("subgraph_radius", subgraph_radius), ("interval", interval),
                      ("hole_size", hole_size)):
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f"topo: {name} must be a positive number, got {value!r}")
  gt_net, prop_net = _read_graph(gt, "gt"), _read_graph(prop, "prop")
  if origins is None:
    origin_idx = list(range(gt_net.n_nodes))
  else:
    index = gt_net.index
    try:
      origin_idx = [index[o] for o in origins]
    except (KeyError, TypeError):
      bad = next(o for o in origins if not isinstance(o, Hashable) or o not in index)
      raise GraphInputError(f"topo: origin {bad!r} is not a node of gt") from None
  if gt_net.n_nodes == 0 or prop_net.n_nodes == 0:
    return TopoResult(precision=0.0, recall=0.0, f1=0.0, tp=0, fp=0, fn=0)
  gt_side, prop_side = _TopoSide(gt_net, interval), _TopoSide(prop_net, interval)
  tp = fp = fn = 0
  for origin in origin_idx:
    holes = gt_side.points_around(origin, subgraph_radius)
    dist, prop_origin = prop_side.tree.query(gt_net.xy[origin], k=1,
                                             distance_upper_bound=hole_size)
    if not np.isfinite(dist):
      fn += len(holes)
      continue
    marbles = prop_side.points_around(int(prop_origin), subgraph_radius)
    d_tp, d_fp, d_fn = _match(marbles, holes, hole_size)
    tp, fp, fn = tp + d_tp, fp + d_fp, fn + d_fn
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return TopoResult(precision=precision, recall=recall, f1=f1, tp=tp, fp=fp, fn=fn)
