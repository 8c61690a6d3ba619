"""``CheckpointManager``: resumable, portable, crash-safe checkpoints for a training loop.

A *run directory* holds everything, so copying or renaming it moves the run::

    outputs/
      metadata.json                        index of the run (relative paths only)
      checkpoints/apt_model_epoch3_step1200/   regular checkpoints
      temp/apt_model_epoch4_step1300/          temporary mid-epoch checkpoints
      tokenizer/vocab.json ...             the tokenizer's files
      aptckpt-store/                       objects of ``delta`` checkpoints

Each checkpoint is an ordinary aptckpt checkpoint whose state holds the
training state (model, optimizer, scheduler, grad scaler, counters, loss
history, metrics, config, tokenizer files, RNG states, data position) and
whose manifest metadata says what it is (kind, epoch, step, metrics). The
checkpoints themselves are the truth; ``metadata.json`` is an index over them,
replaced atomically after every change and rebuilt from the checkpoints when it
is missing, stale or damaged. "latest" is the committed checkpoint saved last
(each save records a sequence number in its manifest; never judged by file
times); a save that never committed is invisible.

Order of a save: the new checkpoint commits; the index is replaced with the
checkpoints the retention rules keep (the last ``keep_last`` regular checkpoints
and the best ``keep_best``; temporaries until a later regular checkpoint
exists); then the dropped ones are deleted and ``delta`` objects no checkpoint
reaches are collected. A crash at any point leaves an index that lists only
complete checkpoints, and at worst dropped checkpoints still on disk, which the
next save deletes.

One writer per run: a manager that writes holds the run lock
(:mod:`aptckpt._runlock`) from its creation until :meth:`CheckpointManager.close`,
so a second trainer on the same run directory fails at once with
:class:`~aptckpt.errors.RunBusyError`; a killed owner releases it at once. When
it takes the lock it removes what crashed saves left behind (hidden temp and
trash entries, store temp files). ``read_only=True`` takes no lock and writes
nothing.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import aptckpt.api as api
from aptckpt import _background, _gc, _runlock
from aptckpt._atomic import is_checkpoint, remove_stale_temps, write_error, write_file_atomic
from aptckpt._background import SaveHandle
from aptckpt.backends.delta import collect_garbage
from aptckpt.errors import (
    AptckptError,
    BackendError,
    CheckpointNotFoundError,
    StoreBusyError,
    StoreNotFoundError,
)
from aptckpt.objectstore import DEFAULT_STORE_NAME, ObjectStore
from aptckpt.training_state import capture_rng
from aptckpt.training_state import restore_rng as restore_rng_states
from aptckpt.tree import FlatState

__all__ = ["CheckpointManager", "CheckpointRecord", "ResumeInfo"]

log = logging.getLogger("aptckpt")

INDEX_NAME = "metadata.json"
INDEX_FORMAT = "aptckpt-run"
INDEX_VERSION = 1
_REGULAR, _TEMP, _TOKENIZER = "checkpoints", "temp", "tokenizer"
_RUN_KEY = "aptckpt_run"
#: Top-level keys of a checkpoint's state that the manager fills itself.
RESERVED = frozenset({"global_step", "epoch", "batch_index", "metrics", "rng"})


class _Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint of a run, as the index describes it.

    ``is_best`` records that the checkpoint was the best of the run *when it was
    saved*; the newest checkpoint so flagged is the run's best
    (:meth:`CheckpointManager.best`). ``bytes`` is what its save wrote.
    ``sequence`` numbers the run's saves (1, 2, ...): "newest" means the highest,
    so a run resumed from an older checkpoint continues from its own saves, not
    from those of the continuation it abandoned, whatever their global steps.
    """

    path: Path
    rel_path: str
    kind: Literal["epoch", "temp"]
    epoch: int
    global_step: int
    batch_index: int | None
    is_best: bool
    created_at: str
    metrics: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    bytes: int = 0
    sequence: int = 0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["path"]  # absolute: never written
        return {"path": doc.pop("rel_path"), **doc}


@dataclass(frozen=True)
class ResumeInfo:
    """What :meth:`CheckpointManager.load_checkpoint` found besides the tensors."""

    path: Path
    epoch: int
    global_step: int
    batch_index: int | None
    temporary: bool
    loss_history: list[Any]
    metrics: dict[str, Any]
    config: Any
    tokenizer_files: dict[str, bytes] | None
    extra: Any


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if hasattr(value, "item") and callable(value.item):
            value = value.item()  # a 0-dim tensor or a numpy scalar
        out[str(key)] = value
    return out


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes] | None:
    """The files of a tokenizer: ``.files()``, or a mapping of name -> bytes/str."""
    if tokenizer is None:
        return None
    files = tokenizer.files() if hasattr(tokenizer, "files") else tokenizer
    if not isinstance(files, Mapping):
        raise TypeError(
            "tokenizer must have a files() method returning {name: bytes}, or be such a mapping; "
            f"got {type(tokenizer).__name__}"
        )
    out = {}
    for name, data in files.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"tokenizer file name {name!r} must be a plain file name")
        out[name] = data.encode() if isinstance(data, str) else bytes(data)
    return out


class CheckpointManager:
    """Checkpoints of one training run; see the module docstring.

    Args:
        run_dir: the run directory (created if missing).
        backend: aptckpt backend of new checkpoints (``zstd``, ``torch``, ``delta``, ...).
        model_name: prefix of checkpoint names.
        keep_last: regular checkpoints kept, newest first (None: all).
        keep_best: best checkpoints kept besides them (by ``best_metric``).
        best_metric, best_mode: the metric that ranks checkpoints, ``"min"`` or ``"max"``.
        temp_every: :meth:`should_save_temp` is true every this many global steps
            (None or 0: never).
        backend_options: options passed to the backend on every save.
        read_only: only read the run (list, resolve, load): take no lock, write nothing.

    Raises:
        RunBusyError: (writing managers) another process is writing into ``run_dir``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        backend: str = "zstd",
        model_name: str = "apt_model",
        keep_last: int | None = 3,
        keep_best: int = 1,
        best_metric: str = "loss",
        best_mode: Literal["min", "max"] = "min",
        temp_every: int | None = None,
        backend_options: Mapping[str, Any] | None = None,
        read_only: bool = False,
    ) -> None:
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_name):
            raise ValueError(f"model_name {model_name!r} must be a plain file-name prefix")
        self.run_dir = Path(os.path.abspath(run_dir))
        self.backend = backend
        self.model_name = model_name
        self.keep_last, self.keep_best = keep_last, keep_best
        self.best_metric, self.best_mode = best_metric, best_mode
        self.temp_every = temp_every or 0
        self.backend_options = dict(backend_options or {})
        self.last_loaded: ResumeInfo | None = None
        #: The record of the last checkpoint this manager saved (bytes written, best flag).
        self.last_saved: CheckpointRecord | None = None
        self._created_at: str | None = None
        self.read_only = read_only
        self._lock: _runlock.RunLock | None = None
        self._in_flight: SaveHandle[Path] | None = None
        if not read_only:
            self._hold_run()

    # ------------------------------------------------------------ the run lock

    def _hold_run(self) -> None:
        """Take the run lock if this manager does not hold it; clean up after
        crashed saves when it is newly taken."""
        if self.read_only:
            raise ValueError(
                f"this CheckpointManager of '{self.run_dir}' was opened with read_only=True; "
                "open it without read_only to save"
            )
        if self._lock is not None and self._lock.held:
            return
        self._lock = _runlock.acquire(self.run_dir)
        self._remove_debris()

    def _remove_debris(self) -> None:
        """Remove what saves that crashed left behind: hidden temp and trash entries
        in the run's folders, and temp files in its object store. Only under the
        run lock, so no other process is writing them."""
        folders = [self.run_dir] + [self.run_dir / f for f in (_REGULAR, _TEMP, _TOKENIZER)]
        removed = sum(len(remove_stale_temps(f, exclusive=True)) for f in folders)
        store_dir = self.run_dir / DEFAULT_STORE_NAME
        if store_dir.is_dir():
            try:
                store = ObjectStore.open(store_dir)
                with store.lock(exclusive=True, wait=False):
                    cleared = store.clear_tmp()
            except (StoreBusyError, StoreNotFoundError):
                pass  # another process saves into the store: its temp files are live
            except (AptckptError, OSError) as err:
                log.warning("object store temp files not cleaned: %s", err)
            else:
                removed += cleared
        if removed:
            log.info("removed %d leftovers of interrupted saves in %s", removed, self.run_dir)

    def close(self) -> None:
        """Finish the save in flight (raising its error), then release the run lock
        (other managers of this process may still hold it). A later save takes it again."""
        try:
            self.wait()
        finally:
            lock, self._lock = self._lock, None
            del lock  # released when the last manager of this process lets go

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ saving

    def should_save_temp(self, global_step: int) -> bool:
        """True when a temporary checkpoint is due at ``global_step``."""
        return self.temp_every > 0 and global_step > 0 and global_step % self.temp_every == 0

    def save_checkpoint(
        self,
        model: _Stateful,
        optimizer: _Stateful | None,
        scheduler: _Stateful | None,
        epoch: int,
        global_step: int,
        loss_history: list[Any] | None,
        metrics: Mapping[str, Any] | None,
        tokenizer: Any = None,
        config: Any = None,
        is_best: bool | None = None,
        *,
        scaler: _Stateful | None = None,
        batch_index: int | None = None,
        temporary: bool = False,
        extra: Any = None,
        blocking: bool = True,
    ) -> Any:
        """Save the full training state; return the checkpoint's path (with
        ``blocking=False``, a :class:`~aptckpt.SaveHandle` whose ``wait()`` returns it).

        ``epoch`` is the epoch in progress; a regular checkpoint (the default)
        is taken after it ended. ``temporary=True`` makes a mid-epoch checkpoint
        in ``temp/``, with ``batch_index`` the batches of ``epoch`` already done.
        ``tokenizer`` (an object with ``files() -> {name: bytes}``) is written to
        ``tokenizer/`` and embedded in the checkpoint, as is ``config``.
        ``is_best=None`` decides from ``metrics[best_metric]``. ``blocking=False``:
        see :meth:`save`.
        """
        files = _tokenizer_files(tokenizer)
        objects: dict[str, Any] = {
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "scaler": scaler,
            "loss_history": list(loss_history or []),
            "config": config,
            "tokenizer": files,
            "extra": extra,
        }
        return self._save(
            global_step,
            objects,
            epoch=epoch,
            metrics=metrics,
            batch_index=batch_index,
            temporary=temporary,
            is_best=is_best,
            blocking=blocking,
            tokenizer_files=files,
        )

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        epoch: int = 0,
        metrics: Mapping[str, Any] | None = None,
        batch_index: int | None = None,
        temporary: bool = False,
        is_best: bool | None = None,
        blocking: bool = True,
    ) -> Any:
        """Save ``state`` (objects with ``state_dict()`` are saved through it, other
        values as they are) with the step, epoch, metrics and RNG states; return
        the checkpoint's path.

        ``blocking=False`` returns a :class:`~aptckpt.SaveHandle` (``wait()``
        gives the path) as soon as the state is copied into host staging
        buffers; writing, commit, index, retention and garbage collection run in
        the background while training goes on. One save of a manager is in
        flight at a time: the next save (and :meth:`wait`, :meth:`close`, loads)
        waits for it, and raises its error if it failed.
        """
        return self._save(
            step,
            state,
            epoch=epoch,
            metrics=metrics,
            batch_index=batch_index,
            temporary=temporary,
            is_best=is_best,
            blocking=blocking,
            tokenizer_files=None,
        )

    def wait(self) -> None:
        """Block until this manager's background save (if any) has finished.

        Raises:
            The background save's error, once, if it failed.
        """
        handle, self._in_flight = self._in_flight, None
        if handle is not None:
            handle.wait()

    def _save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        epoch: int,
        metrics: Mapping[str, Any] | None,
        batch_index: int | None,
        temporary: bool,
        is_best: bool | None,
        blocking: bool,
        tokenizer_files: dict[str, bytes] | None,
    ) -> Any:
        self.wait()
        self._hold_run()
        clash = RESERVED & set(state)
        if clash:
            raise ValueError(f"state keys {sorted(clash)} are reserved by CheckpointManager")
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        plain_metrics = _plain_metrics(metrics)
        content: dict[str, Any] = {
            key: value.state_dict() if hasattr(value, "state_dict") else value
            for key, value in state.items()
        }
        content.update(
            global_step=step,
            epoch=epoch,
            batch_index=batch_index,
            metrics=plain_metrics,
            rng=capture_rng(),
        )
        kind: Literal["epoch", "temp"] = "temp" if temporary else "epoch"
        folder = _TEMP if temporary else _REGULAR
        rel = f"{folder}/{self.model_name}_epoch{epoch}_step{step}"
        records = self.checkpoints()
        sequence = max((r.sequence for r in records), default=0) + 1
        run_meta = {
            "sequence": sequence,
            "kind": kind,
            "epoch": epoch,
            "global_step": step,
            "batch_index": batch_index,
            "metrics": plain_metrics,
        }
        pending = api.prepare_save(
            content,
            self.run_dir / rel,
            backend=self.backend,
            metadata={_RUN_KEY: run_meta},
            overwrite=True,
            **self._backend_options(records),
        )
        new = CheckpointRecord(
            path=self.run_dir / rel,
            rel_path=rel,
            kind=kind,
            epoch=epoch,
            global_step=step,
            batch_index=batch_index,
            is_best=False,
            created_at=_now(),
            metrics=plain_metrics,
            backend=self.backend,
            bytes=0,
            sequence=sequence,
        )

        def persist(snapshot: FlatState) -> Path:
            info = pending.persist(snapshot)
            self._after_commit(_replace(new, bytes=info.stored_bytes), records, is_best)
            if tokenizer_files:
                self._write_tokenizer_after_commit(tokenizer_files, new.path)
            return new.path

        if blocking:
            with _gc.paused():  # as in api.save: only while the caller waits
                return persist(pending.flat)
        self._in_flight = _background.submit(pending.flat, str(new.path), persist)
        return self._in_flight

    def _after_commit(
        self, record: CheckpointRecord, records: list[CheckpointRecord], is_best: bool | None
    ) -> None:
        """Index, retention and garbage collection once ``record`` has committed."""
        rel = record.rel_path
        records = [r for r in records if r.rel_path != rel] + [record]
        records = self._mark_best(records, record, is_best)
        record = next(r for r in records if r.rel_path == rel)
        kept, dropped = self._retain(records, record)
        self.last_saved = record
        try:
            self._write_index(kept)  # before deleting: the index never lists a deleted checkpoint
        except OSError as err:
            raise write_error(
                f"checkpoint '{rel}' was committed, but updating {INDEX_NAME} (it is rebuilt "
                "from the checkpoints when stale)",
                err,
                path=self.run_dir,
            ) from err
        for old in dropped:
            self._delete(old)
        if dropped:
            self._collect_garbage()  # deleted checkpoints may leave delta objects unreached
        log.info("checkpoint %s committed (%d bytes)", rel, record.bytes)

    def _write_tokenizer_after_commit(self, files: dict[str, bytes], path: Path) -> None:
        try:
            self._write_tokenizer(files)
        except OSError as err:
            raise write_error(
                f"checkpoint '{path}' was committed (with the tokenizer inside), but "
                f"writing the run's {_TOKENIZER}/ files",
                err,
                path=self.run_dir,
            ) from err

    def _backend_options(self, records: list[CheckpointRecord]) -> dict[str, Any]:
        options = dict(self.backend_options)
        if self.backend == "delta":
            options.setdefault("store", self.run_dir / DEFAULT_STORE_NAME)
            latest = self._newest(r for r in records if r.backend == "delta")
            if latest is not None:
                options.setdefault("base", latest.path)
        return options

    def _mark_best(
        self, records: list[CheckpointRecord], new: CheckpointRecord, is_best: bool | None
    ) -> list[CheckpointRecord]:
        """Flag ``new`` as best: as the trainer says, else if its metric beats every
        earlier regular checkpoint's. A flag records that a checkpoint was the best
        when it was saved, so the newest flagged one is the best of the run."""
        if new.kind == "temp":
            return records
        if is_best is None:
            value = _metric(new, self.best_metric)
            earlier = [
                v
                for r in records
                if r.kind == "epoch" and r is not new
                for v in (_metric(r, self.best_metric),)
                if v is not None
            ]
            if value is None:
                is_best = False
            elif self.best_mode == "max":
                is_best = all(v <= value for v in earlier)
            else:
                is_best = all(v >= value for v in earlier)
        if not is_best:
            return records
        return [_replace(r, is_best=True) if r is new else r for r in records]

    def _retain(
        self, records: list[CheckpointRecord], new: CheckpointRecord
    ) -> tuple[list[CheckpointRecord], list[CheckpointRecord]]:
        """Split ``records`` into those the retention rules keep and those they drop
        (``new`` has committed already and is kept)."""
        regular = sorted((r for r in records if r.kind == "epoch"), key=_order)
        keep = {new.rel_path}
        keep |= {r.rel_path for r in (regular[-self.keep_last :] if self.keep_last else regular)}
        if self.keep_best:
            keep |= {r.rel_path for r in [r for r in regular if r.is_best][-self.keep_best :]}
        kept, dropped = [], []
        for r in records:
            stale_temp = r.kind == "temp" and new.kind == "epoch" and _order(r) < _order(new)
            if (r.kind == "epoch" and r.rel_path not in keep) or stale_temp:
                dropped.append(r)
            else:
                kept.append(r)
        return kept, dropped

    def _delete(self, record: CheckpointRecord) -> None:
        """Delete a checkpoint retention dropped. A failure is logged, not raised: the
        new checkpoint is safe, and the next save tries again."""
        try:
            api.delete(record.path)
        except CheckpointNotFoundError:
            return  # already gone
        except OSError as err:
            log.warning(
                "could not delete checkpoint %s (retention): %s; the next save tries again",
                record.rel_path,
                err,
            )
            return
        log.info("deleted checkpoint %s (retention)", record.rel_path)

    def _collect_garbage(self) -> None:
        if not (self.run_dir / DEFAULT_STORE_NAME).is_dir():
            return
        try:
            collect_garbage(self.run_dir, wait=False)
        except StoreBusyError:
            log.info("object store busy; garbage collection postponed to the next save")
        except (AptckptError, OSError) as err:
            log.warning("garbage collection skipped: %s", err)

    def _write_tokenizer(self, files: dict[str, bytes]) -> None:
        directory = self.run_dir / _TOKENIZER
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            target = directory / name
            if not target.exists() or target.read_bytes() != data:
                write_file_atomic(target, data)

    # ----------------------------------------------------------- the index

    def checkpoints(self) -> list[CheckpointRecord]:
        """Every committed checkpoint of the run, oldest first.

        The checkpoints on disk are the truth; the index adds what only it
        knows (best flags, bytes written, times) and fills in for nothing else.
        """
        indexed = {r.rel_path: r for r in self._read_index()}
        records = []
        for folder in (_REGULAR, _TEMP):
            directory = self.run_dir / folder
            if not directory.is_dir():
                continue
            for entry in sorted(directory.iterdir()):
                rel = f"{folder}/{entry.name}"
                if not is_checkpoint(entry) or entry.name.startswith("."):
                    continue
                record = indexed.get(rel) or self._record_from_manifest(entry, rel)
                if record is not None:
                    records.append(record)
        return sorted(records, key=_order)

    def _record_from_manifest(self, path: Path, rel: str) -> CheckpointRecord | None:
        try:
            info = api.inspect(path)
        except AptckptError as err:
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
            return None
        run = info.metadata.get(_RUN_KEY) if isinstance(info.metadata, dict) else None
        if not isinstance(run, dict):
            return None  # not written by a CheckpointManager
        kind: Literal["epoch", "temp"] = "temp" if run.get("kind") == "temp" else "epoch"
        return CheckpointRecord(
            path=path,
            rel_path=rel,
            kind=kind,
            epoch=int(run.get("epoch", 0)),
            global_step=int(run.get("global_step", 0)),
            batch_index=run.get("batch_index"),
            is_best=False,
            created_at=info.created_at,
            metrics=dict(run.get("metrics") or {}),
            backend=info.backend,
            bytes=info.stored_bytes,
            sequence=int(run.get("sequence", 0)),
        )

    def _read_index(self) -> list[CheckpointRecord]:
        path = self.run_dir / INDEX_NAME
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            log.warning("%s is unreadable (%s); rebuilding it from the checkpoints", path, err)
            return []
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            log.warning("%s is not an aptckpt run index; rebuilding it", path)
            return []
        self._created_at = doc.get("created_at") or self._created_at
        out = []
        for item in doc.get("checkpoints", []):
            try:
                rel = str(item["path"])
                if rel.startswith("/") or ".." in rel.split("/"):
                    raise ValueError(f"path {rel!r} is not relative to the run")
                out.append(
                    CheckpointRecord(
                        path=self.run_dir / rel,
                        rel_path=rel,
                        kind="temp" if item.get("kind") == "temp" else "epoch",
                        epoch=int(item["epoch"]),
                        global_step=int(item["global_step"]),
                        batch_index=item.get("batch_index"),
                        is_best=bool(item.get("is_best", False)),
                        created_at=str(item.get("created_at", "")),
                        metrics=dict(item.get("metrics") or {}),
                        backend=str(item.get("backend", "")),
                        bytes=int(item.get("bytes", 0)),
                        sequence=int(item.get("sequence", 0)),
                    )
                )
            except (KeyError, TypeError, ValueError) as err:
                log.warning("ignoring a malformed entry of %s: %s", path, err)
        return out

    def _write_index(self, records: list[CheckpointRecord]) -> None:
        now = _now()
        doc = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "model_name": self.model_name,
            "created_at": self._created_at or now,
            "last_updated": now,
            "backend": self.backend,
            "best_metric": self.best_metric,
            "best_mode": self.best_mode,
            "checkpoints": [r.to_json() for r in sorted(records, key=_order)],
        }
        self._created_at = str(doc["created_at"])
        text = json.dumps(doc, indent=2, default=str, allow_nan=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_file_atomic(self.run_dir / INDEX_NAME, text.encode("utf-8") + b"\n")

    # ------------------------------------------------------------ queries

    @staticmethod
    def _newest(records: Any) -> CheckpointRecord | None:
        ordered = sorted(records, key=_order)
        return ordered[-1] if ordered else None

    def latest(self) -> CheckpointRecord | None:
        """The complete checkpoint saved last, temporary or regular (after this
        manager's save in flight, if any, has finished)."""
        self.wait()
        return self._newest(self.checkpoints())

    def best(self) -> CheckpointRecord | None:
        """The best regular checkpoint: the newest one flagged best when saved."""
        self.wait()
        flagged = [r for r in self.checkpoints() if r.kind == "epoch" and r.is_best]
        return flagged[-1] if flagged else None

    def resolve(self, checkpoint_path: str | os.PathLike[str] | None = None) -> Path:
        """The checkpoint named by ``None``/``"latest"``, ``"best"`` or a path.

        A relative path is tried as given, then inside the run directory.
        """
        if checkpoint_path is None or checkpoint_path in ("latest", "auto"):
            record = self.latest()
            if record is None:
                raise CheckpointNotFoundError(self.run_dir, "the run has no complete checkpoint")
            return record.path
        if checkpoint_path == "best":
            record = self.best()
            if record is None:
                raise CheckpointNotFoundError(
                    self.run_dir, f"no regular checkpoint has the metric {self.best_metric!r}"
                )
            return record.path
        path = Path(checkpoint_path)
        if not path.exists() and not path.is_absolute() and (self.run_dir / path).exists():
            path = self.run_dir / path
        return path

    # ------------------------------------------------------------ loading

    def load_checkpoint(
        self,
        model: _Stateful,
        optimizer: _Stateful | None = None,
        scheduler: _Stateful | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        *,
        scaler: _Stateful | None = None,
        map_location: Any = "cpu",
        restore_rng: bool = True,
    ) -> tuple[int, int, list[Any], dict[str, Any]]:
        """Restore a checkpoint into the given objects.

        Returns ``(epoch, global_step, loss_history, metrics)``; the rest
        (batch index, temporary or not, config, tokenizer files) is in
        :attr:`last_loaded`. RNG states are restored too unless
        ``restore_rng=False``.
        """
        state = self.restore(
            {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler},
            checkpoint_path,
            map_location=map_location,
            restore_rng=restore_rng,
        )
        assert self.last_loaded is not None
        info = self.last_loaded
        return info.epoch, info.global_step, list(state.get("loss_history") or []), info.metrics

    def restore(
        self,
        objects: Mapping[str, Any],
        checkpoint_path: str | os.PathLike[str] | None = None,
        *,
        map_location: Any = "cpu",
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Load a checkpoint's state into every object of ``objects`` that has
        ``load_state_dict`` (``None`` values are skipped); return the whole state."""
        self.wait()
        path = self.resolve(checkpoint_path)
        state = api.load(path, map_location=map_location)
        if not isinstance(state, dict) or "global_step" not in state:
            raise BackendError(
                f"'{path}' was not written by a CheckpointManager (no global_step); "
                "load it with aptckpt.load()"
            )
        for key, obj in objects.items():
            if obj is None:
                continue
            saved = state.get(key)
            if saved is None:
                raise KeyError(f"checkpoint '{path}' holds no {key!r} state to restore")
            obj.load_state_dict(saved)
        if restore_rng and state.get("rng") is not None:
            restore_rng_states(state["rng"])
        tokenizer = state.get("tokenizer")
        self.last_loaded = ResumeInfo(
            path=Path(os.path.abspath(path)),
            epoch=int(state.get("epoch", 0)),
            global_step=int(state["global_step"]),
            batch_index=state.get("batch_index"),
            temporary=Path(os.path.abspath(path)).parent.name == _TEMP,
            loss_history=list(state.get("loss_history") or []),
            metrics=dict(state.get("metrics") or {}),
            config=state.get("config"),
            tokenizer_files=dict(tokenizer) if isinstance(tokenizer, dict) else None,
            extra=state.get("extra"),
        )
        return state


def _order(record: CheckpointRecord) -> tuple[int, int, int]:
    """Oldest to newest: by save sequence, then global step (an index or checkpoints
    without sequence numbers), then a regular checkpoint after a temporary one."""
    return (record.sequence, record.global_step, 1 if record.kind == "epoch" else 0)


def _metric(record: CheckpointRecord, name: str) -> float | None:
    value = record.metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _replace(record: CheckpointRecord, **changes: Any) -> CheckpointRecord:
    fields = {**record.__dict__, **changes}
    return CheckpointRecord(**fields)
