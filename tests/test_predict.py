"""Tests of cmmp_jax.predict: files in, probability / road maps out.

The forwards used here are known pointwise functions of their (scaled) inputs, so every output
pixel can be computed by hand: sliding windows and blending must give back exactly the function
applied to the whole image.
"""
import json
import os
import pathlib

import numpy as np
import pytest
import rasterio
from PIL import Image

from cmmp_jax import inference
from cmmp_jax import predict
from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import preparation as preparation_lib

UTM_11N = 'EPSG:32611'


def undo_reference(x):
  """Inverse of the 'reference' scaling x / 255 * 3.2 - 1.6, back to [0, 1]."""
  return (x + np.float32(1.6)) / np.float32(3.2)


def red_forward(image, aux):
  """probability = red / 255 (reference scaling undone)."""
  del aux
  return undo_reference(np.asarray(image)[..., :1])


def aux_forward(image, aux):
  """probability = aux channel 0 / 255."""
  del image
  return undo_reference(np.asarray(aux)[..., :1])


def mean_rgb_forward(image, aux):
  """probability = (R + G + B) / (3 * 255)."""
  del aux
  return np.mean(undo_reference(np.asarray(image)), axis=-1, keepdims=True)


def write_png(path, array):
  array = np.asarray(array, np.uint8)
  Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(path)


def read_png(path):
  with Image.open(path) as image:
    return np.array(image)


def random_uint8(rng, shape):
  return rng.integers(0, 256, size=shape, dtype=np.uint8)


SETTINGS = dict(window=16, overlap=4, batch_size=3)


# ----------------------------------------------------------------------------------------------
# Arrays.


@pytest.mark.parametrize('scaling', ['reference', 'unit'])
def test_predict_arrays_stitches_back_the_pointwise_function(scaling):
  rng = np.random.default_rng(0)
  image = random_uint8(rng, (37, 29, 3))  # not a multiple of the stride: edge windows align
  aux = random_uint8(rng, (37, 29, 2))
  if scaling == 'reference':
    forward = red_forward
  else:
    forward = lambda image, aux: np.asarray(image)[..., :1]  # unit scaling is already [0, 1]
  probabilities = predict.predict_arrays(forward, image, aux, scaling=scaling, **SETTINGS)
  assert probabilities.shape == (37, 29) and probabilities.dtype == np.float32
  np.testing.assert_allclose(probabilities, image[..., 0] / 255.0, atol=1e-6)
  np.testing.assert_array_equal(predict.probabilities_to_uint8(probabilities), image[..., 0])


def test_predict_arrays_tile_smaller_than_window_and_wrong_inputs():
  image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
  probabilities = predict.predict_arrays(red_forward, image, np.zeros((5, 7, 1), np.uint8),
                                         **SETTINGS)
  np.testing.assert_array_equal(predict.probabilities_to_uint8(probabilities), image[..., 0])
  with pytest.raises(predict.PredictInputError, match='image must be uint8'):
    predict.predict_arrays(red_forward, image.astype(np.float32), image[..., :1], **SETTINGS)
  with pytest.raises(predict.PredictInputError, match=r'image size \(5, 7\) and aux size'):
    predict.predict_arrays(red_forward, image, np.zeros((5, 6, 1), np.uint8), **SETTINGS)


def test_tta_calls_forward_eight_times_and_keeps_a_pointwise_result():
  rng = np.random.default_rng(1)
  image = random_uint8(rng, (20, 20, 3))
  aux = np.zeros((20, 20, 1), np.uint8)
  shapes = []

  def counting_forward(image_batch, aux_batch):
    shapes.append(image_batch.shape)
    return red_forward(image_batch, aux_batch)

  plain = predict.predict_arrays(red_forward, image, aux, window=16, overlap=4, batch_size=4)
  with_tta = predict.predict_arrays(counting_forward, image, aux, window=16, overlap=4,
                                    batch_size=4, tta=True)
  # 20 px, window 16, stride 12: starts [0, 4] per axis -> 4 windows = one batch of 4.
  assert shapes == [(4, 16, 16, 3)] * 8
  np.testing.assert_allclose(with_tta, plain, atol=1e-6)


def test_forward_returning_logits_is_refused():
  image = np.full((8, 8, 3), 200, np.uint8)
  logits = lambda image, aux: np.full(image.shape[:3] + (1,), 3.0, np.float32)
  with pytest.raises(inference.InferenceInputError, match=r'outside \[0, 1\].*sigmoid'):
    predict.predict_arrays(logits, image, image[..., :1], window=8, overlap=0, batch_size=1)


def test_road_mask_is_strictly_above_threshold():
  probabilities = np.array([[0.0, 0.5, 0.5000001, 1.0]], np.float32)
  np.testing.assert_array_equal(predict.road_mask_uint8(probabilities, 0.5), [[0, 0, 255, 255]])
  np.testing.assert_array_equal(predict.probabilities_to_uint8(probabilities),
                                [[0, 128, 128, 255]])


# ----------------------------------------------------------------------------------------------
# Folders: PNG inputs and aux pairing.


def test_png_outputs_are_exact_and_aux_files_are_not_inputs(tmp_path):
  rng = np.random.default_rng(2)
  inputs, outputs = tmp_path / 'in', tmp_path / 'out'
  inputs.mkdir()
  image = random_uint8(rng, (23, 31, 3))
  write_png(inputs / '0_8_sat.png', image)
  write_png(inputs / '0_8_gps.png', random_uint8(rng, (23, 31)))
  write_png(inputs / '0_8_mask.png', np.zeros((23, 31), np.uint8))
  lines = []
  summary = predict.predict_directory(red_forward, inputs, outputs, log=lines.append, **SETTINGS)

  assert [pathlib.Path(p).name for p in summary['written']] == ['0_8_sat_prob.png',
                                                                '0_8_sat_road.png']
  assert sorted(p.name for p in outputs.iterdir()) == ['0_8_sat_prob.png', '0_8_sat_road.png']
  np.testing.assert_array_equal(read_png(outputs / '0_8_sat_prob.png'), image[..., 0])
  # p = red / 255 > 0.5 exactly when red >= 128.
  np.testing.assert_array_equal(read_png(outputs / '0_8_sat_road.png'),
                                np.where(image[..., 0] >= 128, 255, 0))
  (tile,) = summary['tiles']
  assert (tile['height'], tile['width']) == (23, 31)
  assert tile['aux_source'] == f'file {inputs / "0_8_gps.png"}'
  assert tile['road_fraction'] == pytest.approx(np.mean(image[..., 0] >= 128))
  assert summary['failed'] == []
  assert len(lines) == 1 and '0_8_sat.png: 23 x 31 px' in lines[0] and ' s' in lines[0]


def test_outputs_written_beside_the_inputs_are_not_inputs_on_a_rerun(tmp_path):
  write_png(tmp_path / 'a.png', np.full((8, 8, 3), 200, np.uint8))
  for _ in range(2):
    summary = predict.predict_directory(red_forward, tmp_path, tmp_path, blank_aux=True,
                                        log=lambda line: None, **SETTINGS)
    assert [pathlib.Path(t['image']).name for t in summary['tiles']] == ['a.png']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a.png', 'a_prob.png', 'a_road.png']


def test_processes_predict_disjoint_shares_of_a_folder(tmp_path):
  for name in 'abcde':
    write_png(tmp_path / f'{name}.png', np.full((8, 8, 3), 200, np.uint8))
  shares = [[pathlib.Path(t['image']).name for t in predict.predict_directory(
      red_forward, tmp_path, tmp_path / 'out', blank_aux=True, shard_index=i, shard_count=2,
      log=lambda line: None, **SETTINGS)['tiles']] for i in range(2)]
  assert shares == [['a.png', 'c.png', 'e.png'], ['b.png', 'd.png']]
  with pytest.raises(predict.PredictInputError, match='shard_index 2 is not in'):
    predict.predict_directory(red_forward, tmp_path, tmp_path / 'out', blank_aux=True,
                              shard_index=2, shard_count=2, **SETTINGS)


def test_sat_gps_pairing_feeds_the_aux_file(tmp_path):
  rng = np.random.default_rng(3)
  inputs, outputs = tmp_path / 'image', tmp_path / 'out'
  inputs.mkdir()
  write_png(inputs / '1_2_sat.png', random_uint8(rng, (18, 18, 3)))
  gps = random_uint8(rng, (18, 18))
  write_png(inputs / '1_2_gps.png', gps)
  # Generic {stem}_aux naming, aux stored as RGB: the model's single channel is its luma.
  write_png(inputs / 'area.png', random_uint8(rng, (18, 18, 3)))
  colour_aux = random_uint8(rng, (18, 18, 3))
  write_png(inputs / 'area_aux.png', colour_aux)
  predict.predict_directory(aux_forward, inputs, outputs, **SETTINGS)

  np.testing.assert_array_equal(read_png(outputs / '1_2_sat_prob.png'), gps)
  luma = np.asarray(Image.fromarray(colour_aux).convert('L'))
  np.testing.assert_array_equal(read_png(outputs / 'area_prob.png'), luma)
  # Spot-check the luma weights 0.299, 0.587, 0.114 on one pixel.
  r, g, b = colour_aux[0, 0].astype(float)
  assert abs(int(luma[0, 0]) - (0.299 * r + 0.587 * g + 0.114 * b)) <= 1


def test_release_layout_with_separate_gps_folder_of_jpegs(tmp_path):
  rng = np.random.default_rng(4)
  images, gps_dir, outputs = tmp_path / 'image', tmp_path / 'gps', tmp_path / 'out'
  images.mkdir()
  gps_dir.mkdir()
  write_png(images / '3_4_sat.png', random_uint8(rng, (16, 16, 3)))
  Image.fromarray(np.full((16, 16), 77, np.uint8)).save(gps_dir / '3_4_gps.jpg', quality=100)
  predict.predict_directory(aux_forward, images, outputs, aux_dir=gps_dir, **SETTINGS)
  with Image.open(gps_dir / '3_4_gps.jpg') as decoded:
    expected = np.array(decoded)
  np.testing.assert_array_equal(read_png(outputs / '3_4_sat_prob.png'), expected)


def test_ambiguous_aux_files_are_an_error(tmp_path):
  write_png(tmp_path / 'x_sat.png', np.zeros((8, 8, 3), np.uint8))
  write_png(tmp_path / 'x_gps.png', np.zeros((8, 8), np.uint8))
  write_png(tmp_path / 'x_aux.png', np.zeros((8, 8), np.uint8))
  with pytest.raises(predict.PredictInputError, match=r'x_sat\.png: ambiguous.*x_gps\.png'):
    predict.predict_directory(aux_forward, tmp_path, tmp_path / 'out', **SETTINGS)


@pytest.mark.filterwarnings('ignore::rasterio.errors.NotGeoreferencedWarning')
def test_uint16_gray_tiff_uses_the_bit_depth_rule(tmp_path):
  rng = np.random.default_rng(5)
  gray = rng.integers(0, 1024, size=(17, 19, 1), dtype=np.uint16)  # a dark 11-bit raster
  with rasterio.open(tmp_path / 'pan.tif', 'w', driver='GTiff', height=17, width=19, count=1,
                     dtype='uint16') as dataset:
    dataset.write(gray[..., 0], 1)
  # No NBITS tag and no bit depth given: refused, not guessed from the largest value.
  with pytest.raises(predict.PredictInputError, match=r'pan\.tif: uint16 samples.*bit_depth'):
    predict.predict_directory(mean_rgb_forward, tmp_path, tmp_path / 'out', blank_aux=True,
                              **SETTINGS)
  summary = predict.predict_directory(
      mean_rgb_forward, tmp_path, tmp_path / 'out', blank_aux=True,
      preparation=preparation_lib.InputPreparation(bit_depth=11), **SETTINGS)
  expected = np.rint(gray[..., 0] * 255.0 / 2047.0).astype(np.uint8)
  np.testing.assert_array_equal(read_png(tmp_path / 'out' / 'pan_prob.png'), expected)
  # No CRS in the input: PNG outputs only.
  assert [pathlib.Path(p).suffix for p in summary['written']] == ['.png', '.png']
  assert summary['tiles'][0]['aux_source'].startswith('blank')


# ----------------------------------------------------------------------------------------------
# Georeferenced inputs.


def test_geotiff_in_geotiff_out_with_the_same_crs_and_transform(tmp_path):
  rng = np.random.default_rng(6)
  rgba = random_uint8(rng, (21, 26, 4))
  rgba[..., 3] = 255
  geo = geo_lib.GeoInfo.from_bounds((500000.0, 4000000.0, 500026.0, 4000042.0),
                                    21, 26, crs=UTM_11N)
  inputs = tmp_path / 'in'
  inputs.mkdir()
  geo_lib.write_geotiff(inputs / 'scene.tif', rgba, geo)
  write_png(inputs / 'scene_gps.png', np.zeros((21, 26), np.uint8))
  summary = predict.predict_directory(red_forward, inputs, tmp_path / 'out', **SETTINGS)

  names = [pathlib.Path(p).name for p in summary['written']]
  assert names == ['scene_prob.png', 'scene_road.png', 'scene_prob.tif', 'scene_road.tif']
  probabilities, prob_geo = geo_lib.read_geotiff(tmp_path / 'out' / 'scene_prob.tif')
  road, road_geo = geo_lib.read_geotiff(tmp_path / 'out' / 'scene_road.tif')
  for out_geo in (prob_geo, road_geo):
    assert out_geo.crs == rasterio.crs.CRS.from_string(UTM_11N)
    assert out_geo.transform == geo.transform
  assert probabilities.dtype == np.float32 and probabilities.shape == (21, 26, 1)
  np.testing.assert_allclose(probabilities[..., 0], rgba[..., 0] / 255.0, atol=1e-6)
  np.testing.assert_array_equal(road[..., 0], np.where(rgba[..., 0] >= 128, 255, 0))
  np.testing.assert_array_equal(road[..., 0], read_png(tmp_path / 'out' / 'scene_road.png'))


# A single GPS point in a pixel renders log(1 + 1) / log(1 + 1) = 1 there, then the 3x3 blur
# [1, 2, 1]^T [1, 2, 1] / 16 spreads it: 4/16 -> 64, 2/16 -> 32, 1/16 -> 16 (round(v * 255)).
def expected_single_point_heatmap(height, width, row, col):
  expected = np.zeros((height, width), np.uint8)
  for d_row in (-1, 0, 1):
    for d_col in (-1, 0, 1):
      expected[row + d_row, col + d_col] = {0: 64, 1: 32, 2: 16}[abs(d_row) + abs(d_col)]
  return expected


def test_gps_csv_with_bounds_sidecar_lands_on_the_expected_pixel(tmp_path):
  height, width = 12, 16
  west, south, east, north = -8.62, 41.14, -8.60, 41.15
  inputs = tmp_path / 'in'
  inputs.mkdir()
  write_png(inputs / 'porto_tile.png', np.zeros((height, width, 3), np.uint8))
  (inputs / 'porto_tile.bounds.json').write_text(json.dumps(
      {'west': west, 'south': south, 'east': east, 'north': north}))
  row, col = 3, 5
  lon = west + (col + 0.5) * (east - west) / width
  lat = north - (row + 0.5) * (north - south) / height
  csv_path = tmp_path / 'points.csv'
  csv_path.write_text(f'id,Latitude,Longitude\n1,{lat},{lon}\n2,41.5,-8.0\n')
  summary = predict.predict_directory(aux_forward, inputs, tmp_path / 'out', gps_csv=csv_path,
                                      **SETTINGS)

  np.testing.assert_array_equal(read_png(tmp_path / 'out' / 'porto_tile_prob.png'),
                                expected_single_point_heatmap(height, width, row, col))
  assert '1 of 2 points inside' in summary['tiles'][0]['aux_source']
  # The sidecar is a georeference too: EPSG:4326 GeoTIFFs spanning the bounds.
  _, out_geo = geo_lib.read_geotiff(tmp_path / 'out' / 'porto_tile_prob.tif')
  assert out_geo.crs.to_epsg() == 4326
  np.testing.assert_allclose(out_geo.bounds, (west, south, east, north), atol=1e-12)


def test_porto_csv_rendered_with_a_projected_geotiff(tmp_path):
  height, width = 14, 10
  geo = geo_lib.GeoInfo.from_bounds((532000.0, 4553000.0, 532050.0, 4553070.0), height, width,
                                    crs='EPSG:32629')
  geo_lib.write_geotiff(tmp_path / 'utm.tif', np.zeros((height, width, 3), np.uint8), geo)
  row, col = 9, 2
  (lon,), (lat,) = geo_lib.raster_pixel_to_lonlat([col + 0.5], [row + 0.5], geo)
  csv_path = tmp_path / 'taxi.csv'
  csv_path.write_text('TRIP_ID,TIMESTAMP,POLYLINE\n'
                      f'1,1400000000,"[[{lon}, {lat}], [{lon}, {lat}]]"\n'
                      '2,1400000100,"[]"\n')
  predict.predict_directory(aux_forward, tmp_path / 'utm.tif', tmp_path / 'out',
                            gps_csv=[csv_path], **SETTINGS)
  # Two points in one pixel: log(1 + 2) / log(1 + 2) = 1, the same map as a single point.
  np.testing.assert_array_equal(read_png(tmp_path / 'out' / 'utm_prob.png'),
                                expected_single_point_heatmap(height, width, row, col))
  _, out_geo = geo_lib.read_geotiff(tmp_path / 'out' / 'utm_prob.tif')
  assert out_geo.crs.to_epsg() == 32629 and out_geo.transform == geo.transform


def test_gps_without_georeference_and_bad_csv_are_errors(tmp_path):
  write_png(tmp_path / 'plain.png', np.zeros((8, 8, 3), np.uint8))
  good_csv = tmp_path / 'ok.csv'
  good_csv.write_text('lon,lat\n1.0,2.0\n')
  with pytest.raises(predict.PredictInputError, match=r'plain\.png: cannot place GPS points'):
    predict.predict_directory(aux_forward, tmp_path, tmp_path / 'out', gps_csv=good_csv,
                              **SETTINGS)
  bad_csv = tmp_path / 'bad.csv'
  bad_csv.write_text('lon,lat\n1.0,2.0\nabc,3.0\n')
  with pytest.raises(predict.PredictInputError,
                     match=r'bad\.csv: line 3: lon/lat are not numbers'):
    predict.predict_directory(aux_forward, tmp_path, tmp_path / 'out', gps_csv=bad_csv,
                              **SETTINGS)
  no_columns = tmp_path / 'cols.csv'
  no_columns.write_text('a,b\n1,2\n')
  with pytest.raises(predict.PredictInputError, match=r'cols\.csv: no longitude column'):
    predict.predict_directory(aux_forward, tmp_path, tmp_path / 'out', gps_csv=no_columns,
                              **SETTINGS)


# ----------------------------------------------------------------------------------------------
# Bad inputs.


def test_missing_aux_names_the_image_and_blank_aux_is_explicit(tmp_path):
  write_png(tmp_path / 'lonely_sat.png', np.full((8, 8, 3), 9, np.uint8))
  with pytest.raises(predict.PredictInputError,
                     match=r'lonely_sat\.png: no auxiliary raster.*lonely_sat_gps.*lonely_gps'):
    predict.predict_directory(aux_forward, tmp_path, tmp_path / 'out', **SETTINGS)
  assert not (tmp_path / 'out' / 'lonely_sat_prob.png').exists()
  lines = []
  predict.predict_directory(aux_forward, tmp_path, tmp_path / 'out', blank_aux=True,
                            log=lines.append, **SETTINGS)
  np.testing.assert_array_equal(read_png(tmp_path / 'out' / 'lonely_sat_prob.png'), 0)
  assert 'blank' in lines[0]


def test_aux_of_another_size_names_both_files(tmp_path):
  write_png(tmp_path / 't_sat.png', np.zeros((10, 10, 3), np.uint8))
  write_png(tmp_path / 't_gps.png', np.zeros((10, 9), np.uint8))
  with pytest.raises(predict.PredictInputError,
                     match=r't_gps\.png: .* 10 x 9 pixels but image .*t_sat\.png is 10 x 10'):
    predict.predict_directory(aux_forward, tmp_path, tmp_path / 'out', **SETTINGS)


def test_corrupt_image_is_named_and_earlier_outputs_survive(tmp_path):
  rng = np.random.default_rng(7)
  inputs, outputs = tmp_path / 'in', tmp_path / 'out'
  inputs.mkdir()
  outputs.mkdir()
  good = random_uint8(rng, (12, 12, 3))
  write_png(inputs / 'a.png', good)
  (inputs / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n this is not a png')
  write_png(inputs / 'c.png', good)
  stale = np.full((4, 4), 42, np.uint8)  # an output of an earlier run must stay untouched
  write_png(outputs / 'b_prob.png', stale)

  with pytest.raises(predict.PredictInputError, match=r'b\.png: cannot decode image'):
    predict.predict_directory(red_forward, inputs, outputs, blank_aux=True, **SETTINGS)
  np.testing.assert_array_equal(read_png(outputs / 'a_prob.png'), good[..., 0])
  np.testing.assert_array_equal(read_png(outputs / 'b_prob.png'), stale)
  assert not (outputs / 'c_prob.png').exists()
  assert not [p for p in outputs.iterdir() if p.name.startswith('.')]  # no temporary files

  summary = predict.predict_directory(red_forward, inputs, outputs, blank_aux=True,
                                      on_error='skip', log=lambda line: None, **SETTINGS)
  assert [pathlib.Path(t['image']).name for t in summary['tiles']] == ['a.png', 'c.png']
  (failure,) = summary['failed']
  assert failure['image'].endswith('b.png') and 'cannot decode' in failure['error']
  np.testing.assert_array_equal(read_png(outputs / 'c_prob.png'), good[..., 0])


def test_same_stem_twice_limit_and_options(tmp_path):
  write_png(tmp_path / 'a.png', np.zeros((8, 8, 3), np.uint8))
  geo_lib.write_geotiff(tmp_path / 'a.tif', np.zeros((8, 8, 3), np.uint8),
                        geo_lib.GeoInfo.from_bounds((0, 0, 1, 1), 8, 8))
  write_png(tmp_path / 'b.png', np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(predict.PredictInputError, match=r'a\.png and .*a\.tif would write'):
    predict.predict_directory(red_forward, tmp_path, tmp_path / 'out', blank_aux=True,
                              **SETTINGS)
  summary = predict.predict_directory(red_forward, tmp_path, tmp_path / 'out', blank_aux=True,
                                      limit=1, log=lambda line: None, **SETTINGS)
  assert [pathlib.Path(t['image']).name for t in summary['tiles']] == ['a.png']
  with pytest.raises(predict.PredictInputError, match='threshold'):
    predict.predict_directory(red_forward, tmp_path, tmp_path / 'out', threshold=1.5, **SETTINGS)
  with pytest.raises(predict.PredictInputError, match='no input images'):
    predict.predict_directory(red_forward, tmp_path / 'out', tmp_path / 'out2', **SETTINGS)


def test_rgb_aux_for_a_multichannel_model_and_channel_mismatch(tmp_path):
  write_png(tmp_path / 's.png', np.zeros((8, 8, 3), np.uint8))
  write_png(tmp_path / 's_gps.png', np.zeros((8, 8), np.uint8))
  with pytest.raises(predict.PredictInputError, match=r's_gps\.png: .*1 band.*aux_channels=3'):
    predict.predict_directory(aux_forward, tmp_path, tmp_path / 'out', aux_channels=3,
                              **SETTINGS)


# ----------------------------------------------------------------------------------------------
# Real data.


def test_spacenet_vegas_mosaic_is_stitched_exactly(realdata_dir, tmp_path):
  source = realdata_dir / 'spacenet_vegas' / 'RGB-PanSharpen_AOI_2_Vegas_img0.tif'
  if not source.is_file():
    pytest.skip(f'{source} is absent')
  lines = []
  summary = predict.predict_directory(mean_rgb_forward, source, tmp_path, window=512,
                                      overlap=64, batch_size=4, blank_aux=True,
                                      log=lines.append)
  with rasterio.open(source) as dataset:
    rgb = dataset.read([1, 2, 3]).transpose(1, 2, 0)
    crs, transform = dataset.crs, dataset.transform
  expected = rgb.astype(np.float64).mean(axis=-1) / 255.0

  stem = source.stem
  probabilities, out_geo = geo_lib.read_geotiff(tmp_path / f'{stem}_prob.tif')
  road, road_geo = geo_lib.read_geotiff(tmp_path / f'{stem}_road.tif')
  for geo in (out_geo, road_geo):
    assert geo.crs == crs and geo.transform == transform
  assert probabilities.shape == (1300, 1300, 1)
  np.testing.assert_allclose(probabilities[..., 0], expected, atol=1e-6)
  # (R + G + B) / 3 is never halfway between integers, so rounding is unambiguous.
  np.testing.assert_array_equal(
      read_png(tmp_path / f'{stem}_prob.png'),
      np.rint(expected * 255.0).astype(np.uint8))
  np.testing.assert_array_equal(road[..., 0], np.where(expected > 0.5, 255, 0))
  assert summary['tiles'][0]['height'] == 1300 and '1300 x 1300 px' in lines[0]


# ----------------------------------------------------------------------------------------------
# Training scale, input preparation, permissions.


def test_inputs_are_seen_at_the_training_scale_and_outputs_come_back_on_the_input_grid():
  """Tiles of 32 px trained at input_size 16: the forward gets exactly the training pipeline's
  resized, scaled inputs, and the probabilities are resized back to 32 x 32."""
  from cmmp_jax.data import pipeline
  rng = np.random.default_rng(21)
  image, aux = random_uint8(rng, (32, 32, 3)), random_uint8(rng, (32, 32, 1))
  seen = []

  def recording_forward(image_batch, aux_batch):
    seen.append((np.asarray(image_batch)[0].copy(), np.asarray(aux_batch)[0].copy()))
    return red_forward(image_batch, aux_batch)

  probabilities = predict.predict_arrays(recording_forward, image, aux, window=16, overlap=4,
                                         batch_size=1, scale=0.5)
  trained_on = pipeline._ToModelInputs((16, 16), 'reference').map(
      {'image': image, 'aux': aux, 'mask': np.zeros((32, 32, 1), np.uint8)})
  assert len(seen) == 1  # one 16 px window: the whole resized tile
  np.testing.assert_array_equal(seen[0][0], trained_on['image'])
  np.testing.assert_array_equal(seen[0][1], trained_on['aux'])
  assert probabilities.shape == (32, 32)
  # red_forward returns the resized red channel; bilinear back to 32 px (cv2, half-pixel
  # centres): output pixel (2i + 1, 2j + 1) lies between small pixels i, i + 1 (weights 3/4,
  # 1/4) and likewise for columns.
  small = undo_reference(trained_on['image'][..., 0])
  expected = (9 * small[3, 5] + 3 * small[3, 6] + 3 * small[4, 5] + small[4, 6]) / 16
  assert probabilities[7, 11] == pytest.approx(expected, abs=1e-6)
  with pytest.raises(predict.PredictInputError, match='scale'):
    predict.predict_arrays(red_forward, image, aux, window=16, overlap=4, batch_size=1, scale=0)


def test_gps_heatmap_is_normalised_per_dataset_tile_as_the_builders_do(tmp_path):
  """A 16 x 32 px GeoTIFF with the record's tile_size 16: the left tile has 3 points in one
  pixel, the right tile 1 point. Each tile is normalised by its own maximum, so both peaks are
  log(1 + c) / log(1 + c) = 1 -> centre 4/16 of 255 = 64. Normalised over the whole image (no
  record), the single point is log 2 / log 4 = 0.5 -> 32."""
  geo = geo_lib.GeoInfo.from_bounds((500000.0, 4000000.0, 500032.0, 4000016.0), 16, 32,
                                    crs=UTM_11N)
  geo_lib.write_geotiff(tmp_path / 'scene.tif', np.zeros((16, 32, 3), np.uint8), geo)
  xs = [500000.0 + 4.5] * 3 + [500000.0 + 20.5]  # columns 4 (x3) and 20, row 7
  ys = [4000016.0 - 7.5] * 4
  points = (np.array(xs), np.array(ys))
  record = preparation_lib.InputPreparation(gps_crs=UTM_11N, tile_size=16)
  tile = predict.load_tile(tmp_path / 'scene.tif', gps_points=points, preparation=record)
  assert tile.aux[7, 4, 0] == 64 and tile.aux[7, 20, 0] == 64
  whole = predict.load_tile(tmp_path / 'scene.tif', gps_points=points,
                            preparation=preparation_lib.InputPreparation(gps_crs=UTM_11N))
  assert whole.aux[7, 4, 0] == 64 and whole.aux[7, 20, 0] == 32


def test_outputs_get_the_usual_permissions(tmp_path):
  write_png(tmp_path / 'a_sat.png', np.zeros((8, 8, 3), np.uint8))
  write_png(tmp_path / 'a_gps.png', np.zeros((8, 8), np.uint8))
  umask = os.umask(0o022)
  try:
    summary = predict.predict_directory(red_forward, tmp_path, tmp_path / 'out', **SETTINGS)
  finally:
    os.umask(umask)
  for path in summary['written']:
    assert os.stat(path).st_mode & 0o777 == 0o644, path  # not mkstemp's 0600


def test_training_preparation_reads_an_override_file_or_warns_without_a_dataset(tmp_path, capsys):
  from configs import custom as custom_config
  config = custom_config.get_config()
  config.data.data_dir = str(tmp_path / 'no_data')
  prep, tile_size, origin = predict.training_preparation(config)
  assert prep == preparation_lib.InputPreparation() and tile_size is None
  assert 'WARNING: dataset custom/default is not built' in capsys.readouterr().out
  record = preparation_lib.InputPreparation(bit_depth=11, tile_size=128, gps_crs=UTM_11N)
  (tmp_path / 'metadata.json').write_text(json.dumps(
      {'input_preparation': record.to_json(), 'custom_area': {}}))
  config.predict.preparation = str(tmp_path / 'metadata.json')
  assert predict.training_preparation(config)[:2] == (record, 128)
  (tmp_path / 'metadata.json').write_text(json.dumps({'input_preparation': {'bitdepth': 11}}))
  with pytest.raises(preparation_lib.PreparationError,
                     match=r'metadata\.json: unknown input preparation field.*bitdepth'):
    predict.training_preparation(config)


def test_a_record_for_wider_imagery_refuses_an_8_bit_file(tmp_path):
  write_png(tmp_path / 'a_sat.png', np.zeros((8, 8, 3), np.uint8))
  write_png(tmp_path / 'a_gps.png', np.zeros((8, 8), np.uint8))
  with pytest.raises(predict.PredictInputError,
                     match=r'a_sat\.png: uint8 samples but bit_depth 11: the input preparation '
                           r'was made for 11-bit imagery'):
    predict.predict_directory(red_forward, tmp_path, tmp_path / 'out',
                              preparation=preparation_lib.InputPreparation(bit_depth=11),
                              **SETTINGS)
