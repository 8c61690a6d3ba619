"""The content-addressed object store shared by the ``delta`` checkpoints of a run.

Layout (a directory inside the run directory, by default ``aptckpt-store``)::

    aptckpt-store/
      STORE                 marker: msgpack {"format": "aptckpt-store", "version": 1}
      LOCK                  flock target: saves hold it shared, garbage collection exclusive
      objects/3fa1c0...     one file per object, named by the XXH3-128 of its bytes (32 hex)
      tmp/                  objects being written (renamed into objects/ once durable)

An object is the stored bytes of one chunk. Its name is the digest of exactly
those bytes, so a file in ``objects/`` is immutable and self-verifying: two
writers of one name write the same bytes, and ``fsck`` needs no manifest. What
the bytes mean (codec, the object it is an xor-delta against) is recorded in the
manifests that reach it, never in the object.

Durability: :meth:`ObjectStore.put` writes an object to ``tmp/``;
:meth:`ObjectStore.sync` fsyncs every pending object (in parallel, so the
filesystem journal commits them together), renames each to its name and fsyncs
``objects/`` once, before the manifest that needs them is written. So a name in
``objects/`` always holds complete bytes, and a crash leaves at worst
unreferenced objects and files in ``tmp/``, which garbage collection removes.
``objects/`` is one flat directory: one directory fsync per save, however many
objects it adds (ext4, xfs and btrfs index large directories).

Concurrency: a save holds the store's lock *shared* from before it decides
which objects already exist until its manifest is committed; garbage collection
holds it *exclusive*. So collection never removes an object a save in flight is
counting on, and the files in ``tmp/`` (whose names carry no owner) are only
removed under the exclusive lock, when no save can own one. A load holds the
lock shared too while it reads objects (:meth:`ObjectStore.reading`; ``flock``
works on a read-only descriptor, so read-only users take it as well): a
checkpoint deleted while it loads keeps its objects until the load is done --
collection waits for it, or, when asked not to wait, is postponed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack

from aptckpt.errors import (
    FormatError,
    IntegrityError,
    StoreBusyError,
    UnreadableError,
    UnsafePathError,
)
from aptckpt.manifest import MANIFEST_NAME, check_relative_path
from aptckpt.storage.local._atomic import (
    fsync_dir,
    fsync_file,
    is_temporary,
    open_regular,
    temp_sibling,
    write_file_atomic,
)

__all__ = [
    "DEFAULT_STORE_NAME",
    "MAX_STORE_DEPTH",
    "ObjectStore",
    "find_checkpoints",
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


def is_store(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is an object store (it holds a ``STORE`` marker)."""
    return os.path.isfile(os.path.join(path, _MARKER))


def _hex_name(name: bytes) -> str:
    if len(name) != _NAME_BYTES:
        raise ValueError(f"object names are {_NAME_BYTES} bytes, got {len(name)}")
    return name.hex()


class ObjectStore:
    """One object store directory; see the module docstring.

    Thread-safe for :meth:`put`, :meth:`read_into` and :meth:`exists` from many
    threads at once.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self._tmp = root / "tmp"
        self._pending: list[tuple[Path, Path]] = []  # (temp file, final name), awaiting sync()

    # ------------------------------------------------------------ open/create

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, where: str | None = None) -> ObjectStore:
        """Open an existing store; ``where`` names the checkpoint that needs it."""
        path = Path(os.path.abspath(root))
        need = f" (needed by checkpoint '{where}')" if where else ""
        if not path.is_dir():
            raise IntegrityError(
                f"object store '{path}' does not exist{need}. A delta checkpoint keeps its data in "
                "its run's store: copy the whole run directory, or make a standalone copy with "
                "aptckpt.convert() before moving a single checkpoint",
                path=where or str(path),
            )
        store = cls(path)
        store._check_marker()
        store._check_links()
        return store

    def _check_links(self) -> None:
        """Refuse a store whose parts lead elsewhere: its directory, ``objects/``, ``tmp/``
        or ``LOCK`` as a symbolic link (a save would write into, and a collection empty,
        whatever they point to -- another run's store, a user's files)."""
        for part in (self.root, self.objects, self._tmp, self.root / _LOCK):
            if part.is_symlink():
                raise UnsafePathError(
                    f"'{part}' is a symbolic link (to '{os.path.realpath(part)}'); an object "
                    "store never contains links, and nothing was removed, read or written "
                    "through it. Replace the link by a real directory (or file), or use "
                    "another store",
                    path=str(self.root),
                )

    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> ObjectStore:
        """Open the store at ``root``, creating it (durably) if it does not exist.

        Raises:
            FormatError: ``root`` exists, is not empty and is not a store.
        """
        path = Path(os.path.abspath(root))
        if is_store(path):
            store = cls(path)
            store._check_marker()
            store._check_links()
            store.objects.mkdir(exist_ok=True)
            store._tmp.mkdir(exist_ok=True)
            return store
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FormatError(
                f"'{path}' exists and is not an aptckpt object store; pass store= another "
                "directory for delta checkpoints (or move that one away)",
                path=str(path),
            )
        # Build the store in a hidden sibling and rename it into place: a crash
        # leaves either no store or a complete one (plus hidden debris that the
        # next save's cleanup removes), never a directory without its marker.
        path.parent.mkdir(parents=True, exist_ok=True)
        with temp_sibling(path) as building:
            try:
                building.mkdir()
                (building / "objects").mkdir()
                (building / "tmp").mkdir()
                (building / _LOCK).touch()
                marker = msgpack.packb({"format": STORE_FORMAT, "version": STORE_VERSION})
                write_file_atomic(building / _MARKER, marker)
                fsync_dir(building)
                try:
                    if path.exists():
                        path.rmdir()  # the empty directory a user made for us
                    os.rename(building, path)
                except OSError as err:
                    if not is_store(path):  # not a rival creator that got there first
                        raise FormatError(
                            f"cannot create the object store '{path}': {err.strerror}",
                            path=str(path),
                        ) from err
                fsync_dir(path.parent)
            finally:
                shutil.rmtree(building, ignore_errors=True)
        return cls.open(path)

    def _check_marker(self) -> None:
        fd = open_regular(self.root / _MARKER, _MARKER, self.root)
        try:
            data = os.read(fd, _MAX_MARKER_BYTES + 1)
        finally:
            os.close(fd)
        try:
            doc = msgpack.unpackb(data) if len(data) <= _MAX_MARKER_BYTES else None
        except Exception:  # msgpack raises many unrelated types for bad input
            doc = None
        marker = self.root / _MARKER
        if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
            raise FormatError(
                f"'{marker}' is not an aptckpt store marker (the file {_MARKER} is damaged, or "
                "the directory is not an object store)",
                path=str(self.root),
            )
        version = doc.get("version")
        if type(version) is not int or not 1 <= version <= STORE_VERSION:
            newer = type(version) is int and version > STORE_VERSION
            raise FormatError(
                f"object store marker '{marker}' says layout version {version!r}; this aptckpt "
                f"reads version {STORE_VERSION} ("
                + ("a newer aptckpt is needed" if newer else f"the file {_MARKER} is damaged")
                + ")",
                path=str(self.root),
            )

    # ---------------------------------------------------------------- locking

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool, wait: bool = True) -> Iterator[None]:
        """Hold the store lock: shared for saves, exclusive for garbage collection."""
        fd = self._open_lock()
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as err:
                raise StoreBusyError(
                    f"object store '{self.root}' is in use by a save, a load or a collection in "
                    "progress; try again when it finishes",
                    path=str(self.root),
                ) from err
            yield
        finally:
            try:
                self.discard_pending()  # a save that commits has synced everything
            finally:
                os.close(fd)  # releases the lock

    def _open_lock(self) -> int:
        path = self.root / _LOCK
        try:
            # O_NOFOLLOW: a LOCK planted as a link would create its target outside the run
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UnsafePathError(
                    f"'{path}' is a symbolic link; an object store never contains links",
                    path=str(self.root),
                ) from err
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # A user who may only read the store, or a read-only mount: flock works on a
            # read-only descriptor too.
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the store lock shared while a load reads objects, so that garbage
        collection cannot remove them meanwhile (it waits, or is postponed).

        Where the lock file cannot be opened at all (a store copied without it onto
        a read-only medium, a user who may not read it), the load goes on without:
        nothing else can collect there either, unless the owner of the store does.
        """
        try:
            fd = self._open_lock()
        except OSError as err:
            log.debug("reading store %s without its lock: %s", self.root, err)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- objects

    def path(self, name: bytes) -> Path:
        return self.objects / _hex_name(name)

    def label(self, name: bytes) -> str:
        """How messages name an object: relative to the store's parent directory."""
        return str(self.path(name).relative_to(self.root.parent))

    def exists(self, name: bytes, size: int) -> bool:
        try:
            st = os.stat(self.path(name), follow_symlinks=False)
        except FileNotFoundError:
            return False
        return st.st_size == size

    def put(self, name: bytes, data: memoryview | bytes) -> int:
        """Write ``data``, whose digest is ``name``, unless the store has it.

        Returns the number of bytes written (0 when the object already existed).
        The object gets its name, durably, at the next :meth:`sync`.
        """
        target = self.path(name)
        if self.exists(name, len(data)):
            return 0
        tmp = self._tmp / f"{target.name}.{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        self._pending.append((tmp, target))  # list.append is atomic: safe from many threads
        return len(data)

    def sync(self, threads: int = 4) -> None:
        """Make every object :meth:`put` since the last call durable under its name."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            with ThreadPoolExecutor(max(1, min(threads, len(pending)))) as pool:
                list(pool.map(fsync_file, [tmp for tmp, _ in pending]))
            for tmp, target in pending:
                os.replace(tmp, target)  # same bytes if another writer got there first
            fsync_dir(self.objects)
        except BaseException:
            _unlink_temps(pending)  # those renamed already are unreferenced objects: GC's job
            raise

    def discard_pending(self) -> None:
        """Remove the temp files of objects :meth:`put` but never synced (a failed save)."""
        pending, self._pending = self._pending, []
        _unlink_temps(pending)

    def read_into(self, name: bytes, out: memoryview) -> None:
        """Fill ``out`` with the object ``name``, which must be exactly ``len(out)`` bytes."""
        fd = self._open(name, len(out))
        try:
            done = 0
            while done < len(out):
                n = os.preadv(fd, [out[done:]], done)
                if n == 0:
                    raise EOFError(f"object ends after {done} of {len(out)} bytes")
                done += n
        finally:
            os.close(fd)

    def read(self, name: bytes, size: int) -> bytes:
        fd = self._open(name, size)
        try:
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        if len(data) != size:
            raise EOFError(f"object ends after {len(data)} of {size} bytes")
        return data

    def _open(self, name: bytes, size: int) -> int:
        path = self.path(name)
        label = self.label(name)
        if self.objects.is_symlink():
            raise UnsafePathError(
                f"'{label}' is reached through a symbolic link; stores never contain links",
                path=str(self.root),
            )
        try:
            fd = open_regular(path, label, self.root)
        except IntegrityError as err:
            raise IntegrityError(
                f"object '{label}' is missing from the store (removed by hand, or the run was "
                "copied without it)",
                path=str(self.root),
                file=label,
            ) from err
        actual = os.fstat(fd).st_size
        if actual != size:
            os.close(fd)
            raise IntegrityError(
                f"object '{label}' is {actual} bytes, manifest says {size}",
                path=str(self.root),
                file=label,
            )
        return fd

    # -------------------------------------------------------- maintenance

    def names(self) -> Iterator[tuple[bytes, Path, int]]:
        """Every well-named object: ``(name, path, size)``. Other files are skipped."""
        try:
            entries = sorted(os.scandir(self.objects), key=lambda e: e.name)
        except FileNotFoundError:
            return
        except PermissionError as err:
            raise UnreadableError(
                f"cannot list the objects of store '{self.root}': {err.strerror}; run as a user "
                "allowed to read the whole run directory, or fix its permissions",
                path=str(self.objects),
            ) from err
        for entry in entries:
            try:
                name = bytes.fromhex(entry.name)
            except ValueError:
                continue
            if len(name) != _NAME_BYTES or not entry.is_file(follow_symlinks=False):
                continue
            yield name, Path(entry.path), entry.stat(follow_symlinks=False).st_size

    def clear_tmp(self) -> int:
        """Remove every file in ``tmp/``; only safe under the exclusive lock."""
        removed = 0
        if self._tmp.is_symlink():  # never empty what a planted link points to
            raise UnsafePathError(
                f"'{self._tmp}' is a symbolic link; an object store never contains links and "
                "nothing was removed through it",
                path=str(self.root),
            )
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:  # a store copied by a tool that drops empty directories
            return 0
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)  # other errors (a read-only store): the caller's to say
                removed += 1
        return removed


def _unlink_temps(pending: list[tuple[Path, Path]]) -> None:
    for tmp, _ in pending:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def find_checkpoints(
    home: Path, *, skip: Path | None = None, strict: bool = False
) -> Iterator[Path]:
    """Committed checkpoint directories beneath ``home`` (at most ``MAX_STORE_DEPTH`` deep).

    Symbolic links, the directory ``skip`` (the store) and the temp and trash
    directories of saves are not entered. A directory this user may not list or
    search is skipped, or with ``strict`` raises :class:`UnreadableError` naming it
    (garbage collection must not assume that nothing in it reaches the store).
    """
    pending = [(home, 0)]
    while pending:
        directory, depth = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as err:
            if strict:
                raise _unreadable_directory(directory, err) from err
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)  # a stat where d_type is unknown
            except PermissionError as err:
                if strict:
                    raise _unreadable_directory(directory, err) from err
                continue
            if not is_dir or is_temporary(entry.name):
                continue
            path = Path(entry.path)
            if skip is not None and path == skip:
                continue
            try:
                found = stat.S_ISREG(os.stat(path / MANIFEST_NAME).st_mode)
            except PermissionError as err:  # a directory that cannot be searched
                if strict:
                    raise _unreadable_directory(path, err) from err
                found = False
            except OSError:
                found = False
            if found:
                yield path
            if depth + 1 < MAX_STORE_DEPTH:
                pending.append((path, depth + 1))


def _unreadable_directory(path: Path, err: OSError) -> UnreadableError:
    return UnreadableError(f"cannot read directory '{path}': {err.strerror or err}", path=str(path))


def location_of(store_root: Path, checkpoint: Path) -> tuple[int, str]:
    """How a checkpoint names its store: ``(up, name)``, the store being
    ``checkpoint/..(up times)/name``.

    The store must sit in a directory that contains the checkpoint, so that the
    checkpoints using it are all found beneath that directory by garbage
    collection, and copying that directory moves the run whole.

    Raises:
        UnsafePathError: the store is elsewhere.
    """
    name = store_root.name
    home = Path(os.path.realpath(store_root.parent))
    parent = Path(os.path.realpath(checkpoint.parent))
    try:
        rel = parent.relative_to(home)
    except ValueError:
        rel = None
    if rel is None or not name or name.startswith("."):
        raise UnsafePathError(
            f"the object store '{store_root}' must be a directory next to the checkpoint "
            f"'{checkpoint}' or next to one of its parent directories (e.g. "
            f"'{checkpoint.parent / DEFAULT_STORE_NAME}')",
            path=str(checkpoint),
        )
    check_relative_path(name)
    _check_visible(home, rel, checkpoint, home / name)
    up = len(rel.parts) + 1
    if up > MAX_STORE_DEPTH:
        raise UnsafePathError(
            f"checkpoint '{checkpoint}' is {up} levels below its store's directory; "
            f"at most {MAX_STORE_DEPTH} are allowed",
            path=str(checkpoint),
        )
    return up, name


def _check_visible(home: Path, rel: Path, checkpoint: Path, store: Path) -> None:
    """Refuse a checkpoint that garbage collection would not find beneath ``home``: its
    walk skips the store, other stores and hidden temporary names, so the objects of a
    checkpoint saved there would look unreachable and be removed."""
    for part in (*rel.parts, checkpoint.name):
        if is_temporary(part):
            raise UnsafePathError(
                f"'{part}' in '{checkpoint}' is a name aptckpt gives the hidden entries of "
                "saves in progress; garbage collection does not look inside them, so it would "
                "remove this checkpoint's objects. Choose another name",
                path=str(checkpoint),
            )
    inside = home
    for part in (*rel.parts, checkpoint.name):
        inside = inside / part
        if inside == store or is_store(inside):
            raise UnsafePathError(
                f"'{checkpoint}' is inside the object store '{inside}', where garbage "
                "collection does not look for checkpoints (it would remove this one's "
                "objects); save it next to the store instead",
                path=str(checkpoint),
            )


def resolve_location(checkpoint: Path, up: object, name: object, *, where: str) -> Path:
    """The store a manifest names, validated (the inverse of :func:`location_of`)."""
    if type(up) is not int or not 1 <= up <= MAX_STORE_DEPTH:
        raise FormatError(f"store location 'up' = {up!r} is out of range", path=where)
    check_relative_path(name, where=where)
    assert isinstance(name, str)
    if "/" in name:
        raise UnsafePathError(f"store name {name!r} must be one path component", path=where)
    real = Path(os.path.realpath(checkpoint))
    if len(real.parents) < up:
        raise FormatError(f"store location 'up' = {up} climbs above '/'", path=where)
    return real.parents[up - 1] / name
