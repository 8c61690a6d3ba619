"""``aptckpt verify``: check every digest of one checkpoint or of all beneath a directory.

One line per checkpoint (``OK``, ``DAMAGED`` or ``FAILED``), then a summary; exit
status 1 when any checkpoint failed. A failure is reported and verification goes on
with the next checkpoint, so one damaged directory does not hide the others.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import aptckpt
from aptckpt._progress import Progress
from aptckpt.cli._common import (
    UsageError,
    display_path,
    find_checkpoints,
    fmt_size,
    jsonable,
    os_message,
    print_json,
)
from aptckpt.errors import AptckptError, IntegrityError


def _problem(err: BaseException) -> dict[str, Any]:
    if isinstance(err, IntegrityError):
        problems = list(err.problems)
        return {"error": str(err), "problems": problems, "file": err.file, "tensor": err.tensor}
    if isinstance(err, OSError) and not isinstance(err, AptckptError):
        return {"error": os_message(err), "problems": [os_message(err)]}
    return {"error": str(err), "problems": [str(err)]}


def cmd_verify(args: argparse.Namespace) -> int:
    root = Path(args.path)
    if not root.is_dir():
        aptckpt.verify(root)  # raises the library's own "no checkpoint" message
    found = find_checkpoints(root)
    if not found:
        raise UsageError(
            f"no checkpoints at or beneath '{root}' (no directory there holds a "
            "manifest.msgpack); pass a checkpoint or a run directory"
        )
    width = max(len(display_path(p, root)) for p in found)
    results: list[dict[str, Any]] = []
    with Progress(len(found), "verify", enabled=None if len(found) > 1 else False) as bar:
        for path in found:
            name = display_path(path, root)
            try:
                report = aptckpt.verify(path)
            except (AptckptError, OSError) as err:
                result = {"path": os.path.abspath(path), "ok": False, **_problem(err)}
                line = f"{'DAMAGED' if isinstance(err, IntegrityError) else 'FAILED':<7}  {name}"
                line += "".join(f"\n    {p}" for p in result["problems"])
            else:
                result = {"ok": True, **jsonable(report)}
                rate = report.raw_bytes / report.seconds if report.seconds > 0 else 0.0
                line = (
                    f"OK       {name.ljust(width)}  {report.backend:<5}  {report.tensors:>4} "
                    f"tensors  {fmt_size(report.raw_bytes):>9} raw  "
                    f"{fmt_size(report.stored_bytes):>9} stored  {report.seconds:6.2f}s  "
                    f"{fmt_size(rate):>9}/s"
                )
            results.append(result)
            if not args.json:
                if bar.enabled:
                    bar.stream.write("\r\x1b[K")  # the next stdout line overwrites the bar
                print(line, flush=True)
            bar.update(1)
    bad = sum(not r["ok"] for r in results)
    if args.json:
        print_json(results)
    elif len(results) > 1 or bad:
        print(f"{len(results)} checkpoint(s): {len(results) - bad} OK, {bad} failed")
    return 1 if bad else 0
