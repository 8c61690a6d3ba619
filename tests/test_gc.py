"""_gc.paused: collection is off inside, back on after the last of nested or concurrent
pauses, and left off when the caller had turned it off."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

import pytest
import torch

import aptckpt
from aptckpt import _gc


@pytest.fixture(autouse=True)
def _restore_gc():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_nested_pauses_resume_at_the_last():
    gc.enable()
    with _gc.paused():
        assert not gc.isenabled()
        with _gc.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    with _gc.paused():
        pass
    assert not gc.isenabled()


@contextlib.contextmanager
def _paused_in_another_thread() -> Iterator[None]:
    """Another thread holds a pause for the duration of the block."""
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with _gc.paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join()


def test_concurrent_pauses_resume_when_both_end():
    gc.enable()
    with _paused_in_another_thread():
        with _gc.paused():
            pass
        assert not gc.isenabled()  # the other thread's pause is still going
    assert gc.isenabled()


def test_save_and_load_resume_collection_even_when_they_fail(tmp_path):
    gc.enable()
    aptckpt.save({"w": torch.ones(3)}, tmp_path / "c")
    assert torch.equal(aptckpt.load(tmp_path / "c")["w"], torch.ones(3))
    assert gc.isenabled()
    with pytest.raises(aptckpt.CheckpointNotFoundError):
        aptckpt.load(tmp_path / "missing")
    assert gc.isenabled()


def test_a_child_forked_during_another_threads_pause_collects_again():
    import os

    gc.enable()
    with _paused_in_another_thread():
        pid = os.fork()
        if pid == 0:  # the child: the other thread's pause did not come along
            os._exit(0 if gc.isenabled() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_only_a_save_the_caller_waits_for_pauses_collection(tmp_path, monkeypatch):
    from aptckpt.backends.zstd import ZstdBackend

    seen = []
    real_write = ZstdBackend.write

    def write(self, flat, writer):
        seen.append(gc.isenabled())
        return real_write(self, flat, writer)

    monkeypatch.setattr(ZstdBackend, "write", write)
    gc.enable()
    aptckpt.save({"w": torch.ones(3)}, tmp_path / "sync")
    aptckpt.save({"w": torch.ones(3)}, tmp_path / "async", blocking=False).wait()
    assert seen == [False, True]  # the background persist leaves the trainer's GC running
    assert gc.isenabled()
