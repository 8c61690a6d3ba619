"""manifest: deterministic encoding, strict validation, version checks, safe paths."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from aptckpt import manifest as mf
from aptckpt._accel import xxh3_128
from aptckpt.errors import (
    FormatError,
    IntegrityError,
    UnsafePathError,
    UnsupportedFormatVersionError,
)


def sample() -> mf.Manifest:
    return mf.Manifest(
        backend="zstd",
        options={"level": 1},
        skeleton=["dict", ["w", ["tensor", 0]]],
        tensors=(mf.TensorRecord("bfloat16", (2, 3)),),
        files=(mf.FileRecord("shard-00000.bin", 12),),
        payload={"k": b"\x00"},
        created_at="2026-01-01T00:00:00+00:00",
        library_version="0.1.0",
        torch_version="2.13.0",
    )


def doc(**changes):
    """A manifest with ``changes``, sealed with a valid checksum (as a hostile file could be)."""
    d = msgpack.unpackb(mf.encode(sample()), raw=False)
    d.update(changes)
    return mf.pack_document(d)


def test_roundtrip_and_deterministic_bytes():
    assert mf.decode(mf.encode(sample())) == sample()
    assert mf.encode(sample()) == mf.encode(sample())
    assert sample().tensors[0].nbytes == 12


def test_newer_version_is_refused_with_upgrade_hint():
    with pytest.raises(UnsupportedFormatVersionError, match="upgrade aptckpt") as info:
        mf.decode(doc(format_version=mf.FORMAT_VERSION + 1))
    assert info.value.found == mf.FORMAT_VERSION + 1


@pytest.mark.parametrize(
    "changes",
    [
        {"format": "other"},
        {"format_version": 0},
        {"format_version": "1"},
        {"tensors": [{"dtype": "float99", "shape": [1]}]},
        {"tensors": [{"dtype": "float32", "shape": [-1]}]},
        {"tensors": [{"dtype": "float32", "shape": [2**62, 2**62]}]},
        {"tensors": [{"dtype": "float32", "shape": [True]}]},
        {"tensors": ["x"]},
        {"files": [{"path": "a", "size": -1}]},
        {"files": [{"path": "a", "size": 1}, {"path": "a", "size": 1}]},
        {"backend": 3},
    ],
)
def test_malformed_fields_raise_format_error(changes):
    with pytest.raises(FormatError):
        mf.decode(doc(**changes))


_GOOD = {
    "dtype": "float32",
    "shape": [2, 3],
    "device": "cpu",
    "requires_grad": False,
    "parameter": False,
}


@pytest.mark.parametrize(
    "variant",
    [
        {"requires_grad": 0},  # equal to False, not a bool
        {"parameter": 1},
        {"shape": [2.0, 3]},  # equal to [2, 3], not ints
        {"shape": [True, 3]},
        {"shape": [2, -3]},
        {"shape": [2**62, 8]},  # too many elements
        {"shape": [1] * 65},  # too many dimensions
        {"dtype": "float99"},
        {"device": "x" * 65},
        {"device": 0},
    ],
)
def test_an_entry_equal_to_a_good_one_but_malformed_is_refused(variant):
    # entries after a good one are looked up by their values: one that compares equal to
    # it (0 == False, 2.0 == 2) must still be refused as the first would be
    bad = {**_GOOD, **variant}
    with pytest.raises(FormatError, match="tensor 1"):
        mf.decode(doc(tensors=[_GOOD, bad]))


def test_equal_tensor_entries_share_one_record_and_the_others_keep_theirs():
    entries = [
        _GOOD,
        {**_GOOD},
        {**_GOOD, "shape": [3, 2]},
        {"dtype": "float32", "shape": [2, 3]},  # defaults filled in: an equal record
        {**_GOOD, "extra": 1},  # an unknown field, ignored as before
        {**_GOOD, "requires_grad": True},
        {**_GOOD, "shape": []},
        {**_GOOD, "device": "cuda:1"},
    ]
    tensors = mf.decode(doc(tensors=entries)).tensors
    assert tensors[0] is tensors[1]
    assert tensors[0] == tensors[3] == tensors[4] == mf.TensorRecord("float32", (2, 3))
    assert tensors[2].shape == (3, 2) and tensors[5].requires_grad
    assert tensors[6].shape == () and tensors[6].nbytes == 4
    assert tensors[7].device == "cuda:1"
    assert mf.total_nbytes(tensors) == 7 * 24 + 4  # seven of 2x3 float32, one scalar
    assert mf.total_nbytes(()) == 0


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01", msgpack.packb([1, 2]), b"\xff" * 10])
def test_garbage_bytes_raise_format_error(data):
    with pytest.raises(FormatError):
        mf.decode(data)


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x", "a/../../b", "a//b", ".hidden", "a\\b", "", "a/", "x\x00"]
)
def test_unsafe_paths_refused(path):
    with pytest.raises(UnsafePathError):
        mf.check_relative_path(path)
    with pytest.raises(UnsafePathError):
        mf.decode(doc(files=[{"path": path, "size": 1}]))


def test_manifest_ends_with_its_checksum():
    data = mf.encode(sample())
    assert data[-16:] == xxh3_128(data[:-16])
    assert msgpack.unpackb(data, raw=False)["checksum"] == data[-16:]


def test_every_flipped_bit_of_a_manifest_is_detected():
    data = mf.encode(sample())
    for bit in range(len(data) * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((IntegrityError, FormatError)):
            mf.decode(bytes(damaged))


@pytest.mark.parametrize("cut", [1, 16, 17, 27, 28])
def test_truncated_manifest_is_detected(cut):
    with pytest.raises((IntegrityError, FormatError)):
        mf.decode(mf.encode(sample())[:-cut])


def test_checksum_is_mandatory_from_version_2():
    d = msgpack.unpackb(mf.encode(sample()), raw=False)
    del d["checksum"]
    with pytest.raises(IntegrityError, match="no valid checksum"):
        mf.decode(msgpack.packb(d, use_bin_type=True))


def test_version_1_manifests_without_checksum_still_decode():
    v1 = mf.encode(dataclasses.replace(sample(), format_version=1))
    assert b"checksum" not in v1
    assert mf.decode(v1).format_version == 1


def test_safe_paths_accepted():
    assert mf.check_relative_path("objects/ab/cdef.bin") == "objects/ab/cdef.bin"


def test_a_checkpoint_is_written_with_the_lowest_format_version_that_reads_it(tmp_path):
    import collections

    import numpy as np
    import torch

    import aptckpt

    plain = {"w": torch.ones(3), "step": 3, "od": collections.OrderedDict(a=1)}
    cases = {
        "plain": (plain, {}, 2),
        "counter": ({**plain, "m": collections.Counter([1])}, {}, 3),
        "numpy": ({**plain, "x": np.float64(1)}, {}, 3),
        "sparse": ({**plain, "s": torch.eye(2).to_sparse()}, {}, 3),
        "metadata": (plain, {"metadata": {"s": {1}}}, 3),
        "delta-local": (plain, {"backend": "delta", "local_below": 16 << 10}, 3),
        "delta-store": (plain, {"backend": "delta", "pack_below": 0}, 2),
        # a chunk no earlier save stored (the others' are reused, loose)
        "delta-packed": ({**plain, "w": torch.full((3,), 7.0)}, {"backend": "delta"}, 5),
    }
    for name, (state, options, version) in cases.items():
        aptckpt.save(state, tmp_path / name, **options)
        assert aptckpt.inspect(tmp_path / name).format_version == version, name
        if name not in ("delta-local", "delta-packed"):
            converted = tmp_path / f"{name}-converted"
            aptckpt.convert(tmp_path / name, converted)
            assert aptckpt.inspect(converted).format_version == version, name
    assert torch.equal(aptckpt.load(tmp_path / "plain")["w"], plain["w"])


# ------------------------------------------------- version 4: saved by a process group


def _sharded_doc() -> dict:
    """A valid version-4 document: one 4x2 float32 tensor stored as two row boxes."""
    return {
        "format": "aptckpt",
        "format_version": 4,
        "library_version": "x",
        "torch_version": "x",
        "created_at": "",
        "backend": "zstd",
        "options": {},
        "tree": ["dict", ["w", ["tensor", 0]]],
        "tensors": [{"dtype": "float32", "shape": [4, 2]}],
        "files": [{"path": "rank-00000/a", "size": 1}, {"path": "rank-00001/a", "size": 1}],
        "payload": None,
        "metadata": None,
        "world_size": 2,
        "parts": [
            {"rank": 0, "files": [0], "tensors": [{"dtype": "float32", "shape": [3, 2]}]},
            {"rank": 1, "files": [1], "tensors": [{"dtype": "float32", "shape": [1, 2]}]},
        ],
        "shards": [[[0, 0, [0, 0]], [1, 0, [3, 0]]]],
    }


def test_a_sharded_manifest_roundtrips():
    decoded = mf.decode(mf.pack_document(_sharded_doc()))
    assert decoded.sharded and decoded.world_size == 2
    assert decoded.shards[0][1] == mf.ShardRecord(1, 0, (3, 0))
    assert mf.decode(mf.encode(decoded)) == decoded
    part = decoded.part(1)
    assert part.tensors[0].shape == (1, 2) and part.files[0].path == "rank-00001/a"


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("shards", 0, 1, 0), 2),  # no part 2
        (("shards", 0, 1, 1), 1),  # no local tensor 1
        (("shards", 0, 1, 2), [4, 0]),  # a box outside the tensor
        (("shards", 0, 1, 2), [-1, 0]),
        (("shards", 0, 1, 2), [3]),  # wrong rank of offsets
        (("shards", 0, 1), [0, 0, [3, 0]]),  # one local tensor stores two boxes
        (("parts", 1, "files"), [0]),  # a file listed by two parts
        (("parts", 1, "rank"), 2),  # a rank the save did not have
        (("parts", 1, "tensors", 0, "dtype"), "int32"),  # a box of another dtype
        (("world_size",), 0),
        (("shards",), []),
    ],
)
def test_hostile_sharded_manifests_raise_format_error(where, value):
    doc = _sharded_doc()
    node = doc
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(FormatError):
        mf.decode(mf.pack_document(doc))


def test_a_version_3_reader_would_refuse_version_4():
    doc = _sharded_doc()
    assert mf.decode(mf.pack_document(doc)).format_version == 4
    assert mf.FORMAT_VERSION == 5  # version 5: delta packs
