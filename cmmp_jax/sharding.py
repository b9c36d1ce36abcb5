"""Devices, placement and process synchronisation: the one place that knows about meshes.

Data parallelism over a 1-D `jax.sharding.Mesh` with axis 'data': batches are sharded on their
leading axis, parameters and optimizer state are replicated. With several processes (multi-host)
each process holds its own rows of every batch and the same copy of the state; processes meet at
barriers of jax's coordination service, never at ad-hoc device collectives (see
`sync_processes`).
"""
from __future__ import annotations

import collections
from typing import Iterator, Mapping, Sequence

from absl import flags
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.multihost import multihost as ocp_multihost

DATA_AXIS = "data"
# The keys of a batch that go to the devices (others, e.g. tile ids, stay on the host).
DEVICE_KEYS = ("image", "aux", "mask", "valid")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over the mesh's 'data' axis."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def put_replicated(tree, mesh: jax.sharding.Mesh):
  """Host arrays (the same on every process) -> global arrays replicated over `mesh`.

  Each process fills its own devices from its own copy. `jax.device_put` would do the same but,
  with several processes, first checks with one cross-process collective per leaf that the
  copies agree; those collectives then run wherever each process happens to be, and on CPU
  (gloo) one that waits more than 30 s for a slower process fails."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, jax.device_get(tree))


def to_global_batch(local_batch: Mapping[str, np.ndarray],
                    mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the mesh's 'data' axis.

  Only DEVICE_KEYS travel; arrays are (rows, H, W, C) NHWC (`valid`: (rows,))."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items() if k in DEVICE_KEYS}


class IteratorSnapshot:
  """A grain iterator's state at one point (grain's orbax handler only calls get_state()).

  Device prefetch reads batches ahead, so the live iterator is ahead of training; checkpoints
  save the state right after the last batch the step consumed."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


def prefetch_to_mesh(data_iter, mesh: jax.sharding.Mesh,
                     size: int = 2) -> Iterator[tuple[dict[str, jax.Array], IteratorSnapshot]]:
  """Yields (global batch, iterator snapshot after that batch), putting the next `size` batches
  on the devices ahead of use (host-to-device copies overlap the running step, since dispatch
  is asynchronous)."""
  queue = collections.deque()
  for batch in data_iter:
    queue.append((to_global_batch(batch, mesh), IteratorSnapshot(data_iter.get_state())))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def ensure_absl_flags_parsed() -> None:
  """Lets absl-flag readers run outside absl.app (scripts, notebooks, pytest): grain's
  multiprocessing and orbax's barrier switch read absl flags.

  grain 0.2.18 reads an absl flag while starting worker processes and fails with
  UnparsedFlagAccessError when flags were never parsed (google/grain#1355, fixed upstream
  later). Marking them parsed keeps every flag at its default; absl.app still parses argv.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def use_coordination_service_barriers() -> None:
  """Makes orbax meet processes at barriers of jax's coordination service (with timeouts of
  minutes) instead of its default, a device all-reduce: on CPU that is a gloo collective, and
  gloo gives up when a peer is more than 30 s late (a process that builds the dataset, or
  compiles slower, easily is). The switch is an absl flag of orbax; outside an absl app the
  flags are unparsed and orbax would read it as False, so they are marked parsed first."""
  ensure_absl_flags_parsed()
  flags.FLAGS[ocp_multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.name].value = True


_BARRIERS: collections.Counter = collections.Counter()


def sync_processes(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches this point (no-op with one process).

  A barrier of the coordination service, not a device collective: processes may arrive minutes
  apart (one builds the dataset, or compiles slower), which a collective's own connection
  timeout (30 s with gloo on CPU) does not allow."""
  if jax.process_count() > 1:
    use_coordination_service_barriers()
    _BARRIERS[name] += 1  # barrier names must be unique
    ocp.multihost.sync_global_processes(f"cmmp_{name}_{_BARRIERS[name]}", timeout=timeout_s)


def gather(array: jax.Array) -> jax.Array | np.ndarray:
  """A batch-sharded global array -> all of its rows on every process (process order)."""
  if jax.process_count() == 1:
    return array
  return multihost_utils.process_allgather(array, tiled=True)


def is_primary() -> bool:
  """Process 0 writes shared files (summaries, JSON results, logs of the run)."""
  return jax.process_index() == 0
