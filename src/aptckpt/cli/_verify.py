"""``aptckpt verify``: check every digest of one checkpoint or of all beneath a directory.

One line per checkpoint (``OK``, ``DAMAGED`` or ``FAILED``), then a summary; exit
status 1 when any checkpoint failed. A failure is reported and verification goes on
with the next checkpoint, so one damaged directory does not hide the others.

A directory that cannot be listed (permission denied) is reported ``FAILED``: a
checkpoint may be inside, and "all OK" must mean every checkpoint was checked.

A directory that holds the data files of a built-in backend (``shard-NNNNN.bin``,
``state.pt``) but no manifest is reported ``DAMAGED`` too: a save never leaves one
under a visible name (it writes into a hidden temporary directory and renames it
once the manifest is in), so its manifest was lost.

A directory beneath the one given that this user may not list or search is
reported ``FAILED`` as well: the checkpoints in it were not verified, and
``verify`` must not say otherwise by exiting 0.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import aptckpt
from aptckpt import _progress, objectstore
from aptckpt.cli._common import (
    UsageError,
    display_path,
    find_checkpoints,
    fmt_size,
    jsonable,
    os_message,
    print_json,
)
from aptckpt.errors import (
    AptckptError,
    CheckpointDeletedError,
    CheckpointNotFoundError,
    IntegrityError,
)
from aptckpt.manifest import MANIFEST_NAME
from aptckpt.storage import is_url, resolve
from aptckpt.storage.local._atomic import is_checkpoint, is_temporary


def _problem(err: BaseException) -> dict[str, Any]:
    if isinstance(err, IntegrityError):
        problems = list(err.problems)
        return {"error": str(err), "problems": problems, "file": err.file, "tensor": err.tensor}
    if isinstance(err, OSError) and not isinstance(err, AptckptError):
        return {"error": os_message(err), "problems": [os_message(err)]}
    return {"error": str(err), "problems": [str(err)]}


#: Data files of the built-in backends; a directory holding one must hold a manifest.
_DATA_FILE = re.compile(r"shard-[0-9]{5}\.bin|state\.pt")


def _orphans(root: Path, found: list[Path]) -> list[Path]:
    """Directories at or beneath ``root`` that hold data files but no manifest."""
    skip = set(found)
    orphans = []
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        subdirs[:] = [
            d
            for d in subdirs
            if not (d.startswith(".") or here / d in skip or objectstore.is_store(here / d))
        ]
        if (
            here not in skip
            and MANIFEST_NAME not in files  # one committed since the listing is no orphan
            and any(_DATA_FILE.fullmatch(f) for f in files)
        ):
            orphans.append(here)
    return orphans


def _orphan_problem(path: Path) -> str:
    files = sorted(f.name for f in path.iterdir() if _DATA_FILE.fullmatch(f.name))
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    return (
        f"'{path}' holds data files ({shown}) but no {MANIFEST_NAME}: its manifest was "
        "deleted (a save that did not commit leaves only a hidden temporary directory), and "
        "the data cannot be read without it -- restore the checkpoint from a copy"
    )


def _unreadable(root: Path) -> dict[Path, str]:
    """Directories at or beneath ``root`` that cannot be listed or searched, with why:
    checkpoints in them are not found, so they cannot be said to be verified. Walked
    as the checkpoints are found (links, hidden temporaries and stores not entered)."""
    problems: dict[Path, str] = {}
    pending = [root]
    while pending:
        here = pending.pop()
        try:
            entries = list(os.scandir(here))
            os.stat(here / MANIFEST_NAME)  # searching, which listing does not need
        except FileNotFoundError:
            pass
        except PermissionError as err:
            problems[here] = (
                f"cannot read directory '{here}': {err.strerror}; the checkpoints in it were "
                "not verified (run verify as a user allowed to read it, or fix its permissions)"
            )
            continue
        except OSError:
            continue
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) or is_temporary(entry.name):
                continue
            if not objectstore.is_store(entry.path):
                pending.append(Path(entry.path))
    return problems


def _check(
    path: Path,
    name: str,
    width: int,
    *,
    orphan: bool,
    progress: _progress.ProgressCallback | None = None,
) -> tuple[dict[str, Any], str]:
    """Verify one checkpoint: its JSON result and its line of text."""
    result: dict[str, Any] = {"path": os.path.abspath(path), "ok": False}
    if orphan and not is_checkpoint(path):  # (committed since it was found: verified below)
        if not path.exists():
            return _gone(path, name)
        problem = _orphan_problem(path)
        result.update(error=problem, problems=[problem])
        return result, f"DAMAGED  {name}\n    {problem}"
    try:
        report = aptckpt.verify(path, progress=progress)
    except CheckpointNotFoundError as err:
        if isinstance(err, CheckpointDeletedError) or not os.path.lexists(path):
            return _gone(path, name)  # a live run's retention deleted it meanwhile
        result.update(_problem(err))
        return result, f"FAILED   {name}" + "".join(f"\n    {p}" for p in result["problems"])
    except (AptckptError, OSError) as err:
        result.update(_problem(err))
        line = f"{'DAMAGED' if isinstance(err, IntegrityError) else 'FAILED':<7}  {name}"
        return result, line + "".join(f"\n    {p}" for p in result["problems"])
    rate = report.raw_bytes / report.seconds if report.seconds > 0 else 0.0
    line = (
        f"OK       {name.ljust(width)}  {report.backend:<5}  {report.tensors:>4} "
        f"tensors  {fmt_size(report.raw_bytes):>9} raw  "
        f"{fmt_size(report.stored_bytes):>9} stored  {report.seconds:6.2f}s  "
        f"{fmt_size(rate):>9}/s"
    )
    return {"ok": True, **jsonable(report)}, line


class _Totals:
    """One bar over every checkpoint verified: bytes read of the bytes they hold in all
    (from their manifests; a checkpoint that fails early counts as done)."""

    def __init__(self, bar: Any, paths: list[Any], options: Any = None) -> None:
        self.bar = bar
        self.sizes: dict[Any, int] = {}
        self.options = options
        if bar.disable:
            return
        for path in paths:
            try:
                self.sizes[path] = aptckpt.inspect(path, storage_options=options).stored_bytes
            except (AptckptError, OSError):
                self.sizes[path] = 0  # reported when verified
        bar.total = sum(self.sizes.values())
        self.counted: dict[Any, int] = {}

    def callback(self, path: Any) -> _progress.ProgressCallback | None:
        if self.bar.disable:
            return None

        def advance(n: int, _total: int) -> None:
            self.counted[path] = self.counted.get(path, 0) + n
            self.bar.update(n)

        return advance

    def done(self, path: Any) -> None:
        if not self.bar.disable:
            # what was not read (damage stopped it, a checkpoint deleted meanwhile)
            rest = self.sizes.get(path, 0) - self.counted.get(path, 0)
            if rest > 0:
                self.bar.update(rest)


def _gone(path: Path, name: str) -> tuple[dict[str, Any], str]:
    """A checkpoint deleted since the run was listed (a live run's retention): nothing
    is wrong with it, and there is nothing left to verify."""
    result = {"path": os.path.abspath(path), "ok": True, "deleted": True}
    return result, f"GONE     {name}  (deleted while verifying: nothing to check)"


def _verify_remote(args: argparse.Namespace) -> int:
    """``verify`` of a URL: the checkpoint there, or every checkpoint beneath it."""
    storage, root = resolve(args.path, args.storage_options)
    if storage.is_checkpoint(root):
        paths = [root]
    else:
        paths = sorted(
            storage.join(root, rel.rpartition("/")[0])
            for rel, entry in storage.walk(root)
            if rel.rpartition("/")[2] == MANIFEST_NAME and "/" in rel
        )
        if not paths:
            raise UsageError(
                f"no checkpoints at or beneath '{storage.display(root)}' (no prefix there holds "
                "a manifest.msgpack); pass a checkpoint or a run"
            )
    results: list[dict[str, Any]] = []
    urls = [storage.display(path) for path in paths]
    with _progress.bar(None, "verify", enabled=False if args.json else None) as bar:
        totals = _Totals(bar, urls, args.storage_options)
        for url in urls:
            result: dict[str, Any] = {"path": url, "ok": False}
            try:
                report = aptckpt.verify(
                    url, storage_options=args.storage_options, progress=totals.callback(url)
                )
            except (AptckptError, OSError) as err:
                problems = list(getattr(err, "problems", ())) or [str(err)]
                result.update(error=str(err), problems=problems)
                line = f"FAILED   {url}\n" + "\n".join(f"    {p}" for p in problems)
            else:
                result.update(ok=True, tensors=report.tensors, stored_bytes=report.stored_bytes)
                size = fmt_size(report.stored_bytes)
                line = f"OK       {url}  ({report.tensors} tensors, {size})"
            totals.done(url)
            results.append(result)
            if not args.json:
                bar.clear()
                print(line, flush=True)
                bar.refresh()
    bad = sum(not r["ok"] for r in results)
    if args.json:
        print_json(results)
    elif len(results) > 1 or bad:
        print(f"{len(results)} checkpoint(s): {len(results) - bad} OK, {bad} failed")
    return 1 if bad else 0


def cmd_verify(args: argparse.Namespace) -> int:
    if is_url(args.path):
        return _verify_remote(args)
    root = Path(args.path)
    if not root.is_dir():
        aptckpt.verify(root)  # raises the library's own "no checkpoint" message
    found = find_checkpoints(root)
    unreadable = {} if found == [root] else _unreadable(root)
    orphans = [p for p in _orphans(root, found) if p not in unreadable]
    if not found and not orphans and not unreadable:
        raise UsageError(
            f"no checkpoints at or beneath '{root}' (no directory there holds a "
            "manifest.msgpack); pass a checkpoint or a run directory"
        )
    paths = [*found, *orphans, *unreadable]
    width = max(len(display_path(p, root)) for p in paths)
    results: list[dict[str, Any]] = []
    with _progress.bar(None, "verify", enabled=False if args.json else None) as bar:
        totals = _Totals(bar, paths)
        for path in paths:
            if path in unreadable:
                problem = unreadable[path]
                result = {"path": os.path.abspath(path), "ok": False}
                result.update(error=problem, problems=[problem])
                line = f"FAILED   {display_path(path, root)}\n    {problem}"
            else:
                name = display_path(path, root)
                result, line = _check(
                    path, name, width, orphan=path in orphans, progress=totals.callback(path)
                )
            totals.done(path)
            results.append(result)
            if not args.json:
                bar.clear()  # the stdout line goes where the bar was; it is drawn again below
                print(line, flush=True)
                bar.refresh()
    bad = sum(not r["ok"] for r in results)
    if args.json:
        print_json(results)
    elif len(results) > 1 or bad:
        print(f"{len(results)} checkpoint(s): {len(results) - bad} OK, {bad} failed")
    return 1 if bad else 0
