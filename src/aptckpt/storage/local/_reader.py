"""Reading a committed checkpoint safely, even while it is being deleted.

:class:`CheckpointReader` holds the checkpoint's directory open from the start
and opens every file relative to it, following no link on the way (a file that
is a link, or not a regular file, is refused), and checks the sizes the manifest
records. Holding the directory is what makes a deletion during a load harmless
or, at worst, clear: deleting renames the checkpoint away first (see
:mod:`aptckpt.storage.local._atomic`), so files the load opens afterwards still come from the
same checkpoint while they last; a file gone because the checkpoint was deleted
is a :class:`CheckpointDeletedError`, not damage. A file this user may not read
is an :class:`UnreadableError`, never a bare ``PermissionError``.

A missing checkpoint whose replacement was interrupted between its two renames
(no ``RENAME_EXCHANGE``) is first put back from its hidden ``old`` name
(:func:`aptckpt.storage.local._temps.recover`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from aptckpt import _accel
from aptckpt import manifest as mf
from aptckpt._config import MAX_MANIFEST_BYTES
from aptckpt.errors import (
    CheckpointDeletedError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    UnreadableError,
    UnsafePathError,
)
from aptckpt.storage import base
from aptckpt.storage.local._foreign import describe_foreign_file
from aptckpt.storage.local._temps import pending, recover

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointReader", "LocalDataFiles", "open_regular"]

#: Opens a directory only to look names up in it (no read permission needed).
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)


class CheckpointReader(base.CheckpointReader):
    """Safe access to the files of a committed checkpoint.

    The checkpoint's directory stays open from construction to :meth:`close` (or
    garbage collection), and every file is opened relative to it: a checkpoint
    renamed away for deletion mid-load is still read whole while its files last,
    and a file gone because it was deleted is told apart from damage.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        from aptckpt.storage.local import LOCAL

        self.storage = LOCAL
        self.root = Path(os.path.abspath(root))
        self.path = str(self.root)
        self.manifest_path = self.root / mf.MANIFEST_NAME
        self._fd: int | None = None
        fd = self._open_root(root)
        self._fd = fd
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)
        try:
            is_file = stat.S_ISREG(os.stat(mf.MANIFEST_NAME, dir_fd=fd).st_mode)
        except PermissionError as err:
            raise _unreadable(self.root, err) from err
        except OSError:
            is_file = False
        if not is_file:
            raise CheckpointNotFoundError(
                root,
                f"it has no {mf.MANIFEST_NAME}: not an aptckpt checkpoint, or a save that "
                "never committed",
            )

    def _open_root(self, given: str | os.PathLike[str]) -> int:
        for attempt in range(2):
            try:
                return os.open(self.root, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                if attempt == 0 and recover(self.root):
                    continue  # an interrupted replacement left it under its old name
                found = pending(self.root)
                if found.get("trash"):
                    raise CheckpointDeletedError(self.root, "it is being deleted") from None
                hint = ""
                if found.get("old"):
                    hint = (
                        f"; an interrupted replacement left it as '{found['old'][0]}', which "
                        "the next save in that folder (or a user allowed to write there) "
                        "renames back"
                    )
                raise CheckpointNotFoundError(given, f"the path does not exist{hint}") from None
            except NotADirectoryError:
                if not os.path.exists(self.root):
                    raise CheckpointNotFoundError(given, "the path does not exist") from None
                raise CheckpointNotFoundError(
                    given,
                    describe_foreign_file(self.root) or "it is a file, not a checkpoint directory",
                ) from None
            except PermissionError as err:
                raise _unreadable(self.root, err) from err
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the checkpoint directory (files already open stay usable)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def deleted(self) -> bool:
        """True if the checkpoint's path no longer leads to the directory being read."""
        try:
            st = os.stat(self.root)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._identity

    def check_present(self, missing: str) -> None:
        """Raise :class:`CheckpointDeletedError` if ``missing`` (a file, an object) is
        gone because the checkpoint was deleted; return if it was not."""
        if self.deleted():
            raise CheckpointDeletedError(self.root, f"'{missing}' was already removed")

    def read_manifest(self) -> mf.Manifest:
        fd = self._open_member(mf.MANIFEST_NAME)
        try:
            size = os.fstat(fd).st_size
            if size > MAX_MANIFEST_BYTES:
                raise FormatError(
                    f"manifest is {size} bytes, over the limit", path=str(self.manifest_path)
                )
            data = _read_exact(fd, size)
        finally:
            os.close(fd)
        return mf.decode(data, where=str(self.manifest_path))

    def _open_member(self, name: str) -> int:
        """Open the regular file ``name`` (a validated manifest path) beneath the root,
        following no link on the way."""
        if self._fd is None:
            raise ValueError(f"the reader of '{self.root}' is closed")
        parts = name.split("/")
        where = self._fd
        opened: list[int] = []
        try:
            for part in parts[:-1]:
                try:
                    where = os.open(
                        part, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=where
                    )
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):  # a link, or not a directory
                        raise UnsafePathError(
                            f"'{name}' leaves the checkpoint through a link", path=str(self.root)
                        ) from err
                    raise
                opened.append(where)
            return _open_file(parts[-1], where, name, self.root)
        except IntegrityError:
            self.check_present(name)
            raise
        except FileNotFoundError as err:
            self.check_present(name)
            raise IntegrityError(
                f"data file '{name}' is missing from '{self.root}'", path=str(self.root), file=name
            ) from err
        except PermissionError as err:
            raise _unreadable(self.root, err, name) from err
        finally:
            for fd in opened:
                os.close(fd)

    def open(self, record: mf.FileRecord) -> int:
        """Open a data file read-only, after checking it is safe and has its recorded size."""
        fd = self._open_member(record.path)
        size = os.fstat(fd).st_size
        if size != record.size:
            os.close(fd)
            raise self._wrong_size(record, size)
        return fd

    def _wrong_size(self, record: mf.FileRecord, size: int) -> IntegrityError:
        what = "truncated" if size < record.size else "longer than recorded"
        return IntegrityError(
            f"data file '{record.path}' of checkpoint '{self.root}' is {what} "
            f"({size} bytes, manifest says {record.size}); the checkpoint is damaged",
            path=str(self.root),
            file=record.path,
        )

    def open_files(self, records: Sequence[mf.FileRecord]) -> LocalDataFiles:
        """Open every data file, checked as :meth:`open` does; a file that cannot be used
        is recorded in ``failed`` (-1 as its descriptor if it is missing; one of the wrong
        size stays open, so the damage can be located). A link or a file that is not a
        regular one raises ``UnsafePathError`` at once; it is refused before ``open`` so
        that a FIFO cannot block the reader."""
        fds: list[int] = []
        failed: dict[int, base.FileProblem] = {}
        try:
            for index, record in enumerate(records):
                path = self.root / record.path
                try:
                    mode: int | None = os.lstat(path).st_mode
                except FileNotFoundError:
                    mode = None
                if mode is not None and not stat.S_ISREG(mode):
                    what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                    raise UnsafePathError(
                        f"data file '{record.path}' is {what}; checkpoints hold regular files only",
                        path=str(self.root),
                    )
                try:
                    fd = self._open_member(record.path)
                except IntegrityError as err:  # missing
                    fds.append(-1)
                    failed[index] = base.FileProblem(None, err)
                    continue
                fds.append(fd)  # kept open when of the wrong size: damage is located in it
                size = os.fstat(fd).st_size
                if size != record.size:
                    failed[index] = base.FileProblem(size, self._wrong_size(record, size))
        except BaseException:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            raise
        return LocalDataFiles(fds, failed)

    @contextlib.contextmanager
    def open_all(self, records: tuple[mf.FileRecord, ...]) -> Iterator[list[int]]:
        """Open every data file (checked as in :meth:`open`); close them on exit."""
        fds: list[int] = []
        try:
            for record in records:
                fds.append(self.open(record))
            yield fds
        finally:
            for fd in fds:
                os.close(fd)


#: How far ahead of the chunk being decoded the kernel is asked to read (``expect``).
_READ_AHEAD = 64 << 20


class LocalDataFiles(base.DataFiles):
    """Open descriptors of a checkpoint's data files: positional reads, the core's
    parallel verified reads, memory maps.

    The ranges a decoder announces with :meth:`expect` are read ahead: each
    :meth:`read_into` asks the kernel (``POSIX_FADV_WILLNEED``) for the announced ranges up
    to :data:`_READ_AHEAD` bytes past it, so the disk reads the next chunks while the
    threads decode this one (a cold load otherwise waits for each chunk's read, then for
    its decode)."""

    def __init__(self, fds: list[int], failed: dict[int, base.FileProblem]) -> None:
        self.fds = fds
        self.failed = failed
        self._ahead: dict[int, list[tuple[int, int]]] = {}  # file -> announced runs
        self._advised: dict[int, tuple[int, int]] = {}  # file -> (run index, advised up to)
        self._ahead_lock = threading.Lock()

    def expect(self, file: int, ranges: Sequence[tuple[int, int]]) -> None:
        runs: list[tuple[int, int]] = []
        for start, stop in sorted(ranges):
            if runs and start <= runs[-1][1]:  # adjacent chunks: one request
                runs[-1] = (runs[-1][0], max(stop, runs[-1][1]))
            else:
                runs.append((start, stop))
        with self._ahead_lock:
            self._ahead[file], self._advised[file] = runs, (0, 0)

    def _read_ahead(self, file: int, offset: int) -> None:
        """Advise the announced bytes of ``file`` below ``offset + _READ_AHEAD`` not
        advised yet."""
        runs = self._ahead.get(file)
        if not runs or not hasattr(os, "posix_fadvise"):
            return
        target = offset + _READ_AHEAD
        todo: list[tuple[int, int]] = []
        with self._ahead_lock:
            index, done = self._advised[file]
            if target <= done:
                return
            while index < len(runs) and runs[index][0] < target:
                start, stop = max(runs[index][0], done), min(runs[index][1], target)
                if stop > start:
                    todo.append((start, stop))
                if runs[index][1] > target:
                    break
                index += 1
            self._advised[file] = (index, target)
        for start, stop in todo:
            with contextlib.suppress(OSError):  # a hint
                os.posix_fadvise(self.fds[file], start, stop - start, os.POSIX_FADV_WILLNEED)

    def read(self, file: int, offset: int, length: int) -> bytes:
        return os.pread(self.fds[file], length, offset)

    def read_verify(self, reads: Sequence[base.RawRead], threads: int) -> list[tuple[int, str]]:
        if not reads:
            return []
        check = reads[0].digest is not None
        found: list[tuple[int, str]] = _accel.read_verify_many(
            [self.fds[r.file] for r in reads],
            [r.out for r in reads],
            [r.offset for r in reads],
            b"".join(r.digest or b"" for r in reads) if check else None,
            threads,
        )
        return found

    def read_into(
        self, file: int, offset: int, out: memoryview, digest: bytes | None
    ) -> str | None:
        self._read_ahead(file, offset)
        # One span through the core: the read and the hash run without the GIL.
        found = _accel.read_verify_many([self.fds[file]], [out], [offset], digest, 1)
        return found[0][1] if found else None

    def stream(self, file: int) -> BinaryIO:
        return os.fdopen(os.dup(self.fds[file]), "rb")

    def size(self, file: int) -> int:
        return os.fstat(self.fds[file]).st_size

    def map_file(self, file: int, size: int, *, verify: bool) -> torch.UntypedStorage:
        """A private, writable (copy-on-write) mapping of the open file as a storage.

        torch maps it through ``/proc/self/fd`` -- the very file already opened and
        checked, not a path that could have changed since -- and closes its own
        descriptor at once, so no descriptor stays open per mapped file (Python's
        ``mmap`` would keep a duplicate for as long as the tensors live). Without
        ``/proc``, ``mmap`` does it.
        """
        import mmap

        import torch

        fd = self.fds[file]
        if verify:  # every page is about to be hashed: have a cold file read ahead in bulk
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc):
            storage = torch.UntypedStorage.from_file(proc, shared=False, nbytes=size)
            assert isinstance(storage, torch.UntypedStorage)
            return storage
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return torch.frombuffer(mapped, dtype=torch.uint8).untyped_storage()

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def _unreadable(path: Path, err: OSError, member: str | None = None) -> UnreadableError:
    what = f"'{member}' of '{path}'" if member else f"'{path}'"
    return UnreadableError(
        f"cannot read {what}: {err.strerror or err}; load it as a user allowed to read the "
        "checkpoint (and its run's object store), or fix its permissions",
        path=str(path),
    )


def _open_file(name: str, dir_fd: int | None, label: str, root: Path) -> int:
    """Open ``name`` (relative to ``dir_fd``) read-only: a regular file, not a link."""
    try:
        # O_NONBLOCK: opening a FIFO planted in place of a file must not block; it is
        # refused below as not a regular file. (No effect on reads of regular files.)
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except FileNotFoundError as err:
        raise IntegrityError(
            f"data file '{label}' is missing from '{root}'", path=str(root), file=label
        ) from err
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePathError(
                f"'{label}' is a symbolic link; checkpoints never contain links", path=str(root)
            ) from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"'{label}' is not a regular file", path=str(root))
    return fd


def open_regular(path: Path, name: str, root: Path) -> int:
    """Open ``path`` read-only; it must be a regular file, not a symbolic link.

    ``name`` (the path as a manifest spells it) and ``root`` (the checkpoint or
    store it belongs to) only serve the error messages.

    Raises:
        IntegrityError: the file is missing.
        UnsafePathError: it is a link or not a regular file.
        UnreadableError: this user may not read it.
    """
    try:
        return _open_file(os.fspath(path), None, name, root)
    except PermissionError as err:
        raise _unreadable(root, err, name) from err


def _read_exact(fd: int, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
