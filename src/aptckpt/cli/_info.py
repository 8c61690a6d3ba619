"""``aptckpt info`` (this installation) and ``aptckpt inspect`` (one checkpoint's manifest).

Both read no tensor data: ``info`` asks the library, ``inspect`` reads the manifest
through :func:`aptckpt.inspect`.
"""

from __future__ import annotations

import argparse
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


def cmd_info(args: argparse.Namespace) -> int:
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
    }
    if args.json:
        print_json(info)
        return 0
    mode = os.environ.get("APTCKPT_NATIVE", "auto")
    why = "APTCKPT_NATIVE=disable" if mode == "disable" else "the compiled core did not import"
    core = "native (C++)" if aptckpt.NATIVE else f"pure Python ({why})"
    threads_from = "APTCKPT_THREADS" if os.environ.get("APTCKPT_THREADS") else "usable CPUs"
    rows = [
        ("aptckpt", info["version"]),
        ("torch", info["torch_version"]),
        ("python", info["python_version"]),
        ("core", core),
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
