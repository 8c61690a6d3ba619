"""Every kind of value aptckpt stores round-trips exactly through every backend: the
containers torch's own state dicts use (Counter in MultiStepLR, defaultdict, sets), numpy
scalars and arrays (RNG states), sparse and quantized tensors, expanded tensors (stored as
the small tensor they view), and large bytes/str (stored as data, not in the manifest)."""

from __future__ import annotations

import collections
import math
import warnings

import numpy as np
import pytest
import torch

import aptckpt
from aptckpt import _config
from aptckpt.testing import assert_state_equal

BACKENDS = [
    ("zstd", {}),
    ("zstd", {"codec": "none"}),
    ("torch", {}),
    ("delta", {}),
]
IDS = ["zstd", "zstd-raw", "torch", "delta"]


def _round_trip(tmp_path, state, backend, options, name="c"):
    aptckpt.save(state, tmp_path / name, backend=backend, **options)
    loaded = aptckpt.load(tmp_path / name)
    assert_state_equal(state, loaded)
    aptckpt.verify(tmp_path / name)
    return loaded


def _containers():
    return {
        "milestones": collections.Counter({30: 1, 80: 2}),
        "empty_counter": collections.Counter(),
        "dd_list": collections.defaultdict(list, {"a": [1, 2]}),
        "dd_int": collections.defaultdict(int, {(1, 2): 3}),
        "dd_none": collections.defaultdict(None, {1: 2}),
        "dd_counter": collections.defaultdict(collections.Counter),
        "set": {3, "b", 1.5, None, (1, 2), b"x"},
        "frozen": frozenset({1, 2}),
        "set_of_frozen": {frozenset({1}), frozenset()},
        "empty_set": set(),
        "odict": collections.OrderedDict(b=1, a=2),
    }


@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=IDS)
def test_containers_of_torch_state_dicts(tmp_path, backend, options):
    loaded = _round_trip(tmp_path, _containers(), backend, options)
    assert loaded["dd_list"]["missing"] == []  # the factory works after loading
    assert loaded["milestones"][30] == 1 and loaded["milestones"][999] == 0


def test_equal_sets_store_the_same_bytes(tmp_path):
    for i, items in enumerate([[1, 2, 3, "a"], ["a", 3, 2, 1]]):
        aptckpt.save({"s": set(items)}, tmp_path / f"c{i}")
    first, second = (aptckpt.inspect(tmp_path / f"c{i}") for i in range(2))
    import msgpack

    raw = [
        msgpack.unpackb((tmp_path / f"c{i}" / "manifest.msgpack").read_bytes())["tree"]
        for i in range(2)
    ]
    assert raw[0] == raw[1] and first.tensors == second.tensors


def _numpy_values():
    g = np.random.default_rng(0)
    scalars = {
        name: np.dtype(name).type(3) for name in ("int8", "int16", "int32", "int64", "uint8")
    }
    scalars.update(
        {
            "u64": np.uint64(2**64 - 1),
            "f16": np.float16(1.5),
            "f32": np.float32("nan"),
            "f64": np.float64(-0.0),
            "c64": np.complex64(1 + 2j),
            "c128": np.complex128(-1j),
            "bool": np.bool_(True),
            "str": np.str_("ü"),
            "bytes": np.bytes_(b"\x00x"),
        }
    )
    arrays = {
        "rng_state": np.random.RandomState(1).get_state(),  # ('MT19937', uint32 array, ...)
        "generator": np.random.default_rng(2).bit_generator.state,  # 128-bit ints
        "f64": g.standard_normal((3, 4)),
        "zero_d": np.array(5, dtype=np.int16),
        "empty": np.empty((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(g.standard_normal((3, 2))),
        "strided": np.arange(20, dtype=np.int64)[::3],
        "bools": np.array([True, False]),
        "u16": np.arange(4, dtype=np.uint16),
        "c64": np.ones(3, dtype=np.complex64),
        "f16": np.ones(2, dtype=np.float16),
    }
    readonly = np.arange(3.0)
    readonly.flags.writeable = False
    arrays["readonly"] = readonly
    return {"scalars": scalars, "arrays": arrays, "keyed": {np.int64(7): "seven"}}


@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=IDS)
def test_numpy_scalars_and_arrays_keep_their_types(tmp_path, backend, options):
    state = _numpy_values()
    loaded = _round_trip(tmp_path, state, backend, options)
    assert type(loaded["scalars"]["f64"]) is np.float64  # not a float: the same type back
    assert math.copysign(1, loaded["scalars"]["f64"]) == -1
    np.random.RandomState().set_state(loaded["arrays"]["rng_state"])  # a usable RNG state
    generator = np.random.default_rng()
    generator.bit_generator.state = loaded["arrays"]["generator"]
    assert generator.integers(1 << 30) == np.random.default_rng(2).integers(1 << 30)


def _sparse_and_quantized():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 4, generator=g) * (torch.rand(6, 4, generator=g) > 0.5)
    uncoalesced = torch.sparse_coo_tensor(
        torch.tensor([[0, 0, 1], [2, 2, 0]]),
        torch.tensor([1.0, 2.0, 3.0]),
        (2, 3),
        check_invariants=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.randn(4, 3, generator=g)
        quantized = {
            "qint8": torch.quantize_per_tensor(x, 0.05, 3, torch.qint8),
            "quint8": torch.quantize_per_tensor(x, 0.1, 128, torch.quint8),
            "qint32": torch.quantize_per_tensor(x, 0.001, 0, torch.qint32),
            "channel": torch.quantize_per_channel(
                x,
                torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                torch.tensor([0, 1, 2]),
                1,
                torch.qint8,
            ),
            "float_qparams": torch.quantize_per_channel(
                x,
                torch.tensor([0.1, 0.2, 0.3, 0.4]),
                torch.tensor([0.0, 1.0, 2.0, 3.0]),
                0,
                torch.quint8,
            ),
        }
    return {
        "coo": dense.to_sparse(),
        "uncoalesced": uncoalesced,
        "hybrid": dense.to_sparse(1),
        "csr": dense.to_sparse_csr(),
        "csc": dense.to_sparse_csc(),
        "bsr": dense.to_sparse_bsr((2, 2)),
        "bsc": dense.to_sparse_bsc((2, 2)),
        "empty_coo": torch.sparse_coo_tensor(
            torch.zeros(2, 0, dtype=torch.long), [], (3, 3), check_invariants=True
        ),
        "sparse_param": torch.nn.Parameter(dense.to_sparse()),
        "quantized": quantized,
    }


@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=IDS)
def test_sparse_and_quantized_tensors(tmp_path, backend, options):
    state = _sparse_and_quantized()
    state["again"] = state["coo"]  # the same sparse tensor twice: its parts stored once
    loaded = _round_trip(tmp_path, state, backend, options)
    assert not loaded["uncoalesced"].is_coalesced()
    assert torch.equal(loaded["coo"].to_dense(), state["coo"].to_dense())
    # 7 sparse tensors of 2-3 parts, 3 per-tensor and 2 per-channel quantized of 1 and 3
    assert len(aptckpt.inspect(tmp_path / "c").tensors) == 31


@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=IDS)
def test_expanded_tensors_are_stored_as_what_they_view(tmp_path, backend, options):
    row = torch.arange(5.0)
    state = {
        "scalar": torch.tensor(7.0).expand(1 << 20, 64),  # 256 MiB if materialised
        "row": row.expand(1000, 5),
        "middle": torch.randn(3, 1, 2).expand(3, 100, 2),
        "grad": torch.ones(1, requires_grad=True).expand(3).detach().requires_grad_(False),
    }
    loaded = _round_trip(tmp_path, state, backend, options)
    assert loaded["scalar"].stride() == (0, 0)
    info = aptckpt.inspect(tmp_path / "c")
    assert info.raw_bytes < 1 << 20  # stored compact: a few bytes, not 256 MiB


@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=IDS)
@pytest.mark.parametrize(
    "size", [_config.MAX_INLINE_BYTES - 1, _config.MAX_INLINE_BYTES, _config.MAX_INLINE_BYTES + 1]
)
def test_large_bytes_and_str_are_stored_as_data(tmp_path, backend, options, size):
    state = {
        "bytes": bytes(range(256)) * (size // 256) + b"\x01" * (size % 256),
        "str": "é" * (size // 2) + "x" * (size % 2),  # 2 UTF-8 bytes per é
        "ascii": "a" * size,
        "list": ["z" * size],
        "small": b"ab",
    }
    _round_trip(tmp_path, state, backend, options)
    manifest = (tmp_path / "c" / "manifest.msgpack").stat().st_size
    assert manifest < (5 * size if size < _config.MAX_INLINE_BYTES else 64 << 10)


def test_loaded_arrays_and_tensors_are_writable(tmp_path):
    aptckpt.save({"a": np.arange(3.0), "t": torch.arange(3.0)}, tmp_path / "c")
    loaded = aptckpt.load(tmp_path / "c")
    loaded["a"][0] = 9
    loaded["t"][0] = 9


@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=IDS)
def test_four_bit_embedding_tables_and_broadcast_arrays(tmp_path, backend, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = torch.randn(10, 8)
        table = torch.quantize_per_channel(  # a 4-bit EmbeddingBag's weight
            weight, torch.rand(10) + 0.1, torch.rand(10) * 3, 0, torch.quint4x2
        )
        packed = torch.quantize_per_tensor(weight, 0.5, 3, torch.quint2x4)
    state = {
        "table": table,
        "packed": packed,
        "broadcast": np.broadcast_to(np.arange(3.0), (1 << 20, 3)),  # 24 MiB if materialised
    }
    loaded = _round_trip(tmp_path, state, backend, options)
    assert torch.equal(loaded["table"].dequantize(), table.dequantize())
    assert loaded["broadcast"].strides[0] == 0
    assert aptckpt.inspect(tmp_path / "c").raw_bytes < 1 << 10
