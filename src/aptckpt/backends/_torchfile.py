"""Which tensors a damaged byte range of a ``torch.save`` file belongs to.

Used only after ``state.pt`` failed its digests or its size check, to name the
tensors hit in the error message. It trusts only bytes whose chunk digests
matched: members are found by walking the zip's local headers through intact
bytes, and which storage each tensor uses is read from the persistent ids of the
pickle by listing its opcodes (``pickletools.genops``) -- never by unpickling.

What ``torch.save`` (zip format) writes, in order: ``<archive>/data.pkl``, a few
small records, then ``<archive>/data/<key>`` for every storage, each member's
bytes followed by a data descriptor (the local header leaves the sizes 0).
Storage keys are numbered as the pickler first meets them, and the state the
``torch`` backend saves holds one tensor object per distinct tensor, in skeleton
order, each on a storage of its own, so the n-th persistent id of the pickle is
tensor n's storage.

Anything unexpected gives up (``None``): the message then names the file only.
"""

from __future__ import annotations

import pickletools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Member", "central_names", "damaged_tensors", "members", "storage_keys"]

_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL = b"PK\x01\x02"
_END = b"PK\x05\x06"
_END64_LOCATOR = b"PK\x06\x07"
_HEADER = 30
_STORED = 0
_HAS_DESCRIPTOR = 0x08

#: ``intact(start, stop)``: whether bytes ``[start, stop)`` verified against their digests.
Intact = Callable[[int, int], bool]


@dataclass(frozen=True)
class Member:
    """A member of the zip file and where its (stored, uncompressed) bytes lie."""

    name: str
    start: int
    stop: int


def _descriptor(data: Any, start: int, intact: Intact) -> tuple[int, int] | None:
    """``(end of the member's bytes, start of the next header)`` from the data descriptor
    that follows a member starting at ``start``, in its 32- or 64-bit form."""
    at = start
    while (at := data.find(_DESCRIPTOR, at)) >= 0:
        for fmt, width in (("<II", 16), ("<QQ", 24)):
            if at + width <= len(data) and intact(at, at + width):
                csize, usize = struct.unpack_from(fmt, data, at + 8)
                if csize == usize == at - start:
                    return at, at + width
        at += 1
    return None


def members(data: Any, intact: Intact) -> list[Member]:
    """The members whose local header and descriptor lie in intact bytes.

    After damaged bytes the walk resumes at the next local header signature.
    """
    found: list[Member] = []
    pos, size = 0, len(data)
    while pos + _HEADER <= size:
        header_ok = data[pos : pos + 4] == _LOCAL and intact(pos, pos + _HEADER)
        member = _member(data, pos, intact) if header_ok else None
        if member is None:
            pos = data.find(_LOCAL, pos + 1)
            if pos < 0:
                break
            continue
        found.append(member[0])
        pos = member[1]
    return found


def _member(data: Any, pos: int, intact: Intact) -> tuple[Member, int] | None:
    flags, method = struct.unpack_from("<HH", data, pos + 6)
    csize, usize, name_len, extra_len = struct.unpack_from("<IIHH", data, pos + 18)
    start = pos + _HEADER + name_len + extra_len
    if method != _STORED or start > len(data) or not intact(pos, start):
        return None
    try:
        name = bytes(data[pos + _HEADER : pos + _HEADER + name_len]).decode()
    except UnicodeDecodeError:
        return None
    if flags & _HAS_DESCRIPTOR and csize == 0:
        ends = _descriptor(data, start, intact)
        if ends is None:
            return None
        stop, after = ends
    elif csize == usize and csize != 0xFFFFFFFF:
        stop = after = start + csize
    else:
        return None
    if stop > len(data):
        return None
    return Member(name, start, stop), after


def central_names(data: Any, intact: Intact) -> list[str] | None:
    """Every member's name, from the zip's central directory if it is intact."""
    end = data.rfind(_END)
    if end < 0 or not intact(end, end + 22):
        return None
    entries, length, offset = struct.unpack_from("<HII", data, end + 10)
    locator = end - 20
    if 0xFFFFFFFF in (length, offset) or entries == 0xFFFF:  # zip64: sizes in another record
        if locator < 0 or data[locator : locator + 4] != _END64_LOCATOR:
            return None
        (record,) = struct.unpack_from("<Q", data, locator + 8)
        if not (intact(locator, end) and intact(record, record + 56)):
            return None
        entries, length, offset = struct.unpack_from("<QQQ", data, record + 32)
    if not intact(offset, offset + length):
        return None
    names, pos = [], offset
    for _ in range(entries):
        if data[pos : pos + 4] != _CENTRAL:
            return None
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        try:
            names.append(bytes(data[pos + 46 : pos + 46 + name_len]).decode())
        except UnicodeDecodeError:
            return None
        pos += 46 + name_len + extra_len + comment_len
    return names


def storage_keys(pickled: bytes) -> list[str] | None:
    """The storage key of every persistent id of a torch pickle, in order.

    Simulates the pickle machine's stack with :mod:`pickletools`' opcode
    descriptions (strings, memo and tuples only carry values); runs nothing.
    """
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    keys: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(pickled):
            name = op.name
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1] if stack else None  # type: ignore[arg-type]
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
                continue
            before = list(op.stack_before)
            items: list[Any] = []
            if pickletools.markobject in before:
                start = marks.pop() if marks else 0
                items = stack[start:]
                del stack[start:]
                before = before[: before.index(pickletools.markobject)]
            popped = [stack.pop() if stack else None for _ in before][::-1]
            value: Any = None
            if name in ("BINGET", "LONG_BINGET", "GET"):
                value = memo.get(int(arg))  # type: ignore[arg-type]
            elif name == "TUPLE":
                value = tuple(items)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                value = tuple(popped)
            elif name == "BINPERSID":
                pid = popped[0] if popped else None
                if not (isinstance(pid, tuple) and len(pid) >= 3 and isinstance(pid[2], str)):
                    return None
                keys.append(pid[2])
            elif isinstance(arg, (str, int)):
                value = arg
            stack.extend(value for _ in op.stack_after)
    except Exception:  # genops raises ValueError and friends for damaged pickles
        return None
    return keys


def damaged_tensors(
    data: Any, bad: Sequence[tuple[int, int]], intact: Intact, nbytes: Sequence[int]
) -> list[int] | None:
    """Indexes of the tensors whose bytes overlap a ``bad`` range or cannot be found.

    ``nbytes`` gives each tensor's size (empty tensors hold no bytes to damage).
    ``None`` when the file's layout cannot be recovered from its intact bytes.
    """
    found = members(data, intact)
    pickles = [m for m in found if m.name.endswith("/data.pkl") and intact(m.start, m.stop)]
    storages = {
        m.name.rpartition("/data/")[2]: (m.start, m.stop) for m in found if "/data/" in m.name
    }
    keys = storage_keys(bytes(data[pickles[0].start : pickles[0].stop])) if pickles else None
    if keys is None or len(keys) != len(nbytes):
        # Without the pickle: tensor n uses storage n when there is one storage each
        # (keys are numbered as tensors are first met, each bringing at most one).
        names = central_names(data, intact) or [m.name for m in found]
        keys = [str(i) for i in range(len(nbytes))]
        if sorted(n.rpartition("/data/")[2] for n in names if "/data/" in n) != sorted(keys):
            return None
    hit = []
    for index, (key, size) in enumerate(zip(keys, nbytes, strict=True)):
        span = storages.get(key)
        if size and (span is None or any(a < span[1] and span[0] < b for a, b in bad)):
            hit.append(index)
    return hit
