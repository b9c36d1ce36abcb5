"""GPS samples -> trajectory rasters: the paper's heat-map, Sun et al.'s channels, augmentations.

Pixel convention used everywhere in this module: a point has continuous pixel coordinates
(col, row) with col = x growing east and row = y growing south; it falls in pixel
(floor(row), floor(col)) and is inside an H x W tile iff 0 <= col < W and 0 <= row < H.
Points outside the tile or with a NaN/inf coordinate are dropped and counted (RenderStats),
never raised on: GPS tables always hold points of the neighbouring tiles and glitches.

Heat-map (paper, section III): count the samples per pixel, normalise with a logarithm,
smooth with a 3x3 Gaussian. The paper names no exact formula, so this module uses

    h = log(1 + count) / log(1 + max_count_in_tile)      (0 where the tile has no sample)
    heatmap = GaussianBlur3x3(h), kernel [1, 2, 1]^T [1, 2, 1] / 16, border reflect-101

because (a) log(1 + c) maps an empty pixel to 0 and keeps a single sample visible, which is
the stated purpose of the logarithm (pale, rarely travelled roads); (b) dividing by the tile's
own maximum puts every tile in [0, 1] whatever its traffic, which is what the later GPS
rendering work on BJRoad does (TCRender's log render); (c) [1, 2, 1] / 4 is exactly what
OpenCV's GaussianBlur(ksize=3, sigma=0) uses (sigma 0.8), with the same default border, so the
result equals cv2.GaussianBlur on the normalised map. The blur is a convex combination, so the
output stays in [0, 1]; it is not re-normalised after smoothing.

Bulk rendering (`render_tiles`, `iter_render_tiles`) buckets a whole city's table in one pass
and reproduces `render_heatmap(*lonlat_to_pixel(lon, lat, bounds, H, W), H, W)` bit for bit
for every tile, overlapping or not.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import numpy as np

# Sun et al. store speed * 0.1 clipped to 255 (uint8) and interval * 0.5 clipped to 255, i.e.
# speed saturates at 2550 m/min (153 km/h) and the sampling interval at 510 s.
SPEED_SCALE_M_PER_MIN = 2550.0
INTERVAL_SCALE_S = 510.0

CHANNEL_NAMES = ("heatmap", "mean_speed", "max_speed", "mean_interval", "heading_sin",
                 "heading_cos")
# Which keyword argument of `render_channels` each channel is computed from.
_CHANNEL_INPUT = {
    "heatmap": None,
    "mean_speed": "speed",
    "max_speed": "speed",
    "mean_interval": "interval",
    "heading_sin": "heading_deg",
    "heading_cos": "heading_deg",
}

DEFAULT_CHUNK_SIZE = 1 << 17
# Bulk rendering packs (tile, pixel) into uint32 keys when there are at most this many keys,
# else into uint64 (a module constant so that tests can reach the uint64 path with small tiles).
_MAX_32_BIT_KEYS = 1 << 32

# The blur kernel along one axis (outer product gives the 3x3 kernel); exact in binary.
_BLUR_TAPS = (0.25, 0.5, 0.25)


@dataclasses.dataclass(frozen=True)
class RenderStats:
  """What happened to the points handed to a renderer.

  n_total = n_rendered + n_outside + n_nonfinite.
  """
  n_total: int
  n_rendered: int
  n_outside: int
  n_nonfinite: int


# ----------------------------------------------------------------------------------------------
# Coordinates.


def check_bounds(bounds, name: str = "bounds") -> tuple[float, float, float, float]:
  """(west, south, east, north) as four Python floats; ValueError naming `name` unless finite
  with west < east and south < north."""
  values = np.asarray(bounds, dtype=np.float64)
  if values.shape != (4,):
    raise ValueError(f"{name} must be (west, south, east, north), got shape {values.shape}")
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name} must be finite, got {tuple(values.tolist())}")
  west, south, east, north = (float(v) for v in values)
  if not (west < east and south < north):
    raise ValueError(
        f"{name} must satisfy west < east and south < north, got {tuple(values.tolist())}")
  return west, south, east, north


def _check_size(height: int, width: int) -> tuple[int, int]:
  for name, value in (("height", height), ("width", width)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if int(height) * int(width) >= 2**31:
    raise ValueError(f"tile of {height} x {width} pixels is too large (pixel index is int32)")
  return int(height), int(width)


def _project(lon, lat, west, south, east, north, height, width):
  """The one formula mapping lon/lat to continuous pixel coordinates (float64).

  `render_tiles` calls it with per-point arrays of bounds, `lonlat_to_pixel` with scalars; the
  arithmetic is elementwise IEEE and identical, which makes bulk rendering bit-exact. The form
  (x - west) / (east - west) * width (not x * precomputed_scale) guarantees x >= east gives
  col >= width, so a point is never inside a tile whose box [west, east) x (south, north] it
  lies outside of; the bulk bucketing relies on that.
  """
  cols = np.subtract(lon, west)
  cols /= east - west
  cols *= width
  rows = np.subtract(north, lat)
  rows /= north - south
  rows *= height
  return cols, rows


def lonlat_to_pixel(lon, lat, bounds, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Maps lon/lat to continuous pixel coordinates of a tile by a linear mapping.

  Args:
    lon, lat: float arrays (any equal shape) in degrees (or any planar x/y in bounds' units).
    bounds: (west, south, east, north) of the tile, same units as lon/lat.
    height, width: tile size in pixels.

  Returns:
    (cols, rows): float64 arrays of lon's shape. The north-west corner is (0, 0), the
    south-east corner (width, height); pixel (r, c) covers cols [c, c+1), rows [r, r+1).
  """
  west, south, east, north = check_bounds(bounds)
  height, width = _check_size(height, width)
  lon = np.asarray(lon, dtype=np.float64)
  lat = np.asarray(lat, dtype=np.float64)
  if lon.shape != lat.shape:
    raise ValueError(f"lon and lat must have the same shape, got {lon.shape} and {lat.shape}")
  return _project(lon, lat, west, south, east, north, height, width)


# ----------------------------------------------------------------------------------------------
# Per-tile rendering.


def _points(cols, rows) -> tuple[np.ndarray, np.ndarray]:
  cols = np.asarray(cols, dtype=np.float64).ravel()
  rows = np.asarray(rows, dtype=np.float64).ravel()
  if cols.shape != rows.shape:
    raise ValueError(f"cols and rows must have the same number of points, got {cols.size} "
                     f"and {rows.size}")
  return cols, rows


class _Scratch:
  """Temporaries reused from chunk to chunk and from tile to tile.

  A fresh megabyte-sized array per step can cost more than the arithmetic on it: the
  allocator hands freed megabytes back to the system and the next use faults them in again,
  page by page (about 2 ms per 8 MB array here). Buffers are made on first use, grown when a
  larger one is asked for, and handed out as views of the requested shape.
  """

  def __init__(self):
    self._buffers = {}

  def get(self, name: str, dtype, shape) -> np.ndarray:
    """A buffer of this shape (an int, or a tuple for 2-D) and dtype; contents undefined."""
    flat = isinstance(shape, (int, np.integer))
    size = int(shape) if flat else math.prod(shape)
    buffer = self._buffers.get(name)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
      buffer = self._buffers[name] = np.empty(size, dtype=dtype)
    return buffer[:size] if flat else buffer[:size].reshape(shape)


def _pixel_index(cols: np.ndarray, rows: np.ndarray, height: int, width: int):
  """Flat pixel index (row * width + col, int64) of the inside points, their mask, the stats."""
  # NaN fails every comparison and +-inf fails a bound, so `inside` implies finite.
  inside = cols >= 0
  inside &= cols < width
  inside &= rows >= 0
  inside &= rows < height
  # np.compress, not rows[inside]: same values, several times faster on a mixed mask.
  # Inside points are non-negative, so truncation is floor.
  flat = np.compress(inside, rows).astype(np.int64)
  flat *= width
  flat += np.compress(inside, cols).astype(np.int64)
  n_total = int(cols.size)
  n_rendered = int(flat.size)
  n_nonfinite = 0
  if n_rendered < n_total:  # only points outside the tile can be non-finite
    finite = np.isfinite(cols)
    finite &= np.isfinite(rows)
    n_nonfinite = int(n_total - np.count_nonzero(finite))
  stats = RenderStats(n_total=n_total, n_rendered=n_rendered,
                      n_outside=n_total - n_rendered - n_nonfinite, n_nonfinite=n_nonfinite)
  return flat, inside, stats


def count_points(cols, rows, height: int, width: int) -> tuple[np.ndarray, RenderStats]:
  """Number of points per pixel.

  Args:
    cols, rows: float arrays of pixel coordinates (col = x, row = y), same length.
    height, width: tile size.

  Returns:
    (counts, stats): counts is int64 (height, width); stats says how many points were rendered,
    fell outside the tile, or had a NaN/inf coordinate.
  """
  height, width = _check_size(height, width)
  cols, rows = _points(cols, rows)
  flat, _, stats = _pixel_index(cols, rows, height, width)
  counts = np.bincount(flat, minlength=height * width).reshape(height, width)
  return counts, stats


def gaussian_blur_3x3(values: np.ndarray) -> np.ndarray:
  """3x3 Gaussian blur [1, 2, 1]^T [1, 2, 1] / 16 with OpenCV's default reflect-101 border.

  Args:
    values: float (H, W) array.

  Returns:
    float64 (H, W), equal to cv2.GaussianBlur(values, (3, 3), 0) up to float rounding.
  """
  values = np.asarray(values, dtype=np.float64)
  if values.ndim != 2:
    raise ValueError(f"gaussian_blur_3x3 expects an (H, W) array, got shape {values.shape}")
  # numpy's 'reflect' mirrors without repeating the edge sample, i.e. OpenCV's BORDER_REFLECT_101.
  padded = np.pad(values, 1, mode="reflect")
  a, b, c = _BLUR_TAPS
  vertical = a * padded[:-2] + b * padded[1:-1] + c * padded[2:]
  return a * vertical[:, :-2] + b * vertical[:, 1:-1] + c * vertical[:, 2:]


# Rows per strip of the blur: 2**16 float64 values (512 KiB) per buffer stay in the CPU's cache.
_BLUR_STRIP_VALUES = 1 << 16


def _blur_into(values: np.ndarray, out: np.ndarray, scratch: _Scratch) -> None:
  """out[...] = gaussian_blur_3x3(values) (cast to out's dtype), for values in {0} u [2**-1000, 1].

  gaussian_blur_3x3 computes, per axis, (0.25 * up + 0.5 * mid) + 0.25 * down with IEEE
  rounding after each addition. Multiplying by a power of two is exact and commutes with
  rounding unless a result over- or underflows, so that equals 0.25 * ((up + 2 * mid) + down)
  bit for bit, and the two axes give 1/16 of the unscaled sums computed here. For such values
  no intermediate can over- or underflow (the renderers' normalised counts are 0 or at least
  log(2) / log(2**63)). Strips of rows, so that the passes run in the cache; no padded copy.
  """
  height, width = values.shape
  strip = max(1, min(height, _BLUR_STRIP_VALUES // (width + 2)))
  vertical_buffer = scratch.get("blur_vertical", np.float64, (strip, width + 2))
  horizontal_buffer = scratch.get("blur_horizontal", np.float64, (strip, width))
  for start in range(0, height, strip):
    stop = min(start + strip, height)
    # Vertical pass into the middle columns, one spare column either side.
    vertical = vertical_buffer[:stop - start]
    middle = vertical[:, 1:-1]
    np.multiply(values[start:stop], 2.0, out=middle)
    # + up ((up + 2 * mid) == (2 * mid + up)); reflect-101: row -1 is row 1 (np.pad's
    # 'reflect' repeats the only row of a one-row tile).
    if start == 0:
      middle[0] += values[1 if height > 1 else 0]
      middle[1:] += values[:stop - 1]
    else:
      middle += values[start - 1:stop - 1]
    # + down; row `height` is row height - 2.
    if stop == height:
      middle[:-1] += values[start + 1:stop]
      middle[-1] += values[height - 2 if height > 1 else 0]
    else:
      middle += values[start + 1:stop + 1]
    if width > 1:
      vertical[:, 0] = vertical[:, 2]
      vertical[:, -1] = vertical[:, -3]
    else:
      vertical[:, 0] = vertical[:, 1]
      vertical[:, 2] = vertical[:, 1]
    horizontal = np.multiply(middle, 2.0, out=horizontal_buffer[:stop - start])
    horizontal += vertical[:, :-2]
    horizontal += vertical[:, 2:]
    np.multiply(horizontal, 1.0 / 16.0, out=out[start:stop])


def _counts_to_heatmap(counts: np.ndarray, out: np.ndarray | None = None,
                       scratch: _Scratch | None = None, max_count: int | None = None) -> np.ndarray:
  """(H, W) integer counts -> float32 (H, W) heat-map in [0, 1] (log-normalise, then blur).

  Bit for bit np.clip(gaussian_blur_3x3(np.log1p(counts) / np.log1p(max_count)), 0, 1) as
  float32 (written into `out` when given), computed faster:
  - the normalised values are a function of the count alone, so they are looked up in a table
    of log1p(0..max_count) / log1p(max_count) (the same ufuncs on the same float64 values);
  - the blur runs unscaled, in cache-sized strips (_blur_into), the exact 1/16 applied while
    casting to float32;
  - the clip is left out: it cannot change anything, since the blur of values in [0, 1] with
    these weights stays in [0, 1] (each rounded partial sum is bounded by the exact bound,
    which is representable) and is never -0.0 (sums of non-negative values, log1p(0) = +0).
  max_count, when given, must be counts.max().
  """
  if out is None:
    out = np.empty(counts.shape, dtype=np.float32)
  if scratch is None:
    scratch = _Scratch()
  if max_count is None:
    max_count = int(counts.max()) if counts.size else 0
  if max_count == 0:
    out[...] = 0.0
    return out
  scale = np.log1p(float(max_count))
  normalised = scratch.get("normalised", np.float64, counts.shape)
  if max_count <= counts.size:
    table = np.log1p(np.arange(max_count + 1, dtype=np.float64))
    table /= scale
    np.take(table, counts, out=normalised, mode="clip")  # every count is a valid index
  else:  # a table larger than the tile would cost more than it saves
    np.log1p(counts, out=normalised, dtype=np.float64)
    normalised /= scale
  _blur_into(normalised, out, scratch)
  return out


def render_heatmap(cols, rows, height: int, width: int, *, return_stats: bool = False):
  """Renders GPS samples into the paper's trajectory heat-map.

  h = log(1 + count) / log(1 + max count of the tile), then a 3x3 Gaussian blur ([1, 2, 1] / 4
  per axis, reflect-101 border); see the module docstring for why this normalisation.

  Args:
    cols, rows: float arrays of pixel coordinates (col = x, row = y), same length; a point at
      (col, row) falls in pixel (floor(row), floor(col)). Points outside the tile or with a
      NaN/inf coordinate are dropped and counted.
    height, width: tile size H, W.
    return_stats: also return a RenderStats.

  Returns:
    float32 (H, W) in [0, 1]; all zeros when no point falls in the tile. With return_stats,
    (heatmap, RenderStats).
  """
  counts, stats = count_points(cols, rows, height, width)
  heatmap = _counts_to_heatmap(counts)
  return (heatmap, stats) if return_stats else heatmap


def heatmap_to_uint8(heatmap) -> np.ndarray:
  """Heat-map in [0, 1] -> uint8 of the same shape, round(h * 255) (round half to even)."""
  heatmap = np.asarray(heatmap)
  if not np.issubdtype(heatmap.dtype, np.floating):
    raise ValueError(f"heatmap must be a float array, got dtype {heatmap.dtype}")
  if not np.all(np.isfinite(heatmap)):
    raise ValueError("heatmap contains NaN or inf")
  if heatmap.size and (heatmap.min() < 0 or heatmap.max() > 1):
    raise ValueError(f"heatmap values must lie in [0, 1], got [{heatmap.min()}, {heatmap.max()}]")
  return np.rint(heatmap.astype(np.float64) * 255.0).astype(np.uint8)


def grid_extent(height: int, width: int, tile_size: int) -> tuple[int, int]:
  """(rows, cols) of pixels covered by the tile grid of an H x W raster: H and W rounded up to
  whole tiles of tile_size (the right/bottom tiles are padded past the raster's edge)."""
  height, width = _check_size(height, width)
  if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
    raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
  return -(-height // tile_size) * tile_size, -(-width // tile_size) * tile_size


def render_tiled_heatmap_uint8(cols, rows, height: int, width: int, tile_size: int
                               ) -> tuple[np.ndarray, RenderStats]:
  """The uint8 heat-map of a raster cut into a grid of tile_size tiles, each tile normalised by
  its own maximum: the dataset builders' tiles, and prediction's aux, come from this one function.

  The grid starts at the raster's top-left pixel; tile (i, j) covers rows [i*T, (i+1)*T) and cols
  [j*T, (j+1)*T), T = tile_size, and the last row/column of tiles reaches past the raster (as
  the builders' zero-padded edge tiles do: a point there still counts for its tile's maximum).
  Every tile is heatmap_to_uint8(render_heatmap(points of the tile in tile coordinates, T, T)),
  so the heat-map of one tile does not depend on its neighbours' traffic, and the same tile
  comes out bit-identical whether it is rendered alone or as part of a mosaic.

  Args:
    cols, rows: float pixel coordinates of the raster (see the module's convention).
    height, width: raster size.
    tile_size: grid step T (the dataset's tile size).

  Returns:
    (heatmap, stats): uint8 (Hg, Wg), (Hg, Wg) = grid_extent(height, width, tile_size); crop
    [:height, :width] for the raster. stats counts points inside the grid's extent as rendered.
  """
  grid_height, grid_width = grid_extent(height, width, tile_size)
  cols, rows = _points(cols, rows)
  out = np.zeros((grid_height, grid_width), np.uint8)
  finite = np.isfinite(cols) & np.isfinite(rows)
  inside = finite & (cols >= 0) & (cols < grid_width) & (rows >= 0) & (rows < grid_height)
  index = np.flatnonzero(inside)
  tile_rows = (rows[index] // tile_size).astype(np.int64)
  tile_cols = (cols[index] // tile_size).astype(np.int64)
  n_tile_cols = grid_width // tile_size
  keys = tile_rows * n_tile_cols + tile_cols
  order = np.argsort(keys, kind="stable")
  keys, index = keys[order], index[order]
  starts = np.flatnonzero(np.diff(keys)) + 1
  for chunk in np.split(np.arange(keys.size), starts) if keys.size else ():
    tile_row, tile_col = divmod(int(keys[chunk[0]]), n_tile_cols)
    row0, col0 = tile_row * tile_size, tile_col * tile_size
    points = index[chunk]
    heatmap = render_heatmap(cols[points] - col0, rows[points] - row0, tile_size, tile_size)
    out[row0:row0 + tile_size, col0:col0 + tile_size] = heatmap_to_uint8(heatmap)
  n_total = int(cols.size)
  n_nonfinite = int(np.count_nonzero(~finite))
  n_rendered = int(index.size)
  return out, RenderStats(n_total=n_total, n_rendered=n_rendered,
                          n_outside=n_total - n_rendered - n_nonfinite, n_nonfinite=n_nonfinite)


# ----------------------------------------------------------------------------------------------
# Sun et al.'s extra channels.


def _attribute(values, n_points: int, name: str) -> np.ndarray:
  values = np.asarray(values, dtype=np.float64).ravel()
  if values.size != n_points:
    raise ValueError(f"{name} has {values.size} values but there are {n_points} points")
  return values


def _mean_per_pixel(flat: np.ndarray, values: np.ndarray, n_pixels: int) -> np.ndarray:
  """Mean of the finite values per pixel, 0 where a pixel has none; float64 (n_pixels,)."""
  keep = np.isfinite(values)
  flat = np.compress(keep, flat)
  sums = np.bincount(flat, weights=np.compress(keep, values), minlength=n_pixels)
  counts = np.bincount(flat, minlength=n_pixels)
  return np.divide(sums, counts, out=np.zeros(n_pixels), where=counts > 0)


def _max_per_pixel(flat: np.ndarray, values: np.ndarray, n_pixels: int) -> np.ndarray:
  """Max of the finite values per pixel, 0 where a pixel has none; float64 (n_pixels,)."""
  keep = np.isfinite(values)
  flat, values = np.compress(keep, flat), np.compress(keep, values)
  result = np.zeros(n_pixels)
  if flat.size == 0:
    return result
  # Sort by pixel, then value: the last entry of each pixel's run is its maximum.
  order = np.lexsort((values, flat))
  flat, values = flat[order], values[order]
  last = np.append(flat[1:] != flat[:-1], True)
  result[flat[last]] = values[last]
  return result


def render_channels(cols, rows, height: int, width: int, *, speed=None, interval=None,
                    heading_deg=None, channels: Sequence[str] | None = None,
                    speed_scale: float = SPEED_SCALE_M_PER_MIN,
                    interval_scale: float = INTERVAL_SCALE_S,
                    heading_zero_is_missing: bool = True) -> np.ndarray:
  """Renders the heat-map and Sun et al.'s per-pixel attribute channels.

  Channels (names in CHANNEL_NAMES), all in [0, 1], 0 on pixels without a usable point:
    heatmap:       render_heatmap (the only smoothed channel).
    mean_speed:    mean over the pixel's points of clip(speed / speed_scale, 0, 1).
    max_speed:     max over the pixel's points of clip(speed / speed_scale, 0, 1).
    mean_interval: mean of clip(interval / interval_scale, 0, 1).
    heading_sin:   (1 + mean sin(heading)) / 2; heading clockwise from north, so sin is the
                   east component of the direction of travel.
    heading_cos:   (1 + mean cos(heading)) / 2 (north component).
  Defaults follow Sun et al.: speed in m/min saturating at 2550 m/min, interval in s
  saturating at 510 s. Attribute values that are NaN/inf are ignored for that channel (BJRoad's
  first record of a vehicle has no interval). BJRoad writes heading 0 both for north and for a
  stopped vehicle, so by default (heading_zero_is_missing) heading 0 is ignored, as Sun et al. do.

  Args:
    cols, rows: pixel coordinates as in render_heatmap.
    height, width: tile size.
    speed, interval, heading_deg: optional per-point float arrays, same length as cols.
    channels: names to render, in this order; None means "heatmap" plus every channel whose
      input was given.
    speed_scale, interval_scale: values mapped to 1.
    heading_zero_is_missing: ignore heading == 0 for the heading channels.

  Returns:
    float32 (H, W, C), C = len(channels).
  """
  height, width = _check_size(height, width)
  cols, rows = _points(cols, rows)
  given = {"speed": speed, "interval": interval, "heading_deg": heading_deg}
  if channels is None:
    channels = [name for name in CHANNEL_NAMES
                if _CHANNEL_INPUT[name] is None or given[_CHANNEL_INPUT[name]] is not None]
  channels = list(channels)
  if not channels:
    raise ValueError("channels must name at least one channel")
  for name in channels:
    if name not in _CHANNEL_INPUT:
      raise ValueError(f"unknown channel {name!r}; known channels: {CHANNEL_NAMES}")
    source = _CHANNEL_INPUT[name]
    if source is not None and given[source] is None:
      raise ValueError(f"channel {name!r} needs the {source}= argument")
  for name, scale in (("speed_scale", speed_scale), ("interval_scale", interval_scale)):
    if not (np.isfinite(scale) and scale > 0):
      raise ValueError(f"{name} must be positive and finite, got {scale}")

  n_pixels = height * width
  flat, inside, _ = _pixel_index(cols, rows, height, width)
  inputs = {key: np.compress(inside, _attribute(value, cols.size, key))
            for key, value in given.items() if value is not None}

  planes = {}
  if "heatmap" in channels:
    counts = np.bincount(flat, minlength=n_pixels).reshape(height, width)
    planes["heatmap"] = _counts_to_heatmap(counts).astype(np.float64).ravel()
  if "speed" in inputs:
    # np.clip keeps NaN, so unusable speeds stay NaN and are skipped per pixel.
    speed_unit = np.clip(inputs["speed"] / speed_scale, 0.0, 1.0)
    if "mean_speed" in channels:
      planes["mean_speed"] = _mean_per_pixel(flat, speed_unit, n_pixels)
    if "max_speed" in channels:
      planes["max_speed"] = _max_per_pixel(flat, speed_unit, n_pixels)
  if "interval" in inputs and "mean_interval" in channels:
    interval_unit = np.clip(inputs["interval"] / interval_scale, 0.0, 1.0)
    planes["mean_interval"] = _mean_per_pixel(flat, interval_unit, n_pixels)
  if "heading_deg" in inputs and ("heading_sin" in channels or "heading_cos" in channels):
    heading = inputs["heading_deg"].copy()
    if heading_zero_is_missing:
      heading[heading == 0] = np.nan
    radians = np.deg2rad(heading)
    has_heading = np.bincount(np.compress(np.isfinite(radians), flat), minlength=n_pixels) > 0
    for name, component in (("heading_sin", np.sin), ("heading_cos", np.cos)):
      if name in channels:
        mean = _mean_per_pixel(flat, component(radians), n_pixels)
        planes[name] = np.where(has_heading, (1.0 + mean) / 2.0, 0.0)

  stacked = np.stack([planes[name] for name in channels], axis=-1)
  return np.clip(stacked, 0.0, 1.0).reshape(height, width, len(channels)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# GPS augmentations (pure functions; every random one takes an int seed or a Generator).


def as_generator(seed) -> np.random.Generator:
  """An int seed or a numpy Generator (passed through) as a Generator; used by fog.py too."""
  if isinstance(seed, np.random.Generator):
    return seed
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int or a numpy Generator, got {seed!r}")
  return np.random.default_rng(int(seed))


def _draw(value, rng: np.random.Generator, name: str, low: float, high: float) -> float:
  """A fixed number, or a uniform draw when value is a (low, high) range; checked in [low, high]."""
  if isinstance(value, (tuple, list)):
    if len(value) != 2 or not value[0] <= value[1]:
      raise ValueError(f"{name} range must be (low, high) with low <= high, got {value}")
    lo, hi = float(value[0]), float(value[1])
    if not (low <= lo and hi <= high):
      raise ValueError(f"{name} range {value} must lie in [{low}, {high}]")
    return float(rng.uniform(lo, hi))
  value = float(value)
  if not (np.isfinite(value) and low <= value <= high):
    raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
  return value


def _with_attributes(cols, rows, attributes):
  cols, rows = _points(cols, rows)
  attributes = tuple(_attribute(a, cols.size, f"attribute {i}") for i, a in enumerate(attributes))
  return cols, rows, attributes


def subsample_points(cols, rows, *attributes, keep_fraction, seed) -> tuple[np.ndarray, ...]:
  """Keeps round(keep_fraction * N) points chosen uniformly without replacement.

  Args:
    cols, rows: float arrays of N point coordinates.
    *attributes: per-point arrays (speed, time, ...) filtered alongside.
    keep_fraction: in [0, 1], or a (low, high) range to draw it from (Sun et al.: (0.01, 1)).
    seed: int or numpy Generator.

  Returns:
    (cols, rows, *attributes) of the kept points, float64, in their original order.
  """
  cols, rows, attributes = _with_attributes(cols, rows, attributes)
  rng = as_generator(seed)
  fraction = _draw(keep_fraction, rng, "keep_fraction", 0.0, 1.0)
  n_keep = int(round(fraction * cols.size))
  kept = np.sort(rng.choice(cols.size, size=n_keep, replace=False))
  return (cols[kept], rows[kept]) + tuple(a[kept] for a in attributes)


def reduce_precision(cols, rows, *, grid_size, seed=None) -> tuple[np.ndarray, np.ndarray]:
  """Snaps coordinates down to a grid of grid_size units: x -> floor(x / grid_size) * grid_size.

  Snapping down (as Sun et al. do) keeps a point of [0, W) inside [0, W). Coordinates are in
  whatever unit the caller uses (pixels, or metres for projected coordinates).

  Args:
    cols, rows: float arrays of point coordinates.
    grid_size: positive grid step, or a (low, high) range drawn with seed.
    seed: int or Generator; needed only when grid_size is a range.

  Returns:
    (cols, rows) float64.
  """
  cols, rows = _points(cols, rows)
  if isinstance(grid_size, (tuple, list)) and seed is None:
    raise ValueError("reduce_precision needs a seed when grid_size is a (low, high) range")
  rng = as_generator(seed) if seed is not None else None
  step = _draw(grid_size, rng, "grid_size", 0.0, np.inf)
  if step <= 0:
    raise ValueError(f"grid_size must be positive, got {step}")
  return np.floor(cols / step) * step, np.floor(rows / step) * step


def perturb_points(cols, rows, *, sigma, seed) -> tuple[np.ndarray, np.ndarray]:
  """Adds independent Gaussian noise N(0, sigma^2) to every coordinate.

  Args:
    cols, rows: float arrays of point coordinates.
    sigma: noise standard deviation in coordinate units (pixels), >= 0, or a (low, high) range
      to draw it from (Sun et al.: (0, 10) pixels).
    seed: int or numpy Generator.

  Returns:
    (cols, rows) float64; points pushed off the tile are dropped later by the renderer.
  """
  cols, rows = _points(cols, rows)
  rng = as_generator(seed)
  sigma = _draw(sigma, rng, "sigma", 0.0, np.inf)
  noise = rng.normal(0.0, sigma, size=(2, cols.size)) if sigma > 0 else np.zeros((2, cols.size))
  return cols + noise[0], rows + noise[1]


def random_omission_rect(height: int, width: int, *, size_fraction=0.5,
                         seed) -> tuple[float, float, float, float]:
  """Draws the rectangle `omit_region` removes: (row0, col0, row1, col1), half-open.

  Its size is size_fraction * (height, width); its centre is uniform over the tile, so it may
  hang over the tile's edge (as in Sun et al., who place a half-size square anywhere).
  """
  height, width = _check_size(height, width)
  rng = as_generator(seed)
  fraction = _draw(size_fraction, rng, "size_fraction", 0.0, 1.0)
  rect_h, rect_w = fraction * height, fraction * width
  centre_row, centre_col = rng.uniform(0.0, height), rng.uniform(0.0, width)
  row0, col0 = centre_row - rect_h / 2, centre_col - rect_w / 2
  return row0, col0, row0 + rect_h, col0 + rect_w


def omit_region(cols, rows, *attributes, height: int, width: int, size_fraction=0.5,
                seed) -> tuple[np.ndarray, ...]:
  """Removes every point inside a random rectangle (simulates an area without GPS coverage).

  The rectangle is random_omission_rect(height, width, size_fraction=..., seed=seed); a point
  is removed iff row0 <= row < row1 and col0 <= col < col1.

  Returns:
    (cols, rows, *attributes) of the remaining points, float64, in their original order.
  """
  cols, rows, attributes = _with_attributes(cols, rows, attributes)
  row0, col0, row1, col1 = random_omission_rect(height, width, size_fraction=size_fraction,
                                                seed=seed)
  keep = ~((rows >= row0) & (rows < row1) & (cols >= col0) & (cols < col1))
  return (cols[keep], rows[keep]) + tuple(a[keep] for a in attributes)


# ----------------------------------------------------------------------------------------------
# Bulk rendering of many tiles from one city-wide table.


def _check_tile_bounds(tile_bounds) -> np.ndarray:
  tile_bounds = np.asarray(tile_bounds, dtype=np.float64)
  if tile_bounds.ndim != 2 or tile_bounds.shape[1] != 4 or tile_bounds.shape[0] == 0:
    raise ValueError(f"tile_bounds must be a non-empty (T, 4) array of (west, south, east, "
                     f"north), got shape {tile_bounds.shape}")
  for index, bounds in enumerate(tile_bounds):
    check_bounds(bounds, name=f"tile_bounds[{index}]")
  return tile_bounds


class _SortedEdges:
  """np.searchsorted(edges, values, side) for many values, exactly, in a few array passes.

  np.searchsorted binary-searches every value (about 13 ns a value here, even for ten edges).
  Instead a value's bin on a fine uniform grid, k = floor((v - origin) * scale) clamped to
  [0, top] (NaN -> top), indexes a table that holds the answer wherever it is certain:

  - Computed with float64 rounding, the position differs from the exact
    V = (v - origin) * scale by a tiny fraction of a bin: each of the two operations is
    correctly rounded, a relative error below 2**-51, so below 2**-11 bins while |V| < 2**40,
    and beyond that the clamp gives the same end bin as the exact position would.
  - Hence a value with computed bin j has V in (j - e, j + 1 + e) for a tiny e, and so has an
    edge with computed bin k_e: an edge can only be on the wrong side of a bin's values when
    |j - k_e| <= 1. Bins with no edge within 2 bins (one bin of margin) are safe: every edge is
    strictly below or strictly above every value of the bin, and the answer, for either side,
    is the number of edges with k_e < j. The other bins (5 per edge) hold -1, and their values
    go to np.searchsorted itself.
  - The end bins 0 and top (values far away, +-inf, NaN) are safe because the edges lie
    `_MARGIN` bins inside them; NaN is clamped to top, whose answer is len(edges), as
    np.searchsorted sorts NaN last.

  With 1024 bins per gap between edges, about 0.5 % of the values of a regular grid of tiles
  fall in unsafe bins.
  """

  _MAX_BINS = 1 << 16
  _MARGIN = 8

  def __init__(self, edges: np.ndarray, side: str):
    self.edges, self.side = edges, side
    self.table = None
    n_gaps = edges.size - 1
    span = float(edges[-1] - edges[0]) if n_gaps > 0 else 0.0
    if not (np.isfinite(span) and span > 0):
      return
    n_bins = n_gaps * max(1, min(1024, self._MAX_BINS // n_gaps))
    self.scale = n_bins / span
    self.origin = float(edges[0]) - self._MARGIN / self.scale
    self.top = n_bins + 2 * self._MARGIN
    if not (np.isfinite(self.scale) and np.isfinite(self.origin)):
      return
    edge_bins = self._bins(edges, np.empty(edges.size), np.empty(edges.size, np.intp))
    if edge_bins[0] < 3 or edge_bins[-1] > self.top - 3:  # cannot happen with finite edges
      return
    # edge_bins is sorted (every step above is monotonic): count edges below each bin.
    table = np.searchsorted(edge_bins, np.arange(self.top + 1), "left")
    for offset in range(-2, 3):
      table[edge_bins + offset] = -1
    self.table = table

  def _bins(self, values: np.ndarray, position: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The clamped bin of every value (intp, into out), computed in `position` (float64)."""
    with np.errstate(over="ignore", invalid="ignore"):  # huge values: +-inf, clamped below
      np.subtract(values, self.origin, out=position)
      position *= self.scale
    np.fmin(position, self.top, out=position)  # NaN -> top (fmin ignores NaN), +inf -> top
    np.fmax(position, 0.0, out=position)  # -inf and everything below -> 0
    np.copyto(out, position, casting="unsafe")  # truncation is floor: position >= 0
    return out

  def find(self, values: np.ndarray, out: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """Writes np.searchsorted(self.edges, values, self.side) into out (intp, values' length)."""
    if self.table is None:
      out[...] = np.searchsorted(self.edges, values, self.side)
      return out
    n = values.size
    bins = self._bins(values, scratch.get("find_position", np.float64, n),
                      scratch.get("find_bins", np.intp, n))
    # mode="clip": no bounds check and no buffering of out (every bin is a valid index).
    np.take(self.table, bins, out=out, mode="clip")
    unsure = np.less(out, 0, out=scratch.get("find_unsure", np.bool_, n))
    if unsure.any():
      unsure = np.flatnonzero(unsure)
      out[unsure] = np.searchsorted(self.edges, values[unsure], self.side)
    return out


def _distinct_sorted(values: np.ndarray) -> np.ndarray:
  """np.unique(values) for finite floats (np.unique's first call imports numpy.ma: 15 ms)."""
  values = np.sort(values)
  return values[np.concatenate([[True], values[1:] != values[:-1]])]


class _TileIndex:
  """Exact point -> candidate tiles lookup.

  The sorted distinct tile edges cut the plane into elementary cells
  [xs[i], xs[i+1]) x (ys[j], ys[j+1]]; each cell lies wholly inside or wholly outside every
  tile box [west, east) x (south, north], so a point's cell (a searchsorted per axis, exact
  comparisons, no rounding) lists exactly the tiles whose box holds it. For tiles on a regular
  grid the cells are the tiles and every point gets at most one candidate. The cell grid has a
  border ring of empty cells, so points left of, right of, above or below every edge (and NaN,
  which searchsorted sorts last) need no separate test.

  Cells of exactly one tile (every cell, on a regular grid) also carry that tile's key and
  projection constants (west, east - west, north, north - south), so their points are
  projected with per-cell table look-ups; every other cell carries NaN constants (its points
  fail every test there) and the dump key. A (point, tile) pair is one unsigned integer,
  key = tile << pixel_bits | flat pixel, so sorting keys groups the pairs by tile; the dump
  key n_tiles << pixel_bits (pairs that are not rendered) sorts after every tile.
  """

  def __init__(self, tile_bounds: np.ndarray, n_pixels: int):
    west, south, east, north = tile_bounds.T
    n_tiles = tile_bounds.shape[0]
    self.xs = _distinct_sorted(np.concatenate([west, east]))
    self.ys = _distinct_sorted(np.concatenate([south, north]))
    # searchsorted returns 0..len(edges): cell columns 0..len(xs), rows 0..len(ys).
    self.n_cell_cols = self.xs.size + 1
    n_cells = self.n_cell_cols * (self.ys.size + 1)
    x0, x1 = np.searchsorted(self.xs, west) + 1, np.searchsorted(self.xs, east) + 1
    y0, y1 = np.searchsorted(self.ys, south) + 1, np.searchsorted(self.ys, north) + 1
    cells, tiles = [], []
    # A loop over tiles (hundreds), not over points.
    for tile, (a, b, c, d) in enumerate(zip(x0, x1, y0, y1)):
      tile_cells = (np.arange(c, d)[:, None] * self.n_cell_cols + np.arange(a, b)[None, :]).ravel()
      cells.append(tile_cells)
      tiles.append(np.full(tile_cells.size, tile, dtype=np.int32))
    cells = np.concatenate(cells)
    tiles = np.concatenate(tiles)
    order = np.argsort(cells, kind="stable")
    self.cell_tiles = tiles[order]
    self.cell_count = np.bincount(cells, minlength=n_cells)
    self.cell_start = np.concatenate([[0], np.cumsum(self.cell_count)[:-1]])
    self.has_multi = bool(np.any(self.cell_count > 1))
    self.x_edges = _SortedEdges(self.xs, "right")  # xs[col-1] <= lon < xs[col]
    self.y_edges = _SortedEdges(self.ys, "left")  # ys[row-1] < lat <= ys[row]
    # Per-cell tables for the cells of exactly one tile.
    self.pixel_bits = (n_pixels - 1).bit_length()
    fits_32_bits = (n_tiles + 1) << self.pixel_bits <= _MAX_32_BIT_KEYS
    self.key_dtype = np.dtype(np.uint32 if fits_32_bits else np.uint64)
    self.dump_key = n_tiles << self.pixel_bits
    single = np.flatnonzero(self.cell_count == 1)
    tile_of_single = self.cell_tiles[self.cell_start[single]]
    self.cell_key = np.full(n_cells, self.dump_key, dtype=self.key_dtype)
    self.cell_key[single] = tile_of_single.astype(self.key_dtype) << self.pixel_bits
    self.cell_constants = []
    for values in (west, east - west, north, north - south):
      table = np.full(n_cells, np.nan)
      table[single] = values[tile_of_single]
      self.cell_constants.append(table)

  def locate(self, lon: np.ndarray, lat: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """The cell (intp) of every point: row-major over the (len(ys) + 1) x (len(xs) + 1) cells."""
    n = lon.size
    cells = self.y_edges.find(lat, scratch.get("cells", np.intp, n), scratch)
    cells *= self.n_cell_cols
    cells += self.x_edges.find(lon, scratch.get("cell_cols", np.intp, n), scratch)
    return cells

  def candidates(self, cells: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(point, tile) pairs, int64 and int32, of the given points (indices) and their cells."""
    per_point = self.cell_count[cells]
    point_index = np.repeat(points, per_point)
    first = np.repeat(self.cell_start[cells], per_point)
    offset_in_cell = np.arange(point_index.size) - np.repeat(np.cumsum(per_point) - per_point,
                                                             per_point)
    return point_index, self.cell_tiles[first + offset_in_cell]


def _bucket_chunk(index: _TileIndex, tile_bounds, lon, lat, height, width, scratch: _Scratch):
  """The keys (tile << pixel_bits | flat pixel, or the dump key) of one chunk's pairs.

  One key per point of the chunk (the dump key for a point in no tile, or in a cell of several
  tiles), then one per (point, tile) pair of the points in cells of several tiles. The
  projection is _project's arithmetic on the same float64 constants (east - west is one IEEE
  subtraction whether it is done per pair or per tile), so pixels are those of per-tile
  rendering bit for bit.
  """
  n = lon.size
  cells = index.locate(lon, lat, scratch)
  keys = np.take(index.cell_key, cells, out=scratch.get("keys", index.key_dtype, n), mode="clip")
  west, x_span, north, y_span = (
      np.take(table, cells, out=scratch.get(f"constant{i}", np.float64, n), mode="clip")
      for i, table in enumerate(index.cell_constants))
  cols = np.subtract(lon, west, out=west)
  cols /= x_span
  cols *= width
  rows = np.subtract(north, lat, out=north)
  rows /= y_span
  rows *= height
  # The point's cell lies in the tile's box, so lon >= west and lat <= north: cols and rows are
  # >= 0 (the difference of two floats has the sign of the exact one). Only rounding at the
  # east and south edges can push a point out, exactly as per-tile rendering would; NaN
  # (cells without exactly one tile) fails both tests.
  inside = np.less(cols, width, out=scratch.get("inside", np.bool_, n))
  inside &= np.less(rows, height, out=scratch.get("inside_rows", np.bool_, n))
  pixels = scratch.get("pixels", index.key_dtype, n)
  pixel_cols = scratch.get("pixel_cols", index.key_dtype, n)
  with np.errstate(invalid="ignore"):  # NaN etc. for points that are not rendered; replaced
    np.copyto(pixels, rows, casting="unsafe")  # truncation is floor: rows >= 0
    np.copyto(pixel_cols, cols, casting="unsafe")
  pixels *= width
  pixels += pixel_cols
  keys |= pixels
  # Not rendered: the dump key (this also discards the garbage pixels of those points).
  np.copyto(keys, index.dump_key, where=np.logical_not(inside, out=inside))
  if index.has_multi:
    # Points in cells of several (overlapping) tiles: one pair per (point, tile of its cell).
    multi = np.flatnonzero(index.cell_count.take(cells) > 1)
    if multi.size:
      point, tile = index.candidates(cells[multi], multi)
      west, south, east, north = tile_bounds[tile].T
      cols, rows = _project(lon[point], lat[point], west, south, east, north, height, width)
      inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
      multi_keys = np.full(point.size, index.dump_key, dtype=index.key_dtype)
      multi_keys[inside] = (
          (tile[inside].astype(index.key_dtype) << index.pixel_bits)
          | (rows[inside].astype(index.key_dtype) * width + cols[inside].astype(index.key_dtype)))
      keys = np.concatenate([keys, multi_keys])
  return keys


def _bucket(lon, lat, tile_bounds, height, width, chunk_size):
  """One pass over the table: per chunk, the flat pixel indices of its points, by tile.

  Returns a list with one (pixels, tile_start) per chunk: unsigned pixel indices grouped by
  tile and int64 offsets (T + 1,), so the chunk's pixels of tile t are
  pixels[tile_start[t]:tile_start[t + 1]].
  """
  lon = np.asarray(lon)
  lat = np.asarray(lat)
  if lon.ndim != 1 or lon.shape != lat.shape:
    raise ValueError(f"lon and lat must be 1-D arrays of equal length, got shapes {lon.shape} "
                     f"and {lat.shape}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
      or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
  n_tiles = tile_bounds.shape[0]
  index = _TileIndex(tile_bounds, height * width)
  tile_keys = np.arange(n_tiles + 1, dtype=index.key_dtype) << index.pixel_bits
  pixel_mask = index.key_dtype.type((1 << index.pixel_bits) - 1)
  scratch = _Scratch()
  chunks = []
  for start in range(0, lon.size, chunk_size):
    lon_chunk = np.asarray(lon[start:start + chunk_size], dtype=np.float64)
    lat_chunk = np.asarray(lat[start:start + chunk_size], dtype=np.float64)
    keys = _bucket_chunk(index, tile_bounds, lon_chunk, lat_chunk, height, width, scratch)
    # Sorting the keys in place groups the pairs by tile (the order within a tile does not
    # matter to a count) with no index array and no allocation; the dump keys sort last.
    keys.sort()
    tile_start = np.searchsorted(keys, tile_keys).astype(np.int64)
    chunks.append((np.bitwise_and(keys[:tile_start[-1]], pixel_mask), tile_start))
  return chunks


def iter_render_tiles(lon, lat, tile_bounds, height: int, width: int, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[tuple[int, np.ndarray]]:
  """Renders many tiles from one table with one bucketing pass; yields tiles one at a time.

  Memory: the table, 4 bytes per rendered (point, containing tile) pair, about 100 bytes per
  point of one chunk (chunk_size points) of temporaries, and one tile; never T x H x W. The
  bucketing pass runs when this function is called.

  Args:
    lon, lat: 1-D float arrays of N points (degrees, or planar x/y in tile_bounds' units).
    tile_bounds: (T, 4) of (west, south, east, north) per tile; tiles may overlap or nest.
    height, width: pixel size of every tile.
    chunk_size: points projected at a time in the bucketing pass (the default keeps a chunk's
      temporaries in the CPU's caches; the output does not depend on it).

  Returns:
    An iterator of (tile index t, float32 (H, W) heat-map) for t = 0..T-1, each equal bit for bit to
    render_heatmap(*lonlat_to_pixel(lon, lat, tile_bounds[t], H, W), H, W).
  """
  height, width = _check_size(height, width)
  tile_bounds = _check_tile_bounds(tile_bounds)
  # Bucketing runs now (not at the first next()), so bad input raises at the call.
  chunks = _bucket(lon, lat, tile_bounds, height, width, chunk_size)
  return _tiles_from_buckets(chunks, tile_bounds.shape[0], height, width)


def _tiles_from_buckets(chunks, n_tiles, height, width, out=None):
  """Yields (t, heat-map of tile t) from _bucket's chunks, into out[t] when out is given."""
  n_pixels = height * width
  scratch = _Scratch()
  # One count buffer for every tile (a fresh one per tile costs page faults), zero between
  # tiles: np.add.at adds the tile's points, and afterwards only the pixels it touched are
  # reset, unless that is most of the tile.
  counts = np.zeros(n_pixels, dtype=np.intp)
  for tile in range(n_tiles):
    pieces = [pixels[start[tile]:start[tile + 1]] for pixels, start in chunks]
    n_points = sum(piece.size for piece in pieces)
    pixels = np.concatenate(pieces, out=scratch.get("tile_pixels", pieces[0].dtype, n_points)) \
        if pieces else np.zeros(0, dtype=np.intp)
    np.add.at(counts, pixels, 1)
    sparse = n_points < n_pixels // 8
    max_count = int(counts.take(pixels).max() if sparse else counts.max()) if n_points else 0
    heatmap = _counts_to_heatmap(counts.reshape(height, width),
                                 None if out is None else out[tile], scratch, max_count)
    if sparse:
      counts[pixels] = 0
    else:
      counts.fill(0)
    yield tile, heatmap


def render_tiles(lon, lat, tile_bounds, height: int, width: int, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, out: np.ndarray | None = None) -> np.ndarray:
  """Renders every tile of tile_bounds from one city-wide table (see iter_render_tiles).

  Args:
    lon, lat, tile_bounds, height, width, chunk_size: as in iter_render_tiles.
    out: optional float32 (T, H, W) array to fill, e.g. a disk-backed
      np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(T, H, W)) for 350
      tiles of 1024 x 1024 (1.4 GB); tiles are written as they are rendered.

  Returns:
    float32 (T, H, W) heat-maps (out itself when given).
  """
  height, width = _check_size(height, width)
  tile_bounds = _check_tile_bounds(tile_bounds)
  shape = (tile_bounds.shape[0], height, width)
  if out is None:
    out = np.empty(shape, dtype=np.float32)
  elif out.shape != shape or out.dtype != np.float32:
    raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")
  chunks = _bucket(lon, lat, tile_bounds, height, width, chunk_size)
  for _ in _tiles_from_buckets(chunks, tile_bounds.shape[0], height, width, out=out):
    pass  # each tile is written into out[tile]
  return out
