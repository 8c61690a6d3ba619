"""The ``zstd`` backend's raw writer (``codec="none"``): whole tensors cut into pieces only
where a shard or a hash group ends inside them, laid out exactly as chunk by chunk, every
chunk's digest its bytes' hash, taken before the write; and the per-tensor host views
(:func:`aptckpt.backends._chunks.host_bytes`) of every kind of tensor."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import aptckpt
from aptckpt import _accel, _dtypes, tree
from aptckpt import manifest as mf
from aptckpt.backends import _chunks, zstd
from aptckpt.storage.local import _directio
from aptckpt.testing import assert_state_equal

CHUNK = 64


def _bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def _state() -> dict[str, Any]:
    """Tensors of 0, 1, n-1, n, n+1 and k*n+1 bytes for the chunk size n, in dtypes numpy
    views and dtypes it does not, and tensors that are not the caller's memory as they are."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 6, generator=g)
    return {
        "empty": torch.empty(0),
        "one": _bytes(1, 0),
        "below": _bytes(CHUNK - 1, 1),
        "exact": _bytes(CHUNK, 2),
        "above": _bytes(CHUNK + 1, 3),
        "several": _bytes(3 * CHUNK + 1, 4),
        "float": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(100, generator=g).to(torch.bfloat16),  # no numpy view
        "param": torch.nn.Parameter(torch.randn(40, generator=g)),  # requires grad
        "transposed": base.t(),  # not contiguous: copied
        "conj": torch.randn(9, dtype=torch.complex64, generator=g).conj(),  # lazy bit
        "scalar": torch.tensor(2.5),
        "empty_bf16": torch.empty(0, 3, dtype=torch.bfloat16),
        "array": np.arange(30, dtype=np.int16).reshape(5, 6)[:, ::2],  # refreshed copy
    }


def _expected_rows(state: dict[str, Any], shard_size: int) -> list[list[tuple[int, int, int]]]:
    """``(file, offset, length)`` of every chunk, placed one chunk at a time: a new shard
    before the first chunk at or past ``shard_size``."""
    flat = tree.flatten(state)
    rows: list[list[tuple[int, int, int]]] = []
    shard, offset = -1, shard_size
    for leaf in flat.tensors:
        nbytes = _chunks.host_tensor(leaf.tensor).nbytes
        tensor_rows = []
        for start in range(0, nbytes, CHUNK):
            if offset >= shard_size:
                shard, offset = shard + 1, 0
            length = min(CHUNK, nbytes - start)
            tensor_rows.append((shard, offset, length))
            offset += length
        rows.append(tensor_rows)
    return rows


def _manifest(path: Path) -> mf.Manifest:
    return mf.decode((path / mf.MANIFEST_NAME).read_bytes())


@pytest.mark.parametrize("group", [CHUNK - 16, CHUNK, CHUNK + 16, 3 * CHUNK, 1 << 26])
@pytest.mark.parametrize("shard_size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 1 << 30])
def test_raw_layout_is_chunk_by_chunk_whatever_cuts_the_pieces(
    tmp_path: Path, monkeypatch, shard_size: int, group: int
) -> None:
    monkeypatch.setattr(zstd, "_HASH_GROUP", group)
    state = _state()
    path = tmp_path / "c"
    aptckpt.save(state, path, codec="none", chunk_size=CHUNK, shard_size=shard_size)
    manifest = _manifest(path)
    rows = manifest.payload["chunks"]
    assert [[tuple(r[:3]) for r in t] for t in rows] == _expected_rows(state, shard_size)
    assert all(r[3] == 0 and r[5] is None for t in rows for r in t)  # raw, no stored digest
    # every digest is the hash of the bytes the row points at
    for tensor_rows in rows:
        for file, offset, length, _, digest, _ in tensor_rows:
            data = (path / manifest.files[file].path).read_bytes()[offset : offset + length]
            assert digest == _accel.xxh3_128(data)
    loaded = aptckpt.load(path)
    assert_state_equal(
        {k: v for k, v in state.items() if k != "array"},
        {k: v for k, v in loaded.items() if k != "array"},
    )
    assert np.array_equal(loaded["array"], state["array"])
    aptckpt.verify(path)


@pytest.mark.parametrize("count", [0, 1, 2])
def test_raw_saves_of_no_one_and_only_empty_tensors(tmp_path: Path, count: int) -> None:
    for what, state in (
        ("tensors", {f"t{i}": torch.full((3,), float(i)) for i in range(count)}),
        ("empties", {f"t{i}": torch.empty(0, 4) for i in range(count)}),
    ):
        path = tmp_path / what
        info = aptckpt.save(state, path, codec="none")
        assert info.tensors == count
        assert_state_equal(state, aptckpt.load(path))
        aptckpt.verify(path)
        if what == "empties" or not count:
            assert info.files == ()  # nothing to store: no shard file


def test_host_bytes_views_the_callers_memory_and_copies_the_rest() -> None:
    state = _state()
    flat = tree.flatten(state)
    found = _chunks.host_bytes(flat)
    names = [leaf.key_path for leaf in flat.tensors]
    for leaf, host, view, nbytes in zip(
        flat.tensors, found.hosts, found.views, found.nbytes, strict=True
    ):
        expected = _chunks.host_tensor(leaf.tensor)
        assert nbytes == expected.nbytes == memoryview(view).nbytes
        assert bytes(memoryview(view).cast("B")) == bytes(_dtypes.byte_view(expected))
        assert host.is_contiguous() and host.is_cpu
    shared = {names[i] for i in found.shared}
    assert shared == {
        f"state[{k!r}]"
        for k in ("one", "below", "exact", "above", "several", "float", "bf16", "param", "scalar")
    }
    assert sorted(found.shared + found.others) == list(range(len(names)))


def test_a_view_of_another_tensor_is_stored_once_and_a_partial_one_apart(tmp_path: Path) -> None:
    w = torch.randn(4, 5)
    state = {
        "w": w,
        "same": w.view(4, 5),  # alias: the same memory read the same way
        "flat": w.view(20),  # same start, other shape: stored apart
        "row": w[1],  # another start
        "t": w.t(),  # same start, other strides
        "again": w,
    }
    flat = tree.flatten(state)
    assert len(flat.tensors) == 4
    assert flat.skeleton[1][1] == flat.skeleton[1][3] == flat.skeleton[1][11]
    aptckpt.save(state, tmp_path / "c", codec="none")
    out = aptckpt.load(tmp_path / "c")
    assert out["w"] is out["same"] and out["w"] is out["again"]
    assert_state_equal(state, out)


def _mutate(state: dict[str, Any]) -> None:
    with torch.no_grad():
        state["several"][-1] += 1  # the caller's memory, in its last chunk
        state["bf16"].add_(1)  # viewed as bytes, not by numpy
        state["transposed"].add_(1)  # copied: copied again by the check
        state["param"].add_(1)
    state["array"][0, 0] += 1  # refreshed from the array


CHANGED = (
    "state['several']",
    "state['bf16']",
    "state['param']",
    "state['transposed']",
    "state['array']",
)


@pytest.mark.parametrize("io", ["1", "0"])
def test_every_kind_of_tensor_changed_before_the_writes_is_named(
    tmp_path: Path, monkeypatch, io: str
) -> None:
    # one shard, one hash group: every digest is taken before the first write
    monkeypatch.setenv("APTCKPT_DIRECT_IO", io)
    state = _state()
    done = threading.Event()
    original = _directio.DirectWriter.write_many

    def write_many(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done.is_set():
            done.set()
            _mutate(state)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_directio.DirectWriter, "write_many", write_many)
    with pytest.raises(aptckpt.StateChangedError) as info:
        aptckpt.save(state, tmp_path / "c", codec="none", chunk_size=CHUNK, shard_size=1 << 30)
    assert info.value.tensors == CHANGED
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("group", [CHUNK, 1 << 26])
def test_every_kind_of_tensor_changed_after_the_writes_is_named(
    tmp_path: Path, monkeypatch, group: int
) -> None:
    # many hash groups (each hashed while the one before is written), or one
    monkeypatch.setattr(zstd, "_HASH_GROUP", group)
    state = _state()
    check = _chunks.check_unchanged

    def checking(*args: Any, **kwargs: Any) -> None:
        _mutate(state)
        check(*args, **kwargs)

    monkeypatch.setattr(_chunks, "check_unchanged", checking)
    with pytest.raises(aptckpt.StateChangedError) as info:
        aptckpt.save(state, tmp_path / "c", codec="none", chunk_size=CHUNK, shard_size=100)
    assert info.value.tensors == CHANGED
    assert not (tmp_path / "c").exists()


def test_an_unchanged_raw_save_of_many_tensors_passes_its_check(tmp_path: Path) -> None:
    state = {f"t{i:04d}": torch.full((i % 7,), float(i)) for i in range(1500)}
    aptckpt.save(state, tmp_path / "c", codec="none", chunk_size=CHUNK, shard_size=999)
    assert_state_equal(state, aptckpt.load(tmp_path / "c"))
    aptckpt.verify(tmp_path / "c")
