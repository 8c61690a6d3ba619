"""Hypothesis strategies for checkpoint states and hostile manifests.

``states()`` draws nested dict / OrderedDict / list / tuple structures holding
plain values and tensors of every supported dtype with arbitrary bit patterns
(NaN payloads, -0.0, subnormals), any shape including 0-dim and zero-size, in
contiguous, transposed, strided, sliced and expanded layouts, and the same
tensor placed under several keys (aliasing).

``hostile_values()`` draws msgpack-ready values made to break a reader that
trusts a manifest: boundary and huge integers, negative sizes, path tricks,
digests of the wrong length, names of tags, dtypes and codecs in the wrong
place, nested containers. ``mutated()`` puts them anywhere in a manifest
document (a map as msgpack decodes it), for a backend's hostile-input tests.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterator
from typing import Any

import torch
from hypothesis import strategies as st

from aptckpt import _dtypes

__all__ = ["dtypes", "hostile_values", "mutated", "plain_values", "states", "tensors"]

_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


def dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(sorted(_dtypes.DTYPES.values(), key=str))


def _from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    return raw.view(dtype).reshape(shape).clone()


@st.composite
def tensors(draw: st.DrawFn, *, max_numel: int = 64) -> torch.Tensor:
    """A tensor of any supported dtype, shape and layout, with arbitrary bytes."""
    dtype = draw(dtypes())
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    numel = 1
    for d in shape:
        numel *= d
    if numel > max_numel:
        shape = (max_numel,)
        numel = max_numel
    data = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    base = _from_bytes(data, dtype, shape)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded", "offset"]))
    if layout == "transposed" and base.dim() >= 2:
        return base.transpose(0, 1)
    if layout == "strided" and base.dim() >= 1 and base.shape[0] > 1:
        return base[::2]
    if layout == "offset" and base.dim() >= 1 and base.shape[0] > 1:
        return base[1:]
    if layout == "expanded" and base.dim() >= 1:
        return base[:1].expand(3, *base.shape[1:]) if base.shape[0] >= 1 else base
    return base


def plain_values(*, empty_bytes: bool = True) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(_INT64_MIN, _UINT64_MAX),
        st.integers(),  # big ints too
        st.floats(allow_nan=True, allow_infinity=True),
        st.complex_numbers(allow_nan=True),
        st.text(max_size=20),
        st.binary(min_size=0 if empty_bytes else 1, max_size=20),
        dtypes(),
        st.just(torch.device("cpu")),
        st.lists(st.integers(0, 9), max_size=3).map(torch.Size),
    )


def _keys() -> st.SearchStrategy[Any]:  # no bytes keys: b"" would need empty_bytes
    return st.one_of(st.text(max_size=8), st.integers(-5, 1000), st.booleans(), st.none())


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(_keys(), children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4).map(collections.OrderedDict),
    )


class _PoolRef(int):
    """Placeholder for a pool tensor while hypothesis builds (and reprs) the tree.

    Hypothesis reprs strategies, and torch cannot print ``bits*`` or ``float4`` tensors.
    """


def _substitute(node: Any, pool: list[torch.Tensor]) -> Any:
    if isinstance(node, _PoolRef):
        return pool[int(node) % len(pool)]
    if isinstance(node, dict):
        return type(node)((k, _substitute(v, pool)) for k, v in node.items())
    if isinstance(node, (list, tuple)):
        return type(node)(_substitute(v, pool) for v in node)
    return node


@st.composite
def states(draw: st.DrawFn, *, max_leaves: int = 12, empty_bytes: bool = True) -> Any:
    """A nested state; some tensors appear under two keys (tied weights)."""
    pool = draw(st.lists(tensors(), min_size=1, max_size=4))
    if draw(st.booleans()):
        pool[0] = torch.nn.Parameter(
            pool[0].contiguous(), requires_grad=pool[0].is_floating_point()
        )
    leaves = st.one_of(plain_values(empty_bytes=empty_bytes), st.integers(0, 3).map(_PoolRef))
    tree = _substitute(draw(st.recursive(leaves, _containers, max_leaves=max_leaves)), pool)
    return {"tree": tree, "pool": pool, "tied": [pool[0], pool[0]]}


_HOSTILE_INTS = [0, 1, -1, 15, 16, 17, 255, 256, 2**30, 2**31, 2**32, 2**40, 2**62, 2**63 - 1]
_HOSTILE_INTS += [2**63, 2**64 - 1, -(2**63)]
_HOSTILE_STRINGS = ["", ".", "..", "/", "/etc/passwd", "../x", "a/../b", "a//b", "a\\b", ".hidden"]
_HOSTILE_STRINGS += ["x" * 300, "shard-00000.bin", "state.pt", "aptckpt-store", "STORE", "objects"]
_HOSTILE_STRINGS += ["float32", "bits1x8", "complex32", "int4", "zstd", "xor", "shuffle", "lz4"]
_HOSTILE_STRINGS += ["tensor", "dict", "odict", "list", "tuple", "int", "complex", "dtype"]
_HOSTILE_STRINGS += ["device", "size", "cuda:0", "cuda:99", "meta", "cpu", "aptckpt", "delta"]


def hostile_values(*, max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """msgpack-ready values made to break a reader that trusts what it reads."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(_HOSTILE_INTS),
        st.integers(_INT64_MIN, _UINT64_MAX),
        st.floats(),
        st.sampled_from(_HOSTILE_STRINGS),
        st.text(max_size=12),
        st.binary(max_size=20),
        st.sampled_from([b"\0" * 16, b"\xff" * 16, b"\0" * 15, b"\0" * 17]),
    )

    def nest(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=6),
            st.dictionaries(st.sampled_from(_HOSTILE_STRINGS) | st.text(max_size=8), children),
            st.tuples(st.sampled_from(_HOSTILE_STRINGS), children).map(list),  # tag-like nodes
        )

    return st.recursive(scalars, nest, max_leaves=max_leaves)


def _paths(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a nested document: map keys and list indexes."""
    yield path
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*path, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*path, index))


@st.composite
def mutated(draw: st.DrawFn, doc: Any, *, keep: tuple[str, ...] = ("checksum",)) -> Any:
    """A copy of ``doc`` with one to three places replaced, deleted, duplicated or
    grown by a :func:`hostile_values` value. Top-level keys in ``keep`` stay."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        places = [p for p in _paths(doc) if p and p[0] not in keep]
        if not places:
            break
        path = draw(st.sampled_from(places))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate", "grow"]))
        if action == "replace":
            parent[last] = draw(hostile_values())
        elif action == "delete":
            del parent[last]
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
        elif action == "grow" and isinstance(parent[last], list):
            parent[last].append(draw(hostile_values()))
        elif action == "grow" and isinstance(parent[last], dict):
            parent[last][draw(st.sampled_from(_HOSTILE_STRINGS))] = draw(hostile_values())
        else:
            parent[last] = draw(hostile_values())
    return doc
