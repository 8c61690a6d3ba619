"""Paths the public API accepts: local file-system paths, never URLs (yet).

A string such as ``s3://bucket/runs/a`` is a perfectly valid relative *local* path, so
without this check a save would quietly create a directory named ``s3:`` in the working
directory and the user would believe the checkpoint is in object storage. Until a remote
storage exists, every entry point refuses URLs with a message saying so.
"""

from __future__ import annotations

import os
import re

from aptckpt.errors import UnsupportedPathError

__all__ = ["local_path"]

#: A URL scheme (RFC 3986: a letter, then letters, digits, "+", "-", "."), at least two
#: characters so that a Windows drive letter ("C://") is not taken for one.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+://")


def local_path(path: str | os.PathLike[str], *, what: str = "checkpoints") -> str:
    """``path`` as a string, refusing URLs.

    Raises:
        UnsupportedPathError: ``path`` is a URL such as ``s3://bucket/x`` or ``file:///x``.
    """
    text = os.fspath(path)
    match = _URL.match(text)
    if match is None:
        return text
    scheme = match.group(0)[:-3]
    hint = (
        f"pass the local path itself ({text[len(scheme) + 3 :] or '/'!r})"
        if scheme.lower() == "file"
        else "save to a local path (or a mounted file system) and copy the checkpoint "
        "directory to object storage with your storage tools"
    )
    raise UnsupportedPathError(
        f"'{text}' is a {scheme}:// URL, but this aptckpt keeps {what} on local paths only "
        f"(a URL would be taken as a relative directory named '{scheme}:'); {hint}",
        path=text,
    )
