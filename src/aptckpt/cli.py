"""The ``aptckpt`` command line: a thin layer over the public API.

``aptckpt info|ls|inspect|verify|diff|convert|gc`` (also ``python -m aptckpt``).
Tables go to stdout, errors and progress bars to stderr; ``--json`` gives
machine-readable output for info, ls, inspect, verify, diff and gc.

Exit codes: 0 success; 1 damage (a checkpoint failed verification, or
:class:`~aptckpt.errors.IntegrityError` while reading one); 2 usage and every
other error, reported as one line naming the problem and the fix -- never a
traceback for an :class:`~aptckpt.errors.AptckptError` or an ``OSError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

import aptckpt
from aptckpt import _accel, _config, objectstore, tree
from aptckpt._atomic import is_checkpoint, is_temporary
from aptckpt._progress import Progress
from aptckpt.errors import (
    AptckptError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
)

__all__ = ["main"]

T = TypeVar("T")

#: Elements per slice when diffing float tensors in float64, bounding extra memory.
_DIFF_SLICE = 1 << 22


class UsageError(Exception):
    """A problem with the command line itself (exit 2); the message names the fix."""


# ------------------------------------------------------------------ formatting


def _size(n: float) -> str:
    for suffix in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or suffix == "TB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1000
    raise AssertionError("unreachable")


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def _value(v: Any, limit: int = 60) -> str:
    text = f"{v:.6g}" if isinstance(v, float) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = []
    for row in (header, *rows):
        cells = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _pairs(pairs: Sequence[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in pairs)


def _jsonable(v: Any) -> Any:
    """Strict JSON: non-finite floats become strings, other plain values their repr."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, Mapping):
        return {k if isinstance(k, (str, int)) else repr(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v) if isinstance(v, os.PathLike) else repr(v)


def _print_json(v: Any) -> None:
    print(json.dumps(_jsonable(v), indent=2, allow_nan=False))


def _natural(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def _display(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root and root in path.parents else str(path)


def _busy(fn: Callable[[], T], desc: str, total: int | None) -> T:
    """Run ``fn`` under a progress bar (terminals only; the API reports no progress
    of its own, so the bar shows elapsed time until ``fn`` returns)."""
    with Progress(total, desc, unit="B") as bar:
        if not bar.enabled:
            return fn()
        out: list[T] = []
        err: list[BaseException] = []

        def work() -> None:
            try:
                out.append(fn())
            except BaseException as e:  # re-raised in the calling thread
                err.append(e)

        worker = threading.Thread(target=work, name="aptckpt-cli", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
            bar.update(0)
        if err:
            raise err[0]
        bar.update(total or 0)
        return out[0]


# ------------------------------------------------------------------ commands


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
        _print_json(info)
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
    print(_pairs(rows))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    info = aptckpt.inspect(args.checkpoint)
    if args.json:
        _print_json(info)
        return 0
    ratio = f" ({info.stored_bytes / info.raw_bytes:.1%} of raw)" if info.raw_bytes else ""
    rows = [
        ("path", info.path),
        ("backend", info.backend),
        ("options", " ".join(f"{k}={v}" for k, v in info.options.items()) or "-"),
        ("format version", str(info.format_version)),
        ("written by", f"aptckpt {info.library_version}, torch {info.torch_version}"),
        ("created", info.created_at),
        ("tensors", str(len(info.tensors))),
        ("raw bytes", _size(info.raw_bytes)),
        ("stored bytes", _size(info.stored_bytes) + ratio),
    ]
    if info.store_bytes or info.backend == "delta":
        rows.append(("store bytes", f"{_size(info.store_bytes)} (objects in the run's store)"))
    rows.append(("files", f"{len(info.files)} ({_size(sum(f.size for f in info.files))})"))
    if isinstance(info.metadata, Mapping):
        rows += [("metadata", "" if info.metadata else "{}")]
        rows += [(f"  {k}", _value(v)) for k, v in info.metadata.items()]
    elif info.metadata is not None:
        rows.append(("metadata", _value(info.metadata)))
    print(_pairs(rows))
    if info.tensors:
        print()
        table = [
            (
                t.key,
                t.dtype,
                str(tuple(t.shape)),
                _size(t.nbytes),
                "-" if t.stored_bytes is None else _size(t.stored_bytes),
                ",".join(t.codecs),
            )
            for t in info.tensors
        ]
        print(_table(("key", "dtype", "shape", "bytes", "stored", "codecs"), table, (3, 4)))
    return 0


def _find_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints at or beneath ``root``; temp dirs and stores are skipped."""
    if is_checkpoint(root):
        return [root]
    found = []
    for directory, subdirs, _ in os.walk(root):
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


def _problem(err: BaseException) -> dict[str, Any]:
    if isinstance(err, IntegrityError):
        problems = list(err.problems)
        return {"error": str(err), "problems": problems, "file": err.file, "tensor": err.tensor}
    if isinstance(err, OSError) and not isinstance(err, AptckptError):
        return {"error": _os_message(err), "problems": [_os_message(err)]}
    return {"error": str(err), "problems": [str(err)]}


def cmd_verify(args: argparse.Namespace) -> int:
    root = Path(args.path)
    if not root.is_dir():
        aptckpt.verify(root)  # raises the library's own "no checkpoint" message
    found = _find_checkpoints(root)
    if not found:
        raise UsageError(
            f"no checkpoints at or beneath '{root}' (no directory there holds a "
            "manifest.msgpack); pass a checkpoint or a run directory"
        )
    width = max(len(_display(p, root)) for p in found)
    results: list[dict[str, Any]] = []
    with Progress(len(found), "verify", enabled=None if len(found) > 1 else False) as bar:
        for path in found:
            name = _display(path, root)
            try:
                report = aptckpt.verify(path)
            except (AptckptError, OSError) as err:
                result = {"path": os.path.abspath(path), "ok": False, **_problem(err)}
                line = f"{'DAMAGED' if isinstance(err, IntegrityError) else 'FAILED':<7}  {name}"
                line += "".join(f"\n    {p}" for p in result["problems"])
            else:
                result = {"ok": True, **_jsonable(report)}
                rate = report.raw_bytes / report.seconds if report.seconds > 0 else 0.0
                line = (
                    f"OK       {name.ljust(width)}  {report.backend:<5}  {report.tensors:>4} "
                    f"tensors  {_size(report.raw_bytes):>9} raw  "
                    f"{_size(report.stored_bytes):>9} stored  {report.seconds:6.2f}s  "
                    f"{_size(rate):>9}/s"
                )
            results.append(result)
            if not args.json:
                if bar.enabled:
                    bar.stream.write("\r\x1b[K")  # the next stdout line overwrites the bar
                print(line, flush=True)
            bar.update(1)
    bad = sum(not r["ok"] for r in results)
    if args.json:
        _print_json(results)
    elif len(results) > 1 or bad:
        print(f"{len(results)} checkpoint(s): {len(results) - bad} OK, {bad} failed")
    return 1 if bad else 0


# ------------------------------------------------------------------ diff


def _flatten(
    obj: Any, prefix: str = "", *, dotted_index: bool = False
) -> Iterator[tuple[str, Any]]:
    """(key, leaf) pairs: dict keys joined with dots, list indices and non-str keys in []."""
    if prefix == "" and isinstance(obj, (Mapping, list, tuple)) and not obj:
        return  # an empty state has no keys
    if isinstance(obj, Mapping) and obj:
        for k, v in obj.items():
            sub = (f"{prefix}.{k}" if prefix else k) if isinstance(k, str) else f"{prefix}[{k!r}]"
            yield from _flatten(v, sub, dotted_index=dotted_index)
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size) and obj:
        for i, v in enumerate(obj):
            sub = (f"{prefix}.{i}" if prefix else str(i)) if dotted_index else f"{prefix}[{i}]"
            yield from _flatten(v, sub, dotted_index=dotted_index)
    else:
        yield prefix, obj


def _flat_dict(state: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in _flatten(state):
        name, n = key, 1
        while name in out:  # {"a.b": x, "a": {"b": y}} flatten alike; keep both
            n += 1
            name = f"{key} ({n})"
        out[name] = value
    return out


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _compare_tensors(key: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "status": "changed", "dtype": _dtype(a)}
    row.update(shape=list(a.shape), numel=a.numel())
    if a.dtype != b.dtype:
        return {**row, "detail": f"dtype {_dtype(a)} -> {_dtype(b)}"}
    if a.shape != b.shape:
        return {**row, "detail": f"shape {tuple(a.shape)} -> {tuple(b.shape)}"}
    a8, b8 = _bytes_of(a), _bytes_of(b)  # bitwise first: exact, and covers every dtype
    if torch.equal(a8, b8):
        return {**row, "status": "same", "differing": 0, "detail": "same"}
    n = a.numel()
    row.update(differing=int((a8 != b8).view(n, -1).any(dim=1).sum()), detail="changed")
    if a.is_floating_point() or a.is_complex():
        row.update(_float_change(a, b))
    return row


def _float_change(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max abs difference and ||b - a|| / ||a||, in float64 slices; equal NaNs count as equal."""
    wide = torch.complex128 if a.is_complex() else torch.float64
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    max_abs = diff_sq = ref_sq = 0.0
    for i in range(0, fa.numel(), _DIFF_SLICE):
        x, y = fa[i : i + _DIFF_SLICE].to(wide), fb[i : i + _DIFF_SLICE].to(wide)
        equal = (x == y) | (torch.isnan(x) & torch.isnan(y))
        d = torch.where(equal, torch.zeros((), dtype=wide), y - x).abs()
        m = float(d.max())  # NaN if any difference is NaN, and then it stays NaN
        if math.isnan(m) or m > max_abs:
            max_abs = m
        diff_sq += float((d * d).sum())
        ref_sq += float((x.abs() ** 2).sum())
    if ref_sq > 0:
        rel = math.sqrt(diff_sq) / math.sqrt(ref_sq)
    else:
        rel = 0.0 if diff_sq == 0 else math.inf
    return {"max_abs_diff": max_abs, "rel_l2": rel}


def _compare_values(key: str, a: Any, b: Any) -> dict[str, Any]:
    def same() -> bool:
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return type(a) is type(b) and bool(a == b)

    if same():
        return {"key": key, "status": "same", "detail": "same"}
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        kind = ("tensor" if isinstance(x, torch.Tensor) else type(x).__name__ for x in (a, b))
        return {"key": key, "status": "changed", "detail": "type {} -> {}".format(*kind)}
    detail = f"{_value(a, 30)} -> {_value(b, 30)}"
    return {"key": key, "status": "changed", "detail": detail, "a": a, "b": b}


def cmd_diff(args: argparse.Namespace) -> int:
    state_a = _flat_dict(aptckpt.load(args.a, map_location="cpu"))
    state_b = _flat_dict(aptckpt.load(args.b, map_location="cpu"))
    rows: list[dict[str, Any]] = []
    for key, a in state_a.items():
        if key not in state_b:
            rows.append({"key": key, "status": "only in A", "detail": "only in A"})
            continue
        b = state_b[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            rows.append(_compare_tensors(key, a, b))
        else:
            rows.append(_compare_values(key, a, b))
    rows += [
        {"key": k, "status": "only in B", "detail": "only in B"}
        for k in state_b
        if k not in state_a
    ]
    counts = {
        s: sum(r["status"] == s for r in rows)
        for s in ("same", "changed", "only in A", "only in B")
    }
    if args.json:
        _print_json({"a": str(args.a), "b": str(args.b), "summary": counts, "keys": rows})
        return 0
    shown = [r for r in rows if args.all or r["status"] != "same"]
    if shown:
        table = [
            (
                r["key"],
                r["detail"],
                f"{r['differing']}/{r['numel']}" if "differing" in r else "",
                _num(r.get("max_abs_diff")),
                _num(r.get("rel_l2")),
            )
            for r in shown
        ]
        print(_table(("key", "change", "differing", "max abs diff", "rel L2"), table, (2, 3, 4)))
        print()
    verdict = "identical" if counts["same"] == len(rows) else "different"
    print(f"{verdict}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


# ------------------------------------------------------------------ convert


def _write_file(dst: Path, write: Callable[[Path], None], *, overwrite: bool) -> int:
    """Write ``dst`` atomically: a sibling temp file, fsync, rename, fsync of the directory."""
    if dst.is_dir():
        raise UsageError(f"'{dst}' is a directory; --to writes a single file, name one")
    if dst.exists() and not overwrite:
        raise UsageError(f"'{dst}' exists; pass --overwrite to replace it")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
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
                raise UsageError(f"'{dst}' exists; pass --overwrite to replace it") from None
            except OSError:  # no hard links on this file system: check, then rename
                if dst.exists():
                    raise UsageError(f"'{dst}' exists; pass --overwrite to replace it") from None
                os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dst.stat().st_size


def _export_torch(state: Any, dst: Path, *, overwrite: bool) -> tuple[int, list[str]]:
    empty = tree.find_plain(tree.flatten(state).skeleton, lambda v: v == b"")
    if empty:
        raise UsageError(
            f"cannot export to a torch file: {empty[0]} is empty bytes (b''), which "
            "torch.load(weights_only=True) refuses; convert to an aptckpt checkpoint instead"
        )

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            torch.save(state, f)

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
        items = list(_flatten(source, dotted_index=True))
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
            what = f"dtype {_dtype(tensors[bad[0]])} of '{bad[0]}'" if bad else f"({err})"
            raise UsageError(
                f"safetensors cannot store the {what}; --to torch-file keeps every dtype"
            ) from err

    return _write_file(dst, write, overwrite=overwrite), notes


def cmd_convert(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    options = dict(_option(o) for o in args.option)
    if args.level is not None:
        options["level"] = args.level
    raw = aptckpt.inspect(args.src).raw_bytes
    if args.to == "checkpoint":
        info = _busy(
            lambda: aptckpt.convert(
                args.src, dst, backend=args.backend or "zstd", overwrite=args.overwrite, **options
            ),
            "convert",
            raw,
        )
        ratio = f" ({info.stored_bytes / info.raw_bytes:.1%})" if info.raw_bytes else ""
        print(
            f"converted {args.src} -> {info.path} ({info.backend}): {info.tensors} tensors, "
            f"{_size(info.raw_bytes)} raw, {_size(info.stored_bytes)} stored{ratio}, "
            f"{info.seconds:.2f}s"
        )
        return 0
    if args.backend or options:
        raise UsageError(
            f"--backend, --level and --option apply to checkpoints, not --to {args.to}"
        )
    export = _export_torch if args.to == "torch-file" else _export_safetensors

    def run() -> tuple[int, list[str]]:
        return export(aptckpt.load(args.src, map_location="cpu"), dst, overwrite=args.overwrite)

    size, notes = _busy(run, "export", raw)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {dst} ({args.to}, {_size(size)}) from {args.src}")
    return 0


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--option {text!r} is not KEY=VALUE (e.g. --option codec=none)")
    try:
        return key, int(value)
    except ValueError:
        return key, value


# ------------------------------------------------------------------ gc, ls


def cmd_gc(args: argparse.Namespace) -> int:
    report = aptckpt.collect_garbage(args.run_dir, dry_run=args.dry_run, wait=not args.no_wait)
    if args.json:
        _print_json(report)
        return 0
    verb = "would remove" if report.dry_run else "removed"
    rows = [
        ("store", report.store),
        ("checkpoints", f"{report.checkpoints} (delta checkpoints using the store)"),
        ("kept", f"{report.kept_objects} objects, {_size(report.kept_bytes)}"),
        (verb, f"{report.removed_objects} objects, {_size(report.removed_bytes)}"),
        ("would free" if report.dry_run else "freed", _size(report.removed_bytes)),
    ]
    print(_pairs(rows))
    if report.dry_run and report.removed_objects:
        print("dry run: nothing was removed; run again without --dry-run to free the space")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    if not run.is_dir():
        why = "is not a directory" if run.exists() else "does not exist"
        raise UsageError(f"'{run}' {why}; pass the run directory of a training run")
    if is_checkpoint(run):
        raise UsageError(f"'{run}' is a single checkpoint, not a run; use: aptckpt inspect {run}")
    manager = aptckpt.CheckpointManager(run)  # reads only; creates nothing
    records = manager.checkpoints()
    # is_best says "best when saved", so several can carry it; the run's best is one.
    best = manager.best()
    best_path = best.rel_path if best is not None else None
    indexed = (run / "metadata.json").is_file()
    if not records:
        if indexed:
            raise UsageError(f"run directory '{run}' has no checkpoints yet")
        elsewhere = " (checkpoints beneath it: aptckpt verify lists them)"
        raise UsageError(
            f"'{run}' has no metadata.json and no checkpoints/ or temp/ checkpoints: not a run "
            "directory of aptckpt.CheckpointManager" + (elsewhere if _find_checkpoints(run) else "")
        )
    if not indexed:
        print(f"note: '{run}' has no metadata.json; listed from the checkpoints", file=sys.stderr)
    if args.json:
        _print_json([{**_jsonable(r), "run_best": r.rel_path == best_path} for r in records])
        return 0
    rows = [
        (
            str(r.global_step),
            str(r.epoch),
            r.kind,
            " ".join(f"{k}={_value(v, 12)}" for k, v in r.metrics.items()),
            "*" if r.rel_path == best_path else "",
            _size(r.bytes),
            r.backend,
            r.rel_path,
        )
        for r in records
    ]
    header = ("step", "epoch", "kind", "metrics", "best", "written", "backend", "path")
    print(_table(header, rows, (0, 1, 5)))
    return 0


# ------------------------------------------------------------------ entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aptckpt",
        description="Inspect, verify, compare and convert aptckpt checkpoints.",
        epilog="exit status: 0 success, 1 a damaged checkpoint, 2 usage or any other error",
    )
    p.add_argument("--version", action="version", version=f"aptckpt {aptckpt.__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], doc: str, *, js: bool = True
    ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=doc, description=doc)
        c.set_defaults(func=func)
        if js:
            c.add_argument("--json", action="store_true", help="machine-readable output")
        return c

    command("info", cmd_info, "versions, native core, SIMD, threads, backends")
    c = command("ls", cmd_ls, "list the checkpoints of a run directory")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c = command("inspect", cmd_inspect, "show a checkpoint's manifest and tensors (reads no data)")
    c.add_argument("checkpoint", metavar="CKPT")
    c = command(
        "verify", cmd_verify, "check every digest of a checkpoint or of all under a directory"
    )
    c.add_argument("path", metavar="CKPT|RUN_DIR")
    c = command("diff", cmd_diff, "show which tensors and values differ between two checkpoints")
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.add_argument("--all", action="store_true", help="list unchanged keys too")
    c = command(
        "convert", cmd_convert, "rewrite a checkpoint with another backend, or export it", js=False
    )
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument(
        "--to",
        choices=("checkpoint", "torch-file", "safetensors"),
        default="checkpoint",
        help="checkpoint (default): an aptckpt checkpoint directory; torch-file: one "
        "torch.save file; safetensors: the model weights as a .safetensors file",
    )
    c.add_argument("--backend", help="backend of the new checkpoint (default zstd)")
    c.add_argument("--level", type=int, help="zstd compression level (zstd, delta)")
    c.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another backend option, e.g. codec=none (repeatable)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c = command("gc", cmd_gc, "remove store objects that no delta checkpoint of a run reaches")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    c.add_argument("--no-wait", action="store_true", help="fail instead of waiting for a save")
    return p


def _os_message(err: OSError) -> str:
    what = err.strerror or str(err)
    return f"{what}: '{err.filename}'" if err.filename else what


def _hint(err: CheckpointNotFoundError) -> str:
    path = Path(err.path)
    if (path / "metadata.json").is_file():
        return f"; it is a run directory: list its checkpoints with aptckpt ls {path}"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse printed them)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    prefix = f"aptckpt {args.command}: error:"
    try:
        code: int = args.func(args)
        return code
    except IntegrityError as err:
        problems = err.problems if len(err.problems) > 1 else (str(err),)
        print(f"{prefix} " + "; ".join(problems), file=sys.stderr)
        return 1
    except CheckpointNotFoundError as err:
        print(f"{prefix} {err}{_hint(err)}", file=sys.stderr)
        return 2
    except CheckpointExistsError as err:
        print(f"{prefix} {str(err).replace('overwrite=True', '--overwrite')}", file=sys.stderr)
        return 2
    except (AptckptError, UsageError) as err:
        print(f"{prefix} {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `aptckpt ls run | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as err:
        print(f"{prefix} {_os_message(err)}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aptckpt {args.command}: interrupted", file=sys.stderr)
        return 130
