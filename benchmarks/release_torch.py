"""A PyTorch rebuild of the authors' release model (DinkNet34_CMMPNet), to time it beside ours.

An OPTIONAL benchmark dependency: this module imports torch at import time; nothing in cmmp_jax/
imports it, and benchmarks.run imports it only inside its 'release' section (which prints a
skip line when torch is absent). `pip install torch` (a CPU build is enough) to use it.

  python -m benchmarks.release_torch [--batch=2 --size=256 --steps=5 --warmup=2]

`ReleaseCMMPNet()` with default arguments has exactly the release's state_dict: the same keys
(in the same order) and shapes as ../shared/parity/state_dict_shapes.json, so
`cmmp_jax.convert.from_torch(model.state_dict())` gives our CMMPNet's variables, and the release's
own checkpoints load into it. It is written from the facts in ../shared/REFERENCE.md and from the
key layout `cmmp_jax.convert` knows, op for op as cmmp_jax/models computes (which is proven equal
to the release); no code of the release is copied. tests/test_release_torch.py checks it against
the release's stored outputs (../shared/parity) and against our JAX model in eval and train mode.

Architecture (NCHW; input (N, 3 + C, H, W): BGR image then the auxiliary raster, as the release):
  per branch (image: `firstconv1`... ; auxiliary: the same names with `_add`):
    stem: 7x7/2 conv (image: no bias; aux: bias) -> BN -> ReLU -> 3x3/2 max pool (padding 1)
    encoder1..4: torchvision ResNet-34 layers ([3, 4, 6, 3] basic blocks, widths 64..512)
    dblock: 3x3 convs with dilation 1, 2, 4, 8 (bias), each + ReLU, cascaded; x + all four
    decoder4..1: 1x1 conv (in -> in/4) -> BN -> ReLU -> 3x3/2 transposed conv (padding 1,
      output_padding 1) -> BN -> ReLU -> 1x1 conv (-> out) -> BN -> ReLU; skips d4 = dec4 + e3,
      d3 = dec3 + e2, d2 = dec2 + e1, d1 = dec1 (no skip)
    head: 4x4/2 transposed conv (padding 1) 64 -> 32 -> ReLU -> 3x3 conv -> ReLU
  DEM (dem_e1..e4 after each encoder layer, dem_d4..d1 after each decoder step), per side
  (`rgb_*` computes the image side's messages, `add_*` the auxiliary side's):
    L = BN(conv1x1(f)); G = ReLU(Linear(SPP_max(L, levels 1, 2, 4), channel-major)) broadcast;
    gL = sigmoid(conv1x1([L, G])), gG = sigmoid(conv1x1([L, G]));
    f_image' = f_image + gL_aux * L_aux + gG_aux * G_aux, and symmetrically for f_aux'.
  fusion: concat both heads (64 ch) -> 3x3 conv -> 1 channel; forward returns sigmoid (as the
  release); `forward(x, logits=True)` returns the pre-sigmoid map.

`width` and `depths` scale the model like cmmp_jax's model.width / model.depths (for fast tests
and the suite's small CPU default); the defaults are the release.

`time_release_step` times the release's forward and training step at a given batch and size.
Compare on an otherwise idle machine: PyTorch's OpenMP threads spin-wait at every barrier, so on
a CPU shared with other work its times grow many-fold (measured on 2 shared cores: 8x for the
forward) while XLA's grow about as much as the load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

RELEASE_DEPTHS = (3, 4, 6, 3)
SPP_LEVELS = (1, 2, 4)


def stage_widths(width: float) -> tuple[int, int, int, int]:
  """Encoder widths for a width multiplier: cmmp_jax.models.backbones.stage_widths."""
  return tuple(max(4, int(round(c * width))) for c in (64, 128, 256, 512))


class BasicBlock(nn.Module):
  """torchvision's ResNet basic block (keys conv1, bn1, conv2, bn2, downsample.0/1)."""

  def __init__(self, cin: int, cout: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + identity)


def res_layer(cin: int, cout: int, depth: int, stride: int) -> nn.Sequential:
  return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                         for i in range(depth)])


class DBlock(nn.Module):
  """D-LinkNet's center: cascaded 3x3 convs with dilation 1, 2, 4, 8; x + every output."""

  def __init__(self, channels: int):
    super().__init__()
    for i, d in enumerate((1, 2, 4, 8)):
      setattr(self, f"dilate{i + 1}", nn.Conv2d(channels, channels, 3, dilation=d, padding=d))

  def forward(self, x):
    out, y = x, x
    for i in range(4):
      y = F.relu(getattr(self, f"dilate{i + 1}")(y))
      out = out + y
    return out


class DecoderBlock(nn.Module):
  """LinkNet decoder step (keys conv1, norm1, deconv2, norm2, conv3, norm3): 2x upsampling."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    mid = max(1, cin // 4)
    self.conv1 = nn.Conv2d(cin, mid, 1)
    self.norm1 = nn.BatchNorm2d(mid)
    self.deconv2 = nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1)
    self.norm2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(mid, cout, 1)
    self.norm3 = nn.BatchNorm2d(cout)

  def forward(self, x):
    x = F.relu(self.norm1(self.conv1(x)))
    x = F.relu(self.norm2(self.deconv2(x)))
    return F.relu(self.norm3(self.conv3(x)))


def spp_max(x, levels: Sequence[int] = SPP_LEVELS):
  """Adaptive max pooling per level, each flattened channel-major (c, i, j), concatenated."""
  n = x.shape[0]
  return torch.cat([F.adaptive_max_pool2d(x, b).reshape(n, -1) for b in levels], dim=1)


class DEM(nn.Module):
  """Dual Enhancement Module for a pair of c-channel maps (keys {rgb,add}_local_message.0/1,
  {rgb,add}_global_message.0, {rgb,add}_{local,global}_gate.0)."""

  def __init__(self, c: int, levels: Sequence[int] = SPP_LEVELS):
    super().__init__()
    self.levels = tuple(levels)
    bins = sum(b * b for b in self.levels)
    # (Registered in the release's state_dict order.)
    for side in ("rgb", "add"):
      setattr(self, f"{side}_local_message", nn.Sequential(nn.Conv2d(c, c, 1),
                                                           nn.BatchNorm2d(c)))
    for side in ("rgb", "add"):
      setattr(self, f"{side}_global_message", nn.Sequential(nn.Linear(c * bins, c),
                                                            nn.ReLU(inplace=True)))
    for side in ("rgb", "add"):
      for kind in ("local", "global"):
        setattr(self, f"{side}_{kind}_gate", nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.Sigmoid()))

  def messages(self, side: str, f):
    """The gated local + global message that `side`'s features send to the other side."""
    local = getattr(self, f"{side}_local_message")(f)
    g = getattr(self, f"{side}_global_message")(spp_max(local, self.levels))
    glob = g[:, :, None, None].expand_as(local)
    both = torch.cat([local, glob], dim=1)
    return (getattr(self, f"{side}_local_gate")(both) * local
            + getattr(self, f"{side}_global_gate")(both) * glob)

  def forward(self, f_rgb, f_add):
    return f_rgb + self.messages("add", f_add), f_add + self.messages("rgb", f_rgb)


class ReleaseCMMPNet(nn.Module):
  """DinkNet34_CMMPNet, rebuilt. Input (N, 3 + aux_channels, H, W), H and W multiples of 32.

  Initialisation: torchvision's ResNet init for the encoders (kaiming normal fan_out, BN 1/0),
  PyTorch's defaults elsewhere, zero biases in the dblocks (D-LinkNet). The release starts both
  encoders from ImageNet weights, which does not change what is computed or how fast.
  """

  def __init__(self, width: float = 1.0, depths: Sequence[int] = RELEASE_DEPTHS,
               aux_channels: int = 1):
    super().__init__()
    c = stage_widths(width)
    self.aux_channels = aux_channels
    for suffix, cin, stem_bias in (("", 3, False), ("_add", aux_channels, True)):
      setattr(self, f"firstconv1{suffix}", nn.Conv2d(cin, c[0], 7, 2, 3, bias=stem_bias))
      setattr(self, f"firstbn{suffix}", nn.BatchNorm2d(c[0]))
      for i in range(4):
        setattr(self, f"encoder{i + 1}{suffix}",
                res_layer(c[max(i - 1, 0)], c[i], depths[i], 1 if i == 0 else 2))
      setattr(self, f"dblock{suffix}", DBlock(c[3]))
      for level, (cin_d, cout_d) in zip((4, 3, 2, 1), ((c[3], c[2]), (c[2], c[1]),
                                                       (c[1], c[0]), (c[0], c[0]))):
        setattr(self, f"decoder{level}{suffix}", DecoderBlock(cin_d, cout_d))
      head = max(4, c[0] // 2)
      setattr(self, f"finaldeconv1{suffix}", nn.ConvTranspose2d(c[0], head, 4, 2, 1))
      setattr(self, f"finalconv2{suffix}", nn.Conv2d(head, head, 3, padding=1))
    for i in range(4):
      setattr(self, f"dem_e{i + 1}", DEM(c[i]))
    for level, ch in zip((4, 3, 2, 1), (c[2], c[1], c[0], c[0])):
      setattr(self, f"dem_d{level}", DEM(ch))
    self.finalconv = nn.Conv2d(2 * max(4, c[0] // 2), 1, 3, padding=1)
    self._init_like_release()

  def _init_like_release(self):
    for name, module in self.named_modules():
      top = name.split(".")[0]
      if top.startswith(("firstconv1", "encoder")) and isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
      elif top.startswith("dblock") and isinstance(module, nn.Conv2d):
        module.bias.data.zero_()

  def _stem(self, suffix: str, x):
    x = F.relu(getattr(self, f"firstbn{suffix}")(getattr(self, f"firstconv1{suffix}")(x)))
    return F.max_pool2d(x, 3, 2, 1)

  def _head(self, suffix: str, x):
    x = F.relu(getattr(self, f"finaldeconv1{suffix}")(x))
    return F.relu(getattr(self, f"finalconv2{suffix}")(x))

  def forward(self, inputs, logits: bool = False):
    x, a = inputs[:, :3], inputs[:, 3:]
    x, a = self._stem("", x), self._stem("_add", a)
    skips = []
    for i in range(1, 5):
      x, a = getattr(self, f"encoder{i}")(x), getattr(self, f"encoder{i}_add")(a)
      x, a = getattr(self, f"dem_e{i}")(x, a)
      skips.append((x, a))
    x, a = self.dblock(x), self.dblock_add(a)
    for level in (4, 3, 2, 1):
      x, a = getattr(self, f"decoder{level}")(x), getattr(self, f"decoder{level}_add")(a)
      if level > 1:
        x, a = x + skips[level - 2][0], a + skips[level - 2][1]
      x, a = getattr(self, f"dem_d{level}")(x, a)
    out = self.finalconv(torch.cat([self._head("", x), self._head("_add", a)], dim=1))
    return out if logits else torch.sigmoid(out)


def dice_bce_loss(prob, target, smooth: float = 1.0):
  """The release's loss: BCE (mean) on the sigmoid outputs + batch-wide soft Dice (smooth 1)."""
  bce = F.binary_cross_entropy(prob, target)
  inter = (prob * target).sum()
  dice = (2.0 * inter + smooth) / (prob.sum() + target.sum() + smooth)
  return bce + (1.0 - dice)


def _sync(device: torch.device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _median_seconds(call, device, steps: int, warmup: int) -> tuple[float, list[float]]:
  for _ in range(warmup):
    call()
  _sync(device)
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    call()
    _sync(device)
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds), seconds


def time_release_step(batch: int = 2, size: int = 256, aux_channels: int = 1,
                      device: str | torch.device = "cpu", steps: int = 5, warmup: int = 2, *,
                      width: float = 1.0, depths: Sequence[int] = RELEASE_DEPTHS,
                      seed: int = 0) -> dict:
  """Median seconds of the release model's steps, float32, NCHW, train mode (BatchNorm with
  batch statistics) throughout, on one synthetic batch (inputs uniform in [-1.6, 1.6], ~10 %
  road labels, as benchmarks.train_step.synthetic_batch):

    forward_s:          the forward pass alone, under torch.no_grad();
    forward_backward_s: forward + the release's loss (dice_bce_loss: BCE + batch soft Dice) +
                        backward (parameter gradients, set to None before each step);
    step_s:             forward_backward + Adam (lr 1e-4, PyTorch defaults): the release's
                        training step, what cmmp_jax's train step does.

  Returns those, the per-call lists, and what was run (torch version, threads, device, shapes).
  """
  device = torch.device(device)
  torch.manual_seed(seed)
  model = ReleaseCMMPNet(width, depths, aux_channels).to(device).train()
  gen = torch.Generator().manual_seed(seed)
  x = (torch.rand(batch, 3 + aux_channels, size, size, generator=gen) * 3.2 - 1.6).to(device)
  y = (torch.rand(batch, 1, size, size, generator=gen) < 0.1).float().to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

  def forward():
    with torch.no_grad():
      return model(x)

  def forward_backward():
    model.zero_grad(set_to_none=True)
    loss = dice_bce_loss(model(x), y)
    loss.backward()
    return loss

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = dice_bce_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss

  out = {"torch_version": torch.__version__, "device": str(device),
         "threads": torch.get_num_threads(), "batch": batch, "size": size,
         "aux_channels": aux_channels, "width": width, "depths": list(depths),
         "dtype": "float32", "layout": "NCHW", "mode": "train",
         "loss": "dice_bce_loss (BCE on sigmoid outputs + batch soft Dice, smooth 1)",
         "optimizer": "Adam lr 1e-4 (step_s only)", "steps": steps, "warmup": warmup,
         "parameters": sum(p.numel() for p in model.parameters())}
  for name, call in (("forward", forward), ("forward_backward", forward_backward),
                     ("step", step)):
    out[f"{name}_s"], out[f"{name}_seconds"] = _median_seconds(call, device, steps, warmup)
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--aux_channels", type=int, default=1)
  parser.add_argument("--width", type=float, default=1.0)
  parser.add_argument("--depths", default="3,4,6,3")
  parser.add_argument("--device", default="cpu")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args(argv)
  result = time_release_step(args.batch, args.size, args.aux_channels, args.device, args.steps,
                             args.warmup, width=args.width,
                             depths=tuple(int(d) for d in args.depths.split(",")))
  print(json.dumps({k: v for k, v in result.items() if not k.endswith("_seconds")}, indent=2))


if __name__ == "__main__":
  main()
