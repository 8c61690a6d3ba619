"""``aptckpt info`` (this installation) and ``aptckpt inspect`` (one checkpoint's manifest).

Both read no tensor data: ``info`` asks the library, ``inspect`` reads the manifest
through :func:`aptckpt.inspect`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping

import torch

import aptckpt
from aptckpt import _accel, _config
from aptckpt.cli._common import (
    fmt_size,
    fmt_value,
    options_for,
    print_json,
    render_pairs,
    render_table,
)

#: How much more CPU time the pure-Python twin takes than the compiled core, per operation: the
#: medians that ``benchmarks/bench_cores.py`` measured (benchmarks/RESULTS-cores.md: a
#: 21M-parameter model with AdamW, 296 MB of fp32 tensors, default backend, warm page cache,
#: a 2-core x86-64 machine; "load none" is a load of a ``codec="none"`` checkpoint, where
#: hashing and copying are all the work). CPU time, not wall time: on that shared machine the
#: wall times moved with other load more than the two cores differ. Quoted, not measured at
#: run time (``aptckpt info`` stays instant); rerun the bench after changing either core.
PURE_SLOWDOWN = {"load": 1.3, "verify": 1.4, "save": 1.1, "load none": 2.2}
PURE_SLOWDOWN_SOURCE = "benchmarks/bench_cores.py, 2-core x86-64; benchmarks/RESULTS-cores.md"
#: How to get the compiled core: a binary wheel, else a build from the sdist. --no-cache-dir:
#: pip reuses a pure-Python wheel it built before, which a plain reinstall would get again.
GET_NATIVE = (
    "pip install --force-reinstall --no-deps --no-cache-dir aptckpt (binary wheels: "
    "CPython 3.10-3.13, x86-64 Linux with glibc 2.35+; elsewhere install a C++17 compiler "
    "first, and pip builds the core)"
)


def _core_rows(mode: str) -> list[tuple[str, str]]:
    """The ``core`` line, and when the twin is active what it costs and how to change it."""
    if aptckpt.NATIVE:
        return [("core", "native (C++)")]
    reason = _accel.NATIVE_UNAVAILABLE
    if mode == "disable":
        installed = importlib.util.find_spec("aptckpt._native") is not None
        core = "pure Python (APTCKPT_NATIVE=disable)"
        fix = "unset APTCKPT_NATIVE" if installed else f"unset APTCKPT_NATIVE, then {GET_NATIVE}"
    elif reason == "missing":
        core = "pure Python: this installation has no compiled core (a pure-Python wheel)"
        fix = GET_NATIVE
    else:
        core = f"pure Python: the compiled core did not import ({reason})"
        fix = GET_NATIVE
    cost = (
        f"about {PURE_SLOWDOWN['load']:.1f}x the compiled core's CPU time for verified loads, "
        f"{PURE_SLOWDOWN['verify']:.1f}x for verify, {PURE_SLOWDOWN['load none']:.1f}x for "
        f"uncompressed loads, {PURE_SLOWDOWN['save']:.1f}x for saves "
        f"(measured: {PURE_SLOWDOWN_SOURCE})"
    )
    return [("core", core), ("speed", cost), ("native core", fix)]


def cmd_info(args: argparse.Namespace) -> int:
    mode = os.environ.get("APTCKPT_NATIVE", "auto").strip().lower() or "auto"
    info = {
        "version": aptckpt.__version__,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "implementation": aptckpt.IMPLEMENTATION,
        "native": aptckpt.NATIVE,
        "simd": _accel.simd(),
        "threads": _config.threads(),
        "backends": list(aptckpt.available_backends()),
        "format_version": aptckpt.FORMAT_VERSION,
        # why the twin runs ("disabled", "missing" or the import error); null with the core
        "native_unavailable": None
        if aptckpt.NATIVE
        else ("disabled" if mode == "disable" else _accel.NATIVE_UNAVAILABLE),
        # the twin's CPU time / the core's, measured (see PURE_SLOWDOWN); null with the core
        "pure_slowdown": None
        if aptckpt.NATIVE
        else {**PURE_SLOWDOWN, "measured": PURE_SLOWDOWN_SOURCE},
    }
    if args.json:
        print_json(info)
        return 0
    threads_from = "APTCKPT_THREADS" if os.environ.get("APTCKPT_THREADS") else "usable CPUs"
    rows = [
        ("aptckpt", info["version"]),
        ("torch", info["torch_version"]),
        ("python", info["python_version"]),
        *_core_rows(mode),
        ("simd", info["simd"]),
        ("threads", f"{info['threads']} ({threads_from})"),
        ("backends", ", ".join(info["backends"])),
        ("format version", str(info["format_version"])),
    ]
    print(render_pairs(rows))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    info = aptckpt.inspect(args.checkpoint, storage_options=options_for(args, args.checkpoint))
    if args.json:
        print_json(info)
        return 0
    ratio = f" ({info.stored_bytes / info.raw_bytes:.1%} of raw)" if info.raw_bytes else ""
    rows = [
        ("path", info.path),
        ("backend", info.backend),
        ("options", " ".join(f"{k}={v}" for k, v in info.options.items()) or "-"),
        ("format version", str(info.format_version)),
        *([("saved by", f"{info.world_size} ranks")] if info.world_size > 1 else []),
        ("written by", f"aptckpt {info.library_version}, torch {info.torch_version}"),
        ("created", info.created_at),
        ("tensors", str(len(info.tensors))),
        ("raw bytes", fmt_size(info.raw_bytes)),
        ("stored bytes", fmt_size(info.stored_bytes) + ratio),
    ]
    if info.store_bytes or info.backend == "delta":
        rows.append(("store bytes", f"{fmt_size(info.store_bytes)} (objects in the run's store)"))
    rows.append(("files", f"{len(info.files)} ({fmt_size(sum(f.size for f in info.files))})"))
    if isinstance(info.metadata, Mapping):
        rows += [("metadata", "" if info.metadata else "{}")]
        rows += [(f"  {k}", fmt_value(v)) for k, v in info.metadata.items()]
    elif info.metadata is not None:
        rows.append(("metadata", fmt_value(info.metadata)))
    print(render_pairs(rows))
    if info.tensors:
        tensors = [
            (
                t.key,
                t.dtype,
                str(tuple(t.shape)),
                fmt_size(t.nbytes),
                "-" if t.stored_bytes is None else fmt_size(t.stored_bytes),
                ",".join(t.codecs),
            )
            for t in info.tensors
        ]
        print()
        print(render_table(("key", "dtype", "shape", "bytes", "stored", "codecs"), tensors, (3, 4)))
    return 0
