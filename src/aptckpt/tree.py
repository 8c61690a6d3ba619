"""Nested state <-> (skeleton, tensor list).

``flatten`` walks a state (any nesting of dict / OrderedDict / list / tuple holding
tensors and plain values) and returns a *skeleton*: a msgpack-ready description
of every container and plain value, with each tensor replaced by an index into a
tensor list. ``rebuild`` inverts it. Backends store the skeleton in the manifest
and only ever see the flat tensor list.

Skeleton encoding (format v3, see docs/format.md section 3):

* ``None``, ``bool``, ``int`` in [-2**63, 2**64), ``float``, ``str`` and ``bytes``
  are stored inline as msgpack values;
* every other node is a msgpack array whose first element is a tag string:
  ``["dict", [k0, v0, k1, v1, ...]]``, ``["odict", [k0, v0, ...], meta]``,
  ``["list", [...]]``, ``["tuple", [...]]``, ``["tensor", index]``,
  ``["int", "<hex>"]`` (an int outside the msgpack range, e.g. ``"-1f"``),
  ``["complex", real, imag]``, ``["dtype", "float32"]``, ``["device", "cuda:0"]``,
  ``["size", [d0, d1, ...]]``; since v3 also ``["counter", [k0, v0, ...]]``,
  ``["defaultdict", [k0, v0, ...], factory]``, ``["set", [...]]``, ``["frozenset", [...]]``
  and the composite nodes of :mod:`aptckpt._composite` (sparse, quantized and expanded
  tensors, numpy arrays and scalars, large bytes and str stored as data).

Because containers are always tagged arrays, a user's list can never be mistaken
for a node. Dict keys are nodes too, so int keys (optimizer state) stay ints.

Aliasing: the same tensor reached twice -- the same object, or two views with
identical storage pointer, dtype, shape and strides, as ``state_dict()`` returns
for tied weights -- becomes one entry of the tensor list, so it is stored once
and loads as one tensor under both keys. Partially overlapping views are stored
as independent copies.

Refused (``UnsupportedObjectError`` naming the key path): any other type, which
would need pickle to restore -- dataclasses, modules, namedtuples, ``defaultdict`` with a
factory that is not a builtin type --, tensor subclasses other than ``nn.Parameter``,
named / meta tensors, unsupported dtypes, reference cycles and nesting deeper than
``MAX_NESTING``. Subclasses of int, float, str and bytes other than numpy's (``IntEnum``,
``StrEnum``) are stored as the base type's value: their class could only be restored by
importing it by name, which is what pickle does.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from aptckpt import _composite, _dtypes
from aptckpt._composite import COMPOSITE_TAGS
from aptckpt._config import MAX_INLINE_BYTES, MAX_NESTING
from aptckpt.errors import FormatError, UnsupportedObjectError

__all__ = [
    "DICT_TAGS",
    "FlatState",
    "PerRank",
    "TensorLeaf",
    "child_path",
    "encode_plain",
    "find_plain",
    "flatten",
    "host_parts",
    "key_paths",
    "per_rank",
    "rank_count",
    "rebuild",
    "referenced",
    "select_rank",
    "skeleton_version",
    "tensor_index",
    "torch_form",
    "walk",
]

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_MAX_BIG_INT_BITS = 1 << 20
_SUPPORTED_HINT = (
    "supported: dict, OrderedDict, Counter, defaultdict (of a builtin factory), list, tuple, "
    "set, frozenset, None, bool, int, float, complex, str, bytes, torch.dtype, torch.device, "
    "torch.Size, numpy arrays and scalars, and tensors / nn.Parameter (dense, sparse, "
    "quantized)"
)
#: defaultdict factories stored by name: builtin types, restored without importing anything.
_FACTORIES: dict[str, Any] = {
    f.__name__: f
    for f in (
        list,
        dict,
        set,
        frozenset,
        tuple,
        int,
        float,
        complex,
        str,
        bytes,
        bool,
        collections.Counter,
        collections.OrderedDict,
    )
}
#: dtypes a ``["dtype", name]`` value may name: every tensor dtype, and the quantized ones
#: (a quantized module's state dict records its dtype as a value).
_VALUE_DTYPES: dict[str, torch.dtype] = {
    **_dtypes.DTYPES,
    **{
        name: getattr(torch, name)
        for name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
        if isinstance(getattr(torch, name, None), torch.dtype)
    },
}
_VALUE_DTYPE_NAMES = {dtype: name for name, dtype in _VALUE_DTYPES.items()}
_DICT_TAGS = ("dict", "odict", "counter", "defaultdict")
#: The tags of dict-like container nodes (their items alternate keys and values).
DICT_TAGS = _DICT_TAGS
_SET_TAGS = ("set", "frozenset")


@dataclass(frozen=True)
class TensorLeaf:
    """One distinct tensor of a state, in first-seen order.

    Attributes:
        tensor: the tensor as found in the state (any device, any strides).
        key_path: where it was first found, e.g. ``state['model']['w']``.
        is_parameter: it is an ``nn.Parameter``.
        refresh: for a tensor aptckpt made from the caller's object (a numpy array copied to
            C order, a quantized tensor's integer representation), makes it again from that
            object as it is now: a blocking save checks that nothing changed meanwhile.
    """

    tensor: torch.Tensor
    key_path: str
    is_parameter: bool
    refresh: Callable[[], torch.Tensor] | None = None

    def __init__(
        self,
        tensor: torch.Tensor,
        key_path: str,
        is_parameter: bool,
        refresh: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        # What the generated __init__ does, without its four object.__setattr__ calls (a
        # state of ten thousand tensors makes ten thousand leaves); the fields stay frozen.
        fields = self.__dict__
        fields["tensor"] = tensor
        fields["key_path"] = key_path
        fields["is_parameter"] = is_parameter
        fields["refresh"] = refresh


class PerRank:
    """A value of which each rank of a process group keeps its own: its RNG states, its
    position in the data. A collective save (``process_group=``) stores every rank's value
    and a load gives each rank its own; plain values that differ between ranks are kept per
    rank anyway, but *tensors* that differ between ranks are refused as diverged replicas
    unless wrapped in it. A save without a process group stores the value as it is."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


def per_rank(value: Any) -> PerRank:
    """Mark ``value`` as one each rank keeps its own of; see :class:`PerRank`."""
    return PerRank(value)


#: Called by :func:`flatten` for a tensor subclass (a DTensor): the local tensor to store
#: and what the caller records about its place in the whole (None: not one it knows).
Sharding = Callable[[torch.Tensor, str], "tuple[torch.Tensor, Any] | None"]


@dataclass(frozen=True)
class FlatState:
    """A flattened state: msgpack-ready skeleton plus its distinct tensors.

    ``owned``: the tensors are copies aptckpt made (the snapshot of a background save, a
    state being converted), which no other thread writes; otherwise they are the caller's,
    and a blocking save checks that they did not change while it read them.
    """

    skeleton: Any
    tensors: tuple[TensorLeaf, ...]
    owned: bool = False
    #: The lowest format version whose readers read this skeleton: 3 if it uses a node
    #: that version 3 added, else 2.
    format_version: int = 2
    #: Flattened for a collective save: leaf index -> what the ``sharding`` hook said of the
    #: tensor it stands for (a DTensor's local shard)...
    layouts: Mapping[int, Any] = field(default_factory=dict)
    #: ...and the leaves inside :class:`PerRank` values.
    ranked: frozenset[int] = frozenset()


def child_path(path: str, key: Any) -> str:
    """The key path of ``key`` inside ``path``: ``state['model']['w']``, ``state[0]``."""
    return f"{path}[{key!r}]"


def _alias_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two tensor objects one tensor of the state: the same memory read the same
    way. The conjugate and negative bits are part of the reading: ``x.conj()`` shares ``x``'s
    memory and strides but holds other values."""
    if t.numel() == 0:  # empty tensors may share a null data pointer without aliasing
        return None
    return (
        type(t),
        t.device,
        t.dtype,
        t.data_ptr(),
        t.shape,  # a torch.Size: a tuple, hashed and compared as one
        t.stride(),
        t.requires_grad,
        t.is_conj(),
        t.is_neg(),
    )


def _refuse(obj: object, path: str, why: str) -> UnsupportedObjectError:
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    return UnsupportedObjectError(
        f"cannot store {name} at {path}: {why}", key_path=path, type_name=name
    )


#: Named tensors exist in older torch releases only (``Tensor.names`` is gone in 2.13).
_HAS_NAMES = hasattr(torch.Tensor, "names")
_TENSOR = torch.Tensor
_SUPPORTED = frozenset(_dtypes.DTYPES.values())
_PARAMETER = torch.nn.Parameter
_STRIDED = torch.strided


def _check_tensor(t: torch.Tensor, path: str) -> None:
    if type(t) is not _TENSOR and type(t) is not _PARAMETER:
        raise _refuse(
            t,
            path,
            "tensor subclasses other than nn.Parameter need pickle; "
            "convert it to a plain tensor (e.g. torch.Tensor(x) or x.full_tensor())",
        )
    if not _dtypes.is_supported(t.dtype):
        raise _refuse(
            t,
            path,
            f"dtype {t.dtype} is not supported (a placeholder dtype with no stable storage "
            "format); cast it first",
        )
    if t.is_meta:  # (not t.device.type: building a device object costs a microsecond)
        raise _refuse(t, path, "a meta tensor holds no data; materialise it first")
    if _HAS_NAMES and any(n is not None for n in getattr(t, "names", ())):
        raise _refuse(t, path, "named tensors are not supported; call .rename(None) first")


def _is_plain_scalar(value: Any) -> bool:
    """True for a value :meth:`_Flattener.node` would return unchanged (an exact str, float,
    bool, None or small int): the fast path for long lists of losses and metrics, which
    skips building a key path per element."""
    kind = type(value)
    return (
        kind is float
        or (kind is str and len(value) < MAX_INLINE_BYTES // 4 and value.isascii())
        or value is None
        or kind is bool
        or (kind is int and _INT_MIN <= value <= _INT_MAX)
    )


def _check_text(text: str, path: str) -> None:
    """Refuse a str that has no UTF-8 form (a lone surrogate, from a bad decode): msgpack,
    and so every manifest, stores text as UTF-8."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _refuse(
            text,
            path,
            f"the string holds {text[err.start : err.end]!r} at position {err.start}, a lone "
            "surrogate with no UTF-8 form; store it as bytes (s.encode('utf-8', "
            "'surrogatepass')) or fix the decode that produced it",
        ) from err


class _Flattener:
    def __init__(self, *, inline: bool = False, sharding: Sharding | None = None) -> None:
        #: Keep large bytes and str in the skeleton (user metadata: no tensors there).
        self.inline = inline
        self.sharding = sharding
        self.layouts: dict[int, Any] = {}
        self.ranked: set[int] = set()
        self._in_ranked = 0
        self.leaves: list[TensorLeaf] = []
        # per side (outside / inside a PerRank value): id of a tensor object -> its leaf, and
        # data pointer -> the leaves whose data starts there (the candidates for an alias)
        self._by_id: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self._by_ptr: tuple[dict[int, list[int]], dict[int, list[int]]] = ({}, {})
        self._active: set[int] = set()  # containers on the current path, for cycle detection
        self._keepalive: list[Any] = []  # ids must stay unique while we walk
        self._composites: dict[int, list[Any]] = {}  # id -> node of a composite value
        self._in_key = 0  # > 0 while a dict key or set member is flattened
        self.format_version = 2  # raised to 3 by any node that version added

    def tensor(self, t: torch.Tensor, path: str) -> list[Any]:
        kind = type(t)
        if kind is not _TENSOR and kind is not _PARAMETER:
            if self.sharding is not None:
                found = self.sharding(t, path)
                if found is not None:
                    local, layout = found
                    node = self.plain_tensor(local, path)
                    self.layouts.setdefault(node[1], layout)
                    return node
            return self.plain_tensor(t, path)  # refuses the subclass, naming the path
        # This runs once per tensor of a state (ten thousand in a large optimizer state): the
        # cheap attribute tests come first, and the stride walk only for a zero stride.
        if (
            t.layout != _STRIDED
            or t.is_quantized
            or (
                kind is _TENSOR
                and not t.requires_grad
                and not t.is_meta
                and 0 in t.stride()
                and _composite.is_expanded(t)
            )
        ):
            return self.composite(t, lambda: _composite.encode_tensor(t, path, self.plain_tensor))
        return self.plain_tensor(t, path)

    def composite(self, obj: Any, encode: Any) -> list[Any]:
        """The node of a composite value, made once per object: the same sparse tensor or
        array reached twice stores its parts once."""
        node = self._composites.get(id(obj))
        if node is None:
            node = self._composites[id(obj)] = encode()
            self._keepalive.append(obj)
        self.format_version = 3
        return node

    def plain_tensor(
        self, t: torch.Tensor, path: str, refresh: Callable[[], torch.Tensor] | None = None
    ) -> list[Any]:
        """The ``["tensor", i]`` node of a dense strided tensor, aliases merged."""
        if self._in_key:
            raise _refuse(t, path, "dict keys and set members must be plain values")
        if (
            (type(t) is not _TENSOR and type(t) is not _PARAMETER)
            or t.dtype not in _SUPPORTED
            or t.is_meta
            or _HAS_NAMES
        ):
            _check_tensor(t, path)  # refuses t, or looks at its names (torch < 2.13)
        # Inside a PerRank value tensors are the rank's own: never one with a tensor outside
        # it (that one is shared by the ranks and stored once), even if it is the same.
        side = self._in_ranked > 0
        by_id = self._by_id[side]
        index = by_id.get(id(t))
        if index is None:
            # Only a tensor whose data starts where an earlier one's does can alias it: the
            # full key (nine attribute reads) is built only then, not once per tensor.
            # Empty tensors may share a null data pointer without aliasing.
            ptr = t.data_ptr() if t.numel() else None
            same_start = None if ptr is None else self._by_ptr[side].get(ptr)
            if same_start is not None:
                alias = _alias_key(t)
                index = next(
                    (i for i in same_start if _alias_key(self.leaves[i].tensor) == alias), None
                )
            if index is None:
                index = len(self.leaves)
                if self._in_ranked:
                    self.ranked.add(index)
                # _check_tensor admitted only Tensor and Parameter: no isinstance needed
                self.leaves.append(TensorLeaf(t, path, type(t) is _PARAMETER, refresh))
                if same_start is not None:
                    same_start.append(index)
                elif ptr is not None:
                    self._by_ptr[side][ptr] = [index]
            by_id[id(t)] = index
            self._keepalive.append(t)
        return ["tensor", index]

    def node(self, obj: Any, path: str, depth: int, *, inline: bool = False) -> Any:
        if obj is None or isinstance(obj, bool):
            return obj
        if type(obj) is PerRank:
            if self.sharding is None:  # one process: the value is the state's own
                return self.node(obj.value, path, depth, inline=inline)
            if self._in_ranked:
                raise _refuse(obj, path, "PerRank values cannot nest")
            self._in_ranked += 1
            try:
                return ["ranks", [self.node(obj.value, path, depth, inline=inline)]]
            finally:
                self._in_ranked -= 1
        if isinstance(obj, np.generic):  # before int/float/str: np.float64 is a float
            self.format_version = 3
            return _composite.numpy_scalar_node(obj, path)
        if isinstance(obj, (str, bytes)):
            if isinstance(obj, str):
                _check_text(obj, path)
            keep_inline = inline or self.inline or self._in_key > 0  # keys hold no tensors
            large = (
                None if keep_inline else _composite.large_plain_node(obj, path, self.plain_tensor)
            )
            if large is not None:
                self.format_version = 3
                return large
            # a subclass (StrEnum) is stored as its value
            return str(obj) if isinstance(obj, str) else bytes(obj)
        if isinstance(obj, int):
            value = int(obj)
            if _INT_MIN <= value <= _INT_MAX:
                return value
            if value.bit_length() > _MAX_BIG_INT_BITS:
                raise _refuse(obj, path, f"ints above {_MAX_BIG_INT_BITS} bits are not supported")
            return ["int", format(value, "x")]  # hex: str(int) is capped at 4300 digits
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, complex):
            return ["complex", obj.real, obj.imag]
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        if isinstance(obj, torch.dtype):
            name = _VALUE_DTYPE_NAMES.get(obj)
            if name is None:
                raise _refuse(obj, path, f"dtype {obj} has no stable name")
            if name not in _dtypes.DTYPES:  # a quantized dtype: named since version 3
                self.format_version = 3
            return ["dtype", name]
        if isinstance(obj, torch.device):
            return ["device", str(obj)]
        if isinstance(obj, torch.Size):
            return ["size", [int(d) for d in obj]]
        if type(obj) in _CONTAINERS:
            return self.container(obj, path, depth)
        if type(obj) is np.ndarray:
            return self.composite(
                obj, lambda: _composite.ndarray_node(obj, path, self.plain_tensor)
            )
        if isinstance(obj, np.ndarray):  # a masked array would lose its mask, a matrix its type
            raise _refuse(
                obj,
                path,
                "numpy array subclasses (masked arrays, matrices) would lose what makes them "
                "one; store np.asarray(x) (and a masked array's x.mask) instead",
            )
        if isinstance(obj, (dict, list, tuple, set, frozenset)):
            hint = (
                "convert it with x._asdict() or tuple(x)"
                if isinstance(obj, tuple)
                else "convert it to a dict, list, tuple or set"
            )
            raise _refuse(
                obj,
                path,
                f"container subclasses (namedtuple, dataclass-like dicts, ...) need pickle; {hint}",
            )
        raise _refuse(obj, path, _SUPPORTED_HINT)

    def container(self, obj: Any, path: str, depth: int) -> list[Any]:
        if depth >= MAX_NESTING:
            raise _refuse(obj, path, f"nesting deeper than {MAX_NESTING} levels")
        if id(obj) in self._active:
            raise _refuse(obj, path, "the state contains a reference cycle")
        self._active.add(id(obj))
        try:
            if isinstance(obj, dict):
                items: list[Any] = []
                for key, value in obj.items():
                    items.append(
                        key
                        if type(key) is str and key.isascii()
                        else self.key(key, path, depth + 1)
                    )
                    kind = type(value)
                    if (kind is _TENSOR or kind is _PARAMETER) and not self._in_key:
                        # a state dict's values: straight to tensor(), past node()'s tests
                        items.append(self.tensor(value, f"{path}[{key!r}]"))
                    else:
                        items.append(
                            value
                            if _is_plain_scalar(value)
                            else self.node(value, child_path(path, key), depth + 1)
                        )
                kind = type(obj)
                if kind is dict:
                    return ["dict", items]
                if kind is not collections.OrderedDict:
                    self.format_version = 3
                if kind is collections.Counter:
                    return ["counter", items]
                if kind is collections.defaultdict:
                    return [
                        "defaultdict",
                        items,
                        self.factory(getattr(obj, "default_factory", None), obj, path),
                    ]
                meta = getattr(obj, "_metadata", None)
                meta_node = (
                    None if meta is None else self.node(meta, path + "._metadata", depth + 1)
                )
                return ["odict", items, meta_node]
            if isinstance(obj, (set, frozenset)):
                self.format_version = 3
                members = [self.key(v, path, depth + 1, what="a set member") for v in obj]
                # Sets have no order: sorted by encoding, so that equal sets store the same bytes.
                members.sort(key=lambda n: msgpack.packb(n, use_bin_type=True))
                return ["set" if type(obj) is set else "frozenset", members]
            tag = "list" if type(obj) is list else "tuple"
            return [
                tag,
                [
                    v if _is_plain_scalar(v) else self.node(v, child_path(path, i), depth + 1)
                    for i, v in enumerate(obj)
                ],
            ]
        finally:
            self._active.discard(id(obj))

    def key(self, key: Any, path: str, depth: int, *, what: str = "a dict key") -> Any:
        """The node of a dict key or set member: a plain value (tuples of them included),
        never a tensor -- its index would depend on hash order, and so would the bytes."""
        if isinstance(key, (torch.Tensor, np.ndarray, dict, list, set)):
            raise _refuse(key, f"{path} ({what})", f"{what} must be a plain value")
        self._in_key += 1
        try:
            return self.node(key, f"{path} ({what} {key!r})", depth, inline=True)
        finally:
            self._in_key -= 1

    @staticmethod
    def factory(factory: Any, obj: Any, path: str) -> str | None:
        """The name a defaultdict's factory is stored by (None: no factory)."""
        if factory is None:
            return None
        name = getattr(factory, "__name__", None)
        if name is None or _FACTORIES.get(name) is not factory:
            raise _refuse(
                obj,
                path,
                f"its default_factory {factory!r} is not a builtin type and would need pickle; "
                f"use one of {', '.join(sorted(_FACTORIES))}, or store dict(x)",
            )
        return str(name)


_CONTAINERS = frozenset(
    {
        dict,
        collections.OrderedDict,
        collections.Counter,
        collections.defaultdict,
        list,
        tuple,
        set,
        frozenset,
    }
)


def flatten(state: Any, *, root: str = "state", sharding: Sharding | None = None) -> FlatState:
    """Flatten ``state`` into a skeleton and its distinct tensors.

    ``sharding`` (a collective save) stores tensor subclasses it recognises (DTensors) as
    their local tensors, and :class:`PerRank` values as ``["ranks", [node]]`` (this rank's
    node; the save's coordinator merges the ranks' nodes into one).

    Raises:
        UnsupportedObjectError: an object that cannot be stored without pickle,
            with its key path in the message.
    """
    # A collective save keeps large bytes and str in the skeleton: ranks may hold different
    # ones (a sampler's state), which the merge keeps per rank -- as data they would be
    # replicas, refused when they differ.
    flattener = _Flattener(sharding=sharding, inline=sharding is not None)
    skeleton = flattener.node(state, root, 0)
    return FlatState(
        skeleton,
        tuple(flattener.leaves),
        format_version=flattener.format_version,
        layouts=flattener.layouts,
        ranked=frozenset(flattener.ranked),
    )


def select_rank(skeleton: Any, rank: int) -> tuple[Any, bool]:
    """``skeleton`` with every ``["ranks", [node, ...]]`` (format 4: a value each rank of a
    process group kept its own of) replaced by the node of ``rank``, or of rank 0 when the
    save had no such rank; and whether that happened anywhere."""
    fell_back = False

    def select(node: Any, depth: int) -> Any:
        nonlocal fell_back
        if not isinstance(node, list) or len(node) < 2 or not isinstance(node[0], str):
            return node
        if depth > MAX_NESTING + 1:
            raise _bad(f"containers nested deeper than {MAX_NESTING} levels")
        tag, items = node[0], node[1]
        if tag == "ranks":
            if not isinstance(items, list) or not items:
                raise _bad("a ranks node needs a non-empty list of nodes")
            if rank >= len(items):
                fell_back = True
            return select(items[rank] if rank < len(items) else items[0], depth)
        if not isinstance(items, list) or tag in COMPOSITE_TAGS:
            return node
        rest = node[2:]
        if tag == "odict" and rest:
            rest = [select(rest[0], depth + 1), *rest[1:]]
        return [tag, [select(child, depth + 1) for child in items], *rest]

    return select(skeleton, 0), fell_back


def encode_plain(value: Any, *, root: str = "metadata") -> tuple[Any, int]:
    """Encode a tensor-free value (user metadata) as a skeleton -- plain values only, large
    bytes and str included (they stay in the manifest) -- and the lowest format version
    that reads it."""
    flattener = _Flattener(inline=True)
    skeleton = flattener.node(value, root, 0)
    if flattener.leaves:
        leaf = flattener.leaves[0]
        raise UnsupportedObjectError(
            f"{leaf.key_path} holds a tensor or array ({type(leaf.tensor).__name__}); metadata "
            "holds plain values only -- put tensors in the state",
            key_path=leaf.key_path,
            type_name=type(leaf.tensor).__name__,
        )
    return skeleton, flattener.format_version


#: Skeleton tags that format version 3 added.
V3_TAGS = frozenset({"counter", "defaultdict", "set", "frozenset", "numpy", *COMPOSITE_TAGS})


def skeleton_version(skeleton: Any) -> int:
    """The lowest format version that reads ``skeleton`` (a skeleton read back from a
    manifest, which records no such thing): 3 if it uses a node version 3 added, 4 if it
    holds per-rank values."""
    stack = [skeleton]
    version = 2
    while stack:
        node = stack.pop()
        if not isinstance(node, list) or not node or not isinstance(node[0], str):
            continue
        tag = node[0]
        if tag == "ranks":
            return 4
        if tag in V3_TAGS or (tag == "dtype" and len(node) == 2 and node[1] not in _dtypes.DTYPES):
            version = 3
        if tag in ("list", "tuple", "dict", "odict", "ranks") and len(node) > 1:
            if isinstance(node[1], list):
                stack.extend(node[1])
            if tag == "odict" and len(node) > 2:
                stack.append(node[2])  # its _metadata
    return version


# ---------------------------------------------------------------- rebuilding


def _bad(message: str) -> FormatError:
    return FormatError(f"malformed state skeleton: {message}")


class _Make:
    """A container whose children are being built: assembled once they all are.

    ``count`` children are on the stack (an OrderedDict's ``_metadata`` node last, when
    ``meta_child``); ``extra`` is the node's plain parameter (a defaultdict's factory, a
    composite's meta)."""

    __slots__ = ("count", "extra", "meta_child", "tag")

    def __init__(self, tag: str, count: int, meta_child: bool, extra: Any) -> None:
        self.tag, self.count, self.meta_child, self.extra = tag, count, meta_child, extra


class _Builder:
    """Rebuilds a skeleton without recursion: a manifest may nest as deep as msgpack
    lets it (about 500 containers), far below what the Python stack would survive in
    every caller, so containers are assembled from an explicit stack."""

    def __init__(self, tensors: Sequence[Any]) -> None:
        self.tensors = tensors
        self.used = [False] * len(tensors)
        # A composite reached twice (a sparse or expanded tensor under two keys) is one node
        # built from the same parts: it comes back as one object, as a tensor does.
        self.composites: dict[tuple[Any, ...], Any] = {}

    def build(self, root: Any) -> Any:
        todo: list[tuple[Any, int] | _Make] = [(root, 0)]
        done: list[Any] = []
        while todo:
            task = todo.pop()
            if isinstance(task, _Make):
                done.append(self.assemble(task, done, self.composites))
                continue
            node, depth = task
            if node is None or isinstance(node, (bool, int, float, str, bytes)):
                done.append(node)
                continue
            if not isinstance(node, list) or not node or not isinstance(node[0], str):
                raise _bad(f"unexpected node {type(node).__name__}")
            if node[0] == "tensor" and len(node) == 2 and type(node[1]) is int:
                index = node[1]  # the most common node, inline: leaf() says the same
                if 0 <= index < len(self.tensors):
                    self.used[index] = True
                    done.append(self.tensors[index])
                    continue
            make = _container(node)
            if make is None:
                done.append(self.leaf(node[0], node))
                continue
            children = node[1]
            if make.meta_child:
                children = [*children, node[2]]
            if depth >= MAX_NESTING:  # flatten() never nests containers deeper
                raise _bad(f"containers nested deeper than {MAX_NESTING} levels")
            todo.append(make)
            todo.extend((child, depth + 1) for child in reversed(children))
        return done[0]

    @staticmethod
    def assemble(make: _Make, done: list[Any], composites: dict[tuple[Any, ...], Any]) -> Any:
        start = len(done) - make.count
        values = done[start:]
        del done[start:]
        tag = make.tag
        if tag == "list":
            return values
        if tag == "tuple":
            return tuple(values)
        if tag in COMPOSITE_TAGS:
            key = (tag, *map(id, values), msgpack.packb(make.extra, use_bin_type=True))
            built = composites.get(key)
            if built is None:
                built = composites[key] = _composite.decode(tag, values, make.extra)
            return built
        if tag in _SET_TAGS:
            _check_hashable(values, "set member")
            members = set(values) if tag == "set" else frozenset(values)
            if len(members) != len(values):
                raise _bad(f"{tag} node lists a member twice")
            return members
        meta = values.pop() if make.meta_child else None
        pairs = list(zip(values[0::2], values[1::2], strict=True))
        _check_hashable([key for key, _ in pairs], "dict key")
        if tag == "dict":
            return dict(pairs)
        if tag == "counter":
            return collections.Counter(dict(pairs))
        if tag == "defaultdict":
            factory = None if make.extra is None else _FACTORIES[make.extra]
            return collections.defaultdict(factory, pairs)
        od = collections.OrderedDict(pairs)
        if make.meta_child:
            od._metadata = meta  # type: ignore[attr-defined]
        return od

    def leaf(self, tag: str, node: list[Any]) -> Any:
        arg = node[1] if len(node) == 2 else None
        if tag == "tensor":
            if type(arg) is not int or not 0 <= arg < len(self.tensors):
                raise _bad(f"tensor index {arg!r} out of range (0..{len(self.tensors) - 1})")
            self.used[arg] = True
            return self.tensors[arg]
        if tag == "int" and isinstance(arg, str) and len(arg) <= _MAX_BIG_INT_BITS // 4 + 1:
            try:
                return int(arg, 16)
            except ValueError as err:
                raise _bad(f"bad big int {arg!r}") from err
        if tag == "complex" and len(node) == 3 and all(isinstance(x, float) for x in node[1:]):
            return complex(node[1], node[2])
        if tag == "numpy":
            return _composite.decode_numpy_scalar(node)
        if tag == "dtype":
            dtype = _VALUE_DTYPES.get(arg) if isinstance(arg, str) else None
            if dtype is None:
                raise _bad(f"unknown dtype {arg!r}")
            return dtype
        if tag == "device" and isinstance(arg, str):
            try:
                return torch.device(arg)
            except RuntimeError as err:
                raise _bad(f"bad device {arg!r}") from err
        if tag == "size" and isinstance(arg, list):
            if all(type(d) is int and _INT_MIN <= d < 2**63 for d in arg):
                return torch.Size(arg)
            raise _bad(f"bad torch.Size {arg!r}: sizes are 64-bit signed ints")
        raise _bad(f"unknown or malformed node {tag!r}")


def _container(node: list[Any]) -> _Make | None:
    """How to build a container or composite node (validated), or None for a leaf."""
    tag = node[0]
    items = node[1] if len(node) > 1 else None
    if tag in ("list", "tuple", *_SET_TAGS):
        if len(node) != 2 or not isinstance(items, list):
            raise _bad(f"{tag} node needs one list of items")
        return _Make(tag, len(items), False, None)
    if tag in _DICT_TAGS:
        if not isinstance(items, list) or len(items) % 2:
            raise _bad(f"{tag!r} node needs a flat [key, value, ...] list")
        extra = node[2] if len(node) > 2 else None
        if tag == "odict":
            meta_child = extra is not None
            return _Make(tag, len(items) + meta_child, meta_child, None)
        if (
            tag == "defaultdict"
            and extra is not None
            and (not isinstance(extra, str) or extra not in _FACTORIES)
        ):
            raise _bad(f"defaultdict factory {extra!r} is not one aptckpt stores")
        return _Make(tag, len(items), False, extra)
    if tag in COMPOSITE_TAGS:
        if len(node) != 3 or not isinstance(items, list):
            raise _bad(f"{tag!r} node needs [tag, [tensor nodes], meta]")
        for child in items:
            if not (isinstance(child, list) and len(child) == 2 and child[0] == "tensor"):
                raise _bad(f"{tag!r} node has a part that is not a tensor node: {child!r}")
        return _Make(tag, len(items), False, node[2])
    return None


def _check_hashable(values: list[Any], what: str) -> None:
    for value in values:
        try:
            hash(value)
        except TypeError as err:
            raise _bad(f"unhashable {what} {value!r}") from err


def rebuild(skeleton: Any, tensors: Sequence[Any], *, every: bool = True) -> Any:
    """Rebuild a state from its skeleton; ``["tensor", i]`` becomes ``tensors[i]``.

    Raises:
        FormatError: the skeleton is malformed or references a missing tensor, or
            (with ``every``) leaves a tensor unreferenced.
    """
    builder = _Builder(tensors)
    state = builder.build(skeleton)
    if every and not all(builder.used):
        raise _bad(f"tensor {builder.used.index(False)} is never referenced")
    return state


def walk(skeleton: Any, *, root: str = "state") -> Iterator[tuple[list[Any], str, bool]]:
    """Every tagged node of ``skeleton`` in document order: ``(node, key path, inside)``,
    ``inside`` being true for the tensor parts of a composite node (their paths extend the
    composite's: ``state['emb'].values``). Never raises: malformed nodes are skipped."""
    stack: list[tuple[Any, str, bool]] = [(skeleton, root, False)]
    while stack:
        node, path, inside = stack.pop()
        if not isinstance(node, list) or len(node) < 2 or not isinstance(node[0], str):
            continue
        yield node, path, inside
        tag, arg = node[0], node[1]
        if not isinstance(arg, list):
            continue
        if tag in ("list", "tuple"):
            stack.extend((v, f"{path}[{i}]", False) for i, v in reversed(list(enumerate(arg))))
        elif tag == "ranks":
            stack.extend((v, f"{path}@rank{i}", inside) for i, v in reversed(list(enumerate(arg))))
        elif tag in _DICT_TAGS:
            pairs = [(arg[i], arg[i + 1]) for i in range(0, len(arg) - 1, 2)]
            stack.extend((v, f"{path}[{_key_repr(k)}]", False) for k, v in reversed(pairs))
        elif tag in COMPOSITE_TAGS and len(node) == 3:
            stack.extend(
                (v, path + _composite.component_suffix(tag, node[2], i), True)
                for i, v in reversed(list(enumerate(arg)))
            )


def tensor_index(node: list[Any], count: int) -> int | None:
    """The index of a ``["tensor", i]`` node, if it is one with ``i`` in range."""
    if node[0] == "tensor" and type(node[1]) is int and 0 <= node[1] < count:
        return int(node[1])
    return None


def host_parts(skeleton: Any, count: int) -> frozenset[int]:
    """The tensors that hold host values -- numpy arrays, large bytes and str -- which no
    ``map_location`` moves."""
    found: set[int] = set()
    for node, _, _ in walk(skeleton):
        if node[0] in ("ndarray", "bytes", "str") and isinstance(node[1], list):
            found.update(
                i
                for part in node[1]
                if isinstance(part, list) and part
                for i in (tensor_index(part, count),)
                if i is not None
            )
    return frozenset(found)


def key_paths(skeleton: Any, count: int, *, root: str = "state") -> list[str]:
    """The key path where each of ``count`` tensors first appears in ``skeleton``.

    Never raises: malformed nodes are skipped (the paths name tensors in messages).
    """
    paths = [f"tensor #{i}" for i in range(count)]
    seen = [False] * count
    for node, path, _ in walk(skeleton, root=root):
        index = tensor_index(node, count)
        if index is not None and not seen[index]:
            seen[index] = True
            paths[index] = path
    return paths


def rank_count(skeleton: Any) -> int:
    """How many ranks' views ``skeleton`` has: the longest ``ranks`` node (1 without)."""
    longest = 1
    for node, _, _ in walk(skeleton):
        if node[0] == "ranks" and isinstance(node[1], list):
            longest = max(longest, len(node[1]))
    return longest


def referenced(skeleton: Any, count: int) -> set[int]:
    """The tensors ``skeleton`` references."""
    return {
        index
        for node, _, _ in walk(skeleton)
        for index in (tensor_index(node, count),)
        if index is not None
    }


def find_plain(skeleton: Any, predicate: Any, *, root: str = "state") -> list[str]:
    """Key paths of the inline plain values (and dict keys, set members) of ``skeleton``
    matching ``predicate``.

    Lets a backend refuse values it cannot represent, naming where they are.
    """
    found: list[str] = []
    stack: list[tuple[Any, str]] = [(skeleton, root)]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, list):
            if predicate(node):
                found.append(path)
            continue
        if len(node) < 2 or not isinstance(node[1], list):
            continue
        tag, arg = node[0], node[1]
        if tag in ("list", "tuple"):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(arg))
        elif tag in _SET_TAGS:
            stack.extend((v, f"{path} (member {_key_repr(v)})") for v in arg)
        elif tag in _DICT_TAGS:
            for i in range(0, len(arg) - 1, 2):
                stack.append((arg[i], f"{path} (key {_key_repr(arg[i])})"))
                stack.append((arg[i + 1], f"{path}[{_key_repr(arg[i])}]"))
            if tag == "odict" and len(node) > 2 and node[2] is not None:
                stack.append((node[2], f"{path}._metadata"))
    return sorted(found)


def torch_form(skeleton: Any) -> Any:
    """The skeleton of what the ``torch`` backend puts in its file for ``skeleton``: every
    node ``torch.load(weights_only=True)`` cannot read replaced by one it can
    (:func:`aptckpt._composite.torch_form`); flattening that file's state gives it back."""
    node = _composite.torch_form(skeleton)
    if not isinstance(node, list) or not node or not isinstance(node[0], str):
        return node
    tag = node[0]
    containers = ("list", "tuple", *_SET_TAGS, *_DICT_TAGS, *COMPOSITE_TAGS)
    if tag not in containers or len(node) < 2 or not isinstance(node[1], list):
        return node
    rest = node[2:]
    if tag == "odict" and rest:  # its _metadata is a node too
        rest = [torch_form(rest[0]), *rest[1:]]
    children = [torch_form(child) for child in node[1]]
    if all(a is b for a, b in zip(children, node[1], strict=True)) and all(
        a is b for a, b in zip(rest, node[2:], strict=True)
    ):
        return node  # unchanged: the same object, so callers can tell
    return [tag, children, *rest]


def _key_repr(node: Any) -> str:
    """A dict key in a key path, spelled as :func:`child_path` spells the key itself."""
    if isinstance(node, (str, int, float, bytes)) or node is None:
        return repr(node)
    try:  # a tuple, big int, numpy scalar, ... key: rebuilt (keys never hold tensors)
        return repr(_Builder(()).build(node))
    except Exception:  # a hostile key of any shape: only a message needs its spelling
        return "<key>"
