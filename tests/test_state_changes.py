"""A tensor written by another thread while a blocking save reads it: the save fails with
StateChangedError before its commit, or commits bytes that match their digests -- never a
checkpoint that verification then calls damaged."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt.codecs import Pipeline
from aptckpt.objectstore import ObjectStore
from aptckpt.storage.local import _directio

CASES = [
    ("zstd", {"codec": "none"}),
    ("zstd", {}),
    ("delta", {}),
    ("delta", {"pack_below": 0}),
    ("torch", {}),
]
IDS = ["zstd-raw", "zstd", "delta", "delta-loose", "torch"]


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(256, 1024, generator=g), "b": torch.randn(300, generator=g)}


def _mutate_once(state: dict[str, Any]) -> Any:
    done = threading.Event()

    def mutate() -> None:
        if not done.is_set():
            done.set()
            state["w"].add_(1)  # what an optimizer step on another thread does

    return mutate


def _patch_first_read(monkeypatch, backend: str, options: dict[str, Any], mutate: Any) -> None:
    """Run ``mutate`` just after the save took its digests and before it wrote the bytes."""
    if backend == "torch" or options.get("codec") == "none":
        name = "write" if backend == "torch" else "write_many"
        original = getattr(_directio.DirectWriter, name)

        def write(self: Any, *args: Any, **kwargs: Any) -> Any:
            mutate()
            return original(self, *args, **kwargs)

        monkeypatch.setattr(_directio.DirectWriter, name, write)
    elif backend == "zstd" or options.get("pack_below") != 0:  # delta: packed objects
        encode = Pipeline.encode

        def encoding(self: Any, raw: Any, *args: Any, **kwargs: Any) -> Any:
            # in the encode of w's own chunk, after its digest: b's chunk may be encoded on
            # another thread before w is hashed, and a change then is no race to detect
            if len(raw) > 4096:
                mutate()
            return encode(self, raw, *args, **kwargs)

        monkeypatch.setattr(Pipeline, "encode", encoding)
    else:
        put = ObjectStore.put

        def putting(self: Any, *args: Any, **kwargs: Any) -> Any:
            mutate()
            return put(self, *args, **kwargs)

        monkeypatch.setattr(ObjectStore, "put", putting)


@pytest.mark.parametrize(("backend", "options"), CASES, ids=IDS)
def test_a_tensor_changed_during_a_blocking_save_fails_it_before_the_commit(
    tmp_path: Path, monkeypatch, backend: str, options: dict[str, Any]
) -> None:
    earlier = {"x": torch.arange(1000.0)}  # shares no chunk: the save writes every chunk
    aptckpt.save(earlier, tmp_path / "earlier", backend=backend, **options)
    state = _state()
    _patch_first_read(monkeypatch, backend, options, _mutate_once(state))
    with pytest.raises(aptckpt.StateChangedError, match=r"state\['w'\].*blocking=False") as info:
        aptckpt.save(state, tmp_path / "c", backend=backend, **options)
    assert info.value.tensors == ("state['w']",)
    assert not (tmp_path / "c").exists()
    monkeypatch.undo()
    aptckpt.verify(tmp_path / "earlier")
    if backend == "delta":  # no object named by a digest its bytes do not match
        aptckpt.collect_garbage(tmp_path)
        aptckpt.save(state, tmp_path / "again", backend=backend)
        aptckpt.verify(tmp_path / "again")


@pytest.mark.parametrize(("backend", "options"), CASES, ids=IDS)
def test_a_background_save_is_not_affected_by_later_changes(
    tmp_path: Path, backend: str, options: dict[str, Any]
) -> None:
    state = _state()
    expected = {k: v.clone() for k, v in state.items()}
    handle = aptckpt.save(state, tmp_path / "c", backend=backend, blocking=False, **options)
    state["w"].add_(1)  # after the snapshot: the checkpoint holds the state as it was
    handle.wait()
    assert torch.equal(aptckpt.load(tmp_path / "c")["w"], expected["w"])


@pytest.mark.parametrize(("backend", "options"), CASES, ids=IDS)
def test_saves_racing_a_writer_thread_never_commit_a_damaged_checkpoint(
    tmp_path: Path, backend: str, options: dict[str, Any]
) -> None:
    state = _state()
    stop = threading.Event()

    def train() -> None:
        while not stop.is_set():
            state["w"].mul_(1.0001)

    writer = threading.Thread(target=train)
    writer.start()
    committed = refused = 0
    try:
        for i in range(12):
            try:
                aptckpt.save(state, tmp_path / f"c{i}", backend=backend, **options)
                committed += 1
            except aptckpt.StateChangedError:
                refused += 1
    finally:
        stop.set()
        writer.join()
    for i in range(12):
        if (tmp_path / f"c{i}").exists():
            aptckpt.verify(tmp_path / f"c{i}")  # every committed checkpoint is intact
    assert committed + refused == 12
