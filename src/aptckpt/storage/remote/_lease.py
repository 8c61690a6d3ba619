"""Leases on object stores: a run lock that works without locks (see :class:`RemoteLease`)."""

from __future__ import annotations

import errno
import json
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aptckpt.storage import base

if TYPE_CHECKING:
    from aptckpt.storage.remote import FsspecStorage

__all__ = ["RemoteLease"]


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
