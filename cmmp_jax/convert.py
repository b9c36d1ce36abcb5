"""Conversion of the authors' PyTorch weights into this project's Flax variables.

- `from_torch(state_dict)`: the CMMPNet release's state_dict (keys as the release names them, with
  or without DataParallel's `module.` prefix) -> {'params', 'batch_stats'} for `CMMPNet` (any
  backbone width/depths, DEM ablations and SPP levels the weights have). Layouts: Conv2d
  (out, in, kh, kw) -> (kh, kw, in, out); ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out);
  Linear (out, in) -> (in, out). The release feeds BGR images; ours are RGB, so the image stem's
  input channels are reversed (`bgr_to_rgb`). The SPP flattening is channel-major in both, so the
  global FC weights need no permutation.
- `load_torchvision_resnet34(variables, state_dict, branch)`: ImageNet ResNet-34 weights (a
  torchvision state_dict) into one branch's stem and encoder, as the release initialises both
  branches; `init_encoders(variables, config)` does it for training (config.init): the file is
  found by `resolve_imagenet_weights` (a local path, the cache, or a one-time checked download).
- `read_torch_file(path)`: a `torch.save` file (the zip format of torch >= 1.6, or the legacy one
  before it) read with numpy alone, through an unpickler that only knows the few names a
  state_dict needs.
- CLI: `python -m cmmp_jax.convert --torch_checkpoint=FILE.pth|.npz --workdir=DIR
  [--config=configs/bjroad.py[:presets] --config.a.b=value --keep_bgr]` writes an Orbax
  checkpoint that `--mode=eval` / `--mode=predict` load (`run(config, ...)` from Python). `.pth`
  and `.pt` need no PyTorch; `.npz` holds the state_dict's arrays under their keys.
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import json
import math
import os
import pathlib
import pickle
import re
import sys
import tarfile
import tempfile
import time
from typing import Any, Callable, Mapping
import urllib.request
import zipfile
import zlib

from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
import jax
import ml_dtypes
from ml_collections import config_flags
import numpy as np

from cmmp_jax import checkpoint
from cmmp_jax import config_checks
from cmmp_jax import reporting
from cmmp_jax import state as state_lib


class ConversionError(ValueError):
  """The weights do not fit the model (wrong architecture, missing or unknown keys, shapes)."""


_BRANCH_LAYER_RULES = [
    # (regex on the key without the branch suffix, path template, kind)
    (r"firstconv1\.weight", ("stem", "conv", "conv", "kernel"), "conv"),
    (r"firstconv1\.bias", ("stem", "conv", "bias"), "vector"),
    (r"firstbn\.(\w+)", ("stem", "bn"), "bn"),
    (r"encoder(\d)\.(\d+)\.conv(\d)\.weight", ("encoder{0}", "block{1}", "conv{2}", "conv",
                                                "kernel"), "conv"),
    (r"encoder(\d)\.(\d+)\.bn(\d)\.(\w+)", ("encoder{0}", "block{1}", "bn{2}"), "bn"),
    (r"encoder(\d)\.(\d+)\.downsample\.0\.weight", ("encoder{0}", "block{1}", "downsample_conv",
                                                    "conv", "kernel"), "conv"),
    (r"encoder(\d)\.(\d+)\.downsample\.1\.(\w+)", ("encoder{0}", "block{1}", "downsample_bn"),
     "bn"),
    (r"dblock\.dilate(\d)\.(weight|bias)", ("dblock", "dilate{0}", "conv"), "conv_or_bias"),
    (r"decoder(\d)\.conv(\d)\.(weight|bias)", ("decoder{0}", "conv{1}", "conv"), "conv_or_bias"),
    (r"decoder(\d)\.norm(\d)\.(\w+)", ("decoder{0}", "norm{1}"), "bn"),
    (r"decoder(\d)\.deconv2\.(weight|bias)", ("decoder{0}", "deconv2"), "deconv_or_bias"),
    (r"finaldeconv1\.(weight|bias)", ("head", "finaldeconv1"), "deconv_or_bias"),
    (r"finalconv2\.(weight|bias)", ("head", "finalconv2", "conv"), "conv_or_bias"),
]
_DEM_RULES = [
    (r"(rgb|add)_local_message\.0\.(weight|bias)", ("local_conv", "conv"), "conv_or_bias"),
    (r"(rgb|add)_local_message\.1\.(\w+)", ("local_bn",), "bn"),
    (r"(rgb|add)_global_message\.0\.(weight|bias)", ("global_fc",), "linear_or_bias"),
    (r"(rgb|add)_(local|global)_gate\.0\.(weight|bias)", ("{1}_gate", "conv"), "conv_or_bias"),
]
_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def _place(kind: str, path: tuple, groups: tuple, value: np.ndarray):
  """Returns (collection, full path, converted array) for one tensor."""
  last = groups[-1] if groups else None
  if kind == "bn":
    if last == "num_batches_tracked":
      return None
    if last not in _BN_FIELDS:
      raise ConversionError(f"unknown BatchNorm field {last!r}")
    collection, leaf = _BN_FIELDS[last]
    return collection, path + (leaf,), value
  if kind == "vector":
    return "params", path, value
  if kind == "conv_or_bias" and last == "bias":
    return "params", path[:-1] + ("bias",), value  # Conv keeps its bias beside conv/kernel
  if kind.endswith("_or_bias") and last == "bias":
    return "params", path + ("bias",), value
  if kind in ("conv", "conv_or_bias"):
    leaf = () if kind == "conv" else ("kernel",)
    return "params", path + leaf, value.transpose(2, 3, 1, 0)
  if kind == "deconv_or_bias":
    return "params", path + ("kernel",), value.transpose(2, 3, 0, 1)
  if kind == "linear_or_bias":
    return "params", path + ("kernel",), value.T
  raise ConversionError(f"unhandled kind {kind}")


def _match(rules, key: str):
  for pattern, template, kind in rules:
    m = re.fullmatch(pattern, key)
    if m:
      groups = m.groups()
      return tuple(part.format(*groups) for part in template), kind, groups
  return None


def torch_key_to_path(key: str):
  """Maps one release key to (path prefix, kind, regex groups), or raises ConversionError."""
  dem = re.fullmatch(r"(dem_[ed]\d)\.(.+)", key)
  if dem:
    found = _match(_DEM_RULES, dem.group(2))
    if found:
      path, kind, groups = found
      side = "image" if groups[0] == "rgb" else "aux"
      return (dem.group(1), side) + path, kind, groups
  elif re.fullmatch(r"finalconv\.(weight|bias)", key):
    return ("finalconv", "conv"), "conv_or_bias", (key.split(".")[1],)
  else:
    head, _, rest = key.partition(".")
    branch = "image"
    if head.endswith("_add"):
      branch, head = "aux", head[:-len("_add")]
    found = _match(_BRANCH_LAYER_RULES, f"{head}.{rest}")
    if found:
      path, kind, groups = found
      return (branch,) + path, kind, groups
  raise ConversionError(f"state_dict key {key!r} is not part of the CMMPNet release layout")


def from_torch(state_dict: Mapping[str, Any], *, bgr_to_rgb: bool = True) -> dict:
  """Release state_dict -> {'params': ..., 'batch_stats': ...} for `CMMPNet`.

  Args:
    state_dict: mapping of release keys (optionally prefixed `module.`) to tensors or arrays.
    bgr_to_rgb: reverse the image stem's input channels (the release reads images as BGR).
  """
  flat = {"params": {}, "batch_stats": {}}
  for key, value in state_dict.items():
    key = key[len("module."):] if key.startswith("module.") else key
    prefix, kind, groups = torch_key_to_path(key)
    placed = _place(kind, prefix, groups, _to_numpy(value))
    if placed is None:
      continue
    collection, path, array = placed
    if bgr_to_rgb and path == ("image", "stem", "conv", "conv", "kernel"):
      array = array[:, :, ::-1, :]
    flat[collection][path] = np.ascontiguousarray(array)
  if not flat["params"]:
    raise ConversionError("the state_dict holds no weights")
  return {c: traverse_util.unflatten_dict(v) for c, v in flat.items()}


def check_variables_match(variables: Mapping, reference: Mapping, source: str = "weights"):
  """Raises ConversionError naming every missing, unexpected or mis-shaped leaf."""
  got = traverse_util.flatten_dict(dict(variables), sep="/")
  want = traverse_util.flatten_dict(dict(reference), sep="/")
  problems = [f"missing {k} {tuple(v.shape)}" for k, v in want.items() if k not in got]
  problems += [f"unexpected {k} {tuple(np.shape(v))}" for k, v in got.items() if k not in want]
  problems += [f"shape of {k}: {tuple(np.shape(got[k]))} != model's {tuple(want[k].shape)}"
               for k in want if k in got and tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ConversionError(f"{source} do not match the model ({len(problems)} problems):\n  "
                          f"{shown}{more}")


_RESNET_RULES = [
    (r"conv1\.weight", ("stem", "conv", "conv", "kernel"), "conv"),
    (r"bn1\.(\w+)", ("stem", "bn"), "bn"),
    (r"layer(\d)\.(\d+)\.conv(\d)\.weight", ("encoder{0}", "block{1}", "conv{2}", "conv",
                                              "kernel"), "conv"),
    (r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)", ("encoder{0}", "block{1}", "bn{2}"), "bn"),
    (r"layer(\d)\.(\d+)\.downsample\.0\.weight", ("encoder{0}", "block{1}", "downsample_conv",
                                                  "conv", "kernel"), "conv"),
    (r"layer(\d)\.(\d+)\.downsample\.1\.(\w+)", ("encoder{0}", "block{1}", "downsample_bn"), "bn"),
]


def load_torchvision_resnet34(variables: Mapping, state_dict: Mapping[str, Any],
                              branch: str = "image", *, stem: str = "copy") -> dict:
  """Copies torchvision ResNet-34 ImageNet weights into `variables[...][branch]`'s stem and encoder.

  The stem conv is copied only when its input channels match (3 for the image branch); the
  auxiliary branch keeps its own stem conv, as in the release. fc.* is ignored. Returns new
  variables; shapes are checked. `stem`: 'copy' (as trained: RGB filters), 'reversed' (input
  channels reversed: the filters the release applied to its BGR pixels, for our RGB input) or
  'skip' (the branch keeps its own stem conv; the stem's BatchNorm is still copied).
  """
  if stem not in ("copy", "reversed", "skip"):
    raise ValueError(f"stem must be 'copy', 'reversed' or 'skip', got {stem!r}")
  out = {c: traverse_util.flatten_dict(dict(v)) for c, v in variables.items()}
  copied = 0
  for key, value in state_dict.items():
    key = key[len("module."):] if key.startswith("module.") else key
    if key.startswith("fc."):
      continue
    found = _match(_RESNET_RULES, key)
    if not found:
      raise ConversionError(f"{key!r} is not a torchvision ResNet-34 key")
    path, kind, groups = found
    if kind != "bn":
      groups = ()
    placed = _place(kind, path, groups, _to_numpy(value))
    if placed is None:
      continue
    collection, path, array = placed
    full = (branch,) + path
    if full not in out[collection]:
      raise ConversionError(f"model has no {'/'.join(full)} for ResNet key {key!r}")
    target = out[collection][full]
    if path[:2] == ("stem", "conv"):
      if stem == "skip" or array.shape != target.shape:
        continue  # a stem with other input channels keeps its own (new) conv
      if stem == "reversed":
        array = np.ascontiguousarray(array[:, :, ::-1, :])
    if array.shape != target.shape:
      raise ConversionError(f"ResNet key {key!r} has shape {array.shape}, model's "
                            f"{'/'.join(full)} is {target.shape} (width/depths must be ResNet-34)")
    out[collection][full] = array
    copied += 1
  if copied == 0:
    raise ConversionError("no ResNet-34 weights were copied")
  return {c: traverse_util.unflatten_dict(v) for c, v in out.items()}


def init_from_imagenet(variables: Mapping, path: str | pathlib.Path, *, model_name: str = "",
                       image_stem: str = "copy") -> tuple[dict, list[str]]:
  """Loads a torchvision ResNet-34 state_dict file into every encoder branch of `variables`
  ('image' and 'aux' of the two-branch models, 'net' of the one-branch ones), as the release
  initialises both encoders. Stems fed the image get ImageNet's stem conv (`image_stem`: 'copy'
  or 'reversed', see load_torchvision_resnet34) when their input channels fit; the auxiliary
  stems keep their own conv (`model_name` 'aux_only' marks 'net' as auxiliary). Returns
  (variables, the branches filled)."""
  weights = load_state_dict_file(path)
  branches = [b for b in ("image", "aux", "net") if b in variables["params"]]
  for branch in branches:
    aux_fed = branch == "aux" or (branch == "net" and model_name == "aux_only")
    variables = load_torchvision_resnet34(variables, weights, branch,
                                          stem="skip" if aux_fed else image_stem)
  return dict(variables), branches


# ----------------------------------------------------------------------------------------------
# ImageNet weights for training (config.init): where the file comes from.

IMAGENET_RESNET34_URL = "https://download.pytorch.org/models/resnet34-b627a593.pth"
IMAGENET_RESNET34_FILE = "resnet34-b627a593.pth"
# torchvision names its files <name>-<first 8 hex digits of the file's SHA-256>.pth and checks
# that prefix on download (torch.hub's check_hash); this file's full digest is logged when read.
IMAGENET_RESNET34_SHA256_PREFIX = "b627a593"
_TORCHVISION_NAME = re.compile(r"resnet34-([0-9a-f]{8})\.pth")  # torchvision's own file names
_urlopen = urllib.request.urlopen  # tests replace it: they never touch the network


class WeightsUnavailableError(FileNotFoundError):
  """The ImageNet weights are neither on disk nor downloadable; the message says what to do."""


class ChecksumError(ValueError):
  """A weights file's SHA-256 is not the one its name or the config promises."""


def default_cache_dir() -> pathlib.Path:
  """$CMMP_JAX_CACHE, else $XDG_CACHE_HOME/cmmp_jax, else ~/.cache/cmmp_jax."""
  if os.environ.get("CMMP_JAX_CACHE"):
    return pathlib.Path(os.environ["CMMP_JAX_CACHE"]).expanduser()
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cmmp_jax"


def torch_hub_checkpoint_dir() -> pathlib.Path:
  """Where torchvision itself caches weights ($TORCH_HOME/hub/checkpoints), read if present."""
  torch_home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
  return pathlib.Path(torch_home).expanduser() / "hub" / "checkpoints"


def sha256_of(path: str | pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def check_sha256(path: str | pathlib.Path, prefix: str, *, advice: str = "") -> str:
  """Returns the file's SHA-256 after checking that it starts with `prefix`."""
  digest = sha256_of(path)
  if not digest.startswith(prefix.lower()):
    raise ChecksumError(f"{path}: SHA-256 {digest} does not start with {prefix} (a truncated, "
                        f"corrupt or different file){advice}")
  return digest


def download_file(url: str, dest: str | pathlib.Path, *, sha256_prefix: str,
                  timeout_s: float = 60.0) -> str:
  """Downloads url to dest: into a temporary file beside it, checks its SHA-256 prefix, then
  renames it into place (atomic: dest is either absent or complete). Returns the digest."""
  dest = pathlib.Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
  try:
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, _urlopen(url, timeout=timeout_s) as response:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        digest.update(chunk)
        out.write(chunk)
    if not digest.hexdigest().startswith(sha256_prefix.lower()):
      raise ChecksumError(f"{url}: the downloaded file's SHA-256 {digest.hexdigest()} does not "
                          f"start with {sha256_prefix}; nothing was written to {dest}")
    os.replace(tmp, dest)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return digest.hexdigest()


def resolve_imagenet_weights(init_config) -> tuple[pathlib.Path, str]:
  """(the torchvision ResNet-34 file to load, how it was found) for config.init:
  init.resnet34_checkpoint if set (a .pth or .npz; a torchvision-named .pth has its SHA-256
  prefix checked); else resnet34-b627a593.pth in init.cache_dir (default_cache_dir() when
  empty) or in torchvision's own cache; else, with init.download, a one-time download from
  IMAGENET_RESNET34_URL into the cache dir. Otherwise a WeightsUnavailableError in one line
  naming the URL, the path to put the file at, and the opt-out."""
  if init_config.resnet34_checkpoint:
    path = pathlib.Path(init_config.resnet34_checkpoint).expanduser()
    if not path.is_file():
      raise WeightsUnavailableError(
          f"config.init.resnet34_checkpoint={str(path)!r} does not exist; fetch "
          f"{IMAGENET_RESNET34_URL} and give its path, or clear the field to use the cache "
          "(config.init.cache_dir), or train from random weights with "
          "--config.init.imagenet=False")
    named = _TORCHVISION_NAME.fullmatch(path.name)
    if named:
      check_sha256(path, named.group(1))
    return path, "local file"
  cache_dir = pathlib.Path(init_config.cache_dir or default_cache_dir()).expanduser()
  cached = cache_dir / IMAGENET_RESNET34_FILE
  advice = (f"; delete it and run again to download it, or fetch {IMAGENET_RESNET34_URL} "
            "yourself")
  for candidate, how in ((cached, "cache"),
                         (torch_hub_checkpoint_dir() / IMAGENET_RESNET34_FILE, "torch hub cache")):
    if candidate.is_file():
      check_sha256(candidate, IMAGENET_RESNET34_SHA256_PREFIX, advice=advice)
      return candidate, how
  todo = (f"fetch {IMAGENET_RESNET34_URL} (SHA-256 starts with "
          f"{IMAGENET_RESNET34_SHA256_PREFIX}) and put it at {cached} (or set "
          "--config.init.resnet34_checkpoint=PATH), or train from random weights with "
          "--config.init.imagenet=False")
  if not init_config.download:
    raise WeightsUnavailableError(f"ImageNet ResNet-34 weights: no {cached} and "
                                  f"config.init.download=False; {todo}")
  reporting.console(f"downloading ImageNet ResNet-34 weights {IMAGENET_RESNET34_URL} to {cached}")
  start = time.perf_counter()
  try:
    download_file(IMAGENET_RESNET34_URL, cached, sha256_prefix=IMAGENET_RESNET34_SHA256_PREFIX)
  except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, a cut connection
    reason = getattr(error, "reason", None) or error
    raise WeightsUnavailableError(f"ImageNet ResNet-34 weights: no {cached} and the download "
                                  f"failed ({type(error).__name__}: {reason}); {todo}") from error
  reporting.console(f"downloaded in {time.perf_counter() - start:.0f} s")
  return cached, "downloaded"


def check_imagenet_fits(config) -> None:
  """ImageNet ResNet-34 weights need the ResNet-34 encoder (width 1.0, depths (3, 4, 6, 3))."""
  if config.model.width != 1.0 or tuple(config.model.depths) != (3, 4, 6, 3):
    raise ConversionError(
        "config.init.imagenet=True loads ImageNet ResNet-34 weights, which need "
        "config.model.width=1.0 and config.model.depths=(3, 4, 6, 3); got width "
        f"{config.model.width}, depths {tuple(config.model.depths)}. Train from random weights "
        "with --config.init.imagenet=False")


def init_encoders(variables: Mapping, config) -> tuple[dict, str]:
  """The release's initialisation for training: (variables with ImageNet ResNet-34 encoders,
  a description for the log) when config.init.imagenet, else (variables, 'random')."""
  if not config.init.imagenet:
    return dict(variables), "random"
  check_imagenet_fits(config)
  path, how = resolve_imagenet_weights(config.init)
  variables, branches = init_from_imagenet(
      variables, path, model_name=config.model.name,
      image_stem="reversed" if config.init.image_stem == "release" else "copy")
  logging.info("ImageNet ResNet-34 weights: %s (%s, SHA-256 %s) into the %s encoders; image "
               "stem %s", path, how, sha256_of(path), "/".join(branches),
               config.init.image_stem)
  return variables, f"ImageNet ResNet-34 ({'+'.join(branches)} encoders) from {path}"


# ----------------------------------------------------------------------------------------------
# torch.save files without PyTorch.

class CheckpointFormatError(ValueError):
  """A file is not a PyTorch checkpoint this reader can read, or holds what it must not load."""


# The legacy format (torch < 1.6) starts with this magic number, pickled with protocol 2.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950a86a20f9469cfc6c).to_bytes(10, "little")
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_TORCH_DTYPES = {  # torch.<name> as pickled (for _rebuild_tensor_v3's dtype argument)
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
}


class _StorageType:
  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)


class _TorchDtype:
  def __init__(self, name: str):
    self.dtype = np.dtype(_TORCH_DTYPES[name])


class _Storage:
  """One storage of the file: its bytes (filled when read), its dtype (None when untyped), and,
  for a legacy view of another storage, (root, element offset, elements)."""

  def __init__(self, dtype: np.dtype | None, byteorder: str, raw: bytes | None = None,
               view: tuple | None = None):
    self.dtype, self.byteorder, self.raw, self.view = dtype, byteorder, raw, view

  def flat(self, dtype: np.dtype, where: str) -> np.ndarray:
    """The bytes as a flat native-order array of dtype (trailing bytes of an untyped storage
    that do not fill an element are dropped)."""
    if self.view is not None:
      root, offset, count = self.view
      flat = root.flat(dtype, where)
      if offset < 0 or count < 0 or offset + count > flat.size:
        raise CheckpointFormatError(f"{where}: a storage view [{offset}, +{count}) past its "
                                    f"root storage of {flat.size} elements")
      return flat[offset:offset + count]
    if self.raw is None:
      raise CheckpointFormatError(f"{where}: a tensor's storage is missing from the file")
    usable = len(self.raw) - len(self.raw) % dtype.itemsize
    flat = np.frombuffer(self.raw, dtype=dtype, count=usable // dtype.itemsize)
    if self.byteorder != sys.byteorder and dtype.itemsize > 1:
      # numpy swaps its own types (complex: each half); ml_dtypes' (kind 'V') as unsigned ints.
      flat = (flat.byteswap() if dtype.kind in "biufc" else
              flat.view(f"u{dtype.itemsize}").byteswap().view(dtype))
    return flat


class _Tensor:
  """A tensor as pickled: a view of a storage, made an array once every storage is read."""

  def __init__(self, storage: _Storage, dtype: np.dtype, offset, size, stride):
    self.storage, self.dtype, self.layout = storage, dtype, (offset, size, stride)

  def array(self, where: str) -> np.ndarray:
    return _strided_copy(self.storage.flat(self.dtype, where), *self.layout, where)


def _strided_copy(flat: np.ndarray, offset, size, stride, where: str) -> np.ndarray:
  """The tensor (offset, size, stride in elements) viewed on its storage, copied C-contiguous."""
  try:
    offset, size, stride = int(offset), tuple(int(d) for d in size), tuple(int(s) for s in stride)
  except (TypeError, ValueError) as error:
    raise CheckpointFormatError(f"{where}: malformed tensor layout") from error
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise CheckpointFormatError(f"{where}: malformed tensor layout: offset {offset}, size "
                                f"{size}, stride {stride}")
  if math.prod(size) == 0:
    return np.zeros(size, flat.dtype)
  last = offset + sum((d - 1) * s for d, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointFormatError(f"{where}: a tensor of size {size}, stride {stride} at offset "
                                f"{offset} reaches past its storage of {flat.size} elements")
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                         strides=tuple(s * flat.itemsize for s in stride),
                                         writeable=False)
  return np.array(view, order="C")


def _materialize(obj, where: str, seen=None):
  """obj with every _Tensor replaced by its array (dicts and lists in place, tuples rebuilt)."""
  seen = {} if seen is None else seen
  if isinstance(obj, _Tensor):
    if id(obj) not in seen:
      seen[id(obj)] = obj.array(where)
    return seen[id(obj)]
  if isinstance(obj, dict):
    for key, value in obj.items():
      obj[key] = _materialize(value, where, seen)
  elif isinstance(obj, list):
    obj[:] = [_materialize(value, where, seen) for value in obj]
  elif isinstance(obj, tuple):
    return tuple(_materialize(value, where, seen) for value in obj)
  return obj


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles torch.save's pickles. find_class hands out only the names a state_dict needs (as
  inert stand-ins, never the objects the names refer to); anything else stops the load with the
  file and the class named. Tensors come out as _Tensor (see _materialize); storages from
  `read_record` (zip format) or, when it is None, are filled later (legacy format)."""

  _REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
               "_rebuild_parameter", "_rebuild_parameter_with_state")

  def __init__(self, file, *, source: str, byteorder: str = "little",
               read_record: Callable[[str], bytes] | None = None, storages=None):
    super().__init__(file, encoding="utf-8")
    self._source, self._read_record, self._byteorder = source, read_record, byteorder
    self.storages: dict[str, _Storage] = {} if storages is None else storages

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name in self._REBUILDS:
      return getattr(self, name)
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if module in ("torch", "torch.storage") and name == "UntypedStorage":
      return _StorageType(name, np.uint8)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name)
    raise CheckpointFormatError(
        f"{self._source}: refusing to load {module}.{name} (only tensors, storages and "
        "OrderedDicts of a state_dict are read; this file holds other Python objects)")

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy: the same and view metadata.
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)):
      raise CheckpointFormatError(f"{self._source}: unknown persistent id {pid!r} (only "
                                  "storages are read)")
    storage_type, key = pid[1], str(pid[2])  # the location (e.g. 'cuda:0') is ignored
    dtype = storage_type.dtype if storage_type.name != "UntypedStorage" else None
    if key not in self.storages:
      raw = None
      if self._read_record is not None:
        if not re.fullmatch(r"\w+", key):
          raise CheckpointFormatError(f"{self._source}: bad storage key {key!r}")
        raw = self._read_record(f"data/{key}")
        if dtype is not None and len(raw) % dtype.itemsize:
          raise CheckpointFormatError(
              f"{self._source}: storage {key} has {len(raw)} bytes, not a multiple of "
              f"{dtype.itemsize} ({storage_type.name})")
      self.storages[key] = _Storage(dtype, self._byteorder, raw)
    storage = self.storages[key]
    if len(pid) == 6 and pid[5] is not None:  # a legacy view: (view key, offset, size)
      view_key, offset, count = pid[5]
      view_key = str(view_key)
      if view_key not in self.storages:
        self.storages[view_key] = _Storage(dtype, self._byteorder,
                                           view=(storage, int(offset), int(count)))
      storage = self.storages[view_key]
    return storage

  def _tensor(self, storage, dtype, offset, size, stride, name):
    if not isinstance(storage, _Storage) or dtype is None:
      raise CheckpointFormatError(f"{self._source}: malformed {name} arguments")
    return _Tensor(storage, dtype, offset, size, stride)

  def _rebuild_tensor(self, storage, offset, size, stride):
    return self._tensor(storage, getattr(storage, "dtype", None), offset, size, stride,
                        "_rebuild_tensor")

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    return self._rebuild_tensor(storage, offset, size, stride)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks,
                         dtype, metadata=None):
    del requires_grad, backward_hooks, metadata
    return self._tensor(storage, dtype.dtype if isinstance(dtype, _TorchDtype) else None,
                        offset, size, stride, "_rebuild_tensor_v3")

  def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data

  def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
    del requires_grad, backward_hooks, state
    return data


def _read_legacy(path: pathlib.Path, f) -> Any:
  """torch < 1.6's format: pickles of the magic number, the protocol version, the system
  info, the object, the storage keys; then per storage its element count (int64) and bytes."""
  def load(**kwargs):
    return _RestrictedUnpickler(f, source=str(path), **kwargs).load()

  load()  # the magic number, already checked
  version = load()
  info = load()
  if version != 1001 or not isinstance(info, dict):
    raise CheckpointFormatError(f"{path}: unknown legacy PyTorch format (version {version!r})")
  if not info.get("little_endian", True):
    raise CheckpointFormatError(f"{path}: a big-endian legacy PyTorch file is not supported")
  storages: dict[str, _Storage] = {}
  obj = load(storages=storages)
  keys = load()
  if not isinstance(keys, list):
    raise CheckpointFormatError(f"{path}: malformed legacy storage list")
  for key in keys:
    storage = storages.get(str(key))
    if storage is None or storage.view is not None:
      raise CheckpointFormatError(f"{path}: storage {key!r} is not one the object refers to")
    count = f.read(8)
    numel = int.from_bytes(count, "little") if len(count) == 8 else -1
    nbytes = numel * (storage.dtype.itemsize if storage.dtype is not None else 1)
    storage.raw = f.read(nbytes) if numel >= 0 else b""
    if numel < 0 or len(storage.raw) != nbytes:
      raise CheckpointFormatError(f"{path} is truncated (storage {key} incomplete); fetch it "
                                  "again")
  return _materialize(obj, str(path))


def read_torch_file(path: str | pathlib.Path) -> Any:
  """What `torch.save` wrote to path, tensors as numpy arrays, read without PyTorch: the zip
  format of torch >= 1.6 and the legacy one before it. Only tensors, parameters, dicts and lists
  of them and plain values are accepted (no code runs from the file); other objects, the oldest
  tar format and damaged files are CheckpointFormatErrors naming the file."""
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
      f.seek(0)
      try:
        return _read_legacy(path, f)
      except (EOFError, pickle.UnpicklingError, ValueError) as error:
        if isinstance(error, CheckpointFormatError):
          raise
        raise CheckpointFormatError(f"{path}: damaged legacy PyTorch checkpoint ({error})") \
            from error
  if not zipfile.is_zipfile(path):
    if tarfile.is_tarfile(path):
      raise CheckpointFormatError(
          f"{path} is in PyTorch's oldest (tar) format, which this reader does not read; "
          "re-save it with a recent torch (`torch.save(torch.load(OLD), NEW)`)")
    if head.startswith(b"PK\x03\x04"):
      raise CheckpointFormatError(f"{path} is a truncated zip archive ({path.stat().st_size} "
                                  "bytes, its directory at the end is missing); fetch it again")
    raise CheckpointFormatError(f"{path} is not a PyTorch checkpoint (torch.save's zip archive "
                                "or legacy format)")
  try:
    with zipfile.ZipFile(path) as archive:
      names = set(archive.namelist())
      pickles = sorted(n for n in names if n.count("/") == 1 and n.endswith("/data.pkl"))
      if len(pickles) != 1:
        raise CheckpointFormatError(f"{path}: expected one <name>/data.pkl in the archive, "
                                    f"found {pickles or 'none'}")
      prefix = pickles[0][:-len("data.pkl")]
      byteorder = (archive.read(prefix + "byteorder").decode().strip()
                   if prefix + "byteorder" in names else "little")
      if byteorder not in ("little", "big"):
        raise CheckpointFormatError(f"{path}: unknown byte order {byteorder!r}")

      def read_record(name):
        if prefix + name not in names:
          raise CheckpointFormatError(f"{path}: the archive has no record {prefix + name}")
        return archive.read(prefix + name)

      with archive.open(pickles[0]) as data:
        obj = _RestrictedUnpickler(data, source=str(path), byteorder=byteorder,
                                   read_record=read_record).load()
      return _materialize(obj, str(path))
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, zlib.error) as error:
    raise CheckpointFormatError(f"{path}: damaged PyTorch checkpoint ({error})") from error


def load_state_dict_file(path: str | pathlib.Path) -> dict:
  """Reads a .pth/.pt (torch.save's zip format; no PyTorch needed) or .npz state_dict into numpy
  arrays. A checkpoint dict holding the weights under 'state_dict' is unwrapped."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if path.suffix == ".npz":
    with np.load(path) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  if path.suffix in (".pth", ".pt"):
    obj = read_torch_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  raise ValueError(f"{path}: expected a .pth, .pt or .npz state_dict file")


def write_converted(workdir, config, variables, *, source: str) -> int:
  """Saves converted release weights as step 0 (latest and best) of a fresh TrainState, so that
  `--mode=eval`, `--mode=predict` and fine-tuning with `--mode=train` all start from them.
  Refuses a workdir that already holds checkpoints."""
  _, state = state_lib.create_state(config, variables)
  check_variables_match({"params": state.params, "batch_stats": state.batch_stats},
                        state_lib.abstract_variables(config), source=f"weights from {source}")
  meta = {"model": checkpoint.model_signature(config.model), "source": source,
          "config": json.loads(config.to_json_best_effort())}
  ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
  try:
    existing = ckpts.latest.latest_step()
    if existing is not None:
      raise FileExistsError(f"{workdir} already holds checkpoints (latest step {existing}); "
                            "convert into an empty --workdir")
    ckpts.save(0, jax.device_get(state), meta, best=True)
    ckpts.wait()
  finally:
    ckpts.close()
  return 0


def run(config, torch_checkpoint: str | pathlib.Path, workdir: str | pathlib.Path, *,
        bgr_to_rgb: bool = True) -> int:
  """The CLI's work: converts a release state_dict file (.pth/.pt/.npz) for config.model and
  writes it as step 0 of the checkpoints in workdir; returns the step."""
  variables = from_torch(load_state_dict_file(torch_checkpoint), bgr_to_rgb=bgr_to_rgb)
  return write_converted(workdir, config, variables, source=str(torch_checkpoint))


def define_flags() -> None:
  """The command line's flags (defined only when this module runs as the program)."""
  config_flags.DEFINE_config_file(
      "config", "configs/bjroad.py", "Config file (with :presets); its model fields must "
      "describe the release model.", lock_config=True)
  flags.DEFINE_string("torch_checkpoint", None, ".pth/.pt or .npz state_dict of the release.")
  flags.DEFINE_string("workdir", None, "Where the Orbax checkpoint is written.")
  flags.DEFINE_bool("keep_bgr", False, "Do not reorder the image stem from BGR to RGB.")
  flags.mark_flags_as_required(["torch_checkpoint", "workdir"])


def main(argv):
  config = config_checks.config_from_flags(argv)
  workdir = flags.FLAGS.workdir
  step = run(config, flags.FLAGS.torch_checkpoint, workdir, bgr_to_rgb=not flags.FLAGS.keep_bgr)
  print(f"wrote converted weights as step {step} to {workdir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
