"""What crosses the process group during a collective save or load: msgpack bytes through
the job's own key-value store (never pickle, never a collective on the training group).

Every exchange is a key per rank under a prefix unique to the operation (the group's
ranks and a per-group call count, the same on every member because every member makes the
same calls in the same order); a rank waits for the others' keys at most
``APTCKPT_COLLECTIVE_TIMEOUT_S`` (default 60 s), so a rank that was killed or hangs makes
the others raise :class:`~aptckpt.errors.CollectiveError` instead of waiting forever. The
store is the one ``init_process_group`` made (its group's, for a subgroup): nothing new
listens, a background save may use it from another thread, and a subgroup's members use it
without the rest of the job. The coordinator removes the operation's keys once every rank
has read them.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
from typing import Any

import msgpack

from aptckpt.errors import CollectiveError

__all__ = ["Comm", "describe", "failed", "timeout_s"]

DEFAULT_TIMEOUT_S = 60.0
_calls: dict[tuple[int, ...], int] = {}
_lock = threading.Lock()


def timeout_s() -> float:
    """How long a rank waits for the others at any step (``APTCKPT_COLLECTIVE_TIMEOUT_S``)."""
    raw = os.environ.get("APTCKPT_COLLECTIVE_TIMEOUT_S", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise CollectiveError(
            "process_group= needs torch.distributed initialised in this process "
            "(torch.distributed.init_process_group); without a process group, save and load "
            "are those of one process"
        )
    return dist


def _store(dist: Any, group: Any) -> Any:
    from torch.distributed import distributed_c10d as c10d

    try:
        return c10d._get_process_group_store(group)
    except (KeyError, AttributeError):  # WORLD spelled otherwise, or an older torch
        return c10d._get_default_store()


class Comm:
    """This rank's part in one collective operation of a process group."""

    def __init__(self, process_group: Any, what: str) -> None:
        dist = _dist()
        self.what = what
        self.timeout = timeout_s()
        self.ranks: tuple[int, ...] = tuple(dist.get_process_group_ranks(process_group))
        self.rank: int = int(dist.get_rank(process_group))
        if self.rank < 0:
            raise CollectiveError(
                f"{what}: this process (global rank {dist.get_rank()}) is not a member of the "
                "process group it was given"
            )
        self.size = len(self.ranks)
        self.store = _store(dist, process_group)
        with _lock:
            call = _calls[self.ranks] = _calls.get(self.ranks, 0) + 1
        group = hashlib.blake2b(repr(self.ranks).encode(), digest_size=6).hexdigest()
        self.prefix = f"aptckpt/{group}/{call}/"
        self._keys: list[str] = []

    @property
    def coordinator(self) -> bool:
        """Rank 0 of the group: it creates, validates and commits."""
        return self.rank == 0

    def _key(self, step: str, rank: int) -> str:
        return f"{self.prefix}{step}/{rank}"

    def _put(self, step: str, value: Any) -> None:
        data = msgpack.packb(value, use_bin_type=True)
        try:
            self.store.set(self._key(step, self.rank), data)
        except Exception as err:
            raise CollectiveError(
                f"{self.what}: rank {self.rank} could not reach the job's store at '{step}' "
                f"({type(err).__name__}: {err})"
            ) from err

    def _take(self, step: str, ranks: list[int]) -> list[Any]:
        keys = [self._key(step, r) for r in ranks]
        self._keys += keys
        try:
            self.store.wait(keys, datetime.timedelta(seconds=self.timeout))
            values = [self.store.get(k) for k in keys]
        except Exception as err:  # the store's timeout or a lost connection
            missing = self._missing(step, ranks)
            raise CollectiveError(
                f"{self.what}: rank {self.rank} of {self.size} gave up at '{step}' after "
                f"{self.timeout:g} s (APTCKPT_COLLECTIVE_TIMEOUT_S) waiting for "
                f"rank{'s' if len(missing) != 1 else ''} {', '.join(map(str, missing)) or '?'} "
                f"({type(err).__name__}: {err}). A rank was killed, crashed, is stuck, or did "
                "not make the same call: every rank of the group must call it with the same "
                "path" + _aftermath(self.what)
            ) from err
        return [msgpack.unpackb(v, raw=False, strict_map_key=False) for v in values]

    def _missing(self, step: str, ranks: list[int]) -> list[int]:
        missing = []
        for r in ranks:
            try:
                if not self.store.check([self._key(step, r)]):
                    missing.append(r)
            except Exception:
                missing.append(r)
        return missing

    def all_gather(self, value: Any, step: str) -> list[Any]:
        """Every rank's ``value`` (msgpack-ready), in rank order."""
        self._put(step, value)
        return self._take(step, list(range(self.size)))

    def broadcast(self, value: Any, step: str) -> Any:
        """The coordinator's ``value`` on every rank (the others pass anything)."""
        if self.coordinator:
            self._put(step, value)
        return self._take(step, [0])[0]

    def agree(self, error: BaseException | None, step: str) -> None:
        """Every rank says whether it got this far; if any did not, every rank raises a
        :class:`CollectiveError` naming the ranks that failed and why (the local error is
        its cause where this rank is one of them)."""
        reports = self.all_gather(describe(error), step)
        failures = {rank: report for rank, report in enumerate(reports) if report is not None}
        if failures:
            raise failed(self.what, failures, self.size) from error

    def __enter__(self) -> Comm:
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        self.close(failed=error is not None)

    def close(self, *, failed: bool = False) -> None:
        """Say this rank is done reading; the coordinator then removes the operation's keys
        once every rank has said so (waiting at most the timeout, and never raising: the
        outcome is known). After a failure nobody waits -- a rank may be gone -- and the
        few keys of the failed operation stay in the store."""
        try:
            self.store.set(self._key("done", self.rank), b"")
            if failed or not self.coordinator:
                return
            done = [self._key("done", r) for r in range(self.size)]
            self.store.wait(done, datetime.timedelta(seconds=self.timeout))
            for key in {*self._keys, *done}:
                self.store.delete_key(key)
        except Exception:  # a rank gone after the outcome: its keys stay, harmlessly
            return


def describe(error: BaseException | None) -> str | None:
    """A rank's error as it travels to the others."""
    if error is None:
        return None
    return f"{type(error).__name__}: {error}"


def failed(what: str, failures: dict[int, str], size: int) -> CollectiveError:
    """The error every rank raises when ``failures`` (rank -> cause) happened."""
    lines = "; ".join(f"rank {rank}: {cause}" for rank, cause in sorted(failures.items()))
    ranks = ", ".join(str(r) for r in sorted(failures))
    after = _aftermath(what)
    return CollectiveError(
        f"{what} failed on rank{'s' if len(failures) > 1 else ''} {ranks} of {size} "
        f"({lines}){after}",
        failures=failures,
    )


def _aftermath(what: str) -> str:
    """What a failed operation left: a save (``what`` starts "saving") committed nothing."""
    if what.startswith("saving"):
        return "; nothing was committed and earlier checkpoints are intact"
    return ""
