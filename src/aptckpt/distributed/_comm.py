"""What crosses the process group during a collective save or load: msgpack bytes over
tensor collectives (never pickle), on a gloo group of aptckpt's own with a bounded timeout.

The group is made once per set of ranks (every member calls :func:`communicator` the first
time, as for any collective) with ``use_local_synchronization``, so a subgroup's members
make it without the rest of the job. Its timeout (``APTCKPT_COLLECTIVE_TIMEOUT_S``, default
60 s) bounds every wait: a rank that was killed or hangs makes the others raise
:class:`~aptckpt.errors.CollectiveError` instead of waiting forever. Because it is not the
training group, a background save may use it from another thread (never the training
group's collectives), and it listens on nothing torch.distributed did not already open
(its rendezvous goes through the job's store).
"""

from __future__ import annotations

import datetime
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
import torch

from aptckpt.errors import CollectiveError

__all__ = ["Comm", "describe", "failed", "forget_groups", "timeout_s"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
_groups: dict[tuple[Any, ...], Any] = {}
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


class Comm:
    """This rank's view of a process group, for one collective operation."""

    def __init__(self, process_group: Any, what: str) -> None:
        dist = _dist()
        self.what = what
        self.timeout = timeout_s()
        self.ranks: tuple[int, ...] = tuple(dist.get_process_group_ranks(process_group))
        self.rank = dist.get_rank(process_group)
        if self.rank < 0:
            raise CollectiveError(
                f"{what}: this process (global rank {dist.get_rank()}) is not a member of the "
                "process group it was given"
            )
        self.size = len(self.ranks)
        self.group = _private_group(dist, self.ranks, self.timeout)

    @property
    def coordinator(self) -> bool:
        """Rank 0 of the group: it creates, validates and commits."""
        return self.rank == 0

    def _call(self, step: str, run: Callable[[], T]) -> T:
        try:
            return run()
        except CollectiveError:
            raise
        except Exception as err:  # gloo raises RuntimeError / DistBackendError subclasses
            raise CollectiveError(
                f"{self.what}: rank {self.rank} of {self.size} gave up at '{step}' waiting for "
                f"the other ranks ({type(err).__name__}: {err}). A rank was killed, crashed, "
                "is stuck, or did not make the same call: every rank of the group must call "
                f"it with the same path. Waited up to {self.timeout:g} s "
                "(APTCKPT_COLLECTIVE_TIMEOUT_S)"
                + ("; nothing was committed" if self.what.startswith("saving") else "")
            ) from err

    def all_gather(self, value: Any, step: str) -> list[Any]:
        """Every rank's ``value`` (msgpack-ready), in rank order."""
        dist = _dist()
        data = msgpack.packb(value, use_bin_type=True)

        def run() -> list[Any]:
            size = torch.tensor([len(data)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
            dist.all_gather(sizes, size, group=self.group)
            longest = max(int(s.item()) for s in sizes)
            mine = torch.zeros(longest, dtype=torch.uint8)
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            found = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
            dist.all_gather(found, mine, group=self.group)
            return [
                msgpack.unpackb(
                    t[: int(s.item())].numpy().tobytes(), raw=False, strict_map_key=False
                )
                for t, s in zip(found, sizes, strict=True)
            ]

        return self._call(step, run)

    def broadcast(self, value: Any, step: str) -> Any:
        """The coordinator's ``value`` on every rank (the others pass anything)."""
        dist = _dist()
        data = msgpack.packb(value, use_bin_type=True) if self.coordinator else b""

        def run() -> Any:
            size = torch.tensor([len(data)], dtype=torch.int64)
            dist.broadcast(size, src=self.ranks[0], group=self.group)
            buffer = torch.zeros(int(size.item()), dtype=torch.uint8)
            if self.coordinator and data:
                buffer[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if buffer.numel():
                dist.broadcast(buffer, src=self.ranks[0], group=self.group)
            return msgpack.unpackb(buffer.numpy().tobytes(), raw=False, strict_map_key=False)

        return self._call(step, run)

    def agree(self, error: BaseException | None, step: str) -> None:
        """Every rank says whether it got this far; if any did not, every rank raises a
        :class:`CollectiveError` naming the ranks that failed and why (the local error is
        its cause where this rank is one of them)."""
        reports = self.all_gather(describe(error), step)
        failures = {rank: report for rank, report in enumerate(reports) if report is not None}
        if failures:
            raise failed(self.what, failures, self.size) from error


def describe(error: BaseException | None) -> str | None:
    """A rank's error as it travels to the others."""
    if error is None:
        return None
    return f"{type(error).__name__}: {error}"


def failed(what: str, failures: dict[int, str], size: int) -> CollectiveError:
    """The error every rank raises when ``failures`` (rank -> cause) happened."""
    lines = "; ".join(f"rank {rank}: {cause}" for rank, cause in sorted(failures.items()))
    ranks = ", ".join(str(r) for r in sorted(failures))
    after = (
        "; nothing was committed and earlier checkpoints are intact"
        if what.startswith("saving")
        else ""
    )
    return CollectiveError(
        f"{what} failed on rank{'s' if len(failures) > 1 else ''} {ranks} of {size} "
        f"({lines}){after}",
        failures=failures,
    )


def _private_group(dist: Any, ranks: tuple[int, ...], timeout: float) -> Any:
    """aptckpt's own gloo group over ``ranks`` (made on first use, by every member)."""
    key = (id(dist.group.WORLD), ranks, timeout)
    with _lock:
        group = _groups.get(key)
    if group is not None:
        return group
    try:
        group = dist.new_group(
            list(ranks),
            backend="gloo",
            timeout=datetime.timedelta(seconds=timeout),
            use_local_synchronization=True,
        )
    except Exception as err:
        raise CollectiveError(
            f"could not make aptckpt's gloo group over ranks {list(ranks)} "
            f"({type(err).__name__}: {err}); every rank of the process group must make the "
            "same collective call, and torch must have gloo"
        ) from err
    with _lock:
        _groups[key] = group
    return group


def forget_groups() -> None:
    """Drop the cached groups (after ``destroy_process_group``, which destroys them)."""
    with _lock:
        _groups.clear()
