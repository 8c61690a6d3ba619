"""Reading a torch.distributed.checkpoint (DCP) directory without running its pickles.

A DCP directory written by ``FileSystemWriter`` (``dcp.save``) holds ``.metadata``, a
pickle of ``torch.distributed.checkpoint.metadata.Metadata``, and data files
``__{rank}_{n}.distcp``. Each item in a data file is one ``torch.save`` of a tensor (or of
one shard of it), or -- for a value that is not a tensor -- the bytes of a ``torch.save``
of that value, at the ``(relative_path, offset, length)`` the metadata records.

``.metadata`` is read by :class:`_MetadataUnpickler`, which resolves only the handful of
names a DCP metadata pickle refers to (its dataclasses, ``torch.Size``, dtypes, layouts,
memory formats, paths) -- to inert stand-ins defined here, not to torch's classes: nothing
in the file can name a callable that runs code, and a name outside the list is refused
with :class:`~aptckpt.errors.FormatError` *before* anything is called. Every item is then
read by ``torch.load(weights_only=True)``; every path, offset, length, shape, dtype and
chunk box from the file is validated before use (paths are one plain name inside the
directory; items lie inside their file; chunks lie inside their tensor, do not overlap and
cover it; a tensor's bytes fit in the items that hold it, so a lying size cannot make us
allocate more than the files hold).

Sharded tensors (several chunks, e.g. saved by FSDP on many ranks) come back whole;
nesting comes back from the ``planner_data`` DCP records when it flattens a state
(``("model", "w")`` for ``"model.w"``; ints are list indices; DCP turns int dict keys into
strings, as ``dcp.load`` does). Without ``planner_data`` keys stay flat and dotted.

Not read, refused naming torch's own converter (which trusts the pickles):
``.metadata`` naming other classes, items written through storage extensions
(``transform_descriptors``, e.g. compression), data files in DCP's safetensors
serialization, and non-tensor values that ``weights_only`` refuses.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import re
from typing import Any, cast

import torch

from aptckpt._config import MAX_NESTING
from aptckpt.errors import FormatError, UnsupportedObjectError
from aptckpt.storage import LOCAL

__all__ = ["METADATA", "read_dcp"]

METADATA = ".metadata"
_METADATA_LIMIT = 256 << 20
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_WAY_OUT = (
    "if you trust the directory, turn it into a torch.save file with torch's own tool -- "
    "python -m torch.distributed.checkpoint.format_utils dcp_to_torch DIR state.pt -- "
    "and convert that file"
)


class _Record:
    """A DCP dataclass as its pickle describes it: attributes only, no behaviour."""

    _kind = "record"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # NEWOBJ builds these with __new__ and BUILD; a call means a hand-made pickle.
        raise FormatError(f"unexpected call of {self._kind} in a DCP .metadata pickle")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged: dict[Any, Any] = {}
            for part in state:
                if part is not None:
                    if not isinstance(part, dict):
                        raise FormatError(f"bad state of {self._kind} in a DCP .metadata")
                    merged.update(part)
            state = merged
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise FormatError(f"bad state of {self._kind} in a DCP .metadata")
        # Kept apart from the object's own attributes: a field cannot pose as _kind.
        self.__dict__.setdefault("fields", {}).update(state)

    def get(self, name: str, default: Any = None) -> Any:
        return self.__dict__.get("fields", {}).get(name, default)

    def __repr__(self) -> str:
        return f"{self._kind}({self.__dict__.get('fields', {})!r})"


def _record_class(name: str) -> type[_Record]:
    return type(name, (_Record,), {"_kind": name})


class _TensorProperties(_Record):
    """Pickled by torch as a tuple (dtype, layout, requires_grad, memory format, pinned)."""

    _kind = "TensorProperties"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            super().__setstate__(state)
            return
        if not isinstance(state, tuple) or len(state) != 5:
            raise FormatError("bad state of TensorProperties in a DCP .metadata")
        names = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")
        super().__setstate__(dict(zip(names, state, strict=True)))


def _size(*args: Any) -> tuple[int, ...]:
    """``torch.Size(tuple)`` as the pickle calls it: a tuple of non-negative ints."""
    if len(args) != 1 or not isinstance(args[0], (tuple, list)):
        raise FormatError("bad torch.Size in a DCP .metadata")
    dims = tuple(args[0])
    if not all(type(d) is int and d >= 0 for d in dims):
        raise FormatError(f"bad torch.Size {dims!r} in a DCP .metadata")
    return dims


def _text(what: str) -> Any:
    def make(*args: Any) -> str:
        if len(args) != 1 or not isinstance(args[0], (str, int)):
            raise FormatError(f"bad {what} in a DCP .metadata")
        return str(args[0])

    return make


def _path(*parts: Any) -> str:
    """``PosixPath(*parts)`` as pathlib pickles it (the checkpoint id): kept as text only."""
    if not all(isinstance(p, str) for p in parts):
        raise FormatError("bad path in a DCP .metadata")
    return "/".join(parts)


_DC = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    **{
        (_DC, n): _record_class(n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
        )
    },
    (_DC, "TensorProperties"): _TensorProperties,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _record_class("_StorageInfo"),
    (_DC, "_MEM_FORMAT_ENCODING"): _text("memory format"),
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _text("layout"),
    ("pathlib", "PosixPath"): _path,
    ("pathlib", "WindowsPath"): _path,
    ("pathlib", "PurePosixPath"): _path,
    ("pathlib", "PureWindowsPath"): _path,
    ("collections", "OrderedDict"): dict,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the names in ``_ALLOWED`` (and torch dtypes); refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise FormatError(
            f"the DCP .metadata pickle names {module}.{name}, which is not one of the "
            "classes torch.distributed.checkpoint writes there; aptckpt does not run it. "
            + _WAY_OUT
        )

    def persistent_load(self, pid: Any) -> Any:
        raise FormatError("the DCP .metadata pickle holds a persistent id; " + _WAY_OUT)


def _load_metadata(folder: str) -> _Record:
    path = os.path.join(folder, METADATA)
    try:
        data = LOCAL.read_file(path, limit=_METADATA_LIMIT)
    except OSError as err:
        raise FormatError(f"cannot read '{path}' ({err})", path=path) from err
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except FormatError as err:
        err.path = path
        raise
    except Exception as err:  # truncated or malformed pickle
        raise FormatError(f"'{path}' is not a readable DCP metadata pickle ({err})") from err
    if type(meta).__name__ != "Metadata" or not isinstance(meta, _Record):
        raise FormatError(f"'{path}' does not hold a DCP Metadata object")
    return meta


def _need(cond: bool, what: str, folder: str) -> None:
    if not cond:
        raise FormatError(f"cannot import the DCP directory '{folder}': {what}", path=folder)


def _dtype(props: Any, fqn: str, folder: str) -> torch.dtype:
    dtype = props.get("dtype") if isinstance(props, _Record) else None
    _need(isinstance(dtype, torch.dtype), f"{fqn!r} has no valid dtype", folder)
    layout = props.get("layout", "torch.strided")
    _need(
        layout in (None, "torch.strided"),
        f"{fqn!r} has layout {layout}; only strided tensors are read",
        folder,
    )
    return cast(torch.dtype, dtype)


class _Items:
    """The data files' items, read by ``(relative_path, offset, length)`` after checks."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._sizes: dict[str, int] = {}

    def read(self, info: Any, fqn: str) -> bytes:
        folder = self.folder
        _need(isinstance(info, _Record), f"{fqn!r} has no storage record", folder)
        name, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
        _need(
            isinstance(name, str) and bool(_FILE_NAME.fullmatch(name)) and name != METADATA,
            f"{fqn!r} names the data file {name!r}, which is not a plain name in the directory",
            folder,
        )
        _need(
            type(offset) is int and type(length) is int and offset >= 0 and length >= 0,
            f"{fqn!r} has a bad offset/length ({offset!r}, {length!r})",
            folder,
        )
        if info.get("transform_descriptors"):
            raise FormatError(
                f"cannot import the DCP directory '{folder}': {fqn!r} was written through "
                f"storage extensions {list(info.get('transform_descriptors'))!r} (e.g. "
                f"compression), which aptckpt does not decode; " + _WAY_OUT,
                path=folder,
            )
        path = os.path.join(folder, name)
        if name not in self._sizes:
            entry = LOCAL.info(os.path.realpath(path))
            if entry is None or entry.kind != "file":
                raise FormatError(
                    f"cannot import the DCP directory '{folder}': data file {name} is missing",
                    path=folder,
                )
            self._sizes[name] = entry.size
        size = self._sizes[name]
        _need(
            offset + length <= size,
            f"{fqn!r} lies at bytes {offset}..{offset + length} of {name}, which holds "
            f"{size} bytes (truncated or damaged)",
            folder,
        )
        data = LOCAL.read_range(os.path.realpath(path), offset, length)
        _need(len(data) == length, f"{name} ended early while reading {fqn!r}", folder)
        return data

    def load(self, data: bytes, fqn: str) -> Any:
        if not data.startswith(b"PK\x03\x04"):
            raise FormatError(
                f"cannot import the DCP directory '{self.folder}': {fqn!r} is not a torch.save "
                "item (written with serialization_format=SAFETENSORS, or damaged); " + _WAY_OUT,
                path=self.folder,
            )
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise UnsupportedObjectError(
                f"cannot import {fqn!r} of the DCP directory '{self.folder}': "
                f"torch.load(weights_only=True) refused it ({err}). It holds Python objects "
                "aptckpt never unpickles; " + _WAY_OUT,
                key_path=fqn,
                type_name="DCP item",
            ) from err


def _volume(sizes: tuple[int, ...]) -> int:
    volume = 1
    for n in sizes:
        volume *= n
    return volume


def _chunks_cover(
    fqn: str,
    size: tuple[int, ...],
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]],
    folder: str,
) -> None:
    volume = 1
    for n in size:
        volume *= n
    total = 0
    for offsets, sizes in boxes:
        _need(
            len(offsets) == len(size) == len(sizes)
            and all(o + s <= n for o, s, n in zip(offsets, sizes, size, strict=True)),
            f"a chunk of {fqn!r} at {offsets} of size {sizes} lies outside its shape {size}",
            folder,
        )
        v = 1
        for s in sizes:
            v *= s
        total += v
    # Overlaps are found as the chunks are copied (_tensor): a pairwise check here costs
    # n^2 for n chunks, minutes for a few thousand (a large world, or a hostile file).
    _need(total <= volume, f"chunks of {fqn!r} overlap (they hold {total} elements)", folder)
    _need(total == volume, f"the chunks of {fqn!r} do not cover its shape {size}", folder)


def _tensor(
    fqn: str, md: _Record, chunks: dict[tuple[int, ...], Any], items: _Items
) -> torch.Tensor:
    folder = items.folder
    dtype = _dtype(md.get("properties"), fqn, folder)
    size = md.get("size")
    _need(isinstance(size, tuple), f"{fqn!r} has no valid size", folder)
    boxes = []
    for chunk in md.get("chunks") or []:
        _need(isinstance(chunk, _Record), f"{fqn!r} has a bad chunk", folder)
        offsets, sizes = chunk.get("offsets"), chunk.get("sizes")
        _need(
            isinstance(offsets, tuple) and isinstance(sizes, tuple),
            f"{fqn!r} has a chunk without offsets and sizes",
            folder,
        )
        boxes.append((offsets, sizes))
    _need(bool(boxes), f"{fqn!r} has no chunks", folder)
    _chunks_cover(fqn, size, boxes, folder)
    volume = 1
    for n in size:
        volume *= n
    # An empty chunk holds nothing to read (and DCP keys records by offset only, so an
    # empty chunk can share its record with the chunk that starts where it does).
    raw = [
        items.read(chunks.get(offsets), f"{fqn}@{list(offsets)}") if _volume(sizes) else None
        for offsets, sizes in boxes
    ]
    # Each item is a torch.save of its chunk: its bytes bound what the tensor can hold, so
    # a lying size cannot make us allocate more than the files hold.
    _need(
        volume * dtype.itemsize <= sum(len(r) for r in raw if r is not None),
        f"{fqn!r} claims {volume} elements of {dtype}, more than its items hold",
        folder,
    )
    out = torch.empty(size, dtype=dtype)
    # Chunks inside the shape whose volumes sum to it cover it exactly unless two
    # overlap: each one's place is marked before it is copied.
    filled = torch.zeros(size, dtype=torch.bool)
    for (offsets, sizes), data in zip(boxes, raw, strict=True):
        if data is None:
            continue
        mark = filled
        for dim, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
            mark = mark.narrow(dim, o, s)
        _need(not bool(mark.any()), f"chunks of {fqn!r} overlap (at {list(offsets)})", folder)
        mark.fill_(True)
        part = items.load(data, fqn)
        _need(
            isinstance(part, torch.Tensor)
            and part.dtype == dtype
            and tuple(part.shape) == tuple(sizes),
            f"the chunk of {fqn!r} at {list(offsets)} holds "
            + (
                f"a {part.dtype} tensor of shape {tuple(part.shape)}"
                if isinstance(part, torch.Tensor)
                else type(part).__name__
            )
            + f", not {dtype} of shape {sizes}",
            folder,
        )
        view = out
        for dim, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
            view = view.narrow(dim, o, s)
        view.copy_(part)
    return out


def _nest(flat: dict[str, Any], mapping: Any, folder: str) -> Any:
    """Put the values back where ``planner_data`` says DCP found them."""
    if not isinstance(mapping, dict) or not mapping:
        return flat
    root: dict[str, Any] = {}
    limit = len(flat)
    for fqn, value in flat.items():
        path = mapping.get(fqn)
        if path is None:
            path = (fqn,)
        _need(
            isinstance(path, tuple)
            and 0 < len(path) <= MAX_NESTING
            and isinstance(path[0], str)
            and all(isinstance(p, str) or (type(p) is int and 0 <= p < limit) for p in path),
            f"planner_data has a bad path {path!r} for {fqn!r}",
            folder,
        )
        node: Any = root
        for here, nxt in itertools.pairwise(path):
            child = node[here] if _has(node, here) else None
            if child is None:
                child = [] if isinstance(nxt, int) else {}
                _put(node, here, child, fqn, folder)
            _need(
                isinstance(child, list if isinstance(nxt, int) else dict),
                f"planner_data nests {fqn!r} inside a value of another kind",
                folder,
            )
            node = child
        _need(not _has(node, path[-1]), f"planner_data puts two values at {path!r}", folder)
        _put(node, path[-1], value, fqn, folder)
    _fill_holes(root, folder)
    return root


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, list):
        return isinstance(key, int) and key < len(node) and node[key] is not _HOLE
    return key in node


_HOLE = object()


def _put(node: Any, key: Any, value: Any, fqn: str, folder: str) -> None:
    if isinstance(node, list):
        _need(isinstance(key, int), f"planner_data indexes a list with {key!r} ({fqn!r})", folder)
        node.extend([_HOLE] * (key + 1 - len(node)))
        node[key] = value
    else:
        _need(isinstance(key, str), f"planner_data keys a dict with {key!r} ({fqn!r})", folder)
        node[key] = value


def _fill_holes(node: Any, folder: str) -> None:
    children = node if isinstance(node, list) else node.values() if isinstance(node, dict) else ()
    for child in children:
        _need(child is not _HOLE, "planner_data leaves a gap in a list", folder)
        if isinstance(child, (list, dict)):
            _fill_holes(child, folder)


def read_dcp(folder: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """The state held by the DCP directory ``folder`` and metadata recording the import."""
    folder = os.path.realpath(folder)
    meta = _load_metadata(folder)
    described = meta.get("state_dict_metadata")
    storage = meta.get("storage_data")
    _need(isinstance(described, dict), ".metadata has no state_dict_metadata", folder)
    _need(isinstance(storage, dict), ".metadata has no storage_data", folder)
    by_key: dict[str, dict[tuple[int, ...], Any]] = {}
    for index, info in storage.items():
        _need(isinstance(index, _Record), "storage_data has a bad key", folder)
        fqn, offset = index.get("fqn"), index.get("offset")
        _need(isinstance(fqn, str), "storage_data names a key that is not a string", folder)
        by_key.setdefault(fqn, {})[offset if isinstance(offset, tuple) else ()] = info
    items = _Items(folder)
    flat: dict[str, Any] = {}
    for fqn, md in described.items():
        _need(isinstance(fqn, str) and isinstance(md, _Record), "a bad state entry", folder)
        found = by_key.get(fqn, {})
        if md._kind == "TensorStorageMetadata":
            flat[fqn] = _tensor(fqn, md, found, items)
        elif md._kind == "BytesStorageMetadata":
            _need(len(found) == 1, f"{fqn!r} has {len(found)} storage records, not 1", folder)
            flat[fqn] = items.load(items.read(next(iter(found.values())), fqn), fqn)
        else:
            raise FormatError(f"cannot import '{folder}': {fqn!r} is a {md._kind}", path=folder)
    state = _nest(flat, meta.get("planner_data"), folder)
    record: dict[str, Any] = {"imported_from": "torch.distributed.checkpoint"}
    version = meta.get("version")
    if isinstance(version, str):
        record["dcp_version"] = version
    return state, record
