"""Tests of cmmp_jax.topology (APLS, TOPO).

Reference values: ../shared/metrics/cases/*.json (the CosmiQ reference run on 13 graph pairs;
semantics and tolerances in ../shared/metrics/README.md), read in place and skipped when the
folder is absent. The hand-computed cases below need no shared files.
"""
import copy
import functools
import json

import networkx as nx
import numpy as np
import pytest
import shapely

from cmmp_jax import topology
from cmmp_jax.topology import GraphInputError, graph_from_lists

CASES = ("sat2graph_crop", "spacenet_cnn_img0", "spacenet_osm_img99", "spacenet_osm_img991",
         "spacenet_osm_img999", "synth_empty_prop", "synth_extra_spur", "synth_gap",
         "synth_identical", "synth_jitter", "synth_missing_junction", "synth_shift_10m",
         "synth_shift_3m")
# README "Tolerances": 1e-6, except sat2graph_crop, where three points lie exactly 1.000 m from
# two edges and the edge order picks one (the reference moves by 4.5e-5 when reordered).
APLS_TOLERANCE = {"sat2graph_crop": 1e-4}
APLS_DEFAULT_TOLERANCE = 1e-6
# TOPO's greedy matching follows the proposal's node order. Reversing the node and edge lists
# moves the reference's F1 by at most 2.7e-4 (README), ours by 1.27e-3 on spacenet_cnn_img0
# (5 of 4157 holes) and by 0 elsewhere: for subgraphs under half the graph the reference takes
# the nodes in Python's set order of their ids (networkx subgraph views), which reversing the
# lists barely changes; we take the node list's order, so that ids never matter. Both orders
# give the reference's counts exactly on the cases as listed.
TOPO_REORDER_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def cases_dir(shared_dir):
  path = shared_dir / "metrics" / "cases"
  if not path.is_dir():
    pytest.skip(f"{path} is absent: no APLS / TOPO reference cases here")
  return path


@functools.lru_cache(maxsize=None)
def _load(path):
  with open(path) as f:
    return json.load(f)


def _case(cases_dir, name):
  case = _load(str(cases_dir / f"{name}.json"))
  gt = graph_from_lists(case["gt"]["nodes"], case["gt"]["edges"])
  prop = graph_from_lists(case["prop"]["nodes"], case["prop"]["edges"])
  return case, gt, prop


def _origins(case):
  return case["debug"]["topo_origin_nodes"] or None  # (empty when the proposal is empty)


def _road(nodes, edges):
  """graph_from_lists with straight edges [u, v] between the listed nodes [id, x, y]."""
  xy = {n: (x, y) for n, x, y in nodes}
  return graph_from_lists(nodes, [[a, b, [xy[a], xy[b]]] for a, b in edges])


def test_the_case_folder_holds_the_listed_cases(cases_dir):
  assert sorted(p.stem for p in cases_dir.glob("*.json")) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_apls_matches_the_reference(cases_dir, name):
  case, gt, prop = _case(cases_dir, name)
  ref = case["reference"]
  result = topology.apls(gt, prop)
  tol = APLS_TOLERANCE.get(name, APLS_DEFAULT_TOLERANCE)
  assert result.apls == pytest.approx(ref["apls"], abs=tol)
  assert result.gt_onto_prop == pytest.approx(ref["apls_gt_onto_prop"], abs=tol)
  assert result.prop_onto_gt == pytest.approx(ref["apls_prop_onto_gt"], abs=tol)
  assert result.n_control_points_gt == ref["n_control_points_gt"]
  assert result.n_control_points_prop == ref["n_control_points_prop"]
  assert result.n_routes_gt_onto_prop == ref["n_routes_gt_onto_prop"]
  assert result.n_routes_prop_onto_gt == ref["n_routes_prop_onto_gt"]


@pytest.mark.parametrize("name", CASES)
def test_control_points_match_the_reference_in_order(cases_dir, name):
  case, gt, prop = _case(cases_dir, name)
  for graph, side in ((gt, "gt"), (prop, "prop")):
    expected = np.array([p[1:] for p in case["debug"][f"control_points_{side}"]],
                        np.float64).reshape(-1, 2)
    np.testing.assert_allclose(topology.control_points(graph), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_topo_matches_the_reference_with_its_origins(cases_dir, name):
  case, gt, prop = _case(cases_dir, name)
  ref = case["reference"]
  result = topology.topo(gt, prop, origins=_origins(case))
  assert (result.tp, result.fp, result.fn) == (ref["topo_tp"], ref["topo_fp"], ref["topo_fn"])
  assert result.precision == pytest.approx(ref["topo_precision"], abs=1e-12)
  assert result.recall == pytest.approx(ref["topo_recall"], abs=1e-12)
  assert result.f1 == pytest.approx(ref["topo_f1"], abs=1e-12)


def test_topo_default_origins_are_every_gt_node_in_order(cases_dir):
  case, gt, prop = _case(cases_dir, "spacenet_osm_img991")
  assert case["debug"]["topo_origin_nodes"] == list(gt.nodes)
  assert topology.topo(gt, prop) == topology.topo(gt, prop, origins=list(gt.nodes))


def _relabelled(graph, mapping):
  return nx.relabel_nodes(graph, mapping, copy=True)  # keeps node and edge order


@pytest.mark.parametrize("name", ["spacenet_osm_img99", "synth_missing_junction",
                                  "sat2graph_crop"])
def test_node_ids_do_not_matter_even_when_gt_and_prop_share_them(cases_dir, name):
  case, gt, prop = _case(cases_dir, name)
  # The reference keeps both graphs in one id namespace; here prop reuses gt's ids 0, 1, ...
  # and gt gets string ids.
  prop_shared = _relabelled(prop, {n: i for i, n in enumerate(prop.nodes)})
  gt_named = _relabelled(gt, {n: f"gt{n}" for n in gt.nodes})
  assert set(prop_shared.nodes) & set(gt.nodes)
  assert topology.apls(gt_named, prop_shared) == topology.apls(gt, prop)
  origins = _origins(case)
  renamed_origins = None if origins is None else [f"gt{n}" for n in origins]
  assert (topology.topo(gt_named, prop_shared, origins=renamed_origins) ==
          topology.topo(gt, prop, origins=origins))


@pytest.mark.parametrize("name", ["spacenet_cnn_img0", "sat2graph_crop", "synth_jitter"])
def test_polyline_orientation_does_not_matter_and_reordering_stays_in_tolerance(
    cases_dir, name):
  case, gt, prop = _case(cases_dir, name)
  ref = case["reference"]

  def flipped(side):  # every edge stored v -> u with its polyline reversed
    return graph_from_lists(case[side]["nodes"],
                            [[b, a, coords[::-1]] for a, b, coords in case[side]["edges"]])

  def reversed_lists(side):
    return graph_from_lists(case[side]["nodes"][::-1], case[side]["edges"][::-1])

  origins = _origins(case)
  assert topology.apls(flipped("gt"), flipped("prop")) == topology.apls(gt, prop)
  assert (topology.topo(flipped("gt"), flipped("prop"), origins=origins) ==
          topology.topo(gt, prop, origins=origins))
  result = topology.apls(reversed_lists("gt"), reversed_lists("prop"))
  assert result.apls == pytest.approx(ref["apls"],
                                      abs=APLS_TOLERANCE.get(name, APLS_DEFAULT_TOLERANCE))
  topo = topology.topo(reversed_lists("gt"), reversed_lists("prop"), origins=origins)
  assert topo.f1 == pytest.approx(ref["topo_f1"], abs=TOPO_REORDER_TOLERANCE)


def test_inputs_are_not_modified(cases_dir):
  _, gt, prop = _case(cases_dir, "synth_missing_junction")
  # store some polylines v -> u, which the metrics reverse internally
  for _, _, data in list(prop.edges(data=True))[::2]:
    data["coords"] = data["coords"][::-1].copy()
  before = [(copy.deepcopy(list(g.nodes(data=True))), [(a, b, k, d["coords"].copy())
            for a, b, k, d in g.edges(keys=True, data=True)]) for g in (gt, prop)]
  topology.apls(gt, prop)
  topology.topo(gt, prop)
  for graph, (nodes, edges) in zip((gt, prop), before):
    assert list(graph.nodes(data=True)) == nodes
    after = list(graph.edges(keys=True, data=True))
    assert [(a, b, k) for a, b, k, _ in after] == [(a, b, k) for a, b, k, _ in edges]
    for (_, _, _, data), (_, _, _, coords) in zip(after, edges):
      assert set(data) == {"coords"}
      np.testing.assert_array_equal(data["coords"], coords)


# ------------------------------------------------------------------------------------------
# Hand-computed cases (no shared files needed)

# A straight 120 m road A(0,0)-B(120,0). Control points: A, B, then the injected ones:
# L = 120 > 50, n = len(arange(0, 120, 50)) + 1 = 4, linspace(0, 120, 4)[1:-1] = 40, 80.
ROAD = ([[0, 0.0, 0.0], [1, 120.0, 0.0]], [[0, 1]])
# The same road stopping at 100 m: control points Q0(0), Q1(100), Q2(50)
# (L = 100 > 50, n = len(arange(0, 100, 50)) + 1 = 3, linspace(0, 100, 3)[1:-1] = 50).
SHORT = ([[10, 0.0, 0.0], [11, 100.0, 0.0]], [[10, 11]])
# The same road with a 60 m gap: two 30 m pieces (< 37.5 m: no injected points).
GAP = ([[10, 0.0, 0.0], [11, 30.0, 0.0], [12, 90.0, 0.0], [13, 120.0, 0.0]],
       [[10, 11], [12, 13]])


def test_control_points_of_a_straight_road():
  np.testing.assert_allclose(topology.control_points(_road(*ROAD)),
                             [[0, 0], [120, 0], [40, 0], [80, 0]])
  np.testing.assert_allclose(topology.control_points(_road(*SHORT)), [[0, 0], [100, 0], [50, 0]])
  # 37.5 m <= L <= 50 m: the midpoint; L < 37.5 m: none.
  mid = _road([[0, 0.0, 0.0], [1, 40.0, 0.0], [2, 40.0, 30.0]], [[0, 1], [1, 2]])
  np.testing.assert_allclose(topology.control_points(mid), [[0, 0], [40, 0], [40, 30], [20, 0]])


def test_apls_of_a_road_against_itself_is_one():
  result = topology.apls(_road(*ROAD), _road(*ROAD))
  # 4 control points, 4 * 3 ordered pairs in each direction, all exact.
  assert result == topology.AplsResult(apls=1.0, gt_onto_prop=1.0, prop_onto_gt=1.0,
                                       n_control_points_gt=4, n_control_points_prop=4,
                                       n_routes_gt_onto_prop=12, n_routes_prop_onto_gt=12)


def test_apls_of_a_road_against_a_shorter_copy():
  # gt -> prop: gt points A(0), B(120), C(40), D(80) snapped onto the 100 m road: A renames Q0,
  # B is 20 m away (> 4 m: dropped), C and D split it. Pairs (12): from A: A-B missing (1),
  # A-C 40 vs 40, A-D 80 vs 80 (0); from B (absent): 3 x 1; from C: C-B 1, others 0; from D:
  # D-B 1, others 0. Penalties 6 / 12: score 0.5.
  # prop -> gt: Q0 renames A, Q1(100) and Q2(50) split A-B; the 6 routes (50, 50, 100 m) are
  # exact: score 1. APLS = 2 * 0.5 * 1 / 1.5 = 2 / 3.
  result = topology.apls(_road(*ROAD), _road(*SHORT))
  assert result.gt_onto_prop == pytest.approx(0.5, abs=1e-15)
  assert result.prop_onto_gt == pytest.approx(1.0, abs=1e-15)
  assert result.apls == pytest.approx(2 / 3, abs=1e-15)
  assert (result.n_control_points_gt, result.n_control_points_prop) == (4, 3)
  assert (result.n_routes_gt_onto_prop, result.n_routes_prop_onto_gt) == (12, 6)


def test_apls_of_a_road_against_a_copy_with_a_60m_gap():
  # gt -> prop: A renames P0, B renames P3, C(40) and D(80) are 10 m from the pieces: dropped.
  # A-B is unreachable in the proposal, C and D are missing: all 12 penalties are 1: score 0,
  # hence APLS 0. prop -> gt: P0..P3 cut gt at 0, 30, 90, 120; the proposal's 4 routes (30 m
  # within each piece) are exact there: score 1.
  result = topology.apls(_road(*ROAD), _road(*GAP))
  assert (result.apls, result.gt_onto_prop, result.prop_onto_gt) == (0.0, 0.0, 1.0)
  assert (result.n_routes_gt_onto_prop, result.n_routes_prop_onto_gt) == (12, 4)


def test_topo_of_a_road_against_itself_and_a_shorter_copy():
  # Origin A: both nodes are within 150 m; holes A, B and 30, 60, 90 m along A-B (5). Origin B:
  # the same 5. Against itself every marble finds its hole: tp = 10.
  same = topology.topo(_road(*ROAD), _road(*ROAD))
  assert same == topology.TopoResult(precision=1.0, recall=1.0, f1=1.0, tp=10, fp=0, fn=0)
  # Against the 100 m road: origin A -> proposal origin Q0; marbles Q0, Q1(100), 30, 60, 90:
  # Q1 is 10 m from the nearest hole (fp), the rest match (tp 4), hole B is missed (fn 1).
  # Origin B: no proposal node within 4 m (Q1 is 20 m away): its 5 holes are fn.
  short = topology.topo(_road(*ROAD), _road(*SHORT))
  assert (short.tp, short.fp, short.fn) == (4, 1, 6)
  assert (short.precision, short.recall) == (0.8, 0.4)
  assert short.f1 == pytest.approx(2 * 0.8 * 0.4 / 1.2, abs=1e-15)


def test_topo_radius_is_strict_and_hole_size_inclusive():
  # A node exactly 150 m away is outside the subgraph: each origin has one hole, itself.
  far = _road([[0, 0.0, 0.0], [1, 150.0, 0.0]], [[0, 1]])
  assert (topology.topo(far, far).tp, topology.topo(far, far).fn) == (2, 0)
  near = _road([[0, 0.0, 0.0], [1, 149.0, 0.0]], [[0, 1]])  # 2 nodes + 30, 60, 90, 120 m
  assert topology.topo(near, near).tp == 12
  # Proposal P(0, 3), Q(20, 4) against gt A(0, 0), B(20, 0). Origin A: P is the proposal
  # origin (3 < 4); marbles P -> A (3 m) and Q -> B (exactly 4 m, inclusive): tp 2. Origin B:
  # Q is exactly 4 m away, not < 4: no proposal origin, holes A and B are fn.
  gt = _road([[0, 0.0, 0.0], [1, 20.0, 0.0]], [[0, 1]])
  prop = _road([[5, 0.0, 3.0], [6, 20.0, 4.0]], [[5, 6]])
  result = topology.topo(gt, prop)
  assert (result.tp, result.fp, result.fn) == (2, 0, 2)


def test_a_self_loop_is_a_ring_road():
  # Node N(0, 0) with a 160 m square loop and a 30 m spur to M(-30, 0). Control points: N, M,
  # then 40, 80, 120 m along the loop (the square's corners). TOPO: each origin sees both
  # nodes and the loop's points at 30..150 m: 7 holes, 14 over the two origins.
  ring = graph_from_lists([[0, 0.0, 0.0], [1, -30.0, 0.0]],
                          [[0, 0, [[0, 0], [40, 0], [40, 40], [0, 40], [0, 0]]],
                           [0, 1, [[0, 0], [-30, 0]]]])
  np.testing.assert_allclose(topology.control_points(ring),
                             [[0, 0], [-30, 0], [40, 0], [40, 40], [0, 40]], atol=1e-12)
  result = topology.apls(ring, ring)
  assert (result.apls, result.n_control_points_gt, result.n_routes_gt_onto_prop) == (1.0, 5, 20)
  assert topology.topo(ring, ring).tp == 14
  # Without the loop the proposal misses the routes to the 3 loop points: from each of N and
  # M, 3 missing; from each loop point (not snapped), 4: 6 + 12 = 18 of 20 penalties are 1.
  spur = _road([[0, 0.0, 0.0], [1, -30.0, 0.0]], [[0, 1]])
  assert topology.apls(ring, spur).gt_onto_prop == pytest.approx(1 - 18 / 20, abs=1e-15)


def test_an_edge_that_runs_back_over_itself_is_cut_where_asked():
  # Out 174.4 m and back on the same segment: its last vertex projects onto the line at 0 m (its
  # first passage), so locating the cut by projected vertices alone finds no place for 299 m.
  line = shapely.LineString([(117.0, 161.0), (274.0, 237.0), (117.0, 161.0)])
  first, second = topology._cut(line, 299.0)
  np.testing.assert_allclose(first[-1], shapely.get_coordinates(line.interpolate(299.0))[0])
  assert shapely.LineString(first).length == pytest.approx(299.0, abs=1e-9)
  assert shapely.LineString(second).length == pytest.approx(line.length - 299.0, abs=1e-9)
  # And such an edge is scored: a dead end driven out and back (a self-loop). Its control
  # points at 50 and 150 m coincide, so the second takes over the node the first was snapped
  # to (as in the reference): the 8 routes from and to the first (of 20) count as missing, and
  # even identical graphs score 1 - 8 / 20 = 0.6 in each direction.
  loop = graph_from_lists([[0, 0.0, 0.0], [1, -30.0, 0.0]],
                          [[0, 0, [[0, 0], [100, 0], [0, 0]]], [0, 1, [[0, 0], [-30, 0]]]])
  np.testing.assert_allclose(topology.control_points(loop),
                             [[0, 0], [-30, 0], [50, 0], [100, 0], [50, 0]])
  assert topology.apls(loop, loop).apls == pytest.approx(0.6, abs=1e-12)
  assert topology.topo(loop, loop).f1 == 1.0


def test_zero_length_edges_join_their_nodes():
  # 0 and 1 coincide, joined by a zero-length edge: one control point for both (else both
  # would snap onto one point and the second would take the first's name over).
  graph = graph_from_lists([[0, 0.0, 0.0], [1, 0.0, 0.0], [2, 100.0, 0.0]],
                           [[0, 1, [[0, 0], [0, 0]]], [1, 2, [[0, 0], [100, 0]]]])
  np.testing.assert_allclose(topology.control_points(graph), [[0, 0], [100, 0], [50, 0]])
  assert topology.apls(graph, graph).apls == 1.0
  assert topology.apls(graph, _road([[7, 0.0, 0.0], [8, 100.0, 0.0]], [[7, 8]])).apls == 1.0
  assert topology.topo(graph, graph, origins=[0, 1, 2]).tp == 15  # origins 0 and 1 are one


def test_plain_graphs_and_missing_polylines_are_straight_edges():
  graph = nx.Graph()
  graph.add_node("a", x=0.0, y=0.0)
  graph.add_node("b", x=120.0, y=0.0)
  graph.add_edge("a", "b")
  assert topology.apls(graph, _road(*SHORT)) == topology.apls(_road(*ROAD), _road(*SHORT))
  assert topology.topo(graph, _road(*SHORT)) == topology.topo(_road(*ROAD), _road(*SHORT))


def test_exact_duplicate_parallel_edges_count_once():
  dup = graph_from_lists(ROAD[0], [[0, 1, [[0, 0], [120, 0]]], [1, 0, [[120, 0], [0, 0]]]])
  assert topology.apls(dup, _road(*ROAD)).apls == 1.0
  assert topology.apls(dup, _road(*ROAD)).n_control_points_gt == 4


def test_empty_graphs_give_zero():
  empty = nx.MultiGraph()
  road = _road(*ROAD)
  assert topology.apls(empty, empty) == topology.AplsResult(0.0, 0.0, 0.0, 0, 0, 0, 0)
  result = topology.apls(road, empty)
  assert (result.apls, result.n_control_points_gt, result.n_control_points_prop) == (0.0, 4, 0)
  assert topology.apls(empty, road).apls == 0.0
  zero = topology.TopoResult(0.0, 0.0, 0.0, 0, 0, 0)
  assert topology.topo(road, empty) == zero
  assert topology.topo(empty, road) == zero
  # Nodes without edges: no route is longer than min_path_length, so no penalty: score 0.
  dots = graph_from_lists([[0, 0.0, 0.0], [1, 120.0, 0.0]], [])
  assert topology.apls(dots, dots).apls == 0.0


@pytest.mark.parametrize("graph, match", [
    (nx.MultiDiGraph(), "directed"),
    ({"nodes": []}, "expected a networkx MultiGraph"),
])
def test_bad_graph_types_are_rejected(graph, match):
  with pytest.raises(GraphInputError, match=match):
    topology.apls(graph, _road(*ROAD))


def test_bad_nodes_and_polylines_are_rejected_with_the_culprit_named():
  no_y = nx.MultiGraph()
  no_y.add_node("n1", x=1.0)
  with pytest.raises(GraphInputError, match="prop: node 'n1' needs numeric 'x' and 'y'"):
    topology.apls(_road(*ROAD), no_y)
  nan = nx.MultiGraph()
  nan.add_node(3, x=float("nan"), y=0.0)
  with pytest.raises(GraphInputError, match="gt: node 3 has a non-finite position"):
    topology.topo(nan, _road(*ROAD))
  for coords, match in (([[0.0, 0.0]], r"shape \(N >= 2, 2\)"),
                        ([[0.0, 0.0, 0.0], [120.0, 0.0, 0.0]], r"shape \(N >= 2, 2\)"),
                        ([[0.0, 0.0], [60.0, np.inf], [120.0, 0.0]], "non-finite"),
                        ([[0.0, 0.0], [119.0, 0.0]], "ends are 1 m from the edge's nodes"),
                        ("a string", "not a numeric array")):
    graph = nx.MultiGraph()
    graph.add_node(0, x=0.0, y=0.0)
    graph.add_node(1, x=120.0, y=0.0)
    graph.add_edge(0, 1, coords=coords)
    with pytest.raises(GraphInputError, match=r"gt: edge \(0, 1, key=0\).*" + match):
      topology.apls(graph, _road(*ROAD))


def test_bad_parameters_and_origins_are_rejected():
  road = _road(*ROAD)
  with pytest.raises(ValueError, match="min_path_length must be a positive number"):
    topology.apls(road, road, min_path_length=0.0)
  with pytest.raises(ValueError, match="hole_size must be a positive number"):
    topology.topo(road, road, hole_size=float("nan"))
  with pytest.raises(GraphInputError, match="origin 7 is not a node of gt"):
    topology.topo(road, road, origins=[0, 7])
  with pytest.raises(GraphInputError, match="node 5 is not in the node list"):
    graph_from_lists([[0, 0.0, 0.0]], [[0, 5, [[0, 0], [1, 1]]]])


def test_the_benchmark_runs_on_a_small_synthetic_pair():
  from benchmarks import topology as bench  # (the benchmark script, kept from rotting)
  gt, prop = bench.synthetic_pair(4)
  assert gt.number_of_nodes() == 16 and prop.number_of_nodes() == 16 + 5
  report = bench.run([4], repeats=1, cases_dir=None)
  (row,) = report["rows"]
  assert row["name"] == "synthetic 4x4" and 0 < row["apls"] < 1 and 0 < row["topo_f1"] <= 1
  assert row["apls_seconds_median"] > 0 and row["topo_seconds_median"] > 0
