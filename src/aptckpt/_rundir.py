"""The layout of a run directory, and the rules that keep the manager's file access inside it.

A run lives in a storage (:mod:`aptckpt.storage`): a local directory, or a prefix of
an object store (``s3://bucket/runs/a``). :class:`Run` holds the storage and the
run's root, and every file access of the manager goes through it.

A local run directory is prepared by whoever starts the run, and later copied,
moved and shared, so its entries are not trusted. What the manager writes -- the
run lock, ``metadata.json``, ``checkpoints/``, ``temp/``, ``tokenizer/``, the
``delta`` store -- never goes through a symbolic link: a link there could point
at another project's files, which a save would overwrite and retention or
cleanup would delete. A writing manager refuses a run whose folders are links
(:func:`refuse_links`, naming the link); files directly in the run are replaced
by ``rename``, which replaces a link rather than following it. The run directory
*itself* may be a link: the user chose that path. (Object stores have no links.)

Reads of the manager's own small files (:meth:`Run.read`) go through
:meth:`~aptckpt.storage.base.Storage.read_file`, which accepts only regular files,
follows no link and caps the size, so a FIFO, a device or a link to ``/dev/zero``
planted as ``metadata.json`` cannot hang or exhaust the reader.

Limits: the checks run before each write, by path; a link swapped in *between*
the check and the write (a concurrent attacker with write access to the run) is
not excluded. Writers other than aptckpt are not excluded either.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
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
from aptckpt.storage import StorageOptions, resolve
from aptckpt.storage.base import Storage

__all__ = [
    "FOLDERS",
    "HISTORY",
    "INDEX_NAME",
    "MAX_INDEX_BYTES",
    "REGULAR",
    "STORE",
    "TEMP",
    "TOKENIZER",
    "Run",
    "ensure_folder",
    "free_name",
    "manifest_digest",
    "refuse_links",
    "remove_debris",
    "write_small_file",
]

log = logging.getLogger("aptckpt")

INDEX_NAME = "metadata.json"
REGULAR, TEMP, TOKENIZER = "checkpoints", "temp", "tokenizer"
#: The run's metric and save history (:mod:`aptckpt._history`).
HISTORY = "history"
STORE = DEFAULT_STORE_NAME
#: The folders of a run that the manager writes into.
FOLDERS = (REGULAR, TEMP, TOKENIZER, STORE, HISTORY)
#: An index over ~100 000 checkpoints; a larger ``metadata.json`` is not one the
#: manager wrote, and is ignored (rebuilt) rather than read into memory.
MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class Run:
    """Where a run lives: its storage, its root there, and the options that reach it
    again (passed on to :mod:`aptckpt.api`; never shown)."""

    storage: Storage
    root: str
    #: Never in the repr: it may hold credentials (a crash reporter shows locals' reprs).
    options: StorageOptions | None = field(default=None, repr=False)

    @classmethod
    def at(cls, run_dir: str | os.PathLike[str], options: StorageOptions | None) -> Run:
        storage, root = resolve(run_dir, options)
        return cls(storage, root, options if not storage.local else None)

    def path(self, *names: str) -> str:
        """The storage path of ``names`` (relative, "/"-separated) inside the run."""
        return self.storage.join(self.root, *names) if names else self.root

    def display(self, *names: str) -> str:
        """``names`` inside the run as users name it: a local path, or a URL."""
        return self.storage.display(self.path(*names))

    def user_path(self, *names: str) -> Path | str:
        """What the manager returns for ``names``: a ``Path`` locally, a URL string on
        object storage (``pathlib`` would turn ``s3://`` into ``s3:/``)."""
        return Path(self.path(*names)) if self.storage.local else self.display(*names)

    def is_link(self, *names: str) -> bool:
        """True if ``names`` is a symbolic link (dangling or not)."""
        entry = self.storage.info(self.path(*names))
        return entry is not None and entry.kind == "link"

    def exists(self, *names: str) -> bool:
        """True if anything (a link included, not followed) is at ``names``."""
        return self.storage.info(self.path(*names)) is not None

    def is_folder(self, *names: str) -> bool:
        entry = self.storage.info(self.path(*names))
        return entry is not None and entry.kind == "dir"

    def read(self, *names: str, limit: int) -> bytes:
        """A small file of the run (see :meth:`Storage.read_file`)."""
        return self.storage.read_file(self.path(*names), limit=limit)


def _link_error(run: Run, name: str) -> UnsafePathError:
    link = run.display(name)
    target = run.storage.link_target(run.path(name))
    to = f" (to '{target}')" if target is not None else ""
    return UnsafePathError(
        f"'{link}' is a symbolic link{to}; CheckpointManager never writes through a link inside "
        "a run directory, since the files it points at would be overwritten or deleted. "
        "Replace it with a real directory (to keep the run on another disk, point the run "
        "directory itself there)",
        path=link,
    )


def refuse_links(run: Run, names: tuple[str, ...] = FOLDERS) -> None:
    """Raise :class:`UnsafePathError` naming the first of ``run/<name>`` that is a link."""
    if not run.storage.local:
        return  # object stores have no links
    for name in names:
        if run.is_link(name):
            raise _link_error(run, name)


def ensure_folder(run: Run, name: str) -> str:
    """``run/name`` as a real directory (created if missing; nothing to create on object
    stores); returns its storage path.

    Raises:
        UnsafePathError: it is a symbolic link.
        OSError: it cannot be created (or exists and is not a directory).
    """
    refuse_links(run, (name,))
    run.storage.makedirs(run.path(name))
    refuse_links(run, (name,))  # a link that appeared while we made it
    return run.path(name)


def manifest_digest(run: Run, rel: str) -> str | None:
    """A fingerprint of the manifest of checkpoint ``rel``.

    The index stores it with each entry, so a later reader can tell, without
    decoding the manifest, that the entry was made from exactly this manifest (a
    checkpoint saved again under the same name has another one). A manifest of format
    version 2 or later ends with the XXH3-128 of all its other bytes: its size and those
    16 bytes identify it, read without reading the rest (listing a run of many large
    manifests stays cheap, one ranged read each on object stores). Older manifests are
    hashed whole (BLAKE2b-128). None when the manifest cannot be read safely.
    """
    path = run.path(rel, MANIFEST_NAME)
    try:
        entry = run.storage.info(path)
        if entry is None or entry.kind != "file" or entry.size > MAX_MANIFEST_BYTES:
            return None
        tail_size = len(CHECKSUM_TAIL) + 16
        tail = run.storage.read_range(path, max(0, entry.size - tail_size), tail_size)
        if len(tail) == tail_size and tail.startswith(CHECKSUM_TAIL):
            return f"{entry.size:x}-{tail[-16:].hex()}"
        data = run.storage.read_file(path, limit=MAX_MANIFEST_BYTES)
    except OSError:
        return None
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def write_small_file(run: Run, folder: str, name: str, data: bytes) -> bool:
    """Replace ``run/folder/name`` with ``data`` atomically, unless it already
    holds exactly those bytes; True if it was written.

    ``folder`` must be a real directory (created if missing); an existing
    ``name`` that is a link, a FIFO or a device is replaced, never written through.

    Raises:
        UnsafePathError: ``folder`` is a symbolic link.
        OSError: the write failed.
    """
    target = run.storage.join(ensure_folder(run, folder), name)
    try:
        if run.storage.read_file(target, limit=len(data)) == data:
            return False
    except OSError:
        pass  # missing, different, or not a regular file: replaced below
    run.storage.write_file(target, data)
    return True


def free_name(run: Run, folder: str, name: str, sequence: int) -> str:
    """``folder/name``, or ``folder/name_seq<sequence>`` if that is taken.

    A save never replaces a checkpoint: a run resumed from an older checkpoint
    saves again at steps its abandoned continuation saved, and the checkpoint
    there may be the run's best, kept by retention (or one the run cannot read,
    or a link). The abandoned ones are pruned like any older checkpoint.

    Raises:
        CheckpointExistsError: both names are taken.
    """
    rel = f"{folder}/{name}"
    if not run.exists(rel):
        return rel
    suffix = f"_seq{sequence}"
    # the name the manager made must fit a file name too (a long model_name)
    room = 255 - len(suffix.encode())
    base = name.encode()[:room].decode(errors="ignore")
    taken, rel = rel, f"{folder}/{base}{suffix}"
    if run.exists(rel):
        raise CheckpointExistsError(
            run.display(rel),
            f"both it and '{taken}' are taken, and a save never replaces a checkpoint; "
            "move one of them away",
        )
    log.info("%s is taken (a resumed run saves that step again): saving as %s", taken, rel)
    return rel


def remove_debris(run: Run) -> None:
    """Remove what saves that crashed left behind: hidden temp and trash entries (on
    object stores: data of saves that never committed, once older than the grace age)
    in the run's folders (not behind links), and temp files in its object store. Only
    under the run lock, so no other process is writing them."""
    folders = [(), (REGULAR,), (TEMP,), (TOKENIZER,), (HISTORY,)]
    removed = sum(
        run.storage.remove_debris(run.path(*f), exclusive=True)
        for f in folders
        if not run.is_link(*f)
    )
    if run.is_folder(STORE) and not run.is_link(STORE):
        try:
            store = ObjectStore.open(run.path(STORE), storage=run.storage)
            with store.lock(exclusive=True, wait=False):
                removed += store.clear_tmp()
        except (StoreBusyError, StoreNotFoundError):
            pass  # another process saves into the store: its temp files are live
        except (AptckptError, OSError) as err:
            log.warning("object store temp files not cleaned: %s", err)
    if removed:
        log.info("removed %d leftovers of interrupted saves in %s", removed, run.display())
