"""The coordinator's half of a collective save: the ranks' fragments become one manifest.

A *fragment* is what one rank reports after writing (msgpack, see :func:`fragment`): its
state skeleton with local tensor numbers, one entry per local tensor (dtype, the whole
tensor's shape, the box it holds, whether it wrote it, a digest where other ranks hold the
same box), and the files and backend payload of what it wrote. :func:`merge` walks the
ranks' skeletons side by side and

* gives each tensor one global number (the same position in every rank's state is the same
  tensor), refusing states whose structure differs between ranks;
* keeps plain values that differ between ranks, and :class:`~aptckpt.tree.PerRank` values,
  per rank (``["ranks", [...]]``);
* checks that every tensor's written boxes cover it exactly (in bounds, no overlap, the
  whole volume), and that every replica of a box has the same digest -- ranks that
  diverged raise :class:`~aptckpt.errors.ReplicaDivergenceError` naming the key and which
  ranks agree with which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aptckpt import manifest as mf
from aptckpt import tree
from aptckpt._config import MAX_NESTING
from aptckpt.distributed._boxes import Box, intersect
from aptckpt.errors import CollectiveError, ReplicaDivergenceError

__all__ = ["Merged", "Tensor", "merge"]

_LEAF_TAGS = frozenset({"int", "complex", "dtype", "device", "size", "numpy"})


@dataclass(frozen=True)
class Tensor:
    """One local tensor of a fragment (``fragment["tensors"][i]``)."""

    dtype: str
    shape: tuple[int, ...]
    box: Box
    written: bool
    digest: bytes | None
    ranked: bool
    requires_grad: bool
    parameter: bool
    device: str

    @staticmethod
    def parse(row: Sequence[Any]) -> Tensor:
        dtype, shape, offsets, sizes, written, digest, ranked, grad, param, device = row
        return Tensor(
            dtype,
            tuple(shape),
            Box(tuple(offsets), tuple(sizes)),
            bool(written),
            digest,
            bool(ranked),
            bool(grad),
            bool(param),
            device,
        )

    def row(self) -> list[Any]:
        return [
            self.dtype,
            list(self.shape),
            list(self.box.offsets),
            list(self.box.sizes),
            self.written,
            self.digest,
            self.ranked,
            self.requires_grad,
            self.parameter,
            self.device,
        ]


@dataclass(frozen=True)
class Merged:
    skeleton: Any
    tensors: tuple[mf.TensorRecord, ...]
    files: tuple[mf.FileRecord, ...]
    parts: tuple[mf.PartRecord, ...]
    shards: tuple[tuple[mf.ShardRecord, ...], ...]
    format_version: int


class _Merger:
    def __init__(self, fragments: Sequence[dict[str, Any]]) -> None:
        self.fragments = fragments
        self.local = [[Tensor.parse(row) for row in f["tensors"]] for f in fragments]
        self.global_of: list[dict[int, int]] = [{} for _ in fragments]  # rank: local -> global
        self.members: list[list[tuple[int, int]]] = []  # global -> [(rank, local)]
        self.paths: list[str] = []

    # ------------------------------------------------------------ skeletons

    def node(self, nodes: list[Any], path: str, depth: int) -> Any:
        first = nodes[0]
        tagged = [isinstance(n, list) and n and isinstance(n[0], str) for n in nodes]
        if all(tagged) and all(n[0] == "ranks" for n in nodes):
            return ["ranks", [self.ranked(rank, n[1][0], path) for rank, n in enumerate(nodes)]]
        if any(tagged) and any(isinstance(n, list) and n and n[0] == "ranks" for n in nodes):
            raise self.differs(path, "a PerRank value on some ranks only")
        if all(_is_tensor(n) for n in nodes):
            return ["tensor", self.tensor([n[1] for n in nodes], path)]
        if all(tagged) and first[0] not in _LEAF_TAGS and len({n[0] for n in nodes}) == 1:
            return self.container(nodes, path, depth)
        if all(n == first for n in nodes):
            return first
        if any(_holds_tensor(n) for n in nodes):
            raise self.differs(path, "tensors in different places")
        return ["ranks", list(nodes)]  # a plain value each rank has its own of

    def container(self, nodes: list[Any], path: str, depth: int) -> Any:
        tag = nodes[0][0]
        if depth > MAX_NESTING:
            raise self.differs(path, "containers nested too deep")
        if not any(_holds_tensor(n) for n in nodes) and any(n != nodes[0] for n in nodes):
            return ["ranks", list(nodes)]  # plain values each rank has its own of
        lengths = {len(n[1]) if isinstance(n[1], list) else -1 for n in nodes}
        rests = [n[2:] for n in nodes]
        if len(lengths) != 1 or -1 in lengths:
            raise self.differs(path, f"{tag} nodes of different sizes")
        children: list[Any] = []
        items = [n[1] for n in nodes]
        if tag in ("dict", "odict", "counter", "defaultdict"):
            for i in range(0, len(items[0]), 2):
                keys = [it[i] for it in items]
                if any(k != keys[0] for k in keys):
                    raise self.differs(path, "different keys")
                child = tree.child_path(path, keys[0])
                children += [keys[0], self.node([it[i + 1] for it in items], child, depth + 1)]
        else:
            for i in range(len(items[0])):
                children.append(self.node([it[i] for it in items], f"{path}[{i}]", depth + 1))
        rest = rests[0]
        if tag == "odict" and rest:
            rest = [self.node([r[0] for r in rests], f"{path}._metadata", depth + 1), *rest[1:]]
        elif any(r != rest for r in rests):
            raise self.differs(path, f"{tag} nodes that differ")
        return [tag, children, *rest]

    def ranked(self, rank: int, node: Any, path: str) -> Any:
        """A rank's PerRank node: its tensors become tensors of their own."""

        def number(local: int) -> int:
            found = self.global_of[rank].get(local)
            if found is None:
                found = self.global_of[rank][local] = len(self.members)
                self.members.append([(rank, local)])
                self.paths.append(f"{path}@rank{rank}")
            return found

        return _map_tensors(node, number)

    def tensor(self, locals_: list[int], path: str) -> int:
        found = self.global_of[0].get(locals_[0])
        if found is None:
            found = len(self.members)
            self.members.append([])
            self.paths.append(path)
        for rank, local in enumerate(locals_):
            known = self.global_of[rank].get(local)
            if known is None:
                self.global_of[rank][local] = found
                self.members[found].append((rank, local))
            elif known != found:
                raise self.differs(path, "tensors tied differently")
        return found

    def differs(self, path: str, what: str) -> CollectiveError:
        return CollectiveError(
            f"the ranks' states differ in structure at {path} ({what}): a collective save "
            "needs the same keys on every rank; wrap values a rank keeps its own of in "
            "aptckpt.PerRank"
        )

    # ------------------------------------------------------------- tensors

    def records(self) -> list[mf.TensorRecord]:
        result = []
        for index, members in enumerate(self.members):
            path = self.paths[index]
            seen = {(self.local[r][i].dtype, self.local[r][i].shape) for r, i in members}
            if len(seen) != 1:
                shown = ", ".join(
                    f"rank {r}: {self.local[r][i].dtype} {list(self.local[r][i].shape)}"
                    for r, i in members
                )
                raise CollectiveError(
                    f"the ranks hold different tensors at {path} ({shown}); a collective "
                    "save needs the same dtype and (global) shape on every rank"
                )
            first = self.local[members[0][0]][members[0][1]]
            result.append(
                mf.TensorRecord(
                    dtype=first.dtype,
                    shape=first.shape,
                    device=first.device,
                    requires_grad=first.requires_grad,
                    parameter=first.parameter,
                )
            )
            self.check_replicas(path, members)
        return result

    def check_replicas(self, path: str, members: list[tuple[int, int]]) -> None:
        by_box: dict[Box, dict[bytes, list[int]]] = {}
        for rank, local in members:
            t = self.local[rank][local]
            if t.digest is not None:
                by_box.setdefault(t.box, {}).setdefault(t.digest, []).append(rank)
        for box, groups in by_box.items():
            if len(groups) > 1:
                ranks = sorted((tuple(r) for r in groups.values()), key=lambda g: g[0])
                where = "" if len(by_box) == 1 else f" (the box at {list(box.offsets)})"
                shown = " vs ".join("ranks " + ",".join(map(str, g)) for g in ranks)
                raise ReplicaDivergenceError(
                    f"replicas of {path}{where} differ between ranks ({shown} hold different "
                    "values): the ranks diverged (a missed gradient all-reduce, a rank-dependent "
                    "update, different seeds). Nothing was committed; if the tensor is meant "
                    "to differ per rank, wrap it in aptckpt.PerRank",
                    key_path=path,
                    groups=ranks,
                )


def _children(node: Any) -> list[Any]:
    """The child nodes of a skeleton node (none for a leaf): a container's items, keys and
    values, an OrderedDict's ``_metadata``, a composite's parts."""
    if not (isinstance(node, list) and len(node) >= 2 and isinstance(node[0], str)):
        return []
    if node[0] in ("tensor", *_LEAF_TAGS) or not isinstance(node[1], list):
        return []
    children = list(node[1])
    if node[0] == "odict" and len(node) > 2:
        children.append(node[2])
    return children


def _is_tensor(node: Any) -> bool:
    return isinstance(node, list) and len(node) == 2 and node[0] == "tensor"


def _holds_tensor(node: Any) -> bool:
    """Whether a skeleton node has a tensor node anywhere in it (by structure: a plain list
    or dict whose first item is the string "tensor" holds none)."""
    stack = [node]
    while stack:
        current = stack.pop()
        if _is_tensor(current):
            return True
        stack.extend(_children(current))
    return False


def _map_tensors(node: Any, number: Any) -> Any:
    """``node`` with every tensor node ``["tensor", i]`` made ``["tensor", number(i)]``."""
    if _is_tensor(node):
        return ["tensor", number(node[1])]
    children = _children(node)
    if not children:
        return node
    mapped = [_map_tensors(child, number) for child in node[1]]
    rest = node[2:]
    if node[0] == "odict" and rest:
        rest = [_map_tensors(rest[0], number), *rest[1:]]
    return [node[0], mapped, *rest]


def merge(fragments: Sequence[dict[str, Any]]) -> Merged:
    """One manifest's worth of state from every rank's fragment (rank order).

    Raises:
        CollectiveError: structures differ between ranks, a tensor is not covered exactly.
        ReplicaDivergenceError: replicas of a tensor differ.
    """
    merger = _Merger(fragments)
    skeleton = merger.node([f["skeleton"] for f in fragments], "state", 0)
    records = merger.records()
    files: list[mf.FileRecord] = []
    parts: list[mf.PartRecord] = []
    part_of: dict[tuple[int, int], tuple[int, int]] = {}  # (rank, local) -> (part, index)
    for rank, f in enumerate(fragments):
        written = list(f["written"])
        if not written and not f["files"]:
            continue
        numbers = tuple(range(len(files), len(files) + len(f["files"])))
        files.extend(mf.FileRecord(path, size) for path, size in f["files"])
        local = merger.local[rank]
        for index, leaf in enumerate(written):
            part_of[(rank, leaf)] = (len(parts), index)
        parts.append(
            mf.PartRecord(
                rank=rank,
                files=numbers,
                tensors=tuple(mf.TensorRecord(local[i].dtype, local[i].box.sizes) for i in written),
                payload=f["payload"],
            )
        )
    shards = []
    for index, members in enumerate(merger.members):
        boxes = []
        for rank, leaf in members:
            place = part_of.get((rank, leaf))
            if place is not None:
                box = merger.local[rank][leaf].box
                boxes.append(mf.ShardRecord(place[0], place[1], box.offsets))
        check_cover(
            records[index],
            [merger.local[r][i].box for r, i in members if (r, i) in part_of],
            merger.paths[index],
        )
        shards.append(tuple(boxes))
    version = max(mf.SHARDED_SINCE, *(int(f.get("format_version", 2)) for f in fragments))
    return Merged(skeleton, tuple(records), tuple(files), tuple(parts), tuple(shards), version)


def check_cover(record: mf.TensorRecord, boxes: list[Box], path: str) -> None:
    """``boxes`` cover the tensor of ``record`` exactly: inside it, disjoint, all of it."""
    volume = sum(b.volume for b in boxes)
    overlaps = [
        (a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if intersect(a, b) is not None
    ]
    outside = [
        b
        for b in boxes
        if any(o + n > d for o, n, d in zip(b.offsets, b.sizes, record.shape, strict=True))
    ]
    if overlaps or outside or volume != math.prod(record.shape):
        problem = (
            f"boxes at {list(overlaps[0][0].offsets)} and {list(overlaps[0][1].offsets)} overlap"
            if overlaps
            else f"a box at {list(outside[0].offsets)} lies outside it"
            if outside
            else f"the written boxes hold {volume} of its {math.prod(record.shape)} elements"
        )
        raise CollectiveError(
            f"tensor {path} ({record.dtype} {list(record.shape)}) is not covered exactly by "
            f"what the ranks wrote: {problem}. Its DTensor placements are not ones aptckpt "
            "can store as boxes; nothing was committed"
        )
