"""Regenerate every committed benchmark report (``benchmarks/RESULTS*.md``) with one command.

Runs each benchmark of :data:`BENCHES`, one after the other (never two at once: they time the
same disk and CPUs), with the options that produced its committed report (the report's
"Command" line), in the repository root, importing aptckpt from ``src/`` with the compiled core
required (``APTCKPT_NATIVE=require``: a missing build fails instead of measuring the slower
pure-Python twin). Each benchmark's output goes to ``benchmarks/_work/regenerate/<name>.log``.
A benchmark that fails does not stop the others; the exit status is 1 if any failed.

Usage::

    python benchmarks/regenerate.py              # every RESULTS file (~90 minutes, 2 vCPUs)
    python benchmarks/regenerate.py --quick      # small pass of each, reports in _work/quick/
    python benchmarks/regenerate.py --only delta,async --quick
    python benchmarks/regenerate.py --list       # the benchmarks, their reports and commands
    python benchmarks/regenerate.py --dry-run    # print the commands, run nothing

``bench_cuda`` needs a CUDA device: elsewhere it says so and exits 0, and its report is left as
it is (``scripts/gpu_check.sh`` runs it on a GPU machine). ``bench_native`` writes no RESULTS
file: it runs only when named in ``--only``, its table going to its log.

To add a benchmark, add one :class:`Bench` to :data:`BENCHES` (and its row to
``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOGS = HERE / "_work" / "regenerate"
QUICK = HERE / "_work" / "quick"


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmark and how each pass runs it.

    Attributes:
        name: its name for ``--only``.
        script: the file under ``benchmarks/``.
        results: the report it writes (``None``: it prints its table, kept in its log).
        full: the options behind the committed report (``--out`` is added by the driver).
        quick: the options of the quick pass (report under ``benchmarks/_work/quick/``).
        minutes: roughly how long the full pass takes on the 2-vCPU machine.
        default: run without ``--only``.
    """

    name: str
    script: str
    results: str | None
    full: tuple[str, ...]
    quick: tuple[str, ...]
    minutes: int
    default: bool = True

    def command(self, python: str, quick: bool) -> list[str]:
        words = [python, f"benchmarks/{self.script}", *(self.quick if quick else self.full)]
        if self.results is not None:
            out = QUICK / self.results if quick else HERE / self.results
            words += ["--out", str(out.relative_to(ROOT))]
        return words


# Full options: copied from the "Command" line of each committed report.
BENCHES: tuple[Bench, ...] = (
    Bench(
        "backends",
        "bench_backends.py",
        "RESULTS.md",
        full=("--scale", "full", "--reps", "3"),
        quick=("--scale", "small", "--reps", "1"),
        minutes=6,
    ),
    Bench(
        "load",
        "bench_load.py",
        "RESULTS-load.md",
        full=("--reps", "5", "--full"),
        quick=("--reps", "1", "--only", "bf16"),
        minutes=12,
    ),
    Bench(
        "scaling",
        "bench_scaling.py",
        "RESULTS-scaling.md",
        full=("--reps", "3"),
        quick=("--reps", "1", "--rows", "0.1x100,0.1x10000"),
        minutes=8,
    ),
    Bench(
        "async",
        "bench_async.py",
        "RESULTS-async.md",
        full=("--gb", "1", "--tensors", "546", "--reps", "5"),
        quick=("--gb", "0.05", "--tensors", "50", "--reps", "1"),
        minutes=3,
    ),
    Bench(
        "delta",
        "bench_delta.py",
        "RESULTS-delta.md",
        full=("--scale", "full"),
        quick=("--scale", "small"),
        minutes=14,
    ),
    Bench(
        "remote",
        "bench_remote.py",
        "RESULTS-remote.md",
        full=("--scale", "small", "--reps", "3"),
        quick=("--scale", "small", "--reps", "1", "--only", "zstd", "--no-compare-servers"),
        minutes=20,
    ),
    Bench(
        "distributed",
        "bench_distributed.py",
        "RESULTS-distributed.md",
        full=("--scale", "full", "--reps", "3"),
        quick=("--scale", "small", "--reps", "1"),
        minutes=17,
    ),
    Bench(
        "lazy",
        "bench_lazy.py",
        "RESULTS-lazy.md",
        full=("--mb", "128", "--chunk-mb", "4", "--reps", "3"),
        quick=("--mb", "16", "--reps", "1", "--no-s3"),
        minutes=3,
    ),
    Bench(
        "cuda",
        "bench_cuda.py",
        "RESULTS-cuda.md",
        full=("--gb", "1", "--reps", "3"),
        quick=("--gb", "0.1", "--reps", "1"),
        minutes=2,
    ),
    Bench(
        "cores",
        "bench_cores.py",
        "RESULTS-cores.md",
        full=("--reps", "5"),
        quick=("--reps", "1"),
        minutes=2,
    ),
    Bench(
        "torch-backend",
        "bench_torch_backend.py",
        None,
        full=("--rounds", "5", "--big"),
        quick=("--rounds", "1"),
        minutes=6,
        default=False,
    ),
    Bench(
        "native",
        "bench_native.py",
        None,
        full=(),
        quick=("--reps", "5", "--rounds", "1"),
        minutes=2,
        default=False,
    ),
)


def _core_check(python: str, env: dict[str, str]) -> str | None:
    """None if aptckpt imports from src/ as the benchmarks will import it; else why not."""
    probe = subprocess.run(
        [python, "-c", "import aptckpt; print(aptckpt.IMPLEMENTATION, aptckpt.__file__)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        return None
    return probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "import failed"


def _loadavg() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small pass of each; reports in benchmarks/_work/quick/",
    )
    parser.add_argument(
        "--only", default="", help="comma list of: " + ", ".join(b.name for b in BENCHES)
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the benchmarks")
    parser.add_argument(
        "--allow-pure-python",
        action="store_true",
        help="measure the pure-Python core when the compiled one is missing",
    )
    args = parser.parse_args(argv)  # fmt: skip
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    known = {b.name: b for b in BENCHES}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown --only {unknown}; choose from {', '.join(known)}")
    chosen = [known[n] for n in names] if names else [b for b in BENCHES if b.default]
    if args.list:
        for b in BENCHES:
            report = f"benchmarks/{b.results}" if b.results else "(stdout, in its log)"
            extra = "" if b.default else "  [only with --only]"
            print(f"{b.name:12} {report:34} ~{b.minutes} min{extra}")
            print(f"{'':12} full:  {shlex.join(b.command('python', False))}")
            print(f"{'':12} quick: {shlex.join(b.command('python', True))}")
        return 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if not args.allow_pure_python:
        env["APTCKPT_NATIVE"] = "require"
    if args.dry_run:
        for b in chosen:
            print(shlex.join(b.command(args.python, args.quick)))
        return 0
    problem = _core_check(args.python, env)
    if problem is not None:
        print(
            f"regenerate: aptckpt does not import from src/ with its compiled core ({problem}). "
            "Build it (bash scripts/setup.sh) and copy build/<tag>/_native*.so into "
            "src/aptckpt/, or pass --allow-pure-python to measure the pure-Python core.",
            file=sys.stderr,
        )
        return 1
    LOGS.mkdir(parents=True, exist_ok=True)
    if args.quick:
        QUICK.mkdir(parents=True, exist_ok=True)
    total = sum(b.minutes for b in chosen)
    print(
        f"regenerate: {'quick pass of' if args.quick else 'full'} {len(chosen)} benchmark(s)"
        + ("" if args.quick else f", about {total} minutes on the 2-vCPU machine")
    )
    rows = []
    for b in chosen:
        words = b.command(args.python, args.quick)
        log = LOGS / f"{b.name}{'-quick' if args.quick else ''}.log"
        print(f"\n== {b.name}: {shlex.join(words)}  (load average {_loadavg()}; log {log})")
        start, started = time.perf_counter(), time.time()
        with log.open("w") as sink:
            proc = subprocess.Popen(
                words, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            assert proc.stdout is not None
            last = ""
            for line in proc.stdout:
                sink.write(line)
                if line.strip():
                    last = line.strip()
            code = proc.wait()
        seconds = time.perf_counter() - start
        report = (QUICK if args.quick else HERE) / b.results if b.results else None
        if code != 0:
            status = f"FAILED (exit {code})"
        elif report is not None and (not report.exists() or report.stat().st_mtime < started):
            status = "no report written (see the last line)"  # bench_cuda without a GPU
        else:
            status = "ok"
        print(f"   {status} in {seconds / 60:.1f} min; last line: {last[:160]}")
        rows.append((b.name, status, seconds, b.results))
    print("\n| benchmark | status | minutes | report |\n|:---|:---|---:|:---|")
    for name, status, seconds, results in rows:
        where = (QUICK if args.quick else HERE) / results if results else None
        shown = str(where.relative_to(ROOT)) if where else "(log only)"
        print(f"| {name} | {status} | {seconds / 60:.1f} | {shown} |")
    return 0 if not any(status.startswith("FAILED") for _, status, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
