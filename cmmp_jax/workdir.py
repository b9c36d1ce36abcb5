"""One training run per workdir: an exclusive lock on a file in it.

`WorkdirLock(workdir, process_index)` takes `flock(LOCK_EX | LOCK_NB)` on WORKDIR/run.lock
(process 0) or WORKDIR/run.lock.process_<i> (process i of a multi-host run), and writes who holds
it (host, pid, start time, command line) into the file. Each process of one jax.distributed run
locks its own file, so they never refuse each other, while a second run (whose process 0 wants
run.lock again) is refused with a message naming the holder.

The kernel releases a flock when its process dies, however it dies (SIGKILL, a crash, a lost
node), so a lock is never stale in the sense of blocking: a lock file that still names a holder
but that nobody holds is the trace of a run that ended without cleaning up, which the next run
reports (`previous_holder`) and takes over. A clean exit empties the file. The file itself is
never deleted: deleting it would let two runs lock two different files of the same name.
flock works on local filesystems and on NFS (Linux emulates it with NFS byte-range locks); on a
filesystem without locks the run goes on with a warning. The lock is re-entrant within a process
(main.py takes it before opening the workdir's log file, train_and_evaluate again inside).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys

from absl import logging


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir's lock."""


_HELD = {}  # lock file -> {'entered', 'fd', 'previous'}: the locks this process holds


class WorkdirLock:
  """Context manager holding the exclusive lock of `workdir` for process `process_index`.

  Attributes (after entering):
    path: the lock file.
    previous_holder: the holder a crashed earlier run left in the file (a dict), or None.
  """

  def __init__(self, workdir: str | os.PathLike, process_index: int = 0):
    self.workdir = pathlib.Path(workdir).absolute()
    name = "run.lock" if process_index == 0 else f"run.lock.process_{process_index}"
    self.path = self.workdir / name
    self.previous_holder = None

  def __enter__(self) -> WorkdirLock:
    held = _HELD.get(self.path)
    if held is not None:  # this process holds it already
      held["entered"] += 1
      self.previous_holder = held["previous"]
      return self
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(_read_holder(fd))
      os.close(fd)
      raise WorkdirBusyError(
          f"{self.workdir} is in use by another run ({holder}; lock file {self.path}): wait for "
          "it to finish, stop it, or give another --workdir") from None
    except OSError as error:
      if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
      logging.warning("the filesystem of %s does not support locks (%s): nothing stops a second "
                      "run from using this workdir at the same time", self.workdir, error)
    self.previous_holder = _read_holder(fd)
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)
    _HELD[self.path] = {"entered": 1, "fd": fd, "previous": self.previous_holder}
    return self

  def __exit__(self, *exc) -> None:
    held = _HELD.get(self.path)
    if held is None:
      return
    held["entered"] -= 1
    if held["entered"] > 0:
      return
    del _HELD[self.path]
    try:
      os.ftruncate(held["fd"], 0)  # a clean exit: nobody to report next time
    finally:
      os.close(held["fd"])  # releases the flock


def describe_previous(holder: dict) -> str:
  """One line for a lock left by a run that ended without releasing it."""
  return (f"the previous run in this workdir ({_describe(holder)}) ended without releasing its "
          "lock (killed or crashed); taking it over")


def _read_holder(fd: int) -> dict | None:
  data = os.pread(fd, 4096, 0).decode(errors="replace").strip()
  if not data:
    return None
  try:
    holder = json.loads(data)
    return holder if isinstance(holder, dict) else {"text": data}
  except json.JSONDecodeError:
    return {"text": data[:200]}


def _describe(holder: dict | None) -> str:
  if not holder:
    return "holder unknown: it has not written its name yet"
  if "pid" not in holder:
    return f"holder {holder.get('text', holder)!r}"
  return (f"pid {holder['pid']} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}")
