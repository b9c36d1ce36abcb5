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


# ---------------------------------------------------------------------------
# Road centrelines ('road_lines'): the vector labels of graph metrics.


def test_tile_road_lines_clip_to_the_tile_in_pixel_centre_coordinates():
  """Continuous raster pixels (pixel (r, c) spans [c, c + 1)) -> tile pixels with the centre of
  mask[r, c] at (c, r), clipped to the tile's part on the raster: x, y in [-0.5, n - 0.5]."""
  lines = [
      np.array([[2.5, 3.5], [22.5, 13.5]]),  # enters the tile at col0 = 16 through its west edge
      None,                                  # a polygon's entry: skipped
      np.array([[17.5, -5.0], [20.5, 5.0], [23.5, -5.0], [26.5, 5.0]]),  # out, in, out, in
      np.array([[100.0, 100.0], [120.0, 120.0]]),  # off the tile
  ]
  got = custom_lib.tile_road_lines(lines, 0, 16, 16, 16)
  # (2.5, 3.5) - (16.5, 0.5) = (-14, 3) to (6, 13): x = -0.5 at t = 13.5 / 20, y = 3 + 6.75.
  expected = [[[-0.5, 9.75], [6.0, 13.0]],
              [[2.5, -0.5], [4.0, 4.5], [5.5, -0.5]],
              [[8.5, -0.5], [10.0, 4.5]]]
  assert len(got) == len(expected)
  for line, want in zip(got, expected):
    assert line.dtype == np.float64
    np.testing.assert_allclose(line, want, rtol=0, atol=1e-12)
  # An edge tile with 8 of its 16 columns on the raster: cut at the raster's edge (x = 7.5).
  edge = custom_lib.tile_road_lines([np.array([[30.0, 4.5], [60.0, 4.5]])], 0, 32, 16, 8)
  np.testing.assert_allclose(edge[0], [[-0.5, 4.0], [7.5, 4.0]], rtol=0, atol=1e-12)
  # GeoJSON geometries in the raster CRS -> continuous pixels: only lines with two distinct
  # vertices; Polygons and Points have no centreline.
  transform = geo_lib.GeoInfo.from_bounds(BOUNDS, SIZE, SIZE, 'EPSG:4326').transform
  lon, lat = pixel_centre(10, 3)
  px = custom_lib.road_lines_px([
      {'type': 'LineString', 'coordinates': [[lon, lat, 7.0], [lon + 2 * STEP, lat]]},
      {'type': 'LineString', 'coordinates': [[lon, lat], [lon, lat]]},
      {'type': 'Point', 'coordinates': [lon, lat]},
      {'type': 'Polygon', 'coordinates': [[[lon, lat], [lon + STEP, lat], [lon, lat - STEP],
                                           [lon, lat]]]}], transform)
  np.testing.assert_allclose(px[0], [[3.5, 10.5], [5.5, 10.5]], atol=1e-9)
  assert px[1:] == [None, None, None]


# Stored road lines of make_area's tiles (16 px tiles of a 40 x 40 raster, the last row and
# column of tiles 8 px on the raster): the E-W road through row 10, the N-S road through column
# 30 (x = 14 in tile column 1), both clipped at tile borders and at the raster's edge.
WEST_EAST = lambda end: [[-0.5, 10.0], [end, 10.0]]
NORTH_SOUTH = lambda end: [[14.0, -0.5], [14.0, end]]
MAKE_AREA_ROAD_LINES = {
    'area_0_0': [WEST_EAST(15.5)], 'area_0_1': [WEST_EAST(15.5), NORTH_SOUTH(15.5)],
    'area_0_2': [WEST_EAST(7.5)], 'area_1_1': [NORTH_SOUTH(15.5)],
    'area_2_1': [NORTH_SOUTH(7.5)], 'area_1_0': [], 'area_1_2': [], 'area_2_0': [],
    'area_2_2': []}


def test_built_tiles_store_their_road_lines_and_a_crossing_is_a_4_way_junction(tmp_path):
  from cmmp_jax import graph_eval
  make_area(tmp_path / 'manual')
  builder = build(tmp_path)
  assert str(builder.version) == '1.2.0' and 'road_lines' in builder.info.features
  examples = read_all(builder)
  assert sorted(examples) == sorted(MAKE_AREA_ROAD_LINES)
  for tile_id, (_, example) in examples.items():
    stored = graph_eval.parse_road_lines(example['road_lines'])
    assert len(stored) == len(MAKE_AREA_ROAD_LINES[tile_id]), tile_id
    for line, want in zip(stored, MAKE_AREA_ROAD_LINES[tile_id]):
      np.testing.assert_allclose(line, want, rtol=0, atol=1e-4, err_msg=tile_id)
  assert builder.info.metadata['custom_area']['road_geometries_without_centreline'] == 0
  # The ground-truth graph of the tile with the crossing: a degree-4 node at (14, 10), four
  # ends on the tile's border; edges of 14.5 and 1.5 px (E-W), 10.5 and 5.5 px (N-S).
  _, crossing = examples['area_0_1']
  graph = graph_eval.polylines_to_graph(graph_eval.parse_road_lines(crossing['road_lines']),
                                        16, 16)
  nodes = sorted((round(d['x'], 4), round(d['y'], 4), graph.degree(n))
                 for n, d in graph.nodes(data=True))
  assert nodes == [(-0.5, 10.0, 1), (14.0, -0.5, 1), (14.0, 10.0, 4), (14.0, 15.5, 1),
                   (15.5, 10.0, 1)]
  assert sorted(round(d['length'], 4) for _, _, d in graph.edges(data=True)) == [
      1.5, 5.5, 10.5, 14.5]


def _graph_scorer(data_dir, split):
  """graph_eval's evaluator of `--mode=eval` on the built custom area, one batch per split."""
  from cmmp_jax import graph_eval
  from configs import custom as custom_config
  config = custom_config.get_config()
  config.data.data_dir = str(data_dir)
  count = len(Custom(data_dir=str(data_dir)).as_data_source(split=split))
  config.eval_batch_size = count
  return graph_eval.GraphScorer(config, split, count), count


def test_graph_metrics_of_a_custom_area_use_its_road_lines(tmp_path):
  from cmmp_jax import graph_eval
  make_area(tmp_path / 'manual')
  build(tmp_path)
  scorer, count = _graph_scorer(tmp_path / 'data', 'train')
  assert scorer.has_vectors and scorer.gt_source == graph_eval.GT_FROM_VECTORS
  masks = np.stack([scorer.source[i]['mask'] for i in range(count)]).astype(np.float32)
  scorer.add(0, masks)
  summary = scorer.summary()
  assert summary['graph_gt_source'] == graph_eval.GT_FROM_VECTORS
  # Tiles with roads: those of the train split whose stored lines are not empty.
  with_lines = [t for t in summary['graph_tiles'] if MAKE_AREA_ROAD_LINES[t['tile_id']]]
  assert summary['num_graph_tiles'] == len(with_lines) >= 3
  for tile in with_lines:  # vector lengths: 16 px per full crossing, 8 at the raster's edge
    expected_px = sum(abs(np.subtract(*line)).sum() for line in
                      np.array(MAKE_AREA_ROAD_LINES[tile['tile_id']]).reshape(-1, 2, 2))
    assert tile['gt_length_m'] == pytest.approx(expected_px * tile['metres_per_pixel'])
  # A geographic raster: metres per pixel from each tile's WGS84 bounds (1.1132 x 1.1057 m).
  assert summary['metres_per_pixel'][0] == pytest.approx(np.sqrt(1.11319 * 1.10574), rel=1e-4)
  line = scorer.console_line(summary)
  assert 'gt graphs: from vector labels' in line and 'tile bounds (WGS84)' in line
  assert 'ceiling_apls' in summary  # the true mask scored against the lines


def test_polygons_and_points_are_counted_and_send_graph_metrics_to_the_masks(tmp_path, caplog):
  """A GeoJSON of road areas (a polygon) and a point: masks but no centrelines; the build
  counts them and warns, and graph metrics take their ground truth from the masks."""
  from cmmp_jax import graph_eval
  manual = tmp_path / 'manual'
  make_area(manual, spec_overrides={'validation_fraction': 0, 'test_fraction': 0})
  corners = [pixel_centre(r, c) for r, c in ((2, 2), (2, 12), (6, 12), (6, 2), (2, 2))]
  off = [pixel_centre(r, c) for r, c in ((-90, -90), (-80, -90), (-80, -80), (-90, -90))]
  (manual / 'roads.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
      {'type': 'Feature', 'properties': {}, 'geometry': g} for g in (
          {'type': 'Polygon', 'coordinates': [corners]},
          {'type': 'Polygon', 'coordinates': [off]},  # off the raster: not counted
          {'type': 'Point', 'coordinates': pixel_centre(30, 30)})]}))
  builder = build(tmp_path)
  counts = builder.info.metadata['custom_area']
  assert counts['road_geometries_without_centreline'] == 2 and counts['road_pixels'] > 40
  assert '2 road geometries of' in caplog.text and 'without a centreline' in caplog.text
  examples = read_all(builder)
  assert all(json.loads(ex['road_lines']) == {'units': 'pixel', 'lines': []}
             for _, ex in examples.values())
  assert examples['area_0_0'][1]['mask'].any()
  scorer, _ = _graph_scorer(tmp_path / 'data', 'train')
  assert not scorer.has_vectors
  assert scorer.gt_source.startswith(graph_eval.GT_FROM_MASKS)
  assert '2 road polygons/points of the custom area have no centreline' in scorer.gt_source
