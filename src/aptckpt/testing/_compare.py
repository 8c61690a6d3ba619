"""Bit-exact comparison of states."""

from __future__ import annotations

import struct
from typing import Any

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
    elif isinstance(expected, (list, tuple)):
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _compare_devices(e, a, f"{path}[{i}]")
