"""Tests for cmmp_jax.data.heatmap: projection, counting, the paper's heat-map, extra channels,
GPS augmentations and bulk (city-wide) rendering."""
import cv2
import numpy as np
import pytest

from cmmp_jax.data import heatmap as hm

# The 3x3 Gaussian used by the renderer, written out: [1, 2, 1]^T [1, 2, 1] / 16.
KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16.0


def test_lonlat_to_pixel_linear_mapping_by_hand():
  bounds = (10.0, 40.0, 12.0, 41.0)  # 2 deg wide, 1 deg tall -> 20 x 10 pixels
  cols, rows = hm.lonlat_to_pixel([10.0, 11.0, 12.0, 10.05], [41.0, 40.5, 40.0, 40.95], bounds,
                                  10, 20)
  assert cols.dtype == np.float64 and rows.dtype == np.float64
  np.testing.assert_allclose(cols, [0.0, 10.0, 20.0, 0.5], atol=1e-9)
  np.testing.assert_allclose(rows, [0.0, 5.0, 10.0, 0.5], atol=1e-9)


@pytest.mark.parametrize("bounds", [(1, 0, 1, 1), (0, 1, 1, 0), (0, 0, np.nan, 1), (0, 0, 1)])
def test_lonlat_to_pixel_rejects_bad_bounds(bounds):
  with pytest.raises(ValueError, match="bounds"):
    hm.lonlat_to_pixel([0.5], [0.5], bounds, 4, 4)


def test_count_points_floor_rule_and_stats():
  cols = [0.5, 0.99, 1.0, 3.999, 4.0, -0.01, np.nan, np.inf, 2.2]
  rows = [0.5, 0.2, 0.0, 2.5, 1.0, 1.0, 1.0, 1.0, np.nan]
  counts, stats = hm.count_points(cols, rows, 3, 4)
  np.testing.assert_array_equal(counts, [[2, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
  # col == width (4.0) and col < 0 are outside; NaN/inf in either coordinate is non-finite.
  assert stats == hm.RenderStats(n_total=9, n_rendered=4, n_outside=2, n_nonfinite=3)


def test_render_heatmap_log_normalisation_and_gaussian_by_hand():
  # 3 samples in pixel (2, 2), 1 sample in pixel (2, 6): log1p(3)/log1p(3) = 1 and
  # log1p(1)/log1p(3) = log 2 / log 4 = 0.5; then each spreads as the 3x3 kernel.
  cols = [2.5, 2.1, 2.9, 6.5]
  rows = [2.5, 2.2, 2.8, 2.5]
  heatmap, stats = hm.render_heatmap(cols, rows, 5, 9, return_stats=True)
  expected = np.zeros((5, 9))
  expected[1:4, 1:4] += 1.0 * KERNEL
  expected[1:4, 5:8] += 0.5 * KERNEL
  assert heatmap.dtype == np.float32 and heatmap.shape == (5, 9)
  np.testing.assert_allclose(heatmap, expected, atol=1e-7)
  assert heatmap[2, 2] == pytest.approx(0.25) and heatmap[2, 6] == pytest.approx(0.125)
  assert stats.n_rendered == 4


def test_render_heatmap_border_is_reflect_101():
  # One sample in pixel (0, 1) of a 3 x 4 tile. Along rows, [1, 0, 0] padded by reflection
  # (row -1 := row 1) blurs to [0.5, 0.25, 0]; along columns, [0, 1, 0, 0] padded
  # (col -1 := col 1, col 4 := col 2) blurs to [0.5, 0.5, 0.25, 0].
  heatmap = hm.render_heatmap([1.5], [0.5], 3, 4)
  expected = np.outer([0.5, 0.25, 0.0], [0.5, 0.5, 0.25, 0.0])
  np.testing.assert_allclose(heatmap, expected, atol=1e-7)


def test_gaussian_blur_matches_opencv():
  counts = np.random.default_rng(0).poisson(2.0, size=(11, 7)).astype(np.float64)
  np.testing.assert_allclose(hm.gaussian_blur_3x3(counts), cv2.GaussianBlur(counts, (3, 3), 0),
                             atol=1e-12)


def test_render_heatmap_random_points_stay_in_unit_range():
  rng = np.random.default_rng(1)
  cols, rows = rng.uniform(-5, 37, 5000), rng.uniform(-5, 21, 5000)
  heatmap, stats = hm.render_heatmap(cols, rows, 16, 32, return_stats=True)
  assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 and heatmap.max() > 0.5
  inside = (cols >= 0) & (cols < 32) & (rows >= 0) & (rows < 16)
  assert stats.n_rendered == inside.sum() and stats.n_outside == (~inside).sum()


def test_render_heatmap_empty_and_all_outside_give_zeros():
  heatmap, stats = hm.render_heatmap([], [], 4, 5, return_stats=True)
  assert heatmap.shape == (4, 5) and not heatmap.any()
  assert stats == hm.RenderStats(0, 0, 0, 0)
  heatmap, stats = hm.render_heatmap([-1.0, 7.0, np.nan], [1.0, 1.0, 1.0], 4, 5,
                                     return_stats=True)
  assert not heatmap.any()
  assert stats == hm.RenderStats(n_total=3, n_rendered=0, n_outside=2, n_nonfinite=1)


def test_render_heatmap_rejects_bad_sizes_and_mismatched_points():
  with pytest.raises(ValueError, match="height"):
    hm.render_heatmap([1.0], [1.0], 0, 4)
  with pytest.raises(ValueError, match="same number of points"):
    hm.render_heatmap([1.0, 2.0], [1.0], 4, 4)


def test_heatmap_to_uint8_rounds_and_validates():
  out = hm.heatmap_to_uint8(np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float32))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, [[0, 128, 255, 51]])  # 127.5 rounds to even 128
  with pytest.raises(ValueError, match="NaN"):
    hm.heatmap_to_uint8(np.array([np.nan]))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    hm.heatmap_to_uint8(np.array([1.5]))


# ------------------------------------------------------------------------------------------------
# Extra channels.


def _channel_points():
  cols = np.array([0.5, 0.2, 0.9, 2.5, 9.0])
  rows = np.array([0.5, 0.7, 0.1, 3.5, 9.0])
  speed = np.array([1275.0, 5100.0, np.nan, -5.0, 2550.0])
  interval = np.array([10.0, 1020.0, np.nan, 255.0, 1.0])
  heading = np.array([90.0, 0.0, 180.0, 270.0, 45.0])
  return cols, rows, speed, interval, heading


def test_render_channels_by_hand():
  cols, rows, speed, interval, heading = _channel_points()
  names = ("heatmap", "mean_speed", "max_speed", "mean_interval", "heading_sin", "heading_cos")
  out = hm.render_channels(cols, rows, 4, 4, speed=speed, interval=interval, heading_deg=heading,
                           channels=names)
  assert out.shape == (4, 4, 6) and out.dtype == np.float32
  np.testing.assert_array_equal(out[..., 0], hm.render_heatmap(cols, rows, 4, 4))
  # Pixel (0, 0) holds points 0-2: speeds 1275/2550 = 0.5 and 5100 -> clipped 1 (NaN skipped).
  assert out[0, 0, 1] == pytest.approx(0.75) and out[0, 0, 2] == pytest.approx(1.0)
  assert out[0, 0, 3] == pytest.approx((10 / 510 + 1.0) / 2)
  # Headings 90 and 180 (0 means "stopped" and is skipped): mean sin 0.5, mean cos -0.5.
  assert out[0, 0, 4] == pytest.approx(0.75) and out[0, 0, 5] == pytest.approx(0.25)
  # Pixel (3, 2): speed -5 -> 0, interval 255/510, heading 270 -> sin -1, cos 0.
  np.testing.assert_allclose(out[3, 2, 1:], [0.0, 0.0, 0.5, 0.0, 0.5], atol=1e-6)
  # Pixels without points are 0 in every attribute channel; point 4 is outside the tile.
  empty = np.ones((4, 4), bool)
  empty[0, 0] = empty[3, 2] = False
  assert not out[empty][:, 1:].any()


def test_render_channels_heading_zero_kept_when_asked():
  cols, rows, speed, interval, heading = _channel_points()
  out = hm.render_channels(cols, rows, 4, 4, heading_deg=heading,
                           channels=("heading_cos",), heading_zero_is_missing=False)
  # Headings 90, 0, 180: mean cos = (0 + 1 - 1) / 3 = 0 -> 0.5.
  assert out.shape == (4, 4, 1) and out[0, 0, 0] == pytest.approx(0.5)


def test_render_channels_default_follows_given_inputs_and_errors():
  cols, rows, speed, _, _ = _channel_points()
  out = hm.render_channels(cols, rows, 4, 4, speed=speed)
  assert out.shape == (4, 4, 3)  # heatmap, mean_speed, max_speed
  with pytest.raises(ValueError, match="interval="):
    hm.render_channels(cols, rows, 4, 4, channels=("mean_interval",))
  with pytest.raises(ValueError, match="unknown channel"):
    hm.render_channels(cols, rows, 4, 4, channels=("speed",))
  with pytest.raises(ValueError, match="speed has 2 values"):
    hm.render_channels(cols, rows, 4, 4, speed=[1.0, 2.0])


# ------------------------------------------------------------------------------------------------
# Augmentations.


def _random_points(n=2000, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 64, n), rng.uniform(0, 64, n), np.arange(n, dtype=np.float64)


def test_subsample_keeps_fraction_in_order_with_attributes_and_is_seeded():
  cols, rows, ids = _random_points()
  kept_cols, kept_rows, kept_ids = hm.subsample_points(cols, rows, ids, keep_fraction=0.3, seed=5)
  assert kept_cols.size == 600
  assert np.all(np.diff(kept_ids) > 0)  # original order, no repeats
  index = kept_ids.astype(int)
  np.testing.assert_array_equal(kept_cols, cols[index])
  np.testing.assert_array_equal(kept_rows, rows[index])
  again = hm.subsample_points(cols, rows, ids, keep_fraction=0.3, seed=5)
  np.testing.assert_array_equal(again[2], kept_ids)
  other = hm.subsample_points(cols, rows, ids, keep_fraction=0.3, seed=6)
  assert not np.array_equal(other[2], kept_ids)
  drawn = hm.subsample_points(cols, rows, keep_fraction=(0.1, 0.2),
                              seed=np.random.default_rng(1))
  assert 200 <= drawn[0].size <= 400
  with pytest.raises(ValueError, match="keep_fraction"):
    hm.subsample_points(cols, rows, keep_fraction=1.5, seed=0)
  with pytest.raises(TypeError, match="seed"):
    hm.subsample_points(cols, rows, keep_fraction=0.5, seed=None)


def test_reduce_precision_snaps_down_to_grid():
  cols, rows = hm.reduce_precision([0.4, 3.9, 4.0, 7.99], [1.0, 2.5, 12.1, 0.0], grid_size=4.0)
  np.testing.assert_array_equal(cols, [0.0, 0.0, 4.0, 4.0])
  np.testing.assert_array_equal(rows, [0.0, 0.0, 12.0, 0.0])
  cols, rows, _ = _random_points()
  snapped, _ = hm.reduce_precision(cols, rows, grid_size=(2.0, 8.0), seed=3)
  step = hm._draw((2.0, 8.0), np.random.default_rng(3), "grid_size", 0.0, np.inf)
  np.testing.assert_allclose(snapped, np.floor(cols / step) * step)
  assert np.all((cols - snapped >= 0) & (cols - snapped < step))
  with pytest.raises(ValueError, match="seed"):
    hm.reduce_precision(cols, rows, grid_size=(2.0, 8.0))
  with pytest.raises(ValueError, match="grid_size"):
    hm.reduce_precision(cols, rows, grid_size=0.0)


def test_perturb_adds_gaussian_noise_of_sigma_and_is_seeded():
  cols, rows, _ = _random_points(n=20000)
  noisy_cols, noisy_rows = hm.perturb_points(cols, rows, sigma=3.0, seed=11)
  noise = np.concatenate([noisy_cols - cols, noisy_rows - rows])
  assert abs(noise.std() - 3.0) < 0.1 and abs(noise.mean()) < 0.1
  again = hm.perturb_points(cols, rows, sigma=3.0, seed=11)
  np.testing.assert_array_equal(again[0], noisy_cols)
  assert not np.array_equal(hm.perturb_points(cols, rows, sigma=3.0, seed=12)[0], noisy_cols)
  unchanged = hm.perturb_points(cols, rows, sigma=0.0, seed=1)
  np.testing.assert_array_equal(unchanged[1], rows)


def test_omit_region_removes_exactly_the_drawn_rectangle():
  cols, rows, ids = _random_points()
  out_cols, out_rows, out_ids = hm.omit_region(cols, rows, ids, height=64, width=64,
                                               size_fraction=0.5, seed=4)
  row0, col0, row1, col1 = hm.random_omission_rect(64, 64, size_fraction=0.5, seed=4)
  assert row1 - row0 == pytest.approx(32.0) and col1 - col0 == pytest.approx(32.0)
  in_rect = (rows >= row0) & (rows < row1) & (cols >= col0) & (cols < col1)
  assert in_rect.any()
  np.testing.assert_array_equal(out_ids, ids[~in_rect])
  np.testing.assert_array_equal(out_cols, cols[~in_rect])
  np.testing.assert_array_equal(out_rows, rows[~in_rect])


# ------------------------------------------------------------------------------------------------
# Bulk rendering.


def _per_tile(lon, lat, tile_bounds, height, width):
  return np.stack([hm.render_heatmap(*hm.lonlat_to_pixel(lon, lat, bounds, height, width),
                                     height, width) for bounds in tile_bounds])


def _edge_points(tile_bounds):
  """Points exactly on, and one ulp either side of, every tile edge (worst case for rounding)."""
  west, south, east, north = np.asarray(tile_bounds).T
  xs = np.concatenate([west, east])
  ys = np.concatenate([south, north])
  xs = np.concatenate([xs, np.nextafter(xs, -np.inf), np.nextafter(xs, np.inf)])
  ys = np.concatenate([ys, np.nextafter(ys, -np.inf), np.nextafter(ys, np.inf)])
  grid_x, grid_y = np.meshgrid(xs, ys)
  return grid_x.ravel(), grid_y.ravel()


def test_render_tiles_regular_grid_equals_per_tile():
  # 3 x 4 grid of tiles with shared (bit-identical) edges, origin chosen so that edges are
  # not exactly representable and rounding at the edges is exercised.
  xs = 116.1 + 0.0137 * np.arange(5)
  ys = 39.9 + 0.0113 * np.arange(4)
  tile_bounds = np.array([[xs[c], ys[r], xs[c + 1], ys[r + 1]]
                          for r in range(3) for c in range(4)])
  rng = np.random.default_rng(2)
  lon = rng.uniform(xs[0] - 0.01, xs[-1] + 0.01, 30000)
  lat = rng.uniform(ys[0] - 0.01, ys[-1] + 0.01, 30000)
  edge_lon, edge_lat = _edge_points(tile_bounds)
  lon = np.concatenate([lon, edge_lon, [np.nan, np.inf, 116.12]])
  lat = np.concatenate([lat, edge_lat, [39.91, 39.91, -np.inf]])
  bulk = hm.render_tiles(lon, lat, tile_bounds, 24, 20, chunk_size=4096)
  assert bulk.shape == (12, 24, 20) and bulk.dtype == np.float32
  np.testing.assert_array_equal(bulk, _per_tile(lon, lat, tile_bounds, 24, 20))
  assert (bulk.max(axis=(1, 2)) > 0).all()


def test_render_tiles_overlapping_and_nested_tiles_equal_per_tile():
  rng = np.random.default_rng(3)
  west = rng.uniform(0, 1, 9)
  south = rng.uniform(0, 1, 9)
  tile_bounds = np.stack([west, south, west + rng.uniform(0.2, 0.6, 9),
                          south + rng.uniform(0.2, 0.6, 9)], axis=1)
  # A duplicate pair, a far tile and a very wide one: in the wide tile, x = nextafter(1, -inf)
  # is inside the box [-1000, 1) but (x + 1000) rounds to 1001, so the per-tile formula puts it
  # at col == width, outside; bulk rendering must drop it too.
  tile_bounds = np.concatenate([tile_bounds, [[0.3, 0.3, 0.5, 0.5], [0.3, 0.3, 0.5, 0.5],
                                              [5.0, 5.0, 6.0, 6.0], [-1000.0, 0.0, 1.0, 1.0]]])
  lon = rng.uniform(-0.2, 1.8, 20000)
  lat = rng.uniform(-0.2, 1.8, 20000)
  edge_lon, edge_lat = _edge_points(np.delete(tile_bounds, 11, axis=0))  # none in the far tile
  lon, lat = np.concatenate([lon, edge_lon]), np.concatenate([lat, edge_lat])
  wide_cols, _ = hm.lonlat_to_pixel(lon, lat, tile_bounds[12], 16, 12)
  assert np.any((lon < 1.0) & (wide_cols >= 12))  # the rounding case above does occur
  bulk = hm.render_tiles(lon, lat, tile_bounds, 16, 12, chunk_size=997)
  np.testing.assert_array_equal(bulk, _per_tile(lon, lat, tile_bounds, 16, 12))
  np.testing.assert_array_equal(bulk[9], bulk[10])
  assert not bulk[11].any()


def test_render_tiles_out_memmap_and_generator(tmp_path):
  tile_bounds = np.array([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0]])
  rng = np.random.default_rng(4)
  lon, lat = rng.uniform(0, 2, 3000), rng.uniform(0, 1, 3000)
  out = np.lib.format.open_memmap(tmp_path / "tiles.npy", mode="w+", dtype=np.float32,
                                  shape=(2, 8, 8))
  result = hm.render_tiles(lon, lat, tile_bounds, 8, 8, out=out)
  assert result is out
  out.flush()
  expected = _per_tile(lon, lat, tile_bounds, 8, 8)
  np.testing.assert_array_equal(np.load(tmp_path / "tiles.npy"), expected)
  yielded = list(hm.iter_render_tiles(lon, lat, tile_bounds, 8, 8, chunk_size=100))
  assert [index for index, _ in yielded] == [0, 1]
  np.testing.assert_array_equal(np.stack([tile for _, tile in yielded]), expected)
  with pytest.raises(ValueError, match="out must be float32"):
    hm.render_tiles(lon, lat, tile_bounds, 8, 8, out=np.zeros((2, 8, 7), np.float32))


def test_render_tiles_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"tile_bounds\[1\]"):
    hm.render_tiles([0.5], [0.5], [[0, 0, 1, 1], [2, 0, 1, 1]], 4, 4)
  with pytest.raises(ValueError, match=r"\(T, 4\)"):
    hm.render_tiles([0.5], [0.5], [0, 0, 1, 1], 4, 4)
  with pytest.raises(ValueError, match="equal length"):
    hm.render_tiles([0.5, 0.2], [0.5], [[0, 0, 1, 1]], 4, 4)
  with pytest.raises(ValueError, match="chunk_size"):
    hm.render_tiles([0.5], [0.5], [[0, 0, 1, 1]], 4, 4, chunk_size=0)
  with pytest.raises(ValueError, match="equal length"):  # raised at the call, not at next()
    hm.iter_render_tiles([[0.5]], [[0.5]], [[0, 0, 1, 1]], 4, 4)


# ------------------------------------------------------------------------------------------------
# Bit-exactness of the optimised renderers against the documented formula written plainly.


def _reference_heatmap(cols, rows, height, width):
  """h = log1p(count) / log1p(max count), 3x3 [1, 2, 1] blur with numpy's pad 'reflect', clip,
  float32: the renderer as it was first written, before it was optimised."""
  cols = np.asarray(cols, dtype=np.float64).ravel()
  rows = np.asarray(rows, dtype=np.float64).ravel()
  inside = (np.isfinite(cols) & np.isfinite(rows) & (cols >= 0) & (cols < width) & (rows >= 0)
            & (rows < height))
  flat = rows[inside].astype(np.int64) * width + cols[inside].astype(np.int64)
  counts = np.bincount(flat, minlength=height * width).reshape(height, width)
  if counts.max() == 0:
    return np.zeros((height, width), np.float32)
  normalised = np.log1p(counts.astype(np.float64)) / np.log1p(float(counts.max()))
  padded = np.pad(normalised, 1, mode="reflect")
  vertical = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
  blurred = 0.25 * vertical[:, :-2] + 0.5 * vertical[:, 1:-1] + 0.25 * vertical[:, 2:]
  return np.clip(blurred, 0.0, 1.0).astype(np.float32)


def _reference_tiles(lon, lat, tile_bounds, height, width):
  tiles = []
  for west, south, east, north in np.asarray(tile_bounds, dtype=np.float64):
    lon64, lat64 = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
    cols = (lon64 - west) / (east - west) * width
    rows = (north - lat64) / (north - south) * height
    tiles.append(_reference_heatmap(cols, rows, height, width))
  return np.stack(tiles)


def test_heatmap_pinned_values_3x3_single_point():
  # Reflect-101 on a 3 x 3 tile mirrors the centre onto every border, so the blurred single
  # sample is 0.25 everywhere: vertical pass [0.5, 0.5, 0.5] in the middle column (the border
  # rows see the centre twice), then each horizontal neighbour adds a quarter of it.
  heatmap = hm.render_heatmap([1.5], [1.5], 3, 3)
  np.testing.assert_array_equal(heatmap, np.full((3, 3), 0.25, np.float32))
  # Counts 3 and 1: log1p(1) / log1p(3) is 0.5 exactly (log 4 is twice log 2 in binary too).
  heatmap = hm.render_heatmap([0.5, 0.5, 0.5, 4.5], [0.5, 0.5, 0.5, 0.5], 1, 5)
  # One row: the vertical pass is the identity; row [1, 0, 0, 0, 0.5] blurred with reflect-101.
  np.testing.assert_array_equal(heatmap, np.array([[0.5, 0.25, 0.0, 0.125, 0.25]], np.float32))


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 7), (16, 5), (64, 96)])
def test_render_heatmap_bit_identical_to_reference(shape):
  height, width = shape
  rng = np.random.default_rng(height * 1000 + width)
  for n in (1, 3, 50, 5000):
    cols = rng.uniform(-0.3 * width, 1.3 * width, n)
    rows = rng.uniform(-0.3 * height, 1.3 * height, n)
    cols[::7] = np.floor(cols[::7])  # exactly on pixel edges
    if n > 10:
      cols[::11], rows[::13] = np.nan, np.inf
    np.testing.assert_array_equal(hm.render_heatmap(cols, rows, height, width),
                                  _reference_heatmap(cols, rows, height, width))
  # Skewed counts: the maximum count exceeds the number of pixels (no look-up table then).
  cols = rng.uniform(0, width, 20 * height * width + 20)
  rows = rng.uniform(0, height, cols.size) ** 4 / height ** 3
  np.testing.assert_array_equal(hm.render_heatmap(cols, rows, height, width),
                                _reference_heatmap(cols, rows, height, width))


def test_render_heatmap_blur_strips_do_not_change_bits(monkeypatch):
  rng = np.random.default_rng(7)
  cols, rows = rng.uniform(0, 13, 3000), rng.uniform(0, 11, 3000)
  expected = _reference_heatmap(cols, rows, 11, 13)
  for strip_values in (1, 15, 16, 40, 1 << 16):  # one row per strip ... the whole tile
    monkeypatch.setattr(hm, "_BLUR_STRIP_VALUES", strip_values)
    np.testing.assert_array_equal(hm.render_heatmap(cols, rows, 11, 13), expected)


def test_render_channels_heatmap_and_means_bit_identical_to_reference():
  rng = np.random.default_rng(8)
  cols, rows = rng.uniform(-2, 10, 4000), rng.uniform(-2, 10, 4000)
  speed = rng.uniform(0, 3000, 4000)
  speed[::9] = np.nan
  out = hm.render_channels(cols, rows, 8, 8, speed=speed, channels=("heatmap", "mean_speed"))
  np.testing.assert_array_equal(out[..., 0], _reference_heatmap(cols, rows, 8, 8))
  inside = (cols >= 0) & (cols < 8) & (rows >= 0) & (rows < 8) & np.isfinite(speed)
  flat = rows[inside].astype(int) * 8 + cols[inside].astype(int)
  unit = np.clip(speed[inside] / hm.SPEED_SCALE_M_PER_MIN, 0, 1)
  sums = np.bincount(flat, weights=unit, minlength=64)
  counts = np.bincount(flat, minlength=64)
  mean = np.divide(sums, counts, out=np.zeros(64), where=counts > 0)
  np.testing.assert_array_equal(out[..., 1], mean.reshape(8, 8).astype(np.float32))


def _near(values, rng, n):
  """n values at or within 3 ulps of randomly chosen `values`."""
  picked = rng.choice(values, n)
  steps = rng.integers(-3, 4, n)
  for step in range(1, 4):
    picked[steps >= step] = np.nextafter(picked[steps >= step], np.inf)
    picked[steps <= -step] = np.nextafter(picked[steps <= -step], -np.inf)
  return picked


@pytest.mark.parametrize("edges", [
    116.2 + 5.366e-6 * 256 * np.arange(5),  # a regular grid of tiles
    np.sort(np.random.default_rng(9).uniform(0, 1, 30)),  # irregular
    np.array([-1000.0, 0.0, 0.3, 0.5, 1.0]),  # one very wide gap
    np.array([1e15, 1e15 + 0.125, 1e15 + 0.25, 1e15 + 1000]),  # bins near the float spacing
    np.array([1.0, np.nextafter(1.0, 2), np.nextafter(np.nextafter(1.0, 2), 2)]),  # no table
    np.array([-1e300, 1e300]),
    np.array([0.0, 1e-300, 1.0]),
])
def test_sorted_edges_find_equals_searchsorted(edges):
  rng = np.random.default_rng(10)
  span = edges[-1] - edges[0]
  values = np.concatenate([
      _near(edges, rng, 5000), rng.uniform(edges[0] - span, edges[-1] + span, 5000), edges,
      [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, -5e-324]])
  for side in ("left", "right"):
    lookup = hm._SortedEdges(edges, side)
    found = lookup.find(values, np.empty(values.size, np.intp), hm._Scratch())
    np.testing.assert_array_equal(found, np.searchsorted(edges, values, side))


@pytest.mark.parametrize("chunk_size", [1, 7, 1000, hm.DEFAULT_CHUNK_SIZE])
def test_render_tiles_bit_identical_to_reference_any_chunking(chunk_size):
  # An irregular grid (uneven column widths, a missing tile) at BJRoad-like coordinates.
  xs = 116.2 + np.cumsum([0.0, 0.0013, 0.0021, 0.0013, 0.0017])
  ys = 40.1 - np.cumsum([0.0, 0.0011, 0.0009, 0.0012])
  tile_bounds = np.array([[xs[c], ys[r + 1], xs[c + 1], ys[r]]
                          for r in range(3) for c in range(4) if (r, c) != (1, 2)])
  rng = np.random.default_rng(11)
  n = 3000 if chunk_size == 1 else 20000
  lon = rng.uniform(xs[0] - 0.001, xs[-1] + 0.001, n)
  lat = rng.uniform(ys[-1] - 0.001, ys[0] + 0.001, n)
  edge_lon, edge_lat = _edge_points(tile_bounds)
  lon = np.concatenate([lon, edge_lon, [np.nan, np.inf, 116.201, -np.inf]])
  lat = np.concatenate([lat, edge_lat, [40.09, 40.09, np.nan, 40.09]])
  bulk = hm.render_tiles(lon, lat, tile_bounds, 12, 10, chunk_size=chunk_size)
  np.testing.assert_array_equal(bulk, _reference_tiles(lon, lat, tile_bounds, 12, 10))
  assert (bulk.max(axis=(1, 2)) > 0).all()


@pytest.mark.parametrize("height, width", [(9, 14), (300, 257)])
def test_render_tiles_64_bit_keys_and_overlaps_bit_identical(monkeypatch, height, width):
  # (tile, pixel) keys are uint32 unless there are too many; force the uint64 path.
  monkeypatch.setattr(hm, "_MAX_32_BIT_KEYS", 0)
  rng = np.random.default_rng(12)
  west, south = rng.uniform(0, 1, 6), rng.uniform(0, 1, 6)
  tile_bounds = np.stack([west, south, west + 0.4, south + 0.3], axis=1)
  lon, lat = rng.uniform(-0.1, 1.5, 20000), rng.uniform(-0.1, 1.4, 20000)
  bulk = hm.render_tiles(lon, lat, tile_bounds, height, width, chunk_size=3001)
  np.testing.assert_array_equal(bulk, _reference_tiles(lon, lat, tile_bounds, height, width))


def test_render_tiles_sparse_and_dense_tiles_in_turn():
  # One count buffer serves every tile; after a sparse tile only its points' pixels are
  # reset. Alternate sparse tiles (a few points in 40 x 40 pixels) with dense ones.
  edges = np.arange(6) * 0.2
  tile_bounds = np.array([[edges[c], edges[r], edges[c + 1], edges[r + 1]]
                          for r in range(5) for c in range(5)])
  rng = np.random.default_rng(14)
  lon, lat = rng.uniform(0, 1, 1500), rng.uniform(0, 1, 1500)
  dense = rng.choice(25, 8, replace=False)
  more_lon = tile_bounds[dense, 0][:, None] + rng.uniform(0, 0.2, (8, 2000))
  more_lat = tile_bounds[dense, 1][:, None] + rng.uniform(0, 0.2, (8, 2000))
  lon, lat = np.concatenate([lon, more_lon.ravel()]), np.concatenate([lat, more_lat.ravel()])
  bulk = hm.render_tiles(lon, lat, tile_bounds, 40, 40, chunk_size=4096)
  np.testing.assert_array_equal(bulk, _reference_tiles(lon, lat, tile_bounds, 40, 40))


def test_render_tiles_empty_table_and_many_tiles():
  bounds = [[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0]]
  assert not hm.render_tiles(np.zeros(0), np.zeros(0), bounds, 3, 4).any()
  # A 190 x 190 grid of 2 x 2 pixel tiles (more tiles than an int16 holds).
  n = 190
  edges = np.arange(n + 1) / n
  tile_bounds = np.array([[edges[c], edges[r], edges[c + 1], edges[r + 1]]
                          for r in range(n) for c in range(n)])
  rng = np.random.default_rng(13)
  lon, lat = rng.uniform(-0.05, 1.05, 100000), rng.uniform(-0.05, 1.05, 100000)
  bulk = hm.render_tiles(lon, lat, tile_bounds, 2, 2)
  picked = rng.choice(tile_bounds.shape[0], 40, replace=False)
  np.testing.assert_array_equal(bulk[picked],
                                _reference_tiles(lon, lat, tile_bounds[picked], 2, 2))


def test_tiled_heatmap_normalises_each_grid_tile_by_its_own_maximum():
  """A 20 x 20 raster on 16 px tiles: the grid is 32 x 32. Tile (1, 1) holds one point at pixel
  (18, 18) and three at (25, 25), past the raster but inside the padded tile, so its maximum
  count is 3: (18, 18) gets log 2 / log 4 = 0.5 -> blurred centre 0.5 * 4/16 = 0.125 -> 32.
  Tile (0, 0)'s single point peaks at 1 -> 64, whatever the other tile holds."""
  cols = [18.5, 25.5, 25.5, 25.5, 3.5, 40.0, np.nan]
  rows = [18.5, 25.5, 25.5, 25.5, 2.5, 1.0, 1.0]
  grid, stats = hm.render_tiled_heatmap_uint8(cols, rows, 20, 20, 16)
  assert grid.shape == (32, 32) and grid.dtype == np.uint8
  assert grid[18, 18] == 32 and grid[25, 25] == 64 and grid[2, 3] == 64
  assert grid[17, 18] == 16  # 0.5 * 2/16 * 255 = 15.9
  assert (stats.n_total, stats.n_rendered, stats.n_outside, stats.n_nonfinite) == (7, 5, 1, 1)
  # Each tile equals render_heatmap of its own points alone.
  alone = hm.heatmap_to_uint8(hm.render_heatmap([2.5, 9.5, 9.5, 9.5],
                                                          [2.5, 9.5, 9.5, 9.5], 16, 16))
  np.testing.assert_array_equal(grid[16:, 16:], alone)
  with pytest.raises(ValueError, match='tile_size'):
    hm.render_tiled_heatmap_uint8(cols, rows, 20, 20, 0)
