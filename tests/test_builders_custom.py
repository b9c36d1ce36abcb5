"""Tests of data_builders.custom: GeoTIFF + GeoJSON centerlines + GPS CSV -> tiles.

Synthetic areas are written to tmp_path; the real-data tests read the SpaceNet Vegas tile and
the Porto taxi trips in place from ../shared/realdata.
"""
import csv
import json
import pathlib

import numpy as np
import pytest
import rasterio
import rasterio.crs
import tensorflow_datasets as tfds

from cmmp_jax.data import geo as geo_lib
from cmmp_jax.data import heatmap as heatmap_lib
from data_builders import common
from data_builders.custom import Custom, CustomConfig, CustomSpec
from data_builders.custom import custom as custom_lib

# A 40x40 raster at the equator, 1e-5 degrees per pixel: 1.1132 m east-west, 1.1057 m
# north-south (WGS84 metres per degree at latitude 0: 111319.46 and 110574.31).
WEST, NORTH, STEP, SIZE = 10.0, 0.0002, 1e-5, 40
BOUNDS = (WEST, NORTH - SIZE * STEP, WEST + SIZE * STEP, NORTH)


def pixel_centre(row, col):
  return WEST + (col + 0.5) * STEP, NORTH - (row + 0.5) * STEP


def make_area(manual: pathlib.Path, *, spec_overrides=None, spec_name='custom.json'):
  """11-bit gray GeoTIFF, one E-W road through row 10, one N-S road through column 30,
  GPS points as lon/lat columns; returns the spec dict written."""
  manual.mkdir(parents=True, exist_ok=True)
  image = np.full((SIZE, SIZE, 1), 1023, np.uint16)
  image[0, 0, 0] = 2047
  image[5, 5, 0] = 0
  geo_lib.write_geotiff(manual / 'area.tif', image,
                        geo_lib.GeoInfo.from_bounds(BOUNDS, SIZE, SIZE, 'EPSG:4326'))
  lon_a, lat_10 = pixel_centre(10, -5)
  lon_b, _ = pixel_centre(10, SIZE + 5)
  lon_30, lat_top = pixel_centre(-5, 30)
  _, lat_bottom = pixel_centre(SIZE + 5, 30)
  roads = {'type': 'FeatureCollection', 'features': [
      {'type': 'Feature', 'properties': {}, 'geometry': {
          'type': 'LineString', 'coordinates': [[lon_a, lat_10], [lon_b, lat_10]]}},
      {'type': 'Feature', 'properties': {}, 'geometry': {
          'type': 'MultiLineString', 'coordinates': [[[lon_30, lat_top], [lon_30, lat_bottom]]]}},
  ]}
  (manual / 'roads.geojson').write_text(json.dumps(roads))
  rows = ['longitude,latitude,time']
  for row, col, count in ((3, 4, 3), (20, 20, 1), (39, 39, 1), (50, 3, 1)):  # (50, 3) is off
    lon, lat = pixel_centre(row, col)
    rows += [f'{lon!r},{lat!r},{1000 + i}' for i in range(count)]
  (manual / 'gps.csv').write_text('\n'.join(rows) + '\n')
  spec = {'imagery': 'area.tif', 'roads': 'roads.geojson', 'gps': 'gps.csv', 'tile_size': 16,
          'bit_depth': 11}
  spec.update(spec_overrides or {})
  if spec_name.endswith('.json'):
    (manual / spec_name).write_text(json.dumps(spec))
  else:
    (manual / spec_name).write_text(
        ''.join(f'{k}: {json.dumps(v)}\n' for k, v in spec.items()))
  return spec


def build(tmp_path, config='default', manual='manual'):
  builder = Custom(data_dir=str(tmp_path / 'data'), config=config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / manual)))
  return builder


def read_all(builder):
  examples = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
      examples[source[i]['tile_id'].decode()] = (split, source[i])
  return examples


def assemble(examples, key, channels, tile=16, tiles=3):
  """Stitches the 3x3 tiles of a 40x40 area back into one (48, 48, C) array."""
  full = np.zeros((tile * tiles, tile * tiles, channels), np.uint8)
  for tile_id, (_, ex) in examples.items():
    r, c = (int(v) for v in tile_id.split('_')[-2:])
    full[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = ex[key]
  return full


def test_synthetic_area_hand_computed_mask_image_heatmap_bounds(tmp_path):
  make_area(tmp_path / 'manual')
  builder = build(tmp_path)
  assert builder.info.file_format.value == 'array_record'
  examples = read_all(builder)
  assert sorted(examples) == [f'area_{r}_{c}' for r in range(3) for c in range(3)]
  assert sorted(split for split, _ in examples.values()).count('validation') == 1
  assert sorted(split for split, _ in examples.values()).count('test') == 1
  image = assemble(examples, 'image', 3)
  # 11-bit data: x -> round(x * 255 / 2047); gray is replicated to RGB; padding is 0.
  assert image[1, 1].tolist() == [127, 127, 127]       # 1023 * 255 / 2047 = 127.44
  assert image[0, 0].tolist() == [255, 255, 255] and image[5, 5].tolist() == [0, 0, 0]
  assert image[SIZE:].max() == 0 and image[:, SIZE:].max() == 0
  mask = assemble(examples, 'mask', 1)[..., 0]
  # 4 m roads: pixel centres within 2 m of the line. North-south steps are 1.1057 m, so
  # rows 9-11 (0 and 1.1 m away) are road and rows 8/12 (2.2 m) are not; east-west steps are
  # 1.1132 m, so columns 29-31.
  expected = np.zeros((48, 48), np.uint8)
  expected[9:12, :SIZE] = 1
  expected[:SIZE, 29:32] = 1
  np.testing.assert_array_equal(mask, expected)
  aux = assemble(examples, 'aux', 1)[..., 0]
  assert aux[3, 4] == 64 and aux[3, 5] == 32 and aux[2, 3] == 16  # 4/16, 2/16, 1/16 of 255
  assert aux[20, 20] == 64 and aux[39, 39] == 64
  # Three 3x3 blurs; the point at row 50 is off the grid; the blur of (39, 39) reaching row and
  # column 40 lies in the padding, which is zero in aux as in image and mask.
  assert np.count_nonzero(aux) == 2 * 9 + 4 and aux[SIZE:].max() == 0 and aux[:, SIZE:].max() == 0
  # float64 bounds: the tile edges to 1e-12 degrees (float32 would be 1e-6 off at lon 10).
  _, corner = examples['area_0_0']
  assert corner['bounds'].dtype == np.float64
  np.testing.assert_allclose(corner['bounds'], [WEST, NORTH - 16 * STEP, WEST + 16 * STEP, NORTH],
                             rtol=0, atol=1e-12)
  _, padded = examples['area_2_2']
  np.testing.assert_allclose(padded['bounds'], [WEST + 32 * STEP, NORTH - 48 * STEP,
                                                WEST + 48 * STEP, NORTH - 32 * STEP],
                             rtol=0, atol=1e-12)
  counts = builder.info.metadata['custom_area']
  assert (counts['tiles'], counts['padded_tiles'], counts['tiles_left_out']) == (9, 5, 0)
  assert (counts['gps_points'], counts['gps_points_on_raster']) == (6, 5)


def test_yaml_spec_drop_edge_and_splits(tmp_path):
  make_area(tmp_path / 'manual', spec_name='custom.yaml',
            spec_overrides={'edge': 'drop', 'validation_fraction': 0.25, 'test_fraction': 0.0,
                            'name': 'vegas', 'split_seed': 5})
  examples = read_all(build(tmp_path))
  assert sorted(examples) == ['vegas_0_0', 'vegas_0_1', 'vegas_1_0', 'vegas_1_1']
  splits = sorted(split for split, _ in examples.values())
  assert splits == ['train', 'train', 'train', 'validation']
  expected = common.seeded_split(sorted(examples), {'validation': 0.25, 'test': 0.0}, 5)
  assert [t for t, (s, _) in examples.items() if s == 'validation'] == expected['validation']


def write_nbits_copy(path, nbits):
  """Rewrites a GeoTIFF with GDAL's NBITS creation option (the TIFF records its bit depth)."""
  with rasterio.open(path) as source:
    profile, data = source.profile, source.read()
  path.unlink()
  with rasterio.open(path, 'w', **{**profile, 'nbits': nbits}) as target:
    target.write(data)


def test_config_spec_with_absolute_paths_needs_no_spec_file(tmp_path):
  make_area(tmp_path / 'area')
  # No bit_depth in the spec: the file's NBITS tag says 11.
  write_nbits_copy(tmp_path / 'area' / 'area.tif', 11)
  spec = CustomSpec(imagery=str(tmp_path / 'area' / 'area.tif'),
                    roads=str(tmp_path / 'area' / 'roads.geojson'), tile_size=20,
                    validation_fraction=0.25, test_fraction=0.25)
  builder = build(tmp_path, CustomConfig(name='no_gps', spec=spec), manual='nowhere')
  examples = read_all(builder)
  assert len(examples) == 4
  assert all(ex['aux'].max() == 0 for _, ex in examples.values())  # no GPS: empty heat-map
  _, corner = examples['area_0_0']
  assert corner['image'][0, 0].tolist() == [255] * 3 and corner['image'][1, 1, 0] == 127
  record = builder.info.metadata['input_preparation']
  assert record['bit_depth'] == 11 and record['tile_size'] == 20


def assert_nothing_built(tmp_path):
  folder = tmp_path / 'data' / 'custom' / 'default'
  assert not folder.exists() or [p.name for p in folder.iterdir()] == []
  with pytest.raises(Exception):
    Custom(data_dir=str(tmp_path / 'data')).as_data_source(split='train')


def test_bad_inputs_give_named_errors_and_leave_nothing(tmp_path):
  manual = tmp_path / 'manual'
  make_area(manual, spec_overrides={'colour': 'red'})
  with pytest.raises(common.SpecError, match=r"custom\.json.*unknown field.*colour"):
    build(tmp_path)
  make_area(manual, spec_overrides={'tile_size': 3})
  with pytest.raises(common.SpecError, match='tile_size'):
    build(tmp_path)
  make_area(manual, spec_overrides={'min_valid_fraction': 1.5})
  with pytest.raises(common.SpecError, match='min_valid_fraction'):
    build(tmp_path)
  make_area(manual, spec_overrides={'gps_crs': 'EPSG:999999'})
  with pytest.raises(common.SpecError, match='gps_crs'):
    build(tmp_path)
  # 11-bit data in uint16 without NBITS tag and without bit_depth: the depth is not guessed.
  make_area(manual, spec_overrides={'bit_depth': None})
  with pytest.raises(common.UnreadableImageError,
                     match=r'area\.tif: uint16 samples \(largest 2047\).*set bit_depth'):
    build(tmp_path)
  make_area(manual)
  (manual / 'gps.csv').write_text('lon,lat\n10.0,0.0\n10.0,oops\n')
  with pytest.raises(common.DatasetFileError, match=r'gps\.csv: line 3'):
    build(tmp_path)
  (manual / 'gps.csv').write_text('easting,northing\n1,2\n')
  with pytest.raises(common.DatasetFileError, match=r'gps\.csv: no longitude'):
    build(tmp_path)
  make_area(manual)
  (manual / 'area.tif').write_bytes(b'II*\x00 truncated tiff')
  with pytest.raises(common.UnreadableImageError, match=r'area\.tif'):
    build(tmp_path)
  (manual / 'area.tif').unlink()
  with pytest.raises(common.MissingFileError, match=r'area\.tif'):
    build(tmp_path)
  make_area(manual)
  (manual / 'roads.geojson').write_text('{"type": "FeatureCollection", "features": [')
  with pytest.raises(common.DatasetFileError, match=r'roads\.geojson'):
    build(tmp_path)
  assert_nothing_built(tmp_path)


def test_projected_raster_and_metric_roads(tmp_path):
  """A UTM raster (metres): a road 4 m wide on 1 m pixels covers the 4 pixel centres within 2 m."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  west, north = 500000.0, 4000000.0
  geo = geo_lib.GeoInfo.from_bounds((west, north - 32, west + 32, north), 32, 32, 'EPSG:32629')
  geo_lib.write_geotiff(manual / 'utm.tif', np.zeros((32, 32, 3), np.uint8), geo)
  roads = {'type': 'FeatureCollection',
           'crs': {'type': 'name', 'properties': {'name': 'urn:ogc:def:crs:EPSG::32629'}},
           'features': [{'type': 'Feature', 'properties': {}, 'geometry': {
               'type': 'LineString', 'coordinates': [[west + 16.0, north + 5],
                                                     [west + 16.0, north - 40]]}}]}
  (manual / 'roads.geojson').write_text(json.dumps(roads))
  (manual / 'custom.json').write_text(json.dumps(
      {'imagery': 'utm.tif', 'roads': 'roads.geojson', 'tile_size': 32,
       'validation_fraction': 0, 'test_fraction': 0}))
  (_, ex), = read_all(build(tmp_path)).values()
  # Centres at x = 14.5, 15.5, 16.5, 17.5 are 1.5 and 0.5 m away; 13.5 and 18.5 are 2.5 m.
  assert np.flatnonzero(ex['mask'][10, :, 0]).tolist() == [14, 15, 16, 17]
  lon, lat = ex['bounds'][0], ex['bounds'][3]
  assert -9.1 < lon < -8.9 and 36.1 < lat < 36.2  # UTM 29N, x = 500 km is 9 degrees W


# Road centerlines of the SpaceNet AOI_2_Vegas gray sample tile: solaris/data/
# sample_roads_for_masking.geojson of CosmiQ/solaris (Apache-2.0), from which the tile's
# published mask AOI_2_Vegas_gray_tile_roadmask.tif was made. (The roads.geojson beside the
# tile in ../shared/realdata is solaris' sample_roads.geojson, which lies on another tile.)
VEGAS_CENTERLINES = [
    [(-115.23113178923, 36.14038161511), (-115.23079612375, 36.1403801928),
     (-115.23059984478, 36.14039441591), (-115.2302976, 36.140389113375228)],
    [(-115.23172416865, 36.14038729993), (-115.231719669238075, 36.1388276998)],
    [(-115.2338076, 36.140373976815766), (-115.23365298877, 36.14036462699),
     (-115.23203395777, 36.14036944553), (-115.23172416865, 36.14038729993),
     (-115.23138345425, 36.14037908262), (-115.23113178923, 36.14038161511)],
    [(-115.23330816825, 36.14089660045), (-115.2338076, 36.140889434306622)],
    [(-115.23327386626, 36.14171413115), (-115.23326674531, 36.14224500607)],
    [(-115.23218620741, 36.14183275886), (-115.23177887131, 36.14184133435),
     (-115.23178458831, 36.14226296295)],
    [(-115.23277791669, 36.14190707983), (-115.23277505819, 36.14225152895)],
    [(-115.2302976, 36.142278939225932), (-115.23038934269, 36.14227755617),
     (-115.2311142703, 36.14227153845)],
    [(-115.2338076, 36.14223833925346), (-115.23326674531, 36.14224500607),
     (-115.23277505819, 36.14225152895), (-115.23178458831, 36.14226296295),
     (-115.2311142703, 36.14227153845)],
]


def test_spacenet_vegas_gray_tile_matches_published_mask(realdata_dir, tmp_path):
  vegas = realdata_dir / 'spacenet_vegas'
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'roads.geojson').write_text(json.dumps({
      'type': 'FeatureCollection',
      'crs': {'type': 'name', 'properties': {'name': 'urn:ogc:def:crs:OGC:1.3:CRS84'}},
      'features': [{'type': 'Feature', 'properties': {},
                    'geometry': {'type': 'LineString', 'coordinates': line}}
                   for line in VEGAS_CENTERLINES]}))
  (manual / 'custom.json').write_text(json.dumps({
      'imagery': str(vegas / 'AOI_2_Vegas_gray_tile.tif'), 'roads': 'roads.geojson',
      'tile_size': 650, 'validation_fraction': 0.25, 'test_fraction': 0.25,
      'bit_depth': 11}))
  examples = read_all(build(tmp_path))
  assert len(examples) == 4
  mask = assemble(examples, 'mask', 1, tile=650, tiles=2)[..., 0].astype(bool)
  image = assemble(examples, 'image', 3, tile=650, tiles=2)
  published, geo = geo_lib.read_geotiff(vegas / 'AOI_2_Vegas_gray_tile_roadmask.tif')
  published = published[..., 0] > 127
  iou = (mask & published).sum() / (mask | published).sum()
  # Measured: 56413 road pixels against the published 56416, IoU 0.9999.
  assert iou > 0.995, iou
  gray, _ = geo_lib.read_geotiff(vegas / 'AOI_2_Vegas_gray_tile.tif')
  assert gray.dtype == np.uint16 and gray.max() == 2047
  expected = np.rint(gray[..., 0].astype(np.float64) * 255 / 2047).astype(np.uint8)
  np.testing.assert_array_equal(image[..., 0], expected)
  np.testing.assert_array_equal(image[..., 1], image[..., 2])
  _, top_left = examples['AOI_2_Vegas_gray_tile_0_0']
  np.testing.assert_allclose(top_left['bounds'][[0, 3]], [geo.bounds[0], geo.bounds[3]],
                             rtol=0, atol=1e-5)


def test_porto_taxi_polylines_on_a_utm_raster(realdata_dir, tmp_path):
  """Real Porto trips projected by rasterio onto a UTM 29N raster land on the pixels of the
  provider's own UTM coordinates (POLYLINE_UTM column)."""
  csv_path = realdata_dir / 'porto_taxi' / 'porto_taxi_2014-05-06_150trips.csv'
  manual = tmp_path / 'manual'
  manual.mkdir()
  pixel = 50.0
  west, north, size = 528000.0, 4558000.0, 128
  geo = geo_lib.GeoInfo.from_bounds(
      (west, north - size * pixel, west + size * pixel, north), size, size, 'EPSG:32629')
  geo_lib.write_geotiff(manual / 'porto.tif', np.zeros((size, size, 3), np.uint8), geo)
  (manual / 'roads.geojson').write_text('{"type": "FeatureCollection", "features": []}')
  (manual / 'custom.json').write_text(json.dumps({
      'imagery': 'porto.tif', 'roads': 'roads.geojson', 'gps': [str(csv_path)],
      'tile_size': 64, 'validation_fraction': 0.25, 'test_fraction': 0.25}))
  examples = read_all(build(tmp_path))
  aux = assemble(examples, 'aux', 1, tile=64, tiles=2)[..., 0]
  xs, ys = [], []
  with open(csv_path, newline='') as handle:
    for record in csv.DictReader(handle):
      for x, y in json.loads(record['POLYLINE_UTM']):
        xs.append(x)
        ys.append(y)
  cols, rows = geo_lib.world_to_pixel(np.array(xs), np.array(ys), geo.transform)
  expected = np.zeros_like(aux)
  for r in range(2):
    for c in range(2):
      expected[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] = heatmap_lib.heatmap_to_uint8(
          heatmap_lib.render_heatmap(cols - c * 64, rows - r * 64, 64, 64))
  assert np.count_nonzero(aux) > 500
  # Both projections agree to centimetres; a point within that of a pixel edge may differ.
  assert np.mean(aux == expected) > 0.995
  assert np.all(np.isfinite([ex['bounds'] for _, ex in examples.values()]))


def test_geojson_crs_and_geometry_parsing(tmp_path):
  path = tmp_path / 'g.geojson'
  path.write_text(json.dumps({'type': 'Feature', 'geometry': {
      'type': 'GeometryCollection', 'geometries': [
          {'type': 'Point', 'coordinates': [1.0, 2.0, 3.0]},
          {'type': 'MultiPolygon', 'coordinates': [[[[0, 0], [1, 0], [1, 1], [0, 0]]]]}]}}))
  geometries, crs = custom_lib.read_road_geometries(path)
  assert [g['type'] for g in geometries] == ['Point', 'Polygon']
  assert crs == rasterio.crs.CRS.from_epsg(4326)
  path.write_text(json.dumps({'type': 'Feature', 'geometry': {
      'type': 'LineString', 'coordinates': [[0, 0], [float('nan'), 1]]}}))
  with pytest.raises(common.DatasetFileError, match=r'g\.geojson.*NaN'):
    custom_lib.read_road_geometries(path)
  lon_m, lat_m = geo_lib.metres_per_degree(np.array([0.0, 60.0]))
  # Reference values of the WGS84 ellipsoid: 111.319/110.574 km at 0 deg, 55.800/111.412 at 60.
  np.testing.assert_allclose(lon_m, [111319.5, 55800.0], atol=1.0)
  np.testing.assert_allclose(lat_m, [110574.3, 111412.3], atol=1.0)


def test_long_diagonal_road_equals_brute_force_distance():
  """A 700-px diagonal (cut into pieces internally) marks exactly the centres within 1.5 m."""
  size = 600
  geo = geo_lib.GeoInfo.from_bounds((0.0, 0.0, size * 0.5, size * 0.5), size, size, 'EPSG:32629')
  line = {'type': 'LineString', 'coordinates': [[-10.0, 20.0], [290.0, 250.0]]}
  mask = custom_lib.rasterize_roads([line], geo.crs, geo, size, size, road_width_m=3.0)
  cols, rows = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
  x, y = geo_lib.pixel_to_world(cols, rows, geo.transform)
  a, b = np.array([-10.0, 20.0]), np.array([290.0, 250.0])
  t = np.clip(((x - a[0]) * (b - a)[0] + (y - a[1]) * (b - a)[1]) / np.sum((b - a) ** 2), 0, 1)
  distance = np.hypot(x - a[0] - t * (b - a)[0], y - a[1] - t * (b - a)[1])
  np.testing.assert_array_equal(mask, (distance <= 1.5).astype(np.uint8))
  assert mask.sum() > 1000


# ---------------------------------------------------------------------------
# Data that cannot be right: errors and warnings with counts.


def test_edge_tiles_are_kept_by_their_share_of_raster_pixels(tmp_path, caplog):
  # 40 px on 16 px tiles: 4 whole tiles, 4 half tiles (8 of 16 rows or columns), 1 quarter tile.
  make_area(tmp_path / 'manual', spec_overrides={'min_valid_fraction': 0.5})
  builder = build(tmp_path)
  assert sorted(read_all(builder)) == [f'area_{r}_{c}' for r in range(3) for c in range(3)
                                       if (r, c) != (2, 2)]
  counts = builder.info.metadata['custom_area']
  assert (counts['tiles'], counts['padded_tiles'], counts['tiles_left_out']) == (8, 4, 1)
  assert 'custom: 4 of 8 tiles are zero-padded edge tiles (50-50% of their pixels' in caplog.text
  make_area(tmp_path / 'manual2', spec_overrides={'min_valid_fraction': 0.6})
  counts = build(tmp_path / 'b', manual='../manual2').info.metadata['custom_area']
  assert (counts['tiles'], counts['padded_tiles'], counts['tiles_left_out']) == (4, 0, 5)


def test_gps_in_the_wrong_crs_is_an_error_that_names_the_crs(tmp_path):
  manual = tmp_path / 'manual'
  # UTM metres in a table read as degrees (the default gps_crs EPSG:4326).
  make_area(manual)
  (manual / 'gps.csv').write_text('x,y\n500000.0,4000000.0\n')
  with pytest.raises(common.DatasetFileError,
                     match=r'gps\.csv: line 2: .*outside lon.*GPS CRS is EPSG:4326.*set gps_crs'):
    build(tmp_path)
  # lon/lat degrees declared as UTM 11N metres: every point lands far away (lon -121.5).
  make_area(manual, spec_overrides={'gps_crs': 'EPSG:32611'})
  with pytest.raises(common.DatasetFileError,
                     match=r'gps\.csv: none of the 6 GPS points of 1 file\(s\) falls on the '
                           r'imagery .*area\.tif: read as gps_crs EPSG:32611.*Set gps_crs'):
    build(tmp_path)
  assert_nothing_built(tmp_path)


def test_gps_mostly_off_the_raster_is_a_warning_with_counts(tmp_path, caplog):
  make_area(tmp_path / 'manual')
  lon, lat = pixel_centre(20, 20)
  with open(tmp_path / 'manual' / 'gps.csv', 'a') as handle:
    handle.write(''.join(f'{lon + 1.0!r},{lat!r},0\n' for _ in range(10)))  # 1 degree east
  counts = build(tmp_path).info.metadata['custom_area']
  assert (counts['gps_points'], counts['gps_points_on_raster']) == (16, 5)
  assert 'only 5 of 16 GPS points (31.2%) fall on the imagery' in caplog.text


def test_roads_off_the_imagery_are_an_error_or_a_warning_with_counts(tmp_path, caplog):
  manual = tmp_path / 'manual'
  make_area(manual)
  roads = json.loads((manual / 'roads.geojson').read_text())
  # A third road 1 degree west of the raster: a warning that counts it.
  far = {'type': 'Feature', 'properties': {}, 'geometry': {
      'type': 'LineString', 'coordinates': [[WEST - 1.0, NORTH], [WEST - 1.0, NORTH - 0.001]]}}
  (manual / 'roads.geojson').write_text(json.dumps(
      {**roads, 'features': roads['features'] + [far]}))
  counts = build(tmp_path).info.metadata['custom_area']
  assert (counts['road_geometries'], counts['road_geometries_on_raster']) == (3, 2)
  assert 'custom: 1 of 3 road geometries of' in caplog.text
  # Every road elsewhere (e.g. a GeoJSON whose coordinates are not in the CRS it declares):
  # an error, nothing built.
  (manual / 'roads.geojson').write_text(json.dumps({**roads, 'features': [far]}))
  with pytest.raises(common.DatasetFileError,
                     match=r'roads\.geojson: none of its 1 road geometries overlaps the imagery'):
    build(tmp_path / 'again', manual='../manual')
