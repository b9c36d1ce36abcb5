"""Real GPS data read in place from ../shared/realdata (skipped when absent):
Porto taxi trips (Kaggle format) and the nine BJRoad rows printed in public notebooks."""
import csv
import decimal
import json
import re

import numpy as np
import pytest

from cmmp_jax.data import geo
from cmmp_jax.data import heatmap as hm

PORTO_150 = "porto_taxi/porto_taxi_2014-05-06_150trips.csv"
PORTO_20 = "porto_taxi/porto_taxi_20trips.csv"


def _csv_rows(path):
  with open(path, newline="") as handle:
    return list(csv.DictReader(handle))


@pytest.mark.parametrize("name, n_trips, n_points", [(PORTO_150, 150, 8733), (PORTO_20, 20, 606)])
def test_parse_porto_counts_extent_and_times(realdata_dir, name, n_trips, n_points):
  trip_ids, lon, lat, time = geo.parse_porto_polylines(realdata_dir / name)
  assert trip_ids.dtype == np.int64 and time.dtype == np.int64
  assert lon.dtype == np.float64 and lon.shape == lat.shape == time.shape == (n_points,)
  rows = _csv_rows(realdata_dir / name)
  assert len(rows) == n_trips
  # Trip by trip: ids repeated per point, the first point at TIMESTAMP, one point per 15 s.
  start = 0
  for row in rows:
    polyline = json.loads(row["POLYLINE"])
    stop = start + len(polyline)
    assert np.all(trip_ids[start:stop] == int(row["TRIP_ID"]))
    assert time[start] == int(row["TIMESTAMP"])
    np.testing.assert_array_equal(np.diff(time[start:stop]), 15)
    if "TIMESTAMP_END" in row:
      assert time[stop - 1] == int(row["TIMESTAMP_END"])
    assert lon[start] == polyline[0][0] and lat[stop - 1] == polyline[-1][1]
    start = stop
  assert start == n_points
  if name == PORTO_150:  # extent stated in realdata/README.md
    assert (lon.min(), lon.max()) == (-8.656974, -8.563041)
    assert round(lat.min(), 3) == 41.114 and round(lat.max(), 3) == 41.176


def test_porto_points_land_on_independently_computed_pixels(realdata_dir):
  # Tile (-8.66, 41.11) .. (-8.56, 41.18) at 1e-4 degrees per pixel: 1000 x 700 pixels.
  bounds = (-8.66, 41.11, -8.56, 41.18)
  height, width = 700, 1000
  _, lon, lat, _ = geo.parse_porto_polylines(realdata_dir / PORTO_150)
  # Expected pixels from the CSV's decimal text with exact decimal arithmetic.
  texts = [point for row in _csv_rows(realdata_dir / PORTO_150)
           for point in re.findall(r"\[(-?[\d.]+), (-?[\d.]+)\]", row["POLYLINE"])]
  assert len(texts) == lon.size
  step = decimal.Decimal("0.0001")
  exact_cols = [(decimal.Decimal(x) - decimal.Decimal("-8.66")) / step for x, _ in texts]
  exact_rows = [(decimal.Decimal("41.18") - decimal.Decimal(y)) / step for _, y in texts]
  # Points within 1e-3 px of a pixel edge could go either way in floating point; leave them out.
  clear = np.array([min(c % 1, 1 - c % 1) > decimal.Decimal("0.001")
                    and min(r % 1, 1 - r % 1) > decimal.Decimal("0.001")
                    for c, r in zip(exact_cols, exact_rows)])
  assert clear.sum() > 8000
  expected = np.zeros((height, width), np.int64)
  for c, r, keep in zip(exact_cols, exact_rows, clear):
    if keep:
      expected[int(r), int(c)] += 1  # all points are inside, so int() is floor
  cols, rows = hm.lonlat_to_pixel(lon[clear], lat[clear], bounds, height, width)
  counts, stats = hm.count_points(cols, rows, height, width)
  assert stats.n_rendered == clear.sum() and stats.n_outside == 0
  np.testing.assert_array_equal(counts, expected)
  # Spot check by hand: the second point (-8.613243, 41.166666) -> col 467.57, row 133.34.
  assert texts[1] == ("-8.613243", "41.166666")
  assert clear[1] and int(exact_cols[1]) == 467 and int(exact_rows[1]) == 133
  assert counts[133, 467] >= 1
  heatmap = hm.render_heatmap(cols, rows, height, width)
  assert np.all(heatmap[expected > 0] > 0)
  assert heatmap[expected.max(axis=None) == expected].max() > 0.2


def test_porto_lonlat_to_utm_raster_pixels_match_polyline_utm(realdata_dir):
  trip_ids, lon, lat, _ = geo.parse_porto_polylines(realdata_dir / PORTO_150)
  utm = np.array([point for row in _csv_rows(realdata_dir / PORTO_150)
                  for point in json.loads(row["POLYLINE_UTM"])])
  assert utm.shape == (lon.size, 2)
  # A UTM 29N raster at 10 m per pixel covering the city.
  info = geo.GeoInfo.from_bounds((520000.0, 4540000.0, 540000.0, 4570000.0), 3000, 2000,
                                 crs="EPSG:32629")
  cols, rows = geo.lonlat_to_raster_pixel(lon, lat, info)
  np.testing.assert_allclose(cols, (utm[:, 0] - 520000.0) / 10.0, atol=0.05)  # 0.5 m
  np.testing.assert_allclose(rows, (4570000.0 - utm[:, 1]) / 10.0, atol=0.05)


def _bjroad_rows(realdata_dir):
  text = (realdata_dir / "bjroad_format" / "NOTES.md").read_text()
  pattern = (r"^\s+(\d+):\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+\|\s+"
             r"([\d.]+)\s+([\d.]+)\s*$")
  rows = re.findall(pattern, text, flags=re.M)
  fit = re.search(r"lon = ([\d.]+) \+ ([\d.e-]+) \* col,\s+lat = ([\d.]+) - ([\d.e-]+) \* row",
                  text)
  return rows, fit


def test_bjroad_rows_project_onto_recorded_pixels(realdata_dir):
  """Each of the nine rows is projected with a tile placed WITHOUT it: pixel steps from the
  web-mercator zoom-18 grid the tiles come from (360 / 2^26 degrees of longitude per pixel, the
  latitude step from the mercator scale at the tile's latitude), and the tile's north-west
  corner from the other eight rows (leave one out). NOTES.md's fit, made from all nine, must
  agree with that grid."""
  rows, fit = _bjroad_rows(realdata_dir)
  assert len(rows) == 9 and fit is not None
  recorded_row = np.array([int(r[3]) for r in rows])
  recorded_col = np.array([int(r[4]) for r in rows])
  lon = np.array([float(r[8]) for r in rows])
  lat = np.array([float(r[9]) for r in rows])
  lon_step = 360.0 / 2 ** 26  # 256-px tiles at zoom 18
  lat_step = lon_step * np.cos(np.radians(lat.mean()))  # mercator: dlat = dlon * cos(lat)
  _, fit_lon_step, _, fit_lat_step = (float(v) for v in fit.groups())
  assert fit_lon_step == pytest.approx(lon_step, rel=1e-3)
  assert fit_lat_step == pytest.approx(lat_step, rel=2e-3)
  cols = np.empty(9)
  rows_px = np.empty(9)
  for held_out in range(9):
    others = np.arange(9) != held_out
    west = np.median(lon[others] - lon_step * (recorded_col[others] + 0.5))
    north = np.median(lat[others] + lat_step * (recorded_row[others] + 0.5))
    bounds = (west, north - 1024 * lat_step, west + 1024 * lon_step, north)
    c, r = hm.lonlat_to_pixel(lon[held_out:held_out + 1], lat[held_out:held_out + 1], bounds,
                              1024, 1024)
    cols[held_out], rows_px[held_out] = c[0], r[0]
  # NOTES.md: lon/lat are rounded to 5 decimals (about 2 px), the recorded pixel is the pixel
  # that holds the point (its centre is 0.5 px away at most).
  assert np.all(np.abs(rows_px - (recorded_row + 0.5)) <= 3.0), rows_px - recorded_row
  assert np.all(np.abs(cols - (recorded_col + 0.5)) <= 3.0), cols - recorded_col
  counts, stats = hm.count_points(cols, rows_px, 1024, 1024)
  assert stats.n_rendered == 9
  hit_rows, hit_cols = np.nonzero(counts)
  for row, col in zip(recorded_row, recorded_col):
    distance = np.maximum(np.abs(hit_rows - row), np.abs(hit_cols - col))
    assert distance.min() <= 2
  # The patch files store the pixel (row, col) themselves: rendering them directly puts each
  # sample exactly on its recorded pixel.
  direct, _ = hm.count_points(recorded_col.astype(float), recorded_row.astype(float), 1024, 1024)
  assert direct.sum() == 9 and np.all(direct[recorded_row, recorded_col] >= 1)
