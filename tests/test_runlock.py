"""One writer per run: the run lock refuses a second process, never outlives a dead
owner, is shared inside a process, and a writer taking it cleans up crashed saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import aptckpt
from aptckpt import _runlock
from aptckpt.errors import RunBusyError, UnsafePathError
from aptckpt.manager import CheckpointManager

# protocol of the storage layer, not the core's reads and hashes (covered in both runs)
pytestmark = pytest.mark.core_independent

HOLD = """
import sys, time
from aptckpt.manager import CheckpointManager
manager = CheckpointManager(sys.argv[1])
print("holding", flush=True)
time.sleep(120)
"""

# What another process sees (the lock as the kernel keeps it; no torch import, so fast).
TRY = """
import fcntl, os, sys

fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
"""


def holder(run: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
    return proc


def try_in_other_process(run: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", TRY, str(run), _runlock.LOCK_NAME],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_second_process_is_refused_until_the_owner_is_killed(tmp_path):
    run = tmp_path / "run"
    proc = holder(run)
    try:
        with pytest.raises(RunBusyError, match=f"process {proc.pid}") as info:
            CheckpointManager(run)
        assert "read_only=True" in str(info.value) and info.value.holder["pid"] == proc.pid
        # readers need no lock
        assert CheckpointManager(run, read_only=True).checkpoints() == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    manager = CheckpointManager(run)  # a killed owner released it at once
    manager.save(1, {"w": torch.ones(2)})
    assert json.loads((run / _runlock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_managers_of_one_process_share_the_lock_and_close_releases_it(tmp_path):
    run = tmp_path / "run"
    first = CheckpointManager(run)
    second = CheckpointManager(run)  # same process: the same writer
    second.save(1, {"w": torch.ones(2)})
    assert try_in_other_process(run).returncode == 3
    first.close()
    assert try_in_other_process(run).returncode == 3  # `second` still holds it
    second.close()
    assert try_in_other_process(run).returncode == 0
    second.save(2, {"w": torch.ones(2)})  # a save takes it again
    assert try_in_other_process(run).returncode == 3


def test_context_manager_and_garbage_collection_release(tmp_path):
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        manager.save(1, {"w": torch.ones(2)})
    assert try_in_other_process(run).returncode == 0
    manager = CheckpointManager(run)
    del manager
    assert try_in_other_process(run).returncode == 0


def test_a_moved_run_is_still_the_same_run(tmp_path):
    manager = CheckpointManager(tmp_path / "a")
    manager.save(1, {"w": torch.ones(2)})
    os.rename(tmp_path / "a", tmp_path / "b")
    CheckpointManager(tmp_path / "b").save(2, {"w": torch.ones(2)})  # shares the held lock
    assert try_in_other_process(tmp_path / "b").returncode == 3


def test_read_only_manager_cannot_save(tmp_path):
    manager = CheckpointManager(tmp_path / "run", read_only=True)
    with pytest.raises(ValueError, match="read_only=True"):
        manager.save(1, {"w": torch.ones(2)})
    assert not (tmp_path / "run").exists()  # created nothing


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_keep_the_run_locked(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager(run)
    pid = os.fork()
    if pid == 0:  # a DataLoader-like worker that outlives the trainer's hold
        time.sleep(30)
        os._exit(0)
    try:
        manager.close()
        assert try_in_other_process(run).returncode == 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_taking_the_run_removes_leftovers_of_crashed_saves(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager(run, backend="delta")
    manager.save(1, {"w": torch.ones(2)})
    manager.close()
    pid = os.getpid()  # a previous process with our pid (containers reuse pids)
    debris = [
        run / "checkpoints" / f".apt_model_epoch0_step2.tmp-{pid}-0badc0de",
        run / "temp" / f".apt_model_epoch0_step3.trash-{pid}-0badc0de",
        run / "checkpoints" / ".apt_model_epoch0_step4.tmp-4194999-00000000",
    ]
    for d in debris:
        d.mkdir(parents=True)
        (d / "shard-00000.bin").write_bytes(b"x" * 10)
    files = [
        run / f".metadata.json.tmp-{pid}-12345678",
        run / "aptckpt-store" / "tmp" / f"{'0' * 32}.{pid}-1234",
    ]
    for f in files:
        f.write_bytes(b"partial")
    reader = CheckpointManager(run, read_only=True)
    assert len(reader.checkpoints()) == 1
    assert all(p.exists() for p in debris + files)  # readers touch nothing
    CheckpointManager(run)
    assert not any(p.exists() for p in debris + files)
    assert aptckpt.load(reader.latest().path)["w"].tolist() == [1.0, 1.0]


def test_the_lock_file_is_never_opened_through_a_link(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, run / ".aptckpt-run.lock")
    with pytest.raises(UnsafePathError, match=r"run lock .* is a symbolic link"):
        CheckpointManager(run)
    assert victim.read_text() == "precious"
    os.unlink(run / ".aptckpt-run.lock")
    os.mkfifo(run / ".aptckpt-run.lock")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        CheckpointManager(run)
