"""``delta`` backend: chunks shared through a run-wide object store; a save writes what changed.

Tensors are cut into the same chunks as the ``zstd`` backend. Every chunk is an
*object* in an :class:`~aptckpt.objectstore.ObjectStore` that the checkpoints of
a run share (by default ``aptckpt-store`` next to the checkpoint: a local directory,
or the parent prefix of an ``s3://``/``memory://`` checkpoint). A save:

1. hashes every chunk in parallel (XXH3-128, in the native core);
2. reuses the object of every chunk whose digest the *base* checkpoint (by
   default the newest one using the store) already reaches: an unchanged tensor
   costs only its manifest entry;
3. encodes each changed chunk as an xor-delta against the same chunk of the
   base (then byte-shuffled and zstd-compressed) when that is smaller than
   compressing it alone, and writes the new objects in parallel;
4. every ``keyframe_every``-th save is a *keyframe*: it stores every changed
   chunk whole, resetting the chains of what changes; an unchanged chunk keeps
   the object it had (reuse never lengthens a chain, and no chain is ever
   ``keyframe_every`` links long), so a keyframe costs only what changed.

New objects smaller than ``pack_below`` (1 MiB of stored bytes) are written into
one *pack* per save (``packs/<name>`` in the store, the objects end to end): one
file and one fsync for all of them, where a file each cost an fsync each (a state
of 100,000 small tensors took 28 s). Packed objects are deduplicated like loose
ones: an unchanged small tensor adds nothing to the next save. A save that would
reach less than half of an old pack copies what it reaches there into its own
pack, so every pack kept is at least half live and garbage collection removes
packs whole, never rewriting one. (Writers before packs kept tensors under
``local_below``, then 16 KiB, raw in a shard file of the checkpoint; still read,
and still written when ``local_below`` is set.) The manifest's payload lists every
object it reaches, delta bases included, with its place, so each manifest stands
alone given the store, and garbage collection (:func:`collect_garbage`) is
reachability from the committed manifests: an object or pack reached by no
manifest is removed; deleting one checkpoint never breaks another.

Payload (manifest ``payload``)::

    {"chunk_size": int,
     "store": {"up": int, "name": str},     # the store is <checkpoint>/..(up times)/<name>
     "keyframe_every": int, "since_keyframe": int,   # 0: this save is a keyframe
     "base": str | nil,                      # informational: the base, relative to the store's dir
     "codecs": [pipeline, ...],
     "packs": [[name, size], ...],           # (format v5) only when some object is packed
     "objects": [[name, size, raw_size, codec, digest, base(, pack, offset)], ...],
     "chunks": [[object index, ...] or nil per tensor],
     "local": {"codecs": [pipeline, ...],   # (format v3) only when some chunks entry is nil:
               "chunks": [[chunk row, ...] or nil per tensor]}}   # rows as in zstd

An object row: ``name`` is the XXH3-128 of its stored bytes (and its file name),
``size`` their length, ``raw_size`` and ``digest`` the length and XXH3-128 of the
chunk it decodes to, ``codec`` an index into ``codecs``, ``base`` the index of
an *earlier* row it is xor-encoded against (nil for a whole object); a packed
object's row adds its pack (an index into ``packs``) and its offset there. Loading
decodes each chunk's chain -- the whole object, then each xor residual xored in
place -- on a thread pool, every chunk in parallel.

Modules: :mod:`._format` (options, payload parsing), :mod:`._store` (where the
store is, finding the base), :mod:`._write` (planning, encoding, writing objects),
:mod:`._cache` (chunks kept between saves), :mod:`._read` (checking and decoding),
:mod:`._gc` (garbage collection). Everything goes through the storage seam: the
store through :class:`~aptckpt.objectstore.ObjectStore`, the checkpoint's own shard
through ``writer.open`` and ``reader.open_files``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from aptckpt import _config
from aptckpt.backends.base import InPlaceBackend, TensorLayout
from aptckpt.backends.delta import _read, _write
from aptckpt.backends.delta._cache import recent as _recent
from aptckpt.backends.delta._format import (
    MAX_CHAIN,
    DeltaOptions,
    DeltaPayload,
    StoredObject,
    parse_payload,
)
from aptckpt.backends.delta._gc import GarbageReport, collect_garbage, find_store
from aptckpt.backends.delta._read import decode_chain
from aptckpt.manifest import Manifest
from aptckpt.storage import CheckpointReader, CheckpointWriter
from aptckpt.tree import FlatState

__all__ = [
    "MAX_CHAIN",
    "DeltaBackend",
    "DeltaOptions",
    "DeltaPayload",
    "GarbageReport",
    "StoredObject",
    "collect_garbage",
    "decode_chain",
    "find_store",
    "parse_payload",
]

_ = _recent  # the chunks kept between saves, reachable as before (tests look at them)


class DeltaBackend(InPlaceBackend):
    """Incremental, content-addressed; see the module docstring."""

    name: ClassVar[str] = "delta"
    Options = DeltaOptions
    options: DeltaOptions

    @property
    def _threads(self) -> int:
        return self.options.threads or _config.threads()

    def write(self, flat: FlatState, writer: CheckpointWriter) -> Any:
        return _write.write(flat, writer, self.options, self._threads)

    def read_into(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        into: Sequence[torch.Tensor | None],
        *,
        verify: bool = True,
    ) -> list[torch.Tensor]:
        return _read.read_into(reader, manifest, into, verify=verify, threads=self._threads)

    def read_regions(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        regions: Sequence[tuple[int, int, int]],
        *,
        verify: bool = True,
    ) -> list[torch.Tensor]:
        """Only the objects the regions lie in are read and verified (a small tensor kept
        in the checkpoint's own shard is read whole)."""
        sub, cuts = _read.region_manifest(manifest, regions, reader.location)
        runs = self.read_into(reader, sub, [None] * len(sub.tensors), verify=verify)
        return [run[start:stop] for run, (start, stop) in zip(runs, cuts, strict=True)]

    def format_version(self, payload: Any) -> int:
        # packs came with format version 5, the local shard's table with version 3
        if isinstance(payload, dict) and "packs" in payload:
            return 5
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
        # each stored object once: a file of its own by name, a packed one by its place
        return sum(
            {(o.pack, o.offset if o.pack else o.name): o.size for o in payload.objects}.values()
        )
