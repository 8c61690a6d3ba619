"""Throughput of the native core (``aptckpt._native``) against its peers, as a markdown table.

Standalone script, not a test: ``python benchmarks/bench_native.py [--reps 7] [--hash-gib 1]``.

What is timed, each as the median of ``--reps`` repetitions with its min-max spread:

* XXH3-128 of 4 MiB chunks over a pre-touched buffer (1 GiB by default): ``hash_chunks`` with
  1 and 2 threads, against the ``xxhash`` package over the same slices on one thread; then the
  same over a 16 MiB buffer that stays in cache, which shows the kernels rather than DRAM;
* the 2-thread speed-up, measured in ``--rounds`` separate rounds of alternating 1-thread and
  2-thread runs (the machine's vCPUs are shared, so one number would mislead);
* shuffle / unshuffle (itemsize 2, 4, 8) and xor over 4 MiB chunks, against the numpy twin;
* ``pwrite_many`` of 4 MiB pieces + fsync against one plain ``write`` + fsync of the same bytes
  (the raw-write limit), in ``--dir``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

from aptckpt import _native, _pyimpl

MiB = 1 << 20
CHUNK = 4 * MiB


# ---- measuring ----


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rates(fn: Callable[[], object], nbytes: int, reps: int) -> list[float]:
    fn()  # warm-up: page faults, thread start-up, lazy imports
    return [nbytes / _timed(fn) / 1e9 for _ in range(reps)]


def _cell(rates: list[float]) -> str:
    return f"{statistics.median(rates):.2f} ({min(rates):.2f}-{max(rates):.2f})"


def _row(name: str, rates: list[float], baseline: list[float] | None) -> str:
    ratio = (
        "" if baseline is None else f"{statistics.median(rates) / statistics.median(baseline):.2f}x"
    )
    return f"| {name} | {_cell(rates)} | {ratio} |"


# ---- the workloads ----


def _hash_rows(buf: np.ndarray, reps: int, passes: int = 1) -> list[str]:
    """xxhash vs native over ``buf`` in 4 MiB chunks, ``passes`` times per repetition."""
    view = memoryview(buf)
    nbytes = buf.nbytes * passes

    def with_xxhash() -> None:
        for _ in range(passes):
            for start in range(0, len(view), CHUNK):
                xxhash.xxh3_128_digest(view[start : start + CHUNK])

    def with_native(threads: int) -> None:
        for _ in range(passes):
            _native.hash_chunks(buf, CHUNK, threads)

    peer = _rates(with_xxhash, nbytes, reps)
    rows = [_row("xxhash package, 1 thread (baseline)", peer, None)]
    for threads in (1, 2):
        rates = _rates(lambda t=threads: with_native(t), nbytes, reps)
        rows.append(_row(f"native hash_chunks, threads={threads}", rates, peer))
    return rows


def _speedup_rows(buf: np.ndarray, reps: int, rounds: int) -> list[str]:
    rows = []
    for r in range(1, rounds + 1):
        ratios = []
        for _ in range(reps):  # alternate so both settings see the same neighbours' load
            one = _timed(lambda: _native.hash_chunks(buf, CHUNK, 1))
            two = _timed(lambda: _native.hash_chunks(buf, CHUNK, 2))
            ratios.append(one / two)
        rows.append(f"| round {r}: threads=2 over threads=1 | {_cell(ratios)} | |")
    return rows


def _transform_rows(buf: np.ndarray, reps: int) -> list[str]:
    src = buf[: 256 * MiB]
    out = np.empty(CHUNK, np.uint8)

    def over_chunks(fn: Callable[[np.ndarray], None]) -> Callable[[], None]:
        def run() -> None:
            for start in range(0, src.nbytes, CHUNK):
                fn(src[start : start + CHUNK])

        return run

    rows = []
    for name in ("shuffle", "unshuffle"):
        for itemsize in (2, 4, 8):
            cases = {}
            for label, module in (("numpy twin", _pyimpl), ("native", _native)):
                fn = getattr(module, name)
                job = over_chunks(lambda c, f=fn, k=itemsize: f(c, k, out))
                cases[label] = _rates(job, src.nbytes, reps)
            rows.append(_row(f"{name} itemsize={itemsize}, numpy twin", cases["numpy twin"], None))
            rows.append(
                _row(f"{name} itemsize={itemsize}, native", cases["native"], cases["numpy twin"])
            )
    other = np.ones(CHUNK, np.uint8)
    twin = _rates(over_chunks(lambda c: _pyimpl.xor(c, other, out)), src.nbytes, reps)
    native = _rates(over_chunks(lambda c: _native.xor(c, other, out)), src.nbytes, reps)
    rows += [_row("xor, numpy twin", twin, None), _row("xor, native", native, twin)]
    return rows


def _write_once(path: Path, write: Callable[[int], object]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()


def _io_rows(buf: np.ndarray, reps: int, directory: Path) -> list[str]:
    data = buf[: 256 * MiB]
    pieces = [data[s : s + CHUNK] for s in range(0, data.nbytes, CHUNK)]
    offsets = list(range(0, data.nbytes, CHUNK))
    path = directory / "bench_native.bin"
    raw = _rates(lambda: _write_once(path, lambda fd: os.write(fd, data)), data.nbytes, reps)
    rows = [_row(f"plain write + fsync, {data.nbytes >> 20} MiB (raw limit)", raw, None)]
    for threads in (1, 2):
        rates = _rates(
            lambda t=threads: _write_once(
                path, lambda fd: _native.pwrite_many(fd, pieces, offsets, t)
            ),
            data.nbytes,
            reps,
        )
        rows.append(_row(f"native pwrite_many 4 MiB pieces + fsync, threads={threads}", rates, raw))
    return rows


# ---- the report ----


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _header(args: argparse.Namespace) -> list[str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("aptckpt", "numpy", "xxhash")
    )
    return [
        "# aptckpt native core benchmark",
        "",
        f"- machine: {_cpu_model()}, {os.cpu_count()} logical CPUs ({usable} usable), "
        f"{platform.system()} {platform.release()}",
        f"- versions: Python {platform.python_version()}, {versions}; "
        f"native hash kernel: {_native.simd()}, default threads: {_native.default_threads()}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- median of {args.reps} repetitions (min-max); hash buffer {args.hash_gib} GiB; "
        f"I/O in {args.dir}; load average at start {os.getloadavg()[0]:.2f} "
        "(other processes share these CPUs: wide spreads mean noise)",
        "",
    ]


def _table(title: str, unit: str, rows: list[str]) -> list[str]:
    return [f"## {title}", "", f"| case | {unit} | vs baseline |", "|---|---|---|", *rows, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions per case (>= 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the speed-up test")
    parser.add_argument("--hash-gib", type=int, default=1, help="size of the hashed buffer")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="I/O dir")
    args = parser.parse_args()
    if args.reps < 5:
        parser.error("--reps must be at least 5")
    buf = np.frombuffer(np.random.default_rng(0).bytes(args.hash_gib << 30), np.uint8)
    lines = _header(args)
    hashed = f"XXH3-128 over 4 MiB chunks of a {args.hash_gib} GiB buffer (memory-bound)"
    lines += _table(hashed, "GB/s", _hash_rows(buf, args.reps))
    resident = "XXH3-128 over 4 MiB chunks of a 16 MiB buffer, 64 passes (cache-resident)"
    lines += _table(resident, "GB/s", _hash_rows(buf[: 16 * MiB], args.reps, passes=64))
    lines += _table("2-thread speed-up", "ratio", _speedup_rows(buf, args.reps, args.rounds))
    lines += _table("byte transforms over 4 MiB chunks", "GB/s", _transform_rows(buf, args.reps))
    lines += _table("writes", "GB/s", _io_rows(buf, args.reps, args.dir))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
