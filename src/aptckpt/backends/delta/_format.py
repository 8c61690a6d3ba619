"""``delta`` options and payload: what a manifest of the ``delta`` backend records,
parsed and validated (every number is checked before anything is read).

The payload is described in :mod:`aptckpt.backends.delta`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from aptckpt import _config, objectstore
from aptckpt.backends import _chunks
from aptckpt.backends.base import BackendOptions
from aptckpt.codecs import RAW, Pipeline
from aptckpt.errors import BackendError, FormatError
from aptckpt.manifest import Manifest, check_relative_path
from aptckpt.storage import Storage

__all__ = ["DeltaOptions", "DeltaPayload", "StoredObject", "parse_payload"]

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
        store: the object store directory (a path, or a URL on the checkpoint's
            storage); it must sit next to the checkpoint or next to one of its parent
            directories. Default: ``aptckpt-store`` next to the checkpoint.
        base: the checkpoint to delta against (a path, or a URL on the checkpoint's
            storage), which must use the same store. Default: the newest checkpoint
            (by manifest time) using the store; see :mod:`aptckpt.backends.delta._base`.
        threads: worker threads (default: ``APTCKPT_THREADS`` or the CPU count).
        local_below: tensors of fewer bytes are stored raw in the checkpoint's own shard
            file instead of as objects of the store (an object costs a file and an fsync;
            a few bytes are not worth deduplicating). 0 (the default since packs) stores
            every tensor as objects: small ones go into the save's pack, deduplicated.
        pack_below: new objects of fewer stored bytes go into the one *pack* file the save
            writes (one file and one fsync for all of them) instead of a file each.
            0 writes every object as a file of its own.
    """

    level: int = _config.DEFAULT_ZSTD_LEVEL
    chunk_size: int = _config.DEFAULT_CHUNK_SIZE
    keyframe_every: int = _config.DEFAULT_KEYFRAME_EVERY
    local_below: int = 0
    pack_below: int = _config.DEFAULT_PACK_BELOW
    store: str | os.PathLike[str] | None = field(default=None, metadata={"record": False})
    base: str | os.PathLike[str] | None = field(default=None, metadata={"record": False})
    threads: int | None = field(default=None, metadata={"record": False})

    def validate(self) -> None:
        _chunks.check_common_options(self.level, self.chunk_size, self.threads)
        for name in ("local_below", "pack_below"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise BackendError(f"{name} {value!r} must be an int >= 0")
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
    """One object of the store, as a manifest describes it (compared by identity).

    ``pack`` is the pack file holding it (None: a file of its own in ``objects/``), at
    ``offset``; ``pack_size`` is that pack's recorded size."""

    name: bytes
    size: int
    raw_size: int
    pipeline: Pipeline
    digest: bytes
    base: StoredObject | None = None
    pack: bytes | None = None
    offset: int = 0
    pack_size: int = 0

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

    def store_root(self, storage: Storage, checkpoint: str, where: str) -> str:
        """The store's path in ``storage`` for the checkpoint at ``checkpoint``."""
        return objectstore.resolve_location(
            checkpoint, self.store_up, self.store_name, where=where, storage=storage
        )


# ---------------------------------------------------------------- parsing


def _row_object(
    row: object,
    index: int,
    objects: list[StoredObject],
    pipelines: Sequence[Pipeline],
    packs: Sequence[tuple[bytes, int]],
    where: str,
) -> StoredObject:
    def bad(why: str) -> FormatError:
        return FormatError(f"delta object {index} {row!r}: {why}", path=where)

    if not (isinstance(row, list) and len(row) in (6, 8)):
        raise bad("is not a 6-item (loose) or 8-item (packed) list")
    name, size, raw_size, codec, digest, base = row[:6]
    pack: bytes | None = None
    offset = pack_size = 0
    if len(row) == 8:
        p_index, offset = row[6], row[7]
        if type(p_index) is not int or not 0 <= p_index < len(packs):
            raise bad("names a missing pack")
        pack, pack_size = packs[p_index]
        if type(offset) is not int or offset < 0:
            raise bad("its pack offset must be a non-negative int")
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
    if pack is not None and offset + size > pack_size:
        raise bad(f"lies past the end of its pack ({pack_size} bytes)")
    obj = StoredObject(name, size, raw_size, pipeline, digest, base_obj, pack, offset, pack_size)
    if base_obj is not None and obj.depth > MAX_CHAIN:
        raise bad(f"its xor chain is longer than {MAX_CHAIN}")
    return obj


def _parse_packs(packs: object, where: str) -> list[tuple[bytes, int]]:
    """The payload's pack table (format v5): ``[[name, size], ...]``."""
    if not isinstance(packs, list):
        raise FormatError("delta payload's pack table is not a list", path=where)
    parsed = []
    for index, row in enumerate(packs):
        if not (
            isinstance(row, list)
            and len(row) == 2
            and isinstance(row[0], bytes)
            and len(row[0]) == _DIGEST
            and type(row[1]) is int
            and row[1] > 0
        ):
            raise FormatError(
                f"delta pack {index} {row!r}: not a [16-byte name, size > 0] pair", path=where
            )
        parsed.append((row[0], row[1]))
    if len({name for name, _ in parsed}) != len(parsed):
        raise FormatError("delta pack table names a pack twice", path=where)
    return parsed


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
    packs = _parse_packs(p.get("packs", []), where)
    rows = p.get("objects")
    if not isinstance(rows, list):
        raise FormatError("delta payload has no object table", path=where)
    objects: list[StoredObject] = []
    for index, row in enumerate(rows):
        objects.append(_row_object(row, index, objects, pipelines, packs, where))
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
