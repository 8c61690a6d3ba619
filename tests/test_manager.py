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
from aptckpt.retention import KeepAll, KeepBest, KeepEvery, KeepLast, Metric, SaveEvery
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
    mgr = CheckpointManager(tmp_path / "run", model_name="apt_model", keep=KeepAll())
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
    mgr = CheckpointManager(tmp_path / "run", temporary_every=SaveEvery(steps=2))
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
    mgr = CheckpointManager(tmp_path / "run", keep=KeepLast(2) | KeepBest(1))
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
    mgr = CheckpointManager(tmp_path / "run", keep=KeepAll(), best_by=Metric("acc", "max"))
    for i, acc in enumerate([0.5, 0.7, 0.6]):
        t.step()
        t.save(mgr, i, i + 1, metrics={"acc": acc})
    assert mgr.best() is not None and mgr.best().global_step == 2
    t.step()
    t.save(mgr, 3, 4, metrics={"acc": 0.1}, is_best=True)  # the trainer knows better
    assert mgr.best() is not None and mgr.best().global_step == 4


def test_latest_skips_an_incomplete_checkpoint_and_never_uses_file_times(tmp_path):
    t = Trainer()
    mgr = CheckpointManager(tmp_path / "run", keep=KeepAll())
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
    mgr = CheckpointManager(tmp_path / "run", keep=KeepAll())
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
    mgr = CheckpointManager(tmp_path / "run", keep=KeepLast(1))
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
    mgr = CheckpointManager(tmp_path / "run", backend="delta", keep=KeepLast(2))
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
    with pytest.raises(ValueError, match="mode must be"):
        CheckpointManager(tmp_path, best_by=Metric("acc", "lowest"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"KeepLast\(n\)"):
        CheckpointManager(tmp_path, keep=KeepLast(0) | KeepBest(1))
    with pytest.raises(TypeError, match="keep= takes retention rules"):
        CheckpointManager(tmp_path, keep=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="temporary_every= takes"):
        CheckpointManager(tmp_path, temporary_every=2)  # type: ignore[arg-type]
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
    mgr = CheckpointManager(tmp_path / "run", keep=KeepAll(), temporary_every=SaveEvery(steps=1))
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


# ------------------------------------------------------------ facts that outlive the index


def save_plain(mgr: CheckpointManager, step: int, loss: Any = None, **kwargs: Any) -> Path:
    metrics = kwargs.pop("metrics", None if loss is None else {"loss": loss})
    return mgr.save(step, {"w": torch.full((4,), float(step))}, metrics=metrics, **kwargs)


def as_json(records: list[Any]) -> str:
    """Records compared field by field (as JSON text: NaN equals NaN)."""
    return json.dumps([r.to_json() for r in records], allow_nan=True)


@pytest.mark.parametrize("backend", ["zstd", "delta"])
def test_rebuilt_index_equals_the_lost_one(tmp_path, backend):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, backend=backend, keep=KeepAll())
    save_plain(mgr, 1, 3.0)
    save_plain(mgr, 2, float("nan"))
    save_plain(mgr, 3, 1.0, epoch=1)
    save_plain(mgr, 4, 9.0, is_best=True, epoch=1)
    save_plain(mgr, 5, metrics={"acc": 1, "note": "x", "flag": True, "none": None}, epoch=2)
    save_plain(mgr, 6, 0.5, temporary=True, batch_index=7, epoch=3)
    records = mgr.checkpoints()
    assert [r.is_best for r in records] == [True, False, True, True, False, False]
    lost = index(run)["checkpoints"]
    assert len(lost) == 6 and all(e["manifest"] for e in lost)
    (run / "metadata.json").unlink()

    # a new process, or the same one: from the manifests alone
    fresh = CheckpointManager(run, backend=backend, keep=KeepAll())
    assert as_json(fresh.checkpoints()) == as_json(records)
    save_plain(fresh, 7, 2.0, temporary=True, batch_index=9, epoch=3)  # drops nothing
    rebuilt = index(run)["checkpoints"]
    assert json.dumps(rebuilt[:6], allow_nan=True) == json.dumps(lost, allow_nan=True)


def test_best_checkpoint_survives_a_lost_index(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepLast(1) | KeepBest(1))
    for step, loss in ((1, 1.0), (2, 2.0), (3, 3.0)):
        save_plain(mgr, step, loss)
    (run / "metadata.json").unlink()
    save_plain(mgr, 4, 4.0)
    assert [r.global_step for r in mgr.checkpoints()] == [1, 4]
    reader = CheckpointManager(run, read_only=True)
    assert reader.best() is not None and reader.best().global_step == 1
    assert reader.resolve("best").name == "apt_model_epoch0_step1"


def test_best_flag_of_a_save_killed_before_its_index_write_survives(tmp_path, monkeypatch):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepLast(1) | KeepBest(1))
    save_plain(mgr, 1, 5.0)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # the process dies between commit and index write

    monkeypatch.setattr(CheckpointManager, "_write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        save_plain(mgr, 2, 1.0)  # the new best
    monkeypatch.undo()
    save_plain(mgr, 3, 7.0)
    save_plain(mgr, 4, 8.0)
    assert [(r.global_step, r.is_best) for r in mgr.checkpoints()] == [(2, True), (4, False)]
    assert mgr.best() is not None and mgr.best().global_step == 2


def test_retention_with_metrics_that_rank_nothing(tmp_path):
    """NaN, bools, strings and missing metrics never become best nor unseat one; ints
    and infinities rank; an int too large for a float ranks as infinite."""
    mgr = CheckpointManager(tmp_path / "run", keep=KeepLast(1) | KeepBest(1))
    save_plain(mgr, 1, 5)  # an int
    for step, loss in ((2, float("nan")), (3, True), (4, "low"), (5, None), (6, float("inf"))):
        save_plain(mgr, step, loss)
        assert mgr.best() is not None and mgr.best().global_step == 1
    save_plain(mgr, 7, 10**400)
    save_plain(mgr, 8, -float("inf"))
    assert mgr.best() is not None and mgr.best().global_step == 8
    assert [r.global_step for r in mgr.checkpoints()] == [8]
    with pytest.raises(ValueError, match="several values"):
        save_plain(mgr, 9, metrics={"loss": torch.ones(2)})
    with pytest.raises(ValueError, match="metrics are numbers"):
        save_plain(mgr, 9, metrics={"loss": [1.0]})
    save_plain(mgr, 9, metrics={"loss": torch.tensor(-1e30, dtype=torch.float64), "n": np.int64(3)})
    assert mgr.latest() is not None and mgr.latest().metrics == {"loss": -1e30, "n": 3}


# ------------------------------------------------------------ sequence numbers


def test_resumed_run_saving_a_step_again_keeps_the_abandoned_best(tmp_path, monkeypatch):
    """Resume from an older checkpoint and save at a step the abandoned continuation
    saved: its checkpoint there (the run's best) is not replaced; and with the index
    write lost, "latest" is still the new save."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepLast(2) | KeepBest(1))
    for step, loss in ((10, 1.0), (20, 0.5), (30, 0.7)):
        save_plain(mgr, step, loss)
    t = Trainer()
    resumed = CheckpointManager(run, keep=KeepLast(2) | KeepBest(1))
    resumed.save(10, {"model": t.model}, metrics={"loss": 1.0})  # the resumed trajectory

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointManager, "_write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        save_plain(resumed, 20, 0.9)  # the step the abandoned best was saved at
    monkeypatch.undo()
    reader = CheckpointManager(run, read_only=True)
    latest = reader.latest()
    assert latest is not None and latest.path.name == "apt_model_epoch0_step20_seq5"
    assert aptckpt.load(latest.path)["w"].tolist() == [20.0] * 4
    assert reader.best() is not None and reader.best().path.name == "apt_model_epoch0_step20"
    assert aptckpt.load(reader.best().path)["metrics"] == {"loss": 0.5}
    save_plain(resumed, 30, 0.8)
    assert [r.path.name for r in resumed.checkpoints()] == [
        "apt_model_epoch0_step20",  # kept as the best
        "apt_model_epoch0_step20_seq5",
        "apt_model_epoch0_step30_seq6",
    ]


def test_latest_after_the_index_write_is_refused(tmp_path, monkeypatch):
    """EPERM on the run directory after the commit: the error says the checkpoint was
    committed, and "latest" is right without the index."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepAll())
    for step in (10, 20):
        save_plain(mgr, step, 1.0)

    from aptckpt.storage.local import LocalStorage

    write_file = LocalStorage.write_file

    def refused(self, path: str, data: bytes) -> None:  # a fault at the storage seam
        if path.endswith("metadata.json"):
            raise PermissionError(1, "Operation not permitted", path)
        write_file(self, path, data)

    monkeypatch.setattr(LocalStorage, "write_file", refused)
    with pytest.raises(aptckpt.WriteError, match="was committed") as info:
        save_plain(mgr, 15, 1.0)
    assert "permissions" in str(info.value)
    monkeypatch.undo()
    assert [e["global_step"] for e in index(run)["checkpoints"]] == [10, 20]
    latest = CheckpointManager(run, read_only=True).latest()
    assert latest is not None and latest.global_step == 15


def test_two_managers_of_one_run_in_one_process_never_share_a_sequence_number(
    tmp_path, monkeypatch
):
    """A notebook re-creates its manager while the old one's save is still in flight."""
    import threading

    run = tmp_path / "run"
    first = CheckpointManager(run, keep=KeepAll())
    save_plain(first, 1, 1.0)
    gate, entered = threading.Event(), threading.Event()
    real = aptckpt.api.PendingSave.persist

    def slow(self: Any, snapshot: Any) -> Any:
        if str(self.path).endswith("step2"):
            entered.set()
            assert gate.wait(30)
        return real(self, snapshot)

    monkeypatch.setattr(aptckpt.api.PendingSave, "persist", slow)
    handle = save_plain(first, 2, 1.0, blocking=False)
    assert entered.wait(30)
    second = CheckpointManager(run, keep=KeepAll())  # same process: shares the run
    done: list[Path] = []
    saver = threading.Thread(target=lambda: done.append(save_plain(second, 3, 1.0)))
    saver.start()
    saver.join(0.5)
    assert saver.is_alive()  # waits for the save in flight
    gate.set()
    saver.join(60)
    assert handle.wait().name == "apt_model_epoch0_step2" and done
    records = second.checkpoints()
    assert [(r.global_step, r.sequence) for r in records] == [(1, 1), (2, 2), (3, 3)]
    assert [e["global_step"] for e in index(run)["checkpoints"]] == [1, 2, 3]


def test_threads_saving_and_listing_on_one_manager(tmp_path):
    import threading

    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepAll(), backend="delta")
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(3):
                step = 100 * worker + i
                save_plain(mgr, step, float(step), blocking=bool(i % 2))
                assert mgr.latest() is not None
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    mgr.close()
    assert not errors
    records = mgr.checkpoints()
    assert sorted(r.sequence for r in records) == list(range(1, 13))
    assert [e["path"] for e in index(run)["checkpoints"]] == [r.rel_path for r in records]
    for r in records:
        assert aptckpt.load(r.path)["global_step"] == r.global_step


# ------------------------------------------------------------ hostile checkpoints


def plant(run: Path, name: str, run_meta: Any, folder: str = "checkpoints") -> Path:
    """A checkpoint saved by hand, whose run metadata says ``run_meta``."""
    path = run / folder / name
    aptckpt.save({"global_step": 1, "w": torch.ones(1)}, path, metadata={"aptckpt_run": run_meta})
    return path


def test_malformed_run_metadata_is_logged_and_the_run_goes_on(tmp_path, caplog):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepAll())
    save_plain(mgr, 1, 1.0)
    plant(run, "apt_model_epoch0_step5", {"sequence": "x", "metrics": [1, 2], "epoch": -1})
    plant(run, "apt_model_epoch0_step6", {"sequence": float("nan"), "global_step": "6"})
    plant(run, "apt_model_epoch0_step7", {"metrics": {"loss": [1], "acc": 0.5}, "is_best": 1})
    plant(run, "apt_model_epoch0_step8", {"batch_index": -3, "kind": "temp", "version": "2"})
    with caplog.at_level("WARNING", logger="aptckpt"):
        records = mgr.checkpoints()
    assert len(records) == 5 and "bad sequence 'x'" in caplog.text
    assert "metric 'loss' is not a plain number" in caplog.text
    by_name = {r.path.name: r for r in records}
    assert by_name["apt_model_epoch0_step7"].metrics == {"acc": 0.5}
    assert by_name["apt_model_epoch0_step5"].sequence == 0  # ordered by step, before the rest
    latest = mgr.latest()
    assert latest is not None and latest.global_step == 1
    save_plain(mgr, 2, 0.5)
    assert mgr.latest() is not None and mgr.latest().global_step == 2
    assert mgr.latest().sequence == 2 and mgr.best() is not None
    assert CheckpointManager(run, read_only=True).checkpoints() == mgr.checkpoints()


def test_a_checkpoint_that_needs_a_newer_aptckpt_stops_the_run(tmp_path):
    import msgpack

    from aptckpt import manifest as mf

    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepAll())
    save_plain(mgr, 1, 1.0)
    save_plain(mgr, 2, 1.0)  # the last one: "latest" without the newer one would be step 1
    newer = run / "checkpoints" / "apt_model_epoch0_step2"
    doc = msgpack.unpackb((newer / mf.MANIFEST_NAME).read_bytes(), raw=False)
    doc["format_version"] = mf.FORMAT_VERSION + 1
    (newer / mf.MANIFEST_NAME).write_bytes(mf.pack_document(doc))
    (run / "metadata.json").unlink()
    for call in (mgr.latest, lambda: save_plain(mgr, 3, 1.0)):
        with pytest.raises(aptckpt.UnsupportedFormatVersionError) as info:
            call()
        assert str(newer) in str(info.value) and "a newer aptckpt is needed" in str(info.value)
    assert sorted(os.listdir(run / "checkpoints")) == [
        "apt_model_epoch0_step1",
        "apt_model_epoch0_step2",
    ]
    plant(run, "apt_model_epoch9_step9", {"version": 2, "sequence": 9})
    (newer / mf.MANIFEST_NAME).unlink()  # only the newer run metadata is left
    with pytest.raises(aptckpt.UnsupportedFormatVersionError, match="a newer aptckpt is needed"):
        CheckpointManager(run, read_only=True).checkpoints()


def test_a_checkpoint_the_run_does_not_list_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    plain = run / "checkpoints" / "apt_model_epoch0_step5"
    aptckpt.save({"w": torch.zeros(1)}, plain)  # not saved by a manager
    assert save_plain(mgr, 5, 1.0).name == "apt_model_epoch0_step5_seq1"
    assert aptckpt.load(plain)["w"].tolist() == [0.0]
    assert [r.path.name for r in mgr.checkpoints()] == ["apt_model_epoch0_step5_seq1"]
    (run / "checkpoints" / "apt_model_epoch0_step6_seq2").mkdir()
    (run / "checkpoints" / "apt_model_epoch0_step6").mkdir()
    with pytest.raises(aptckpt.CheckpointExistsError, match="never replaces"):
        save_plain(mgr, 6, 1.0)


def test_restore_refuses_malformed_counters(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    bad = tmp_path / "bad"
    aptckpt.save({"global_step": "x", "model": {}}, bad)
    t = Trainer()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(aptckpt.FormatError, match="malformed 'global_step'"):
        mgr.load_checkpoint(t.model, checkpoint_path=bad)
    assert_state_equal(before, dict(t.model.state_dict()))  # nothing was restored
    aptckpt.save({"global_step": 1, "rng": {"python": 5, "numpy": {}}}, tmp_path / "rng")
    random.seed(7)
    with pytest.raises(aptckpt.FormatError, match="restore_rng=False"):
        mgr.restore({}, tmp_path / "rng")
    assert mgr.restore({}, tmp_path / "rng", restore_rng=False)["global_step"] == 1
    assert random.random() == random.Random(7).random()  # no generator was touched


# ------------------------------------------------------------ another user's run


def as_nobody(job: Any) -> dict[str, Any]:
    """Run ``job()`` in a forked child that has dropped to uid/gid 65534 (the modules
    are already imported: the interpreter's own files may be unreadable to nobody);
    returns ``{"ok": what it returned (JSON)}`` or ``{"error": its error}``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = {"ok": job()}
        except BaseException as err:
            result = {"error": f"{type(err).__name__}: {err}"}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    try:
        data = b"".join(iter(lambda: os.read(read, 1 << 16), b""))
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    return dict(json.loads(data))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_a_run_owned_by_another_user(tmp_path_factory):
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="aptckpt-nobody-"))  # reachable by nobody
    try:
        base.chmod(0o755)
        run = base / "run"
        t = Trainer()
        mgr = CheckpointManager(run, keep=KeepAll())
        for step in (1, 2):
            t.step()
            t.save(mgr, 0, step, tokenizer=Tokenizer())
        mgr.close()
        aptckpt.load(mgr.latest().path)  # every backend module imported before the fork
        best = mgr.best().global_step
        before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))

        def read() -> Any:
            reader = CheckpointManager(run, read_only=True)
            other = Trainer(seed=4)
            step = reader.load_checkpoint(other.model, other.optimizer, other.scheduler)[1]
            return (step, reader.best().global_step, len(reader.checkpoints()))

        assert as_nobody(read) == {"ok": [2, best, 2]}

        def write() -> Any:
            CheckpointManager(run)

        error = as_nobody(write)["error"]
        assert error.startswith("WriteError: taking the run lock") and "permissions" in error
        assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*")) == before

        # The run writable, its checkpoints/ not: the save fails cleanly, nothing changes
        # but the lock file; a temporary checkpoint (temp/ is created) still works.
        run.chmod(0o777)
        (run / "metadata.json").chmod(0o666)
        (run / ".aptckpt-run.lock").chmod(0o666)

        def save() -> Any:
            writer = CheckpointManager(run, keep=KeepAll())
            refused = ""
            try:
                writer.save(3, {"w": torch.ones(1)})
            except aptckpt.WriteError as err:
                refused = str(err)
            writer.save(4, {"w": torch.ones(1)}, temporary=True, batch_index=1)
            return refused, [[r.global_step, r.sequence] for r in writer.checkpoints()]

        refused, listing = as_nobody(save)["ok"]
        assert "nothing was written" in refused and "permissions" in refused
        assert listing == [[1, 1], [2, 2], [4, 4]]
        for record in CheckpointManager(run, read_only=True).checkpoints():
            aptckpt.verify(record.path)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_failed_save_does_not_hold_up_the_next(tmp_path, monkeypatch):
    """Whatever way a save fails (before writing, or while persisting in the
    background), the run's save slot is free again: the next save neither hangs nor
    reuses a sequence number."""
    import threading

    mgr = CheckpointManager(tmp_path / "run", keep=KeepAll())

    def within(seconds: float, fn: Any) -> Any:
        out: list[Any] = []
        thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
        thread.start()
        thread.join(seconds)
        assert not thread.is_alive(), "the next save waited for a failed one"
        return out[0]

    with pytest.raises(aptckpt.UnsupportedObjectError):
        mgr.save(1, {"x": object()})

    def broken(self: Any, snapshot: Any) -> Any:
        raise OSError("disk gone")

    monkeypatch.setattr(aptckpt.api.PendingSave, "persist", broken)
    handle = save_plain(mgr, 2, 1.0, blocking=False)
    assert isinstance(handle.exception(60), OSError)
    monkeypatch.undo()
    with pytest.raises(OSError, match="disk gone"):  # the failed save's error, once
        save_plain(mgr, 3, 1.0)
    path = within(60, lambda: save_plain(mgr, 3, 1.0))
    assert [r.path for r in mgr.checkpoints()] == [path]
    assert mgr.latest() is not None and mgr.latest().sequence == 3  # 1, 2: the failed saves


def test_policies_decide_best_retention_and_when_saves_are_due(tmp_path):
    """``keep`` rules compose; the best flag follows the first metric they rank by; ``due``
    answers from ``save_every`` and ``temporary_every``; the index names the rules."""
    keep = KeepLast(1) | KeepBest(2, "acc", "max") | KeepEvery(4)
    mgr = CheckpointManager(
        tmp_path / "run",
        keep=keep,
        temporary_every=SaveEvery(steps=3),
        save_every=SaveEvery(epochs=2),
    )
    assert mgr.best_by == Metric("acc", "max")
    assert [mgr.due(s) for s in (1, 3, 6)] == [None, "temporary", "temporary"]
    assert mgr.due(5, epoch_ended=1) == "regular" and mgr.due(5, epoch_ended=0) is None
    for step, acc in ((1, 0.5), (2, 0.9), (3, 0.7), (4, 0.1), (5, 0.8), (6, 0.2)):
        mgr.save(step, {"w": torch.ones(1)}, metrics={"acc": acc})
    assert [r.global_step for r in mgr.checkpoints()] == [2, 4, 5, 6]  # top 2, every 4th, last
    assert mgr.best().global_step == 2
    index = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert index["best_metric"] == "acc" and index["best_mode"] == "max"
    assert index["keep"].startswith("KeepLast(n=1")
    mgr.close()
    assert CheckpointManager(tmp_path / "other", read_only=True).best_by == Metric("loss", "min")
