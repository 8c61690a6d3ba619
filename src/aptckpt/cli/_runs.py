"""``aptckpt ls`` and ``aptckpt gc``: the run directory of a :class:`aptckpt.CheckpointManager`.

``ls`` only reads (it creates nothing in the run); ``gc`` goes through
:func:`aptckpt.collect_garbage` and honours ``--dry-run``. A run without an object
store (no delta checkpoints) has nothing to collect: ``gc`` says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

import aptckpt
from aptckpt import _history, _run_index, _rundir
from aptckpt._runlock import LOCK_NAME
from aptckpt.cli._common import (
    UsageError,
    find_checkpoints,
    fmt_size,
    fmt_value,
    options_for,
    print_json,
    render_pairs,
    render_table,
    with_progress,
)
from aptckpt.errors import AptckptError, StoreNotFoundError
from aptckpt.storage import is_url, resolve
from aptckpt.storage.local._atomic import is_checkpoint


def cmd_ls(args: argparse.Namespace) -> int:
    if is_url(args.run_dir):
        return _ls_remote(args)
    run = Path(args.run_dir)
    if not run.is_dir():
        why = "is not a directory" if run.exists() else "does not exist"
        raise UsageError(f"'{run}' {why}; pass the run directory of a training run")
    if is_checkpoint(run):
        raise UsageError(f"'{run}' is a single checkpoint, not a run; use: aptckpt inspect {run}")
    listing = _run_index.scan(_rundir.Run.at(run, None))
    records = listing.records
    # is_best says "best when saved", so several can carry it; the run's best is one.
    best = _best(records)
    best_path = best.rel_path if best is not None else None
    indexed = (run / "metadata.json").is_file()
    if not records:
        if indexed or (run / LOCK_NAME).exists():  # a manager opened it: a run, still empty
            print(f"note: run directory '{run}' has no checkpoints yet", file=sys.stderr)
            if args.json:
                print_json(_document(args, str(run.absolute()), listing, None))
            return 0
        elsewhere = " (checkpoints beneath it: aptckpt verify lists them)"
        raise UsageError(
            f"'{run}' has no metadata.json and no checkpoints/ or temp/ checkpoints: not a run "
            "directory of aptckpt.CheckpointManager" + (elsewhere if find_checkpoints(run) else "")
        )
    if not indexed:
        print(f"note: '{run}' has no metadata.json; listed from the checkpoints", file=sys.stderr)
    if args.json:
        print_json(_document(args, str(run.absolute()), listing, best_path))
        return 0
    return _print_records(records, best_path)


def _ls_remote(args: argparse.Namespace) -> int:
    """``ls`` of a run on object storage: what the manager lists, read only."""
    storage, root = resolve(args.run_dir, args.storage_options)
    where = storage.display(root)
    if storage.is_checkpoint(root):
        raise UsageError(
            f"'{where}' is a single checkpoint, not a run; use: aptckpt inspect {where}"
        )
    listing = _run_index.scan(_rundir.Run.at(where, args.storage_options))
    records = listing.records
    best = _best(records)
    best_path = best.rel_path if best is not None else None
    if not records:
        if storage.info(storage.join(root, "metadata.json")) is None:
            raise UsageError(
                f"'{where}' holds no metadata.json and no checkpoints: not a run of "
                "aptckpt.CheckpointManager (check the URL and --storage-option)"
            )
        print(f"note: run '{where}' has no checkpoints yet", file=sys.stderr)
    if args.json:
        print_json(_document(args, where, listing, best_path))
        return 0
    return _print_records(records, best_path)


def _best(records: list[aptckpt.CheckpointRecord]) -> aptckpt.CheckpointRecord | None:
    """The run's best, as :meth:`CheckpointManager.best` picks it."""
    flagged = [r for r in records if r.kind == "epoch" and r.is_best]
    return flagged[-1] if flagged else None


#: The version of ``ls --json``'s document (docs/cli.md): fields are only ever added
#: within one version; a field removed or changed in meaning makes the next.
LS_SCHEMA = 1


def _utc(text: str) -> str | None:
    """An ISO 8601 time as UTC with a ``Z`` (None if it is not one)."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)  # manifests are written in UTC
    return when.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _document(
    args: argparse.Namespace, where: str, listing: Any, best_path: str | None
) -> dict[str, Any]:
    """``ls --json``: the run and each checkpoint, as docs/cli.md describes (schema 1)."""
    run = _rundir.Run.at(where, options_for(args, where))
    history = _history.read(run)
    entries = []
    for r in listing.records:
        path = str(r.path.absolute()) if isinstance(r.path, Path) else str(r.path)
        try:
            info: Any = aptckpt.inspect(path, storage_options=options_for(args, path))
        except (AptckptError, OSError):
            info = None  # deleted since it was listed, or unreadable: verify says which
        event = history.save_of(r.rel_path)
        entries.append(
            {
                "path": path,
                "rel_path": r.rel_path,
                "number": r.sequence,
                "kind": "regular" if r.kind == "epoch" else "temporary",
                "step": r.global_step,
                "epoch": r.epoch,
                "batch_index": r.batch_index,
                "metrics": r.metrics,
                "is_best": r.rel_path == best_path,
                "best_when_saved": r.is_best,
                "backend": r.backend,
                "bytes": r.bytes,
                "files": len(info.files) if info is not None else None,
                "created_at": _utc(r.created_at),
                "format_version": info.format_version if info is not None else None,
                "world_size": info.world_size if info is not None else None,
                "bytes_written": event.bytes_written if event is not None else None,
                "blocked_s": event.blocked_s if event is not None else None,
                "save_s": event.save_s if event is not None else None,
                "indexed": r.rel_path in listing.indexed,
            }
        )
    return {
        "schema": LS_SCHEMA,
        "run": where,
        "best": best_path,
        "history_steps": len(history.points),
        "checkpoints": entries,
    }


def _print_records(records: list[aptckpt.CheckpointRecord], best_path: str | None) -> int:
    rows = [
        (
            str(r.global_step),
            str(r.epoch),
            r.kind,
            " ".join(f"{k}={fmt_value(v, 12)}" for k, v in r.metrics.items()),
            "*" if r.rel_path == best_path else "",
            fmt_size(r.bytes),
            r.backend,
            r.rel_path,
        )
        for r in records
    ]
    header = ("step", "epoch", "kind", "metrics", "best", "written", "backend", "path")
    print(render_table(header, rows, (0, 1, 5)))
    return 0


def _no_store(run: Path, err: StoreNotFoundError) -> str:
    """Why there is nothing to collect in ``run``, a directory without a store; raises
    when that is a mistake (no such directory, or delta checkpoints whose store is elsewhere)."""
    if not run.exists():
        raise UsageError(f"'{run}' does not exist; pass the run directory of a training run")
    if not run.is_dir():
        raise UsageError(f"'{run}' is not a directory; pass the run directory of a training run")
    for ckpt in find_checkpoints(run):
        try:
            backend = aptckpt.inspect(ckpt).backend
        except (AptckptError, OSError):
            continue  # verify reports what is wrong with it; it uses no store we could find
        if backend == "delta":
            raise UsageError(
                f"no object store at '{run}', but '{ckpt}' is a delta checkpoint whose "
                "objects live in a store outside it: run aptckpt gc on the directory above "
                "that holds its aptckpt-store (the run directory)"
            ) from err
    return (
        f"nothing to collect: '{run}' has no object store (only delta checkpoints keep "
        "their data in one; the others hold their own files, deleted with them)"
    )


def cmd_gc(args: argparse.Namespace) -> int:
    try:
        report = with_progress(
            lambda progress: aptckpt.collect_garbage(
                args.run_dir,
                dry_run=args.dry_run,
                wait=not args.no_wait,
                storage_options=options_for(args, args.run_dir),
                progress=progress,
            ),
            "gc",
            unit="item",
            enabled=False if args.json else None,
        )
    except StoreNotFoundError as err:
        if is_url(args.run_dir):
            raise
        note = _no_store(Path(args.run_dir), err)
        if args.json:
            print_json(
                {
                    "store": None,
                    "checkpoints": 0,
                    "kept_objects": 0,
                    "kept_bytes": 0,
                    "removed_objects": 0,
                    "removed_bytes": 0,
                    "kept_packs": 0,
                    "removed_packs": 0,
                    "dry_run": args.dry_run,
                    "note": note,
                }
            )
        else:
            print(note)
        return 0
    if args.json:
        print_json(report)
        return 0
    verb = "would remove" if report.dry_run else "removed"
    rows = [
        ("store", report.store),
        ("checkpoints", f"{report.checkpoints} (delta checkpoints using the store)"),
        (
            "kept",
            f"{report.kept_objects} objects, {report.kept_packs} packs, "
            f"{fmt_size(report.kept_bytes)}",
        ),
        (
            verb,
            f"{report.removed_objects} objects, {report.removed_packs} packs, "
            f"{fmt_size(report.removed_bytes)}",
        ),
        ("would free" if report.dry_run else "freed", fmt_size(report.removed_bytes)),
    ]
    print(render_pairs(rows))
    if report.dry_run and (report.removed_objects or report.removed_packs):
        print("dry run: nothing was removed; run again without --dry-run to free the space")
    return 0
