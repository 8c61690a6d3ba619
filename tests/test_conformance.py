"""Every built-in backend (and option set) passes the shipped conformance suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import aptckpt
from aptckpt import _dtypes
from aptckpt.testing.conformance import BackendConformance


class TestTorchBackend(BackendConformance):
    backend = "torch"
    stores_empty_bytes = False


class TestZstdBackend(BackendConformance):
    backend = "zstd"


class TestZstdRaw(BackendConformance):
    backend = "zstd"
    options = {"codec": "none"}


class TestZstdTinyChunksAndShards(BackendConformance):
    """Chunks of 32 bytes and 100-byte shards: many chunks per tensor, many shards."""

    backend = "zstd"
    options = {"chunk_size": 32, "shard_size": 100, "level": 3}


class TestTorchTinyChunks(BackendConformance):
    backend = "torch"
    stores_empty_bytes = False
    options = {"chunk_size": 64}


class TestDeltaBackend(BackendConformance):
    backend = "delta"


class TestDeltaTinyChunks(BackendConformance):
    """Chunks of 32 bytes and a keyframe every other save."""

    backend = "delta"
    options = {"chunk_size": 32, "keyframe_every": 2, "level": 3}


class TestDeltaOverPreviousVersion(BackendConformance):
    """Every state is saved as a delta against a version of it with every byte changed
    in a few places, so that every dtype, layout and container goes through xor chains."""

    backend = "delta"
    options = {"chunk_size": 64, "keyframe_every": 4}

    def roundtrip(self, state: Any, path: Path, **kwargs: Any) -> Any:
        for step in range(3):
            previous = _perturbed(state, step)
            aptckpt.save(
                previous, path.parent / f"prev-{step}", backend=self.backend, **self.options
            )
        return super().roundtrip(state, path, **kwargs)


def _perturbed(state: Any, step: int) -> Any:
    """``state`` with some bytes of every tensor flipped (same dtypes and shapes)."""
    if isinstance(state, torch.Tensor):
        t = state.detach().resolve_conj().resolve_neg().clone().contiguous()
        raw = _dtypes.byte_view(t)
        for i in range(step % 7, len(raw), 7):
            raw[i] ^= 0x5A
        return t
    if isinstance(state, dict):
        return type(state)((k, _perturbed(v, step)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(_perturbed(v, step) for v in state)
    return state
