"""``codec="auto"``: compress the byte planes of a chunk that compress, store the rest raw.

Once a chunk of floats is byte-shuffled, its planes differ sharply: the planes of low mantissa
bytes are noise (zstd stores them as raw blocks: compressing them costs time and saves nothing),
the plane holding sign and exponent compresses to about a third. Compressing all of them costs
a save several times the CPU of compressing the exponent plane alone, and a load decodes bytes
that were never made smaller. So each chunk is looked at before it is encoded: a sample of each
plane is compressed, and

* the leading planes whose sample does not shrink by :data:`MIN_SAVING` are stored raw, ahead
  of one zstd frame of the other planes (the ``split`` codec step, ``docs/format.md`` 5.1);
* a chunk none of whose planes shrink is stored raw as it is (not even shuffled: a load reads
  it straight into its tensor);
* a chunk whose every plane shrinks is shuffled and compressed whole, as ``codec="zstd"`` does.

Chunks too small to sample (below :data:`SAMPLE_FROM`) are compressed whole and kept only if
they shrink by :data:`MIN_SAVING`. The sample costs a few percent of compressing the chunk.
At level 1 (the default) the frame of a split chunk (the sign and exponent planes of floats,
the high planes of integers) is compressed with :data:`aptckpt.codecs.PLANES`, zstd settings
tuned for such planes; the samples and whole chunks use the level as it is (their long-range
matches, as in text or repeated rows, need zstd's own match finder).
"""

from __future__ import annotations

from typing import Any

from aptckpt import _accel
from aptckpt.codecs import PLANES, RAW, Pipeline, compress_level, scratch

__all__ = ["MIN_SAVING", "SAMPLE_FROM", "encode"]

#: A plane (or small chunk) is compressed only if that saves at least this share of its bytes.
MIN_SAVING = 0.1
#: Chunks at least this large are sampled plane by plane; smaller ones are tried whole.
SAMPLE_FROM = 64 << 10
#: Each plane's sample: this many slices of :data:`_SLICE` bytes spread over the plane.
_SLICES = 4
_SLICE = 4 << 10


def _shrinks(data: memoryview, level: int) -> bool:
    return len(compress_level(level).compress(data)) <= (1 - MIN_SAVING) * len(data)


def _sample(plane: memoryview) -> Any:
    if len(plane) <= 2 * _SLICES * _SLICE:  # small: the whole plane (slices would overlap)
        return plane
    step = len(plane) // _SLICES
    return b"".join(plane[i * step : i * step + _SLICE] for i in range(_SLICES))


def encode(data: memoryview, itemsize: int, level: int) -> tuple[Pipeline, Any]:
    """Chunk ``data`` (elements of ``itemsize`` bytes) encoded as ``codec="auto"`` does
    (see the module doc): its pipeline and stored bytes (``data`` itself when raw; else a
    buffer valid until the next call on this thread)."""
    shuffle = itemsize if 2 <= itemsize <= 16 else 0
    if len(data) < SAMPLE_FROM:
        whole = Pipeline(shuffle=shuffle, zstd=True)
        return _kept(whole, whole.encode(data, level=level), data)
    if not shuffle:
        if not _shrinks(memoryview(_sample(data)), level):
            return RAW, data
        whole = Pipeline(zstd=True)
        return _kept(whole, whole.encode(data, level=level), data)
    shuffled = scratch("shuffle", len(data))
    _accel.shuffle(data, shuffle, shuffled)
    n = len(data) // shuffle
    raw_planes = 0
    for plane in range(shuffle):
        if _shrinks(memoryview(_sample(shuffled[plane * n : (plane + 1) * n])), level):
            break
        raw_planes += 1
    if raw_planes == shuffle:
        return RAW, data
    pipeline = Pipeline(shuffle=shuffle, zstd=True, split=raw_planes)
    planes: int | str = PLANES if raw_planes and level == 1 else level
    return _kept(pipeline, pipeline.encode(data, level=planes, shuffled=shuffled), data)


def _kept(pipeline: Pipeline, encoded: Any, data: memoryview) -> tuple[Pipeline, Any]:
    """``pipeline`` and ``encoded`` if that saves :data:`MIN_SAVING`, else raw."""
    if len(encoded) <= (1 - MIN_SAVING) * len(data):
        return pipeline, encoded
    return RAW, data
