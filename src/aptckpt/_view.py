"""``aptckpt.open``: a checkpoint opened for lazy, partial reads (like safetensors' ``safe_open``).

The manifest is read once; nothing else until asked. :meth:`CheckpointView.get` reads one
value (a tensor, or any part of the state: its tensors only), and
:meth:`CheckpointView.get_slice` a box of a tensor: for chunked backends (``zstd``, ``delta``)
only the chunks holding the bytes from the box's first element to its last are read and
verified -- locally by ``pread``, on object storage by ranged GETs; the ``torch`` backend
reads its whole file. Checkpoints saved by a process group are read the same way, box by box
(one rank's view of its per-rank values: ``rank=``).

Keys are the key paths aptckpt prints (``state['model']['0.weight']``), a tuple of the keys
leading there (``("model", "0.weight")``), or a top-level key (``"model"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aptckpt import _dtypes, tree
from aptckpt import manifest as mf
from aptckpt._composite import COMPOSITE_TAGS
from aptckpt.backends.base import Backend
from aptckpt.distributed._boxes import Box, full_box
from aptckpt.distributed._load import as_sharded
from aptckpt.distributed._read import Target, fill
from aptckpt.storage.base import CheckpointReader

__all__ = ["CheckpointView", "TensorSlice"]


def _index(skeleton: Any, root: str = "state") -> dict[str, Any]:
    """Every node of ``skeleton`` below containers, by key path (composites are leaves)."""
    found: dict[str, Any] = {root: skeleton}
    stack: list[tuple[Any, str]] = [(skeleton, root)]
    while stack:
        node, path = stack.pop()
        if not (isinstance(node, list) and len(node) >= 2 and isinstance(node[0], str)):
            continue
        tag, items = node[0], node[1]
        if tag in COMPOSITE_TAGS or not isinstance(items, list):
            continue
        if tag in ("list", "tuple"):
            children = [(tree.child_path(path, i), v) for i, v in enumerate(items)]
        elif tag in tree.DICT_TAGS:
            children = []
            for i in range(0, len(items) - 1, 2):
                key = items[i]
                try:
                    key = tree.rebuild(key, [], every=False) if isinstance(key, list) else key
                except Exception:  # an odd key: reachable by its spelling in key_paths only
                    continue
                children.append((tree.child_path(path, key), items[i + 1]))
        else:
            continue
        for child_path, child in children:
            found.setdefault(child_path, child)
            stack.append((child, child_path))
    return found


class TensorSlice:
    """``view.get_slice(key)``: index it (``[a:b]``, ``[i]``, ``[..., j:k]``) to read that
    part of the tensor only."""

    def __init__(self, view: CheckpointView, index: int, key: str) -> None:
        self._view, self._index, self._key = view, index, key
        record = view._manifest.tensors[index]
        self.shape: tuple[int, ...] = record.shape
        self.dtype: torch.dtype = _dtypes.dtype_from_name(record.dtype)  # type: ignore[assignment]

    def get_shape(self) -> list[int]:
        """The whole tensor's shape (as safetensors' ``get_shape``)."""
        return list(self.shape)

    def __getitem__(self, item: Any) -> torch.Tensor:
        box, steps, drop = _box_of(item, self.shape, self._key)
        out = self._view._read_box(self._index, box)
        if any(step != 1 for step in steps):
            out = out[tuple(slice(None, None, step) for step in steps)]
        if drop:
            out = out.reshape([n for d, n in enumerate(out.shape) if d not in drop])
        return out


def _box_of(item: Any, shape: tuple[int, ...], key: str) -> tuple[Box, list[int], set[int]]:
    """The box a basic index selects, the steps to apply after reading it, and the
    dimensions an integer index removes."""
    items = list(item) if isinstance(item, tuple) else [item]
    if sum(1 for i in items if i is Ellipsis) > 1:
        raise IndexError(f"{key}: an index can have only one ellipsis")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    if len(items) > len(shape):
        raise IndexError(f"{key}: {len(items)} indices for a tensor of {len(shape)} dimensions")
    items += [slice(None)] * (len(shape) - len(items))
    offsets, sizes, steps, drop = [], [], [], set()
    for dim, (index, size) in enumerate(zip(items, shape, strict=True)):
        if isinstance(index, slice):
            start, stop, step = index.indices(size)
            if step < 1:
                raise IndexError(f"{key}: slices with a step below 1 are not supported")
            count = max(0, (stop - start + step - 1) // step)
            offsets.append(start)
            sizes.append(0 if count == 0 else (count - 1) * step + 1)
            steps.append(step)
        elif isinstance(index, int) and not isinstance(index, bool):
            if not -size <= index < size:
                raise IndexError(
                    f"{key}: index {index} is out of range for dimension {dim} of size {size}"
                )
            offsets.append(index % size)
            sizes.append(1)
            steps.append(1)
            drop.add(dim)
        else:
            raise TypeError(
                f"{key}: get_slice takes ints, slices and ... (basic indexing), not "
                f"{type(index).__name__}"
            )
    return Box(tuple(offsets), tuple(sizes)), steps, drop


class CheckpointView:
    """A checkpoint opened by :func:`aptckpt.open`; see the module docstring. Use it as a
    context manager (or call :meth:`close`)."""

    def __init__(
        self,
        reader: CheckpointReader,
        manifest: mf.Manifest,
        impl: Backend,
        *,
        verify: bool,
        rank: int,
    ) -> None:
        self._reader, self._impl, self._verify = reader, impl, verify
        self._manifest = as_sharded(manifest)
        self.world_size = manifest.world_size
        self._skeleton, _ = tree.select_rank(manifest.skeleton, rank)
        self._nodes = _index(self._skeleton)
        self._names = tree.key_paths(self._skeleton, len(manifest.tensors))
        self.path = reader.location
        self.backend = manifest.backend
        self.metadata = (
            tree.rebuild(manifest.metadata, []) if manifest.metadata is not None else None
        )
        self._tensor_keys = {
            path: node[1]
            for path, node in self._nodes.items()
            if isinstance(node, list) and len(node) == 2 and node[0] == "tensor"
        }

    # ------------------------------------------------------------------ keys

    def keys(self) -> list[str]:
        """The key paths of the tensors, in the state's order."""
        ordered = [
            path
            for node, path, inside in tree.walk(self._skeleton)
            if not inside and node[0] == "tensor" and path in self._tensor_keys
        ]
        return list(dict.fromkeys(ordered))

    def __contains__(self, key: object) -> bool:
        try:
            self._node(key)
        except KeyError:
            return False
        return True

    def _spell(self, key: Any) -> str:
        if isinstance(key, tuple):
            path = "state"
            for part in key:
                path = tree.child_path(path, part)
            return path
        if isinstance(key, str):
            # A key path (``state['model']``) if it is one; otherwise a top-level key,
            # which may itself start with "state" (Lightning's "state_dict").
            top = tree.child_path("state", key)
            if key == "state" or (key.startswith("state[") and top not in self._nodes):
                return key
            return top
        raise TypeError(f"a key is a key path string or a tuple of keys, not {type(key).__name__}")

    def _node(self, key: Any) -> tuple[str, Any]:
        path = self._spell(key)
        if path not in self._nodes:
            tail = path.removeprefix("state")
            close = [k for k in self._tensor_keys if tail and tail in k][:3]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise KeyError(f"{self.path} holds nothing at {path}{hint}")
        return path, self._nodes[path]

    # ------------------------------------------------------------------ reads

    def get(self, key: Any) -> Any:
        """The value at ``key``: a tensor, or any part of the state (only its tensors are
        read). Tensors come back as plain CPU tensors, every chunk read verified."""
        _, node = self._node(key)
        needed = sorted(tree.referenced(node, len(self._manifest.tensors)))
        tensors: list[Any] = [None] * len(self._manifest.tensors)
        targets = []
        for index in needed:
            record = self._manifest.tensors[index]
            tensors[index] = torch.empty(record.shape, dtype=_dtypes.dtype_from_name(record.dtype))
            targets.append(Target(index, full_box(record.shape), tensors[index]))
        fill(
            self._reader,
            self._manifest,
            self._impl,
            targets,
            verify=self._verify,
            names=self._names,
        )
        return tree.rebuild(node, tensors, every=False)

    def get_tensor(self, key: Any) -> torch.Tensor:
        """The tensor at ``key`` (as safetensors' ``get_tensor``)."""
        value = self.get(key)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{self._spell(key)} is a {type(value).__name__}, not a tensor")
        return value

    def get_slice(self, key: Any) -> TensorSlice:
        """The tensor at ``key``, to be indexed: ``view.get_slice(key)[0:128, :]`` reads that
        box only."""
        path, node = self._node(key)
        if not (isinstance(node, list) and len(node) == 2 and node[0] == "tensor"):
            raise TypeError(f"{path} is not a tensor: get_slice reads boxes of tensors")
        return TensorSlice(self, int(node[1]), path)

    def _read_box(self, index: int, box: Box) -> torch.Tensor:
        record = self._manifest.tensors[index]
        out = torch.empty(box.sizes, dtype=_dtypes.dtype_from_name(record.dtype))
        if box.volume:
            fill(
                self._reader,
                self._manifest,
                self._impl,
                [Target(index, box, out)],
                verify=self._verify,
                names=self._names,
            )
        return out

    # ------------------------------------------------------------------ life

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> CheckpointView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<aptckpt.CheckpointView {self.path!r}: {len(self._tensor_keys)} tensors>"


def subset(view: CheckpointView, keys: Sequence[Any]) -> dict[str, Any]:
    """``load(path, keys=...)``: each key's value, by its key path."""
    return {view._spell(key): view.get(key) for key in keys}
