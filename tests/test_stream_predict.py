"""Tests of streaming prediction (cmmp_jax.stream through predict.predict_directory).

The reference is the in-memory path (predict.load_tile + predict.predict_arrays, i.e.
inference.predict_large over the whole raster): a streamed raster, cut into blocks whose borders
fall inside overlapping windows, must give the same float32 probabilities bit for bit. The
forward is a box filter over each window with zero padding (plus its GPS channel), so a pixel's
value depends on where the window sits: blending at block borders has to add the same windows,
in the same order, as the in-memory stitching.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio

from cmmp_jax import predict, stream
from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import preparation as preparation_lib

UTM = 'EPSG:32611'
HEIGHT, WIDTH = 150, 170
WEST, NORTH = 600000.0, 4000000.0
GEO = geo_lib.GeoInfo.from_bounds((WEST, NORTH - HEIGHT, WEST + WIDTH, NORTH), HEIGHT, WIDTH, UTM)
TILE = 20  # heat-map tile grid; blocks of 40 px are 2 x 2 tiles
SETTINGS = dict(window=32, overlap=10, batch_size=3, block_size=40, scaling='reference')
RECORD = preparation_lib.InputPreparation(gps_crs=UTM, tile_size=TILE)

# The forward, as source so that the two-process test runs the very same function.
FORWARD_SOURCE = '''
import numpy as np
from scipy import ndimage

def box_forward(image, aux):
  """sigmoid of the 5 x 5 box mean (zero outside the window) of mean(RGB) + 2 * aux."""
  x = np.asarray(image, np.float32).mean(axis=-1) + 2 * np.asarray(aux, np.float32)[..., 0]
  x = ndimage.uniform_filter(x, size=(1, 5, 5), mode='constant')
  return (1 / (1 + np.exp(-x)))[..., None].astype(np.float32)
'''
namespace = {}
exec(FORWARD_SOURCE, namespace)
box_forward = namespace['box_forward']


def write_scene(folder, rng_seed=3, height=HEIGHT, width=WIDTH):
  """A 3-band uint8 GeoTIFF in UTM 11N with GPS points (UTM metres) on two roads."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(rng_seed)
  geo = geo_lib.GeoInfo.from_bounds((WEST, NORTH - height, WEST + width, NORTH), height, width,
                                    UTM)
  pixels = rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8)
  pixels[60:64] = 250
  geo_lib.write_geotiff(folder / 'scene.tif', pixels, geo)
  cols = np.concatenate([rng.uniform(0, width + 15, 3000), rng.uniform(100, 104, 800)])
  rows = np.concatenate([rng.uniform(60, 64, 3000), rng.uniform(-5, height, 800)])
  x, y = geo_lib.pixel_to_world(cols, rows, geo.transform)
  return folder / 'scene.tif', (np.asarray(x), np.asarray(y))


def in_memory(image_path, gps_points, record=RECORD, forward=box_forward, batch_size=5):
  tile = predict.load_tile(image_path, gps_points=gps_points, preparation=record)
  probs = predict.predict_arrays(forward, tile.image, tile.aux, window=32, overlap=10,
                                 batch_size=batch_size, scaling='reference')
  return tile, probs


def write_csv(path, points):
  x, y = points
  lines = ['x,y'] + [f'{float(a)!r},{float(b)!r}' for a, b in zip(x, y)]
  path.write_text('\n'.join(lines) + '\n')
  return path


def read_band(path):
  with rasterio.open(path) as dataset:
    return dataset.read(1), dataset


def test_window_aux_equals_the_whole_raster_heatmap(tmp_path):
  image_path, points = write_scene(tmp_path)
  tile = predict.load_tile(image_path, gps_points=points, preparation=RECORD)
  inputs, source = predict.stream_inputs(image_path, gps_points=points, preparation=RECORD)
  assert 'GPS heat-map' in source and tile.aux.max() > 0
  for row0, row1, col0, col1 in [(0, HEIGHT, 0, WIDTH), (7, 71, 33, 130), (101, 150, 149, 170)]:
    np.testing.assert_array_equal(inputs.aux(row0, row1, col0, col1),
                                  tile.aux[row0:row1, col0:col1])
    np.testing.assert_array_equal(inputs.image(row0, row1, col0, col1),
                                  tile.image[row0:row1, col0:col1])


def test_streamed_geotiffs_equal_the_in_memory_path_bit_for_bit(tmp_path):
  image_path, points = write_scene(tmp_path / 'in')
  csv_path = write_csv(tmp_path / 'gps.csv', points)
  lines = []
  summary = predict.predict_directory(
      box_forward, image_path, tmp_path / 'out', gps_csv=csv_path, preparation=RECORD,
      stream_mode='on', log=lines.append, **SETTINGS)
  _, expected = in_memory(image_path, points)
  prob, dataset = read_band(tmp_path / 'out' / 'scene_prob.tif')
  road, _ = read_band(tmp_path / 'out' / 'scene_road.tif')
  assert prob.dtype == np.float32 and np.array_equal(prob, expected)
  np.testing.assert_array_equal(road, predict.road_mask_uint8(expected, 0.5))
  # Block borders (every 40 px) fall inside windows: the box filter makes them matter.
  assert dataset.crs == GEO.crs and dataset.transform == GEO.transform
  with rasterio.open(tmp_path / 'out' / 'scene_prob.tif') as dataset:
    assert dataset.profile['tiled'] and dataset.compression.value == 'DEFLATE'
  [tile] = summary['tiles']
  assert tile['streamed'] and tile['blocks'] == 4 * 5
  assert tile['road_fraction'] == pytest.approx(np.mean(expected > 0.5))
  assert not (tmp_path / 'out' / 'scene.stream').exists()  # blocks removed after assembly
  assert not (tmp_path / 'out' / 'scene_prob.png').exists()
  assert any('streamed (20 blocks computed, 0 resumed)' in line for line in lines)


@pytest.mark.slow
def test_a_real_jitted_model_gives_the_same_bits(tmp_path):
  """A tiny CMMPNet (width 0.125) jitted: its output for a window must not depend on the other
  windows of the batch, or streaming and in-memory batches would differ."""
  import jax
  from cmmp_jax.models import build_model
  model = build_model(dict(name='cmmpnet', width=0.125, depths=(1, 1, 1, 1)))
  image = np.zeros((1, 32, 32, 3), np.float32)
  variables = jax.jit(lambda key: model.init(key, image, image[..., :1], train=False))(
      jax.random.PRNGKey(0))
  apply = jax.jit(lambda i, a: jax.nn.sigmoid(model.apply(variables, i, a, train=False)))
  image_path, points = write_scene(tmp_path / 'in')
  predict.predict_directory(apply, image_path, tmp_path / 'out', gps_csv=write_csv(
      tmp_path / 'gps.csv', points), preparation=RECORD, stream_mode='on', log=lambda _: None,
      **SETTINGS)
  # The same batch size (one compilation), other windows in each batch.
  _, expected = in_memory(image_path, points, forward=apply, batch_size=3)
  prob, _ = read_band(tmp_path / 'out' / 'scene_prob.tif')
  np.testing.assert_array_equal(prob, expected)


class Interrupt(Exception):
  pass


def test_a_killed_run_resumes_without_redoing_finished_blocks(tmp_path):
  image_path, points = write_scene(tmp_path / 'in')
  csv_path = write_csv(tmp_path / 'gps.csv', points)
  calls = []

  def counting_forward(image, aux):
    calls.append(len(image))
    return box_forward(image, aux)

  def stop_after_7(i, j):
    if (i, j) == (1, 1):  # the 7th block in row-major order
      raise Interrupt
  run = dict(gps_csv=csv_path, preparation=RECORD, stream_mode='on', log=lambda _: None,
             model_id='step 5', **SETTINGS)
  with pytest.raises(Interrupt):
    predict.predict_directory(counting_forward, image_path, tmp_path / 'out',
                              on_block=stop_after_7, **run)
  folder = tmp_path / 'out' / 'scene.stream'
  progress = json.loads((folder / 'progress.json').read_text())
  assert len(progress['done']) == 7 and len(list(folder.glob('prob_*.npy'))) == 7
  assert not (tmp_path / 'out' / 'scene_prob.tif').exists()
  first_calls = len(calls)
  summary = predict.predict_directory(counting_forward, image_path, tmp_path / 'out', **run)
  assert summary['tiles'][0]['blocks'] == 13 and summary['tiles'][0]['resumed_blocks'] == 7
  resumed_calls = len(calls) - first_calls
  # An uninterrupted run for comparison (and its number of forward calls).
  calls.clear()
  predict.predict_directory(counting_forward, image_path, tmp_path / 'whole', **run)
  assert resumed_calls < len(calls)
  for name in ('scene_prob.tif', 'scene_road.tif'):
    np.testing.assert_array_equal(read_band(tmp_path / 'out' / name)[0],
                                  read_band(tmp_path / 'whole' / name)[0])
  # Another model's blocks are never reused: a run with another model_id starts over.
  with pytest.raises(Interrupt):
    predict.predict_directory(counting_forward, image_path, tmp_path / 'other',
                              on_block=stop_after_7, **run)
  calls.clear()
  summary = predict.predict_directory(counting_forward, image_path, tmp_path / 'other',
                                      **{**run, 'model_id': 'step 6'})
  assert summary['tiles'][0]['resumed_blocks'] == 0 and summary['tiles'][0]['blocks'] == 20


BAND_SCRIPT = FORWARD_SOURCE + '''
import sys
from cmmp_jax import predict
from cmmp_jax.data import preparation as preparation_lib
index, count, image, csv_path, out = sys.argv[1:6]
record = preparation_lib.InputPreparation(gps_crs='EPSG:32611', tile_size=20)
summary = predict.predict_directory(
    box_forward, image, out, gps_csv=csv_path, preparation=record, stream_mode='on',
    shard_index=int(index), shard_count=int(count), wait_timeout_s=120, log=lambda _: None,
    window=32, overlap=10, batch_size=3, block_size=40, scaling='reference')
print('BLOCKS', summary['tiles'][0]['blocks'], 'WRITTEN', len(summary['written']))
'''


@pytest.mark.slow
def test_two_processes_share_one_raster_in_bands(tmp_path):
  image_path, points = write_scene(tmp_path / 'in')
  csv_path = write_csv(tmp_path / 'gps.csv', points)
  script = tmp_path / 'band.py'
  script.write_text(BAND_SCRIPT)
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, 'PYTHONPATH': str(root)}
  processes = [subprocess.Popen(
      [sys.executable, str(script), str(k), '2', str(image_path), str(csv_path),
       str(tmp_path / 'out')], cwd=root, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for k in (0, 1)]
  results = [p.communicate(timeout=180) for p in processes]
  for process, (out, err) in zip(processes, results):
    assert process.returncode == 0, err[-2000:]
  # Block rows 0-1 (10 blocks) and 2-3 (10 blocks); process 0 writes the files.
  assert 'BLOCKS 10 WRITTEN 2' in results[0][0] and 'BLOCKS 10 WRITTEN 0' in results[1][0]
  _, expected = in_memory(image_path, points)
  np.testing.assert_array_equal(read_band(tmp_path / 'out' / 'scene_prob.tif')[0], expected)


def test_bands_split_block_rows_and_missing_blocks_are_named(tmp_path):
  assert [list(stream.band_block_rows(5, k, 2)) for k in (0, 1)] == [[0, 1], [2, 3, 4]]
  assert [list(stream.band_block_rows(1, k, 2)) for k in (0, 1)] == [[], [0]]
  with pytest.raises(stream.StreamError, match='band_index 2 is not in'):
    stream.band_block_rows(5, 2, 2)
  assert stream.block_side(50, 20) == 60 and stream.block_side(50, None) == 50
  grid = stream.BlockGrid(50, 70, 40)
  (tmp_path / 'x.stream').mkdir()
  with pytest.raises(stream.StreamError, match=r'4 block\(s\) not computed yet \(prob_0_0.npy'):
    stream.assemble_outputs(tmp_path / 'x.stream', grid, GEO, tmp_path / 'p.tif',
                            tmp_path / 'r.tif')
  assert not (tmp_path / 'p.tif').exists()


def test_waiting_for_other_bands_times_out_on_a_stall_not_on_a_long_band(tmp_path):
  """Blocks landing every 0.15 s are waited for past the 0.4 s limit (it bounds a stall); once
  they stop, the wait fails within the limit and names what is missing."""
  import threading  # pylint: disable=import-outside-toplevel
  grid = stream.BlockGrid(40, 60, 10)  # 4 x 6 blocks
  folder = tmp_path / 'x.stream'
  folder.mkdir()

  def land(blocks):
    for i, j in blocks:
      time.sleep(0.15)
      stream.block_path(folder, i, j).write_bytes(b'')

  every = [(i, j) for i in range(grid.rows) for j in range(grid.cols)]
  writer = threading.Thread(target=land, args=(every,))
  start = time.monotonic()
  writer.start()
  stream.wait_for_blocks(folder, grid, timeout_s=0.4, poll_s=0.02, log=lambda _: None)
  assert time.monotonic() - start > 3.0  # 24 blocks x 0.15 s: far past the limit
  writer.join()
  for i, j in every[5:]:
    stream.block_path(folder, i, j).unlink()
  start = time.monotonic()
  with pytest.raises(stream.StreamError, match=r'no new block for 0.4 s with 19 block\(s\) of '
                     r'other processes still missing'):
    stream.wait_for_blocks(folder, grid, timeout_s=0.4, poll_s=0.02, log=lambda _: None)
  assert time.monotonic() - start < 2.0


def test_cog_output_and_inputs_that_cannot_stream(tmp_path):
  image_path, points = write_scene(tmp_path / 'in')
  graph = {'enabled': True, 'block_size': 64, 'block_overlap': 16}
  summary = predict.predict_directory(box_forward, image_path, tmp_path / 'out', blank_aux=True,
                                      stream_mode='on', cog=True, graph_config=graph,
                                      log=lambda _: None, **SETTINGS)
  assert sorted(pathlib.Path(p).name for p in summary['written']) == [
      'scene_graph.geojson', 'scene_graph.graphml', 'scene_prob.tif', 'scene_road.tif']
  with rasterio.open(tmp_path / 'out' / 'scene_prob.tif') as dataset:
    assert dataset.tags(ns='IMAGE_STRUCTURE').get('LAYOUT') == 'COG'
  blank = predict.load_tile(image_path, blank_aux=True)
  expected = predict.predict_arrays(box_forward, blank.image, blank.aux, window=32, overlap=10,
                                    batch_size=4)
  np.testing.assert_array_equal(read_band(tmp_path / 'out' / 'scene_prob.tif')[0], expected)
  # GPS without the dataset's tile grid, a percentile stretch to compute, another scale.
  csv_path = write_csv(tmp_path / 'gps.csv', points)
  with pytest.raises(predict.PredictInputError, match='scene.tif: cannot stream this input: GPS '
                     r'heat-map without a tile grid'):
    predict.predict_directory(box_forward, image_path, tmp_path / 'o', gps_csv=csv_path,
                              preparation=preparation_lib.InputPreparation(gps_crs=UTM),
                              stream_mode='on', **SETTINGS)
  with pytest.raises(predict.PredictInputError, match='percentile scaling without a recorded'):
    predict.predict_directory(box_forward, image_path, tmp_path / 'o', blank_aux=True,
                              preparation=preparation_lib.InputPreparation(scaling='percentile'),
                              stream_mode='on', **SETTINGS)
  with pytest.raises(predict.PredictInputError, match=r'a side of the model grid \(15 x 17 px '
                     r'at scale 0.1\) is shorter than the window 32'):
    predict.predict_directory(box_forward, image_path, tmp_path / 'o', blank_aux=True,
                              scale=0.1, stream_mode='on', **SETTINGS)
  with pytest.raises(predict.PredictInputError, match="stream must be one of"):
    predict.predict_directory(box_forward, image_path, tmp_path / 'o', blank_aux=True,
                              stream_mode='always', **SETTINGS)
  # 'auto' keeps rasters of one block in memory (PNG outputs too).
  summary = predict.predict_directory(box_forward, image_path, tmp_path / 'auto', blank_aux=True,
                                      log=lambda _: None, **{**SETTINGS, 'block_size': 4096})
  assert 'streamed' not in summary['tiles'][0]
  assert (tmp_path / 'auto' / 'scene_prob.png').exists()


def test_streamed_graph_matches_the_whole_map_graph(tmp_path):
  """Roads crossing the seams of 64 px cores (block 96, overlap 16), a diagonal and a ring:
  the graph stitched from blocks read back from the GeoTIFF has the whole map's nodes (within a
  pixel: merged junction clusters average slightly different pixels) and edges."""
  import cv2
  from cmmp_jax import stream_graph
  from cmmp_jax.graphs import GraphParams, extract_graph
  height, width = 300, 340
  prob = np.zeros((height, width), np.float32)
  for start, end, thickness in [((0, 63), (339, 70), 5), ((60, 0), (70, 299), 5),
                                ((0, 0), (339, 299), 4), ((128, 0), (128, 299), 3),
                                ((0, 129), (339, 128), 3)]:
    cv2.line(prob, start, end, 0.9, thickness)
  cv2.circle(prob, (200, 200), 40, 0.9, 4)
  geo = geo_lib.GeoInfo.from_bounds((WEST, NORTH - height, WEST + width, NORTH), height, width,
                                    UTM)
  geo_lib.write_geotiff(tmp_path / 'map_prob.tif', prob, geo)
  params = GraphParams(block_size=96, block_overlap=16)
  whole = extract_graph(prob, params)
  paths, streamed = stream_graph.write_streamed_graph(
      tmp_path, 'map', tmp_path / 'map_prob.tif', geo=geo,
      config={'block_size': 96, 'block_overlap': 16, 'enabled': True})
  assert [p.name for p in paths] == ['map_graph.geojson', 'map_graph.graphml']
  assert (whole.number_of_nodes(), whole.number_of_edges()) == (23, 26)
  assert (streamed.number_of_nodes(), streamed.number_of_edges()) == (23, 26)
  position = lambda g: np.array([(d['x'], d['y']) for _, d in g.nodes(data=True)])
  distances = np.hypot(*(position(whole)[:, None] - position(streamed)[None]).T)
  assert distances.min(axis=0).max() < 1.0 and distances.min(axis=1).max() < 1.0
  degrees = lambda g: sorted(d for _, d in g.degree())
  assert degrees(whole) == degrees(streamed)
  total = lambda g: sum(d['length'] for *_, d in g.edges(data=True))
  assert total(streamed) == pytest.approx(total(whole), rel=0.005)
  features = json.loads(paths[0].read_text())['features']
  assert len(features) == 26


def test_an_aux_raster_file_is_read_by_windows(tmp_path):
  image_path, _ = write_scene(tmp_path)
  aux = np.random.default_rng(5).integers(0, 256, size=(HEIGHT, WIDTH)).astype(np.uint8)
  geo_lib.write_geotiff(tmp_path / 'scene_gps.tif', aux, GEO)
  summary = predict.predict_directory(box_forward, image_path, tmp_path / 'out',
                                      stream_mode='on', log=lambda _: None, **SETTINGS)
  assert summary['tiles'][0]['aux_source'] == f'file {tmp_path / "scene_gps.tif"}'
  tile = predict.load_tile(image_path)
  expected = predict.predict_arrays(box_forward, tile.image, tile.aux, window=32, overlap=10,
                                    batch_size=4)
  np.testing.assert_array_equal(read_band(tmp_path / 'out' / 'scene_prob.tif')[0], expected)
  geo_lib.write_geotiff(tmp_path / 'scene_gps.tif', aux[:100], geo_lib.GeoInfo.from_bounds(
      (WEST, NORTH - 100, WEST + WIDTH, NORTH), 100, WIDTH, UTM))
  with pytest.raises(predict.PredictInputError,
                     match=r'scene_gps\.tif: auxiliary raster is 100 x 170 pixels but image'):
    predict.predict_directory(box_forward, image_path, tmp_path / 'out2', stream_mode='on',
                              **SETTINGS)
  # A PNG cannot be streamed (GeoTIFF outputs need a CRS).
  from PIL import Image
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / 'tile.png')
  with pytest.raises(predict.PredictInputError, match=r'tile\.png: cannot stream this input: '
                     'not a TIFF'):
    predict.predict_directory(box_forward, tmp_path / 'tile.png', tmp_path / 'out3',
                              blank_aux=True, stream_mode='on', **SETTINGS)


# ----------------------------------------------------------------------------------------------
# A model trained at a scale s != 1 (data.input_size != the dataset's tile size).

# Odd raster sizes (neither H * s nor the block a whole number), small blocks: the model-grid
# blocks (block_size * s px), the windows (16 px, overlap 5) and the raster-grid blocks of the
# back-resize all cross seams. (scale, heat-map tile, height, width): 0.6 * 16 is not a whole
# number of model pixels, so model-grid blocks do not follow the heat-map tiles there.
SCALED = [(0.5, 20, 151, 173), (0.75, 32, 149, 171), (0.6, 16, 150, 167)]
SCALED_SETTINGS = dict(window=16, overlap=5, batch_size=3, block_size=32, scaling='reference')


def scaled_in_memory(image_path, points, record, scale):
  tile = predict.load_tile(image_path, gps_points=points, preparation=record)
  return predict.predict_arrays(box_forward, tile.image, tile.aux, window=16, overlap=5,
                                batch_size=4, scaling='reference', scale=scale)


@pytest.mark.parametrize('scale, tile, height, width', SCALED)
def test_a_model_trained_at_another_scale_streams_the_in_memory_bits(tmp_path, scale, tile,
                                                                     height, width):
  image_path, points = write_scene(tmp_path / 'in', height=height, width=width)
  record = preparation_lib.InputPreparation(gps_crs=UTM, tile_size=tile)
  lines = []
  summary = predict.predict_directory(
      box_forward, image_path, tmp_path / 'out', gps_csv=write_csv(tmp_path / 'gps.csv', points),
      preparation=record, scale=scale, stream_mode='on', threshold=0.3, log=lines.append,
      **SCALED_SETTINGS)
  expected = scaled_in_memory(image_path, points, record, scale)
  assert expected.shape == (height, width) and 0 < np.mean(expected > 0.3) < 0.2
  prob, dataset = read_band(tmp_path / 'out' / 'scene_prob.tif')
  assert prob.dtype == np.float32 and np.array_equal(prob, expected)
  np.testing.assert_array_equal(read_band(tmp_path / 'out' / 'scene_road.tif')[0],
                                predict.road_mask_uint8(expected, 0.3))
  assert (dataset.height, dataset.width) == (height, width)
  [result] = summary['tiles']
  model_height, model_width = predict.scaled_size(height, width, scale)
  model_block = round(32 * scale)
  if (tile * scale).is_integer():
    model_block = -(-model_block // int(tile * scale)) * int(tile * scale)
  assert result['streamed'] and result['blocks'] == (
      -(-model_height // model_block) * -(-model_width // model_block)) >= 12
  assert any(f'model grid {model_height} x {model_width} px' in line for line in lines)


def test_a_one_tile_raster_at_scale_two_thirds_gives_the_model_its_training_inputs():
  """In memory, a raster of one dataset tile (24 px, trained at 16) reaches the forward as the
  training pipeline resized it (cv2), although the resize is model_grid's own."""
  from cmmp_jax.data import pipeline
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, size=(24, 24, 3)).astype(np.uint8)
  aux = rng.integers(0, 256, size=(24, 24, 1)).astype(np.uint8)
  seen = []

  def recording_forward(image_batch, aux_batch):
    seen.append((np.asarray(image_batch)[0].copy(), np.asarray(aux_batch)[0].copy()))
    return box_forward(image_batch, aux_batch)

  predict.predict_arrays(recording_forward, image, aux, window=16, overlap=4, batch_size=1,
                         scale=16 / 24)
  trained_on = pipeline._ToModelInputs((16, 16), 'reference').map(
      {'image': image, 'aux': aux, 'mask': np.zeros((24, 24, 1), np.uint8)})
  [(seen_image, seen_aux)] = seen
  np.testing.assert_array_equal(seen_image, trained_on['image'])
  np.testing.assert_array_equal(seen_aux, trained_on['aux'])


def test_a_killed_run_at_another_scale_resumes_to_the_same_bits(tmp_path):
  scale, tile, height, width = SCALED[1]
  image_path, points = write_scene(tmp_path / 'in', height=height, width=width)
  record = preparation_lib.InputPreparation(gps_crs=UTM, tile_size=tile)
  calls = []

  def counting_forward(image, aux):
    calls.append(len(image))
    return box_forward(image, aux)

  def stop_at_1_1(i, j):
    if (i, j) == (1, 1):  # the 8th of 5 x 6 model-grid blocks of 24 px
      raise Interrupt
  run = dict(gps_csv=write_csv(tmp_path / 'gps.csv', points), preparation=record, scale=scale,
             stream_mode='on', log=lambda _: None, model_id='step 5', **SCALED_SETTINGS)
  with pytest.raises(Interrupt):
    predict.predict_directory(counting_forward, image_path, tmp_path / 'out',
                              on_block=stop_at_1_1, **run)
  folder = tmp_path / 'out' / 'scene.stream'
  progress = json.loads((folder / 'progress.json').read_text())
  assert len(progress['done']) == 8 and progress['signature']['scale'] == '3/4'
  assert not (tmp_path / 'out' / 'scene_prob.tif').exists()
  first_calls = len(calls)
  summary = predict.predict_directory(counting_forward, image_path, tmp_path / 'out', **run)
  assert summary['tiles'][0]['blocks'] == 22 and summary['tiles'][0]['resumed_blocks'] == 8
  resumed_calls = len(calls) - first_calls
  calls.clear()
  predict.predict_directory(counting_forward, image_path, tmp_path / 'whole', **run)
  assert resumed_calls < len(calls)
  expected = scaled_in_memory(image_path, points, record, scale)
  for folder in ('out', 'whole'):
    np.testing.assert_array_equal(read_band(tmp_path / folder / 'scene_prob.tif')[0], expected)
  # Blocks of another scale are never reused: the same folder at scale 0.5 starts over.
  with pytest.raises(Interrupt):
    predict.predict_directory(counting_forward, image_path, tmp_path / 'other',
                              on_block=stop_at_1_1, **run)
  summary = predict.predict_directory(counting_forward, image_path, tmp_path / 'other',
                                      **{**run, 'scale': 0.5})
  assert summary['tiles'][0]['resumed_blocks'] == 0
  np.testing.assert_array_equal(read_band(tmp_path / 'other' / 'scene_prob.tif')[0],
                                scaled_in_memory(image_path, points, record, 0.5))


def test_bands_at_another_scale_assemble_the_in_memory_bits(tmp_path):
  """Two bands of model-grid block rows run one after the other (as two processes would); band 0
  waits for band 1's blocks, then resizes back across the band border."""
  scale, tile, height, width = SCALED[2]
  image_path, points = write_scene(tmp_path / 'in', height=height, width=width)
  record = preparation_lib.InputPreparation(gps_crs=UTM, tile_size=tile)
  inputs, source = predict.stream_inputs(image_path, gps_points=points, preparation=record)
  run = dict(window=16, overlap=5, batch_size=3, block_size=32, scale=scale, band_count=2,
             aux_source=source, wait_timeout_s=5, log=lambda _: None)
  second = predict.predict_streamed(box_forward, inputs, tmp_path / 'out', 'scene', band_index=1,
                                    **run)
  assert second['written'] == [] and second['blocks'] == 3 * 6  # block rows 2-4 of 5
  first = predict.predict_streamed(box_forward, inputs, tmp_path / 'out', 'scene', band_index=0,
                                   **run)
  assert first['blocks'] == 2 * 6 and len(first['written']) == 2
  np.testing.assert_array_equal(read_band(tmp_path / 'out' / 'scene_prob.tif')[0],
                                scaled_in_memory(image_path, points, record, scale))
