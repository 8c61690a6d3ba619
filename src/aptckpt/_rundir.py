"""The layout of a run directory, and the rules that keep the manager's file access inside it.

A run directory is prepared by whoever starts the run, and later copied, moved
and shared, so its entries are not trusted. What the manager writes -- the run
lock, ``metadata.json``, ``checkpoints/``, ``temp/``, ``tokenizer/``, the
``delta`` store -- never goes through a symbolic link: a link there could point
at another project's files, which a save would overwrite and retention or
cleanup would delete. A writing manager refuses a run whose folders are links
(:func:`refuse_links`, naming the link); files directly in the run are replaced
by ``rename``, which replaces a link rather than following it. The run directory
*itself* may be a link: the user chose that path.

Reads of the manager's own small files (:func:`read_regular`) open with
``O_NOFOLLOW | O_NONBLOCK``, accept only regular files and cap the size, so a
FIFO, a device or a link to ``/dev/zero`` planted as ``metadata.json`` cannot
hang or exhaust the reader.

Limits: the checks run before each write, by path; a link swapped in *between*
the check and the write (a concurrent attacker with write access to the run) is
not excluded. Writers other than aptckpt are not excluded either.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from pathlib import Path

from aptckpt._config import MAX_MANIFEST_BYTES
from aptckpt.errors import (
    AptckptError,
    CheckpointExistsError,
    StoreBusyError,
    StoreNotFoundError,
    UnsafePathError,
)
from aptckpt.manifest import CHECKSUM_TAIL, MANIFEST_NAME
from aptckpt.objectstore import DEFAULT_STORE_NAME, ObjectStore
from aptckpt.storage.local._atomic import remove_stale_temps, write_file_atomic

__all__ = [
    "FOLDERS",
    "INDEX_NAME",
    "MAX_INDEX_BYTES",
    "REGULAR",
    "STORE",
    "TEMP",
    "TOKENIZER",
    "ensure_folder",
    "free_name",
    "is_link",
    "manifest_digest",
    "read_regular",
    "refuse_links",
    "remove_debris",
    "write_small_file",
]

log = logging.getLogger("aptckpt")

INDEX_NAME = "metadata.json"
REGULAR, TEMP, TOKENIZER = "checkpoints", "temp", "tokenizer"
STORE = DEFAULT_STORE_NAME
#: The folders of a run that the manager writes into.
FOLDERS = (REGULAR, TEMP, TOKENIZER, STORE)
#: An index over ~100 000 checkpoints; a larger ``metadata.json`` is not one the
#: manager wrote, and is ignored (rebuilt) rather than read into memory.
MAX_INDEX_BYTES = 64 << 20


def is_link(path: Path) -> bool:
    """True if ``path`` is a symbolic link (dangling or not)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _link_error(run_dir: Path, name: str) -> UnsafePathError:
    link = run_dir / name
    try:
        target = f" (to '{os.readlink(link)}')"
    except OSError:
        target = ""
    return UnsafePathError(
        f"'{link}' is a symbolic link{target}; CheckpointManager never writes through a "
        "link inside a run directory, since the files it points at would be overwritten or "
        "deleted. Replace it with a real directory (to keep the run on another disk, point "
        "the run directory itself there)",
        path=str(link),
    )


def refuse_links(run_dir: Path, names: tuple[str, ...] = FOLDERS) -> None:
    """Raise :class:`UnsafePathError` naming the first of ``run_dir/<name>`` that is a link."""
    for name in names:
        if is_link(run_dir / name):
            raise _link_error(run_dir, name)


def ensure_folder(run_dir: Path, name: str) -> Path:
    """``run_dir/name`` as a real directory, created if missing.

    Raises:
        UnsafePathError: it is a symbolic link.
        OSError: it cannot be created (or exists and is not a directory).
    """
    path = run_dir / name
    refuse_links(run_dir, (name,))
    path.mkdir(parents=True, exist_ok=True)
    refuse_links(run_dir, (name,))  # a link that appeared while we made it
    return path


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, read without following a link and
    without blocking on a FIFO.

    Raises:
        FileNotFoundError: it does not exist.
        OSError: it is a link (``ELOOP``), not a regular file, larger than
            ``limit`` bytes (``EFBIG``), or unreadable.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        chunks, left = [], limit + 1  # +1: a file that grows past the limit is refused too
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
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def manifest_digest(checkpoint: Path) -> str | None:
    """A fingerprint of the checkpoint's manifest.

    The index stores it with each entry, so a later reader can tell, without
    decoding the manifest, that the entry was made from exactly this manifest (a
    checkpoint saved again under the same name has another one). A manifest of format
    version 2 or later ends with the XXH3-128 of all its other bytes: its size and those
    16 bytes identify it, read without reading the rest (listing a run of many large
    manifests stays cheap). Older manifests are hashed whole (BLAKE2b-128). None when the
    manifest cannot be read safely.
    """
    path = checkpoint / MANIFEST_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
                return None
            tail = os.pread(
                fd, len(CHECKSUM_TAIL) + 16, max(0, st.st_size - len(CHECKSUM_TAIL) - 16)
            )
        finally:
            os.close(fd)
        if len(tail) == len(CHECKSUM_TAIL) + 16 and tail.startswith(CHECKSUM_TAIL):
            return f"{st.st_size:x}-{tail[-16:].hex()}"
        data = read_regular(path, MAX_MANIFEST_BYTES)
    except OSError:
        return None
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def write_small_file(run_dir: Path, folder: str, name: str, data: bytes) -> bool:
    """Replace ``run_dir/folder/name`` with ``data`` atomically, unless it already
    holds exactly those bytes; True if it was written.

    ``folder`` must be a real directory (created if missing); an existing
    ``name`` that is a link, a FIFO or a device is replaced, never written through.

    Raises:
        UnsafePathError: ``folder`` is a symbolic link.
        OSError: the write failed.
    """
    directory = ensure_folder(run_dir, folder)
    target = directory / name
    try:
        if read_regular(target, len(data)) == data:
            return False
    except OSError:
        pass  # missing, different, or not a regular file: replaced below
    write_file_atomic(target, data)
    return True


def free_name(run_dir: Path, folder: str, name: str, sequence: int) -> str:
    """``folder/name``, or ``folder/name_seq<sequence>`` if that is taken.

    A save never replaces a checkpoint: a run resumed from an older checkpoint
    saves again at steps its abandoned continuation saved, and the checkpoint
    there may be the run's best, kept by retention (or one the run cannot read,
    or a link). The abandoned ones are pruned like any older checkpoint.

    Raises:
        CheckpointExistsError: both names are taken.
    """
    rel = f"{folder}/{name}"
    if not os.path.lexists(run_dir / rel):
        return rel
    suffix = f"_seq{sequence}"
    # the name the manager made must fit a file name too (a long model_name)
    room = 255 - len(suffix.encode())
    base = name.encode()[:room].decode(errors="ignore")
    taken, rel = rel, f"{folder}/{base}{suffix}"
    if os.path.lexists(run_dir / rel):
        raise CheckpointExistsError(
            run_dir / rel,
            f"both it and '{taken}' are taken, and a save never replaces a checkpoint; "
            "move one of them away",
        )
    log.info("%s is taken (a resumed run saves that step again): saving as %s", taken, rel)
    return rel


def remove_debris(run_dir: Path) -> None:
    """Remove what saves that crashed left behind: hidden temp and trash entries
    in the run's folders (not behind links), and temp files in its object store.
    Only under the run lock, so no other process is writing them."""
    folders = [run_dir] + [run_dir / f for f in (REGULAR, TEMP, TOKENIZER)]
    removed = sum(len(remove_stale_temps(f, exclusive=True)) for f in folders if not is_link(f))
    store_dir = run_dir / STORE
    if store_dir.is_dir() and not is_link(store_dir):
        try:
            store = ObjectStore.open(store_dir)
            with store.lock(exclusive=True, wait=False):
                removed += store.clear_tmp()
        except (StoreBusyError, StoreNotFoundError):
            pass  # another process saves into the store: its temp files are live
        except (AptckptError, OSError) as err:
            log.warning("object store temp files not cleaned: %s", err)
    if removed:
        log.info("removed %d leftovers of interrupted saves in %s", removed, run_dir)
