"""Checkpoints on the local file system (or a mounted one).

The commit protocol (sibling temp directory, one fsync per file, rename into
place, ``RENAME_EXCHANGE`` for overwrites, ``flock``-owned hidden entries) is
:mod:`~aptckpt.storage.local._atomic`; safe reads relative to an open directory
are :mod:`~aptckpt.storage.local._reader`; ``O_DIRECT`` writes with bounce
buffers are :mod:`~aptckpt.storage.local._directio`; the hidden entries of saves
in progress and their cleanup are :mod:`~aptckpt.storage.local._temps`.

Small files (a run's ``metadata.json``, objects of a ``delta`` store) are read
without following a link or blocking on a FIFO, and written by temp file, fsync,
rename and a directory fsync.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from aptckpt.errors import UnsafePathError
from aptckpt.storage import base
from aptckpt.storage.local import _atomic, _temps
from aptckpt.storage.local._atomic import CheckpointWriter
from aptckpt.storage.local._reader import CheckpointReader

__all__ = ["LOCAL", "LocalStorage"]


class LocalStorage(base.Storage):
    """The local file system; see the module docstring. Paths are absolute."""

    scheme = "file"
    local = True

    has_locks = True

    def display(self, path: str) -> str:
        return path

    def canonical(self, path: str) -> str:
        return os.path.realpath(path)

    def same_checkpoint(self, path: str, other: base.Storage, other_path: str) -> bool:
        return other.local and os.path.realpath(path) == os.path.realpath(other_path)

    # ----------------------------------------------------------- checkpoints

    def create_checkpoint(self, path: str, *, overwrite: bool = False) -> CheckpointWriter:
        return CheckpointWriter(path, overwrite=overwrite)

    def join_checkpoint(self, path: str, token: str) -> base.CheckpointWriter:
        return _atomic.JoinedWriter(path, token)

    def open_checkpoint(self, path: str) -> CheckpointReader:
        return CheckpointReader(path)

    def is_checkpoint(self, path: str) -> bool:
        return _atomic.is_checkpoint(path)

    def delete_checkpoint(self, path: str) -> None:
        with CheckpointReader(path) as reader:  # refuses what is not a checkpoint
            root = reader.root
        _atomic.remove_checkpoint(root)

    def remove_debris(self, folder: str, *, exclusive: bool = False) -> int:
        return len(_temps.remove_stale_temps(Path(folder), exclusive=exclusive))

    # ----------------------------------------------------------------- files

    def read_file(self, path: str, *, limit: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            if st.st_size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
            chunks, left = [], limit + 1  # +1: a file that grows past the limit is refused
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return data

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def write_file(self, path: str, data: bytes) -> None:
        _atomic.write_file_atomic(Path(path), data)

    def create_file(self, path: str, data: bytes) -> bool:
        target = Path(path)
        with _temps.temp_sibling(target) as tmp:
            try:
                _write_durably(tmp, data)
                try:
                    os.link(tmp, target)  # fails if anything is there, even a dangling link
                except FileExistsError:
                    return False
            finally:
                tmp.unlink(missing_ok=True)
        _atomic.fsync_dir(target.parent)
        return True

    def put_files(
        self, items: Sequence[tuple[str, Any]], *, threads: int = 4, staging: str | None = None
    ) -> None:
        if not items:
            return

        workers = max(1, min(threads, len(items)))
        if staging is not None:
            _put_staged(items, Path(staging), workers)
            return

        def put(item: tuple[str, Any]) -> None:
            path, data = item
            target = Path(path)
            with _temps.temp_sibling(target) as tmp:
                try:
                    _write_durably(tmp, data)
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)

        with ThreadPoolExecutor(workers, thread_name_prefix="aptckpt-put") as pool:
            list(pool.map(put, items))
        for folder in sorted({os.path.dirname(path) for path, _ in items}):
            _atomic.fsync_dir(Path(folder))

    def info(self, path: str) -> base.Entry | None:
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return base.Entry(os.path.basename(path), _kind(st.st_mode), st.st_size, st.st_mtime)

    def link_target(self, path: str) -> str | None:
        try:
            return os.readlink(path)
        except OSError:
            return None

    def list(self, folder: str) -> list[base.Entry]:
        try:
            with os.scandir(folder) as found:
                entries = []
                for entry in found:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we listed
                    entries.append(
                        base.Entry(entry.name, _kind(st.st_mode), st.st_size, st.st_mtime)
                    )
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(entries, key=lambda e: e.name)

    def remove_file(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)

    def remove_tree(self, path: str) -> None:
        if os.path.islink(path) or os.path.isfile(path):
            Path(path).unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    # ----------------------------------------------------------------- locks

    @contextlib.contextmanager
    def lock(self, path: str, *, exclusive: bool, wait: bool = True) -> Iterator[None]:
        """``flock`` on file ``path`` (created if absent, never through a link). A user
        who may not write it (or a read-only mount) takes it through a read-only
        descriptor: ``flock`` works there too. Raises ``BlockingIOError`` when
        ``wait`` is False and another holder excludes us, :class:`UnsafePathError` when
        ``path`` is a symbolic link, another ``OSError`` when it cannot be opened."""
        fd = _open_lock(path)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
            yield
        finally:
            os.close(fd)  # releases the lock


def _open_lock(path: str) -> int:
    try:
        # O_NOFOLLOW: a lock file planted as a link would create its target elsewhere
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePathError(
                f"'{path}' is a symbolic link; a lock file is never a link",
                path=os.path.dirname(path),
            ) from err
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _kind(mode: int) -> Literal["file", "dir", "link", "other"]:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def _put_staged(items: Sequence[tuple[str, Any]], staging: Path, workers: int) -> None:
    """``put_files`` through the caller's staging folder: every temporary written, then all
    synced in parallel (the kernel writes them back together), then each renamed into
    place and each target folder synced once. A failure removes the temporaries left."""
    staged: list[tuple[Path, Path]] = []

    def write(item: tuple[str, Any]) -> Path:
        path, data = item
        tmp = staging / f"{os.path.basename(path)}.{secrets.token_hex(8)}"
        with open(tmp, "xb") as f:
            staged.append((tmp, Path(path)))  # list.append is atomic
            f.write(data)
        return tmp

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="aptckpt-put") as pool:
            list(pool.map(write, items))
            list(pool.map(_atomic.fsync_file, [tmp for tmp, _ in staged]))
        for tmp, target in staged:
            os.replace(tmp, target)  # the same bytes if another writer got there first
        for folder in sorted({target.parent for _, target in staged}):
            _atomic.fsync_dir(folder)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _write_durably(path: Path, data: Any) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


#: The one local storage (it holds no state).
LOCAL = LocalStorage()
