"""Checkpoints of other libraries that :func:`aptckpt.convert` imports.

* a ``torch.save`` file, read with ``torch.load(weights_only=True)`` (never a full unpickle:
  a file holding Python objects beyond tensors and containers is refused, naming why);
* a safetensors file (its ``__metadata__`` becomes the checkpoint's metadata);
* a Hugging Face sharded safetensors directory (``model.safetensors.index.json`` and the
  shard files its ``weight_map`` names, inside that directory);
* a torch.distributed.checkpoint directory, read without running its pickles (see
  :mod:`aptckpt._dcp`: an allowlist of the classes DCP's ``.metadata`` names, items read
  with ``weights_only=True``); what cannot be read that way is refused, naming torch's
  own converter.

Names that a safetensors file records as ties the way safetensors' ``save_model`` and
aptckpt's export do (``__metadata__`` entry ``{dropped: kept}``, the dropped name no tensor
of the files, the kept one a tensor) come back as the same tensor object: tied.

Only local paths are imported; links are followed (a Hugging Face cache links its
snapshot's files to blobs). The files are read by the libraries that write them
(``torch.load``, ``safetensors``); what aptckpt looks at itself goes through the storage
layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from aptckpt import manifest as mf
from aptckpt._dcp import read_dcp
from aptckpt.errors import FormatError, UnsupportedObjectError
from aptckpt.storage import LOCAL

__all__ = ["detect", "read"]

HF_INDEX = "model.safetensors.index.json"
_SAFETENSORS_HEADER_LIMIT = 100 << 20


def _is_safetensors(path: str) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    try:
        head = LOCAL.read_range(path, 0, 9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= _SAFETENSORS_HEADER_LIMIT and head[8:9] == b"{"


def detect(path: str | os.PathLike[str]) -> str | None:
    """What foreign checkpoint ``path`` is (``"torch"``, ``"safetensors"``,
    ``"hf-sharded"``, ``"dcp"``), or None (an aptckpt checkpoint, or nothing known)."""
    real = os.path.realpath(path)
    entry = LOCAL.info(real)
    if entry is None:
        return None
    if entry.kind == "dir":
        names = {e.name: e.kind for e in LOCAL.list(real)}
        if mf.MANIFEST_NAME in names:
            return None
        if HF_INDEX in names:
            return "hf-sharded"
        if names.get(".metadata") == "file" and any(n.endswith(".distcp") for n in names):
            return "dcp"
        return None
    if entry.kind != "file":
        return None
    if _is_safetensors(real):
        return "safetensors"
    zipped = LOCAL.read_range(real, 0, 4) == b"PK\x03\x04"  # torch.save's zip format
    if zipped or Path(real).suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "torch"
    return None


def read(path: str | os.PathLike[str], kind: str) -> tuple[Any, dict[str, Any] | None]:
    """The state held by the foreign checkpoint at ``path``, and metadata to record."""
    p = Path(path)
    if kind == "torch":
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UnsupportedObjectError(
                f"cannot import '{p}': torch.load(weights_only=True) refused it ({err}). It "
                "holds Python objects beyond tensors and plain containers, which aptckpt never "
                "unpickles; load it yourself in a trusted environment and aptckpt.save() the "
                "parts you need",
                key_path="state",
                type_name="torch.save file",
            ) from err
        return state, {"imported_from": "torch.save"}
    if kind == "safetensors":
        tensors = _safetensors(p)  # validates the file first
        found = _safetensors_metadata(p)
        state = _tie(tensors, found.get("safetensors_metadata", {}))
        return state, {"imported_from": "safetensors", **found}
    if kind == "hf-sharded":
        return _hf_sharded(p), {"imported_from": "huggingface sharded safetensors"}
    if kind == "dcp":
        return read_dcp(p)
    raise ValueError(f"unknown foreign checkpoint kind {kind!r}")


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as err:
        raise FormatError(
            f"cannot import '{path}': not a valid safetensors file ({err})", path=str(path)
        ) from err


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        found = f.metadata() or {}
    return {"safetensors_metadata": dict(found)} if found else {}


def _tie(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Restore the ties recorded as ``{dropped: kept}`` metadata entries."""
    ties = {
        k: v
        for k, v in metadata.items()
        if isinstance(k, str)
        and isinstance(v, str)
        and k not in state
        and v in state
        and k != "format"  # safetensors' own key, and aptckpt's provenance: never ties
        and not k.startswith("aptckpt.")
    }
    for dropped, kept in ties.items():
        state[dropped] = state[kept]
    return state


def _hf_sharded(folder: Path) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(LOCAL.read_file(os.path.realpath(folder / HF_INDEX), limit=64 << 20))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        odd = [v for v in weight_map.values() if not isinstance(v, str)]
        if odd:
            raise TypeError(f"weight_map names a shard {odd[0]!r}, not a file name")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FormatError(
            f"cannot import '{folder}': bad {HF_INDEX} ({err})", path=str(folder)
        ) from err
    state: dict[str, torch.Tensor] = {}
    recorded: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        mf.check_relative_path(shard, where=str(folder))  # inside the folder, no links out
        loaded = _safetensors(folder / shard)
        # A name the index gives to another shard is read from that one (as HF does),
        # whichever shard sorts last.
        state.update({k: t for k, t in loaded.items() if weight_map.get(k, shard) == shard})
        recorded.update(_safetensors_metadata(folder / shard).get("safetensors_metadata", {}))
    state = _tie(state, recorded)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise FormatError(
            f"cannot import '{folder}': {HF_INDEX} names {len(missing)} tensors its shards "
            f"do not hold (e.g. {missing[0]!r})",
            path=str(folder),
        )
    tied = [name for name in state if name not in weight_map]
    return {name: state[name] for name in [*weight_map, *tied]}
