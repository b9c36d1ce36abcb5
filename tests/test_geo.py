"""Tests for cmmp_jax.data.geo: tile bounds, pixel <-> world, reprojection, GeoTIFF I/O."""
import os

import affine
import numpy as np
import pytest

from cmmp_jax.data import geo
from cmmp_jax.data import heatmap as hm


def test_grid_tile_bounds_row_major_with_shared_edges():
  tiles = geo.grid_tile_bounds((116.0, 39.0, 116.3, 39.2), n_rows=2, n_cols=3)
  assert tiles.shape == (6, 4)
  np.testing.assert_allclose(tiles[0], [116.0, 39.1, 116.1, 39.2])  # north-west first
  np.testing.assert_allclose(tiles[5], [116.2, 39.0, 116.3, 39.1])
  assert tiles[0, 2] == tiles[1, 0] and tiles[0, 1] == tiles[3, 3]  # bit-identical edges
  assert tiles[2, 2] == 116.3 and tiles[5, 1] == 39.0
  # Shared edges: every point of the extent lands in exactly one tile.
  rng = np.random.default_rng(0)
  lon, lat = rng.uniform(116.0, 116.3, 5000), rng.uniform(39.0, 39.2, 5000)
  lon[:3] = tiles[0, 2], tiles[1, 2], 116.05  # points on inner edges
  lat[:3] = 39.15, tiles[0, 1], tiles[0, 1]
  total = sum(hm.count_points(*hm.lonlat_to_pixel(lon, lat, b, 8, 8), 8, 8)[1].n_rendered
              for b in tiles)
  assert total == lon.size
  with pytest.raises(ValueError, match="n_cols"):
    geo.grid_tile_bounds((0, 0, 1, 1), 2, 0)


def test_world_pixel_round_trip_and_window_bounds():
  transform = affine.Affine(0.5, 0.0, 1000.0, 0.0, -0.5, 2000.0)
  cols, rows = geo.world_to_pixel([1000.0, 1001.25, 1010.0], [2000.0, 1999.0, 1990.0], transform)
  np.testing.assert_allclose(cols, [0.0, 2.5, 20.0])
  np.testing.assert_allclose(rows, [0.0, 2.0, 20.0])
  x, y = geo.pixel_to_world(cols, rows, transform)
  np.testing.assert_allclose(x, [1000.0, 1001.25, 1010.0])
  np.testing.assert_allclose(y, [2000.0, 1999.0, 1990.0])
  assert geo.window_bounds(transform, 4, 2, 10, 6) == (1001.0, 1993.0, 1004.0, 1998.0)


def test_geoinfo_from_bounds_agrees_with_lonlat_to_pixel():
  bounds = (116.26, 40.02, 116.27, 40.03)
  info = geo.GeoInfo.from_bounds(bounds, 512, 256)
  lon, lat = np.array([116.2612, 116.2699]), np.array([40.0291, 40.0203])
  cols, rows = geo.lonlat_to_raster_pixel(lon, lat, info)
  expected_cols, expected_rows = hm.lonlat_to_pixel(lon, lat, bounds, 512, 256)
  np.testing.assert_allclose(cols, expected_cols, atol=1e-8)
  np.testing.assert_allclose(rows, expected_rows, atol=1e-8)


def test_reprojection_utm_to_lonlat():
  # UTM zone 29N: easting 500000 is the central meridian, 9 deg W; the equator is northing 0.
  info = geo.GeoInfo.from_bounds((499000.0, 0.0, 501000.0, 1000.0), 100, 200, crs="EPSG:32629")
  lon, lat = geo.raster_pixel_to_lonlat(np.array([100.0]), np.array([100.0]), info)
  assert lon[0] == pytest.approx(-9.0, abs=1e-9) and lat[0] == pytest.approx(0.0, abs=1e-9)
  cols, rows = geo.lonlat_to_raster_pixel(np.array([-9.0]), np.array([0.0]), info)
  assert cols[0] == pytest.approx(100.0, abs=1e-6) and rows[0] == pytest.approx(100.0, abs=1e-6)
  west, south, east, north = geo.pixel_bounds_to_lonlat(info.transform, info.crs, 0, 0, 100, 200)
  # 1 km either side of the central meridian on the equator is ~ +-0.009 deg.
  assert west == pytest.approx(-9.009, abs=2e-4) and east == pytest.approx(-8.991, abs=2e-4)
  assert south == pytest.approx(0.0, abs=1e-9) and north == pytest.approx(0.009, abs=2e-4)
  assert geo.bounds_to_lonlat((1, 2, 3, 4), "EPSG:4326") == (1.0, 2.0, 3.0, 4.0)


def test_write_read_round_trip_hwc_and_hw(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
  info = geo.GeoInfo.from_bounds((-8.7, 41.1, -8.6, 41.2), 6, 5)
  path = tmp_path / "tile.tif"
  geo.write_geotiff(path, image, info)
  read, read_info = geo.read_geotiff(path)
  np.testing.assert_array_equal(read, image)
  assert read_info.crs.to_epsg() == 4326
  np.testing.assert_allclose(read_info.bounds, info.bounds)
  assert read_info.transform.almost_equals(info.transform)
  heat = np.linspace(0, 1, 30, dtype=np.float32).reshape(6, 5)
  utm = geo.GeoInfo.from_bounds((532000.0, 4557000.0, 532050.0, 4557060.0), 6, 5,
                                crs="EPSG:32629")
  geo.write_geotiff(tmp_path / "heat.tif", heat, utm, compress=None)
  read, read_info = geo.read_geotiff(tmp_path / "heat.tif")
  assert read.shape == (6, 5, 1) and read.dtype == np.float32
  np.testing.assert_array_equal(read[..., 0], heat)
  assert read_info.crs.to_epsg() == 32629
  assert sorted(os.listdir(tmp_path)) == ["heat.tif", "tile.tif"]  # no temporary files left


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_geotiffs_get_the_umask_permissions(tmp_path, umask, mode):
  """Atomic writes go through mkstemp (0600); the result has what open() would give."""
  info = geo.GeoInfo.from_bounds((0.0, 0.0, 2.0, 2.0), 2, 2, "EPSG:32611")
  old = os.umask(umask)
  try:
    geo.write_geotiff(tmp_path / "out.tif", np.zeros((2, 2), np.uint8), info)
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "out.tif").st_mode & 0o777 == mode


def test_failed_write_keeps_existing_file(tmp_path):
  info = geo.GeoInfo.from_bounds((0.0, 0.0, 1.0, 1.0), 4, 4)
  path = tmp_path / "mask.tif"
  original = np.ones((4, 4), np.uint8)
  geo.write_geotiff(path, original, info)
  before = path.read_bytes()
  with pytest.raises(ValueError, match="do not match a 5 x 4 array"):
    geo.write_geotiff(path, np.zeros((5, 4), np.uint8), info)
  with pytest.raises(ValueError, match="dtype complex128"):
    geo.write_geotiff(path, np.zeros((4, 4), np.complex128), info)
  with pytest.raises(ValueError, match="non-empty"):
    geo.write_geotiff(path, np.zeros((4, 4, 2, 1), np.uint8), info)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["mask.tif"]
  with pytest.raises(geo.GeoTiffError, match="does not exist"):
    geo.write_geotiff(tmp_path / "missing_dir" / "x.tif", original, info)


def test_read_errors_name_the_file(tmp_path):
  missing = tmp_path / "nope.tif"
  with pytest.raises(FileNotFoundError, match="nope.tif"):
    geo.read_geotiff(missing)
  corrupt = tmp_path / "corrupt.tif"
  corrupt.write_bytes(b"II*\x00 this is not really a tiff")
  with pytest.raises(geo.GeoTiffError, match="corrupt.tif"):
    geo.read_geotiff(corrupt)
  # A valid file cut in half: the header parses but the pixel data is gone.
  info = geo.GeoInfo.from_bounds((0.0, 0.0, 1.0, 1.0), 64, 64)
  whole = tmp_path / "whole.tif"
  noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  geo.write_geotiff(whole, noise, info, compress=None)
  truncated = tmp_path / "truncated.tif"
  truncated.write_bytes(whole.read_bytes()[:4000])
  with pytest.raises(geo.GeoTiffError, match="truncated.tif"):
    geo.read_geotiff(truncated)


def test_read_real_spacenet_geotiff(realdata_dir):
  path = realdata_dir / "spacenet_vegas" / "RGB-PanSharpen_AOI_2_Vegas_img0.tif"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  image, info = geo.read_geotiff(path)
  # Documented in realdata/README.md: 1300 x 1300, 4 uint8 bands, EPSG:4326,
  # top-left (-115.1706276, 36.2406177), 2.7e-6 deg per pixel.
  assert image.shape == (1300, 1300, 4) and image.dtype == np.uint8
  assert info.crs.to_epsg() == 4326
  assert info.transform.c == pytest.approx(-115.1706276, abs=1e-7)
  assert info.transform.f == pytest.approx(36.2406177, abs=1e-7)
  assert info.transform.a == pytest.approx(2.7e-6, rel=1e-3)
  assert info.bounds[2] == pytest.approx(-115.1706276 + 1300 * 2.7e-6, abs=1e-5)
  cols, rows = geo.lonlat_to_raster_pixel([-115.1706276 + 100.5 * 2.7e-6],
                                          [36.2406177 - 7.5 * 2.7e-6], info)
  assert cols[0] == pytest.approx(100.5, abs=0.1) and rows[0] == pytest.approx(7.5, abs=0.1)


# ------------------------------------------------------------------------------------------------
# Porto CSV reader (format errors; the real files are tested in test_realdata_gps.py).

_PORTO_HEADER = "TRIP_ID,CALL_TYPE,TIMESTAMP,MISSING_DATA,POLYLINE\n"


def _write_csv(tmp_path, body, header=_PORTO_HEADER):
  path = tmp_path / "trips.csv"
  path.write_text(header + body)
  return path


def test_parse_porto_small_file_by_hand(tmp_path):
  path = _write_csv(tmp_path, '7,A,1000,False,"[[-8.6, 41.1], [-8.5, 41.2], [-8.4, 41.3]]"\n'
                              '8,B,2000,False,[]\n'
                              '9,C,3000,False,"[[-8.0, 41.0]]"\n')
  trip_ids, lon, lat, time = geo.parse_porto_polylines(path)
  np.testing.assert_array_equal(trip_ids, [7, 7, 7, 9])
  np.testing.assert_array_equal(lon, [-8.6, -8.5, -8.4, -8.0])
  np.testing.assert_array_equal(lat, [41.1, 41.2, 41.3, 41.0])
  np.testing.assert_array_equal(time, [1000, 1015, 1030, 3000])
  empty = geo.parse_porto_polylines(_write_csv(tmp_path, ""))
  assert [a.size for a in empty] == [0, 0, 0, 0]


@pytest.mark.parametrize("body, message", [
    ('7,A,1000,False,"[[-8.6, 41.1], [-8.5"\n', r"trips.csv:2: POLYLINE is not valid JSON"),
    ('7,A,1000,False,"[[-8.6, 41.1, 3.0]]"\n', r"trips.csv:2: POLYLINE points must be"),
    ('7,A,1000,False,"[[-8.6, NaN]]"\n', r"trips.csv:2: POLYLINE holds NaN"),
    ('7,A,1000,False,"[[41.1, -200.0]]"\n', r"swapped"),
    ('x7,A,1000,False,[]\n', r"trips.csv:2: TRIP_ID is not an integer"),
    ('7,A,1000,False,[]\n8,A,later,False,[]\n', r"trips.csv:3: TIMESTAMP is not an integer"),
])
def test_parse_porto_format_errors_name_file_and_line(tmp_path, body, message):
  with pytest.raises(geo.TrajectoryFormatError, match=message):
    geo.parse_porto_polylines(_write_csv(tmp_path, body))


def test_parse_porto_missing_file_or_column(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.csv"):
    geo.parse_porto_polylines(tmp_path / "absent.csv")
  path = _write_csv(tmp_path, "7,1000\n", header="TRIP_ID,TIMESTAMP\n")
  with pytest.raises(geo.TrajectoryFormatError, match=r"missing column\(s\) \['POLYLINE'\]"):
    geo.parse_porto_polylines(path)
