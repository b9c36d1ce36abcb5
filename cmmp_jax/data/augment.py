"""Paired training augmentations, equal to the CMMPNet release's (utils/image_augmentation.py).

Every augmentation is a pure function of explicit parameters on uint8 arrays (numpy / OpenCV):
`hsv_shift`, `shift_scale_rotate`, `dihedral` (with `release_chain_ops`) and `crop_resize`.
The random draws are separate: `draw_params(rng, cfg, height, width)` draws an `AugmentParams`
from a numpy Generator with the release's distributions, `apply_params(example, params, cfg)`
applies it, and `augment_example(example, rng, cfg)` does both (the grain pipeline hands in the
per-record generator it derives from its seed and the record position, so every draw is
reproducible after a restore).

With the default AugmentConfig (what the dataset configs use), a BJRoad training example goes
through the release's steps in the release's order (utils/data_loader.py, ImageGPSDataset):
  1. HSV shift of the image alone, p = 0.5: hue shift an integer in [-30, 30] added to OpenCV's
     8-bit hue (0..179) with uint8 wrap-around (the release casts it to uint8, so -20 adds 236;
     OpenCV's HSV->RGB reads a hue h >= 180 as h - 180); saturation and value shifts floats in
     +-5 and +-15 added with the saturating cv2.add.
  2. Image and aux concatenated into one array (the release's BGR + GPS), then
     shift/scale/aspect, p = 0.5: scale and aspect in [0.9, 1.1], shifts in +-0.1 of the side
     rounded to whole pixels, angle 0; cv2.getPerspectiveTransform of the tile's corners and
     cv2.warpPerspective, INTER_LINEAR, constant 0 border, the mask warped the same way.
  3. The flip/rotation chain rot180, horizontal flip, rot270, vertical flip, rot90 (np.rot90,
     counter-clockwise), each independently with p = 0.5: all 8 dihedral transforms are equally
     likely (each is reached by 4 of the 32 outcomes).
  4. Square crop, p = 0.5: crop_rate uniform in [0.7, 0.9], side int32(H * crop_rate), top and
     left uniform integers, resized back to the tile size with INTER_CUBIC, the mask alike.
  5. The mask (carried as 0/255 like the release reads it) thresholded at 0.5 (x / 255 >= 0.5,
     i.e. x >= 128) after everything, back to 0/1.
tests/test_augment.py reproduces every case of ../shared/parity/augment_ref.npz (the release's
functions run with explicit parameters); see the README's input pipeline paragraph.

Channel order: our images are RGB where the release's are BGR. RGB->HSV of an RGB image equals
BGR->HSV of the same image in BGR order, and the geometric steps treat channels alike, so the
results are the same arrays with the channels reversed.

Named variants (not the defaults): `hue_wrap=180` (hue shifted modulo 180, around the colour
circle), `dihedral='one_rotation_then_flips'` (one rotation by 90/180/270 with probability
`rotate_prob`, then the flips; not uniform over the 8 transforms), `mask_interpolation='nearest'`
(the mask resampled nearest-neighbour, so it never needs the threshold).

Layouts are NHWC without the batch axis: image uint8 (H, W, 3) RGB, aux uint8 (H, W, C),
mask uint8 (H, W, 1) with values 0/1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

Example = Mapping[str, Any]

# 256: the release's uint8 wrap-around of the hue plane; 180: wrap around OpenCV's hue circle.
HUE_WRAPS = (256, 180)
DIHEDRAL_MODES = ('release_chain', 'one_rotation_then_flips')
MASK_INTERPOLATIONS = ('like_image', 'nearest')
# The release's flip/rotation chain, in its order (utils/data_loader.py).
RELEASE_CHAIN = ('rot180', 'hflip', 'rot270', 'vflip', 'rot90')
# Square-only steps (they swap height and width).
_QUARTER_TURNS = ('rot90', 'rot270')
# The release reads masks as 0/255 and thresholds mask / 255 at 0.5: x >= 127.5, x >= 128.
MASK_ON = 255
MASK_THRESHOLD = 128


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
  """Probabilities, ranges and variants of the paired augmentations; defaults are the release's.

  Attributes:
    hsv_prob: probability of the HSV shift (image only).
    hue_shift: inclusive integer range of the hue shift, OpenCV 8-bit hue units (2 degrees).
    sat_shift: range of the saturation shift (uniform float, added with saturating cv2.add).
    val_shift: range of the value shift (uniform float, added with saturating cv2.add).
    hue_wrap: 256 (release): the shift is added to the uint8 hue plane with uint8 wrap-around;
      180: the hue wraps around OpenCV's colour circle.
    shift_scale_prob: probability of the shift / scale / aspect warp.
    shift_limit: the shifts are uniform in +-shift_limit of the side, rounded to whole pixels.
    scale_limit: the scale is uniform in 1 +- scale_limit.
    aspect_limit: the aspect a is uniform in 1 +- aspect_limit; x is scaled by scale*sqrt(a),
      y by scale/sqrt(a).
    rotate_limit_degrees: the warp also rotates by an angle uniform in +- this (0 in the
      release: right-angle rotations are separate).
    dihedral: 'release_chain' (release): rot180, hflip, rot270, vflip, rot90, applied in this
      order, the rotations each with probability rotate_prob, the flips with hflip_prob and
      vflip_prob; 'one_rotation_then_flips': with probability rotate_prob one rotation by 90,
      180 or 270 degrees (equally likely), then hflip and vflip.
    rotate_prob: see `dihedral`. Rotations by 90/270 need square tiles; 0 disables rotations.
    hflip_prob: probability of the left-right flip.
    vflip_prob: probability of the up-down flip.
    crop_prob: probability of the crop.
    crop_fraction: range of crop_rate (uniform); the crop is int32(H * crop_rate) x
      int32(W * crop_rate) pixels (square for square tiles, as in the release) at a uniform
      integer position, resized back to the tile size with INTER_CUBIC.
    mask_interpolation: 'like_image' (release): the mask, as 0/255, is resampled like the image
      (linear in the warp, cubic in the crop) and thresholded at 128 at the end; 'nearest':
      nearest-neighbour resampling of the mask.
  """
  hsv_prob: float = 0.5
  hue_shift: tuple[int, int] = (-30, 30)
  sat_shift: tuple[float, float] = (-5.0, 5.0)
  val_shift: tuple[float, float] = (-15.0, 15.0)
  hue_wrap: int = 256
  shift_scale_prob: float = 0.5
  shift_limit: float = 0.1
  scale_limit: float = 0.1
  aspect_limit: float = 0.1
  rotate_limit_degrees: float = 0.0
  dihedral: str = 'release_chain'
  rotate_prob: float = 0.5
  hflip_prob: float = 0.5
  vflip_prob: float = 0.5
  crop_prob: float = 0.5
  crop_fraction: tuple[float, float] = (0.7, 0.9)
  mask_interpolation: str = 'like_image'

  def __post_init__(self):
    for name in ('hsv_prob', 'shift_scale_prob', 'rotate_prob', 'hflip_prob', 'vflip_prob',
                 'crop_prob'):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {value}")
    for name in ('hue_shift', 'sat_shift', 'val_shift', 'crop_fraction'):
      low, high = getattr(self, name)
      if not low <= high:
        raise ValueError(f"AugmentConfig.{name} must be a (low, high) range, got {(low, high)}")
    if self.hue_wrap not in HUE_WRAPS:
      raise ValueError(f"AugmentConfig.hue_wrap must be one of {HUE_WRAPS}, got {self.hue_wrap}")
    if self.dihedral not in DIHEDRAL_MODES:
      raise ValueError(
          f"AugmentConfig.dihedral must be one of {DIHEDRAL_MODES}, got {self.dihedral!r}")
    if self.mask_interpolation not in MASK_INTERPOLATIONS:
      raise ValueError(f"AugmentConfig.mask_interpolation must be one of {MASK_INTERPOLATIONS}, "
                       f"got {self.mask_interpolation!r}")
    for name in ('shift_limit', 'rotate_limit_degrees'):
      if getattr(self, name) < 0:
        raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
    for name in ('scale_limit', 'aspect_limit'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"AugmentConfig.{name} must be in [0, 1), got {getattr(self, name)}")
    low, high = self.crop_fraction
    if not 0.0 < low <= high <= 1.0:
      raise ValueError(f"AugmentConfig.crop_fraction must lie in (0, 1], got {(low, high)}")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """One explicit draw: which steps apply and with which parameters (None / () = not applied).

  Attributes:
    hsv: (hue_shift, sat_shift, val_shift) for `hsv_shift`.
    shift_scale: (angle_degrees, scale, aspect, shift_x, shift_y) for `shift_scale_rotate`;
      the shifts are fractions of the width and height (the release's draw, before rounding).
    dihedral: names of the flips/rotations applied, in order ('rot90', 'rot180', 'rot270',
      'hflip', 'vflip'), for `dihedral`.
    crop: (crop_rate, top, left) for `crop_resize`.
  """
  hsv: tuple[int, float, float] | None = None
  shift_scale: tuple[float, float, float, float, float] | None = None
  dihedral: tuple[str, ...] = ()
  crop: tuple[float, int, int] | None = None


# ------------------------------------------------------------------------------------------
# The augmentations, pure functions of explicit parameters.


def hsv_shift(image: np.ndarray, hue_shift: int, sat_shift: float, val_shift: float,
              hue_wrap: int = 256) -> np.ndarray:
  """The release's randomHueSaturationValue with its draws given; uint8 (H, W, 3) RGB.

  The hue shift is added to OpenCV's 8-bit hue modulo `hue_wrap` (256: the release's uint8
  wrap-around of np.uint8(hue_shift); 180: around the colour circle); saturation and value
  shifts are added with cv2.add (rounded, saturating), exactly as the release calls it.
  """
  if hue_wrap not in HUE_WRAPS:
    raise ValueError(f"hue_wrap must be one of {HUE_WRAPS}, got {hue_wrap}")
  # Every plane maps 256 levels to 256 levels, so one 3-channel lookup table does all three
  # shifts; cv2.add applied to the 256 levels gives its own rounding and saturation.
  levels = np.arange(256, dtype=np.uint8).reshape(256, 1)
  hue = (np.arange(256, dtype=np.int64) + int(hue_shift)) % hue_wrap
  table = np.stack([
      hue.astype(np.uint8),
      cv2.add(levels, float(sat_shift)).reshape(256),
      cv2.add(levels, float(val_shift)).reshape(256),
  ], axis=-1)[None]  # (1, 256, 3)
  hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
  return cv2.cvtColor(cv2.LUT(hsv, table), cv2.COLOR_HSV2RGB)


def shift_scale_rotate_matrix(height: int, width: int, angle: float, scale: float,
                              aspect: float, shift_x: float, shift_y: float) -> np.ndarray:
  """The release's randomShiftScaleRotate transform: (3, 3) float64 perspective matrix.

  The tile's corners (0, 0), (W, 0), (W, H), (0, H) are mapped about the centre (W/2, H/2) by
  the rotation-scale and moved by (round(shift_x * W), round(shift_y * H)) pixels (Python's
  round, as the release); cv2.getPerspectiveTransform of the float32 corners gives the matrix.
  """
  scale_x = scale * aspect / (aspect ** 0.5)
  scale_y = scale / (aspect ** 0.5)
  dx = round(float(shift_x) * width)
  dy = round(float(shift_y) * height)
  cos = np.cos(angle / 180 * np.pi) * scale_x
  sin = np.sin(angle / 180 * np.pi) * scale_y
  rotate = np.array([[cos, -sin], [sin, cos]])
  box0 = np.array([[0, 0], [width, 0], [width, height], [0, height]])
  box1 = (box0 - np.array([width / 2, height / 2])) @ rotate.T + np.array(
      [width / 2 + dx, height / 2 + dy])
  return cv2.getPerspectiveTransform(box0.astype(np.float32), box1.astype(np.float32))


def shift_scale_rotate(array: np.ndarray, angle: float, scale: float, aspect: float,
                       shift_x: float, shift_y: float,
                       interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
  """Warps a uint8 (H, W) or (H, W, C) array like the release (constant 0 border); same shape.

  Image, aux and mask of one example are warped with the same parameters; the release warps
  the image and aux as ONE concatenated array (OpenCV's rounding can depend on the channel
  count) and the mask as a 2-D array, both INTER_LINEAR.
  """
  height, width = array.shape[:2]
  matrix = shift_scale_rotate_matrix(height, width, angle, scale, aspect, shift_x, shift_y)
  warped = cv2.warpPerspective(
      np.ascontiguousarray(array), matrix, (width, height), flags=interpolation,
      borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
  return warped.reshape(array.shape)  # OpenCV drops a trailing channel axis of size 1


_DIHEDRAL_STEPS = {
    'rot90': lambda a: np.rot90(a, 1, axes=(0, 1)),
    'rot180': lambda a: np.rot90(a, 2, axes=(0, 1)),
    'rot270': lambda a: np.rot90(a, 3, axes=(0, 1)),
    'hflip': lambda a: a[:, ::-1],  # cv2.flip(a, 1)
    'vflip': lambda a: a[::-1],     # cv2.flip(a, 0)
}
DIHEDRAL_STEPS = tuple(_DIHEDRAL_STEPS)
# Every sequence of steps is one of 8 transforms: np.rot90 by k quarter turns, then an optional
# left-right flip. A 2x2 array of distinct values tells them apart (D4 permutes its corners
# faithfully); the same transforms as OpenCV calls, which copy 3-4x faster than numpy's
# strided copies of 1024 px tiles.
_CORNERS = np.arange(4).reshape(2, 2)
_NET_TRANSFORMS = {
    (np.rot90(_CORNERS, k)[:, ::-1] if flip else np.rot90(_CORNERS, k)).tobytes(): (k, flip)
    for k in range(4) for flip in (False, True)}
_CV2_ROTATIONS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180,
                  3: cv2.ROTATE_90_CLOCKWISE}


def release_chain_ops(bits: int) -> tuple[str, ...]:
  """The steps of the release's chain (RELEASE_CHAIN) whose bit j of `bits` is set, in order."""
  if not 0 <= bits < 2 ** len(RELEASE_CHAIN):
    raise ValueError(f"bits must be in [0, {2 ** len(RELEASE_CHAIN)}), got {bits}")
  return tuple(name for j, name in enumerate(RELEASE_CHAIN) if bits >> j & 1)


def dihedral(array: np.ndarray, ops: Sequence[str]) -> np.ndarray:
  """Applies the flips/rotations `ops` in order to (H, W[, C]); exact index permutations.

  Rotations are np.rot90's (counter-clockwise); 'rot90'/'rot270' swap height and width.
  """
  corners = _CORNERS
  for op in ops:
    if op not in _DIHEDRAL_STEPS:
      raise ValueError(f"unknown flip/rotation {op!r}; expected one of {DIHEDRAL_STEPS}")
    corners = _DIHEDRAL_STEPS[op](corners)
  quarter_turns, flip = _NET_TRANSFORMS[corners.tobytes()]
  if array.ndim == 2 or (array.ndim == 3 and array.shape[2] <= 4):
    # OpenCV: exact permutations; transpose (inside cv2.rotate) takes at most 4 uint8 channels
    # here, and it drops a trailing channel axis of size 1.
    out = np.ascontiguousarray(array)
    if quarter_turns:
      out = cv2.rotate(out, _CV2_ROTATIONS[quarter_turns])
    if flip:
      out = cv2.flip(out, 1)
    shape = array.shape[1::-1] + array.shape[2:] if quarter_turns % 2 else array.shape
    return out.reshape(shape)
  out = np.rot90(array, quarter_turns, axes=(0, 1))
  return np.ascontiguousarray(out[:, ::-1] if flip else out)


def crop_size(size: int, crop_rate: float) -> int:
  """The release's crop side: np.int32(size * crop_rate) (truncation)."""
  return int(np.int32(size * crop_rate))


def crop_resize(array: np.ndarray, crop_rate: float, top: int, left: int,
                interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
  """The release's randomcrop with its draws given: cut and resize back; same shape.

  The window is crop_size(H, crop_rate) x crop_size(W, crop_rate) pixels at (top, left)
  (the release's square for square tiles); cv2.resize brings it back to H x W.
  """
  height, width = array.shape[:2]
  crop_height, crop_width = crop_size(height, crop_rate), crop_size(width, crop_rate)
  top, left = int(top), int(left)
  if not (crop_height >= 1 and crop_width >= 1 and 0 <= top <= height - crop_height
          and 0 <= left <= width - crop_width):
    raise ValueError(
        f"crop of {crop_height}x{crop_width} at (top={top}, left={left}) does not fit a "
        f"{height}x{width} tile")
  window = np.ascontiguousarray(array[top:top + crop_height, left:left + crop_width])
  resized = cv2.resize(window, (width, height), interpolation=interpolation)
  return resized.reshape(array.shape)


def threshold_mask(mask: np.ndarray) -> np.ndarray:
  """The release's final mask threshold: 0/255-scale uint8 -> 0/1 (mask / 255 >= 0.5)."""
  return (mask >= MASK_THRESHOLD).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# The random draw, separate from the augmentations.


def draw_params(rng: np.random.Generator, cfg: AugmentConfig, height: int,
                width: int) -> AugmentParams:
  """Draws one AugmentParams with the release's distributions (for cfg's defaults).

  Which steps apply is drawn first, in a fixed order (HSV, warp, the flips/rotations, crop),
  then the parameters of the applied steps, so a change of one step's ranges never changes
  which steps apply. (The release draws in its own order from np.random and draws crop_rate
  even when the crop is skipped; neither changes the distribution.)

  hsv: hue integer uniform in cfg.hue_shift (inclusive), sat and val uniform floats.
  shift_scale: angle, scale, aspect, shift_x, shift_y uniform (shifts as fractions).
  dihedral: release_chain: each of RELEASE_CHAIN independently; one_rotation_then_flips: one
    rotation by 90, 180 or 270 (uniform), then hflip, then vflip.
  crop: crop_rate uniform in cfg.crop_fraction, top then left uniform integers over every
    position of the window.
  """
  do_hsv = rng.random() < cfg.hsv_prob
  do_shift_scale = rng.random() < cfg.shift_scale_prob
  if cfg.dihedral == 'release_chain':
    step_probs = {'rot180': cfg.rotate_prob, 'hflip': cfg.hflip_prob,
                  'rot270': cfg.rotate_prob, 'vflip': cfg.vflip_prob, 'rot90': cfg.rotate_prob}
    applied = [rng.random() < step_probs[name] for name in RELEASE_CHAIN]
    ops = tuple(name for name, on in zip(RELEASE_CHAIN, applied) if on)
  else:
    do_rotate = rng.random() < cfg.rotate_prob
    do_hflip = rng.random() < cfg.hflip_prob
    do_vflip = rng.random() < cfg.vflip_prob
    ops = ()
    if do_rotate:
      ops += (('rot90', 'rot180', 'rot270')[int(rng.integers(0, 3))],)
    ops += ('hflip',) * do_hflip + ('vflip',) * do_vflip
  do_crop = rng.random() < cfg.crop_prob

  hsv = shift_scale = crop = None
  if do_hsv:
    hsv = (int(rng.integers(cfg.hue_shift[0], cfg.hue_shift[1], endpoint=True)),
           float(rng.uniform(cfg.sat_shift[0], cfg.sat_shift[1])),
           float(rng.uniform(cfg.val_shift[0], cfg.val_shift[1])))
  if do_shift_scale:
    shift_scale = (
        float(rng.uniform(-cfg.rotate_limit_degrees, cfg.rotate_limit_degrees)),
        float(rng.uniform(1.0 - cfg.scale_limit, 1.0 + cfg.scale_limit)),
        float(rng.uniform(1.0 - cfg.aspect_limit, 1.0 + cfg.aspect_limit)),
        float(rng.uniform(-cfg.shift_limit, cfg.shift_limit)),
        float(rng.uniform(-cfg.shift_limit, cfg.shift_limit)))
  if do_crop:
    crop_rate = float(rng.uniform(cfg.crop_fraction[0], cfg.crop_fraction[1]))
    crop_height, crop_width = crop_size(height, crop_rate), crop_size(width, crop_rate)
    if crop_height < 1 or crop_width < 1:
      raise ValueError(f"crop_rate {crop_rate} leaves no pixel of a {height}x{width} tile")
    top = int(rng.integers(0, height - crop_height, endpoint=True))
    left = int(rng.integers(0, width - crop_width, endpoint=True))
    crop = (crop_rate, top, left)
  return AugmentParams(hsv=hsv, shift_scale=shift_scale, dihedral=ops, crop=crop)


# ------------------------------------------------------------------------------------------
# Examples.


def apply_params(example: Example, params: AugmentParams,
                 cfg: AugmentConfig = AugmentConfig()) -> dict[str, Any]:
  """Applies one explicit draw to an example, in the release's order (module docstring).

  Args:
    example: dict with 'image' uint8 (H, W, 3) RGB, 'aux' uint8 (H, W, C), 'mask' uint8
      (H, W, 1) in {0, 1}; other fields ('tile_id', 'bounds') are passed through unchanged
      (the bounds describe the source tile, not the augmented view).
    params: the draw (see AugmentParams).
    cfg: only its variants are read: hue_wrap and mask_interpolation.

  Returns:
    A new dict with the same keys; image, aux and mask keep shape and dtype and the mask is
    0/1 (thresholded at 0.5 after all steps).

  Raises:
    ExampleError: the example breaks the data contract, or a 90/270 rotation is asked of a
      non-square tile.
  """
  height, width = validate_example(example)
  if height != width and any(op in _QUARTER_TURNS for op in params.dihedral):
    raise ExampleError(
        f"tile {tile_id_of(example)!r}: rotations by 90/270 degrees need square tiles, got "
        f"{height}x{width}; set AugmentConfig.rotate_prob=0 for this dataset")
  image, aux = example['image'], example['aux']
  # The mask as the release reads it: (H, W) 0/255.
  mask = example['mask'][..., 0] * np.uint8(MASK_ON)
  if params.hsv is not None:
    image = hsv_shift(image, *params.hsv, hue_wrap=cfg.hue_wrap)

  if params.shift_scale is not None or params.dihedral or params.crop is not None:
    # The release warps and crops the image and the aux as one array (cv2.merge / split:
    # several times faster than numpy's concatenate and strided slices).
    inputs = cv2.merge([image, aux]).reshape(height, width, 3 + aux.shape[2])
    nearest = cfg.mask_interpolation == 'nearest'
    if params.shift_scale is not None:
      inputs = shift_scale_rotate(inputs, *params.shift_scale)
      mask = shift_scale_rotate(
          mask, *params.shift_scale,
          interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    if params.dihedral:
      inputs, mask = dihedral(inputs, params.dihedral), dihedral(mask, params.dihedral)
    if params.crop is not None:
      inputs = crop_resize(inputs, *params.crop)
      mask = crop_resize(
          mask, *params.crop, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_CUBIC)
    planes = cv2.split(inputs)
    image = cv2.merge(planes[:3])
    aux = cv2.merge(planes[3:]).reshape(image.shape[:2] + (len(planes) - 3,))

  augmented = dict(example)
  augmented['image'] = np.ascontiguousarray(image)
  augmented['aux'] = np.ascontiguousarray(aux)
  augmented['mask'] = np.ascontiguousarray(threshold_mask(mask)[..., None])
  return augmented


def augment_example(example: Example, rng: np.random.Generator,
                    cfg: AugmentConfig = AugmentConfig()) -> dict[str, Any]:
  """Draws the parameters from `rng` (draw_params) and applies them (apply_params).

  Raises:
    ExampleError: the example breaks the data contract, or 90/270 rotations are enabled
      (cfg.rotate_prob > 0) for a non-square tile (checked before any draw).
  """
  height, width = validate_example(example)
  if cfg.rotate_prob > 0 and height != width:
    raise ExampleError(
        f"tile {tile_id_of(example)!r}: rotations by 90/270 degrees need square tiles, got "
        f"{height}x{width}; set AugmentConfig.rotate_prob=0 for this dataset")
  return apply_params(example, draw_params(rng, cfg, height, width), cfg)
