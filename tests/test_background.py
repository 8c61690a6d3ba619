"""Asynchronous saves: snapshot semantics, one in flight, reused staging buffers,
errors through the handle, a clean finish at exit, crashes mid-persist, the manager."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given

import aptckpt
from aptckpt import _background
from aptckpt.errors import CheckpointExistsError
from aptckpt.manager import CheckpointManager
from aptckpt.retention import KeepLast
from aptckpt.testing import assert_state_equal
from aptckpt.testing.strategies import states


def clone(state):
    if torch.is_tensor(state):
        return state.clone()
    if isinstance(state, dict):
        return {k: clone(v) for k, v in state.items()}
    return state


@pytest.mark.parametrize("backend", ["torch", "zstd", "delta"])
def test_the_checkpoint_holds_the_state_at_the_call(tmp_path, backend):
    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(256, 256, generator=g),
        "strided": torch.randn(64, 64, generator=g)[:, ::3],
        "conj": torch.randn(8, dtype=torch.complex64, generator=g).conj(),
        "bf16": torch.randn(100, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7),
        "step": 3,
    }
    expected = clone(state)
    handle = aptckpt.save(state, tmp_path / "c", backend=backend, blocking=False)
    state["w"].add_(1.0)  # the trainer goes on at once
    state["bf16"].zero_()
    info = handle.wait()
    assert handle.done() and info.path == str(tmp_path / "c")
    loaded = aptckpt.load(tmp_path / "c")
    assert_state_equal({**expected, "conj": expected["conj"].resolve_conj()}, loaded)


@given(state=states())
def test_async_and_blocking_saves_load_the_same(tmp_path_factory, state):
    root = tmp_path_factory.mktemp("bg")
    aptckpt.save(state, root / "sync")
    handle = aptckpt.save(state, root / "async", blocking=False)
    handle.wait()
    assert_state_equal(aptckpt.load(root / "sync"), aptckpt.load(root / "async"))


def test_one_in_flight_and_staging_buffers_are_reused(tmp_path):
    state = {"a": torch.randn(1000, 100), "b": torch.randn(10)}
    first = aptckpt.save(state, tmp_path / "s0", blocking=False)
    staging = _background._get()._staging
    pointers = [b.data_ptr() for b in staging.buffers()]
    second = aptckpt.save(state, tmp_path / "s1", blocking=False)
    assert first.done()  # the second save waited for the first before copying
    assert [b.data_ptr() for b in staging.buffers()] == pointers  # same shapes: same buffers
    second.wait()
    aptckpt.save({"a": torch.randn(5)}, tmp_path / "s2", blocking=False).wait()
    assert len(staging.buffers()) == 1  # bounded: one copy of the state saved last
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))


def test_errors_come_back_through_the_handle(tmp_path):
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    handle = aptckpt.save({"w": torch.zeros(2)}, tmp_path / "c", blocking=False)
    with pytest.raises(CheckpointExistsError):
        handle.wait()
    assert isinstance(handle.exception(), CheckpointExistsError)
    assert torch.equal(aptckpt.load(tmp_path / "c")["w"], torch.ones(2))
    # a save right after a failed one is not affected by it
    aptckpt.save({"w": torch.zeros(2)}, tmp_path / "d", blocking=False).wait()


def test_saves_from_several_threads_take_turns(tmp_path):
    handles = []

    def save(i: int) -> None:
        state = {"i": torch.full((1000,), i)}
        handles.append(aptckpt.save(state, tmp_path / f"t{i}", blocking=False))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.wait()
    for i in range(6):
        assert torch.equal(aptckpt.load(tmp_path / f"t{i}")["i"], torch.full((1000,), i))


SCRIPT = """
import os, signal, sys, torch, aptckpt
torch.set_num_threads(1)
path = sys.argv[1]
aptckpt.save({"w": torch.zeros(1000)}, path + "/old")
state = {f"t{i}": torch.randn(1 << 18) for i in range(16)}  # 16 MB
handle = aptckpt.save(state, path + "/new", blocking=False, level=3)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)  # dies while the background thread persists
print("exiting", handle.done(), flush=True)  # normal exit: atexit finishes the save
"""


def run_script(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.core_independent
def test_interpreter_exit_finishes_the_save_in_flight(tmp_path):
    proc = run_script(tmp_path, "exit")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("exiting")
    aptckpt.verify(tmp_path / "new")


@pytest.mark.core_independent
def test_a_kill_during_the_background_persist_leaves_the_previous_checkpoint(tmp_path):
    proc = run_script(tmp_path, "kill")
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(aptckpt.load(tmp_path / "old")["w"], torch.zeros(1000))
    assert not (tmp_path / "new").exists()  # hidden temp dir at most
    hidden = (".new.tmp-", ".new.lock-")  # the save's temp directory and its owner's lock
    assert all(name == "old" or name.startswith(hidden) for name in os.listdir(tmp_path))


FORK = """
import os, sys, torch, aptckpt
torch.set_num_threads(1)
aptckpt.save({"w": torch.ones(4)}, sys.argv[1] + "/parent", blocking=False).wait()
pid = os.fork()
if pid == 0:  # the parent's background thread does not exist here
    aptckpt.save({"w": torch.ones(4)}, sys.argv[1] + "/child", blocking=False).wait()
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.core_independent
def test_a_forked_child_saves_in_the_background_too(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", FORK, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    aptckpt.verify(tmp_path / "child")


def test_manager_saves_in_the_background(tmp_path):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(tmp_path / "run", backend="delta", keep=KeepLast(1))
    expected = {}
    for step in range(1, 5):
        model.weight.data.add_(1.0)
        expected[step] = model.state_dict()["weight"].clone()
        handle = manager.save(step, {"model": model, "opt": opt}, epoch=step, blocking=False)
        model.weight.data.mul_(0)  # training goes on while the save persists
        model.weight.data.add_(expected[step])
    assert handle.wait() == tmp_path / "run" / "checkpoints" / "apt_model_epoch4_step4"
    latest = manager.latest()
    assert latest is not None and latest.global_step == 4 and latest.bytes > 0
    assert [r.global_step for r in manager.checkpoints()] == [4]  # retention ran
    assert torch.equal(aptckpt.load(latest.path)["model"]["weight"], expected[4])
    manager.close()


def test_manager_reports_a_failed_background_save_once(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "run")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aptckpt.api, "_write", fail)
    manager.save(1, {"w": torch.ones(2)}, blocking=False)
    _background.wait_all()
    monkeypatch.undo()
    with pytest.raises(OSError, match="No space left"):
        manager.save(2, {"w": torch.ones(2)})  # the next save says the last one failed
    manager.save(3, {"w": torch.ones(2)}, blocking=False)
    manager.close()  # waits; nothing failed
    assert [r.global_step for r in CheckpointManager(tmp_path / "run").checkpoints()] == [3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_staged_in_pinned_memory(tmp_path):
    state = {"w": torch.randn(1024, 1024, device="cuda"), "b": torch.randn(3, device="cuda")}
    expected = {k: v.cpu() for k, v in state.items()}
    handle = aptckpt.save(state, tmp_path / "c", blocking=False)
    state["w"].add_(1)  # enqueued after the copies on the same stream
    handle.wait()
    assert all(b.is_pinned() for b in _background._get()._staging.buffers())
    loaded = aptckpt.load(tmp_path / "c", map_location="cpu")
    assert_state_equal(expected, loaded)
    assert aptckpt.inspect(tmp_path / "c").tensors[0].device.startswith("cuda")
