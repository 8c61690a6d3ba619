"""CUDA: how long an async save of a GPU state stalls training, and how fast a checkpoint loads
onto the GPU, next to the device-host copies of the same bytes and to torch, in one run.

Role: the CUDA figures of issue 16 ("async stall vs a device-to-host copy of the same bytes, load
to GPU vs torch.load(map_location='cuda')"), written to ``benchmarks/RESULTS-cuda.md``. Run by
``scripts/gpu_check.sh`` on a machine with a CUDA device; without one it measures nothing, says
so and exits 0, unless ``--cpu-dry-run`` asks for the same code on the CPU (tiny state, report
in ``benchmarks/_work/``, figures meaningless: it checks the script, not the hardware).

The state: ``--tensors`` fp32 tensors of normal random values on the device, ``--gb`` GB in all.
Each round (the first a warm-up, not reported) runs every contender once, in an order rotated by
one per round; ``gc.collect()`` and ``os.sync()`` before each, untimed.

Save stall (what the training loop waits for):

* ``device-to-host copy, pinned``: the same bytes copied into pre-allocated pinned host buffers
  (``torch._foreach_copy_(non_blocking=True)``, then the stream synchronized) -- the limit, and
  the reference of the ratios; ``.cpu()`` of every tensor (pageable memory, allocated per call)
  for comparison;
* ``aptckpt async save`` (zstd level 1, ``codec="none"``): ``save(..., blocking=False)`` until
  it returns, and until the caller's stream is free again (its copies are enqueued on it
  non-blocking, so later kernels wait for them); the previous save persists outside the timing;
* ``torch.save`` of the CUDA state (no fsync): the whole save blocks.

Load onto the device (files written once, before the rounds; warm: read once before; cold:
``fsync`` + ``POSIX_FADV_DONTNEED``, checked with ``mincore``), each until the stream is free:

* ``host-to-device copy, pinned``: the same bytes from pinned host buffers -- the limit;
* ``torch.load(map_location="cuda", weights_only=True)``, with and without ``mmap=True``;
* ``aptckpt.load(map_location="cuda")`` of a zstd level 1 and a ``codec="none"`` checkpoint,
  ``mmap=True`` of the latter, and ``load(into=...)`` pre-allocated device tensors.

Every load is compared with the state bit for bit (uint8 views, on the device), untimed.

Usage::

    python benchmarks/bench_cuda.py                    # writes benchmarks/RESULTS-cuda.md
    python benchmarks/bench_cuda.py --gb 0.25 --reps 2 --out benchmarks/_work/RESULTS-cuda-q.md
    python benchmarks/bench_cuda.py --cpu-dry-run      # no GPU: the same code on the CPU
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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _stats  # noqa: E402
import _sysutil  # noqa: E402
import aptckpt  # noqa: E402

State = dict[str, torch.Tensor]


def choose_device(cpu_dry_run: bool) -> torch.device | None:
    """The device measured: the current CUDA device, the CPU for a dry run, or None."""
    if cpu_dry_run:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def make_state(gb: float, tensors: int, device: torch.device) -> State:
    """``tensors`` fp32 tensors of normal values on ``device``, ``gb`` GB in all."""
    per = max(1, int(gb * 1e9 / 4 / tensors))
    g = torch.Generator(device=device).manual_seed(0)
    return {f"t{i:04d}": torch.randn(per, generator=g, device=device) for i in range(tensors)}


def nbytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class Bench:
    """The state, its host copies and the checkpoints the contenders time."""

    def __init__(self, state: State, device: torch.device, work: Path) -> None:
        self.state = state
        self.device = device
        self.work = work
        self.cuda = device.type == "cuda"
        pin = self.cuda
        self.src = [_bytes(t) for t in state.values()]
        self.host = [torch.empty_like(s, device="cpu", pin_memory=pin) for s in self.src]
        torch._foreach_copy_(self.host, self.src)  # touches every page, fills them
        self.dest = [torch.empty_like(t) for t in state.values()]  # for into= and h2d
        self.dest_bytes = [_bytes(t) for t in self.dest]
        self.pending: list[Any] = []
        self.errors: list[str] = []
        self.resident: dict[str, list[float]] = {"cold": [], "warm": []}

    # ---- helpers

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def settle(self) -> None:
        for handle in self.pending:
            handle.wait()
        self.pending.clear()
        gc.collect()
        os.sync()

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def check(self, name: str, loaded: Any) -> None:
        """Bit for bit, untimed: every tensor, its dtype, shape and device."""
        for key, want in self.state.items():
            got = loaded[key]
            if got.device != want.device or got.dtype != want.dtype or got.shape != want.shape:
                raise AssertionError(
                    f"{name}: {key} came back as {got.dtype} {tuple(got.shape)} on {got.device}"
                )
            if not torch.equal(_bytes(got), _bytes(want)):
                raise AssertionError(f"{name}: {key} differs from the saved tensor")

    # ---- save stall

    def d2h_pinned(self) -> float:
        seconds, _ = self.timed(
            lambda: torch._foreach_copy_(self.host, self.src, non_blocking=self.cuda)
        )
        return seconds

    def d2h_cpu(self) -> float:
        seconds, copies = self.timed(lambda: [t.cpu() for t in self.state.values()])
        del copies
        return seconds

    def async_save(self, name: str, **options: Any) -> Callable[[int], tuple[float, float]]:
        def run(rep: int) -> tuple[float, float]:
            path = self.work / f"{name}-{rep % 2}"
            stream = torch.cuda.current_stream(self.device) if self.cuda else None
            self.sync()
            start = time.perf_counter()
            handle = aptckpt.save(self.state, path, blocking=False, overwrite=True, **options)
            returned = time.perf_counter() - start
            if stream is not None:
                stream.synchronize()
            free = time.perf_counter() - start
            self.pending.append(handle)
            return returned, free

        return run

    def torch_save(self) -> float:
        seconds, _ = self.timed(lambda: torch.save(self.state, self.work / "torch-save.pt"))
        return seconds

    # ---- loads

    def h2d_pinned(self) -> float:
        seconds, _ = self.timed(
            lambda: torch._foreach_copy_(self.dest_bytes, self.host, non_blocking=self.cuda)
        )
        return seconds

    def prepare_loads(self) -> dict[str, Path]:
        """The checkpoints the loaders read, written once."""
        paths = {
            "torch": self.work / "load.pt",
            "zstd": self.work / "load-zstd",
            "none": self.work / "load-none",
        }
        torch.save(self.state, paths["torch"])
        aptckpt.save(self.state, paths["zstd"], overwrite=True)
        aptckpt.save(self.state, paths["none"], codec="none", overwrite=True)
        return paths

    def load(self, name: str, path: Path, cold: bool, fn: Callable[[], Any]) -> float:
        if cold:
            _sysutil.evict(path)
        else:
            _sysutil.prewarm(path)
        self.resident["cold" if cold else "warm"].append(_sysutil.resident_fraction(path))
        seconds, loaded = self.timed(fn)
        if name.startswith("aptckpt load into="):
            loaded = dict(zip(self.state, self.dest, strict=True))
        self.check(name, loaded)
        del loaded
        return seconds


def run(args: argparse.Namespace, device: torch.device) -> str:
    work = args.workdir or Path(tempfile.mkdtemp(prefix="aptckpt-cuda-"))
    work.mkdir(parents=True, exist_ok=True)
    built = time.perf_counter()
    state = make_state(args.gb, args.tensors, device)
    bench = Bench(state, device, work)
    size = nbytes(state)
    paths = bench.prepare_loads()
    built = time.perf_counter() - built
    where = str(device)
    saves: dict[str, Callable[[int], Any]] = {
        "device-to-host copy, pinned (limit)": lambda rep: bench.d2h_pinned(),
        "device-to-host, .cpu() per tensor": lambda rep: bench.d2h_cpu(),
        "aptckpt async save, zstd level 1": bench.async_save("zstd"),
        "aptckpt async save, codec=none": bench.async_save("none", codec="none"),
        "torch.save (no fsync)": lambda rep: bench.torch_save(),
    }

    def loader(name: str, key: str, cold: bool, fn: Callable[[], Any]) -> Callable[[int], float]:
        return lambda rep: bench.load(name, paths[key], cold, fn)

    def tl(**kw: Any) -> Callable[[], Any]:
        return lambda: torch.load(paths["torch"], map_location=where, weights_only=True, **kw)

    def al(key: str, **kw: Any) -> Callable[[], Any]:
        return lambda: aptckpt.load(paths[key], map_location=where, **kw)

    into = dict(zip(state, bench.dest, strict=True))
    loads: dict[str, Callable[[int], Any]] = {
        "host-to-device copy, pinned (limit)": lambda rep: bench.h2d_pinned(),
    }
    for cold in (False, True):
        temp = "cold" if cold else "warm"
        loads[f"torch.load, {temp}"] = loader(f"torch.load {temp}", "torch", cold, tl())
        if not cold:
            loads["torch.load mmap=True, warm"] = loader(
                "torch.load mmap", "torch", cold, tl(mmap=True)
            )
        loads[f"aptckpt load zstd, {temp}"] = loader(
            f"aptckpt zstd {temp}", "zstd", cold, al("zstd")
        )
        loads[f"aptckpt load codec=none, {temp}"] = loader(
            f"aptckpt none {temp}", "none", cold, al("none")
        )
        if not cold:
            loads["aptckpt load codec=none mmap=True, warm"] = loader(
                "aptckpt none mmap", "none", cold, al("none", mmap=True)
            )
            loads["aptckpt load into= zstd, warm"] = loader(
                "aptckpt load into= zstd",
                "zstd",
                cold,
                lambda: aptckpt.load(paths["zstd"], into=into),
            )
    contenders = {**saves, **loads}
    names = list(contenders)
    times: dict[str, list[Any]] = {n: [] for n in names}
    foreign: list[float] = []
    for rep in range(args.reps + 1):  # round 0 warms up: staging buffers, allocator, cache
        meter = _sysutil.CpuMeter()
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            bench.settle()
            try:
                elapsed = contenders[name](rep)
            except Exception as err:  # reported, not fatal: the rest still runs
                bench.errors.append(f"{name}: {type(err).__name__}: {err}")
                names.remove(name)
                times.pop(name)
                continue
            if rep:
                times[name].append(elapsed)
        bench.settle()
        if rep:
            foreign.append(meter.read()["foreign"])
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report(args, device, size, built, times, foreign, bench)


def _gpu_facts(device: torch.device) -> str:
    if device.type != "cuda":
        return "none (CPU dry run: every 'device' tensor is on the CPU, figures are meaningless)"
    p = torch.cuda.get_device_properties(device)
    return (
        f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
        f"compute capability {p.major}.{p.minor}; CUDA runtime {torch.version.cuda}"
    )


def report(
    args: argparse.Namespace,
    device: torch.device,
    size: int,
    built: float,
    times: dict[str, list[Any]],
    foreign: list[float],
    bench: Bench,
) -> str:
    repo = HERE.parent
    machine = _sysutil.machine_info(args.workdir or Path(tempfile.gettempdir()))
    versions = _sysutil.versions(repo)
    command = "python benchmarks/bench_cuda.py " + " ".join(args.argv)
    d2h = times.get("device-to-host copy, pinned (limit)", [])
    h2d = times.get("host-to-device copy, pinned (limit)", [])
    save_rows = []
    for name, xs in times.items():
        if name.startswith(("host-to-device", "torch.load", "aptckpt load")):
            continue
        returned = [x[0] if isinstance(x, tuple) else x for x in xs]
        free = [x[1] if isinstance(x, tuple) else x for x in xs]
        save_rows.append(
            [
                name,
                _stats.fmt_s(returned),
                _stats.fmt_s(free),
                _stats.fmt_gbps(size, free),
                _stats.fmt_ratio(_stats.paired_ratio(d2h, free)),
            ]
        )
    tl_warm = times.get("torch.load, warm", [])
    tl_cold = times.get("torch.load, cold", [])
    load_rows = []
    for name, xs in times.items():
        if not name.startswith(("host-to-device", "torch.load", "aptckpt load")):
            continue
        reference = tl_cold if name.endswith("cold") else tl_warm
        load_rows.append(
            [
                name,
                _stats.fmt_s(xs),
                _stats.fmt_gbps(size, xs),
                _stats.fmt_ratio(_stats.paired_ratio(reference, xs)),
                _stats.fmt_pct(_stats.paired_ratio(h2d, xs)),
            ]
        )
    cold = bench.resident["cold"]
    warm = bench.resident["warm"]
    title = "# aptckpt on CUDA: async save stall and load onto the GPU"
    if device.type != "cuda":
        title += " (CPU DRY RUN: not figures)"
    lines = [
        title,
        "",
        "Generated by `benchmarks/bench_cuda.py` (run by `scripts/gpu_check.sh`); see its "
        "docstring and `benchmarks/README.md` for the method.",
        "",
        f"- **Date**: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- **Command**: `{command.strip()}`",
        f"- **GPU**: {_gpu_facts(device)}",
        "- **Machine**: " + "; ".join(f"{k} {v}" for k, v in machine.items()),
        "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- **Load average**: {_sysutil.loadavg()}; CPU busy outside this process per round: "
        + ", ".join(f"{100 * f:.0f}%" for f in foreign),
        f"- **State**: {args.tensors} fp32 tensors of normal random values on {device}, "
        f"{_stats.fmt_bytes(size)} (built and checkpoints written in {built:.1f} s)",
        f"- **Repetitions**: {args.reps} after one warm-up round, interleaved; cells are "
        "median [min-max] seconds; ratios are medians of per-round ratios",
        "",
        "## Save: how long the training loop is stalled",
        "",
        _stats.table(
            ["contender", "returns after, s", "stream free after, s", "GB/s", "vs d2h copy"],
            save_rows,
        ),
        "",
        "`stream free after`: until the caller's CUDA stream has finished the save's copies "
        "(kernels launched after the save wait for them); `vs d2h copy` = the pinned "
        "device-to-host copy / this, per round (1x = as fast as copying the bytes off the "
        "device; < 1x = slower).",
        "",
        "## Load onto the device",
        "",
        _stats.table(
            ["loader", "seconds, median [min-max]", "GB/s", "vs torch.load", "% of h2d copy"],
            load_rows,
        ),
        "",
        "`vs torch.load` = torch.load(map_location=...) at the same temperature / this (> 1x = "
        "faster); `% of h2d copy` = the pinned host-to-device copy / this (the bytes already "
        "in host memory: 100% is the transfer limit alone). Every load was checked bit for bit.",
        "",
        "## Notes",
        "",
        f"- Page cache (mincore): before the cold loads at most "
        f"{100 * max(cold, default=0):.2f}% of the checkpoint's pages were resident; before the "
        f"warm loads at least {100 * min(warm, default=1):.1f}%.",
    ]
    lines += [f"- Not measured: {e}" for e in bench.errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--gb", type=float, default=None, help="state size in GB (default 1; 0.02 for a dry run)"
    )
    parser.add_argument("--tensors", type=int, default=256, help="tensor count (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown report (default RESULTS-cuda.md; _work/ for a dry run)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="checkpoints (default: a temp dir)"
    )
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="no GPU: run the same code on the CPU with a tiny state",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.gb is None:
        args.gb = 0.02 if args.cpu_dry_run else 1.0
    if args.reps < 1 or args.tensors < 1 or args.gb <= 0:
        parser.error("--reps and --tensors must be >= 1 and --gb > 0")
    device = choose_device(args.cpu_dry_run)
    if device is None:
        print(
            "bench_cuda: no CUDA device here (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); nothing measured, "
            "RESULTS-cuda.md unchanged. Run scripts/gpu_check.sh on a GPU machine, or pass "
            "--cpu-dry-run to exercise this script on the CPU."
        )
        return 0
    if args.out is None:
        args.out = HERE / (
            "_work/RESULTS-cuda-dryrun.md" if args.cpu_dry_run else "RESULTS-cuda.md"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        text = run(args, device)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"bench_cuda: report written to {_sysutil.repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
