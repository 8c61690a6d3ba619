"""What the pure-Python core costs: the same saves and loads with the compiled core and the twin.

Standalone script, not a test::

    python benchmarks/bench_cores.py [--reps 5] [--out benchmarks/RESULTS-cores.md]

Each core runs in its own worker process (``APTCKPT_NATIVE=require`` and ``disable``: the core
is chosen once at import), on the standard workload (``workload.py --scale small``: a 21M-parameter
GPT-2-style model's fp32 weights plus AdamW moments, about 250 MB), in ``benchmarks/_work/cores``
with a warm page cache. Timed, wall and CPU time (all threads of the worker), each the median of
``--reps`` rounds:

* ``save``: ``aptckpt.save`` with the default backend and codec (``zstd``, ``codec="auto"``);
* ``load``: ``aptckpt.load`` of it, every chunk's digest verified;
* ``verify``: ``aptckpt.verify`` of it;
* ``save none`` / ``load none``: the same with ``codec="none"``: no compression, so hashing,
  shuffles and parallel I/O (the work the core does) are most of the time -- the worst case;
* ``hash``: ``_accel.hash_chunks`` of 256 MiB in 4 MiB chunks, the core's kernel alone.

Both workers live at once and are asked in turn (native, pure, native, ...), one operation at a
time, so a change in the machine's load hits both alike; the ratio column is the median of the
per-round ratios of the twin's time over the core's: how many times slower an installation
without the compiled core is. ``aptckpt info`` quotes the CPU-time ratios
(``aptckpt.cli._info.PURE_SLOWDOWN``; tests/test_cli.py checks they match the committed
report); rerun this after changing either core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "cores"
OPS = ("save", "load", "verify", "save none", "load none", "hash")


def worker() -> None:
    """Serve timings with the core this process imported: read an operation name per line on
    stdin, run it once, print its seconds (the first line printed is the workload's size)."""
    import shutil

    import numpy as np

    import aptckpt
    from aptckpt import _accel
    from workload import build_workload

    state = build_workload("small").state
    data = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8)
    WORK.mkdir(parents=True, exist_ok=True)
    paths = {opts: WORK / f"{aptckpt.IMPLEMENTATION}-{opts or 'default'}" for opts in ("", "none")}

    def save(codec: str) -> None:
        shutil.rmtree(paths[codec], ignore_errors=True)
        aptckpt.save(state, paths[codec], **({"codec": codec} if codec else {}))  # type: ignore[arg-type]

    ops: dict[str, Callable[[], object]] = {
        "save": lambda: save(""),
        "load": lambda: aptckpt.load(paths[""]),
        "verify": lambda: aptckpt.verify(paths[""]),
        "save none": lambda: save("none"),
        "load none": lambda: aptckpt.load(paths["none"]),
        "hash": lambda: _accel.hash_chunks(data, 4 << 20),
    }
    for op in OPS:  # warm-up: page cache, thread pool, lazy imports; the loads need the saves
        ops[op]()
    print(sum(t.numel() * t.element_size() for t in _tensors(state)), flush=True)
    for line in sys.stdin:
        wall, cpu = time.perf_counter(), time.process_time()
        ops[line.strip()]()
        print(time.perf_counter() - wall, time.process_time() - cpu, flush=True)
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)


def _tensors(value: object) -> list:  # type: ignore[type-arg]
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _start(mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "APTCKPT_NATIVE": mode}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, __file__, "--worker"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _ask(proc: subprocess.Popen[str], op: str | None) -> list[float]:
    assert proc.stdin is not None
    assert proc.stdout is not None
    if op is not None:
        proc.stdin.write(op + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        sys.exit(f"a worker stopped (exit {proc.wait()}); its error is above")
    return [float(x) for x in line.split()]


def measure(reps: int) -> tuple[dict[str, dict[str, list[list[float]]]], int]:
    """``[wall s, CPU s]`` per round, operation and core, and the workload's bytes. Both
    workers are alive at once and asked in turn (native, pure, native, ...), so a change in
    the machine's load hits both alike."""
    workers = {"native": _start("require"), "pure": _start("disable")}
    nbytes = {name: int(_ask(proc, None)[0]) for name, proc in workers.items()}
    times: dict[str, dict[str, list[list[float]]]] = {w: {op: [] for op in OPS} for w in workers}
    for _ in range(reps):
        for op in OPS:
            for name, proc in workers.items():
                times[name][op].append(_ask(proc, op))
    for proc in workers.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    return times, nbytes["native"]


def render(
    times: dict[str, dict[str, list[list[float]]]],
    nbytes: int,
    reps: int,
    took: float,
    command: str,
) -> str:
    sys.path.insert(0, str(HERE))
    import aptckpt
    from _sysutil import loadavg, machine_info, versions

    machine = machine_info(WORK)
    ver = versions(REPO)
    native, pure = times["native"], times["pure"]
    mb = nbytes / 1e6
    lines = [
        "# What the pure-Python core costs: compiled core vs the `_pyimpl` twin",
        "",
        "Generated by `benchmarks/bench_cores.py` (see its docstring for the method). "
        "Ratio: the twin's time / the compiled core's, the median of the per-round ratios (how "
        "many times slower aptckpt is when installed without its compiled core, e.g. from the "
        "pure-Python wheel).",
        "",
        f"- **Date**: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC (run took {took:.0f} s)",
        f"- **Command**: `{command}`",
        f"- **Code**: aptckpt {aptckpt.__version__}, git {ver['git']}",
        f"- **Machine**: {machine['cpu']}; {machine['cores']}; RAM {machine['ram']}; "
        f"{machine['filesystem']}",
        f"- **Load average** at end: {loadavg()}",
        f"- **Versions**: python {ver['python']}, torch {ver['torch']}, "
        f"zstandard {ver['zstandard']}, xxhash {ver['xxhash']}, numpy {ver['numpy']}",
        f"- **Workload**: `workload.py --scale small`, {mb:.0f} MB of fp32 tensors; "
        f"warm page cache; {reps} rounds, cells are medians. CPU: the process's CPU time (all "
        "its threads), which other load on the machine disturbs less than wall time",
        "",
        "| operation | compiled core: wall s | CPU s | pure Python: wall s | CPU s "
        "| pure / compiled: wall | CPU |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]

    def med(rows: list[list[float]], i: int) -> str:
        return f"{statistics.median(r[i] for r in rows):.3f}"

    def ratio(op: str, i: int) -> float:
        return statistics.median(p[i] / n[i] for p, n in zip(pure[op], native[op], strict=True))

    for op in OPS:
        what = f"{op} (256 MiB)" if op == "hash" else op
        lines.append(
            f"| {what} | {med(native[op], 0)} | {med(native[op], 1)} | {med(pure[op], 0)} "
            f"| {med(pure[op], 1)} | {ratio(op, 0):.1f}x | {ratio(op, 1):.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    start = time.perf_counter()
    times, nbytes = measure(args.reps)
    command = f"python benchmarks/bench_cores.py --reps {args.reps}"
    if args.out:
        command += f" --out {args.out}"
    report = render(times, nbytes, args.reps, time.perf_counter() - start, command)
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
