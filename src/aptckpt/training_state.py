"""The training state a checkpoint of a :class:`~aptckpt.CheckpointManager` holds
besides tensors, captured at a save and checked on resume.

Random-number generators: a run resumed from a checkpoint continues
bit-identically only if every random stream the training loop draws from is
where it was: Python's ``random``, NumPy's global generator, torch's CPU
generator and, when present, every CUDA device's generator. :func:`capture_rng`
returns them as a storable state (tensors and plain values only);
:func:`restore_rng` puts them back, after checking all of it.

Counters, metrics and tokenizer files: :func:`count`, :func:`plain_metrics` and
:func:`tokenizer_files` check what a trainer passes to a save;
:func:`resume_info` checks what a loaded checkpoint says, before anything is
restored from it.
"""

from __future__ import annotations

import operator
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aptckpt.errors import FormatError, InvalidNameError

__all__ = [
    "ResumeInfo",
    "capture_rng",
    "count",
    "plain_metrics",
    "restore_rng",
    "resume_info",
    "tokenizer_files",
]

#: The largest counter (step, epoch, batch, sequence number) a run records: int64.
MAX_COUNT = 2**63 - 1
#: The longest file name (bytes) of the file systems aptckpt runs on.
_NAME_MAX = 255
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ResumeInfo:
    """What :meth:`CheckpointManager.load_checkpoint` found besides the tensors."""

    path: Path
    epoch: int
    global_step: int
    batch_index: int | None
    temporary: bool
    loss_history: list[Any]
    metrics: dict[str, Any]
    config: Any
    tokenizer_files: dict[str, bytes] | None
    extra: Any


def count(value: Any, what: str) -> int:
    """``value`` as a non-negative int (numpy and torch integers too; not bools).

    Raises:
        ValueError: it is not one, naming ``what``.
    """
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            pass
        else:
            if 0 <= number <= MAX_COUNT:
                return number
    raise ValueError(f"{what} must be a non-negative int, got {value!r}")


def is_scalar(value: Any) -> bool:
    """A metric value a run records exactly (in manifests and the JSON index):
    None, bool, int, float or str."""
    return value is None or type(value) in (bool, int, float, str)


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The metrics as plain scalars (0-dim tensors and numpy scalars unwrapped).

    Raises:
        ValueError: a metric is not a scalar (a list, a multi-element tensor).
    """
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if hasattr(value, "item") and callable(value.item):
            try:
                value = value.item()  # a 0-dim tensor or a numpy scalar
            except (ValueError, RuntimeError) as err:
                raise ValueError(
                    f"metric {key!r} holds several values ({err}); a metric is one number: "
                    "reduce it (e.g. .mean()), or keep the values in extra="
                ) from err
        if not is_scalar(value):
            raise ValueError(
                f"metric {key!r} is a {type(value).__name__}; metrics are numbers, strings, "
                "bools or None (keep other values in extra= or the saved state)"
            )
        out[str(key)] = value
    return out


def tokenizer_files(tokenizer: Any) -> dict[str, bytes] | None:
    """The files of a tokenizer: ``.files()``, or a mapping of name -> bytes/str."""
    if tokenizer is None:
        return None
    files = tokenizer.files() if hasattr(tokenizer, "files") else tokenizer
    if not isinstance(files, Mapping):
        raise TypeError(
            "tokenizer must have a files() method returning {name: bytes}, or be such a mapping; "
            f"got {type(tokenizer).__name__}"
        )
    out = {}
    for name, data in files.items():
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
            raise ValueError(f"tokenizer file name {name!r} must be a plain file name")
        if len(os.fsencode(name)) > _NAME_MAX:
            raise InvalidNameError(
                f"tokenizer file name {name[:40]!r}... is {len(os.fsencode(name))} bytes, more "
                f"than a file name may have ({_NAME_MAX}); rename it. Nothing was saved"
            )
        out[name] = data.encode() if isinstance(data, str) else bytes(data)
    return out


def resume_info(path: Path | str, state: dict[str, Any], *, temporary: bool) -> ResumeInfo:
    """What a loaded checkpoint's state says besides its tensors, checked: a state
    altered by hand (or saved by something else) gives a clear error, not a crash
    once half of it is restored.

    Raises:
        FormatError: a counter, the loss history or the metrics are malformed.
    """

    def bad(key: str) -> FormatError:
        return FormatError(
            f"checkpoint '{path}' has a malformed {key!r} ({state.get(key)!r:.100}); it was "
            "altered, or not saved by a CheckpointManager; load it with aptckpt.load()",
            path=str(path),
        )

    def counter(key: str, optional: bool = False) -> Any:
        value = state.get(key)
        if (value is None and optional) or (type(value) is int and value >= 0):
            return value
        raise bad(key)

    history = state.get("loss_history") or []
    metrics = state.get("metrics") or {}
    tokenizer = state.get("tokenizer")
    if not isinstance(history, list | tuple):
        raise bad("loss_history")
    if not isinstance(metrics, dict):
        raise bad("metrics")
    return ResumeInfo(
        path=Path(os.path.abspath(path)),
        epoch=counter("epoch") if "epoch" in state else 0,
        global_step=counter("global_step"),
        batch_index=counter("batch_index", optional=True),
        temporary=temporary,
        loss_history=list(history),
        metrics=dict(metrics),
        config=state.get("config"),
        tokenizer_files=dict(tokenizer) if isinstance(tokenizer, dict) else None,
        extra=state.get("extra"),
    )


def capture_rng() -> dict[str, Any]:
    """Every global RNG state, storable by :func:`aptckpt.save`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint32).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured.

    CUDA states are restored when this machine has at least as many devices as
    the one that saved them; otherwise they are skipped (a run moved from a GPU
    machine to a CPU one still resumes, without bit-exactness of GPU streams).

    Raises:
        FormatError: ``state`` is not what :func:`capture_rng` returns (a
            checkpoint altered, or saved by something else); no generator is
            changed then.
    """
    try:
        python = state["python"]
        python_state = (python[0], tuple(python[1]), python[2])
        n = state["numpy"]
        numpy_state = (n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"])
        torch_state = state["torch"].cpu()
        cuda = state.get("cuda") or []
        cuda_states = [t.cpu() for t in cuda]
        # Checked on throwaway generators first, so that a bad part changes nothing.
        random.Random().setstate(python_state)
        np.random.RandomState().set_state(numpy_state)
        torch.Generator().set_state(torch_state)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise FormatError(
            f"the checkpoint's RNG state is malformed ({type(err).__name__}: {err}); it was "
            "altered or not saved by a CheckpointManager. Resume without it: "
            "load_checkpoint(..., restore_rng=False)"
        ) from err
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda_states):
        torch.cuda.set_rng_state_all(cuda_states)
