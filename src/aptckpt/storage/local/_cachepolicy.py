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

So every data file measures its disk while it writes ``O_DIRECT`` (:class:`DiskMeter`): the
block device's own counters (``/sys/dev/block/MAJ:MIN/stat``: bytes moved and the time it had
requests in flight) when its direct writes start and at its close. That is the disk's speed
whoever wrote (other ranks and threads) and whatever this process's threads did meanwhile (a
timer around a write in Python would count waits for the GIL as disk time). Cached writes are
not measured: the kernel's writeback keeps many requests in flight, and the device's busy-time
rate then says little about how fast a save reaches the disk (measured here: 1.7 GB/s of busy
time for saves that took as long as the 0.45 GB/s direct ones).
:func:`record` keeps the speeds per file system (the ``st_dev`` of the save's directory). While
the median of the last few speeds is below :data:`SLOW_DISK`, a save writes its first eighth of
available memory (:func:`available_memory`: within the container's memory limit) through the
page cache (:func:`budget_for`); until a file system has been measured, where it is fast, or
where no block device backs it (tmpfs, network and some union file systems), every byte goes
``O_DIRECT`` as before. Samples expire after :data:`SAMPLE_LIFETIME` seconds, so a disk judged
slow is measured again by the next save after that (it goes ``O_DIRECT`` once more).
``APTCKPT_CACHED_WRITES`` overrides the measurement: ``auto`` (the default), ``always`` (cache
that budget whatever the disk), ``never``, or a number of bytes (cache that many of each save);
any other value is taken as ``auto``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["SLOW_DISK", "CacheBudget", "budget_for", "forget", "measured_speed", "record"]

#: Bytes per second of busy time below which a disk is slower than filling the page cache, so
#: caching a save's bytes costs nothing. The reference machine's buffered writes reached
#: 0.68-0.75 GB/s; its disk, throttled on 2026-12-08 to a busy-time rate of 0.45-0.86 GB/s,
#: took saves of 45-273 MB as fast through the page cache as with O_DIRECT.
SLOW_DISK = 1.0e9
#: Bytes the disk moved that make one speed sample (its busy time is counted in milliseconds).
SAMPLE_BYTES = 64 << 20
#: Samples kept per device; their median decides (a disk's speed moves, one write can stall).
_SAMPLES = 5
#: Seconds a sample counts for.
SAMPLE_LIFETIME = 600.0
#: The fraction of available memory one save may leave in the page cache.
_MEMORY_FRACTION = 8

_MODES = {"auto", "always", "never"}


@dataclass
class _Device:
    speeds: deque[tuple[float, float]] = field(  # (when, bytes/s)
        default_factory=lambda: deque(maxlen=_SAMPLES)
    )
    nbytes: int = 0  # measured but not yet a sample
    seconds: float = 0.0


_devices: dict[int, _Device] = {}
_lock = threading.Lock()


def record(device: int, nbytes: int, seconds: float) -> None:
    """Note that the disk of file system ``device`` moved ``nbytes`` in ``seconds`` of busy
    time (:class:`DiskMeter`). Every :data:`SAMPLE_BYTES` of them make one speed sample."""
    if nbytes <= 0 or seconds <= 0:
        return
    with _lock:
        state = _devices.setdefault(device, _Device())
        state.nbytes += nbytes
        state.seconds += seconds
        if state.nbytes >= SAMPLE_BYTES:
            state.speeds.append((time.monotonic(), state.nbytes / state.seconds))
            state.nbytes, state.seconds = 0, 0.0


def measured_speed(device: int) -> float | None:
    """The median of ``device``'s unexpired speed samples in bytes/s, or None."""
    with _lock:
        state = _devices.get(device)
        if state is None:
            return None
        oldest = time.monotonic() - SAMPLE_LIFETIME
        recent = [speed for when, speed in state.speeds if when > oldest]
        return statistics.median(recent) if recent else None


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
    bytes (an int, ASCII digits); anything else is taken as ``auto``."""
    value = os.environ.get("APTCKPT_CACHED_WRITES", "auto").strip().lower()
    if value.isascii() and value.isdigit():
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
    return available_memory() // _MEMORY_FRACTION


def available_memory() -> int:
    """Bytes this process may still fill: the system's available memory, within the memory
    limits of the cgroups it runs in (a container sees the host's ``/proc/meminfo``)."""
    return min([_system_available(), *_cgroup_headroom()])


def _system_available() -> int:
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


_CGROUP_FILES = {  # hierarchy: (its mount, limit file, usage file)
    "v2": ("/sys/fs/cgroup", "memory.max", "memory.current"),
    "v1": ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
}


def _cgroup_headroom() -> list[int]:
    """``limit - usage`` of each memory cgroup from this process's up to the root that has a
    limit (cgroup v2 and v1); none where there is no limit or no cgroup file system."""
    try:
        with open("/proc/self/cgroup", "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        version = "v2" if hierarchy == "0" and not controllers else None
        if "memory" in controllers.split(","):
            version = "v1"
        if version is None:
            continue
        mount, limit_file, usage_file = _CGROUP_FILES[version]
        parts = [p for p in path.split("/") if p and p != ".."]
        for depth in range(len(parts), -1, -1):
            folder = os.path.join(mount, *parts[:depth])
            limit = _read_int(os.path.join(folder, limit_file))
            usage = _read_int(os.path.join(folder, usage_file))
            if limit is not None and usage is not None and limit < (1 << 60):
                found.append(max(0, limit - usage))
    return found


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip())  # "max" (no limit) is not an int
    except (OSError, ValueError):
        return None


class DiskMeter:
    """The block device behind a file, measured from now to :meth:`finish`: bytes it moved
    (read and written) and milliseconds it was busy, from its own counters."""

    def __init__(self, fd: int) -> None:
        device = os.fstat(fd).st_dev
        self._stat = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat"
        self._start = _counters(self._stat)

    def finish(self, key: int) -> None:
        """Record what the device did since the start as a measurement of file system
        ``key`` (the ``st_dev`` of the directory saves look it up by)."""
        if self._start is None:
            return
        end = _counters(self._stat)
        if end is None:
            return
        nbytes, busy_ms = end[0] - self._start[0], end[1] - self._start[1]
        record(key, nbytes, busy_ms / 1000)


def _counters(path: str) -> tuple[int, int] | None:
    """(bytes read + written, milliseconds busy) of a block device's ``stat`` file."""
    try:
        with open(path, "rb") as f:
            fields = f.read().split()
        return (int(fields[2]) + int(fields[6])) * 512, int(fields[9])
    except (OSError, ValueError, IndexError):
        return None  # no block device behind it (tmpfs, a network file system), or not Linux


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
