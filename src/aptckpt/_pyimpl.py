"""Pure-Python twin of the compiled core ``aptckpt._native``: its executable specification.

Every function has the signature, the results (byte for byte) and the exceptions of its C++
counterpart in ``cpp/``; the function list and semantics are defined in :mod:`aptckpt._accel`,
which picks one of the two (``APTCKPT_NATIVE=disable`` forces this one). The test suite runs
both against each other, so when they disagree, this module says what the C++ code must do.

Hashing goes through the ``xxhash`` package over zero-copy ``memoryview`` slices, the byte
transforms through numpy (never a per-byte Python loop), and I/O through ``os.pwrite`` /
``os.preadv`` loops. ``threads`` runs independent chunks or buffers on a short-lived thread pool
(xxhash and the ``os`` calls release the GIL); results never depend on it.
"""

from __future__ import annotations

import errno
import operator
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import xxhash

from aptckpt import _config

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "default_threads",
    "hash_chunks",
    "hash_chunks_many",
    "pread_many",
    "pwrite_many",
    "read_verify_many",
    "shuffle",
    "simd",
    "unshuffle",
    "unshuffle_hash",
    "xor",
    "xxh3_128",
]

_T = TypeVar("_T")

#: Largest number of threads one call uses, as ``kMaxThreads`` in ``cpp/thread_pool.hpp``.
_MAX_THREADS = 256
#: Up to this itemsize, unshuffle copies row by row (k numpy calls) instead of one transpose.
_ROW_LOOP_MAX_ITEMSIZE = 64
#: Largest file offset (``off_t``); ``offset + len(buffer)`` must not exceed it.
_MAX_OFFSET = 2**63 - 1


# ---- argument checks (same order and messages as cpp/bindings.cpp) ----


def _type_name(obj: object) -> str:
    cls = type(obj)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


def _view(obj: Buffer, name: str, *, writable: bool = False) -> memoryview:
    """A flat unsigned-byte view of a C-contiguous buffer (writable when asked)."""
    try:
        view = memoryview(obj)
    except TypeError as err:
        raise TypeError(
            f"{name} must support the buffer protocol (bytes, bytearray, memoryview, numpy "
            f"array), not {_type_name(obj)}"
        ) from err
    if not view.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous; pass a contiguous copy (e.g. numpy.ascontiguousarray)"
        )
    if writable and view.readonly:
        raise ValueError(
            f"{name} must be writable, but the {_type_name(obj)} given is read-only; pass a "
            "bytearray or a writable array"
        )
    if view.nbytes == 0:  # cast() refuses views with a zero in their shape
        return memoryview(bytearray())
    return view.cast("B")


def _views(buffers: Iterable[Buffer], name: str, *, writable: bool = False) -> list[memoryview]:
    return [_view(b, f"{name}[{i}]", writable=writable) for i, b in enumerate(buffers)]


def _bytes(view: memoryview) -> np.ndarray:
    return np.frombuffer(view, dtype=np.uint8)


def _overlap(x: np.ndarray, y: np.ndarray) -> bool:
    return x.size > 0 and y.size > 0 and bool(np.may_share_memory(x, y))


def _address(x: np.ndarray) -> int:
    return int(x.__array_interface__["data"][0])


def _same_size(x: memoryview, xname: str, y: memoryview, yname: str) -> None:
    if x.nbytes != y.nbytes:
        raise ValueError(
            f"{xname} has {x.nbytes} bytes but {yname} has {y.nbytes}; they must be equal"
        )


def _threads(threads: int) -> int:
    value = operator.index(threads)
    if value < 0:
        raise ValueError(f"threads must be >= 0 (0 means the default), got {value}")
    return min(value, _MAX_THREADS) if value else default_threads()


def _chunk_size(chunk_size: int) -> int:
    value = operator.index(chunk_size)
    if value < 1:
        raise ValueError(f"chunk_size must be >= 1, got {value}")
    return value


def _itemsize(itemsize: int) -> int:
    value = operator.index(itemsize)
    if value < 1:
        raise ValueError(f"itemsize must be >= 1, got {value}")
    return value


def _run(task: Callable[[int], _T], count: int, threads: int) -> list[_T]:
    """``[task(i) for i in range(count)]`` on up to ``threads`` threads.

    Each thread takes every ``threads``-th task (one future per thread, not per task: hashing
    1-byte chunks must not pay for a future each). Every task runs; the exception of the
    lowest-numbered failing task is raised, so the error reported does not depend on
    scheduling, as in ``cpp/parallel_io.cpp``.
    """
    workers = min(threads, count)
    if workers <= 1:
        return [task(i) for i in range(count)]
    results: dict[int, _T] = {}
    errors: dict[int, Exception] = {}

    def work(first: int) -> None:
        for i in range(first, count, workers):
            try:
                results[i] = task(i)
            except Exception as err:  # re-raised below, lowest index first
                errors[i] = err

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, range(workers)))
    if errors:
        raise errors[min(errors)]
    return [results[i] for i in range(count)]


# ---- hashing ----


def xxh3_128(data: Buffer) -> bytes:
    """16-byte XXH3-128 digest (seed 0), canonical big-endian byte order."""
    return xxhash.xxh3_128_digest(_view(data, "data"))


def _hash_views(views: list[memoryview], size: int, threads: int) -> list[bytes]:
    tasks = [(b, start) for b, view in enumerate(views) for start in range(0, view.nbytes, size)]

    def digest(t: int) -> bytes:
        b, start = tasks[t]
        return xxhash.xxh3_128_digest(views[b][start : start + size])

    digests = _run(digest, len(tasks), threads)
    parts: list[list[bytes]] = [[] for _ in views]
    for (b, _), d in zip(tasks, digests, strict=True):
        parts[b].append(d)
    return [b"".join(p) for p in parts]


def hash_chunks(data: Buffer, chunk_size: int, threads: int = 0) -> bytes:
    """Concatenated digests of every ``chunk_size`` slice of ``data`` (the last may be short)."""
    view = _view(data, "data")
    return _hash_views([view], _chunk_size(chunk_size), _threads(threads))[0]


def hash_chunks_many(buffers: Iterable[Buffer], chunk_size: int, threads: int = 0) -> list[bytes]:
    """:func:`hash_chunks` of each buffer, all chunks of all buffers hashed in parallel."""
    views = _views(buffers, "buffers")
    return _hash_views(views, _chunk_size(chunk_size), _threads(threads))


# ---- byte transforms ----


def _shuffle_args(src: Buffer, itemsize: int, out: Buffer) -> tuple[np.ndarray, int, np.ndarray]:
    s = _view(src, "src")
    o = _view(out, "out", writable=True)
    k = _itemsize(itemsize)
    _same_size(o, "out", s, "src")
    a, b = _bytes(s), _bytes(o)
    if _overlap(a, b):
        raise ValueError("out must not overlap src; pass a separate buffer")
    return a, k, b


def shuffle(src: Buffer, itemsize: int, out: Buffer) -> None:
    """Byte shuffle: ``out[b*n + i] = src[i*itemsize + b]`` with ``n = len(src) // itemsize``.

    The ``len(src) % itemsize`` trailing bytes are copied unchanged to the end of ``out``.
    """
    a, k, b = _shuffle_args(src, itemsize, out)
    n = a.size // k
    b[: n * k].reshape(k, n)[...] = a[: n * k].reshape(n, k).T
    b[n * k :] = a[n * k :]


def unshuffle_hash(src: Buffer, itemsize: int, out: Buffer) -> bytes:
    """:func:`unshuffle`, then the :func:`xxh3_128` digest of ``out``."""
    unshuffle(src, itemsize, out)
    return xxh3_128(out)


def unshuffle(src: Buffer, itemsize: int, out: Buffer) -> None:
    """The inverse of :func:`shuffle`."""
    a, k, b = _shuffle_args(src, itemsize, out)
    n = a.size // k
    items = b[: n * k].reshape(n, k)
    if k <= _ROW_LOOP_MAX_ITEMSIZE:  # one strided copy per byte position: 5x numpy's transpose
        for j in range(k):
            items[:, j] = a[j * n : (j + 1) * n]
    else:
        items[...] = a[: n * k].reshape(k, n).T
    b[n * k :] = a[n * k :]


def xor(a: Buffer, b: Buffer, out: Buffer) -> None:
    """``out[i] = a[i] ^ b[i]``; equal lengths; ``out`` may be ``a`` or ``b`` but not overlap
    them otherwise."""
    x, y = _view(a, "a"), _view(b, "b")
    o = _view(out, "out", writable=True)
    _same_size(x, "a", y, "b")
    _same_size(o, "out", x, "a")
    xa, ya, oa = _bytes(x), _bytes(y), _bytes(o)
    for arr in (xa, ya):
        if _overlap(arr, oa) and _address(arr) != _address(oa):
            raise ValueError("out must be a, b, or a buffer overlapping neither")
    np.bitwise_xor(xa, ya, out=oa)


# ---- positional I/O ----


def _offsets(offsets: Iterable[int], views: list[memoryview]) -> list[int]:
    items = list(offsets)
    if len(items) != len(views):
        raise ValueError(
            f"got {len(views)} buffers but {len(items)} offsets; pass one offset per buffer"
        )
    out = []
    for i, (item, view) in enumerate(zip(items, views, strict=True)):
        off = operator.index(item)
        if off < 0 or off + view.nbytes > _MAX_OFFSET:
            raise ValueError(
                f"offsets[{i}]={item} is out of range: offset and offset + len(buffer) must be "
                "in [0, 2**63 - 1]"
            )
        out.append(off)
    return out


def _span(i: int, view: memoryview, offset: int) -> str:
    return f"buffer {i} ({view.nbytes} bytes at offset {offset})"


def _os_error(func: str, i: int, view: memoryview, offset: int, done: int, code: int) -> OSError:
    # OSError(errno, text) becomes the matching subclass (FileNotFoundError, ...), as in C++.
    return OSError(
        code, f"{func}: {_span(i, view, offset)} failed after {done} bytes: {os.strerror(code)}"
    )


def pwrite_many(
    fd: int, buffers: Iterable[Buffer], offsets: Iterable[int], threads: int = 0
) -> int:
    """Write each buffer at its offset of ``fd`` in parallel; return the number of bytes."""
    views = _views(buffers, "buffers")
    offs = _offsets(offsets, views)
    nthreads = _threads(threads)

    def write(i: int) -> None:
        view, offset, done = views[i], offs[i], 0
        while done < view.nbytes:  # os.pwrite already retries EINTR (PEP 475)
            try:
                n = os.pwrite(fd, view[done:], offset + done)
            except OSError as err:
                code = err.errno if err.errno is not None else errno.EIO
                raise _os_error("pwrite_many", i, view, offset, done, code) from err
            if n == 0:  # no progress for a non-empty request: fail rather than spin
                raise _os_error("pwrite_many", i, view, offset, done, errno.EIO)
            done += n

    _run(write, len(views), nthreads)
    return sum(v.nbytes for v in views)


def pread_many(
    fd: int, buffers: Iterable[Buffer], offsets: Iterable[int], threads: int = 0
) -> None:
    """Fill each writable buffer from its offset of ``fd`` in parallel.

    Raises:
        EOFError: the file ends before a buffer is full.
        OSError: any other failure, with its ``errno``.
    """
    views = _views(buffers, "buffers", writable=True)
    offs = _offsets(offsets, views)
    nthreads = _threads(threads)

    def read(i: int) -> None:
        view, offset, done = views[i], offs[i], 0
        while done < view.nbytes:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as err:
                code = err.errno if err.errno is not None else errno.EIO
                raise _os_error("pread_many", i, view, offset, done, code) from err
            if n == 0:
                raise EOFError(
                    f"pread_many: {_span(i, view, offset)} runs past the end of the file, "
                    f"which ends after {done} of its bytes"
                )
            done += n

    _run(read, len(views), nthreads)


def read_verify_many(
    fds: Iterable[int],
    buffers: Iterable[Buffer],
    offsets: Iterable[int],
    digests: Buffer | None = None,
    threads: int = 0,
) -> list[tuple[int, str]]:
    """Fill each writable buffer from its offset of ``fds[i]`` in parallel and check it
    against its 16 bytes of ``digests`` (when given).

    Returns ``(index, "eof")`` for each buffer the end of its file cut short and
    ``(index, "digest")`` for each whose bytes do not match, in index order.

    Raises:
        OSError: any other read failure, with its ``errno`` (the lowest-numbered buffer's).
    """
    views = _views(buffers, "buffers", writable=True)
    offs = _offsets(offsets, views)
    descriptors = [operator.index(fd) for fd in fds]
    if len(descriptors) != len(views):
        raise ValueError(
            f"got {len(views)} buffers but {len(descriptors)} file descriptors; pass one per buffer"
        )
    expected = None
    if digests is not None:
        expected = _view(digests, "digests").tobytes()
        if len(expected) != 16 * len(views):
            raise ValueError(
                f"digests has {len(expected)} bytes; it must hold 16 per buffer ({16 * len(views)})"
            )
    nthreads = _threads(threads)

    def read(i: int) -> str | None:
        view, offset, done = views[i], offs[i], 0
        while done < view.nbytes:
            try:
                n = os.preadv(descriptors[i], [view[done:]], offset + done)
            except OSError as err:
                code = err.errno if err.errno is not None else errno.EIO
                raise _os_error("read_verify_many", i, view, offset, done, code) from err
            if n == 0:
                return "eof"
            done += n
        if expected is not None and xxhash.xxh3_128_digest(view) != expected[16 * i : 16 * i + 16]:
            return "digest"
        return None

    found = _run(read, len(views), nthreads)
    return [(i, why) for i, why in enumerate(found) if why is not None]


# ---- introspection ----


def default_threads() -> int:
    """The default worker count: :func:`aptckpt._config.threads`."""
    return _config.threads()


def simd() -> str:
    """The instruction set of the hash loop; always ``"python"`` for the twin."""
    return "python"
