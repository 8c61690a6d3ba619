"""Per-chunk digests of a data file computed as it is written (every sink uses it).

A file written with ``O_DIRECT`` is not in the page cache to be hashed afterwards, and
an uploaded object is not here at all: the bytes are hashed on their way out, in
chunks of ``chunk_size`` counted from the start of the file, with the same XXH3-128
(``xxhash``; the core's ``hash_chunks`` gives the same digests for the whole file).
"""

from __future__ import annotations

import xxhash

__all__ = ["ChunkDigester"]


class ChunkDigester:
    """Feed a file's bytes in order with :meth:`update`; :meth:`finish` gives the
    concatenated digests of its ``chunk_size``-byte chunks (the last may be shorter)."""

    def __init__(self, chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self.chunk_size = chunk_size
        self._hasher = xxhash.xxh3_128()
        self._hashed = 0  # bytes of the current chunk fed to the hasher
        self._digests: list[bytes] = []

    def update(self, view: memoryview) -> None:
        while view:
            part = view[: self.chunk_size - self._hashed]
            self._hasher.update(part)
            self._hashed += len(part)
            view = view[len(part) :]
            if self._hashed == self.chunk_size:
                self._end_chunk()

    def _end_chunk(self) -> None:
        self._digests.append(self._hasher.digest())
        self._hasher.reset()
        self._hashed = 0

    def finish(self) -> bytes:
        """End the last (partial) chunk; the digests of every chunk, concatenated."""
        if self._hashed:
            self._end_chunk()
        return b"".join(self._digests)
