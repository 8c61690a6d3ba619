"""codecs: pipeline records, round trips, and damaged or hostile frames."""

from __future__ import annotations

import os

import pytest
import zstandard

from aptckpt import _accel
from aptckpt.codecs import RAW, CodecError, Pipeline, scratch
from aptckpt.errors import FormatError

PIPELINES = [RAW, Pipeline(shuffle=4), Pipeline(zstd=True), Pipeline(shuffle=2, zstd=True),
             Pipeline(xor=True, shuffle=8, zstd=True), Pipeline(xor=True),
             Pipeline(shuffle=4, zstd=True, split=3), Pipeline(shuffle=2, zstd=True, split=1),
             Pipeline(xor=True, shuffle=8, zstd=True, split=7)]  # fmt: skip


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
        # split: needs shuffle and zstd, raw_planes an int in 1..itemsize-1, in its place
        [{"id": "split", "raw_planes": 1}, {"id": "zstd"}],
        [{"id": "shuffle", "itemsize": 4}, {"id": "split", "raw_planes": 1}],
        [{"id": "shuffle", "itemsize": 4}, {"id": "split", "raw_planes": 4}, {"id": "zstd"}],
        [{"id": "shuffle", "itemsize": 4}, {"id": "split", "raw_planes": 0}, {"id": "zstd"}],
        [{"id": "shuffle", "itemsize": 4}, {"id": "split", "raw_planes": True}, {"id": "zstd"}],
        [{"id": "shuffle", "itemsize": 4}, {"id": "split"}, {"id": "zstd"}],
        [{"id": "shuffle", "itemsize": 4}, {"id": "zstd"}, {"id": "split", "raw_planes": 1}],
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


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 4095, 4096, 4097, 65536 + 3])
@pytest.mark.parametrize("split", [1, 3])
def test_split_chunks_round_trip_at_every_length(size, split):
    """The raw planes are ``split * (len // itemsize)`` bytes; the frame holds the other planes
    and the ``len % itemsize`` trailing bytes. Decoding from the whole stored bytes and from
    planes read ahead by the caller (what a load does) give the chunk back."""
    pipeline = Pipeline(shuffle=4, zstd=True, split=split)
    raw = memoryview(bytes(os.urandom(size // 2)) + bytes(size - size // 2))
    stored = bytes(pipeline.encode(raw))
    head = pipeline.raw_prefix(size)
    assert head == split * (size // 4)
    shuffled = bytearray(size)
    _accel.shuffle(raw, 4, shuffled)
    assert stored[:head] == shuffled[:head]  # the raw planes, as they are
    assert zstandard.frame_content_size(stored[head:]) == size - head
    out = memoryview(bytearray(size))
    pipeline.decode(stored, out)
    assert bytes(out) == bytes(raw)
    planes = scratch("planes", size)
    planes[:head] = stored[:head]
    out2 = memoryview(bytearray(size))
    pipeline.decode(stored[head:], out2, planes=planes)
    assert bytes(out2) == bytes(raw)


def test_damaged_split_chunks_are_refused():
    pipeline = Pipeline(shuffle=4, zstd=True, split=3)
    raw = memoryview(os.urandom(4000) + bytes(4000))
    stored = bytes(pipeline.encode(raw))
    out = memoryview(bytearray(len(raw)))
    with pytest.raises(CodecError, match="no zstd frame"):
        pipeline.decode(stored[: pipeline.raw_prefix(len(raw))], out)
    with pytest.raises(CodecError):
        pipeline.decode(stored[:-2], out)
    with pytest.raises(CodecError):  # another length: the frame is not where it says
        pipeline.decode(stored, memoryview(bytearray(len(raw) - 4)))


def test_split_needs_shuffle_and_zstd():
    for bad in ({"shuffle": 4, "split": 1}, {"zstd": True, "split": 1},
                {"shuffle": 4, "zstd": True, "split": 4}):  # fmt: skip
        with pytest.raises(ValueError, match="split"):
            Pipeline(**bad)
