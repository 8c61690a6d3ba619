"""Hidden entries beside a checkpoint while it is saved, replaced or deleted, and their cleanup.

Names, for a checkpoint (or small file) named ``<name>``::

    .<stem>.tmp-<token>     a save being written, or a small file being replaced
    .<stem>.trash-<token>   a checkpoint being deleted
    .<stem>.old-<token>     a checkpoint being replaced without RENAME_EXCHANGE, until
                            the new one holds its name
    .<stem>.lock-<token>    the lock of every entry with that token; holds ``<name>``

``<token>`` is 16 random hex digits. ``<stem>`` is ``<name>`` itself when the entry
names then fit in NAME_MAX (255 bytes), else the first bytes of ``<name>``, ``~`` and a
hash of all of it: every name a file system takes gets entry names it takes too.

**Liveness is a lock, not a pid.** Before making any entry, its owner (:class:`Owner`)
creates the lock file and holds an exclusive ``flock`` on it until its entries are gone.
The kernel drops the lock when the owner dies -- in whatever PID namespace, and on a
file system whose locks reach across hosts, on whatever host it ran -- so cleanup
(:func:`remove_stale_temps`) removes a token's entries only after taking that lock
itself without waiting. The rejected alternative, the pid in the name, is what made
savers in two containers sharing a volume delete each other's saves: a pid means
nothing outside its namespace. The order makes the lock trustworthy: the owner makes
its entries only after checking that the file it locked still has the lock's name (a
cleanup may remove an unlocked lock file), and removes the lock file only after its
entries. A process never probes the locks of its own tokens: where ``flock`` is
emulated by POSIX record locks (NFS), its probe would succeed, and closing the probe
would drop the owner's lock. Entries are recognised by token, never by how a path is
spelled (a folder reached through a symbolic link and through its real path is one
folder). A forked child closes its copies of the lock descriptors, so a child that
outlives its parent does not keep the parent's entries alive.

**A replaced checkpoint is never lost.** An ``old`` entry whose final name is missing
(its owner died between the two renames of a replacement) is renamed back, by the next
cleanup in its folder or the next load of that name; it is only removed once the final
name holds a checkpoint again.

**Entries of older versions** (``.<name>.tmp-<pid>-<hex>``, ``.<name>.trash-<pid>-<hex>``)
carry no lock. They are removed by the run's writer (``exclusive``, under the run lock),
or when their pid is not alive here and they have not changed for :data:`LEGACY_GRACE_S`
seconds (a pid not alive here may be alive in another namespace or on another host;
age is the only evidence left).

Limits: ``flock`` is advisory, and on network file systems it is as good as their lock
support. Where a file system has no locks at all (``ENOLCK``), entries cannot be judged
and cleanup leaves them (the run's writer included), never removing a live save's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from aptckpt.manifest import MANIFEST_NAME

__all__ = [
    "LEGACY_GRACE_S",
    "NAME_MAX",
    "Owner",
    "is_temporary",
    "recover",
    "remove_stale_temps",
    "settle_old",
    "stem_of",
    "temp_sibling",
]

log = logging.getLogger("aptckpt")

#: Longest file name, in bytes, that entry names are kept within.
NAME_MAX = 255
#: Entries of older versions (no lock) unchanged this long, with a pid not alive here, are stale.
LEGACY_GRACE_S = 3600.0
_KINDS = ("tmp", "trash", "old", "lock")
_TOKEN_HEX = 16
#: Longest stem: ``.`` + stem + ``.trash-`` + token stays within NAME_MAX.
_MAX_STEM = NAME_MAX - 1 - len(".trash-") - _TOKEN_HEX
_HASH_HEX = 16
_NAME = re.compile(
    rf"\.(?P<stem>.+)\.(?P<kind>tmp|trash|old|lock)-(?P<token>[0-9a-f]{{{_TOKEN_HEX}}})",
    re.DOTALL,
)
_LEGACY = re.compile(r"\..+\.(?:tmp|trash)-(?P<pid>[0-9]+)-[0-9a-f]+", re.DOTALL)
_TRUNCATED = re.compile(rf".*~[0-9a-f]{{{_HASH_HEX}}}", re.DOTALL)
_LOCK_TRIES = 16
_MAX_RECORDED_NAME = 4 * NAME_MAX

#: Owners alive in this process, by token (their entries are never probed, let alone removed).
_owned: dict[str, Owner] = {}
_mutex = threading.Lock()


def is_temporary(name: str) -> bool:
    """True for the name of a hidden temp, trash, old or lock entry (never a checkpoint)."""
    return _NAME.fullmatch(name) is not None or _LEGACY.fullmatch(name) is not None


def stem_of(name: str) -> str:
    """The part of entry names that stands for ``name``, short enough for NAME_MAX."""
    raw = os.fsencode(name)
    if len(raw) <= _MAX_STEM:
        return name
    digest = hashlib.blake2b(raw, digest_size=_HASH_HEX // 2).hexdigest()
    cut = raw[: _MAX_STEM - 1 - _HASH_HEX]
    for back in range(4):  # end on a whole UTF-8 character where the name is UTF-8
        try:
            cut[: len(cut) - back].decode("utf-8")
        except UnicodeDecodeError:
            continue
        cut = cut[: len(cut) - back]
        break
    return f"{os.fsdecode(cut)}~{digest}"


def _entry(parent: Path, stem: str, kind: str, token: str) -> Path:
    return parent / f".{stem}.{kind}-{token}"


#: A save's token: what names its entries.
TOKEN = re.compile(rf"[0-9a-f]{{{_TOKEN_HEX}}}")


def temp_entry(final: Path, kind: str, token: str) -> Path:
    """The ``tmp``, ``trash`` or ``old`` entry of the save ``token`` of ``final``."""
    return _entry(final.parent, stem_of(final.name), kind, token)


def _try_flock(fd: int) -> bool | None:
    """Take an exclusive lock without waiting: True, False if someone holds it,
    None if this file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
            return None  # no locks here (EBADF: NFS wants a writable descriptor we lack)
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (by device and inode)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class Owner:
    """A token whose entries beside ``final`` are in use while this object holds its lock.

    Make the entries (:meth:`entry` names them) only after creating the owner, and
    :meth:`release` it only once they are gone (or settled); as a context manager it
    releases on exit.

    Raises:
        OSError: the lock file cannot be created (full disk, permissions).
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.parent = final.parent
        self.stem = stem_of(final.name)
        for _ in range(_LOCK_TRIES):
            token = secrets.token_hex(_TOKEN_HEX // 2)
            path = _entry(self.parent, self.stem, "lock", token)
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
            )
            try:
                # The final name, for a cleanup that must restore an ``old`` entry whose
                # stem is a truncated one. Not fsynced: lost, it costs only that restore.
                view = memoryview(os.fsencode(final.name))
                while view:
                    view = view[os.write(fd, view) :]
                locked = _try_flock(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            if locked is False or not _same_file(fd, path):
                os.close(fd)  # a cleanup took the new, still unlocked file and removes it
                continue
            if locked is None:
                log.debug("no file locks in %s: cleanup cannot judge %s", self.parent, path)
            break
        else:
            raise OSError(errno.EAGAIN, "could not lock a new temporary entry", str(self.parent))
        self.token = token
        self._lock_path = path
        self._fd: int | None = fd
        with _mutex:
            _owned[token] = self

    def entry(self, kind: str) -> Path:
        """This owner's ``tmp``, ``trash`` or ``old`` entry (not created here)."""
        return _entry(self.parent, self.stem, kind, self.token)

    def release(self, *, keep_lock_file: bool = False) -> None:
        """Remove the lock file (unless ``keep_lock_file``: an entry is left for a
        later cleanup, which needs the final name recorded in it), then drop the lock."""
        with _mutex:
            fd, self._fd = self._fd, None
            _owned.pop(self.token, None)
        if fd is None:
            return  # released already, or a forked child's copy
        try:
            if not keep_lock_file:
                os.unlink(self._lock_path)
        except FileNotFoundError:
            pass
        except OSError as err:  # an unlocked lock file is removed by the next cleanup
            log.debug("could not remove %s: %s", self._lock_path, err)
        finally:
            os.close(fd)

    def __enter__(self) -> Owner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _after_fork_in_child() -> None:
    """Close the child's copies of the lock descriptors; the parent's keep the locks."""
    global _mutex
    _mutex = threading.Lock()  # another thread may have held it at the fork
    for owner in list(_owned.values()):
        fd, owner._fd = owner._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # not LOCK_UN: that would unlock the parent's too
    _owned.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def temp_sibling(path: Path, kind: str = "tmp") -> Iterator[Path]:
    """A hidden ``kind`` entry name beside ``path``, owned (see :class:`Owner`) while
    in use; the caller creates and removes the entry itself."""
    with Owner(path) as owner:
        yield owner.entry(kind)


# ------------------------------------------------------------------- cleanup


def _remove(path: Path) -> bool:
    """Remove the file or directory ``path`` (never following a link); True if it is gone."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError as err:
        log.debug("could not remove %s: %s", path, err)
    return not os.path.lexists(path)


def _final_name(stem: str, recorded: str | None) -> str | None:
    """The name an ``old`` entry with ``stem`` was displaced from, if it can be known."""
    if recorded is not None and "\0" in recorded:
        recorded = None  # no file name holds a NUL byte: a planted or damaged lock file
    if recorded is not None and stem_of(recorded) == stem and "/" not in recorded:
        return recorded if recorded not in (".", "..") else None
    if _TRUNCATED.fullmatch(stem) or stem in (".", ".."):
        return None  # perhaps truncated: only the lock file knew the name
    return stem


def settle_old(old: Path, final: Path | None) -> bool:
    """Restore the displaced checkpoint ``old`` to ``final`` unless that name holds a
    checkpoint again, in which case ``old`` is removed; True if ``old`` is gone.
    ``final`` None: the name is unknown, ``old`` is kept (and reported)."""
    if not os.path.lexists(old):
        return True
    if final is None:
        log.warning(
            "'%s' holds a checkpoint an interrupted save was replacing, but its name is "
            "unknown: rename it back by hand",
            old,
        )
        return False
    if os.path.isfile(final / MANIFEST_NAME):
        return _remove(old)
    try:
        os.rename(old, final)  # onto nothing, or an empty directory
        fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        log.warning("could not restore '%s' to '%s': %s", old, final, err)
        return not os.path.lexists(old)
    log.warning("restored '%s', which an interrupted save was replacing", final)
    return True


def _settle(parent: Path, stem: str, token: str) -> tuple[list[str], bool]:
    """Clean up after the owner of ``token`` if it is gone: ``(names removed, busy)``."""
    lock_path = _entry(parent, stem, "lock", token)
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        # Read-write where allowed: on NFS, flock is emulated with fcntl locks, and an
        # exclusive one needs a descriptor open for writing (EBADF otherwise).
        try:
            fd: int | None = os.open(lock_path, flags | os.O_RDWR)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise
            fd = os.open(lock_path, flags | os.O_RDONLY)
    except FileNotFoundError:
        # No lock file: its owner is done (it removes the lock file last); what is left
        # was abandoned after a failed removal, or by hand.
        fd = None
    except OSError as err:
        log.debug("cannot judge %s: %s", lock_path, err)
        return [], True
    try:
        recorded = None
        if fd is not None:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return [], True
            locked = _try_flock(fd)
            if not locked or not _same_file(fd, lock_path):
                return [], True  # in use (or no locks here: cannot tell)
            data = os.pread(fd, _MAX_RECORDED_NAME, 0)
            recorded = os.fsdecode(data) if data else None
        removed = []
        left = False
        for kind in ("old", "tmp", "trash"):
            path = _entry(parent, stem, kind, token)
            if not os.path.lexists(path):
                continue
            if kind == "old":
                final = _final_name(stem, recorded)
                gone = settle_old(path, parent / final if final is not None else None)
            else:
                log.info("removing stale temporary %s", path)
                gone = _remove(path)
            if gone:
                removed.append(path.name)
            left = left or not gone
        if fd is not None and not left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)  # while still holding the lock
            removed.append(lock_path.name)
        return removed, False
    except OSError as err:
        log.debug("cleanup of %s stopped: %s", lock_path, err)
        return [], True
    finally:
        if fd is not None:
            os.close(fd)


def _legacy_stale(path: Path, pid: int, exclusive: bool) -> bool:
    if exclusive:
        return True
    if pid != os.getpid():  # our own pid: an earlier process's (this version never uses pids)
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            pass
        except PermissionError:
            return False
    try:
        age = time.time() - os.lstat(path).st_mtime
    except OSError:
        return False
    return age > LEGACY_GRACE_S


def remove_stale_temps(parent: Path, *, exclusive: bool = False) -> list[str]:
    """Clean up after the saves and deletes in ``parent`` whose owners are gone.

    A token's entries go once its lock can be taken without waiting; a displaced
    checkpoint is restored to its name if that is missing (see the module docstring).
    ``exclusive`` (the caller holds the run lock) also removes every entry of older
    versions, which carry no lock. Returns the names removed (restored ones included).
    Never raises for an entry it cannot judge or remove: it is left.
    """
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    tokens: dict[str, str] = {}
    for name in names:
        match = _NAME.fullmatch(name)
        if match is not None:
            tokens.setdefault(match["token"], match["stem"])
            continue
        legacy = _LEGACY.fullmatch(name)
        if legacy is not None and _legacy_stale(parent / name, int(legacy["pid"]), exclusive):
            log.info("removing stale temporary %s", parent / name)
            if _remove(parent / name):
                removed.append(name)
    with _mutex:
        mine = set(_owned)
    for token, stem in tokens.items():
        if token not in mine:
            removed += _settle(parent, stem, token)[0]
    return removed


def pending(final: Path) -> dict[str, list[Path]]:
    """The entries beside ``final`` that stand for it, by kind (``old``, ``trash``, ...)."""
    stem = stem_of(final.name)
    found: dict[str, list[Path]] = {}
    try:
        names = os.listdir(final.parent)
    except OSError:
        return found
    for name in names:
        match = _NAME.fullmatch(name)
        if match is not None and match["stem"] == stem:
            found.setdefault(match["kind"], []).append(final.parent / name)
    return found


def recover(final: Path, *, wait_s: float = 2.0) -> bool:
    """Restore ``final`` from a replacement that left it only under an ``old`` name.

    A replacement in progress (its owner alive between its two renames) is waited for
    up to ``wait_s`` seconds. True if ``final`` exists afterwards.
    """
    deadline = time.monotonic() + wait_s
    while True:
        olds = pending(final).get("old", [])
        busy = False
        for old in olds:
            token = _NAME.fullmatch(old.name)["token"]  # type: ignore[index]
            with _mutex:
                mine = token in _owned
            busy = mine or _settle(final.parent, stem_of(final.name), token)[1] or busy
        if os.path.lexists(final):
            return True
        if not busy or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
