"""The one place that chooses between the compiled core and its pure-Python twin.

``APTCKPT_NATIVE`` selects, read once at import:

* ``auto`` (default): the compiled ``aptckpt._native`` if it imports, else the twin;
* ``require``: the compiled core or :class:`~aptckpt.errors.NativeUnavailableError`;
* ``disable``: always the twin (:mod:`aptckpt._pyimpl`).

Both implementations expose the same functions with byte-identical results; the
test suite runs under both, so the twin is the executable specification of the
C++ code. Every other module calls these functions through this module only.

Functions (``Buffer`` is anything exposing the buffer protocol; ``threads=0``
means the library default, :func:`aptckpt._config.threads`):

``xxh3_128(data) -> bytes``
    16-byte XXH3-128 digest (seed 0), canonical big-endian byte order, equal to
    ``xxhash.xxh3_128_digest(data)``.
``hash_chunks(data, chunk_size, threads=0) -> bytes``
    Digests of ``data[i*chunk_size:(i+1)*chunk_size]`` for every chunk,
    concatenated (``16 * ceil(len/chunk_size)`` bytes; empty input gives ``b""``).
``hash_chunks_many(buffers, chunk_size, threads=0) -> list[bytes]``
    ``hash_chunks`` of each buffer, all chunks of all buffers hashed in parallel.
``shuffle(src, itemsize, out) -> None``
    Byte shuffle: with ``n = len(src) // itemsize``, ``out[b*n + i] = src[i*itemsize + b]``;
    the ``len(src) % itemsize`` trailing bytes are copied unchanged to the end.
``unshuffle(src, itemsize, out) -> None``
    The inverse of ``shuffle``.
``unshuffle_hash(src, itemsize, out) -> bytes``
    ``unshuffle`` then ``xxh3_128(out)``; the core hashes each part of ``out`` right after
    writing it, while it is still in cache (one pass over ``out`` instead of two).
``xor(a, b, out) -> None``
    ``out[i] = a[i] ^ b[i]``; equal lengths; ``out`` may be ``a`` or ``b``.
``pwrite_many(fd, buffers, offsets, threads=0) -> int``
    Writes each buffer at its offset of the open file ``fd`` in parallel, retrying
    short writes; returns the byte count. Raises ``OSError`` (with ``errno``).
``pread_many(fd, buffers, offsets, threads=0) -> None``
    Fills each writable buffer from its offset in parallel; a read past the end
    of the file raises ``EOFError``; other failures ``OSError``.
``read_verify_many(fds, buffers, offsets, digests=None, threads=0) -> list[tuple[int, str]]``
    Fills each writable buffer from its offset of ``fds[i]`` in parallel (the core reads runs
    of spans adjacent in one file with a single ``preadv``) and, when ``digests`` (16 bytes per
    buffer) is given, checks each buffer's XXH3-128 right after reading it. Returns
    ``(index, "eof")`` for a buffer the end of its file cut short and ``(index, "digest")``
    for one whose bytes do not match, in index order; other failures raise ``OSError``.
``default_threads() -> int`` / ``simd() -> str``
    The core's default worker count, and the instruction set its hash uses.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from aptckpt.errors import NativeUnavailableError

__all__ = [
    "IMPLEMENTATION",
    "NATIVE",
    "NATIVE_UNAVAILABLE",
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

_MODES = ("auto", "require", "disable")


#: Why the compiled core is not active (``None`` when it is, or when ``APTCKPT_NATIVE=disable``
#: chose the twin): ``"missing"`` when this installation has no compiled core (the pure-Python
#: wheel, or a build that fell back to it), else the import error of the one it has.
NATIVE_UNAVAILABLE: str | None = None


def _choose() -> ModuleType:
    global NATIVE_UNAVAILABLE
    mode = os.environ.get("APTCKPT_NATIVE", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise NativeUnavailableError(
            f"APTCKPT_NATIVE={mode!r} is not one of {', '.join(_MODES)}; "
            "unset it or pick one of those values"
        )
    if mode != "disable":
        try:
            native = importlib.import_module("aptckpt._native")
        except ImportError as err:
            missing = isinstance(err, ModuleNotFoundError) and err.name == "aptckpt._native"
            NATIVE_UNAVAILABLE = "missing" if missing else f"{type(err).__name__}: {err}"
            if mode == "require":
                raise NativeUnavailableError(
                    "APTCKPT_NATIVE=require but the compiled core aptckpt._native cannot be "
                    f"imported ({err}); reinstall aptckpt with a C++17 compiler and CMake "
                    "available, or set APTCKPT_NATIVE=auto"
                ) from err
        else:
            return native
    return importlib.import_module("aptckpt._pyimpl")


_impl = _choose()

#: True when the compiled core is active, False for the pure-Python twin.
NATIVE: bool = _impl.__name__.endswith("._native")
#: ``"native"`` or ``"python"``.
IMPLEMENTATION: str = "native" if NATIVE else "python"

xxh3_128 = _impl.xxh3_128
hash_chunks = _impl.hash_chunks
hash_chunks_many = _impl.hash_chunks_many
shuffle = _impl.shuffle
unshuffle = _impl.unshuffle
unshuffle_hash = _impl.unshuffle_hash
xor = _impl.xor
pwrite_many = _impl.pwrite_many
pread_many = _impl.pread_many
read_verify_many = _impl.read_verify_many
default_threads = _impl.default_threads
simd = _impl.simd
