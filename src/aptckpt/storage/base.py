"""The storage seam: what every layer above it may ask of the place checkpoints live.

Everything that touches a file system or an object store goes through a
:class:`Storage`; backends, the object store of ``delta``, the API, the manager
and the CLI hold a storage and *paths* in it (plain strings: an absolute local
path, or ``bucket/key`` for an fsspec store) and never call ``os``, ``open`` or
``pathlib`` on checkpoint data themselves. Two implementations exist:
:mod:`aptckpt.storage.local` (sibling temp directory, ``O_DIRECT``, fsync,
rename, ``flock``) and :mod:`aptckpt.storage.remote` (any fsspec URL: data
objects first, the manifest last by a conditional create).

A checkpoint is written through a :class:`CheckpointWriter`: the backend asks
it for :class:`Sink` s (one per data file, written front to back), the API then
calls :meth:`CheckpointWriter.sync_files` and :meth:`CheckpointWriter.commit`
with the manifest bytes. A checkpoint is read through a
:class:`CheckpointReader`, whose :meth:`CheckpointReader.open_files` gives a
:class:`DataFiles`: ranged reads into caller buffers, verified raw reads in
bulk, and (local only) descriptors for memory maps.

Many writers of one checkpoint (every rank of a process group) each hold their
own writer made by :meth:`Storage.join_checkpoint` with the token the
coordinator's :meth:`CheckpointWriter.token` gave them, write their own files,
make them durable (:meth:`CheckpointWriter.sync_files`) and report their
:meth:`CheckpointWriter.sizes`; only the coordinator commits.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from aptckpt import _accel

if TYPE_CHECKING:
    from typing import BinaryIO

    import torch

    from aptckpt.errors import IntegrityError
    from aptckpt.manifest import FileRecord, Manifest

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "DataFiles",
    "Entry",
    "FileProblem",
    "FolderWriter",
    "Lease",
    "RawRead",
    "Sink",
    "Storage",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One name in a folder of a storage."""

    name: str
    #: ``"file"``, ``"dir"``, ``"link"`` (a symbolic link, not followed) or ``"other"`` (a
    #: FIFO, a device); object stores have files and folders only.
    kind: Literal["file", "dir", "link", "other"]
    size: int
    #: Last modification, seconds since the epoch (0.0 where the store gives none).
    mtime: float


@dataclass(frozen=True)
class FileProblem:
    """A data file that cannot be used: missing (``size`` None) or of the wrong size."""

    size: int | None
    error: IntegrityError


@dataclass(frozen=True)
class RawRead:
    """Read ``len(out)`` bytes of data file ``file`` from ``offset`` into ``out`` and,
    when ``digest`` is given, check them against that XXH3-128 digest."""

    file: int
    offset: int
    out: memoryview
    digest: bytes | None


class Sink(ABC):
    """One data file being written, front to back. Closed by :meth:`close` (its bytes
    are then complete, not yet durable: the writer's ``sync_files`` does that) or
    dropped by :meth:`abort`."""

    #: Bytes written so far.
    size: int

    @abstractmethod
    def write(self, data: Any) -> int:
        """Append ``data`` (any buffer); return its length."""

    def write_many(self, buffers: Sequence[Any], threads: int = 0) -> None:
        """Append each buffer in order (in parallel where the storage can)."""
        for buffer in buffers:
            self.write(buffer)

    def flush(self) -> None:  # noqa: B027 -- sinks hand data on as they see fit
        """Nothing to do: a sink hands its bytes on as it sees fit (file-object protocol)."""

    @abstractmethod
    def digests(self) -> bytes:
        """The XXH3-128 digests of the file's chunks, when the sink was opened with a
        ``digest_chunk_size``; empty otherwise. Complete once closed."""

    @abstractmethod
    def close(self) -> None:
        """Finish the file; raises what the storage raised for it."""

    @abstractmethod
    def abort(self) -> None:
        """Drop the file (errors ignored)."""

    def __enter__(self: T) -> T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class CheckpointWriter(ABC):
    """The files of one checkpoint being saved. Leaving it as a context manager without
    :meth:`commit` (an exception) removes what was written; the target is untouched."""

    #: The storage it writes to, and the checkpoint's path in it.
    storage: Storage
    path: str
    #: Bytes a backend wrote outside the checkpoint for this save (new objects in a
    #: shared store); counted in ``SaveInfo.stored_bytes``.
    external_bytes: int
    #: Names this save: the other writers of a multi-writer save join with it
    #: (:meth:`Storage.join_checkpoint`).
    token: str
    #: The rank of a process group this writer writes for (None: a single-process save).
    rank: int | None = None

    def __init__(self) -> None:
        self._held = contextlib.ExitStack()
        self.external_bytes = 0

    @property
    def location(self) -> str:
        """The checkpoint as users name it (a path or a URL without credentials)."""
        return self.storage.display(self.path)

    @abstractmethod
    def open(self, name: str, *, digest_chunk_size: int = 0) -> Sink:
        """Start data file ``name`` (relative, validated, not used before)."""

    @property
    @abstractmethod
    def files(self) -> list[str]:
        """Relative names of the data files started so far, in order."""

    @abstractmethod
    def sizes(self) -> list[FileRecord]:
        """Every data file with its size (all closed)."""

    @abstractmethod
    def sync_files(self, threads: int | None = None) -> None:
        """Make every data file durable."""

    @abstractmethod
    def commit(self, manifest_bytes: bytes) -> None:
        """Write the manifest last: the checkpoint exists from here on, whole."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written so far; the target is untouched."""

    @property
    @abstractmethod
    def committed(self) -> bool:
        """True once :meth:`commit` returned."""

    def hold(self, resource: contextlib.AbstractContextManager[T]) -> T:
        """Enter ``resource`` (a lock) and keep it until the save commits or aborts."""
        return self._held.enter_context(resource)

    def __enter__(self: T) -> T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self.committed:
                self.abort()
        finally:
            self._finish()

    def _finish(self) -> None:
        """Release what the writer holds (after commit or abort)."""
        self._held.close()

    def release(self) -> None:
        """Release what the writer holds and remove nothing: a writer that joined a save
        (:meth:`Storage.join_checkpoint`) once its coordinator committed."""
        self._finish()


class FolderWriter(CheckpointWriter):
    """The files of ``writer`` under ``folder``: what one rank of a multi-writer save hands
    its backend, so that ranks never name the same file. :meth:`sizes` gives the paths
    relative to the checkpoint (``rank-00001/shard-00000.bin``), in the order the files were
    started; everything else is the wrapped writer's, and only it commits."""

    def __init__(self, writer: CheckpointWriter, folder: str, rank: int | None = None) -> None:
        super().__init__()
        self.writer, self.folder, self.rank = writer, folder, rank
        self.storage, self.path, self.token = writer.storage, writer.path, writer.token
        self._names: list[str] = []

    def open(self, name: str, *, digest_chunk_size: int = 0) -> Sink:
        sink = self.writer.open(f"{self.folder}/{name}", digest_chunk_size=digest_chunk_size)
        self._names.append(name)
        return sink

    @property
    def files(self) -> list[str]:
        return list(self._names)

    def sizes(self) -> list[FileRecord]:
        return _in_folder(self.writer.sizes(), self.folder, self._names)

    def sync_files(self, threads: int | None = None) -> None:
        self.writer.sync_files(threads)

    def commit(self, manifest_bytes: bytes) -> None:
        raise RuntimeError("a folder of a save does not commit; its writer does")

    def abort(self) -> None:
        self.writer.abort()

    @property
    def committed(self) -> bool:
        return self.writer.committed

    def hold(self, resource: contextlib.AbstractContextManager[T]) -> T:
        return self.writer.hold(resource)


def _in_folder(records: list[FileRecord], folder: str, names: list[str]) -> list[FileRecord]:
    """The records of ``folder``'s files ``names``, in that order. A store may put its own
    prefix before the folder (an object store's save token): the record's path ends with
    ``folder/name`` either way."""
    tails = {f"{folder}/{name}": name for name in names}
    found: dict[str, FileRecord] = {}
    for record in records:
        _, _, tail = record.path.partition("/")
        name = tails.get(record.path) or tails.get(tail)
        if name is not None:
            found[name] = record
    return [found[name] for name in names]


class DataFiles(ABC):
    """The data files of a checkpoint opened for reading; see
    :meth:`CheckpointReader.open_files`."""

    #: Per file index, what makes that file unusable (missing, wrong size).
    failed: dict[int, FileProblem]

    @abstractmethod
    def read(self, file: int, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of file ``file`` from ``offset`` (fewer only at its end)."""

    @abstractmethod
    def read_verify(self, reads: Sequence[RawRead], threads: int) -> list[tuple[int, str]]:
        """Perform every read (in parallel), checking each against its digest; return
        ``(index into reads, why)`` per bad one, ``why`` ``"eof"`` (the file ends first)
        or ``"digest"`` (the bytes differ). All reads check a digest, or none does."""

    def read_into(
        self, file: int, offset: int, out: memoryview, digest: bytes | None
    ) -> str | None:
        """Fill ``out`` from ``offset`` of file ``file`` and, when ``digest`` is given, check
        the bytes against it: None when all is well, else ``"eof"`` or ``"digest"`` as in
        :meth:`read_verify`. One read into memory the caller reuses (a decoder's scratch),
        where :meth:`read` returns new memory. The default goes through :meth:`read`, so
        a storage that reads ahead keeps doing so."""
        data = self.read(file, offset, len(out))
        out[: len(data)] = data
        if len(data) < len(out):
            return "eof"
        if digest is not None and _accel.xxh3_128(out) != digest:
            return "digest"
        return None

    def expect(self, file: int, ranges: Sequence[tuple[int, int]]) -> None:  # noqa: B027
        """The byte ranges ``[start, stop)`` of file ``file`` that :meth:`read` is about to
        be asked for (a hint). A storage that reads ahead fetches within them only, so a
        partial load (a slice of a tensor) costs its own chunks, not a read-ahead window.
        The default ignores it."""

    def stream(self, file: int) -> BinaryIO:
        """File ``file`` as a readable binary file object (the caller closes it)."""
        import io

        size = self.size(file)
        return io.BytesIO(self.read(file, 0, size))

    @abstractmethod
    def size(self, file: int) -> int:
        """The size of file ``file`` as it is now."""

    def map_file(self, file: int, size: int, *, verify: bool) -> torch.UntypedStorage | None:
        """File ``file`` (``size`` bytes) as a copy-on-write memory map; None where the
        storage cannot map files (object stores). ``verify`` says its pages are about to
        be hashed (read ahead)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Close what is open."""

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointReader(ABC):
    """A committed checkpoint opened for reading. Raises
    :class:`~aptckpt.errors.CheckpointNotFoundError` when constructed for a path
    without a committed manifest."""

    storage: Storage
    path: str

    @property
    def location(self) -> str:
        """The checkpoint as users name it (a path or a URL without credentials)."""
        return self.storage.display(self.path)

    @abstractmethod
    def read_manifest(self) -> Manifest:
        """The manifest, decoded and checked."""

    @abstractmethod
    def open_files(self, records: Sequence[FileRecord]) -> DataFiles:
        """Open the data files; missing ones and ones of the wrong size are recorded in
        :attr:`DataFiles.failed` (so the chunks they hold can be named), links and
        special files raise :class:`~aptckpt.errors.UnsafePathError`."""

    @abstractmethod
    def check_present(self, missing: str) -> None:
        """Raise :class:`~aptckpt.errors.CheckpointDeletedError` if ``missing`` (a file,
        an object) is gone because the checkpoint was deleted; return if it was not."""

    def close(self) -> None:  # noqa: B027 -- most readers hold nothing
        """Release what the reader holds."""

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Storage(ABC):
    """A place checkpoints live: the local file system, or an fsspec store.

    Paths are strings in the storage's own spelling (absolute local paths; ``bucket/key``
    for object stores), joined with :meth:`join`; :meth:`display` gives the form users
    see and get back (a URL, never with credentials).
    """

    #: ``"file"`` for the local file system, else the fsspec protocol (``"s3"``, ...).
    scheme: str
    #: True where files are local: descriptors, memory maps, ``O_DIRECT``, ``flock``.
    local: bool

    # ----------------------------------------------------------------- paths

    @abstractmethod
    def display(self, path: str) -> str:
        """``path`` as users name it: a local path, or a URL without credentials."""

    @staticmethod
    def join(path: str, *names: str) -> str:
        """``path`` with the relative ``names`` appended, "/"-separated."""
        return "/".join([path.rstrip("/"), *(n.strip("/") for n in names)])

    @staticmethod
    def parent(path: str) -> str:
        head, _, _ = path.rstrip("/").rpartition("/")
        return head or "/"

    @staticmethod
    def name(path: str) -> str:
        return path.rstrip("/").rpartition("/")[2]

    def canonical(self, path: str) -> str:
        """``path`` with every link resolved (locally: ``realpath``); object stores have no
        links, so there it is ``path``. Compares places, e.g. a checkpoint's store."""
        return path

    def same_checkpoint(self, path: str, other: Storage, other_path: str) -> bool:
        """True if ``other_path`` in ``other`` names the same checkpoint as ``path`` here."""
        return other.scheme == self.scheme and other.display(other_path) == self.display(path)

    # ----------------------------------------------------------- checkpoints

    @abstractmethod
    def create_checkpoint(self, path: str, *, overwrite: bool = False) -> CheckpointWriter:
        """A writer for a new checkpoint at ``path``; refuses an existing one unless
        ``overwrite`` (:class:`~aptckpt.errors.CheckpointExistsError`)."""

    def join_checkpoint(self, path: str, token: str) -> CheckpointWriter:
        """Another writer of the save ``token`` in progress at ``path`` (a rank of a
        process group): it writes files, never commits."""
        raise NotImplementedError(f"{type(self).__name__} has no multi-writer saves yet")

    @abstractmethod
    def open_checkpoint(self, path: str) -> CheckpointReader:
        """A reader of the committed checkpoint at ``path``."""

    @abstractmethod
    def is_checkpoint(self, path: str) -> bool:
        """True if a committed checkpoint (its manifest) is at ``path``."""

    @abstractmethod
    def delete_checkpoint(self, path: str) -> None:
        """Remove the checkpoint at ``path`` so that it is never seen half-deleted."""

    @abstractmethod
    def remove_debris(self, folder: str, *, exclusive: bool = False) -> int:
        """Remove what saves that died left in ``folder`` (never a save still in
        flight); return how many entries went. ``exclusive``: the caller holds the run
        (its run lock), so nothing else of aptckpt writes there."""

    # ----------------------------------------------------------------- files

    @abstractmethod
    def read_file(self, path: str, *, limit: int) -> bytes:
        """The whole regular file ``path``, without following a link or blocking on a
        FIFO. ``FileNotFoundError`` if it is absent; another ``OSError`` for a link
        (``ELOOP``), something not a regular file (``EINVAL``), more than ``limit`` bytes
        (``EFBIG``) or a file this user may not read."""

    @abstractmethod
    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of file ``path`` from ``offset``."""

    @abstractmethod
    def write_file(self, path: str, data: bytes) -> None:
        """Replace file ``path`` by ``data``, atomically and durably: readers see the
        old bytes or the new ones."""

    @abstractmethod
    def create_file(self, path: str, data: bytes) -> bool:
        """Create file ``path`` holding ``data`` only if nothing is there (atomically
        where the store can: ``O_EXCL``, ``If-None-Match``); False if something is."""

    @abstractmethod
    def put_files(
        self, items: Sequence[tuple[str, Any]], *, threads: int = 4, staging: str | None = None
    ) -> None:
        """Write each ``(path, buffer)`` whole or not at all, in parallel; durable when
        this returns. An existing file is replaced (content-addressed objects).

        ``staging``: a folder of the caller's on the same storage where temporaries may go
        (locally: written there, then renamed into place, sparing a lock per file); the
        caller removes what a writer that died left there. Stores that write whole objects
        need none and ignore it."""

    @abstractmethod
    def info(self, path: str) -> Entry | None:
        """What is at ``path`` (not following a link), or None."""

    def link_target(self, path: str) -> str | None:
        """Where the symbolic link ``path`` points (for messages); None if it is none."""
        return None

    @abstractmethod
    def list(self, folder: str) -> list[Entry]:
        """The entries of ``folder``, sorted by name; empty if it does not exist."""

    def walk(self, folder: str) -> Iterator[tuple[str, Entry]]:
        """Every file below ``folder`` as ``(path relative to folder, entry)``."""
        for entry in self.list(folder):
            if entry.kind == "dir":
                for rel, sub in self.walk(self.join(folder, entry.name)):
                    yield f"{entry.name}/{rel}", sub
            else:
                yield entry.name, entry

    @abstractmethod
    def remove_file(self, path: str) -> None:
        """Remove file ``path``; nothing if it is already gone."""

    @abstractmethod
    def remove_tree(self, path: str) -> None:
        """Remove ``path`` and everything below it; nothing if it is gone."""

    @abstractmethod
    def makedirs(self, path: str) -> None:
        """Create folder ``path`` and its parents (nothing on object stores)."""

    # ----------------------------------------------------------------- locks

    #: True where :meth:`lock` excludes other processes (``flock``); object stores have
    #: no such locks, and what relies on them (garbage collection) uses an age rule there.
    has_locks: bool = False

    def lock(
        self, path: str, *, exclusive: bool, wait: bool = True
    ) -> AbstractContextManager[None]:
        """An advisory lock named by file ``path``, shared or exclusive, held while the
        context is. Where :attr:`has_locks` is False it excludes nothing (a no-op);
        ``wait=False`` raises ``BlockingIOError`` instead of waiting for a holder."""
        return contextlib.nullcontext()

    def lease(self, path: str, *, owner: Mapping[str, Any], ttl: float) -> Lease:
        """Take the lease object ``path`` (a run lock that works on object stores): created
        only if absent or expired (older than ``ttl`` seconds since its holder last
        renewed it); raises ``FileExistsError`` (whose ``filename`` holds what the file
        says of its holder) if another holder has it."""
        raise NotImplementedError(f"{type(self).__name__} has no leases")


class Lease(ABC):
    """A held lease (:meth:`Storage.lease`): renew it well within its ttl, release it when
    done. A holder that dies stops renewing; the lease expires and may be taken."""

    @abstractmethod
    def renew(self) -> None:
        """Extend the lease; raises ``FileExistsError`` if it was lost to another holder."""

    @abstractmethod
    def release(self) -> None:
        """Give the lease up (remove it, if it is still ours)."""
