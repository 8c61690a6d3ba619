"""Several threads of one process using aptckpt at once: saves into one directory and one
``delta`` object store (blocking, and a background save beside a blocking one), loads beside
saves. Every save succeeds or fails with an AptckptError, and every committed checkpoint loads
bit for bit."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt.testing import assert_state_equal


def _state(who: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(who)
    base = torch.randn(64 << 10, generator=g)  # 256 KiB: several 64 KiB chunks
    base[: 1000 * (step + 1)] += step  # a little more changes each step: xor deltas pay
    return {"w": base, "shared": torch.arange(50_000, dtype=torch.float32), "step": step}


def _run_threads(count: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(who: int) -> None:
        try:
            start.wait()
            work(who)
        except BaseException as err:  # reported below, with its traceback
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("backend", ["delta", "zstd", "torch"])
def test_threads_saving_into_one_directory_and_store(tmp_path: Path, backend: str) -> None:
    steps = 4

    options = {} if backend == "torch" else {"chunk_size": 64 << 10}

    def work(who: int) -> None:
        for step in range(steps):
            path = tmp_path / f"t{who}-s{step}"
            aptckpt.save(_state(who, step), path, backend=backend, **options)

    _run_threads(4, work)
    for who in range(4):
        for step in range(steps):
            assert_state_equal(_state(who, step), aptckpt.load(tmp_path / f"t{who}-s{step}"))


def test_a_background_delta_save_beside_blocking_ones(tmp_path: Path) -> None:
    for step in range(6):
        handle = aptckpt.save(
            _state(0, step),
            tmp_path / f"bg{step}",
            backend="delta",
            blocking=False,
            chunk_size=64 << 10,
        )
        aptckpt.save(_state(1, step), tmp_path / f"fg{step}", backend="delta", chunk_size=64 << 10)
        handle.wait()
    for step in range(6):
        assert_state_equal(_state(0, step), aptckpt.load(tmp_path / f"bg{step}"))
        assert_state_equal(_state(1, step), aptckpt.load(tmp_path / f"fg{step}"))


def test_loads_beside_saves(tmp_path: Path) -> None:
    aptckpt.save(_state(9, 0), tmp_path / "fixed", backend="delta", chunk_size=64 << 10)

    def work(who: int) -> None:
        for step in range(4):
            if who % 2:
                assert_state_equal(_state(9, 0), aptckpt.load(tmp_path / "fixed"))
            else:
                aptckpt.save(
                    _state(who, step),
                    tmp_path / f"t{who}-{step}",
                    backend="delta",
                    chunk_size=64 << 10,
                )

    _run_threads(4, work)


def test_a_forked_child_saves_and_loads_with_its_own_chunk_pool(tmp_path):
    """The chunk pool lives as long as the process; a child of fork() has none of its threads
    and must not wait on them (it would hang): it makes its own."""
    import multiprocessing

    state = {"w": torch.randn(300_000), "v": torch.arange(100_000)}
    aptckpt.save(state, tmp_path / "parent", threads=2)
    aptckpt.load(tmp_path / "parent")  # the parent's pool exists now

    def child() -> None:
        aptckpt.save(state, tmp_path / "child", threads=2)
        loaded = aptckpt.load(tmp_path / "child")
        # compared with numpy: torch's own OpenMP threads do not survive fork()
        same = loaded["w"].numpy().tobytes() == state["w"].numpy().tobytes()
        os._exit(0 if same else 3)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    if process.is_alive():
        process.kill()
        pytest.fail("the forked child hung on the parent's pool")
    assert process.exitcode == 0


@pytest.mark.parametrize("count", [0, 1, 255, 256, 257, 1000])
def test_batched_map_keeps_order_and_groups_small_items(count):
    from aptckpt.backends import _chunks

    sizes = [(i * 37) % (3 << 20) if i % 50 == 0 else 64 for i in range(count)]
    threads_seen: set[str] = set()

    def work(i: int) -> int:
        threads_seen.add(threading.current_thread().name)
        return i * 2

    out = list(_chunks.batched_map(work, list(range(count)), sizes, threads=2))
    assert out == [i * 2 for i in range(count)]


def test_batched_map_raises_the_first_error_in_order():
    from aptckpt.backends import _chunks

    def work(i: int) -> int:
        if i in (700, 300):
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 300"):
        list(_chunks.batched_map(work, list(range(1000)), [64] * 1000, threads=2))
