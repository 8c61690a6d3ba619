"""The run lock: one process at a time writes into a run, on any storage.

A writing :class:`~aptckpt.manager.CheckpointManager` holds its run's lock from
its creation until it is closed. Where the run lives decides what the lock is:

- **local** (:mod:`aptckpt.storage.local._runlock`): an exclusive ``flock`` on
  ``<run>/.aptckpt-run.lock``, dropped by the kernel the moment its holder dies.
- **object storage**: a *lease* -- the object ``<run>/.aptckpt-run.lock``, created
  only if absent (a conditional create), holding the holder's host, pid and the
  time it expires. The holder renews it from a background thread every
  :data:`LEASE_TTL` / 4 seconds. A second writer gets
  :class:`~aptckpt.errors.RunBusyError` naming the holder while the lease is live;
  a holder that died stops renewing, and its lease may be taken over once it is
  older than :data:`LEASE_TTL` (``APTCKPT_LEASE_TTL_S``, default 120 s). A holder
  whose renewal fails (it was paused past the ttl and another writer took the run)
  learns it at its next save, which raises instead of writing into a run it no
  longer owns. What a lease cannot exclude: two writers racing within one renewal
  of an expiry on a store without conditional writes (the create falls back to a
  check, then a put); the storage says which it has.

Managers of one process share the lock (one writer as far as other processes go)
and take turns through :attr:`RunLock.slot`, held by one save of the run at a time
from numbering its checkpoint until its index and retention are done.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from aptckpt._rundir import Run
from aptckpt.errors import RunBusyError
from aptckpt.storage.base import Lease
from aptckpt.storage.local._runlock import LOCK_NAME
from aptckpt.storage.local._runlock import acquire as acquire_local

__all__ = ["LEASE_TTL", "LOCK_NAME", "LeaseRunLock", "RunLock", "acquire", "lease_ttl"]

log = logging.getLogger("aptckpt")

#: Seconds a run's lease on object storage lives without renewal (default; the
#: environment's ``APTCKPT_LEASE_TTL_S``, read at each acquire, wins).
LEASE_TTL = 120.0


def lease_ttl() -> float:
    """The lease ttl in force: ``APTCKPT_LEASE_TTL_S`` or :data:`LEASE_TTL`."""
    try:
        ttl = float(os.environ.get("APTCKPT_LEASE_TTL_S", LEASE_TTL))
    except ValueError:
        return LEASE_TTL
    return ttl if ttl > 0 else LEASE_TTL


class RunLock(Protocol):
    """What the manager needs of a run lock, local or leased."""

    slot: threading.Lock
    issued: int

    @property
    def held(self) -> bool: ...

    def enter(self) -> None: ...

    def leave(self) -> None: ...

    def still_at(self, root: str) -> bool: ...

    def release(self) -> None: ...


def acquire(run: Run) -> RunLock:
    """Hold ``run`` for writing, or raise :class:`RunBusyError` if another process does."""
    if run.storage.local:
        return acquire_local(Path(run.root))
    return _acquire_lease(run)


_leases: dict[str, LeaseRunLock] = {}
_mutex = threading.Lock()


class LeaseRunLock:
    """A run lock on object storage: a lease object kept alive by a renewing thread."""

    def __init__(self, run: Run, lease: Lease, ttl: float, *, taken: float | None = None) -> None:
        self.where = run.display()
        #: Removes the storage's secrets from what its errors say (they are logged).
        self._scrub = getattr(run.storage, "scrub", str)
        #: When (monotonic) the last renewal that succeeded started: the lease is surely
        #: ours until a ttl after it, and only then.
        self._renewed = time.monotonic() if taken is None else taken
        #: One renewal at a time (the thread's, or a save's that finds the lease old).
        self._renewing = threading.Lock()
        self.slot = threading.Lock()
        self.issued = 0
        self._lease: Lease | None = lease
        self._lost: BaseException | None = None
        self._users = 0
        self._users_lock = threading.Lock()
        self._stop = threading.Event()
        self._pid = os.getpid()
        self._ttl = ttl
        self._thread = threading.Thread(
            target=self._renew_loop, args=(ttl / 4,), name="aptckpt-lease", daemon=True
        )
        self._thread.start()

    @property
    def held(self) -> bool:
        return self._lease is not None and self._pid == os.getpid()

    def enter(self) -> None:
        with self._users_lock:
            self._users += 1

    def leave(self) -> None:
        with self._users_lock:
            self._users -= 1
            last = self._users <= 0
        if last:
            self.release()

    def still_at(self, root: str) -> bool:
        """False once the lease was lost to another writer, or once no renewal succeeded
        for most of a ttl (the renewals failed or hung: the lease may have lapsed and been
        taken without this holder hearing of it). A lease past half its ttl is renewed
        here first, unless a renewal is under way already."""
        if not self.held or self._lost is not None:
            return False
        if time.monotonic() - self._renewed > self._ttl / 2 and self._renewing.acquire(
            blocking=False
        ):
            try:
                self._renew_once()
            finally:
                self._renewing.release()
        return self._lost is None and time.monotonic() - self._renewed < self._ttl * 0.9

    def _renew_once(self) -> bool:
        """Renew the lease (the caller holds ``_renewing``); False once it is lost."""
        lease = self._lease
        if lease is None or self._lost is not None:
            return False
        started = time.monotonic()
        try:
            lease.renew()
        except FileExistsError as err:
            self._lost = err
            log.error(
                "lost the run lease of %s to another writer: %s", self.where, self._scrub(str(err))
            )
            return False
        except Exception as err:  # transient: the next renewal tries again
            log.warning(
                "renewing the run lease of %s failed: %s", self.where, self._scrub(str(err))
            )
            return True
        self._renewed = started
        return True

    def _renew_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._renewing:
                if not self._renew_once():
                    return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread() and self._pid == os.getpid():
            # A renewal landing between the release's read of the lease and its delete
            # would change the lease's tag: the delete would be refused and the lease
            # would stay live for a whole ttl after a clean close.
            self._thread.join(timeout=self._ttl)  # a renewal stuck retrying: go on
        with _mutex:
            lease, self._lease = self._lease, None
            if _leases.get(self.where) is self:
                del _leases[self.where]
        if lease is not None and self._lost is None and self._pid == os.getpid():
            try:
                lease.release()
            except Exception as err:  # it expires on its own
                log.warning(
                    "releasing the run lease of %s failed: %s", self.where, self._scrub(str(err))
                )


def _acquire_lease(run: Run) -> LeaseRunLock:
    where = run.display()
    with _mutex:
        held = _leases.get(where)
        if held is not None and held.held and held._lost is None:
            return held
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        owner: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "since": since}
        ttl = lease_ttl()
        taken = time.monotonic()  # the lease's expiry is at least a ttl after this
        try:
            lease = run.storage.lease(run.path(LOCK_NAME), owner=owner, ttl=ttl)
        except FileExistsError as err:
            holder = _holder(err)
            who = (
                f"process {holder['pid']} on {holder.get('host', '?')}"
                if "pid" in holder
                else "another process"
            )
            raise RunBusyError(
                f"run '{where}' is being written by {who} (its lease "
                f"'{run.display(LOCK_NAME)}' is live; a dead holder's lease expires "
                f"{ttl:g} s after its last renewal); two trainers saving into one run "
                "would interleave their checkpoints. Stop the other one, or use another run. "
                "Reading its checkpoints needs no lock: CheckpointManager(..., read_only=True).",
                path=where,
                holder=holder,
            ) from err
        lock = LeaseRunLock(run, lease, ttl, taken=taken)
        _leases[where] = lock
        return lock


def _holder(err: FileExistsError) -> dict[str, Any]:
    """What the lease says of its holder (the storage puts it, as JSON, in ``filename``)."""
    found = err.filename
    if isinstance(found, str):
        try:
            found = json.loads(found)
        except ValueError:
            return {}
    if isinstance(found, dict):
        return {
            k: found[k] for k in ("pid", "host", "since") if isinstance(found.get(k), int | str)
        }
    return {}


def _after_fork_in_child() -> None:
    """A forked child holds no lease: its parent does (and keeps renewing it)."""
    global _mutex
    _mutex = threading.Lock()
    _leases.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
