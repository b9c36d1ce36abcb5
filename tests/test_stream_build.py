"""The streamed custom build (data_builders.streaming, custom.StreamingArea) against the in-memory
one: the same examples bit for bit, the same recorded preparation and counts, the same errors.

Small areas written to tmp_path, with tiles, GPS chunks and strips far smaller than the data so
that every row-of-tiles, chunk and window seam is crossed.
"""
import dataclasses
import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import preparation as preparation_lib
from cmmp_jax.data import reading
from data_builders import common
from data_builders import streaming
from data_builders.custom import Custom, CustomConfig, CustomSpec

# 70 x 53 pixels (not multiples of the 16 px tiles: padded edge tiles) at 1e-5 degrees.
WEST, NORTH, STEP = 10.0, 45.0, 1e-5
HEIGHT, WIDTH = 53, 70


def lonlat(row, col):
  return WEST + col * STEP, NORTH - row * STEP


def write_area(folder, image, *, gps_rows=None, porto=False, seed=0):
  """GeoTIFF `image` (H, W, C), roads (lines, a polygon, a point, one road off the raster) and
  GPS points: a busy cluster, a uniform spread, and points just past the raster's edge."""
  folder.mkdir(parents=True, exist_ok=True)
  height, width = image.shape[:2]
  bounds = (WEST, NORTH - height * STEP, WEST + width * STEP, NORTH)
  geo_lib.write_geotiff(folder / 'area.tif', image,
                        geo_lib.GeoInfo.from_bounds(bounds, height, width, 'EPSG:4326'))
  line = lambda points: {'type': 'LineString', 'coordinates': [lonlat(r, c) for r, c in points]}
  polygon = {'type': 'Polygon', 'coordinates': [[lonlat(r, c) for r, c in
                                                 ((30.3, 40.2), (30.3, 52.7), (45.6, 52.7),
                                                  (45.6, 40.2), (30.3, 40.2))]]}
  geometries = [line([(-3, -3), (60, 80)]), line([(5.5, -2), (5.5, 30), (20, 75)]),
                line([(-1, 33.3), (60, 33.3)]), polygon,
                {'type': 'Point', 'coordinates': lonlat(48.2, 8.9)},
                line([(500, 500), (600, 600)])]
  (folder / 'roads.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
      {'type': 'Feature', 'properties': {}, 'geometry': g} for g in geometries]}))
  rng = np.random.default_rng(seed)
  rows = np.concatenate([rng.normal(20, 3, 400), rng.uniform(-2, height + 12, 600)])
  cols = np.concatenate([rng.normal(17, 4, 400), rng.uniform(-2, width + 12, 600)])
  lon, lat = lonlat(rows, cols)
  if porto:
    lines = ['TRIP_ID,TIMESTAMP,POLYLINE']
    for trip, start in enumerate(range(0, lon.size, 37)):
      points = [[float(a), float(b)] for a, b in zip(lon[start:start + 37], lat[start:start + 37])]
      lines.append(f'{trip},{1000 + trip},"{json.dumps(points)}"')
    lines.append('999,5,"[]"')
  else:
    lines = ['id,latitude,longitude'] + [f'{i},{float(b)!r},{float(a)!r}' for i, (a, b) in
                                         enumerate(zip(lon, lat))]
  (folder / 'gps.csv').write_text('\n'.join(lines) + '\n')


def build_both(tmp_path, folder, monkeypatch, **spec_fields):
  """(in-memory builder, streamed builder) of one spec; the streamed one with 97-row GPS
  chunks, and TFDS's writer spilling its examples to disk after 2 kB (the in-memory one keeps
  them all in memory)."""
  monkeypatch.setattr(streaming, 'DEFAULT_GPS_CHUNK_ROWS', 97)
  opened = []
  real_open = streaming._PythonFilesAsTf._open
  monkeypatch.setattr(streaming._PythonFilesAsTf, '_open',
                      lambda self, path, mode: opened.append(path) or real_open(self, path, mode))
  fields = dict(imagery=str(folder / 'area.tif'), roads=str(folder / 'roads.geojson'),
                gps=(str(folder / 'gps.csv'),), tile_size=16, validation_fraction=0.2,
                test_fraction=0.2, **spec_fields)
  builders = []
  for streamed in (False, True):
    monkeypatch.setattr(streaming, 'TFDS_SHUFFLE_BUFFER_BYTES', 2000 if streamed else 1 << 30)
    spec = CustomSpec(**fields, streaming=streamed)
    builder = Custom(data_dir=str(tmp_path / f'data_{streamed}'),
                     config=CustomConfig(name='area', spec=spec))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
    builders.append(builder)
    # Only the streamed build spills (to TFDS's bucket files, opened by Python, not TensorFlow).
    assert bool(opened) == streamed
  return builders


def assert_same_build(memory, streamed):
  assert set(memory.info.splits) == set(streamed.info.splits)
  compared = 0
  for split in memory.info.splits:
    a, b = memory.as_data_source(split=split), streamed.as_data_source(split=split)
    assert len(a) == len(b)
    for i in range(len(a)):  # same keys, so the same order in the files
      x, y = a[i], b[i]
      assert set(x) == set(y)
      for feature in x:
        np.testing.assert_array_equal(x[feature], y[feature], err_msg=f'{split} {feature}')
        assert np.asarray(x[feature]).dtype == np.asarray(y[feature]).dtype
      compared += 1
  assert memory.info.metadata['input_preparation'] == streamed.info.metadata['input_preparation']
  assert memory.info.metadata['custom_area'] == streamed.info.metadata['custom_area']
  return compared


def test_streamed_build_equals_in_memory_build_bit_for_bit(tmp_path, monkeypatch):
  """11-bit gray, tile rows crossing roads, a polygon, GPS chunks and padded edge tiles."""
  rng = np.random.default_rng(1)
  image = rng.integers(0, 2048, (HEIGHT, WIDTH, 1)).astype(np.uint16)
  write_area(tmp_path / 'area', image)
  tensorflow_before = 'tensorflow' in sys.modules
  memory, streamed = build_both(tmp_path, tmp_path / 'area', monkeypatch, bit_depth=11)
  if not tensorflow_before:  # TFDS's spilling writer would import it (0.7 GB)
    assert 'tensorflow' not in sys.modules
  assert assert_same_build(memory, streamed) == 20  # 4 x 5 tiles, all kept ('pad')
  counts = streamed.info.metadata['custom_area']
  assert counts['road_pixels'] > 300 and counts['gps_points'] == 1000
  assert 0 < counts['gps_points_on_raster'] < 1000 and counts['road_geometries_on_raster'] == 5
  assert counts['road_geometries_without_centreline'] == 2  # the polygon and the point
  # What was compared is not empty: roads, road lines, heat-map and image in several tiles.
  source = streamed.as_data_source(split='train')
  examples = [source[i] for i in range(len(source))]
  assert sum(ex['mask'].any() for ex in examples) >= 5
  assert sum(ex['aux'].any() for ex in examples) >= 5
  assert sum(len(json.loads(ex['road_lines'])['lines']) > 0 for ex in examples) >= 5
  # The work folder is gone.
  assert not list((tmp_path / 'data_True' / 'downloads').glob('custom-stream-*'))


def test_streamed_percentile_rgb_and_porto_gps_equal_in_memory(tmp_path, monkeypatch):
  """Percentile stretch of uint16 RGB (exact from histograms), a 4th band, Porto polylines,
  edge tiles partly dropped."""
  rng = np.random.default_rng(2)
  image = rng.gamma(2.0, 900.0, (HEIGHT, WIDTH, 4)).clip(0, 65535).astype(np.uint16)
  write_area(tmp_path / 'area', image, porto=True, seed=3)
  memory, streamed = build_both(tmp_path, tmp_path / 'area', monkeypatch, scaling='percentile',
                                percentiles=(1.5, 97.3), min_valid_fraction=0.4)
  # 6 of 16 columns (37.5%) and 5 of 16 rows on the raster: the last column and row left out.
  assert assert_same_build(memory, streamed) == 12
  record = streamed.info.metadata['input_preparation']
  assert len(record['stretch_low']) == 3
  values = image[..., :3].reshape(-1, 3).astype(np.float64)
  np.testing.assert_array_equal(record['stretch_high'], np.percentile(values, 97.3, axis=0))


def test_exact_percentile_matches_numpy():
  rng = np.random.default_rng(4)
  for n, high in ((1, 5), (2, 3), (1001, 40), (12345, 65536)):
    values = rng.integers(0, high, n)
    histogram = np.bincount(values, minlength=high)
    for q in (0.0, 2.0, 13.7, 50.0, 62.5, 98.0, 99.99, 100.0):
      assert streaming.exact_percentile(histogram, 0, q) == np.percentile(values, q), (n, q)
  signed = rng.integers(-128, 128, 999)
  histogram = np.bincount(signed + 128, minlength=256)
  assert streaming.exact_percentile(histogram, -128, 7.0) == np.percentile(signed, 7.0)


def test_float_imagery_percentile_from_a_bounded_sample(tmp_path, monkeypatch):
  """Float samples: the stretch comes from a decimated read (here 1/4 of the pixels), close to
  the whole raster's and recorded; NaN pixels are left out of it."""
  monkeypatch.setattr(streaming, 'PERCENTILE_SAMPLE_PIXELS', 1000)
  rng = np.random.default_rng(5)
  image = rng.uniform(100, 200, (64, 64, 1)).astype(np.float32)
  image[3, 3] = np.nan
  write_area(tmp_path / 'area', image)
  preparation = preparation_lib.InputPreparation(scaling='percentile', percentiles=(2, 98))
  with streaming.ImageryWindows(tmp_path / 'area' / 'area.tif', preparation) as imagery:
    low, high = imagery.preparation.stretch_low[0], imagery.preparation.stretch_high[0]
    assert 100 < low < 106 and 194 < high < 200
    window = imagery.read(10, 20, 5, 7)
  expected = np.clip((image[10:15, 20:27, 0].astype(np.float64) - low) / (high - low), 0, 1)
  np.testing.assert_array_equal(window[..., 0], np.rint(expected * 255).astype(np.uint8))


@pytest.mark.parametrize('content, error', [
    ('lon,lat\n10.0,45.0\n10.0,oops\n', r'gps\.csv: line 3: lon/lat are not numbers'),
    ('lon,lat\n10.0,45.0\n\n10.0,nan\n', r'gps\.csv: line 4: NaN/inf coordinate'),
    ('lon,lat\n10.0,45.0\n500000.0,4000000.0\n', r'gps\.csv: line 3: \(500000\.0, 4000000\.0\) '
     r'is outside lon'),
    ('easting,northing\n1,2\n', r'gps\.csv: no longitude column'),
    ('TRIP_ID,TIMESTAMP,POLYLINE\n1,2,"[[10.0, 45.0]]"\n2,3,"[[10.0"\n',
     r'gps\.csv: bad Porto taxi table \(.*gps\.csv:3: POLYLINE is not valid JSON'),
])
def test_chunked_gps_reading_raises_what_whole_reading_raises(tmp_path, content, error):
  path = tmp_path / 'gps.csv'
  path.write_text(content)
  preparation = preparation_lib.InputPreparation()
  with pytest.raises(reading.ReadError, match=error) as whole:
    preparation_lib.read_gps([path], preparation)
  with pytest.raises(reading.ReadError) as chunked:
    list(streaming.iter_gps_chunks([path], preparation, chunk_rows=1))
  assert str(chunked.value) == str(whole.value)


def test_chunked_gps_reading_gives_the_same_points(tmp_path):
  path = tmp_path / 'gps.csv'
  path.write_text('X, y ,t\n1e-3, 2.5 ,0\n-179.999999999999,89.123456789012345,1\n'
                  '0.1,0.2,2\n1_0,3,3\n')
  preparation = preparation_lib.InputPreparation()
  x, y = preparation_lib.read_gps([path, path], preparation)
  chunks = list(streaming.iter_gps_chunks([path, path], preparation, chunk_rows=3))
  assert [c[0].size for c in chunks] == [3, 1, 3, 1]
  np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), x)
  np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), y)


def test_streamed_imagery_errors_match_the_in_memory_ones(tmp_path):
  """The pass over the raster raises prepare_image's whole-raster errors, with its numbers."""
  image = np.full((40, 30, 1), 700, np.uint16)
  image[37, 29] = 3000  # the largest value, in the last strip
  write_area(tmp_path / 'a', image)
  path = tmp_path / 'a' / 'area.tif'
  preparation = preparation_lib.InputPreparation()
  with pytest.raises(reading.ReadError) as whole:
    preparation_lib.prepare_image(reading.read_raster(path), preparation)
  with pytest.raises(reading.ReadError) as streamed:
    streaming.ImageryWindows(path, preparation, strip_rows=8)
  assert str(streamed.value) == str(whole.value)
  assert 'largest 3000' in str(streamed.value)
  floats = np.full((20, 20, 3), 0.5, np.float32)
  floats[19, 0, 2] = 1.25
  write_area(tmp_path / 'b', floats)
  path = tmp_path / 'b' / 'area.tif'
  with pytest.raises(reading.ReadError) as whole:
    preparation_lib.prepare_image(reading.read_raster(path), preparation)
  with pytest.raises(reading.ReadError) as streamed:
    streaming.ImageryWindows(path, preparation, strip_rows=8)
  assert str(streamed.value) == str(whole.value) and '1.25' in str(streamed.value)
  with pytest.raises(reading.ReadError, match=r'bands \(1, 2, 5\) requested; the raster has 3'):
    streaming.ImageryWindows(path, dataclasses.replace(preparation, bands=(1, 2, 5)))


def test_streamed_build_errors_leave_nothing(tmp_path):
  write_area(tmp_path / 'area', np.zeros((HEIGHT, WIDTH, 3), np.uint8))
  (tmp_path / 'area' / 'gps.csv').write_text('lon,lat\n10.0,45.0\n10.0,oops\n')
  spec = CustomSpec(imagery=str(tmp_path / 'area' / 'area.tif'),
                    roads=str(tmp_path / 'area' / 'roads.geojson'),
                    gps=(str(tmp_path / 'area' / 'gps.csv'),), tile_size=16)
  builder = Custom(data_dir=str(tmp_path / 'data'), config=CustomConfig(name='x', spec=spec))
  with pytest.raises(common.DatasetFileError, match=r'gps\.csv: line 3'):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
  assert not list((tmp_path / 'data' / 'downloads').glob('custom-stream-*'))
  assert not (tmp_path / 'data' / 'custom' / 'x' / str(Custom.VERSION)).exists()
  with pytest.raises(common.SpecError, match='streaming must be true or false'):
    CustomSpec(imagery='a.tif', roads='r.geojson', streaming='yes').validate('spec')


def test_streamed_utm_raster_with_lonlat_roads_and_gps_equals_in_memory(tmp_path, monkeypatch):
  """Roads and GPS in lon/lat on a UTM raster: reprojected once (streamed) or per use."""
  import rasterio.warp
  folder = tmp_path / 'utm'
  folder.mkdir()
  west, north, size = 500000.0, 4000000.0, 45
  geo = geo_lib.GeoInfo.from_bounds((west, north - size, west + size, north), size, size,
                                    'EPSG:32629')
  rng = np.random.default_rng(6)
  geo_lib.write_geotiff(folder / 'area.tif', rng.integers(0, 256, (size, size, 3), np.uint8),
                        geo)

  def to_lonlat(x, y):
    lon, lat = rasterio.warp.transform('EPSG:32629', 'EPSG:4326', np.ravel(x), np.ravel(y))
    return np.array(lon), np.array(lat)

  lines = [[(west - 3, north - 7.3), (west + 50, north - 30.1)],
           [(west + 22.4, north + 4), (west + 21.7, north - 60)]]
  features = []
  for line in lines:
    lon, lat = to_lonlat(*np.array(line).T)
    features.append({'type': 'Feature', 'properties': {}, 'geometry': {
        'type': 'LineString', 'coordinates': np.stack([lon, lat], 1).tolist()}})
  (folder / 'roads.geojson').write_text(json.dumps({'type': 'FeatureCollection',
                                                    'features': features}))
  lon, lat = to_lonlat(west + rng.uniform(-5, 60, 800), north - rng.uniform(-5, 60, 800))
  (folder / 'gps.csv').write_text('lon,lat\n' + ''.join(
      f'{float(a)!r},{float(b)!r}\n' for a, b in zip(lon, lat)))
  memory, streamed = build_both(tmp_path, folder, monkeypatch, road_width_m=3.0)
  assert assert_same_build(memory, streamed) == 9
  assert streamed.info.metadata['custom_area']['road_pixels'] > 100
  # The reprojected lines, stored per tile: both roads cross the 3 x 3 tiles of 16 px.
  lines = [json.loads(streamed.as_data_source(split=split)[i]['road_lines'])['lines']
           for split in streamed.info.splits
           for i in range(len(streamed.as_data_source(split=split)))]
  assert sum(len(tile) for tile in lines) >= 6
