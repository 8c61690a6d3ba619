"""Tunables, in one place.

Defaults chosen from measurements on the reference machine (see
``shared/research/baselines.md``): 4 MiB chunks are large enough that per-frame
zstd overhead vanishes and small enough to spread over a thread pool.
"""

from __future__ import annotations

import os

#: Bytes per chunk: the unit of hashing, compression, deduplication and parallelism.
DEFAULT_CHUNK_SIZE = 4 << 20
#: Target size of one shard file of the ``zstd`` backend.
DEFAULT_SHARD_SIZE = 512 << 20
#: zstd level: once byte-shuffled, float data compresses better *and* faster at 1 than at 3.
DEFAULT_ZSTD_LEVEL = 1
#: ``delta`` backend: every this many saves along a base chain, one stores no
#: xor-delta, so loading a chunk decodes at most this many objects.
DEFAULT_KEYFRAME_EVERY = 8
#: ``delta`` backend: an xor link must beat compressing the chunk alone by this
#: fraction per link of its chain (each link costs a decode on every load).
DELTA_CHAIN_PENALTY = 0.1
#: ``delta`` backend: new objects of fewer stored bytes go into the save's one pack file
#: (a loose object costs a file, an fsync and a rename; 1 MiB is written in about the
#: time of one fsync here).
DEFAULT_PACK_BELOW = 1 << 20
#: ``delta`` backend: a save that would reach less than this fraction of a pack's bytes
#: copies the objects it reaches into its own pack instead, so every pack a committed
#: checkpoint reaches is at least this full with live objects (bounded waste, no
#: rewriting by garbage collection).
DELTA_PACK_MIN_USE = 0.5
#: ``delta`` backend: default bytes of raw chunks kept in memory between saves of one
#: process (``APTCKPT_DELTA_CACHE_BYTES``), so the next save deltas against them
#: without decoding their chains from the store. 0 disables.
DEFAULT_DELTA_CACHE_BYTES = 1 << 30
#: Largest manifest a reader accepts (a manifest of 10 million chunks is ~400 MB).
MAX_MANIFEST_BYTES = 1 << 30
#: ``bytes`` and ``str`` values this long or longer (in UTF-8) are stored as data (a uint8
#: tensor: chunked, compressed, verified), not inline in the manifest.
MAX_INLINE_BYTES = 64 << 10
#: Deepest container nesting of a state (the skeleton must stay within msgpack's stack).
MAX_NESTING = 200
#: Largest chunk size a writer may choose, and so a reader accepts.
MAX_CHUNK_SIZE = 1 << 30


def threads() -> int:
    """Worker threads for parallel work: ``APTCKPT_THREADS`` or the usable CPUs."""
    env = os.environ.get("APTCKPT_THREADS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value >= 1:
            return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def direct_io() -> bool:
    """Whether data files are written with ``O_DIRECT`` (``APTCKPT_DIRECT_IO``, default on;
    ``0``, ``false``, ``no`` or ``off`` turn it off). Where the file system refuses it, writes
    are buffered whatever this says."""
    value = os.environ.get("APTCKPT_DIRECT_IO", "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


def delta_cache_bytes() -> int:
    """Bytes of raw chunks the ``delta`` backend may keep between saves."""
    env = os.environ.get("APTCKPT_DELTA_CACHE_BYTES", "").strip()
    try:
        return max(0, int(env)) if env else DEFAULT_DELTA_CACHE_BYTES
    except ValueError:
        return DEFAULT_DELTA_CACHE_BYTES


#: Object stores: bytes per uploaded part of a data file (S3 takes parts of 5 MiB and up,
#: 10,000 parts at most: 16 MiB parts reach 160 GB per file).
REMOTE_PART_SIZE = 16 << 20
#: Object stores: parts of one data file uploading at once (memory: one more part, filling).
REMOTE_PARTS_IN_FLIGHT = 4
#: Object stores: tries of one request that failed transiently (5xx, throttling, a dropped
#: connection, a timeout) before the error is raised; waits double from
#: REMOTE_RETRY_WAIT seconds up to REMOTE_RETRY_WAIT_MAX, with jitter.
REMOTE_TRIES = 6
REMOTE_RETRY_WAIT = 0.2
REMOTE_RETRY_WAIT_MAX = 10.0
#: Object stores: what a save that died left (data without a manifest naming it) is removed
#: once its newest object is this old (``APTCKPT_REMOTE_GRACE_S``): no save in flight
#: goes that long without finishing an object.
DEFAULT_REMOTE_GRACE_S = 3600.0


def remote_grace_s() -> float:
    """Seconds after which unreferenced data on an object store counts as debris."""
    env = os.environ.get("APTCKPT_REMOTE_GRACE_S", "").strip()
    try:
        return max(0.0, float(env)) if env else DEFAULT_REMOTE_GRACE_S
    except ValueError:
        return DEFAULT_REMOTE_GRACE_S
