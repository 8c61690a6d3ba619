"""The torch backend's one-pass verified read (aptckpt.backends._torchread): every chunk read
once, straight into the storages' memory where it lies in one, checked on the way in; torch
unpickles only those bytes. Boundaries of records against chunks, damage, hostile layouts,
files the fast path does not take (and the public torch.load then reads from memory)."""

from __future__ import annotations

import os
import struct

import pytest
import torch

import aptckpt
from aptckpt import _accel
from aptckpt.backends import _torchread
from aptckpt.errors import FormatError, IntegrityError
from aptckpt.storage import base
from aptckpt.storage.local._reader import LocalDataFiles
from aptckpt.testing import assert_state_equal

CS = 256  # a small chunk size: records of a few hundred bytes cross chunk boundaries


class _OnlyVerifiedReads(base.DataFiles):
    """A file's DataFiles that allows read_verify only, and counts what each chunk read."""

    def __init__(self, path) -> None:
        fd = os.open(path, os.O_RDONLY)
        self.inner = LocalDataFiles([fd], {})
        self.failed = {}
        self.reads: list[tuple[int, int]] = []

    def read_verify(self, reads, threads):
        self.reads += [(r.offset, len(r.out)) for r in reads]
        return self.inner.read_verify(reads, threads)

    def read(self, file, offset, length):
        raise AssertionError("the load must not read the file outside read_verify")

    def stream(self, file):
        raise AssertionError("the load must not hand torch the file")

    def map_file(self, file, size, *, verify):
        raise AssertionError("the load must not map the file")

    def size(self, file):
        return self.inner.size(file)

    def close(self):
        self.inner.close()


def _digests(path, cs=CS):
    data = path.read_bytes()
    return len(data), _accel.hash_chunks(data, cs) if data else b""


def _read(path, cs=CS, verify=True):
    size, digests = _digests(path, cs)
    files = _OnlyVerifiedReads(path)
    try:
        contents = _torchread.read_file(files, 0, size, cs, digests if verify else None)
    finally:
        files.close()
    return contents, files.reads, size


def _assert_each_byte_read_once(reads, size):
    covered = sorted(reads)
    at = 0
    for offset, length in covered:
        assert offset == at
        at += length
    assert at == size


@pytest.fixture
def fast_path_only(monkeypatch):
    """Fail if the public torch.load fallback runs (the fast path must serve the file)."""

    def refuse(data):
        raise AssertionError("fell back to the public torch.load")

    monkeypatch.setattr(_torchread, "public_load", refuse)


# Record sizes around the chunk size: 0, 1, n-1, n, n+1, kn, kn+1 (and the 64-byte alignment
# torch gives every record makes some start on a chunk boundary, others inside one).
SIZES = [0, 1, 63, 64, 65, CS - 1, CS, CS + 1, 2 * CS, 3 * CS + 5, 5 * CS - 64, 16 * CS]


@pytest.mark.parametrize("cs", [64, CS, 4096])
def test_record_sizes_around_the_chunk_size_load_bit_exact(tmp_path, cs, fast_path_only):
    gen = torch.Generator().manual_seed(cs)
    state = {f"t{n}": torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in SIZES}
    aptckpt.save(state, tmp_path / "c", backend="torch", chunk_size=cs)
    contents, reads, size = _read(tmp_path / "c" / "state.pt", cs)
    assert not isinstance(contents, list) and contents.layout_ok
    _assert_each_byte_read_once(reads, size)
    if cs <= CS:  # the large records own whole chunks: those go straight to their memory
        assert contents.direct
    loaded = _torchread.unpickle(contents)
    assert_state_equal(state, loaded)
    assert_state_equal(state, aptckpt.load(tmp_path / "c"))


def test_loaded_storages_are_their_own_like_torch_load(tmp_path, fast_path_only):
    state = {"a": torch.randn(1000), "b": torch.randn(3), "c": torch.zeros(0)}
    aptckpt.save(state, tmp_path / "c", backend="torch", chunk_size=CS)
    loaded = aptckpt.load(tmp_path / "c")
    ptrs = {t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}
    assert len(ptrs) == 2
    for t in loaded.values():
        assert t.untyped_storage().nbytes() == t.nbytes and t.storage_offset() == 0


def test_every_dtype_and_shape_as_torch_load_gives_it(tmp_path, fast_path_only):
    state = {}
    for i, dtype in enumerate(
        [
            torch.bool,
            torch.uint8,
            torch.int8,
            torch.int16,
            torch.uint16,
            torch.int32,
            torch.uint32,
            torch.int64,
            torch.uint64,
            torch.float16,
            torch.bfloat16,
            torch.float32,
            torch.float64,
            torch.complex64,
            torch.complex128,
            torch.float8_e4m3fn,
            torch.float8_e5m2,
        ]
    ):
        raw = torch.randint(0, 256, (7, 3 + i), dtype=torch.uint8)
        width = torch.empty(0, dtype=dtype).element_size()
        state[str(dtype)] = raw.view(torch.uint8)[:, : (3 + i) // width * width].clone().view(dtype)
    state["scalar"] = torch.tensor(3.5)
    state["empty2d"] = torch.zeros(0, 5)
    state["expanded"] = torch.ones(1, 6).expand(4, 6)
    state["transposed"] = torch.randn(4, 5).t()
    aptckpt.save(state, tmp_path / "c", backend="torch", chunk_size=64)
    loaded = aptckpt.load(tmp_path / "c")
    assert_state_equal(state, loaded)
    plain = torch.load(tmp_path / "c" / "state.pt", weights_only=True)
    assert loaded["expanded"].stride() == plain["expanded"].stride() == (0, 1)


def test_views_into_one_storage_keep_offsets_and_sharing(tmp_path, fast_path_only):
    # A plain torch.save file (not aptckpt's: those never share storages) read the fast
    # way gives what torch.load gives: one storage per record, views at their offsets.
    base_ = torch.arange(40.0)
    original = {"all": base_, "mid": base_[5:15], "strided": base_[::3], "again": base_}
    path = tmp_path / "shared.pt"
    torch.save(original, path)
    contents, _, _ = _read(path, 64)
    assert not isinstance(contents, list) and contents.layout_ok
    loaded = _torchread.unpickle(contents)
    plain = torch.load(path, weights_only=True)
    for key in original:
        assert torch.equal(loaded[key], plain[key])
        assert loaded[key].storage_offset() == plain[key].storage_offset()
        assert loaded[key].stride() == plain[key].stride()
    assert loaded["mid"].untyped_storage().data_ptr() == loaded["all"].untyped_storage().data_ptr()
    assert (
        loaded["again"] is loaded["all"] or loaded["again"].data_ptr() == loaded["all"].data_ptr()
    )
    loaded["all"][6] = -1.0
    assert loaded["mid"][1] == -1.0


def test_a_legacy_torch_file_is_read_once_and_loaded_by_the_public_torch_load(tmp_path):
    state = {"w": torch.randn(300), "n": 3}
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    contents, reads, size = _read(path, 64)
    assert not isinstance(contents, list)
    assert contents.layout is None and not contents.layout_ok
    _assert_each_byte_read_once(reads, size)
    assert_state_equal(state, _torchread.unpickle(contents))


def test_a_layout_that_does_not_check_goes_to_the_public_load_from_memory(tmp_path, monkeypatch):
    state = {"w": torch.randn(2000), "b": torch.randn(5)}
    aptckpt.save(state, tmp_path / "c", backend="torch", chunk_size=CS)
    monkeypatch.setattr(_torchread.Contents, "checks", lambda self: False)
    used = []
    public = _torchread.public_load
    monkeypatch.setattr(_torchread, "public_load", lambda data: used.append(1) or public(data))
    assert_state_equal(state, aptckpt.load(tmp_path / "c"))
    assert used == [1]


def test_the_whole_file_assembled_from_storages_and_staging_is_the_file(tmp_path):
    state = {f"t{n}": torch.randint(0, 256, (n,), dtype=torch.uint8) for n in SIZES}
    aptckpt.save(state, tmp_path / "c", backend="torch", chunk_size=64)
    path = tmp_path / "c" / "state.pt"
    contents, _, _ = _read(path, 64)
    assert bytes(contents.whole()) == path.read_bytes()


def test_a_central_directory_longer_than_a_chunk_is_read_backwards(tmp_path, fast_path_only):
    state = {f"k{i}": torch.full((i % 5,), float(i)) for i in range(300)}
    aptckpt.save(state, tmp_path / "c", backend="torch", chunk_size=64)
    contents, reads, size = _read(tmp_path / "c" / "state.pt", 64)
    _assert_each_byte_read_once(reads, size)
    assert_state_equal(state, _torchread.unpickle(contents))


def test_each_damaged_chunk_is_reported_by_index(tmp_path):
    state = {"w": torch.randn(1000), "b": torch.randn(7)}
    aptckpt.save(state, tmp_path / "c", backend="torch", chunk_size=CS)
    path = tmp_path / "c" / "state.pt"
    size, digests = _digests(path)
    data = bytearray(path.read_bytes())
    for at in (0, 100, size // 2, size - 30, size - 1):  # pickle, header, data, directory, end
        flipped = bytearray(data)
        flipped[at] ^= 0x40
        path.write_bytes(flipped)
        files = _OnlyVerifiedReads(path)
        try:
            found = _torchread.read_file(files, 0, size, CS, digests)
        finally:
            files.close()
        assert found == [at // CS], at
    path.write_bytes(data[:-10] + bytes(10))  # the zip end lost: found before parsing
    files = _OnlyVerifiedReads(path)
    try:
        assert _torchread.read_file(files, 0, size, CS, digests) == [(size - 1) // CS]
    finally:
        files.close()


@pytest.mark.parametrize("where", ["data", "pickle", "directory", "header"])
def test_a_flipped_byte_anywhere_fails_the_load_naming_what_it_can(tmp_path, where):
    state = {"w": torch.randn(4000), "b": torch.randn(7)}
    aptckpt.save(state, tmp_path / "c", backend="torch", chunk_size=CS)
    path = tmp_path / "c" / "state.pt"
    data = bytearray(path.read_bytes())
    at = {
        "data": data.index(struct.pack("<f", state["w"][2000].item())),
        "pickle": 40,
        "directory": data.rindex(b"PK\x01\x02") + 10,
        "header": data.index(b"PK\x03\x04", 100) + 2,
    }[where]
    data[at] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(IntegrityError, match="damaged") as err:
        aptckpt.load(tmp_path / "c")
    if where == "data":
        assert err.value.tensor == "state['w']"


def test_a_truncated_file_fails_the_load(tmp_path):
    aptckpt.save({"w": torch.randn(4000)}, tmp_path / "c", backend="torch", chunk_size=CS)
    path = tmp_path / "c" / "state.pt"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(IntegrityError, match="truncated"):
        aptckpt.load(tmp_path / "c")


def test_without_verification_damage_torch_cannot_read_is_told_as_damage(tmp_path):
    aptckpt.save({"w": torch.randn(4000)}, tmp_path / "c", backend="torch", chunk_size=CS)
    path = tmp_path / "c" / "state.pt"
    data = bytearray(path.read_bytes())
    data[data.rindex(b"PK\x05\x06")] ^= 0xFF  # no zip end: no layout, and torch refuses it
    path.write_bytes(data)
    with pytest.raises(IntegrityError, match="damaged"):
        aptckpt.load(tmp_path / "c", verify=False)


def _zip_end(entries: int, length: int, offset: int) -> bytes:
    return b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, entries, entries, length, offset, 0)


def _central(name: bytes, size: int, header: int, flags: int = 8) -> bytes:
    return (
        b"PK\x01\x02"
        + struct.pack(
            "<HHHHHHIIIHHHHHII",
            0,
            0,
            flags,
            0,
            0,
            0,
            0,
            size,
            size,
            len(name),
            0,
            0,
            0,
            0,
            0,
            header,
        )
        + name
    )


@pytest.mark.parametrize(
    "directory",
    [
        [_central(b"a/data/0", 0xFFFFFFFE, 0)],  # a record larger than the file
        [_central(b"a/data/0", 10, 0), _central(b"a/data/1", 10, 0)],  # two at one header
        [_central(b"a/data/0", 10, 5000)],  # a header past the directory
        [_central(b"a/data/0", 10, 0), _central(b"b/data/1", 10, 100)],  # two archives
        [_central(b"a/data/0", 10, 0), _central(b"a/data/0", 10, 100)],  # one name twice
        [b"PK\x01\x02" + bytes(10)],  # cut short
    ],
)
def test_hostile_central_directories_give_no_layout(directory):
    body = bytes(200)
    cd = b"".join(directory)
    data = body + cd + _zip_end(len(directory), len(cd), len(body))
    assert _torchread.parse_layout(memoryview(data), 0, len(data)) is None


def test_an_end_record_claiming_more_entries_than_fit_gives_no_layout():
    data = bytes(100) + _zip_end(60000, 46, 50)
    assert _torchread.parse_layout(memoryview(data), 0, len(data)) is None


def test_a_hostile_file_loaded_without_verification_is_refused_not_allocated(tmp_path):
    aptckpt.save({"w": torch.randn(4000)}, tmp_path / "c", backend="torch", chunk_size=CS)
    path = tmp_path / "c" / "state.pt"
    data = bytearray(path.read_bytes())
    cd = data.rindex(b"PK\x01\x02")
    while cd >= 0:  # every record's sizes as 4 GiB - 1
        data[cd + 20 : cd + 28] = struct.pack("<II", 0xFFFFFFFE, 0xFFFFFFFE)
        cd = data.rfind(b"PK\x01\x02", 0, cd)
    path.write_bytes(data)
    with pytest.raises((IntegrityError, FormatError)):
        aptckpt.load(tmp_path / "c", verify=False)
