"""How long a save stalls the training loop: aptckpt async save vs a memcpy of the state,
torch.save and torch.distributed.checkpoint async_save, in one run on the same state.

Role: the figures behind "async save stalls the caller <= 1.2x a memcpy of the state and
>= 10x less than torch.save" (issue 6), reported as per-round ratios.

Contenders (each round, in rotated order; the first round is a warm-up, not reported):

* ``memcpy``: the state copied into pre-allocated, already touched host buffers, the same way the
  staging copy does it (one ``torch._foreach_copy_`` of byte views) -- the reference of the ratios;
  and the same bytes copied by numpy on one thread into one touched buffer (bench_backends' limit);
* ``aptckpt async``: ``aptckpt.save(..., blocking=False)`` until it returns (zstd level 1 and
  ``codec="none"``); the previous save is waited for *outside* the timed region, as a trainer
  whose saves are further apart than one persist would see it;
* ``aptckpt async, back to back``: a save, then at once the timed one, which waits for the first
  to persist (saves closer together than one persist: the stall is then a whole save);
* ``torch.save``: to a file (no fsync), the whole save blocks;
* ``DCP async_save``: ``torch.distributed.checkpoint.async_save`` until it returns (single
  process), when this torch provides it without a process group.

Usage::

    python benchmarks/bench_async.py --gb 0.5 --tensors 200 --reps 5
    python benchmarks/bench_async.py --gb 1 --tensors 546 --reps 5 --out benchmarks/RESULTS-async.md
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stats
import _sysutil
import aptckpt


def make_state(gb: float, tensors: int) -> dict[str, torch.Tensor]:
    """``tensors`` fp32 tensors totalling ``gb`` GB, filled (pages touched)."""
    per = max(1, int(gb * 1e9 / 4 / tensors))
    g = torch.Generator().manual_seed(0)
    return {f"t{i:05d}": torch.randn(per, generator=g) for i in range(tensors)}


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class Memcpy:
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.src = [t.view(torch.uint8) for t in state.values()]
        self.dst = [torch.empty_like(s) for s in self.src]
        torch._foreach_copy_(self.dst, self.src)  # touch every page once

    def __call__(self) -> None:
        torch._foreach_copy_(self.dst, self.src)


def dcp_async() -> Callable[[Any, Path], Any] | None:
    try:
        import torch.distributed.checkpoint as dcp
    except ImportError:
        return None
    if not hasattr(dcp, "async_save"):
        return None

    def save(state: Any, path: Path) -> Any:
        writer = dcp.FileSystemWriter(str(path), sync_files=True)
        return dcp.async_save(state, storage_writer=writer)

    return save


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=0.5)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="aptckpt-async-"))
    work.mkdir(parents=True, exist_ok=True)
    state = make_state(args.gb, args.tensors)
    size = nbytes(state)
    memcpy = Memcpy(state)
    dcp_save = dcp_async()
    pending: dict[str, Any] = {}

    def apt(name: str, back_to_back: bool, **options: Any) -> Callable[[int], float]:
        def run(rep: int) -> float:
            if back_to_back:  # a save, then at once the timed one: it waits for the first
                aptckpt.save(state, work / f"{name}-a", blocking=False, overwrite=True, **options)
            path = work / f"{name}-{rep % 2}"
            start = time.perf_counter()
            handle = aptckpt.save(state, path, blocking=False, overwrite=True, **options)
            stall = time.perf_counter() - start
            pending[name] = handle
            return stall

        return run

    def torch_save(rep: int) -> float:
        start = time.perf_counter()
        torch.save(state, work / "torch.pt")
        return time.perf_counter() - start

    raw = _sysutil.RawIO(list(state.values()))

    def numpy_memcpy(rep: int) -> float:
        start = time.perf_counter()
        raw.memcpy()
        return time.perf_counter() - start

    def memcpy_run(rep: int) -> float:
        start = time.perf_counter()
        memcpy()
        return time.perf_counter() - start

    def dcp_run(rep: int) -> float:
        assert dcp_save is not None
        if "dcp" in pending:
            pending.pop("dcp").result()
        path = work / f"dcp-{rep}"
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pending["dcp"] = dcp_save(state, path)
        return time.perf_counter() - start

    def settle() -> None:
        """Finish every background save (untimed): background work would slow
        whatever is timed next."""
        for name in list(pending):
            handle = pending.pop(name)
            (handle.wait if hasattr(handle, "wait") else handle.result)()

    contenders: dict[str, Callable[[int], float]] = {
        "memcpy into touched buffers": memcpy_run,
        "memcpy, numpy, 1 thread, one touched buffer": numpy_memcpy,
        "aptckpt async save, zstd level 1": apt("zstd", False, backend="zstd", codec="zstd"),
        "aptckpt async save, codec=none": apt("raw", False, backend="zstd", codec="none"),
        "aptckpt async save, back to back": apt("b2b", True, backend="zstd", codec="none"),
        "torch.save (no fsync)": torch_save,
    }
    if dcp_save is not None:
        contenders["DCP async_save (stall)"] = dcp_run
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    dcp_error = ""
    for rep in range(args.reps + 1):  # round 0 warms up (staging buffers, page cache)
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            settle()
            try:
                elapsed = contenders[name](rep)
            except Exception as err:  # a peer that does not run here is reported, not fatal
                dcp_error = f"{name}: {type(err).__name__}: {err}"
                names.remove(name)
                times.pop(name)
                continue
            if rep:
                times[name].append(elapsed)
        settle()
    ref = times["memcpy into touched buffers"]
    rows = []
    for name in names:
        rows.append(
            [
                name,
                _stats.fmt_s(times[name]),
                _stats.fmt_gbps(size, times[name]),
                f"{_stats.paired_ratio(times[name], ref):.2f}x",
                f"{_stats.paired_ratio(times['torch.save (no fsync)'], times[name]):.1f}x",
            ]
        )
    header = [
        "stall of the caller",
        "seconds, median [min-max]",
        "GB/s",
        "vs memcpy",
        "torch.save / this",
    ]
    report = "\n".join(
        [
            "# aptckpt async save: how long the caller is blocked",
            "",
            f"- **Date**: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- **Command**: `python benchmarks/bench_async.py {' '.join(argv or sys.argv[1:])}`",
            f"- **State**: {args.tensors} fp32 tensors, {_stats.fmt_bytes(size)}",
            f"- **Load average**: {_sysutil.loadavg()}",
            f"- **torch threads**: {torch.get_num_threads()}; "
            f"aptckpt core: {aptckpt.IMPLEMENTATION}",
            f"- **Repetitions**: {args.reps} after one warm-up round, interleaved; ratios are "
            "medians of per-round ratios",
            "",
            _stats.table(header, rows),
            "",
            "`vs memcpy` = this stall / the memcpy in the same round (target <= 1.2x); "
            "`torch.save / this` = how many times shorter than torch.save (target >= 10x).",
        ]
        + ([f"\nNot measured: {dcp_error}"] if dcp_error else [])
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
