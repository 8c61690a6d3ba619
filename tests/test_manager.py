"""CheckpointManager: naming, index, latest/best, retention, temporaries, resume, portability."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import aptckpt
from aptckpt import CheckpointManager
from aptckpt.testing import assert_state_equal
from aptckpt.training_state import capture_rng, restore_rng

BACKENDS = ["zstd", "torch", "delta"]


class Trainer:
    """A tiny model, optimizer, scheduler and grad scaler, stepped deterministically."""

    def __init__(self, seed: int = 0) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2)
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu", enabled=True)
        self.losses: list[float] = []

    def step(self) -> None:
        x = torch.randn(4, 8)
        # Every global RNG feeds the update: torch (data, dropout), Python and NumPy.
        jitter = (1 + 1e-3 * random.random()) * (1 + 1e-3 * float(np.random.rand()))
        loss = self.model(x).pow(2).mean() * jitter
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.losses.append(float(loss.detach()))

    def save(self, mgr: CheckpointManager, epoch: int, step: int, **kwargs: Any) -> Path:
        metrics = kwargs.pop("metrics", {"loss": self.losses[-1]})
        return mgr.save_checkpoint(
            self.model,
            self.optimizer,
            self.scheduler,
            epoch,
            step,
            self.losses,
            metrics,
            scaler=self.scaler,
            **kwargs,
        )

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }


class Tokenizer:
    def files(self) -> dict[str, bytes]:
        return {"vocab.json": b'{"a": 0, "b": 1}', "config.json": b'{"kind": "char"}'}


def index(run: Path) -> dict[str, Any]:
    doc = json.loads((run / "metadata.json").read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_continues_bit_identically(tmp_path, backend):
    """Train 10 steps straight; or train 6, checkpoint, 'crash', resume, train 4: same bits."""
    straight = Trainer()
    for _ in range(10):
        straight.step()

    first = Trainer()
    mgr = CheckpointManager(tmp_path / "run", backend=backend)
    for _ in range(6):
        first.step()
    first.save(mgr, epoch=0, step=6, batch_index=6, temporary=True)
    for _ in range(3):  # work lost in the crash, with RNG draws
        first.step()

    resumed = Trainer(seed=123)  # a fresh process: different initial weights and RNG
    epoch, step, losses, metrics = CheckpointManager(tmp_path / "run").load_checkpoint(
        resumed.model, resumed.optimizer, resumed.scheduler, "latest", scaler=resumed.scaler
    )
    assert (epoch, step, len(losses)) == (0, 6, 6)
    assert metrics == {"loss": first.losses[5]}
    resumed.losses = losses
    for _ in range(4):
        resumed.step()
    assert_state_equal(straight.state(), resumed.state())
    assert resumed.losses == straight.losses


def test_layout_names_and_index(tmp_path):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", model_name="apt_model", keep_last=None)
    t.step()
    path = t.save(mgr, 0, 100, tokenizer=Tokenizer(), config={"d_model": 8})
    assert path == tmp_path / "run" / "checkpoints" / "apt_model_epoch0_step100"
    t.step()
    temp = t.save(mgr, 1, 150, temporary=True, batch_index=50)
    assert temp == tmp_path / "run" / "temp" / "apt_model_epoch1_step150"
    doc = index(tmp_path / "run")
    assert doc["model_name"] == "apt_model" and doc["format"] == "aptckpt-run"
    assert doc["created_at"] and doc["last_updated"]
    entries = doc["checkpoints"]
    assert [e["path"] for e in entries] == [
        "checkpoints/apt_model_epoch0_step100",
        "temp/apt_model_epoch1_step150",
    ]
    first = entries[0]
    assert first["epoch"] == 0 and first["global_step"] == 100 and first["is_best"] is True
    assert first["backend"] == "zstd" and first["bytes"] > 0 and first["metrics"]["loss"] > 0
    assert entries[1]["kind"] == "temp" and entries[1]["batch_index"] == 50
    assert (tmp_path / "run" / "tokenizer" / "vocab.json").read_bytes() == b'{"a": 0, "b": 1}'
    text = (tmp_path / "run" / "metadata.json").read_text()
    assert str(tmp_path) not in text  # relative paths only
    state = aptckpt.load(path)
    assert state["tokenizer"]["config.json"] == b'{"kind": "char"}'
    assert state["config"] == {"d_model": 8}


def test_temporaries_go_once_a_later_epoch_checkpoint_commits(tmp_path):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", temp_every=2)
    for step in range(1, 7):
        t.step()
        if mgr.should_save_temp(step):
            t.save(mgr, 0, step, temporary=True, batch_index=step)
    assert [r.kind for r in mgr.checkpoints()] == ["temp"] * 3
    t.save(mgr, 0, 6)
    assert [(r.kind, r.global_step) for r in mgr.checkpoints()] == [("epoch", 6)]
    assert not os.listdir(tmp_path / "run" / "temp")


def test_retention_keeps_last_n_and_best(tmp_path):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, keep_best=1, best_mode="min")
    losses = [5.0, 1.0, 3.0, 4.0, 6.0]
    for i, loss in enumerate(losses):
        t.step()
        t.save(mgr, i, (i + 1) * 10, metrics={"loss": loss})
    kept = [(r.global_step, r.is_best) for r in mgr.checkpoints()]
    assert kept == [(10, True), (20, True), (40, False), (50, False)][1:]
    assert mgr.best() is not None and mgr.best().global_step == 20
    assert mgr.latest() is not None and mgr.latest().global_step == 50
    assert len(os.listdir(tmp_path / "run" / "checkpoints")) == 3


def test_best_mode_max_and_explicit_flag(tmp_path):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", keep_last=None, best_metric="acc", best_mode="max")
    for i, acc in enumerate([0.5, 0.7, 0.6]):
        t.step()
        t.save(mgr, i, i + 1, metrics={"acc": acc})
    assert mgr.best() is not None and mgr.best().global_step == 2
    t.step()
    t.save(mgr, 3, 4, metrics={"acc": 0.1}, is_best=True)  # the trainer knows better
    assert mgr.best() is not None and mgr.best().global_step == 4


def test_latest_skips_an_incomplete_checkpoint_and_never_uses_file_times(tmp_path):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", keep_last=None)
    for step in (10, 20):
        t.step()
        t.save(mgr, 0, step)
    # a save that crashed before its manifest: a directory without one, and a temp dir
    (tmp_path / "run" / "checkpoints" / "apt_model_epoch0_step30").mkdir()
    (tmp_path / "run" / "checkpoints" / ".apt_model_epoch0_step40.tmp-99999-abcdef01").mkdir()
    # an older checkpoint touched last
    os.utime(tmp_path / "run" / "checkpoints" / "apt_model_epoch0_step10", (2e9, 2e9))
    assert mgr.latest() is not None and mgr.latest().global_step == 20
    assert mgr.resolve("latest").name == "apt_model_epoch0_step20"


def test_index_is_rebuilt_when_missing_or_damaged(tmp_path):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", keep_last=None)
    for step in (1, 2):
        t.step()
        t.save(mgr, 0, step)
    (tmp_path / "run" / "metadata.json").write_text("{not json")
    assert [r.global_step for r in CheckpointManager(tmp_path / "run").checkpoints()] == [1, 2]
    (tmp_path / "run" / "metadata.json").unlink()
    fresh = CheckpointManager(tmp_path / "run")
    assert fresh.latest() is not None and fresh.latest().global_step == 2
    t.step()
    t.save(fresh, 0, 3)
    assert [e["global_step"] for e in index(tmp_path / "run")["checkpoints"]] == [1, 2, 3]


def test_checkpoint_committed_but_not_indexed_is_found(tmp_path, monkeypatch):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run")
    t.step()
    t.save(mgr, 0, 1)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(CheckpointManager, "_write_index", crash)
    t.step()
    with pytest.raises(OSError, match="power cut"):
        t.save(mgr, 0, 2)
    monkeypatch.undo()
    assert [e["global_step"] for e in index(tmp_path / "run")["checkpoints"]] == [1]
    assert mgr.latest() is not None and mgr.latest().global_step == 2


def test_crash_during_retention_leaves_an_index_of_complete_checkpoints(tmp_path, monkeypatch):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", keep_last=1, keep_best=0)
    t.step()
    t.save(mgr, 0, 1)

    def crash(self: CheckpointManager, record: Any) -> None:
        raise KeyboardInterrupt  # killed before deleting what retention dropped

    monkeypatch.setattr(CheckpointManager, "_delete", crash)
    t.step()
    with pytest.raises(KeyboardInterrupt):
        t.save(mgr, 1, 2)
    monkeypatch.undo()
    assert [e["global_step"] for e in index(tmp_path / "run")["checkpoints"]] == [2]
    for entry in index(tmp_path / "run")["checkpoints"]:
        aptckpt.verify(tmp_path / "run" / entry["path"])
    assert len(os.listdir(tmp_path / "run" / "checkpoints")) == 2  # the dropped one is still there
    t.step()
    t.save(mgr, 2, 3)  # ... until the next save's retention
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["apt_model_epoch2_step3"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_moved_run_directory_resumes(tmp_path, backend):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "a" / "run", backend=backend)
    for step in range(1, 4):
        t.step()
        t.save(mgr, 0, step, tokenizer=Tokenizer())
    shutil.move(tmp_path / "a" / "run", tmp_path / "elsewhere")
    other = Trainer(seed=5)
    moved = CheckpointManager(tmp_path / "elsewhere")
    moved.load_checkpoint(other.model, other.optimizer, other.scheduler, "best")
    assert moved.last_loaded is not None and moved.last_loaded.tokenizer_files is not None
    moved.load_checkpoint(other.model, other.optimizer, other.scheduler)
    assert_state_equal(t.state(), other.state())
    aptckpt.verify(moved.resolve("latest"))


def test_delta_run_shares_objects_and_collects_garbage(tmp_path):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", backend="delta", keep_last=2, keep_best=0)
    for step in range(1, 6):
        t.step()
        t.save(mgr, 0, step)
    assert [r.global_step for r in mgr.checkpoints()] == [4, 5]
    report = aptckpt.collect_garbage(tmp_path / "run", dry_run=True)
    assert report.checkpoints == 2 and report.removed_objects == 0  # the manager collected
    for r in mgr.checkpoints():
        aptckpt.verify(r.path)


def test_generic_save_and_restore(tmp_path):
    t = Trainer()
    t.step()
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(7, {"net": t.model, "opt": t.optimizer, "scaler": t.scaler, "note": "hi"}, epoch=1)
    fresh = Trainer(seed=9)
    state = mgr.restore({"net": fresh.model, "opt": fresh.optimizer, "scaler": fresh.scaler})
    assert state["note"] == "hi" and state["global_step"] == 7
    assert_state_equal(t.model.state_dict(), fresh.model.state_dict())
    with pytest.raises(ValueError, match="reserved"):
        mgr.save(8, {"rng": 1})


def test_load_errors_are_clear(tmp_path):
    mgr = CheckpointManager(tmp_path / "run")
    t = Trainer()
    with pytest.raises(aptckpt.CheckpointNotFoundError, match="no complete checkpoint"):
        mgr.load_checkpoint(t.model)
    aptckpt.save({"w": torch.ones(1)}, tmp_path / "plain")
    with pytest.raises(aptckpt.BackendError, match="not written by a CheckpointManager"):
        mgr.load_checkpoint(t.model, checkpoint_path=tmp_path / "plain")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="best_mode"):
        CheckpointManager(tmp_path, best_mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="model_name"):
        CheckpointManager(tmp_path, model_name="../x")


def test_rng_capture_restore_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng()
    aptckpt.save(state, tmp_path / "rng")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(aptckpt.load(tmp_path / "rng"))
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_latest_follows_the_resumed_trajectory_not_the_highest_step(tmp_path):
    """Resuming from an older checkpoint abandons the later ones: after the next save,
    "latest" is that save, although an abandoned checkpoint has a higher step."""
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", keep_last=None, temp_every=1)
    for step in (10, 20, 30):
        t.step()
        t.save(mgr, 0, step)
    t.save(mgr, 1, 35, temporary=True, batch_index=5)
    resumed = Trainer(seed=3)
    mgr.load_checkpoint(
        resumed.model, resumed.optimizer, resumed.scheduler, "checkpoints/apt_model_epoch0_step10"
    )
    resumed.step()
    resumed.save(mgr, 0, 15, temporary=True, batch_index=15)
    latest = mgr.latest()
    assert latest is not None and (latest.kind, latest.global_step) == ("temp", 15)
    fresh = CheckpointManager(tmp_path / "run")  # a new process: from the manifests alone
    (tmp_path / "run" / "metadata.json").unlink()
    assert fresh.resolve("latest").name == "apt_model_epoch0_step15"
    resumed.save(mgr, 0, 20)  # the regular checkpoint of the new trajectory
    assert [r.kind for r in mgr.checkpoints()].count("temp") == 0  # both temps are obsolete
