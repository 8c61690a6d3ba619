"""Chunk machinery shared by the chunked backends (``zstd``, ``delta``).

A tensor's bytes (contiguous, little-endian, C order) are cut into chunks of
``chunk_size`` bytes, the last one shorter. Each chunk is stored as one record
``[file, offset, length, codec, digest, stored_digest]``: the index of its data
file in the manifest's file list, where its stored bytes start and how many
there are, the index of its codec pipeline in the payload's codec table, the
XXH3-128 digest of its *raw* bytes (so a digest names content, whatever the
encoding), and for an encoded chunk the XXH3-128 of its stored bytes (nil for
a raw chunk, whose stored bytes are its raw bytes). The stored digest catches
damage that decodes to the same content -- a flipped bit that zstd ignores in a
frame header -- and is checked before any decompression.

This module parses and validates those records (every number is checked before
use) and decodes chunks straight into their destination tensors in parallel.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from aptckpt import _accel, _dtypes, tree
from aptckpt._config import MAX_CHUNK_SIZE
from aptckpt.codecs import RAW, CodecError, Pipeline
from aptckpt.errors import BackendError, FormatError, IntegrityError
from aptckpt.manifest import Manifest

__all__ = [
    "ChunkRecord",
    "check_chunk_size",
    "check_common_options",
    "chunk_spans",
    "decode_into",
    "fill_tensors",
    "host_tensor",
    "ordered_map",
    "parse_chunk_table",
]

DIGEST_SIZE = 16
T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")


@dataclass(frozen=True)
class ChunkRecord:
    file: int
    offset: int
    length: int
    codec: int
    digest: bytes
    stored_digest: bytes | None = None

    def to_row(self) -> list[Any]:
        return [self.file, self.offset, self.length, self.codec, self.digest, self.stored_digest]


def check_chunk_size(value: object, *, where: str | None = None) -> int:
    if type(value) is not int or not 16 <= value <= MAX_CHUNK_SIZE or value % 16:
        raise FormatError(
            f"chunk_size {value!r} must be a multiple of 16 between 16 and {MAX_CHUNK_SIZE}",
            path=where,
        )
    return value


def check_common_options(level: object, chunk_size: object, threads: object) -> None:
    """Validate the options every chunked backend has; raise ``BackendError``."""
    if type(level) is not int or not -7 <= level <= 22:
        raise BackendError(f"zstd level {level!r} must be an int in -7..22")
    try:
        check_chunk_size(chunk_size)
    except FormatError as err:
        raise BackendError(str(err)) from None
    if threads is not None and (type(threads) is not int or threads < 1):
        raise BackendError(f"threads {threads!r} must be a positive int or None")


def chunk_spans(nbytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` byte ranges of the chunks of a buffer of ``nbytes``."""
    return [(s, min(s + chunk_size, nbytes)) for s in range(0, nbytes, chunk_size)]


def host_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with the same values (no copy when already one).

    Conjugate and negative bits are resolved: they are lazy views whose stored
    bytes differ from their values.
    """
    t = tensor.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.to("cpu").contiguous()


def parse_chunk_table(
    manifest: Manifest,
    rows_per_tensor: object,
    chunk_size: int,
    pipelines: Sequence[Pipeline],
    *,
    where: str,
) -> list[list[ChunkRecord]]:
    """Validate the per-tensor chunk rows of a payload against the manifest.

    An encoded chunk must carry the digest of its stored bytes.
    """
    n_codecs = len(pipelines)
    if not isinstance(rows_per_tensor, list) or len(rows_per_tensor) != len(manifest.tensors):
        raise FormatError("payload has no chunk list for every tensor", path=where)
    sizes = [f.size for f in manifest.files]
    table: list[list[ChunkRecord]] = []
    for index, (record, rows) in enumerate(zip(manifest.tensors, rows_per_tensor, strict=True)):
        spans = chunk_spans(record.nbytes, chunk_size)
        if not isinstance(rows, list) or len(rows) != len(spans):
            raise FormatError(
                f"tensor {index} needs {len(spans)} chunks, payload lists "
                f"{len(rows) if isinstance(rows, list) else rows!r}",
                path=where,
            )
        chunks = []
        for row in rows:
            if not (
                isinstance(row, list)
                and len(row) == 6
                and all(type(v) is int and v >= 0 for v in row[:4])
                and all(isinstance(d, bytes) and len(d) == DIGEST_SIZE for d in row[4:5])
                and (row[5] is None or (isinstance(row[5], bytes) and len(row[5]) == DIGEST_SIZE))
            ):
                raise FormatError(f"malformed chunk record {row!r} of tensor {index}", path=where)
            chunk = ChunkRecord(*row)
            if (
                chunk.file >= len(sizes)
                or chunk.codec >= n_codecs
                or (chunk.stored_digest is None and pipelines[chunk.codec] != RAW)
            ):
                raise FormatError(f"chunk record {row!r} names a missing file or codec", path=where)
            if chunk.offset + chunk.length > sizes[chunk.file]:
                raise FormatError(
                    f"chunk record {row!r} reaches past the end of its file", path=where
                )
            chunks.append(chunk)
        table.append(chunks)
    return table


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, threads: int, window: int | None = None
) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, results in order, at most ``window`` in flight.

    The window bounds memory when each result holds a buffer (an encoded chunk).
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    window = window or 2 * threads + 2
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="aptckpt") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def new_tensors(manifest: Manifest) -> list[torch.Tensor]:
    out = []
    for record in manifest.tensors:
        dtype = _dtypes.dtype_from_name(record.dtype)
        assert dtype is not None  # validated by manifest.decode
        with warnings.catch_warnings():
            # torch warns that complex32 is experimental on every allocation; the
            # user saved one, so telling them again on load is noise.
            warnings.filterwarnings("ignore", "ComplexHalf support is experimental")
            out.append(torch.empty(record.shape, dtype=dtype))
    return out


@dataclass(frozen=True)
class _Slot(Generic[C]):
    tensor: int
    index: int
    chunk: C
    out: memoryview


def fill_tensors(
    manifest: Manifest,
    table: Sequence[Sequence[C]],
    chunk_size: int,
    decode: Callable[[C, memoryview], None],
    locate: Callable[[C], tuple[str, str]],
    *,
    threads: int,
    where: str,
) -> list[torch.Tensor]:
    """Fill fresh tensors chunk by chunk, in parallel, collecting every damaged chunk.

    ``decode(chunk, out)`` writes one chunk's raw bytes into ``out`` (verifying
    them if asked to) and raises ``IntegrityError`` (``CodecError``) or
    ``EOFError`` for damage. ``locate(chunk)`` gives ``(file, detail)`` for
    messages: the file it lives in and where in it.
    """
    outs = new_tensors(manifest)
    slots = []
    for t_index, (out, chunks) in enumerate(zip(outs, table, strict=True)):
        view = _dtypes.byte_view(out)
        for c_index, ((start, stop), chunk) in enumerate(
            zip(chunk_spans(len(view), chunk_size), chunks, strict=True)
        ):
            slots.append(_Slot(t_index, c_index, chunk, view[start:stop]))

    def run(slot: _Slot[C]) -> IntegrityError | None:
        try:
            decode(slot.chunk, slot.out)
        except (IntegrityError, EOFError) as err:
            file, detail = locate(slot.chunk)
            return IntegrityError(
                f"checkpoint '{where}' is damaged: tensor #{slot.tensor}, chunk {slot.index} "
                f"({detail}): {err}",
                path=where,
                file=file,
                tensor=str(slot.tensor),  # replaced by its key path in _named()
            )
        return None

    # Collect every damaged chunk rather than stopping at the first, so that
    # verify() reports all of them.
    problems = [e for e in ordered_map(run, slots, threads=threads, window=4 * threads + 4) if e]
    if problems:  # name tensors by key path; computed once, only when something is damaged
        keys = tree.key_paths(manifest.skeleton, len(manifest.tensors))
        problems = [_named(p, keys) for p in problems]
        first = problems[0]
        more = f" (and {len(problems) - 1} more damaged chunk(s))" if len(problems) > 1 else ""
        raise IntegrityError(
            f"{first}{more}",
            path=where,
            file=first.file,
            tensor=first.tensor,
            problems=tuple(str(p) for p in problems),
        )
    return outs


def decode_into(
    manifest: Manifest,
    table: Sequence[Sequence[ChunkRecord]],
    pipelines: Sequence[Pipeline],
    chunk_size: int,
    fds: Sequence[int],
    *,
    verify: bool,
    threads: int,
    where: str,
) -> list[torch.Tensor]:
    """Read, decode and (optionally) verify chunks of shard files into fresh tensors."""

    def decode(chunk: ChunkRecord, out: memoryview) -> None:
        pipeline = pipelines[chunk.codec]
        fd = fds[chunk.file]
        if pipeline.xor:
            raise CodecError("xor-delta chunks need a base; this backend stores none")
        if pipeline == RAW:
            _read_into(fd, out, chunk.offset)
        else:
            stored = os.pread(fd, chunk.length, chunk.offset)
            if verify and _accel.xxh3_128(stored) != chunk.stored_digest:
                raise CodecError("stored-bytes digest mismatch: the file changed after saving")
            pipeline.decode(stored, out)
        if verify and _accel.xxh3_128(out) != chunk.digest:
            raise CodecError("digest mismatch: the stored bytes changed after saving")

    def locate(chunk: ChunkRecord) -> tuple[str, str]:
        file = manifest.files[chunk.file].path
        return file, f"file '{file}', offset {chunk.offset}, {chunk.length} bytes"

    return fill_tensors(manifest, table, chunk_size, decode, locate, threads=threads, where=where)


def _read_into(fd: int, out: memoryview, offset: int) -> None:
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ends before offset {offset + len(out)}")
        done += n


def _named(problem: IntegrityError, keys: list[str]) -> IntegrityError:
    index = int(problem.tensor or 0)
    key = keys[index]
    message = str(problem).replace(f"tensor #{index},", f"tensor {key},", 1)
    return IntegrityError(message, path=problem.path, file=problem.file, tensor=key)
