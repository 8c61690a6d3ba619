"""Values stored as tagged nodes whose parts are dense tensors or plain values (format v3).

:mod:`aptckpt.tree` stores dense strided tensors, plain values and the builtin containers
itself; this module adds the values that torch and numpy states hold besides them, each
stored exactly and without pickle:

* sparse tensors (COO, CSR, CSC, BSR, BSC) as their index and value tensors;
* quantized tensors (per-tensor and per-channel affine) as their integer representation
  plus their quantization parameters;
* *expanded* tensors (a dimension of stride 0, ``x.expand(...)``) as the small tensor they
  view, expanded again on load, instead of materialising every repeated element;
* numpy arrays as a tensor of the same bytes, numpy scalars (``np.float64``) as their
  dtype and bytes;
* large ``bytes`` and ``str`` values (:data:`~aptckpt._config.MAX_INLINE_BYTES` and over) as
  a ``uint8`` tensor: data files, chunked, compressed and verified like any tensor, instead
  of an ever larger manifest.

A composite node is ``[tag, [child nodes], meta]`` where the children are ``["tensor", i]``
nodes and ``meta`` a plain msgpack value; numpy scalars are the leaf ``["numpy", dtype,
value]``. :func:`decode` checks everything a hostile manifest could get wrong (index
bounds of sparse tensors included) and raises :class:`~aptckpt.errors.FormatError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from aptckpt import _dtypes
from aptckpt._config import MAX_INLINE_BYTES
from aptckpt.errors import DeviceUnavailableError, FormatError, UnsupportedObjectError

__all__ = [
    "COMPOSITE_TAGS",
    "component_suffix",
    "decode",
    "decode_numpy_scalar",
    "encode_tensor",
    "is_expanded",
    "ndarray_node",
    "numpy_scalar_node",
    "torch_form",
]

#: Tags of composite nodes: ``[tag, [children], meta]``.
COMPOSITE_TAGS = frozenset({"sparse", "quantized", "expand", "ndarray", "bytes", "str"})


class AddTensor(Protocol):
    """Adds a component tensor to the state's tensor list; returns its ``["tensor", i]``
    node. ``refresh`` makes a tensor that is a copy again from the caller's object."""

    def __call__(
        self, t: torch.Tensor, path: str, refresh: Callable[[], torch.Tensor] | None = None
    ) -> list[Any]: ...


_SPARSE_LAYOUTS = {
    torch.sparse_coo: "coo",
    torch.sparse_csr: "csr",
    torch.sparse_csc: "csc",
    torch.sparse_bsr: "bsr",
    torch.sparse_bsc: "bsc",
}
_LAYOUT_BY_NAME = {name: layout for layout, name in _SPARSE_LAYOUTS.items()}
#: The component tensors of each sparse layout, in stored order (their key-path suffixes).
_SPARSE_PARTS = {
    "coo": ("indices", "values"),
    "csr": ("crow_indices", "col_indices", "values"),
    "csc": ("ccol_indices", "row_indices", "values"),
    "bsr": ("crow_indices", "col_indices", "values"),
    "bsc": ("ccol_indices", "row_indices", "values"),
}
_QUANTIZED_PARTS = {
    "per_tensor_affine": ("int_repr",),
    "per_channel_affine": ("int_repr", "scales", "zero_points"),
    "per_channel_affine_float_qparams": ("int_repr", "scales", "zero_points"),
}
#: Quantized dtype -> the dtype of its integer representation.
_QUANTIZED_REPR = {
    torch.qint8: torch.int8,
    torch.quint8: torch.uint8,
    torch.qint32: torch.int32,
}
#: Sub-byte quantized dtypes: stored as their packed storage bytes.
_PACKED = frozenset(
    getattr(torch, name)
    for name in ("quint4x2", "quint2x4")
    if isinstance(getattr(torch, name, None), torch.dtype)
)
_QDTYPE_BY_NAME = {str(q).removeprefix("torch."): q for q in (*_QUANTIZED_REPR, *_PACKED)}
#: The zero points each quantized dtype can hold.
_ZERO_POINTS = {
    torch.qint8: (-128, 127),
    torch.quint8: (0, 255),
    torch.qint32: (-(2**31), 2**31 - 1),
    **{q: (0, 15 if "4" in str(q) else 3) for q in _PACKED},
}

#: numpy scalar and array dtypes stored exactly: every fixed-size numeric dtype that is the
#: same on every platform (``longdouble`` is not: 80-bit on x86, 128-bit elsewhere).
_NUMPY_NUMERIC = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)


def _refuse(obj: object, path: str, why: str) -> UnsupportedObjectError:
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    return UnsupportedObjectError(
        f"cannot store {name} at {path}: {why}", key_path=path, type_name=name
    )


def _bad(message: str) -> FormatError:
    return FormatError(f"malformed state skeleton: {message}")


# ------------------------------------------------------------------ saving


def is_expanded(t: torch.Tensor) -> bool:
    """True for a tensor that repeats elements through a zero stride (``x.expand(...)``)."""
    if t.layout != torch.strided or t.numel() == 0:  # sparse layouts have no strides
        return False
    return any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape, strict=True))


def encode_tensor(t: torch.Tensor, path: str, add: AddTensor) -> list[Any]:
    """The node of a sparse, quantized or expanded tensor; its parts go through ``add``."""
    if t.device.type == "meta":
        raise _refuse(t, path, "a meta tensor holds no data; materialise it first")
    if t.layout != torch.strided:
        return _encode_sparse(t, path, add)
    if t.is_quantized:
        return _encode_quantized(t, path, add)
    # An expanded tensor: the tensor it views, with size 1 along every zero-stride dimension.
    sizes = [1 if stride == 0 else size for stride, size in zip(t.stride(), t.shape, strict=True)]
    compact = t.as_strided(sizes, t.stride(), t.storage_offset())
    return ["expand", [add(compact, path)], list(t.shape)]


def _encode_sparse(t: torch.Tensor, path: str, add: AddTensor) -> list[Any]:
    layout = _SPARSE_LAYOUTS.get(t.layout)
    if layout is None:
        raise _refuse(t, path, f"layout {t.layout} is not supported; call .to_dense() first")
    if layout == "coo":
        parts = [t._indices(), t._values()]  # as stored: an uncoalesced tensor stays so
    elif layout in ("csr", "bsr"):
        parts = [t.crow_indices(), t.col_indices(), t.values()]
    else:
        parts = [t.ccol_indices(), t.row_indices(), t.values()]
    names = _SPARSE_PARTS[layout]
    children = [add(p.detach(), f"{path}.{n}") for p, n in zip(parts, names, strict=True)]
    meta = {
        "layout": layout,
        "shape": list(t.shape),
        "coalesced": bool(t.is_coalesced()) if layout == "coo" else False,
        "requires_grad": bool(t.requires_grad),
        "parameter": type(t) is torch.nn.Parameter,
    }
    return ["sparse", children, meta]


def _encode_quantized(t: torch.Tensor, path: str, add: AddTensor) -> list[Any]:
    scheme = str(t.qscheme()).removeprefix("torch.")
    if scheme not in _QUANTIZED_PARTS:
        raise _refuse(t, path, f"quantization scheme {scheme} is not supported; dequantize it")
    meta: dict[str, Any] = {"qscheme": scheme, "dtype": str(t.dtype).removeprefix("torch.")}
    if t.dtype in _PACKED:
        # A sub-byte dtype (quint4x2, quint2x4: 4-bit embedding tables): several values share
        # a byte, and int_repr() cannot be turned back into one: its storage bytes are stored.
        if not t.is_contiguous() or t.storage_offset():
            raise _refuse(
                t,
                path,
                f"a {t.dtype} tensor is stored only when contiguous and at the start of its "
                "storage; store x.clone() (or x.dequantize())",
            )
        storage = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        children = [add(storage, f"{path}.packed")]
        meta["shape"] = list(t.shape)
    else:
        children = [add(t.int_repr(), f"{path}.int_repr", t.int_repr)]
    if scheme == "per_tensor_affine":
        meta.update(scale=float(t.q_scale()), zero_point=int(t.q_zero_point()))
    else:
        children += [
            add(t.q_per_channel_scales(), f"{path}.scales", t.q_per_channel_scales),
            add(t.q_per_channel_zero_points(), f"{path}.zero_points", t.q_per_channel_zero_points),
        ]
        meta["axis"] = int(t.q_per_channel_axis())
    return ["quantized", children, meta]


def ndarray_node(array: np.ndarray[Any, Any], path: str, add: AddTensor) -> list[Any]:
    """The node of a numpy array: a tensor of its bytes (C order) and its dtype."""
    name = array.dtype.name
    if name not in _NUMPY_NUMERIC:
        raise _refuse(
            array,
            path,
            f"numpy arrays of dtype {array.dtype} are not supported (only fixed-size numeric "
            "and bool dtypes); convert it (e.g. arr.tolist() or arr.astype(np.float64))",
        )
    if not array.dtype.isnative:
        raise _refuse(
            array,
            path,
            "a numpy array in non-native byte order; convert it with "
            "arr.astype(arr.dtype.newbyteorder('='))",
        )

    # A broadcast array (zero strides: np.broadcast_to) is stored as the array it repeats,
    # as an expanded tensor is.
    broadcast = array.size > 0 and any(
        stride == 0 and size > 1 for stride, size in zip(array.strides, array.shape, strict=True)
    )
    source = (
        array[tuple(slice(0, 1) if s == 0 else slice(None) for s in array.strides)]
        if broadcast
        else array
    )

    def as_tensor() -> torch.Tensor:
        compact = np.ascontiguousarray(source).reshape(source.shape)
        with warnings.catch_warnings():  # a read-only array: the tensor is only ever read
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.from_numpy(compact)

    tensor = as_tensor()
    # A C-contiguous array is viewed, not copied: a later check reads the array itself.
    copied = tensor.numel() > 0 and tensor.data_ptr() != source.__array_interface__["data"][0]
    meta: Any = [name, list(array.shape)] if broadcast else name
    return ["ndarray", [add(tensor, path, as_tensor if copied else None)], meta]


def numpy_scalar_node(value: np.generic, path: str) -> list[Any]:
    """The leaf node of a numpy scalar: its dtype name and value (bytes for numbers)."""
    kind, name = value.dtype.kind, value.dtype.name
    if kind == "U":
        text = str(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _refuse(value, path, "the string holds a lone surrogate (no UTF-8 form)") from err
        return ["numpy", "str_", text]
    if kind == "S":
        return ["numpy", "bytes_", value.tobytes()]
    if name not in _NUMPY_NUMERIC:
        raise _refuse(
            value,
            path,
            f"numpy scalars of dtype {value.dtype} are not supported; convert it to a Python "
            "value (x.item()) first",
        )
    return ["numpy", name, value.tobytes()]


def large_plain_node(value: bytes | str, path: str, add: AddTensor) -> list[Any] | None:
    """A ``bytes`` or ``str`` of :data:`MAX_INLINE_BYTES` or more as a ``uint8`` tensor node;
    None for a smaller one (stored inline)."""
    if len(value) < (MAX_INLINE_BYTES if isinstance(value, bytes) else MAX_INLINE_BYTES // 4):
        return None
    data = value if isinstance(value, bytes) else value.encode("utf-8")
    if len(data) < MAX_INLINE_BYTES:
        return None
    with warnings.catch_warnings():  # bytes are read-only: the tensor is only ever read
        warnings.filterwarnings("ignore", "The given buffer is not writable")
        tensor = torch.frombuffer(data, dtype=torch.uint8)
    return ["bytes" if isinstance(value, bytes) else "str", [add(tensor, path)], None]


def component_suffix(tag: str, meta: Any, index: int) -> str:
    """How the key path of a composite's ``index``-th component extends the composite's."""
    if not isinstance(meta, dict):
        return ""
    layout, scheme, dtype = (meta.get(k) for k in ("layout", "qscheme", "dtype"))
    if tag == "sparse" and isinstance(layout, str):
        names = _SPARSE_PARTS.get(layout, ())
    elif tag == "quantized" and isinstance(scheme, str):
        names = _QUANTIZED_PARTS.get(scheme, ())
        if dtype in ("quint4x2", "quint2x4"):
            names = ("packed", *names[1:])
    else:
        return ""
    return f".{names[index]}" if index < len(names) else f".{index}"


# ------------------------------------------------------------------ loading


def decode(tag: str, parts: list[Any], meta: Any) -> Any:
    """The value of a composite node whose children decoded to ``parts``.

    Raises:
        FormatError: the node is malformed (wrong parts, shapes, dtypes or parameters).
    """
    if not all(isinstance(p, torch.Tensor) for p in parts):
        raise _bad(f"{tag!r} node has a child that is not a tensor")
    try:
        if tag in ("sparse", "quantized"):
            # torch warns that compressed sparse layouts are in beta and that quantized
            # tensors are deprecated: the user saved one, so loading it is not news.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return (
                    _decode_sparse(parts, meta)
                    if tag == "sparse"
                    else _decode_quantized(parts, meta)
                )
        if tag == "expand":
            return _decode_expand(parts, meta)
        if tag == "ndarray":
            return _decode_ndarray(parts, meta)
        if tag in ("bytes", "str"):
            return _decode_plain(tag, parts)
    except FormatError:
        raise  # already says what is malformed
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
        devices = {p.device.type for p in parts} - {"cpu"}
        if devices:  # a healthy node that this device cannot hold (sparse or quantized on meta)
            raise DeviceUnavailableError(
                f"a {tag} tensor cannot be made on {', '.join(sorted(devices))} ({err}); "
                "load it with map_location='cpu'"
            ) from err
        raise _bad(f"{tag!r} node cannot be rebuilt: {err}") from err
    raise _bad(f"unknown node {tag!r}")


def _one(parts: list[Any], tag: str) -> torch.Tensor:
    if len(parts) != 1:
        raise _bad(f"{tag!r} node needs exactly one tensor")
    tensor: torch.Tensor = parts[0]
    return tensor


def _shape(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(d) is int and 0 <= d < 2**62 for d in value):
        raise _bad(f"{what} shape {value!r} is not a list of sizes")
    return value


def _decode_sparse(parts: list[Any], meta: Any) -> torch.Tensor:
    if not isinstance(meta, dict) or meta.get("layout") not in _SPARSE_PARTS:
        raise _bad(f"sparse node has no valid layout: {meta!r}")
    layout = str(meta["layout"])
    if len(parts) != len(_SPARSE_PARTS[layout]):
        raise _bad(f"sparse {layout} node needs {len(_SPARSE_PARTS[layout])} tensors")
    shape = _shape(meta.get("shape"), "sparse")
    # check_invariants: indices out of bounds in a hostile manifest would otherwise reach
    # kernels that trust them.
    if layout == "coo":
        indices, values = parts
        result = torch.sparse_coo_tensor(
            indices,
            values,
            shape,
            is_coalesced=meta.get("coalesced") is True,
            check_invariants=True,
        )
    else:
        compressed, plain, values = parts
        result = torch.sparse_compressed_tensor(
            compressed, plain, values, shape, layout=_LAYOUT_BY_NAME[layout], check_invariants=True
        )
    requires_grad = meta.get("requires_grad") is True
    if meta.get("parameter") is True:
        return torch.nn.Parameter(result, requires_grad=requires_grad)
    return result.requires_grad_(requires_grad) if requires_grad else result


def _decode_quantized(parts: list[Any], meta: Any) -> torch.Tensor:
    if not isinstance(meta, dict) or meta.get("qscheme") not in _QUANTIZED_PARTS:
        raise _bad(f"quantized node has no valid scheme: {meta!r}")
    scheme = str(meta["qscheme"])
    qdtype = _QDTYPE_BY_NAME.get(meta.get("dtype"))  # type: ignore[arg-type]
    if qdtype is None:
        raise _bad(f"quantized node has an unknown dtype {meta.get('dtype')!r}")
    packed = qdtype in _PACKED
    if len(parts) != len(_QUANTIZED_PARTS[scheme]):
        raise _bad(f"quantized {scheme} node needs {len(_QUANTIZED_PARTS[scheme])} tensors")
    first = parts[0]
    if first.dtype != (torch.uint8 if packed else _QUANTIZED_REPR[qdtype]):
        raise _bad(f"quantized {meta['dtype']} stored with representation {first.dtype}")
    low, high = _ZERO_POINTS[qdtype]
    if scheme == "per_tensor_affine":
        scale, zero_point = meta.get("scale"), meta.get("zero_point")
        if not (type(scale) is float and math.isfinite(scale) and scale > 0):
            raise _bad(f"quantization scale {scale!r} is not a positive finite float")
        if not (type(zero_point) is int and low <= zero_point <= high):
            raise _bad(f"zero point {zero_point!r} is outside {low}..{high}")
        if not packed:
            result = torch._make_per_tensor_quantized_tensor(first, scale, zero_point)
        else:
            result = torch._empty_affine_quantized(
                _shape(meta.get("shape"), "quantized"),
                scale=scale,
                zero_point=zero_point,
                dtype=qdtype,
            )
    else:
        scales, zero_points = parts[1], parts[2]
        shape = _shape(meta.get("shape"), "quantized") if packed else list(first.shape)
        axis = meta.get("axis")
        if type(axis) is not int or not 0 <= axis < max(1, len(shape)):
            raise _bad(f"per-channel quantization axis {axis!r} is out of range")
        channels = shape[axis] if shape else 0
        if scales.shape != (channels,) or zero_points.shape != (channels,):
            raise _bad("per-channel scales and zero points need one value per channel")
        if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
            raise _bad("per-channel scales must be positive and finite")
        if zero_points.is_floating_point():
            if not bool(torch.isfinite(zero_points).all()):
                raise _bad("per-channel zero points must be finite")
        elif zero_points.numel() and not (
            low <= int(zero_points.min()) and int(zero_points.max()) <= high
        ):
            raise _bad(f"per-channel zero points are outside {low}..{high}")
        if not packed:
            result = torch._make_per_channel_quantized_tensor(first, scales, zero_points, axis)
        else:
            result = torch._empty_per_channel_affine_quantized(
                shape, scales=scales, zero_points=zero_points, axis=axis, dtype=qdtype
            )
    if packed:
        storage = torch.empty(0, dtype=torch.uint8).set_(result.untyped_storage())
        if storage.shape != first.shape:
            raise _bad(
                f"packed {meta['dtype']} storage of {first.numel()} bytes, not {storage.numel()}"
            )
        storage.copy_(first)
    if str(result.qscheme()).removeprefix("torch.") != scheme:
        raise _bad(f"quantized node rebuilds as {result.qscheme()}, recorded {scheme}")
    return result


def _decode_expand(parts: list[Any], meta: Any) -> torch.Tensor:
    base = _one(parts, "expand")
    shape = _shape(meta, "expanded")
    if len(shape) != base.dim() or any(
        b not in (1, s) for b, s in zip(base.shape, shape, strict=True)
    ):
        raise _bad(f"a tensor of shape {tuple(base.shape)} does not expand to {shape}")
    return base.expand(shape)


def _decode_ndarray(parts: list[Any], meta: Any) -> np.ndarray[Any, Any]:
    tensor = _one(parts, "ndarray")
    name, shape = (meta[0], meta[1]) if isinstance(meta, list) and len(meta) == 2 else (meta, None)
    if not isinstance(name, str) or name not in _NUMPY_NUMERIC or _numpy_name(tensor.dtype) != name:
        raise _bad(f"ndarray of dtype {name!r} stored as a {tensor.dtype} tensor")
    array: np.ndarray[Any, Any] = tensor.detach().cpu().numpy()
    if shape is None:
        return array
    shape = _shape(shape, "broadcast array")
    if len(shape) != array.ndim or any(
        a not in (1, s) for a, s in zip(array.shape, shape, strict=True)
    ):
        raise _bad(f"an array of shape {array.shape} does not broadcast to {shape}")
    return np.broadcast_to(array, shape)


def _numpy_name(dtype: torch.dtype) -> str | None:
    try:
        return np.dtype(_dtypes.dtype_name(dtype)).name
    except (TypeError, KeyError):
        return None


def _decode_plain(tag: str, parts: list[Any]) -> bytes | str:
    tensor = _one(parts, tag)
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise _bad(f"{tag!r} node needs a one-dimensional uint8 tensor")
    data = tensor.detach().cpu().numpy().tobytes()
    return data if tag == "bytes" else data.decode("utf-8")


def decode_numpy_scalar(node: list[Any]) -> np.generic:
    """The numpy scalar of a ``["numpy", dtype, value]`` leaf."""
    if len(node) != 3 or not isinstance(node[1], str):
        raise _bad(f"malformed numpy scalar {node!r}")
    name, value = node[1], node[2]
    if name == "str_" and isinstance(value, str):
        return np.str_(value)
    if name == "bytes_" and isinstance(value, bytes):
        return np.bytes_(value)
    if name not in _NUMPY_NUMERIC or not isinstance(value, bytes):
        raise _bad(f"unknown numpy scalar dtype {name!r}")
    dtype = np.dtype(name)
    if len(value) != dtype.itemsize:
        raise _bad(f"numpy {name} scalar of {len(value)} bytes")
    scalar: np.generic = np.frombuffer(value, dtype=dtype)[0]
    return scalar


# ------------------------------------------------------- the torch backend's form


def torch_form(node: Any) -> Any:
    """The node of what ``torch.load(weights_only=True)`` can read in place of a v3 node
    (the ``torch`` backend writes this form, and the manifest keeps the exact one):
    numpy scalars as Python values, arrays and large bytes/str as their tensors, a
    ``defaultdict`` as a dict, a ``frozenset`` as a tuple. Other nodes are returned as they
    are (children included: the caller maps them)."""
    if not isinstance(node, list) or not node or not isinstance(node[0], str):
        return node
    tag = node[0]
    if tag == "numpy" and len(node) == 3:
        return _plain_of_numpy(decode_numpy_scalar(node))
    if tag in ("ndarray", "bytes", "str") and len(node) >= 2 and isinstance(node[1], list):
        return node[1][0] if node[1] else node
    if tag == "defaultdict" and len(node) >= 2:
        return ["dict", node[1]]
    if tag == "frozenset" and len(node) >= 2:
        return ["tuple", node[1]]  # hashable, so it may still be a set member or a key
    if tag == "sparse" and len(node) == 3 and isinstance(node[2], dict):
        meta = node[2]
        if meta.get("requires_grad") is True and meta.get("parameter") is not True:
            # torch.load drops requires_grad of a plain sparse tensor: the file says False
            return ["sparse", node[1], {**meta, "requires_grad": False}]
    return node


def _plain_of_numpy(value: np.generic) -> Any:
    plain = value.item()
    if isinstance(plain, complex):
        return ["complex", plain.real, plain.imag]
    return plain
