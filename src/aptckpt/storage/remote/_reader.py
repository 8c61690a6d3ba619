"""Reading a committed checkpoint from an object store.

The manifest names every data object (``<token>/<name>``), so a load needs no listing
of the checkpoint; the sizes of its objects come from one listing per folder they
live in. Reads are ranged GETs, retried; :meth:`RemoteDataFiles.read_verify` joins
reads adjacent in one object into requests of up to a part's size and runs them on a
thread pool, hashing each chunk right after it arrived.

A data object that disappears mid-load is told apart from damage the way the local
reader does: if the manifest is gone or is no longer the one read (the checkpoint was
deleted or replaced), :class:`~aptckpt.errors.CheckpointDeletedError`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
            if err.errno == 27:  # EFBIG
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

    def read(self, file: int, offset: int, length: int) -> bytes:
        return self._get(file, offset, offset + length)

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
        pass


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
