"""The content-addressed object store shared by the ``delta`` checkpoints of a run.

Layout (a folder of a :class:`~aptckpt.storage.base.Storage`, by default
``aptckpt-store`` next to the checkpoints; a local directory or an object-store
prefix such as ``s3://bucket/run/aptckpt-store``)::

    aptckpt-store/
      STORE                 marker: msgpack {"format": "aptckpt-store", "version": 1}
      LOCK                  (local only) flock target: saves and loads hold it shared,
                            garbage collection exclusive
      objects/3fa1c0...     one file per object, named by the XXH3-128 of its bytes (32 hex)
      packs/9b04e2...       one file per save holding its small objects end to end, named
                            by the XXH3-128 of its bytes; manifests record each packed
                            object's pack and offset
      tmp/                  (local only) where saves stage objects before renaming them
                            into objects/; cleared by garbage collection and by the
                            run's next writer

An object is the stored bytes of one chunk. Its name is the digest of exactly
those bytes, so an object is immutable and self-verifying: two writers of one
name write the same bytes, and ``fsck`` needs no manifest. What the bytes mean
(codec, the object it is an xor-delta against) is recorded in the manifests that
reach it, never in the object. The store talks to its storage only through the
storage interface (``put_files``, ``read_range``, ``list``, ``info``,
``remove_file``, ``lock``): no ``os``, ``open`` or paths of its own.

Durability: :meth:`ObjectStore.put` keeps a new object's bytes in memory (owned
bytes: a view of a live tensor is copied first, so an object always holds what
its name says) and hands them to :meth:`Storage.put_files` in batches;
:meth:`ObjectStore.sync` writes what is left, before the manifest that needs
them is committed. ``put_files`` writes each object whole or not at all and
durably (locally: staged in ``tmp/``, all fsynced, renamed, one directory fsync;
object stores: one PUT per object), so a name in ``objects/`` always holds
complete bytes and a crash leaves at worst unreferenced objects. An object
already in the store with the right size is not written again (but see the age
rule below).

Concurrency where the storage has locks (local file systems): a save holds the
store's lock *shared* from before it decides which objects already exist until
its manifest is committed; garbage collection holds it *exclusive*. So collection
never removes an object a save in flight is counting on. A load holds the lock
shared too while it reads objects (:meth:`ObjectStore.reading`; ``flock`` works
on a read-only descriptor, so read-only users take it as well): a checkpoint
deleted while it loads keeps its objects until the load is done -- collection
waits for it, or, when asked not to wait, is postponed.

Object stores (``s3://``, ``memory://``) have no such locks. There the **age
rule** replaces them: garbage collection removes an object that no committed
manifest reaches only once it is older than the grace age
(``APTCKPT_REMOTE_GRACE_S`` seconds, default 3600, the knob the remote storage
uses for the debris of dead saves), because a save in flight may have written it
and not yet committed the manifest that reaches it. A save that finds an
unreferenced object already there reuses it only while it is younger than half
the grace age, and otherwise writes it again (refreshing its age), so a save
that finishes within half the grace age never commits a manifest reaching an
object collection may take meanwhile. An object whose store gives no time is
never collected. What the rule does not cover: deleting the checkpoint a save in
flight deltas against *and* collecting garbage before that save commits (the
manager never does; it deletes old checkpoints after the new one is committed).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import msgpack

from aptckpt import _config
from aptckpt.errors import (
    FormatError,
    IntegrityError,
    StoreBusyError,
    UnreadableError,
    UnsafePathError,
)
from aptckpt.manifest import MANIFEST_NAME, check_relative_path
from aptckpt.storage import LOCAL, Entry, Storage
from aptckpt.storage.local._temps import is_temporary

__all__ = [
    "DEFAULT_STORE_NAME",
    "MAX_STORE_DEPTH",
    "ObjectStore",
    "find_checkpoints",
    "grace_seconds",
    "is_store",
    "location_of",
    "resolve_location",
]

log = logging.getLogger("aptckpt")

DEFAULT_STORE_NAME = "aptckpt-store"
STORE_FORMAT = "aptckpt-store"
STORE_VERSION = 1
_MARKER = "STORE"
_LOCK = "LOCK"
_NAME_BYTES = 16
_MAX_MARKER_BYTES = 4096
#: How far below its store's directory a checkpoint may be.
MAX_STORE_DEPTH = 16
#: New objects held in memory before they are handed to the storage in one batch: large
#: enough that a local batch shares its directory fsync, small enough to bound memory. A full
#: batch is written behind the save (one batch at a time, by a thread of the store's own)
#: while its encoders go on: at most two batches are held.
_BATCH_BYTES = 16 << 20


def grace_seconds() -> float:
    """The age rule's grace (``APTCKPT_REMOTE_GRACE_S``, default 3600 s); see the module
    docstring."""
    return _config.remote_grace_s()


def _local(path: str | os.PathLike[str], storage: Storage | None) -> tuple[Storage, str]:
    if storage is None or storage.local:
        return storage or LOCAL, os.path.abspath(path)
    return storage, os.fspath(path)


def is_store(path: str | os.PathLike[str], storage: Storage | None = None) -> bool:
    """True if ``path`` (local, unless ``storage`` says) is an object store: it holds a
    ``STORE`` marker. False where that cannot be told (a folder this user may not read)."""
    storage, root = _local(path, storage)
    try:
        entry = storage.info(storage.join(root, _MARKER))
    except OSError:  # a directory this user may not search: not one we can use
        return False
    return entry is not None and entry.kind == "file"


def _hex_name(name: bytes) -> str:
    if len(name) != _NAME_BYTES:
        raise ValueError(f"object names are {_NAME_BYTES} bytes, got {len(name)}")
    return name.hex()


class ObjectStore:
    """One object store in ``storage`` at ``root``; see the module docstring.

    Thread-safe for :meth:`put`, :meth:`read`, :meth:`read_into` and :meth:`exists`
    from many threads at once.
    """

    def __init__(self, storage: Storage, root: str) -> None:
        self.storage = storage
        self.root = root
        self.objects = storage.join(root, "objects")
        self.packs = storage.join(root, "packs")
        self._tmp = storage.join(root, "tmp")
        self._lock_path = storage.join(root, _LOCK)
        self._pending: list[tuple[str, bytes]] = []  # (path, bytes), awaiting the storage
        self._pending_bytes = 0
        self._mutex = threading.Lock()
        # The batch being written behind the save, and who may start the next one.
        self._writing: Future[None] | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._write_lock = threading.Lock()

    @property
    def location(self) -> str:
        """The store as users name it (a path or a URL without credentials)."""
        return self.storage.display(self.root)

    # ------------------------------------------------------------ open/create

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        storage: Storage | None = None,
        where: str | None = None,
    ) -> ObjectStore:
        """Open an existing store; ``where`` names the checkpoint that needs it."""
        storage, path = _local(root, storage)
        store = cls(storage, path)
        need = f" (needed by checkpoint '{where}')" if where else ""
        entry = storage.info(path)
        if not is_store(path, storage) and (entry is None or entry.kind == "file"):
            raise IntegrityError(
                f"object store '{store.location}' does not exist{need}. A delta checkpoint "
                "keeps its data in its run's store: copy the whole run directory, or make a "
                "standalone copy with aptckpt.convert() before moving a single checkpoint",
                path=where or store.location,
            )
        store._check_links()
        store._check_marker()
        return store

    def _check_links(self) -> None:
        """Refuse a store whose parts lead elsewhere: its directory, ``objects/``, ``tmp/``
        or ``LOCK`` as a symbolic link (a save would write into, and a collection empty,
        whatever they point to -- another run's store, a user's files)."""
        if not self.storage.local:
            return  # object stores have no links
        for part in (self.root, self.objects, self.packs, self._tmp, self._lock_path):
            entry = self.storage.info(part)
            if entry is not None and entry.kind in ("link", "other"):
                raise UnsafePathError(
                    f"'{part}' is a symbolic link (to '{self.storage.canonical(part)}'); an "
                    "object store never contains links, and nothing was removed, read or "
                    "written through it. Replace the link by a real directory (or file), or "
                    "use another store",
                    path=self.root,
                )

    @classmethod
    def create(cls, root: str | os.PathLike[str], *, storage: Storage | None = None) -> ObjectStore:
        """Open the store at ``root``, creating it (durably) if it does not exist.

        The marker is written first, by a create that fails if one is there: a crash
        leaves no store or a usable one (whose missing folders are made on the next
        open), never a folder that blocks the next save.

        Raises:
            FormatError: ``root`` exists, is not empty and is not a store.
        """
        storage, path = _local(root, storage)
        store = cls(storage, path)
        if not is_store(path, storage):
            entry = storage.info(path)
            # Hidden temporaries are a rival creator's marker being written (it writes
            # nothing else before the marker): the create below settles who wins.
            # The marker may appear between the first look and the listing (a rival's
            # create finished): judged again after the listing.
            if (
                entry is not None
                and (
                    entry.kind != "dir" or any(not is_temporary(e.name) for e in storage.list(path))
                )
                and not is_store(path, storage)
            ):
                raise FormatError(
                    f"'{store.location}' exists and is not an aptckpt object store; pass "
                    "store= another directory for delta checkpoints (or move that one away)",
                    path=store.location,
                )
            storage.makedirs(path)
            marker = msgpack.packb({"format": STORE_FORMAT, "version": STORE_VERSION})
            storage.create_file(storage.join(path, _MARKER), marker)  # False: a rival did
        store._check_links()
        store._check_marker()
        storage.makedirs(store.objects)
        storage.makedirs(store.packs)
        storage.makedirs(store._tmp)  # what older aptckpt versions write objects through
        if storage.has_locks and storage.info(store._lock_path) is None:
            storage.create_file(store._lock_path, b"")
        return store

    def _check_marker(self) -> None:
        marker = self.storage.join(self.root, _MARKER)
        try:
            data = self.storage.read_file(marker, limit=_MAX_MARKER_BYTES)
        except PermissionError as err:
            raise UnreadableError(
                f"cannot read '{self.storage.display(marker)}': {err.strerror}; run as a user "
                "allowed to read the run directory and its object store",
                path=self.location,
            ) from err
        except OSError:
            data = b""
        try:
            doc = msgpack.unpackb(data)
        except Exception:  # msgpack raises many unrelated types for bad input
            doc = None
        shown = self.storage.display(marker)
        if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
            raise FormatError(
                f"'{shown}' is not an aptckpt store marker (the file {_MARKER} is missing or "
                "damaged, or the directory is not an object store)",
                path=self.location,
            )
        version = doc.get("version")
        if type(version) is not int or not 1 <= version <= STORE_VERSION:
            newer = type(version) is int and version > STORE_VERSION
            raise FormatError(
                f"object store marker '{shown}' says layout version {version!r}; this aptckpt "
                f"reads version {STORE_VERSION} ("
                + ("a newer aptckpt is needed" if newer else f"the file {_MARKER} is damaged")
                + ")",
                path=self.location,
            )

    # ---------------------------------------------------------------- locking

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool, wait: bool = True) -> Iterator[None]:
        """Hold the store lock: shared for saves, exclusive for garbage collection (a
        no-op where the storage has no locks: the age rule protects saves there)."""
        try:
            try:
                held = self.storage.lock(self._lock_path, exclusive=exclusive, wait=wait)
                held.__enter__()
            except BlockingIOError as err:
                raise StoreBusyError(
                    f"object store '{self.location}' is in use by a save, a load or a "
                    "collection in progress; try again when it finishes",
                    path=self.location,
                ) from err
            try:
                yield
            finally:
                held.__exit__(None, None, None)
        finally:
            self.discard_pending()  # a save that commits has synced everything

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the store lock shared while a load reads objects, so that garbage
        collection cannot remove them meanwhile (it waits, or is postponed).

        Where the lock file cannot be opened at all (a store copied without it onto
        a read-only medium, a user who may not read it), the load goes on without:
        nothing else can collect there either, unless the owner of the store does.
        """
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.storage.lock(self._lock_path, exclusive=False))
            except UnsafePathError:
                raise
            except OSError as err:
                log.debug("reading store %s without its lock: %s", self.location, err)
            yield

    # ---------------------------------------------------------------- objects

    def path(self, name: bytes) -> str:
        """Where object ``name`` lives, in the storage's spelling."""
        return self.storage.join(self.objects, _hex_name(name))

    def label(self, name: bytes) -> str:
        """How messages name an object: locally relative to the store's parent directory,
        on object stores its URL."""
        if self.storage.local:
            return f"{self.storage.name(self.root)}/objects/{_hex_name(name)}"
        return self.storage.display(self.path(name))

    def pack_path(self, name: bytes) -> str:
        """Where pack ``name`` lives, in the storage's spelling."""
        return self.storage.join(self.packs, _hex_name(name))

    def pack_label(self, name: bytes) -> str:
        """How messages name a pack (as :meth:`label` names an object)."""
        if self.storage.local:
            return f"{self.storage.name(self.root)}/packs/{_hex_name(name)}"
        return self.storage.display(self.pack_path(name))

    def info(self, name: bytes, *, pack: bool = False) -> Entry | None:
        """What is stored under object (or pack) ``name`` (not following a link), or None."""
        try:
            return self.storage.info(self.pack_path(name) if pack else self.path(name))
        except PermissionError as err:
            raise UnreadableError(
                f"cannot read object '{self.label(name)}': {err.strerror}; load as a user "
                "allowed to read the run's object store, or fix its permissions",
                path=self.location,
            ) from err

    def exists(self, name: bytes, size: int, *, pack: bool = False) -> bool:
        entry = self.storage.info(self.pack_path(name) if pack else self.path(name))
        return entry is not None and entry.kind == "file" and entry.size == size

    def _reusable(self, name: bytes, size: int, path: str | None = None) -> bool:
        """True if a save may count on the object already stored under ``name`` instead
        of writing it: the right size, and (without locks) young enough that garbage
        collection will not take it before the save commits."""
        entry = self.storage.info(path or self.path(name))
        if entry is None or entry.kind != "file" or entry.size != size:
            return False
        if self.storage.has_locks or entry.mtime <= 0:
            return True
        return time.time() - entry.mtime < grace_seconds() / 2

    def put(self, name: bytes, data: memoryview | bytes) -> int:
        """Store ``data``, whose digest is ``name``, unless the store has it.

        Returns the number of bytes written (0 when the object already existed). The
        object is written, durably, in a batch or at the next :meth:`sync` at the latest.
        """
        if self._reusable(name, len(data)):
            return 0
        owned = data if isinstance(data, bytes) else bytes(data)
        batch = None
        with self._mutex:
            self._pending.append((self.path(name), owned))
            self._pending_bytes += len(owned)
            if self._pending_bytes >= _BATCH_BYTES:
                batch, self._pending, self._pending_bytes = self._pending, [], 0
        if batch:
            self._write_behind(batch)
        return len(owned)

    def _write_behind(self, batch: list[tuple[str, bytes]]) -> None:
        """Start writing ``batch`` in the background once the batch before it is written
        (raising its error): the caller waits only when the storage is a batch behind."""
        with self._write_lock:
            self._wait_written()
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="aptckpt-store")
            self._writing = self._writer.submit(self._put_batch, batch)

    def _wait_written(self) -> None:
        """Wait for the batch written behind, if any; raise its error (``_write_lock`` held)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def _put_batch(self, batch: list[tuple[str, bytes]], threads: int = 4) -> None:
        # Those written before a failure are unreferenced objects: GC's job. Locally,
        # temporaries go to tmp/ (cleared under the exclusive lock): one rename per object,
        # no lock file per object.
        staging = self._tmp if self.storage.local else None
        if staging is not None:
            self.storage.makedirs(staging)
        self.storage.put_files(batch, threads=threads, staging=staging)

    def put_pack(self, data: bytes) -> tuple[bytes, int]:
        """Store ``data`` as one pack, named by its XXH3-128, unless the store has it;
        ``(name, bytes written)``. Written, durably, at the next :meth:`sync`, with the
        loose objects still pending (one directory fsync for both locally)."""
        from aptckpt import _accel  # the store's users have imported it already

        name = bytes(_accel.xxh3_128(data))
        path = self.pack_path(name)
        if self._reusable(name, len(data), path):
            return name, 0
        with self._mutex:
            self._pending.append((path, data))
            self._pending_bytes += len(data)
        return name, len(data)

    def _read_range(
        self, kind: str, label: str, folder: str, path: str, offset: int, length: int
    ) -> bytes:
        """Up to ``length`` bytes of the object or pack file at ``path`` from ``offset``,
        each way it can fail named (``kind``: "object" or "pack"; ``folder``: where it lies,
        which must not be a link)."""
        if self.storage.local:
            entry = self.storage.info(folder)
            if entry is not None and entry.kind in ("link", "other"):
                raise UnsafePathError(
                    f"'{label}' is reached through a symbolic link; stores never contain links",
                    path=self.location,
                )
        try:
            return self.storage.read_range(path, offset, length)
        except FileNotFoundError as err:
            raise IntegrityError(
                f"{kind} '{label}' is missing from the store (removed by hand, or the run was "
                "copied without it)",
                path=self.location,
                file=label,
            ) from err
        except PermissionError as err:
            raise UnreadableError(
                f"cannot read {kind} '{label}': {err.strerror}; load as a user allowed to "
                "read the run's object store, or fix its permissions",
                path=self.location,
            ) from err
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EINVAL):
                what = "a symbolic link" if err.errno == errno.ELOOP else "not a regular file"
                raise UnsafePathError(
                    f"'{label}' is {what}; stores hold regular files only", path=self.location
                ) from err
            raise

    def read_packed(self, pack: bytes, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of pack ``pack`` (several objects at once when the
        caller coalesces neighbours)."""
        label = self.pack_label(pack)
        data = self._read_range("pack", label, self.packs, self.pack_path(pack), offset, size)
        if len(data) != size:
            raise IntegrityError(
                f"pack '{label}' ends before offset {offset + size} (the manifest places an "
                "object there): it was truncated",
                path=self.location,
                file=label,
            )
        return data

    def sync(self, threads: int = 4) -> None:
        """Make every object :meth:`put` since the last call durable under its name."""
        with self._mutex:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
        with self._write_lock:
            try:
                self._wait_written()
            finally:
                self._stop_writer()
            if pending:
                self._put_batch(pending, threads)

    def discard_pending(self) -> None:
        """Drop the objects :meth:`put` but never written (a failed save), after the batch
        being written behind, if any, has ended (its error is the failed save's concern)."""
        with self._mutex:
            self._pending, self._pending_bytes = [], 0
        with self._write_lock:
            with contextlib.suppress(Exception):
                self._wait_written()
            self._stop_writer()

    def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def read_into(self, name: bytes, out: memoryview) -> None:
        """Fill ``out`` with the object ``name``, which must be exactly ``len(out)`` bytes."""
        out[:] = self.read(name, len(out))

    def read(self, name: bytes, size: int) -> bytes:
        """The object ``name``, which must be exactly ``size`` bytes."""
        label = self.label(name)
        data = self._read_range("object", label, self.objects, self.path(name), 0, size + 1)
        if len(data) != size:
            entry = self.storage.info(self.path(name))
            actual = entry.size if entry is not None else len(data)
            raise IntegrityError(
                f"object '{label}' is {actual} bytes, manifest says {size}",
                path=self.location,
                file=label,
            )
        return data

    # -------------------------------------------------------- maintenance

    def entries(self) -> Iterator[tuple[bytes, str, Entry]]:
        """Every well-named object: ``(name, path, entry)``. Other files are skipped."""
        return self._listed("objects", self.objects, missing_ok=False)

    def pack_entries(self) -> Iterator[tuple[bytes, str, Entry]]:
        """Every well-named pack: ``(name, path, entry)``; nothing for a store without
        ``packs/`` (made by an older aptckpt)."""
        return self._listed("packs", self.packs, missing_ok=True)

    def _listed(
        self, what: str, folder: str, *, missing_ok: bool
    ) -> Iterator[tuple[bytes, str, Entry]]:
        try:
            listed = self.storage.list(folder)
        except FileNotFoundError:
            if not missing_ok:
                raise
            return
        except PermissionError as err:
            raise UnreadableError(
                f"cannot list the {what} of store '{self.location}': {err.strerror}; run as "
                "a user allowed to read the whole run directory, or fix its permissions",
                path=folder,
            ) from err
        for entry in listed:
            if len(entry.name) != 2 * _NAME_BYTES or entry.kind != "file":
                continue
            try:
                name = bytes.fromhex(entry.name)
            except ValueError:
                continue
            yield name, self.storage.join(folder, entry.name), entry

    def names(self) -> Iterator[tuple[bytes, str, int]]:
        """Every well-named object: ``(name, path, size)``."""
        for name, path, entry in self.entries():
            yield name, path, entry.size

    def clear_tmp(self) -> int:
        """Remove every file in ``tmp/`` (left by saves that died); only safe under the
        exclusive lock."""
        entry = self.storage.info(self._tmp)
        if entry is not None and entry.kind in ("link", "other"):  # never empty its target
            raise UnsafePathError(
                f"'{self._tmp}' is a symbolic link; an object store never contains links and "
                "nothing was removed through it",
                path=self.root,
            )
        removed = 0
        for found in self.storage.list(self._tmp):
            if found.kind != "dir":
                self.storage.remove_file(self.storage.join(self._tmp, found.name))
                removed += 1
        return removed


def find_checkpoints(
    home: str | os.PathLike[str],
    *,
    skip: str | os.PathLike[str] | None = None,
    strict: bool = False,
    storage: Storage | None = None,
) -> Iterator[str]:
    """Committed checkpoints beneath ``home`` (at most ``MAX_STORE_DEPTH`` deep).

    Links, the folder ``skip`` (the store) and the temp and trash entries of saves
    are not entered. A folder this user may not list or search is skipped, or with
    ``strict`` raises :class:`UnreadableError` naming it (garbage collection must not
    assume that nothing in it reaches the store).
    """
    storage, top = _local(home, storage)
    skipped = _local(skip, storage)[1] if skip is not None else None
    pending = [(top, 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            entries = storage.list(folder)
        except NotADirectoryError:
            continue
        except PermissionError as err:
            if strict:
                raise _unreadable_directory(storage, folder, err) from err
            continue
        for entry in entries:
            if entry.kind != "dir" or is_temporary(entry.name):
                continue
            path = storage.join(folder, entry.name)
            if path == skipped:
                continue
            try:
                manifest = storage.info(storage.join(path, MANIFEST_NAME))
            except PermissionError as err:  # a directory that cannot be searched
                if strict:
                    raise _unreadable_directory(storage, path, err) from err
                manifest = None
            except OSError:
                manifest = None
            if manifest is not None and manifest.kind == "file":
                yield path
            if depth + 1 < MAX_STORE_DEPTH:
                pending.append((path, depth + 1))


def _unreadable_directory(storage: Storage, path: str, err: OSError) -> UnreadableError:
    shown = storage.display(path)
    return UnreadableError(f"cannot read directory '{shown}': {err.strerror or err}", path=shown)


def _parts(storage: Storage, path: str) -> list[str]:
    return [p for p in storage.canonical(path).split("/") if p]


def location_of(
    store_root: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    storage: Storage | None = None,
) -> tuple[int, str]:
    """How a checkpoint names its store: ``(up, name)``, the store being
    ``checkpoint/..(up times)/name``.

    The store must sit in a folder that contains the checkpoint, so that the
    checkpoints using it are all found beneath that folder by garbage collection,
    and copying that folder moves the run whole.

    Raises:
        UnsafePathError: the store is elsewhere.
    """
    storage, root = _local(store_root, storage)
    ckpt = _local(checkpoint, storage)[1]
    name = storage.name(root)
    home = _parts(storage, storage.parent(root))
    parent = _parts(storage, storage.parent(ckpt))
    rel = parent[len(home) :] if parent[: len(home)] == home else None
    if rel is None or not name or name.startswith("."):
        suggested = storage.join(storage.parent(ckpt), DEFAULT_STORE_NAME)
        raise UnsafePathError(
            f"the object store '{storage.display(root)}' must be a directory next to the "
            f"checkpoint '{storage.display(ckpt)}' or next to one of its parent directories "
            f"(e.g. '{storage.display(suggested)}')",
            path=storage.display(ckpt),
        )
    check_relative_path(name)
    _check_visible(storage, storage.parent(root), rel, ckpt, root)
    up = len(rel) + 1
    if up > MAX_STORE_DEPTH:
        raise UnsafePathError(
            f"checkpoint '{storage.display(ckpt)}' is {up} levels below its store's "
            f"directory; at most {MAX_STORE_DEPTH} are allowed",
            path=storage.display(ckpt),
        )
    return up, name


def _check_visible(storage: Storage, home: str, rel: list[str], ckpt: str, store: str) -> None:
    """Refuse a checkpoint that garbage collection would not find beneath ``home``: its
    walk skips the store, other stores and hidden temporary names, so the objects of a
    checkpoint saved there would look unreachable and be removed."""
    shown = storage.display(ckpt)
    for part in (*rel, storage.name(ckpt)):
        if is_temporary(part):
            raise UnsafePathError(
                f"'{part}' in '{shown}' is a name aptckpt gives the hidden entries of "
                "saves in progress; garbage collection does not look inside them, so it would "
                "remove this checkpoint's objects. Choose another name",
                path=shown,
            )
    inside = home
    for part in (*rel, storage.name(ckpt)):
        inside = storage.join(inside, part)
        if inside == store or is_store(inside, storage):
            raise UnsafePathError(
                f"'{shown}' is inside the object store '{storage.display(inside)}', where "
                "garbage collection does not look for checkpoints (it would remove this "
                "one's objects); save it next to the store instead",
                path=shown,
            )


def resolve_location(
    checkpoint: str | os.PathLike[str],
    up: object,
    name: object,
    *,
    where: str,
    storage: Storage | None = None,
) -> str:
    """The store a manifest names, validated (the inverse of :func:`location_of`)."""
    if type(up) is not int or not 1 <= up <= MAX_STORE_DEPTH:
        raise FormatError(f"store location 'up' = {up!r} is out of range", path=where)
    check_relative_path(name, where=where)
    assert isinstance(name, str)
    if "/" in name:
        raise UnsafePathError(f"store name {name!r} must be one path component", path=where)
    storage, ckpt = _local(checkpoint, storage)
    path = storage.canonical(ckpt)
    for _ in range(up):
        parent = storage.parent(path)
        # Locally "/" is the top (its parent is itself); on an object store the bucket is.
        if parent == path or (not storage.local and "/" not in path.strip("/")):
            raise FormatError(f"store location 'up' = {up} climbs above the top", path=where)
        path = parent
    return storage.join(path, name)
