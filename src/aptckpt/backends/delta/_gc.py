"""Garbage collection of a ``delta`` object store: reachability from the committed
manifests, plus the age rule on storages without locks (see :mod:`aptckpt.objectstore`)."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from aptckpt import objectstore
from aptckpt.backends.delta._format import parse_payload
from aptckpt.errors import (
    AptckptError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    StoreNotFoundError,
    UnreadableError,
    UnsafePathError,
    WriteError,
)
from aptckpt.objectstore import ObjectStore
from aptckpt.storage import LOCAL, Storage, StorageOptions, resolve

__all__ = ["GarbageReport", "collect_garbage", "find_store"]

log = logging.getLogger("aptckpt")


@dataclass(frozen=True)
class GarbageReport:
    """What :func:`collect_garbage` found and did.

    ``young_objects`` counts unreferenced objects kept by the age rule (object stores
    only: a save in flight may still commit a manifest reaching them). Packs are
    counted apart (``kept_packs``, ``removed_packs``, young ones in ``young_objects``);
    their bytes are in ``kept_bytes`` and ``removed_bytes``. A pack is kept whole while
    any committed checkpoint reaches an object in it, and removed whole once none does;
    it is never rewritten (saves keep every pack they reach at least half live, see
    ``aptckpt._config.DELTA_PACK_MIN_USE``).
    """

    store: str
    checkpoints: int
    kept_objects: int
    kept_bytes: int
    removed_objects: int
    removed_bytes: int
    dry_run: bool
    young_objects: int = 0
    kept_packs: int = 0
    removed_packs: int = 0


def find_store(path: str | os.PathLike[str], storage: Storage | None = None) -> ObjectStore:
    """The store at ``path``, or in ``path/aptckpt-store`` (a run directory); ``path``
    is local unless ``storage`` is given."""
    storage = storage or LOCAL
    text = os.path.abspath(path) if storage.local else os.fspath(path)
    for candidate in (text, storage.join(text, objectstore.DEFAULT_STORE_NAME)):
        try:
            storage.info(storage.join(candidate, "STORE"))  # this user may read it?
        except PermissionError as err:
            raise UnreadableError(
                f"cannot read '{storage.display(candidate)}': {err.strerror}; run as a user "
                "allowed to read the run directory and its object store",
                path=storage.display(candidate),
            ) from err
        if objectstore.is_store(candidate, storage):
            return ObjectStore.open(candidate, storage=storage)
    shown = storage.display(text)
    inside = storage.display(storage.join(text, objectstore.DEFAULT_STORE_NAME))
    raise StoreNotFoundError(
        f"no object store at '{shown}': neither it nor '{inside}' holds a STORE marker; "
        "pass the store directory or the run directory that contains it",
        path=shown,
    )


def collect_garbage(
    path: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    wait: bool = True,
    storage_options: StorageOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GarbageReport:
    """Remove the objects of a store that no committed delta checkpoint reaches.

    ``path`` is the store or the run directory holding it: a local path or a URL
    (``s3://bucket/run``; ``storage_options`` configure its file system). The
    checkpoints using the store are found beneath the store's folder.

    On the local file system this holds the store's lock exclusively, so no save is
    in flight meanwhile and no load is reading objects (loads hold it shared: a
    checkpoint deleted while it loads keeps its objects until the load is done). On
    object stores, which have no locks, an unreferenced object is removed only once
    it is older than ``APTCKPT_REMOTE_GRACE_S`` (default 3600 s): a save in flight
    may have written it and not committed its manifest yet.

    ``progress(advance, total)`` is called as checkpoints and store objects are
    examined: ``total`` is first the checkpoints found, then grows by the objects
    listed once their listing is in; the advances add up to it.

    Raises:
        StoreNotFoundError: ``path`` is not a store or a directory holding one.
        StoreBusyError: ``wait=False`` and a save or a load holds the store.
        FormatError: a checkpoint's manifest cannot be read; nothing is removed,
            since the objects that checkpoint reaches are unknown.
        UnreadableError: this user may not read a directory beneath the store's
            directory, a manifest, or the store; nothing is removed, for the same reason.
        UnsafePathError: the store or its ``objects/`` is a symbolic link.
        WriteError: an object could not be removed (a read-only file system,
            permissions); those removed before were unreachable, nothing else changed.
    """
    storage, where = resolve(path, storage_options)
    store = find_store(where, storage)
    if storage.local:
        for link in (store.root, store.objects):
            # Through a link, the checkpoints using those objects may live beneath another
            # directory -- another run's, if a hostile run directory links to its store --
            # and collecting would delete what they reach.
            entry = storage.info(link)
            if entry is not None and entry.kind in ("link", "other"):
                raise UnsafePathError(
                    f"refusing to collect garbage: '{link}' is a symbolic link to "
                    f"'{storage.canonical(link)}', so the checkpoints using its objects may "
                    "live anywhere and none is known unreachable; nothing was removed. "
                    "Collect in the run directory that really holds the store",
                    path=link,
                )
    try:
        with store.lock(exclusive=True, wait=wait):
            count = _Count(progress)
            reachable, checkpoints = _reachable(store, count)
            report = _remove_unreachable(
                store, reachable, checkpoints, dry_run=dry_run, count=count
            )
    except UnreadableError as err:
        home = storage.display(storage.parent(store.root))
        raise UnreadableError(
            f"refusing to collect garbage in '{store.location}': {err}. A checkpoint there "
            "may reach objects of the store, so none is known unreachable and nothing was "
            f"removed; run it as a user who can read all of '{home}', or fix the permissions",
            path=err.path,
        ) from err
    except OSError as err:
        if isinstance(err, AptckptError):
            raise
        raise _gc_write_error(store, err) from err
    log.info("collected garbage in %s: %s", store.location, report)
    return report


class _Count:
    """Items examined, for a ``progress`` callback (or none)."""

    def __init__(self, progress: Callable[[int, int], None] | None) -> None:
        self.progress, self.total = progress, 0

    def grow(self, n: int) -> None:
        self.total += n
        if self.progress is not None:
            self.progress(0, self.total)

    def step(self) -> None:
        if self.progress is not None:
            self.progress(1, self.total)


def _reachable(store: ObjectStore, count: _Count) -> tuple[set[tuple[bytes, bool]], int]:
    """The files (``(object name, False)`` or ``(pack name, True)``) every committed delta
    checkpoint using ``store`` reaches, and how many checkpoints those are."""
    storage = store.storage
    reachable: set[tuple[bytes, bool]] = set()
    checkpoints = 0
    home = storage.parent(store.root)
    found = list(objectstore.find_checkpoints(home, skip=store.root, strict=True, storage=storage))
    count.grow(len(found))
    for ckpt in found:
        count.step()
        where = storage.display(ckpt)
        try:
            with storage.open_checkpoint(ckpt) as reader:
                manifest = reader.read_manifest()
            if manifest.backend != "delta":
                continue
            # A checkpoint saved by a process group: one payload per rank's part.
            parts = (
                [manifest.part(p) for p in range(len(manifest.parts))]
                if manifest.sharded
                else [manifest]
            )
            payloads = [parse_payload(part, where) for part in parts]
            roots = {storage.canonical(p.store_root(storage, ckpt, where)) for p in payloads}
        except CheckpointNotFoundError:
            continue  # deleted while we looked
        except (FormatError, IntegrityError) as err:
            raise FormatError(
                f"cannot read checkpoint '{where}' ({err}); garbage collection removed "
                "nothing, since it cannot tell which objects that checkpoint reaches. "
                "Repair or delete it, then collect again",
                path=where,
            ) from err
        if storage.canonical(store.root) not in roots:
            continue
        checkpoints += 1
        for payload in payloads:
            reachable.update(
                (o.pack, True) if o.pack is not None else (o.name, False) for o in payload.objects
            )
    return reachable, checkpoints


def _remove_unreachable(
    store: ObjectStore,
    reachable: set[tuple[bytes, bool]],
    checkpoints: int,
    *,
    dry_run: bool,
    count: _Count,
) -> GarbageReport:
    storage = store.storage
    # Without locks a save may be in flight: its objects are young (the age rule).
    cutoff = None if storage.has_locks else time.time() - objectstore.grace_seconds()
    kept = [0, 0]  # objects, packs
    removed = [0, 0]
    kept_bytes = removed_bytes = young = 0
    entries = [(n, f, e, False) for n, f, e in store.entries()]
    entries += [(n, f, e, True) for n, f, e in store.pack_entries()]
    count.grow(len(entries))
    for name, file, entry, pack in entries:
        count.step()
        if (name, pack) in reachable:
            kept[pack] += 1
            kept_bytes += entry.size
            continue
        if cutoff is not None and (entry.mtime <= 0 or entry.mtime > cutoff):
            young += 1
            kept[pack] += 1
            kept_bytes += entry.size
            continue
        if not dry_run:
            storage.remove_file(file)
        removed[pack] += 1
        removed_bytes += entry.size
    if not dry_run and storage.has_locks:
        store.clear_tmp()  # older versions' temp files: only under the exclusive lock
    return GarbageReport(
        store.location,
        checkpoints,
        kept[0],
        kept_bytes,
        removed[0],
        removed_bytes,
        dry_run,
        young,
        kept[1],
        removed[1],
    )


def _gc_write_error(store: ObjectStore, err: OSError) -> WriteError:
    where = f" ('{err.filename}')" if err.filename else ""
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        remedy = (
            "check the permissions of the store (or whether its file system is mounted "
            "read-only), then collect again"
        )
    else:
        remedy = "fix the cause, then collect again"
    return WriteError(
        f"collecting garbage in '{store.location}' failed: {err.strerror or err}{where}; the "
        f"objects removed before were unreachable and every checkpoint is intact; {remedy}",
        path=store.location,
        errno_=err.errno,
    )
