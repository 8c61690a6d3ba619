"""Append-only data files written with large, aligned, uncached writes (``O_DIRECT``).

On the reference machine a buffered write + fsync reaches about a fifth of what the disk
takes with ``O_DIRECT`` (``shared/research/baselines.md``): the bytes are copied into the page
cache, then written back at fsync. :class:`DirectWriter` copies what it is given into
page-aligned bounce buffers (a memcpy is an order of magnitude faster than the disk), hands each
full buffer to a background thread that writes it with ``O_DIRECT`` while the caller fills the
next, and on :meth:`~DirectWriter.close` writes the tail padded to the block size and truncates
the file to its true length. The bounce buffers are reused across files and saves: first-touch
page faults of fresh memory cost more than the copy.

Where the file system refuses ``O_DIRECT`` (tmpfs, some network file systems: ``EINVAL`` at
open or at the first write) the writer goes on with plain buffered writes of the caller's
bytes, without the copy. ``APTCKPT_DIRECT_IO=0`` asks for that everywhere.

Given a :class:`~aptckpt.storage.local._cachepolicy.CacheBudget`, a writer first writes through
the page cache, as long as the save's budget lasts (up to the next block boundary), then turns
``O_DIRECT`` on for the rest of the file (``fcntl(F_SETFL)``). Every writer measures the disk
while it writes ``O_DIRECT`` (:class:`~aptckpt.storage.local._cachepolicy.DiskMeter`): the
measurement that budget rests on.

The caller still fsyncs the file (:meth:`~aptckpt.storage.base.CheckpointWriter.sync_files`):
``O_DIRECT`` makes neither the file's size nor its allocation durable, nor does it flush the
device's cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from aptckpt import _accel, _config
from aptckpt.storage._digests import ChunkDigester
from aptckpt.storage.base import Sink
from aptckpt.storage.local._cachepolicy import CacheBudget, DiskMeter

__all__ = ["BLOCK_SIZE", "BUFFER_SIZE", "DirectWriter"]

#: Alignment of every direct write's address, offset and length (the largest logical block
#: size in common use; a multiple of every smaller one).
BLOCK_SIZE = 4096
#: Bytes per bounce buffer and so per write: large enough that the per-request cost vanishes.
BUFFER_SIZE = 8 << 20
#: write_many() joins consecutive buffers below _SMALL_WRITE bytes into writes of about
#: _JOINED_WRITE bytes.
_SMALL_WRITE = 64 << 10
_JOINED_WRITE = 1 << 20
#: Writes in flight per file while the caller fills the next buffer.
_IN_FLIGHT = 2
#: Bounce buffers kept between files (two files' worth).
_POOL_LIMIT = 2 * (_IN_FLIGHT + 1)

_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


def _load_sync_file_range() -> Any:
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


#: ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``: start writing back a range
#: of the page cache without waiting, so that cached writes reach the disk while the save goes
#: on and the final fsync has less left to wait for.
_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _after_fork_in_child() -> None:
    global _pool_lock
    _pool_lock = threading.Lock()  # another thread may have held it at the fork
    # The pooled buffers are private mappings, so the child's copies are its own; they are
    # dropped anyway rather than kept as memory the child may never use.
    _pool.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _take_buffer(size: int) -> mmap.mmap:
    if size == BUFFER_SIZE:
        with _pool_lock:
            if _pool:
                return _pool.pop()
    # Anonymous and page-aligned; private: a forked child must never share the parent's
    # buffers (Python's default for anonymous maps is MAP_SHARED).
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _give_buffer(buffer: mmap.mmap) -> None:
    with _pool_lock:
        if len(buffer) == BUFFER_SIZE and len(_pool) < _POOL_LIMIT:
            _pool.append(buffer)
            return
    with contextlib.suppress(BufferError):  # a finished write's view is still referenced:
        buffer.close()  # the GC frees it


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:  # a short write (a full disk) is retried so that the next call names the errno
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _write_all(fd: int, view: memoryview) -> None:
    while view:  # os.write releases the GIL
        view = view[os.write(fd, view) :]


class DirectWriter(Sink):
    """A new file filled front to back by :meth:`write`; see the module docstring.

    Not thread-safe: one caller writes. Use as a context manager, or call :meth:`close`
    (which raises the first write error); leaving the ``with`` block by an exception still
    waits for the writes in flight before the descriptor is closed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        direct: bool | None = None,
        digest_chunk_size: int | None = None,
        buffer_size: int = BUFFER_SIZE,
        cache: CacheBudget | None = None,
    ) -> None:
        if buffer_size <= 0 or buffer_size % BLOCK_SIZE:
            raise ValueError(
                f"buffer_size {buffer_size} must be a positive multiple of {BLOCK_SIZE}"
            )
        self.path = Path(path)
        self._buffer_size = buffer_size
        # XXH3-128 of every digest_chunk_size bytes of the file, computed on the way in
        # (a file written with O_DIRECT is not in the page cache to be hashed afterwards).
        self._digest_chunk = digest_chunk_size
        self._digester = ChunkDigester(digest_chunk_size) if digest_chunk_size else None
        self._digests = b""
        want_direct = _config.direct_io() if direct is None else direct
        want_direct = want_direct and hasattr(os, "O_DIRECT")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        #: Whether the descriptor writes with O_DIRECT now (it may start cached: see below).
        self.direct = False
        self.fd = -1
        # The save's page-cache budget, while this file still writes through the page cache
        # (then O_DIRECT goes on, at the block boundary _cached_until, once it is known).
        self._cache = cache if want_direct and cache is not None and cache.left else None
        self._cached_until: int | None = None
        self._writeback_from = 0  # cached bytes before this offset are being written back
        if want_direct and self._cache is None:
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
                self.direct = True
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                # Linux creates the file before it refuses O_DIRECT; it is ours (a private
                # temp directory), so it is reopened rather than refused as existing.
                flags = (flags & ~os.O_EXCL) | os.O_TRUNC
        if self.fd < 0:
            self.fd = os.open(self.path, flags, 0o644)
        self.size = 0  #: bytes written so far (the file's final length)
        self.cached = 0  #: bytes written through the page cache
        self._buffer: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._fill = 0
        self._flushed = 0  # bytes handed to the background thread
        self._pending: deque[tuple[Future[None], mmap.mmap]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._meter = DiskMeter(self.fd) if self.direct else None

    # ------------------------------------------------------------------ writing

    def write(self, data: Any) -> int:
        """Append ``data`` (any C-contiguous buffer); returns its length in bytes."""
        view = memoryview(data).cast("B")
        n = len(view)
        if self._digester is not None:
            self._digester.update(view)
        if self._cache is not None:
            view = self._write_cached(view)
        if not self.direct:
            _write_all(self.fd, view)
        else:
            while view:
                if self._view is None:
                    self._next_buffer()
                assert self._view is not None
                take = min(len(view), self._buffer_size - self._fill)
                self._view[self._fill : self._fill + take] = view[:take]
                self._fill += take
                view = view[take:]
                if self._fill == self._buffer_size:
                    self._submit(self._buffer_size)
        self.size += n
        return n

    def _write_cached(self, view: memoryview) -> memoryview:
        """Write the head of ``view`` that the page-cache budget allows, buffered; once it is
        spent (at a block boundary), turn O_DIRECT on. Returns the rest of ``view``."""
        assert self._cache is not None
        if self._cached_until is None:
            granted = self._cache.take(len(view))
            if granted < len(view):
                # Spent: go on buffered to the next block boundary, where O_DIRECT can start.
                self._cached_until = -(-(self.size + granted) // BLOCK_SIZE) * BLOCK_SIZE
        take = len(view) if self._cached_until is None else self._cached_until - self.size
        take = min(take, len(view))
        _write_all(self.fd, view[:take])
        self.cached += take
        self._start_writeback(self.size + take)
        if self.size + take == self._cached_until:
            self._start_writeback(self._cached_until, at_least=0)
            self._go_direct(self._cached_until)
        return view[take:]

    def _start_writeback(self, end: int, at_least: int = BUFFER_SIZE) -> None:
        """Start writing back the cached bytes up to ``end`` once ``at_least`` are waiting."""
        if _sync_file_range is None or end - self._writeback_from < max(at_least, 1):
            return
        # A failure only means the final fsync does all the writing back, as without it.
        _sync_file_range(
            self.fd, self._writeback_from, end - self._writeback_from, _SYNC_FILE_RANGE_WRITE
        )
        self._writeback_from = end

    def _go_direct(self, offset: int) -> None:
        """Write from ``offset`` (a block boundary) on with O_DIRECT, where the file system
        takes it; else go on buffered."""
        self._cache = None
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            return
        self.direct = True
        self._flushed = offset
        self._meter = DiskMeter(self.fd)

    def digests(self) -> bytes:
        """The concatenated digests of the file's chunks (after :meth:`close`)."""
        if not self._closed or not self._digest_chunk:
            raise RuntimeError("digests() needs digest_chunk_size and a closed writer")
        return self._digests

    def write_many(self, buffers: Sequence[Any], threads: int = 0) -> None:
        """Append each buffer in turn. Without ``O_DIRECT`` the buffers go to the file straight
        from the caller's memory with the core's parallel positional writes."""
        if self.direct or self._digest_chunk or self._cache is not None:
            # Runs of small buffers (a state of ten thousand small tensors) are joined in C
            # first: one write() per run instead of per buffer.
            run: list[Any] = []
            size = 0
            for buffer in buffers:
                n = memoryview(buffer).nbytes
                if n >= _SMALL_WRITE:
                    if run:
                        self.write(b"".join(run))
                        run, size = [], 0
                    self.write(buffer)
                    continue
                run.append(buffer)
                size += n
                if size >= _JOINED_WRITE:
                    self.write(b"".join(run))
                    run, size = [], 0
            if run:
                self.write(b"".join(run))
            return
        offsets = []
        for buffer in buffers:
            offsets.append(self.size)
            self.size += memoryview(buffer).nbytes
        _accel.pwrite_many(self.fd, list(buffers), offsets, threads)
        os.lseek(self.fd, self.size, os.SEEK_SET)

    def flush(self) -> None:
        """Nothing to do (``torch.save`` calls it): full buffers are already on their way,
        and the tail can only be written, padded, at :meth:`close`."""

    def _next_buffer(self) -> None:
        if len(self._pending) >= _IN_FLIGHT:
            future, buffer = self._pending.popleft()
            future.result()  # raises the write's error
        else:
            buffer = _take_buffer(self._buffer_size)
        self._buffer, self._view, self._fill = buffer, memoryview(buffer), 0

    def _submit(self, length: int) -> None:
        assert self._buffer is not None
        assert self._view is not None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="aptckpt-write")
        future = self._executor.submit(self._write_out, self._view[:length], self._flushed)
        self._pending.append((future, self._buffer))
        self._flushed += length
        # The buffer is gone: nothing is pending in it. (A stale fill made close() believe a
        # full, already submitted buffer was a tail still to write.)
        self._buffer, self._view, self._fill = None, None, 0

    def _write_out(self, view: memoryview, offset: int) -> None:
        try:
            _pwrite_all(self.fd, view, offset)
        except OSError as err:
            if err.errno != errno.EINVAL or not self.direct:
                raise
            # The file system took O_DIRECT at open but not this write (alignment): go on
            # buffered; the file is still written in full.
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _pwrite_all(self.fd, view, offset)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Write what is buffered, set the file's length, close it; raise the first error."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._digester is not None:
                self._digests = self._digester.finish()
            if self.direct and self._fill:
                if self._view is None:  # never: _submit() empties the fill with the buffer
                    raise RuntimeError("DirectWriter: a tail without a buffer")
                padded = -(-self._fill // BLOCK_SIZE) * BLOCK_SIZE
                self._view[self._fill : padded] = bytes(padded - self._fill)
                self._submit(padded)
            self._drain(raise_errors=True)
            if self.direct and self._flushed != self.size:
                os.ftruncate(self.fd, self.size)
            # Keyed by the folder's file system, as saves look it up (on overlayfs a file's
            # st_dev is its layer's, not the folder's).
            if self._meter is not None:
                self._meter.finish(os.stat(self.path.parent).st_dev)
        finally:
            self._release()

    def _drain(self, *, raise_errors: bool) -> None:
        first: BaseException | None = None
        while self._pending:
            future, buffer = self._pending.popleft()
            try:
                future.result()
            except BaseException as err:  # every write must end before the fd closes
                first = first or err
            _give_buffer(buffer)
        if first is not None and raise_errors:
            raise first

    def _release(self) -> None:
        try:
            self._drain(raise_errors=False)
            if self._buffer is not None:
                self._view = None
                _give_buffer(self._buffer)
                self._buffer = None
            if self._executor is not None:
                executor, self._executor = self._executor, None
                executor.shutdown(wait=True)
        finally:
            # Even when interrupted (Ctrl-C while waiting for the writes): a descriptor
            # left open would outlive the save.
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                os.close(fd)

    def abort(self) -> None:
        """Wait for the writes in flight and close the file, raising nothing (the caller is
        already failing; the file is left for the caller's cleanup)."""
        self._closed = True
        self._release()

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
