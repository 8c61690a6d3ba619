"""The local run lock (see :mod:`aptckpt._runlock`): one process at a time writes
into a run directory.

A writing :class:`~aptckpt.manager.CheckpointManager` takes an exclusive
``flock`` on ``<run>/.aptckpt-run.lock`` when it is created and keeps it until
it is closed or collected. A second process trying the same gets
:class:`~aptckpt.errors.RunBusyError` at once -- before it trains, not at its
first save -- naming the process that holds the run.

A lock a crashed owner cannot leave stuck: the kernel drops a ``flock`` when
the last descriptor of it closes, which a killed process's exit does. The
descriptor is closed in forked children (DataLoader workers), so a child that
outlives its parent does not keep the run locked. The lock file stays in the
run (removing it would race with a process opening it); it carries the owner's
pid and start time, for messages only.

Managers of one process share the lock (a notebook creating its manager again,
a test resuming in-process): they are one writer as far as other processes go.
Within the process they take turns through :attr:`RunLock.slot`, held by one
save of the run at a time from before it numbers its checkpoint until its
index and retention are done (released by the background thread for an
asynchronous save), so two managers of one run never hand out one sequence
number or prune under each other.

The lock file is opened without following a link and must be a regular file:
a ``.aptckpt-run.lock`` planted as a link to another file would otherwise have
that file truncated and overwritten with the holder's pid.

Limits: ``flock`` is advisory -- it excludes other aptckpt writers, not other
programs -- and on network filesystems it is only as good as the filesystem's
lock support (Linux NFS clients map it to NFS byte-range locks).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import stat
import threading
import weakref
from pathlib import Path
from typing import Any

from aptckpt.errors import RunBusyError, UnsafePathError
from aptckpt.storage.local._atomic import write_error

__all__ = ["LOCK_NAME", "RunLock", "acquire"]

LOCK_NAME = ".aptckpt-run.lock"

#: The locks this process holds, by (device, inode) of the lock file: a run directory
#: moved or reached through another path is still the same run.
_held: weakref.WeakValueDictionary[tuple[int, int], RunLock] = weakref.WeakValueDictionary()
_mutex = threading.Lock()


class RunLock:
    """An exclusive hold on one run directory; released by :meth:`release`,
    garbage collection, or the end of the process."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path
        #: Held by one save of the run at a time (see the module docstring). A plain
        #: lock, not an RLock: an asynchronous save's background thread releases it.
        self.slot = threading.Lock()
        #: The highest sequence number a save of this process has given a checkpoint
        #: of the run (committed or not yet).
        self.issued = 0
        # Who uses the lock: every open manager of the run in this process, and every
        # background save in flight. The last to leave releases it -- explicitly, not
        # when the object happens to be collected (a kept traceback would delay that).
        self._users = 0
        self._users_lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def enter(self) -> None:
        """Count a user (a manager, a save in flight) of the lock."""
        with self._users_lock:
            self._users += 1

    def leave(self) -> None:
        """Uncount a user; the last one releases the lock."""
        with self._users_lock:
            self._users -= 1
            last = self._users <= 0
        if last:
            self.release()

    def still_at(self, run_dir: str | os.PathLike[str]) -> bool:
        """Whether ``run_dir`` still holds the lock file this lock was taken on (the run
        was not moved or replaced since)."""
        fd = self._fd
        if fd is None:
            return False
        try:
            here = os.stat(Path(run_dir) / LOCK_NAME, follow_symlinks=False)
            held = os.fstat(fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # drops the flock

    def __del__(self) -> None:
        self.release()


def acquire(run_dir: Path) -> RunLock:
    """Hold ``run_dir`` for writing (creating it if needed), or raise
    :class:`RunBusyError` if another process holds it."""
    with _mutex:
        fd = _open_lock_file(run_dir)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        lock = _held.get(key)
        if lock is not None and lock.held:
            os.close(fd)
            return lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            who = f"process {holder['pid']}" if "pid" in holder else "another process"
            since = f" since {holder['since']}" if "since" in holder else ""
            raise RunBusyError(
                f"run directory '{run_dir}' is being written by {who}{since}; two trainers "
                "saving into one run would interleave their checkpoints. Stop the other one "
                "(a killed process releases the run at once), or use another run directory. "
                "Reading its checkpoints needs no lock: CheckpointManager(..., read_only=True).",
                path=str(run_dir),
                holder=holder,
            ) from err
        _write_holder(fd)
        lock = RunLock(fd, run_dir / LOCK_NAME)
        _held[key] = lock
        return lock


def _open_lock_file(run_dir: Path) -> int:
    """Open (creating) the lock file: never through a link, and only a regular file."""
    path = run_dir / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePathError(
                f"the run lock '{path}' is a symbolic link; aptckpt never opens it through a "
                "link (the file it points at would be overwritten). Remove the link",
                path=str(path),
            ) from err
        raise write_error(f"taking the run lock of '{run_dir}'", err, path=run_dir) from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(
            f"the run lock '{path}' is not a regular file; remove it (aptckpt creates it)",
            path=str(path),
        )
    return fd


def _write_holder(fd: int) -> None:
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = json.dumps({"pid": os.getpid(), "since": since}).encode()
    with contextlib.suppress(OSError):  # informational only
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        doc = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: doc[k] for k in ("pid", "since") if isinstance(doc.get(k), int | str)}


def _after_fork_in_child() -> None:
    """Close the child's copies of the lock descriptors (the parent's keep the locks)."""
    global _mutex
    _mutex = threading.Lock()  # another thread may have held it at the fork
    for lock in list(_held.values()):
        lock.release()
    _held.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
