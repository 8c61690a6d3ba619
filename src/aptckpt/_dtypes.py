"""Tensor dtypes that aptckpt stores, and zero-copy byte views of tensors.

A dtype is recorded by its torch name without the ``torch.`` prefix
(``"bfloat16"``). The supported set is every dtype that ``torch.save`` /
``torch.load(weights_only=True)`` round-trips, so all backends accept the same
states. Quantized and sub-byte placeholder dtypes (``int4``, ``uint3``, ...) are
refused: torch itself cannot serialise them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "NUMPY_VIEWABLE",
    "byte_view",
    "dtype_from_name",
    "dtype_name",
    "is_supported",
]

_NAMES = (
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
)

#: name -> dtype, for every supported dtype this torch build has.
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
_BY_DTYPE = {d: n for n, d in DTYPES.items()}
#: dtype -> its name (what :func:`dtype_name` looks up), for loops that run per tensor.
DTYPE_NAMES: Mapping[torch.dtype, str] = _BY_DTYPE

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("aptckpt stores little-endian bytes and supports little-endian hosts only")


def is_supported(dtype: torch.dtype) -> bool:
    return dtype in _BY_DTYPE


def dtype_name(dtype: torch.dtype) -> str:
    return _BY_DTYPE[dtype]


def dtype_from_name(name: str) -> torch.dtype | None:
    """The dtype called ``name``, or None if it is unknown to this reader."""
    return DTYPES.get(name) if isinstance(name, str) else None


def holds_its_values(tensor: torch.Tensor) -> bool:
    """True if the tensor's memory is exactly its values in C order: contiguous,
    and no lazy conjugate or negative bit (whose stored bytes differ from the values)."""
    return tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()


def byte_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor (any dtype, any device) as a flat uint8 view.

    as_strided, not reshape: a "contiguous" tensor may carry any stride on a
    size-1 dimension, and view(uint8) insists on a unit stride.
    """
    return tensor.detach().as_strided((tensor.numel(),), (1,)).view(torch.uint8)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A flat, writable ``memoryview`` of a contiguous CPU tensor's bytes, without copying.

    ``Tensor.numpy()`` refuses bfloat16, float8 and complex32, so the tensor is
    first reinterpreted as uint8 (a view: same storage).
    """
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("byte_view needs a contiguous CPU tensor")
    if tensor.numel() == 0:
        return memoryview(bytearray())
    if tensor.dtype in NUMPY_VIEWABLE:  # the fast path (a few microseconds per tensor count
        # when a state has ten thousand of them): numpy's own view, recast as bytes
        return tensor.detach().numpy().data.cast("B")
    array: np.ndarray = byte_tensor(tensor).numpy()
    return array.data  # uint8, one dimension: already a flat "B" view


#: dtypes ``Tensor.numpy()`` accepts (not bfloat16, the float8s, complex32, the bit types).
NUMPY_VIEWABLE = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)
