"""Tests of cmmp_jax.data.reading: rasters to uint8, GPS CSV tables to coordinates.

Expected values are worked out by hand in the comments, not by running the rule again.
"""
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from PIL import Image

from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import reading


def raster(pixels, path='tile.png'):
  pixels = np.asarray(pixels)
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  return reading.Raster(pixels=pixels, geo=None, path=pathlib.Path(path))


# ----------------------------------------------------------------------------------------------
# The bit-depth rule.


def test_bit_depth_is_the_setting_or_the_file_record_never_the_data():
  # b = 11, full scale 2047: 1023 * 255 / 2047 = 127.44 -> 127,
  # 1024 * 255 / 2047 = 127.56 -> 128, 1 * 255 / 2047 = 0.12 -> 0.
  values = np.array([[[0], [1], [1023], [1024], [2047]]], np.uint16)
  assert reading.samples_to_uint8(values, 'a.tif', recorded_bits=11).ravel().tolist() == [
      0, 0, 127, 128, 255]
  # The setting wins over the record: b = 9, full scale 511: 256 * 255 / 511 = 127.75 -> 128.
  values = np.array([[[0], [256]]], np.uint16)
  assert reading.samples_to_uint8(values, 'a.tif', bit_depth=9,
                                  recorded_bits=11).ravel().tolist() == [0, 128]
  # A dark 11-bit raster (largest 1023) keeps its brightness: 1023 -> 127, not 255.
  dark = np.array([[[0], [1023]]], np.uint16)
  assert reading.samples_to_uint8(dark, 'a.tif', bit_depth=11).ravel().tolist() == [0, 127]
  # Neither: refused, with the largest value and what to set.
  with pytest.raises(reading.ReadError,
                     match=r'^a\.tif: uint16 samples \(largest 1023\).*set bit_depth'):
    reading.samples_to_uint8(dark, 'a.tif')


def test_explicit_bit_depth_scales_and_clips():
  # b = 12, full scale 4095: 2048 * 255 / 4095 = 127.53 -> 128; 5000 is clipped to 255.
  values = np.array([[[2048], [4095], [5000]]], np.uint16)
  assert reading.samples_to_uint8(values, 'a.tif', bit_depth=12).ravel().tolist() == [128, 255,
                                                                                    255]
  # uint8 with b = 4, full scale 15: 7 * 255 / 15 = 119 exactly; 16 is clipped.
  values = np.array([[[7], [15], [16]]], np.uint8)
  assert reading.samples_to_uint8(values, 'a.png', bit_depth=4).ravel().tolist() == [119, 255,
                                                                                   255]
  uint8 = np.array([[[3], [250]]], np.uint8)
  assert reading.samples_to_uint8(uint8, 'a.png') is uint8
  for bad in (0, 33, True, 8.0):
    with pytest.raises(ValueError, match='bit_depth'):
      reading.samples_to_uint8(uint8, 'a.png', bit_depth=bad)


def test_floats_and_bools():
  # 0.2 * 255 = 51; 0.5 * 255 = 127.5 rounds half to even -> 128.
  floats = np.array([[[0.0], [0.2], [0.5], [1.0]]], np.float32)
  assert reading.samples_to_uint8(floats, 'a.tif').ravel().tolist() == [0, 51, 128, 255]
  bools = np.array([[[False], [True]]])
  assert reading.samples_to_uint8(bools, 'a.tif').ravel().tolist() == [0, 255]


@pytest.mark.parametrize('samples, message', [
    (np.array([[[-1], [5]]], np.int16), 'negative sample values'),
    (np.array([[[0.5], [np.nan]]], np.float32), 'NaN or infinity'),
    (np.array([[[0.5], [1.5]]], np.float32), r'must lie in \[0, 1\]'),
    (np.array([[[1 + 1j]]]), 'unsupported sample type'),
])
def test_values_that_cannot_become_uint8_name_the_file(samples, message):
  with pytest.raises(reading.ReadError, match=r'^dem\.tif: .*' + message) as caught:
    reading.samples_to_uint8(samples, 'dem.tif')
  assert caught.value.path == pathlib.Path('dem.tif')
  assert isinstance(caught.value, ValueError)


# ----------------------------------------------------------------------------------------------
# Bands.


def test_band_rule_to_rgb():
  gray_alpha = raster(np.stack([np.full((2, 2), 9), np.full((2, 2), 200)], -1).astype(np.uint8))
  assert reading.to_rgb_uint8(gray_alpha)[0, 0].tolist() == [9, 9, 9]
  rgb_nir = raster(np.array([[[1, 2, 3, 4]]], np.uint8))
  assert reading.to_rgb_uint8(rgb_nir)[0, 0].tolist() == [1, 2, 3]
  assert reading.to_rgb_uint8(rgb_nir, bands=(4, 3, 1))[0, 0].tolist() == [4, 3, 1]
  # The raster's recorded bits (b = 11) apply: 2047 -> 255, 1023 -> 127; band 2's 60000 is
  # not selected.
  wide = reading.Raster(pixels=np.array([[[2047, 60000]], [[1023, 0]]], np.uint16), geo=None,
                        path=pathlib.Path('wide.tif'), bits=11)
  assert reading.to_rgb_uint8(wide, bands=(1,))[..., 0].ravel().tolist() == [255, 127]


def test_bands_that_do_not_make_rgb_name_the_file():
  five = raster(np.zeros((2, 2, 5), np.uint8), 'wv.tif')
  with pytest.raises(reading.ReadError, match=r'wv\.tif: 5 bands.*name the RGB bands'):
    reading.to_rgb_uint8(five)
  assert reading.to_rgb_uint8(five, bands=(5, 3, 2)).shape == (2, 2, 3)
  for bands in ((6, 3, 2), (1, 2), (0,)):
    with pytest.raises(reading.ReadError, match=r'wv\.tif: bands .* requested'):
      reading.select_rgb_bands(five, bands)


def test_channels_luma_alpha_and_mismatch():
  # PIL 'L' = (19595 R + 38470 G + 7471 B + 32768) >> 16: red 255 -> 76, green 255 -> 150,
  # blue 255 -> 29 (0.299 * 255 = 76.2, 0.587 * 255 = 149.7, 0.114 * 255 = 29.1).
  rgba = raster(np.array([[[255, 0, 0, 7], [0, 255, 0, 7], [0, 0, 255, 7]]], np.uint8))
  assert reading.to_channels_uint8(rgba, 1).ravel().tolist() == [76, 150, 29]
  gray_alpha = raster(np.array([[[40, 255]]], np.uint8))
  assert reading.to_channels_uint8(gray_alpha, 1).ravel().tolist() == [40]
  assert reading.to_channels_uint8(rgba, 4).shape == (1, 3, 4)
  with pytest.raises(reading.ReadError, match=r'tile\.png: 1 band\(s\); expected 3'):
    reading.to_channels_uint8(raster(np.zeros((2, 2), np.uint8)), 3)


# ----------------------------------------------------------------------------------------------
# Files.


def test_read_raster_keeps_stored_samples(tmp_path):
  sixteen = np.array([[0, 300], [2047, 65535]], np.uint16)
  Image.fromarray(sixteen).save(tmp_path / 'deep.png')
  read = reading.read_raster(tmp_path / 'deep.png')
  assert read.pixels.shape == (2, 2, 1) and read.geo is None
  assert read.pixels[..., 0].tolist() == [[0, 300], [2047, 65535]]
  assert read.bits is None  # a 16-bit PNG does not say how many bits its sensor had

  palette = Image.fromarray(np.array([[0, 1]], np.uint8), mode='P')
  palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  palette.save(tmp_path / 'palette.png')
  pixels = reading.read_raster(tmp_path / 'palette.png').pixels
  assert pixels[..., :3].tolist() == [[[10, 20, 30], [200, 100, 50]]]

  geo = geo_lib.GeoInfo.from_bounds((10.0, 50.0, 10.3, 50.2), 2, 3)
  geo_lib.write_geotiff(tmp_path / 'geo.TIF', np.arange(18, dtype=np.uint8).reshape(2, 3, 3), geo)
  read = reading.read_raster(tmp_path / 'geo.TIF')
  assert read.pixels[1, 2].tolist() == [15, 16, 17]
  assert read.geo.crs.to_epsg() == 4326 and read.geo.transform == geo.transform
  assert read.bits == 8

  # A TIFF written with GDAL's NBITS=12 records its bit depth.
  with rasterio.open(tmp_path / 'twelve.tif', 'w', driver='GTiff', height=1, width=2, count=1,
                     dtype='uint16', nbits=12) as dataset:
    dataset.write(np.array([[4095, 2048]], np.uint16), 1)
  twelve = reading.read_raster(tmp_path / 'twelve.tif')
  assert twelve.bits == 12
  # 2048 * 255 / 4095 = 127.53 -> 128.
  assert reading.to_rgb_uint8(twelve)[0, :, 0].tolist() == [255, 128]


def test_unreadable_files_name_the_file(tmp_path):
  with pytest.raises(reading.ReadError, match=r'gone\.png: file not found'):
    reading.read_raster(tmp_path / 'gone.png')
  (tmp_path / 'a.bmp').write_bytes(b'BM')
  with pytest.raises(reading.ReadError, match=r"a\.bmp: unsupported extension '\.bmp'"):
    reading.read_raster(tmp_path / 'a.bmp')
  (tmp_path / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n not a png')
  with pytest.raises(reading.ReadError, match=r'b\.png: cannot decode image'):
    reading.read_raster(tmp_path / 'b.png')
  (tmp_path / 'c.tif').write_bytes(b'II*\x00 truncated tiff')
  with pytest.raises(reading.ReadError, match=r'c\.tif: cannot decode TIFF'):
    reading.read_raster(tmp_path / 'c.tif')


# ----------------------------------------------------------------------------------------------
# GPS tables.


def test_gps_columns_are_found_case_insensitively_and_files_concatenate(tmp_path):
  (tmp_path / 'a.csv').write_text('id, Longitude ,LAT\n1,-8.61,41.14\n2,-8.62,41.15\n')
  (tmp_path / 'b.csv').write_text('y,x,speed\n40.0,116.5,3\n')
  x, y = reading.read_gps_csv([tmp_path / 'a.csv', tmp_path / 'b.csv'])
  assert x.tolist() == [-8.61, -8.62, 116.5] and y.tolist() == [41.14, 41.15, 40.0]
  assert x.dtype == np.float64
  x, y = reading.read_gps_csv([])
  assert x.shape == y.shape == (0,)


def test_explicit_columns_and_projected_coordinates(tmp_path):
  path = tmp_path / 'utm.csv'
  path.write_text('lon,lat,Easting,Northing\n0,0,500000.5,4000000\n')
  with pytest.raises(reading.ReadError, match=r'utm\.csv: no longitude column \(tried E\b'):
    reading.read_gps_csv(path, lon_column='E', lat_column='Northing', degrees=False)
  x, y = reading.read_gps_csv(path, lon_column='easting', lat_column='NORTHING', degrees=False)
  assert x.tolist() == [500000.5] and y.tolist() == [4000000.0]
  # UTM metres read as degrees: the message names the CRS and how to declare the right one.
  with pytest.raises(reading.ReadError, match=r'utm\.csv: line 2: .*outside lon.*GPS CRS is '
                     r'EPSG:4326.*set gps_crs'):
    reading.read_gps_csv(path, lon_column='easting', lat_column='northing')


def test_gps_errors_name_the_file_and_line(tmp_path):
  path = tmp_path / 'g.csv'
  path.write_text('easting,northing\n1,2\n')
  with pytest.raises(reading.ReadError,
                     match=r"g\.csv: no longitude column \(tried lon, longitude, lng, x.*"
                           r"header is \['easting', 'northing'\]"):
    reading.read_gps_csv(path)
  path.write_text('lon,lat\n1,2\n3,nan\n')
  with pytest.raises(reading.ReadError, match=r'g\.csv: line 3: NaN/inf'):
    reading.read_gps_csv(path)
  path.write_text('lon,lat\n1,2\n3,4\nabc,5\n')
  with pytest.raises(reading.ReadError, match=r'g\.csv: line 4: lon/lat are not numbers'):
    reading.read_gps_csv(path)
  path.write_text('')
  with pytest.raises(reading.ReadError, match=r'g\.csv: GPS CSV is empty'):
    reading.read_gps_csv(path)
  with pytest.raises(reading.ReadError, match=r'none\.csv: GPS CSV not found'):
    reading.read_gps_csv(tmp_path / 'none.csv')
  with pytest.raises(ValueError, match='gps_format'):
    reading.read_gps_csv(path, gps_format='kml')


def test_porto_table_is_detected_or_refused(tmp_path):
  path = tmp_path / 'taxi.csv'
  path.write_text('TRIP_ID,TIMESTAMP,POLYLINE\n'
                  '1,100,"[[-8.6, 41.1], [-8.7, 41.2]]"\n'
                  '2,200,"[]"\n'
                  '3,300,"[[-8.5, 41.0]]"\n')
  x, y = reading.read_gps_csv(path)
  assert x.tolist() == [-8.6, -8.7, -8.5] and y.tolist() == [41.1, 41.2, 41.0]
  with pytest.raises(reading.ReadError, match=r'taxi\.csv: no longitude column'):
    reading.read_gps_csv(path, gps_format='columns')
  path.write_text('TRIP_ID,TIMESTAMP,POLYLINE\n1,100,"[[-8.6, 41.1"\n')
  with pytest.raises(reading.ReadError, match=r'taxi\.csv: bad Porto taxi table .*:2: '):
    reading.read_gps_csv(path)


def test_reading_imports_no_tensorflow():
  code = ('import sys; import cmmp_jax.data.reading; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow", "tensorflow_datasets")))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.stdout.strip() == '[]'
