"""The default load against torch.load, and the codecs against each other, on the states users
save: warm, right after a save in the same process, and cold.

Role: issue 16's tables. For each workload and each contender, one round does, in order:

1. **save**: ``torch.save`` + ``fsync`` of the file, or ``aptckpt.save`` (which fsyncs);
2. **after save**: load it at once, in the same process (whatever the save left in the page
   cache: ``torch.save`` writes through it, aptckpt's large writes bypass it with ``O_DIRECT``);
3. **warm**: read every file once (page cache warm), then load;
4. **cold**: ``fsync`` + ``posix_fadvise(DONTNEED)`` of every file, then load.

Before every timed step the C heap's free pages go back to the OS (``_sysutil.trim_heap``), so
each load faults in fresh memory as a resume in a new process does. Contenders are taken in a
rotated order each round; ratios are medians of per-round ratios against ``torch.save`` +
``fsync`` / ``torch.load(weights_only=True)`` of the same round.

Contenders: torch; aptckpt's default (``aptckpt.save(state, path)``: whatever the running
version does by default, named in the report); and the ``zstd`` backend with ``codec="zstd"``
(level 1), ``codec="auto"`` and ``codec="none"``. A contender the imported aptckpt does not know
(an older version without ``codec="auto"``) is reported as such. Run the same command with
``PYTHONPATH`` pointing at another source tree to measure another version of the code.

Workloads: MiniLM-L6-sized encoder states (``minilm.py``: 91 MB fp32, 45 MB bf16, 273 MB
fp32 + AdamW) and, with ``--full``, the 1.87 GB training state of ``workload.py``.

Usage::

    python benchmarks/bench_load.py --reps 5 --full --out benchmarks/RESULTS-load.md
    python benchmarks/bench_load.py --reps 2                     # quick, MiniLM set only
"""

from __future__ import annotations

import argparse
import datetime
import gc
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
import minilm

HERE = Path(__file__).resolve().parent

PHASES = ("save", "after save", "warm", "cold")


class Contender:
    """A way to save and load a state; ``error`` says why it cannot run here."""

    def __init__(self, name: str, save: Callable[[Any, Path], None], load: Callable[[Path], Any]):
        self.name, self.save, self.load = name, save, load
        self.error: str | None = None


def contenders() -> list[Contender]:
    def torch_save(state: Any, path: Path) -> None:
        torch.save(state, path)
        _sysutil.fsync_file(path)

    def apt(**options: Any) -> Callable[[Any, Path], None]:
        def save(state: Any, path: Path) -> None:
            aptckpt.save(state, path, overwrite=True, **options)

        return save

    found = [
        Contender("torch.save + fsync / torch.load", torch_save,
                  lambda p: torch.load(p, weights_only=True)),
        Contender("aptckpt default", apt(), aptckpt.load),
        Contender("aptckpt codec=zstd (level 1)", apt(codec="zstd"), aptckpt.load),
        Contender("aptckpt codec=auto", apt(codec="auto"), aptckpt.load),
        Contender("aptckpt codec=none", apt(codec="none"), aptckpt.load),
    ]  # fmt: skip
    return found


def _default_codec() -> str:
    from aptckpt import registry

    return str(getattr(registry.get_backend("zstd").Options(), "codec", "?"))


def run_workload(
    state: Any, reps: int, work: Path, meter_rows: list[dict[str, float]]
) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    cands = contenders()
    times: dict[str, dict[str, list[float]]] = {c.name: {p: [] for p in PHASES} for c in cands}
    sizes: dict[str, int] = {}
    for rep in range(reps):
        meter = _sysutil.CpuMeter()
        order = cands[rep % len(cands) :] + cands[: rep % len(cands)]
        for c in order:
            if c.error:
                continue
            path = work / ("torch.pt" if c.name.startswith("torch") else "apt")
            _sysutil.remove(path)
            result: dict[str, float] = {}
            try:
                for phase in PHASES:
                    if phase == "warm":
                        _sysutil.prewarm(path)
                    elif phase == "cold":
                        _sysutil.evict(path)
                    gc.collect()
                    _sysutil.trim_heap()
                    start = time.perf_counter()
                    loaded = c.save(state, path) if phase == "save" else c.load(path)
                    result[phase] = time.perf_counter() - start
                    del loaded
            except Exception as err:  # an older aptckpt without this codec
                c.error = f"{type(err).__name__}: {err}"
                _sysutil.remove(path)
                continue
            for phase, seconds in result.items():
                times[c.name][phase].append(seconds)
            sizes[c.name] = _sysutil.disk_bytes(path)
            _sysutil.remove(path)
        meter_rows.append(meter.read())
    for c in cands:
        if c.error:
            times.pop(c.name)
            sizes[c.name] = -1
            times[c.name] = {"error": [], "why": c.error}  # type: ignore[dict-item]
    return times, sizes


def _ratio_cell(ref: list[float], other: list[float]) -> str:
    return _stats.fmt_ratio(_stats.paired_ratio(ref, other)) if ref and other else "n/a"


def render(results: list[tuple[str, int, dict[str, Any], dict[str, int]]]) -> str:
    torch_name = "torch.save + fsync / torch.load"
    lines = []
    header = [
        "workload",
        "contender",
        "on disk",
        "save s",
        "save: torch / this",
        "load after save s",
        "after save: torch / this",
        "load warm s",
        "warm: torch / this",
        "load cold s",
        "cold: torch / this",
    ]
    rows = []
    for name, nbytes, times, sizes in results:
        ref = times[torch_name]
        for cname, t in times.items():
            if "why" in t:
                rows.append([name, cname, "n/a", *(["n/a"] * 8)])
                continue
            cells = [name, cname, f"{sizes[cname] / 1e6:.1f} MB ({sizes[cname] / nbytes:.2f}x)"]
            for phase in PHASES:
                cells.append(f"{_stats.median(t[phase]):.3f}")
                cells.append("1.00x" if cname == torch_name else _ratio_cell(ref[phase], t[phase]))
            rows.append(cells)
    lines.append(_stats.table(header, rows))
    errors = [
        f"- {name}: {cname} did not run: {t['why']}"
        for name, _, times, _ in results
        for cname, t in times.items()
        if "why" in t
    ]
    if errors:
        lines += ["", *sorted(set(errors))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="add the 1.87 GB training state")
    parser.add_argument("--only", default="", help="comma list of workload name substrings")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.workdir or HERE / "_work" / "load"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = _sysutil.loadavg()
    states = minilm.build()
    if args.full:
        import workload

        states["GPT-2-style 155.6M fp32 + AdamW (workload.py full)"] = workload.build_workload(
            "full"
        ).state
    results = []
    meter_rows: list[dict[str, float]] = []
    for name, state in states.items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(state))
        print(f"{name} ({nbytes / 1e6:.0f} MB) ...", file=sys.stderr, flush=True)
        times, sizes = run_workload(state, args.reps, work, meter_rows)
        results.append((name, nbytes, times, sizes))
    versions = _sysutil.versions(HERE.parent)
    machine = _sysutil.machine_info(work)
    foreign = ", ".join(f"{100 * m['foreign']:.0f}%" for m in meter_rows)
    report = "\n".join(
        [
            "# aptckpt loads and saves against torch, per codec: warm, right after a save, cold",
            "",
            "Generated by `benchmarks/bench_load.py` (see its docstring for the method). Ratios "
            "are torch's time / this contender's time in the same round (> 1x: faster than "
            "torch); medians of per-round ratios.",
            "",
            f"- **Date**: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
            f"(run took {(time.perf_counter() - started) / 60:.1f} min)",
            f"- **Command**: `python benchmarks/bench_load.py {' '.join(argv or sys.argv[1:])}`",
            f"- **Code**: aptckpt {versions.get('aptckpt')}, git {versions.get('git')}; "
            f"default codec of the zstd backend: `{_default_codec()}`; huge pages for loads: "
            f"{_hugepages()}",
            f"- **Machine**: {machine['cpu']}; {machine['cores']}; RAM {machine['ram']}; "
            f"{machine['filesystem']}",
            f"- **Load average** at start {load_start}, at end {_sysutil.loadavg()}; CPU busy "
            f"outside this process per round: {foreign}",
            f"- **Versions**: torch {versions.get('torch')}, zstandard {versions.get('zstandard')}",
            f"- **Repetitions**: {args.reps}; cells are medians in seconds",
            "",
            render(results),
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    if args.workdir is None:
        for p in work.iterdir():
            _sysutil.remove(p)


def _hugepages() -> str:
    try:
        from aptckpt import _memory
    except ImportError:
        return "n/a (this version does not ask)"
    return "asked for" if _memory.hugepages_enabled() else "off"


def _tensors(obj: Any) -> list[torch.Tensor]:
    from workload import unique_tensors

    return list(unique_tensors(obj).values())


if __name__ == "__main__":
    tempfile.tempdir = str(HERE / "_work")
    main()
