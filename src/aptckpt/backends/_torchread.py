"""Reading a ``torch.save`` file in one verified pass, and unpickling it from those bytes.

The ``torch`` backend's file carries XXH3-128 digests of fixed-size chunks of the
whole file (``chunk_size`` bytes each). A load reads every chunk exactly once, with
the storage's parallel verified read (:meth:`DataFiles.read_verify`: locally the
core's ``read_verify_many``, each chunk hashed right after its read), and
``torch.load``'s unpickler then sees only those bytes -- the file is never read a
second time, so nothing written to it after the check can reach the state.

Where the chunks go:

1. The chunks holding the zip's end (its central directory, the end records) are
   read first. The central directory gives every member's local header offset,
   size and flags; a member's bytes end where the next member's header starts, less
   its data descriptor. That is the whole layout.
2. Every other chunk is read in one call: a chunk lying wholly inside the bytes of a
   storage record (``<archive>/data/<key>``) is read straight into that storage's
   final memory, a fresh allocation of its own (as ``torch.load`` gives it); every
   other chunk (zip headers, the pickle, small records, the edges of large ones) into
   a staging mapping, one per run of such chunks (huge pages where it fills whole
   ones). The edges of large records are copied from there; a record that holds no
   whole chunk becomes a storage over the staging bytes it was read into -- its own
   storage object, nothing copied -- and the mapping lives as long as one of them does.
3. Before anything is unpickled, the layout is checked against the verified bytes:
   each member's local header (signature, name, method, length) and data descriptor.
   A layout that does not check (a file another zip writer wrote, a legacy
   ``torch.save`` file) is not guessed at: the verified bytes are put together into
   one buffer and given to the public ``torch.load`` -- still without a second read.

The pickle is then unpickled by torch's own weights-only unpickler
(``torch.serialization._load`` with ``torch._weights_only_unpickler``, what
``torch.load(weights_only=True)`` runs) over an archive object that serves the
verified records and storages. Should this torch's internals differ from what
that needs, the public ``torch.load`` over the assembled bytes runs instead.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import mmap
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aptckpt import _dtypes
from aptckpt.storage.base import DataFiles, RawRead

__all__ = ["Archive", "Layout", "Member", "read_file", "unpickle"]

_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL = b"PK\x01\x02"
_END = b"PK\x05\x06"
_END64 = b"PK\x06\x06"
_END64_LOCATOR = b"PK\x06\x07"
_U32 = 0xFFFFFFFF
_HAS_DESCRIPTOR = 0x08


@dataclass(frozen=True)
class Member:
    """A member of the zip: where its local header starts and where its bytes lie."""

    name: str  # as the archive spells it, with the archive's folder
    header: int
    start: int
    stop: int
    #: Length of the data descriptor after its bytes (0, 16 or 24).
    descriptor: int


@dataclass(frozen=True)
class Layout:
    """The members of a ``torch.save`` zip, from its central directory (not yet checked
    against the local headers: :func:`read_file` does that once the bytes are verified)."""

    prefix: str  # "<archive>/"
    members: tuple[Member, ...]
    directory: int  # where the central directory starts


class _Need(Exception):
    """Parsing the end of the zip needs the bytes from ``offset`` on."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


def _end_records(tail: memoryview, base: int, size: int) -> tuple[int, int, int]:
    """``(entries, central directory length, its offset)`` from the end records in
    ``tail`` (file bytes ``[base, size)``); raises :class:`_Need` for more bytes,
    ``ValueError`` where there is no zip end."""
    data = bytes(tail)
    end = data.rfind(_END)
    if end < 0 or end + 22 > len(data):
        if base > 0 and size - base < 22 + 0xFFFF:
            raise _Need(max(0, size - 22 - 0xFFFF))
        raise ValueError("no end of central directory")
    entries, length, offset = struct.unpack_from("<HII", data, end + 10)
    if entries != 0xFFFF and _U32 not in (length, offset):
        return entries, length, offset
    locator = end - 20  # zip64: the sizes live in another record
    if locator < 0:
        if base > 0:
            raise _Need(max(0, base + locator))
        raise ValueError("zip64 end locator missing")
    if data[locator : locator + 4] != _END64_LOCATOR:
        raise ValueError("zip64 end locator missing")
    (record,) = struct.unpack_from("<Q", data, locator + 8)
    if record < base:
        raise _Need(record)
    at = record - base
    if at + 56 > len(data) or data[at : at + 4] != _END64:
        raise ValueError("zip64 end record missing")
    entries, length, offset = struct.unpack_from("<QQQ", data, at + 32)
    return entries, length, offset


def parse_layout(tail: memoryview, base: int, size: int) -> Layout | None:
    """The layout from the file's bytes ``[base, size)``; raises :class:`_Need` for more,
    None where they hold no layout this reader understands."""
    try:
        entries, length, offset = _end_records(tail, base, size)
    except ValueError:
        return None
    if offset < base:
        raise _Need(offset)
    if offset + length > size or entries > length // 46:
        return None
    data = tail[offset - base : offset - base + length]
    found: list[tuple[int, str, int, int]] = []  # (header, name, size, flags)
    pos = 0
    for _ in range(entries):
        if pos + 46 > len(data) or data[pos : pos + 4] != _CENTRAL:
            return None
        flags, method = struct.unpack_from("<HH", data, pos + 8)
        csize, usize = struct.unpack_from("<II", data, pos + 20)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        (header,) = struct.unpack_from("<I", data, pos + 42)
        stop = pos + 46 + name_len + extra_len + comment_len
        if stop > len(data) or method != 0:
            return None
        try:
            name = bytes(data[pos + 46 : pos + 46 + name_len]).decode()
        except UnicodeDecodeError:
            return None
        wide = _zip64_fields(data[pos + 46 + name_len : pos + 46 + name_len + extra_len])
        if wide is None:
            return None
        try:  # the zip64 field holds, in this order, those of the three that overflowed
            usize = next(wide) if usize == _U32 else usize
            csize = next(wide) if csize == _U32 else csize
            header = next(wide) if header == _U32 else header
        except StopIteration:
            return None
        if csize != usize:
            return None
        found.append((header, name, usize, flags))
        pos = stop
    found.sort()
    if any(header >= offset for header, _, _, _ in found):
        return None
    if len({name for _, name, _, _ in found}) != len(found):  # which one would torch read?
        return None
    prefix = found[0][1].partition("/")[0] + "/" if found else ""
    members = []
    for i, (header, name, nbytes, flags) in enumerate(found):
        if not name.startswith(prefix) or name == prefix:
            return None
        after = found[i + 1][0] if i + 1 < len(found) else offset
        descriptor = 0
        if flags & _HAS_DESCRIPTOR:  # as miniz writes it (torch.serialization assumes so too)
            descriptor = 24 if header >= _U32 or nbytes >= _U32 else 16
        stop = after - descriptor
        start = stop - nbytes
        if start < header + 30:
            return None
        members.append(Member(name, header, start, stop, descriptor))
    return Layout(prefix, tuple(members), offset)


def _zip64_fields(extra: memoryview) -> Iterator[int] | None:
    """The 8-byte values of the zip64 extra field (id 1), in order (none if it is absent);
    None for a malformed extra field."""
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            return None
        if kind == 1:
            return iter(
                [v for (v,) in struct.iter_unpack("<Q", extra[pos + 4 : pos + 4 + length // 8 * 8])]
            )
        pos += 4 + length
    return iter(())


class Contents:
    """A ``torch.save`` file read and (when digests were given) verified: its storage
    records in memory of their own, everything else in staging chunks."""

    def __init__(self, size: int, chunk_size: int, layout: Layout | None) -> None:
        self.size, self.chunk_size, self.layout = size, chunk_size, layout
        self.staging: dict[int, memoryview] = {}  # chunk index -> its bytes
        self.storages: dict[str, torch.Tensor] = {}  # record name (no prefix) -> uint8
        self.direct: set[int] = set()  # chunks read into a storage
        #: The layout matches the local headers and descriptors read (see :meth:`checks`).
        self.layout_ok = False

    def span(self, start: int, stop: int) -> bytes:
        """File bytes ``[start, stop)`` from the staging chunks (not from storages)."""
        cs = self.chunk_size
        parts = []
        for c in range(start // cs, -(-stop // cs)):
            chunk = self.staging[c]
            parts.append(chunk[max(start - c * cs, 0) : min(stop - c * cs, len(chunk))])
        return b"".join(parts)

    def whole(self) -> bytearray:
        """The file's bytes in one buffer (for the public ``torch.load``)."""
        out = bytearray(self.size)
        cs = self.chunk_size
        for c, chunk in self.staging.items():
            out[c * cs : c * cs + len(chunk)] = chunk
        if self.layout is not None:
            for m in self.layout.members:
                stored = self.storages.get(m.name[len(self.layout.prefix) :])
                if stored is not None and m.stop > m.start:
                    view = _dtypes.byte_view(stored)
                    for c in range(m.start // cs, -(-m.stop // cs)):
                        if c in self.direct:
                            at = c * cs - m.start
                            out[c * cs : c * cs + cs] = view[at : at + cs]
        return out

    def checks(self) -> bool:
        """Whether the layout matches the local headers and descriptors in the bytes read."""
        layout = self.layout
        if layout is None:
            return False
        for m in layout.members:
            head = self.span(m.header, m.header + 30)
            if head[:4] != _LOCAL:
                return False
            method, name_len, extra_len = struct.unpack_from("<H16xHH", head, 8)
            if method != 0 or 30 + name_len + extra_len != m.start - m.header:
                return False
            if self.span(m.header + 30, m.header + 30 + name_len) != m.name.encode():
                return False
            if m.descriptor:
                tail = self.span(m.stop, m.stop + m.descriptor)
                fmt = "<4xII" if m.descriptor == 16 else "<4xQQ"
                if tail[:4] != _DESCRIPTOR or struct.unpack_from(fmt, tail, 4) != (
                    m.stop - m.start,
                    m.stop - m.start,
                ):
                    return False
        return True


def read_file(
    files: DataFiles, file: int, size: int, chunk_size: int, digests: bytes | None
) -> Contents | list[int]:
    """Read file ``file`` (``size`` bytes) once, every chunk checked against ``digests``
    (16 bytes per chunk; None: not checked). Returns the contents, or the indexes of the
    chunks that failed (their digest, or the file ended first)."""
    cs = chunk_size
    count = -(-size // cs)
    # 1. the end of the zip, grown backwards until its records and directory are in
    first = count
    layout: Layout | None = None
    want = max(count - 1, 0)
    staged: dict[int, memoryview] = {}
    home: dict[int, tuple[Any, int]] = {}  # staged chunk -> (the buffer holding it, offset)
    while want < first:
        bad = _read_staged(files, file, size, cs, digests, range(want, first), staged, home)
        if bad:
            return bad
        first = want
        base = first * cs
        tail = memoryview(b"".join(staged[c] for c in range(first, count)))
        try:
            layout = parse_layout(tail, base, size)
        except _Need as need:
            want = need.offset // cs
            continue
        break
    contents = Contents(size, cs, layout)
    contents.staging = staged
    # 2. every other chunk: into a storage's memory where it lies wholly in one
    owner: dict[int, tuple[int, torch.Tensor]] = {}  # chunk -> (record start, storage)
    if layout is not None:
        for m in layout.members:
            rel = m.name[len(layout.prefix) :]
            if not rel.startswith("data/") or m.stop > layout.directory:
                continue
            owned = range(-(-m.start // cs), min(m.stop // cs, first))
            if owned:  # it holds whole chunks: memory of its own, read into directly
                storage = _allocate(m.stop - m.start)
                contents.storages[rel] = storage
                for c in owned:
                    owner[c] = (m.start, storage)
    reads: list[RawRead] = []
    chunks: list[int] = []
    # the other chunks into one mapping per run of them (see _staged_storage)
    rest = [c for c in range(first) if c not in owner]
    runs: list[list[int]] = []
    for c in rest:
        if runs and runs[-1][-1] == c - 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    for run in runs:
        length = min(size, (run[-1] + 1) * cs) - run[0] * cs
        memory = _mapping(-(-length // HUGE) * HUGE, length // HUGE * HUGE)
        view = memoryview(memory)
        for c in run:
            at = (c - run[0]) * cs
            staged[c] = view[at : at + min(cs, size - c * cs)]
            home[c] = (memory, at)
    for c in range(first):
        digest = None if digests is None else digests[16 * c : 16 * c + 16]
        if c in owner:
            start, storage = owner[c]
            at = c * cs - start
            out = _dtypes.byte_view(storage)[at : at + cs]
            contents.direct.add(c)
        else:
            out = staged[c]
        reads.append(RawRead(file, c * cs, out, digest))
        chunks.append(c)
    found = files.read_verify(reads, 0) if reads else []
    if found:
        return [chunks[i] for i, _ in found]
    # 3. the storages' bytes that were staged
    if layout is not None:
        for m in layout.members:
            rel = m.name[len(layout.prefix) :]
            if not rel.startswith("data/") or m.stop > layout.directory:
                continue
            stored = contents.storages.get(rel)
            if stored is None:
                contents.storages[rel] = _staged_storage(m, cs, home, staged)
                continue
            view = _dtypes.byte_view(stored)
            for c in range(m.start // cs, -(-m.stop // cs)):
                if c not in owner:  # its first and last chunk: shared with its neighbours
                    lo, hi = max(m.start, c * cs), min(m.stop, c * cs + cs)
                    view[lo - m.start : hi - m.start] = staged[c][lo - c * cs : hi - c * cs]
        contents.layout_ok = contents.checks()
    return contents


#: Huge page size: the staging mappings ask for huge pages where they fill whole ones. The
#: faults of fresh 4 KiB pages (a trap and a zeroed page each) cost more on a VM than reading
#: the bytes from the page cache.
HUGE = 2 << 20


def _allocate(nbytes: int) -> torch.Tensor:
    """``nbytes`` of fresh memory as a uint8 tensor, from torch's allocator (which reuses
    what a previous load freed, as torch.load's storages do)."""
    return torch.empty(nbytes, dtype=torch.uint8)


def _staged_storage(
    m: Member, cs: int, home: dict[int, tuple[Any, int]], staged: dict[int, memoryview]
) -> torch.Tensor:
    """The storage of a record that holds no whole chunk: its bytes copied out of the
    staged chunks it was read into, into memory of its own. (A storage over the staging
    buffer itself would save the copy but keep the whole buffer alive -- up to half of a
    state of small tensors -- for as long as any one of them is kept.)
    """
    nbytes = m.stop - m.start
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    first, last = m.start // cs, (m.stop - 1) // cs
    out = _allocate(nbytes)
    view = _dtypes.byte_view(out)
    for c in range(first, last + 1):
        lo, hi = max(m.start, c * cs), min(m.stop, c * cs + cs)
        view[lo - m.start : hi - m.start] = staged[c][lo - c * cs : hi - c * cs]
    return out


def _mapping(length: int, huge: int) -> mmap.mmap:
    """Fresh anonymous memory of ``length`` bytes (a whole number of huge pages: the kernel
    places it on a huge-page boundary), its first ``huge`` bytes in huge pages where the
    kernel has them, the rest in small pages (only those touched take memory)."""
    memory = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            if huge:
                memory.madvise(mmap.MADV_HUGEPAGE, 0, huge)
            if huge < length:
                memory.madvise(mmap.MADV_NOHUGEPAGE, huge, length - huge)
    return memory


def _read_staged(
    files: DataFiles,
    file: int,
    size: int,
    cs: int,
    digests: bytes | None,
    chunks: range,
    staged: dict[int, memoryview],
    home: dict[int, tuple[Any, int]],
) -> list[int]:
    if not chunks:
        return []
    memory = bytearray(min(size, chunks.stop * cs) - chunks.start * cs)
    buffer = memoryview(memory)
    reads = []
    for c in chunks:
        at = (c - chunks.start) * cs
        out = buffer[at : at + min(cs, size - c * cs)]
        staged[c] = out
        home[c] = (memory, at)
        digest = None if digests is None else digests[16 * c : 16 * c + 16]
        reads.append(RawRead(file, c * cs, out, digest))
    found = files.read_verify(reads, 0)
    return [chunks[i] for i, _ in found]


class Archive:
    """What ``torch.serialization._load`` asks of a zip reader, served from verified bytes."""

    def __init__(self, contents: Contents) -> None:
        assert contents.layout is not None
        layout = contents.layout
        self._contents = contents
        self._members = {m.name[len(layout.prefix) :]: m for m in layout.members}

    def has_record(self, name: str) -> bool:
        return name in self._members

    def get_record(self, name: str) -> bytes:
        m = self._record(name)
        stored = self._contents.storages.get(name)
        if stored is not None:
            return bytes(_dtypes.byte_view(stored))
        return self._contents.span(m.start, m.stop)

    def get_storage_from_record(self, name: str, nbytes: int, _type: Any) -> torch.Tensor:
        self._record(name)
        stored = self._contents.storages.get(name)
        if stored is None or stored.numel() != nbytes:
            raise RuntimeError(
                f"record {name} holds {0 if stored is None else stored.numel()} bytes, "
                f"the pickle asks for {nbytes}"
            )
        return stored

    def get_record_offset(self, name: str) -> int:
        return self._record(name).start

    def get_all_records(self) -> list[str]:
        return list(self._members)

    def serialization_id(self) -> str:
        if ".data/serialization_id" in self._members:
            return self.get_record(".data/serialization_id").decode(errors="replace")
        return ""

    def _record(self, name: str) -> Member:
        m = self._members.get(name)
        if m is None:
            raise RuntimeError(f"file in archive is not in a subdirectory or is missing: {name}")
        return m


def _private_load_ok() -> bool:
    """Whether this torch has the internal loader :class:`Archive` is made for."""
    load = getattr(torch.serialization, "_load", None)
    if load is None or not hasattr(torch, "_weights_only_unpickler"):
        return False
    try:
        params = list(inspect.signature(load).parameters)
    except (TypeError, ValueError):
        return False
    return params[:3] == ["zip_file", "map_location", "pickle_module"]


_PRIVATE_LOAD = _private_load_ok()


def public_load(data: Any) -> Any:
    """``torch.load(weights_only=True)`` of the file's bytes ``data`` (already read)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def unpickle(contents: Contents) -> Any:
    """The state in ``contents``, as ``torch.load(..., weights_only=True)`` gives it.

    Raises what torch raises for a file it cannot read (``pickle.UnpicklingError`` for a
    pickle that ``weights_only`` refuses)."""
    import pickle

    with warnings.catch_warnings():
        # torch's own rebuild of quantized tensors trips its TypedStorage deprecation
        warnings.filterwarnings("ignore", "TypedStorage is deprecated")
        if _PRIVATE_LOAD and contents.layout_ok:
            archive = Archive(contents)
            if not archive.has_record("data.pkl") or archive.has_record("constants.pkl"):
                # no pickle, or a TorchScript archive: torch.load says what it is
                return public_load(contents.whole())
            try:
                return torch.serialization._load(  # type: ignore[no-untyped-call]
                    archive,
                    "cpu",
                    torch._weights_only_unpickler,
                    encoding="utf-8",
                )
            except pickle.UnpicklingError:
                raise
            except Exception:  # torch's internals: the public loader decides
                pass
        return public_load(contents.whole())


def storages_of(contents: Contents) -> Sequence[torch.Tensor]:
    """The storage records read (for tests)."""
    return list(contents.storages.values())
