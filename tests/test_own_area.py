"""A user's own area end to end: GeoTIFF + roads + GPS -> dataset -> a few training steps ->
prediction on the original raster, whose inputs must be the dataset's, bit for bit, and whose
outputs must be georeferenced like the input.

The area: a 4-band uint16 GeoTIFF (bands 3, 2, 1 make RGB, percentile stretch) in UTM 11N,
1 m pixels, 96 x 80 px cut into 64 px tiles (so the right and bottom tiles are padded), a road
grid as GeoJSON in lon/lat, and GPS points on the roads, once as UTM metres (gps_crs
EPSG:32611) and once as lon/lat. The model and its 64 px programs are tests/test_train.py's
(shared compilation cache); prediction then also runs at another scale (data.input_size 128:
the model sees every input twice as large, and the outputs come back on the input's grid).
"""
import csv
import json
import os

import numpy as np
import pytest
import rasterio.warp

from cmmp_jax import config_checks, model_grid, predict, train
from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import pipeline
from cmmp_jax.data import preparation as preparation_lib
from configs import custom as custom_config
from data_builders import build as build_lib

UTM = 'EPSG:32611'
WEST, NORTH = 600000.0, 4000000.0
HEIGHT, WIDTH, TILE = 80, 96, 64
GEO = geo_lib.GeoInfo.from_bounds((WEST, NORTH - HEIGHT, WEST + WIDTH, NORTH), HEIGHT, WIDTH, UTM)
ROAD_ROWS, ROAD_COLS = (10, 70), (15, 85)
# The tiny model and run of tests/test_train.py (shared compilation cache), on 64 px tiles.
TINY = {
    "num_train_steps": 2, "eval_every_steps": 2, "checkpoint_every_steps": 2,
    "log_every_steps": 1, "batch_size": 2, "eval_batch_size": 2, "model.width": 0.125,
    "model.depths": (1, 1, 1, 1), "optimizer.schedule": "constant", "image_summaries": 0,
    "init.imagenet": False, "data.input_size": 0, "predict.window": 64,
    "predict.overlap": 8, "eval.checkpoint": "latest",
}


def pixel_to_utm(rows, cols):
  return geo_lib.pixel_to_world(np.asarray(cols) + 0.5, np.asarray(rows) + 0.5, GEO.transform)


def utm_to_lonlat(x, y):
  lon, lat = rasterio.warp.transform(UTM, 'EPSG:4326', list(x), list(y))
  return np.asarray(lon), np.asarray(lat)


def write_area(folder):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(11)
  bands = rng.integers(200, 900, size=(HEIGHT, WIDTH, 4)).astype(np.uint16)
  for row in ROAD_ROWS:
    bands[row - 2:row + 2, :, :3] += 1000
  for col in ROAD_COLS:
    bands[:, col - 2:col + 2, :3] += 1000
  geo_lib.write_geotiff(folder / 'area.tif', bands, GEO)
  lines = []
  for row in ROAD_ROWS:  # centerlines from 10 m outside the raster to 10 m past it
    x, y = pixel_to_utm([row, row], [-10, WIDTH + 10])
    lines.append(list(zip(*utm_to_lonlat(x, y))))
  for col in ROAD_COLS:
    x, y = pixel_to_utm([-10, HEIGHT + 10], [col, col])
    lines.append(list(zip(*utm_to_lonlat(x, y))))
  (folder / 'roads.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
      {'type': 'Feature', 'properties': {},
       'geometry': {'type': 'LineString', 'coordinates': [list(p) for p in line]}}
      for line in lines]}))
  # GPS on the roads: more traffic on the first road; some points fall past the raster's edge.
  rows = np.concatenate([np.full(45, ROAD_ROWS[0]), np.full(11, ROAD_ROWS[1]),
                         np.arange(0, HEIGHT + 20, 2), np.arange(0, HEIGHT, 4)])
  cols = np.concatenate([np.arange(0, 90, 2), np.arange(0, 110, 10),
                         np.full(len(range(0, HEIGHT + 20, 2)), ROAD_COLS[0]),
                         np.full(len(range(0, HEIGHT, 4)), ROAD_COLS[1])])
  x, y = pixel_to_utm(rows, cols)
  with open(folder / 'trips_utm.csv', 'w', newline='') as handle:
    writer = csv.writer(handle)
    writer.writerow(['easting', 'northing'])
    writer.writerows(zip(x.tolist(), y.tolist()))
  lon, lat = utm_to_lonlat(x, y)
  with open(folder / 'trips_lonlat.csv', 'w', newline='') as handle:
    writer = csv.writer(handle)
    writer.writerow(['lat', 'lon'])
    writer.writerows(zip(lat.tolist(), lon.tolist()))
  spec = {'imagery': 'area.tif', 'roads': 'roads.geojson', 'gps': ['trips_utm.csv'],
          'gps_crs': UTM, 'lon_column': 'easting', 'lat_column': 'northing',
          'bands': [3, 2, 1], 'scaling': 'percentile', 'tile_size': TILE,
          'validation_fraction': 0.25, 'test_fraction': 0.25}
  (folder / 'custom.json').write_text(json.dumps(spec))
  return spec


def assemble(builder, key, channels):
  """The dataset's tiles of every split put back on the tile grid, cropped to the raster."""
  full = np.zeros((2 * TILE, 2 * TILE, channels), np.uint8)
  for split in builder.info.splits:
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
      example = source[i]
      row, col = (int(v) for v in example['tile_id'].decode().split('_')[-2:])
      full[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE] = example[key]
  return full[:HEIGHT, :WIDTH]


@pytest.mark.slow
def test_own_area_build_train_predict_on_the_original_raster(tmp_path, monkeypatch):
  area = tmp_path / 'area'
  write_area(area)
  config = custom_config.get_config()
  config.update_from_flattened_dict({
      **TINY, 'data.data_dir': str(tmp_path / 'data'), 'data.manual_dir': str(area),
      'predict.input_dir': str(area / 'area.tif'),
      'predict.gps_csv': str(area / 'trips_utm.csv'),
      'predict.output_dir': str(tmp_path / 'out')})
  config_checks.validate(config)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))  # builds the dataset first (manual_dir set)

  builder = build_lib.make_builder('custom', tmp_path / 'data', 'default')
  record = preparation_lib.from_metadata(builder.info.metadata, 'test')
  assert record.tile_size == TILE and record.bands == (3, 2, 1) and record.gps_crs == UTM
  assert record.scaling == 'percentile' and len(record.stretch_low) == 3
  counts = builder.info.metadata['custom_area']
  assert counts['padded_tiles'] == 3 and counts['tiles'] == 4 and counts['road_pixels'] > 0
  assert 0 < counts['gps_points_on_raster'] < counts['gps_points']

  captured = []
  real_predict_arrays = predict.predict_arrays

  def recording_predict_arrays(forward, image, aux, **kwargs):
    captured.append((image.copy(), aux.copy(), kwargs['scale']))
    return real_predict_arrays(forward, image, aux, **kwargs)

  monkeypatch.setattr(predict, 'predict_arrays', recording_predict_arrays)
  umask = os.umask(0o027)
  try:
    summary = predict.predict_from_checkpoint(config, str(workdir))
  finally:
    os.umask(umask)

  # The prediction's inputs are the dataset's, bit for bit (image: bands 3, 2, 1 with the
  # recorded percentile stretch; aux: GPS in UTM, heat-map normalised per 64 px tile).
  (image, aux, scale), = captured
  np.testing.assert_array_equal(image, assemble(builder, 'image', 3))
  np.testing.assert_array_equal(aux, assemble(builder, 'aux', 1))
  assert np.count_nonzero(aux) > 300 and scale == 1.0

  # Outputs on the input's grid, georeferenced like it, with the usual permissions.
  def check_outputs(written):
    probabilities, out_geo = geo_lib.read_geotiff(tmp_path / 'out' / 'area_prob.tif')
    assert probabilities.shape == (HEIGHT, WIDTH, 1)
    assert out_geo.crs == GEO.crs and out_geo.transform == GEO.transform
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    for path in map(str, written):
      if path.endswith(('_prob.tif', '_road.tif', '_prob.png', '_road.png')):
        assert os.stat(path).st_mode & 0o777 == 0o640, path
    return probabilities

  first = check_outputs(summary['written'])
  # The same checkpoint at another training scale (input_size 128 for 64 px tiles): the model
  # sees the raster resized by 2 (as training's pipeline would resize a tile), and the
  # probabilities come back on the raster's grid.
  captured.clear()
  config.unlock()
  config.data.input_size = 128
  config.predict.window = 128
  config.lock()
  umask = os.umask(0o027)
  try:
    summary = predict.predict_from_checkpoint(config, str(workdir))
  finally:
    os.umask(umask)
  (image_again, _, scale), = captured
  assert scale == 2.0
  np.testing.assert_array_equal(image_again, image)
  second = check_outputs(summary['written'])
  assert not np.array_equal(first, second)
  tile = {'image': image[:TILE, :TILE], 'aux': aux[:TILE, :TILE],
          'mask': np.zeros((TILE, TILE, 1), np.uint8)}
  trained_on = pipeline._ToModelInputs((128, 128), 'reference').map(tile)
  np.testing.assert_array_equal(
      pipeline.scale_inputs(model_grid.to_model_grid(tile['aux'], model_grid.as_ratio(2.0)),
                            'reference'),
      trained_on['aux'])


def test_gps_in_lon_lat_and_in_utm_give_the_same_dataset_and_prediction_inputs(tmp_path):
  area = tmp_path / 'area'
  spec = write_area(area)
  utm_dir = build_lib.build('custom', tmp_path / 'utm', manual_dir=area)
  spec.update(gps=['trips_lonlat.csv'], gps_crs='EPSG:4326', lon_column=None, lat_column=None)
  (area / 'custom.json').write_text(json.dumps(spec))
  build_lib.build('custom', tmp_path / 'lonlat', manual_dir=area)
  utm = build_lib.make_builder('custom', tmp_path / 'utm', 'default')
  lonlat = build_lib.make_builder('custom', tmp_path / 'lonlat', 'default')
  utm_aux = assemble(utm, 'aux', 1)
  np.testing.assert_array_equal(assemble(lonlat, 'aux', 1), utm_aux)
  assert np.count_nonzero(utm_aux) > 300

  # Prediction with the lon/lat dataset's record (its metadata.json, as
  # config.predict.preparation would name it) renders the same aux from the lon/lat table.
  record = preparation_lib.load_record(
      next((tmp_path / 'lonlat' / 'custom' / 'default').iterdir()) / 'metadata.json')
  assert record.gps_crs == 'EPSG:4326' and record.tile_size == TILE
  tile = predict.load_tile(area / 'area.tif',
                           gps_points=preparation_lib.read_gps(area / 'trips_lonlat.csv', record),
                           preparation=record)
  np.testing.assert_array_equal(tile.aux, utm_aux)
  np.testing.assert_array_equal(tile.image, assemble(utm, 'image', 3))
  assert utm_dir.name == str(utm.version)
