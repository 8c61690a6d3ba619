"""``aptckpt ls RUN_DIR --json``: the versioned document other tools read (docs/cli.md)."""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch

import aptckpt
from aptckpt.cli import main

# above the API: its reads and hashes are covered in both runs by the API-level tests
pytestmark = pytest.mark.core_independent

#: Every field of a checkpoint entry in schema 1.
FIELDS = {
    "path",
    "rel_path",
    "number",
    "kind",
    "step",
    "epoch",
    "batch_index",
    "metrics",
    "is_best",
    "best_when_saved",
    "backend",
    "bytes",
    "files",
    "created_at",
    "format_version",
    "world_size",
    "bytes_written",
    "blocked_s",
    "save_s",
    "indexed",
}


def _ls(capsys, *argv):
    code = main(["ls", "--json", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _run(path):
    with aptckpt.CheckpointManager(path, backend="delta", keep=aptckpt.KeepAll()) as mgr:
        mgr.log_metrics(1, loss=2.0)
        mgr.save(10, {"w": torch.randn(5000)}, metrics={"loss": 1.5}, blocking=False)
        mgr.save(20, {"w": torch.randn(5000)}, epoch=1, metrics={"loss": 1.7})
        state = {"w": torch.randn(5000)}
        mgr.save(25, state, epoch=2, metrics={"loss": 1.2}, temporary=True, batch_index=5)
    return mgr


def test_the_document(capsys, tmp_path):
    mgr = _run(tmp_path / "run")
    records = aptckpt.CheckpointManager(tmp_path / "run", read_only=True).checkpoints()
    doc = _ls(capsys, tmp_path / "run")
    assert doc["schema"] == 1 and doc["run"] == str(tmp_path / "run")
    assert doc["best"] == records[0].rel_path and doc["history_steps"] == 1
    entries = doc["checkpoints"]
    assert [set(e) for e in entries] == [FIELDS] * 3
    first, _, temp = entries
    assert first["path"] == str(records[0].path) and os.path.isabs(first["path"])
    assert [e["number"] for e in entries] == [1, 2, 3]
    assert [e["kind"] for e in entries] == ["regular", "regular", "temporary"]
    assert [e["step"] for e in entries] == [10, 20, 25] and temp["batch_index"] == 5
    assert [e["is_best"] for e in entries] == [True, False, False]
    assert [e["best_when_saved"] for e in entries] == [True, False, False]
    # delta: every tensor is in the run's store (packs), the checkpoint holds its manifest
    assert {e["backend"] for e in entries} == {"delta"} and first["files"] == 0
    assert first["bytes"] == aptckpt.inspect(records[0].path).stored_bytes
    assert temp["bytes_written"] == mgr.last_save_info.stored_bytes
    assert first["format_version"] >= 1 and first["world_size"] == 1
    for e in entries:
        when = datetime.datetime.fromisoformat(e["created_at"].replace("Z", "+00:00"))
        assert e["created_at"].endswith("Z") and when.utcoffset() == datetime.timedelta(0)
        assert 0 <= e["blocked_s"] <= e["save_s"] and e["indexed"] is True


def test_what_was_not_recorded_is_null_and_a_stale_index_is_said(capsys, tmp_path):
    _run(tmp_path / "run")
    for segment in (tmp_path / "run" / "history").iterdir():
        segment.unlink()  # as saved by an aptckpt without a history
    index = tmp_path / "run" / "metadata.json"
    doc = json.loads(index.read_text())
    doc["checkpoints"][0]["epoch"] = 7  # edited by hand: no longer matches the checkpoint
    index.write_text(json.dumps(doc))
    entries = _ls(capsys, tmp_path / "run")["checkpoints"]
    assert [e["indexed"] for e in entries] == [False, True, True]
    assert entries[0]["epoch"] == 0  # from the manifest, not the edited entry
    assert {e["blocked_s"] for e in entries} == {None} and entries[0]["bytes_written"] is None
    index.unlink()
    entries = _ls(capsys, tmp_path / "run")["checkpoints"]
    assert [e["indexed"] for e in entries] == [False] * 3 and len(entries) == 3


def test_an_empty_run(capsys, tmp_path):
    aptckpt.CheckpointManager(tmp_path / "run").close()
    doc = _ls(capsys, tmp_path / "run")
    assert doc == {
        "schema": 1,
        "run": str(tmp_path / "run"),
        "best": None,
        "history_steps": 0,
        "checkpoints": [],
    }


def test_non_finite_metrics_stay_strict_json(capsys, tmp_path):
    with aptckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": torch.ones(2)}, metrics={"loss": float("nan"), "acc": float("inf")})
    (entry,) = _ls(capsys, tmp_path / "run")["checkpoints"]
    assert entry["metrics"] == {"loss": "nan", "acc": "inf"}


def test_a_run_on_object_storage(capsys, memory_url):
    with aptckpt.CheckpointManager(memory_url) as mgr:
        mgr.save(3, {"w": torch.ones(2)}, metrics={"loss": 0.5})
    doc = _ls(capsys, memory_url)
    (entry,) = doc["checkpoints"]
    assert doc["run"] == memory_url and entry["path"].startswith(memory_url + "/checkpoints/")
    assert entry["files"] == 1 and entry["save_s"] >= entry["blocked_s"] >= 0
