"""Conversion of the authors' PyTorch weights into this project's Flax variables.

- `from_torch(state_dict)`: the CMMPNet release's state_dict (keys as the release names them, with
  or without DataParallel's `module.` prefix) -> {'params', 'batch_stats'} for `CMMPNet` (any
  backbone width/depths, DEM ablations and SPP levels the weights have). Layouts: Conv2d
  (out, in, kh, kw) -> (kh, kw, in, out); ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out);
  Linear (out, in) -> (in, out). The release feeds BGR images; ours are RGB, so the image stem's
  input channels are reversed (`bgr_to_rgb`). The SPP flattening is channel-major in both, so the
  global FC weights need no permutation.
- `load_torchvision_resnet34(variables, state_dict, branch)`: ImageNet ResNet-34 weights (a local
  torchvision file) into one branch's stem and encoder, as the release initialises both branches.
- CLI: `python -m cmmp_jax.convert --torch_checkpoint=FILE.pth|.npz --workdir=DIR
  [--config=configs/bjroad.py[:presets] --config.a.b=value --keep_bgr]` writes an Orbax
  checkpoint that `--mode=eval` / `--mode=predict` load (`run(config, ...)` from Python). `.pth`
  needs torch (optional); `.npz` holds the state_dict's arrays under their keys.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping

from absl import app
from absl import flags
from flax import traverse_util
import jax
from ml_collections import config_flags
import numpy as np

from cmmp_jax import checkpoint
from cmmp_jax import config_checks
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
                              branch: str = "image") -> dict:
  """Copies torchvision ResNet-34 ImageNet weights into `variables[...][branch]`'s stem and encoder.

  The stem conv is copied only when its input channels match (3 for the image branch); the
  auxiliary branch keeps its own stem conv, as in the release. fc.* is ignored. Returns new
  variables; shapes are checked.
  """
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
    if path[:2] == ("stem", "conv") and array.shape != target.shape:
      continue  # a stem with other input channels keeps its own (new) conv
    if array.shape != target.shape:
      raise ConversionError(f"ResNet key {key!r} has shape {array.shape}, model's "
                            f"{'/'.join(full)} is {target.shape} (width/depths must be ResNet-34)")
    out[collection][full] = array
    copied += 1
  if copied == 0:
    raise ConversionError("no ResNet-34 weights were copied")
  return {c: traverse_util.unflatten_dict(v) for c, v in out.items()}


def init_from_imagenet(variables: Mapping, path: str | pathlib.Path) -> tuple[dict, list[str]]:
  """Loads a torchvision ResNet-34 state_dict file into every encoder branch of `variables`
  ('image' and 'aux' of the two-branch models, 'net' of the one-branch ones), as the release
  initialises both encoders. Returns (variables, the branches filled)."""
  weights = load_state_dict_file(path)
  branches = [b for b in ("image", "aux", "net") if b in variables["params"]]
  for branch in branches:
    variables = load_torchvision_resnet34(variables, weights, branch)
  return dict(variables), branches


def load_state_dict_file(path: str | pathlib.Path) -> dict:
  """Reads a .pth/.pt (torch, optional dependency) or .npz state_dict into numpy arrays."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if path.suffix == ".npz":
    with np.load(path) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  if path.suffix in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"reading {path} needs PyTorch (`pip install torch`); or save the "
                        "state_dict as .npz: np.savez(f, **{k: v.numpy() for k, v in "
                        "sd.items()})") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj:
      obj = obj["state_dict"]
    return {k: v.numpy() for k, v in obj.items() if hasattr(v, "numpy")}
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
