"""The local commit protocol: a checkpoint appears whole or not at all.

Writing: every file goes into a sibling temp directory
``.<name>.tmp-<pid>-<random>``; once the backend is done, every data file is
fsynced, then the manifest is written and fsynced, then the temp directory,
then it is renamed onto the final name and the parent directory is fsynced.
A crash at any instant leaves either the old state or the new one, plus at
worst a hidden temp directory, which the next save into the same parent removes
once its owner process is gone (see :func:`remove_stale_temps`).

Deleting renames the checkpoint to a hidden trash name first, so a crash
part-way through leaves hidden debris, never a visible half-deleted checkpoint.

Replacing an existing checkpoint (``overwrite=True``) swaps the two directories
with ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, so the name
never disappears; elsewhere it falls back to two renames, with a moment in
which the old checkpoint exists only under a hidden trash name.

Reading: files are opened with ``O_NOFOLLOW``, must be regular files inside the
checkpoint root, and must have the size the manifest records.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from aptckpt import manifest as mf
from aptckpt._config import MAX_MANIFEST_BYTES
from aptckpt._config import threads as default_threads
from aptckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    UnsafePathError,
    WriteError,
)

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "is_checkpoint",
    "is_temporary",
    "remove_checkpoint",
    "remove_stale_temps",
    "temp_sibling",
    "write_error",
    "write_file_atomic",
]

log = logging.getLogger("aptckpt")
T = TypeVar("T")

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


#: Names of the temp and trash entries of saves and small-file writes:
#: ``.<name>.tmp-<pid>-<hex>`` and ``.<name>.trash-<pid>-<hex>``.
_TEMP_NAME = re.compile(r"\..+\.(?:tmp|trash)-(?P<pid>[0-9]+)-[0-9a-f]+")

#: Temp and trash paths that a save or delete of *this* process is using right now.
_ACTIVE: set[str] = set()


@contextlib.contextmanager
def temp_sibling(path: Path, kind: str = "tmp") -> Iterator[Path]:
    """A hidden sibling name of ``path`` for a temp (``kind="tmp"``) or trash entry,
    protected from :func:`remove_stale_temps` of this process while in use."""
    sibling = path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
    _ACTIVE.add(str(sibling))
    try:
        yield sibling
    finally:
        _ACTIVE.discard(str(sibling))


def is_temporary(name: str) -> bool:
    """True for the name of a save's temp or trash directory (never a checkpoint)."""
    return _TEMP_NAME.fullmatch(name) is not None


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a committed checkpoint directory (its manifest exists)."""
    return os.path.isfile(os.path.join(path, mf.MANIFEST_NAME))


def _remedy(code: int | None) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that filesystem (or save elsewhere), then save again"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            "check the permissions of the directory (or whether the filesystem is mounted "
            "read-only), then save again"
        )
    if code == errno.EIO:
        return "the device reported an I/O error: check the disk and its logs before saving again"
    return "fix the cause, then save again"


def write_error(action: str, err: OSError, *, path: str | os.PathLike[str]) -> WriteError:
    """A :class:`WriteError` for an ``OSError`` met while ``action`` (e.g. "saving
    checkpoint 'x'"), naming the file that failed and what to do about it."""
    where = f" ('{err.filename}')" if err.filename else ""
    reason = err.strerror or str(err)
    return WriteError(
        f"{action} failed: {reason}{where}; {_remedy(err.errno)}",
        path=os.fspath(path),
        errno_=err.errno,
    )


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace the small file ``path`` with ``data`` durably: readers see the old
    bytes or the new ones, never a mix (sibling temp file, fsync, rename, fsync)."""
    with temp_sibling(path) as tmp:
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def remove_checkpoint(root: Path) -> None:
    """Delete the checkpoint directory ``root``: renamed to a hidden trash name
    (durably), then removed, so no crash leaves a visible half-deleted directory."""
    with temp_sibling(root, "trash") as trash:
        os.rename(root, trash)
        try:
            fsync_dir(root.parent)
        finally:
            shutil.rmtree(trash, ignore_errors=True)


def fsync_file(path: Path) -> None:
    """Make the contents of file ``path`` durable."""
    _fsync_path(path)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (created, renamed, removed names) durable."""
    _fsync_path(path, directory=True)


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False if this kernel or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(parent: Path, *, exclusive: bool = False) -> list[str]:
    """Delete the temp and trash entries in ``parent`` that no save is using.

    An entry is stale when no save or delete of this process is using it and
    either the process named in it is gone, or it names this process's pid (a
    previous process that had the same pid: containers restart with the same
    pids), or ``exclusive`` is true -- the caller holds the run lock, so no
    other process writes there. Returns the names removed.
    """
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or entry.path in _ACTIVE:
            continue
        pid = int(match["pid"])
        if exclusive or pid == os.getpid() or not _owner_alive(pid):
            log.info("removing stale temporary %s", entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed.append(entry.name)
    return removed


class CheckpointWriter:
    """Collects the files of one checkpoint in a temp directory, then commits them.

    Use as a context manager: leaving it without :meth:`commit` (an exception)
    removes the temp directory and leaves the target untouched.
    """

    def __init__(self, final: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.final = Path(os.path.abspath(final))
        self.overwrite = overwrite
        self._check_target()
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(
                f"creating directory '{parent}' for checkpoint '{self.final.name}'",
                err,
                path=parent,
            ) from err
        remove_stale_temps(parent)
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.root = parent / f".{self.final.name}.tmp-{token}"
        self._trash = parent / f".{self.final.name}.trash-{token}"
        _ACTIVE.update((str(self.root), str(self._trash)))
        try:
            self.root.mkdir()
        except OSError as err:
            _ACTIVE.difference_update((str(self.root), str(self._trash)))
            raise write_error(
                f"saving checkpoint '{self.final}' (nothing was written)", err, path=self.final
            ) from err
        self._files: list[str] = []
        self._committed = False
        self._held = contextlib.ExitStack()
        #: Bytes a backend wrote outside the checkpoint directory for this save
        #: (new objects in a shared store); counted in ``SaveInfo.stored_bytes``.
        self.external_bytes = 0

    def _check_target(self) -> None:
        final = self.final
        if not os.path.lexists(final):
            return
        if final.is_dir() and not final.is_symlink():
            if is_checkpoint(final):
                if not self.overwrite:
                    raise CheckpointExistsError(
                        final,
                        "a checkpoint already exists there; "
                        "pass overwrite=True to replace it or choose another path",
                    )
                return
            if not any(final.iterdir()):
                return  # an empty directory the user made for us
        raise CheckpointExistsError(
            final,
            "the path exists and is not an aptckpt checkpoint; refusing to replace it "
            "(move it away or choose another path)",
        )

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._committed:
                self.abort()
        finally:
            _ACTIVE.difference_update((str(self.root), str(self._trash)))
            self._held.close()

    def hold(self, resource: contextlib.AbstractContextManager[T]) -> T:
        """Enter ``resource`` (a lock) and keep it until the save commits or aborts."""
        return self._held.enter_context(resource)

    @property
    def committed(self) -> bool:
        """True once the checkpoint has been renamed into place."""
        return self._committed

    @property
    def files(self) -> list[str]:
        """Relative paths of the files created so far, in creation order."""
        return list(self._files)

    def path(self, name: str) -> Path:
        """Reserve the data file ``name`` (relative, validated) and return its temp path."""
        mf.check_relative_path(name)
        if name == mf.MANIFEST_NAME or name in self._files:
            raise ValueError(f"file name {name!r} is reserved or already used")
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        self._files.append(name)
        return target

    def sizes(self) -> list[mf.FileRecord]:
        return [mf.FileRecord(n, (self.root / n).stat().st_size) for n in self._files]

    def sync_files(self, threads: int | None = None) -> None:
        """fsync every data file (in parallel: fsync releases the GIL)."""
        paths = [self.root / n for n in self._files]
        workers = max(1, min(len(paths), threads or default_threads()))
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(_fsync_path, paths))

    def commit(self, manifest_bytes: bytes) -> None:
        """Write the manifest last and move the checkpoint into place, durably."""
        manifest_path = self.root / mf.MANIFEST_NAME
        with open(manifest_path, "xb") as f:
            f.write(manifest_bytes)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(self.root, directory=True)
        for _attempt in range(3):
            self._check_target()  # the target may have appeared while we were writing
            if self._move_into_place():
                break
        else:
            raise CheckpointExistsError(
                self.final, "other saves kept committing there at the same time; try again"
            )
        self._committed = True
        try:
            _fsync_path(self.final.parent, directory=True)
        finally:
            shutil.rmtree(self._trash, ignore_errors=True)  # the replaced checkpoint, if any

    def _move_into_place(self) -> bool:
        """Rename the temp directory onto the final name; False if another save
        committed there in the meantime (``overwrite`` then tries again)."""
        try:
            if not self.overwrite or not os.path.lexists(self.final):
                # onto nothing or an empty directory; refused onto a rival's checkpoint
                os.rename(self.root, self.final)
            elif _exchange(self.root, self.final):
                os.rename(self.root, self._trash)
            else:
                os.rename(self.final, self._trash)
                os.rename(self.root, self.final)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False  # a rival committed first
            if err.errno == errno.ENOENT and not os.path.lexists(self.final):
                return False  # a rival's exchange or delete moved it in between
            raise
        return True

    def abort(self) -> None:
        """Remove everything written so far; the target is untouched."""
        shutil.rmtree(self.root, ignore_errors=True)


class CheckpointReader:
    """Safe access to the files of a committed checkpoint."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))
        if not self.root.exists():
            raise CheckpointNotFoundError(root, "the path does not exist")
        if not self.root.is_dir():
            raise CheckpointNotFoundError(
                root,
                "it is a file, not a checkpoint directory (a plain torch.save file "
                "loads with torch.load(path, weights_only=True))",
            )
        self.manifest_path = self.root / mf.MANIFEST_NAME
        if not self.manifest_path.is_file():
            raise CheckpointNotFoundError(
                root,
                f"it has no {mf.MANIFEST_NAME}: not an aptckpt checkpoint, or a save that "
                "never committed",
            )

    def read_manifest(self) -> mf.Manifest:
        fd = self._open_fd(self.manifest_path, mf.MANIFEST_NAME)
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

    def _open_fd(self, path: Path, name: str) -> int:
        return open_regular(path, name, self.root)

    def open(self, record: mf.FileRecord) -> int:
        """Open a data file read-only, after checking it is safe and has its recorded size."""
        parent = (self.root / record.path).parent
        if os.path.realpath(parent) != os.path.join(
            os.path.realpath(self.root), os.path.dirname(record.path)
        ).rstrip("/"):
            raise UnsafePathError(
                f"'{record.path}' leaves the checkpoint through a link", path=str(self.root)
            )
        fd = self._open_fd(self.root / record.path, record.path)
        size = os.fstat(fd).st_size
        if size != record.size:
            os.close(fd)
            what = "truncated" if size < record.size else "longer than recorded"
            raise IntegrityError(
                f"data file '{record.path}' of checkpoint '{self.root}' is {what} "
                f"({size} bytes, manifest says {record.size}); the checkpoint is damaged",
                path=str(self.root),
                file=record.path,
            )
        return fd

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


def open_regular(path: Path, name: str, root: Path) -> int:
    """Open ``path`` read-only; it must be a regular file, not a symbolic link.

    ``name`` (the path as a manifest spells it) and ``root`` (the checkpoint or
    store it belongs to) only serve the error messages.
    """
    try:
        # O_NONBLOCK: opening a FIFO planted in place of a file must not block; it is
        # refused below as not a regular file. (No effect on reads of regular files.)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as err:
        raise IntegrityError(
            f"data file '{name}' is missing from '{root}'", path=str(root), file=name
        ) from err
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePathError(
                f"'{name}' is a symbolic link; checkpoints never contain links", path=str(root)
            ) from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"'{name}' is not a regular file", path=str(root))
    return fd


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
