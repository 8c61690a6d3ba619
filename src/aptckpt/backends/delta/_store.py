"""Where a ``delta`` save keeps its objects, and which checkpoint it deltas against.

The store of a save is ``aptckpt-store`` in the checkpoint's parent folder unless
``store=`` says otherwise, on the checkpoint's own storage (a local directory, or
the parent prefix of an ``s3://``/``memory://`` checkpoint).

The *base* is the newest committed ``delta`` checkpoint using the same store. Finding
it reads only what it must: the candidates' manifests are looked up (one ``info``
each, no data read), ordered newest first by their time, and read one at a time
until one uses the store -- usually the first. On the local file system the
candidates are every checkpoint beneath the store's folder (a walk of directories
is cheap there). On an object store, where each folder listed costs a request, they
are the checkpoints next to the new one (one listing of its parent folder); only if
none is there does it walk beneath the store's folder. No checkpoint's data or
objects are ever listed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack

from aptckpt import _config, objectstore, tree
from aptckpt.backends.delta._format import DeltaPayload, StoredObject, parse_payload
from aptckpt.errors import AptckptError, BackendError, UnsupportedPathError
from aptckpt.manifest import MANIFEST_NAME, Manifest, TensorRecord
from aptckpt.objectstore import ObjectStore
from aptckpt.storage import Storage, is_url, resolve
from aptckpt.storage.local._temps import is_temporary

__all__ = ["Base", "find_base", "read_base", "store_path", "written"]

log = logging.getLogger("aptckpt")

#: Parallel manifest look-ups on an object store.
_LOOKUPS = 16


@dataclass(frozen=True)
class Base:
    """The checkpoint a save deltas against."""

    path: str
    payload: DeltaPayload
    by_key: dict[str, tuple[TensorRecord, tuple[StoredObject, ...]]]


def on_storage(storage: Storage, given: str | os.PathLike[str], what: str) -> str:
    """``given`` (an option naming a place: a local path, or a URL) as a path in
    ``storage``, the storage of the checkpoint being saved."""
    text = os.fspath(given)
    if not is_url(text):
        if storage.local:
            return os.path.abspath(text)
        raise UnsupportedPathError(
            f"{what} '{text}' is a local path but the checkpoint is saved to "
            f"{storage.scheme}://; pass {what} as a URL on the same storage",
            path=text,
        )
    other, path = resolve(text)
    if other.scheme != storage.scheme:
        raise UnsupportedPathError(
            f"{what} '{text}' is on {other.scheme}:// but the checkpoint is saved to "
            f"{storage.scheme}://; a delta store and its checkpoints share one storage",
            path=text,
        )
    return path


def store_path(storage: Storage, checkpoint: str, store: str | os.PathLike[str] | None) -> str:
    """The store a save of ``checkpoint`` uses (``store=`` or the default)."""
    if store is None:
        return storage.join(storage.parent(checkpoint), objectstore.DEFAULT_STORE_NAME)
    return on_storage(storage, store, "store")


class _Written:
    """The last payload this process wrote, parsed, so that the next save against that
    checkpoint need not decode and validate its manifest again (for a state of 100,000
    small tensors that took longer than writing what changed). It is used only once the
    committed manifest's payload is found equal to it: a save that failed to commit, or a
    checkpoint replaced since, falls back to reading the manifest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: tuple[str, str, dict[str, Any], Base] | None = None

    def remember(self, store: ObjectStore, path: str, payload: dict[str, Any], base: Base) -> None:
        with self._lock:
            self._entry = (store.storage.canonical(store.root), path, payload, base)

    def recall(self, storage: Storage, path: str, store: ObjectStore) -> Base | None:
        with self._lock:
            entry = self._entry
        if entry is None or entry[1] != storage.canonical(path):
            return None
        if entry[0] != storage.canonical(store.root):
            return None
        try:
            data = storage.read_file(
                storage.join(path, MANIFEST_NAME), limit=_config.MAX_MANIFEST_BYTES
            )
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except Exception:  # unreadable or damaged: the full reader says why
            return None
        if not isinstance(doc, dict) or doc.get("backend") != "delta" or "parts" in doc:
            return None
        return entry[3] if doc.get("payload") == entry[2] else None


written = _Written()


def read_base(
    storage: Storage, path: str, store: ObjectStore, rank: int | None = None
) -> Base | None:
    """The delta checkpoint at ``path`` if it uses ``store``, else None. A checkpoint saved
    by a process group is a base only for a rank's part (``rank``): the part that rank
    wrote, its tensors keyed by the key paths of the tensors they store boxes of."""
    if rank is None:
        known = written.recall(storage, path, store)
        if known is not None:
            return known
    with storage.open_checkpoint(path) as reader:
        manifest = reader.read_manifest()
    if manifest.backend != "delta":
        return None
    where = storage.display(path)
    if manifest.sharded:
        return _part_base(storage, path, store, manifest, rank)
    payload = parse_payload(manifest, where)
    root = payload.store_root(storage, path, where)
    if storage.canonical(root) != storage.canonical(store.root):
        return None
    keys = tree.key_paths(manifest.skeleton, len(manifest.tensors))
    by_key = dict(zip(keys, zip(manifest.tensors, payload.chunks, strict=True), strict=True))
    return Base(storage.canonical(path), payload, by_key)


def _part_base(
    storage: Storage, path: str, store: ObjectStore, manifest: Manifest, rank: int | None
) -> Base | None:
    part = next((i for i, p in enumerate(manifest.parts) if p.rank == rank), None)
    if rank is None or part is None:
        return None
    where = storage.display(path)
    sub = manifest.part(part)
    payload = parse_payload(sub, where)
    if storage.canonical(payload.store_root(storage, path, where)) != storage.canonical(store.root):
        return None
    keys = tree.key_paths(manifest.skeleton, len(manifest.tensors))
    own = re.compile(rf"@rank{rank}(?!\d)")
    by_key = {}
    for tensor, boxes in enumerate(manifest.shards):
        for box in boxes:
            if box.part == part:  # a rank's own values are spelled without the suffix
                key = own.sub("", keys[tensor])
                by_key[key] = (sub.tensors[box.index], payload.chunks[box.index])
    return Base(storage.canonical(path), payload, by_key)


def find_base(
    storage: Storage,
    checkpoint: str,
    store: ObjectStore,
    given: str | os.PathLike[str] | None,
    rank: int | None = None,
) -> Base | None:
    """The base of a save of ``checkpoint`` into ``store``: ``given`` (``base=``), or
    the newest delta checkpoint using the store; see the module docstring."""
    if given is not None:
        path = on_storage(storage, given, "base")
        base = read_base(storage, path, store, rank)
        if base is None:
            raise BackendError(
                f"base '{storage.display(path)}' is not a delta checkpoint using the store "
                f"'{store.location}'; pass a checkpoint saved with backend='delta' and the "
                "same store"
            )
        return base
    home = storage.parent(store.root)
    if storage.local:
        candidates = list(objectstore.find_checkpoints(home, skip=store.root, storage=storage))
        return _newest_first(storage, candidates, checkpoint, store, rank)
    siblings = [
        storage.join(storage.parent(checkpoint), e.name)
        for e in storage.list(storage.parent(checkpoint))
        if e.kind == "dir" and not is_temporary(e.name)
    ]
    found = _newest_first(storage, siblings, checkpoint, store, rank)
    if found is None and storage.parent(checkpoint) != home:
        walked = objectstore.find_checkpoints(home, skip=store.root, storage=storage)
        found = _newest_first(storage, list(walked), checkpoint, store, rank)
    return found


def _newest_first(
    storage: Storage,
    candidates: list[str],
    checkpoint: str,
    store: ObjectStore,
    rank: int | None = None,
) -> Base | None:
    """The newest of ``candidates`` (by manifest time) that is a delta checkpoint using
    ``store``. A checkpoint being replaced at ``checkpoint`` is one: it stays committed
    until the new one is, and every manifest lists all the objects it reaches."""
    candidates = [c for c in candidates if c != store.root]

    def stamp(path: str) -> tuple[float, str] | None:
        try:
            entry = storage.info(storage.join(path, MANIFEST_NAME))
        except OSError:
            return None
        return (entry.mtime, path) if entry is not None and entry.kind == "file" else None

    if storage.local or len(candidates) < 2:
        stamps = [stamp(c) for c in candidates]
    else:
        with ThreadPoolExecutor(min(_LOOKUPS, len(candidates))) as pool:
            stamps = list(pool.map(stamp, candidates))
    for _, candidate in sorted((s for s in stamps if s is not None), reverse=True):
        try:
            base = read_base(storage, candidate, store, rank)
        except (AptckptError, OSError) as err:
            log.warning("not using '%s' as a delta base: %s", storage.display(candidate), err)
            continue
        if base is not None:
            return base
    return None
