"""load(..., mmap=True): raw tensors come back as copy-on-write maps of the checkpoint's files,
bit-exact, checked, never writing the files; everything else loads as usual."""

from __future__ import annotations

import shutil

import pytest
import torch

import aptckpt
from aptckpt.errors import IntegrityError
from aptckpt.testing import assert_state_equal


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(300, 70, generator=g),
        "i64": torch.arange(1000),
        "odd_bf16": torch.randn(7, generator=g).to(torch.bfloat16),  # misaligns what follows
        "after": torch.randn(5, generator=g),  # 4-byte tensor at a 2-byte offset: not mapped
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(4, 4, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "nested": {"p": torch.nn.Parameter(torch.ones(8)), "step": 3},
    }


def _is_mapped(t: torch.Tensor, path) -> bool:
    """True when the tensor's memory lies in a mapping of a file under ``path``."""
    address = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return len(fields) >= 6 and str(path) in fields[5]
    return False


@pytest.mark.parametrize("chunk_size", [64, 1 << 20])
def test_raw_tensors_are_mapped_and_bit_exact(tmp_path, chunk_size):
    state = _state()
    aptckpt.save(state, tmp_path / "c", codec="none", chunk_size=chunk_size)
    loaded = aptckpt.load(tmp_path / "c", mmap=True)
    assert_state_equal(state, loaded)
    assert isinstance(loaded["nested"]["p"], torch.nn.Parameter)
    assert _is_mapped(loaded["w"], tmp_path / "c")
    assert _is_mapped(loaded["i64"], tmp_path / "c")
    assert not _is_mapped(loaded["after"], tmp_path / "c")  # misaligned: read into memory


def test_writes_to_mapped_tensors_stay_private(tmp_path):
    state = _state()
    aptckpt.save(state, tmp_path / "c", codec="none")
    loaded = aptckpt.load(tmp_path / "c", mmap=True)
    loaded["w"].mul_(2)
    loaded["w"][0, 0] = 123.0
    assert loaded["w"][0, 0] == 123.0
    assert_state_equal(state, aptckpt.load(tmp_path / "c"))
    aptckpt.verify(tmp_path / "c")


def test_mapped_tensors_outlive_a_deleted_checkpoint(tmp_path):
    state = _state()
    aptckpt.save(state, tmp_path / "c", codec="none")
    loaded = aptckpt.load(tmp_path / "c", mmap=True)
    shutil.rmtree(tmp_path / "c")
    assert_state_equal(state, loaded)


@pytest.mark.parametrize(
    ("backend", "options"),
    [("zstd", {}), ("torch", {}), ("delta", {}), ("zstd", {"codec": "none"})],
)
def test_every_backend_loads_with_mmap(tmp_path, backend, options):
    state = _state()
    aptckpt.save(state, tmp_path / "c", backend=backend, **options)
    assert_state_equal(state, aptckpt.load(tmp_path / "c", mmap=True))


def test_damage_in_a_mapped_tensor_is_named(tmp_path):
    state = {"a": torch.zeros(1000), "b": torch.ones(1000)}
    aptckpt.save(state, tmp_path / "c", codec="none", chunk_size=1024)
    shard = tmp_path / "c" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[4000 + 100] ^= 0x10  # tensor "b", its first chunk
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"tensor state\['b'\], chunk 0 .*shard-00000.bin"):
        aptckpt.load(tmp_path / "c", mmap=True)
    loaded = aptckpt.load(tmp_path / "c", mmap=True, verify=False)  # not checked: returned
    assert not torch.equal(loaded["b"], state["b"])


def test_mmap_and_into_are_exclusive(tmp_path):
    aptckpt.save({"a": torch.zeros(3)}, tmp_path / "c", codec="none")
    with pytest.raises(ValueError, match="mmap=True or into="):
        aptckpt.load(tmp_path / "c", mmap=True, into={"a": torch.empty(3)})


def test_mapped_tensors_hold_no_file_descriptor(tmp_path):
    import os

    state = {f"t{i}": torch.randn(1000) for i in range(8)}
    aptckpt.save(state, tmp_path / "c", codec="none", shard_size=8000)  # 4 shard files
    before = len(os.listdir("/proc/self/fd"))
    loaded = aptckpt.load(tmp_path / "c", mmap=True)
    assert all(_is_mapped(t, tmp_path / "c") for t in loaded.values())
    assert len(os.listdir("/proc/self/fd")) == before
    assert_state_equal(state, loaded)
