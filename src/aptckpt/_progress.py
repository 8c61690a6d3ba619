"""Progress of long operations: the callback the library calls, and the bars the
command line and the training loop draw with it (tqdm).

The library reports *work done*, never elapsed time: :func:`aptckpt.verify` and
:func:`aptckpt.convert` call ``progress(advance, total)`` with the bytes of the
checkpoint's data read since the last call and the bytes there are in all (its
files and the ``delta`` store objects it reaches: :attr:`CheckpointInfo.stored_bytes`),
:func:`aptckpt.collect_garbage` with checkpoints and store objects examined. The
counting happens where the bytes are read: :func:`counting` wraps a checkpoint's
reader, so every backend (built-in or plugin) reports without knowing of it, and
a call without ``progress`` reads through the unwrapped reader at no cost. Each
byte of a data file or store object is counted once, whatever reads it twice (the
``torch`` backend maps its file to hash it, then torch reads it), so the advances
of one call add up to the total exactly when everything was read.

Bars (:func:`bar`) are drawn on stderr only when it is a terminal, or when forced,
so logs, pipes and ``--json`` output stay clean.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from tqdm import tqdm

from aptckpt.storage.base import CheckpointReader, DataFiles, RawRead

if TYPE_CHECKING:
    import torch

    from aptckpt.manifest import FileRecord, Manifest
    from aptckpt.storage.base import Storage

__all__ = ["ProgressCallback", "bar", "counting", "reporter"]

#: ``progress(advance, total)``: ``advance`` more units done, of ``total`` in all (bytes
#: for reads; items for garbage collection, whose total may grow once as it is found).
ProgressCallback = Callable[[int, int], None]

#: Raw chunk reads are handed to the storage in groups of about this many bytes, so a
#: bar moves while a large checkpoint is read (one group: one parallel call).
_GROUP_BYTES = 32 << 20


def bar(
    total: int | None,
    desc: str,
    *,
    unit: str = "B",
    enabled: bool | None = None,
    stream: TextIO | None = None,
) -> tqdm:
    """A tqdm bar on ``stream`` (stderr), drawn only if it is a terminal (``enabled=None``)
    or ``enabled``; a disabled bar costs nothing and prints nothing."""
    stream = stream or sys.stderr
    on = _isatty(stream) if enabled is None else enabled
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1000,
        disable=not on,
        file=stream,
        dynamic_ncols=True,
        mininterval=0.1,
        leave=False,
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a real stream
        return False


def reporter(progress_bar: tqdm) -> ProgressCallback:
    """A :data:`ProgressCallback` advancing ``progress_bar`` (its total follows the work's)."""

    def report(advance: int, total: int) -> None:
        if progress_bar.total != total:
            progress_bar.total = total
            progress_bar.refresh()
        if advance:
            progress_bar.update(advance)

    return report


class _Counter:
    """Counts the bytes read, each byte of a file or object once; thread-safe (the
    backends read in parallel)."""

    def __init__(self, callback: ProgressCallback, total: int) -> None:
        self.callback, self.total = callback, total
        self.lock = threading.Lock()
        self.seen: dict[Any, int] = {}

    def add(self, key: Any, n: int, cap: int) -> None:
        """``n`` bytes of ``key`` (``cap`` bytes long) read."""
        if n <= 0:
            return
        with self.lock:
            before = self.seen.get(key, 0)
            after = min(cap, before + n)
            self.seen[key] = after
        if after > before:
            self.callback(after - before, self.total)


def counting(
    reader: CheckpointReader, manifest: Manifest, external: int, progress: ProgressCallback
) -> CheckpointReader:
    """``reader``, reporting to ``progress`` the bytes read from the checkpoint's files and
    from the store objects it reaches (``external`` bytes of them); the total announced is
    the files' size plus ``external``."""
    total = sum(f.size for f in manifest.files) + external
    counter = _Counter(progress, total)
    progress(0, total)
    return _CountingReader(reader, counter)


class _CountingReader(CheckpointReader):
    def __init__(self, inner: CheckpointReader, counter: _Counter) -> None:
        self.inner, self.counter = inner, counter
        self.path = inner.path
        self.storage = _CountingStorage(inner.storage, counter)  # type: ignore[assignment]

    @property
    def location(self) -> str:
        return self.inner.location

    def read_manifest(self) -> Manifest:
        return self.inner.read_manifest()

    def open_files(self, records: Sequence[FileRecord]) -> DataFiles:
        return _CountingFiles(self.inner.open_files(records), records, self.counter)

    def check_present(self, missing: str) -> None:
        self.inner.check_present(missing)

    def close(self) -> None:
        self.inner.close()


class _CountingStorage:
    """The reader's storage for the ``delta`` store's object reads (every other call
    passes through): an object's bytes count once."""

    def __init__(self, inner: Storage, counter: _Counter) -> None:
        self._inner, self._counter = inner, counter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        data = self._inner.read_range(path, offset, length)
        self._counter.add(("object", path), len(data), len(data) + offset)
        return data


class _CountingFiles(DataFiles):
    def __init__(self, inner: DataFiles, records: Sequence[FileRecord], counter: _Counter):
        self.inner, self.counter = inner, counter
        self.sizes = [r.size for r in records]
        self.failed = inner.failed

    def _add(self, file: int, n: int) -> None:
        self.counter.add(("file", file), n, self.sizes[file])

    def read(self, file: int, offset: int, length: int) -> bytes:
        data = self.inner.read(file, offset, length)
        self._add(file, len(data))
        return data

    def read_verify(self, reads: Sequence[RawRead], threads: int) -> list[tuple[int, str]]:
        found: list[tuple[int, str]] = []
        start = 0
        while start < len(reads):
            stop, size = start, 0
            while stop < len(reads) and (stop == start or size < _GROUP_BYTES):
                size += memoryview(reads[stop].out).nbytes
                stop += 1
            group = reads[start:stop]
            found += [(start + i, why) for i, why in self.inner.read_verify(group, threads)]
            for r in group:
                self._add(r.file, memoryview(r.out).nbytes)
            start = stop
        return found

    def read_into(
        self, file: int, offset: int, out: memoryview, digest: bytes | None
    ) -> str | None:
        why = self.inner.read_into(file, offset, out, digest)
        self._add(file, len(out))
        return why

    def expect(self, file: int, ranges: Sequence[tuple[int, int]]) -> None:
        self.inner.expect(file, ranges)  # the storage's read-ahead hint, passed on

    def stream(self, file: int) -> BinaryIO:
        stream = self.inner.stream(file)
        self._add(file, self.sizes[file])  # read whole by its caller
        return stream

    def size(self, file: int) -> int:
        return self.inner.size(file)

    def map_file(self, file: int, size: int, *, verify: bool) -> torch.UntypedStorage | None:
        mapped = self.inner.map_file(file, size, verify=verify)
        if mapped is not None and verify:
            self._add(file, size)  # hashed whole by its caller
        return mapped

    def close(self) -> None:
        self.inner.close()
