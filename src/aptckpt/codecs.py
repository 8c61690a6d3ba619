"""The per-chunk codec pipeline: xor-delta -> byte-shuffle -> zstd.

A :class:`Pipeline` is any subsequence of those three steps, in that order, and
is recorded in the manifest as a list of step records, e.g.
``[{"id": "shuffle", "itemsize": 4}, {"id": "zstd"}]``; the empty pipeline
means the chunk is stored raw. Decoding runs the steps in reverse.

Why this order: xor against the previous version of a chunk zeroes the bytes
that did not change; shuffling groups the bytes of equal significance (sign and
exponent bytes of floats change slowly, so they compress well); zstd then
squeezes both. xor and shuffle are bytewise, so swapping them would give the
same bytes; the order is fixed so the manifest has one spelling.

Every step runs without the GIL (the native core, or zstandard), so chunks are
encoded and decoded in parallel on a thread pool. Scratch buffers are
per-thread and reused: fresh memory costs a page fault per 4 KiB, which is
slower than the copy itself on the reference machine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import zstandard

from aptckpt import _accel
from aptckpt.errors import FormatError, IntegrityError

__all__ = ["MAX_ZSTD_RATIO", "RAW", "CodecError", "Pipeline"]

_STEP_ORDER = ("xor", "shuffle", "zstd")
_MAX_ITEMSIZE = 16

#: No zstd frame decodes to more than this many times its own size: a block
#: regenerates at most 128 KiB and the smallest block (RLE) takes 4 bytes. A
#: reader refuses a chunk record claiming more before it allocates anything,
#: so a hostile manifest cannot make it reserve memory no file could fill.
MAX_ZSTD_RATIO = (128 << 10) // 4


class CodecError(IntegrityError):
    """Stored bytes could not be decoded: the chunk is damaged."""


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, bytearray] = {}
        self.compressors: dict[int, zstandard.ZstdCompressor] = {}
        self.decompressor = zstandard.ZstdDecompressor()

    def buffer(self, name: str, size: int) -> memoryview:
        buf = self.buffers.get(name)
        if buf is None or len(buf) < size:
            buf = self.buffers[name] = bytearray(size)
        return memoryview(buf)[:size]

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        cctx = self.compressors.get(level)
        if cctx is None:
            cctx = self.compressors[level] = zstandard.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False
            )
        return cctx


_scratch = _Scratch()


@dataclass(frozen=True)
class Pipeline:
    """Which steps a chunk went through; ``shuffle`` is the element size (0: none)."""

    xor: bool = False
    shuffle: int = 0
    zstd: bool = False

    def to_record(self) -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = []
        if self.xor:
            steps.append({"id": "xor"})
        if self.shuffle:
            steps.append({"id": "shuffle", "itemsize": self.shuffle})
        if self.zstd:
            steps.append({"id": "zstd"})
        return steps

    @classmethod
    def from_record(cls, record: object, *, where: str | None = None) -> Pipeline:
        """Parse and validate a step list read from a manifest."""
        if not isinstance(record, list):
            raise FormatError(f"codec pipeline {record!r} is not a list", path=where)
        ids = []
        shuffle = 0
        for step in record:
            step_id = step.get("id") if isinstance(step, dict) else None
            if step_id not in _STEP_ORDER:
                raise FormatError(
                    f"unknown codec step {step!r}; this aptckpt knows {', '.join(_STEP_ORDER)} "
                    "(a newer aptckpt may be needed)",
                    path=where,
                )
            if step_id == "shuffle":
                shuffle = step.get("itemsize")
                if type(shuffle) is not int or not 2 <= shuffle <= _MAX_ITEMSIZE:
                    raise FormatError(f"bad shuffle itemsize {shuffle!r}", path=where)
            ids.append(step_id)
        if ids != [s for s in _STEP_ORDER if s in ids]:
            raise FormatError(f"codec steps {ids} are out of order or repeated", path=where)
        return cls(xor="xor" in ids, shuffle=shuffle, zstd="zstd" in ids)

    def max_raw_size(self, stored: int) -> int:
        """The most raw bytes ``stored`` bytes encoded with this pipeline can hold."""
        return stored * MAX_ZSTD_RATIO if self.zstd else stored

    def describe(self) -> str:
        """Short human name, e.g. ``shuffle4+zstd`` or ``raw``."""
        names = [
            n
            for n, on in (
                ("xor", self.xor),
                (f"shuffle{self.shuffle}", self.shuffle),
                ("zstd", self.zstd),
            )
            if on
        ]
        return "+".join(names) or "raw"

    def encode(self, raw: memoryview, *, level: int = 1, base: memoryview | None = None) -> Any:
        """Encode one chunk; returns a buffer valid until the next call on this thread."""
        data: Any = raw
        if self.xor:
            if base is None or len(base) != len(raw):
                raise ValueError("xor step needs a base chunk of the same length")
            out = _scratch.buffer("xor", len(raw))
            _accel.xor(raw, base, out)
            data = out
        if self.shuffle:
            out = _scratch.buffer("shuffle", len(raw))
            _accel.shuffle(data, self.shuffle, out)
            data = out
        if self.zstd:
            data = _scratch.compressor(level).compress(data)
        return data

    def decode(self, stored: Any, out: memoryview, *, base: memoryview | None = None) -> None:
        """Decode ``stored`` into ``out`` (exactly the chunk's raw length)."""
        data: Any = stored
        if self.zstd:
            data = _decompress(stored, len(out))
        elif len(data) != len(out):
            raise CodecError(f"stored chunk is {len(data)} bytes, expected {len(out)}")
        if self.shuffle:
            target = _scratch.buffer("unshuffle", len(out)) if self.xor else out
            _accel.unshuffle(data, self.shuffle, target)
            data = target
        if self.xor:
            if base is None or len(base) != len(out):
                raise ValueError("xor step needs a base chunk of the same length")
            _accel.xor(data, base, out)
        elif data is not out:
            out[:] = data


def _decompress(stored: Any, expected: int) -> Any:
    # Check the declared size before decompressing: a hostile frame header may
    # announce terabytes, and zstandard would allocate what it announces.
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as err:
        raise CodecError(f"not a zstd frame ({err})") from err
    if declared != expected:
        raise CodecError(f"zstd frame declares {declared} bytes, expected {expected}")
    try:
        data = _scratch.decompressor.decompress(stored, max_output_size=expected)
    except zstandard.ZstdError as err:
        raise CodecError(f"zstd frame is damaged ({err})") from err
    if len(data) != expected:
        raise CodecError(f"zstd frame decoded to {len(data)} bytes, expected {expected}")
    return data


RAW = Pipeline()
