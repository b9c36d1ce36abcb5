"""Road graphs from masks whose graph is known (cmmp_jax.graphs): straight roads, crossings, T
junctions, spurs, gaps that must or must not be bridged, loops, trajectory-guided completion,
and the GeoJSON / GraphML / overlay outputs with hand-computed coordinates."""
import dataclasses
import json
import math
import pathlib

import affine
import cv2
import networkx as nx
import numpy as np
import pytest
import rasterio.crs
from PIL import Image

from cmmp_jax import graphs
from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import synthetic
from cmmp_jax.graphs import bridging, extract
from configs import default


def _bar(mask, r0, r1, c0, c1):
  mask[r0:r1, c0:c1] = 1.0
  return mask


def _plus(size=101):
  mask = np.zeros((size, size), np.float32)
  _bar(mask, 48, 53, 10, 91)  # horizontal: rows 48..52, centre row 50
  return _bar(mask, 10, 91, 48, 53)  # vertical: centre col 50


def _degrees(graph):
  return sorted(d for _, d in graph.degree())


def _node_at(graph, x, y, tol=2.0):
  best = min(graph.nodes, key=lambda n: math.hypot(graph.nodes[n]['x'] - x,
                                                  graph.nodes[n]['y'] - y))
  assert math.hypot(graph.nodes[best]['x'] - x, graph.nodes[best]['y'] - y) <= tol, (
      f'no node near ({x}, {y})')
  return best


def _check_layout(graph):
  """Every edge's coords run from its smaller node to its larger, ending exactly on them."""
  for u, v, data in graph.edges(data=True):
    assert u <= v
    coords = data['coords']
    assert coords.dtype == np.float64 and coords.ndim == 2 and coords.shape[1] == 2
    np.testing.assert_allclose(coords[0], [graph.nodes[u]['x'], graph.nodes[u]['y']])
    np.testing.assert_allclose(coords[-1], [graph.nodes[v]['x'], graph.nodes[v]['y']])
    assert data['length'] == pytest.approx(extract.polyline_length(coords))


# ----------------------------------------------------------------------------------------------
# Shapes with a known graph.


def test_straight_road_is_one_edge_between_two_end_points():
  mask = _bar(np.zeros((60, 100), np.float32), 28, 33, 10, 90)  # centre row 30, cols 10..89
  graph = graphs.extract_graph(mask)
  assert graph.number_of_nodes() == 2 and graph.number_of_edges() == 1
  _check_layout(graph)
  (u, v, data), = graph.edges(data=True)
  # The skeleton of a 5 px wide bar stops about 2 px short of each end: 79 - 4 px.
  assert 73 <= data['length'] <= 80
  assert all(abs(graph.nodes[n]['y'] - 30) <= 1 for n in graph.nodes)
  assert len(data['coords']) == 2  # a straight line simplifies to its two end points


def test_crossing_has_one_junction_of_degree_four_and_four_arms():
  graph = graphs.extract_graph(_plus())
  assert _degrees(graph) == [1, 1, 1, 1, 4]
  _check_layout(graph)
  centre = _node_at(graph, 50, 50, tol=1.5)
  for x, y in ((12, 50), (88, 50), (50, 12), (50, 88)):  # arms end ~2 px inside the bar ends
    _node_at(graph, x, y, tol=3.0)
  for _, _, data in graph.edges(centre, data=True):
    assert data['length'] == pytest.approx(38.0, abs=2.5)


def test_wide_crossing_junction_pixels_merge_into_one_node():
  mask = np.zeros((121, 121), np.float32)
  _bar(mask, 52, 69, 5, 116)
  _bar(mask, 5, 116, 52, 69)
  graph = graphs.extract_graph(mask)
  assert _degrees(graph) == [1, 1, 1, 1, 4]
  _node_at(graph, 60, 60, tol=3.0)


def _wide_oblique_crossing():
  """Two 30 px wide roads (15 px half-width, 15 m at 0.5 m/px) crossing at 70 degrees at
  (140, 140), ending 20+ px inside the 281 px raster, with two 8 x 7 px bumps on the
  horizontal road's edges (a car park entrance, a ragged prediction)."""
  mask = np.zeros((281, 281), np.uint8)
  cv2.line(mask, (30, 140), (250, 140), 1, 30)
  dx, dy = 110 * math.cos(math.radians(70)), 110 * math.sin(math.radians(70))
  cv2.line(mask, (round(140 - dx), round(140 - dy)), (round(140 + dx), round(140 + dy)), 1, 30)
  mask[117:125, 60:68] = 1   # above the top edge (row 125)
  mask[155:162, 205:212] = 1  # below the bottom edge (row 154)
  return mask.astype(np.float32)


def test_wide_crossing_is_one_junction_of_degree_four_without_spurs():
  graph = graphs.extract_graph(_wide_oblique_crossing())
  assert _degrees(graph) == [1, 1, 1, 1, 4]
  _check_layout(graph)
  junction, = [n for n in graph.nodes if graph.degree(n) == 4]
  assert math.hypot(graph.nodes[junction]['x'] - 140, graph.nodes[junction]['y'] - 140) <= 2.0
  # Arms run straight out of the crossing: every vertex of an arm lies within 3 px of the line
  # from the junction to the arm's end; the skeleton's bend inside the crossing (thinning pulls
  # the arms of an oblique crossing towards each other) is over 5 px off without straightening.
  def bend(graph):
    node, = [n for n in graph.nodes if graph.degree(n) == 4]
    centre = np.array([graph.nodes[node]['x'], graph.nodes[node]['y']])
    worst = 0.0
    for _, other, key in graph.edges(node, keys=True):
      coords = graphs.oriented_coords(graph, node, other, key) - centre
      direction = coords[-1] / np.hypot(*coords[-1])
      worst = max(worst, np.abs(coords[:, 0] * direction[1] - coords[:, 1] * direction[0]).max())
    return worst
  assert bend(graph) <= 3.0
  assert bend(graphs.extract_graph(_wide_oblique_crossing(), graphs.GraphParams(
      junction_straighten_radius_factor=0.0))) > 5.0
  # With fixed pixel rules only (spur_length 12, junction_merge_distance 4), both bumps become
  # spurs (a branch of about the half-width plus the bump) and the crossing two junctions.
  fixed = graphs.extract_graph(_wide_oblique_crossing(), graphs.GraphParams(
      junction_merge_radius_factor=0.0, spur_radius_factor=0.0,
      junction_straighten_radius_factor=0.0))
  assert _degrees(fixed) == [1, 1, 1, 1, 1, 1, 3, 3, 3, 3]


def test_roads_leaving_the_raster_end_on_its_border_and_are_never_spurs():
  # A diagonal 21 px road leaving through the bottom-right corner: with the border padded its
  # centreline runs on to the corner pixel (unpadded, it forks at the cut end and ends 8 px off).
  mask = np.zeros((200, 200), np.uint8)
  cv2.line(mask, (60, 60), (260, 260), 1, 21)
  graph = graphs.extract_graph(mask.astype(np.float32))
  assert _degrees(graph) == [1, 1]
  _node_at(graph, 199, 199, tol=1.0)
  unpadded = graphs.extract_graph(mask.astype(np.float32), graphs.GraphParams(border_padding=0))
  assert min(math.hypot(d['x'] - 199, d['y'] - 199) for _, d in unpadded.nodes(data=True)) > 4
  # A side road 20 px long from a 21 px road to the top border: shorter than spur_length plus
  # the road radius at its junction, but it leaves the raster, so it stays.
  mask = np.zeros((100, 200), np.float32)
  _bar(mask, 10, 31, 0, 200)   # through road, centre row 20, leaving on both sides
  _bar(mask, 0, 31, 90, 111)   # side road, centre col 100, up to the border
  graph = graphs.extract_graph(mask)
  assert _degrees(graph) == [1, 1, 1, 3]
  junction = _node_at(graph, 100, 20, tol=1.5)
  assert graph.degree(junction) == 3
  for x, y in ((0, 20), (199, 20), (100, 0)):
    assert graph.degree(_node_at(graph, x, y, tol=1.0)) == 1


@pytest.mark.parametrize('gap, snapped', [(4, True), (8, True), (14, False)])
def test_dead_end_within_a_half_width_of_the_border_snaps_onto_it(gap, snapped):
  mask = _bar(np.zeros((100, 200), np.float32), 40, 61, 30, 200 - gap)  # 21 px road, centre 50
  graph = graphs.extract_graph(mask)
  assert _degrees(graph) == [1, 1]
  _check_layout(graph)
  right = max(graph.nodes, key=lambda n: graph.nodes[n]['x'])
  if snapped:  # the road stops within its half-width (10.5 px) of the border: it leaves there
    assert graph.nodes[right]['x'] == 199.0 and abs(graph.nodes[right]['y'] - 50) <= 1
  else:  # the skeleton stops about a half-width short of the road's end (col 185)
    assert 170 <= graph.nodes[right]['x'] <= 180
  off = graphs.extract_graph(mask, graphs.GraphParams(border_snap_radius_factor=0.0))
  assert max(d['x'] for _, d in off.nodes(data=True)) <= 199 - gap - 8
  left = min(graph.nodes, key=lambda n: graph.nodes[n]['x'])
  assert 35 <= graph.nodes[left]['x'] <= 45  # 30 px from the left border: never snapped


def test_t_junction():
  mask = np.zeros((100, 100), np.float32)
  _bar(mask, 18, 23, 10, 90)   # the through road, centre row 20
  _bar(mask, 18, 90, 48, 53)   # the side road, centre col 50, down to row 89
  graph = graphs.extract_graph(mask)
  assert _degrees(graph) == [1, 1, 1, 3]
  junction = _node_at(graph, 50, 20, tol=2.0)
  lengths = sorted(d['length'] for _, _, d in graph.edges(junction, data=True))
  assert lengths == pytest.approx([38.0, 39.0, 67.0], abs=2.5)


def test_short_spur_is_pruned_and_long_side_road_kept():
  mask = np.zeros((100, 120), np.float32)
  _bar(mask, 48, 53, 5, 115)   # main road, centre row 50
  _bar(mask, 40, 50, 30, 33)   # stub reaching 10 px above the road: a spur
  _bar(mask, 50, 95, 80, 85)   # side road of 45 px: a real dead end
  pruned = graphs.extract_graph(mask)
  assert _degrees(pruned) == [1, 1, 1, 3]
  _node_at(pruned, 82, 50, tol=2.5)
  kept = graphs.extract_graph(mask, graphs.GraphParams(spur_length=0.0))
  assert _degrees(kept) == [1, 1, 1, 1, 3, 3]


def test_gap_between_aligned_dead_ends_is_bridged():
  mask = np.zeros((60, 120), np.float32)
  _bar(mask, 28, 33, 5, 50)
  _bar(mask, 28, 33, 65, 115)  # 15 px gap
  graph = graphs.extract_graph(mask)
  assert nx.is_connected(graph)
  bridges = [d for _, _, d in graph.edges(data=True) if d['source'] == 'bridge']
  assert len(bridges) == 1 and 15 <= bridges[0]['length'] <= 20
  assert graph.graph['bridges'] == 1
  unbridged = graphs.extract_graph(mask, graphs.GraphParams(bridge_max_distance=0.0))
  assert nx.number_connected_components(unbridged) == 2


@pytest.mark.parametrize('case', ['side_by_side', 'too_far', 'pointing_away'])
def test_gap_is_not_bridged_when_direction_is_wrong_or_too_far(case):
  mask = np.zeros((100, 140), np.float32)
  if case == 'side_by_side':  # ends 10 px apart in x but 20 px apart across: 63 degrees off
    _bar(mask, 28, 33, 5, 50)
    _bar(mask, 48, 53, 60, 120)
  elif case == 'too_far':  # aligned, 40 px gap > bridge_max_distance (24)
    _bar(mask, 28, 33, 5, 50)
    _bar(mask, 28, 33, 90, 135)
  else:  # a vertical dead end 10 px below the horizontal road's end, pointing down
    _bar(mask, 28, 33, 5, 50)
    _bar(mask, 45, 95, 55, 60)
  graph = graphs.extract_graph(mask)
  assert nx.number_connected_components(graph) == 2
  assert graph.graph['bridges'] == 0


def test_dead_end_pointing_at_a_road_is_extended_onto_it():
  mask = np.zeros((100, 100), np.float32)
  _bar(mask, 18, 23, 5, 95)     # road, centre row 20
  _bar(mask, 35, 95, 48, 53)    # side road stopping 12 px below it
  graph = graphs.extract_graph(mask)
  assert nx.is_connected(graph)
  assert _degrees(graph) == [1, 1, 1, 2, 3]  # the bridge's foot is a junction on the road
  foot = _node_at(graph, 50, 20, tol=1.5)
  assert graph.degree(foot) == 3
  assert not graphs.extract_graph(mask, graphs.GraphParams(bridge_to_edges=False)).graph[
      'bridges']


def test_closed_loop_becomes_two_nodes_and_two_edges():
  mask = np.zeros((101, 101), np.uint8)
  cv2.circle(mask, (50, 50), 30, 1, 4)
  graph = graphs.extract_graph(mask.astype(np.float32))
  assert graph.number_of_nodes() == 2 and graph.number_of_edges() == 2
  assert _degrees(graph) == [2, 2]
  assert not list(nx.selfloop_edges(graph))
  _check_layout(graph)
  total = sum(d['length'] for _, _, d in graph.edges(data=True))
  assert total == pytest.approx(2 * math.pi * 30, rel=0.05)


def test_self_loops_and_zero_length_edges_have_defined_results():
  graph = nx.MultiGraph()
  graph.add_node(0, x=0.0, y=0.0)
  graph.add_node(1, x=10.0, y=0.0)
  graph.add_node(2, x=10.0, y=0.0)  # same place as 1
  ring = np.array([[0, 0], [10, -10], [20, 0], [10, 10], [0, 0]], np.float64)
  extract._add_edge(graph, 0, 0, ring)                            # a real loop: split in two
  extract._add_edge(graph, 1, 1, np.array([[10.0, 0], [10, 0]]))  # zero-length loop: dropped
  extract._add_edge(graph, 1, 2, np.array([[10.0, 0], [10, 0]]))  # zero-length: contracted
  extract._add_edge(graph, 0, 1, np.array([[0.0, 0], [10, 0]]))
  extract._add_edge(graph, 2, 0, np.array([[10.0, 0], [5, 3], [0, 0]]))
  extract.clean_graph(graph, graphs.GraphParams(spur_length=0))
  assert not list(nx.selfloop_edges(graph))
  assert graph.number_of_nodes() == 3  # 0, the merged 1/2, and the loop's halfway node
  lengths = sorted(d['length'] for _, _, d in graph.edges(data=True))
  half_ring = 2 * math.hypot(10, 10)  # the loop split at its halfway vertex (20, 0)
  assert lengths == pytest.approx([10.0, 2 * math.hypot(5, 3), half_ring, half_ring])
  _node_at(graph, 20, 0, tol=1e-9)


def test_empty_and_tiny_predictions_give_an_empty_graph(tmp_path):
  for probabilities in (np.zeros((64, 64), np.float32), _bar(np.zeros((64, 64)), 10, 14, 10, 14)):
    graph = graphs.extract_graph(probabilities)
    assert graph.number_of_nodes() == 0 and graph.number_of_edges() == 0
  paths, graph = graphs.write_graph_outputs(tmp_path, 'empty', np.zeros((32, 32), np.float32))
  collection = json.loads(paths[0].read_text())
  assert collection['type'] == 'FeatureCollection' and collection['features'] == []
  assert graphs.read_graphml(paths[1]).number_of_nodes() == 0
  assert np.asarray(Image.open(paths[2])).shape == (32, 32, 3)


def test_bad_inputs_are_named():
  with pytest.raises(graphs.GraphInputError, match='probabilities must be'):
    graphs.extract_graph(np.zeros((4, 4, 3)))
  with pytest.raises(graphs.GraphInputError, match='NaN'):
    graphs.extract_graph(np.full((4, 4), np.nan))
  with pytest.raises(graphs.GraphInputError, match='heatmap is 8 x 8'):
    graphs.extract_graph(np.zeros((4, 4)), graphs.GraphParams(use_trajectories=True),
                         heatmap=np.ones((8, 8)))
  with pytest.raises(graphs.GraphParamsError, match='spur_length'):
    graphs.GraphParams(spur_length=-1)
  with pytest.raises(graphs.GraphParamsError, match='threshold'):
    graphs.GraphParams(threshold=2.0)


def test_config_graph_fields_are_the_params_fields():
  config = default.get_config()
  fields = {f.name for f in dataclasses.fields(graphs.GraphParams)}
  assert set(config.graph.keys()) - {'enabled', 'wgs84'} == fields
  params = graphs.GraphParams.from_config(config.graph)
  assert params == graphs.GraphParams()  # the config's defaults are the dataclass's


# ----------------------------------------------------------------------------------------------
# Trajectory-guided completion.


def _line_heat(shape, points, trips=6, spacing=3.0, noise=2.0, seed=0):
  """uint8 heat-map of `trips` GPS trips along the polyline `points` (x, y): a fix every
  `spacing` px with Gaussian noise of `noise` px, as vehicles driving that road leave them."""
  rng = np.random.default_rng(seed)
  heat = np.zeros(shape, np.uint8)
  for _ in range(trips):
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
      t = np.arange(rng.uniform(0, spacing), math.hypot(x1 - x0, y1 - y0), spacing)
      t /= math.hypot(x1 - x0, y1 - y0)
      xs = x0 + t * (x1 - x0) + rng.normal(0, noise, t.size)
      ys = y0 + t * (y1 - y0) + rng.normal(0, noise, t.size)
      inside = (xs >= 0) & (ys >= 0) & (xs < shape[1] - 0.5) & (ys < shape[0] - 0.5)
      heat[np.rint(ys[inside]).astype(int), np.rint(xs[inside]).astype(int)] = 200
  return heat


def test_trajectories_accept_a_driven_bridge_and_drop_an_undriven_one():
  mask = np.zeros((60, 160), np.float32)
  _bar(mask, 28, 33, 5, 50)
  _bar(mask, 28, 33, 90, 155)  # 40 px gap: too long without trajectories
  on = graphs.GraphParams(use_trajectories=True, recover=False)
  driven = _line_heat(mask.shape, [(5, 30), (155, 30)])
  graph = graphs.extract_graph(mask, on, heatmap=driven)
  assert nx.is_connected(graph) and graph.graph['trajectories'] == 'used'
  assert [d['source'] for _, _, d in graph.edges(data=True)].count('trajectory_bridge') == 1
  elsewhere = _line_heat(mask.shape, [(5, 5), (155, 5)])  # traffic, but 25 px away
  graph = graphs.extract_graph(mask, on, heatmap=elsewhere)
  assert nx.number_connected_components(graph) == 2 and graph.graph['bridges_rejected'] >= 1
  # A 15 px gap that the image-only rules bridge is dropped when no vehicle drove across it.
  short = np.zeros((60, 120), np.float32)
  _bar(short, 28, 33, 5, 50)
  _bar(short, 28, 33, 65, 115)
  assert nx.is_connected(graphs.extract_graph(short))
  assert not nx.is_connected(graphs.extract_graph(short, on, heatmap=elsewhere[:, :120]))
  # No fix at all (a blank aux raster): no trajectory information, image-only rules apply.
  blank = graphs.extract_graph(short, on, heatmap=np.zeros(short.shape, np.uint8))
  assert nx.is_connected(blank) and blank.graph['trajectories'] == 'heat-map holds no fix'


def test_trajectories_recover_an_occluded_road_but_not_parking_lot_heat():
  mask = np.zeros((150, 220), np.float32)
  _bar(mask, 58, 63, 5, 80)
  _bar(mask, 58, 63, 150, 215)  # 70 px of road hidden (under trees)
  heat = _line_heat(mask.shape, [(5, 60), (215, 60)])
  rng = np.random.default_rng(0)  # a 70 x 50 px parking lot full of fixes beside the road
  lot = rng.integers(0, 50 * 70, 900)
  heat[72 + lot // 70, 5 + lot % 70] = 200
  params = graphs.GraphParams(use_trajectories=True)
  graph = graphs.extract_graph(mask, params, heatmap=heat)
  assert graph.graph['recovered_pieces'] == 1
  assert nx.is_connected(graph) and _degrees(graph) == [1, 1]  # one road, end to end
  assert sum(d['length'] for _, _, d in graph.edges(data=True)) == pytest.approx(208, abs=6)
  for _, _, data in graph.edges(data=True):
    assert (np.abs(data['coords'][:, 1] - 60) <= 3).all()  # nothing wanders into the lot
  without = graphs.extract_graph(mask)
  assert nx.number_connected_components(without) == 2
  # Without the width rule the lot's ridge is thinned into spurious roads through it.
  loose = graphs.extract_graph(mask, dataclasses.replace(params, recover_max_width=0.0),
                               heatmap=heat)
  assert any((np.abs(d['coords'][:, 1] - 60) > 8).any() for _, _, d in loose.edges(data=True))


# ----------------------------------------------------------------------------------------------
# Outputs.


def _geo(crs, transform, shape=(101, 101)):
  return geo_lib.GeoInfo(crs=crs, transform=transform,
                         bounds=rasterio.transform.array_bounds(*shape, transform))


def test_geojson_coordinates_are_the_affine_transform_of_pixel_centres():
  graph = graphs.extract_graph(_plus())
  transform = affine.Affine(0.5, 0.0, 440000.0, 0.0, -0.5, 4420000.0)
  collection = graphs.graph_to_geojson(graph, _geo(rasterio.crs.CRS.from_epsg(32650), transform))
  assert collection['crs']['properties']['name'] == 'urn:ogc:def:crs:EPSG::32650'
  assert len(collection['features']) == 4
  # The junction is skeleton pixel (row 50, col 50): its centre (50.5, 50.5) in pixel space.
  junction = (440000.0 + 0.5 * 50.5, 4420000.0 - 0.5 * 50.5)
  ends = {tuple(f['geometry']['coordinates'][i]) for f in collection['features'] for i in (0, -1)}
  assert junction in ends
  for feature in collection['features']:
    u = feature['properties']['u']
    x, y = graph.nodes[u]['x'], graph.nodes[u]['y']
    assert feature['geometry']['coordinates'][0] == pytest.approx(
        [440000.0 + 0.5 * (x + 0.5), 4420000.0 - 0.5 * (y + 0.5)])


def test_geojson_wgs84_option_and_pixel_coordinates_without_georeference():
  graph = graphs.extract_graph(_plus())
  # Web Mercator, 10 m pixels; lon/lat by the spherical Mercator formulas.
  transform = affine.Affine(10.0, 0.0, 1_000_000.0, 0.0, -10.0, 5_000_000.0)
  geo = _geo(rasterio.crs.CRS.from_epsg(3857), transform)
  collection = graphs.graph_to_geojson(graph, geo, wgs84=True)
  assert 'crs' not in collection and collection['coordinate_units'] == 'degree'
  radius = 6378137.0
  for feature in collection['features']:
    u = feature['properties']['u']
    mx = 1_000_000.0 + 10.0 * (graph.nodes[u]['x'] + 0.5)
    my = 5_000_000.0 - 10.0 * (graph.nodes[u]['y'] + 0.5)
    lon = math.degrees(mx / radius)
    lat = math.degrees(2 * math.atan(math.exp(my / radius)) - math.pi / 2)
    assert feature['geometry']['coordinates'][0] == pytest.approx([lon, lat], abs=1e-9)
  with pytest.raises(ValueError, match='georeferenced'):
    graphs.graph_to_geojson(graph, None, wgs84=True)
  pixel = graphs.graph_to_geojson(graph)
  assert pixel['coordinate_units'] == 'pixel' and 'crs' not in pixel
  for feature, (u, v, data) in zip(pixel['features'], sorted(graph.edges(data=True),
                                                              key=lambda e: (e[0], e[1]))):
    assert feature['geometry']['coordinates'] == data['coords'].tolist()


def test_graphml_round_trip_keeps_positions_polylines_and_georeference(tmp_path):
  mask = np.zeros((101, 101), np.uint8)
  cv2.circle(mask, (50, 50), 30, 1, 4)
  mask[48:53, 80:100] = 1  # a road leaving the ring: a junction, curved edges
  graph = graphs.extract_graph(mask.astype(np.float32))
  geo = _geo(rasterio.crs.CRS.from_epsg(32650), affine.Affine(0.5, 0, 1e5, 0, -0.5, 2e5))
  path = tmp_path / 'ring_graph.graphml'
  graphs.write_graphml(path, graph, geo)
  back = graphs.read_graphml(path)
  assert sorted(back.nodes) == sorted(graph.nodes)
  for node in graph.nodes:
    assert back.nodes[node]['x'] == graph.nodes[node]['x']
    assert back.nodes[node]['map_x'] == pytest.approx(1e5 + 0.5 * (graph.nodes[node]['x'] + 0.5))
  assert back.number_of_edges() == graph.number_of_edges()
  original = sorted((u, v, d['coords'].tolist(), d['source']) for u, v, d in graph.edges(data=True))
  restored = sorted((u, v, d['coords'].tolist(), d['source']) for u, v, d in back.edges(data=True))
  assert restored == original
  assert rasterio.crs.CRS.from_wkt(back.graph['crs']).to_epsg() == 32650
  assert back.graph['transform'].split(',')[0] == '0.5'


def test_metre_and_map_graphs_scale_coordinates():
  graph = graphs.extract_graph(_plus())
  metres = graphs.pixel_graph_to_metres(graph, 0.5)
  for u, v, data in metres.edges(data=True):
    assert data['length'] == pytest.approx(0.5 * graph.edges[u, v, 0]['length'])
  mapped = graphs.pixel_graph_to_map(graph, affine.Affine(2.0, 0, 100.0, 0, -2.0, 50.0))
  node = _node_at(graph, 50, 50)
  assert (mapped.nodes[node]['x'], mapped.nodes[node]['y']) == pytest.approx(
      (100.0 + 2.0 * (graph.nodes[node]['x'] + 0.5), 50.0 - 2.0 * (graph.nodes[node]['y'] + 0.5)))
  with pytest.raises(ValueError, match='metres_per_pixel'):
    graphs.pixel_graph_to_metres(graph, 0.0)


def test_write_graph_outputs_writes_three_files_and_an_overlay_of_image_size(tmp_path):
  image = np.full((101, 101, 3), 90, np.uint8)
  geo = _geo(rasterio.crs.CRS.from_epsg(32650), affine.Affine(0.5, 0, 1e5, 0, -0.5, 2e5))
  paths, graph = graphs.write_graph_outputs(tmp_path, 'tile', _plus(), image=image, geo=geo,
                                            config=default.get_config().graph)
  assert [p.name for p in paths] == ['tile_graph.geojson', 'tile_graph.graphml',
                                     'tile_overlay.png']
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary left
  overlay = np.asarray(Image.open(paths[2]))
  assert overlay.shape == (101, 101, 3)
  red, green, blue = overlay[50, 30].astype(int)  # on the horizontal road: red (anti-aliased)
  assert red >= 200 and green <= 40 and blue <= 40
  assert tuple(overlay[20, 20]) == (90, 90, 90)  # off the roads: the image
  assert len(json.loads(paths[0].read_text())['features']) == graph.number_of_edges() == 4


# ----------------------------------------------------------------------------------------------
# Large rasters and the synthetic city.


def test_block_skeleton_matches_whole_array_skeleton():
  tile = synthetic.generate_tile(7, size=512)
  probabilities = tile['mask'][..., 0].astype(np.float32)
  whole, whole_radius = extract.skeleton_and_radius(probabilities,
                                                    graphs.GraphParams(block_size=0))
  blocks, block_radius = extract.skeleton_and_radius(
      probabilities, graphs.GraphParams(block_size=200, block_overlap=60))
  assert whole.sum() > 1000
  assert np.array_equal(whole, blocks)
  # Radii (half pixels) on every skeleton pixel and nowhere else, equal across the seams (this
  # tile's widest road has a 20.5 px radius, far below the 60 px overlap; its median is 14 px,
  # about the half-width of the synthetic roads at 512 px).
  assert np.array_equal(whole_radius, block_radius)
  assert np.array_equal(whole_radius > 0, whole)
  assert 10 <= np.median(whole_radius[whole]) / 2 <= 18 and whole_radius.max() / 2 <= 30


def test_synthetic_city_graph_lies_on_its_roads():
  tile = synthetic.generate_tile(3, size=256)
  road = tile['mask'][..., 0] > 0
  graph = graphs.extract_graph(road.astype(np.float32))
  assert graph.number_of_edges() >= 4
  near_road = cv2.dilate(road.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
  for _, _, data in graph.edges(data=True):
    if data['source'] == 'image':
      cols, rows = np.rint(data['coords']).astype(int).T
      assert near_road[rows, cols].all()


# ----------------------------------------------------------------------------------------------
# --mode=predict writes the graph beside the road maps.


def test_predict_directory_writes_graph_files_of_a_georeferenced_mosaic(tmp_path):
  from cmmp_jax import predict

  def red_forward(image, aux):  # probability = red / 255 (the 'reference' scaling undone)
    del aux
    return (np.asarray(image)[..., :1] + np.float32(1.6)) / np.float32(3.2)

  inputs, outputs = tmp_path / 'in', tmp_path / 'out'
  inputs.mkdir()
  image = np.zeros((101, 101, 3), np.uint8)
  image[..., 0] = (_plus() * 255).astype(np.uint8)
  transform = affine.Affine(0.5, 0.0, 440000.0, 0.0, -0.5, 4420000.0)
  geo_lib.write_geotiff(inputs / 'city.tif', image,
                        _geo(rasterio.crs.CRS.from_epsg(32650), transform))
  summary = predict.predict_directory(red_forward, inputs, outputs, window=48, overlap=8,
                                      batch_size=2, blank_aux=True,
                                      graph_config=default.get_config().graph)
  names = [pathlib.Path(p).name for p in summary['written']]
  assert names[-3:] == ['city_graph.geojson', 'city_graph.graphml', 'city_overlay.png']
  collection = json.loads((outputs / 'city_graph.geojson').read_text())
  assert collection['crs']['properties']['name'] == 'urn:ogc:def:crs:EPSG::32650'
  assert len(collection['features']) == 4
  ends = {tuple(f['geometry']['coordinates'][i]) for f in collection['features'] for i in (0, -1)}
  assert (440000.0 + 0.5 * 50.5, 4420000.0 - 0.5 * 50.5) in ends  # the junction, by hand
  assert np.asarray(Image.open(outputs / 'city_overlay.png')).shape == (101, 101, 3)
  # Disabled: no graph files.
  config = default.get_config().graph
  config.enabled = False
  again = predict.predict_directory(red_forward, inputs, tmp_path / 'off', window=48,
                                    overlap=8, batch_size=2, blank_aux=True, graph_config=config)
  assert not [p for p in again['written'] if 'graph' in str(p) or 'overlay' in str(p)]


def test_bridge_evidence_on_crops_equals_the_whole_array_density():
  from cmmp_jax.graphs import completion
  tile = synthetic.generate_tile(5, size=256)
  params = graphs.GraphParams(use_trajectories=True)
  fixes = completion.fix_pixels(tile['aux'][..., 0] / 255.0, params)
  density = completion.fix_density(fixes, params)
  evidence = completion.TrafficEvidence(fixes, params)
  rng = np.random.default_rng(1)
  for _ in range(20):
    points = rng.uniform(0, 255, (2, 2))
    samples = bridging.sample_segment(points[0], points[1])
    cols, rows = np.rint(samples).astype(int).T
    expected = np.mean(density[rows, cols] >= params.bridge_min_density)
    assert evidence(samples) == expected


def test_trajectory_completion_in_blocks_recovers_the_same_road():
  mask = np.zeros((150, 220), np.float32)
  _bar(mask, 58, 63, 5, 80)
  _bar(mask, 58, 63, 150, 215)
  heat = _line_heat(mask.shape, [(5, 60), (215, 60)])
  for block_size in (0, 128):
    params = graphs.GraphParams(use_trajectories=True, block_size=block_size, block_overlap=32)
    graph = graphs.extract_graph(mask, params, heatmap=heat)
    # One road from end to end (a seam may leave a short bridge, i.e. degree-2 nodes).
    assert nx.is_connected(graph), block_size
    assert _degrees(graph)[:2] == [1, 1] and max(_degrees(graph)) <= 2, block_size
    total = sum(d['length'] for _, _, d in graph.edges(data=True))
    assert total == pytest.approx(208, abs=8), block_size
