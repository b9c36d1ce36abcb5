"""Synthetic fog for aerial images (the paper's foggy-BJRoad experiment).

The paper fogged BJRoad with a Photoshop fog renderer; this is a reproducible stand-in built on
the atmospheric scattering model

    I = J * t + A * (1 - t),   t = exp(-beta * d),

with J the clear image and I the foggy one (both in [0, 1]), A the airlight (the colour of the
fog), and d a per-pixel fog density. Looking straight down, the path length through the haze
barely changes across a tile, so what varies is how thick the fog is: d is a smooth seeded
noise field (a few octaves of bicubically upsampled random grids, like Photoshop's Clouds
filter) rescaled to [1 - density_variation, 1]. The noise depends only on seed and image size,
so for a fixed seed every pixel moves monotonically towards A as beta grows.
"""
from __future__ import annotations

import cv2
import numpy as np

from cmmp_jax.data.heatmap import as_generator



def smooth_noise(height: int, width: int, *, seed, feature_size: float = 0.25,
                 octaves: int = 4, persistence: float = 0.5) -> np.ndarray:
  """Seeded smooth noise (fractal value noise), float64 (height, width) rescaled to [0, 1].

  Args:
    height, width: output size.
    seed: int or numpy Generator.
    feature_size: size of the largest blobs as a fraction of the longer image side.
    octaves: number of layers; layer k has blobs 2^k times smaller and weight persistence^k.
    persistence: amplitude ratio between successive octaves.
  """
  if height < 1 or width < 1:
    raise ValueError(f"noise size must be positive, got {height} x {width}")
  if not 0 < feature_size <= 1:
    raise ValueError(f"feature_size must be in (0, 1], got {feature_size}")
  if octaves < 1:
    raise ValueError(f"octaves must be >= 1, got {octaves}")
  rng = as_generator(seed)
  side = max(height, width)
  total = np.zeros((height, width))
  for octave in range(octaves):
    cell = max(feature_size * side / 2**octave, 1.0)
    # One random value per cell corner (+1 so bicubic interpolation has a margin at the edges).
    grid = rng.random((int(np.ceil(height / cell)) + 2, int(np.ceil(width / cell)) + 2))
    upsampled_size = (int(round(grid.shape[1] * cell)), int(round(grid.shape[0] * cell)))  # (w, h)
    upsampled = cv2.resize(grid, upsampled_size, interpolation=cv2.INTER_CUBIC)
    total += persistence**octave * upsampled[:height, :width]
  low, high = total.min(), total.max()
  if high == low:
    return np.zeros((height, width))
  return (total - low) / (high - low)


def fog_transmission(height: int, width: int, *, seed, beta: float = 1.2,
                     density_variation: float = 0.6, feature_size: float = 0.25,
                     octaves: int = 4) -> np.ndarray:
  """Transmission map t = exp(-beta * d), float64 (height, width) in (0, 1].

  d = (1 - density_variation) + density_variation * smooth_noise(...), so d lies in
  [1 - density_variation, 1]; density_variation 0 gives uniform fog of transmission exp(-beta).
  """
  if not (np.isfinite(beta) and beta >= 0):
    raise ValueError(f"beta must be finite and >= 0, got {beta}")
  if not 0 <= density_variation <= 1:
    raise ValueError(f"density_variation must be in [0, 1], got {density_variation}")
  noise = smooth_noise(height, width, seed=seed, feature_size=feature_size, octaves=octaves)
  density = (1.0 - density_variation) + density_variation * noise
  return np.exp(-beta * density)


def add_fog(image: np.ndarray, *, seed, beta: float = 1.2, airlight=0.9,
            density_variation: float = 0.6, feature_size: float = 0.25, octaves: int = 4,
            return_transmission: bool = False):
  """Adds seeded, spatially varying fog to an RGB image.

  Args:
    image: uint8 (H, W, 3) RGB.
    seed: int or numpy Generator; the same seed gives the same fog.
    beta: fog thickness (scattering coefficient times path length); 0 = no fog. With the
      defaults the transmission lies in about [0.30, 0.62], i.e. heavy fog.
    airlight: fog colour A in [0, 1], a scalar (grey) or an RGB triple.
    density_variation: in [0, 1]; how much the density varies across the image.
    feature_size, octaves: shape of the density noise (see smooth_noise).
    return_transmission: also return the float64 (H, W) transmission map.

  Returns:
    uint8 (H, W, 3) foggy RGB image, round(255 * (J * t + A * (1 - t))); with
    return_transmission, (image, transmission).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"add_fog expects a uint8 (H, W, 3) RGB image, got {image.dtype} "
                     f"{image.shape}")
  airlight = np.broadcast_to(np.asarray(airlight, dtype=np.float64), (3,)) \
      if np.ndim(airlight) in (0, 1) and np.size(airlight) in (1, 3) else None
  if airlight is None or not np.all((airlight >= 0) & (airlight <= 1)):
    raise ValueError("airlight must be a number or an RGB triple in [0, 1]")
  height, width, _ = image.shape
  transmission = fog_transmission(height, width, seed=seed, beta=beta,
                                  density_variation=density_variation,
                                  feature_size=feature_size, octaves=octaves)
  clear = image.astype(np.float64) / 255.0
  t = transmission[..., None]
  foggy = clear * t + airlight * (1.0 - t)
  foggy = np.clip(np.rint(foggy * 255.0), 0, 255).astype(np.uint8)
  return (foggy, transmission) if return_transmission else foggy
