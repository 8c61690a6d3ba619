"""How save and load cost grows with state size and tensor count, next to torch.save/load and
the raw limits of the same bytes, in one run.

Role: the scaling table of issue 6 ("cost grows linearly with bytes; 10,000 small tensors save no
slower than torch.save"), plus the ratios "uncompressed save vs raw write + fsync" and "warm load vs
torch.load and vs raw read".

Rows: fp32 states of 0.1, 1 and 4 GB in 100 tensors, and 0.1 GB in 10, 1,000 and 10,000 tensors.
Contenders per row (interleaved round-robin, median of ``--reps``):

* save: aptckpt ``zstd`` ``codec="none"`` (sync, fsynced), aptckpt ``zstd`` level 1,
  ``torch.save`` + fsync, and the limits: raw write of the same bytes + fsync, buffered and
  ``O_DIRECT`` (from a reused aligned buffer);
* load, warm page cache: aptckpt (verified), aptckpt ``into=`` pre-allocated tensors,
  aptckpt ``mmap=True`` (verified: every byte hashed), ``torch.load(weights_only=True)`` with
  and without ``mmap=True`` (lazy: no byte is read until used), and the limits: raw read into
  fresh memory (what any loader returning new tensors must do; compared with aptckpt's load)
  and into a touched buffer (compared with ``into=``).

Before every timed load the C heap's free pages are given back to the OS
(``_sysutil.trim_heap``), so each loader allocates fresh memory as a resume in a new process
does, rather than the pages the previous repetition freed.

Usage::

    python benchmarks/bench_scaling.py --reps 3 --out benchmarks/RESULTS-scaling.md
    python benchmarks/bench_scaling.py --reps 1 --rows 0.1x100,0.1x10000      # quick
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stats
import _sysutil
import aptckpt

ROWS = ("0.1x100", "1x100", "4x100", "0.1x10", "0.1x1000", "0.1x10000")


def make_state(gb: float, count: int) -> dict[str, torch.Tensor]:
    per = max(1, int(gb * 1e9 / 4 / count))
    g = torch.Generator().manual_seed(0)
    return {f"t{i:05d}": torch.randn(per, generator=g) for i in range(count)}


def fsync_tree(path: Path) -> None:
    for f in _sysutil.files_under(path) if path.is_dir() else [path]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_row(gb: float, count: int, reps: int, work: Path) -> dict[str, list[float]]:
    state = make_state(gb, count)
    raw = _sysutil.RawIO(list(state.values()))
    templates = {k: torch.empty_like(v) for k, v in state.items()}

    def apt_save(**options: Any) -> Callable[[], None]:
        def run() -> None:
            aptckpt.save(state, work / "apt", overwrite=True, **options)

        return run

    def torch_save() -> None:
        torch.save(state, work / "torch.pt")
        fsync_tree(work / "torch.pt")

    saves: dict[str, Callable[[], None]] = {
        "save: raw write + fsync (limit)": lambda: raw.write_buffered(work / "raw.bin"),
        "save: raw O_DIRECT write + fsync (limit)": lambda: raw.write_direct(work / "raw.bin"),
        "save: aptckpt zstd codec=none": apt_save(codec="none"),
        "save: aptckpt zstd level 1": apt_save(),
        "save: torch.save + fsync": torch_save,
    }
    loads: dict[str, Callable[[], Any]] = {
        "load: raw read, warm (limit)": lambda: raw.read_buffered(work / "raw.bin"),
        "load: raw read into fresh memory, warm (limit)": lambda: raw.read_fresh(work / "raw.bin"),
        "load: aptckpt codec=none, verified": lambda: aptckpt.load(work / "apt-none"),
        "load: aptckpt codec=none, into=": lambda: aptckpt.load(work / "apt-none", into=templates),
        "load: aptckpt codec=none, mmap=True": lambda: aptckpt.load(work / "apt-none", mmap=True),
        "load: torch.load": lambda: torch.load(work / "torch.pt", weights_only=True),
        "load: torch.load mmap=True": lambda: torch.load(
            work / "torch.pt", weights_only=True, mmap=True
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in [*saves, *loads]}
    for rep in range(reps):
        names = list(saves)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            gc.collect()
            start = time.perf_counter()
            saves[name]()
            times[name].append(time.perf_counter() - start)
        shutil.rmtree(work / "apt-none", ignore_errors=True)
        aptckpt.save(state, work / "apt-none", codec="none")
        names = list(loads)
        for name in ["load: raw read, warm (limit)", *names]:  # the first read warms the cache
            _sysutil.prewarm(work / ("raw.bin" if "raw" in name else "apt-none"))
            _sysutil.prewarm(work / "torch.pt")
            gc.collect()
            _sysutil.trim_heap()
            start = time.perf_counter()
            result = loads[name]()
            elapsed = time.perf_counter() - start
            del result
            if name in times and len(times[name]) <= rep:
                times[name].append(elapsed)
    for name in ("raw.bin", "torch.pt"):
        (work / name).unlink(missing_ok=True)
    for name in ("apt", "apt-none"):
        shutil.rmtree(work / name, ignore_errors=True)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS), help="GBxTENSORS, comma separated")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="aptckpt-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    for row in args.rows.split(","):
        gb, count = float(row.split("x")[0]), int(row.split("x")[1])
        print(f"row {row} ...", file=sys.stderr, flush=True)
        results.append((gb, count, run_row(gb, count, args.reps, work)))
    header = [
        "state",
        "tensors",
        "raw write+fsync s: buffered / O_DIRECT",
        "codec=none s (% of buffered / O_DIRECT)",
        "zstd-1 s",
        "torch.save+fsync s",
        "none vs torch.save",
        "raw read s: fresh / touched",
        "load s (% of fresh read)",
        "load into= s (% of touched read)",
        "torch.load s",
        "load vs torch.load",
        "mmap=True s (verified)",
        "mmap vs torch.load",
        "torch.load mmap=True s (lazy, unverified)",
    ]
    rows = []
    for gb, count, t in results:
        med = {k: _stats.median(v) for k, v in t.items()}
        raw_w, none = med["save: raw write + fsync (limit)"], med["save: aptckpt zstd codec=none"]
        raw_d = med["save: raw O_DIRECT write + fsync (limit)"]
        raw_r, load = med["load: raw read, warm (limit)"], med["load: aptckpt codec=none, verified"]
        raw_f = med["load: raw read into fresh memory, warm (limit)"]
        into = med["load: aptckpt codec=none, into="]
        mapped = med["load: aptckpt codec=none, mmap=True"]
        rows.append(
            [
                f"{gb:g} GB",
                f"{count:,}",
                f"{raw_w:.3f} / {raw_d:.3f}",
                f"{none:.3f} ({100 * raw_w / none:.0f}% / {100 * raw_d / none:.0f}%)",
                f"{med['save: aptckpt zstd level 1']:.3f}",
                f"{med['save: torch.save + fsync']:.3f}",
                f"{med['save: torch.save + fsync'] / none:.2f}x",
                f"{raw_f:.3f} / {raw_r:.3f}",
                f"{load:.3f} ({100 * raw_f / load:.0f}%)",
                f"{into:.3f} ({100 * raw_r / into:.0f}%)",
                f"{med['load: torch.load']:.3f}",
                f"{med['load: torch.load'] / load:.2f}x",
                f"{mapped:.3f}",
                f"{med['load: torch.load'] / mapped:.1f}x",
                f"{med['load: torch.load mmap=True']:.3f}",
            ]
        )
    report = "\n".join(
        [
            "# aptckpt scaling: state size and tensor count",
            "",
            f"- **Date**: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
            f"(run took {(time.perf_counter() - started) / 60:.1f} min)",
            f"- **Command**: `python benchmarks/bench_scaling.py {' '.join(argv or sys.argv[1:])}`",
            f"- **Load average**: {_sysutil.loadavg()}; torch threads {torch.get_num_threads()}; "
            f"aptckpt core {aptckpt.IMPLEMENTATION}",
            f"- **Repetitions**: {args.reps}, interleaved; cells are medians in seconds; "
            "loads with a warm page cache; saves fsync their files",
            "",
            _stats.table(header, rows),
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
