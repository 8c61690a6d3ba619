"""``aptckpt convert``: rewrite a checkpoint with another backend, import another library's
checkpoint, or export one to another format -- a thin layer over :func:`aptckpt.convert`.

``--to checkpoint`` (default) writes an aptckpt checkpoint; ``--to torch-file``,
``--to safetensors`` and ``--to dcp`` export (see :mod:`aptckpt._exports`), from an aptckpt
checkpoint or straight from a foreign one. Files are published atomically, and without
``--overwrite`` an existing ``DST`` is never replaced.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import aptckpt
from aptckpt import _imports
from aptckpt._exports import parse_size
from aptckpt.cli._common import UsageError, fmt_size, options_for, with_progress
from aptckpt.storage import is_url


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--option {text!r} is not KEY=VALUE (e.g. --option codec=none)")
    try:
        return key, int(value)
    except ValueError:
        return key, value


def cmd_convert(args: argparse.Namespace) -> int:
    options = dict(_option(o) for o in args.option)
    if args.level is not None:
        options["level"] = args.level
    foreign = None if is_url(args.src) else _imports.detect(args.src)
    if foreign is None:  # a missing or damaged source is reported before anything is made
        aptckpt.inspect(args.src, storage_options=options_for(args, args.src))
    if args.to == "checkpoint":
        if args.select or args.max_shard_size:
            raise UsageError("--select and --max-shard-size apply to exports (--to FORMAT)")
        info = with_progress(
            lambda progress: aptckpt.convert(
                args.src,
                args.dst,
                backend=args.backend or "zstd",
                overwrite=args.overwrite,
                storage_options=args.storage_options,
                progress=progress,
                **options,
            ),
            "convert",
        )
        ratio = f" ({info.stored_bytes / info.raw_bytes:.1%})" if info.raw_bytes else ""
        print(
            f"{'imported' if foreign else 'converted'} {args.src} -> {info.path} "
            f"({info.backend}): {info.tensors} tensors, "
            f"{fmt_size(info.raw_bytes)} raw, {fmt_size(info.stored_bytes)} stored{ratio}, "
            f"{info.seconds:.2f}s"
        )
        return 0
    if args.backend or options:
        raise UsageError(
            f"--backend, --level and --option apply to checkpoints, not --to {args.to}"
        )
    if is_url(args.dst):
        raise UsageError(f"--to {args.to} writes a local path; DST must be a local path")
    if args.max_shard_size is not None:
        if args.to != "safetensors":
            raise UsageError(f"--max-shard-size applies to --to safetensors, not --to {args.to}")
        try:
            parse_size(args.max_shard_size)
        except ValueError as err:
            raise UsageError(f"--max-shard-size: {err}") from None
    try:
        exported = _export(args)
    except KeyError as err:  # --select naming what the state does not hold
        if args.select is None:
            raise
        raise UsageError(f"--select: {err.args[0] if err.args else err}") from None
    for note in exported.notes:
        print(f"note: {note}", file=sys.stderr)
    files = f", {len(exported.files)} files" if len(exported.files) > 1 else ""
    print(
        f"wrote {exported.path} ({args.to}, {exported.tensors} tensors, "
        f"{fmt_size(exported.bytes)}{files}) from {args.src}"
    )
    return 0


def _export(args: argparse.Namespace) -> Any:
    return with_progress(
        lambda progress: aptckpt.convert(
            args.src,
            args.dst,
            to=args.to,
            overwrite=args.overwrite,
            storage_options=options_for(args, args.src),
            select=args.select,
            max_shard_size=args.max_shard_size,
            progress=progress,
        ),
        "export",
    )
