"""Paired augmentations: alignment of image/aux/mask, HSV on the image only, binary masks."""
import dataclasses

import cv2
import numpy as np
import pytest

from cmmp_jax.data import augment
from cmmp_jax.data.augment import AugmentConfig, ExampleError

SIZE = 32
BLOCK = 8  # mask checkerboard block side
CODE_OFFSET, CODE_STEP = 16, 7  # pixel code = 16 + 7 * coordinate: 16..233 for 32 pixels
INSIDE = 250  # constant channel; a warp that pulls in zero fill lowers it

NO_OPS = AugmentConfig(hsv_prob=0.0, shift_scale_prob=0.0, crop_prob=0.0, rot90_prob=0.0,
                       hflip_prob=0.0, vflip_prob=0.0)


def coordinate_example(size=SIZE):
  """Image channels = (row code, column code, 250); aux = (row code, column code); mask =
  checkerboard of BLOCK x BLOCK squares. Every pixel's source position can be decoded."""
  rows, cols = np.mgrid[0:size, 0:size]
  row_code = (CODE_OFFSET + CODE_STEP * rows).astype(np.uint8)
  col_code = (CODE_OFFSET + CODE_STEP * cols).astype(np.uint8)
  image = np.stack([row_code, col_code, np.full_like(row_code, INSIDE)], axis=-1)
  aux = np.stack([row_code, col_code], axis=-1)
  mask = (((rows // BLOCK) + (cols // BLOCK)) % 2).astype(np.uint8)[..., None]
  return {'image': image, 'aux': aux, 'mask': mask, 'tile_id': 'coded',
          'bounds': np.full(4, np.nan, np.float32)}


def test_geometric_ops_keep_image_aux_and_mask_aligned():
  example = coordinate_example()
  cfg = dataclasses.replace(AugmentConfig(), hsv_prob=0.0)  # reference geometry, codes intact
  boundaries = np.arange(BLOCK, SIZE, BLOCK) - 0.5  # block edges in source pixel coordinates
  changed = 0
  for seed in range(40):
    out = augment.augment_example(example, np.random.default_rng(seed), cfg)
    image, aux, mask = out['image'], out['aux'], out['mask']
    assert image.shape == (SIZE, SIZE, 3) and aux.shape == (SIZE, SIZE, 2)
    assert mask.shape == (SIZE, SIZE, 1) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    # aux is resampled exactly like the image (same map, same interpolation).
    np.testing.assert_array_equal(aux, image[..., :2])
    # Where no zero fill was blended in, decode each output pixel's source position and check
    # that the nearest-neighbour mask took its value from that position.
    inside = image[..., 2] == INSIDE
    src_row = (image[..., 0].astype(float) - CODE_OFFSET) / CODE_STEP
    src_col = (image[..., 1].astype(float) - CODE_OFFSET) / CODE_STEP
    far_from_edges = np.ones_like(inside)
    for edge in boundaries:
      far_from_edges &= (np.abs(src_row - edge) > 0.3) & (np.abs(src_col - edge) > 0.3)
    checked = inside & far_from_edges
    assert checked.mean() > 0.4, f"seed {seed}: too few pixels to check ({checked.mean():.2f})"
    expected_mask = ((np.floor((src_row + 0.5) / BLOCK) + np.floor((src_col + 0.5) / BLOCK))
                     % 2).astype(np.uint8)
    np.testing.assert_array_equal(mask[..., 0][checked], expected_mask[checked],
                                  err_msg=f"seed {seed}")
    changed += not np.array_equal(image, example['image'])
  assert changed >= 30  # with p = 0.5 per op, nearly every draw transforms the tile


def test_rot90_is_an_exact_rotation_of_all_three_fields():
  example = coordinate_example()
  cfg = dataclasses.replace(NO_OPS, rot90_prob=1.0)
  seen_turns = set()
  for seed in range(12):
    out = augment.augment_example(example, np.random.default_rng(seed), cfg)
    turns = [k for k in (1, 2, 3) if np.array_equal(out['image'], np.rot90(example['image'], k))]
    assert len(turns) == 1
    for key in ('aux', 'mask'):
      np.testing.assert_array_equal(out[key], np.rot90(example[key], turns[0]))
    seen_turns.add(turns[0])
  assert seen_turns == {1, 2, 3}


def test_flips_are_exact_and_paired():
  example = coordinate_example()
  out = augment.augment_example(example, np.random.default_rng(0),
                                dataclasses.replace(NO_OPS, hflip_prob=1.0))
  for key in ('image', 'aux', 'mask'):
    np.testing.assert_array_equal(out[key], example[key][:, ::-1])
  out = augment.augment_example(example, np.random.default_rng(0),
                                dataclasses.replace(NO_OPS, vflip_prob=1.0))
  for key in ('image', 'aux', 'mask'):
    np.testing.assert_array_equal(out[key], example[key][::-1])


def test_shift_only_warp_is_an_integer_translation_with_zero_fill():
  example = coordinate_example()
  cfg = dataclasses.replace(NO_OPS, shift_scale_prob=1.0, scale_limit=0.0, aspect_limit=0.0,
                            shift_limit=0.1)
  max_shift = round(0.1 * SIZE)
  for seed in range(6):
    out = augment.augment_example(example, np.random.default_rng(seed), cfg)
    matches = []
    for dy in range(-max_shift, max_shift + 1):
      for dx in range(-max_shift, max_shift + 1):
        expected = {}
        for key in ('image', 'aux', 'mask'):
          shifted = np.zeros_like(example[key])
          src = example[key][max(0, -dy):SIZE - max(0, dy), max(0, -dx):SIZE - max(0, dx)]
          shifted[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
          expected[key] = shifted
        if all(np.array_equal(out[k], expected[k]) for k in expected):
          matches.append((dy, dx))
    assert len(matches) == 1, f"seed {seed}: output is no single integer shift ({matches})"


def test_crop_resizes_a_window_back_like_cv2_resize():
  rng = np.random.default_rng(7)
  example = {'image': rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
             'aux': rng.integers(0, 256, (8, 8, 1), dtype=np.uint8),
             'mask': rng.integers(0, 2, (8, 8, 1), dtype=np.uint8), 'tile_id': 'crop'}
  cfg = dataclasses.replace(NO_OPS, crop_prob=1.0, crop_fraction=(0.5, 0.5))
  for seed in range(5):
    out = augment.augment_example(example, np.random.default_rng(seed), cfg)
    offsets = []
    for row0 in range(5):
      for col0 in range(5):
        window = example['mask'][row0:row0 + 4, col0:col0 + 4]
        # Nearest neighbour 2x upsampling repeats every source pixel twice along each axis.
        if np.array_equal(out['mask'], np.repeat(np.repeat(window, 2, 0), 2, 1)):
          image_window = example['image'][row0:row0 + 4, col0:col0 + 4]
          resized = cv2.resize(image_window, (8, 8), interpolation=cv2.INTER_LINEAR)
          # The border rows differ: the warp reads the real neighbours outside the window where
          # cv2.resize of the cut-out window replicates its edge.
          interior_diff = out['image'][1:-1, 1:-1].astype(int) - resized[1:-1, 1:-1]
          if np.abs(interior_diff).max() <= 1:
            offsets.append((row0, col0))
    assert offsets, f"seed {seed}: output is no 4x4 window resized to 8x8"


def test_hsv_jitter_touches_only_the_image_and_follows_opencv_hsv():
  example = coordinate_example()
  cfg = dataclasses.replace(NO_OPS, hsv_prob=1.0)
  out = augment.augment_example(example, np.random.default_rng(3), cfg)
  assert not np.array_equal(out['image'], example['image'])
  np.testing.assert_array_equal(out['aux'], example['aux'])
  np.testing.assert_array_equal(out['mask'], example['mask'])

  colors = np.array([[[255, 0, 0], [100, 100, 100]]], np.uint8)  # red, grey (RGB)
  # Hue +60 OpenCV units = +120 degrees: red -> green. Grey has no hue; value +15 -> 115.
  fixed = dataclasses.replace(cfg, hue_shift=(60, 60), sat_shift=(0.0, 0.0),
                              val_shift=(15.0, 15.0))
  shifted = augment.jitter_hsv(colors, np.random.default_rng(0), fixed)
  np.testing.assert_array_equal(shifted, [[[0, 255, 0], [115, 115, 115]]])
  # Hue -30 wraps around 180: red (0) -> 150 = 300 degrees = magenta.
  wrapped = dataclasses.replace(fixed, hue_shift=(-30, -30), val_shift=(0.0, 0.0))
  np.testing.assert_array_equal(
      augment.jitter_hsv(colors[:, :1], np.random.default_rng(0), wrapped), [[[255, 0, 255]]])
  # Value clips at 0 instead of wrapping: red 255 -> 55, grey 100 -> 0.
  darken = dataclasses.replace(fixed, hue_shift=(0, 0), val_shift=(-200.0, -200.0))
  np.testing.assert_array_equal(
      augment.jitter_hsv(colors, np.random.default_rng(0), darken), [[[55, 0, 0], [0, 0, 0]]])


def test_same_generator_state_gives_the_same_augmentation():
  example = coordinate_example()
  first = augment.augment_example(example, np.random.default_rng(11))
  second = augment.augment_example(example, np.random.default_rng(11))
  for key in ('image', 'aux', 'mask'):
    np.testing.assert_array_equal(first[key], second[key])
  assert first['tile_id'] == 'coded' and np.isnan(first['bounds']).all()
  # The input is never modified in place.
  np.testing.assert_array_equal(example['image'], coordinate_example()['image'])


def test_default_config_is_the_reference_protocol():
  cfg = AugmentConfig()
  assert (cfg.hsv_prob, cfg.hue_shift, cfg.sat_shift, cfg.val_shift) == (
      0.5, (-30, 30), (-5.0, 5.0), (-15.0, 15.0))
  assert (cfg.shift_scale_prob, cfg.shift_limit, cfg.scale_limit, cfg.aspect_limit) == (
      0.5, 0.1, 0.1, 0.1)
  assert (cfg.crop_prob, cfg.crop_fraction) == (0.5, (0.7, 0.9))


def test_bad_examples_and_configs_raise_clear_errors():
  example = coordinate_example()
  with pytest.raises(ExampleError, match=r"tile 'coded': mask size \(16, 16\) does not match"):
    augment.augment_example({**example, 'mask': example['mask'][:16, :16]},
                            np.random.default_rng(0))
  with pytest.raises(ExampleError, match=r"tile 'coded': mask values must be 0/1.*255"):
    augment.augment_example({**example, 'mask': example['mask'] * 255}, np.random.default_rng(0))
  with pytest.raises(ExampleError, match=r"tile 'b7': field 'image' must be a uint8"):
    augment.augment_example({**example, 'tile_id': b'b7',
                             'image': example['image'].astype(np.float32)},
                            np.random.default_rng(0))
  with pytest.raises(ExampleError, match=r"field 'aux' is missing"):
    augment.augment_example({k: v for k, v in example.items() if k != 'aux'},
                            np.random.default_rng(0))
  wide = {k: (v[:16] if isinstance(v, np.ndarray) and v.ndim == 3 else v)
          for k, v in example.items()}
  with pytest.raises(ExampleError, match=r"need square tiles, got 16x32"):
    augment.augment_example(wide, np.random.default_rng(0))
  out = augment.augment_example(wide, np.random.default_rng(0),
                                dataclasses.replace(AugmentConfig(), rot90_prob=0.0))
  assert out['image'].shape == (16, 32, 3)
  with pytest.raises(ValueError, match=r"hsv_prob must be a probability"):
    AugmentConfig(hsv_prob=1.5)
  with pytest.raises(ValueError, match=r"crop_fraction must lie in"):
    AugmentConfig(crop_fraction=(0.0, 0.9))
