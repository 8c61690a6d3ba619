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
whose manifest metadata says what it is (sequence number, kind, epoch, step,
metrics, best flag). The checkpoints themselves are the truth;
``metadata.json`` is an index over them (:mod:`aptckpt._run_index`), replaced
atomically after every change, used only where it matches the checkpoints, and
equal to the lost one when rebuilt. "latest" is the committed checkpoint saved
last (each save records a sequence number in its manifest; never judged by file
times); a save that never committed is invisible. A save never replaces a
checkpoint: a run resumed from an older checkpoint that saves a step again saves
it as ``<name>_seq<sequence>`` (the abandoned checkpoint may be the run's best).

Order of a save: the sequence number is taken and the best flag decided (from
the checkpoints on disk, :mod:`aptckpt.retention`); the new checkpoint commits
with both in its manifest; the index is replaced with the checkpoints the
retention rules keep (``keep=``, :mod:`aptckpt.retention`: by default the last 3
regular checkpoints and the best; temporaries until a later regular checkpoint
exists); then the
dropped ones are deleted and ``delta`` objects no checkpoint reaches are
collected. A crash at any point leaves an index that lists only complete
checkpoints, and at worst dropped checkpoints still on disk, which the next
save deletes.

The run may live on object storage: ``CheckpointManager("s3://bucket/runs/a",
storage_options={...})`` keeps the same layout under that prefix, and every path it
returns (records, :meth:`CheckpointManager.latest`, saves) is then a URL string.

One writer per run: a manager that writes holds the run lock
(:mod:`aptckpt._runlock`: a ``flock`` locally, a renewed lease object on object
storage) from its creation until :meth:`CheckpointManager.close`, so a second
trainer on the same run fails at once with :class:`~aptckpt.errors.RunBusyError`;
a killed owner releases it at once (locally) or when its lease expires. When
it takes the lock it removes what crashed saves left behind (hidden temp and
trash entries, store temp files). Managers of one run in one process (threads,
a notebook that re-creates its manager while a save is in flight) save one at a
time through the run lock's slot. ``read_only=True`` takes no lock and writes
nothing. A writing manager refuses a run whose folders are symbolic links
(:mod:`aptckpt._rundir`): nothing it writes goes through a link.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

import aptckpt.api as api
from aptckpt import (
    _background,
    _gc,
    _history,
    _run_index,
    _rundir,
    _runlock,
    distributed,
    retention,
    training_state,
)
from aptckpt._background import SaveHandle
from aptckpt._run_index import CheckpointRecord, order
from aptckpt.api import SaveInfo
from aptckpt.backends.delta import collect_garbage
from aptckpt.errors import (
    AptckptError,
    BackendError,
    CheckpointNotFoundError,
    FormatError,
    RunBusyError,
    StoreBusyError,
)
from aptckpt.retention import Keep, KeepBest, KeepLast, Metric, SaveEvery
from aptckpt.storage import LOCAL, StorageOptions, is_url
from aptckpt.storage.local._atomic import write_error
from aptckpt.training_state import ResumeInfo, capture_rng
from aptckpt.training_state import restore_rng as restore_rng_states
from aptckpt.tree import FlatState

__all__ = ["CheckpointManager", "CheckpointRecord", "ResumeInfo"]

log = logging.getLogger("aptckpt")

INDEX_NAME = _rundir.INDEX_NAME
INDEX_FORMAT = _run_index.INDEX_FORMAT
INDEX_VERSION = _run_index.INDEX_VERSION
_REGULAR, _TEMP, _TOKENIZER = _rundir.REGULAR, _rundir.TEMP, _rundir.TOKENIZER
_RUN_KEY = _run_index.RUN_KEY
#: Top-level keys of a checkpoint's state that the manager fills itself.
RESERVED = frozenset({"global_step", "epoch", "batch_index", "metrics", "rng"})
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class _Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


class _Release:
    """Releases a run's save slot exactly once, from whichever thread finishes the save."""

    def __init__(self, slot: threading.Lock) -> None:
        self._slot: threading.Lock | None = slot
        self._guard = threading.Lock()

    def __call__(self) -> None:
        with self._guard:
            slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()


class CheckpointManager:
    """Checkpoints of one training run; see the module docstring.

    Args:
        run_dir: the run directory (created if missing).
        backend: aptckpt backend of new checkpoints (``zstd``, ``torch``, ``delta``, ...).
        model_name: prefix of checkpoint names.
        keep: which regular checkpoints stay (:mod:`aptckpt.retention` rules composed
            with ``|``); default ``KeepLast(3) | KeepBest(1, ...)`` by ``best_by``.
        best_by: the metric whose best value flags a checkpoint best (:meth:`best`);
            default the first metric ``keep`` ranks by, else ``Metric("loss", "min")``.
        save_every: when a regular checkpoint is due (:meth:`due`); default every epoch.
        temporary_every: when a temporary (mid-epoch) checkpoint is due (:meth:`due`,
            :meth:`should_save_temp`), e.g. ``SaveEvery(steps=500)``; default never.
        backend_options: options passed to the backend on every save.
        read_only: only read the run (list, resolve, load): take no lock, write nothing.
        storage_options: for a ``run_dir`` URL (``s3://bucket/runs/a``), the options of
            its fsspec file system (credentials, ``endpoint_url``, ...), as for
            :func:`aptckpt.save`; never written into the run.
        process_group: a ``torch.distributed`` group whose every rank makes a manager of
            the run and calls the same saves and loads: each rank writes its own shards
            (collective :func:`aptckpt.save`), group rank 0 holds the run lock and keeps
            the index, retention, best and temporaries; each rank's RNG states are kept
            per rank; models with ``parameters()`` and their optimizers are saved by
            parameter name through ``torch.distributed.checkpoint.state_dict`` (FSDP2,
            DDP, tensor parallel), so a run resumes at another world size too.

    Raises:
        RunBusyError: (writing managers) another process is writing into ``run_dir``.
        UnsafePathError: (writing managers) a folder of the run, or its lock file, is
            a symbolic link.
    """

    #: Made on the first :meth:`log_metrics` or save (see :meth:`_history_writer`).
    _history_out: _history.HistoryWriter | None = None

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        backend: str = "zstd",
        model_name: str = "apt_model",
        keep: Keep | None = None,
        best_by: Metric | None = None,
        save_every: SaveEvery | None = None,
        temporary_every: SaveEvery | None = None,
        backend_options: Mapping[str, Any] | None = None,
        read_only: bool = False,
        storage_options: StorageOptions | None = None,
        process_group: Any = None,
    ) -> None:
        if keep is not None and not isinstance(keep, Keep):
            raise TypeError(
                f"keep= takes retention rules (aptckpt.retention: KeepLast(3) | KeepBest(1)), "
                f"got {keep!r}"
            )
        for name, value, kind in (
            ("best_by", best_by, Metric),
            ("save_every", save_every, SaveEvery),
            ("temporary_every", temporary_every, SaveEvery),
        ):
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"{name}= takes an aptckpt.retention.{kind.__name__}, got {value!r}"
                )
        if not isinstance(model_name, str) or not _PLAIN_NAME.fullmatch(model_name):
            raise ValueError(f"model_name {model_name!r} must be a plain file-name prefix")
        self._run = _rundir.Run.at(run_dir, storage_options)
        #: The run: a ``Path`` for a local run, a URL string for one on object storage.
        self.run_dir: Path | str = self._run.user_path()
        self.backend = backend
        self.model_name = model_name
        ranked = keep.ranks_by_metric if keep is not None else ()
        #: The metric that flags a checkpoint best when it is saved.
        self.best_by: Metric = best_by or (ranked[0] if ranked else Metric())
        #: The retention rules: which regular checkpoints stay.
        self.keep: Keep = keep or KeepLast(3) | KeepBest(1, self.best_by.name, self.best_by.mode)
        self.save_every: SaveEvery = save_every or SaveEvery(epochs=1)
        self.temporary_every: SaveEvery | None = temporary_every
        self.backend_options = dict(backend_options or {})
        self.last_loaded: ResumeInfo | None = None
        #: The record of the last checkpoint this manager saved (as listed, best flag included).
        self.last_saved: CheckpointRecord | None = None
        #: What the last save of this manager wrote (for ``delta``: only the objects it added).
        self.last_save_info: SaveInfo | None = None
        self.read_only = read_only
        self.process_group = process_group
        #: Group rank 0 (or no group): this manager owns the run's lock and index.
        self.coordinator = distributed.group_rank(process_group) == 0
        self._lock: _runlock.RunLock | None = None
        self._in_flight: SaveHandle[Path | str] | None = None
        self._handle_lock = threading.Lock()  # threads of one manager share _in_flight
        self._handle_pid = os.getpid()  # the process whose thread saves _in_flight
        self._handle_lock_pid = os.getpid()
        if not read_only and self.coordinator:
            self._hold_run()

    # ------------------------------------------------------------ the run lock

    def _hold_run(self) -> _runlock.RunLock:
        """Take the run lock if this manager does not hold it (cleaning up after
        crashed saves when it is newly taken); return it."""
        if self.read_only:
            raise ValueError(
                f"this CheckpointManager of '{self.run_dir}' was opened with read_only=True; "
                "open it without read_only to save"
            )
        lock = self._lock
        if lock is not None and lock.held:
            if not lock.still_at(self._run.root):
                raise RunBusyError(
                    f"the run directory '{self.run_dir}' was moved or replaced since this "
                    "manager took it (or, on object storage, its lease lapsed and another "
                    "writer took the run); its saves would start a second run there. Create "
                    "a new CheckpointManager at the run's path",
                    path=str(self.run_dir),
                )
            return lock
        lock = _runlock.acquire(self._run)
        lock.enter()
        try:
            _rundir.refuse_links(self._run)  # before cleaning up inside those folders
        except BaseException:
            lock.leave()
            raise
        self._lock = lock
        _rundir.remove_debris(self._run)
        return lock

    def close(self) -> None:
        """Finish the save in flight (raising its error), then release the run lock
        (other managers of this process may still hold it). A later save takes it again."""
        try:
            self.wait()
            self._flush_history()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.leave()  # released when the last manager and save of the run let go

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ saving

    def should_save_temp(self, global_step: int) -> bool:
        """True when a temporary checkpoint is due at ``global_step`` (``temporary_every``)."""
        return self.temporary_every is not None and self.temporary_every.due(global_step)

    def due(
        self, global_step: int, *, epoch_ended: int | None = None
    ) -> Literal["regular", "temporary"] | None:
        """Which checkpoint is due after ``global_step`` -- with ``epoch_ended``, once that
        epoch (counted from 0) has ended: ``"regular"`` (``save_every``), ``"temporary"``
        (``temporary_every``) or None."""
        if self.save_every.due(global_step, epoch_ended=epoch_ended):
            return "regular"
        if self.temporary_every is not None and self.temporary_every.due(
            global_step, epoch_ended=epoch_ended
        ):
            return "temporary"
        return None

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
        ``is_best=None`` decides by ``best_by``. ``blocking=False``:
        see :meth:`save`.
        """
        files = training_state.tokenizer_files(tokenizer)
        if self.process_group is not None and hasattr(model, "parameters"):
            model_sd, optim_sd = distributed.model_state(model, optimizer)
            model, optimizer = _Saved(model_sd), (_Saved(optim_sd) if optimizer else None)
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
        waits for it, and raises its error if it failed. Saves of one run in one
        process, from any manager or thread, run one at a time.
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
        with self._handles():
            handle, self._in_flight = self._in_flight, None
        if handle is not None and self._handle_pid == os.getpid():
            handle.wait()
        elif handle is not None:  # a forked child: the save is its parent's, on its thread
            log.warning("not waiting for %s: it is being saved by the parent process", handle.path)

    def _handles(self) -> threading.Lock:
        """The lock guarding ``_in_flight``; a forked child gets a new one (another thread
        may have held the parent's at the fork)."""
        if self._handle_lock_pid != os.getpid():
            self._handle_lock, self._handle_lock_pid = threading.Lock(), os.getpid()
        return self._handle_lock

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
        if self.process_group is not None:
            return self._save_collective(
                step,
                state,
                epoch=epoch,
                metrics=metrics,
                batch_index=batch_index,
                temporary=temporary,
                is_best=is_best,
                blocking=blocking,
                tokenizer_files=tokenizer_files,
            )
        started = time.perf_counter()  # the caller's stall starts here (waits included)
        self.wait()
        content = self._content(step, state, epoch, metrics, batch_index, per_rank=False)
        lock = self._hold_run()
        # One save of the run at a time in this process, from numbering the checkpoint to
        # pruning after it: two saves numbering from the same listing would share a number.
        lock.slot.acquire()
        release = _Release(lock.slot)
        handed_off = False  # once persist runs, it releases the slot (on the save thread)
        try:
            self.wait()  # a save another thread started on this manager meanwhile: its error
            records, rel, run_meta = self._number(lock, content, temporary, is_best)
            path = self._run.user_path(rel)
            timing = _SaveTiming(self, rel, step, started, blocking)
            pending = api.prepare_save(
                content,
                path,
                backend=self.backend,
                metadata={_RUN_KEY: run_meta},
                overwrite=False,
                storage_options=self._run.options,
                **self._backend_options(records),
            )

            def persist(snapshot: FlatState) -> Path | str:
                try:
                    self._flush_history()  # the history up to a checkpoint commits before it
                    self.last_save_info = pending.persist(snapshot)
                    self._after_commit(rel)
                    if tokenizer_files:
                        self._write_tokenizer_after_commit(tokenizer_files, path)
                finally:
                    release()
                timing.committed(self.last_save_info)
                return path

            def persist_then_leave(snapshot: FlatState) -> Path | str:
                try:
                    return persist(snapshot)
                finally:
                    lock.leave()

            if blocking:
                with _gc.paused():  # as in api.save: only while the caller waits
                    handed_off = True
                    done = persist(pending.flat)
                timing.returned()
                return done
            lock.enter()  # the run stays locked until this save is done, whoever closes
            try:
                handle = _background.submit(pending.flat, str(path), persist_then_leave)
            except BaseException:
                lock.leave()
                raise
            handed_off = True
            with self._handles():
                self._in_flight, self._handle_pid = handle, os.getpid()
            timing.returned()
            return handle
        except BaseException:
            if not handed_off:
                release()  # nothing will persist: the next save of the run may start
            raise

    def _save_collective(
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
        """:meth:`_save` on every rank of the group: the coordinator numbers the checkpoint
        and decides its best flag (under the run lock), every rank writes its shards, the
        coordinator updates the index and prunes once it committed."""
        from aptckpt.distributed._comm import Comm, describe, failed

        started = time.perf_counter()
        self.wait()
        content = self._content(step, state, epoch, metrics, batch_index, per_rank=True)
        lock = self._hold_run() if self.coordinator else None
        plan: dict[str, Any] | None = None
        error: BaseException | None = None
        with Comm(self.process_group, f"saving a checkpoint of run '{self.run_dir}'") as comm:
            if lock is not None:
                lock.slot.acquire()
            release: Callable[[], None] = _Release(lock.slot) if lock is not None else _nothing
            try:
                if lock is not None:
                    try:
                        _, rel, meta = self._number(lock, content, temporary, is_best)
                        plan = {"rel": rel, "meta": meta}
                    except Exception as err:
                        error = err
                sent = comm.broadcast({"plan": plan, "error": describe(error)}, "plan")
                if error is not None:
                    raise error
                if sent["plan"] is None:
                    raise failed(comm.what, {0: sent["error"]}, comm.size)
                plan = sent["plan"]
            except BaseException:
                release()
                raise
        rel = plan["rel"]
        path = self._run.user_path(rel)
        timing = _SaveTiming(self, rel, step, started, blocking) if self.coordinator else None
        if self.coordinator:
            self._flush_history()  # the history up to a checkpoint commits before it
        try:
            result: Any = api.save(  # type: ignore[call-overload]
                content,
                path,
                backend=self.backend,
                metadata={_RUN_KEY: plan["meta"]},
                storage_options=self._run.options,
                process_group=self.process_group,
                blocking=blocking,
                **self._collective_options(),
            )
        except BaseException:
            release()
            raise

        def after(info: SaveInfo) -> Path | str:
            try:
                self.last_save_info = info
                if self.coordinator:
                    self._after_commit(rel)
                    if tokenizer_files:
                        self._write_tokenizer_after_commit(tokenizer_files, path)
            finally:
                release()
            if timing is not None:
                timing.committed(info)
            return path

        if blocking:
            done = after(result)
            if timing is not None:
                timing.returned()
            return done
        handle = _background.chain(result, after)
        with self._handles():
            self._in_flight, self._handle_pid = handle, os.getpid()
        if timing is not None:
            timing.returned()
        return handle

    def _content(
        self,
        step: int,
        state: Mapping[str, Any],
        epoch: int,
        metrics: Mapping[str, Any] | None,
        batch_index: int | None,
        *,
        per_rank: bool,
    ) -> dict[str, Any]:
        """What a checkpoint of the run holds: ``state`` (through ``state_dict()`` where it
        has one) and the manager's own keys, checked; RNG states per rank in a collective
        save."""
        clash = RESERVED & set(state)
        if clash:
            raise ValueError(f"state keys {sorted(clash)} are reserved by CheckpointManager")
        content: dict[str, Any] = {
            key: value.state_dict() if hasattr(value, "state_dict") else value
            for key, value in state.items()
        }
        rng = capture_rng()
        content.update(
            global_step=training_state.count(step, "step"),
            epoch=training_state.count(epoch, "epoch"),
            batch_index=(
                None if batch_index is None else training_state.count(batch_index, "batch_index")
            ),
            metrics=training_state.plain_metrics(metrics),
            rng=distributed.per_rank(rng) if per_rank else rng,
        )
        return content

    def _number(
        self,
        lock: _runlock.RunLock,
        content: Mapping[str, Any],
        temporary: bool,
        is_best: bool | None,
    ) -> tuple[list[CheckpointRecord], str, dict[str, Any]]:
        """Number the checkpoint of ``content`` (under the run lock's slot): the run's
        records, the checkpoint's path in the run and its run metadata (best flag
        included)."""
        step, epoch = content["global_step"], content["epoch"]
        metrics = content["metrics"]
        _rundir.refuse_links(self._run)
        records = self.checkpoints()
        sequence = max([lock.issued, *(r.sequence for r in records)]) + 1
        if sequence > training_state.MAX_COUNT:
            newest = max(records, key=lambda r: r.sequence)
            raise FormatError(
                f"checkpoint '{newest.rel_path}' claims sequence number {newest.sequence}, "
                "the largest a run may use: a later save could not be numbered after it. "
                "It was not written by this run's saves (copied in, or edited); move it "
                "out of the run",
                path=str(newest.path),
            )
        lock.issued = sequence
        folder = _TEMP if temporary else _REGULAR
        rel = _rundir.free_name(
            self._run, folder, f"{self.model_name}_epoch{epoch}_step{step}", sequence
        )
        if temporary:
            best = False  # temporaries are never the best: retention drops them
        elif is_best is None:
            best = retention.is_best(self.best_by, metrics, records)
        else:
            best = bool(is_best)
        meta = _run_index.run_metadata(
            sequence=sequence,
            kind="temp" if temporary else "epoch",
            epoch=epoch,
            global_step=step,
            batch_index=content["batch_index"],
            metrics=metrics,
            is_best=best,
        )
        return records, rel, meta

    def _restore_collective(
        self,
        objects: Mapping[str, Any],
        checkpoint_path: str | os.PathLike[str] | None,
        *,
        map_location: Any,
        restore_rng: bool,
        check: Callable[[ResumeInfo], None] | None,
    ) -> dict[str, Any]:
        """:meth:`restore` on every rank of the group, at any world size: the coordinator
        resolves the checkpoint, each rank reads its shards into copies of its objects'
        state, ``check`` sees the checkpoint, then the states are installed (a sharded
        model and its optimizer through ``set_state_dict``)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from aptckpt.distributed._comm import Comm, describe, failed

        with Comm(self.process_group, f"resuming run '{self.run_dir}'") as comm:
            found: str | None = None
            error: BaseException | None = None
            if self.coordinator:
                try:
                    found = os.fspath(self.resolve(checkpoint_path))
                except Exception as err:
                    error = err
            sent = comm.broadcast({"path": found, "error": describe(error)}, "resolve")
            if error is not None:
                raise error
            if sent["path"] is None:
                raise failed(comm.what, {0: sent["error"]}, comm.size)
        path: Path | str = sent["path"] if is_url(sent["path"]) else Path(sent["path"])
        model, optimizer = objects.get("model"), objects.get("optimizer")
        sharded = model is not None and hasattr(model, "parameters")
        target: dict[str, Any] = {}
        if sharded:
            model_sd, optim_sd = distributed.model_state(model, optimizer)
            target["model"] = _cloned(model_sd)
            if optimizer is not None:
                target["optimizer"] = _cloned(optim_sd)
        for key, obj in objects.items():
            if obj is not None and key not in target and hasattr(obj, "state_dict"):
                target[key] = _cloned(obj.state_dict())
        options = self._run.options if is_url(path) else None
        result = api.load(
            path,
            into=target,
            strict=False,
            map_location=map_location,
            storage_options=options,
            process_group=self.process_group,
        )
        state = result.state
        if not isinstance(state, dict) or "global_step" not in state:
            raise BackendError(
                f"'{path}' was not written by a CheckpointManager (no global_step); "
                "load it with aptckpt.load()"
            )
        if result.missing_keys:
            raise KeyError(
                f"checkpoint '{path}' holds no state for {len(result.missing_keys)} tensors "
                f"of the objects to restore (e.g. {result.missing_keys[0]})"
            )
        resume = training_state.resume_info(path, state, temporary=_folder_name(path) == _TEMP)
        if check is not None:
            check(resume)
        for key, obj in objects.items():
            if obj is None or (sharded and key in ("model", "optimizer")):
                continue
            if state.get(key) is None:
                raise KeyError(f"checkpoint '{path}' holds no {key!r} state to restore")
            obj.load_state_dict(state[key])
        if sharded:
            assert model is not None
            if optimizer is not None:
                set_state_dict(
                    model,
                    optimizer,
                    model_state_dict=state["model"],
                    optim_state_dict=state["optimizer"],
                )
            else:
                model.load_state_dict(state["model"])
        saved_by = api.inspect(path, storage_options=options).world_size
        if saved_by != comm.size:
            log.warning(
                "resumed '%s' (saved by %d ranks) on %d ranks: weights and optimizer state are "
                "exact; ranks without a saved rank of their own took rank 0's RNG states and "
                "data position, so the data order is re-derived",
                path,
                saved_by,
                comm.size,
            )
        if restore_rng and state.get("rng") is not None:
            restore_rng_states(state["rng"])
        self.last_loaded = resume
        return state

    def _collective_options(self) -> dict[str, Any]:
        """Backend options of a collective save: a ``delta`` run's store (every rank
        writes into it; content addressing stores a chunk once); each rank's base is its
        own part of the run's newest delta checkpoint, found by the backend."""
        options = dict(self.backend_options)
        if self.backend == "delta":
            options.setdefault("store", str(self._run.user_path(_rundir.STORE)))
        return options

    def _after_commit(self, rel: str) -> None:
        """Index, retention and garbage collection once checkpoint ``rel`` has committed,
        all from the checkpoints on disk (a save of another manager of the run may
        have committed since this one was prepared)."""
        listing = _run_index.scan(self._run)
        record = next((r for r in listing.records if r.rel_path == rel), None)
        if record is None:
            raise FormatError(
                f"checkpoint '{rel}' was committed but cannot be listed (see the log); the index "
                "was not updated and nothing was pruned",
                path=self._run.display(rel),
            )
        kept, dropped = retention.split(self.keep, listing.records, record)
        self.last_saved = record
        try:
            self._write_index(kept, listing)  # before deleting: it never lists a deleted one
        except OSError as err:
            raise write_error(
                f"checkpoint '{rel}' was committed, but updating {INDEX_NAME} (the run is listed "
                "from the checkpoints themselves meanwhile; nothing was pruned)",
                err,
                path=self._run.display(),
            ) from err
        for old in dropped:
            self._delete(old)
        if dropped:
            self._collect_garbage()  # deleted checkpoints may leave delta objects unreached
        log.info("checkpoint %s committed (%d bytes)", rel, record.bytes)

    def _write_tokenizer_after_commit(self, files: dict[str, bytes], path: Path | str) -> None:
        try:
            for name, data in files.items():
                _rundir.write_small_file(self._run, _TOKENIZER, name, data)
        except OSError as err:
            raise write_error(
                f"checkpoint '{path}' was committed (with the tokenizer inside), but "
                f"writing the run's {_TOKENIZER}/ files",
                err,
                path=self._run.display(),
            ) from err

    def _backend_options(self, records: list[CheckpointRecord]) -> dict[str, Any]:
        options = dict(self.backend_options)
        if self.backend == "delta":
            options.setdefault("store", self._run.user_path(_rundir.STORE))
            latest = self._newest(r for r in records if r.backend == "delta")
            if latest is not None:
                options.setdefault("base", latest.path)
        return options

    def _delete(self, record: CheckpointRecord) -> None:
        """Delete a checkpoint retention dropped. A failure is logged, not raised: the
        new checkpoint is safe, and the next save tries again."""
        try:
            api.delete(record.path, storage_options=self._run.options)
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
        if not self._run.is_folder(_rundir.STORE):
            return  # none yet (or a link, never followed)
        try:
            collect_garbage(self.run_dir, wait=False, storage_options=self._run.options)
        except StoreBusyError:
            log.info("object store busy; garbage collection postponed to the next save")
        except (AptckptError, OSError) as err:
            log.warning("garbage collection skipped: %s", err)

    # ----------------------------------------------------------- the history

    def log_metrics(self, step: int, /, **metrics: float | torch.Tensor) -> None:
        """Record metrics at ``step`` in the run's history (``history/``, see
        :mod:`aptckpt._history`): what ``aptckpt plot`` draws between checkpoints.

        Cheap: lines are buffered and written as one small file on each save, every
        1000 lines or 30 seconds, and at :meth:`close`. Values are plain numbers (a
        0-d tensor's ``.item()`` is taken); ``step`` is positional, so a metric may be
        named ``step`` (``log_metrics(10, **logs)``). In a process group only group rank 0
        records; the other ranks' calls do nothing.

        Raises:
            ValueError: a read-only manager, or ``step`` is not a non-negative int.
            TypeError: a value is not a number.
        """
        if self.read_only:
            raise ValueError(
                f"this CheckpointManager of '{self.run_dir}' was opened with read_only=True; "
                "open it without read_only to log metrics"
            )
        writer = self._history_writer()
        if writer is not None:
            writer.log_metrics(step, metrics)

    def history(self) -> _history.History:
        """The run's history as recorded so far (metric points by step, one event per
        committed save with its bytes written and time blocked); empty when none was."""
        self._flush_history()
        return _history.read(self._run)

    def _history_writer(self) -> _history.HistoryWriter | None:
        if not self.coordinator or self.read_only:
            return None
        if self._history_out is None:
            self._history_out = _history.HistoryWriter(self._run)
        return self._history_out

    def _flush_history(self) -> None:
        writer = self._history_out
        if writer is None:
            return
        try:
            writer.flush()
        except OSError as err:  # kept in memory: the next flush tries again
            log.warning("run history not written (retried on the next save): %s", err)

    # ----------------------------------------------------------- the index

    def checkpoints(self) -> list[CheckpointRecord]:
        """Every committed checkpoint of the run, oldest first.

        Read from the checkpoints' manifests; the index only saves decoding those
        it describes exactly (:mod:`aptckpt._run_index`).

        Raises:
            UnsupportedFormatVersionError, UnknownBackendError: a checkpoint of the
                run needs a newer aptckpt (it is never skipped, overwritten or pruned).
        """
        return _run_index.scan(self._run).records

    def _write_index(self, records: list[CheckpointRecord], listing: _run_index.Listing) -> None:
        run_info = {
            "model_name": self.model_name,
            "backend": self.backend,
            "best_metric": self.best_by.name,
            "best_mode": self.best_by.mode,
            "keep": repr(self.keep),
        }
        _run_index.write_index(self._run, records, listing.sources, run_info, listing.created_at)

    # ------------------------------------------------------------ queries

    @staticmethod
    def _newest(records: Any) -> CheckpointRecord | None:
        ordered = sorted(records, key=order)
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

    def resolve(self, checkpoint_path: str | os.PathLike[str] | None = None) -> Path | str:
        """The checkpoint named by ``None``/``"latest"``, ``"best"``, a path or a URL.

        A relative path is tried as given, then inside the run directory (for a run on
        object storage: inside the run).
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
                    self.run_dir, f"no regular checkpoint has the metric {self.best_by.name!r}"
                )
            return record.path
        if is_url(checkpoint_path):
            return os.fspath(checkpoint_path)
        path = Path(checkpoint_path)
        if path.is_absolute() or LOCAL.info(os.path.abspath(path)) is not None:
            return path  # a local checkpoint the caller names, wherever the run lives
        if self._run.exists(path.as_posix()):
            return self._run.user_path(path.as_posix())
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
        check: Callable[[ResumeInfo], None] | None = None,
    ) -> tuple[int, int, list[Any], dict[str, Any]]:
        """Restore a checkpoint into the given objects.

        Returns ``(epoch, global_step, loss_history, metrics)``; the rest
        (batch index, temporary or not, config, tokenizer files) is in
        :attr:`last_loaded`. RNG states are restored too unless
        ``restore_rng=False``. ``check`` (see :meth:`restore`) may refuse the
        checkpoint before any object is changed.
        """
        state = self.restore(
            {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler},
            checkpoint_path,
            map_location=map_location,
            restore_rng=restore_rng,
            check=check,
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
        check: Callable[[ResumeInfo], None] | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint's state into every object of ``objects`` that has
        ``load_state_dict`` (``None`` values are skipped); return the whole state.

        ``check(info)``, if given, sees what the checkpoint says (its config, epoch, ...)
        before any object is restored, and may raise to refuse it: a run resumed with
        other settings fails before the model is half loaded."""
        self.wait()
        if self.process_group is not None:
            return self._restore_collective(
                objects,
                checkpoint_path,
                map_location=map_location,
                restore_rng=restore_rng,
                check=check,
            )
        path = self.resolve(checkpoint_path)
        options = self._run.options if is_url(path) else None
        state = api.load(path, map_location=map_location, storage_options=options)
        if not isinstance(state, dict) or "global_step" not in state:
            raise BackendError(
                f"'{path}' was not written by a CheckpointManager (no global_step); "
                "load it with aptckpt.load()"
            )
        temporary = _folder_name(path) == _TEMP
        # Checked before anything is restored: a bad checkpoint changes no object.
        resume = training_state.resume_info(path, state, temporary=temporary)
        if check is not None:
            check(resume)
        for key, obj in objects.items():
            if obj is None:
                continue
            saved = state.get(key)
            if saved is None:
                raise KeyError(f"checkpoint '{path}' holds no {key!r} state to restore")
            obj.load_state_dict(saved)
        if restore_rng and state.get("rng") is not None:
            restore_rng_states(state["rng"])
        self.last_loaded = resume
        return state


def _cloned(value: Any) -> Any:
    """``value`` with every tensor cloned (DTensors stay DTensors): load targets that are
    not the live objects, so a refused checkpoint changes nothing."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cloned(v) for v in value]
    return value


class _Saved:
    """A state dict already taken (a sharded model's, by parameter name), saved as it is."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def state_dict(self) -> Any:
        return self._state

    def load_state_dict(self, state: Any, /) -> Any:
        raise TypeError("a state dict taken for a save is not restored into")


class _SaveTiming:
    """How long a save blocked its caller and how long until it committed, logged to the
    run's history once both are known (for a background save, either may come first)."""

    def __init__(
        self, manager: CheckpointManager, rel: str, step: int, started: float, blocking: bool
    ) -> None:
        self.manager, self.rel, self.step = manager, rel, step
        self.started, self.blocking = started, blocking
        self.lock = threading.Lock()
        self.blocked: float | None = None
        self.saved: tuple[float, SaveInfo | None] | None = None

    def returned(self) -> None:
        with self.lock:
            self.blocked = time.perf_counter() - self.started
        self._log()

    def committed(self, info: SaveInfo | None) -> None:
        with self.lock:
            self.saved = (time.perf_counter() - self.started, info)
        self._log()

    def _log(self) -> None:
        with self.lock:
            if self.blocked is None or self.saved is None:
                return
            blocked, (seconds, info) = self.blocked, self.saved
            self.blocked = None  # logged once
        writer = self.manager._history_writer()
        if writer is None:
            return
        event = _history.SaveEvent(
            path=self.rel,
            step=self.step,
            backend=info.backend if info is not None else self.manager.backend,
            bytes_written=info.stored_bytes if info is not None else 0,
            blocked_s=round(min(blocked, seconds), 6),
            save_s=round(seconds, 6),
            blocking=self.blocking,
            time=round(time.time(), 3),
        )
        try:
            writer.log_save(event)
        except OSError as err:  # the checkpoint committed: a lost history line is no failure
            log.warning("run history not written (retried on the next save): %s", err)


def _nothing() -> None:
    return None


def _folder_name(path: Path | str) -> str:
    """The name of the folder holding checkpoint ``path`` (a local path or a URL)."""
    if is_url(path):
        return os.fspath(path).rstrip("/").rsplit("/", 2)[-2]
    return Path(os.path.abspath(path)).parent.name
