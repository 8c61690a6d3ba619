"""Resuming the APT reference loop is bit-identical to never stopping, for every backend.

Two ways of interrupting a run:

* in process: snapshot (copy) the run directory right after every checkpoint
  commits -- each temporary and each regular one -- and resume every snapshot,
  at its new path, with ``resume_from="auto"``;
* for real: run ``python -m aptckpt.apt`` in a subprocess, SIGKILL it mid-epoch
  once a temporary checkpoint has committed, move the run directory, and resume
  it with ``--resume-from auto``.

Either way the final checkpoint -- model, optimizer, scheduler, loss history,
metrics, RNG states -- must equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import aptckpt
from aptckpt.apt import TrainResult, train_model
from aptckpt.manager import CheckpointManager
from aptckpt.testing import assert_state_equal
from test_apt import TINY, one_thread  # noqa: F401 (an autouse fixture: one torch thread)

# above the API: its reads and hashes are covered in both runs by the API-level tests
pytestmark = pytest.mark.core_independent

BACKENDS = ["torch", "zstd", "delta"]


def final_state(run_dir: Path | str) -> Any:
    """The state of the run's newest checkpoint."""
    record = CheckpointManager(run_dir).latest()
    assert record is not None, f"no checkpoint in {run_dir}"
    assert record.kind == "epoch", f"the run did not finish: newest is {record.rel_path}"
    return aptckpt.load(record.path)


# ------------------------------------------------------------------ in process


def run_in_process(run_dir: Path, backend: str, **kwargs: Any) -> TrainResult:
    return train_model(
        2,
        4,
        3e-3,
        run_dir,
        temp_checkpoint_freq=2,
        backend=backend,
        model_config=TINY,
        max_steps_per_epoch=4,
        **kwargs,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_every_checkpoint_is_bit_identical(tmp_path: Path, backend: str) -> None:
    snapshots: list[Path] = []

    def snapshot_after_checkpoint(line: str) -> None:
        if line.startswith(("  temp checkpoint", "epoch ")):
            snapshots.append(tmp_path / f"snapshot{len(snapshots)}")
            shutil.copytree(tmp_path / "run", snapshots[-1])

    reference = run_in_process(tmp_path / "run", backend, log=snapshot_after_checkpoint)
    expected = final_state(tmp_path / "run")
    assert len(snapshots) == 4  # temp after batch 2, end of epoch 1, the same in epoch 2
    for snapshot in snapshots:
        resumed = run_in_process(snapshot, backend, resume_from="auto", log=None)
        assert resumed.resumed_from is not None
        assert Path(resumed.resumed_from).is_relative_to(
            snapshot
        )  # the moved copy, not the original
        assert resumed.losses == reference.losses
        assert_state_equal(reference.model.state_dict(), resumed.model.state_dict())
        assert_state_equal(reference.optimizer.state_dict(), resumed.optimizer.state_dict())
        assert_state_equal(expected, final_state(snapshot))


def test_resume_from_a_named_checkpoint(tmp_path: Path) -> None:
    reference = run_in_process(tmp_path / "run", "zstd", log=None)
    expected = final_state(tmp_path / "run")
    first_epoch = Path(reference.checkpoints[0])
    for name, target in [("path", first_epoch), ("best", "best")]:
        copy = tmp_path / name
        shutil.copytree(tmp_path / "run", copy)
        if target != "best":
            target = copy / "checkpoints" / first_epoch.name
        resumed = run_in_process(copy, "zstd", resume_from=target, log=None)
        assert resumed.resumed_from is not None
        assert_state_equal(expected, final_state(copy))


# ------------------------------------------------------------------ SIGKILL, for real

CLI_ARGS = [
    "--epochs=2",
    "--batch-size=4",
    "--max-steps-per-epoch=8",
    "--temp-checkpoint-freq=3",
    "--d-model=16",
    "--n-layer=1",
    "--n-head=2",
    "--context=16",
    "--no-progress",
]


def cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    # The CLI uses one torch thread by default, the same in every process compared.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "aptckpt.apt", *CLI_ARGS, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("uninterrupted")
    finish(cli("--checkpoint-dir=run", cwd=root))
    return final_state(root / "run")


@pytest.mark.parametrize(
    "backend",
    # one backend in the default run (the crash harness kills every backend); all when slow
    [b if b == "zstd" else pytest.param(b, marks=pytest.mark.slow) for b in BACKENDS],
)
def test_sigkill_mid_epoch_then_resume_moved_run(
    tmp_path: Path, backend: str, uninterrupted: Any
) -> None:
    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    first.mkdir()
    second.mkdir()
    proc = cli("--checkpoint-dir=run", f"--backend={backend}", cwd=first)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("  temp checkpoint"):  # printed after the checkpoint committed
            proc.send_signal(signal.SIGKILL)
            break
    rest, _ = proc.communicate(timeout=60)  # reap it and close the pipe
    assert proc.returncode == -signal.SIGKILL, "".join(seen) + rest
    assert not any(line.startswith("epoch 2/") for line in seen)

    # Move the run to another directory (another machine), then resume it there.
    shutil.move(first / "run", second / "moved-run")
    out = finish(
        cli("--checkpoint-dir=moved-run", f"--backend={backend}", "--resume-from=auto", cwd=second)
    )
    assert "resumed from" in out and "(temporary," in out, out
    assert str(first) not in out
    assert_state_equal(uninterrupted, final_state(second / "moved-run"))
