"""codecs: pipeline records, round trips, and damaged or hostile frames."""

from __future__ import annotations

import os

import pytest
import zstandard

from aptckpt.codecs import RAW, CodecError, Pipeline
from aptckpt.errors import FormatError

PIPELINES = [RAW, Pipeline(shuffle=4), Pipeline(zstd=True), Pipeline(shuffle=2, zstd=True),
             Pipeline(xor=True, shuffle=8, zstd=True), Pipeline(xor=True)]  # fmt: skip


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.describe())
def test_roundtrip(pipeline):
    raw = memoryview(os.urandom(1000) + bytes(1000))
    base = memoryview(os.urandom(2000))
    stored = bytes(pipeline.encode(raw, base=base))
    out = memoryview(bytearray(len(raw)))
    pipeline.decode(stored, out, base=base)
    assert bytes(out) == bytes(raw)
    assert Pipeline.from_record(pipeline.to_record()) == pipeline


@pytest.mark.parametrize(
    "record",
    [
        "zstd",
        [{"id": "lz4"}],
        [{"id": "zstd"}, {"id": "shuffle", "itemsize": 4}],
        [{"id": "zstd"}, {"id": "zstd"}],
        [{"id": "shuffle", "itemsize": 1000}],
        [{"id": "shuffle"}],
        [7],
    ],
)
def test_bad_records_refused(record):
    with pytest.raises(FormatError):
        Pipeline.from_record(record)


def test_damaged_and_hostile_frames():
    z = Pipeline(zstd=True)
    out = memoryview(bytearray(100))
    good = zstandard.ZstdCompressor().compress(bytes(100))
    with pytest.raises(CodecError):
        z.decode(b"not zstd at all", out)
    with pytest.raises(CodecError, match="declares"):
        z.decode(zstandard.ZstdCompressor().compress(bytes(101)), out)
    with pytest.raises(CodecError):
        z.decode(good[:-3], out)
    with pytest.raises(CodecError, match="expected 100"):
        RAW.decode(b"short", out)
    # A frame header announcing 1 TiB is refused before anything is allocated.
    huge = zstandard.ZstdCompressor(write_content_size=True)
    frame = bytearray(huge.compress(bytes(64)))
    with pytest.raises(CodecError):
        z.decode(bytes(frame[:4]) + b"\xff" * 12, out)
