"""``aptckpt ls`` and ``aptckpt gc``: the run directory of a :class:`aptckpt.CheckpointManager`.

``ls`` only reads (it creates nothing in the run); ``gc`` goes through
:func:`aptckpt.collect_garbage` and honours ``--dry-run``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import aptckpt
from aptckpt._atomic import is_checkpoint
from aptckpt.cli._common import (
    UsageError,
    find_checkpoints,
    fmt_size,
    fmt_value,
    jsonable,
    print_json,
    render_pairs,
    render_table,
)


def cmd_ls(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    if not run.is_dir():
        why = "is not a directory" if run.exists() else "does not exist"
        raise UsageError(f"'{run}' {why}; pass the run directory of a training run")
    if is_checkpoint(run):
        raise UsageError(f"'{run}' is a single checkpoint, not a run; use: aptckpt inspect {run}")
    manager = aptckpt.CheckpointManager(run, read_only=True)
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
            "directory of aptckpt.CheckpointManager" + (elsewhere if find_checkpoints(run) else "")
        )
    if not indexed:
        print(f"note: '{run}' has no metadata.json; listed from the checkpoints", file=sys.stderr)
    if args.json:
        print_json([{**jsonable(r), "run_best": r.rel_path == best_path} for r in records])
        return 0
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


def cmd_gc(args: argparse.Namespace) -> int:
    report = aptckpt.collect_garbage(args.run_dir, dry_run=args.dry_run, wait=not args.no_wait)
    if args.json:
        print_json(report)
        return 0
    verb = "would remove" if report.dry_run else "removed"
    rows = [
        ("store", report.store),
        ("checkpoints", f"{report.checkpoints} (delta checkpoints using the store)"),
        ("kept", f"{report.kept_objects} objects, {fmt_size(report.kept_bytes)}"),
        (verb, f"{report.removed_objects} objects, {fmt_size(report.removed_bytes)}"),
        ("would free" if report.dry_run else "freed", fmt_size(report.removed_bytes)),
    ]
    print(render_pairs(rows))
    if report.dry_run and report.removed_objects:
        print("dry run: nothing was removed; run again without --dry-run to free the space")
    return 0
