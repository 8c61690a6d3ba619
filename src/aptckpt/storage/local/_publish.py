"""Publishing an exported file or directory (``aptckpt.convert(..., to=...)``) atomically.

An export is written under a hidden temp name beside its destination (owned, as a save's
temp entries are, so cleanup by another process never removes it while it is written),
made durable, then given its name: a crash never leaves a half-written destination.
Without ``overwrite`` an existing destination is never replaced, even one that appears
while the export runs (a hard link, which fails if the name is taken, instead of a
rename). A device, FIFO or socket at the destination is refused, not replaced by a
regular file.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from aptckpt.errors import CheckpointExistsError, UnsupportedPathError
from aptckpt.storage.local._atomic import fsync_dir
from aptckpt.storage.local._temps import temp_sibling

__all__ = ["publish_dir", "publish_file"]


def _exists(dst: Path) -> CheckpointExistsError:
    return CheckpointExistsError(dst, "it exists; pass overwrite=True to replace it")


def _lstat_mode(dst: Path) -> int | None:
    try:
        return os.lstat(dst).st_mode
    except FileNotFoundError:
        return None


def publish_file(dst: Path, write: Callable[[Path], None], *, overwrite: bool) -> int:
    """Write the file ``dst`` with ``write(temp_path)``; returns its size in bytes."""
    if dst.is_dir():
        raise UnsupportedPathError(
            f"'{dst}' is a directory; this export writes a single file, name one", path=str(dst)
        )
    mode = _lstat_mode(dst)
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        # Replacing the name would swap a device (/dev/null) or FIFO for a regular file.
        raise UnsupportedPathError(
            f"'{dst}' is not a regular file (a device, FIFO or socket); an export writes a "
            "regular file, name one",
            path=str(dst),
        )
    if mode is not None and not overwrite:
        raise _exists(dst)
    with temp_sibling(dst) as tmp:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            mode = os.fstat(fd).st_mode  # the umask's, which writers making 0600 temps lose
            os.close(fd)
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            _give_name(tmp, dst, overwrite=overwrite)
        finally:
            tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)
    return dst.stat().st_size


def _give_name(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)  # fails if dst appeared meanwhile, unlike a rename
    except FileExistsError:
        raise _exists(dst) from None
    except OSError:  # no hard links on this file system: check, then rename
        if dst.exists():
            raise _exists(dst) from None
        os.replace(tmp, dst)


def publish_dir(dst: Path, write: Callable[[Path], None], *, overwrite: bool) -> int:
    """Write the directory ``dst`` with ``write(temp_dir)`` (an empty directory it fills);
    returns the bytes of its files. With ``overwrite`` an old ``dst`` is removed only after
    the new one is complete."""
    mode = _lstat_mode(dst)
    if mode is not None and not stat.S_ISDIR(mode):
        raise UnsupportedPathError(
            f"'{dst}' is not a directory; this export writes a directory, name one",
            path=str(dst),
        )
    if mode is not None and not overwrite:
        raise _exists(dst)
    with temp_sibling(dst) as tmp, temp_sibling(dst, "trash") as trash:
        try:
            os.mkdir(tmp)
            write(tmp)
            for entry in tmp.rglob("*"):
                if entry.is_file():
                    fd = os.open(entry, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            fsync_dir(tmp)
            if _lstat_mode(dst) is not None:
                if not overwrite:
                    raise _exists(dst)
                os.rename(dst, trash)
            os.rename(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(dst.parent)
    return sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
