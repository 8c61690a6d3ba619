"""Reading a committed checkpoint from an object store.

The manifest names every data object (``<token>/<name>``), so a load needs no listing
of the checkpoint; the sizes of its objects come from one listing per folder they
live in. Reads are ranged GETs, retried; :meth:`RemoteDataFiles.read_verify` joins
reads adjacent in one object into requests of up to a part's size and runs them on a
thread pool, hashing each chunk right after it arrived. Small reads one at a time (the
compressed chunks a backend decodes) go through aligned *windows* of a part's size,
each fetched once while the next ones are fetched ahead: a shard of a thousand
compressed chunks costs a few large GETs in flight, not a thousand small ones.

A data object that disappears mid-load is told apart from damage the way the local
reader does: if the manifest is gone or is no longer the one read (the checkpoint was
deleted or replaced), :class:`~aptckpt.errors.CheckpointDeletedError`.
"""

from __future__ import annotations

import bisect
import errno
import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO

from aptckpt import _accel, _config
from aptckpt import manifest as mf
from aptckpt._config import MAX_MANIFEST_BYTES
from aptckpt.errors import (
    AptckptError,
    CheckpointDeletedError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
)
from aptckpt.storage import base

if TYPE_CHECKING:
    from aptckpt.storage.remote import FsspecStorage

__all__ = ["RemoteCheckpointReader", "RemoteDataFiles"]


class RemoteCheckpointReader(base.CheckpointReader):
    """A committed checkpoint in an object store, opened for reading."""

    storage: FsspecStorage

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.storage, self.path = storage, path
        self.store = storage.store
        self.manifest_path = storage.join(path, mf.MANIFEST_NAME)
        self._manifest_bytes: bytes | None = None
        try:
            found = self.store.head(self.manifest_path)
        except Exception as err:
            raise storage.read_error(f"opening checkpoint '{self.location}'", path, err) from err
        if found is None or found.get("type") != "file":
            raise CheckpointNotFoundError(self.location, storage.why_absent(path))

    def read_manifest(self) -> mf.Manifest:
        where = self.storage.display(self.manifest_path)
        try:
            data = self.storage.read_file(self.manifest_path, limit=MAX_MANIFEST_BYTES)
        except FileNotFoundError as err:
            raise CheckpointDeletedError(self.location, "its manifest was removed") from err
        except OSError as err:
            if err.errno == errno.EFBIG:
                raise FormatError("manifest is over the size limit", path=where) from err
            raise
        self._manifest_bytes = data
        return mf.decode(data, where=where)

    def check_present(self, missing: str) -> None:
        try:
            now = self.storage.read_file(self.manifest_path, limit=MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            now = None
        if now is None or (self._manifest_bytes is not None and now != self._manifest_bytes):
            raise CheckpointDeletedError(
                self.location, f"'{missing}' was already removed: it was deleted or replaced"
            )

    def open_files(self, records: Sequence[mf.FileRecord]) -> RemoteDataFiles:
        paths = [self.storage.join(self.path, r.path) for r in records]
        sizes: dict[str, int] = {}
        for folder in sorted({self.storage.parent(p) for p in paths}):
            try:
                listed = self.store.ls(folder)
            except Exception as err:
                raise self.storage.read_error(
                    f"reading checkpoint '{self.location}'", folder, err
                ) from err
            for entry in listed:
                if entry.get("type") == "file":
                    sizes[entry["name"].rstrip("/")] = int(entry.get("size") or 0)
        found = [sizes.get(self.storage.strip(p)) for p in paths]
        for record, size in zip(records, found, strict=True):
            if size is None:  # gone because the checkpoint was deleted, or damage
                self.check_present(record.path)
                break
        return RemoteDataFiles(self, list(records), paths, found)


class RemoteDataFiles(base.DataFiles):
    """The data objects of a checkpoint: ranged, retried, parallel reads."""

    storage: FsspecStorage

    def __init__(
        self,
        reader: RemoteCheckpointReader,
        records: list[mf.FileRecord],
        paths: list[str],
        sizes: list[int | None],
    ) -> None:
        self.reader, self.storage = reader, reader.storage
        self.records, self.paths, self.sizes = records, paths, sizes
        self.failed = {}
        self._windows: OrderedDict[tuple[int, int, int], Future[bytes]] = OrderedDict()
        self._runs: dict[int, list[tuple[int, int]]] = {}
        self._windows_lock = threading.Lock()
        self._fetcher: ThreadPoolExecutor | None = None
        for index, size in enumerate(sizes):
            record = records[index]
            if size is None or size != record.size:
                self.failed[index] = self._problem(index)

    def _problem(self, index: int) -> base.FileProblem:
        record, size = self.records[index], self.sizes[index]
        if size is None:
            error = IntegrityError(
                f"data file '{record.path}' is missing from '{self.reader.location}'",
                path=self.reader.location,
                file=record.path,
            )
        else:
            what = "truncated" if size < record.size else "longer than recorded"
            error = IntegrityError(
                f"data file '{record.path}' of checkpoint '{self.reader.location}' is {what} "
                f"({size} bytes, manifest says {record.size}); the checkpoint is damaged",
                path=self.reader.location,
                file=record.path,
            )
        return base.FileProblem(size, error)

    def _get(self, file: int, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of object ``file``, ``end`` clamped to its size."""
        end = min(end, self.size(file))
        if end <= start:
            return b""
        try:
            return self.storage.store.cat(self.paths[file], start, end)
        except FileNotFoundError as err:
            rel = self.records[file].path
            self.reader.check_present(rel)
            raise IntegrityError(
                f"data file '{rel}' is missing from '{self.reader.location}'",
                path=self.reader.location,
                file=rel,
            ) from err
        except AptckptError:
            raise
        except Exception as err:
            raise self.storage.read_error(
                f"reading checkpoint '{self.reader.location}'", self.paths[file], err
            ) from err

    def expect(self, file: int, ranges: Sequence[tuple[int, int]]) -> None:
        runs: list[tuple[int, int]] = []
        # Ranges closer than a sixteenth of a part join one run: fetching the gap (raw
        # chunks between compressed ones, read apart) costs less than another request.
        gap = self.storage.part_size // 16
        for start, stop in sorted(ranges):
            if stop - start >= self.storage.part_size // 2:
                # read() fetches these directly, never through windows: within a run,
                # the windows fetched ahead of a small read would fetch them again.
                continue
            if runs and start <= runs[-1][1] + gap:
                runs[-1] = (runs[-1][0], max(runs[-1][1], stop))
            else:
                runs.append((start, stop))
        self._runs[file] = runs

    def _run_of(self, file: int, offset: int, end: int) -> tuple[int, int] | None:
        """The expected run holding ``[offset, end)``: the whole object when nothing was
        expected; None when the read lies outside every expected run."""
        runs = self._runs.get(file)
        if runs is None:
            return 0, self.size(file)
        at = bisect.bisect_right(runs, (offset, float("inf"))) - 1
        if at >= 0 and runs[at][0] <= offset and end <= runs[at][1]:
            return runs[at]
        return None

    def read(self, file: int, offset: int, length: int) -> bytes:
        """Small reads go through aligned windows of a part's size (fetched ahead) within
        the run of expected bytes they lie in: a scan of a shard costs a few large GETs,
        and a slice of one tensor no more than its own chunks."""
        window = self.storage.part_size
        run = self._run_of(file, offset, offset + length)
        if length <= 0 or length >= window // 2 or run is None:
            return self._get(file, offset, offset + length)
        base, stop = run
        first, last = (offset - base) // window, (offset + length - 1 - base) // window
        parts = [self._window(file, base, stop, k).result() for k in range(first, last + 1)]
        for k in range(last + 1, last + 1 + _AHEAD):  # the next ones, while this decodes
            if base + k * window < stop:
                self._window(file, base, stop, k)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - (base + first * window)
        return bytes(memoryview(data)[start : start + length])

    def _window(self, file: int, base: int, stop: int, k: int) -> Future[bytes]:
        """The fetch of window ``k`` of the run ``[base, stop)`` of object ``file`` (started
        if not yet)."""
        key = (file, base, k)
        with self._windows_lock:
            found = self._windows.get(key)
            if found is not None:
                self._windows.move_to_end(key)
                return found
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(_AHEAD + 1, thread_name_prefix="aptckpt-window")
            window = self.storage.part_size
            start = base + k * window
            found = self._fetcher.submit(self._get, file, start, min(start + window, stop))
            self._windows[key] = found
            while len(self._windows) > _KEPT_WINDOWS:  # bounded memory: oldest go first
                self._windows.popitem(last=False)
            return found

    def read_verify(self, reads: Sequence[base.RawRead], threads: int) -> list[tuple[int, str]]:
        if not reads:
            return []
        order = sorted(range(len(reads)), key=lambda i: (reads[i].file, reads[i].offset))
        groups: list[list[int]] = []
        limit = self.storage.part_size
        end = -1
        for i in order:
            r = reads[i]
            group = groups[-1] if groups else None
            if (
                group is not None
                and reads[group[0]].file == r.file
                and r.offset == end
                and end - reads[group[0]].offset + len(r.out) <= limit
            ):
                group.append(i)
            else:
                groups.append([i])
            end = r.offset + len(r.out)

        def run(group: list[int]) -> list[tuple[int, str]]:
            first = reads[group[0]]
            start = first.offset
            stop = reads[group[-1]].offset + len(reads[group[-1]].out)
            data = memoryview(self._get(first.file, start, stop))
            problems = []
            for i in group:
                r = reads[i]
                part = data[r.offset - start : r.offset - start + len(r.out)]
                r.out[: len(part)] = part
                if len(part) < len(r.out):
                    problems.append((i, "eof"))
                elif r.digest is not None and _accel.xxh3_128(r.out) != r.digest:
                    problems.append((i, "digest"))
            return problems

        workers = max(1, min(threads or _config.threads(), 16, len(groups)))
        if workers == 1:
            found = [p for g in groups for p in run(g)]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="aptckpt-get") as pool:
                found = [p for ps in pool.map(run, groups) for p in ps]
        return sorted(found)

    def stream(self, file: int) -> BinaryIO:
        raw = _RangeReader(self, file)
        return io.BufferedReader(raw, buffer_size=self.storage.part_size)

    def size(self, file: int) -> int:
        return self.sizes[file] or 0

    def close(self) -> None:
        with self._windows_lock:
            fetcher, self._fetcher = self._fetcher, None
            self._windows.clear()
        if fetcher is not None:
            fetcher.shutdown(wait=True, cancel_futures=True)


#: Windows fetched ahead of the one a small read needs, and windows kept at most (a part
#: each: 16 MiB by default, so at most ~100 MiB of a load's memory).
_AHEAD = 2
_KEPT_WINDOWS = 6


class _RangeReader(io.RawIOBase):
    """One data object as a seekable raw file: each read a ranged, retried GET."""

    def __init__(self, files: RemoteDataFiles, file: int) -> None:
        self.files, self.file, self.pos = files, file, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base_ = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.files.size(self.file)}
        self.pos = max(0, base_[whence] + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        data = self.files.read(self.file, self.pos, len(out))
        out[: len(data)] = data
        self.pos += len(data)
        return len(data)
