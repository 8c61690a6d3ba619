"""How much of a save goes through the page cache, from the write speed measured on its disk.

Data files are written with ``O_DIRECT`` (:mod:`~aptckpt.storage.local._directio`) because on
a fast disk that is several times faster than buffered writes: the reference machine's disk took
3.3-3.7 GB/s with ``O_DIRECT`` and 0.75 GB/s through the page cache, whose writes cost a
first-touch page fault per 4 KiB (``shared/research/baselines.md``). But ``O_DIRECT`` leaves the
checkpoint out of the page cache, so the load right after a save, or the resume after a crash,
reads the disk. On a slow disk (a throttled cloud volume: the same machine's disk measured
0.25-0.45 GB/s either way on 2026-12-08) writing through the page cache costs nothing, and a
load that follows reads memory instead of disk: 2-3x faster for the states of
``benchmarks/bench_load.py``.

So every data-file writer times its ``O_DIRECT`` writes (one background thread writes them one
after another, so the time spent in them is the disk's), and :func:`record` keeps the speeds per
device. While the median of the last few measured speeds of a save's device is below
:data:`SLOW_DISK`, a save writes its first ``MemAvailable / 8`` bytes through the page cache
(:func:`budget_for`); until a device has been measured, or where it is fast, every byte goes
``O_DIRECT`` as before. ``APTCKPT_CACHED_WRITES`` overrides the measurement: ``auto`` (the
default), ``always`` (cache that budget whatever the disk), ``never``, or a number of bytes
(cache that many of each save, whatever the disk).
"""

from __future__ import annotations

import os
import statistics
import threading
from collections import deque
from dataclasses import dataclass, field

__all__ = ["SLOW_DISK", "CacheBudget", "budget_for", "forget", "measured_speed", "record"]

#: Bytes per second below which a disk is slower than filling the page cache (the reference
#: machine's buffered writes reached 0.68-0.75 GB/s), so caching a save's bytes costs nothing.
SLOW_DISK = 1.0e9
#: ``O_DIRECT`` bytes that make one speed sample (two 8 MiB writes: one is mostly latency).
SAMPLE_BYTES = 16 << 20
#: Samples kept per device; their median decides (a disk's speed moves, one write can stall).
_SAMPLES = 5
#: The fraction of available memory one save may leave in the page cache.
_MEMORY_FRACTION = 8

_MODES = {"auto", "always", "never"}


@dataclass
class _Device:
    speeds: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    nbytes: int = 0  # measured but not yet a sample
    seconds: float = 0.0


_devices: dict[int, _Device] = {}
_lock = threading.Lock()


def record(device: int, nbytes: int, seconds: float) -> None:
    """Note that ``nbytes`` were written to ``device`` with ``O_DIRECT`` in ``seconds`` of
    write calls. Every :data:`SAMPLE_BYTES` of them make one speed sample."""
    if nbytes <= 0 or seconds <= 0:
        return
    with _lock:
        state = _devices.setdefault(device, _Device())
        state.nbytes += nbytes
        state.seconds += seconds
        if state.nbytes >= SAMPLE_BYTES:
            state.speeds.append(state.nbytes / state.seconds)
            state.nbytes, state.seconds = 0, 0.0


def measured_speed(device: int) -> float | None:
    """The median measured ``O_DIRECT`` write speed of ``device`` in bytes/s, or None."""
    with _lock:
        state = _devices.get(device)
        return statistics.median(state.speeds) if state and state.speeds else None


def forget() -> None:
    """Drop every measurement (tests)."""
    with _lock:
        _devices.clear()


def _after_fork_in_child() -> None:
    # A forked child keeps its parent's measurements (the disks are the same), but another
    # thread may have held the lock at the fork.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def mode() -> str | int:
    """``APTCKPT_CACHED_WRITES``: ``auto`` (default), ``always``, ``never`` or a number of
    bytes (an int); anything else is taken as ``auto``."""
    value = os.environ.get("APTCKPT_CACHED_WRITES", "auto").strip().lower()
    if value.isdigit():
        return int(value)
    return value if value in _MODES else "auto"


def budget_for(directory: str | os.PathLike[str]) -> int:
    """Bytes a save into ``directory`` may write through the page cache (see the module doc)."""
    chosen = mode()
    if isinstance(chosen, int):
        return chosen
    if chosen == "never":
        return 0
    if chosen == "auto":
        try:
            device = os.stat(directory).st_dev
        except OSError:
            return 0
        speed = measured_speed(device)
        if speed is None or speed >= SLOW_DISK:
            return 0
    return _available_memory() // _MEMORY_FRACTION


def _available_memory() -> int:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class CacheBudget:
    """The bytes one save may still write through the page cache, shared by its files
    (thread-safe: a save may fill several files at once)."""

    def __init__(self, nbytes: int) -> None:
        self._left = max(0, nbytes)
        self._lock = threading.Lock()

    @property
    def left(self) -> int:
        return self._left

    def take(self, nbytes: int) -> int:
        """Take up to ``nbytes`` of the budget; returns how many were granted."""
        with self._lock:
            granted = min(nbytes, self._left)
            self._left -= granted
            return granted
