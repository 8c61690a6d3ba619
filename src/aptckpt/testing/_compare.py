"""Bit-exact comparison of states."""

from __future__ import annotations

import collections
import struct
from typing import Any

import numpy as np
import torch

from aptckpt._dtypes import byte_view
from aptckpt.tree import _alias_key

__all__ = ["assert_state_equal"]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return bytes(byte_view(t.contiguous()))


class _Comparer:
    def __init__(self) -> None:
        self.pairs: dict[int, int] = {}  # id(expected tensor) -> id(actual tensor)
        self.reverse: dict[int, torch.Tensor] = {}  # id(actual tensor) -> first expected
        self.keep: list[Any] = []

    def fail(self, path: str, message: str) -> AssertionError:
        return AssertionError(f"{path}: {message}")

    def compare(self, expected: Any, actual: Any, path: str) -> None:
        if isinstance(expected, torch.Tensor):
            self.tensor(expected, actual, path)
            return
        if type(expected) is not type(actual):
            raise self.fail(path, f"type {type(actual).__name__} != {type(expected).__name__}")
        if isinstance(expected, dict):
            if list(expected.keys()) != list(actual.keys()) or [type(k) for k in expected] != [
                type(k) for k in actual
            ]:
                raise self.fail(path, f"keys {list(actual)!r} != {list(expected)!r}")
            for key in expected:
                self.compare(expected[key], actual[key], f"{path}[{key!r}]")
            meta_e, meta_a = (
                getattr(expected, "_metadata", None),
                getattr(actual, "_metadata", None),
            )
            self.compare(meta_e, meta_a, f"{path}._metadata")
            if isinstance(expected, collections.defaultdict):
                factory = actual.default_factory
                if factory is not expected.default_factory:
                    raise self.fail(path, f"default_factory {factory!r} differs")
        elif isinstance(expected, np.ndarray):
            if (actual.dtype, actual.shape) != (expected.dtype, expected.shape):
                raise self.fail(
                    path,
                    f"array {actual.dtype} {actual.shape} != {expected.dtype} {expected.shape}",
                )
            if actual.tobytes() != expected.tobytes():
                raise self.fail(path, "array bytes differ")
        elif isinstance(expected, np.generic):
            if actual.dtype != expected.dtype or actual.tobytes() != expected.tobytes():
                raise self.fail(path, f"numpy scalar {actual!r} != {expected!r} (bitwise)")
        elif isinstance(expected, (list, tuple)):
            if len(expected) != len(actual):
                raise self.fail(path, f"length {len(actual)} != {len(expected)}")
            for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
                self.compare(e, a, f"{path}[{i}]")
        elif isinstance(expected, float):
            if struct.pack("<d", expected) != struct.pack("<d", actual):
                raise self.fail(path, f"float {actual!r} != {expected!r} (bitwise)")
        elif isinstance(expected, complex):
            self.compare(expected.real, actual.real, f"{path}.real")
            self.compare(expected.imag, actual.imag, f"{path}.imag")
        elif expected != actual:
            raise self.fail(path, f"{actual!r} != {expected!r}")

    def tensor(self, expected: torch.Tensor, actual: Any, path: str) -> None:
        if type(actual) is not type(expected):
            raise self.fail(path, f"type {type(actual).__name__} != {type(expected).__name__}")
        if expected.layout != torch.strided or expected.is_quantized:
            self.composite(expected, actual, path)
            return
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            raise self.fail(
                path,
                f"{actual.dtype} {tuple(actual.shape)} != {expected.dtype} {tuple(expected.shape)}",
            )
        if actual.requires_grad != expected.requires_grad:
            raise self.fail(
                path, f"requires_grad {actual.requires_grad} != {expected.requires_grad}"
            )
        if _tensor_bytes(actual) != _tensor_bytes(expected):
            raise self.fail(path, "tensor bytes differ")
        # Aliasing: one expected tensor must always map to one actual tensor, and back.
        # Aliasing: one expected tensor must always map to one actual tensor; one
        # actual tensor may stand for several expected ones only if they alias.
        e_id, a_id = id(expected), id(actual)
        first = self.reverse.setdefault(a_id, expected)
        same_memory = first is expected or _alias_key(first) == _alias_key(expected) is not None
        if self.pairs.setdefault(e_id, a_id) != a_id or not same_memory:
            raise self.fail(
                path, "aliasing differs (tied tensors came back untied, or the reverse)"
            )
        self.keep += [expected, actual]

    def composite(self, expected: torch.Tensor, actual: torch.Tensor, path: str) -> None:
        """Sparse and quantized tensors: equal layout, scheme and parameters, and equal parts."""
        if (actual.layout, actual.dtype, actual.shape, actual.requires_grad) != (
            expected.layout,
            expected.dtype,
            expected.shape,
            expected.requires_grad,
        ):
            raise self.fail(
                path,
                f"{actual.layout} {actual.dtype} {tuple(actual.shape)} != "
                f"{expected.layout} {expected.dtype} {tuple(expected.shape)}",
            )
        parts: list[tuple[torch.Tensor, ...]]
        if expected.is_quantized:
            scheme = expected.qscheme()
            if actual.qscheme() != scheme:
                raise self.fail(path, f"qscheme {actual.qscheme()} != {scheme}")
            if scheme == torch.per_tensor_affine:
                params = [(e.q_scale(), e.q_zero_point()) for e in (expected, actual)]
                if params[0] != params[1]:
                    raise self.fail(path, f"scale, zero point {params[1]} != {params[0]}")
                parts = [(e.int_repr(),) for e in (expected, actual)]
            else:
                if actual.q_per_channel_axis() != expected.q_per_channel_axis():
                    raise self.fail(path, "per-channel axis differs")
                parts = [
                    (e.int_repr(), e.q_per_channel_scales(), e.q_per_channel_zero_points())
                    for e in (expected, actual)
                ]
        elif expected.layout == torch.sparse_coo:
            if actual.is_coalesced() != expected.is_coalesced():
                raise self.fail(path, "coalesced differs")
            parts = [(e._indices(), e._values()) for e in (expected, actual)]
        elif expected.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = [(e.crow_indices(), e.col_indices(), e.values()) for e in (expected, actual)]
        else:
            parts = [(e.ccol_indices(), e.row_indices(), e.values()) for e in (expected, actual)]
        for i, (e, a) in enumerate(zip(*parts, strict=True)):
            if (e.dtype, e.shape) != (a.dtype, a.shape) or _tensor_bytes(e) != _tensor_bytes(a):
                raise self.fail(path, f"part {i} of the {expected.layout} tensor differs")


def assert_state_equal(expected: Any, actual: Any, *, check_device: bool = True) -> None:
    """Assert that ``actual`` equals ``expected`` bit for bit.

    Checks exact container types (a tuple stays a tuple, an OrderedDict keeps
    its ``_metadata``), key order and key types, floats bitwise (NaN payloads,
    -0.0), tensor type (``nn.Parameter``), dtype, shape, ``requires_grad``,
    bytes, device (unless ``check_device=False``), and that tensors which are
    one object in ``expected`` are one object in ``actual``.

    ``expected`` should hold each shared tensor as one object: two distinct
    objects that merely view the same memory (``state_dict()`` of tied weights)
    come back as one object, which this function accepts only if they are
    equal. Raises ``AssertionError`` naming the first difference's key path.
    """
    comparer = _Comparer()
    comparer.compare(expected, actual, "state")
    if check_device:
        _compare_devices(expected, actual, "state")


def _compare_devices(expected: Any, actual: Any, path: str) -> None:
    if isinstance(expected, torch.Tensor):
        if expected.device != actual.device:
            raise AssertionError(f"{path}: device {actual.device} != {expected.device}")
    elif isinstance(expected, dict):
        for key in expected:
            _compare_devices(expected[key], actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, (set, frozenset)):
        return
    elif isinstance(expected, (list, tuple)):
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _compare_devices(e, a, f"{path}[{i}]")
