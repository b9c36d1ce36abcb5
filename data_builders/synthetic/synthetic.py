"""TFDS builder of the synthetic city (cmmp_jax.data.synthetic), array_record, TensorFlow-free.

Every example follows the shared contract (data_builders/common.py):
  'image': uint8 (S, S, 3) RGB, 'aux': uint8 (S, S, C), 'mask': uint8 (S, S, 1) 0/1,
  'tile_id': '{split}_{index:05d}', 'bounds': float64 (4,) fake (west, south, east, north).
Plus the exact road centrelines, the synthetic city's vector labels:
  'road_lines': text (common.road_lines_json), JSON {"units": "pixel", "lines": [[[x, y], ...],
  ...]}: the centreline of every road entering the tile (synthetic.generate_tile's 'road_lines',
  x = column, y = row, pixel centres at integers, 1e-4 px precision; lines run past the tile's
  edges and are not split at crossings). cmmp_jax.graph_eval turns them into the ground-truth
  road graph of APLS / TOPO in `--mode=eval`.
Tile `index` of `split` is generate_tile(tile_seed(base_seed, split, index), size, config), and
records are written in index order (no TFDS shuffling), so record i of a split is tile i.

Configs:
  default       128 px, 64 / 16 / 16 tiles, aux = GPS heat-map (C=1).
  lidar         as default, aux = lidar-like height raster (C=1).
  gps_channels  as default, aux = heat-map, mean speed, heading sin, heading cos (C=4).
  foggy         as default with haze over the image (the paper's foggy experiment).
  large         512 px, 64 / 16 / 16 tiles, GPS heat-map.
  tiny          64 px, 4 / 2 / 2 tiles, GPS heat-map (tests and smoke runs).
"""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds
from absl import logging

from cmmp_jax.data import synthetic
from data_builders import common


@dataclasses.dataclass(eq=False)
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
  """A named synthetic-city variant: generator knobs plus which raster is 'aux'."""
  city: synthetic.SyntheticConfig = dataclasses.field(default_factory=synthetic.SyntheticConfig)
  aux_kind: str = 'gps'  # one of synthetic.AUX_KINDS

  def __post_init__(self):
    if self.aux_kind not in synthetic.AUX_KINDS:
      raise ValueError(f'SyntheticBuilderConfig {self.name!r}: aux_kind must be one of '
                       f'{synthetic.AUX_KINDS}, got {self.aux_kind!r}')

  @property
  def aux_channels(self) -> int:
    return synthetic.aux_channels(self.aux_kind)


def _config(name: str, description: str, aux_kind: str = 'gps', **city) -> SyntheticBuilderConfig:
  return SyntheticBuilderConfig(name=name, description=description, aux_kind=aux_kind,
                                city=synthetic.SyntheticConfig(**city))


class Synthetic(common.RoadTileBuilder):
  """Procedural city tiles: aerial image + GPS heat-map (or lidar) + road mask."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'float64 bounds; input preparation recorded in the metadata.',
                   '1.2.0': "road centrelines ('road_lines') for graph metrics."}
  ROAD_LINES = True  # examples carry 'road_lines'
  BUILDER_CONFIGS = [
      _config('default', '128 px tiles, 64/16/16, GPS heat-map aux.'),
      _config('lidar', '128 px tiles, 64/16/16, lidar-like height aux.', aux_kind='lidar'),
      _config('gps_channels', '128 px tiles, 64/16/16, aux = heat-map, mean speed, heading '
              'sin, heading cos.', aux_kind='gps_channels'),
      _config('foggy', '128 px tiles, 64/16/16, hazy images, GPS heat-map aux.',
              fog_strength=0.6),
      _config('large', '512 px tiles, 64/16/16, GPS heat-map aux.', size=512),
      _config('tiny', '64 px tiles, 4/2/2, GPS heat-map aux (tests, smoke runs).', size=64,
              num_train=4, num_validation=2, num_test=2),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Procedural synthetic city for road extraction from an aerial image fused '
                    'with a GPS heat-map or lidar (see cmmp_jax/data/synthetic.py).',
        features=common.example_features(self.aux_channels, road_lines=self.ROAD_LINES),
        disable_shuffling=True,  # record i is tile i: reproducible and easy to inspect
        metadata=tfds.core.MetadataDict(),  # the input preparation record (common)
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download: every tile comes from its seed
    city = self.builder_config.city
    return {split: self._generate_examples(split) for split in synthetic.SPLITS
            if city.num_examples(split) > 0}

  def _generate_examples(self, split: str):
    config = self.builder_config
    city = config.city
    count = city.num_examples(split)
    for index in range(count):
      seed = synthetic.tile_seed(city.base_seed, split, index)
      tile = synthetic.generate_tile(seed, city.size, city)
      name = synthetic.tile_id(split, index)
      example = common.make_example(
          name, tile['image'], synthetic.select_aux(tile, config.aux_kind), tile['mask'],
          tile['bounds'], source=f'synthetic/{config.name} {name} (seed {seed})',
          road_lines=tile['road_lines'])
      yield name, example
      if (index + 1) % 16 == 0 or index + 1 == count:
        logging.info('synthetic/%s %s: %d/%d tiles', config.name, split, index + 1, count)
