"""Rebuilds the reference weights of ../shared/parity (see its README) for parity tests."""
import json
import math
import zlib

import numpy as np


def rebuild_state_dict(parity_dir):
  """The release's state_dict as numpy arrays: rank-0/1 tensors stored, rank-2/4 regenerated."""
  shapes = json.loads((parity_dir / "state_dict_shapes.json").read_text())
  ref = np.load(parity_dir / "cmmpnet_dlinknet34_ref.npz")
  state = {}
  for key, shape in shapes.items():
    if len(shape) in (0, 1):
      state[key] = ref[f"param/{key}"]
    else:
      rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
      w = rng.standard_normal(shape, dtype=np.float32)
      w *= np.float32(1.0 / math.sqrt(int(np.prod(shape[1:]))))
      state[key] = w
  return state, ref


def nhwc_rgb_inputs(ref):
  """The stored NCHW BGR+aux input as (image RGB NHWC, aux NHWC)."""
  x = np.transpose(ref["input_nchw_bgr_aux"], (0, 2, 3, 1))
  return np.ascontiguousarray(x[..., 2::-1]), np.ascontiguousarray(x[..., 3:])


def nhwc(t):
  return np.transpose(t, (0, 2, 3, 1))
