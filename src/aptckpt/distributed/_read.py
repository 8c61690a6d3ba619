"""Reading a checkpoint a process group saved (format 4), at any world size.

Each wanted tensor is filled box by box: a *target* (the whole tensor in one process, a
DTensor's local shard on a rank) is intersected with the boxes the ranks stored; for each
overlap the backend reads only the bytes from the overlap's first element to its last
(:meth:`~aptckpt.backends.base.Backend.read_regions`: for chunked backends, only the chunks
those bytes lie in, each verified), which are copied into the target. Whether the stored
boxes cover each tensor exactly is checked before anything is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aptckpt import _dtypes
from aptckpt import manifest as mf
from aptckpt.backends.base import Backend
from aptckpt.distributed._boxes import Box, byte_span, intersect, local_view, region
from aptckpt.distributed._merge import check_cover
from aptckpt.errors import CollectiveError, FormatError
from aptckpt.storage.base import CheckpointReader

__all__ = ["Target", "fill"]


@dataclass(frozen=True)
class Target:
    """Fill ``tensor`` (a CPU or device tensor of the saved dtype, shaped ``box.sizes``)
    with box ``box`` of saved tensor ``index``."""

    index: int
    box: Box
    tensor: torch.Tensor


def stored_boxes(manifest: mf.Manifest, index: int) -> list[tuple[mf.ShardRecord, Box]]:
    return [
        (s, Box(s.offsets, manifest.parts[s.part].tensors[s.index].shape))
        for s in manifest.shards[index]
    ]


def fill(
    reader: CheckpointReader,
    manifest: mf.Manifest,
    impl: Backend,
    targets: Sequence[Target],
    *,
    verify: bool,
    names: Sequence[str],
) -> None:
    """Fill every target from the stored boxes it overlaps (``names``: key paths per saved
    tensor, for messages)."""
    # part -> stored local tensor -> the byte span every target needs of it (one read per
    # stored tensor: tied destinations and several targets ask for the same bytes)
    spans: dict[int, dict[int, list[int]]] = {}
    copies: list[tuple[Target, mf.ShardRecord, Box, Box, int]] = []
    checked: set[int] = set()
    for target in targets:
        record = manifest.tensors[target.index]
        boxes = stored_boxes(manifest, target.index)
        if target.index not in checked:
            try:
                check_cover(record, [b for _, b in boxes], names[target.index])
            except CollectiveError as err:
                raise FormatError(str(err), path=reader.location) from err
            checked.add(target.index)
        dtype = _dtypes.dtype_from_name(record.dtype)
        assert dtype is not None  # validated by the manifest's decoder
        itemsize = dtype.itemsize
        for shard, stored in boxes:
            overlap = intersect(stored, target.box)
            if overlap is None:
                continue
            start, stop = byte_span(stored, overlap, itemsize)
            span = spans.setdefault(shard.part, {}).setdefault(shard.index, [start, stop])
            span[0], span[1] = min(span[0], start), max(span[1], stop)
            copies.append((target, shard, stored, overlap, start))
    found: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # (part, local) -> bytes, start
    for part, by_index in spans.items():
        # In stored order: a backend reads the chunks of a part front to back.
        regions = [(index, span[0], span[1]) for index, span in sorted(by_index.items())]
        read = impl.read_regions(reader, manifest.part(part), regions, verify=verify)
        if len(read) != len(regions):
            raise FormatError(
                f"backend {manifest.backend!r} returned {len(read)} regions for {len(regions)}",
                path=reader.location,
            )
        for (index, start, stop), data in zip(regions, read, strict=True):
            if data.numel() != stop - start:
                raise FormatError(
                    f"backend {manifest.backend!r} returned {data.numel()} bytes for a region "
                    f"of {stop - start}",
                    path=reader.location,
                )
            found[(part, index)] = (data, start)
    for target, shard, stored, overlap, start in copies:
        data, first = found[(shard.part, shard.index)]
        dtype = target.tensor.dtype
        piece = data[start - first :]
        source = local_view(piece.view(dtype), stored, overlap)
        with torch.no_grad():
            region(target.tensor, target.box, overlap).copy_(source)
