"""The storage layer: the only code that touches files or object stores.

:func:`resolve` turns what a user passed (a local path, a ``file://`` URL, or any
URL fsspec knows: ``s3://``, ``gs://``, ``az://``, ``memory://``) and its
``storage_options`` into a :class:`~aptckpt.storage.base.Storage` and a path in
it. The interface is :mod:`aptckpt.storage.base`; the implementations are
:mod:`aptckpt.storage.local` and :mod:`aptckpt.storage.remote` (imported only
when a URL needs it, so fsspec stays optional).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from aptckpt.errors import UnsupportedPathError
from aptckpt.storage.base import (
    CheckpointReader,
    CheckpointWriter,
    DataFiles,
    Entry,
    FileProblem,
    RawRead,
    Sink,
    Storage,
)
from aptckpt.storage.local import LOCAL, LocalStorage

__all__ = [
    "LOCAL",
    "CheckpointReader",
    "CheckpointWriter",
    "DataFiles",
    "Entry",
    "FileProblem",
    "LocalStorage",
    "RawRead",
    "Sink",
    "Storage",
    "StorageOptions",
    "is_url",
    "resolve",
]

#: What ``storage_options=`` takes: keyword arguments of the fsspec file system
#: (``key``, ``secret``, ``endpoint_url``, ``client_kwargs``, ...).
StorageOptions = Mapping[str, Any]

#: A URL scheme (RFC 3986: a letter, then letters, digits, "+", "-", "."), at least two
#: characters so that a Windows drive letter ("C://") is not taken for one.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+)://")


def is_url(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a URL (``s3://...``, ``file:///...``), not a local path."""
    return _URL.match(os.fspath(path)) is not None


def resolve(
    path: str | os.PathLike[str], storage_options: StorageOptions | None = None
) -> tuple[Storage, str]:
    """The storage ``path`` lives in, and the path in that storage.

    Local paths (and ``file://`` URLs) give the local storage and an absolute path;
    other URLs give an fsspec storage, built from ``storage_options`` over the
    environment's defaults (``AWS_*``).

    Raises:
        UnsupportedPathError: ``storage_options`` given with a local path, a
            ``file://`` URL naming a host, or a URL whose scheme fsspec does not know
            (or whose package is not installed: the message names it).
    """
    text = os.fspath(path)
    match = _URL.match(text)
    if match is None or match.group(1).lower() in ("file", "local"):
        if match is not None:
            rest = text[match.end() :]
            if rest and not rest.startswith("/"):
                raise UnsupportedPathError(
                    f"'{text}' names a host; a file:// URL must be file:///absolute/path",
                    path=text,
                )
            text = rest or "/"
        if storage_options:
            raise UnsupportedPathError(
                f"storage_options were given for the local path '{text}'; they configure "
                "remote storage (an s3://, gs://, ... URL): pass a URL or drop them",
                path=text,
            )
        return LOCAL, os.path.abspath(text)
    from aptckpt.storage.remote import FsspecStorage

    return FsspecStorage.for_url(text, storage_options)
