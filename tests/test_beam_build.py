"""The custom build as an Apache Beam pipeline (TFDS's Beam support, DirectRunner) against the
streamed build: the same examples bit for bit, the same recorded preparation and counts, the
same errors; through data_builders.build's --beam_pipeline_options as a user runs it.

The areas of tests/test_stream_build.py (16 px tiles on a 70 x 53 raster: padded and dropped
edge tiles, roads crossing tiles, GPS just past the raster, several GPS files)."""
import json
import pathlib
import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

pytest.importorskip('apache_beam')

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_stream_build import HEIGHT, WIDTH, assert_same_build, lonlat, write_area  # pylint: disable=g-import-not-at-top,wrong-import-position

from data_builders import build as build_lib  # pylint: disable=wrong-import-position
from data_builders import common  # pylint: disable=wrong-import-position
from data_builders.custom import Custom, CustomConfig, CustomSpec  # pylint: disable=wrong-import-position

DIRECT = 'runner=DirectRunner'


def write_spec(folder: pathlib.Path, gps: list[str], **fields) -> None:
  spec = dict(imagery='area.tif', roads='roads.geojson', gps=gps, tile_size=16,
              validation_fraction=0.2, test_fraction=0.2, **fields)
  (folder / 'custom.json').write_text(json.dumps(spec))


def split_gps_file(folder: pathlib.Path, parts: int) -> list[str]:
  """gps.csv cut into `parts` files (Beam reads its GPS sources in parallel)."""
  header, *rows = (folder / 'gps.csv').read_text().splitlines()
  names = []
  for i in range(parts):
    name = f'gps_{i}.csv'
    (folder / name).write_text('\n'.join([header, *rows[i::parts]]) + '\n')
    names.append(name)
  return names


def streamed_builder(tmp_path, folder, gps, **fields) -> Custom:
  spec = CustomSpec(imagery=str(folder / 'area.tif'), roads=str(folder / 'roads.geojson'),
                    gps=tuple(str(folder / g) for g in gps), tile_size=16,
                    validation_fraction=0.2, test_fraction=0.2, **fields)
  builder = Custom(data_dir=str(tmp_path / 'streamed'),
                   config=CustomConfig(name='area', spec=spec))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
  return builder


@pytest.mark.parametrize('fields', [
    dict(bit_depth=11),  # every tile kept: padded edge tiles
    dict(scaling='percentile', min_valid_fraction=0.4),  # edge tiles left out
], ids=['padded', 'dropped-edges'])
def test_beam_build_equals_streamed_build_bit_for_bit(tmp_path, fields):
  rng = np.random.default_rng(7)
  image = rng.integers(0, 2048, (HEIGHT, WIDTH, 1)).astype(np.uint16)
  folder = tmp_path / 'area'
  write_area(folder, image, seed=8)
  gps = split_gps_file(folder, 3)
  write_spec(folder, gps, **fields)
  version_dir = build_lib.build('custom', tmp_path / 'beam', manual_dir=folder,
                                beam_pipeline_options=DIRECT)
  beam_built = tfds.builder_from_directory(str(version_dir))
  streamed = streamed_builder(tmp_path, folder, gps, **fields)
  assert assert_same_build(streamed, beam_built) == (20 if 'bit_depth' in fields else 12)
  counts = beam_built.info.metadata['custom_area']
  assert list(counts) == list(streamed.info.metadata['custom_area'])  # the same record
  assert counts['gps_points'] == 1000 and counts['road_pixels'] > 300
  if 'min_valid_fraction' in fields:
    assert counts['tiles_left_out'] == 8  # their road pixels still counted (equal above)
  source = beam_built.as_data_source(split='train')
  examples = [source[i] for i in range(len(source))]
  assert sum(ex['aux'].any() for ex in examples) >= 5 and sum(ex['mask'].any()
                                                              for ex in examples) >= 5


def test_beam_build_refuses_gps_off_the_raster(tmp_path, capsys):
  """Coordinates in another CRS than gps_crs: the pipeline fails with the build's error (names
  the file and the CRS), and nothing is left that looks built."""
  rng = np.random.default_rng(9)
  folder = tmp_path / 'area'
  write_area(folder, rng.integers(0, 255, (HEIGHT, WIDTH, 3)).astype(np.uint8))
  lon, lat = lonlat(np.arange(50.0), np.arange(50.0))
  (folder / 'gps.csv').write_text('lon,lat\n' + ''.join(
      f'{float(x) + 3.0!r},{float(y)!r}\n' for x, y in zip(lon, lat)))  # 3 degrees east
  write_spec(folder, ['gps.csv'])
  assert build_lib.main(['custom', '--data_dir', str(tmp_path / 'beam'), '--manual_dir',
                         str(folder), '--beam_pipeline_options', DIRECT]) == 1
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert re.fullmatch(r"error: /\S*gps\.csv: none of the 50 GPS points of 1 file\(s\) falls on "
                      r"the imagery .*area\.tif: read as gps_crs EPSG:4326, .*"
                      r"\[while running '.*CheckGps.*'\]", error), error
  assert not build_lib.is_built('custom', tmp_path / 'beam')


def test_beam_build_refuses_roads_off_the_raster(tmp_path):
  """The road check needs the whole mask: made on the pipeline's counts, before TFDS finalises
  the splits."""
  rng = np.random.default_rng(10)
  folder = tmp_path / 'area'
  write_area(folder, rng.integers(0, 255, (HEIGHT, WIDTH, 3)).astype(np.uint8))
  far = [lonlat(500.0, 500.0), lonlat(600.0, 650.0)]
  (folder / 'roads.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
      {'type': 'Feature', 'properties': {},
       'geometry': {'type': 'LineString', 'coordinates': far}}]}))
  write_spec(folder, ['gps.csv'])
  with pytest.raises(common.DatasetFileError, match=r'roads\.geojson: none of its 1 road '
                     'geometries overlaps the imagery'):
    build_lib.build('custom', tmp_path / 'beam', manual_dir=folder, beam_pipeline_options=DIRECT)
  assert not build_lib.is_built('custom', tmp_path / 'beam')


def test_beam_pipeline_options_syntax_errors_are_one_line(tmp_path, capsys):
  assert build_lib.beam_options(None) is None and build_lib.beam_options('') is None
  options = build_lib.beam_options('runner=DirectRunner,direct_num_workers=2')
  assert options.get_all_options()['direct_num_workers'] == 2
  missing = tmp_path / 'missing'
  assert build_lib.main(['custom', '--data_dir', str(tmp_path), '--manual_dir', str(missing),
                         '--beam_pipeline_options', DIRECT]) == 1
  assert capsys.readouterr().err.strip() == f'error: {missing}: --manual_dir is not a folder'
