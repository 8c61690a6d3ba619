"""Every built-in backend (and option set) passes the shipped conformance suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt import _dtypes
from aptckpt.backends.zstd import ZstdBackend
from aptckpt.testing import check_backend
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

    def roundtrip(self, state: Any, path: str | Path, **kwargs: Any) -> Any:
        parent = str(path).rstrip("/").rpartition("/")[0]
        for step in range(3):
            self.save(_perturbed(state, step), f"{parent}/prev-{step}")
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


# ---------------------------------------------------------------- check_backend


class PluginZstd(ZstdBackend):
    """A plugin as a third party would write it: a class, not yet registered."""

    name = "plugin_zstd"


class ZeroingBackend(ZstdBackend):
    """Broken on purpose: every tensor loads as zeros."""

    name = "zeroing"

    def read_into(self, reader, manifest, into, *, verify=True):
        tensors = super().read_into(reader, manifest, into, verify=verify)
        return [t.zero_() if t.numel() else t for t in tensors]


def test_check_backend_runs_the_suite_on_a_plugin_class():
    passed = check_backend(PluginZstd)
    expected = sorted(n for n in dir(BackendConformance) if n.startswith("test_"))
    assert list(passed) == expected and "test_special_values_roundtrip" in passed
    assert "plugin_zstd" not in aptckpt.available_backends()  # registered only meanwhile


def test_check_backend_names_every_failing_test():
    with pytest.raises(AssertionError) as info:
        check_backend(ZeroingBackend)
    message = str(info.value)
    assert message.startswith("backend 'zeroing' failed ")
    for name in ("test_special_values_roundtrip", "test_optimizer_state_roundtrip"):
        assert f"\n{name}: AssertionError: " in message
    assert "test_overwrite_is_explicit" not in message  # holds no tensors: passes
    assert "zeroing" not in aptckpt.available_backends()


def test_check_backend_refuses_what_it_cannot_check():
    with pytest.raises(aptckpt.UnknownBackendError, match="unknown backend 'nope'"):
        check_backend("nope")

    class Impostor(ZstdBackend):
        name = "zstd"

    with pytest.raises(aptckpt.BackendError, match="another class is registered as backend"):
        check_backend(Impostor)
