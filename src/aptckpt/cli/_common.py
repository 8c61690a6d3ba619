"""Helpers shared by the subcommands: text and JSON output, paths, progress, state keys.

Everything here writes to stdout only through :func:`print_json` (callers print
tables themselves), and raises :class:`UsageError` for command-line problems,
which :func:`aptckpt.cli.main` reports as one line with exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from aptckpt import _progress, objectstore, tree
from aptckpt.storage.local._atomic import is_checkpoint, is_temporary

T = TypeVar("T")


class UsageError(Exception):
    """A problem with the command line itself (exit 2); the message names the fix."""


# ------------------------------------------------------------------ storage


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` pairs as fsspec options. A value is read as JSON
    where it is JSON (``anon=true``, ``max_concurrency=8``), else kept as a string; a
    dotted key nests (``client_kwargs.region_name=eu-west-1``). None without pairs."""
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            # The value is never echoed: a forgotten "KEY=" would print a secret.
            raise UsageError(
                "--storage-option takes KEY=VALUE; one was given without a key and '=' "
                "(its value is not shown: it may be a secret)"
            )
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.split(".")
        here = options
        for name in parents:
            nested = here.setdefault(name, {})
            if not isinstance(nested, dict):
                raise UsageError(f"--storage-option {key}: {name} was given a value already")
            here = nested
        here[leaf] = value
    return options


def options_for(args: Any, path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The storage options of the command line for ``path`` (None for a local path)."""
    from aptckpt.storage import is_url

    return args.storage_options if is_url(path) else None


# ------------------------------------------------------------------ text


def fmt_size(n: float) -> str:
    """Decimal byte size: ``"512 B"``, ``"1.5 MB"``."""
    for suffix in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or suffix == "TB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1000
    raise AssertionError("unreachable")


def fmt_num(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def fmt_value(v: Any, limit: int = 60) -> str:
    """A plain value for a table cell, cut to ``limit`` characters."""
    text = f"{v:.6g}" if isinstance(v, float) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """Columns two spaces apart; the columns numbered in ``right`` are right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = []
    for row in (header, *rows):
        cells = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def render_pairs(pairs: Sequence[tuple[str, str]]) -> str:
    """``key  value`` lines with the values aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in pairs)


def os_message(err: OSError) -> str:
    """An ``OSError`` as one line naming the file, without errno noise."""
    what = err.strerror or str(err)
    return f"{what}: '{err.filename}'" if err.filename else what


# ------------------------------------------------------------------ json


def jsonable(v: Any) -> Any:
    """Strict JSON: non-finite floats become strings, other plain values their repr."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, Mapping):
        return {k if isinstance(k, (str, int)) else repr(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return str(v) if isinstance(v, os.PathLike) else repr(v)


def print_json(v: Any) -> None:
    print(json.dumps(jsonable(v), indent=2, allow_nan=False))


# ------------------------------------------------------------------ paths


def _natural(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when beneath it, else as given."""
    return str(path.relative_to(root)) if path != root and root in path.parents else str(path)


def find_checkpoints(root: Path, unreadable: list[OSError] | None = None) -> list[Path]:
    """Committed checkpoints at or beneath ``root``; temp dirs and stores are skipped.

    Directories that cannot be listed (permission denied) are appended to ``unreadable``
    when it is given: a checkpoint may hide in each, so a caller that promises to check
    everything must say so rather than skip them.
    """
    if is_checkpoint(root):
        return [root]
    found = []
    onerror = unreadable.append if unreadable is not None else None
    for directory, subdirs, _ in os.walk(root, onerror=onerror):
        here = Path(directory)
        keep = []
        for name in subdirs:
            if is_temporary(name) or objectstore.is_store(here / name):
                continue
            keep.append(name)
            if is_checkpoint(here / name):
                found.append(here / name)
        subdirs[:] = keep
    return sorted(found, key=_natural)


# ------------------------------------------------------------------ progress


def busy(fn: Callable[[], T], desc: str) -> T:
    """Run ``fn`` with a line on stderr showing the time it has run (terminals only), for
    work that reports no progress of its own (an export through torch or safetensors).
    Work that does reports through :func:`aptckpt._progress.bar` instead.

    ``fn`` runs in the calling thread and a helper thread refreshes the line -- not the
    reverse: Ctrl-C interrupts the main thread, so there it stops the work and runs its
    cleanup (temporary files). Work left running in a daemon thread would go on after
    ``main`` returned, leave its temporary file, and abort the interpreter at exit
    ("terminate called without an active exception") when caught inside torch's C++.
    """
    with _progress.bar(None, desc, unit="") as line:
        if line.disable:
            return fn()
        line.bar_format = "{desc}: {elapsed}"
        stop = threading.Event()

        def draw() -> None:
            while not stop.wait(0.2):
                line.refresh()

        drawer = threading.Thread(target=draw, name="aptckpt-progress", daemon=True)
        drawer.start()
        try:
            return fn()
        finally:
            stop.set()
            drawer.join()


def with_progress(
    fn: Callable[[_progress.ProgressCallback | None], T],
    desc: str,
    *,
    unit: str = "B",
    enabled: bool | None = None,
) -> T:
    """Run ``fn(progress)`` under a bar of the work it reports (bytes, or ``unit``) --
    on terminals only (or as ``enabled`` says): elsewhere ``progress`` is None and
    nothing is drawn."""
    with _progress.bar(None, desc, unit=unit, enabled=enabled) as line:
        return fn(None if line.disable else _progress.reporter(line))


# ------------------------------------------------------------------ state keys


def key_path_items(obj: Any, path: str = "state") -> Iterator[tuple[str, Any]]:
    """(key path, leaf) pairs, spelled as :func:`aptckpt.inspect` and error messages spell
    them: ``state['model']['w']``, ``state['layers'][0]``, ``state[0]`` (an int key).

    Non-empty dicts, lists and tuples are walked; everything else (a tensor, a plain
    value, an empty container, a ``torch.Size``) is a leaf.
    """
    if isinstance(obj, Mapping) and obj:
        for k, v in obj.items():
            yield from key_path_items(v, tree.child_path(path, k))
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size) and obj:
        for i, v in enumerate(obj):
            yield from key_path_items(v, f"{path}[{i}]")
    else:
        yield path, obj


def dtype_str(t: torch.Tensor) -> str:
    """``"float32"``, not ``"torch.float32"``."""
    return str(t.dtype).removeprefix("torch.")
