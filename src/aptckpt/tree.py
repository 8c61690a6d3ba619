"""Nested state <-> (skeleton, tensor list).

``flatten`` walks a state (any nesting of dict / OrderedDict / list / tuple holding
tensors and plain values) and returns a *skeleton*: a msgpack-ready description
of every container and plain value, with each tensor replaced by an index into a
tensor list. ``rebuild`` inverts it. Backends store the skeleton in the manifest
and only ever see the flat tensor list.

Skeleton encoding (format v1, see docs/format.md):

* ``None``, ``bool``, ``int`` in [-2**63, 2**64), ``float``, ``str`` and ``bytes``
  are stored inline as msgpack values;
* every other node is a msgpack array whose first element is a tag string:
  ``["dict", [k0, v0, k1, v1, ...]]``, ``["odict", [k0, v0, ...], meta]``,
  ``["list", [...]]``, ``["tuple", [...]]``, ``["tensor", index]``,
  ``["int", "<hex>"]`` (an int outside the msgpack range, e.g. ``"-1f"``),
  ``["complex", real, imag]``, ``["dtype", "float32"]``, ``["device", "cuda:0"]``,
  ``["size", [d0, d1, ...]]``.

Because containers are always tagged arrays, a user's list can never be mistaken
for a node. Dict keys are nodes too, so int keys (optimizer state) stay ints.

Aliasing: the same tensor reached twice -- the same object, or two views with
identical storage pointer, dtype, shape and strides, as ``state_dict()`` returns
for tied weights -- becomes one entry of the tensor list, so it is stored once
and loads as one tensor under both keys. Partially overlapping views are stored
as independent copies.

Refused (``UnsupportedObjectError`` naming the key path): any other type, which
would need pickle to restore -- sets, numpy arrays, dataclasses, modules --,
tensor subclasses other than ``nn.Parameter``, sparse / quantized / named / meta
tensors, unsupported dtypes, reference cycles and nesting deeper than
``MAX_NESTING``. Subclasses of int, float and str (``numpy.float64``,
``IntEnum``) are stored as the base type's value.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aptckpt import _dtypes
from aptckpt._config import MAX_NESTING
from aptckpt.errors import FormatError, UnsupportedObjectError

__all__ = [
    "FlatState",
    "TensorLeaf",
    "child_path",
    "encode_plain",
    "find_plain",
    "flatten",
    "key_paths",
    "rebuild",
]

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_MAX_BIG_INT_BITS = 1 << 20
_SUPPORTED_HINT = (
    "supported: dict, OrderedDict, list, tuple, None, bool, int, float, complex, str, bytes, "
    "torch.dtype, torch.device, torch.Size and dense tensors / nn.Parameter"
)


@dataclass(frozen=True)
class TensorLeaf:
    """One distinct tensor of a state, in first-seen order.

    Attributes:
        tensor: the tensor as found in the state (any device, any strides).
        key_path: where it was first found, e.g. ``state['model']['w']``.
        is_parameter: it is an ``nn.Parameter``.
    """

    tensor: torch.Tensor
    key_path: str
    is_parameter: bool


@dataclass(frozen=True)
class FlatState:
    """A flattened state: msgpack-ready skeleton plus its distinct tensors."""

    skeleton: Any
    tensors: tuple[TensorLeaf, ...]


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
        tuple(t.shape),
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


def _check_tensor(t: torch.Tensor, path: str) -> None:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise _refuse(
            t,
            path,
            "tensor subclasses other than nn.Parameter need pickle; "
            "convert it to a plain tensor (e.g. torch.Tensor(x) or x.full_tensor())",
        )
    if t.layout != torch.strided:
        raise _refuse(t, path, f"layout {t.layout} is not supported; call .to_dense() first")
    if t.is_quantized or not _dtypes.is_supported(t.dtype):
        raise _refuse(
            t,
            path,
            f"dtype {t.dtype} is not supported (torch.save cannot store it "
            "either); dequantize or cast it first",
        )
    if t.device.type == "meta":
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
        or kind is str
        or value is None
        or kind is bool
        or (kind is int and _INT_MIN <= value <= _INT_MAX)
    )


class _Flattener:
    def __init__(self) -> None:
        self.leaves: list[TensorLeaf] = []
        self._by_id: dict[int, int] = {}
        self._by_alias: dict[tuple[Any, ...], int] = {}
        self._active: set[int] = set()  # containers on the current path, for cycle detection
        self._keepalive: list[torch.Tensor] = []  # ids must stay unique while we walk

    def tensor(self, t: torch.Tensor, path: str) -> list[Any]:
        _check_tensor(t, path)
        index = self._by_id.get(id(t))
        if index is None:
            alias = _alias_key(t)
            index = self._by_alias.get(alias) if alias is not None else None
            if index is None:
                index = len(self.leaves)
                # _check_tensor admitted only Tensor and Parameter: no isinstance needed
                self.leaves.append(TensorLeaf(t, path, type(t) is torch.nn.Parameter))
                if alias is not None:
                    self._by_alias[alias] = index
            self._by_id[id(t)] = index
            self._keepalive.append(t)
        return ["tensor", index]

    def node(self, obj: Any, path: str, depth: int) -> Any:
        if obj is None or isinstance(obj, bool):
            return obj
        if isinstance(obj, str):
            return str(obj)  # a str subclass (StrEnum) is stored as its value
        if isinstance(obj, bytes):
            return bytes(obj)
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
            if not _dtypes.is_supported(obj):
                raise _refuse(obj, path, f"dtype {obj} has no stable name")
            return ["dtype", _dtypes.dtype_name(obj)]
        if isinstance(obj, torch.device):
            return ["device", str(obj)]
        if isinstance(obj, torch.Size):
            return ["size", [int(d) for d in obj]]
        if type(obj) in (dict, collections.OrderedDict, list, tuple):
            return self.container(obj, path, depth)
        if isinstance(obj, (dict, list, tuple)):
            raise _refuse(
                obj,
                path,
                "container subclasses (namedtuple, defaultdict, ...) need "
                "pickle; convert it to a dict, list or tuple",
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
                    items.append(key if type(key) is str else self.key(key, path))
                    items.append(
                        value
                        if _is_plain_scalar(value)
                        else self.node(value, child_path(path, key), depth + 1)
                    )
                if type(obj) is dict:
                    return ["dict", items]
                meta = getattr(obj, "_metadata", None)
                meta_node = (
                    None if meta is None else self.node(meta, path + "._metadata", depth + 1)
                )
                return ["odict", items, meta_node]
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

    def key(self, key: Any, path: str) -> Any:
        if isinstance(key, (torch.Tensor, dict, list)):
            raise _refuse(key, f"{path} (a dict key)", "dict keys must be plain values")
        return self.node(key, f"{path} (key {key!r})", MAX_NESTING - 1)


def flatten(state: Any, *, root: str = "state") -> FlatState:
    """Flatten ``state`` into a skeleton and its distinct tensors.

    Raises:
        UnsupportedObjectError: an object that cannot be stored without pickle,
            with its key path in the message.
    """
    flattener = _Flattener()
    skeleton = flattener.node(state, root, 0)
    return FlatState(skeleton, tuple(flattener.leaves))


def encode_plain(value: Any, *, root: str = "metadata") -> Any:
    """Encode a tensor-free value (user metadata) as a skeleton."""
    flat = flatten(value, root=root)
    if flat.tensors:
        raise UnsupportedObjectError(
            f"{flat.tensors[0].key_path} is a tensor; metadata holds plain values only",
            key_path=flat.tensors[0].key_path,
            type_name="torch.Tensor",
        )
    return flat.skeleton


# ---------------------------------------------------------------- rebuilding


def _bad(message: str) -> FormatError:
    return FormatError(f"malformed state skeleton: {message}")


class _Make:
    """A container whose children are being built: assembled once they all are."""

    __slots__ = ("count", "meta", "tag")

    def __init__(self, tag: str, count: int, meta: bool) -> None:
        self.tag, self.count, self.meta = tag, count, meta


class _Builder:
    """Rebuilds a skeleton without recursion: a manifest may nest as deep as msgpack
    lets it (about 500 containers), far below what the Python stack would survive in
    every caller, so containers are assembled from an explicit stack."""

    def __init__(self, tensors: Sequence[Any]) -> None:
        self.tensors = tensors
        self.used = [False] * len(tensors)

    def build(self, root: Any) -> Any:
        todo: list[tuple[Any, int] | _Make] = [(root, 0)]
        done: list[Any] = []
        while todo:
            task = todo.pop()
            if isinstance(task, _Make):
                done.append(self.assemble(task, done))
                continue
            node, depth = task
            if node is None or isinstance(node, (bool, int, float, str, bytes)):
                done.append(node)
                continue
            if not isinstance(node, list) or not node or not isinstance(node[0], str):
                raise _bad(f"unexpected node {type(node).__name__}")
            tag = node[0]
            if tag in ("list", "tuple"):
                if len(node) != 2 or not isinstance(node[1], list):
                    raise _bad(f"{tag} node needs one list of items")
                children = node[1]
                meta = False
            elif tag in ("dict", "odict"):
                if len(node) < 2 or not isinstance(node[1], list) or len(node[1]) % 2:
                    raise _bad(f"{tag!r} node needs a flat [key, value, ...] list")
                meta = tag == "odict" and len(node) > 2 and node[2] is not None
                children = [*node[1], node[2]] if meta else node[1]
            else:
                done.append(self.leaf(tag, node))
                continue
            if depth >= MAX_NESTING:  # flatten() never nests containers deeper
                raise _bad(f"containers nested deeper than {MAX_NESTING} levels")
            todo.append(_Make(tag, len(children), meta))
            todo.extend((child, depth + 1) for child in reversed(children))
        return done[0]

    @staticmethod
    def assemble(make: _Make, done: list[Any]) -> Any:
        start = len(done) - make.count
        values = done[start:]
        del done[start:]
        if make.tag == "list":
            return values
        if make.tag == "tuple":
            return tuple(values)
        meta = values.pop() if make.meta else None
        pairs = list(zip(values[0::2], values[1::2], strict=True))
        for key, _ in pairs:
            try:
                hash(key)
            except TypeError as err:
                raise _bad(f"unhashable dict key {key!r}") from err
        if make.tag == "dict":
            return dict(pairs)
        od = collections.OrderedDict(pairs)
        if make.meta:
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
        if tag == "dtype":
            dtype = _dtypes.dtype_from_name(arg) if isinstance(arg, str) else None
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


def rebuild(skeleton: Any, tensors: Sequence[Any]) -> Any:
    """Rebuild a state from its skeleton; ``["tensor", i]`` becomes ``tensors[i]``.

    Raises:
        FormatError: the skeleton is malformed or references a missing tensor, or
            leaves a tensor unreferenced.
    """
    builder = _Builder(tensors)
    state = builder.build(skeleton)
    if not all(builder.used):
        raise _bad(f"tensor {builder.used.index(False)} is never referenced")
    return state


def key_paths(skeleton: Any, count: int, *, root: str = "state") -> list[str]:
    """The key path where each of ``count`` tensors first appears in ``skeleton``.

    Never raises: malformed nodes are skipped (the paths name tensors in messages).
    """
    paths = [f"tensor #{i}" for i in range(count)]
    seen = [False] * count
    stack: list[tuple[Any, str]] = [(skeleton, root)]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, list) or len(node) < 2 or not isinstance(node[0], str):
            continue
        tag, arg = node[0], node[1]
        if tag == "tensor" and type(arg) is int and 0 <= arg < count and not seen[arg]:
            seen[arg] = True
            paths[arg] = path
        elif tag in ("list", "tuple") and isinstance(arg, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(arg))))
        elif tag in ("dict", "odict") and isinstance(arg, list):
            pairs = [(arg[i], arg[i + 1]) for i in range(0, len(arg) - 1, 2)]
            stack.extend((v, f"{path}[{_key_repr(k)}]") for k, v in reversed(pairs))
    return paths


def find_plain(skeleton: Any, predicate: Any, *, root: str = "state") -> list[str]:
    """Key paths of the inline plain values (and dict keys) of ``skeleton`` matching ``predicate``.

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
        elif tag in ("dict", "odict"):
            for i in range(0, len(arg) - 1, 2):
                stack.append((arg[i], f"{path} (key {_key_repr(arg[i])})"))
                stack.append((arg[i + 1], f"{path}[{_key_repr(arg[i])}]"))
    return sorted(found)


def _key_repr(node: Any) -> str:
    if isinstance(node, (str, int, float, bytes)) or node is None:
        return repr(node)
    return "<key>"
