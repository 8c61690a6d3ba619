"""``zstd`` backend: byte-shuffled chunks, each an independent zstd frame, in shard files.

Layout inside the checkpoint directory::

    manifest.msgpack
    shard-00000.bin      concatenated stored chunks, in tensor order
    shard-00001.bin      (a new shard starts once one reaches ``shard_size``)

Each chunk is byte-shuffled by the tensor's element size and compressed as its
own zstd frame (level 1 by default: once shuffled, float data compresses better
*and* faster at 1 than at 3). A chunk that does not shrink is stored raw.
``codec="none"`` stores every chunk raw: for disks faster than compression,
and then the writes go straight from tensor memory to the file.

Payload (manifest ``payload``)::

    {"chunk_size": int, "codecs": [pipeline, ...], "chunks": [[row, ...] per tensor]}

(rows ``[file, offset, length, codec, digest, stored_digest]``)

with rows as described in :mod:`aptckpt.backends._chunks`. Saving hashes,
shuffles and compresses chunks on a thread pool while the calling thread
appends finished frames to the shard; loading reads, decompresses, unshuffles
and verifies chunks in parallel straight into the destination tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from aptckpt import _accel, _config, _dtypes
from aptckpt.backends import _chunks, _mapped, _planes
from aptckpt.backends._chunks import DIGEST_SIZE
from aptckpt.backends.base import BackendOptions, InPlaceBackend, TensorLayout
from aptckpt.codecs import RAW, Pipeline
from aptckpt.errors import BackendError, FormatError
from aptckpt.manifest import Manifest
from aptckpt.storage.base import CheckpointReader, CheckpointWriter, Sink
from aptckpt.tree import FlatState

__all__ = ["ZstdBackend", "ZstdOptions"]

_CODECS = ("zstd", "none", "auto")
#: Raw chunks are hashed in groups of about this many bytes, one group ahead of the writes.
_HASH_GROUP = 64 << 20


@dataclass(frozen=True)
class ZstdOptions(BackendOptions):
    """Options of the ``zstd`` backend.

    Attributes:
        level: zstd compression level (1..22; negative levels are faster still). With
            ``codec="auto"``, level 1 compresses split chunks with :data:`aptckpt.codecs.PLANES`.
        codec: ``"zstd"`` to compress every chunk, ``"none"`` to store chunks raw,
            ``"auto"`` to compress only the byte planes that compress (see
            :func:`choose_pipeline`) and store the rest raw.
        chunk_size: bytes per chunk, a multiple of 16.
        shard_size: a shard file is closed once it holds this many bytes.
        threads: worker threads (default: ``APTCKPT_THREADS`` or the CPU count).
    """

    level: int = _config.DEFAULT_ZSTD_LEVEL
    codec: str = "auto"
    chunk_size: int = _config.DEFAULT_CHUNK_SIZE
    shard_size: int = _config.DEFAULT_SHARD_SIZE
    threads: int | None = field(default=None, metadata={"record": False})

    def validate(self) -> None:
        if self.codec not in _CODECS:
            raise BackendError(f"codec {self.codec!r} is not one of {', '.join(_CODECS)}")
        _chunks.check_common_options(self.level, self.chunk_size, self.threads)
        if type(self.shard_size) is not int or self.shard_size < 1:
            raise BackendError(f"shard_size {self.shard_size!r} must be a positive int")


@dataclass(frozen=True)
class _Job:
    tensor: int
    data: memoryview
    itemsize: int


class _ShardWriter:
    """Appends stored chunks to shard files, starting a new one past ``shard_size``."""

    def __init__(self, writer: CheckpointWriter, shard_size: int) -> None:
        self.writer, self.shard_size = writer, shard_size
        self.file: Sink | None = None
        self.index = -1

    def append(self, data: Any) -> tuple[int, int]:
        if self.file is None or self.file.size >= self.shard_size:
            self._next_shard()
        assert self.file is not None
        start = self.file.size
        self.file.write(data)
        return self.index, start

    def _next_shard(self) -> None:
        self.close()
        self.index += 1
        self.file = self.writer.open(f"shard-{self.index:05d}.bin")

    def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            file.close()

    def abort(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            file.abort()


class ZstdBackend(InPlaceBackend):
    """Compressed, sharded, parallel; see the module docstring."""

    name: ClassVar[str] = "zstd"
    Options = ZstdOptions
    options: ZstdOptions

    @property
    def _threads(self) -> int:
        return self.options.threads or _config.threads()

    # ------------------------------------------------------------------ write

    def write(self, flat: FlatState, writer: CheckpointWriter) -> Any:
        opts = self.options
        if opts.codec == "none":
            found = _chunks.host_bytes(flat)
            raw_rows, digests = self._write_raw(found, writer)
            _chunks.check_unchanged(
                flat, found.hosts, digests, opts.chunk_size, self._threads, host_views=found
            )
            return self._payload([RAW.to_record()], raw_rows)
        hosts = [_chunks.host_tensor(leaf.tensor) for leaf in flat.tensors]
        jobs = [
            _Job(t_index, view[start:stop], host.element_size())
            for t_index, host in enumerate(hosts)
            for view in (_dtypes.byte_view(host),)
            for start, stop in _chunks.chunk_spans(len(view), opts.chunk_size)
        ]
        rows, pipelines = self._write_encoded(jobs, len(hosts), writer)
        digests = [b"".join(row[4] for row in tensor_rows) for tensor_rows in rows]
        _chunks.check_unchanged(flat, hosts, digests, opts.chunk_size, self._threads)
        return self._payload([p.to_record() for p in pipelines], rows)

    def _write_encoded(
        self, jobs: list[_Job], n_tensors: int, writer: CheckpointWriter
    ) -> tuple[list[list[list[Any]]], list[Pipeline]]:
        """Chunks hashed, shuffled and compressed on the pool (each chunk's digest taken
        before it is encoded), appended to shards in order by the caller."""
        pipelines: list[Pipeline] = [RAW]
        codec_index = {RAW: 0}
        rows: list[list[list[Any]]] = [[] for _ in range(n_tensors)]
        shards = _ShardWriter(writer, self.options.shard_size)
        try:
            encoded = _chunks.batched_map(
                self._encode, jobs, [len(job.data) for job in jobs], threads=self._threads
            )
            for job, (digest, pipeline, data, stored_digest) in zip(jobs, encoded, strict=True):
                if pipeline not in codec_index:
                    codec_index[pipeline] = len(pipelines)
                    pipelines.append(pipeline)
                file, offset = shards.append(data)
                chunk = _chunks.ChunkRecord(
                    file, offset, len(data), codec_index[pipeline], digest, stored_digest
                )
                rows[job.tensor].append(chunk.to_row())
        except BaseException:
            shards.abort()
            raise
        shards.close()
        return rows, pipelines

    def _write_raw(
        self, found: _chunks.HostBytes, writer: CheckpointWriter
    ) -> tuple[list[list[list[Any]]], list[bytes]]:
        """Raw chunks: every offset is known up front. The tensors' bytes are cut into
        pieces -- a whole tensor, unless a shard or a hash group ends inside it -- and the
        pieces into groups of about :data:`_HASH_GROUP` bytes; the pool hashes the next group
        while the caller writes this one (large direct writes from bounce buffers, or, without
        ``O_DIRECT``, parallel positional writes straight from tensor memory), so every chunk's
        digest is taken before its bytes are written and the hashing still overlaps the
        writes. Returns the chunk rows and each tensor's digests (its chunks', concatenated).

        Cuts fall on chunk boundaries, where the chunk-by-chunk layout put them: a new shard
        starts before the first chunk at or past ``shard_size``, a new group before the first
        chunk at or past ``_HASH_GROUP`` bytes (a chunk never spans two shards)."""
        opts = self.options
        chunk_size, shard_size = opts.chunk_size, opts.shard_size
        count = len(found.views)
        rows: list[list[list[Any]]] = [[] for _ in range(count)]
        # per group: its shard, the pieces' buffers, and per piece (tensor, its chunk rows)
        groups: list[tuple[int, list[Any], list[tuple[int, list[list[Any]]]]]] = []
        buffers: list[Any] = []
        pieces: list[tuple[int, list[list[Any]]]] = []
        shard, offset, size = -1, shard_size, _HASH_GROUP  # forces a first shard, group
        for index, (view, nbytes) in enumerate(zip(found.views, found.nbytes, strict=True)):
            if not nbytes:
                continue
            if nbytes <= chunk_size and offset < shard_size and size < _HASH_GROUP:
                # one chunk in the open shard and group: the common case, kept short (it
                # runs once per tensor); the row's digest is filled in once hashed
                piece_rows = rows[index] = [[shard, offset, nbytes, 0, None, None]]
                buffers.append(view)
                pieces.append((index, piece_rows))
                offset += nbytes
                size += nbytes
                continue
            flat_view = None
            start = 0
            while start < nbytes:
                if offset >= shard_size:
                    shard, offset, size = shard + 1, 0, _HASH_GROUP
                if size >= _HASH_GROUP:
                    buffers, pieces = [], []
                    groups.append((shard, buffers, pieces))
                    size = 0
                room = min(shard_size - offset, _HASH_GROUP - size)
                take = min(nbytes - start, -(-room // chunk_size) * chunk_size)
                if take == nbytes:
                    piece = view
                else:
                    if flat_view is None:
                        flat_view = memoryview(view).cast("B")
                    piece = flat_view[start : start + take]
                piece_rows = [
                    [shard, offset + at, min(chunk_size, take - at), 0, None, None]
                    for at in range(0, take, chunk_size)
                ]
                rows[index].extend(piece_rows)
                buffers.append(piece)
                pieces.append((index, piece_rows))
                start += take
                offset += take
                size += take
        digests = [b""] * count

        def digest(group: tuple[int, list[Any], list[tuple[int, list[list[Any]]]]]) -> list[bytes]:
            hashed: list[bytes] = _accel.hash_chunks_many(group[1], chunk_size, self._threads)
            return hashed

        file: Sink | None = None
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="aptckpt-hash") as pool:
                hashing = pool.submit(digest, groups[0]) if groups else None
                for number, group in enumerate(groups):
                    assert hashing is not None
                    for (index, piece_rows), hashed in zip(group[2], hashing.result(), strict=True):
                        if len(piece_rows) == 1:
                            piece_rows[0][4] = hashed
                        else:
                            for at, row in enumerate(piece_rows):
                                row[4] = hashed[at * DIGEST_SIZE : (at + 1) * DIGEST_SIZE]
                        digests[index] += hashed  # b"" + one piece's: no copy made
                    if number + 1 < len(groups):
                        hashing = pool.submit(digest, groups[number + 1])
                    if file is None or group[0] != groups[number - 1][0]:
                        if file is not None:
                            file.close()
                        file = writer.open(f"shard-{group[0]:05d}.bin")
                    file.write_many(group[1], self._threads)
            if file is not None:
                file.close()
        except BaseException:
            if file is not None:
                file.abort()
            raise
        return rows, digests

    def _payload(self, codecs: list[Any], rows: list[list[list[Any]]]) -> dict[str, Any]:
        return {"chunk_size": self.options.chunk_size, "codecs": codecs, "chunks": rows}

    def _encode(self, job: _Job) -> tuple[bytes, Pipeline, Any, bytes | None]:
        digest: bytes = _accel.xxh3_128(job.data)
        if not job.data:
            return digest, RAW, job.data, None
        if self.options.codec == "auto":
            pipeline, encoded = _planes.encode(job.data, job.itemsize, self.options.level)
            if pipeline == RAW:
                return digest, RAW, job.data, None
        else:
            pipeline = Pipeline(shuffle=job.itemsize if job.itemsize > 1 else 0, zstd=True)
            encoded = pipeline.encode(job.data, level=self.options.level)
        if len(encoded) >= len(job.data):  # incompressible: store it as it is
            return digest, RAW, job.data, None
        head = pipeline.raw_prefix(len(job.data))
        return digest, pipeline, encoded, _accel.xxh3_128(encoded[head:])

    # ------------------------------------------------------------------- read

    def _parse(self, manifest: Manifest, where: str) -> tuple[int, list[Pipeline], Any]:
        payload = manifest.payload
        if not isinstance(payload, dict):
            raise FormatError("zstd payload is not a map", path=where)
        chunk_size = _chunks.check_chunk_size(payload.get("chunk_size"), where=where)
        codecs = payload.get("codecs")
        if not isinstance(codecs, list) or not codecs:
            raise FormatError("zstd payload has no codec table", path=where)
        pipelines = [Pipeline.from_record(c, where=where) for c in codecs]
        if any(p.xor for p in pipelines):
            raise FormatError(
                "zstd payload lists an xor-delta codec, but this backend stores no bases "
                "(a delta checkpoint's payload under the wrong backend name?)",
                path=where,
            )
        table = _chunks.parse_chunk_table(
            manifest, payload.get("chunks"), chunk_size, pipelines, where=where
        )
        return chunk_size, pipelines, table

    def read_into(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        into: Sequence[torch.Tensor | None],
        *,
        verify: bool = True,
    ) -> list[torch.Tensor]:
        return self._decode(reader, manifest, verify=verify, into=into)

    def read_regions(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        regions: Sequence[tuple[int, int, int]],
        *,
        verify: bool = True,
    ) -> list[torch.Tensor]:
        """Only the chunks the regions lie in are read and verified."""
        chunk_size, _, _ = self._parse(manifest, reader.location)
        sub, cuts = _chunks.region_manifest(manifest, chunk_size, regions)
        runs = self._decode(reader, sub, verify=verify, into=[None] * len(sub.tensors))
        return [run[start:stop] for run, (start, stop) in zip(runs, cuts, strict=True)]

    def read_mapped(
        self, reader: CheckpointReader, manifest: Manifest, *, verify: bool = True
    ) -> list[torch.Tensor]:
        """Raw tensors as copy-on-write maps of the shard files (``_mapped``), the others
        decoded as :meth:`read` does."""
        return self._decode(reader, manifest, verify=verify, mapped=True)

    def _decode(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        *,
        verify: bool,
        into: Sequence[torch.Tensor | None] | None = None,
        mapped: bool = False,
    ) -> list[torch.Tensor]:
        where = reader.location
        chunk_size, pipelines, table = self._parse(manifest, where)
        with reader.open_files(manifest.files) as files:
            if files.failed:
                _chunks.refuse_damaged_files(manifest, table, files.failed, where)
            maps: dict[int, torch.Tensor] = {}
            if mapped:
                maps = _mapped.map_raw_tensors(
                    manifest,
                    table,
                    pipelines,
                    chunk_size,
                    files,
                    verify=verify,
                    threads=self._threads,
                    where=where,
                )
                if maps:
                    into = [maps.get(i) for i in range(len(manifest.tensors))]
            return _chunks.decode_into(
                manifest,
                table,
                pipelines,
                chunk_size,
                files,
                verify=verify,
                threads=self._threads,
                where=where,
                into=into,
                skip=frozenset(maps),
            )

    def describe(self, manifest: Manifest) -> list[TensorLayout]:
        _, pipelines, table = self._parse(manifest, "manifest")
        return [
            TensorLayout(
                stored_bytes=sum(c.length for c in chunks),
                codecs=tuple(sorted({pipelines[c.codec].describe() for c in chunks})),
                chunks=len(chunks),
            )
            for chunks in table
        ]
