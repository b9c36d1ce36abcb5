"""Paired training augmentations: one random draw transforms image, aux and mask identically.

The reference trains BJRoad with (REFERENCE.md, "Training protocol"):
  * HSV jitter of the aerial image only: hue +-30, saturation +-5, value +-15 in OpenCV's 8-bit
    HSV units (hue 0..179 covers 0..358 degrees, saturation and value 0..255), p = 0.5;
  * shift / scale / aspect jitter of +-10 %, p = 0.5, zero fill outside the tile;
  * a random rotation by 90, 180 or 270 degrees and random horizontal / vertical flips;
  * a random square crop of 0.7-0.9 of the side, resized back to the tile size, p = 0.5.

The shift/scale/aspect warp and the crop are composed into ONE affine map, so every pixel is
interpolated once. Interpolation: linear for image and aux, nearest neighbour for the mask, so
the mask stays 0/1. Rotations and flips are exact index permutations applied with numpy.

All randomness comes from the `np.random.Generator` handed in (the grain pipeline derives it
from its seed and the record position), so an augmentation is reproducible from that generator.
Layouts are NHWC without the batch axis: image uint8 (H, W, 3) RGB, aux uint8 (H, W, C),
mask uint8 (H, W, 1) with values 0/1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import cv2
import numpy as np

Example = Mapping[str, Any]

# OpenCV's 8-bit hue wraps at 180; 256 reproduces D-LinkNet-style code that adds the shift to
# the uint8 hue plane and lets it overflow (hues 180..255 then reach HSV2RGB out of range).
_HUE_WRAPS = (180, 256)
# Channel counts whose cv2.warpAffine results agree bit for bit, plane by plane.
_SAME_ROUNDING_CHANNELS = (1, 3, 4)


class ExampleError(ValueError):
  """An example breaks the data contract (dtype, rank, channels, sizes or mask values)."""


def tile_id_of(example: Example) -> str:
  """Returns the example's 'tile_id' as str (TFDS hands text back as bytes), for messages."""
  tile_id = example.get('tile_id', '<no tile_id>')
  if isinstance(tile_id, np.ndarray) and tile_id.shape == ():
    tile_id = tile_id.item()
  if isinstance(tile_id, bytes):
    return tile_id.decode('utf-8', errors='replace')
  return str(tile_id)


def validate_example(example: Example) -> tuple[int, int]:
  """Checks the shared data contract and returns the tile size (H, W).

  Args:
    example: dict with 'image' uint8 (H, W, 3), 'aux' uint8 (H, W, C >= 1), 'mask' uint8
      (H, W, 1) with values in {0, 1}; 'tile_id' names the example in errors.

  Raises:
    ExampleError: naming the tile_id and the offending field.
  """
  tile_id = tile_id_of(example)
  expected_channels = {'image': 3, 'aux': None, 'mask': 1}
  for key, channels in expected_channels.items():
    if key not in example:
      raise ExampleError(f"tile {tile_id!r}: field {key!r} is missing")
    array = example[key]
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
      dtype = getattr(array, 'dtype', type(array).__name__)
      raise ExampleError(
          f"tile {tile_id!r}: field {key!r} must be a uint8 numpy array, got {dtype}")
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
      raise ExampleError(
          f"tile {tile_id!r}: field {key!r} must be a non-empty (H, W, C) array, got shape "
          f"{array.shape}")
    if channels is not None and array.shape[2] != channels:
      raise ExampleError(
          f"tile {tile_id!r}: field {key!r} must have {channels} channel(s), got shape "
          f"{array.shape}")
  height, width = example['image'].shape[:2]
  for key in ('aux', 'mask'):
    if example[key].shape[:2] != (height, width):
      raise ExampleError(
          f"tile {tile_id!r}: {key} size {example[key].shape[:2]} does not match image size "
          f"{(height, width)}")
  mask_max = int(example['mask'].max())
  if mask_max > 1:
    raise ExampleError(
        f"tile {tile_id!r}: mask values must be 0/1 (1 = road), found {mask_max}; a 0/255 mask "
        "must be binarised when the dataset is built")
  return height, width


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and ranges of the paired augmentations; defaults are the reference's.

  Attributes:
    hsv_prob: probability of the HSV jitter (image only).
    hue_shift: inclusive integer range of the hue shift, OpenCV 8-bit hue units (2 degrees).
    sat_shift: range of the additive saturation shift (uniform float, result rounded, clipped).
    val_shift: range of the additive value shift (uniform float, result rounded, clipped).
    hue_wrap: 180 wraps the hue around the colour circle; 256 reproduces the uint8 overflow of
      D-LinkNet-style code.
    shift_scale_prob: probability of the shift / scale / aspect warp.
    shift_limit: the shift is uniform in +-shift_limit of the side, rounded to whole pixels.
    scale_limit: the scale is uniform in 1 +- scale_limit.
    aspect_limit: the aspect a is uniform in 1 +- aspect_limit; x is scaled by scale*sqrt(a),
      y by scale/sqrt(a).
    rotate_limit_degrees: the warp also rotates by an angle uniform in +- this (0 in the
      reference: right-angle rotations are separate).
    crop_prob: probability of the crop.
    crop_fraction: range of the crop side as a fraction of the tile side (uniform); the crop
      position is uniform and the crop is resized back to the tile size.
    rot90_prob: probability of rotating by 90, 180 or 270 degrees (each equally likely).
      90/270 need square tiles.
    hflip_prob: probability of a left-right flip.
    vflip_prob: probability of an up-down flip.
  """
  hsv_prob: float = 0.5
  hue_shift: tuple[int, int] = (-30, 30)
  sat_shift: tuple[float, float] = (-5.0, 5.0)
  val_shift: tuple[float, float] = (-15.0, 15.0)
  hue_wrap: int = 180
  shift_scale_prob: float = 0.5
  shift_limit: float = 0.1
  scale_limit: float = 0.1
  aspect_limit: float = 0.1
  rotate_limit_degrees: float = 0.0
  crop_prob: float = 0.5
  crop_fraction: tuple[float, float] = (0.7, 0.9)
  rot90_prob: float = 0.5
  hflip_prob: float = 0.5
  vflip_prob: float = 0.5

  def __post_init__(self):
    for name in ('hsv_prob', 'shift_scale_prob', 'crop_prob', 'rot90_prob', 'hflip_prob',
                 'vflip_prob'):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {value}")
    for name in ('hue_shift', 'sat_shift', 'val_shift', 'crop_fraction'):
      low, high = getattr(self, name)
      if not low <= high:
        raise ValueError(f"AugmentConfig.{name} must be a (low, high) range, got {(low, high)}")
    if self.hue_wrap not in _HUE_WRAPS:
      raise ValueError(f"AugmentConfig.hue_wrap must be one of {_HUE_WRAPS}, got {self.hue_wrap}")
    for name in ('shift_limit', 'rotate_limit_degrees'):
      if getattr(self, name) < 0:
        raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
    for name in ('scale_limit', 'aspect_limit'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"AugmentConfig.{name} must be in [0, 1), got {getattr(self, name)}")
    low, high = self.crop_fraction
    if not 0.0 < low <= high <= 1.0:
      raise ValueError(f"AugmentConfig.crop_fraction must lie in (0, 1], got {(low, high)}")


def jitter_hsv(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
  """Shifts hue, saturation and value of a uint8 (H, W, 3) RGB image (always applies).

  Draws, in this order: hue shift (integer), saturation shift, value shift.
  """
  hue = int(rng.integers(cfg.hue_shift[0], cfg.hue_shift[1], endpoint=True))
  sat = float(rng.uniform(cfg.sat_shift[0], cfg.sat_shift[1]))
  val = float(rng.uniform(cfg.val_shift[0], cfg.val_shift[1]))
  # Every plane maps 256 levels to 256 levels, so one 3-channel lookup table does all three
  # shifts (an order of magnitude faster than int32 arithmetic on the planes).
  levels = np.arange(256, dtype=np.float64)
  table = np.stack([
      (levels + hue) % cfg.hue_wrap,  # hue wraps around the colour circle
      np.clip(np.rint(levels + sat), 0, 255),  # saturation and value saturate
      np.clip(np.rint(levels + val), 0, 255),
  ], axis=-1).astype(np.uint8)[None]  # (1, 256, 3)
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  return cv2.cvtColor(cv2.LUT(hsv, table), cv2.COLOR_HSV2RGB)


def _translation(dx: float, dy: float) -> np.ndarray:
  return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def shift_scale_matrix(height: int, width: int, rng: np.random.Generator,
                       cfg: AugmentConfig) -> np.ndarray:
  """Draws the shift/scale/aspect(/rotation) warp; returns its FORWARD map (3, 3) float64.

  The map acts on (x, y, 1) pixel-centre coordinates (x = column) about the tile centre:
  p' = R S (p - c) + c + d. Draws, in this order: angle, scale, aspect, dx, dy.
  """
  angle = math.radians(rng.uniform(-cfg.rotate_limit_degrees, cfg.rotate_limit_degrees))
  scale = rng.uniform(1.0 - cfg.scale_limit, 1.0 + cfg.scale_limit)
  aspect = rng.uniform(1.0 - cfg.aspect_limit, 1.0 + cfg.aspect_limit)
  dx = round(rng.uniform(-cfg.shift_limit, cfg.shift_limit) * width)
  dy = round(rng.uniform(-cfg.shift_limit, cfg.shift_limit) * height)
  scale_x, scale_y = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
  cos, sin = math.cos(angle), math.sin(angle)
  linear = np.array([[cos * scale_x, -sin * scale_y, 0.0],
                     [sin * scale_x, cos * scale_y, 0.0],
                     [0.0, 0.0, 1.0]])
  center_x, center_y = (width - 1) / 2.0, (height - 1) / 2.0
  return _translation(center_x + dx, center_y + dy) @ linear @ _translation(-center_x, -center_y)


def crop_resize_matrix(height: int, width: int, rng: np.random.Generator,
                       cfg: AugmentConfig) -> np.ndarray:
  """Draws a crop and returns the INVERSE map (3, 3) from output pixels to crop pixels.

  The crop has round(f*H) x round(f*W) pixels (square for square tiles), f uniform in
  cfg.crop_fraction, at a uniform integer offset; resizing it back to H x W follows
  cv2.resize's pixel-centre convention src = offset + (dst + 0.5) * crop / size - 0.5.
  Draws, in this order: fraction, row offset, column offset.
  """
  fraction = rng.uniform(cfg.crop_fraction[0], cfg.crop_fraction[1])
  crop_height = min(height, max(1, round(fraction * height)))
  crop_width = min(width, max(1, round(fraction * width)))
  row0 = int(rng.integers(0, height - crop_height, endpoint=True))
  col0 = int(rng.integers(0, width - crop_width, endpoint=True))
  step_x, step_y = crop_width / width, crop_height / height
  return np.array([[step_x, 0.0, col0 + 0.5 * step_x - 0.5],
                   [0.0, step_y, row0 + 0.5 * step_y - 0.5],
                   [0.0, 0.0, 1.0]])


def warp(array: np.ndarray, inverse_map: np.ndarray, interpolation: int,
         border_mode: int) -> np.ndarray:
  """Resamples a uint8 (H, W, C) array: out(p) = array(inverse_map @ p); keeps shape (H, W, C)."""
  height, width, channels = array.shape

  def warp_planes(planes: np.ndarray) -> np.ndarray:
    warped = cv2.warpAffine(
        planes, inverse_map[:2].astype(np.float64), (width, height),
        flags=interpolation | cv2.WARP_INVERSE_MAP, borderMode=border_mode, borderValue=0)
    # OpenCV drops a trailing channel axis of size 1.
    return warped.reshape(height, width, planes.shape[2])

  if channels in _SAME_ROUNDING_CHANNELS:
    return warp_planes(array)
  # OpenCV's 2- and >4-channel warps round differently from its 1/3/4-channel ones (off by up
  # to a few levels); one plane at a time keeps aux bit-identical to the image's resampling.
  return np.concatenate(
      [warp_planes(np.ascontiguousarray(array[..., c:c + 1])) for c in range(channels)], axis=-1)


def augment_example(example: Example, rng: np.random.Generator,
                    cfg: AugmentConfig = AugmentConfig()) -> dict[str, Any]:
  """Applies the paired augmentations to one example.

  Args:
    example: dict with 'image' uint8 (H, W, 3) RGB, 'aux' uint8 (H, W, C), 'mask' uint8
      (H, W, 1) in {0, 1}; other fields ('tile_id', 'bounds') are passed through unchanged
      (the bounds describe the source tile, not the augmented view).
    rng: source of all random draws.
    cfg: probabilities and ranges.

  Returns:
    A new dict with the same keys; image, aux and mask keep shape and dtype (rot90/270 swap
    H and W, so they are only allowed for square tiles) and the mask stays 0/1.

  Raises:
    ExampleError: the example breaks the data contract, or a 90/270 rotation is enabled for a
      non-square tile.
  """
  height, width = validate_example(example)
  if cfg.rot90_prob > 0 and height != width:
    raise ExampleError(
        f"tile {tile_id_of(example)!r}: rotations by 90/270 degrees need square tiles, got "
        f"{height}x{width}; set AugmentConfig.rot90_prob=0 for this dataset")
  image, aux, mask = example['image'], example['aux'], example['mask']

  # The decision draws come first and in a fixed order, so a change of one op's parameters
  # never changes which ops are applied.
  do_hsv = rng.random() < cfg.hsv_prob
  do_shift_scale = rng.random() < cfg.shift_scale_prob
  do_crop = rng.random() < cfg.crop_prob
  do_rot90 = rng.random() < cfg.rot90_prob
  do_hflip = rng.random() < cfg.hflip_prob
  do_vflip = rng.random() < cfg.vflip_prob

  if do_hsv:
    image = jitter_hsv(image, rng, cfg)

  if do_shift_scale or do_crop:
    # Output -> source map of "warp, then crop and resize back": one interpolation in total.
    inverse_map = np.eye(3)
    if do_shift_scale:
      inverse_map = np.linalg.inv(shift_scale_matrix(height, width, rng, cfg))
    if do_crop:
      inverse_map = inverse_map @ crop_resize_matrix(height, width, rng, cfg)
    # Zero fill where the warp uncovers area (reference); a crop alone stays inside the tile,
    # where replicating the edge keeps the half-pixel margin of the resize from darkening it.
    border = cv2.BORDER_CONSTANT if do_shift_scale else cv2.BORDER_REPLICATE
    image = warp(image, inverse_map, cv2.INTER_LINEAR, border)
    aux = warp(aux, inverse_map, cv2.INTER_LINEAR, border)
    mask = warp(mask, inverse_map, cv2.INTER_NEAREST, border)

  if do_rot90:
    quarter_turns = int(rng.integers(1, 3, endpoint=True))
    image, aux, mask = (np.rot90(a, quarter_turns, axes=(0, 1)) for a in (image, aux, mask))
  if do_hflip:
    image, aux, mask = (a[:, ::-1] for a in (image, aux, mask))
  if do_vflip:
    image, aux, mask = (a[::-1] for a in (image, aux, mask))

  augmented = dict(example)
  augmented['image'] = np.ascontiguousarray(image)
  augmented['aux'] = np.ascontiguousarray(aux)
  augmented['mask'] = np.ascontiguousarray(mask)
  return augmented
