"""Operating-system helpers for the benchmarks: page cache control, raw I/O limits, machine facts.

Role: everything in ``benchmarks/`` that talks to the kernel directly lives here, so that the
contender code in ``bench_backends.py`` only says *what* is timed.

* ``evict`` / ``resident_fraction``: produce and check a cold page cache for a file or directory
  (``fsync`` then ``posix_fadvise(POSIX_FADV_DONTNEED)``; checked with ``mincore(2)``).
* ``RawIO``: the physical limits on the same bytes the contenders move -- buffered and O_DIRECT
  writes with fsync, buffered and O_DIRECT reads, memcpy -- with reused, pre-touched buffers,
  because first-touch page faults cost about as much as a disk write on this machine
  (research/baselines.md).
* ``machine_info`` / ``versions``: what the report records about where and with what it ran.

Linux only (O_DIRECT, posix_fadvise, mincore).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

PAGE = mmap.PAGESIZE
# O_DIRECT needs offsets, sizes and addresses aligned; 4096 covers the block size of ext4 here.
DIRECT_ALIGN = 4096
CHUNK = 64 << 20  # I/O request size for the raw limits: large enough that syscalls do not matter

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def files_under(path: Path) -> list[Path]:
    """The regular files of a checkpoint: ``path`` itself if a file, else every file below it."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def disk_bytes(path: Path) -> int:
    """Apparent size (sum of ``st_size``) of a checkpoint file or directory."""
    return sum(p.stat().st_size for p in files_under(path))


def remove(path: Path) -> None:
    """Delete a checkpoint file or directory if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_file(path: Path) -> None:
    """fsync one file by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop a checkpoint's pages from the page cache.

    ``fsync`` first: DONTNEED only drops clean pages, so dirty ones would otherwise stay cached.
    Pages still mapped by a live mmap also stay; callers free loaded objects before evicting.
    The rejected alternative, ``echo 1 > /proc/sys/vm/drop_caches``, needs root and flushes the
    whole machine, including the interpreter and the state being saved.
    """
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prewarm(path: Path) -> None:
    """Read every file of a checkpoint once so its pages are in the page cache."""
    buf = bytearray(CHUNK)
    for p in files_under(path):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident_fraction(path: Path) -> float:
    """Fraction of a checkpoint's pages in the page cache, by ``mincore(2)`` (1.0 if empty)."""
    total = resident = 0
    for p in files_under(path):
        size = p.stat().st_size
        if size == 0:
            continue
        pages = (size + PAGE - 1) // PAGE
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, _MAP_FAILED):
                raise OSError(ctypes.get_errno(), f"mmap failed for {p}")
            try:
                vec = (ctypes.c_ubyte * pages)()
                if _libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore failed for {p}")
                resident += sum(b & 1 for b in bytes(vec))
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return resident / total if total else 1.0


def byte_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor as a flat uint8 numpy array, without copying."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _touched_buffer(size: int) -> mmap.mmap:
    """An anonymous, page-aligned mapping with every page already faulted in."""
    buf = mmap.mmap(-1, max(size, PAGE))
    np.frombuffer(buf, dtype=np.uint8)[:] = 1
    return buf


class RawIO:
    """The physical limits, moving exactly the bytes of a list of tensors.

    The tensors' bytes are laid end to end in one file. All buffers are allocated and touched
    once in ``__init__`` and reused, so the limits measure the disk and the copy, not page faults.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.views = [byte_view(t) for t in tensors]
        self.nbytes = sum(v.size for v in self.views)
        padded = -(-self.nbytes // DIRECT_ALIGN) * DIRECT_ALIGN
        self._big = _touched_buffer(padded)  # read / memcpy destination
        self._big_np = np.frombuffer(self._big, dtype=np.uint8)
        self._stage = _touched_buffer(CHUNK)  # O_DIRECT write staging
        self._stage_np = np.frombuffer(self._stage, dtype=np.uint8)

    def write_buffered(self, path: Path) -> None:
        """write(2) straight from tensor memory through the page cache, then fsync."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for v in self.views:
                mv = memoryview(v)
                while mv:
                    mv = mv[os.write(fd, mv[:CHUNK]) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_direct(self, path: Path) -> None:
        """O_DIRECT writes of 64 MiB from an aligned, reused staging buffer, then fsync.

        The copy into the staging buffer is part of the figure: tensor memory is not 4096-aligned
        in general, so any O_DIRECT writer must pay it (at ~20 GB/s it is small next to the disk).
        """
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            fill = 0
            for v in self.views:
                pos = 0
                while pos < v.size:
                    n = min(CHUNK - fill, v.size - pos)
                    self._stage_np[fill : fill + n] = v[pos : pos + n]
                    fill += n
                    pos += n
                    if fill == CHUNK:
                        self._write_all(fd, memoryview(self._stage))
                        fill = 0
            if fill:
                padded = -(-fill // DIRECT_ALIGN) * DIRECT_ALIGN
                self._stage_np[fill:padded] = 0
                self._write_all(fd, memoryview(self._stage)[:padded])
                os.ftruncate(fd, self.nbytes)  # drop the alignment padding
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _write_all(fd: int, mv: memoryview) -> None:
        while mv:
            mv = mv[os.write(fd, mv) :]

    def read_buffered(self, path: Path) -> None:
        """read(2) through the page cache into the pre-touched buffer."""
        self._read_into(path, 0)

    def read_direct(self, path: Path) -> None:
        """O_DIRECT reads (bypassing the page cache) into the pre-touched aligned buffer."""
        self._read_into(path, os.O_DIRECT)

    def _read_into(self, path: Path, flags: int) -> None:
        fd = os.open(path, os.O_RDONLY | flags)
        try:
            mv = memoryview(self._big)
            pos = 0
            while pos < self.nbytes:
                n = os.readv(fd, [mv[pos : pos + CHUNK]])
                if n == 0:
                    raise OSError(f"{path}: short read at {pos} of {self.nbytes}")
                pos += n
        finally:
            os.close(fd)

    def read_fresh(self, path: Path, threads: int = 2) -> np.ndarray:
        """read(2) through the page cache into freshly allocated memory, on ``threads`` threads
        (the limit for any loader that returns new tensors: the kernel zeroes and maps every
        page on first touch, which here costs more than the copy; check it with
        :meth:`check_buffer`). The memory comes from
        ``torch.empty``, as loaded tensors' does (numpy's allocator asks for transparent huge
        pages, whose first use stalls on memory compaction here: an erratic reference).
        Returns the buffer."""
        out = torch.empty(self.nbytes, dtype=torch.uint8).numpy()
        view = memoryview(out)
        fd = os.open(path, os.O_RDONLY)
        try:

            def part(k: int) -> None:
                for pos in range(k * CHUNK, self.nbytes, threads * CHUNK):
                    piece = view[pos : pos + CHUNK]
                    done = 0
                    while done < len(piece):
                        n = os.preadv(fd, [piece[done:]], pos + done)
                        if n == 0:
                            raise OSError(f"{path}: short read at {pos + done}")
                        done += n

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(part, range(threads)))
        finally:
            os.close(fd)
        return out

    def memcpy(self) -> None:
        """Copy every tensor's bytes into the pre-touched buffer (numpy, one thread)."""
        pos = 0
        for v in self.views:
            self._big_np[pos : pos + v.size] = v
            pos += v.size

    def check_buffer(self, out: np.ndarray | None = None) -> None:
        """Raise unless the buffer (or ``out``, from :meth:`read_fresh`) holds exactly the
        tensors' bytes (after a read or memcpy)."""
        buffer = self._big_np if out is None else out
        pos = 0
        for i, v in enumerate(self.views):
            if not np.array_equal(buffer[pos : pos + v.size], v):
                raise AssertionError(f"raw buffer differs from tensor #{i} at byte offset {pos}")
            pos += v.size

    def clear_buffer(self) -> None:
        """Overwrite the buffer so that a later check proves the next read really happened."""
        self._big_np[: self.nbytes] = 0


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``), so that the next
    allocation faults fresh pages as in a new process, instead of reusing the last repetition's
    freed ones (which would make every loader after the first look free of page faults)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return float("nan")


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, filesystem type, device) of the mount holding ``path``."""
    path = path.resolve()
    best = ("?", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    return best


def machine_info(workdir: Path) -> dict[str, str]:
    """CPU, cores, memory, kernel and the filesystem the checkpoints are written to."""
    mnt, fstype, dev = _mount_of(workdir)
    return {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable by this process",
        "torch_threads": str(torch.get_num_threads()),
        "ram": f"{_mem_total_gib():.1f} GiB",
        "kernel": platform.release(),
        "filesystem": f"{fstype} on {dev}, mounted at {mnt} (checkpoints in {workdir})",
    }


class CpuMeter:
    """How much of the machine's CPU went elsewhere during an interval.

    ``foreign`` is CPU time busy on the machine (/proc/stat) but not charged to this process,
    as a fraction of all vCPUs over the wall time: other processes, plus kernel threads (including
    page writeback this process caused, so it is an upper bound on outside interference).
    ``steal`` is time the hypervisor gave to other guests. Both near 0 mean a quiet machine.
    """

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float]:
        vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = vals
        hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        busy = (user + nice + system + irq + softirq) / hz
        return busy, steal / hz, t.user + t.system, time.monotonic()

    def read(self) -> dict[str, float]:
        """Fractions since construction: ``{"foreign": ..., "steal": ...}``."""
        b1, s1, o1, w1 = self._read()
        b0, s0, o0, w0 = self._start
        capacity = max(w1 - w0, 1e-9) * (os.cpu_count() or 1)
        return {
            "foreign": max(0.0, (b1 - b0) - (o1 - o0)) / capacity,
            "steal": (s1 - s0) / capacity,
        }


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions(repo: Path) -> dict[str, str]:
    """Python and package versions, and the git commit of the tree being benchmarked.

    For aptckpt the imported module is described (version, native or pure-Python core, and
    where it was imported from), since a source tree on ``PYTHONPATH`` has no dist metadata.
    """
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "aptckpt", "numpy", "zstandard", "safetensors", "xxhash", "msgpack"):
        out[name] = _dist_version(name)
    apt = sys.modules.get("aptckpt")
    if apt is not None:
        where = Path(apt.__file__ or "?").parent
        with contextlib.suppress(ValueError):
            where = where.relative_to(repo)
        impl = getattr(apt, "IMPLEMENTATION", "?")
        out["aptckpt"] = f"{getattr(apt, '__version__', '?')} ({impl} core, imported from {where})"
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "src", "cpp"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        out["git"] = head + (" (src/ or cpp/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        out["git"] = "unknown"
    return out


def repo_relative(p: str | Path) -> str:
    """``p`` relative to the repository root when it lies inside it (for reports)."""
    try:
        return str(Path(p).resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return str(p)
