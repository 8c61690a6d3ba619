"""Every writer and reader at the edges of its buffers, chunks and shards: a tensor (or a file)
of 0, 1, n-1, n, n+1 and k*n bytes for every size n the code cuts data by -- the 8 MiB bounce
buffer of O_DIRECT writes, the 4 KiB block its tail is padded to, chunk sizes, shard sizes, the
16 MiB slice of parallel positional writes, the 1 MiB / 1,024-buffer groups of verified reads --
saves, loads (copying, into=, mmap=True) and verifies bit-exactly, with and without O_DIRECT."""

from __future__ import annotations

import pytest
import torch

import aptckpt
from aptckpt.storage.local import _directio
from aptckpt.testing import assert_state_equal

MIB = 1 << 20
BUFFER = _directio.BUFFER_SIZE
SLICE = 16 * MIB  # kSliceBytes of cpp/parallel_io.cpp: one pwrite_many task


def _random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` incompressible bytes: zstd stores their chunks raw, as long as the data."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def _round_trip(state: dict[str, torch.Tensor], path, **options) -> None:
    aptckpt.save(state, path, **options)
    assert_state_equal(state, aptckpt.load(path))
    aptckpt.verify(path)
    into = {k: torch.empty_like(v) for k, v in state.items()}
    aptckpt.load(path, into=into)
    assert_state_equal(state, into)
    if options.get("backend", "zstd") == "zstd":
        assert_state_equal(state, aptckpt.load(path, mmap=True))


@pytest.fixture(params=["direct", "buffered"])
def io_mode(request, monkeypatch):
    monkeypatch.setenv("APTCKPT_DIRECT_IO", "1" if request.param == "direct" else "0")
    return request.param


@pytest.mark.parametrize(
    ("nbytes", "options"),
    [
        (n, options)
        for n in (BUFFER - 1, BUFFER, BUFFER + 1, 2 * BUFFER)
        for options in ({"codec": "none"}, {"codec": "zstd"}, {"backend": "delta"})
    ]
    # the parallel write slice cuts only raw shards written without O_DIRECT
    + [(n, {"codec": "none"}) for n in (SLICE - 1, SLICE + 1)],
    ids=lambda v: str(v) if isinstance(v, int) else "-".join(map(str, v.values())),
)
def test_data_files_around_the_bounce_buffer_and_write_slice(tmp_path, io_mode, nbytes, options):
    # A 2048x1024 float32 tensor is exactly one 8 MiB buffer: it failed to save with O_DIRECT.
    _round_trip({"w": _random_bytes(nbytes)}, tmp_path / "c", **options)
    if options.get("codec"):
        shard = tmp_path / "c" / "shard-00000.bin"
        assert shard.stat().st_size == nbytes  # incompressible chunks are stored raw


def test_a_float_weight_of_exactly_one_bounce_buffer(tmp_path, io_mode):
    state = {"w": torch.randn(2048, 1024)}
    for codec in ("none", "zstd"):
        _round_trip(state, tmp_path / codec, codec=codec)


def _torch_state(nbytes: int, extra: int) -> dict[str, torch.Tensor]:
    state = {"w": _random_bytes(nbytes)}
    state.update({f"x{i}": torch.zeros(1, dtype=torch.uint8) for i in range(extra)})
    return state


def _torch_file_size(path, state: dict[str, torch.Tensor]) -> int:
    aptckpt.save(state, path, backend="torch", overwrite=True)
    (file,) = [p for p in path.iterdir() if p.name != "manifest.msgpack"]
    return file.stat().st_size


@pytest.fixture(scope="module")
def torch_residues(tmp_path_factory) -> dict[int, int]:
    """File size modulo 64 -> how many extra one-byte tensors give it. torch's zip aligns every
    record to 64 bytes, so the file's size modulo 64 is set by the records after the data --
    one central directory entry per tensor -- and the data size moves it by 64-byte steps."""
    path = tmp_path_factory.mktemp("probe") / "c"
    residues: dict[int, int] = {}
    for extra in range(64):
        residues.setdefault(_torch_file_size(path, _torch_state(1000, extra)) % 64, extra)
    return residues


def _torch_state_of_file_size(
    path, file_size: int, residues: dict[int, int]
) -> dict[str, torch.Tensor]:
    """A state whose torch file is ``file_size`` bytes (or the next size the zip can make)."""
    target = next(file_size + d for d in range(64) if (file_size + d) % 64 in residues)
    extra = residues[target % 64]
    nbytes = target - (_torch_file_size(path, _torch_state(1000, extra)) - 1000)
    for _ in range(4):
        size = _torch_file_size(path, _torch_state(nbytes, extra))
        if size == target:
            return _torch_state(nbytes, extra)
        nbytes += target - size
    raise AssertionError(f"no state gives a torch file of {target} bytes")


@pytest.mark.parametrize("file_size", [BUFFER - 1, BUFFER, BUFFER + 1, 2 * BUFFER])
def test_torch_files_around_the_bounce_buffer(tmp_path, io_mode, file_size, torch_residues):
    state = _torch_state_of_file_size(tmp_path / "probe", file_size, torch_residues)
    _round_trip(state, tmp_path / "c", backend="torch")


CHUNK = 64 << 10


@pytest.mark.parametrize("nbytes", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("shard_size", [1, CHUNK, CHUNK + 1, 2 * CHUNK])
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_chunks_and_shards_around_their_sizes(tmp_path, nbytes, shard_size, codec):
    state = {
        "a": _random_bytes(nbytes, seed=1),
        "b": torch.zeros(nbytes, dtype=torch.uint8),  # compressible: zstd frames
        "c": _random_bytes(CHUNK, seed=2),
    }
    _round_trip(state, tmp_path / "c", codec=codec, chunk_size=CHUNK, shard_size=shard_size)


@pytest.mark.parametrize("nbytes", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_delta_chunks_around_their_size(tmp_path, nbytes):
    state = {"a": _random_bytes(nbytes, seed=1), "b": torch.zeros(nbytes, dtype=torch.uint8)}
    _round_trip(state, tmp_path / "c0", backend="delta", chunk_size=CHUNK)
    state["a"][: nbytes // 2] += 1  # a delta save against the first
    _round_trip(state, tmp_path / "c1", backend="delta", chunk_size=CHUNK)


@pytest.mark.parametrize("count", [1023, 1024, 1025])
def test_verified_reads_around_the_iovec_limit(tmp_path, count):
    # Adjacent raw chunks of one file are read by one preadv of at most 1,024 buffers.
    state = {f"t{i}": _random_bytes(16, seed=i) for i in range(count)}
    _round_trip(state, tmp_path / "c", codec="none")


@pytest.mark.parametrize("chunks", [15, 16, 17, 32])
def test_verified_reads_around_the_group_size(tmp_path, chunks):
    # ... and of at most about 1 MiB: 16 chunks of 64 KiB fill one group exactly.
    state = {"w": _random_bytes(chunks * CHUNK)}
    _round_trip(state, tmp_path / "c", codec="none", chunk_size=CHUNK)
