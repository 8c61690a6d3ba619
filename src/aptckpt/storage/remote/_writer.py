"""Saving a checkpoint to an object store: data objects under a fresh prefix, the
manifest last (see :mod:`aptckpt.storage.remote` for the protocol).

Data files stream out through sinks with bounded memory: :class:`MultipartSink` (S3)
fills one part while up to ``in_flight`` earlier ones upload in parallel, each part
retried on its own; a file no larger than one part is a single PUT.
:class:`StreamSink` (other stores) keeps a file of up to one part in memory and puts
it whole (retried); a longer one streams through the file system's own writer.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgpack

from aptckpt import manifest as mf
from aptckpt.errors import AptckptError, CheckpointExistsError, WriteError
from aptckpt.storage import base
from aptckpt.storage._digests import ChunkDigester

if TYPE_CHECKING:
    from aptckpt.storage.remote import FsspecStorage
    from aptckpt.storage.remote._store import Store

__all__ = ["TOKEN", "MultipartSink", "RemoteCheckpointWriter", "StreamSink", "named_files"]

log = logging.getLogger("aptckpt")

#: The prefix of one save's data objects: ``data-<unix ms>-<16 hex digits>``.
TOKEN = re.compile(r"data-(\d{10,16})-([0-9a-f]{16})")


def new_token() -> str:
    return f"data-{int(time.time() * 1000)}-{secrets.token_hex(8)}"


def named_files(manifest_bytes: bytes) -> list[str] | None:
    """The data files a manifest names (relative paths), or None if it cannot be read
    (then nothing it might name may be removed)."""
    try:
        doc = msgpack.unpackb(manifest_bytes, raw=False, strict_map_key=False)
        files = [str(f["path"]) for f in doc["files"]]
    except Exception:  # any damage: we only must not remove what it names
        return None
    return files


class _SinkBase(base.Sink):
    def __init__(
        self,
        store: Store,
        path: str,
        *,
        part_size: int,
        digest_chunk_size: int,
        failed: Callable[[str, BaseException], AptckptError],
    ) -> None:
        self.store, self.path, self.part_size = store, path, part_size
        self.size = 0
        self._failed = failed
        self._digester = ChunkDigester(digest_chunk_size) if digest_chunk_size else None
        self._digests = b""
        self._buffer = bytearray()
        self._closed = False

    def digests(self) -> bytes:
        if not self._closed:
            raise RuntimeError("digests() needs a closed sink")
        return self._digests

    def _take(self, data: Any) -> memoryview:
        view = memoryview(data).cast("B")
        if self._closed:
            raise ValueError(f"write to a closed sink ('{self.path}')")
        if self._digester is not None:
            self._digester.update(view)
        self.size += len(view)
        return view

    def _finish_digests(self) -> None:
        if self._digester is not None:
            self._digests = self._digester.finish()


class MultipartSink(_SinkBase):
    """An S3 object written front to back in parallel multipart parts."""

    def __init__(self, store: Store, path: str, *, in_flight: int, **kwargs: Any) -> None:
        super().__init__(store, path, **kwargs)
        self._in_flight = max(1, in_flight)
        self._upload: str | None = None
        self._parts: deque[Future[str]] = deque()
        self._etags: list[str] = []
        self._pool: ThreadPoolExecutor | None = None

    def write(self, data: Any) -> int:
        view = self._take(data)
        n = len(view)
        while view:
            take = min(len(view), self.part_size - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == self.part_size:
                self._submit()
        return n

    def _submit(self) -> None:
        try:
            if self._upload is None:
                self._upload = self.store.upload_start(self.path)
                self._pool = ThreadPoolExecutor(self._in_flight, thread_name_prefix="aptckpt-up")
            while self._parts and self._parts[0].done():  # a failed part stops the file early
                self._etags.append(self._parts.popleft().result())
            while len(self._parts) >= self._in_flight:  # bounded memory: wait for the oldest
                self._etags.append(self._parts.popleft().result())
            assert self._pool is not None
            number = len(self._etags) + len(self._parts) + 1
            body, self._buffer = self._buffer, bytearray()
            self._parts.append(
                self._pool.submit(self.store.upload_part, self.path, self._upload, number, body)
            )
        except AptckptError:
            raise
        except Exception as err:
            self._abandon()
            raise self._failed(self.path, err) from err

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._upload is None:
                self.store.put(self.path, self._buffer)
            else:
                if self._buffer:
                    self._submit()
                while self._parts:
                    self._etags.append(self._parts.popleft().result())
                self.store.upload_complete(self.path, self._upload, self._etags)
                self._upload = None
        except AptckptError:
            self._abandon()
            raise
        except Exception as err:
            self._abandon()
            raise self._failed(self.path, err) from err
        finally:
            self._buffer = bytearray()
            self._shutdown()
        self._finish_digests()

    def _shutdown(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True, cancel_futures=True)

    def _abandon(self) -> None:
        self._closed = True
        for part in self._parts:
            part.cancel()
        self._shutdown()
        self._parts.clear()
        if self._upload is not None:
            upload, self._upload = self._upload, None
            self.store.upload_abort(self.path, upload)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._abandon()
        self._buffer = bytearray()


class StreamSink(_SinkBase):
    """An object of a store without (our) multipart uploads: one retried PUT up to a
    part's size, else the file system's own streaming writer."""

    def __init__(self, store: Store, path: str, **kwargs: Any) -> None:
        super().__init__(store, path, **kwargs)
        self._file: Any = None

    def write(self, data: Any) -> int:
        view = self._take(data)
        try:
            if self._file is None and len(self._buffer) + len(view) > self.part_size:
                self._file = self.store.fs.open(self.path, "wb", block_size=self.part_size)
                self._file.write(self._buffer)
                self._buffer = bytearray()
            if self._file is not None:
                self._file.write(view)
            else:
                self._buffer += view
        except Exception as err:
            self.abort()
            raise self._failed(self.path, err) from err
        return len(view)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._file is None:
                self.store.put(self.path, self._buffer)
            else:
                file, self._file = self._file, None
                file.close()
        except Exception as err:
            raise self._failed(self.path, err) from err
        finally:
            self._buffer = bytearray()
        self._finish_digests()

    def abort(self) -> None:
        self._closed = True
        self._buffer = bytearray()
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(Exception):
                discard = getattr(file, "discard", None)
                if discard is not None:
                    discard()  # never committed: nothing is left behind


class RemoteCheckpointWriter(base.CheckpointWriter):
    """One save to an object store: data under ``<path>/<token>/``, the manifest last."""

    storage: FsspecStorage

    def __init__(
        self,
        storage: FsspecStorage,
        path: str,
        *,
        overwrite: bool = False,
        token: str | None = None,
    ) -> None:
        super().__init__()
        self.storage, self.path, self.overwrite = storage, path, overwrite
        self.store = storage.store
        #: The save's data prefix; other writers of the same save (ranks) join with it.
        self.token = token or new_token()
        self._coordinator = token is None
        if not TOKEN.fullmatch(self.token):
            raise ValueError(f"not a save token: {self.token!r}")
        self.prefix = storage.join(path, self.token)
        self._manifest = storage.join(path, mf.MANIFEST_NAME)
        self._sinks: dict[str, base.Sink] = {}
        self._committed = False
        #: A manifest write failed without telling whether it happened: our data may be
        #: named by the checkpoint, so abort leaves it (to the debris rule).
        self._uncertain = False
        if self._coordinator:
            storage.check_name(path)
            if not overwrite and self._exists():
                raise CheckpointExistsError(
                    self.location,
                    "a checkpoint already exists there; "
                    "pass overwrite=True to replace it or choose another path",
                )

    def _exists(self) -> bool:
        try:
            return self.store.head(self._manifest) is not None
        except AptckptError:
            raise
        except Exception as err:
            raise self._failed(self._manifest, err) from err

    def _failed(self, path: str, err: BaseException) -> AptckptError:
        return self.storage.write_error(f"saving checkpoint '{self.location}'", path, err)

    @property
    def committed(self) -> bool:
        return self._committed

    @property
    def files(self) -> list[str]:
        return list(self._sinks)

    def open(self, name: str, *, digest_chunk_size: int = 0) -> base.Sink:
        mf.check_relative_path(name)
        if name == mf.MANIFEST_NAME or name in self._sinks:
            raise ValueError(f"file name {name!r} is reserved or already used")
        sink = self.storage.sink(
            self.storage.join(self.prefix, name),
            digest_chunk_size=digest_chunk_size,
            failed=self._failed,
        )
        self._sinks[name] = sink
        return sink

    def sizes(self) -> list[mf.FileRecord]:
        return [mf.FileRecord(f"{self.token}/{n}", s.size) for n, s in self._sinks.items()]

    def sync_files(self, threads: int | None = None) -> None:
        """Every data object is complete once its sink closed (the upload finished): there
        is nothing left to make durable, only sinks still open to refuse."""
        still_open = [n for n, s in self._sinks.items() if not getattr(s, "_closed", True)]
        if still_open:
            raise RuntimeError(f"data files still open at sync: {', '.join(still_open)}")

    def commit(self, manifest_bytes: bytes) -> None:
        """Write the manifest: a conditional create (the loser of a race gets
        :class:`CheckpointExistsError`, its data removed) or, with ``overwrite``, one
        PUT replacing the old manifest, after which the old data goes."""
        if not self._coordinator:
            raise RuntimeError("only the save's coordinator commits")
        self.sync_files()
        if self.overwrite:
            self._replace(manifest_bytes)
            return
        try:
            created = self.store.create(self._manifest, manifest_bytes)
        except Exception as err:
            self._settle_uncertain(manifest_bytes)
            if self._committed:
                return
            raise self._failed(self._manifest, err) from err
        if not created:
            self.abort()
            raise CheckpointExistsError(
                self.location,
                "another save committed a checkpoint there first (nothing of this save was "
                "kept); pass overwrite=True to replace it or choose another path",
            )
        self._committed = True

    def _settle_uncertain(self, manifest_bytes: bytes) -> None:
        """After a failed manifest write: committed if the manifest holds our bytes, else
        uncertain when that cannot be read either."""
        try:
            if self.store.tagged(self._manifest) is not None:
                found = self.store.cat(self._manifest)
                self._committed = found == manifest_bytes
        except Exception:
            self._uncertain = True

    def _replace(self, manifest_bytes: bytes) -> None:
        try:
            old = self.store.tagged(self._manifest)
        except Exception as err:
            raise self._failed(self._manifest, err) from err
        try:
            self.store.put(self._manifest, manifest_bytes)
        except Exception as err:
            self._settle_uncertain(manifest_bytes)
            if not self._committed:
                raise self._failed(self._manifest, err) from err
        self._committed = True
        if old is not None:
            self._remove_replaced(old[0])

    def _remove_replaced(self, old_manifest: bytes) -> None:
        """Remove the data the replaced manifest named (not ours). Failures only leave
        debris, which :meth:`FsspecStorage.remove_debris` takes later."""
        named = named_files(old_manifest)
        if named is None:
            return
        prefixes = set()
        loose = []
        for rel in named:
            head = rel.split("/", 1)[0]
            if head == self.token:
                continue
            if TOKEN.fullmatch(head) and "/" in rel:
                prefixes.add(head)
            else:
                loose.append(self.storage.join(self.path, rel))
        try:
            for prefix in sorted(prefixes):
                self.store.remove_tree(self.storage.join(self.path, prefix))
            self.store.remove(loose)
        except Exception as err:
            log.warning(
                "replaced checkpoint %s, but removing its old data failed (%s); remove_debris "
                "takes it later",
                self.location,
                self.storage.scrub(str(err)),
            )

    def abort(self) -> None:
        for sink in self._sinks.values():
            with contextlib.suppress(Exception):
                sink.abort()
        if self._committed or self._uncertain:
            return
        try:
            if self._coordinator:
                self.store.remove_tree(self.prefix)
            else:  # other ranks share the prefix: only this writer's files
                self.store.remove([self.storage.join(self.prefix, n) for n in self._sinks])
        except Exception as err:
            log.warning(
                "could not remove the data of an unfinished save at %s (%s); remove_debris "
                "takes it later",
                self.storage.display(self.prefix),
                self.storage.scrub(str(err)),
            )


def write_error(action: str, url: str, said: str, fix: str, code: int | None) -> WriteError:
    return WriteError(
        f"{action} failed: {said} ('{url}'); {fix}. Nothing was committed; earlier "
        "checkpoints are intact",
        path=url,
        errno_=code,
    )
