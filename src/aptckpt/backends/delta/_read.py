"""``delta`` read path: objects checked, then every chunk's xor chain decoded in parallel.

Objects are read through :class:`~aptckpt.objectstore.ObjectStore` (the storage's
ranged reads), each checked against its name (the digest of its stored bytes)
and each decoded chunk against its digest when ``verify``; the small tensors of
the checkpoint's own shard are read through ``reader.open_files`` like the
``zstd`` backend's.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from aptckpt import _accel
from aptckpt.backends import _chunks
from aptckpt.backends.delta._format import DeltaPayload, StoredObject, parse_payload
from aptckpt.codecs import RAW, CodecError
from aptckpt.errors import IntegrityError, UnsafePathError
from aptckpt.manifest import Manifest, TensorRecord
from aptckpt.objectstore import ObjectStore
from aptckpt.storage import CheckpointReader

__all__ = ["PackedReads", "decode_chain", "object_label", "read_into", "region_manifest"]

#: Parallel existence checks of objects on an object store (one request each).
_REMOTE_CHECKS = 16


#: Neighbouring packed objects are read together up to this many bytes per read.
_SPAN_BYTES = 16 << 20


def object_label(store: ObjectStore, obj: StoredObject) -> str:
    """How messages name an object: its file, or its place in its pack."""
    if obj.pack is None:
        return store.label(obj.name)
    return f"{store.pack_label(obj.pack)} at offset {obj.offset} (object {obj.name.hex()})"


class PackedReads:
    """The stored bytes of packed objects, read ahead: neighbours in a pack in one read
    (a save's objects lie end to end in its pack, so a load reads a pack in a few
    large reads instead of one per object), at most ``_SPAN_BYTES`` at a time."""

    def __init__(self) -> None:
        self.data: dict[tuple[bytes, int], memoryview] = {}

    def fetch(
        self, store: ObjectStore, chunks: Sequence[Sequence[StoredObject]], threads: int
    ) -> None:
        places: dict[bytes, dict[int, int]] = {}
        for row in chunks:
            for obj in row:
                for link in obj.chain():
                    if link.pack is not None:
                        places.setdefault(link.pack, {})[link.offset] = link.size
        spans: list[tuple[bytes, int, list[tuple[int, int]]]] = []
        for pack, found in places.items():
            run: list[tuple[int, int]] = []
            for offset, size in sorted(found.items()):
                end = run[-1][0] + run[-1][1] if run else -1
                if run and offset == end and end - run[0][0] + size <= _SPAN_BYTES:
                    run.append((offset, size))
                    continue
                if run:
                    spans.append((pack, run[0][0], run))
                run = [(offset, size)]
            if run:
                spans.append((pack, run[0][0], run))

        def read(span: tuple[bytes, int, list[tuple[int, int]]]) -> None:
            pack, start, run = span
            last = run[-1]
            try:
                data = memoryview(store.read_packed(pack, start, last[0] + last[1] - start))
            except IntegrityError:
                return  # left to decode_chain, which names the object and tensor
            for offset, size in run:
                self.data[(pack, offset)] = data[offset - start : offset - start + size]

        if len(spans) > 1 and threads > 1:
            with ThreadPoolExecutor(min(threads, len(spans))) as pool:
                list(pool.map(read, spans))
        else:
            for span in spans:
                read(span)


def _stored(store: ObjectStore, link: StoredObject, packed: PackedReads | None) -> Any:
    if link.pack is None:
        return store.read(link.name, link.size)
    data = packed.data.get((link.pack, link.offset)) if packed is not None else None
    if data is None:
        return store.read_packed(link.pack, link.offset, link.size)
    return data


def decode_chain(
    store: ObjectStore,
    obj: StoredObject,
    out: memoryview,
    *,
    verify: bool,
    packed: PackedReads | None = None,
) -> None:
    """Decode ``obj`` into ``out``: its whole object, then each xor residual xored in place
    (packed objects' bytes from ``packed`` where it holds them)."""
    for link in obj.chain():
        if link.pipeline == RAW and link.pack is None:
            store.read_into(link.name, out)
            stored_ok = not verify or _accel.xxh3_128(out) == link.name
        elif link.pipeline == RAW:
            out[:] = _stored(store, link, packed)
            stored_ok = not verify or _accel.xxh3_128(out) == link.name
        else:
            stored = _stored(store, link, packed)
            stored_ok = not verify or _accel.xxh3_128(stored) == link.name
            if stored_ok:
                link.pipeline.decode(stored, out, base=out if link.pipeline.xor else None)
        if not stored_ok:
            raise CodecError(
                f"object '{object_label(store, link)}' does not match its name: "
                "it changed after saving"
            )
    if verify and _accel.xxh3_128(out) != obj.digest:
        raise CodecError("digest mismatch: the stored bytes changed after saving")


class _ObjectCheck:
    """Whether the objects of a chain are in the store with their recorded sizes.

    An object missing because the checkpoint being read (``reader``) was deleted and
    collected before the load took the store lock is :class:`CheckpointDeletedError`,
    not damage. On object stores the objects are looked up in parallel up front
    (:meth:`prefetch`): one request each, never a listing of the whole store.
    """

    def __init__(self, store: ObjectStore, reader: CheckpointReader | None = None) -> None:
        self.store = store
        self.reader = reader
        self.found: dict[tuple[bytes, bool], str | None] = {}
        self._lock = threading.Lock()
        if store.storage.local:
            entry = store.storage.info(store.objects)
            if entry is not None and entry.kind in ("link", "other"):
                raise UnsafePathError(
                    f"'{store.objects}' is a symbolic link; stores never contain links",
                    path=store.root,
                )

    def prefetch(self, chunks: Sequence[Sequence[StoredObject]]) -> None:
        """Check every object of ``chunks`` now, in parallel where requests are slow."""
        if self.store.storage.local:
            return  # a stat each, as they come
        todo: dict[tuple[bytes, bool], StoredObject] = {}
        for row in chunks:
            for obj in row:
                for link in obj.chain():
                    todo.setdefault(_file_of(link), link)
        if not todo:
            return
        with ThreadPoolExecutor(min(_REMOTE_CHECKS, len(todo))) as pool:
            results = list(pool.map(self._check, todo.values()))
        self.found.update(zip(todo, results, strict=True))

    def problem(self, obj: StoredObject) -> tuple[str, str] | None:
        """``(object, why)`` for the first link of ``obj``'s chain that cannot be read."""
        for link in obj.chain():
            key = _file_of(link)
            if key not in self.found:
                self.found[key] = self._check(link)
            why = self.found[key]
            if why is not None:
                if link.pack is not None:
                    return self.store.pack_label(link.pack), why
                return self.store.label(link.name), why
        return None

    def _check(self, obj: StoredObject) -> str | None:
        if obj.pack is not None:
            return self._check_pack(obj.pack, obj.pack_size)
        label = self.store.label(obj.name)
        entry = self.store.info(obj.name)
        missing = self._missing("object", label, entry)
        if missing is None and entry is not None and entry.size != obj.size:
            return f"object '{label}' is {entry.size} bytes, manifest says {obj.size}"
        return missing

    def _missing(self, kind: str, label: str, entry: Any) -> str | None:
        """Why the store's ``kind`` ("object" or "pack") ``label`` (``entry``: its info) cannot
        be read, if it is missing; raises for a link or special file in its place."""
        if entry is None:
            if self.reader is not None:
                self.reader.check_present(label)
            return (
                f"{kind} '{label}' is missing from the store (removed by hand, or the run was "
                "copied without it)"
            )
        if entry.kind != "file":
            raise UnsafePathError(
                f"'{label}' is not a regular file (a symbolic link, a directory or a special "
                "file); stores hold regular files only",
                path=self.store.location,
            )
        return None

    def _check_pack(self, pack: bytes, size: int) -> str | None:
        label = self.store.pack_label(pack)
        entry = self.store.info(pack, pack=True)
        missing = self._missing("pack", label, entry)
        if missing is None and entry is not None and entry.size != size:
            return f"pack '{label}' is {entry.size} bytes, manifest says {size}"
        return missing


def _file_of(obj: StoredObject) -> tuple[bytes, bool]:
    return (obj.pack, True) if obj.pack is not None else (obj.name, False)


def read_into(
    reader: CheckpointReader,
    manifest: Manifest,
    into: Sequence[torch.Tensor | None],
    *,
    verify: bool,
    threads: int,
) -> list[torch.Tensor]:
    """The tensors of the ``delta`` checkpoint ``reader`` reads (see ``Backend.read_into``)."""
    where = reader.location
    payload = parse_payload(manifest, where)
    root = payload.store_root(reader.storage, reader.path, where)
    store = ObjectStore.open(root, storage=reader.storage, where=where)

    packed = PackedReads()

    def decode(obj: StoredObject, out: memoryview) -> None:
        decode_chain(store, obj, out, verify=verify, packed=packed)

    def locate(obj: StoredObject) -> tuple[str, str]:
        label = store.label(obj.name) if obj.pack is None else store.pack_label(obj.pack)
        chain = f", xor chain of {obj.depth + 1} objects" if obj.base is not None else ""
        return label, f"object '{object_label(store, obj)}'{chain}"

    # Every object must be there with its recorded size before a tensor is
    # allocated: the sizes are what justify the allocation (a hostile manifest
    # may claim a terabyte), and a lost object is reported for every chunk it
    # breaks, not only for the first one decoded.
    # The store lock, shared: garbage collection cannot remove the objects of this
    # checkpoint while it loads, even if it is deleted meanwhile (object stores: the
    # age rule, see aptckpt.objectstore).
    with store.reading():
        checked = _ObjectCheck(store, reader)
        checked.prefetch(payload.chunks)
        _chunks.refuse_unreadable(manifest, payload.chunks, checked.problem, locate, where=where)
        outs = _chunks.new_tensors(manifest, into)
        packed.fetch(store, payload.chunks, threads)
        if payload.local:
            _read_local(reader, manifest, payload, outs, verify=verify, threads=threads)
        return _chunks.fill_tensors(
            manifest,
            payload.chunks,
            payload.chunk_size,
            decode,
            locate,
            threads=threads,
            where=where,
            into=outs,
            skip=payload.local,
        )


def _read_local(
    reader: CheckpointReader,
    manifest: Manifest,
    payload: DeltaPayload,
    outs: list[torch.Tensor],
    *,
    verify: bool,
    threads: int,
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
            threads=threads,
            where=where,
            into=outs,
            skip=frozenset(range(len(outs))) - payload.local,
        )


def region_manifest(
    manifest: Manifest, regions: Sequence[tuple[int, int, int]], where: str
) -> tuple[Manifest, list[tuple[int, int]]]:
    """As :func:`aptckpt.backends._chunks.region_manifest`, for a ``delta`` payload: tensor
    ``k`` of the result is the run of objects region ``k`` (``(index, start, stop)``, bytes)
    lies in, as ``uint8`` (a tensor of the local shard: all of it); and where each region
    lies in its run. Only the payload's ``chunks`` (and the local shard's) change."""
    parsed = parse_payload(manifest, where)  # validates what is copied below
    chunk_size = parsed.chunk_size
    payload: dict[str, Any] = dict(manifest.payload)
    local: dict[str, Any] = dict(payload.get("local") or {})
    tensors: list[TensorRecord] = []
    rows: list[Any] = []
    local_rows: list[Any] = []
    cuts: list[tuple[int, int]] = []
    for index, start, stop in regions:
        nbytes = manifest.tensors[index].nbytes
        if index in parsed.local:
            tensors.append(TensorRecord("uint8", (nbytes,)))
            rows.append(None)
            local_rows.append(local["chunks"][index])
            cuts.append((start, stop))
            continue
        if stop <= start:
            first, run, size = 0, [], 0
        else:
            first, last = start // chunk_size, (stop - 1) // chunk_size
            run = payload["chunks"][index][first : last + 1]
            size = min(nbytes, (last + 1) * chunk_size) - first * chunk_size
        tensors.append(TensorRecord("uint8", (size,)))
        rows.append(run)
        local_rows.append(None)
        cuts.append((start - first * chunk_size, stop - first * chunk_size) if run else (0, 0))
    payload["chunks"] = rows
    if parsed.local:
        payload["local"] = {**local, "chunks": local_rows}
    if not any(r is not None for r in local_rows):
        payload.pop("local", None)
    return dataclasses.replace(manifest, tensors=tuple(tensors), payload=payload), cuts
