"""TFDS builder of Porto: 6,048 tiles of 512x512, five-fold cross-validation.

Source layout (as DeepDualMapper / CMMPNet use it):

  {manual_dir}/
    rgb/{id}.png     aerial RGB tile          (folder also accepted as images/, image/, sat/)
    gps/{id}.png     rendered taxi heat-map   (gray; colour files are turned into luma)
    mask/{id}.png    road mask, 0/255 (or 0/1), road = 255
    split_K/train.txt, split_K/valid.txt, split_K/test.txt   one tile id per line

File names: for each folder the builder accepts {id}{ext} or {id}_{suffix}{ext}
(suffix sat/rgb, gps, mask as in BJRoad) with ext .png, .jpg, .jpeg, .tif,
.tiff; exactly one must exist per tile. Split lines may carry an extension.

Folds: configs fold_1 .. fold_5. fold_k reads split_k/ when it exists; when the
published folders are numbered from 0 (split_0 .. split_4), fold_k reads
split_{k-1}/. Splits: train, validation (valid.txt), test. Bounds are unknown (NaN).
"""
from __future__ import annotations

import dataclasses
import pathlib

import tensorflow_datasets as tfds

from data_builders import common

NUM_FOLDS = 5
SPLIT_FILES = {'train': 'train.txt', 'validation': 'valid.txt', 'test': 'test.txt'}
# (folder candidates, file-name suffix candidates) per modality.
IMAGE_LAYOUT = (('rgb', 'images', 'image', 'sat'), ('', '_sat', '_rgb'))
GPS_LAYOUT = (('gps',), ('', '_gps'))
MASK_LAYOUT = (('mask', 'masks'), ('', '_mask'))


@dataclasses.dataclass
class PortoConfig(tfds.core.BuilderConfig):
  """One cross-validation fold (1-based, 1..5)."""
  fold: int = 1
  aux_channels: int = 1


def find_folder(root: pathlib.Path, names, what: str) -> pathlib.Path:
  for name in names:
    if (root / name).is_dir():
      return root / name
  raise common.MissingFileError(root / names[0], f'folder not found ({what}; '
                                f'also tried {", ".join(names[1:]) or "nothing else"})')


def fold_dir(root: pathlib.Path, fold: int) -> pathlib.Path:
  """split_K folder of a 1-based fold (split_{fold}, or split_{fold-1} if 0-based)."""
  one_based = root / f'split_{fold}'
  if one_based.is_dir() and not (root / 'split_0').is_dir():
    return one_based
  zero_based = root / f'split_{fold - 1}'
  if (root / 'split_0').is_dir() and zero_based.is_dir():
    return zero_based
  available = sorted(p.name for p in root.glob('split_*') if p.is_dir())
  raise common.MissingFileError(
      one_based, f'fold folder not found for fold {fold} (available: {available})')


def tile_file(folder: pathlib.Path, tile_id: str, suffixes) -> pathlib.Path:
  return common.find_tile_file(folder, [tile_id + suffix for suffix in suffixes])


class Porto(common.RoadTileBuilder):
  """Porto aerial images + taxi GPS heat-maps, 5 folds."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'float64 bounds; input preparation recorded in the metadata.'}
  BUILDER_CONFIGS = [
      PortoConfig(name=f'fold_{k}', fold=k,
                  description=f'Cross-validation fold {k} of {NUM_FOLDS}.')
      for k in range(1, NUM_FOLDS + 1)
  ]
  CITATION = """@inproceedings{wu2020deepdualmapper,
  title={DeepDualMapper: A gated fusion network for automatic map extraction
         using aerial images and trajectories},
  author={Wu, Hao and Zhang, Hanyuan and Zhang, Xinyu and Sun, Weiwei and
          Zheng, Baihua and Jiang, Yuning}, booktitle={AAAI}, year={2020}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Obtain the Porto data set (aerial tiles + taxi heat-maps + masks, 512x512,
  from the DeepDualMapper authors) and place it so that manual_dir contains
    rgb/{id}.png  gps/{id}.png  mask/{id}.png
    split_1/{train,valid,test}.txt ... split_5/{train,valid,test}.txt
  (split_0 .. split_4 also work; see the module docstring for accepted names).
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    image_dir = find_folder(root, IMAGE_LAYOUT[0], 'Porto aerial images')
    gps_dir = find_folder(root, GPS_LAYOUT[0], 'Porto GPS heat-maps')
    mask_dir = find_folder(root, MASK_LAYOUT[0], 'Porto road masks')
    split_root = fold_dir(root, self.builder_config.fold)
    splits = {}
    for split, file_name in SPLIT_FILES.items():
      split_file = split_root / file_name
      tiles = []
      for tile_id in common.read_id_list(split_file):
        try:
          image = tile_file(image_dir, tile_id, IMAGE_LAYOUT[1])
        except common.MissingFileError as error:
          raise common.UnknownTileError(
              split_file, f'tile id {tile_id!r} has no image in {image_dir}') from error
        tiles.append((tile_id, image, tile_file(gps_dir, tile_id, GPS_LAYOUT[1]),
                      tile_file(mask_dir, tile_id, MASK_LAYOUT[1])))
      splits[split] = self._generate_examples(tiles)
    return splits

  def _generate_examples(self, tiles):
    for tile_id, image_path, gps_path, mask_path in tiles:
      yield tile_id, common.read_tile_files(tile_id, image_path, gps_path, mask_path)
