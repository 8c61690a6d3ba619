"""The run history (aptckpt._history): CheckpointManager.log_metrics, one event per save with
its bytes written and the time it blocked, read back whole after crashes and resumes."""

from __future__ import annotations

import logging
import time

import pytest
import torch

import aptckpt
from aptckpt import _history, _rundir

# above the API: its reads and hashes are covered in both runs by the API-level tests
pytestmark = pytest.mark.core_independent


def _state(n: int = 1000) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(n)}


def test_metrics_and_saves_are_recorded(tmp_path):
    with aptckpt.CheckpointManager(tmp_path, keep=aptckpt.KeepAll()) as mgr:
        for step in range(1, 7):
            mgr.log_metrics(step, loss=1.0 / step, lr=torch.tensor(0.5))
            if step % 3 == 0:
                blocking = step == 3
                mgr.save(step, _state(), metrics={"loss": 1.0 / step}, blocking=blocking)
        mgr.wait()
        written = mgr.last_save_info
    history = aptckpt.CheckpointManager(tmp_path, read_only=True).history()
    assert [p.step for p in history.points] == [1, 2, 3, 4, 5, 6]
    assert history.series("loss")[1] == pytest.approx([1.0 / s for s in range(1, 7)])
    assert history.points[0].metrics["lr"] == 0.5
    assert [(e.step, e.blocking) for e in history.saves] == [(3, True), (6, False)]
    for event in history.saves:
        assert event.backend == "zstd" and event.bytes_written > 4000
        assert 0 <= event.blocked_s <= event.save_s
    assert history.saves[-1].bytes_written == written.stored_bytes
    assert history.saves[0].blocked_s == history.saves[0].save_s  # a blocking save


def test_a_background_save_blocks_less_than_it_takes(tmp_path, monkeypatch):
    from aptckpt.api import PendingSave

    real = PendingSave.persist

    def slow(self, snapshot):
        time.sleep(0.3)  # a slow disk: the caller must not wait for it
        return real(self, snapshot)

    monkeypatch.setattr(PendingSave, "persist", slow)
    with aptckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _state(), blocking=False)
    (event,) = mgr.history().saves
    assert event.save_s >= 0.3 and event.blocked_s < 0.2


def test_the_history_up_to_a_checkpoint_is_written_before_it_commits(tmp_path, monkeypatch):
    seen = []
    real = _history.HistoryWriter.flush

    def flush(self):
        seen.append(
            (tmp_path / "checkpoints").exists() and any((tmp_path / "checkpoints").iterdir())
        )
        real(self)

    monkeypatch.setattr(_history.HistoryWriter, "flush", flush)
    with aptckpt.CheckpointManager(tmp_path) as mgr:
        mgr.log_metrics(1, loss=2.0)
        mgr.save(1, _state())
    assert seen[0] is False  # the metric lines went out before the checkpoint existed
    first = sorted((tmp_path / "history").iterdir())[0].read_text()
    assert '"loss":2.0' in first


def test_torn_and_foreign_lines_are_skipped(tmp_path, caplog):
    with aptckpt.CheckpointManager(tmp_path) as mgr:
        for step in (1, 2):
            mgr.log_metrics(step, loss=float(step))
        mgr.save(2, _state())
    folder = tmp_path / "history"
    (folder / "000099.jsonl").write_text(
        '{"step": 3, "time": 1.0, "metrics": {"loss": 3.0}}\n'
        "not json\n"
        '{"step": -1, "time": 1.0, "metrics": {}}\n'
        '["a list"]\n'
        '{"event": "save", "path": 7}\n'
        '{"step": 4, "time": 1.0, "metrics": {"loss": "high", "acc": 0.5}}\n'
        '{"step": 5, "time": 1.0, "metr'  # torn by a crash
    )
    (folder / "notes.txt").write_text("ignored: not a segment")
    with caplog.at_level(logging.WARNING, logger="aptckpt"):
        history = aptckpt.CheckpointManager(tmp_path, read_only=True).history()
    assert [p.step for p in history.points] == [1, 2, 3, 4]
    assert history.points[-1].metrics == {"acc": 0.5}
    assert history.skipped == 5 and len(history.saves) == 1
    assert "5 malformed line(s) skipped" in caplog.text


def test_a_resumed_run_continues_and_the_last_value_of_a_step_wins(tmp_path):
    with aptckpt.CheckpointManager(tmp_path) as mgr:
        mgr.log_metrics(1, loss=5.0)
        mgr.log_metrics(2, loss=4.0)
    with aptckpt.CheckpointManager(tmp_path) as mgr:  # resumed from step 1
        mgr.log_metrics(2, loss=3.0)
        mgr.log_metrics(3, loss=2.0)
    names = sorted(p.name for p in (tmp_path / "history").iterdir())
    assert names == ["000001.jsonl", "000002.jsonl"]
    steps, values = aptckpt.CheckpointManager(tmp_path, read_only=True).history().series("loss")
    assert (steps, values) == ([1, 2, 3], [5.0, 3.0, 2.0])


def test_two_writers_in_one_process_never_replace_each_others_segments(tmp_path):
    run = _rundir.Run.at(tmp_path, None)
    a, b = _history.HistoryWriter(run), _history.HistoryWriter(run)
    a.log_metrics(1, {"x": 1})
    b.log_metrics(2, {"x": 2})
    a.flush()
    b.flush()
    a.log_metrics(3, {"x": 3})
    a.flush()
    assert [p.step for p in _history.read(run).points] == [1, 2, 3]


def test_bad_calls(tmp_path):
    with aptckpt.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(TypeError, match="metric 'loss' is str"):
            mgr.log_metrics(1, loss="low")
        with pytest.raises(ValueError, match="non-negative int"):
            mgr.log_metrics(-1, loss=1.0)
        with pytest.raises(ValueError, match="non-negative int"):
            mgr.log_metrics(1.5, loss=1.0)  # type: ignore[arg-type]
    reader = aptckpt.CheckpointManager(tmp_path, read_only=True)
    with pytest.raises(ValueError, match="read_only"):
        reader.log_metrics(1, loss=1.0)


def test_a_failed_write_keeps_the_lines_and_training_goes_on(tmp_path, monkeypatch, caplog):
    mgr = aptckpt.CheckpointManager(tmp_path)
    storage = mgr._run.storage
    real = type(storage).create_file
    monkeypatch.setattr(
        type(storage), "create_file", lambda self, p, d: (_ for _ in ()).throw(OSError(28, "full"))
    )
    with caplog.at_level(logging.WARNING, logger="aptckpt"):
        mgr.log_metrics(1, loss=1.0)
        mgr.save(1, _state())  # committed, though its history could not be written
    assert "run history not written" in caplog.text
    monkeypatch.setattr(type(storage), "create_file", real)
    mgr.close()
    history = mgr.history()
    assert [p.step for p in history.points] == [1] and len(history.saves) == 1


def test_logging_is_cheap_and_written_in_few_files(tmp_path):
    with aptckpt.CheckpointManager(tmp_path) as mgr:
        start = time.perf_counter()
        for step in range(5000):
            mgr.log_metrics(step, loss=1.0, lr=0.1)
        elapsed = time.perf_counter() - start
    assert len(list((tmp_path / "history").iterdir())) == 5  # 1000 lines a file
    assert elapsed < 2.0  # about 10 us a call; generous for a loaded machine


def test_history_of_a_run_on_object_storage(memory_url):
    with aptckpt.CheckpointManager(memory_url) as mgr:
        mgr.log_metrics(1, loss=2.0)
        mgr.save(1, _state(), blocking=False)
    history = aptckpt.CheckpointManager(memory_url, read_only=True).history()
    assert [p.step for p in history.points] == [1] and history.saves[0].step == 1
