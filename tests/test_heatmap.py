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
