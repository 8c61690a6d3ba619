"""Raw bytes of the chunks the last ``delta`` save wrote, kept in memory for the next one.

The next save deltas a changed chunk against the chunk's previous version; taking
it from here rather than decoding its xor chain from the store is what keeps a
delta save cheap late in a keyframe cycle (and, on an object store, what saves a
ranged read per changed chunk).
"""

from __future__ import annotations

import threading

from aptckpt import _accel, _config

__all__ = ["base_scratch", "recent"]


class _BaseScratch(threading.local):
    """Per-thread buffer for the previous version of a chunk."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def get(self, size: int) -> memoryview:
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        return memoryview(self.buffer)[:size]


base_scratch = _BaseScratch()


class _Filling:
    """The chunks one save offers to :class:`_RecentChunks`, and what is left of its budget.
    Each save has its own: two saves into one store in one process (a background save and a
    blocking one, two threads) never share or steal each other's."""

    __slots__ = ("budget", "entries")

    def __init__(self, budget: int) -> None:
        self.entries: dict[bytes, bytearray] = {}
        self.budget = budget


class _RecentChunks:
    """Raw bytes of the chunks the last save into each store wrote, in this process.

    The next save deltas a changed chunk against the chunk's previous version;
    taking it from here rather than decoding its xor chain from the store is
    what keeps a delta save cheap late in a keyframe cycle. Bounded by
    :func:`aptckpt._config.delta_cache_bytes`.

    Thread-safe: :meth:`get` copies an entry into the caller's buffer and checks the copy
    against its digest, so a buffer retired and reused by a concurrent save meanwhile costs
    only a decode, never a wrong delta base.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[str, dict[bytes, bytearray]] = {}
        # Buffers of retired generations, reused: fresh memory costs a page fault per
        # 4 KiB, which here is slower than the copy itself.
        self._free: dict[int, list[bytearray]] = {}

    def get(self, store: str, digest: bytes, out: memoryview) -> bool:
        """Copy the chunk ``digest`` of ``store`` into ``out``; False if it is not kept."""
        data = self._stores.get(store, {}).get(digest)
        if data is None or len(data) != len(out):
            return False
        out[:] = data
        return bool(_accel.xxh3_128(out) == digest)

    def peek(self, store: str, digest: bytes, size: int) -> memoryview | None:
        """The kept chunk ``digest`` of ``store`` itself, unchecked and uncopied (it may be
        reused by a concurrent save meanwhile): for guesses only, never for data."""
        data = self._stores.get(store, {}).get(digest)
        return memoryview(data) if data is not None and len(data) == size else None

    def begin(self) -> _Filling:
        return _Filling(_config.delta_cache_bytes())

    def offer(self, filling: _Filling, digest: bytes, raw: memoryview) -> None:
        with self._lock:
            if filling.budget < len(raw) or digest in filling.entries:
                return
            filling.budget -= len(raw)
            free = self._free.get(len(raw))
            buffer = free.pop() if free else bytearray(len(raw))
            filling.entries[digest] = buffer
        buffer[:] = raw

    def commit(self, store: str, filling: _Filling) -> None:
        """Make this save's chunks the ones kept; only the last store saved into keeps any."""
        with self._lock:
            retired, self._stores = self._stores, {store: filling.entries}
        for old in retired.values():
            self._retire(old)

    def abort(self, filling: _Filling) -> None:
        self._retire(filling.entries)

    def _retire(self, entries: dict[bytes, bytearray]) -> None:
        """Keep retired buffers for reuse, up to the cache budget (so at most twice
        the budget is held: the kept chunks and the free buffers)."""
        with self._lock:
            room = _config.delta_cache_bytes() - sum(
                len(b) for bufs in self._free.values() for b in bufs
            )
            for buffer in entries.values():
                if len(buffer) <= room:
                    self._free.setdefault(len(buffer), []).append(buffer)
                    room -= len(buffer)


recent = _RecentChunks()
