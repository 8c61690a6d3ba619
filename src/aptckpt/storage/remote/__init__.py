"""Checkpoints in object stores: any fsspec URL (``s3://``, ``gs://``, ``az://``, ``memory://``).

Object stores have no rename and no directories: a PUT of one object is all or
nothing, and (on S3 since 2020) reads and listings see it at once. The protocol is
built on that alone.

**Layout.** A checkpoint ``<ckpt>`` is the object ``<ckpt>/manifest.msgpack`` plus data
objects under a prefix unique to the save that wrote them, ``<ckpt>/<token>/<name>``
with ``token = data-<unix ms>-<16 hex digits>``. The manifest names its data by those
relative paths (``<token>/<name>``), so a load needs no listing, and a checkpoint
copied to a local directory loads there too.

**Commit.** Every data object is complete (its upload finished) before the manifest is
written, and the manifest is created with a conditional create (``If-None-Match: *``
on S3): of two saves racing for one name, exactly one commits; the other gets
:class:`~aptckpt.errors.CheckpointExistsError` and its data is removed. A save to a
name that has a manifest is refused before anything is uploaded.

**Overwrite.** The new data goes under a new token; then one unconditional PUT
replaces the manifest -- readers see the old checkpoint or the new one, never a mix --
and only then is the data the old manifest named removed. A crash before the PUT
leaves the old checkpoint (plus unreferenced new data); a crash after it leaves the
new one (plus unreferenced old data). A load that read the old manifest and then
misses an object gets :class:`~aptckpt.errors.CheckpointDeletedError`.

**Delete.** The manifest goes first (the name is no checkpoint from that instant), then
the data it named.

**Debris.** Data that no manifest names -- a save that died, the old data of an
interrupted overwrite or delete -- is removed by :meth:`FsspecStorage.remove_debris`
once the newest thing in its prefix (object, incomplete upload, or the token's own
time) is older than ``APTCKPT_REMOTE_GRACE_S`` (default an hour): a save in flight
keeps finishing objects, so it is never taken. Incomplete S3 multipart uploads that old
are aborted with it (a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` is a
good second line).

**Requests** go through one retry policy (:mod:`~aptckpt.storage.remote._retry`); the
conditional writes of each kind of store are :mod:`~aptckpt.storage.remote._store`
(exact on S3 and ``memory://``; a check then a write elsewhere -- documented there).
Credentials are taken from ``storage_options`` over the environment's (``AWS_*``,
``AWS_ENDPOINT_URL``); they never appear in a URL aptckpt shows, a message, or a
manifest.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from aptckpt import _config
from aptckpt import manifest as mf
from aptckpt.errors import (
    AptckptError,
    CheckpointNotFoundError,
    InvalidNameError,
    StorageError,
    UnreadableError,
    UnsupportedPathError,
)
from aptckpt.storage import base
from aptckpt.storage.remote._reader import RemoteCheckpointReader
from aptckpt.storage.remote._retry import RetryPolicy, describe, scrubber
from aptckpt.storage.remote._store import Store, mtime_of
from aptckpt.storage.remote._writer import (
    TOKEN,
    MultipartSink,
    RemoteCheckpointWriter,
    StreamSink,
    named_files,
    write_error,
)

if TYPE_CHECKING:
    from aptckpt.storage.remote._lease import RemoteLease

__all__ = ["FsspecStorage", "RetryPolicy"]

#: What to install for a scheme whose fsspec package is missing.
_PACKAGES = {
    "s3": "aptckpt[s3]' (or 's3fs",
    "s3a": "aptckpt[s3]' (or 's3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}

#: s3fs reads this in a path as an object version and drops it from the key: a path
#: holding it would read and write another object than the one it names.
_VERSION_ID = "?versionId="
_VERSION_ID_SAID = (
    "'{url}' holds '?versionId=', which s3fs takes for an object version (the key would "
    "end before it, naming another object); aptckpt paths cannot hold it: choose another name"
)

#: Storages kept for reuse, by scheme and options; the least recently used go first (a
#: storage still held by a manager or a save keeps working).
_CACHE_SIZE = 16
_cache: dict[tuple[str, Any], FsspecStorage] = {}
_cache_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _cache_lock
    _cache_lock = threading.Lock()  # another thread may have held it at the fork
    # A file system's connections and event loop belong to the parent: the child makes
    # its own on its first use of a URL.
    _cache.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _freeze(value: Any) -> Any:
    """A hashable form of storage options (for the cache key)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return ("<object>", id(value))
    return value


class FsspecStorage(base.Storage):
    """An fsspec file system as a checkpoint storage; see the module docstring.

    Paths are the file system's own (``bucket/key`` on S3). Build one with
    :meth:`for_url`; the constructor takes a file system directly (tests wrap one to
    inject failures) and the tunables: ``part_size`` (bytes per uploaded part and per
    joined read), ``in_flight`` (parts of one file uploading at once), ``retry``.
    """

    local = False
    has_locks = False

    def __init__(
        self,
        fs: Any,
        protocol: str,
        *,
        options: Mapping[str, Any] | None = None,
        part_size: int = _config.REMOTE_PART_SIZE,
        in_flight: int = _config.REMOTE_PARTS_IN_FLIGHT,
        retry: RetryPolicy | None = None,
    ) -> None:
        if part_size <= 0:
            raise ValueError(f"part_size must be positive, not {part_size}")
        self.scheme = protocol
        self.part_size, self.in_flight = part_size, in_flight
        self.retry = retry or RetryPolicy()
        self.scrub = scrubber(dict(options or {}))
        self.store = Store(fs, protocol, self.retry)

    @property
    def fs(self) -> Any:
        """The fsspec file system (the store's: made anew in a forked child)."""
        return self.store.fs

    @fs.setter
    def fs(self, fs: Any) -> None:
        self.store.fs = fs

    def __repr__(self) -> str:  # never the options: they may hold credentials
        return f"FsspecStorage('{self.scheme}://')"

    @classmethod
    def for_url(
        cls, url: str, options: Mapping[str, Any] | None = None
    ) -> tuple[FsspecStorage, str]:
        """The storage of ``url`` (one per scheme and options, cached) and the path in it.

        Raises:
            UnsupportedPathError: fsspec or the scheme's package is not installed (the
                message says what to install), the scheme is unknown, or the options
                are refused by the file system.
        """
        scheme = url.partition("://")[0].lower()
        target = scheme + url[len(scheme) :]  # schemes are case-insensitive: S3:// is s3://
        url = scrubber({})(url)  # a user:password@ in the URL is never shown
        userinfo, at, _ = target.partition("://")[2].split("/", 1)[0].rpartition("@")
        if at and ":" in userinfo:
            raise UnsupportedPathError(
                f"'{url}' holds credentials (user:password@); pass them in storage_options "
                "instead (they are never shown or written there)",
                path=url,
            )
        install = _PACKAGES.get(scheme, "fsspec")
        try:
            import fsspec  # type: ignore[import-untyped]
        except ImportError as err:
            raise UnsupportedPathError(
                f"'{scheme}://' URLs need fsspec: pip install '{install}'", path=url
            ) from err
        try:
            klass = fsspec.get_filesystem_class(scheme)
        except ImportError as err:
            raise UnsupportedPathError(
                f"'{scheme}://' URLs need a package that is not installed: "
                f"pip install '{_PACKAGES.get(scheme, err.name or scheme)}'",
                path=url,
            ) from err
        except ValueError as err:
            raise UnsupportedPathError(
                f"unknown URL scheme '{scheme}://': aptckpt saves to local paths and to the "
                "URLs fsspec knows (s3://, gs://, az://, memory://, ...)",
                path=url,
            ) from err
        opts = _with_defaults(scheme, dict(options or {}))
        key = (scheme, _freeze(opts))
        with _cache_lock:
            storage = _cache.pop(key, None)
            if storage is None:
                storage = cls(_make_fs(klass, scheme, opts, url), scheme, options=opts)
                # a storage held across a fork (by a manager made before it) works there
                storage.store.remake = functools.partial(_make_fs, klass, scheme, opts, url)
            _cache[key] = storage  # most recently used last
            while len(_cache) > _CACHE_SIZE:  # rotating credentials must not pile up
                del _cache[next(iter(_cache))]
        path = klass._strip_protocol(target).rstrip("/")
        if not path.strip("/"):
            raise UnsupportedPathError(f"'{url}' names no folder in the store", path=url)
        if storage.store.s3 and _VERSION_ID in path:
            raise UnsupportedPathError(_VERSION_ID_SAID.format(url=url), path=url)
        return storage, path

    # ----------------------------------------------------------------- paths

    def display(self, path: str) -> str:
        return f"{self.scheme}://{path.lstrip('/')}"

    def strip(self, path: str) -> str:
        """``path`` as the file system's listings spell it."""
        stripped: str = self.fs._strip_protocol(path)
        return stripped.rstrip("/")

    def check_name(self, path: str) -> None:
        """Refuse a checkpoint path no save can keep (see the local ``check_name``)."""
        name = self.name(path)
        if not name:
            raise InvalidNameError(f"'{self.display(path)}' names no checkpoint")
        if self.store.s3 and _VERSION_ID in path:
            url = self.display(path)
            raise InvalidNameError(_VERSION_ID_SAID.format(url=url), path=url)
        if TOKEN.fullmatch(name) or name == mf.MANIFEST_NAME:
            raise InvalidNameError(
                f"'{name}' is a name aptckpt gives the data of saves, which cleanup removes; "
                "choose another name",
                path=self.display(path),
            )

    # ---------------------------------------------------------------- errors

    def write_error(self, action: str, path: str, err: BaseException) -> AptckptError:
        """The aptckpt error for a write request to ``path`` that failed for good."""
        if isinstance(err, AptckptError):
            return err
        said, fix, code = describe(err, self.scrub)
        return write_error(action, self.display(path), said, fix, code)

    def read_error(self, action: str, path: str, err: BaseException) -> AptckptError:
        """The aptckpt error for a read request to ``path`` that failed for good."""
        if isinstance(err, AptckptError):
            return err
        said, fix, code = describe(err, self.scrub)
        url = self.display(path)
        if code == errno.EACCES:
            return UnreadableError(f"cannot read '{url}': {said}; {fix}", path=url)
        return StorageError(f"{action} failed: {said} ('{url}'); {fix}", path=url, errno_=code)

    def why_absent(self, path: str) -> str:
        """Why no checkpoint is at ``path`` (a missing bucket is named as such)."""
        if self.store.s3:
            bucket = path.split("/", 1)[0]
            try:
                if not self.fs.exists(bucket):
                    return f"the bucket '{bucket}' does not exist (create it, or fix the URL)"
            except Exception:  # only the wording depends on it
                pass
        return (
            f"it has no {mf.MANIFEST_NAME}: not an aptckpt checkpoint, or a save that never "
            "committed"
        )

    # ----------------------------------------------------------- checkpoints

    def sink(self, path: str, *, digest_chunk_size: int, failed: Any) -> base.Sink:
        """A sink writing the object ``path`` (for the writers)."""
        common = {"part_size": self.part_size, "digest_chunk_size": digest_chunk_size}
        if self.store.s3:
            return MultipartSink(
                self.store, path, in_flight=self.in_flight, failed=failed, **common
            )
        return StreamSink(self.store, path, failed=failed, **common)

    def create_checkpoint(self, path: str, *, overwrite: bool = False) -> RemoteCheckpointWriter:
        return RemoteCheckpointWriter(self, path, overwrite=overwrite)

    def join_checkpoint(self, path: str, token: str) -> RemoteCheckpointWriter:
        return RemoteCheckpointWriter(self, path, token=token)

    def open_checkpoint(self, path: str) -> RemoteCheckpointReader:
        return RemoteCheckpointReader(self, path)

    def is_checkpoint(self, path: str) -> bool:
        found = self.info(self.join(path, mf.MANIFEST_NAME))
        return found is not None and found.kind == "file"

    def delete_checkpoint(self, path: str) -> None:
        manifest = self.join(path, mf.MANIFEST_NAME)
        try:
            found = self.store.tagged(manifest)
            if found is None:
                raise CheckpointNotFoundError(self.display(path), self.why_absent(path))
            self.store.remove([manifest])  # the name is no checkpoint from here on
            named = named_files(found[0]) or []
            heads = {rel.split("/", 1)[0] for rel in named if "/" in rel}
            for head in sorted(h for h in heads if TOKEN.fullmatch(h)):
                self.store.remove_tree(self.join(path, head))
            self.store.remove([self.join(path, rel) for rel in named if "/" not in rel])
        except AptckptError:
            raise
        except Exception as err:
            raise self.write_error(
                f"deleting checkpoint '{self.display(path)}'", path, err
            ) from err

    def remove_debris(self, folder: str, *, exclusive: bool = False) -> int:
        """Remove unreferenced data prefixes older than the grace age. ``exclusive`` (the
        caller holds the run's lease) changes nothing here: a holder that paused past its
        ttl may still have a save in flight, whose data only the age rule protects."""
        grace = _config.remote_grace_s()
        now = time.time()
        try:
            uploads = self.store.uploads(folder)  # one listing for every folder below
            removed = self._sweep(folder, grace, now, uploads)
            base_ = self.strip(folder) + "/"
            below = {
                self.strip(e["name"]) for e in self.store.ls(folder) if e.get("type") == "directory"
            }
            # a checkpoint folder holding nothing but an unfinished upload lists as nothing
            below |= {base_ + p[len(base_) :].split("/", 1)[0] for p, _, _ in uploads}
            for sub in sorted(below):
                if sub.startswith(base_) and not TOKEN.fullmatch(self.name(sub)):
                    removed += self._sweep(sub, grace, now, uploads)
        except AptckptError:
            raise
        except Exception as err:
            action = f"removing debris in '{self.display(folder)}'"
            raise self.write_error(action, folder, err) from err
        return removed

    def _sweep(
        self, folder: str, grace: float, now: float, uploads: list[tuple[str, str, float]]
    ) -> int:
        """Remove the unreferenced token prefixes of checkpoint folder ``folder`` whose
        newest object is older than ``grace``; how many went."""
        entries = self.store.ls(folder)
        tokens = {
            self.strip(e["name"])
            for e in entries
            if e.get("type") == "directory" and TOKEN.fullmatch(self.name(e["name"]))
        }
        base_ = self.strip(folder) + "/"
        for upload_path, _, _ in uploads:  # a prefix with only an unfinished upload
            head = upload_path[len(base_) :].split("/", 1)[0]
            if upload_path.startswith(base_) and TOKEN.fullmatch(head):
                tokens.add(base_ + head)
        if not tokens:
            return 0
        protected: set[str] = set()
        if any(self.name(e["name"]) == mf.MANIFEST_NAME for e in entries):
            found = self.store.tagged(self.join(folder, mf.MANIFEST_NAME))
            if found is not None:
                named = named_files(found[0])
                if named is None:
                    return 0  # an unreadable manifest may name anything: keep it all
                protected = {rel.split("/", 1)[0] for rel in named}
        removed = 0
        for prefix in sorted(tokens):
            token = self.name(prefix)
            if token in protected:
                continue
            match = TOKEN.fullmatch(token)
            assert match is not None
            newest = int(match.group(1)) / 1000
            objects = self.store.find(prefix)
            if self.join(prefix, mf.MANIFEST_NAME) in objects:
                continue  # a checkpoint someone named like a token: never debris
            mine = [u for u in uploads if u[0].startswith(prefix + "/")]
            newest = max([newest, *(mtime_of(d) for d in objects.values()), *(u[2] for u in mine)])
            if now - newest <= grace:
                continue
            if any(now - self.store.upload_newest(p, u, when) <= grace for p, u, when in mine):
                continue  # one big file still uploading: it keeps finishing parts
            for path, upload, _ in mine:
                self.store.upload_abort(path, upload)
            self.store.remove(sorted(objects))
            removed += 1
        return removed

    # ----------------------------------------------------------------- files

    def read_file(self, path: str, *, limit: int) -> bytes:
        url = self.display(path)
        try:
            found = self.store.head(path)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "no such object", url)
            if found.get("type") != "file":
                raise OSError(errno.EINVAL, "not a file (a folder of the store)", url)
            if int(found.get("size") or 0) > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", url)
            data = self.store.cat(path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such object", url) from None
        except (AptckptError, OSError) as err:
            if type(err) is OSError and err.filename == url:
                raise
            raise self.read_error(f"reading '{url}'", path, err) from err
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", url)
        return data

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        try:
            found = self.store.head(path)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "no such object", self.display(path))
            end = min(offset + length, int(found.get("size") or 0))
            return self.store.cat(path, offset, end) if end > offset else b""
        except FileNotFoundError:
            raise
        except Exception as err:
            raise self.read_error(f"reading '{self.display(path)}'", path, err) from err

    def write_file(self, path: str, data: bytes) -> None:
        try:
            self.store.put(path, data)  # one PUT: readers see the old object or the new
        except Exception as err:
            raise self.write_error(f"writing '{self.display(path)}'", path, err) from err

    def create_file(self, path: str, data: bytes) -> bool:
        try:
            return self.store.create(path, data)
        except Exception as err:
            raise self.write_error(f"creating '{self.display(path)}'", path, err) from err

    def put_files(
        self, items: Sequence[tuple[str, Any]], *, threads: int = 4, staging: str | None = None
    ) -> None:
        if not items:
            return
        workers = max(1, min(threads, len(items)))
        with ThreadPoolExecutor(workers, thread_name_prefix="aptckpt-put") as pool:
            list(pool.map(lambda item: self.write_file(*item), items))

    def _entry(self, name: str, detail: Mapping[str, Any]) -> base.Entry:
        kind: Literal["file", "dir"] = "file" if detail.get("type") == "file" else "dir"
        return base.Entry(name, kind, int(detail.get("size") or 0), mtime_of(dict(detail)))

    def info(self, path: str) -> base.Entry | None:
        try:
            found = self.store.head(path)
        except Exception as err:
            raise self.read_error(f"looking at '{self.display(path)}'", path, err) from err
        return None if found is None else self._entry(self.name(path), found)

    def list(self, folder: str) -> list[base.Entry]:
        try:
            found = self.store.ls(folder)
        except Exception as err:
            raise self.read_error(f"listing '{self.display(folder)}'", folder, err) from err
        entries = {}
        for detail in found:
            name = self.name(detail["name"])
            if name and name not in entries:
                entries[name] = self._entry(name, detail)
        return [entries[n] for n in sorted(entries)]

    def walk(self, folder: str) -> Iterator[tuple[str, base.Entry]]:
        try:
            found = self.store.find(folder)
        except Exception as err:
            raise self.read_error(f"listing '{self.display(folder)}'", folder, err) from err
        prefix = self.strip(folder) + "/"
        for path in sorted(found):
            rel = self.strip(path)[len(prefix) :]
            yield rel, self._entry(self.name(path), found[path])

    def remove_file(self, path: str) -> None:
        try:
            self.store.remove([path])
        except Exception as err:
            raise self.write_error(f"removing '{self.display(path)}'", path, err) from err

    def remove_tree(self, path: str) -> None:
        try:
            self.store.remove_tree(path)
        except Exception as err:
            raise self.write_error(f"removing '{self.display(path)}'", path, err) from err

    def makedirs(self, path: str) -> None:
        """Nothing: object stores have no folders (a key's prefix is one)."""

    # ----------------------------------------------------------------- lease

    def lease(self, path: str, *, owner: Mapping[str, Any], ttl: float) -> RemoteLease:
        from aptckpt.storage.remote._lease import RemoteLease

        lease = RemoteLease(self, path, owner, ttl)
        for _attempt in range(5):
            try:
                taken = lease.try_take()
            except (FileExistsError, AptckptError):
                raise
            except Exception as err:
                raise self.write_error(
                    f"taking the lease '{self.display(path)}'", path, err
                ) from err
            if taken:
                return lease
        raise FileExistsError(
            errno.EEXIST, f"lease '{self.display(path)}' keeps changing hands; try again", "{}"
        )


def _with_defaults(scheme: str, opts: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` completed with what aptckpt needs of the file system: for S3,
    the endpoint of ``AWS_ENDPOINT_URL(_S3)`` unless the options name one, and
    botocore's own retries off (ours are the policy)."""
    if scheme in ("s3", "s3a"):
        client = dict(opts.get("client_kwargs") or {})
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and not opts.get("endpoint_url") and not client.get("endpoint_url"):
            opts["endpoint_url"] = endpoint
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        opts["config_kwargs"] = config
    return opts


def _make_fs(klass: Any, scheme: str, opts: dict[str, Any], url: str) -> Any:
    """A file system of our own (not fsspec's shared instance: we tune it)."""
    try:
        try:
            fs = klass(**opts, skip_instance_cache=True, use_listings_cache=False)
        except TypeError:
            fs = klass(**opts, skip_instance_cache=True)
    except Exception as err:
        scrub = scrubber(opts)
        raise UnsupportedPathError(
            f"the storage_options for '{scheme}://' were refused: {scrub(str(err))}", path=url
        ) from None
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own loop off: ours is the policy
    return fs
