"""Boxes: the part of a tensor a rank holds (``offsets`` + ``sizes`` per dimension), and what a
DTensor tells of its own.

A DTensor's box is its local shard's place in the whole (``__create_chunk_list__``). Its
*owner rule* is Orbax's replica rule: of the ranks holding the same box (those that differ
only along mesh dimensions where the tensor is ``Replicate``), the one at coordinate 0 on
each of those dimensions writes it, so no plan has to travel between ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from aptckpt.errors import UnsupportedObjectError

__all__ = ["Box", "Layout", "byte_span", "dtensor_layout", "intersect", "local_view"]


@dataclass(frozen=True)
class Box:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def volume(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class Layout:
    """What a rank holds of a DTensor: its box in a tensor of ``shape``, whether it writes
    the box, and whether other ranks hold the same box (replicas, compared by digest)."""

    shape: tuple[int, ...]
    box: Box
    owner: bool
    replicated: bool
    requires_grad: bool
    parameter: bool


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def dtensor_layout(t: torch.Tensor, path: str) -> tuple[torch.Tensor, Layout] | None:
    """The local tensor of DTensor ``t`` and its :class:`Layout`; None for other tensors.

    Raises:
        UnsupportedObjectError: a ``Partial`` placement (a pending reduction: not a value
            any rank holds), or a sharding whose boxes torch cannot describe.
    """
    if not _is_dtensor(t):
        return None
    name = f"{type(t).__module__}.{type(t).__qualname__}"
    placements = tuple(t.placements)  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        raise UnsupportedObjectError(
            f"cannot store the DTensor at {path}: a Partial placement holds a pending "
            "reduction, not a value; call .redistribute(placements=[Replicate()]) or "
            ".full_tensor() first",
            key_path=path,
            type_name=name,
        )
    with torch.no_grad():
        local = t.to_local()  # type: ignore[attr-defined]
    shape = tuple(int(d) for d in t.shape)
    coordinate = t.device_mesh.get_coordinate()  # type: ignore[attr-defined]
    requires_grad = bool(t.requires_grad)
    parameter = isinstance(t, torch.nn.Parameter)
    if coordinate is None:  # not on the tensor's mesh: holds nothing of it
        empty = Box(tuple(0 for _ in shape), tuple(0 for _ in shape))
        return local, Layout(shape, empty, False, False, requires_grad, parameter)
    try:
        chunks = t.__create_chunk_list__()  # type: ignore[attr-defined]
    except Exception as err:  # e.g. a strided sharding torch cannot describe as boxes
        raise UnsupportedObjectError(
            f"cannot store the DTensor at {path}: torch describes no box for its "
            f"placements {placements} ({type(err).__name__}: {err}); redistribute it to "
            "Shard/Replicate placements first",
            key_path=path,
            type_name=name,
        ) from err
    if len(chunks) != 1:
        raise UnsupportedObjectError(
            f"cannot store the DTensor at {path}: its local tensor is {len(chunks)} boxes "
            f"of the whole (placements {placements}); redistribute it first",
            key_path=path,
            type_name=name,
        )
    box = Box(tuple(int(o) for o in chunks[0].offsets), tuple(int(s) for s in chunks[0].sizes))
    if box.sizes != tuple(local.shape):
        raise UnsupportedObjectError(
            f"cannot store the DTensor at {path}: its local tensor is {tuple(local.shape)} "
            f"but torch places a box of {box.sizes} at {box.offsets}",
            key_path=path,
            type_name=name,
        )
    replicate = [d for d, p in enumerate(placements) if p.is_replicate()]
    mesh_shape = tuple(t.device_mesh.shape)  # type: ignore[attr-defined]
    replicated = any(mesh_shape[d] > 1 for d in replicate)
    owner = all(coordinate[d] == 0 for d in replicate) and box.volume > 0
    return local, Layout(shape, box, owner, replicated, requires_grad, parameter)


def intersect(a: Box, b: Box) -> Box | None:
    """The box both ``a`` and ``b`` hold, or None."""
    offsets, sizes = [], []
    for ao, an, bo, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True):
        start, stop = max(ao, bo), min(ao + an, bo + bn)
        if stop <= start:
            return None
        offsets.append(start)
        sizes.append(stop - start)
    return Box(tuple(offsets), tuple(sizes))


def _strides(sizes: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for size in reversed(sizes):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def byte_span(stored: Box, part: Box, itemsize: int) -> tuple[int, int]:
    """The bytes of a tensor stored as box ``stored`` (C order) from ``part``'s first
    element to its last: the one range to read for ``part`` (inside ``stored``)."""
    strides = _strides(stored.sizes)
    first = sum(
        (o - so) * s for o, so, s in zip(part.offsets, stored.offsets, strides, strict=True)
    )
    last = sum(
        (o + n - 1 - so) * s
        for o, n, so, s in zip(part.offsets, part.sizes, stored.offsets, strides, strict=True)
    )
    return first * itemsize, (last + 1) * itemsize


def local_view(data: torch.Tensor, stored: Box, part: Box) -> torch.Tensor:
    """``part`` of a tensor stored as box ``stored``, from ``data``: the elements
    :func:`byte_span` gave (already of the tensor's dtype), as a strided view."""
    return data.as_strided(part.sizes, _strides(stored.sizes), data.storage_offset())


def region(target: torch.Tensor, box: Box, part: Box) -> torch.Tensor:
    """The view of ``target`` (holding ``box``) that holds ``part``."""
    view = target
    for dim, (o, n, bo) in enumerate(zip(part.offsets, part.sizes, box.offsets, strict=True)):
        view = view.narrow(dim, o - bo, n)
    return view


def full_box(shape: tuple[int, ...]) -> Box:
    return Box(tuple(0 for _ in shape), tuple(shape))


def describe_placements(t: Any) -> str:
    return str(tuple(getattr(t, "placements", ())))
