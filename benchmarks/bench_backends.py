"""Save/load benchmark of the aptckpt backends against the peers and the physical limits.

Role: the one benchmark behind the figures in ``benchmarks/RESULTS.md``. For each workload (the
full fp32 training state and the bf16 weights, from ``workload.py``) it times, in the same run and
on the same bytes:

* aptckpt backends: ``torch``, ``zstd`` (level 1) and ``zstd`` with ``codec="none"``;
* peers: ``torch.save`` / ``torch.load(weights_only=True)`` (plain and mmap), ``torch.save`` +
  fsync, safetensors ``save_file`` + fsync / ``load_file``, and ``torch.distributed.checkpoint``
  (single process, ``FileSystemWriter(sync_files=True)`` with 1 and 2 threads, load into templates);
* limits: raw write with fsync (buffered, and O_DIRECT from a reused aligned buffer), raw read
  (warm; cold buffered and cold O_DIRECT; warm into fresh memory), memcpy into a pre-touched
  buffer.

Method: repetitions are interleaved round-robin across contenders (the starting contender rotates
each round) and reported as median [min-max]; ratios are medians of per-round ratios. Cold loads
follow ``fsync`` + ``posix_fadvise(DONTNEED)`` on the checkpoint's files, checked with ``mincore``.
Every load is verified bit for bit (byte views, NaN-safe) outside the timed region. Loads end by
touching one byte per page of every tensor, so lazy (mmap) loaders pay for their reads. Before
every timed operation the C heap's free pages go back to the OS (``malloc_trim``), so loaders
allocate fresh memory as a resume in a new process does.

Usage::

    python benchmarks/bench_backends.py --scale small --reps 3          # quick, ~1 minute
    python benchmarks/bench_backends.py --scale full --reps 3 --out benchmarks/RESULTS.md
    python benchmarks/bench_backends.py --scale small --only zstd,safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from any directory

import _report
import _sysutil
from workload import build_workload, describe, iter_tensors, tensor_bytes, unique_tensors

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKDIR = HERE / "_work"  # gitignored: every file the benchmark writes goes here
_rel = _sysutil.repo_relative

Flat = dict[str, torch.Tensor]

# Facts about the peers seen during the run (e.g. DCP warnings), listed under the report's Notes.
OBSERVED: dict[str, None] = {}


@dataclasses.dataclass(frozen=True)
class Loader:
    """One way of reading back what a :class:`Saver` wrote.

    ``load(path, ref)`` returns the loaded object (timed); ``check(loaded, ref)`` raises on any
    difference and returns whether tied tensors came back tied (untimed); ``prepare`` runs untimed
    before each timed load.
    """

    name: str
    load: Callable[[Path, Any], Any]
    check: Callable[[Any, Any], str]
    warm: bool = True  # False for O_DIRECT reads, which have no warm case
    prepare: Callable[[], None] | None = None


@dataclasses.dataclass(frozen=True)
class Saver:
    """One contender's save, the file or directory it writes, and the loaders for it."""

    key: str
    name: str
    group: str  # "limit", "peer" or "aptckpt"
    save: Callable[[Any, Path], Any]
    loaders: tuple[Loader, ...] = ()
    writes_file: bool = True  # False for memcpy
    check: Callable[[], None] | None = None  # untimed check after a save without a file


@dataclasses.dataclass
class LoadResult:
    cold_s: list[float] = dataclasses.field(default_factory=list)
    warm_s: list[float] = dataclasses.field(default_factory=list)
    resident_before_cold: list[float] = dataclasses.field(default_factory=list)
    resident_before_warm: list[float] = dataclasses.field(default_factory=list)
    ties: str = "—"
    error: str | None = None


@dataclasses.dataclass
class SaveResult:
    name: str
    group: str
    save_s: list[float] = dataclasses.field(default_factory=list)
    disk_bytes: int | None = None
    info: dict[str, Any] | None = None
    loads: dict[str, LoadResult] = dataclasses.field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# verification (untimed)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    # Compare bytes, not values: NaN != NaN and -0.0 == 0.0 would hide or invent differences.
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _alias_groups(flat: Flat) -> list[list[str]]:
    groups: dict[tuple[int, int], list[str]] = {}
    for name, t in flat.items():
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            groups.setdefault(key, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def check_flat(got: Flat, expected: Flat) -> str:
    """Raise unless ``got`` holds exactly ``expected``; return 'kept'/'lost'/'n/a' for ties."""
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise AssertionError(f"tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, want in expected.items():
        have = got[name]
        if have.dtype != want.dtype or have.shape != want.shape:
            raise AssertionError(
                f"{name}: {have.dtype}{tuple(have.shape)} != {want.dtype}{tuple(want.shape)}"
            )
        if not torch.equal(_bytes_of(have), _bytes_of(want)):
            raise AssertionError(f"{name}: bytes differ")
    groups = _alias_groups(expected)
    if not groups:
        return "n/a"
    kept = all(
        len({got[n].untyped_storage().data_ptr() + got[n].storage_offset() for n in g}) == 1
        for g in groups
    )
    return "kept" if kept else "lost"


def check_nested(loaded: Any, ref: Any) -> str:
    """Check a loaded nested state against the reference, tensors and plain values."""
    ties = check_flat(dict(iter_tensors(loaded)), dict(iter_tensors(ref)))
    if isinstance(ref, dict):
        for k, v in ref.items():
            if not isinstance(v, (torch.Tensor, dict, list, tuple)) and loaded.get(k) != v:
                raise AssertionError(f"plain value {k!r}: {loaded.get(k)!r} != {v!r}")
    return ties


def check_unique(loaded: Any, ref: Any) -> str:
    """Check a flat, de-aliased load (safetensors) against the reference's distinct tensors."""
    check_flat(loaded, unique_tensors(ref))
    return "one copy stored" if _alias_groups(dict(iter_tensors(ref))) else "n/a"


def touch(obj: Any) -> Any:
    """Read one byte per page of every tensor, so lazily mapped loads pay for their I/O."""
    for _, t in iter_tensors(obj):
        if t.numel():
            _bytes_of(t)[:: _sysutil.PAGE].sum()
    return obj


# ---------------------------------------------------------------------------------------------
# peers


def torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def torch_save_fsync(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _sysutil.fsync_file(path)


def torch_load(path: Path, ref: Any) -> Any:
    return touch(torch.load(path, weights_only=True))


def torch_load_mmap(path: Path, ref: Any) -> Any:
    return touch(torch.load(path, weights_only=True, mmap=True))


def _plain_skeleton(obj: Any) -> Any:
    """The non-tensor part of a state, tensors replaced by a marker, for safetensors metadata."""
    if isinstance(obj, torch.Tensor):
        return "<tensor>"
    if isinstance(obj, dict):
        return {str(k): _plain_skeleton(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_skeleton(v) for v in obj]
    return obj


def safetensors_save(obj: Any, path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors sharing memory, so the tied embedding is stored once; the
    # optimizer's param_groups and other plain values ride along as JSON metadata.
    save_file(unique_tensors(obj), str(path), metadata={"plain": json.dumps(_plain_skeleton(obj))})
    _sysutil.fsync_file(path)


def safetensors_load(path: Path, ref: Any) -> Any:
    from safetensors.torch import load_file

    return touch(load_file(str(path)))


def _template(obj: Any) -> Any:
    """Same structure with fresh, uninitialised tensors: what DCP loads into."""
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj)
    if isinstance(obj, dict):
        return {k: _template(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_template(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_template(v) for v in obj)
    return obj


def dcp_saver(threads: int) -> Callable[[Any, Path], None]:
    def save(obj: Any, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(path, sync_files=True, thread_count=threads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dcp.save(obj, storage_writer=writer)  # no process group: DCP runs single-process
        _observe("dcp.save", caught)

    return save


def dcp_load(path: Path, ref: Any) -> Any:
    import torch.distributed.checkpoint as dcp

    # Template allocation is inside the timed region: torch.load allocates its tensors too.
    target = _template(ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp.load(target, storage_reader=dcp.FileSystemReader(path))
    _observe("dcp.load", caught)
    return touch(target)


def _observe(where: str, caught: list[warnings.WarningMessage]) -> None:
    # Recording costs microseconds per call; the message is kept once for the report.
    for w in caught:
        OBSERVED.setdefault(f"{where} without a process group warns: `{w.message}`")


# ---------------------------------------------------------------------------------------------
# aptckpt

APT_CONTENDERS: dict[str, tuple[str, dict[str, Any]]] = {
    "apt-torch": ("torch", {}),
    "apt-auto": ("zstd", {"codec": "auto"}),
    "apt-zstd": ("zstd", {"codec": "zstd", "level": 1}),
    "apt-zstd-none": ("zstd", {"codec": "none"}),
}


def probe_aptckpt() -> tuple[Any, dict[str, str]]:
    """Import aptckpt and round-trip a tiny state per contender; map key -> 'ok' or the failure."""
    try:
        import aptckpt
    except Exception as err:
        msg = f"import aptckpt failed: {type(err).__name__}: {err}"
        return None, dict.fromkeys(APT_CONTENDERS, msg)
    status: dict[str, str] = {}
    try:
        available = set(aptckpt.available_backends())
    except Exception as err:
        available = set()
        status = dict.fromkeys(APT_CONTENDERS, f"available_backends() failed: {err!r}")
        return aptckpt, status
    tiny = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "h": [torch.ones(5, dtype=torch.bfloat16)],
        "step": 3,
    }
    for key, (backend, opts) in APT_CONTENDERS.items():
        if backend not in available:
            status[key] = f"backend {backend!r} not in available_backends() = {sorted(available)}"
            continue
        path = WORKDIR / f"probe-{key}"
        try:
            info = aptckpt.save(tiny, path, backend=backend, overwrite=True, **opts)
            _ = (info.stored_bytes, info.raw_bytes)
            check_nested(aptckpt.load(path), tiny)
            status[key] = "ok"
        except Exception as err:
            status[key] = f"probe save/load failed: {type(err).__name__}: {err}"
        finally:
            _sysutil.remove(path)
    return aptckpt, status


def apt_saver(aptckpt: Any, backend: str, opts: dict[str, Any]) -> Callable[[Any, Path], Any]:
    def save(obj: Any, path: Path) -> Any:
        return aptckpt.save(obj, path, backend=backend, overwrite=True, **opts)

    return save


def apt_loader(aptckpt: Any, verify: bool, mmap: bool = False) -> Callable[[Path, Any], Any]:
    def load(path: Path, ref: Any) -> Any:
        return touch(aptckpt.load(path, verify=verify, mmap=mmap))

    return load


# ---------------------------------------------------------------------------------------------
# contenders


def contenders(raw: _sysutil.RawIO, aptckpt: Any, apt_status: dict[str, str]) -> list[Saver]:
    """All savers (limits, peers, aptckpt) for one workload, in their canonical order."""
    raw_read = Loader(
        "raw read, buffered",
        lambda p, ref: raw.read_buffered(p),
        lambda loaded, ref: (raw.check_buffer(), "n/a")[1],
        prepare=raw.clear_buffer,
    )
    raw_read_fresh = Loader(
        "raw read, buffered, into fresh memory",
        lambda p, ref: raw.read_fresh(p),
        lambda loaded, ref: (raw.check_buffer(loaded), "n/a")[1],
    )
    raw_read_direct = Loader(
        "raw read, O_DIRECT",
        lambda p, ref: raw.read_direct(p),
        lambda loaded, ref: (raw.check_buffer(), "n/a")[1],
        warm=False,
        prepare=raw.clear_buffer,
    )
    out = [
        Saver("raw-buffered", "raw write, buffered + fsync", "limit",
              lambda obj, p: raw.write_buffered(p), (raw_read, raw_read_fresh)),
        Saver("raw-direct", "raw write, O_DIRECT + fsync", "limit",
              lambda obj, p: raw.write_direct(p), (raw_read_direct,)),
        Saver("memcpy", "memcpy into pre-touched buffer", "limit",
              lambda obj, p: raw.memcpy(), writes_file=False, check=raw.check_buffer),
        Saver("torch.save", "torch.save (no fsync)", "peer", torch_save),
        Saver("torch.save+fsync", "torch.save + fsync", "peer", torch_save_fsync, (
            Loader("torch.load(weights_only=True)", torch_load, check_nested),
            Loader("torch.load(weights_only=True, mmap=True)", torch_load_mmap, check_nested),
        )),
        Saver("safetensors", "safetensors save_file + fsync", "peer", safetensors_save,
              (Loader("safetensors load_file", safetensors_load, check_unique),)),
        Saver("dcp-t1", "DCP save, 1 thread, sync_files", "peer", dcp_saver(1),
              (Loader("DCP load into templates", dcp_load, check_nested),)),
        Saver("dcp-t2", "DCP save, 2 threads, sync_files", "peer", dcp_saver(2)),
    ]  # fmt: skip
    for key, (backend, opts) in APT_CONTENDERS.items():
        if apt_status.get(key) != "ok":
            continue
        label = f"aptckpt {backend}" + "".join(f" {k}={v}" for k, v in opts.items())
        out.append(Saver(key, label, "aptckpt", apt_saver(aptckpt, backend, opts), (
            Loader(f"aptckpt.load ({label})", apt_loader(aptckpt, True), check_nested),
            Loader(f"aptckpt.load verify=False ({label})", apt_loader(aptckpt, False),
                   check_nested),
            *([Loader(f"aptckpt.load mmap=True ({label})", apt_loader(aptckpt, True, True),
                      check_nested)] if opts.get("codec") == "none" else []),
        )))  # fmt: skip
    return out


# Contenders always run: the limits and the ratio references.
ALWAYS = {"raw-buffered", "raw-direct", "memcpy", "torch.save", "torch.save+fsync"}
# --only names -> saver keys.
SELECTORS: dict[str, set[str]] = {
    "torch": {"torch.save", "torch.save+fsync"},
    "safetensors": {"safetensors"},
    "dcp": {"dcp-t1", "dcp-t2"},
    "aptckpt": set(APT_CONTENDERS),
    "zstd": {"apt-auto", "apt-zstd", "apt-zstd-none"},
    **{k: {k} for k in ("dcp-t1", "dcp-t2", *APT_CONTENDERS)},
}


# ---------------------------------------------------------------------------------------------
# the run


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _settle() -> None:
    # Untimed, before every timed operation: no garbage or dirty pages from the previous
    # contender should be collected or written back on the next one's clock, and no freed
    # pages of its reused by the next one's allocations: every loader allocates fresh memory,
    # as a resume in a new process does.
    gc.collect()
    _sysutil.trim_heap()
    os.sync()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _run_loads(s: Saver, path: Path, obj: Any, res: SaveResult) -> None:
    for ld in s.loaders:
        lr = res.loads.setdefault(ld.name, LoadResult())
        if lr.error:
            continue
        try:
            for temp in ("cold", "warm") if ld.warm else ("cold",):
                if temp == "cold":
                    _sysutil.evict(path)
                    lr.resident_before_cold.append(_sysutil.resident_fraction(path))
                else:
                    _sysutil.prewarm(path)
                    lr.resident_before_warm.append(_sysutil.resident_fraction(path))
                if ld.prepare:
                    ld.prepare()
                _settle()
                dt, loaded = _timed(lambda ld=ld: ld.load(path, obj))
                lr.ties = ld.check(loaded, obj)
                del loaded
                (lr.cold_s if temp == "cold" else lr.warm_s).append(dt)
                _log(f"    {ld.name}: {temp} {dt:.3f} s")
        except Exception as err:
            lr.error = f"{type(err).__name__}: {err}"
            _log(f"    {ld.name}: FAILED {lr.error}\n{traceback.format_exc()}")
        gc.collect()


def run_workload(
    label: str, obj: Any, savers: list[Saver], reps: int
) -> tuple[dict[str, SaveResult], list[dict[str, float]]]:
    """Interleaved repetitions of every saver (and its loaders) on one object.

    Returns the results per saver and, per round, the CPU share used elsewhere on the machine.
    """
    results = {s.key: SaveResult(s.name, s.group) for s in savers}
    cpu: list[dict[str, float]] = []
    for rep in range(reps):
        meter = _sysutil.CpuMeter()
        k = rep % len(savers)
        for s in savers[k:] + savers[:k]:  # rotate the starting contender each round
            res = results[s.key]
            if res.error:
                continue
            path = WORKDIR / f"{label}-{s.key}"
            try:
                _sysutil.remove(path)
                _settle()
                dt, info = _timed(lambda s=s, path=path: s.save(obj, path))
                res.save_s.append(dt)
                _log(f"[{label} rep {rep + 1}/{reps}] {s.name}: save {dt:.3f} s")
                if s.check:
                    s.check()
                if info is not None and dataclasses.is_dataclass(info):
                    res.info = {
                        f.name: getattr(info, f.name)
                        for f in dataclasses.fields(info)
                        if isinstance(getattr(info, f.name), (int, float, str, bool))
                    }
                if s.writes_file:
                    os.sync()
                    res.disk_bytes = _sysutil.disk_bytes(path)
                    _run_loads(s, path, obj, res)
            except Exception as err:
                res.error = f"{type(err).__name__}: {err}"
                _log(f"{s.name}: FAILED {res.error}\n{traceback.format_exc()}")
            finally:
                _sysutil.remove(path)
                gc.collect()
        cpu.append(meter.read())
        _log(f"[{label} rep {rep + 1}/{reps}] CPU elsewhere: {cpu[-1]}")
    return results, cpu


def compression_probe(aptckpt: Any, obj: Any, backend: str, opts: dict[str, Any]) -> dict[str, Any]:
    """One untimed-in-the-tables save to read off a compression ratio (fp32 weights alone)."""
    path = WORKDIR / "compression-probe"
    try:
        dt, info = _timed(lambda: aptckpt.save(obj, path, backend=backend, overwrite=True, **opts))
        return {
            "seconds": dt,
            "disk_bytes": _sysutil.disk_bytes(path),
            "raw_bytes": getattr(info, "raw_bytes", None),
            "stored_bytes": getattr(info, "stored_bytes", None),
        }
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        _sysutil.remove(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("full", "small"), default="full")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (>= 1)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="markdown report")
    parser.add_argument(
        "--only",
        default="",
        help="comma list of contenders besides the limits and torch.save/torch.load references: "
        + ", ".join(sorted(SELECTORS)),
    )
    parser.add_argument(
        "--workloads",
        default="state,bf16",
        help="comma list of: state (fp32 weights + AdamW), bf16 (bf16 weights), "
        "fp32w (fp32 weights)",
    )
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    unknown = [x for x in args.only.split(",") if x and x not in SELECTORS]
    if unknown:
        parser.error(f"unknown --only {unknown}; choose from {sorted(SELECTORS)}")
    bad = [x for x in args.workloads.split(",") if x not in ("state", "bf16", "fp32w")]
    if bad:
        parser.error(f"unknown --workloads {bad}; choose from state, bf16, fp32w")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    loadavg_start = _sysutil.loadavg()
    command = "python " + " ".join(shlex.quote(a) for a in [_rel(sys.argv[0]), *sys.argv[1:]])

    aptckpt, apt_status = probe_aptckpt()
    # Versions and git state at the start: that is the tree the installed package came from
    # at best; others may commit while the benchmark runs.
    versions = _sysutil.versions(REPO)
    for key, st in apt_status.items():
        _log(f"aptckpt contender {key}: {st}")

    selected = set(ALWAYS)
    for item in filter(None, args.only.split(",")):
        selected |= SELECTORS[item]
    if not args.only:
        selected |= set().union(*SELECTORS.values())

    _log(f"building workload ({args.scale}) ...")
    wl = build_workload(args.scale)
    _log(describe(wl))
    objs = {
        "state": wl.state,
        "bf16": wl.bf16_weights,
        "fp32w": {"model": wl.state["model"]},
    }
    titles = {
        "state": "Full training state (fp32 weights + AdamW moments)",
        "bf16": "bf16 weights alone",
        "fp32w": "fp32 weights alone",
    }

    runs: dict[str, dict[str, Any]] = {}
    for name in args.workloads.split(","):
        obj = objs[name]
        raw = _sysutil.RawIO(list(unique_tensors(obj).values()))
        savers = [s for s in contenders(raw, aptckpt, apt_status) if s.key in selected]
        _log(f"workload {name}: {raw.nbytes / 1e9:.3f} GB, contenders: {[s.key for s in savers]}")
        results, cpu = run_workload(name, obj, savers, args.reps)
        runs[name] = {
            "title": titles[name],
            "nbytes": tensor_bytes(obj),
            "results": results,
            "cpu": cpu,
        }
        del raw
        gc.collect()

    compression: dict[str, Any] = {}
    if aptckpt is not None and apt_status.get("apt-zstd") == "ok" and "fp32w" not in runs:
        _log("compression probe: zstd on fp32 weights alone")
        compression["fp32w"] = compression_probe(aptckpt, objs["fp32w"], "zstd", {"level": 1})

    meta = {
        "loadavg_start": loadavg_start,
        "loadavg_end": _sysutil.loadavg(),
        "observed": list(OBSERVED),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "command": command,
        "machine": _sysutil.machine_info(WORKDIR),
        "versions": versions,
        "workload": describe(wl),
        "scale": args.scale,
        "reps": args.reps,
        "apt_status": apt_status,
        "tensor_bytes_fp32w": tensor_bytes(objs["fp32w"]),
    }
    report = _report.render(meta, runs, compression)
    print(report)
    args.out.write_text(report)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    raw_json = WORKDIR / f"results-{args.scale}-{stamp}.json"
    raw_json.write_text(json.dumps(_report.to_json(meta, runs, compression), indent=1))
    _log(f"wrote {_rel(args.out)} and {_rel(raw_json)}")


if __name__ == "__main__":
    main()
