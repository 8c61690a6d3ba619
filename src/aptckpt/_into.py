"""``load(..., into=...)``: which existing tensor each saved value fills, checked before any read.

The semantics are those of ``Module.load_state_dict``, which PyTorch users know:

* Destinations and saved values are matched by key path. ``into`` is a tensor, a numpy
  array, an ``nn.Module`` (its ``state_dict(keep_vars=True)``; for a ``torch.compile``d or
  ``DistributedDataParallel`` wrapper, the keys match with or without the wrapper's prefix)
  or any nesting of dicts, lists and tuples of those. Plain values in ``into`` are ignored.
* ``strict=True`` (the default): a saved tensor with no destination (*unexpected*) or a
  destination with no saved tensor (*missing*) is an error listing both, with a hint when the
  keys differ by a prefix (``module.``, ``_orig_mod.``, or a checkpoint holding the model under
  ``"model"``). ``strict=False`` fills what matches and reports the rest.
* Every matched pair must agree in kind, dtype and shape; every mismatch is named, and a
  ``meta`` destination (no memory) is refused, all before a byte is read.
* Tied weights either way: one saved tensor reaching several destinations fills each of them;
  several saved tensors aimed at one destination (an untied checkpoint loaded into a tied
  model) are copied into it one after the other in the checkpoint's order -- the last wins, as
  with ``load_state_dict`` -- and never decoded into it concurrently.

A destination is decoded into directly (no second copy) only when it is a contiguous CPU
tensor that no other saved tensor aims at and whose memory overlaps no other destination;
every other one is filled by one ``copy_`` after the read.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aptckpt import _composite, _dtypes, tree
from aptckpt import manifest as mf
from aptckpt._composite import COMPOSITE_TAGS
from aptckpt.errors import IntoMismatchError

__all__ = ["IntoPlan", "fill_composites", "plan"]

#: How many keys an error message lists before "and N more".
_SHOWN = 8


@dataclass
class IntoPlan:
    """Where the saved values of one checkpoint go.

    Attributes:
        direct: per saved tensor, the destination it is decoded straight into (or None).
        copies: per saved tensor, the destinations filled from it after the read.
        composite: key path -> destination, for values stored as composite nodes (sparse,
            quantized and expanded tensors, numpy arrays), filled from the rebuilt value.
        missing: destinations no saved value fills (``strict=False`` only).
        unexpected: saved values no destination takes (``strict=False`` only).
    """

    direct: list[torch.Tensor | None]
    copies: list[list[Any]]
    composite: dict[str, Any] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


def _wrapper_prefix(module: torch.nn.Module) -> str:
    """The key prefix a wrapper adds to its module's keys: ``torch.compile``'s OptimizedModule
    holds the model as ``_orig_mod``, DataParallel and DistributedDataParallel as ``module``
    (nested wrappers add both)."""
    prefix = ""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            prefix, module = prefix + "_orig_mod.", inner
        elif isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            prefix, module = prefix + "module.", module.module
        else:
            return prefix


def destinations(into: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Every destination of ``into`` by key path (tensors and numpy arrays), and for those of
    a wrapped module (compiled, DDP) the path its key has without the wrapper's prefix: a
    checkpoint of the bare model fills a compiled one, and one of the compiled model too."""
    found: dict[str, Any] = {}
    bare: dict[str, str] = {}
    stack: list[tuple[Any, str]] = [(into, "state")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, torch.nn.Module):
            prefix = _wrapper_prefix(node)
            state = node.state_dict(keep_vars=True)
            if prefix:
                for key in state:
                    if isinstance(key, str) and key.startswith(prefix):
                        bare[tree.child_path(path, key)] = tree.child_path(
                            path, key.removeprefix(prefix)
                        )
            node = state
        if isinstance(node, (torch.Tensor, np.ndarray)):
            found.setdefault(path, node)
        elif isinstance(node, Mapping):
            stack.extend(
                (value, tree.child_path(path, key)) for key, value in list(node.items())[::-1]
            )
        elif isinstance(node, (list, tuple)):
            stack.extend((v, tree.child_path(path, i)) for i, v in reversed(list(enumerate(node))))
        elif callable(getattr(node, "state_dict", None)):
            name = type(node).__name__
            raise IntoMismatchError(
                f"into: {path} is a {name}, whose state is not a set of tensors to fill in place "
                f"(its state_dict() returns new objects); load without it and call "
                f"{name.lower()}.load_state_dict(state[...]) on what load() returns",
                missing=(),
                unexpected=(),
            )
    return found, bare


@dataclass(frozen=True)
class _Saved:
    """A saved value a destination may take: a tensor (``index``) or a composite node."""

    path: str
    index: int | None
    node: list[Any] | None = None


def _saved_values(manifest: mf.Manifest) -> dict[str, _Saved]:
    count = len(manifest.tensors)
    found: dict[str, _Saved] = {}
    for node, path, inside in tree.walk(manifest.skeleton):
        if inside:
            continue
        if node[0] in COMPOSITE_TAGS and node[0] not in ("bytes", "str"):
            found.setdefault(path, _Saved(path, None, node))
            continue
        index = tree.tensor_index(node, count)
        if index is not None:
            found.setdefault(path, _Saved(path, index))
    return found


def _unwritable(dest: Any) -> str | None:
    """Why ``dest`` cannot be filled in place, if it cannot."""
    if isinstance(dest, np.ndarray):
        return None if dest.flags.writeable else "is a read-only numpy array"
    if dest.device.type == "meta":
        return (
            "is a meta tensor, which has no memory to fill: materialise the module first "
            "(module.to_empty(device='cpu')), or load without into= and call "
            "load_state_dict(state, assign=True)"
        )
    if dest.is_inference() and not torch.is_inference_mode_enabled():
        return (
            "is an inference tensor (made under torch.inference_mode()), which cannot be "
            "written outside it: create the model outside inference mode"
        )
    if _composite.is_expanded(dest):
        return "repeats its elements through a zero stride (an expanded view): pass a real tensor"
    return None


def _describe(dest: Any) -> tuple[str, str, tuple[int, ...]]:
    if isinstance(dest, np.ndarray):
        return "array", dest.dtype.name, tuple(dest.shape)
    return (
        "tensor",
        _dtypes.dtype_name(dest.dtype)
        if _dtypes.is_supported(dest.dtype)
        else str(dest.dtype).removeprefix("torch."),
        tuple(dest.shape),
    )


def _expected(saved: _Saved, manifest: mf.Manifest) -> tuple[str, str, tuple[int, ...]] | None:
    """Kind, dtype and shape a destination of ``saved`` must have (None: not checked)."""
    if saved.index is not None:
        record = manifest.tensors[saved.index]
        return "tensor", record.dtype, record.shape
    node = saved.node
    assert node is not None
    parts = [tree.tensor_index(c, len(manifest.tensors)) for c in node[1]]
    first = manifest.tensors[parts[0]] if parts and parts[0] is not None else None
    if first is None:
        return None
    if node[0] == "ndarray":
        if isinstance(node[2], list) and len(node[2]) == 2:  # broadcast: [dtype, shape]
            return "array", str(node[2][0]), tuple(node[2][1])
        return "array", str(node[2]), first.shape
    if node[0] == "expand" and isinstance(node[2], list):
        return "tensor", first.dtype, tuple(node[2])
    return None  # sparse and quantized: checked by copy_ after the read


def plan(into: Any, manifest: mf.Manifest, *, strict: bool) -> IntoPlan:
    """Match ``into``'s destinations with the saved values of ``manifest``; see the module
    docstring.

    Raises:
        IntoMismatchError: (before anything is read) keys that do not match with
            ``strict=True``, kinds, dtypes or shapes that differ, or ``meta`` destinations.
    """
    found, bare = destinations(into)
    saved = _saved_values(manifest)
    # A wrapped module's destinations match the saved keys with or without its prefix:
    # whichever spelling the checkpoint has.
    dests = {
        (bare[path] if path not in saved and bare.get(path) in saved else path): dest
        for path, dest in found.items()
    }
    missing = tuple(p for p in dests if p not in saved)
    unexpected = tuple(p for p in saved if p not in dests)
    if strict and (missing or unexpected):
        raise IntoMismatchError(
            _keys_message(missing, unexpected), missing=missing, unexpected=unexpected
        )
    problems = []
    for path, dest in dests.items():
        value = saved.get(path)
        if value is None:
            continue
        unwritable = _unwritable(dest)
        if unwritable is not None:
            problems.append(f"{path} {unwritable}")
            continue
        want = _expected(value, manifest)
        have = _describe(dest)
        if want is not None and want != have:
            problems.append(
                f"{path} is a {have[0]} of {have[1]} {have[2]}, but the checkpoint holds a "
                f"{want[0]} of {want[1]} {want[2]} there"
            )
    if problems:
        shown = "; ".join(problems[:_SHOWN])
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise IntoMismatchError(
            f"into: {shown}{more}; nothing was read", missing=missing, unexpected=unexpected
        )
    return _assign(dests, saved, manifest, missing, unexpected)


def _assign(
    dests: dict[str, Any],
    saved: dict[str, _Saved],
    manifest: mf.Manifest,
    missing: tuple[str, ...],
    unexpected: tuple[str, ...],
) -> IntoPlan:
    count = len(manifest.tensors)
    copies: list[list[Any]] = [[] for _ in range(count)]
    composite: dict[str, Any] = {}
    aimed: dict[int, set[int]] = {}  # id(destination) -> saved tensors aimed at it
    for path, dest in dests.items():
        value = saved.get(path)
        if value is None:
            continue
        if value.index is None:
            composite[path] = dest
            continue
        if all(d is not dest for d in copies[value.index]):
            copies[value.index].append(dest)
        aimed.setdefault(id(dest), set()).add(value.index)
    overlapping = _overlapping([d for row in copies for d in row])
    direct: list[torch.Tensor | None] = [None] * count
    for index, row in enumerate(copies):
        for dest in row:
            if (
                type(dest) in (torch.Tensor, torch.nn.Parameter)
                and dest.device.type == "cpu"
                and _dtypes.holds_its_values(dest)
                and len(aimed[id(dest)]) == 1
                and id(dest) not in overlapping
            ):
                direct[index] = dest  # the caller decodes into dest.detach()
                row.remove(dest)  # filled by the read itself
                break
    return IntoPlan(direct, copies, composite, missing, unexpected)


def _overlapping(dests: list[Any]) -> set[int]:
    """ids of the distinct destinations whose memory overlaps another's (views of one
    storage that are not one tensor): those are never decoded into concurrently."""
    spans: list[tuple[int, int, int, int]] = []  # storage, start, stop, id
    seen: set[int] = set()
    for dest in dests:
        if (
            id(dest) in seen
            or type(dest) not in (torch.Tensor, torch.nn.Parameter)  # a DTensor: its shard
            or dest.numel() == 0
        ):
            continue
        seen.add(id(dest))
        start = dest.data_ptr()
        extent = sum(
            (size - 1) * abs(stride) for size, stride in zip(dest.shape, dest.stride(), strict=True)
        )
        stop = start + (extent + 1) * dest.element_size()
        spans.append((dest.untyped_storage().data_ptr(), start, stop, id(dest)))
    spans.sort()
    overlapping: set[int] = set()
    # A sweep over each storage's spans by start: every span still open when the next one
    # starts overlaps it (not only the neighbour: a long span covers many later ones).
    open_spans: list[tuple[int, int]] = []  # heap of (stop, id)
    current = None
    for storage, start, stop, ident in spans:
        if storage != current:
            current, open_spans = storage, []
        while open_spans and open_spans[0][0] <= start:
            heapq.heappop(open_spans)
        if open_spans:
            overlapping.add(ident)
            overlapping.update(i for _, i in open_spans)
        heapq.heappush(open_spans, (stop, ident))
    return overlapping


def fill_composites(plan: IntoPlan, state: Any) -> None:
    """Copy the rebuilt composite values of ``state`` into their destinations."""
    if not plan.composite:
        return
    stack: list[tuple[Any, str]] = [(state, "state")]
    while stack:
        node, path = stack.pop()
        dest = plan.composite.get(path)
        if dest is not None:
            _copy(dest, node, path)
        elif isinstance(node, Mapping):
            stack.extend((v, tree.child_path(path, k)) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, tree.child_path(path, i)) for i, v in enumerate(node))


def _copy(dest: Any, value: Any, path: str) -> None:
    try:
        if isinstance(dest, np.ndarray):
            np.copyto(dest, value, casting="no")
        else:
            with torch.no_grad():
                dest.copy_(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise IntoMismatchError(
            f"into: {path} cannot take the saved {type(value).__name__} ({err})",
            missing=(),
            unexpected=(),
        ) from err


def _keys_message(missing: tuple[str, ...], unexpected: tuple[str, ...]) -> str:
    parts = ["into: the checkpoint's tensors do not match the destinations (strict=True)"]
    for name, keys in (("missing (no saved tensor)", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:_SHOWN]) + (
                f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
            )
            parts.append(f"{name}: {shown}")
    hint = _prefix_hint(missing, unexpected)
    parts.append(hint or "pass strict=False to fill only the destinations that match")
    return "; ".join(parts)


def _prefix_hint(missing: tuple[str, ...], unexpected: tuple[str, ...]) -> str | None:
    """A hint when the saved keys are the destinations' under a prefix, or the reverse."""
    if not missing or not unexpected:
        return None
    wanted = set(missing)
    for prefix in ("module.", "_orig_mod."):
        stripped = {p.replace("state['" + prefix, "state['", 1) for p in unexpected}
        if stripped == wanted:
            origin = "DistributedDataParallel" if prefix == "module." else "torch.compile"
            return (
                f"every saved key starts with '{prefix}' (saved from a {origin} wrapper): save "
                f"the wrapped module's state_dict, or strip the prefix before loading"
            )
    for saved in unexpected:
        head = saved[: saved.find("]") + 1] if "]" in saved else ""
        if head and {p.replace(head, "state", 1) for p in unexpected if p.startswith(head)} >= (
            wanted
        ):
            key = head.removeprefix("state")
            return (
                f"the checkpoint holds these tensors under {key}: pass into={{{key[1:-1]}: ...}}"
                " (e.g. into={'model': model}) to fill them"
            )
    return None
