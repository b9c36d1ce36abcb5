"""PyTorch checkpoints read without PyTorch, and the release's ImageNet initialisation.

- cmmp_jax.convert.read_torch_file on .pth files this test writes byte by byte in torch.save's
  zip format (protocol-2 pickle with persistent storage ids, _rebuild_tensor_v2 / v3 reduce calls,
  OrderedDicts; raw little-endian storages in <name>/data/<key>) and in the legacy format of
  torch < 1.6 (pickles, then the raw storages): strided views, shared storages, float16 /
  bfloat16 / int64 / bool / uint16, parameters, a big-endian file; and its refusals (a class
  outside the state_dict's few names, truncated and damaged files).
- With PyTorch importable (not a dependency; skipped otherwise): real torch.save files of a
  torchvision-like ResNet-34, in both formats, read identically.
- config.init: ImageNet by default in the dataset configs, from scratch in the synthetic one; the
  file from a local path, the cache, or a one-time download (never the network here: the
  download is faked) checked by SHA-256 prefix, written atomically; offline, one error line
  saying what to fetch, where to put it and how to opt out; both encoders filled, the auxiliary
  stem keeping its own conv, the image stem as the release applied it (BGR).
"""
import collections
import http.client
import io
import pathlib
import struct
import urllib.error
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

from cmmp_jax import config_checks, convert
from cmmp_jax import state as state_lib
from configs import bjroad, porto, synthetic, tlcgis

# ----------------------------------------------------------------------------------------------
# A torch.save writer without torch: the opcodes torch's pickler emits (protocol 2).


def _global(module, name):
  return b"c" + f"{module}\n{name}\n".encode()


def _str(text):
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _int(value):
  if 0 <= value < 256:
    return b"K" + bytes([value])
  if 0 <= value < 65536:
    return b"M" + struct.pack("<H", value)
  return b"J" + struct.pack("<i", value)


def _tuple(items):
  items = list(items)
  if not items:
    return b")"
  if len(items) <= 3:
    return b"".join(items) + b"\x85\x86\x87"[len(items) - 1:len(items)]
  return b"(" + b"".join(items) + b"t"


_ORDERED_DICT = _global("collections", "OrderedDict") + b")R"  # OrderedDict() by REDUCE


class Tensor:
  """A tensor as torch pickles it: a view (offset, size, stride, in elements) of a storage."""

  def __init__(self, storage, size, stride=None, offset=0, storage_type="FloatStorage",
               v3_dtype=None, parameter=False):
    self.storage, self.size, self.offset = storage, tuple(size), offset
    if stride is None:  # contiguous
      stride, step = [], 1
      for d in reversed(self.size):
        stride.insert(0, step)
        step *= d
    self.stride, self.storage_type = tuple(stride), storage_type
    self.v3_dtype, self.parameter = v3_dtype, parameter


def _tensor_pickle(t: Tensor, key: str, numel: int, legacy_view=False):
  """`legacy_view`: False for the zip format's 5-field persistent id; None or (view key,
  offset, size) for the legacy format's sixth field."""
  storage_type = (_global("torch.storage", "UntypedStorage") if t.v3_dtype
                  else _global("torch", t.storage_type))
  pid = b"(" + _str("storage") + storage_type + _str(key) + _str("cpu") + _int(numel)
  if legacy_view is None:
    pid += b"N"
  elif legacy_view:
    pid += _tuple([_str(legacy_view[0]), _int(legacy_view[1]), _int(legacy_view[2])])
  pid += b"tQ"
  args = (pid + _int(t.offset) + _tuple(_int(d) for d in t.size)
          + _tuple(_int(s) for s in t.stride) + b"\x89" + _ORDERED_DICT)
  if t.v3_dtype:
    out = (_global("torch._utils", "_rebuild_tensor_v3") + b"(" + args
           + _global("torch", t.v3_dtype) + b"tR")
  else:
    out = _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"
  if t.parameter:
    out = (_global("torch._utils", "_rebuild_parameter") + out + b"\x88" + _ORDERED_DICT
           + b"\x87R")
  return out


def _pickle(obj, *, byteorder="little", legacy=False):
  """(torch's data.pkl for obj, {storage key: (numel, bytes)}) for obj an (Ordered)dict of Tensor,
  nested dicts, ints and strings. Storages are numpy arrays, shared between tensors by
  identity, written in `byteorder`; legacy keys look like torch's (str of a C pointer)."""
  keys, records = {}, {}

  def save(value):
    if isinstance(value, Tensor):
      sid = id(value.storage)
      if sid not in keys:
        keys[sid] = str(94_000_000_000 + 64 * len(keys)) if legacy else str(len(keys))
        array = np.ascontiguousarray(value.storage)
        if byteorder == "big" and array.dtype.itemsize > 1:  # ml_dtypes' types swap as uints
          array = (array.byteswap() if array.dtype.kind in "biufc" else
                   array.view(f"u{array.dtype.itemsize}").byteswap())
        # A typed storage counts elements, an untyped one (v3) bytes.
        numel = value.storage.nbytes if value.v3_dtype else value.storage.size
        records[keys[sid]] = (numel, array.tobytes())
      return _tensor_pickle(value, keys[sid], records[keys[sid]][0], None if legacy else False)
    if isinstance(value, collections.OrderedDict):
      body = b"".join(_str(k) + save(v) for k, v in value.items())
      return _ORDERED_DICT + (b"(" + body + b"u" if value else b"")
    if isinstance(value, dict):
      return b"}" + b"(" + b"".join(_str(k) + save(v) for k, v in value.items()) + b"u"
    if isinstance(value, bool):
      return b"\x88" if value else b"\x89"
    if isinstance(value, int):
      return _int(value)
    if isinstance(value, str):
      return _str(value)
    raise TypeError(type(value))

  body = save(obj)
  if isinstance(obj, collections.OrderedDict):  # a state_dict's _metadata attribute, by BUILD
    body += b"}" + _str("_metadata") + _ORDERED_DICT + _str("") + b"}" + _str("version") + \
        _int(1) + b"sssb"
  return b"\x80\x02" + body + b".", records


def write_pth(path, obj, *, prefix="archive", byteorder="little", reverse_storages=False):
  """torch.save(obj, path): the records and their order are torch 2.x's (alignment padding
  aside)."""
  data_pkl, records = _pickle(obj, byteorder=byteorder)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr(f"{prefix}/data.pkl", data_pkl)
    archive.writestr(f"{prefix}/.format_version", "1")
    archive.writestr(f"{prefix}/.storage_alignment", "64")
    archive.writestr(f"{prefix}/byteorder", byteorder)
    for key in reversed(records) if reverse_storages else records:
      archive.writestr(f"{prefix}/data/{key}", records[key][1])
    archive.writestr(f"{prefix}/version", "3\n")
    archive.writestr(f"{prefix}/.data/serialization_id", "0" * 40)
  return path


_LEGACY_HEADER = (  # pickles of the magic number, protocol version 1001 and the system info
    b"\x80\x02\x8a\x0a" + (0x1950a86a20f9469cfc6c).to_bytes(10, "little") + b"."
    + b"\x80\x02M\xe9\x03."
    + b"\x80\x02}(" + _str("protocol_version") + b"M\xe9\x03" + _str("little_endian") + b"\x88"
    + _str("type_sizes") + b"}(" + _str("short") + _int(2) + _str("int") + _int(4)
    + _str("long") + _int(4) + b"uu.")


def legacy_pth_bytes(data_pkl, records):
  """torch < 1.6's torch.save stream: header, the object, the sorted storage keys, then per
  storage its element count (int64, little-endian) and its bytes."""
  keys = sorted(records)
  out = _LEGACY_HEADER + data_pkl
  out += b"\x80\x02](" + b"".join(_str(k) for k in keys) + b"e."
  for key, (numel, raw) in ((k, records[k]) for k in keys):
    out += struct.pack("<q", numel) + raw
  return out


def write_legacy_pth(path, obj):
  path.write_bytes(legacy_pth_bytes(*_pickle(obj, legacy=True)))
  return path


def _sample():
  """(objects to write, the arrays torch.load would give as numpy) covering the layouts."""
  rng = np.random.default_rng(0)
  conv = rng.standard_normal(4 * 3 * 2 * 2).astype(np.float32)
  fc = rng.standard_normal(15).astype(np.float32)  # a (3, 5) matrix, saved transposed
  half = rng.standard_normal(6).astype(np.float16)
  bf16 = rng.standard_normal(4).astype(ml_dtypes.bfloat16)
  count = np.array([12345678901], np.int64)
  index = np.array([3, -1, 7, 2**40], np.int64)
  mask = np.array([True, False, True])
  u16 = np.array([1, 65535, 300], np.uint16)
  param = rng.standard_normal(3).astype(np.float32)
  state = collections.OrderedDict([
      ("conv.weight", Tensor(conv, (4, 3, 2, 2))),
      ("fc.weight", Tensor(fc, (5, 3), stride=(1, 5))),      # .t() of a (3, 5) tensor
      ("fc.bias", Tensor(fc, (2, 2), stride=(5, 2), offset=1)),  # same storage, strided view
      ("half", Tensor(half, (2, 3), storage_type="HalfStorage")),
      ("half_t", Tensor(half, (3, 2), stride=(1, 3), storage_type="HalfStorage")),
      ("bf16", Tensor(bf16, (4,), storage_type="BFloat16Storage")),
      ("bn.num_batches_tracked", Tensor(count, (), storage_type="LongStorage")),
      ("index", Tensor(index, (2, 2), stride=(1, 2), storage_type="LongStorage")),
      ("mask", Tensor(mask, (3,), storage_type="BoolStorage")),
      ("u16", Tensor(u16, (3,), v3_dtype="uint16")),
      ("expanded", Tensor(param, (2, 3), stride=(0, 1))),    # .expand(2, 3): stride 0
      ("empty", Tensor(param, (0, 3))),
      ("param", Tensor(param, (3,), parameter=True)),
  ])
  want = {
      "conv.weight": conv.reshape(4, 3, 2, 2),
      "fc.weight": fc.reshape(3, 5).T,
      "fc.bias": np.array([[fc[1], fc[3]], [fc[6], fc[8]]]),
      "half": half.reshape(2, 3), "half_t": half.reshape(3, 2, order="F"), "bf16": bf16,
      "bn.num_batches_tracked": count.reshape(()), "index": index.reshape(2, 2).T,
      "mask": mask, "u16": u16, "expanded": np.stack([param, param]),
      "empty": np.zeros((0, 3), np.float32), "param": param,
  }
  return state, want


def _assert_same(got, want):
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    assert got[key].shape == value.shape, key
    assert got[key].flags.c_contiguous, key
    assert got[key].tobytes() == np.ascontiguousarray(value).tobytes(), key  # bit for bit


def test_a_handwritten_torch_save_file_reads_exactly(tmp_path):
  state, want = _sample()
  got = convert.read_torch_file(write_pth(tmp_path / "sample.pth", state))
  assert isinstance(got, collections.OrderedDict) and list(got) == list(want)
  _assert_same(got, want)
  assert got._metadata == {"": {"version": 1}}  # the state_dict's attribute, as torch sets it
  # Storage order in the archive, the archive's folder name and big-endian files do not matter.
  for name, kwargs in [("reordered.pth", {"reverse_storages": True}),
                       ("resnet34-b627a593.pth", {"prefix": "resnet34-b627a593"}),
                       ("big.pth", {"byteorder": "big"})]:
    _assert_same(convert.read_torch_file(write_pth(tmp_path / name, state, **kwargs)), want)
  # The legacy format (torch < 1.6: pickles, then the raw storages), e.g. older torchvision
  # downloads (resnet34-333f7ec4.pth) and checkpoints saved before 2020.
  _assert_same(convert.read_torch_file(write_legacy_pth(tmp_path / "legacy.pth", state)), want)
  # A legacy storage view (torch <= 1.x's view metadata): elements [2, 6) of a root storage.
  root = np.arange(8, dtype=np.float32)
  data_pkl = b"\x80\x02" + _ORDERED_DICT + b"(" + _str("v") + _tensor_pickle(
      Tensor(root, (2, 2)), "140", 8, ("141", 2, 4)) + b"u."
  view = tmp_path / "view.pth"
  view.write_bytes(legacy_pth_bytes(data_pkl, {"140": (8, root.tobytes())}))
  _assert_same(convert.read_torch_file(view), {"v": root[2:6].reshape(2, 2)})
  # load_state_dict_file: arrays only, a training checkpoint's 'state_dict' unwrapped.
  wrapped = write_pth(tmp_path / "ckpt.pt", {"epoch": 7, "arch": "resnet34",
                                             "state_dict": state})
  _assert_same(convert.load_state_dict_file(wrapped), want)
  assert convert.read_torch_file(wrapped)["epoch"] == 7


def _pickle_zip(path, data_pkl, records=()):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    for name, data in records:
      archive.writestr(f"archive/{name}", data)
  return path


def test_refuses_what_a_state_dict_does_not_hold_and_damaged_files(tmp_path):
  marker = tmp_path / "ran"
  evil = _pickle_zip(tmp_path / "evil.pth", b"\x80\x02" + _global("posix", "system")
                     + _str(f"touch {marker}") + b"\x85R.")
  with pytest.raises(convert.CheckpointFormatError,
                     match=r"evil\.pth: refusing to load posix\.system"):
    convert.read_torch_file(evil)
  assert not marker.exists()
  for module, name in [("builtins", "getattr"), ("torch", "load"), ("numpy", "frombuffer"),
                       ("collections", "namedtuple"), ("torch._utils", "_rebuild_qtensor")]:
    path = _pickle_zip(tmp_path / "other.pth", b"\x80\x02" + _global(module, name) + b".")
    with pytest.raises(convert.CheckpointFormatError, match=f"refusing to load {module}.{name}"):
      convert.read_torch_file(path)

  state, _ = _sample()
  good = write_pth(tmp_path / "good.pth", state).read_bytes()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(good[:len(good) // 2])
  with pytest.raises(convert.CheckpointFormatError, match=r"truncated\.pth is a truncated zip"):
    convert.load_state_dict_file(truncated)
  damaged = tmp_path / "damaged.pth"  # a storage's bytes changed: the zip's CRC catches it
  at = good.index(state["conv.weight"].storage.astype("<f4").tobytes()) + 5
  damaged.write_bytes(good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:])
  with pytest.raises(convert.CheckpointFormatError, match="damaged PyTorch checkpoint"):
    convert.read_torch_file(damaged)
  cut_pickle = _pickle_zip(tmp_path / "cut.pth", b"\x80\x02" + _ORDERED_DICT + b"(" + _str("a"))
  with pytest.raises(convert.CheckpointFormatError, match="damaged PyTorch checkpoint"):
    convert.read_torch_file(cut_pickle)
  # A view past the end of its storage is refused, not read out of bounds.
  storage = np.zeros(4, np.float32)
  past = write_pth(tmp_path / "past.pth", collections.OrderedDict(
      w=Tensor(storage, (3, 2), stride=(2, 1))))
  with pytest.raises(convert.CheckpointFormatError, match="reaches past its storage of 4"):
    convert.read_torch_file(past)
  missing = _pickle_zip(tmp_path / "missing.pth", b"\x80\x02" + _tensor_pickle(
      Tensor(storage, (4,)), "0", 4) + b".")
  with pytest.raises(convert.CheckpointFormatError, match="no record archive/data/0"):
    convert.read_torch_file(missing)

  legacy = write_legacy_pth(tmp_path / "legacy.pth", state).read_bytes()
  (tmp_path / "cut_legacy.pth").write_bytes(legacy[:-3])
  with pytest.raises(convert.CheckpointFormatError, match="cut_legacy.pth is truncated"):
    convert.read_torch_file(tmp_path / "cut_legacy.pth")
  (tmp_path / "bad_legacy.pth").write_bytes(convert._LEGACY_MAGIC + b"." + b"\x00" * 64)
  with pytest.raises(convert.CheckpointFormatError, match="damaged legacy PyTorch checkpoint"):
    convert.read_torch_file(tmp_path / "bad_legacy.pth")
  evil_legacy = tmp_path / "evil_legacy.pth"
  evil_legacy.write_bytes(_LEGACY_HEADER + b"\x80\x02" + _global("posix", "system")
                          + _str(f"touch {marker}") + b"\x85R.")
  with pytest.raises(convert.CheckpointFormatError, match="refusing to load posix.system"):
    convert.read_torch_file(evil_legacy)
  assert not marker.exists()
  other = tmp_path / "notes.pth"
  other.write_bytes(b"not a real file")
  with pytest.raises(convert.CheckpointFormatError, match="not a PyTorch checkpoint"):
    convert.load_state_dict_file(other)


# ----------------------------------------------------------------------------------------------
# Real torch.save files (only where PyTorch happens to be importable).


def _torch_resnet34(torch):
  """torchvision's ResNet-34 module layout (keys, shapes, BatchNorm buffers) in plain torch.nn."""
  nn = torch.nn

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

  class ResNet34(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      cin = 64
      for i, (cout, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        blocks = [Block(cin, cout, 1 if i == 1 else 2)] + [Block(cout, cout, 1)
                                                            for _ in range(n - 1)]
        setattr(self, f"layer{i}", nn.Sequential(*blocks))
        cin = cout
      self.fc = nn.Linear(512, 1000)

  torch.manual_seed(0)
  model = ResNet34()
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      module.running_mean.normal_()
      module.running_var.uniform_(0.5, 2.0)
      module.num_batches_tracked.fill_(1234)
  return model


def test_real_torch_save_files_read_identically(tmp_path):
  torch = pytest.importorskip("torch")
  state = _torch_resnet34(torch).state_dict()
  path = tmp_path / "resnet34.pth"
  torch.save(state, path)
  got = convert.load_state_dict_file(path)
  assert list(got) == list(state)
  for key, value in state.items():
    np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)
    assert got[key].dtype == value.numpy().dtype, key
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  mixed = {"t": base.t(), "slice": base[1:, ::2], "expanded": base[0].expand(3, 6),
           "half": base.half().t(), "bf16": base.bfloat16()[::2], "long": base.long().t(),
           "bool": base > 10, "u16": base.to(torch.uint16), "param": torch.nn.Parameter(base),
           "int8": base.to(torch.int8), "f64": base.double()[:, 1]}
  torch.save(mixed, tmp_path / "mixed.pth")
  got = convert.read_torch_file(tmp_path / "mixed.pth")
  for key, value in mixed.items():
    value = value.detach()
    want = (value.float().numpy().astype(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16
            else value.numpy())
    assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
    np.testing.assert_array_equal(got[key], want, err_msg=key)
  # The legacy format (torch < 1.6, and torch.save(..., _use_new_zipfile_serialization=False)).
  torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  got = convert.load_state_dict_file(tmp_path / "legacy.pth")
  assert list(got) == list(state)
  for key, value in state.items():
    np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)
  torch.save(mixed, tmp_path / "legacy_mixed.pth", _use_new_zipfile_serialization=False)
  got = convert.read_torch_file(tmp_path / "legacy_mixed.pth")
  for key, value in mixed.items():
    np.testing.assert_array_equal(got[key].astype(np.float64),
                                  value.detach().double().numpy(), err_msg=key)
  torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole module, not a state_dict
  with pytest.raises(convert.CheckpointFormatError, match="refusing to load torch.nn"):
    convert.read_torch_file(tmp_path / "module.pth")


# ----------------------------------------------------------------------------------------------
# config.init: the release's ImageNet start.


def _resnet34_state_dict():
  """torchvision ResNet-34's keys and shapes with random values."""
  rng = np.random.default_rng(1)
  state = collections.OrderedDict()

  def bn(name, c):
    state[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    state[f"{name}.bias"] = rng.standard_normal(c).astype(np.float32)
    state[f"{name}.running_mean"] = rng.standard_normal(c).astype(np.float32)
    state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    state[f"{name}.num_batches_tracked"] = np.array(0, np.int64)

  def conv(name, cout, cin, k):
    state[name] = rng.standard_normal((cout, cin, k, k)).astype(np.float32)

  conv("conv1.weight", 64, 3, 7)
  bn("bn1", 64)
  cin = 64
  for i, (cout, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
    for j in range(n):
      conv(f"layer{i}.{j}.conv1.weight", cout, cin if j == 0 else cout, 3)
      bn(f"layer{i}.{j}.bn1", cout)
      conv(f"layer{i}.{j}.conv2.weight", cout, cout, 3)
      bn(f"layer{i}.{j}.bn2", cout)
      if j == 0 and i > 1:
        conv(f"layer{i}.{j}.downsample.0.weight", cout, cin, 1)
        bn(f"layer{i}.{j}.downsample.1", cout)
    cin = cout
  state["fc.weight"] = rng.standard_normal((1000, 512)).astype(np.float32)
  state["fc.bias"] = np.zeros(1000, np.float32)
  return state


def _as_tensors(state):
  return collections.OrderedDict(
      (k, Tensor(v.reshape(-1), v.shape, storage_type="LongStorage" if v.dtype == np.int64
                 else "FloatStorage")) for k, v in state.items())


@pytest.fixture(name="resnet_file", scope="module")
def fixture_resnet_file(tmp_path_factory):
  """(a torchvision-like ResNet-34 .pth written without torch (87 MB), its state_dict)."""
  state = _resnet34_state_dict()
  path = write_pth(tmp_path_factory.mktemp("weights") / "resnet34.pth", _as_tensors(state))
  return path, state


@pytest.fixture(name="cache")
def fixture_cache(tmp_path, monkeypatch):
  """(an empty cache dir, a small weights file whose hash prefix stands for torchvision's);
  torchvision's cache pointed away from the user's; the network forbidden (a test that
  downloads replaces _urlopen)."""
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
  monkeypatch.setenv("CMMP_JAX_CACHE", str(tmp_path / "cache"))
  weights = write_pth(tmp_path / "weights.pth", _sample()[0])
  monkeypatch.setattr(convert, "IMAGENET_RESNET34_SHA256_PREFIX",
                      convert.sha256_of(weights)[:8])

  def no_network(*args, **kwargs):
    raise AssertionError(f"the network was used: {args} {kwargs}")

  monkeypatch.setattr(convert, "_urlopen", no_network)
  return tmp_path / "cache", weights


class _Response(io.BytesIO):

  def __init__(self, data, calls):
    super().__init__(data)
    calls.append(1)


def _fake_download(monkeypatch, data):
  calls = []
  monkeypatch.setattr(convert, "_urlopen", lambda url, timeout: _Response(data, calls))
  return calls


class _CutResponse(io.BytesIO):

  def read(self, *args):
    raise http.client.IncompleteRead(b"partial", 1000)


def test_dataset_configs_start_from_imagenet_and_synthetic_from_scratch():
  for module in (bjroad, porto, tlcgis):
    config = module.get_config()
    assert config.init.imagenet and config.init.image_stem == "release"
    assert config.init.resnet34_checkpoint == "" and config.init.download
    convert.check_imagenet_fits(config)  # the release model: ResNet-34 encoders
  assert not synthetic.get_config().init.imagenet
  with pytest.raises(convert.ConversionError,
                     match=r"width=1\.0.*got width 0\.25.*--config\.init\.imagenet=False"):
    config = bjroad.get_config()
    config.model.width = 0.25
    convert.check_imagenet_fits(config)
  config = synthetic.get_config()
  config.init.resnet34_checkpoint = "/weights/resnet34-b627a593.pth"
  with pytest.raises(ValueError, match="resnet34_checkpoint is set but config.init.imagenet"):
    config_checks.validate(config)
  config = bjroad.get_config()
  config.init.image_stem = "bgr"
  with pytest.raises(ValueError, match="config.init.image_stem"):
    config_checks.validate(config)


def test_download_once_checked_and_atomic(cache, monkeypatch):
  cache, weights = cache
  init = bjroad.get_config().init
  data = weights.read_bytes()
  wrong = _fake_download(monkeypatch, data[:-1] + b"x")
  with pytest.raises(convert.ChecksumError, match="does not start with"):
    convert.resolve_imagenet_weights(init)
  assert wrong and not any(cache.iterdir())  # no file, no temporary file left
  monkeypatch.setattr(convert, "_urlopen", lambda url, timeout: _CutResponse(data))
  with pytest.raises(convert.WeightsUnavailableError, match="IncompleteRead"):
    convert.resolve_imagenet_weights(init)
  assert not any(cache.iterdir())
  calls = _fake_download(monkeypatch, data)
  path, how = convert.resolve_imagenet_weights(init)
  assert (path, how) == (cache / convert.IMAGENET_RESNET34_FILE, "downloaded")
  assert path.read_bytes() == data and [p.name for p in cache.iterdir()] == [path.name]
  assert convert.resolve_imagenet_weights(init) == (path, "cache") and len(calls) == 1
  # A cached file that no longer matches is refused with what to do.
  path.write_bytes(data[:1000])
  with pytest.raises(convert.ChecksumError, match="delete it and run again"):
    convert.resolve_imagenet_weights(init)


def test_offline_without_the_file_says_what_to_fetch_and_where(cache, monkeypatch):
  cache, weights = cache
  init = bjroad.get_config().init

  def offline(url, timeout):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

  monkeypatch.setattr(convert, "_urlopen", offline)
  target = cache / "resnet34-b627a593.pth"
  with pytest.raises(convert.WeightsUnavailableError) as error:
    convert.resolve_imagenet_weights(init)
  message = str(error.value)
  assert "\n" not in message
  for part in ("download failed", "name resolution", convert.IMAGENET_RESNET34_URL, str(target),
               "--config.init.resnet34_checkpoint", "--config.init.imagenet=False"):
    assert part in message, part
  init.download = False  # never tries the network
  monkeypatch.setattr(convert, "_urlopen", lambda *a, **k: pytest.fail("network used"))
  with pytest.raises(convert.WeightsUnavailableError,
                     match=r"config\.init\.download=False; fetch .*resnet34-b627a593\.pth"):
    convert.resolve_imagenet_weights(init)
  init.resnet34_checkpoint = str(cache / "elsewhere.pth")
  with pytest.raises(convert.WeightsUnavailableError, match="elsewhere.pth' does not exist"):
    convert.resolve_imagenet_weights(init)
  # A local file is used as given; torchvision's cache is found too; both without the network.
  init.resnet34_checkpoint = str(weights)
  assert convert.resolve_imagenet_weights(init) == (weights, "local file")
  init.resnet34_checkpoint = ""
  hub = pathlib.Path(convert.torch_hub_checkpoint_dir())
  hub.mkdir(parents=True)
  (hub / convert.IMAGENET_RESNET34_FILE).write_bytes(weights.read_bytes())
  assert convert.resolve_imagenet_weights(init) == (hub / convert.IMAGENET_RESNET34_FILE,
                                                    "torch hub cache")
  # A torchvision-named local file has its name's hash checked, as torch.hub does.
  misnamed = cache.parent / "resnet34-00000000.pth"
  misnamed.write_bytes(weights.read_bytes())
  init.resnet34_checkpoint = str(misnamed)
  with pytest.raises(convert.ChecksumError, match="does not start with 00000000"):
    convert.resolve_imagenet_weights(init)


@pytest.mark.parametrize("model, image_stem", [("cmmpnet", "release"), ("cmmpnet", "rgb"),
                                               ("image_only", "release"), ("aux_only", "rgb")])
def test_encoders_start_from_imagenet_like_the_release(cache, monkeypatch, resnet_file, model,
                                                       image_stem):
  cache, _ = cache
  path, state = resnet_file
  cache.mkdir()
  (cache / convert.IMAGENET_RESNET34_FILE).symlink_to(path)
  monkeypatch.setattr(convert, "IMAGENET_RESNET34_SHA256_PREFIX", convert.sha256_of(path)[:8])
  config = bjroad.get_config(model)
  config.init.image_stem = image_stem
  fresh = jax.tree.map(lambda s: np.full(s.shape, 7, s.dtype),
                       state_lib.abstract_variables(config))
  variables, description = convert.init_encoders(fresh, config)
  branches = ["image", "aux"] if model == "cmmpnet" else ["net"]
  assert description == (f"ImageNet ResNet-34 ({'+'.join(branches)} encoders) from "
                         f"{cache / convert.IMAGENET_RESNET34_FILE}")
  params, stats = variables["params"], variables["batch_stats"]
  stem = state["conv1.weight"].transpose(2, 3, 1, 0)
  # The release feeds BGR pixels to torchvision's RGB filters; our RGB input meets the same
  # function when the stem's input channels are reversed.
  want_stem = stem[:, :, ::-1, :] if image_stem == "release" else stem
  for branch in branches:
    kernel = params[branch]["stem"]["conv"]["conv"]["kernel"]
    if branch == "aux" or model == "aux_only":
      assert (kernel == 7).all()  # the auxiliary stem keeps its own (1-channel) conv
    else:
      np.testing.assert_array_equal(kernel, want_stem)
    np.testing.assert_array_equal(params[branch]["stem"]["bn"]["scale"], state["bn1.weight"])
    np.testing.assert_array_equal(params[branch]["encoder3"]["block5"]["conv2"]["conv"]["kernel"],
                                  state["layer3.5.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(stats[branch]["encoder4"]["block0"]["downsample_bn"]["var"],
                                  state["layer4.0.downsample.1.running_var"])
    for untouched in ("dblock", "decoder1", "head"):  # only the stems and encoders are set
      assert all((leaf == 7).all() for leaf in jax.tree.leaves(params[branch][untouched]))
  assert all((leaf == 7).all() for leaf in jax.tree.leaves(params["finalconv"]))
  config.init.imagenet = False
  assert convert.init_encoders(fresh, config)[1] == "random"
