"""Paired augmentations: equal to the CMMPNet release's on its reference cases, drawn with its
distributions, image/aux/mask kept aligned, masks thresholded after everything.

The reference cases are ../shared/parity/augment_ref.npz (README beside it): the release's
OpenCV functions run with explicit parameters on real arrays, BGR (+ GPS) images and 0/255
masks. Our images are RGB, so BGR arrays are reversed on the way in and out.
"""
import collections
import dataclasses
import itertools
import math
import re

import cv2
import numpy as np
import pytest

from cmmp_jax.data import augment
from cmmp_jax.data.augment import AugmentConfig, AugmentParams, ExampleError

SIZE = 32
BLOCK = 8  # mask checkerboard block side
CODE_OFFSET, CODE_STEP = 16, 7  # pixel code = 16 + 7 * coordinate: 16..233 for 32 pixels

# The flips/rotations written out with numpy, one step at a time (np.rot90: counter-clockwise).
NUMPY_STEPS = {'rot90': lambda a: np.rot90(a, 1), 'rot180': lambda a: np.rot90(a, 2),
               'rot270': lambda a: np.rot90(a, 3), 'hflip': lambda a: a[:, ::-1],
               'vflip': lambda a: a[::-1]}

NO_OPS = AugmentConfig(hsv_prob=0.0, shift_scale_prob=0.0, crop_prob=0.0, rotate_prob=0.0,
                       hflip_prob=0.0, vflip_prob=0.0)


# ------------------------------------------------------------------------------------------
# Helpers.


def coordinate_example(size=SIZE):
  """Image channels = (row code, column code, mask * 255); aux = (row code, column code);
  mask = checkerboard of BLOCK x BLOCK squares. Every pixel's source position can be decoded."""
  rows, cols = np.mgrid[0:size, 0:size]
  row_code = (CODE_OFFSET + CODE_STEP * rows).astype(np.uint8)
  col_code = (CODE_OFFSET + CODE_STEP * cols).astype(np.uint8)
  mask = (((rows // BLOCK) + (cols // BLOCK)) % 2).astype(np.uint8)
  image = np.stack([row_code, col_code, mask * 255], axis=-1)
  aux = np.stack([row_code, col_code], axis=-1)
  return {'image': image, 'aux': aux, 'mask': mask[..., None], 'tile_id': 'coded',
          'bounds': np.full(4, np.nan, np.float32)}


def level_agreement(ours, ref):
  """(max abs difference, fraction of values within 1 grey level)."""
  assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8
  diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
  return int(diff.max()), float((diff <= 1).mean())


def assert_interpolation_close(ours, ref, what):
  """The issue's tolerance for interpolating steps: >= 99 % within 1 level, all within 2."""
  max_diff, within_one = level_agreement(ours, ref)
  assert max_diff <= 2 and within_one >= 0.99, (
      f"{what}: max diff {max_diff}, {within_one:.2%} of values within 1 grey level")


def assert_mask_matches_release(ours01, ref255, what):
  """Our thresholded 0/1 mask against the release's (H, W) 0/255-scale mask thresholded at 0.5.

  Pixels whose release value lies within 2 levels of the threshold (127.5) may go either way
  under the interpolation tolerance; every other pixel must agree.
  """
  assert ours01.shape == ref255.shape + (1,) and set(np.unique(ours01)) <= {0, 1}
  expected = (ref255.astype(np.float32) / 255.0 >= 0.5)  # the release's data_loader
  decisive = np.abs(ref255.astype(np.float32) - 127.5) > 2
  np.testing.assert_array_equal(ours01[..., 0][decisive], expected[decisive], err_msg=what)


def example_from_release(image_bgr_aux, mask255, tile_id):
  """Our example from the release's (H, W, 3 + C) BGR(+GPS) array and (H, W) 0/255 mask."""
  assert set(np.unique(mask255)) <= {0, 255}
  return {'image': np.ascontiguousarray(image_bgr_aux[..., 2::-1]),
          'aux': np.ascontiguousarray(image_bgr_aux[..., 3:]),
          'mask': (mask255 // 255).astype(np.uint8)[..., None], 'tile_id': tile_id}


def release_order_from_ours(out):
  """Our augmented (RGB image, aux) back in the release's BGR + GPS channel order."""
  return np.concatenate([out['image'][..., ::-1], out['aux']], axis=-1)


@pytest.fixture(scope='module')
def ref(shared_dir):
  path = shared_dir / 'parity' / 'augment_ref.npz'
  if not path.is_file():
    pytest.skip(f"{path} is absent: the release's augmentation references are not available")
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


def cases(ref, prefix):
  found = sorted({key.split('/')[0] for key in ref
                  if re.fullmatch(rf'{prefix}\d+', key.split('/')[0])})
  assert found, f"no {prefix} cases in augment_ref.npz"
  return found



# ------------------------------------------------------------------------------------------
# Every reference case of the release, reproduced from its explicit parameters.


def test_hsv_shift_reproduces_every_release_case(ref):
  names = cases(ref, 'hsv')
  assert len(names) >= 6
  for name in names:
    hue, sat, val = ref[f'{name}/params']
    assert hue == int(hue) and -30 <= hue <= 30
    ours_rgb = augment.hsv_shift(ref[f'{name}/input_bgr'][..., ::-1], int(hue), sat, val)
    # HSV involves no interpolation; it reproduces the release's OpenCV calls exactly (same
    # lookup of every level), checked here with the interpolating steps' tolerance so that
    # an OpenCV release with other HSV rounding still passes.
    assert_interpolation_close(ours_rgb[..., ::-1], ref[f'{name}/output_bgr'], name)
    # The same through an example with the default AugmentConfig (the release presets').
    image = np.ascontiguousarray(ref[f'{name}/input_bgr'][..., ::-1])
    example = {'image': image, 'aux': image[..., :1].copy(),
               'mask': np.zeros(image.shape[:2] + (1,), np.uint8), 'tile_id': name}
    out = augment.apply_params(example, AugmentParams(hsv=(int(hue), sat, val)))
    assert_interpolation_close(out['image'][..., ::-1], ref[f'{name}/output_bgr'], name)
    np.testing.assert_array_equal(out['aux'], example['aux'])
  # The cases include negative hue shifts, where the release's uint8 wrap-around and a wrap
  # around 180 disagree: the 180 variant must fail them (the check can tell the two apart).
  failed = []
  for name in names:
    hue, sat, val = ref[f'{name}/params']
    variant = augment.hsv_shift(ref[f'{name}/input_bgr'][..., ::-1], int(hue), sat, val,
                                hue_wrap=180)[..., ::-1]
    max_diff, within_one = level_agreement(variant, ref[f'{name}/output_bgr'])
    failed += [name] if max_diff > 2 or within_one < 0.99 else []
  assert failed, "hue_wrap=180 reproduces the release's uint8 hue wrap-around: test is blind"


def test_shift_scale_rotate_reproduces_every_release_case(ref):
  names = cases(ref, 'ssr')
  for name in names:
    params = tuple(float(p) for p in ref[f'{name}/params'])
    angle, scale, aspect, shift_x, shift_y = params
    assert angle == 0 and 0.9 <= scale <= 1.1 and 0.9 <= aspect <= 1.1
    assert -0.1 <= shift_x <= 0.1 and -0.1 <= shift_y <= 0.1
    # The functions, on the release's own arrays (4-channel BGR + GPS, 2-D 0/255 mask).
    assert_interpolation_close(augment.shift_scale_rotate(ref[f'{name}/input'], *params),
                               ref[f'{name}/output'], f"{name} image")
    assert_interpolation_close(augment.shift_scale_rotate(ref[f'{name}/input_mask'], *params),
                               ref[f'{name}/output_mask'], f"{name} mask before the threshold")
    # The whole example path: RGB image + aux + 0/1 mask in, thresholded mask out.
    example = example_from_release(ref[f'{name}/input'], ref[f'{name}/input_mask'], name)
    out = augment.apply_params(example, AugmentParams(shift_scale=params))
    assert_interpolation_close(release_order_from_ours(out), ref[f'{name}/output'], name)
    assert_mask_matches_release(out['mask'], ref[f'{name}/output_mask'], f"{name} mask")
  # Cases that move the tile pull in interpolated mask values, which only a mask resampled
  # like the image reproduces.
  interpolated = [n for n in names if len(np.unique(ref[f'{n}/output_mask'])) > 2]
  assert interpolated
  for name in interpolated:
    params = tuple(float(p) for p in ref[f'{name}/params'])
    nearest = augment.shift_scale_rotate(ref[f'{name}/input_mask'], *params,
                                         interpolation=cv2.INTER_NEAREST)
    assert level_agreement(nearest, ref[f'{name}/output_mask'])[0] > 2


def test_crop_reproduces_every_release_case(ref):
  for name in cases(ref, 'crop'):
    crop_rate, top, left = ref[f'{name}/params']
    assert 0.7 <= crop_rate <= 0.9
    params = (float(crop_rate), int(top), int(left))
    assert_interpolation_close(augment.crop_resize(ref[f'{name}/input'], *params),
                               ref[f'{name}/output'], f"{name} image")
    assert_interpolation_close(augment.crop_resize(ref[f'{name}/input_mask'], *params),
                               ref[f'{name}/output_mask'], f"{name} mask before the threshold")
    example = example_from_release(ref[f'{name}/input'], ref[f'{name}/input_mask'], name)
    out = augment.apply_params(example, AugmentParams(crop=params))
    assert_interpolation_close(release_order_from_ours(out), ref[f'{name}/output'], name)
    assert_mask_matches_release(out['mask'], ref[f'{name}/output_mask'], f"{name} mask")


def test_dihedral_chain_reproduces_all_32_release_cases_exactly(ref):
  image, mask = ref['dihedral/input'], ref['dihedral/input_mask']
  example = example_from_release(image, mask, 'dihedral')
  outputs = {}
  for bits in range(32):
    ops = augment.release_chain_ops(bits)
    assert len(ops) == bin(bits).count('1')
    expected_image = ref[f'dihedral/bits{bits}/output']
    expected_mask = ref[f'dihedral/bits{bits}/output_mask']
    np.testing.assert_array_equal(augment.dihedral(image, ops), expected_image)
    np.testing.assert_array_equal(augment.dihedral(mask, ops), expected_mask)
    out = augment.apply_params(example, AugmentParams(dihedral=ops))
    np.testing.assert_array_equal(release_order_from_ours(out), expected_image)
    np.testing.assert_array_equal(out['mask'][..., 0], expected_mask // 255)
    outputs.setdefault(expected_image.tobytes(), []).append(bits)
  # The chain reaches each of the 8 dihedral transforms from exactly 4 of the 32 outcomes.
  assert sorted(len(b) for b in outputs.values()) == [4] * 8


# ------------------------------------------------------------------------------------------
# The composition: the release's order, one threshold at the very end.


def test_apply_params_composes_the_steps_in_the_release_order(ref):
  name = 'ssr0'
  release_input, mask255 = ref[f'{name}/input'], ref[f'{name}/input_mask']
  params = AugmentParams(hsv=(-20, 3.7, 9.2), shift_scale=(0.0, 1.07, 0.93, 0.05, -0.08),
                         dihedral=('hflip', 'rot270', 'rot90'), crop=(0.77, 3, 9))
  # The release's data_loader, written out with our step functions on its BGR arrays.
  sat_bgr = augment.hsv_shift(release_input[..., 2::-1], *params.hsv)[..., ::-1]
  img = np.concatenate([sat_bgr, release_input[..., 3:]], axis=-1)
  img = augment.shift_scale_rotate(img, *params.shift_scale)
  mask = augment.shift_scale_rotate(mask255, *params.shift_scale)
  img, mask = augment.dihedral(img, params.dihedral), augment.dihedral(mask, params.dihedral)
  img = augment.crop_resize(img, *params.crop)
  mask = augment.crop_resize(mask, *params.crop)
  assert 2 < len(np.unique(mask))  # interpolated values reach the threshold

  out = augment.apply_params(example_from_release(release_input, mask255, name), params)
  np.testing.assert_array_equal(release_order_from_ours(out), img)
  np.testing.assert_array_equal(out['mask'][..., 0], (mask.astype(np.float32) / 255 >= 0.5))
  # Thresholding after the warp instead of after everything gives a different mask.
  early = augment.threshold_mask(augment.shift_scale_rotate(mask255, *params.shift_scale)) * 255
  early = augment.crop_resize(augment.dihedral(early, params.dihedral), *params.crop)
  assert not np.array_equal(augment.threshold_mask(early), out['mask'][..., 0])


def test_mask_is_resampled_like_the_image_and_thresholded_at_one_half():
  np.testing.assert_array_equal(augment.threshold_mask(np.array([0, 127, 128, 255], np.uint8)),
                                [0, 0, 1, 1])
  # A half-pixel-scale warp and a cubic crop leave intermediate values between 0 and 255.
  example = coordinate_example()
  params = AugmentParams(shift_scale=(0.0, 1.03, 0.95, 0.02, -0.04), crop=(0.81, 2, 3))
  out = augment.apply_params(example, params)
  mask255 = example['mask'][..., 0] * 255
  soft = augment.crop_resize(augment.shift_scale_rotate(mask255, *params.shift_scale),
                             *params.crop)
  assert len(np.unique(soft)) > 10
  np.testing.assert_array_equal(out['mask'][..., 0], soft >= 128)
  # The same mask travels inside the image (channel 2): the two stay aligned up to rounding
  # of the (differently sized) OpenCV calls, right at the threshold.
  in_image = out['image'][..., 2]
  decisive = np.abs(in_image.astype(int) - 127.5) > 2
  np.testing.assert_array_equal(out['mask'][..., 0][decisive], (in_image >= 128)[decisive])
  # The nearest-neighbour variant differs from the release's resampling here.
  nearest = augment.apply_params(example, params, AugmentConfig(mask_interpolation='nearest'))
  np.testing.assert_array_equal(nearest['image'], out['image'])
  assert not np.array_equal(nearest['mask'], out['mask'])


# ------------------------------------------------------------------------------------------
# The random draws follow the release's distributions (counted).

DRAWS = 8000


def binomial_tolerance(n, p, sigmas=4.5):
  return sigmas * math.sqrt(n * p * (1 - p))


def dihedral_element(ops):
  """The transform the ops amount to, identified by its action on a coded 3x3 array."""
  return augment.dihedral(np.arange(9).reshape(3, 3), ops).tobytes()


@pytest.fixture(scope='module')
def default_draws():
  rng = np.random.default_rng(20240607)
  return [augment.draw_params(rng, AugmentConfig(), 64, 64) for _ in range(DRAWS)]


def test_chain_steps_are_independent_fair_coins_and_the_8_transforms_equally_likely(
    default_draws):
  patterns = collections.Counter(
      sum(1 << augment.RELEASE_CHAIN.index(op) for op in p.dihedral) for p in default_draws)
  for p in default_draws:  # ops come in the chain's order, each at most once
    assert list(p.dihedral) == [op for op in augment.RELEASE_CHAIN if op in p.dihedral]
  # All 32 outcomes of the five independent p = 0.5 steps are equally likely.
  tolerance = binomial_tolerance(DRAWS, 1 / 32)
  assert len(patterns) == 32
  for bits, count in patterns.items():
    assert abs(count - DRAWS / 32) <= tolerance, (augment.release_chain_ops(bits), count)
  # Hence all 8 dihedral transforms are equally likely.
  elements = collections.Counter(dihedral_element(p.dihedral) for p in default_draws)
  assert len(elements) == 8
  tolerance = binomial_tolerance(DRAWS, 1 / 8)
  assert all(abs(c - DRAWS / 8) <= tolerance for c in elements.values()), elements


def test_the_one_rotation_variant_is_not_uniform_and_the_count_sees_it():
  rng = np.random.default_rng(5)
  cfg = AugmentConfig(dihedral='one_rotation_then_flips')
  draws = [augment.draw_params(rng, cfg, 16, 16) for _ in range(DRAWS)]
  rotations = collections.Counter(
      next((op for op in p.dihedral if op.startswith('rot')), None) for p in draws)
  assert set(rotations) == {None, 'rot90', 'rot180', 'rot270'}
  elements = collections.Counter(dihedral_element(p.dihedral) for p in draws)
  tolerance = binomial_tolerance(DRAWS, 1 / 8)
  # Identity: P = 0.5 (no rotation) * 1/4 (no flips) + P(rot180 and both flips) = 1/8 + 1/24.
  assert max(abs(c - DRAWS / 8) for c in elements.values()) > tolerance


def test_hsv_draw_is_an_integer_hue_in_plus_minus_30_and_floats_for_sat_and_val(default_draws):
  hsv = [p.hsv for p in default_draws if p.hsv is not None]
  assert abs(len(hsv) - DRAWS / 2) <= binomial_tolerance(DRAWS, 0.5)
  hues = collections.Counter(h for h, _, _ in hsv)
  assert all(isinstance(h, int) for h in hues)
  assert set(hues) == set(range(-30, 31))  # every integer of the range, nothing outside
  assert all(abs(c - len(hsv) / 61) <= binomial_tolerance(len(hsv), 1 / 61) for c in hues.values())
  sats = np.array([s for _, s, _ in hsv])
  vals = np.array([v for _, _, v in hsv])
  assert -5 <= sats.min() < -4.9 and 4.9 < sats.max() <= 5
  assert -15 <= vals.min() < -14.8 and 14.8 < vals.max() <= 15
  assert len(np.unique(sats)) == len(sats)  # continuous, not rounded


def test_hue_shift_wraps_as_uint8_on_opencvs_8bit_hue():
  red = np.array([[[255, 0, 0]]], np.uint8)  # RGB, OpenCV hue 0
  assert cv2.cvtColor(red, cv2.COLOR_RGB2HSV)[0, 0, 0] == 0
  # The release adds np.uint8(-20) = 236 to hue 0: 236, which OpenCV's HSV->RGB reads as
  # 236 - 180 = 56 (112 degrees, green), not as 160 (320 degrees, magenta-red).
  np.testing.assert_array_equal(augment.hsv_shift(red, -20, 0.0, 0.0),
                                augment.hsv_shift(red, 56, 0.0, 0.0))
  np.testing.assert_array_equal(augment.hsv_shift(red, -20, 0.0, 0.0, hue_wrap=180),
                                augment.hsv_shift(red, 160, 0.0, 0.0))
  assert not np.array_equal(augment.hsv_shift(red, 160, 0.0, 0.0),
                            augment.hsv_shift(red, 56, 0.0, 0.0))
  # Hue 170 + 20 = 190 (uint8, no wrap) -> read as 10; with the 180 wrap also 10.
  pink = cv2.cvtColor(np.array([[[170, 255, 255]]], np.uint8), cv2.COLOR_HSV2RGB)
  np.testing.assert_array_equal(augment.hsv_shift(pink, 20, 0.0, 0.0),
                                augment.hsv_shift(pink, 20, 0.0, 0.0, hue_wrap=180))
  # Saturation and value saturate instead of wrapping (cv2.add) and round.
  grey = np.array([[[100, 100, 100]]], np.uint8)
  np.testing.assert_array_equal(augment.hsv_shift(grey, 0, 0.0, 14.9), [[[115, 115, 115]]])
  np.testing.assert_array_equal(augment.hsv_shift(red, 0, 0.0, -300.0), [[[0, 0, 0]]])


def test_warp_and_crop_draws_follow_the_release_ranges(default_draws):
  warps = np.array([p.shift_scale for p in default_draws if p.shift_scale is not None])
  assert abs(len(warps) - DRAWS / 2) <= binomial_tolerance(DRAWS, 0.5)
  angle, scale, aspect, shift_x, shift_y = warps.T
  assert (angle == 0).all()
  for values, low, high in ((scale, 0.9, 1.1), (aspect, 0.9, 1.1), (shift_x, -0.1, 0.1),
                            (shift_y, -0.1, 0.1)):
    span = high - low
    assert low <= values.min() < low + 0.01 * span and high - 0.01 * span < values.max() <= high
    assert abs(values.mean() - (low + high) / 2) < 0.02 * span

  crops = [p.crop for p in default_draws if p.crop is not None]
  assert abs(len(crops) - DRAWS / 2) <= binomial_tolerance(DRAWS, 0.5)
  rates = np.array([c[0] for c in crops])
  assert 0.7 <= rates.min() < 0.702 and 0.898 < rates.max() <= 0.9
  assert abs(rates.mean() - 0.8) < 0.004
  for rate, top, left in crops:
    side = augment.crop_size(64, rate)  # int32(64 * rate): 44..57
    assert 0 <= top <= 64 - side and 0 <= left <= 64 - side
  # Positions are uniform over every fitting one, the last one included (the release's
  # randint(0, h - side + 1)): count the first and the last positions.
  expected = sum(1 / (65 - augment.crop_size(64, rate)) for rate, _, _ in crops)
  tolerance = binomial_tolerance(len(crops), expected / len(crops))
  for axis in (1, 2):
    first = sum(c[axis] == 0 for c in crops)
    last = sum(c[axis] == 64 - augment.crop_size(64, c[0]) for c in crops)
    assert abs(first - expected) <= tolerance and abs(last - expected) <= tolerance


def test_augment_example_is_draw_then_apply_with_the_given_generator():
  example = coordinate_example()
  for seed in range(5):
    params = augment.draw_params(np.random.default_rng(seed), AugmentConfig(), SIZE, SIZE)
    expected = augment.apply_params(example, params)
    out = augment.augment_example(example, np.random.default_rng(seed))
    for key in ('image', 'aux', 'mask'):
      np.testing.assert_array_equal(out[key], expected[key])
  first = augment.augment_example(example, np.random.default_rng(11))
  second = augment.augment_example(example, np.random.default_rng(11))
  for key in ('image', 'aux', 'mask'):
    np.testing.assert_array_equal(first[key], second[key])
  assert first['tile_id'] == 'coded' and np.isnan(first['bounds']).all()
  # The input is never modified in place.
  for key in ('image', 'aux', 'mask'):
    np.testing.assert_array_equal(example[key], coordinate_example()[key])


# ------------------------------------------------------------------------------------------
# Geometry of whole examples: image, aux and mask move together.


def test_random_augmentations_keep_image_aux_and_mask_aligned():
  example = coordinate_example()
  cfg = dataclasses.replace(AugmentConfig(), hsv_prob=0.0)  # release geometry, codes intact
  changed = 0
  for seed in range(40):
    out = augment.augment_example(example, np.random.default_rng(seed), cfg)
    image, aux, mask = out['image'], out['aux'], out['mask']
    assert image.shape == (SIZE, SIZE, 3) and aux.shape == (SIZE, SIZE, 2)
    assert mask.shape == (SIZE, SIZE, 1) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    # aux is resampled with the image, in the same OpenCV call.
    np.testing.assert_array_equal(aux, image[..., :2])
    # Image channel 2 carries the mask (x 255) through the same steps: the thresholded mask
    # equals it away from the threshold.
    decisive = np.abs(image[..., 2].astype(int) - 127.5) > 2
    assert decisive.mean() > 0.8
    np.testing.assert_array_equal(mask[..., 0][decisive], (image[..., 2] >= 128)[decisive],
                                  err_msg=f"seed {seed}")
    changed += not np.array_equal(image, example['image'])
  assert changed >= 35  # 1 - 2**-8 of the draws change the tile


def test_dihedral_steps_are_exact_and_paired():
  example = coordinate_example()
  for ops in itertools.chain.from_iterable(
      itertools.permutations(augment.DIHEDRAL_STEPS, n) for n in range(3)):
    out = augment.apply_params(example, AugmentParams(dihedral=ops))
    expected = example['image']
    for op in ops:
      expected = NUMPY_STEPS[op](expected)
    np.testing.assert_array_equal(out['image'], expected)
    np.testing.assert_array_equal(out['aux'], expected[..., :2])
    np.testing.assert_array_equal(out['mask'][..., 0] * 255, expected[..., 2])


def test_dihedral_matches_the_sequential_numpy_steps_for_any_channel_count():
  rng = np.random.default_rng(1)
  for shape in ((6, 6), (6, 6, 1), (6, 6, 3), (6, 6, 4), (6, 6, 5), (4, 7), (4, 7, 3)):
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    for ops in itertools.product(augment.DIHEDRAL_STEPS, repeat=3):
      if shape[0] != shape[1] and any(op in ('rot90', 'rot270') for op in ops):
        continue
      expected = array
      for op in ops:
        expected = NUMPY_STEPS[op](expected)
      np.testing.assert_array_equal(augment.dihedral(array, ops), expected, err_msg=str(ops))


def test_one_rotation_variant_rotates_once_then_flips():
  example = coordinate_example()
  cfg = dataclasses.replace(NO_OPS, dihedral='one_rotation_then_flips', rotate_prob=1.0)
  seen_turns = set()
  for seed in range(12):
    params = augment.draw_params(np.random.default_rng(seed), cfg, SIZE, SIZE)
    assert len(params.dihedral) == 1
    out = augment.apply_params(example, params)
    turns = [k for k in (1, 2, 3) if np.array_equal(out['image'], np.rot90(example['image'], k))]
    assert len(turns) == 1
    for key in ('aux', 'mask'):
      np.testing.assert_array_equal(out[key], np.rot90(example[key], turns[0]))
    seen_turns.add(turns[0])
  assert seen_turns == {1, 2, 3}
  flips = dataclasses.replace(NO_OPS, dihedral='one_rotation_then_flips', hflip_prob=1.0,
                              vflip_prob=1.0)
  assert augment.draw_params(np.random.default_rng(0), flips, 8, 8).dihedral == ('hflip', 'vflip')


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


def test_crop_cuts_the_window_at_top_left_and_resizes_it_back():
  example = coordinate_example()
  # crop_rate 0.5: a 16 x 16 window, doubled; cubic resampling of the linear row/column codes
  # reproduces their linear interpolation (up to rounding), which locates the window.
  out = augment.apply_params(example, AugmentParams(crop=(0.5, 5, 9)))
  rows = (out['image'][4:-4, 4:-4, 0].astype(float) - CODE_OFFSET) / CODE_STEP
  cols = (out['image'][4:-4, 4:-4, 1].astype(float) - CODE_OFFSET) / CODE_STEP
  expected_rows = 5 + (np.arange(4, SIZE - 4) + 0.5) / 2 - 0.5  # cv2.resize pixel centres
  expected_cols = 9 + (np.arange(4, SIZE - 4) + 0.5) / 2 - 0.5
  np.testing.assert_allclose(rows, np.broadcast_to(expected_rows[:, None], rows.shape), atol=0.15)
  np.testing.assert_allclose(cols, np.broadcast_to(expected_cols[None, :], cols.shape), atol=0.15)
  with pytest.raises(ValueError, match=r"crop of 16x16 at \(top=17, left=0\) does not fit"):
    augment.crop_resize(example['image'], 0.5, 17, 0)


def test_hsv_touches_only_the_image():
  example = coordinate_example()
  out = augment.apply_params(example, AugmentParams(hsv=(12, 4.0, -7.0)))
  assert not np.array_equal(out['image'], example['image'])
  np.testing.assert_array_equal(out['aux'], example['aux'])
  np.testing.assert_array_equal(out['mask'], example['mask'])


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
  with pytest.raises(ExampleError, match=r"need square tiles, got 16x32"):
    augment.apply_params(wide, AugmentParams(dihedral=('rot270',)))
  out = augment.apply_params(wide, AugmentParams(dihedral=('rot180', 'hflip'), crop=(0.75, 2, 5)))
  assert out['image'].shape == (16, 32, 3)
  out = augment.augment_example(wide, np.random.default_rng(0),
                                dataclasses.replace(AugmentConfig(), rotate_prob=0.0))
  assert out['image'].shape == (16, 32, 3)
  with pytest.raises(ValueError, match=r"hsv_prob must be a probability"):
    AugmentConfig(hsv_prob=1.5)
  with pytest.raises(ValueError, match=r"crop_fraction must lie in"):
    AugmentConfig(crop_fraction=(0.0, 0.9))
  with pytest.raises(ValueError, match=r"hue_wrap must be one of \(256, 180\)"):
    AugmentConfig(hue_wrap=200)
  with pytest.raises(ValueError, match=r"dihedral must be one of"):
    AugmentConfig(dihedral='rot90_only')
  with pytest.raises(ValueError, match=r"mask_interpolation must be one of"):
    AugmentConfig(mask_interpolation='cubic')
  with pytest.raises(ValueError, match=r"unknown flip/rotation 'transpose'"):
    augment.dihedral(example['image'], ('transpose',))
