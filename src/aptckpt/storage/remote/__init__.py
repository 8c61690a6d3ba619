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
import json
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

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

_cache: dict[tuple[str, Any], FsspecStorage] = {}
_cache_lock = threading.Lock()


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
        self.fs = fs
        self.scheme = protocol
        self.part_size, self.in_flight = part_size, in_flight
        self.retry = retry or RetryPolicy()
        self.scrub = scrubber(dict(options or {}))
        self.store = Store(fs, protocol, self.retry)

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
        url = scrubber({})(url)  # a user:password@ in the URL is never shown
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
            storage = _cache.get(key)
            if storage is None:
                storage = cls(_make_fs(klass, scheme, opts, url), scheme, options=opts)
                _cache[key] = storage
        path = klass._strip_protocol(url).rstrip("/")
        if not path.strip("/"):
            raise UnsupportedPathError(f"'{url}' names no folder in the store", path=url)
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
        removed = self._sweep(folder, grace, now)
        for entry in self.store.ls(folder):
            if entry.get("type") == "directory" and not TOKEN.fullmatch(self.name(entry["name"])):
                removed += self._sweep(self.strip(entry["name"]), grace, now)
        return removed

    def _sweep(self, folder: str, grace: float, now: float) -> int:
        """Remove the unreferenced token prefixes of checkpoint folder ``folder`` whose
        newest object is older than ``grace``; how many went."""
        entries = self.store.ls(folder)
        tokens = [
            self.strip(e["name"])
            for e in entries
            if e.get("type") == "directory" and TOKEN.fullmatch(self.name(e["name"]))
        ]
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
        uploads = self.store.uploads(folder)
        removed = 0
        for prefix in tokens:
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

    def put_files(self, items: Sequence[tuple[str, Any]], *, threads: int = 4) -> None:
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
        lease = RemoteLease(self, path, owner, ttl)
        for _attempt in range(5):
            if lease.try_take():
                return lease
        raise FileExistsError(
            errno.EEXIST, f"lease '{self.display(path)}' keeps changing hands; try again", "{}"
        )


class RemoteLease(base.Lease):
    """A lease object holding its holder's owner record, a nonce and its expiry.

    Taken by a conditional create; an expired one is replaced by a conditional replace
    of exactly the object that was read (``If-Match`` on S3), so two takers never both
    win. Expiry is judged by the holder's own clock (``expires``, written at each
    renewal): keep clocks in sync to within a small part of the ttl.
    """

    def __init__(self, storage: FsspecStorage, path: str, owner: Mapping[str, Any], ttl: float):
        self.storage, self.path, self.ttl = storage, path, float(ttl)
        self.owner = dict(owner)
        self.nonce = secrets.token_hex(16)
        self.url = storage.display(path)

    def _document(self) -> bytes:
        doc = {
            "owner": self.owner,
            "nonce": self.nonce,
            "ttl": self.ttl,
            "expires": time.time() + self.ttl,
        }
        return json.dumps(doc, sort_keys=True).encode()

    @staticmethod
    def _parse(data: bytes) -> dict[str, Any] | None:
        try:
            doc = json.loads(data)
        except ValueError:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("expires"), (int, float)):
            return None
        return doc

    def _held(self, doc: dict[str, Any] | None) -> FileExistsError:
        owner = json.dumps((doc or {}).get("owner", {}), sort_keys=True, default=str)
        return FileExistsError(
            errno.EEXIST,
            f"lease '{self.url}' is held by another owner until it expires or is released",
            owner,
        )

    def try_take(self) -> bool:
        """Take the lease if it is free or expired; False if it changed meanwhile (try
        again); ``FileExistsError`` if someone holds it."""
        store = self.storage.store
        if self.storage.create_file(self.path, self._document()):
            return True
        found = store.tagged(self.path)
        if found is None:
            return False  # released meanwhile
        data, tag = found
        doc = self._parse(data)
        # Not a lease at all (every lease written here says when it expires: a PUT is whole,
        # so this is no half-written one) -- a local run's lock file copied along with the
        # run -- holds nothing: it is replaced like an expired lease.
        if doc is not None and time.time() <= float(doc["expires"]):
            raise self._held(doc)
        return store.replace_if(self.path, self._document(), tag)

    def _ours(self) -> tuple[bytes, Any]:
        found = self.storage.store.tagged(self.path)
        doc = self._parse(found[0]) if found is not None else None
        if found is None or doc is None or doc.get("nonce") != self.nonce:
            raise FileExistsError(
                errno.EEXIST,
                f"lease '{self.url}' was lost: it expired and another owner took it",
                json.dumps((doc or {}).get("owner", {}), sort_keys=True, default=str),
            )
        return found

    def renew(self) -> None:
        _, tag = self._ours()
        if not self.storage.store.replace_if(self.path, self._document(), tag):
            self._ours()  # names who took it
            raise self._held(None)

    def release(self) -> None:
        try:
            _, tag = self._ours()
        except FileExistsError:
            return  # not ours any more: nothing to give up
        self.storage.store.delete_if(self.path, tag)


def _with_defaults(scheme: str, opts: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` completed with what aptckpt needs of the file system: for S3,
    the endpoint of ``AWS_ENDPOINT_URL(_S3)`` unless the options name one, and
    botocore's own retries off (ours are the policy)."""
    import os

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
