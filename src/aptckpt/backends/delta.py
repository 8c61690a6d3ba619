"""``delta`` backend: chunks shared through a run-wide object store; a save writes what changed.

Tensors are cut into the same chunks as the ``zstd`` backend. Every chunk is an
*object* in an :class:`~aptckpt.objectstore.ObjectStore` that the checkpoints of
a run share (by default ``aptckpt-store`` next to the checkpoint). A save:

1. hashes every chunk in parallel (XXH3-128, in the native core);
2. reuses the object of every chunk whose digest the *base* checkpoint (by
   default the newest one using the store) already reaches: an unchanged tensor
   costs only its manifest entry;
3. encodes each changed chunk as an xor-delta against the same chunk of the
   base (then byte-shuffled and zstd-compressed) when that is smaller than
   compressing it alone, and writes the new objects in parallel;
4. every ``keyframe_every``-th save is a *keyframe*: it reaches no delta object,
   so chains stay shorter than ``keyframe_every`` and older deltas become
   garbage once the checkpoints before the keyframe are deleted.

The checkpoint directory holds its manifest and, when the state has tensors
smaller than ``local_below`` (16 KiB), one shard file holding them raw (as ``zstd`` with
``codec="none"`` would): an object each would cost a file and an fsync each,
and deduplicating a few bytes saves nothing. Its payload lists every
object it reaches, delta bases included, so each manifest stands alone given
the store, and garbage collection (:func:`collect_garbage`) is reachability
from the committed manifests: an object reached by no manifest is removed;
deleting one checkpoint never breaks another.

Payload (manifest ``payload``)::

    {"chunk_size": int,
     "store": {"up": int, "name": str},     # the store is <checkpoint>/..(up times)/<name>
     "keyframe_every": int, "since_keyframe": int,   # 0: this save is a keyframe
     "base": str | nil,                      # informational: the base, relative to the store's dir
     "codecs": [pipeline, ...],
     "objects": [[name, size, raw_size, codec, digest, base], ...],
     "chunks": [[object index, ...] or nil per tensor],
     "local": {"codecs": [pipeline, ...],   # (format v3) only when some chunks entry is nil:
               "chunks": [[chunk row, ...] or nil per tensor]}}   # rows as in zstd

An object row: ``name`` is the XXH3-128 of its stored bytes (and its file name),
``size`` their length, ``raw_size`` and ``digest`` the length and XXH3-128 of the
chunk it decodes to, ``codec`` an index into ``codecs``, ``base`` the index of
an *earlier* row it is xor-encoded against (nil for a whole object). Loading
decodes each chunk's chain -- the whole object, then each xor residual xored in
place -- on a thread pool, every chunk in parallel.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from aptckpt import _accel, _config, _dtypes, objectstore, tree
from aptckpt.backends import _chunks
from aptckpt.backends.base import BackendOptions, InPlaceBackend, TensorLayout
from aptckpt.codecs import RAW, CodecError, Pipeline
from aptckpt.errors import (
    AptckptError,
    BackendError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    StoreNotFoundError,
    UnreadableError,
    UnsafePathError,
    UnsupportedPathError,
    WriteError,
)
from aptckpt.manifest import Manifest, TensorRecord, check_relative_path
from aptckpt.objectstore import ObjectStore
from aptckpt.storage import resolve
from aptckpt.storage.local._atomic import CheckpointReader, CheckpointWriter
from aptckpt.tree import FlatState

__all__ = [
    "DeltaBackend",
    "DeltaOptions",
    "GarbageReport",
    "StoredObject",
    "collect_garbage",
    "find_store",
    "parse_payload",
]

log = logging.getLogger("aptckpt")

#: Longest xor chain a reader accepts (a writer keeps it below ``keyframe_every``).
MAX_CHAIN = 256
_DIGEST = 16
#: Bytes of a large changed chunk encoded both ways to decide whether a delta may pay.
_SAMPLE = 256 << 10
_LOCAL_SHARD = "shard-00000.bin"


@dataclass(frozen=True)
class DeltaOptions(BackendOptions):
    """Options of the ``delta`` backend.

    Attributes:
        level: zstd compression level (-7..22).
        chunk_size: bytes per chunk, a multiple of 16; deltas need the same
            chunk size as their base.
        keyframe_every: every this many saves (counted along the base chain)
            one is a keyframe that reaches no delta; chains stay shorter than
            this. 1 disables xor-deltas (unchanged chunks are still shared).
        store: the object store directory; it must sit next to the checkpoint
            or next to one of its parent directories. Default: ``aptckpt-store``
            next to the checkpoint.
        base: the checkpoint to delta against, which must use the same store.
            Default: the newest checkpoint (by manifest time) using the store.
        threads: worker threads (default: ``APTCKPT_THREADS`` or the CPU count).
        local_below: tensors of fewer bytes are stored raw in the checkpoint's own shard
            file instead of as objects of the store (an object costs a file and an fsync;
            a few bytes are not worth deduplicating). 0 stores every tensor as objects.
    """

    level: int = _config.DEFAULT_ZSTD_LEVEL
    chunk_size: int = _config.DEFAULT_CHUNK_SIZE
    keyframe_every: int = _config.DEFAULT_KEYFRAME_EVERY
    local_below: int = 16 << 10
    store: str | os.PathLike[str] | None = field(default=None, metadata={"record": False})
    base: str | os.PathLike[str] | None = field(default=None, metadata={"record": False})
    threads: int | None = field(default=None, metadata={"record": False})

    def validate(self) -> None:
        _chunks.check_common_options(self.level, self.chunk_size, self.threads)
        if type(self.local_below) is not int or self.local_below < 0:
            raise BackendError(f"local_below {self.local_below!r} must be an int >= 0")
        if type(self.keyframe_every) is not int or not 1 <= self.keyframe_every <= MAX_CHAIN:
            raise BackendError(
                f"keyframe_every {self.keyframe_every!r} must be an int in 1..{MAX_CHAIN}"
            )
        for name in ("store", "base"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise BackendError(f"{name} must be a path or None, got {value!r}")


@dataclass(frozen=True, eq=False)
class StoredObject:
    """One object of the store, as a manifest describes it (compared by identity)."""

    name: bytes
    size: int
    raw_size: int
    pipeline: Pipeline
    digest: bytes
    base: StoredObject | None = None

    @property
    def depth(self) -> int:
        """Number of xor links below this object (0: a whole object)."""
        depth, link = 0, self.base
        while link is not None:
            depth, link = depth + 1, link.base
        return depth

    def chain(self) -> list[StoredObject]:
        """The whole object first, then each delta up to this one."""
        links: list[StoredObject] = []
        link: StoredObject | None = self
        while link is not None:
            links.append(link)
            link = link.base
        return links[::-1]


@dataclass(frozen=True)
class DeltaPayload:
    """A parsed, validated ``delta`` payload."""

    chunk_size: int
    store_up: int
    store_name: str
    keyframe_every: int
    since_keyframe: int
    base: str | None
    objects: tuple[StoredObject, ...]
    chunks: tuple[tuple[StoredObject, ...], ...]
    #: Tensors stored in the checkpoint's own shard file (their ``chunks`` are empty), the
    #: shard's codecs and its chunk rows (empty for the tensors in the store).
    local: frozenset[int] = frozenset()
    local_codecs: tuple[Pipeline, ...] = ()
    local_rows: tuple[list[_chunks.ChunkRecord], ...] = ()

    def store_root(self, checkpoint: Path, where: str) -> Path:
        return objectstore.resolve_location(checkpoint, self.store_up, self.store_name, where=where)


# ---------------------------------------------------------------- parsing


def _row_object(
    row: object, index: int, objects: list[StoredObject], pipelines: Sequence[Pipeline], where: str
) -> StoredObject:
    def bad(why: str) -> FormatError:
        return FormatError(f"delta object {index} {row!r}: {why}", path=where)

    if not (isinstance(row, list) and len(row) == 6):
        raise bad("is not a 6-item list")
    name, size, raw_size, codec, digest, base = row
    if not (isinstance(name, bytes) and len(name) == _DIGEST):
        raise bad("name is not a 16-byte digest")
    if not (isinstance(digest, bytes) and len(digest) == _DIGEST):
        raise bad("digest is not a 16-byte digest")
    if not all(type(v) is int and v >= 0 for v in (size, raw_size, codec)):
        raise bad("size, raw_size and codec must be non-negative ints")
    if codec >= len(pipelines):
        raise bad("names a missing codec")
    pipeline = pipelines[codec]
    base_obj = None
    if base is not None:
        if type(base) is not int or not 0 <= base < index:
            raise bad("base must be the index of an earlier object")
        base_obj = objects[base]
        if base_obj.raw_size != raw_size:
            raise bad(f"its base decodes to {base_obj.raw_size} bytes, it to {raw_size}")
    if pipeline.xor != (base_obj is not None):
        raise bad("an object has a base exactly when its codec starts with xor")
    if (
        size > raw_size
        or raw_size > pipeline.max_raw_size(size)
        or (not pipeline.zstd and size != raw_size)
    ):
        raise bad("stored size does not fit its codec and raw size")
    if pipeline == RAW and name != digest:
        raise bad("a raw object's name must be its digest")
    obj = StoredObject(name, size, raw_size, pipeline, digest, base_obj)
    if base_obj is not None and obj.depth > MAX_CHAIN:
        raise bad(f"its xor chain is longer than {MAX_CHAIN}")
    return obj


def parse_payload(manifest: Manifest, where: str) -> DeltaPayload:
    """Validate a ``delta`` payload against its manifest; every number is checked."""
    p = manifest.payload
    if not isinstance(p, dict):
        raise FormatError("delta payload is not a map", path=where)
    chunk_size = _chunks.check_chunk_size(p.get("chunk_size"), where=where)
    store = p.get("store")
    if not isinstance(store, dict):
        raise FormatError("delta payload names no store", path=where)
    up, name = store.get("up"), store.get("name")
    if type(up) is not int or not 1 <= up <= objectstore.MAX_STORE_DEPTH:
        raise FormatError(f"store location 'up' = {up!r} is out of range", path=where)
    check_relative_path(name, where=where)
    assert isinstance(name, str)
    every, since = p.get("keyframe_every"), p.get("since_keyframe")
    if type(every) is not int or not 1 <= every <= MAX_CHAIN:
        raise FormatError(f"keyframe_every {every!r} is out of range", path=where)
    if type(since) is not int or not 0 <= since < every:
        raise FormatError(f"since_keyframe {since!r} is out of range", path=where)
    base = p.get("base")
    if base is not None:
        check_relative_path(base, where=where)
    codecs = p.get("codecs")
    if not isinstance(codecs, list) or not codecs:
        raise FormatError("delta payload has no codec table", path=where)
    pipelines = [Pipeline.from_record(c, where=where) for c in codecs]
    rows = p.get("objects")
    if not isinstance(rows, list):
        raise FormatError("delta payload has no object table", path=where)
    objects: list[StoredObject] = []
    for index, row in enumerate(rows):
        objects.append(_row_object(row, index, objects, pipelines, where))
    raw_chunks = p.get("chunks")
    if not isinstance(raw_chunks, list) or len(raw_chunks) != len(manifest.tensors):
        raise FormatError("payload has no chunk list for every tensor", path=where)
    local = frozenset(i for i, refs in enumerate(raw_chunks) if refs is None)
    local_codecs: list[Pipeline] = []
    local_rows: list[list[_chunks.ChunkRecord]] = []
    if local:
        shard = p.get("local")
        if not isinstance(shard, dict) or not isinstance(shard.get("codecs"), list):
            raise FormatError("delta payload stores tensors locally but has no shard", path=where)
        local_codecs = [Pipeline.from_record(c, where=where) for c in shard["codecs"]]
        if not local_codecs or any(c.xor for c in local_codecs):
            raise FormatError(
                "the local shard of a delta checkpoint has no valid codecs", path=where
            )
        local_rows = _chunks.parse_chunk_table(
            manifest, shard.get("chunks"), chunk_size, local_codecs, where=where, only=local
        )
    chunks = []
    for t_index, (record, refs) in enumerate(zip(manifest.tensors, raw_chunks, strict=True)):
        if t_index in local:
            chunks.append(())
            continue
        count = _chunks.chunk_count(record.nbytes, chunk_size)
        if not isinstance(refs, list) or len(refs) != count:
            raise FormatError(f"tensor {t_index} needs {count} chunks", path=where)
        spans = _chunks.chunk_spans(record.nbytes, chunk_size)
        row = []
        for (start, stop), ref in zip(spans, refs, strict=True):
            if type(ref) is not int or not 0 <= ref < len(objects):
                raise FormatError(f"tensor {t_index} names missing object {ref!r}", path=where)
            if objects[ref].raw_size != stop - start:
                raise FormatError(
                    f"tensor {t_index}: object {ref} decodes to {objects[ref].raw_size} bytes, "
                    f"its chunk is {stop - start}",
                    path=where,
                )
            row.append(objects[ref])
        chunks.append(tuple(row))
    return DeltaPayload(
        chunk_size,
        up,
        name,
        every,
        since,
        base,
        tuple(objects),
        tuple(chunks),
        local,
        tuple(local_codecs),
        tuple(local_rows),
    )


# ---------------------------------------------------------------- decoding


def decode_chain(store: ObjectStore, obj: StoredObject, out: memoryview, *, verify: bool) -> None:
    """Decode ``obj`` into ``out``: its whole object, then each xor residual xored in place."""
    for link in obj.chain():
        if link.pipeline == RAW:
            store.read_into(link.name, out)
            stored_ok = not verify or _accel.xxh3_128(out) == link.name
        else:
            stored = store.read(link.name, link.size)
            stored_ok = not verify or _accel.xxh3_128(stored) == link.name
            if stored_ok:
                link.pipeline.decode(stored, out, base=out if link.pipeline.xor else None)
        if not stored_ok:
            raise CodecError(
                f"object '{store.label(link.name)}' does not match its name: "
                "it changed after saving"
            )
    if verify and _accel.xxh3_128(out) != obj.digest:
        raise CodecError("digest mismatch: the stored bytes changed after saving")


class _BaseScratch(threading.local):
    """Per-thread buffer for the previous version of a chunk."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def get(self, size: int) -> memoryview:
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        return memoryview(self.buffer)[:size]


_base_scratch = _BaseScratch()


class _Filling:
    """The chunks one save offers to :class:`_RecentChunks`, and what is left of its budget.
    Each save has its own: two saves into one store in one process (a background save and a
    blocking one, two threads) never share or steal each other's."""

    __slots__ = ("budget", "entries")

    def __init__(self, budget: int) -> None:
        self.entries: dict[bytes, bytearray] = {}
        self.budget = budget


class _RecentChunks:
    """Raw bytes of the chunks the last save into each store wrote, in this process.

    The next save deltas a changed chunk against the chunk's previous version;
    taking it from here rather than decoding its xor chain from the store is
    what keeps a delta save cheap late in a keyframe cycle. Bounded by
    :func:`aptckpt._config.delta_cache_bytes`.

    Thread-safe: :meth:`get` copies an entry into the caller's buffer and checks the copy
    against its digest, so a buffer retired and reused by a concurrent save meanwhile costs
    only a decode, never a wrong delta base.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[str, dict[bytes, bytearray]] = {}
        # Buffers of retired generations, reused: fresh memory costs a page fault per
        # 4 KiB, which here is slower than the copy itself.
        self._free: dict[int, list[bytearray]] = {}

    def get(self, store: str, digest: bytes, out: memoryview) -> bool:
        """Copy the chunk ``digest`` of ``store`` into ``out``; False if it is not kept."""
        data = self._stores.get(store, {}).get(digest)
        if data is None or len(data) != len(out):
            return False
        out[:] = data
        return bool(_accel.xxh3_128(out) == digest)

    def begin(self) -> _Filling:
        return _Filling(_config.delta_cache_bytes())

    def offer(self, filling: _Filling, digest: bytes, raw: memoryview) -> None:
        with self._lock:
            if filling.budget < len(raw) or digest in filling.entries:
                return
            filling.budget -= len(raw)
            free = self._free.get(len(raw))
            buffer = free.pop() if free else bytearray(len(raw))
            filling.entries[digest] = buffer
        buffer[:] = raw

    def commit(self, store: str, filling: _Filling) -> None:
        """Make this save's chunks the ones kept; only the last store saved into keeps any."""
        with self._lock:
            retired, self._stores = self._stores, {store: filling.entries}
        for old in retired.values():
            self._retire(old)

    def abort(self, filling: _Filling) -> None:
        self._retire(filling.entries)

    def _retire(self, entries: dict[bytes, bytearray]) -> None:
        """Keep retired buffers for reuse, up to the cache budget (so at most twice
        the budget is held: the kept chunks and the free buffers)."""
        with self._lock:
            room = _config.delta_cache_bytes() - sum(
                len(b) for bufs in self._free.values() for b in bufs
            )
            for buffer in entries.values():
                if len(buffer) <= room:
                    self._free.setdefault(len(buffer), []).append(buffer)
                    room -= len(buffer)


_recent = _RecentChunks()


# ------------------------------------------------------------------ writing


@dataclass(frozen=True)
class _Base:
    """The checkpoint a save deltas against."""

    path: Path
    payload: DeltaPayload
    by_key: dict[str, tuple[TensorRecord, tuple[StoredObject, ...]]]


@dataclass(frozen=True)
class _Job:
    data: memoryview
    itemsize: int
    digest: bytes
    prev: StoredObject | None  # the same chunk in the base, to xor against


class DeltaBackend(InPlaceBackend):
    """Incremental, content-addressed; see the module docstring."""

    name: ClassVar[str] = "delta"
    Options = DeltaOptions
    options: DeltaOptions

    @property
    def _threads(self) -> int:
        return self.options.threads or _config.threads()

    def write(self, flat: FlatState, writer: CheckpointWriter) -> Any:
        opts = self.options
        root = Path(
            os.path.abspath(opts.store or writer.final.parent / objectstore.DEFAULT_STORE_NAME)
        )
        up, name = objectstore.location_of(root, writer.final)
        store = ObjectStore.create(root)
        writer.hold(store.lock(exclusive=False))
        base = self._find_base(store)
        since = 0 if base is None else base.payload.since_keyframe + 1
        if since >= opts.keyframe_every:
            since = 0
        hosts = [_chunks.host_tensor(leaf.tensor) for leaf in flat.tensors]
        views = [_dtypes.byte_view(h) for h in hosts]
        digests = _accel.hash_chunks_many(views, opts.chunk_size, self._threads)
        # Small tensors go to the checkpoint's own shard: an object each would cost a file
        # and an fsync each (a state of 100,000 small tensors took 28 s), and deduplicating
        # a few bytes saves nothing.
        local = [i for i, view in enumerate(views) if 0 < len(view) < opts.local_below]
        local_rows = self._write_local(
            writer, [views[i] for i in local], [digests[i] for i in local]
        )
        planner = _Planner(store, base, keyframe=since == 0, opts=opts)
        small = set(local)
        in_store = [i for i in range(len(views)) if i not in small]
        for i in in_store:
            planner.add_tensor(
                flat.tensors[i].key_path, hosts[i].element_size(), views[i], digests[i]
            )
        written = 0
        filling = _recent.begin()
        try:
            results = _chunks.ordered_map(
                lambda job: self._encode(store, job, filling), planner.jobs, threads=self._threads
            )
            new_objects = []
            for obj, nbytes in results:
                new_objects.append(obj)
                written += nbytes
            # Before the new objects get their names: an object named by a digest its bytes
            # do not match would poison every later save that reuses it.
            _chunks.check_unchanged(flat, hosts, digests, opts.chunk_size, self._threads)
            store.sync(self._threads * 2)
        except BaseException:
            _recent.abort(filling)
            raise
        _recent.commit(str(store.root), filling)
        writer.external_bytes += written
        chunks: list[list[StoredObject] | None] = [None] * len(views)
        for i, row in zip(in_store, planner.resolve(new_objects), strict=True):
            chunks[i] = row
        rows: list[list[list[Any]] | None] = [None] * len(views)
        for i, tensor_rows in zip(local, local_rows, strict=True):
            rows[i] = tensor_rows
        home = Path(os.path.realpath(store.root.parent))
        payload = self._payload(
            up, name, since, base.path.relative_to(home) if base else None, chunks
        )
        if local:
            payload["local"] = {"codecs": [RAW.to_record()], "chunks": rows}
        return payload

    def _write_local(
        self, writer: CheckpointWriter, views: list[memoryview], digests: list[bytes]
    ) -> list[list[list[Any]]]:
        """Write small tensors raw into the checkpoint's shard; their chunk rows."""
        if not views:
            return []
        size = self.options.chunk_size
        rows: list[list[list[Any]]] = []
        buffers: list[memoryview] = []
        offset = 0
        for view, packed in zip(views, digests, strict=True):
            tensor_rows = []
            for c, (start, stop) in enumerate(_chunks.chunk_spans(len(view), size)):
                digest = packed[_DIGEST * c : _DIGEST * (c + 1)]
                tensor_rows.append([0, offset, stop - start, 0, digest, None])
                buffers.append(view[start:stop])
                offset += stop - start
            rows.append(tensor_rows)
        with writer.open(_LOCAL_SHARD) as f:
            f.write_many(buffers, self._threads)
        return rows

    def _payload(
        self,
        up: int,
        name: str,
        since: int,
        base: Path | None,
        chunks: list[list[StoredObject] | None],
    ) -> dict[str, Any]:
        pipelines: dict[Pipeline, int] = {}
        index: dict[StoredObject, int] = {}
        rows: list[list[Any]] = []

        def add(obj: StoredObject) -> int:
            if obj in index:
                return index[obj]
            base_index = add(obj.base) if obj.base is not None else None
            codec = pipelines.setdefault(obj.pipeline, len(pipelines))
            index[obj] = len(rows)
            rows.append([obj.name, obj.size, obj.raw_size, codec, obj.digest, base_index])
            return index[obj]

        refs = [None if tensor is None else [add(obj) for obj in tensor] for tensor in chunks]
        return {
            "chunk_size": self.options.chunk_size,
            "store": {"up": up, "name": name},
            "keyframe_every": self.options.keyframe_every,
            "since_keyframe": since,
            "base": base.as_posix() if base is not None else None,
            "codecs": [p.to_record() for p in pipelines] or [RAW.to_record()],
            "objects": rows,
            "chunks": refs,
        }

    def _find_base(self, store: ObjectStore) -> _Base | None:
        if self.options.base is not None:
            path = Path(os.path.abspath(self.options.base))
            base = _read_base(path, store)
            if base is None:
                raise BackendError(
                    f"base '{path}' is not a delta checkpoint using the store '{store.root}'; "
                    "pass a checkpoint saved with backend='delta' and the same store"
                )
            return base
        candidates = []
        for path in objectstore.find_checkpoints(store.root.parent, skip=store.root):
            try:
                candidates.append((os.stat(path / "manifest.msgpack").st_mtime_ns, str(path)))
            except FileNotFoundError:  # deleted meanwhile
                continue
        for _, candidate in sorted(candidates, reverse=True):
            try:
                base = _read_base(Path(candidate), store)
            except (AptckptError, OSError) as err:
                log.warning("not using '%s' as a delta base: %s", candidate, err)
                continue
            if base is not None:
                return base
        return None

    def _encode(self, store: ObjectStore, job: _Job, filling: _Filling) -> tuple[StoredObject, int]:
        """Store one new chunk: as an xor-delta against its previous version when
        that pays for its place in the chain, else whole (compressed or raw)."""
        raw, level = job.data, self.options.level
        shuffle = job.itemsize if job.itemsize > 1 else 0
        whole = Pipeline(shuffle=shuffle, zstd=True)
        best: tuple[Pipeline, Any, StoredObject | None] | None = None
        if job.prev is not None:
            previous = self._previous_version(store, job.prev, len(raw))
            pipeline = Pipeline(xor=True, shuffle=shuffle, zstd=True)
            # Each link costs a decode on every load: it must beat the whole chunk by
            # a margin that grows with the chain.
            weight = 1 + _config.DELTA_CHAIN_PENALTY * (job.prev.depth + 1)
            if previous is not None and _delta_may_win(
                raw, previous, pipeline, whole, weight, level
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
            best = (RAW, raw, None)
        pipeline, stored, base = best
        name = job.digest if pipeline == RAW else _accel.xxh3_128(stored)
        written = store.put(name, stored)
        _recent.offer(filling, job.digest, raw)
        return StoredObject(name, len(stored), len(raw), pipeline, job.digest, base), written

    @staticmethod
    def _previous_version(store: ObjectStore, prev: StoredObject, size: int) -> Any:
        """The raw bytes ``prev`` decodes to: from memory if the last save left them
        there, else decoded from the store; None if they cannot be read."""
        previous = _base_scratch.get(size)
        if _recent.get(str(store.root), prev.digest, previous):
            return previous
        try:
            decode_chain(store, prev, previous, verify=True)
        except (IntegrityError, EOFError, OSError) as err:
            log.warning("cannot read the previous version of a chunk, storing it whole: %s", err)
            return None
        return previous

    # ------------------------------------------------------------------- read

    def read_into(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        into: Sequence[torch.Tensor | None],
        *,
        verify: bool = True,
    ) -> list[torch.Tensor]:
        where = str(reader.root)
        payload = parse_payload(manifest, where)
        store = ObjectStore.open(payload.store_root(reader.root, where), where=where)

        def decode(obj: StoredObject, out: memoryview) -> None:
            decode_chain(store, obj, out, verify=verify)

        def locate(obj: StoredObject) -> tuple[str, str]:
            label = store.label(obj.name)
            chain = f", xor chain of {obj.depth + 1} objects" if obj.base is not None else ""
            return label, f"object '{label}'{chain}"

        # Every object must be there with its recorded size before a tensor is
        # allocated: the sizes are what justify the allocation (a hostile manifest
        # may claim a terabyte), and a lost object is reported for every chunk it
        # breaks, not only for the first one decoded.
        # The store lock, shared: garbage collection cannot remove the objects of this
        # checkpoint while it loads, even if it is deleted meanwhile.
        with store.reading():
            checked = _ObjectCheck(store, reader)
            _chunks.refuse_unreadable(
                manifest, payload.chunks, checked.problem, locate, where=where
            )
            outs = _chunks.new_tensors(manifest, into)
            if payload.local:
                self._read_local(reader, manifest, payload, outs, verify=verify)
            return _chunks.fill_tensors(
                manifest,
                payload.chunks,
                payload.chunk_size,
                decode,
                locate,
                threads=self._threads,
                where=where,
                into=outs,
                skip=payload.local,
            )

    def _read_local(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        payload: DeltaPayload,
        outs: list[torch.Tensor],
        *,
        verify: bool,
    ) -> None:
        """Decode the small tensors kept in the checkpoint's own shard into ``outs``."""
        where = reader.location
        with reader.open_files(manifest.files) as files:
            if files.failed:
                _chunks.refuse_damaged_files(manifest, payload.local_rows, files.failed, where)
            _chunks.decode_into(
                manifest,
                payload.local_rows,
                payload.local_codecs,
                payload.chunk_size,
                files,
                verify=verify,
                threads=self._threads,
                where=where,
                into=outs,
                skip=frozenset(range(len(outs))) - payload.local,
            )

    def format_version(self, payload: Any) -> int:
        # the local shard's table came with format version 3
        return 3 if isinstance(payload, dict) and "local" in payload else 2

    def describe(self, manifest: Manifest) -> list[TensorLayout]:
        payload = parse_payload(manifest, "manifest")
        layouts = []
        for index, chunks in enumerate(payload.chunks):
            if index in payload.local:
                rows = payload.local_rows[index]
                layouts.append(
                    TensorLayout(
                        stored_bytes=sum(r.length for r in rows),
                        codecs=tuple(
                            sorted({payload.local_codecs[r.codec].describe() for r in rows})
                        ),
                        chunks=len(rows),
                    )
                )
                continue
            layouts.append(
                TensorLayout(
                    stored_bytes=sum(o.size for o in chunks),
                    codecs=tuple(sorted({o.pipeline.describe() for o in chunks})),
                    chunks=len(chunks),
                )
            )
        return layouts

    def external_bytes(self, manifest: Manifest) -> int:
        payload = parse_payload(manifest, "manifest")
        return sum({o.name: o.size for o in payload.objects}.values())


class _ObjectCheck:
    """Whether the objects of a chain are in the store with their recorded sizes.

    An object missing because the checkpoint being read (``reader``) was deleted and
    collected before the load took the store lock is :class:`CheckpointDeletedError`,
    not damage.
    """

    def __init__(self, store: ObjectStore, reader: CheckpointReader | None = None) -> None:
        self.store = store
        self.reader = reader
        self.found: dict[bytes, str | None] = {}
        if store.objects.is_symlink():
            raise UnsafePathError(
                f"'{store.objects}' is a symbolic link; stores never contain links",
                path=str(store.root),
            )

    def problem(self, obj: StoredObject) -> tuple[str, str] | None:
        """``(object, why)`` for the first link of ``obj``'s chain that cannot be read."""
        for link in obj.chain():
            if link.name not in self.found:
                self.found[link.name] = self._check(link)
            why = self.found[link.name]
            if why is not None:
                return self.store.label(link.name), why
        return None

    def _check(self, obj: StoredObject) -> str | None:
        label = self.store.label(obj.name)
        try:
            st = os.lstat(self.store.path(obj.name))
        except FileNotFoundError:
            if self.reader is not None:
                self.reader.check_present(label)
            return (
                f"object '{label}' is missing from the store (removed by hand, or the run was "
                "copied without it)"
            )
        except PermissionError as err:
            raise UnreadableError(
                f"cannot read object '{label}': {err.strerror}; load as a user allowed to read "
                "the run's object store, or fix its permissions",
                path=str(self.store.root),
            ) from err
        if not stat.S_ISREG(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise UnsafePathError(
                f"'{label}' is {what}; stores hold regular files only", path=str(self.store.root)
            )
        if st.st_size != obj.size:
            return f"object '{label}' is {st.st_size} bytes, manifest says {obj.size}"
        return None


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


def _read_base(path: Path, store: ObjectStore) -> _Base | None:
    """The delta checkpoint at ``path`` if it uses ``store``, else None."""
    reader = CheckpointReader(path)
    manifest = reader.read_manifest()
    if manifest.backend != DeltaBackend.name:
        return None
    where = str(reader.root)
    payload = parse_payload(manifest, where)
    if os.path.realpath(payload.store_root(reader.root, where)) != os.path.realpath(store.root):
        return None
    keys = tree.key_paths(manifest.skeleton, len(manifest.tensors))
    by_key = dict(zip(keys, zip(manifest.tensors, payload.chunks, strict=True), strict=True))
    return _Base(Path(os.path.realpath(reader.root)), payload, by_key)


class _Planner:
    """Decides, chunk by chunk, which object to reuse and what to encode."""

    def __init__(
        self, store: ObjectStore, base: _Base | None, *, keyframe: bool, opts: DeltaOptions
    ) -> None:
        self.store, self.base, self.keyframe, self.opts = store, base, keyframe, opts
        # Objects that may be reused by digest (a digest names the exact bytes, so
        # the base's chunk size does not matter). A keyframe reuses no delta.
        self.known: dict[bytes, StoredObject] = {}
        for obj in base.payload.objects if base is not None else ():
            if keyframe and obj.base is not None:
                continue
            seen = self.known.get(obj.digest)
            if seen is None or obj.depth < seen.depth:
                self.known[obj.digest] = obj
        self._present: dict[StoredObject, bool] = {}
        self.jobs: list[_Job] = []
        self._pending: dict[bytes, int] = {}
        #: per tensor, per chunk: a reused object or the index of a job
        self.slots: list[list[StoredObject | int]] = []

    def _in_store(self, obj: StoredObject) -> bool:
        present = self._present.get(obj)
        if present is None:
            present = self.store.exists(obj.name, obj.size) and (
                obj.base is None or self._in_store(obj.base)
            )
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
                self.jobs.append(_Job(view[start:stop], itemsize, digest, prev))
            row.append(self._pending[digest])
        self.slots.append(row)

    def _previous(self, key: str, nbytes: int) -> tuple[StoredObject, ...] | None:
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


# -------------------------------------------------------- garbage collection


@dataclass(frozen=True)
class GarbageReport:
    """What :func:`collect_garbage` found and did."""

    store: str
    checkpoints: int
    kept_objects: int
    kept_bytes: int
    removed_objects: int
    removed_bytes: int
    dry_run: bool


def find_store(path: str | os.PathLike[str]) -> ObjectStore:
    """The store at ``path``, or in ``path/aptckpt-store`` (a run directory)."""
    for candidate in (Path(path), Path(path) / objectstore.DEFAULT_STORE_NAME):
        try:
            os.stat(candidate / "STORE")
        except PermissionError as err:
            raise UnreadableError(
                f"cannot read '{candidate}': {err.strerror}; run as a user allowed to read the "
                "run directory and its object store",
                path=str(candidate),
            ) from err
        except OSError:
            continue
        if objectstore.is_store(candidate):
            return ObjectStore.open(candidate)
    inside = Path(path) / objectstore.DEFAULT_STORE_NAME
    raise StoreNotFoundError(
        f"no object store at '{path}': neither it nor '{inside}' "
        "holds a STORE marker; pass the store directory or the run directory that contains it",
        path=os.fspath(path),
    )


def collect_garbage(
    path: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    wait: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> GarbageReport:
    """Remove the objects of a store that no committed delta checkpoint reaches.

    The checkpoints using the store are found beneath the store's directory.
    Holds the store's lock exclusively, so no save is in flight meanwhile and no
    load is reading objects (loads hold it shared: a checkpoint deleted while it
    loads keeps its objects until the load is done).

    Raises:
        StoreNotFoundError: ``path`` is not a store or a directory holding one.
        StoreBusyError: ``wait=False`` and a save or a load holds the store.
        FormatError: a checkpoint's manifest cannot be read; nothing is removed,
            since the objects that checkpoint reaches are unknown.
        UnreadableError: this user may not read a directory beneath the store's
            directory, a manifest, or the store; nothing is removed, for the same reason.
        UnsafePathError: the store or its ``objects/`` is a symbolic link.
        WriteError: an object could not be removed (a read-only file system,
            permissions); those removed before were unreachable, nothing else changed.
    """
    if storage_options is not None or not resolve(path)[0].local:
        raise UnsupportedPathError(
            f"collect_garbage of '{path}': object stores are not collected yet", path=str(path)
        )
    store = find_store(path)
    for link in (store.root, store.objects):
        # Through a link, the checkpoints using those objects may live beneath another
        # directory -- another run's, if a hostile run directory links to its store --
        # and collecting would delete what they reach.
        if link.is_symlink():
            raise UnsafePathError(
                f"refusing to collect garbage: '{link}' is a symbolic link to "
                f"'{os.path.realpath(link)}', so the checkpoints using its objects may live "
                "anywhere and none is known unreachable; nothing was removed. Collect in the "
                "run directory that really holds the store",
                path=str(link),
            )
    try:
        lock = store.lock(exclusive=True, wait=wait)
        with lock:
            reachable, checkpoints = _reachable(store)
            report = _remove_unreachable(store, reachable, checkpoints, dry_run=dry_run)
    except UnreadableError as err:
        home = store.root.parent
        raise UnreadableError(
            f"refusing to collect garbage in '{store.root}': {err}. A checkpoint there may "
            "reach objects of the store, so none is known unreachable and nothing was removed; "
            f"run it as a user who can read all of '{home}', or fix the permissions",
            path=err.path,
        ) from err
    except OSError as err:
        if isinstance(err, AptckptError):
            raise
        raise _gc_write_error(store, err) from err
    log.info("collected garbage in %s: %s", store.root, report)
    return report


def _reachable(store: ObjectStore) -> tuple[set[bytes], int]:
    """The objects every committed delta checkpoint using ``store`` reaches, and how
    many checkpoints those are."""
    reachable: set[bytes] = set()
    checkpoints = 0
    for ckpt in objectstore.find_checkpoints(store.root.parent, skip=store.root, strict=True):
        where = str(ckpt)
        try:
            with CheckpointReader(ckpt) as reader:
                manifest = reader.read_manifest()
            if manifest.backend != DeltaBackend.name:
                continue
            payload = parse_payload(manifest, where)
            root = payload.store_root(ckpt, where)
        except CheckpointNotFoundError:
            continue  # deleted while we looked
        except (FormatError, IntegrityError) as err:
            raise FormatError(
                f"cannot read checkpoint '{ckpt}' ({err}); garbage collection removed "
                "nothing, since it cannot tell which objects that checkpoint reaches. "
                "Repair or delete it, then collect again",
                path=where,
            ) from err
        if os.path.realpath(root) != os.path.realpath(store.root):
            continue
        checkpoints += 1
        reachable.update(o.name for o in payload.objects)
    return reachable, checkpoints


def _remove_unreachable(
    store: ObjectStore, reachable: set[bytes], checkpoints: int, *, dry_run: bool
) -> GarbageReport:
    kept = kept_bytes = removed = removed_bytes = 0
    for name, file, size in list(store.names()):
        if name in reachable:
            kept, kept_bytes = kept + 1, kept_bytes + size
            continue
        if not dry_run:
            file.unlink(missing_ok=True)
        removed, removed_bytes = removed + 1, removed_bytes + size
    if not dry_run:
        store.clear_tmp()
    return GarbageReport(
        str(store.root), checkpoints, kept, kept_bytes, removed, removed_bytes, dry_run
    )


def _gc_write_error(store: ObjectStore, err: OSError) -> WriteError:
    where = f" ('{err.filename}')" if err.filename else ""
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        remedy = (
            "check the permissions of the store (or whether its file system is mounted "
            "read-only), then collect again"
        )
    else:
        remedy = "fix the cause, then collect again"
    return WriteError(
        f"collecting garbage in '{store.root}' failed: {err.strerror or err}{where}; the objects "
        f"removed before were unreachable and every checkpoint is intact; {remedy}",
        path=str(store.root),
        errno_=err.errno,
    )
