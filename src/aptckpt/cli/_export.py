"""``aptckpt convert``: rewrite a checkpoint with another backend, or export it to one file.

``--to checkpoint`` goes through :func:`aptckpt.convert`. ``--to torch-file`` and
``--to safetensors`` load the state and write a single file atomically (sibling temp
file, fsync, link or rename, fsync of the directory), so a crash never leaves a
half-written ``DST``; without ``--overwrite`` an existing ``DST`` is never replaced,
even one that appears while the export runs.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import aptckpt
from aptckpt import _imports, tree
from aptckpt.backends.torch import write_torch_file
from aptckpt.cli._common import (
    UsageError,
    busy,
    dotted_items,
    dtype_str,
    fmt_size,
    options_for,
    with_progress,
)
from aptckpt.storage import is_url
from aptckpt.storage.local._atomic import fsync_dir
from aptckpt.storage.local._temps import temp_sibling


def _exists(dst: Path) -> UsageError:
    return UsageError(f"'{dst}' exists; pass --overwrite to replace it")


def _write_file(dst: Path, write: Callable[[Path], None], *, overwrite: bool) -> int:
    """Write ``dst`` atomically with ``write(temp_path)``; returns its size in bytes."""
    if dst.is_dir():
        raise UsageError(f"'{dst}' is a directory; --to writes a single file, name one")
    try:
        mode = os.lstat(dst).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        # --overwrite renames over the name: a device (/dev/null) or FIFO would be replaced
        # by a regular file, not written to.
        raise UsageError(
            f"'{dst}' is not a regular file (a device, FIFO or socket); --to writes a "
            "regular file, name one"
        )
    if mode is not None and not overwrite:
        raise _exists(dst)
    # A hidden temp entry protected like a save's (a lock its owner holds): cleanup of the
    # folder by another process never removes it while this export runs.
    with temp_sibling(dst) as tmp:
        _write_temp(tmp, dst, write, overwrite=overwrite)
    fsync_dir(dst.parent)
    return dst.stat().st_size


def _write_temp(tmp: Path, dst: Path, write: Callable[[Path], None], *, overwrite: bool) -> None:
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = os.fstat(fd).st_mode  # the umask's, which writers that make 0600 temp files lose
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:
                os.link(tmp, dst)  # fails if dst appeared meanwhile, unlike a rename
            except FileExistsError:
                raise _exists(dst) from None
            except OSError:  # no hard links on this file system: check, then rename
                if dst.exists():
                    raise _exists(dst) from None
                os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _export_torch(state: Any, dst: Path, *, overwrite: bool) -> tuple[int, list[str]]:
    flat = tree.flatten(state)
    empty = tree.find_plain(flat.skeleton, lambda v: v == b"")
    if empty:
        raise UsageError(
            f"cannot export to a torch file: {empty[0]} is empty bytes (b''), which "
            "torch.load(weights_only=True) refuses; convert to an aptckpt checkpoint instead"
        )

    def write(path: Path) -> None:
        # As the torch backend writes its file: every tensor on a storage of its own, so
        # the file loads, and Ctrl-C arrives as KeyboardInterrupt, not torch's RuntimeError.
        with open(path, "wb") as f:
            write_torch_file(flat, f)

    return _write_file(dst, write, overwrite=overwrite), []


def _export_safetensors(state: Any, dst: Path, *, overwrite: bool) -> tuple[int, list[str]]:
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise UsageError(
            f"--to safetensors needs the safetensors package ({err}); pip install safetensors"
        ) from err
    source = state.get("model") if isinstance(state, Mapping) else None
    notes: list[str] = []
    if isinstance(source, Mapping):
        notes.append("exporting the 'model' entry of the state")
        items = list(dotted_items(source))
    elif isinstance(state, Mapping):
        items = [(k, v) for k, v in state.items() if isinstance(k, str)]
    else:
        raise UsageError("--to safetensors needs a state that is a dict of tensors")
    tensors: dict[str, torch.Tensor] = {}
    owners: dict[tuple[int, int], str] = {}
    skipped = 0
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            skipped += 1
            continue
        if key in tensors:
            raise UsageError(
                f"two tensors flatten to the name '{key}'; safetensors needs unique names"
            )
        if value.layout != torch.strided or value.is_quantized:
            kind = "quantized" if value.is_quantized else f"sparse ({value.layout})"
            raise UsageError(
                f"'{key}' is a {kind} tensor, which safetensors cannot store; "
                "--to torch-file keeps it (or keep the aptckpt checkpoint)"
            )
        t = value.detach()
        storage = t.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        if t.numel() and ident in owners:  # tied weights: safetensors refuses shared storage
            notes.append(f"'{key}' shares storage with '{owners[ident]}' (tied); wrote a copy")
            t = t.clone(memory_format=torch.contiguous_format)
        elif t.numel():
            owners[ident] = key
        tensors[key] = t.contiguous()
    if not tensors:
        raise UsageError(
            "the state has no tensors to export (no 'model' dict, no top-level tensors)"
        )
    if skipped:
        notes.append(f"skipped {skipped} non-tensor value(s); safetensors stores tensors only")

    def write(path: Path) -> None:
        try:
            save_file(tensors, str(path), metadata={"format": "pt"})
        except (ValueError, TypeError, KeyError, RuntimeError) as err:
            bad = [k for k, t in tensors.items() if err.args and t.dtype == err.args[0]]
            what = f"dtype {dtype_str(tensors[bad[0]])} of '{bad[0]}'" if bad else f"({err})"
            raise UsageError(
                f"safetensors cannot store the {what}; --to torch-file keeps every dtype"
            ) from err

    return _write_file(dst, write, overwrite=overwrite), notes


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
    if foreign is not None:
        raise UsageError(
            f"{args.src} is a {foreign} checkpoint: import it first "
            f"(aptckpt convert {args.src} DIR), then export DIR with --to {args.to}"
        )
    if args.backend or options:
        raise UsageError(
            f"--backend, --level and --option apply to checkpoints, not --to {args.to}"
        )
    if is_url(args.dst):
        raise UsageError(f"--to {args.to} writes a local file; DST must be a local path")
    dst = Path(args.dst)
    export = _export_torch if args.to == "torch-file" else _export_safetensors

    def run() -> tuple[int, list[str]]:
        state = aptckpt.load(
            args.src, map_location="cpu", storage_options=options_for(args, args.src)
        )
        return export(state, dst, overwrite=args.overwrite)

    size, notes = busy(run, "export")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {dst} ({args.to}, {fmt_size(size)}) from {args.src}")
    return 0
