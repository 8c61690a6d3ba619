"""A run's history: metrics over steps and what each save cost, for plots and tools.

A checkpoint records its metrics when it is saved; a curve needs them at every
step, and a cost chart needs how long each save blocked the loop -- which is
known only once the save returned, after its manifest was written, so it cannot
live in the manifest. Both go to ``history/`` in the run directory, as JSON lines:

``{"step": 120, "time": 1733580000.1, "metrics": {"loss": 2.31}}``
    one :meth:`CheckpointManager.log_metrics <aptckpt.CheckpointManager.log_metrics>` call;
``{"event": "save", "path": "checkpoints/...", "step": 120, "backend": "zstd",
"bytes_written": 123, "blocked_s": 0.01, "save_s": 0.4, "blocking": false, "time": ...}``
    one committed save of the manager (``bytes_written``: what the save added; for
    ``delta`` only its new objects; ``blocked_s``: how long the caller waited,
    ``save_s``: until it had committed).

Lines are kept in memory and written as one new *segment* file
(``history/000007.jsonl``) per flush: on every save, before its checkpoint commits
(so the metrics up to a checkpoint are on disk when it is; a save's own event goes
out with the next flush), after :data:`FLUSH_LINES` lines or :data:`FLUSH_SECONDS`,
and when the manager closes. A segment is written whole
(:meth:`Storage.create_file`: atomic locally, one conditional PUT on object stores) -- the
alternative, appending to one file, is not an operation object stores have, and
rewriting a growing file on every flush costs quadratic bytes. Segments are
numbered on from the highest one found, so a resumed run continues the history,
and created only where no file is (never replacing another writer's segment).
A crash loses at most the lines not yet flushed, never a checkpoint's own.

Reading (:func:`read`) joins the segments in order, skips a line that is not a
JSON object of the expected shape (a torn or hand-edited line is logged, not
fatal), and caps each segment at :data:`MAX_SEGMENT_BYTES`. A run resumed from an
older checkpoint logs steps again: for each step, the last value logged wins.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aptckpt import _rundir

__all__ = [
    "FOLDER",
    "History",
    "HistoryWriter",
    "MetricPoint",
    "SaveEvent",
    "read",
]

log = logging.getLogger("aptckpt")

FOLDER = _rundir.HISTORY
FLUSH_LINES = 1000
FLUSH_SECONDS = 30.0
#: A segment holds at most FLUSH_LINES lines of a few hundred bytes; a larger file
#: is not one the manager wrote, and is skipped rather than read into memory.
MAX_SEGMENT_BYTES = 16 << 20
_SEGMENT = re.compile(r"([0-9]{6,})\.jsonl")


@dataclass(frozen=True)
class MetricPoint:
    step: int
    time: float
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class SaveEvent:
    path: str
    step: int
    backend: str
    bytes_written: int
    blocked_s: float
    save_s: float
    blocking: bool
    time: float


@dataclass(frozen=True)
class History:
    """A run's history as read back: metric points by step, saves in order."""

    points: tuple[MetricPoint, ...] = ()
    saves: tuple[SaveEvent, ...] = ()
    #: Lines skipped as malformed (a torn last line after a crash, a hand edit).
    skipped: int = 0

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for p in self.points:
            names.update(dict.fromkeys(p.metrics))
        return list(names)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of metric ``name``, by step."""
        pairs = [(p.step, p.metrics[name]) for p in self.points if name in p.metrics]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def save_of(self, rel_path: str) -> SaveEvent | None:
        """The last save event of checkpoint ``rel_path``."""
        return self._last_saves().get(rel_path)

    def _last_saves(self) -> dict[str, SaveEvent]:
        cached: dict[str, SaveEvent] | None = self.__dict__.get("_by_path")
        if cached is None:
            cached = {event.path: event for event in self.saves}  # later ones win
            object.__setattr__(self, "_by_path", cached)  # a cache, not a field
        return cached


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond any float (a hand-edited line)
        return None


def _clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, not {type(key).__name__}")
        try:
            number = _number(value.item() if hasattr(value, "item") else value)
        except (RuntimeError, ValueError):  # .item() of a tensor with several elements
            number = None
        if number is None:
            raise TypeError(
                f"metric {key!r} is {type(value).__name__}, not one number a float holds; "
                "log plain numbers (call .item() on a one-element tensor)"
            )
        out[key] = number
    return out


class HistoryWriter:
    """Buffers history lines of a run and writes them as segments; thread-safe (saves
    log from their background thread)."""

    def __init__(self, run: _rundir.Run) -> None:
        self._run = run
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._next: int | None = None  # segment number, found on the first flush
        self._last_flush = time.monotonic()

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        clean = _clean_metrics(metrics)
        line = {"step": step, "time": round(time.time(), 3), "metrics": clean}
        self._add(line)

    def log_save(self, event: SaveEvent) -> None:
        # Not flushed now: the next save writes it before it commits (or close() does),
        # so a save costs one small write, not two.
        self._add({"event": "save", **event.__dict__})

    def _add(self, doc: dict[str, Any]) -> None:
        text = json.dumps(doc, allow_nan=True, separators=(",", ":"))
        with self._lock:
            self._lines.append(text)
            due = (
                len(self._lines) >= FLUSH_LINES
                or time.monotonic() - self._last_flush >= FLUSH_SECONDS
            )
        if due:
            try:
                self.flush()
            except OSError as err:  # kept: the next flush tries again; training goes on
                log.warning("run history not written (retried later): %s", err)

    def flush(self) -> None:
        """Write the buffered lines as a new segment (nothing if none)."""
        with self._lock:
            if not self._lines:
                return
            folder = _rundir.ensure_folder(self._run, FOLDER)
            if self._next is None:
                self._next = 1 + max((n for n, _ in _segments(self._run)), default=0)
            data = ("\n".join(self._lines) + "\n").encode()
            # Created only where nothing is (O_EXCL, If-None-Match): another writer of the
            # run in this process (a re-created manager) numbers from the same listing.
            while not self._run.storage.create_file(
                self._run.storage.join(folder, f"{self._next:06d}.jsonl"), data
            ):
                self._next = 1 + max(self._next, *(n for n, _ in _segments(self._run)))
            self._next += 1
            self._lines.clear()
            self._last_flush = time.monotonic()


def _segments(run: _rundir.Run) -> list[tuple[int, str]]:
    folder = run.path(FOLDER)
    found = []
    for entry in run.storage.list(folder):
        match = _SEGMENT.fullmatch(entry.name)
        if match and entry.kind == "file":
            found.append((int(match.group(1)), run.storage.join(folder, entry.name)))
    return sorted(found)


def _point(doc: dict[str, Any]) -> MetricPoint | None:
    step, when, metrics = doc.get("step"), _number(doc.get("time")), doc.get("metrics")
    if type(step) is not int or step < 0 or when is None or not isinstance(metrics, dict):
        return None
    clean = {}
    for key, value in metrics.items():
        number = _number(value)
        if isinstance(key, str) and number is not None:
            clean[key] = number
    return MetricPoint(step, when, clean)


def _save(doc: dict[str, Any]) -> SaveEvent | None:
    try:
        event = SaveEvent(
            path=doc["path"],
            step=doc["step"],
            backend=doc["backend"],
            bytes_written=doc["bytes_written"],
            blocked_s=float(doc["blocked_s"]),
            save_s=float(doc["save_s"]),
            blocking=doc["blocking"],
            time=float(doc["time"]),
        )
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    ok = (
        isinstance(event.path, str)
        and type(event.step) is int
        and isinstance(event.backend, str)
        and type(event.bytes_written) is int
        and type(event.blocking) is bool
    )
    return event if ok else None


def read(run: _rundir.Run) -> History:
    """The history of ``run`` (empty if it has none); see the module docstring."""
    by_step: dict[int, MetricPoint] = {}
    saves: list[SaveEvent] = []
    skipped = 0
    for _, path in _segments(run):
        try:
            data = run.storage.read_file(path, limit=MAX_SEGMENT_BYTES)
        except OSError as err:
            log.warning("history segment '%s' skipped: %s", run.storage.display(path), err)
            continue
        for line in data.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: garbage nested deep
                doc = None
            item: MetricPoint | SaveEvent | None = None
            if isinstance(doc, dict):
                item = _save(doc) if doc.get("event") == "save" else _point(doc)
            if item is None:
                skipped += 1
            elif isinstance(item, SaveEvent):
                saves.append(item)
            else:
                previous = by_step.get(item.step)
                merged = {**previous.metrics, **item.metrics} if previous else item.metrics
                by_step[item.step] = MetricPoint(item.step, item.time, merged)
    if skipped:
        log.warning("history of '%s': %d malformed line(s) skipped", run.display(), skipped)
    points = tuple(by_step[s] for s in sorted(by_step))
    return History(points, tuple(saves), skipped)
