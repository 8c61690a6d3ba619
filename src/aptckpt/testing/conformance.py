"""The conformance suite every backend passes, built-in or plugin.

Usage, in a pytest module of the plugin::

    from aptckpt.testing.conformance import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "mine"
        options = {"level": 3}        # optional backend options

pytest collects the inherited ``test_*`` methods. They need ``hypothesis`` and
pytest's ``tmp_path``; hypothesis settings come from the active profile.

The suite saves under ``tmp_path`` unless :attr:`BackendConformance.root` names a URL
prefix (``memory://suite``; for ``s3://`` set it and
:attr:`BackendConformance.storage_options` from a fixture): every test then runs
against that object store, reading files back through the storage layer.

Without a pytest module, :func:`check_backend` runs the same tests in one call
(``aptckpt.testing.check_backend(MyBackend)``) and raises ``AssertionError``
naming every test that failed.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import re
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aptckpt
from aptckpt import _dtypes, registry
from aptckpt.backends.base import Backend
from aptckpt.errors import BackendError
from aptckpt.storage import is_url, resolve
from aptckpt.testing._compare import assert_state_equal
from aptckpt.testing.strategies import states

__all__ = [
    "BackendConformance",
    "check_backend",
    "special_values_state",
    "storage_views_state",
]


def _bits(dtype: torch.dtype, pattern: bytes, count: int) -> torch.Tensor:
    data = (pattern * count * dtype.itemsize)[: count * dtype.itemsize]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).clone()


def special_values_state() -> dict[str, Any]:
    """Every supported dtype with edge-case bit patterns, layouts and containers."""
    gen = torch.Generator().manual_seed(0)
    per_dtype = {}
    for name, dtype in _dtypes.DTYPES.items():
        random_bytes = torch.randint(
            0, 256, (37 * dtype.itemsize,), dtype=torch.uint8, generator=gen
        )
        per_dtype[name] = {
            "random": random_bytes.view(dtype),
            "ones": _bits(dtype, b"\xff", 5),
            "scalar": random_bytes[: dtype.itemsize].view(dtype).reshape(()),
            "empty": torch.empty(0, 3, dtype=dtype),
        }
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    nan_payload = struct.unpack("<f", b"\x01\x00\xc0\x7f")[0]
    shared = torch.randn(3, 4, generator=gen)
    tied = torch.nn.Parameter(torch.randn(5, 2, generator=gen))
    od: collections.OrderedDict[str, Any] = collections.OrderedDict(w=base.clone())
    od._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    return {
        "dtypes": per_dtype,
        "floats": torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, nan_payload, 1e-45]),
        "layouts": {
            "transposed": base.t(),
            "strided": base[::2, ::3],
            "offset": base[1:, 2:],
            "expanded": torch.ones(1, 6).expand(4, 6),
            "conj": torch.randn(3, dtype=torch.complex64, generator=gen).conj(),
            "neg": torch.randn(3, dtype=torch.complex64, generator=gen).conj().imag,
            "channels_last": torch.randn(2, 3, 4, 5, generator=gen).to(
                memory_format=torch.channels_last
            ),
        },
        "aliasing": {"a": shared, "b": shared, "tied_in": tied, "tied_out": tied},
        "parameters": {
            "trainable": torch.nn.Parameter(torch.randn(4, generator=gen)),
            "frozen": torch.nn.Parameter(torch.randn(4, generator=gen), requires_grad=False),
            "int": torch.nn.Parameter(torch.arange(3), requires_grad=False),
        },
        "requires_grad": torch.randn(3, generator=gen).requires_grad_(),
        "containers": {
            "tuple": (1, (2.5, "x"), [None, b"\x00\xff"]),
            "int_keys": {0: {"step": torch.tensor(3.0)}, 1: {}},
            "mixed_keys": {None: 1, True: 2, 3: 3, "s": 4, 2.5: 5, b"k": 6, (1, "a"): 7},
            "odict": od,
            "empty": [{}, [], ()],
        },
        "plain": {
            "big_int": 2**100,
            "neg_big": -(2**80),
            "u64": 2**64 - 1,
            "nan": float("nan"),
            "neg_zero": -0.0,
            "complex": complex(1.5, -2.0),
            "dtype": torch.bfloat16,
            "device": torch.device("cpu"),
            "size": torch.Size([2, 3]),
            "text": "ünïcødé ✓",
        },
    }


def storage_views_state() -> dict[str, Any]:
    """Tensors over storages that ``torch.save`` mishandles: a storage that is not a whole
    number of the tensor's elements (``torch.load`` refuses the file), two dtypes over one
    storage (``torch.save`` refuses), a bool view of bytes other than 0 and 1."""
    raw = torch.arange(11, dtype=torch.uint8)
    return {
        "five_bytes_as_int16": torch.arange(5, dtype=torch.uint8)[:4].view(torch.int16),
        "int32": raw[:8].view(torch.int32),
        "offset_int16": raw[2:10].view(torch.int16),
        "half_as_float": torch.arange(3, dtype=torch.float16)[:2].view(torch.float32),
        "bytes": raw,
        "bools": torch.tensor([0x5A, 1, 0, 7, 9], dtype=torch.uint8)[1:].view(torch.bool),
        "scalar": raw[4:8].view(torch.float32).reshape(()),
    }


class BackendConformance:
    """Inherit, set ``backend`` (and ``options``), and pytest runs the suite."""

    backend: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    #: False for a backend that must refuse ``b""`` (the ``torch`` backend: its
    #: files must load with ``torch.load(weights_only=True)``, which rejects it).
    stores_empty_bytes: ClassVar[bool] = True
    #: Where checkpoints go: None for pytest's ``tmp_path``, or a URL prefix (each test
    #: saves beneath ``<root>/<tmp_path's name>/``).
    root: str | None = None
    #: Options of the file system of :attr:`root` (credentials, endpoint).
    storage_options: Mapping[str, Any] | None = None

    def where(self, tmp_path: Path, name: str) -> str:
        """The path (or URL) of checkpoint ``name`` of the test whose ``tmp_path`` it is."""
        if self.root is None:
            return str(tmp_path / name)
        return f"{self.root.rstrip('/')}/{tmp_path.name}/{name}"

    def _opts(self, path: str) -> Mapping[str, Any] | None:
        return self.storage_options if is_url(path) else None

    def save(self, state: Any, path: str, **kwargs: Any) -> aptckpt.SaveInfo:
        options = {**self.options, **kwargs}
        info: aptckpt.SaveInfo = aptckpt.save(
            state, path, backend=self.backend, storage_options=self._opts(path), **options
        )
        return info

    def load(self, path: str, **kwargs: Any) -> Any:
        return aptckpt.load(path, storage_options=self._opts(path), **kwargs)

    def names(self, folder: str) -> list[str]:
        """The names in ``folder`` (a path or URL), through the storage layer."""
        storage, where = resolve(folder, self._opts(folder))
        return [entry.name for entry in storage.list(where)]

    def read_bytes(self, path: str) -> bytes:
        storage, where = resolve(path, self._opts(path))
        return storage.read_file(where, limit=1 << 40)

    def roundtrip(self, state: Any, path: str | Path, **kwargs: Any) -> Any:
        self.save(state, str(path), **kwargs)
        return self.load(str(path))

    def test_special_values_roundtrip(self, tmp_path: Path) -> None:
        state = special_values_state()
        assert_state_equal(state, self.roundtrip(state, self.where(tmp_path, "ckpt")))

    def test_load_without_verify(self, tmp_path: Path) -> None:
        state = special_values_state()
        path = self.where(tmp_path, "ckpt")
        self.save(state, path)
        assert_state_equal(state, self.load(path, verify=False))

    def test_tied_state_dict_loads_tied(self, tmp_path: Path) -> None:
        emb = torch.nn.Embedding(10, 4)
        head = torch.nn.Linear(4, 10, bias=False)
        head.weight = emb.weight
        model = torch.nn.ModuleDict({"emb": emb, "head": head})
        loaded = self.roundtrip(model.state_dict(), self.where(tmp_path, "ckpt"))
        assert loaded["emb.weight"] is loaded["head.weight"]
        fresh_emb = torch.nn.Embedding(10, 4)
        fresh = torch.nn.ModuleDict({"emb": fresh_emb, "head": torch.nn.Linear(4, 10, bias=False)})
        fresh.load_state_dict(loaded)
        assert torch.equal(fresh_emb.weight, emb.weight)

    def test_optimizer_state_roundtrip(self, tmp_path: Path) -> None:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}
        loaded = self.roundtrip(state, self.where(tmp_path, "ckpt"))
        assert_state_equal(state, loaded)
        opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt2.load_state_dict(loaded["optimizer"])

    def test_views_of_odd_and_shared_storages_roundtrip(self, tmp_path: Path) -> None:
        state = storage_views_state()
        assert_state_equal(state, self.roundtrip(state, self.where(tmp_path, "ckpt")))

    def test_state_loaded_with_mmap_saves_again(self, tmp_path: Path) -> None:
        # Tensors mapped from one file share one storage whatever their dtypes.
        state = {"f": torch.randn(3), "i": torch.arange(5, dtype=torch.int16), "b": torch.ones(5)}
        aptckpt.save(state, tmp_path / "raw", backend="zstd", codec="none")
        mapped = aptckpt.load(tmp_path / "raw", mmap=True)
        assert_state_equal(state, self.roundtrip(mapped, self.where(tmp_path, "ckpt")))

    def test_metadata_and_inspect(self, tmp_path: Path) -> None:
        state = {"w": torch.ones(3, 2), "n": 4}
        path = self.where(tmp_path, "c")
        self.save(state, path, metadata={"epoch": 3})
        info = aptckpt.inspect(path, storage_options=self._opts(path))
        assert info.backend == self.backend
        assert info.metadata == {"epoch": 3}
        assert [(t.key, t.dtype, t.shape) for t in info.tensors] == [
            ("state['w']", "float32", (3, 2))
        ]
        local = sum(len(self.read_bytes(f"{path}/{f.path}")) for f in info.files)
        assert [f.size for f in info.files] == [
            len(self.read_bytes(f"{path}/{f.path}")) for f in info.files
        ]
        assert info.stored_bytes == local + info.store_bytes
        assert info.path == path
        aptckpt.verify(path, storage_options=self._opts(path))

    def test_unsupported_object_refused_and_nothing_written(self, tmp_path: Path) -> None:
        class Opaque:
            pass

        with pytest.raises(aptckpt.UnsupportedObjectError, match=re.escape("state['a']['b'][1]")):
            self.save({"a": {"b": [1, Opaque()]}}, self.where(tmp_path, "c"))
        assert self.names(self.where(tmp_path, "")) == []

    def test_empty_bytes_stored_or_refused_by_key_path(self, tmp_path: Path) -> None:
        state = {"blobs": [b"x", b""]}
        path = self.where(tmp_path, "c")
        if self.stores_empty_bytes:
            assert_state_equal(state, self.roundtrip(state, path))
        else:
            with pytest.raises(aptckpt.UnsupportedObjectError, match=re.escape("['blobs'][1]")):
                self.save(state, path)
            assert self.names(self.where(tmp_path, "")) == []

    def test_overwrite_is_explicit(self, tmp_path: Path) -> None:
        path = self.where(tmp_path, "c")
        self.save({"v": 1}, path)
        with pytest.raises(aptckpt.CheckpointExistsError, match="overwrite=True"):
            self.save({"v": 2}, path)
        assert self.load(path) == {"v": 1}
        before = self.names(path)
        self.save({"v": 2}, path, overwrite=True)
        assert self.load(path) == {"v": 2}
        # No temp or trash directory is left behind (a shared store may sit beside it),
        # and nothing of the replaced checkpoint stays inside it.
        parent = self.where(tmp_path, "")
        assert "c" in self.names(parent)
        assert not [n for n in self.names(parent) if n.startswith(".")]
        assert len(self.names(path)) == len(before)

    def test_deterministic_data_files(self, tmp_path: Path) -> None:
        state = special_values_state()
        a, b = self.where(tmp_path, "a"), self.where(tmp_path, "b")
        for path in (a, b):
            self.save(state, path)
        files_a = aptckpt.inspect(a, storage_options=self._opts(a)).files
        files_b = aptckpt.inspect(b, storage_options=self._opts(b)).files
        # Object stores put each save's data under a prefix of its own: equal past it.
        assert [(_unprefixed(f.path), f.size) for f in files_a] == [
            (_unprefixed(f.path), f.size) for f in files_b
        ]
        for fa, fb in zip(files_a, files_b, strict=True):
            assert self.read_bytes(f"{a}/{fa.path}") == self.read_bytes(f"{b}/{fb.path}")

    @settings(
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,  # fixtures here are per test, not per example
            # One test body inherited by one class per backend: sharing replayed
            # examples between backends is harmless (each must pass them all).
            HealthCheck.differing_executors,
        ]
    )
    @given(state=states(), data=st.data())
    def test_generated_states_roundtrip(self, state: Any, data: st.DataObject) -> None:
        if not self.stores_empty_bytes:
            state = data.draw(states(empty_bytes=False))
        with tempfile.TemporaryDirectory() as tmp:
            assert_state_equal(state, self.roundtrip(state, self.where(Path(tmp), "ckpt")))


#: The per-save data prefix of checkpoints on object stores (docs/storage.md).
_DATA_PREFIX = re.compile(r"data-\d+-[0-9a-f]{16}/")


def _unprefixed(path: str) -> str:
    return _DATA_PREFIX.sub("", path, count=1)


@contextlib.contextmanager
def _registered(backend: str | type[Backend]) -> Iterator[str]:
    """The registry name of ``backend``; a class not registered yet is, for the block."""
    if isinstance(backend, str):
        registry.get_backend(backend)  # an unknown name fails here, listing the known ones
        yield backend
        return
    name = getattr(backend, "name", None)
    if not isinstance(name, str):
        raise BackendError(f"{backend!r} has no string 'name' class attribute")
    if name in registry.available_backends():
        if registry.get_backend(name) is not backend:
            raise BackendError(
                f"another class is registered as backend {name!r}; pass the name to check "
                "that one, or unregister it first"
            )
        yield name
        return
    registry.register_backend(backend)
    try:
        yield name
    finally:
        registry.unregister_backend(name)


def check_backend(
    backend: str | type[Backend],
    *,
    options: Mapping[str, Any] | None = None,
    stores_empty_bytes: bool = True,
) -> tuple[str, ...]:
    """Run every test of :class:`BackendConformance` against ``backend``.

    Args:
        backend: a registered backend's name, or a backend class (registered under its
            ``name`` for the duration of the check if it is not yet).
        options: backend options every save passes.
        stores_empty_bytes: see :attr:`BackendConformance.stores_empty_bytes`.

    Returns:
        The names of the tests that ran and passed (all but any that skipped themselves).

    Raises:
        AssertionError: one or more tests failed; the message names each with its error.
        BackendError: ``backend`` is a class without a name, or another class holds it.
        UnknownBackendError: ``backend`` is a name nobody registered.
    """
    with _registered(backend) as name:
        suite = type(
            "CheckBackend",
            (BackendConformance,),
            {
                "backend": name,
                "options": dict(options or {}),
                "stores_empty_bytes": stores_empty_bytes,
            },
        )()
        names = sorted(n for n in dir(BackendConformance) if n.startswith("test_"))
        passed, failures = [], []
        for test_name in names:
            test = getattr(suite, test_name)
            try:
                with tempfile.TemporaryDirectory(prefix="aptckpt-check-") as tmp:
                    wants_tmp = "tmp_path" in inspect.signature(test).parameters
                    test(Path(tmp)) if wants_tmp else test()
            except pytest.skip.Exception:
                continue
            # Every failure is reported, not only the first; pytest.raises and pytest.fail
            # raise pytest's Failed, which is no Exception.
            except (Exception, pytest.fail.Exception) as err:
                failures.append(f"{test_name}: {type(err).__name__}: {err}")
            else:
                passed.append(test_name)
    if failures:
        raise AssertionError(
            f"backend {name!r} failed {len(failures)} of {len(names)} conformance tests:\n"
            + "\n".join(failures)
        )
    return tuple(passed)
