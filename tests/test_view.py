"""``aptckpt.open`` (lazy, partial reads) and ``load(keys=...)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt import manifest as mf

BACKENDS = [
    ("zstd", {"chunk_size": 1024}),
    ("zstd", {"codec": "none", "chunk_size": 1024}),
    ("torch", {}),
    ("delta", {"chunk_size": 1024, "local_below": 0}),
    ("delta", {"chunk_size": 1024}),  # small tensors in the checkpoint's own shard
]
W = torch.arange(4096 * 8, dtype=torch.float32).reshape(4096, 8)


def _state() -> dict[str, Any]:
    return {
        "model": {"0.weight": W.clone(), "b": torch.ones(3, dtype=torch.bfloat16)},
        "step": 5,
        "names": ["a", "b"],
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture(params=BACKENDS, ids=lambda b: f"{b[0]}-{'-'.join(map(str, b[1].values()))}")
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    backend, options = request.param
    path = tmp_path / "run" / "ck"
    aptckpt.save(_state(), path, backend=backend, metadata={"note": "v"}, **options)
    return path


INDEXES = [
    (slice(10, 20),),
    (Ellipsis, 3),
    (5, slice(1, 7, 2)),
    (slice(4000, 5000, 7),),
    (-1,),
    (slice(None), slice(-3, None)),
    (slice(7, 7),),
    (slice(1023, 1025),),  # across a chunk boundary (1024 bytes = 32 rows)
]


def test_keys_get_and_slices_match_the_tensors(saved: Path) -> None:
    with aptckpt.open(saved) as view:
        assert view.keys() == [
            "state['model']['0.weight']",
            "state['model']['b']",
            "state['scalar']",
            "state['empty']",
        ]
        assert view.metadata == {"note": "v"}
        assert "model" in view and ("model", "b") in view and "nothing" not in view
        assert torch.equal(view.get(("model", "0.weight")), W)
        assert torch.equal(view.get_tensor("state['model']['b']"), torch.ones(3).bfloat16())
        sliced = view.get_slice(("model", "0.weight"))
        assert sliced.get_shape() == [4096, 8]
        for index in INDEXES:
            assert torch.equal(sliced[index], W[index]), index
        assert view.get_slice("scalar")[()].item() == 2.5
        assert view.get_slice("empty")[:, 1:3].shape == (0, 2)
        assert view.get("step") == 5 and view.get("names") == ["a", "b"]
        assert torch.equal(view.get("model")["0.weight"], W)


def test_load_keys_reads_a_subset(saved: Path) -> None:
    got = aptckpt.load(saved, keys=["step", ("model", "b"), "state['scalar']"])
    assert list(got) == ["state['step']", "state['model']['b']", "state['scalar']"]
    assert got["state['step']"] == 5
    assert torch.equal(got["state['scalar']"], torch.tensor(2.5))


def test_bad_keys_and_indexes_are_clear(saved: Path) -> None:
    with aptckpt.open(saved) as view:
        with pytest.raises(KeyError, match="holds nothing at state\\['modl'\\]"):
            view.get("modl")
        with pytest.raises(TypeError, match="not a tensor"):
            view.get_slice("step")
        sliced = view.get_slice(("model", "0.weight"))
        with pytest.raises(IndexError, match="out of range"):
            sliced[4096]
        with pytest.raises(IndexError, match="3 indices"):
            sliced[1, 2, 3]
        with pytest.raises(TypeError, match="basic indexing"):
            sliced[torch.tensor([1, 2])]
    with pytest.raises(ValueError, match="keys="):
        aptckpt.load(saved, keys=["step"], into={})


def _flip_byte_of_last_chunk(path: Path) -> None:
    """Damage the last stored byte of tensor 0's last chunk in its shard file."""
    doc = mf.decode((path / mf.MANIFEST_NAME).read_bytes())
    file, offset, length = doc.payload["chunks"][0][-1][:3]
    victim = path / doc.files[file].path
    data = bytearray(victim.read_bytes())
    data[offset + length - 1] ^= 0xFF
    victim.write_bytes(bytes(data))


@pytest.mark.parametrize("options", [{}, {"codec": "none"}], ids=["zstd", "raw"])
def test_a_slice_reads_and_verifies_only_its_chunks(tmp_path: Path, options: Any) -> None:
    path = tmp_path / "ck"
    aptckpt.save({"w": W}, path, chunk_size=1024, **options)
    _flip_byte_of_last_chunk(path)
    with aptckpt.open(path) as view:
        assert torch.equal(view.get_slice("w")[:100], W[:100])  # far from the damage
        with pytest.raises(aptckpt.IntegrityError):
            view.get_slice("w")[-1]
        with pytest.raises(aptckpt.IntegrityError):
            view.get("w")


def test_a_delta_slice_reads_only_its_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aptckpt.objectstore import ObjectStore

    path = tmp_path / "run" / "ck"
    # loose objects (the reads counted are one per object file); "b" in the local shard
    options = {"chunk_size": 1024, "pack_below": 0, "local_below": 16 << 10}
    aptckpt.save({"w": W, "b": torch.ones(3)}, path, backend="delta", **options)
    read: list[bytes] = []
    for name in ("read", "read_into"):
        original = getattr(ObjectStore, name)

        def counted(store: Any, digest: bytes, *args: Any, _original: Any = original) -> Any:
            read.append(digest)
            return _original(store, digest, *args)

        monkeypatch.setattr(ObjectStore, name, counted)
    with aptckpt.open(path) as view:
        assert torch.equal(view.get_slice("w")[1023:1025], W[1023:1025])  # chunks 31 and 32
        assert len(read) == 2
        assert torch.equal(view.get("b"), torch.ones(3))  # the local shard: no object
        assert len(read) == 2
        assert torch.equal(view.get("w"), W)
        assert len(read) == 2 + W.nbytes // 1024


def test_open_on_object_storage_reads_ranges(memory_url: str) -> None:
    url = f"{memory_url}/ck"
    aptckpt.save({"w": W, "n": 1}, url, chunk_size=1024, codec="none")
    with aptckpt.open(url) as view:
        assert torch.equal(view.get_slice("w")[2048:2050, 3:5], W[2048:2050, 3:5])
        assert view.get("n") == 1


def test_a_slice_on_object_storage_fetches_its_chunks_not_a_window(
    memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aptckpt.storage.remote import _store

    url = f"{memory_url}/ck"
    noisy = (torch.randn(4096, 8, generator=torch.Generator().manual_seed(0)) * 8).round()
    aptckpt.save({"w": noisy}, url, chunk_size=1024)  # 128 compressed chunks, one shard
    assert aptckpt.inspect(url).stored_bytes < noisy.nbytes * 0.9
    fetched: list[int] = []
    original = _store.Store.cat

    def cat(store: Any, path: str, start: Any = None, end: Any = None) -> bytes:
        data = original(store, path, start, end)
        if "shard" in path:
            fetched.append(len(data))
        return data

    monkeypatch.setattr(_store.Store, "cat", cat)
    with aptckpt.open(url) as view:
        assert torch.equal(view.get_slice("w")[1023:1025], noisy[1023:1025])  # two chunks
        assert 0 < sum(fetched) <= 2 * 1024 and len(fetched) == 1  # those chunks, no more
        fetched.clear()
        assert torch.equal(view.get("w"), noisy)
        assert len(fetched) == 1  # a scan: one window (a part) holds the whole shard


def test_open_a_checkpoint_saved_by_two_ranks() -> None:
    golden = Path(__file__).parent / "golden" / "v4" / "zstd"
    matrix = torch.arange(15, dtype=torch.float32).reshape(5, 3) / 7  # rows 0-2 rank 0, 3-4 rank 1
    with aptckpt.open(golden) as view:
        assert view.world_size == 2
        assert torch.equal(view.get_slice("matrix")[2:4], matrix[2:4])  # across both boxes
        assert torch.equal(view.get("mine"), torch.tensor([0, 0], dtype=torch.int16))
    with aptckpt.open(golden, rank=1) as view:
        assert torch.equal(view.get("mine"), torch.tensor([1, 10], dtype=torch.int16))
        assert view.get("note") == "rank 1"
