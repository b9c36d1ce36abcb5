"""The Dual Enhancement Module (DEM): cross-modal message propagation between two feature maps.

For a pair (f_image, f_aux) of (N, H, W, C) maps, each side computes messages from its own
features only (`MessageSource`), and each side receives the OTHER side's gated messages:

  L = BN(conv_k(f))                                   local message (k = 1 in the release, 3 in
                                                      the paper)
  G = broadcast(ReLU(FC(SPP_max(L))))                 global message; SPP levels e.g. (1, 2, 4)
  gL = sigmoid(conv1x1([L, G])), gG = sigmoid(conv1x1([L, G]))
  f_image' = f_image + gL_aux * L_aux + gG_aux * G_aux
  f_aux'   = f_aux + gL_image * L_image + gG_image * G_image

Ablations (paper Table IV, Fig. 8) are the fields of `DEMOptions`: `use_local` (send L),
`use_global` (send G), `use_gate` (without gates, messages are added ungated), `spp_levels`,
`local_kernel_size`. Without the global message the gates see L alone. L is always computed: it
is also what the global message pools.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cmmp_jax.models.layers import BatchNorm, Conv, spatial_pyramid_max_pool, torch_default_bias_init

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DEMOptions:
  """The DEM's ablation switches; the defaults are the release's DEM.

  Frozen (hence hashable) so that it can be a field of a Flax module, including one wrapped by
  nn.remat with static arguments.

  Attributes:
    use_local: send the local message L.
    use_global: send the global message G.
    use_gate: gate each message by sigmoid(conv1x1([L, G])); else messages are added ungated.
    spp_levels: SPP bins per side of the global message (paper Fig. 8); any sequence of ints,
      stored as a tuple.
    local_kernel_size: kernel size of the local conv (1 = release, 3 = paper text).
  """
  use_local: bool = True
  use_global: bool = True
  use_gate: bool = True
  spp_levels: tuple[int, ...] = (1, 2, 4)
  local_kernel_size: int = 1

  def __post_init__(self):
    # Configs may hold lists; a tuple keeps the options hashable.
    object.__setattr__(self, "spp_levels", tuple(int(v) for v in self.spp_levels))
    if not (self.use_local or self.use_global):
      raise ValueError("DEMOptions needs use_local or use_global (else the DEM sends nothing)")


class MessageSource(nn.Module):
  """Messages one modality sends: (N, H, W, C) -> list of gated message maps (N, H, W, C)."""
  options: DEMOptions = DEMOptions()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f, train: bool):
    n, h, w, c = f.shape
    opts = self.options
    local = BatchNorm(train, self.dtype, name="local_bn")(
        Conv(c, opts.local_kernel_size, dtype=self.dtype, name="local_conv")(f))
    messages = {}
    if opts.use_local:
      messages["local"] = local
    if opts.use_global:
      pooled = spatial_pyramid_max_pool(local, opts.spp_levels)
      g = nn.relu(nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                           bias_init=torch_default_bias_init(pooled.shape[-1]),
                           name="global_fc")(pooled))
      messages["global"] = jnp.broadcast_to(g[:, None, None, :], (n, h, w, c))
    if not opts.use_gate:
      return list(messages.values())
    gate_in = jnp.concatenate([local, messages["global"]], axis=-1) if opts.use_global else local
    return [jnp.asarray(nn.sigmoid(Conv(c, 1, dtype=self.dtype, name=f"{kind}_gate")(gate_in)))
            * message for kind, message in messages.items()]


class DualEnhancement(nn.Module):
  """One DEM applied to a pair: ((N,H,W,C), (N,H,W,C)) -> enhanced pair, same shapes."""
  options: DEMOptions = DEMOptions()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_image, f_aux, train: bool):
    if f_image.shape != f_aux.shape:
      raise ValueError(f"DEM inputs differ in shape: image {f_image.shape} vs aux {f_aux.shape}")
    source = lambda name: MessageSource(self.options, self.dtype, name=name)
    from_image = source("image")(f_image, train)
    from_aux = source("aux")(f_aux, train)
    return f_image + sum(from_aux), f_aux + sum(from_image)
