"""Tensors returned as copy-on-write memory maps of a checkpoint's data files
(``aptckpt.load(..., mmap=True)``).

A tensor can be mapped when every chunk of it is stored raw, its chunks lie end to end in
one file, and its first byte is aligned to its element size. Each data file holding one is
mapped once, ``MAP_PRIVATE`` and writable: the tensor shares pages with the page cache until it
is written to, when the written page is copied (the file never changes). Nothing is copied or
allocated up front, so a load costs about a hash of the bytes (``verify=True``: every chunk of
every mapped tensor is checked against its digest, in parallel, before the tensors are
returned) or nothing at all (``verify=False``: pages are read when first touched).

The contract is the one ``torch.load(mmap=True)`` and safetensors have: the files must not be
truncated or rewritten while the tensors live (a process touching a page past a truncated end
gets SIGBUS). aptckpt never modifies a committed checkpoint; deleting it, or letting retention
delete it, is safe: the mapping keeps the unlinked file's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from aptckpt import _accel, _dtypes
from aptckpt.backends import _chunks
from aptckpt.codecs import RAW, Pipeline
from aptckpt.manifest import Manifest

if TYPE_CHECKING:
    from aptckpt.storage.base import DataFiles

__all__ = ["map_raw_tensors"]


def _span(
    chunks: Sequence[_chunks.ChunkRecord], raw: set[int], itemsize: int
) -> tuple[int, int] | None:
    """``(file, offset)`` of a tensor's bytes if it can be mapped, else None."""
    if not chunks or any(c.codec not in raw for c in chunks):
        return None
    first = chunks[0]
    if first.offset % itemsize:
        return None
    position = first.offset
    for chunk in chunks:
        if chunk.file != first.file or chunk.offset != position:
            return None
        position += chunk.length
    return first.file, first.offset


def map_raw_tensors(
    manifest: Manifest,
    table: Sequence[Sequence[_chunks.ChunkRecord]],
    pipelines: Sequence[Pipeline],
    chunk_size: int,
    files: DataFiles,
    *,
    verify: bool,
    threads: int,
    where: str,
) -> dict[int, torch.Tensor]:
    """Map every mappable tensor (see the module docstring); return them by index (none
    where the storage cannot map files: object stores).

    Raises ``IntegrityError`` naming every damaged chunk of a mapped tensor when verifying.
    The files stay the caller's to close; the mappings keep none open.
    """
    raw = {index for index, pipeline in enumerate(pipelines) if pipeline == RAW}
    maps: dict[int, torch.UntypedStorage] = {}
    out: dict[int, torch.Tensor] = {}
    regions: list[tuple[int, memoryview]] = []
    for index, (record, chunks) in enumerate(zip(manifest.tensors, table, strict=True)):
        dtype = _dtypes.dtype_from_name(record.dtype)
        assert dtype is not None  # validated by manifest.decode
        span = _span(chunks, raw, dtype.itemsize) if record.nbytes else None
        if span is None:
            continue
        file, offset = span
        if file not in maps:
            mapped = files.map_file(file, manifest.files[file].size, verify=verify)
            if mapped is None:
                return {}
            maps[file] = mapped
        flat = torch.empty(0, dtype=torch.uint8).set_(maps[file], offset, (record.nbytes,), (1,))
        out[index] = flat.view(dtype).view(record.shape)
        if verify:
            regions.append((index, flat.numpy().data))
    if regions:
        _check(regions, table, chunk_size, manifest, threads=threads, where=where)
    return out


def _check(
    regions: list[tuple[int, memoryview]],
    table: Sequence[Sequence[_chunks.ChunkRecord]],
    chunk_size: int,
    manifest: Manifest,
    *,
    threads: int,
    where: str,
) -> None:
    """Hash every chunk of the mapped regions in one parallel core call; raise naming each
    chunk whose bytes differ from its digest."""
    try:
        found = _accel.hash_chunks_many([view for _, view in regions], chunk_size, threads)
    finally:
        for _, view in regions:
            view.release()
    problems = []
    for (index, _), digests in zip(regions, found, strict=True):
        for c_index, chunk in enumerate(table[index]):
            if digests[16 * c_index : 16 * c_index + 16] != chunk.digest:
                file = manifest.files[chunk.file].path
                detail = f"file '{file}', offset {chunk.offset}, {chunk.length} bytes"
                problems.append(
                    _chunks.chunk_damage(
                        where, index, f"chunk {c_index}", detail, file, _chunks.DIGEST_MISMATCH
                    )
                )
    if problems:
        raise _chunks.combined(problems, manifest, where)
