"""manifest: deterministic encoding, strict validation, version checks, safe paths."""

from __future__ import annotations

import msgpack
import pytest

from aptckpt import manifest as mf
from aptckpt.errors import FormatError, UnsafePathError, UnsupportedFormatVersionError


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
    d = msgpack.unpackb(mf.encode(sample()), raw=False)
    d.update(changes)
    return msgpack.packb(d, use_bin_type=True)


def test_roundtrip_and_deterministic_bytes():
    assert mf.decode(mf.encode(sample())) == sample()
    assert mf.encode(sample()) == mf.encode(sample())
    assert sample().tensors[0].nbytes == 12


def test_newer_version_is_refused_with_upgrade_hint():
    with pytest.raises(UnsupportedFormatVersionError, match="upgrade aptckpt") as info:
        mf.decode(doc(format_version=2))
    assert info.value.found == 2


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


def test_safe_paths_accepted():
    assert mf.check_relative_path("objects/ab/cdef.bin") == "objects/ab/cdef.bin"
