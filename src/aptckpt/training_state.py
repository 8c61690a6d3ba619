"""Random-number-generator state: capture it at a checkpoint, restore it on resume.

A run resumed from a checkpoint continues bit-identically only if every random
stream the training loop draws from is where it was: Python's ``random``,
NumPy's global generator, torch's CPU generator and, when present, every CUDA
device's generator. :func:`capture_rng` returns them as a storable state
(tensors and plain values only); :func:`restore_rng` puts them back.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from aptckpt.errors import FormatError

__all__ = ["capture_rng", "restore_rng"]


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
