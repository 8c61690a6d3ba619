"""The manifest: the one file that makes a directory a checkpoint (format v3).

A checkpoint directory exists as a checkpoint if and only if its
``manifest.msgpack`` exists; it is written last. This module owns the
manifest's schema, its deterministic msgpack encoding and the validation of
everything read back from it. The backend-specific part (``payload``) is opaque
here and validated by the backend that wrote it.

Format version 2 ends the map with a ``checksum`` entry: the XXH3-128 of every
byte of the file before the digest itself. A reader checks it before it trusts
anything else in the file, so a flipped bit anywhere in a manifest -- a plain
value such as the epoch, a dtype, a chunk digest -- is an error, never a
silently different state. Version 1 manifests (no checksum) stay readable.
Version 3 adds skeleton nodes (Counter, defaultdict, sets, numpy values, sparse,
quantized and expanded tensors, large bytes/str stored as data; :mod:`aptckpt.tree`),
which a version 2 reader would refuse as malformed.

Every value read from a file is checked for type and range before use: a
malformed or hostile manifest raises :class:`~aptckpt.errors.FormatError`, never
another exception. See docs/format.md for the normative description.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from aptckpt import _accel, _dtypes
from aptckpt._config import MAX_MANIFEST_BYTES
from aptckpt.errors import (
    FormatError,
    IntegrityError,
    UnsafePathError,
    UnsupportedFormatVersionError,
)

__all__ = [
    "CHECKSUM_TAIL",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "FileRecord",
    "Manifest",
    "PartRecord",
    "ShardRecord",
    "TensorRecord",
    "check_relative_path",
    "decode",
    "encode",
    "pack_document",
    "total_nbytes",
]

FORMAT_NAME = "aptckpt"
FORMAT_VERSION = 5
#: The first version that stores a state saved by several ranks (``parts``, ``shards``).
SHARDED_SINCE = 4
MANIFEST_NAME = "manifest.msgpack"
#: The first version whose manifests must end with a checksum entry.
CHECKSUM_SINCE = 2

_DIGEST_SIZE = 16
#: msgpack of the last entry's key and its bin header: fixstr "checksum", bin8 of 16 bytes.
_CHECKSUM_TAIL = b"\xa8checksum\xc4\x10"
#: The bytes before the 16-byte digest that end every manifest of version 2 or later.
CHECKSUM_TAIL = _CHECKSUM_TAIL

_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_MAX_DIMS = 64
_MAX_NUMEL = 1 << 62


@dataclass(frozen=True)
class TensorRecord:
    """What the manifest says about one tensor: enough to allocate it."""

    dtype: str
    shape: tuple[int, ...]
    device: str = "cpu"
    requires_grad: bool = False
    parameter: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        dtype = _dtypes.dtype_from_name(self.dtype)
        assert dtype is not None  # validated on construction by decode()
        return dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def total_nbytes(records: Sequence[TensorRecord]) -> int:
    """The sum of the records' ``nbytes``, computed once per distinct record object (the
    tensors of one shape share one: ten thousand tensors, a few dozen products)."""
    distinct = dict(zip(map(id, records), records, strict=True))
    counts = collections.Counter(map(id, records))
    return sum(distinct[key].nbytes * count for key, count in counts.items())


@dataclass(frozen=True)
class FileRecord:
    """A data file of the checkpoint, relative to its root, and its exact size."""

    path: str
    size: int


@dataclass(frozen=True)
class PartRecord:
    """What one rank of a process group wrote: its local tensors, stored by the backend as
    a checkpoint of their own would be (``payload``, whose file numbers index ``files``),
    in the files ``files`` (indices into the manifest's files)."""

    rank: int
    files: tuple[int, ...]
    tensors: tuple[TensorRecord, ...]
    payload: Any
    #: The skeleton its backend wrote (never stored: a part written by a rank holds the list
    #: of its tensors; a one-process checkpoint seen as one part keeps its own).
    skeleton: Any = None


@dataclass(frozen=True)
class ShardRecord:
    """Where a box of a tensor is stored: local tensor ``index`` of part ``part``, whose
    shape is the box's size, at ``offsets`` in the tensor."""

    part: int
    index: int
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """A decoded, validated manifest.

    A checkpoint saved by a process group (version 4) has ``parts`` (one per rank that
    wrote data) and ``shards`` (per tensor, the boxes that cover it); its ``payload`` is
    None. Any other checkpoint has neither, and the backend's ``payload`` holds every tensor.
    """

    backend: str
    options: Mapping[str, Any]
    skeleton: Any
    tensors: tuple[TensorRecord, ...]
    files: tuple[FileRecord, ...]
    payload: Any
    metadata: Any = None
    created_at: str = ""
    library_version: str = ""
    torch_version: str = ""
    format_version: int = FORMAT_VERSION
    #: The number of ranks that saved it (1 for a single-process save).
    world_size: int = 1
    parts: tuple[PartRecord, ...] = ()
    shards: tuple[tuple[ShardRecord, ...], ...] = ()
    #: Saved by a process group: tensors are stored as boxes in per-rank ``parts``.
    sharded: bool = False

    def part(self, index: int) -> Manifest:
        """Part ``index`` as a manifest of its own, which the backend reads as it reads
        any checkpoint: the part's local tensors, files and payload."""
        part = self.parts[index]
        return Manifest(
            backend=self.backend,
            options=self.options,
            skeleton=(
                part.skeleton
                if part.skeleton is not None
                else ["list", [["tensor", i] for i in range(len(part.tensors))]]
            ),
            tensors=part.tensors,
            files=tuple(self.files[i] for i in part.files),
            payload=part.payload,
            created_at=self.created_at,
            library_version=self.library_version,
            torch_version=self.torch_version,
            format_version=self.format_version,
        )


def check_relative_path(path: object, *, where: str | None = None) -> str:
    """Validate a path stored in a checkpoint: relative, ``/``-separated, inside the root.

    Components are limited to ``[A-Za-z0-9][A-Za-z0-9._-]*`` -- no ``..``, no
    absolute paths, no backslashes, no hidden names -- so a hostile manifest
    cannot name a file outside the checkpoint.

    Raises:
        UnsafePathError: the path breaks a rule.
    """
    if not isinstance(path, str) or not path or len(path) > 4096:
        raise UnsafePathError(f"invalid file path {path!r} in manifest", path=where)
    for part in path.split("/"):
        if not _COMPONENT.fullmatch(part):
            raise UnsafePathError(
                f"unsafe file path {path!r} in manifest: every component must match "
                f"{_COMPONENT.pattern} (no absolute paths, '..', or hidden names)",
                path=where,
            )
    return path


def _tensor_doc(t: TensorRecord) -> dict[str, Any]:
    return {
        "dtype": t.dtype,
        "shape": list(t.shape),
        "device": t.device,
        "requires_grad": t.requires_grad,
        "parameter": t.parameter,
    }


def _tensor_docs(records: Sequence[TensorRecord]) -> list[dict[str, Any]]:
    """The records' maps, one per distinct record object (a save shares the record of the
    tensors that agree in every field; msgpack writes a shared map out at each place)."""
    docs: dict[int, dict[str, Any]] = {}
    out = []
    for t in records:
        doc = docs.get(id(t))
        if doc is None:
            doc = docs[id(t)] = _tensor_doc(t)
        out.append(doc)
    return out


def encode(manifest: Manifest) -> bytes:
    """Deterministic msgpack bytes of ``manifest`` (same manifest, same bytes)."""
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": manifest.format_version,
        "library_version": manifest.library_version,
        "torch_version": manifest.torch_version,
        "created_at": manifest.created_at,
        "backend": manifest.backend,
        "options": dict(manifest.options),
        "tree": manifest.skeleton,
        "tensors": _tensor_docs(manifest.tensors),
        "files": [{"path": f.path, "size": f.size} for f in manifest.files],
        "payload": manifest.payload,
        "metadata": manifest.metadata,
    }
    if manifest.sharded:
        doc["world_size"] = manifest.world_size
        doc["parts"] = [
            {
                "rank": p.rank,
                "files": list(p.files),
                "tensors": _tensor_docs(p.tensors),
                "payload": p.payload,
            }
            for p in manifest.parts
        ]
        doc["shards"] = [
            [[s.part, s.index, list(s.offsets)] for s in boxes] for boxes in manifest.shards
        ]
    return pack_document(doc)


def pack_document(doc: Mapping[str, Any]) -> bytes:
    """msgpack bytes of a manifest map, sealed with its checksum when its
    ``format_version`` calls for one.

    :func:`encode` uses it; tests and fuzzers use it to build manifests with
    arbitrary (also hostile) content that still carry a valid checksum.
    """
    body = dict(doc)
    body.pop("checksum", None)
    version = body.get("format_version")
    if not (type(version) is int and version >= CHECKSUM_SINCE):
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]
    body["checksum"] = bytes(_DIGEST_SIZE)  # placeholder, the last entry of the map
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    head = packed[:-_DIGEST_SIZE]
    assert head.endswith(_CHECKSUM_TAIL)
    digest: bytes = _accel.xxh3_128(head)
    return head + digest


def _check_checksum(data: bytes, where: str | None) -> bool:
    """Verify the trailing checksum if the file has one; True if it had one.

    Runs before msgpack parses anything, so damage anywhere is reported as
    damage, not as whatever the damaged bytes happen to decode to.
    """
    if not data[:-_DIGEST_SIZE].endswith(_CHECKSUM_TAIL):
        return False
    body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
    if _accel.xxh3_128(body) != digest:
        raise IntegrityError(
            f"manifest '{where or MANIFEST_NAME}' fails its checksum (stored {digest.hex()}, "
            f"computed {_accel.xxh3_128(body).hex()}): the manifest is damaged, so nothing in this "
            "checkpoint can be trusted -- restore it from a copy or use another checkpoint",
            path=where,
            file=MANIFEST_NAME,
        )
    return True


# ------------------------------------------------------------------ decoding


class _Reader:
    """Typed access to a decoded msgpack map, raising FormatError with context."""

    def __init__(self, doc: Mapping[str, Any], where: str | None, context: str) -> None:
        self.doc, self.where, self.context = doc, where, context

    def fail(self, message: str) -> FormatError:
        return FormatError(f"malformed manifest: {self.context}{message}", path=self.where)

    def get(self, key: str, kind: type | tuple[type, ...], *, default: Any = ...) -> Any:
        if key not in self.doc:
            if default is not ...:
                return default
            raise self.fail(f"missing field {key!r}")
        value = self.doc[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"field {key!r} has type {type(value).__name__}")
        return value

    def count(self, key: str, *, limit: int = _MAX_NUMEL) -> int:
        value = self.get(key, int)
        if isinstance(value, bool) or not 0 <= value <= limit:
            raise self.fail(f"field {key!r} = {value!r} is out of range")
        return int(value)


def _tensor_record(raw: object, index: int, where: str | None) -> TensorRecord:
    if not isinstance(raw, dict):
        raise FormatError(f"malformed manifest: tensor {index} is not a map", path=where)
    r = _Reader(raw, where, f"tensor {index}: ")
    dtype = r.get("dtype", str)
    if _dtypes.dtype_from_name(dtype) is None:
        raise r.fail(f"unknown dtype {dtype!r}; a newer aptckpt or torch may be needed")
    shape = r.get("shape", list)
    if len(shape) > _MAX_DIMS or not all(type(d) is int and 0 <= d <= _MAX_NUMEL for d in shape):
        raise r.fail(f"invalid shape {shape!r}")
    if math.prod(shape) > _MAX_NUMEL:
        raise r.fail(f"shape {shape!r} has too many elements")
    device = r.get("device", str, default="cpu")
    if len(device) > 64:
        raise r.fail("device name too long")
    return TensorRecord(
        dtype=dtype,
        shape=tuple(shape),
        device=device,
        requires_grad=r.get("requires_grad", bool, default=False),
        parameter=r.get("parameter", bool, default=False),
    )


_INT_ONLY = frozenset({int})
_TENSOR_FIELDS = frozenset({"dtype", "shape", "device", "requires_grad", "parameter"})


def _tensor_records(raw_tensors: list[Any], where: str | None) -> tuple[TensorRecord, ...]:
    """:func:`_tensor_record` of every entry; equal entries share one record.

    A manifest of ten thousand tensors holds ten thousand maps, most alike: an entry that
    is a map of the five fields, each of the exact type and range :func:`_tensor_record`
    admits, is checked here with a few C-level calls and gets the record made for the first
    such entry; anything else goes through :func:`_tensor_record`, which accepts exactly the
    same entries and names what is wrong with the others."""
    made: dict[tuple[Any, ...], TensorRecord] = {}
    records = []
    for index, raw in enumerate(raw_tensors):
        record = None
        if type(raw) is dict and raw.keys() == _TENSOR_FIELDS:
            dtype, shape = raw["dtype"], raw["shape"]
            device, grad, parameter = raw["device"], raw["requires_grad"], raw["parameter"]
            if (
                type(dtype) is str
                and type(shape) is list
                and len(shape) <= _MAX_DIMS
                and type(device) is str
                and len(device) <= 64
                and type(grad) is bool
                and type(parameter) is bool
                and (not shape or (set(map(type, shape)) <= _INT_ONLY and min(shape) >= 0))
            ):
                # every field's type is exact: equal keys mean equal entries
                key = (dtype, tuple(shape), device, grad, parameter)
                record = made.get(key)
                if record is None:
                    record = made[key] = _tensor_record(raw, index, where)
        if record is None:
            record = _tensor_record(raw, index, where)
        records.append(record)
    return tuple(records)


def decode(data: bytes, *, where: str | None = None) -> Manifest:
    """Decode and validate manifest bytes.

    Args:
        data: the bytes of ``manifest.msgpack``.
        where: the manifest's path, for messages.

    Raises:
        UnsupportedFormatVersionError: written by a newer format version.
        FormatError: anything else malformed.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(f"manifest is {len(data)} bytes, over the limit", path=where)
    has_checksum = _check_checksum(data, where)
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as err:  # msgpack raises many unrelated types for bad input
        raise FormatError(
            f"manifest is not valid msgpack ({type(err).__name__}: {err}); the checkpoint is "
            "damaged -- restore it from a copy",
            path=where,
        ) from err
    if not isinstance(doc, dict):
        raise FormatError("malformed manifest: top level is not a map", path=where)
    r = _Reader(doc, where, "")
    if doc.get("format") != FORMAT_NAME:
        raise r.fail(f"'format' is {doc.get('format')!r}, not {FORMAT_NAME!r}")
    version = doc.get("format_version")
    if type(version) is not int or version < 1:
        raise r.fail(f"invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise UnsupportedFormatVersionError(version, FORMAT_VERSION, path=where)
    if version >= CHECKSUM_SINCE and not has_checksum:
        raise IntegrityError(
            f"manifest '{where or MANIFEST_NAME}' (format version {version}) has no valid "
            "checksum entry at its end: "
            "the manifest is damaged or truncated -- restore it from a copy",
            path=where,
            file=MANIFEST_NAME,
        )
    raw_tensors = r.get("tensors", list)
    raw_files = r.get("files", list)
    files = []
    for i, f in enumerate(raw_files):
        if not isinstance(f, dict):
            raise r.fail(f"file {i} is not a map")
        fr = _Reader(f, where, f"file {i}: ")
        files.append(
            FileRecord(check_relative_path(fr.get("path", str), where=where), fr.count("size"))
        )
    if len({f.path for f in files}) != len(files):
        raise r.fail("a file is listed twice")
    tensors = _tensor_records(raw_tensors, where)
    world_size = 1
    parts: tuple[PartRecord, ...] = ()
    shards: tuple[tuple[ShardRecord, ...], ...] = ()
    sharded = version >= SHARDED_SINCE and "parts" in doc
    if sharded:
        world_size = r.count("world_size", limit=1 << 24)
        if world_size < 1:
            raise r.fail("world_size is 0")
        parts = _parts(r.get("parts", list), len(files), world_size, where)
        shards = _shards(r.get("shards", list), tensors, parts, where)
    return Manifest(
        backend=r.get("backend", str),
        options=r.get("options", dict, default={}),
        skeleton=doc.get("tree"),
        tensors=tensors,
        files=tuple(files),
        payload=doc.get("payload"),
        metadata=doc.get("metadata"),
        created_at=r.get("created_at", str, default=""),
        library_version=r.get("library_version", str, default=""),
        torch_version=r.get("torch_version", str, default=""),
        format_version=version,
        world_size=world_size,
        parts=parts,
        shards=shards,
        sharded=sharded,
    )


def _parts(
    raw: list[Any], file_count: int, world_size: int, where: str | None
) -> tuple[PartRecord, ...]:
    parts = []
    owner: dict[int, int] = {}  # file -> the part that lists it
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise FormatError(f"malformed manifest: part {i} is not a map", path=where)
        r = _Reader(item, where, f"part {i}: ")
        rank = r.count("rank", limit=world_size - 1)
        files = r.get("files", list)
        for f in files:
            if type(f) is not int or not 0 <= f < file_count or f in owner:
                raise r.fail(f"file index {f!r} is out of range or listed by two parts")
            owner[f] = i
        tensors = tuple(_tensor_record(t, j, where) for j, t in enumerate(r.get("tensors", list)))
        parts.append(PartRecord(rank, tuple(files), tensors, item.get("payload")))
    if len(owner) != file_count:
        raise FormatError("malformed manifest: a data file belongs to no part", path=where)
    return tuple(parts)


def _shards(
    raw: list[Any],
    tensors: tuple[TensorRecord, ...],
    parts: tuple[PartRecord, ...],
    where: str | None,
) -> tuple[tuple[ShardRecord, ...], ...]:
    """Every tensor's boxes, each a local tensor of a part of the tensor's dtype that lies
    inside the tensor. Whether the boxes cover it exactly is checked where it is read."""
    if len(raw) != len(tensors):
        raise FormatError(
            f"malformed manifest: {len(raw)} shard lists for {len(tensors)} tensors", path=where
        )
    result = []
    used: set[tuple[int, int]] = set()
    for t, (record, boxes) in enumerate(zip(tensors, raw, strict=True)):
        if not isinstance(boxes, list):
            raise FormatError(f"malformed manifest: shards of tensor {t}", path=where)
        found = []
        for box in boxes:
            if not (isinstance(box, list) and len(box) == 3 and isinstance(box[2], list)):
                raise FormatError(f"malformed manifest: a shard of tensor {t}", path=where)
            part, index, offsets = box
            if type(part) is not int or not 0 <= part < len(parts):
                raise FormatError(f"malformed manifest: tensor {t}: part {part!r}", path=where)
            local = parts[part].tensors
            if type(index) is not int or not 0 <= index < len(local) or (part, index) in used:
                raise FormatError(
                    f"malformed manifest: tensor {t}: local tensor {index!r} of part {part} is "
                    "out of range or stores two boxes",
                    path=where,
                )
            used.add((part, index))
            sizes = local[index].shape
            if (
                local[index].dtype != record.dtype
                or len(offsets) != len(record.shape)
                or len(sizes) != len(record.shape)
                or not all(
                    type(o) is int and o >= 0 and o + n <= d
                    for o, n, d in zip(offsets, sizes, record.shape, strict=True)
                )
            ):
                raise FormatError(
                    f"malformed manifest: tensor {t}: a shard at {offsets!r} of "
                    f"{local[index].dtype} {list(sizes)} does not lie inside "
                    f"{record.dtype} {list(record.shape)}",
                    path=where,
                )
            found.append(ShardRecord(part, index, tuple(offsets)))
        result.append(tuple(found))
    return tuple(result)
