"""What a file given where a checkpoint directory was expected is, and how to load it.

A user who passes ``model.safetensors``, a ``torch.save`` file or a checkpoint's
``manifest.msgpack`` to :func:`aptckpt.load` should learn what the file is and
what opens it, not only that it is "not a checkpoint". :func:`describe_foreign_file`
recognises the formats a checkpoint is most often confused with from their first
bytes (and, for zip archives, their member names) and returns that advice, to be
used as the reason of a :class:`~aptckpt.errors.CheckpointNotFoundError`.

It reads at most a small, bounded prefix of the file (plus a zip's central
directory), never unpickles or imports anything, never blocks on a FIFO, and
never raises: a file it cannot open or does not recognise gives ``None``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import zipfile
from pathlib import Path

__all__ = ["describe_foreign_file"]

#: Bytes read to recognise a file (the largest fixed-position magic is tar's, at 257).
_PREFIX = 4096
#: A safetensors header up to this size is parsed to count its tensors.
_MAX_HEADER = 1 << 20
_MANIFEST_NAME = "manifest.msgpack"  # manifest.MANIFEST_NAME, without importing the schema

#: Pickle protocol 2, then the LONG1 magic number of torch's legacy (pre-1.6) format.
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_NOT_A_DIR = "not an aptckpt checkpoint directory"
_MAKE_ONE = "; to make a checkpoint of it, pass the loaded state to aptckpt.save(state, directory)"

_SPECIAL = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}

#: Magic bytes at offset 0 -> what the file is and what opens it.
_MAGICS = (
    (b"\x93NUMPY", f"a NumPy .npy array, {_NOT_A_DIR}: load it with numpy.load(path)"),
    (
        b"GGUF",
        f"a GGUF model file (llama.cpp), {_NOT_A_DIR}: load it with the gguf package or llama.cpp",
    ),
    (
        b"\x1f\x8b",
        "a gzip-compressed file (a .tar.gz?), not a checkpoint directory: extract it and "
        "pass the checkpoint directory inside",
    ),
    (
        b"\x28\xb5\x2f\xfd",
        "a zstd-compressed file (a .tar.zst?), not a checkpoint directory: extract it and "
        "pass the checkpoint directory inside",
    ),
)


def describe_foreign_file(path: str | os.PathLike[str]) -> str | None:
    """What the non-directory at ``path`` is and how to open it, or ``None``.

    The result reads as the reason after ``no checkpoint at '...': `` -- for example
    ``"it is a safetensors file (2 tensors), not an aptckpt checkpoint directory:
    load it with safetensors.torch.load_file(path); ..."``. ``None`` for a directory,
    a path that cannot be opened, or a file of no recognised kind.
    """
    where = Path(path)
    try:
        mode = os.stat(where).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISDIR(mode):
        return None
    special = _SPECIAL.get(stat.S_IFMT(mode))
    if special is not None:
        return f"it is {special}, not a checkpoint directory"
    inside = _inside_checkpoint(where)
    if inside is not None:
        return inside
    try:
        # O_NONBLOCK: should a FIFO replace the file after the stat, opening it must not hang.
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        what = _identify(fd, os.fstat(fd).st_size)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if what is None else f"it is {what}"


def _inside_checkpoint(path: Path) -> str | None:
    """Advice for a file of a checkpoint directory (its manifest or a data file)."""
    parent = path.parent
    with contextlib.suppress(OSError):
        if (parent / _MANIFEST_NAME).is_file():
            what = "the manifest" if path.name == _MANIFEST_NAME else "a data file"
            extra = (
                " (state.pt also loads with torch.load(path, weights_only=True), unverified)"
                if path.name == "state.pt"
                else ""
            )
            return (
                f"it is {what} of the checkpoint '{parent}', not a checkpoint directory: "
                f"pass '{parent}' instead{extra}"
            )
    return None


def _identify(fd: int, size: int) -> str | None:
    if size == 0:
        return "an empty file, not a checkpoint directory"
    head = os.pread(fd, _PREFIX, 0)
    safetensors = _safetensors(fd, head, size)
    if safetensors is not None:
        return safetensors
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip(fd)
    if head.startswith(_LEGACY_TORCH):
        return (
            f"a torch.save file in the legacy (before torch 1.6) format, {_NOT_A_DIR}: load "
            f"it with torch.load(path, weights_only=True){_MAKE_ONE}"
        )
    if b"\xa6format\xa7aptckpt" in head[:16]:
        return (
            "an aptckpt manifest copied out of its checkpoint directory: a checkpoint is the "
            "directory that holds manifest.msgpack with its data files (shard-*.bin, state.pt); "
            "copy or pass the whole directory"
        )
    if len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return (
            f"a Python pickle, {_NOT_A_DIR}; aptckpt never loads pickles, which can run code "
            "(if it holds tensors, torch.load(path, weights_only=True) loads it safely)"
        )
    if head[257:262] == b"ustar":
        return (
            "a tar archive, not a checkpoint directory: extract it (tar -xf) and pass the "
            "checkpoint directory inside"
        )
    for magic, what in _MAGICS:
        if head.startswith(magic):
            return what
    return None


def _safetensors(fd: int, head: bytes, size: int) -> str | None:
    """safetensors: an 8-byte little-endian header length, then that many bytes of JSON."""
    if len(head) < 10:
        return None
    (length,) = struct.unpack_from("<Q", head)
    if not 2 <= length <= size - 8 or head[8:9] != b"{":
        return None
    count = ""
    if length <= _MAX_HEADER:
        try:
            header = json.loads(os.pread(fd, length, 8))
        except (ValueError, RecursionError):  # not JSON after all, or nested past the stack
            return None
        if not isinstance(header, dict):
            return None
        n = sum(1 for k in header if k != "__metadata__")
        count = f" ({n} tensor{'s' if n != 1 else ''})"
    return (
        f"a safetensors file{count}, {_NOT_A_DIR}: load it with "
        f"safetensors.torch.load_file(path){_MAKE_ONE}"
    )


def _zip(fd: int) -> str:
    """A torch.save file, a TorchScript archive, a NumPy .npz, or another zip archive."""
    try:
        with os.fdopen(os.dup(fd), "rb") as f, zipfile.ZipFile(f) as archive:
            names = archive.namelist()
    except Exception:  # any damage: zipfile raises BadZipFile, OSError, ValueError, ...
        names = []
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return (
            f"a TorchScript archive (torch.jit.save), {_NOT_A_DIR}: load it with "
            "torch.jit.load(path), then save its state_dict() with aptckpt.save"
        )
    if any(n.endswith("data.pkl") for n in names):
        return (
            f"a torch.save file, {_NOT_A_DIR}: load it with torch.load(path, "
            f"weights_only=True){_MAKE_ONE}"
        )
    if names and all(n.endswith(".npy") for n in names):
        return f"a NumPy .npz archive, {_NOT_A_DIR}: load it with numpy.load(path)"
    return (
        "a zip archive, not a checkpoint directory: if it holds a checkpoint, extract it "
        "and pass the checkpoint directory inside"
    )
