"""Exports of :func:`aptckpt.convert` (``to=``): a state written in another library's format.

* ``"torch-file"``: one ``torch.save`` file, in the form the ``torch`` backend writes
  (every tensor alone on a storage it covers, ties kept), loadable with
  ``torch.load(path, weights_only=True)``.
* ``"safetensors"``: the tensors of the state (or of ``select``; by default the ``"model"``
  entry when the state has one), named by their dotted key paths as ``state_dict`` keys are
  (``layers.0.weight``). Tied weights -- tensors that are the same view of one storage --
  are stored once, under the name met first in the state's order, which is the name
  Hugging Face's ``save_pretrained`` keeps (the module that owns a tied parameter, e.g.
  the input embedding, registers before the ones reusing it, e.g. ``lm_head``), and each
  dropped name is recorded in ``__metadata__`` as ``{dropped: kept}``, as safetensors'
  ``save_model`` does; ``from_pretrained`` ties them again from the model's
  ``_tied_weights_keys``, and :func:`aptckpt.convert` importing the file ties them again
  from those entries. ``__metadata__`` also carries ``format: "pt"`` (which
  ``from_pretrained`` requires) and aptckpt's provenance (``aptckpt.*`` keys, all strings).
  A destination ending in ``.safetensors`` is one file; any other is a directory in
  Hugging Face's layout (``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
  shards and ``model.safetensors.index.json`` when the tensors exceed ``max_shard_size``),
  which may already hold other files (``config.json``). Values safetensors cannot hold
  (plain values, complex or quantized or sparse tensors) are refused, naming the first.
* ``"dcp"``: a torch.distributed.checkpoint directory written by torch's own
  ``dcp.save(..., no_dist=True)``; ``dcp.load`` reads it into a template state. DCP keeps
  no ties (each name is stored), turns non-string dict keys into strings and stores no
  empty dicts; each is reported in :attr:`ExportInfo.notes`. Plain values must load with
  ``torch.load(weights_only=True)`` (as :func:`aptckpt.convert` reads DCP back).

Every destination is local and published atomically (see
:mod:`aptckpt.storage.local._publish`).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aptckpt import tree
from aptckpt.backends.torch import write_torch_file
from aptckpt.errors import (
    CheckpointExistsError,
    UnsupportedObjectError,
    UnsupportedPathError,
)
from aptckpt.storage import LOCAL
from aptckpt.storage.local._publish import publish_dir, publish_file

__all__ = ["FORMATS", "ExportInfo", "check_apart", "export", "parse_size"]

FORMATS = ("torch-file", "safetensors", "dcp")
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_HF_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`aptckpt.convert` wrote with ``to=`` another format.

    ``path`` is the file or directory written, ``files`` the files written in it (for a
    directory export) or the file's name, ``bytes`` their total size, ``notes`` what the
    format could not keep as it was (ties stored once, keys spelled as strings).
    """

    path: str
    format: str
    tensors: int
    bytes: int
    files: tuple[str, ...]
    seconds: float
    notes: tuple[str, ...] = ()


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}


def parse_size(size: int | str) -> int:
    """``max_shard_size`` as Hugging Face spells it: an int, or ``"5GB"``, ``"500MiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = found.group(2).upper() if found else ""
        if not found or unit not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MiB or 1000000")
        value = int(float(found.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, not {size!r}")
    return value


def _select(state: Any, select: str | tuple[Any, ...] | None, to: str) -> tuple[Any, list[str]]:
    if select is None:
        if to == "safetensors" and isinstance(state, Mapping):
            model = state.get("model")
            if isinstance(model, Mapping):
                return model, ["exported the 'model' entry of the state (select= picks another)"]
        return state, []
    node = state
    path = select if isinstance(select, tuple) else (select,)
    for key in path:
        if not isinstance(node, (Mapping, list, tuple)):
            raise KeyError(f"select={select!r}: the state has no {key!r} there")
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise KeyError(f"select={select!r}: the state has no {key!r} there") from None
    if isinstance(node, torch.Tensor) and to == "safetensors":  # one tensor: named by its key
        return {".".join(str(k) for k in path): node}, []
    return node, []


def _dotted(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(name, leaf) pairs named as ``state_dict`` keys are: dict keys and list indices
    joined with dots (``layers.0.weight``), non-string keys in brackets."""
    if isinstance(obj, Mapping) and obj:
        for k, v in obj.items():
            sub = (f"{prefix}.{k}" if prefix else k) if isinstance(k, str) else f"{prefix}[{k!r}]"
            yield from _dotted(v, sub)
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size) and obj:
        for i, v in enumerate(obj):
            yield from _dotted(v, f"{prefix}.{i}" if prefix else str(i))
    elif prefix or not isinstance(obj, (Mapping, list, tuple)):
        yield prefix, obj


# ------------------------------------------------------------------ torch file


def _torch_file(state: Any, dst: Path, *, overwrite: bool) -> ExportInfo:
    flat = tree.flatten(state)

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            write_torch_file(flat, f)

    size = publish_file(dst, write, overwrite=overwrite)
    notes = []
    if tree.torch_form(flat.skeleton) is not flat.skeleton:  # what only a manifest restores
        notes.append(
            "some values are stored in the form torch.load(weights_only=True) reads "
            "(frozensets as tuples, defaultdicts as dicts, numpy values as Python values "
            "and tensors); an aptckpt checkpoint keeps their types"
        )
    return ExportInfo(
        str(dst), "torch-file", len(flat.tensors), size, (dst.name,), 0.0, tuple(notes)
    )


# ------------------------------------------------------------------ safetensors


def _tensors_for_safetensors(
    part: Any, reserved: frozenset[str] = frozenset()
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The tensors to write by name, the ``{dropped: kept}`` ties, and notes. A tied name
    that is also a ``__metadata__`` key of ours (``reserved``: ``format``, provenance) is
    written as a copy: recorded as a tie it would replace that key."""
    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    notes: list[str] = []
    seen: dict[tuple[Any, ...], str] = {}
    storages: dict[tuple[int, int], str] = {}
    for name, value in _dotted(part):
        if not isinstance(value, torch.Tensor):
            kind = (
                type(value).__name__
                if not isinstance(value, (Mapping, list, tuple))
                else "empty container"
            )
            raise UnsupportedObjectError(
                f"cannot export to safetensors: '{name or 'state'}' is not a tensor ({kind}), "
                "safetensors files hold tensors only. Export the weights alone "
                "(select='model', or the key that holds them), or export to 'torch-file', "
                "which keeps every value",
                key_path=name,
                type_name=type(value).__name__,
            )
        if name in tensors or name in ties:
            raise UnsupportedObjectError(
                f"cannot export to safetensors: two tensors are named '{name}' once their "
                "keys are joined with dots; safetensors needs unique names",
                key_path=name,
                type_name="torch.Tensor",
            )
        if value.layout != torch.strided or value.is_quantized or value.is_complex():
            what = (
                "quantized"
                if value.is_quantized
                else f"{value.dtype}"
                if value.is_complex()
                else f"sparse ({value.layout})"
            )
            raise UnsupportedObjectError(
                f"cannot export to safetensors: '{name}' is a {what} tensor, which "
                "safetensors cannot store; export to 'torch-file', which keeps it",
                key_path=name,
                type_name="torch.Tensor",
            )
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        storage = t.untyped_storage()
        view = (storage.data_ptr(), t.dtype, t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and view in seen and name not in reserved:  # a tie, stored once
            ties[name] = seen[view]
            continue
        if t.numel() and view in seen:
            notes.append(
                f"'{name}' is tied to '{seen[view]}' but its name is a __metadata__ key of "
                "the export; wrote it as a copy"
            )
            tensors[name] = t.clone(memory_format=torch.contiguous_format)
            continue
        ident = (storage.data_ptr(), storage.nbytes())
        if t.numel() and ident in storages:
            notes.append(
                f"'{name}' overlaps '{storages[ident]}' (views of one storage, not the same "
                "view); wrote it as a copy"
            )
            t = t.clone(memory_format=torch.contiguous_format)
        elif t.numel():
            storages[ident] = name
        if t.numel():
            seen[view] = name
        tensors[name] = t.contiguous()
    if not tensors:
        raise UnsupportedObjectError(
            "cannot export to safetensors: the state holds no tensors",
            key_path="state",
            type_name=type(part).__name__,
        )
    if ties:
        notes.append(
            f"{len(ties)} tied tensor name(s) stored once, recorded in __metadata__ as "
            + ", ".join(f"{d!r} -> {k!r}" for d, k in list(ties.items())[:3])
            + ("..." if len(ties) > 3 else "")
        )
    return tensors, ties, notes


def _st_write(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        bad = [k for k, t in tensors.items() if err.args and t.dtype == err.args[0]]
        name = bad[0] if bad else next(iter(tensors))
        what = f"the dtype {tensors[name].dtype} of '{name}'" if bad else f"this state ({err})"
        raise UnsupportedObjectError(
            f"safetensors cannot store {what}; export to 'torch-file', which keeps every dtype",
            key_path=name,
            type_name="torch.Tensor",
        ) from err


def _check_dtypes(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a dtype safetensors cannot store before any file is written (a sharded
    export would otherwise leave the shards written before the one that fails)."""
    from safetensors.torch import save

    first: dict[torch.dtype, str] = {}
    for name, t in tensors.items():
        first.setdefault(t.dtype, name)
    for dtype, name in first.items():
        try:
            save({name: torch.empty(0, dtype=dtype)})
        except (ValueError, TypeError, KeyError, RuntimeError) as err:
            raise UnsupportedObjectError(
                f"safetensors cannot store the dtype {dtype} of '{name}'; export to "
                "'torch-file', which keeps every dtype",
                key_path=name,
                type_name="torch.Tensor",
            ) from err


def _shards(tensors: dict[str, torch.Tensor], limit: int | None) -> list[list[str]]:
    """Names per shard in state order, a new shard when the next tensor would pass
    ``limit`` (a tensor larger than ``limit`` gets a shard of its own), as HF shards."""
    if limit is None:
        return [list(tensors)]
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _safetensors(
    part: Any,
    dst: Path,
    *,
    overwrite: bool,
    provenance: dict[str, str],
    max_shard_size: int | None,
) -> ExportInfo:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as err:
        raise UnsupportedObjectError(
            f"exporting to safetensors needs the safetensors package ({err}); "
            "pip install safetensors",
            key_path="state",
            type_name="safetensors",
        ) from err
    tensors, ties, notes = _tensors_for_safetensors(part, frozenset({"format", *provenance}))
    _check_dtypes(tensors)
    metadata = {"format": "pt", **provenance, **ties}
    shards = _shards(tensors, max_shard_size)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if dst.suffix == ".safetensors" and not dst.is_dir():
        if len(shards) > 1:
            raise UnsupportedPathError(
                f"the tensors ({total} bytes) exceed max_shard_size={max_shard_size}: name a "
                f"directory instead of '{dst}' to write shards and {HF_INDEX} there",
                path=str(dst),
            )
        size = publish_file(dst, lambda p: _st_write(tensors, metadata, p), overwrite=overwrite)
        return ExportInfo(
            str(dst), "safetensors", len(tensors), size, (dst.name,), 0.0, tuple(notes)
        )
    return _hf_folder(dst, tensors, metadata, shards, total, overwrite=overwrite, notes=notes)


def _hf_folder(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    shards: list[list[str]],
    total: int,
    *,
    overwrite: bool,
    notes: list[str],
) -> ExportInfo:
    entry = LOCAL.info(str(folder))
    if entry is not None and entry.kind != "dir":
        raise UnsupportedPathError(
            f"'{folder}' is not a directory: name a directory, or a file ending in .safetensors",
            path=str(folder),
        )
    LOCAL.makedirs(str(folder))
    ours = {e.name for e in LOCAL.list(str(folder))}
    ours = {n for n in ours if n in (HF_SINGLE, HF_INDEX) or _HF_SHARD.fullmatch(n)}
    if ours and not overwrite:
        raise CheckpointExistsError(
            folder,
            f"it holds a model export already ({sorted(ours)[0]}); pass overwrite=True to "
            "replace it",
        )
    n = len(shards)
    names = (
        [HF_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    if HF_INDEX in ours:
        # Shards are replaced one by one under the same names: the old index, left while
        # they are, would name tensors the new ones do not hold. Without it a reader sees
        # the old single file or no model, never a mix; the new index comes last.
        LOCAL.remove_file(str(folder / HF_INDEX))
        ours.discard(HF_INDEX)
    written: list[str] = []
    size = 0
    for name, keys in zip(names, shards, strict=True):
        size += publish_file(
            folder / name,
            functools.partial(_st_write, {k: tensors[k] for k in keys}, metadata),
            overwrite=True,
        )
        written.append(name)
    if n > 1:  # the index last: a reader finding it finds every shard it names
        index = {
            "metadata": {
                "total_size": total,
                **{k: v for k, v in metadata.items() if k.startswith("aptckpt.")},
            },
            "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys},
        }
        text = json.dumps(index, indent=2, sort_keys=False).encode()

        def write_index(p: Path) -> None:
            p.write_bytes(text)

        size += publish_file(folder / HF_INDEX, write_index, overwrite=True)
        written.append(HF_INDEX)
    for stale in sorted(ours - set(written)):  # an earlier export's other layout
        LOCAL.remove_file(str(folder / stale))
    return ExportInfo(
        str(folder), "safetensors", len(tensors), size, tuple(written), 0.0, tuple(notes)
    )


# ------------------------------------------------------------------ DCP


def _dcp_notes(state: Any) -> list[str]:
    """Refuse what DCP would write but not read back safely; say what it changes."""
    notes: list[str] = []
    names = list(_dotted(state))
    tensors = [v for _, v in names if isinstance(v, torch.Tensor)]
    if len({id(t) for t in tensors}) < len(tensors):
        notes.append("tied tensors are stored once per name (DCP keeps no ties)")
    if any("[" in name for name, _ in names):
        notes.append("non-string dict keys become strings (DCP keys are strings)")
    empty = [name for name, value in names if isinstance(value, Mapping) and not value]
    if empty:
        notes.append(
            f"empty dicts are not kept (DCP stores none): {', '.join(map(repr, empty[:3]))}"
            + ("..." if len(empty) > 3 else "")
        )
    for name, value in names:
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.is_quantized:
                raise UnsupportedObjectError(
                    f"cannot export to DCP: '{name}' is a sparse or quantized tensor; export to "
                    "'torch-file', which keeps it",
                    key_path=name,
                    type_name="torch.Tensor",
                )
            continue
        buffer = io.BytesIO()
        try:
            torch.save(value, buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception as err:
            raise UnsupportedObjectError(
                f"cannot export to DCP: '{name}' ({type(value).__name__}) would not load back "
                f"with torch.load(weights_only=True) ({err}); export to an aptckpt checkpoint",
                key_path=name,
                type_name=type(value).__name__,
            ) from err
    return notes


def _dcp(state: Any, dst: Path, *, overwrite: bool) -> ExportInfo:
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    if not isinstance(state, Mapping):
        raise UnsupportedObjectError(
            f"cannot export to DCP: the state is a {type(state).__name__}; DCP saves a dict",
            key_path="state",
            type_name=type(state).__name__,
        )
    notes = _dcp_notes(state)
    # DCP writes what it is given in place: its planner flattens a shallow copy of the
    # state, and detached CPU tensors keep the caller's objects untouched.
    plain = _detached(state)
    count = sum(1 for _, v in _dotted(plain) if isinstance(v, torch.Tensor))

    def write(folder: Path) -> None:
        writer = FileSystemWriter(str(folder), single_file_per_rank=True, sync_files=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is not initialized": intended
            try:
                dcp_save(plain, storage_writer=writer, no_dist=True)
            except CheckpointException as wrapped:
                # A BaseException (past every `except Exception`): raise what failed.
                failures = [  # per rank: (exception, stack) or the exception
                    f[0] if isinstance(f, tuple) else f
                    for f in getattr(wrapped, "failures", {}).values()
                ]
                err = failures[0] if failures and isinstance(failures[0], Exception) else None
                if err is None:
                    raise RuntimeError(f"torch.distributed.checkpoint failed: {wrapped}") from None
                found = re.fullmatch(r"duplicated flatten key (.+)", str(err))
                if found is None:
                    raise err from None
                key = found.group(1)
                raise UnsupportedObjectError(
                    f"cannot export to DCP: two values are named '{key}' once their keys are "
                    "joined with dots (DCP's names); rename one, or export to 'torch-file'",
                    key_path=key,
                    type_name="dict",
                ) from err

    size = publish_dir(dst, write, overwrite=overwrite)
    files = tuple(sorted(e.name for e in LOCAL.list(str(dst)) if e.kind == "file"))
    return ExportInfo(str(dst), "dcp", count, size, files, 0.0, tuple(notes))


def _detached(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.cpu() if t.device.type != "cpu" else t
    if isinstance(obj, Mapping):
        out = {k if isinstance(k, str) else str(k): _detached(v) for k, v in obj.items()}
        if len(out) < len(obj):
            raise UnsupportedObjectError(
                f"cannot export to DCP: the keys {sorted(map(repr, obj))[:4]} spell alike as "
                "strings, and DCP keys are strings",
                key_path="state",
                type_name="dict",
            )
        return out
    if isinstance(obj, list):
        return [_detached(v) for v in obj]
    return obj


# ------------------------------------------------------------------ entry


def check_apart(src: str, dst: Path) -> None:
    """Refuse a destination that is the source, lies inside it or holds it: an export
    with ``overwrite`` replaces its destination (a checkpoint converted onto itself, or
    the run directory above it, was deleted), and one inside a checkpoint adds files to
    it."""
    a, b = os.path.realpath(src), os.path.realpath(dst)
    if a == b or b.startswith(a.rstrip(os.sep) + os.sep) or a.startswith(b.rstrip(os.sep) + os.sep):
        what = "is" if a == b else "lies inside" if len(b) > len(a) else "holds"
        raise CheckpointExistsError(
            dst, f"it {what} the checkpoint being exported ('{src}'); choose another path"
        )


def export(
    state: Any,
    dst: Path,
    *,
    to: str,
    overwrite: bool,
    provenance: dict[str, str],
    select: str | tuple[Any, ...] | None = None,
    max_shard_size: int | str | None = None,
) -> ExportInfo:
    """Write ``state`` (or its ``select`` part) to ``dst`` in the format ``to``."""
    start = time.perf_counter()
    part, notes = _select(state, select, to)
    if max_shard_size is not None and to != "safetensors":
        raise ValueError(f"max_shard_size applies to to='safetensors', not to={to!r}")
    if to == "torch-file":
        info = _torch_file(part, dst, overwrite=overwrite)
    elif to == "safetensors":
        limit = parse_size(max_shard_size) if max_shard_size is not None else None
        info = _safetensors(
            part, dst, overwrite=overwrite, provenance=provenance, max_shard_size=limit
        )
    elif to == "dcp":
        info = _dcp(part, dst, overwrite=overwrite)
    else:
        raise ValueError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    return ExportInfo(
        info.path,
        info.format,
        info.tensors,
        info.bytes,
        info.files,
        time.perf_counter() - start,
        tuple(notes) + info.notes,
    )
