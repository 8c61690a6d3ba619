"""A collective save: every rank of a process group writes its own shards into one checkpoint.

The protocol (docs/format.md, "Saves by a process group"):

1. every rank flattens its state (DTensors as their local shards, :class:`~aptckpt.PerRank`
   values marked) and decides alone what it writes: a DTensor box when it is the box's
   owner (coordinate 0 on every ``Replicate`` mesh dimension), a plain tensor every rank
   holds (a replica) when the greedy spread of replicas by size gives it to this rank, and
   its per-rank tensors. It hashes every tensor other ranks hold a replica of;
2. *agree*: every rank reports whether it got this far (errors travel as text);
3. the coordinator (group rank 0) creates the checkpoint (a temporary directory, or an
   object-store prefix) and broadcasts its token, or its error;
4. every rank joins the save with the token, writes its tensors with the backend under
   ``rank-NNNNN/`` and makes them durable;
5. every rank sends its fragment (msgpack) to all; the coordinator merges them, checks
   coverage and replicas, writes the one manifest last (the commit) and broadcasts the
   outcome, which every rank returns or raises.

Everything that crosses the group is msgpack bytes (:mod:`aptckpt.distributed._comm`),
each wait bounded by the collective timeout. A rank killed at any instant before the
commit leaves no manifest: the coordinator aborts (its temporary directory goes), or, if
the coordinator died, its temporary entries are debris the next save clears.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from dataclasses import dataclass
from typing import Any

import torch

from aptckpt import _accel, _dtypes, tree
from aptckpt import manifest as mf
from aptckpt._version import __version__
from aptckpt.backends.base import Backend
from aptckpt.distributed._boxes import dtensor_layout, full_box
from aptckpt.distributed._comm import Comm, describe, failed
from aptckpt.distributed._merge import Tensor, merge
from aptckpt.errors import AptckptError, CollectiveError, ReplicaDivergenceError
from aptckpt.storage import Storage
from aptckpt.storage.base import CheckpointWriter, FolderWriter

__all__ = ["LocalPlan", "plan", "save"]


@dataclass(frozen=True)
class LocalPlan:
    """What this rank writes: the flattened state, one :class:`Tensor` per leaf, and the
    leaves it writes (in order)."""

    flat: tree.FlatState
    tensors: tuple[Tensor, ...]
    written: tuple[int, ...]


def _spread(sizes: dict[int, int], world: int) -> dict[int, int]:
    """Owners of the replicas (leaf -> rank): largest first, each to the least-loaded rank.
    Every rank computes the same from the same sizes: no plan travels."""
    loads = [0] * world
    owners = {}
    for leaf in sorted(sizes, key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[leaf] = rank
        loads[rank] += sizes[leaf]
    return owners


def _digest(t: torch.Tensor) -> bytes:
    host = t.detach().resolve_conj().resolve_neg()
    if host.device.type != "cpu":
        host = host.cpu()
    host = host.contiguous()
    return bytes(_accel.xxh3_128(_dtypes.byte_view(host)))


def plan(state: Any, rank: int, world: int) -> LocalPlan:
    """Flatten this rank's state and decide what it writes (step 1)."""
    flat = tree.flatten(state, sharding=dtensor_layout)
    replicas = {
        i: leaf.tensor.numel() * leaf.tensor.element_size()
        for i, leaf in enumerate(flat.tensors)
        if i not in flat.layouts and i not in flat.ranked
    }
    owners = _spread(replicas, world)
    tensors, written = [], []
    for i, leaf in enumerate(flat.tensors):
        t = leaf.tensor
        dtype = _dtypes.dtype_name(t.dtype)
        layout = flat.layouts.get(i)
        if layout is not None:
            box, shape, writes = layout.box, layout.shape, layout.owner
            digest = _digest(t) if layout.replicated and box.volume else None
            grad, param = layout.requires_grad, layout.parameter
        else:
            shape = tuple(int(d) for d in t.shape)
            box = full_box(shape)
            ranked = i in flat.ranked
            writes = ranked or owners[i] == rank
            digest = None if ranked or world == 1 else _digest(t)
            grad, param = bool(t.requires_grad), leaf.is_parameter
        tensors.append(
            Tensor(dtype, shape, box, writes, digest, i in flat.ranked, grad, param, str(t.device))
        )
        if writes:
            written.append(i)
    return LocalPlan(flat, tuple(tensors), tuple(written))


def _part_state(local: LocalPlan) -> tree.FlatState:
    """The tensors this rank writes, as the flat state its backend stores."""
    leaves = tuple(local.flat.tensors[i] for i in local.written)
    skeleton = ["list", [["tensor", k] for k in range(len(leaves))]]
    return tree.FlatState(skeleton, leaves, owned=local.flat.owned)


@dataclass(frozen=True)
class Job:
    """What every rank of a collective save was asked to do."""

    storage: Storage
    path: str
    backend: str
    impl: Backend | None
    metadata: Any
    metadata_version: int
    overwrite: bool
    start: float


def save(
    state: Any, job: Job, *, process_group: Any, error: BaseException | None, blocking: bool
) -> Any:
    """The collective save of :func:`aptckpt.save` (``error``: why making the backend from
    the options failed -- every rank takes part either way). With ``blocking=False`` the
    ranks agree on the plan here, each snapshots what it writes into staging buffers, and
    the rest of the protocol (through the job's store, never the training group) runs on
    the background save thread; the :class:`~aptckpt.SaveHandle` returns the result."""
    from aptckpt import _background

    where = job.storage.display(job.path)
    comm = Comm(process_group, f"saving checkpoint '{where}'")
    try:
        local: LocalPlan | None = None
        if error is None:
            try:
                local = plan(state, comm.rank, comm.size)
            except Exception as err:
                error = err
        comm.agree(error, "prepare")  # every rank's state flattened, or every rank raises
    except BaseException:
        comm.close(failed=True)
        raise
    assert local is not None

    def persist(part: tree.FlatState) -> Any:
        with comm:
            return _persist(comm, local, part, job)

    if blocking:
        return persist(_part_state(local))
    return _background.submit(_part_state(local), where, persist)


def _persist(comm: Comm, local: LocalPlan, part: tree.FlatState, job: Job) -> Any:
    """Steps 3-5: create (coordinator), write, gather, commit."""
    writer: CheckpointWriter | None = None
    token: str | None = None
    created: BaseException | None = None
    if comm.coordinator:
        try:
            writer = job.storage.create_checkpoint(job.path, overwrite=job.overwrite)
            token = writer.token
        except Exception as err:
            created = err
    sent = comm.broadcast({"token": token, "error": describe(created)}, "create")
    if created is not None:
        raise created  # the coordinator's own error, as a single-process save raises it
    if sent["token"] is None:
        raise failed(comm.what, {0: sent["error"]}, comm.size)
    with contextlib.ExitStack() as held:
        if writer is not None:
            held.enter_context(writer)  # aborts unless committed
        return _write_and_commit(comm, local, part, job, writer, sent["token"])


def _write_and_commit(
    comm: Comm,
    local: LocalPlan,
    part: tree.FlatState,
    job: Job,
    writer: CheckpointWriter | None,
    token: str,
) -> Any:
    from aptckpt.api import SaveInfo

    storage, path, impl = job.storage, job.path, job.impl
    assert impl is not None
    fragment: dict[str, Any] | None = None
    error: BaseException | None = None
    mine: CheckpointWriter | None = None
    try:
        mine = writer if writer is not None else storage.join_checkpoint(path, token)
        folder = FolderWriter(mine, f"rank-{comm.rank:05d}", comm.rank)
        payload = impl.write(part, folder) if local.written else None
        folder.sync_files()
        fragment = {
            "skeleton": local.flat.skeleton,
            "format_version": max(local.flat.format_version, impl.format_version(payload)),
            "tensors": [t.row() for t in local.tensors],
            "written": list(local.written),
            "files": [[f.path, f.size] for f in folder.sizes()],
            "payload": payload,
            "external": folder.external_bytes,
            "backend": job.backend,
        }
    except Exception as err:
        error = err
    reports = comm.all_gather(
        {"error": describe(error)} if error is not None else fragment, "write"
    )
    failures = {r: f["error"] for r, f in enumerate(reports) if "error" in f}
    joined = mine if mine is not writer else None
    if failures:
        if joined is not None:
            joined.abort()
            joined.release()
        raise failed(comm.what, failures, comm.size) from error

    outcome: dict[str, Any] = {}
    if comm.coordinator:
        assert writer is not None
        try:
            encoded = _commit(writer, reports, job)
            outcome = {"ok": len(encoded)}
        except ReplicaDivergenceError as err:
            outcome = {"divergence": [str(err), err.key_path, [list(g) for g in err.groups]]}
            error = err
        except Exception as err:
            outcome = {"error": describe(err)}
            error = err
    try:
        outcome = comm.broadcast(outcome, "commit")
    finally:
        if joined is not None:
            # Its files are the checkpoint's now (or the coordinator's abort removes them):
            # it lets go of what it holds and deletes nothing.
            joined.release()
    if "divergence" in outcome:
        message, key, groups = outcome["divergence"]
        raise ReplicaDivergenceError(message, key_path=key, groups=[tuple(g) for g in groups])
    if "error" in outcome:
        if error is not None and isinstance(error, AptckptError):
            raise error
        raise failed(comm.what, {0: outcome["error"]}, comm.size) from error
    files = [mf.FileRecord(p, s) for f in reports for p, s in f["files"]]
    # Every tensor once: rank 0's leaves, and the other ranks' per-rank ones.
    tensors = len(reports[0]["tensors"]) + sum(
        1 for f in reports[1:] for row in f["tensors"] if Tensor.parse(row).ranked
    )
    raw_bytes = 0
    for f in reports:
        for i in f["written"]:
            leaf = Tensor.parse(f["tensors"][i])
            dtype = _dtypes.dtype_from_name(leaf.dtype)
            raw_bytes += leaf.box.volume * (dtype.itemsize if dtype is not None else 0)
    return SaveInfo(
        path=storage.display(path),
        backend=job.backend,
        tensors=tensors,
        raw_bytes=raw_bytes,
        stored_bytes=sum(f.size for f in files) + sum(f["external"] for f in reports),
        files=tuple(f.path for f in files),
        seconds=time.perf_counter() - job.start,
        manifest_bytes=int(outcome["ok"]),
    )


def _commit(writer: CheckpointWriter, fragments: list[dict[str, Any]], job: Job) -> bytes:
    """The coordinator's step 5: merge, check, write the manifest last."""
    from aptckpt.api import _refuse_unreadable_manifest

    assert job.impl is not None
    others = {
        r: f.get("backend") for r, f in enumerate(fragments) if f.get("backend") != job.backend
    }
    if others:
        shown = ", ".join(f"rank {r}: {name!r}" for r, name in sorted(others.items()))
        raise CollectiveError(
            f"the ranks saved with different backends (rank 0: {job.backend!r}; {shown}); "
            "every rank of a collective save must pass the same backend. Nothing was committed"
        )
    merged = merge(fragments)
    manifest = mf.Manifest(
        backend=job.backend,
        options=job.impl.options_record(),
        skeleton=merged.skeleton,
        tensors=merged.tensors,
        files=merged.files,
        payload=None,
        metadata=job.metadata,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        library_version=__version__,
        torch_version=torch.__version__,
        format_version=max(merged.format_version, job.metadata_version),
        world_size=len(fragments),
        parts=merged.parts,
        shards=merged.shards,
        sharded=True,
    )
    encoded = mf.encode(manifest)
    _refuse_unreadable_manifest(encoded, writer.location)
    writer.commit(encoded)
    return encoded
