"""Loading a checkpoint box by box: what :func:`aptckpt.load` does for a checkpoint a process
group saved, and for any checkpoint loaded with ``process_group=`` (into DTensors).

Rank ``r`` gets the state as rank ``r`` saved it: its own :class:`~aptckpt.PerRank` values
(rank 0's when the save had no rank ``r``, which the result reports), every tensor whole,
except those with a destination in ``into``, which are filled in place -- a DTensor with the
part of the tensor its own placements give it, read from the stored boxes it overlaps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import numpy as np
import torch

from aptckpt import _dtypes, _into, tree
from aptckpt import manifest as mf
from aptckpt.backends.base import Backend, TensorLayout
from aptckpt.distributed._boxes import dtensor_layout, full_box
from aptckpt.distributed._read import Target, fill
from aptckpt.errors import FormatError
from aptckpt.storage.base import CheckpointReader

__all__ = ["as_sharded", "describe", "load", "read_whole"]

log = logging.getLogger("aptckpt")


def as_sharded(manifest: mf.Manifest) -> mf.Manifest:
    """A single-process checkpoint seen as one part whose boxes are whole tensors: DTensors
    and other world sizes load it the same way."""
    if manifest.sharded:
        return manifest
    part = mf.PartRecord(
        rank=0,
        files=tuple(range(len(manifest.files))),
        tensors=tuple(mf.TensorRecord(t.dtype, t.shape) for t in manifest.tensors),
        payload=manifest.payload,
        skeleton=manifest.skeleton,
    )
    shards = tuple(
        (mf.ShardRecord(0, i, tuple(0 for _ in t.shape)),) for i, t in enumerate(manifest.tensors)
    )
    return dataclasses.replace(manifest, parts=(part,), shards=shards, sharded=True)


def _target(index: int, dest: Any, record: mf.TensorRecord) -> Target | None:
    """Where destination ``dest`` of saved tensor ``index`` is filled (None: a DTensor this
    rank holds nothing of)."""
    if isinstance(dest, np.ndarray):
        return Target(index, full_box(record.shape), torch.from_numpy(dest))
    found = dtensor_layout(dest, "into")
    if found is None:
        return Target(index, full_box(record.shape), dest.detach())
    local, layout = found
    if layout.box.volume == 0:
        return None
    return Target(index, layout.box, local)


def load(
    reader: CheckpointReader,
    manifest: mf.Manifest,
    impl: Backend,
    *,
    rank: int,
    map_location: Any,
    verify: bool,
    into: Any,
    strict: bool,
) -> Any:
    """See the module docstring; returns what :func:`aptckpt.load` returns."""
    from aptckpt.api import IntoResult, _KeyPaths, _resolve_device, _restore

    manifest = as_sharded(manifest)
    count = len(manifest.tensors)
    selected, fell_back = tree.select_rank(manifest.skeleton, rank)
    if fell_back:
        log.warning(
            "%s was saved by %d ranks: rank %d takes rank 0's per-rank values",
            reader.location,
            manifest.world_size,
            rank,
        )
    view = dataclasses.replace(manifest, skeleton=selected)
    keys = _KeyPaths(view)
    _check_parts(manifest, impl)
    plan = _into.plan(into, view, strict=strict) if into is not None else None
    values: list[Any] = [None] * count
    fresh: dict[int, torch.Tensor] = {}
    targets: list[Target] = []
    for index in sorted(tree.referenced(selected, count)):
        record = manifest.tensors[index]
        dests: list[Any] = []
        if plan is not None:
            direct = plan.direct[index]
            dests = ([direct] if direct is not None else []) + list(plan.copies[index])
        if dests:
            for dest in dests:
                target = _target(index, dest, record)
                if target is not None:
                    targets.append(target)
            values[index] = dests[0]
            continue
        tensor = _allocate(record, keys[index], reader.location)
        fresh[index] = tensor
        targets.append(Target(index, full_box(record.shape), tensor))
    fill(reader, manifest, impl, targets, verify=verify, names=keys.all())
    moving = map_location is not None and map_location not in ("cpu", torch.device("cpu"))
    on_host = tree.host_parts(selected, count) if moving else frozenset()
    devices: dict[str, torch.device] = {}
    for index, tensor in fresh.items():
        record = manifest.tensors[index]
        if index in on_host:
            values[index] = tensor
            continue
        device = devices.get(record.device)
        if device is None:
            device = devices[record.device] = _resolve_device(
                record.device, map_location, functools.partial(keys.__getitem__, index)
            )
        values[index] = _restore(tensor, record, device, keys, index)
    state = tree.rebuild(selected, values, every=False)
    if plan is None:
        return state
    _into.fill_composites(plan, state)
    return IntoResult(state, plan.missing, plan.unexpected)


def read_whole(
    reader: CheckpointReader, manifest: mf.Manifest, impl: Backend, *, verify: bool
) -> list[torch.Tensor]:
    """Every saved tensor, whole, on the CPU (``verify``: every stored byte is checked, as
    the boxes cover each tensor exactly)."""
    _check_parts(manifest, impl)
    names = tree.key_paths(manifest.skeleton, len(manifest.tensors))
    tensors = [
        _allocate(record, names[i], reader.location) for i, record in enumerate(manifest.tensors)
    ]
    targets = [
        Target(i, full_box(r.shape), t)
        for i, (r, t) in enumerate(zip(manifest.tensors, tensors, strict=True))
    ]
    fill(reader, manifest, impl, targets, verify=verify, names=names)
    return tensors


def describe(impl: Backend, manifest: mf.Manifest) -> tuple[list[TensorLayout], int]:
    """How each tensor is stored (its boxes' layouts summed), and the bytes the parts reach
    outside the checkpoint."""
    parts = [manifest.part(p) for p in range(len(manifest.parts))]
    described = [impl.describe(part) for part in parts]
    layouts = []
    for boxes in manifest.shards:
        found = [described[s.part][s.index] for s in boxes]
        sizes = [f.stored_bytes for f in found]
        layouts.append(
            TensorLayout(
                stored_bytes=None if None in sizes else sum(s for s in sizes if s is not None),
                codecs=tuple(sorted({c for f in found for c in f.codecs})),
                chunks=sum(f.chunks for f in found),
            )
        )
    return layouts, sum(impl.external_bytes(part) for part in parts)


def _check_parts(manifest: mf.Manifest, impl: Backend) -> None:
    """Every part's payload parsed against its tensor records before anything is allocated
    or read: a hostile manifest declaring tensors its chunks do not hold is a format error,
    not an allocation of whatever size it claims."""
    for part in range(len(manifest.parts)):
        impl.describe(manifest.part(part))


def _allocate(record: mf.TensorRecord, key: str, where: str) -> torch.Tensor:
    dtype = _dtypes.dtype_from_name(record.dtype)
    assert dtype is not None  # validated by the manifest's decoder
    try:
        return torch.empty(record.shape, dtype=dtype)
    except (RuntimeError, MemoryError) as err:
        raise FormatError(
            f"cannot allocate {record.nbytes} bytes for tensor {key} ({record.dtype} "
            f"{list(record.shape)}): more than this machine has, or the manifest is damaged "
            f"({type(err).__name__}: {err})",
            path=where,
        ) from err
