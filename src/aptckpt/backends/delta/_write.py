"""``delta`` write path: hash, plan (reuse or encode each chunk), write the new objects.

A save holds its store's lock shared until its manifest is committed (a no-op on
object stores; see :mod:`aptckpt.objectstore` for the age rule there), writes
its small tensors raw into the checkpoint's own shard through ``writer.open``,
and hands the new objects to :meth:`ObjectStore.put` / :meth:`ObjectStore.sync`
(the storage's ``put_files``) before it returns the payload the API commits.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aptckpt import _accel, _config, _dtypes, objectstore
from aptckpt.backends import _chunks
from aptckpt.backends.delta._cache import base_scratch, recent
from aptckpt.backends.delta._format import (
    _DIGEST,
    _LOCAL_SHARD,
    _SAMPLE,
    DeltaOptions,
    DeltaPayload,
    StoredObject,
)
from aptckpt.backends.delta._read import decode_chain
from aptckpt.backends.delta._store import Base, find_base, store_path, written
from aptckpt.codecs import RAW, Pipeline
from aptckpt.errors import IntegrityError, UnsafePathError
from aptckpt.manifest import TensorRecord, check_relative_path
from aptckpt.objectstore import ObjectStore
from aptckpt.storage import CheckpointWriter
from aptckpt.tree import FlatState

__all__ = ["write"]

log = logging.getLogger("aptckpt")

#: Parallel existence checks of the base's objects on an object store.
_LOOKUPS = 16


@dataclass(frozen=True)
class _Job:
    key: str
    data: memoryview
    itemsize: int
    digest: bytes
    prev: StoredObject | None  # the same chunk in the base, to xor against


def write(flat: FlatState, writer: CheckpointWriter, opts: DeltaOptions, threads: int) -> Any:
    """Write the tensors of ``flat`` (objects into the run's store, small ones into the
    checkpoint's shard); return the payload."""
    storage = writer.storage
    root = store_path(storage, writer.path, opts.store)
    up, name = objectstore.location_of(root, writer.path, storage)
    store = ObjectStore.create(root, storage=storage)
    writer.hold(store.lock(exclusive=False))
    base = find_base(storage, writer.path, store, opts.base, writer.rank)
    since = 0 if base is None else base.payload.since_keyframe + 1
    if since >= opts.keyframe_every:
        since = 0
    hosts = [_chunks.host_tensor(leaf.tensor) for leaf in flat.tensors]
    views = [_dtypes.byte_view(h) for h in hosts]
    digests = _accel.hash_chunks_many(views, opts.chunk_size, threads)
    # Small tensors go to the checkpoint's own shard: an object each would cost a file
    # and an fsync each (a state of 100,000 small tensors took 28 s), and deduplicating
    # a few bytes saves nothing.
    local = [i for i, view in enumerate(views) if 0 < len(view) < opts.local_below]
    local_rows = _write_local(
        writer, [views[i] for i in local], [digests[i] for i in local], opts, threads
    )
    planner = _Planner(store, base, keyframe=since == 0, opts=opts)
    small = set(local)
    in_store = [i for i in range(len(views)) if i not in small]
    for i in in_store:
        planner.add_tensor(flat.tensors[i].key_path, hosts[i].element_size(), views[i], digests[i])
    written = 0
    filling = recent.begin()
    try:
        results = _chunks.ordered_map(
            lambda job: _encode(store, job, filling, opts), planner.jobs, threads=threads
        )
        packer = _Packer()
        new_objects = []
        for obj, stored, nbytes in results:
            new_objects.append(obj)
            written += nbytes
            if stored is not None:
                packer.add(obj, stored)
        resolved = planner.resolve(new_objects)
        _copy_forward(store, resolved, packer)
        # Before the last objects are handed to the storage; objects are named by the
        # digest of the very bytes they hold (a raw chunk is copied, then checked), so
        # none written before is named by a digest its bytes do not match.
        _chunks.check_unchanged(flat, hosts, digests, opts.chunk_size, threads)
        written += packer.put(store)
        store.sync(threads * 2)
    except BaseException:
        recent.abort(filling)
        raise
    recent.commit(store.location, filling)
    writer.external_bytes += written
    chunks: list[list[StoredObject] | None] = [None] * len(views)
    for i, row in zip(in_store, packer.relocate(resolved), strict=True):
        chunks[i] = row
    rows: list[list[list[Any]] | None] = [None] * len(views)
    for i, tensor_rows in zip(local, local_rows, strict=True):
        rows[i] = tensor_rows
    payload, objects = _payload(opts, up, name, since, _relative_base(store, base), chunks)
    if local:
        payload["local"] = {"codecs": [RAW.to_record()], "chunks": rows}
    elif writer.rank is None:
        _remember(store, writer.path, payload, objects, chunks, flat, views, opts)
    return payload


def _remember(
    store: ObjectStore,
    path: str,
    payload: dict[str, Any],
    objects: list[StoredObject],
    chunks: list[list[StoredObject] | None],
    flat: FlatState,
    views: list[memoryview],
    opts: DeltaOptions,
) -> None:
    """Keep this save's payload, parsed, for the next save against it (see ``written``)."""
    every, since = payload["keyframe_every"], payload["since_keyframe"]
    parsed = DeltaPayload(
        opts.chunk_size,
        payload["store"]["up"],
        payload["store"]["name"],
        every,
        since,
        payload["base"],
        tuple(objects),
        tuple(tuple(row or ()) for row in chunks),
    )
    by_key = {
        # only the byte length of a base's tensor record is ever looked at
        leaf.key_path: (TensorRecord("uint8", (len(view),)), tuple(row or ()))
        for leaf, view, row in zip(flat.tensors, views, chunks, strict=True)
    }
    canonical = store.storage.canonical(path)
    written.remember(store, path, payload, Base(canonical, parsed, by_key))


def _relative_base(store: ObjectStore, base: Base | None) -> str | None:
    """The base's path relative to the store's folder (informational), or None where
    the format's path rule cannot spell it: every reader checks the field as a manifest
    path, and names such as Lightning's ``epoch=3-step=40.ckpt`` break that rule (nil
    keeps those manifests readable by every reader, old ones included)."""
    if base is None:
        return None
    home = store.storage.canonical(store.storage.parent(store.root)).rstrip("/") + "/"
    if not base.path.startswith(home):
        return None
    relative = base.path[len(home) :]
    try:
        return check_relative_path(relative)
    except UnsafePathError:
        return None


def _write_local(
    writer: CheckpointWriter,
    views: list[memoryview],
    digests: list[bytes],
    opts: DeltaOptions,
    threads: int,
) -> list[list[list[Any]]]:
    """Write small tensors raw into the checkpoint's shard; their chunk rows."""
    if not views:
        return []
    rows: list[list[list[Any]]] = []
    buffers: list[memoryview] = []
    offset = 0
    for view, packed in zip(views, digests, strict=True):
        tensor_rows = []
        for c, (start, stop) in enumerate(_chunks.chunk_spans(len(view), opts.chunk_size)):
            digest = packed[_DIGEST * c : _DIGEST * (c + 1)]
            tensor_rows.append([0, offset, stop - start, 0, digest, None])
            buffers.append(view[start:stop])
            offset += stop - start
        rows.append(tensor_rows)
    with writer.open(_LOCAL_SHARD) as f:
        f.write_many(buffers, threads)
    return rows


def _payload(
    opts: DeltaOptions,
    up: int,
    name: str,
    since: int,
    base: str | None,
    chunks: list[list[StoredObject] | None],
) -> tuple[dict[str, Any], list[StoredObject]]:
    """The payload, and its objects in the order of its object table."""
    pipelines: dict[Pipeline, int] = {}
    packs: dict[bytes, int] = {}
    pack_rows: list[list[Any]] = []
    index: dict[StoredObject, int] = {}
    rows: list[list[Any]] = []

    def add(obj: StoredObject) -> int:
        if obj in index:
            return index[obj]
        base_index = add(obj.base) if obj.base is not None else None
        codec = pipelines.setdefault(obj.pipeline, len(pipelines))
        index[obj] = len(rows)
        row = [obj.name, obj.size, obj.raw_size, codec, obj.digest, base_index]
        if obj.pack is not None:
            if obj.pack not in packs:
                packs[obj.pack] = len(pack_rows)
                pack_rows.append([obj.pack, obj.pack_size])
            row += [packs[obj.pack], obj.offset]
        rows.append(row)
        return index[obj]

    refs = [None if tensor is None else [add(obj) for obj in tensor] for tensor in chunks]
    payload: dict[str, Any] = {
        "chunk_size": opts.chunk_size,
        "store": {"up": up, "name": name},
        "keyframe_every": opts.keyframe_every,
        "since_keyframe": since,
        "base": base,
        "codecs": [p.to_record() for p in pipelines] or [RAW.to_record()],
        "objects": rows,
        "chunks": refs,
    }
    if pack_rows:  # format v5: readers before it refuse the checkpoint by its version
        payload["packs"] = pack_rows
    return payload, list(index)


def _delta_may_win(
    raw: memoryview, previous: Any, delta: Pipeline, whole: Pipeline, weight: float, level: int
) -> bool:
    """False when encoding a sample of a large chunk both ways shows that the whole
    chunk clearly wins (dense changes): then the full delta is not even tried."""
    if len(raw) < 4 * _SAMPLE:
        return True
    sample = slice(0, _SAMPLE)
    as_delta = len(delta.encode(raw[sample], level=level, base=memoryview(previous)[sample]))
    return as_delta * weight < len(whole.encode(raw[sample], level=level))


def _encode(
    store: ObjectStore, job: _Job, filling: Any, opts: DeltaOptions
) -> tuple[StoredObject, bytes | None, int]:
    """Encode one new chunk: as an xor-delta against its previous version when that
    pays for its place in the chain, else whole (compressed or raw). An object of at
    least ``pack_below`` stored bytes is handed to the store as a file of its own:
    ``(object, None, bytes written)``; a smaller one is returned for the save's pack:
    ``(object, its stored bytes, 0)``."""
    level = opts.level
    raw = job.data
    shuffle = job.itemsize if job.itemsize > 1 else 0
    whole = Pipeline(shuffle=shuffle, zstd=True)
    best: tuple[Pipeline, Any, StoredObject | None] | None = None
    if job.prev is not None:
        pipeline = Pipeline(xor=True, shuffle=shuffle, zstd=True)
        # Each link costs a decode on every load: it must beat the whole chunk by
        # a margin that grows with the chain.
        weight = 1 + _config.DELTA_CHAIN_PENALTY * (job.prev.depth + 1)
        # Decided first on the kept copy as it is (a copy racing a concurrent save only
        # sways the guess), so a densely changed chunk costs no copy and check of its
        # previous version.
        kept = recent.peek(store.location, job.prev.digest, len(raw))
        hopeless = kept is not None and not _delta_may_win(
            raw, kept, pipeline, whole, weight, level
        )
        previous = None if hopeless else _previous_version(store, job.prev, len(raw))
        if previous is not None and (
            kept is not None or _delta_may_win(raw, previous, pipeline, whole, weight, level)
        ):
            delta = pipeline.encode(raw, level=level, base=previous)
            # The whole chunk's size is predicted from how well the chain's whole
            # object compressed; compress it only when that leaves the delta in doubt.
            root = job.prev.chain()[0]
            predicted = root.size * len(raw) // max(1, root.raw_size)
            if len(delta) * weight < predicted:
                best = (pipeline, delta, job.prev)
            else:
                alone = whole.encode(raw, level=level)
                best = (
                    (pipeline, delta, job.prev)
                    if len(delta) * weight < len(alone)
                    else (whole, alone, None)
                )
    if best is None:
        best = (whole, whole.encode(raw, level=level), None)
    if len(best[1]) >= len(raw):
        # A raw object is a copy of the chunk as it is now, checked against the digest it
        # will be named by: a tensor written to meanwhile never leaves an object whose
        # bytes differ from its name in the store (later saves would reuse it).
        copy = bytes(raw)
        if _accel.xxh3_128(copy) != job.digest:
            raise _chunks.state_changed((job.key,))
        best = (RAW, copy, None)
    pipeline, stored, base = best
    name = job.digest if pipeline == RAW else _accel.xxh3_128(stored)
    recent.offer(filling, job.digest, raw)
    obj = StoredObject(name, len(stored), len(raw), pipeline, job.digest, base)
    if len(stored) < opts.pack_below:
        return obj, stored if isinstance(stored, bytes) else bytes(stored), 0
    return obj, None, store.put(name, stored)


class _Packer:
    """The save's one pack: the small objects it writes, end to end, in job order.

    One file and one fsync for all of them, where a file each cost an fsync each. The
    pack is named by the XXH3-128 of its bytes, written whole and durably before the
    manifest (locally staged, fsynced and renamed; on object stores one PUT), so a save
    that dies leaves at worst an unreferenced pack, never a partial one under its name.
    """

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.at: dict[bytes, int] = {}  # object name -> offset (same name, same bytes)
        self.placed: dict[StoredObject, int] = {}
        self.name: bytes | None = None

    def add(self, obj: StoredObject, stored: bytes) -> None:
        offset = self.at.get(obj.name)
        if offset is None:
            offset = self.at[obj.name] = self.size
            self.pieces.append(stored)
            self.size += len(stored)
        self.placed[obj] = offset

    def put(self, store: ObjectStore) -> int:
        """Hand the pack to the store (written at its next ``sync``); bytes written."""
        if not self.size:
            return 0
        self.name, written = store.put_pack(b"".join(self.pieces))
        self.pieces = []
        return written

    def relocate(self, rows: list[list[StoredObject]]) -> list[list[StoredObject]]:
        """``rows`` with every object placed in the pack (and every object whose chain
        reaches one) given its place."""
        memo: dict[StoredObject, StoredObject] = {}

        def final(obj: StoredObject) -> StoredObject:
            done = memo.get(obj)
            if done is not None:
                return done
            base = final(obj.base) if obj.base is not None else None
            offset = self.placed.get(obj)
            if offset is not None:
                assert self.name is not None
                done = dataclasses.replace(
                    obj, base=base, pack=self.name, offset=offset, pack_size=self.size
                )
            elif base is not obj.base:
                done = dataclasses.replace(obj, base=base)
            else:
                done = obj
            memo[obj] = done
            return done

        return [[final(obj) for obj in row] for row in rows]


def _copy_forward(store: ObjectStore, rows: list[list[StoredObject]], packer: _Packer) -> None:
    """Copy into this save's pack the objects it reaches in packs it would use less than
    ``DELTA_PACK_MIN_USE`` of: every pack a committed checkpoint reaches is then at least
    that full with objects it reaches, so the bytes garbage collection must keep for
    partly dead packs are bounded (at most as many as the live ones, at 0.5), without
    ever rewriting a pack or a manifest."""
    used: dict[bytes, list[StoredObject]] = {}
    seen: set[StoredObject] = set()
    for row in rows:
        for obj in row:
            link: StoredObject | None = obj
            while link is not None and link not in seen:
                seen.add(link)
                if link.pack is not None and link not in packer.placed:
                    used.setdefault(link.pack, []).append(link)
                link = link.base
    for pack, objects in used.items():
        spans = {o.offset: o for o in objects}  # one stored object may have several rows
        if sum(o.size for o in spans.values()) >= _config.DELTA_PACK_MIN_USE * objects[0].pack_size:
            continue
        copies: dict[int, bytes] = {}
        for offset, obj in sorted(spans.items()):
            stored = store.read_packed(pack, offset, obj.size)
            if _accel.xxh3_128(stored) != obj.name:
                raise IntegrityError(
                    f"object '{obj.name.hex()}' at offset {offset} of pack "
                    f"'{store.pack_label(pack)}' does not match its name: the pack changed "
                    "after saving; run aptckpt verify on the checkpoints of this run",
                    path=store.location,
                )
            copies[offset] = stored
        for obj in objects:
            packer.add(obj, copies[obj.offset])


def _previous_version(store: ObjectStore, prev: StoredObject, size: int) -> Any:
    """The raw bytes ``prev`` decodes to: from memory if the last save left them
    there, else decoded from the store; None if they cannot be read."""
    previous = base_scratch.get(size)
    if recent.get(store.location, prev.digest, previous):
        return previous
    try:
        decode_chain(store, prev, previous, verify=True)
    except (IntegrityError, EOFError, OSError) as err:
        log.warning("cannot read the previous version of a chunk, storing it whole: %s", err)
        return None
    return previous


def _where(obj: StoredObject) -> tuple[bytes, bool]:
    """The file an object lives in: its pack, or its own."""
    return (obj.pack, True) if obj.pack is not None else (obj.name, False)


class _Planner:
    """Decides, chunk by chunk, which object to reuse and what to encode."""

    def __init__(
        self, store: ObjectStore, base: Base | None, *, keyframe: bool, opts: DeltaOptions
    ) -> None:
        self.store, self.base, self.keyframe, self.opts = store, base, keyframe, opts
        # Objects that may be reused by digest (a digest names the exact bytes, so
        # the base's chunk size does not matter). A keyframe reuses them too: reusing
        # an object never makes its chain longer, and every chain the base reaches is
        # shorter than keyframe_every (checked again here, for a keyframe_every lowered
        # since). What a keyframe changes is how *changed* chunks are stored: whole.
        self.known: dict[bytes, StoredObject] = {}
        for obj in base.payload.objects if base is not None else ():
            if obj.depth >= opts.keyframe_every:
                continue
            seen = self.known.get(obj.digest)
            if seen is None or obj.depth < seen.depth:
                self.known[obj.digest] = obj
        self._present: dict[StoredObject, bool] = {}
        self._exists: dict[tuple[bytes, bool], bool] = {}
        if base is not None and not store.storage.local:
            self._look_up(base.payload.objects)
        self.jobs: list[_Job] = []
        self._pending: dict[bytes, int] = {}
        #: per tensor, per chunk: a reused object or the index of a job
        self.slots: list[list[StoredObject | int]] = []

    def _look_up(self, objects: Sequence[StoredObject]) -> None:
        """Whether each of ``objects`` is in the store, asked in parallel (on an object
        store each question is a request; asked one by one they would dominate a save)."""
        unique = list({_where(obj): obj for obj in objects}.values())
        if not unique:
            return
        with ThreadPoolExecutor(min(_LOOKUPS, len(unique))) as pool:
            found = list(pool.map(self._stat, unique))
        self._exists.update(zip((_where(o) for o in unique), found, strict=True))

    def _stat(self, obj: StoredObject) -> bool:
        if obj.pack is not None:  # one look at the pack for all its objects
            return self.store.exists(obj.pack, obj.pack_size, pack=True)
        return self.store.exists(obj.name, obj.size)

    def _in_store(self, obj: StoredObject) -> bool:
        present = self._present.get(obj)
        if present is None:
            exists = self._exists.get(_where(obj))
            if exists is None:
                exists = self._exists[_where(obj)] = self._stat(obj)
            present = exists and (obj.base is None or self._in_store(obj.base))
            self._present[obj] = present
        return present

    def add_tensor(self, key: str, itemsize: int, view: memoryview, packed: bytes) -> None:
        previous = self._previous(key, len(view))
        row: list[StoredObject | int] = []
        spans = _chunks.chunk_spans(len(view), self.opts.chunk_size)
        for c_index, (start, stop) in enumerate(spans):
            digest = packed[c_index * _DIGEST : (c_index + 1) * _DIGEST]
            known = self.known.get(digest)
            if known is not None and self._in_store(known):
                row.append(known)
                continue
            if digest not in self._pending:
                prev = previous[c_index] if previous is not None else None
                if prev is not None and not (
                    prev.raw_size == stop - start
                    and prev.depth + 1 < self.opts.keyframe_every
                    and self._in_store(prev)
                ):
                    prev = None
                self._pending[digest] = len(self.jobs)
                self.jobs.append(_Job(key, view[start:stop], itemsize, digest, prev))
            row.append(self._pending[digest])
        self.slots.append(row)

    def _previous(self, key: str, nbytes: int) -> Sequence[StoredObject] | None:
        """The base's chunks of the tensor at ``key``, if xor-deltas against them may be made."""
        if self.keyframe or self.base is None:
            return None
        if self.base.payload.chunk_size != self.opts.chunk_size:
            return None
        found = self.base.by_key.get(key)
        # A tensor the base kept in its own shard (under its local_below) has no objects
        # to delta against.
        if (
            found is None
            or found[0].nbytes != nbytes
            or len(found[1]) != _chunks.chunk_count(nbytes, self.opts.chunk_size)
        ):
            return None
        return found[1]

    def resolve(self, new: Sequence[StoredObject]) -> list[list[StoredObject]]:
        return [[new[s] if isinstance(s, int) else s for s in row] for row in self.slots]
