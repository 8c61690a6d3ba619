"""Every request aptckpt makes of an fsspec file system, each through the retry policy.

:class:`Store` is the seam between the storage's logic (commit, leases, debris) and the
file system: tests wrap the file system it holds to inject failures. Conditional
writes use the store's own preconditions where it has them:

* S3 (s3fs): ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to replace or delete
  -- atomic on the server.
* ``memory://``: one process-wide lock around check and write -- exact, since the
  store lives in this process.
* other stores (gcs, azure, ...): the file system's ``pipe_file(mode="create")`` where
  it takes it, else a check then a write; replace-if-unchanged compares the bytes
  first. These are *not* atomic: two writers racing within a request's time may both
  succeed. aptckpt uses them only where a lost race is caught later (a save's
  manifest is re-read and compared after its create) or is the user's to avoid (two
  runs sharing a lease path).
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Callable, Sequence
from typing import Any

from aptckpt.storage.remote._retry import RetryPolicy, call, status_of

__all__ = ["Store", "mtime_of"]

#: The memory file system is one dict per process: its conditional writes hold this.
_MEMORY_LOCK = threading.Lock()


def mtime_of(detail: dict[str, Any]) -> float:
    """Last modification (seconds since the epoch) of a listing entry; 0.0 if unknown."""
    for key in ("LastModified", "mtime", "modified", "last_modified", "updated", "created"):
        value = detail.get(key)
        if value is None:
            continue
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0


def _as_bytes(data: Any) -> bytes:
    return data if isinstance(data, bytes) else bytes(memoryview(data).cast("B"))


def _precondition_failed(err: BaseException) -> bool:
    status, code = status_of(err)
    return status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict")


class Store:
    """An fsspec file system with retries, conditional writes and (S3) multipart uploads."""

    def __init__(self, fs: Any, protocol: str, policy: RetryPolicy) -> None:
        self.fs = fs
        self.protocol = protocol
        self.policy = policy
        self.s3 = protocol in ("s3", "s3a") and hasattr(fs, "call_s3")
        self.memory = protocol == "memory"

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call(self.policy, what, fn, *args, **kwargs)

    # ------------------------------------------------------------------ reads

    def head(self, path: str) -> dict[str, Any] | None:
        """What is at ``path`` (fsspec's info), or None."""
        try:
            found: dict[str, Any] = self._call("info", self.fs.info, path)
        except FileNotFoundError:
            return None
        return found

    def cat(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        data: bytes = self._call("read", self.fs.cat_file, path, start=start, end=end)
        return data

    def ls(self, folder: str) -> list[dict[str, Any]]:
        try:
            found: list[dict[str, Any]] = self._call("list", self.fs.ls, folder, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        # Some file systems list a file given as the folder: that is not a folder's entry.
        return [e for e in found if e.get("name", "").rstrip("/") != folder.rstrip("/")]

    def find(self, folder: str) -> dict[str, dict[str, Any]]:
        """Every object below ``folder`` (recursively), by path."""
        try:
            found: dict[str, dict[str, Any]] = self._call(
                "list", self.fs.find, folder, detail=True, withdirs=False
            )
        except (FileNotFoundError, NotADirectoryError):
            return {}
        prefix = folder.rstrip("/") + "/"
        return {p: d for p, d in found.items() if p.startswith(prefix)}

    # ----------------------------------------------------------------- writes

    def put(self, path: str, data: Any) -> None:
        """Write the object ``path`` whole (one PUT below the multipart threshold)."""
        self._call("write", self.fs.pipe_file, path, _as_bytes(data))

    def create(self, path: str, data: Any) -> bool:
        """Create ``path`` holding ``data`` only if nothing is there; False if something is.
        A retried create that finds its own bytes there (its first try succeeded, the
        answer was lost) counts as created."""
        data = _as_bytes(data)
        if self.memory:
            with _MEMORY_LOCK:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
            return True
        tries = 0

        def create_once() -> None:
            nonlocal tries
            tries += 1
            try:
                self.fs.pipe_file(path, data, mode="create")
            except TypeError:  # a file system whose pipe_file takes no mode: check, then write
                if self.fs.exists(path):
                    raise FileExistsError(path) from None
                self.fs.pipe_file(path, data)

        try:
            self._call("conditional create", create_once)
        except FileExistsError:
            return tries > 1 and self._holds(path, data)
        except OSError as err:
            if _precondition_failed(err):
                return tries > 1 and self._holds(path, data)
            raise
        return True

    def _holds(self, path: str, data: bytes) -> bool:
        try:
            return self.cat(path) == data
        except FileNotFoundError:
            return False

    def tagged(self, path: str) -> tuple[bytes, Any] | None:
        """The bytes of ``path`` and a tag for :meth:`replace_if` / :meth:`delete_if`
        (the ETag on S3, else the bytes themselves); None if absent."""
        if self.s3:
            found = self.head(path)
            if found is None:
                return None
            try:
                return self.cat(path), found.get("ETag")
            except FileNotFoundError:
                return None
        try:
            data = self.cat(path)
        except FileNotFoundError:
            return None
        return data, data

    def replace_if(self, path: str, data: Any, tag: Any) -> bool:
        """Replace ``path`` by ``data`` only if it still has ``tag``; False if it changed."""
        data = _as_bytes(data)
        if self.s3 and tag is not None:
            bucket, key, _ = self.fs.split_path(path)
            try:
                self._call(
                    "conditional replace",
                    self.fs.call_s3,
                    "put_object",
                    Bucket=bucket,
                    Key=key,
                    Body=data,
                    IfMatch=tag,
                )
            except FileNotFoundError:
                return False
            except OSError as err:
                if _precondition_failed(err):
                    return self._holds(path, data)  # a retried success, or a loss
                raise
            finally:
                self.fs.invalidate_cache(path)
            return True
        with _MEMORY_LOCK if self.memory else contextlib.nullcontext():
            found = self.tagged(path)
            if found is None or found[1] != tag:
                return False
            self.put(path, data)
        return True

    def delete_if(self, path: str, tag: Any) -> bool:
        """Remove ``path`` only if it still has ``tag``; False if it changed or is gone."""
        if self.s3 and tag is not None:
            bucket, key, _ = self.fs.split_path(path)
            try:
                self._call(
                    "conditional delete",
                    self.fs.call_s3,
                    "delete_object",
                    Bucket=bucket,
                    Key=key,
                    IfMatch=tag,
                )
            except FileNotFoundError:
                return False
            except OSError as err:
                if _precondition_failed(err):
                    return False
                raise
            finally:
                self.fs.invalidate_cache(path)
            return True
        with _MEMORY_LOCK if self.memory else contextlib.nullcontext():
            found = self.tagged(path)
            if found is None or found[1] != tag:
                return False
            self.remove([path])
        return True

    def remove(self, paths: Sequence[str]) -> None:
        """Remove the objects ``paths`` (absent ones are no error)."""
        if not paths:
            return
        if self.s3:
            self._call("delete", self.fs.rm, list(paths))
            return
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self._call("delete", self.fs.rm_file, path)

    def remove_tree(self, path: str) -> None:
        """Remove the object ``path`` and every object below it."""
        found = list(self.find(path))
        entry = self.head(path)
        if entry is not None and entry.get("type") == "file":
            found.append(path)
        self.remove(found)

    # ------------------------------------------------------ multipart (S3 only)

    def _s3(self, what: str, method: str, path: str, **kwargs: Any) -> Any:
        bucket, key, _ = self.fs.split_path(path)
        return self._call(what, self.fs.call_s3, method, Bucket=bucket, Key=key, **kwargs)

    def upload_start(self, path: str) -> str:
        upload_id: str = self._s3("start upload", "create_multipart_upload", path)["UploadId"]
        return upload_id

    def upload_part(self, path: str, upload: str, number: int, body: Any) -> str:
        found = self._s3(
            "upload part", "upload_part", path, UploadId=upload, PartNumber=number, Body=body
        )
        etag: str = found["ETag"]
        return etag

    def upload_complete(self, path: str, upload: str, etags: Sequence[str]) -> None:
        parts = [{"PartNumber": i + 1, "ETag": etag} for i, etag in enumerate(etags)]
        try:
            self._s3(
                "complete upload",
                "complete_multipart_upload",
                path,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        finally:
            self.fs.invalidate_cache(path)

    def upload_abort(self, path: str, upload: str) -> None:
        with contextlib.suppress(Exception):  # the caller is failing already
            self._s3("abort upload", "abort_multipart_upload", path, UploadId=upload)

    def uploads(self, folder: str) -> list[tuple[str, str, float]]:
        """Incomplete multipart uploads below ``folder``: ``(path, upload id, initiated)``."""
        if not self.s3:
            return []
        bucket, key, _ = self.fs.split_path(folder)
        prefix = key.rstrip("/") + "/" if key else ""
        found: list[tuple[str, str, float]] = []
        marker: dict[str, str] = {}
        while True:
            page = self._call(
                "list uploads",
                self.fs.call_s3,
                "list_multipart_uploads",
                Bucket=bucket,
                Prefix=prefix,
                **marker,
            )
            for upload in page.get("Uploads", ()):
                when = upload.get("Initiated")
                stamp = when.timestamp() if isinstance(when, datetime.datetime) else 0.0
                found.append((f"{bucket}/{upload['Key']}", upload["UploadId"], stamp))
            if not page.get("IsTruncated"):
                return found
            marker = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }
