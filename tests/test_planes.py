"""backends/_planes: what ``codec="auto"`` stores per chunk, and checkpoints saved with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import aptckpt
from aptckpt.backends import _planes
from aptckpt.codecs import RAW, Pipeline
from aptckpt.errors import IntegrityError
from aptckpt.manifest import decode
from aptckpt.testing import assert_state_equal

SAMPLE_FROM = _planes.SAMPLE_FROM


def _weights(dtype: torch.dtype, nbytes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = nbytes // torch.empty(0, dtype=dtype).element_size()
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(n, generator=g, dtype=wide) * 0.02).to(dtype)


def _small_ints() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 1 << 16, (1 << 17,), dtype=torch.int64, generator=g)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _encode(t: torch.Tensor) -> tuple[Pipeline, bytes]:
    pipeline, stored = _planes.encode(_bytes(t), t.element_size(), 1)
    return pipeline, bytes(stored)


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        # floats: the mantissa planes are noise, the sign/exponent plane compresses
        (_weights(torch.float32, 1 << 20), Pipeline(shuffle=4, zstd=True, split=3)),
        (_weights(torch.bfloat16, 1 << 20), Pipeline(shuffle=2, zstd=True, split=1)),
        (_weights(torch.float64, 1 << 20), Pipeline(shuffle=8, zstd=True, split=6)),
        # small integers: the low planes vary, the high ones are zero
        (_small_ints(), Pipeline(shuffle=8, zstd=True, split=2)),
        # every plane compresses: compressed whole, as codec="zstd" does
        (torch.zeros(1 << 18, dtype=torch.float32), Pipeline(shuffle=4, zstd=True)),
        # nothing compresses: raw, not even shuffled
        (torch.frombuffer(bytearray(os.urandom(1 << 20)), dtype=torch.float32), RAW),
        (torch.frombuffer(bytearray(os.urandom(1 << 20)), dtype=torch.uint8), RAW),
        (torch.zeros(1 << 20, dtype=torch.uint8), Pipeline(zstd=True)),
    ],
    ids=["fp32", "bf16", "fp64", "int64-small", "zeros", "random-fp32", "random-u8", "zeros-u8"],
)
def test_each_plane_is_compressed_only_when_it_compresses(tensor, expected):
    pipeline, stored = _encode(tensor)
    assert pipeline == expected
    out = memoryview(bytearray(tensor.numel() * tensor.element_size()))
    pipeline.decode(stored, out)
    assert bytes(out) == bytes(_bytes(tensor))
    if pipeline != RAW:
        assert len(stored) <= (1 - _planes.MIN_SAVING) * len(out)


@pytest.mark.parametrize("nbytes", [16, SAMPLE_FROM - 16, SAMPLE_FROM, SAMPLE_FROM + 16])
def test_chunks_around_the_sampling_threshold(nbytes):
    """Below SAMPLE_FROM a chunk is tried whole; from it on, plane by plane."""
    weights = _weights(torch.float32, nbytes)
    pipeline, stored = _encode(weights)
    if nbytes < SAMPLE_FROM:
        assert pipeline in (RAW, Pipeline(shuffle=4, zstd=True))
    else:
        assert pipeline == Pipeline(shuffle=4, zstd=True, split=3)
    out = memoryview(bytearray(nbytes))
    pipeline.decode(stored, out)
    assert bytes(out) == bytes(_bytes(weights))
    zeros = torch.zeros(nbytes // 4)  # a frame costs ~20 bytes: 16 zero bytes stay raw
    assert _encode(zeros)[0] == (Pipeline(shuffle=4, zstd=True) if nbytes > 64 else RAW)
    noise = torch.frombuffer(bytearray(os.urandom(nbytes)), dtype=torch.float32)
    assert _encode(noise)[0] == RAW


def _state() -> dict[str, object]:
    return {
        "fp32": _weights(torch.float32, (1 << 20) + 36),  # two chunks, the last short
        "bf16": _weights(torch.bfloat16, 300_000, seed=2).reshape(-1, 50),
        "ids": torch.arange(70_000, dtype=torch.int64),
        "noise": torch.frombuffer(bytearray(os.urandom(200_000)), dtype=torch.uint8),
        "tiny": torch.ones(3),
        "empty": torch.empty(0, 5),
        "step": 7,
    }


def test_auto_checkpoints_round_trip_and_are_no_larger_than_zstd(tmp_path):
    state = _state()
    for codec in ("auto", "zstd"):
        aptckpt.save(state, tmp_path / codec, codec=codec, chunk_size=1 << 20)
        assert_state_equal(aptckpt.load(tmp_path / codec), state)
        assert_state_equal(aptckpt.load(tmp_path / codec, mmap=True), state)
        aptckpt.verify(tmp_path / codec)
    size = {c: sum(f.stat().st_size for f in (tmp_path / c).iterdir()) for c in ("auto", "zstd")}
    assert size["auto"] <= 1.02 * size["zstd"]
    names = _codec_names(tmp_path / "auto")  # floats split, noise raw, the arange whole
    assert {"shuffle4+split3+zstd", "shuffle2+split1+zstd", "raw", "shuffle8+zstd"} <= set(names)
    view = aptckpt.open(tmp_path / "auto")
    assert torch.equal(view.get_slice("fp32")[1000:1010], state["fp32"][1000:1010])
    assert torch.equal(view.get_slice("fp32")[-3:], state["fp32"][-3:])
    into = {k: torch.empty_like(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    aptckpt.load(tmp_path / "auto", into=into)
    for key, tensor in into.items():
        assert torch.equal(tensor, state[key])


def _split_chunk(path: Path) -> tuple[Path, int, int, int]:
    """(shard, offset, raw-planes length, stored length) of the first split chunk."""
    manifest = decode((path / "manifest.msgpack").read_bytes())
    payload = manifest.payload
    codecs = [Pipeline.from_record(c) for c in payload["codecs"]]
    for record, rows in zip(manifest.tensors, payload["chunks"], strict=True):
        for index, row in enumerate(rows):
            pipeline = codecs[row[3]]
            if pipeline.split:
                raw_len = min(payload["chunk_size"], record.nbytes - index * payload["chunk_size"])
                shard = path / manifest.files[row[0]].path
                return shard, row[1], pipeline.raw_prefix(raw_len), row[2]
    raise AssertionError("no split chunk")


@pytest.mark.parametrize("where", ["raw planes", "zstd frame"])
def test_damage_anywhere_in_a_split_chunk_is_named(tmp_path, where):
    state = {"w": _weights(torch.float32, 1 << 20)}
    aptckpt.save(state, tmp_path / "c", codec="auto", chunk_size=1 << 20)
    shard, offset, head, length = _split_chunk(tmp_path / "c")
    at = offset + (head // 2 if where == "raw planes" else head + (length - head) // 2)
    with open(shard, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
    for check in (lambda: aptckpt.load(tmp_path / "c"), lambda: aptckpt.verify(tmp_path / "c")):
        with pytest.raises(IntegrityError, match="state\\['w'\\], chunk 0"):
            check()


def _codec_names(path: Path) -> list[str]:
    manifest = decode((path / "manifest.msgpack").read_bytes())
    codecs = [Pipeline.from_record(c).describe() for c in manifest.payload["codecs"]]
    return [codecs[row[3]] for rows in manifest.payload["chunks"] for row in rows]
