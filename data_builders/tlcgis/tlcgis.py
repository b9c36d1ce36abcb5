"""TFDS builder of TLCGIS: aerial RGB + rendered lidar depth, 500x500 tiles.

Source layout (Parajuli et al., SIGSPATIAL 2018, as the CMMPNet release reads it):

  {manual_dir}/fusion_lidar_images_sigspatial18/
    rgb/{id}.png          aerial RGB image
    depth_lpu/{id}.png    lidar depth image (gray; colour files are turned to luma)
    mask/{id}.png         road mask, ROAD = 0, background = 1 (or 255)
    train.txt valid.txt test.txt   one tile id per line

manual_dir may also be the fusion_lidar_images_sigspatial18 folder itself. Files
may be .png, .jpg or .tif; split lines may carry the extension. Masks are stored
with road = 1 (inverted from the files). Tiles keep their 500x500 size: the
input pipeline resizes. Bounds are unknown (NaN).
"""
from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from data_builders import common

DATASET_FOLDER = 'fusion_lidar_images_sigspatial18'
SPLIT_FILES = {'train': 'train.txt', 'validation': 'valid.txt', 'test': 'test.txt'}
IMAGE_DIR, LIDAR_DIR, MASK_DIR = 'rgb', 'depth_lpu', 'mask'


def find_dataset_root(manual_dir: pathlib.Path) -> pathlib.Path:
  """The folder holding rgb/, depth_lpu/, mask/ and the split files."""
  manual_dir = pathlib.Path(manual_dir)
  nested = manual_dir / DATASET_FOLDER
  root = nested if nested.is_dir() else manual_dir
  for folder in (IMAGE_DIR, LIDAR_DIR, MASK_DIR):
    common.require_dir(root / folder, f'TLCGIS {folder}/ of {DATASET_FOLDER}')
  return root


def tile_paths(root: pathlib.Path, tile_id: str, split_file: pathlib.Path):
  """(image, lidar, mask) files of one tile; UnknownTileError if it has no image."""
  try:
    image = common.find_tile_file(root / IMAGE_DIR, [tile_id])
  except common.MissingFileError as error:
    raise common.UnknownTileError(
        split_file, f'tile id {tile_id!r} has no image in {root / IMAGE_DIR}') from error
  lidar = common.find_tile_file(root / LIDAR_DIR, [tile_id])
  mask = common.find_tile_file(root / MASK_DIR, [tile_id])
  return image, lidar, mask


class Tlcgis(common.RoadTileBuilder):
  """TLCGIS aerial image + lidar road segmentation (5,860 tiles of 500x500)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'float64 bounds; input preparation recorded in the metadata.'}
  CITATION = """@inproceedings{parajuli2018fusion,
  title={Fusion of aerial lidar and images for road segmentation with deep CNN},
  author={Parajuli, Biswas and Kumar, Piyush and Mukherjee, Tathagata and
          Pasiliao, Eduardo and Jambawalikar, Sachin},
  booktitle={SIGSPATIAL}, year={2018}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request/download TLCGIS (fusion_lidar_images_sigspatial18) from the authors of
  Parajuli et al., SIGSPATIAL 2018, and extract it so that manual_dir contains
    fusion_lidar_images_sigspatial18/{rgb,depth_lpu,mask}/{id}.png
    fusion_lidar_images_sigspatial18/{train,valid,test}.txt
  (manual_dir may also be that folder itself). Masks store road as 0.
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = find_dataset_root(dl_manager.manual_dir)
    splits = {}
    for split, file_name in SPLIT_FILES.items():
      split_file = root / file_name
      if not split_file.is_file() and (root.parent / file_name).is_file():
        split_file = root.parent / file_name
      ids = common.read_id_list(split_file)
      # Resolve every file before writing anything, so a broken tree fails fast.
      tiles = [(tile_id, *tile_paths(root, tile_id, split_file)) for tile_id in ids]
      splits[split] = self._generate_examples(tiles)
    return splits

  def _generate_examples(self, tiles):
    for tile_id, image_path, lidar_path, mask_path in tiles:
      yield tile_id, common.read_tile_files(
          tile_id, image_path, lidar_path, mask_path, road_is_zero=True)
