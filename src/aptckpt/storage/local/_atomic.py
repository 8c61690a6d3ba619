"""The local commit protocol: a checkpoint appears whole or not at all.

Writing: every file goes into a sibling temp directory ``.<name>.tmp-<token>``;
once the backend is done, every data file is fsynced, then the manifest is
written and fsynced, then the temp directory, then it is renamed onto the final
name and the parent directory is fsynced. A crash at any instant leaves either
the old state or the new one, plus at worst hidden entries, which the next save
into the same parent removes once their owner is gone -- judged by a lock the
owner holds, never by a pid (:mod:`aptckpt.storage.local._temps`).

Deleting renames the checkpoint to a hidden trash name first, so a crash
part-way through leaves hidden debris, never a visible half-deleted checkpoint.

Replacing an existing checkpoint (``overwrite=True``) swaps the two directories
with ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, so the name
never disappears. Elsewhere it falls back to two renames: the old checkpoint
moves to a hidden ``old`` name, then the new one takes the name. A crash between
the two leaves the old one under the ``old`` name, and the next save in that
folder or the next load of that name renames it back: the name ends with the
old checkpoint or the new one, never neither.

Reading: :mod:`aptckpt.storage.local._reader` (re-exported here).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from aptckpt import manifest as mf
from aptckpt._config import threads as default_threads
from aptckpt.errors import (
    CheckpointExistsError,
    InvalidNameError,
    WriteError,
)
from aptckpt.storage import base
from aptckpt.storage.local._cachepolicy import CacheBudget, budget_for
from aptckpt.storage.local._directio import DirectWriter
from aptckpt.storage.local._reader import CheckpointReader, open_regular
from aptckpt.storage.local._temps import (
    NAME_MAX,
    TOKEN,
    Owner,
    is_temporary,
    remove_stale_temps,
    settle_old,
    temp_entry,
    temp_sibling,
)

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "JoinedWriter",
    "check_name",
    "is_checkpoint",
    "is_temporary",
    "open_regular",
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
#: Opens a directory only to look names up in it (no read permission needed).
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a committed checkpoint directory (its manifest exists)."""
    return os.path.isfile(os.path.join(path, mf.MANIFEST_NAME))


def check_name(final: Path) -> None:
    """Refuse a checkpoint path whose name no save could commit or keep.

    Raises:
        InvalidNameError: the name is empty, longer than the file system takes,
            or one aptckpt gives its hidden entries (cleanup would remove it).
    """
    name = final.name
    if not name:
        raise InvalidNameError(f"'{final}' names no directory; pass a checkpoint path")
    try:
        limit = os.pathconf(final.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = NAME_MAX
    size = len(os.fsencode(name))
    if size > limit:
        raise InvalidNameError(
            f"checkpoint name '{name[:40]}...' is {size} bytes; this file system takes names "
            f"of at most {limit}: choose a shorter name",
            path=str(final),
        )
    if is_temporary(name):
        raise InvalidNameError(
            f"'{name}' is a name aptckpt gives the hidden entries of saves in progress, which "
            "cleanup removes; choose another name",
            path=str(final),
        )


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
    if code in (errno.EISDIR, errno.ENOTEMPTY, errno.ENOTDIR, errno.EEXIST):
        return "something else is in the way at that path: move it away, then save again"
    return "fix the cause, then save again"


def write_error(action: str, err: OSError, *, path: str | os.PathLike[str]) -> WriteError:
    """A :class:`WriteError` for an ``OSError`` met while ``action`` (e.g. "saving
    checkpoint 'x'"), naming the file that failed and what to do about it."""
    # A rename that failed because of what is at its destination names the destination
    # (the source is a hidden temp entry the user never made).
    in_the_way = err.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.ENOTDIR, errno.EEXIST)
    name = err.filename2 if in_the_way and err.filename2 else err.filename
    where = f" ('{name}')" if name else ""
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


class _TempFiles(base.CheckpointWriter):
    """The data files of a save in progress, inside its temporary directory ``root``."""

    root: Path
    _files: list[str]
    #: What this save may still write through the page cache (made at the first file).
    _cache_budget: CacheBudget | None = None

    @property
    def files(self) -> list[str]:
        """Relative paths of the files created so far, in creation order."""
        return list(self._files)

    def open(self, name: str, *, digest_chunk_size: int = 0) -> DirectWriter:
        """Start data file ``name``: written with ``O_DIRECT`` where the file system
        takes it (:mod:`aptckpt.storage.local._directio`), after the part of the save's
        page-cache budget it gets (:mod:`aptckpt.storage.local._cachepolicy`)."""
        path = self.reserve(name)
        if self._cache_budget is None:
            self._cache_budget = CacheBudget(budget_for(self.root))
        return DirectWriter(
            path, digest_chunk_size=digest_chunk_size or None, cache=self._cache_budget
        )

    def reserve(self, name: str) -> Path:
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
        """fsync every data file (in parallel: fsync releases the GIL), then the folders
        below the temporary directory that hold them (its own entries are made durable
        by the commit)."""
        self._sync_paths([self.root / n for n in self._files], threads)
        folders = {(self.root / n).parent for n in self._files} - {self.root}
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            _fsync_path(folder, directory=True)

    @staticmethod
    def _sync_paths(paths: list[Path], threads: int | None) -> None:
        workers = max(1, min(len(paths), threads or default_threads()))
        if workers == 1:
            # In this thread: no pool to wait on (a Ctrl-C landing inside a future's
            # Condition.wait surfaces as CPython's "cannot release un-acquired lock").
            for path in paths:
                _fsync_path(path)
            return
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(_fsync_path, paths))


class CheckpointWriter(_TempFiles):
    """Collects the files of one checkpoint in a temp directory, then commits them.

    Use as a context manager: leaving it without :meth:`commit` (an exception)
    removes the temp directory and leaves the target untouched.
    """

    def __init__(self, final: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        from aptckpt.storage.local import LOCAL

        super().__init__()
        self.storage = LOCAL
        self.final = Path(os.path.abspath(final))
        self.path = str(self.final)
        self.overwrite = overwrite
        check_name(self.final)
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(
                f"creating directory '{parent}' for checkpoint '{self.final.name}'",
                err,
                path=parent,
            ) from err
        # First: it may put back a checkpoint an interrupted replacement left under an
        # ``old`` name -- this one's included, which the target check must then see.
        remove_stale_temps(parent)
        self._check_target()
        try:
            self._owner = Owner(self.final)
        except OSError as err:
            raise write_error(
                f"saving checkpoint '{self.final}' (nothing was written)", err, path=self.final
            ) from err
        self.root = self._owner.entry("tmp")
        #: Other writers of this save (the ranks of a process group) join with it.
        self.token = self._owner.token
        self._old = self._owner.entry("old")
        #: Where the checkpoint this save replaced is, once it is out of the way.
        self._replaced: Path | None = None
        try:
            self.root.mkdir()
        except OSError as err:
            self._owner.release()
            raise write_error(
                f"saving checkpoint '{self.final}' (nothing was written)", err, path=self.final
            ) from err
        self._files: list[str] = []
        self._committed = False

    def _check_target(self) -> None:
        final = self.final
        # Rival saves of the same name rename it away and back at any moment: a name that
        # vanishes between two looks is a name with nothing there.
        try:
            mode = os.lstat(final).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            if is_checkpoint(final):
                if not self.overwrite:
                    raise CheckpointExistsError(
                        final,
                        "a checkpoint already exists there; "
                        "pass overwrite=True to replace it or choose another path",
                    )
                return
            try:
                with os.scandir(final) as entries:
                    if next(entries, None) is None:
                        return  # an empty directory the user made for us
            except FileNotFoundError:
                return
            if is_checkpoint(final):  # a rival's checkpoint arrived meanwhile
                self._check_target()
                return
        raise CheckpointExistsError(
            final,
            "the path exists and is not an aptckpt checkpoint; refusing to replace it "
            "(move it away or choose another path)",
        )

    def _finish(self) -> None:
        try:
            # An old checkpoint still out of its name (a failure between the two
            # renames, and putting it back failed too) keeps the lock file, which
            # records the name for the cleanup that restores it.
            self._owner.release(keep_lock_file=not self._settle_old())
        finally:
            super()._finish()

    @property
    def committed(self) -> bool:
        """True once the checkpoint has been renamed into place."""
        return self._committed

    def commit(self, manifest_bytes: bytes) -> None:
        """Write the manifest last and move the checkpoint into place, durably."""
        manifest_path = self.root / mf.MANIFEST_NAME
        # A descriptor, not a file object: a Ctrl-C landing between open() and a `with`
        # would leave a file object to the garbage collector (a ResourceWarning there);
        # here the window is one bytecode, and the temp directory goes with the save.
        fd = os.open(manifest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(manifest_bytes)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
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
            if self._replaced is not None:  # only once the new name is durable
                self._remove_replaced(self._replaced)

    def _move_into_place(self) -> bool:
        """Rename the temp directory onto the final name; False if another save
        committed there in the meantime (``overwrite`` then tries again)."""
        try:
            if not self.overwrite or not os.path.lexists(self.final):
                # onto nothing or an empty directory; refused onto a rival's checkpoint
                os.rename(self.root, self.final)
            elif _exchange(self.root, self.final):
                self._replaced = self.root  # the temp name now holds the old checkpoint
            else:
                self._replace_by_two_renames()
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False  # a rival committed first
            if err.errno == errno.ENOENT and os.path.lexists(self.root):
                # the final name vanished under us (ours is still there): a rival's exchange,
                # replacement or delete moved it in between; try again
                return False
            raise
        return True

    def _replace_by_two_renames(self) -> None:
        """Without RENAME_EXCHANGE: the old checkpoint to the ``old`` name, the new one
        to the final name. The ``old`` entry is what a crash in between leaves; cleanup
        and loads put it back (:mod:`aptckpt.storage.local._temps`)."""
        self._settle_old()  # what an earlier attempt left
        os.rename(self.final, self._old)
        try:
            os.rename(self.root, self.final)
        except BaseException:
            with contextlib.suppress(OSError):  # refused if a rival took the name meanwhile
                os.rename(self._old, self.final)
            raise
        self._replaced = self._old

    def _remove_replaced(self, replaced: Path) -> None:
        """Remove the checkpoint this save replaced. An ``old`` entry is first renamed to
        this save's ``trash`` name: one killed half-way through removing it must never be
        taken for a displaced checkpoint and put back (trash is only ever removed)."""
        target = replaced
        if replaced == self._old:
            trash = self._owner.entry("trash")
            try:
                os.rename(replaced, trash)
                target = trash
            except OSError as err:
                log.warning("could not move the replaced checkpoint %s aside: %s", replaced, err)
        shutil.rmtree(target, ignore_errors=True)

    def _settle_old(self) -> bool:
        """Put this save's ``old`` entry back under the final name unless that holds a
        checkpoint (then remove it); True if no ``old`` entry is left."""
        return settle_old(self._old, self.final)

    def abort(self) -> None:
        """Remove everything written so far; the target is untouched."""
        shutil.rmtree(self.root, ignore_errors=True)


class JoinedWriter(_TempFiles):
    """Another writer of a save in progress (a rank of a process group): its files go into
    the coordinator's temporary directory, which must exist; it never commits, and its
    abort removes only its own files (the coordinator's abort removes the rest)."""

    def __init__(self, final: str | os.PathLike[str], token: str) -> None:
        from aptckpt.storage.local import LOCAL

        super().__init__()
        self.storage = LOCAL
        self.final = Path(os.path.abspath(final))
        self.path = str(self.final)
        if not TOKEN.fullmatch(token):
            raise ValueError(f"not a save token: {token!r}")
        self.token = token
        self.root = temp_entry(self.final, "tmp", token)
        try:
            mode = os.lstat(self.root).st_mode
        except OSError as err:
            raise write_error(
                f"joining the save of checkpoint '{self.final}' (its temporary directory "
                f"'{self.root.name}' is not there: the coordinator failed or gave up)",
                err,
                path=self.final,
            ) from err
        if not stat.S_ISDIR(mode):
            raise WriteError(
                f"joining the save of checkpoint '{self.final}': '{self.root}' is not a "
                "directory; nothing was written",
                path=str(self.final),
            )
        self._files = []
        self._folders: list[Path] = []

    @property
    def committed(self) -> bool:
        return False

    def reserve(self, name: str) -> Path:
        """As the coordinator's, but never making the temporary directory itself: once the
        coordinator gave up and removed it, a late rank's write fails instead of leaving a
        directory behind."""
        mf.check_relative_path(name)
        if name == mf.MANIFEST_NAME or name in self._files:
            raise ValueError(f"file name {name!r} is reserved or already used")
        folder = self.root
        for part in name.split("/")[:-1]:
            folder = folder / part
            try:
                os.mkdir(folder)
                self._folders.append(folder)
            except FileExistsError:
                pass
        self._files.append(name)
        return self.root / name

    def commit(self, manifest_bytes: bytes) -> None:
        raise RuntimeError("only the save's coordinator commits")

    def abort(self) -> None:
        for name in self._files:
            with contextlib.suppress(OSError):
                os.unlink(self.root / name)
        for folder in reversed(self._folders):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
