"""Graph metrics in evaluation (cmmp_jax.graph_eval): vector labels to graphs, the synthetic
city's stored road centrelines, metres per pixel, per-tile APLS / TOPO and their aggregation,
and the Table V column. (`--mode=eval` end to end: tests/test_train.py's eval test.)"""
import json
import math
import types

import affine
import cv2
import numpy as np
import pytest
import rasterio.warp
from scipy import ndimage

from cmmp_jax import config_checks, graph_eval
from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import synthetic
from configs import synthetic as synthetic_config
from data_builders import build as build_lib
from data_builders import common


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  build_lib.build("synthetic", data_dir, config="tiny")
  return data_dir


def _tiny_config(data_dir, **overrides):
  config = synthetic_config.get_config()
  config.update_from_flattened_dict({"data.config": "tiny", "data.data_dir": str(data_dir),
                                     "eval_batch_size": 2, **overrides})
  config_checks.validate(config)
  return config


def _degrees(graph):
  return sorted(d for _, d in graph.degree())


# -- vector labels -> graph ---------------------------------------------------------------------


def test_polylines_are_clipped_to_the_tile_and_noded_at_crossings_and_t_junctions():
  lines = [
      [[-10.0, 32.0], [80.0, 32.0]],                       # west-east, past both edges
      [[40.0, -10.0], [40.0, 80.0]],                       # north-south: crosses it at (40, 32)
      # a street starting on the first road, its start rounded off the line by 1e-4 px
      [[10.0, 32.0001], [10.0, 50.0]],
  ]
  graph = graph_eval.polylines_to_graph(lines, 64, 64)
  # nodes: 4 tile-edge ends, the crossing, the T-junction, the street's dead end
  assert graph.number_of_nodes() == 7 and graph.number_of_edges() == 6
  assert _degrees(graph) == [1, 1, 1, 1, 1, 3, 4]
  # (snapping the street's start into the road bends the road by at most that 1e-4 px)
  xy = sorted((d["x"], d["y"]) for _, d in graph.nodes(data=True))
  expected = sorted([(-0.5, 32.0), (63.5, 32.0), (40.0, -0.5), (40.0, 63.5), (40.0, 32.0),
                     (10.0, 32.0001), (10.0, 50.0)])
  np.testing.assert_allclose(xy, expected, atol=1e-4)
  total = sum(d["length"] for _, _, d in graph.edges(data=True))
  assert total == pytest.approx(64 + 64 + (50 - 32.0001), abs=1e-3)
  for u, v, d in graph.edges(data=True):  # polylines end exactly on their nodes
    ends = {tuple(d["coords"][0]), tuple(d["coords"][-1])}
    assert ends == {(graph.nodes[u]["x"], graph.nodes[u]["y"]),
                    (graph.nodes[v]["x"], graph.nodes[v]["y"])}


def test_lines_off_the_tile_give_an_empty_graph_and_bad_lines_are_named():
  assert graph_eval.polylines_to_graph([[[100.0, 100.0], [120.0, 130.0]]], 64, 64).number_of_nodes() == 0
  assert graph_eval.polylines_to_graph([], 64, 64).number_of_edges() == 0
  with pytest.raises(ValueError, match="road line 1 must be"):
    graph_eval.polylines_to_graph([[[0, 0], [5, 5]], [[1.0, float("nan")], [3, 3]]], 64, 64)
  with pytest.raises(ValueError, match="road line 0 must be"):
    graph_eval.polylines_to_graph([[[0, 0]]], 64, 64)


def _rasterise(graph, shape):
  layer = np.zeros(shape, np.uint8)
  for _, _, d in graph.edges(data=True):
    cv2.polylines(layer, [np.round(d["coords"] * 16).astype(np.int32).reshape(-1, 1, 2)],
                  False, 1, 1, cv2.LINE_8, 4)
  return layer > 0


@pytest.mark.parametrize("size", [64, 128])
def test_synthetic_road_graphs_run_down_the_middle_of_the_mask(size):
  config = synthetic.SyntheticConfig(size=size)
  for index in range(3):
    tile = synthetic.generate_tile(synthetic.tile_seed(0, "test", index), size, config)
    mask = tile["mask"][..., 0] > 0
    graph = graph_eval.polylines_to_graph(tile["road_lines"], size, size)
    lines = _rasterise(graph, mask.shape)
    assert graph.number_of_edges() >= 2 and max(d for _, d in graph.degree()) >= 3
    assert (lines & mask).sum() / lines.sum() > 0.99  # the centrelines lie on road
    # ... and every road pixel is within half the widest road (8 px * size / 128) of them
    distance = ndimage.distance_transform_edt(~lines)
    assert distance[mask].max() <= 4 * size / 128 + 1.5


def test_the_built_dataset_stores_the_generators_road_lines(tiny_data):
  builder = build_lib.make_builder("synthetic", tiny_data, "tiny")
  assert str(builder.version) == "1.2.0" and "road_lines" in builder.info.features
  source = builder.as_data_source(split="test")
  city = builder.builder_config.city
  for index in range(len(source)):
    stored = graph_eval.parse_road_lines(source[index]["road_lines"])
    tile = synthetic.generate_tile(synthetic.tile_seed(city.base_seed, "test", index),
                                   city.size, city)
    assert len(stored) == len(tile["road_lines"]) >= 2
    for a, b in zip(stored, tile["road_lines"]):
      np.testing.assert_allclose(a, b, atol=6e-5)  # 1e-4 px precision
  assert json.loads(common.road_lines_json([np.zeros((2, 2))])) == {
      "units": "pixel", "lines": [[[0.0, 0.0], [0.0, 0.0]]]}
  # make_example stores them, and names the tile's source for a line that is not (N >= 2, 2)
  tile = [np.zeros((4, 4, c), np.uint8) for c in (3, 1, 1)]
  example = common.make_example("t", *tile, road_lines=[[[0.123456, 1], [2, 3]]])
  assert json.loads(example["road_lines"])["lines"] == [[[0.1235, 1.0], [2.0, 3.0]]]
  assert "road_lines" not in common.make_example("t", *tile)
  with pytest.raises(common.DatasetFileError, match=r"tile\.tif: road line 1 must be"):
    common.make_example("t", *tile, source="tile.tif", road_lines=[np.zeros((2, 2)),
                                                                   np.zeros((1, 2))])


# -- metres per pixel ---------------------------------------------------------------------------


def _fake_builder(name="bjroad", metadata=None, city=None):
  return types.SimpleNamespace(builder_config=types.SimpleNamespace(name=name, city=city),
                               info=types.SimpleNamespace(metadata=metadata or {}))


def _config_for(name, metres_per_pixel=0.0):
  config = synthetic_config.get_config()
  config.data.name = name
  config.eval.metres_per_pixel = metres_per_pixel
  return config


NAN4 = np.full(4, np.nan)


def test_metres_per_pixel_comes_from_the_dataset_and_says_where_from():
  # the synthetic city: its generator's extent (its bounds are fake)
  city = synthetic.SyntheticConfig(size=64)
  size = graph_eval.PixelSize.for_dataset(_config_for("synthetic"), _fake_builder(city=city),
                                          NAN4)
  assert size.for_tile(NAN4, 64, 64) == (4.0, size.source)
  assert "synthetic city generator" in size.source and "256 m over 64 px" in size.source
  # the user's value wins
  size = graph_eval.PixelSize.for_dataset(_config_for("synthetic", 0.3), _fake_builder(city=city),
                                          NAN4)
  assert size.for_tile(NAN4, 64, 64)[0] == 0.3 and "config.eval.metres_per_pixel" in size.source
  # BJRoad without coordinate files: the paper's 0.5 m/px; Porto: derived from the paper
  size = graph_eval.PixelSize.for_dataset(_config_for("bjroad"), _fake_builder(), NAN4)
  assert size.for_tile(NAN4, 1024, 1024)[0] == 0.5 and "Sec. V-A" in size.source
  size = graph_eval.PixelSize.for_dataset(_config_for("porto"), _fake_builder("default"), NAN4)
  assert size.for_tile(NAN4, 512, 512)[0] == pytest.approx(0.3631, abs=1e-4)
  size = graph_eval.PixelSize.for_dataset(_config_for("tlcgis"), _fake_builder("default"), NAN4)
  assert size.for_tile(NAN4, 500, 500)[0] == pytest.approx(0.1524)


def test_metres_per_pixel_from_bounds_and_from_a_projected_transform():
  # At the equator a degree of longitude is 111319.458 m and of latitude 110574.307 m (WGS84,
  # the series of data_builders/custom): a 0.01 x 0.01 degree tile of 1000 x 2000 px.
  bounds = np.array([10.0, -0.005, 10.01, 0.005])
  expected = math.sqrt(1113.19458 / 2000 * 1105.74307 / 1000)
  assert graph_eval.metres_per_pixel_from_bounds(bounds, 1000, 2000) == pytest.approx(
      expected, rel=1e-6)
  size = graph_eval.PixelSize.for_dataset(_config_for("bjroad"), _fake_builder(), bounds)
  assert size.source == "tile bounds (WGS84)"
  assert size.for_tile(bounds, 1000, 2000)[0] == pytest.approx(expected, rel=1e-6)
  assert size.for_tile(NAN4, 1024, 1024)[0] == 0.5  # a tile without bounds: documented value
  # a custom area in UTM: its transform's 0.3 m pixels on the ground, where the tile is: 60 km
  # west of the central meridian the scale factor is 0.9996 (1 + x^2 / 2R^2) = 0.999644
  area = {"crs": "EPSG:32650", "transform": [0.3, 0.0, 440000.0, 0.0, -0.3, 4420000.0],
          "imagery": "area.tif", "raster_height": 1024, "raster_width": 1024}
  transform = affine.Affine(*area["transform"])
  utm_bounds = geo_lib.pixel_bounds_to_lonlat(transform, "EPSG:32650", 0, 0, 512, 512)
  size = graph_eval.PixelSize.for_dataset(_config_for("custom"), _fake_builder(
      "default", {"custom_area": area}), utm_bounds)
  assert size.for_tile(utm_bounds, 512, 512)[0] == pytest.approx(0.3 / 0.999644, rel=1e-6)
  assert size.for_tile(NAN4, 512, 512)[0] == pytest.approx(0.3 / 0.999644, rel=1e-6)
  assert "area.tif" in size.source and "EPSG:32650" in size.source
  # ... and in Web Mercator, whose 'metres' are not the ground's: at 60 degrees N a 0.3 m
  # pixel is 0.3 cos(60) / sqrt(1 - e2 sin2) = 0.15038 m east-west and 0.3 cos(60) (1 - e2) /
  # (1 - e2 sin2)^1.5 = 0.15013 m north-south on the WGS84 ellipsoid (e2 = 0.00669438).
  (x,), (y,) = rasterio.warp.transform("EPSG:4326", "EPSG:3857", [10.0], [60.0])
  area = {"crs": "EPSG:3857", "transform": [0.3, 0.0, x, 0.0, -0.3, y], "imagery": "m.tif"}
  size = graph_eval.PixelSize.for_dataset(_config_for("custom"), _fake_builder(
      "default", {"custom_area": area}), utm_bounds)
  w = 1 - 0.00669438 * 0.75
  expected = 0.15 * math.sqrt(1 / math.sqrt(w) * (1 - 0.00669438) / w ** 1.5)
  tile = geo_lib.pixel_bounds_to_lonlat(affine.Affine(*area["transform"]), "EPSG:3857",
                                        -256, -256, 512, 512)  # centred on (10, 60)
  assert size.for_tile(tile, 512, 512)[0] == pytest.approx(expected, rel=1e-5)
  with pytest.raises(config_checks.ConfigError, match="config.eval.metres_per_pixel"):
    graph_eval.PixelSize.for_dataset(_config_for("mystery"), _fake_builder("default"), NAN4)


# -- scoring ------------------------------------------------------------------------------------


def _masks(scorer):
  return np.stack([scorer.source[i]["mask"] for i in range(2)]).astype(np.float32)


def test_a_perfect_prediction_scores_one_and_an_empty_one_zero(tiny_data):
  scorer = graph_eval.GraphScorer(_tiny_config(tiny_data), "test", 2)
  assert scorer.gt_source == graph_eval.GT_FROM_VECTORS
  scorer.has_vectors, scorer.gt_source = False, graph_eval.GT_FROM_MASKS  # gt from the masks
  scorer.add(0, _masks(scorer))
  perfect = scorer.summary()
  assert perfect["apls"] == 1.0 and perfect["topo_f1"] == 1.0 and perfect["topo_recall"] == 1.0
  assert perfect["num_graph_tiles"] == 2 and [t["index"] for t in perfect["graph_tiles"]] == [0, 1]
  assert perfect["metres_per_pixel"] == (4.0, 4.0)
  assert "gt graphs: extracted from masks" in scorer.console_line(perfect)
  scorer.tiles = []
  scorer.add(0, np.zeros((2, 64, 64, 1), np.float32))
  empty = scorer.summary()
  assert empty["apls"] == 0.0 and empty["topo_f1"] == 0.0 and empty["num_graph_tiles"] == 2
  assert all(t["prop_edges"] == 0 for t in empty["graph_tiles"])


def test_against_vector_labels_the_true_mask_scores_the_extraction_ceiling(tiny_data):
  scorer = graph_eval.GraphScorer(_tiny_config(tiny_data), "test", 2)
  # a prediction at input resolution other than the label's is resized to it
  masks = _masks(scorer)
  scorer.add(0, np.repeat(np.repeat(masks, 2, axis=1), 2, axis=2))
  result = scorer.summary()
  assert 0.0 < result["apls"] < 1.0
  assert result["apls"] == pytest.approx(result["ceiling_apls"])
  line = scorer.console_line(result)
  assert "gt graphs: from vector labels" in line and "4.000 m/px from synthetic city" in line


def test_tiles_without_ground_truth_roads_are_left_out_of_the_means_and_counted():
  params = graph_eval.graphs_lib.GraphParams()
  road = np.zeros((64, 64), np.float32)
  road[30:35, :] = 1.0
  empty_gt = graph_eval.polylines_to_graph([], 64, 64)
  line_gt = graph_eval.polylines_to_graph([[[-5.0, 32.0], [70.0, 32.0]]], 64, 64)
  no_roads = graph_eval.score_tile(road, empty_gt, 1.0, params)
  assert not no_roads["has_gt_roads"] and no_roads["apls"] is None
  assert no_roads["prop_length_m"] > 55  # the false road is still reported
  straight = graph_eval.score_tile(road, line_gt, 1.0, params)
  assert straight["apls"] > 0.9 and straight["gt_length_m"] == pytest.approx(64.0)
  missed = graph_eval.score_tile(np.zeros((64, 64), np.float32), line_gt, 1.0, params)
  assert missed["apls"] == 0.0
  summary = graph_eval.summarize([no_roads, straight, missed])
  assert summary["num_graph_tiles"] == 2 and summary["num_tiles_without_gt_roads"] == 1
  assert summary["apls"] == pytest.approx(straight["apls"] / 2)
  assert summary["prop_length_m_on_tiles_without_gt_roads"] == pytest.approx(
      no_roads["prop_length_m"])
  assert math.isnan(graph_eval.summarize([no_roads])["apls"])


# -- Table V ------------------------------------------------------------------------------------


def test_table5_has_a_test_apls_column():
  from cmmp_jax.experiments import table5
  row = {"best_step": 24, "val": {"g_iou": 0.5}, "test": {"a_iou": 0.6123, "g_iou": 0.625},
         "test_graph": {"apls": 0.4567}}
  table = table5.format_table([("cmmpnet", [row])])
  assert "test APLS" in table.splitlines()[0] and "| 45.67" in table
  other = {**row, "test_graph": {"apls": 0.4767}}
  assert "46.67 +- 1.41" in table5.format_table([("cmmpnet", [row, other])])
  unmeasured = {k: v for k, v in row.items() if k != "test_graph"}
  assert table5.format_table([("cmmpnet", [unmeasured])]).splitlines()[-1].count("| - ") == 1
