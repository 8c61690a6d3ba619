"""The run index: a cache over the manifests that is used only where it matches them,
and that no hostile or odd ``metadata.json`` can turn into a hang, a crash or a lie."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt import _run_index
from aptckpt.manager import CheckpointManager
from aptckpt.retention import KeepAll, KeepBest, KeepLast

# above the API: its reads and hashes are covered in both runs by the API-level tests
pytestmark = pytest.mark.core_independent


def make_run(tmp_path: Path) -> tuple[Path, list[Any]]:
    """A run of three regular checkpoints and a temporary one, and its records."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepAll())
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
        mgr.save(step, {"w": torch.full((2,), float(step))}, metrics={"loss": loss})
    mgr.save(4, {"w": torch.ones(2)}, temporary=True, batch_index=1, metrics={"loss": 0.1})
    mgr.close()
    return run, mgr.checkpoints()


def listed(run: Path) -> list[Any]:
    """The run as a fresh reader lists it (failing instead of hanging)."""
    result: list[Any] = []
    thread = threading.Thread(
        target=lambda: result.append(CheckpointManager(run, read_only=True).checkpoints()),
        daemon=True,
    )
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "listing the run hung"
    return result[0]


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The manifests decoded (``aptckpt.inspect`` calls) while listing."""
    calls: list[str] = []
    real = aptckpt.api.inspect

    def counting(path: Any, **kwargs: Any) -> Any:
        calls.append(Path(path).name)
        return real(path, **kwargs)

    monkeypatch.setattr(aptckpt.api, "inspect", counting)
    return calls


def test_listing_with_a_current_index_decodes_no_manifest(tmp_path, decodes):
    run, records = make_run(tmp_path)
    decodes.clear()
    assert listed(run) == records
    assert decodes == []


@pytest.mark.parametrize(
    "planted", ["fifo", "dev-zero", "deep", "huge", "binary", "not-an-index", "newer-version"]
)
def test_an_odd_index_is_ignored_and_replaced(tmp_path, planted, caplog):
    run, records = make_run(tmp_path)
    index = run / "metadata.json"
    index.unlink()
    if planted == "fifo":
        os.mkfifo(index)
    elif planted == "dev-zero":
        os.symlink("/dev/zero", index)
    elif planted == "deep":
        index.write_text("[" * 200_000 + "]" * 200_000)
    elif planted == "huge":
        with open(index, "wb") as f:
            f.truncate(65 << 20)  # sparse: over the cap without writing it
    elif planted == "binary":
        index.write_bytes(b"\xff\xfe\x00garbage")
    elif planted == "not-an-index":
        index.write_text('{"format": "something else"}')
    else:
        index.write_text(json.dumps({"format": "aptckpt-run", "version": 99, "checkpoints": []}))
    with caplog.at_level("WARNING", logger="aptckpt"):
        assert listed(run) == records
    assert "metadata.json" in caplog.text
    mgr = CheckpointManager(run, keep=KeepAll())
    mgr.save(5, {"w": torch.ones(2)}, temporary=True, batch_index=2)
    doc = json.loads(index.read_text())
    assert [e["global_step"] for e in doc["checkpoints"]] == [1, 2, 3, 4, 5]
    assert index.is_file() and not index.is_symlink()


BAD_VALUES = {
    "epoch": -1,
    "global_step": "7",
    "batch_index": 1.5,
    "is_best": "yes",
    "created_at": 0,
    "metrics": {"loss": [1]},
    "backend": "",
    "bytes": -5,
    "sequence": 2**70,
    "format_version": 99,
    "kind": "temp",
}


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_a_malformed_index_field_falls_back_to_the_manifest(tmp_path, field, caplog, decodes):
    run, records = make_run(tmp_path)
    doc = json.loads((run / "metadata.json").read_text())
    doc["checkpoints"][0][field] = BAD_VALUES[field]
    (run / "metadata.json").write_text(json.dumps(doc))
    decodes.clear()
    with caplog.at_level("WARNING", logger="aptckpt"):
        assert listed(run) == records
    assert decodes == [records[0].path.name]
    assert f"index entry of {records[0].rel_path}" in caplog.text


@pytest.mark.parametrize(
    ("field", "lie"), [("is_best", False), ("sequence", 99), ("metrics", {"loss": -1.0})]
)
def test_an_edited_index_entry_is_not_believed(tmp_path, field, lie, caplog):
    run, records = make_run(tmp_path)
    doc = json.loads((run / "metadata.json").read_text())
    doc["checkpoints"][0][field] = lie  # well-formed, but not what the manifest says
    (run / "metadata.json").write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="aptckpt"):
        assert listed(run) == records
    assert "was altered" in caplog.text


def test_malformed_entries_and_lists_are_skipped(tmp_path):
    run, records = make_run(tmp_path)
    doc = json.loads((run / "metadata.json").read_text())
    doc["checkpoints"] = [1, None, {"path": 3}, *doc["checkpoints"]]
    (run / "metadata.json").write_text(json.dumps(doc))
    assert listed(run) == records
    doc["checkpoints"] = {"not": "a list"}
    (run / "metadata.json").write_text(json.dumps(doc))
    assert listed(run) == records


def test_a_version_1_index_only_fills_in_what_old_manifests_lack(tmp_path):
    """Checkpoints saved by a release whose manifests had no best flag: their old index
    supplies it, where the entry agrees with the manifest."""
    run = tmp_path / "run"
    for step in (1, 2):
        meta = {"sequence": step, "kind": "epoch", "epoch": 0, "global_step": step}
        aptckpt.save(
            {"global_step": step, "w": torch.ones(1)},
            run / "checkpoints" / f"apt_model_epoch0_step{step}",
            metadata={"aptckpt_run": {**meta, "metrics": {"loss": 1.0}, "batch_index": None}},
        )
    legacy = [
        {"path": "checkpoints/apt_model_epoch0_step1", "kind": "epoch", "epoch": 0,
         "global_step": 1, "batch_index": None, "is_best": True, "sequence": 1},
        {"path": "checkpoints/apt_model_epoch0_step2", "kind": "epoch", "epoch": 0,
         "global_step": 5, "batch_index": None, "is_best": True, "sequence": 2},
    ]  # fmt: skip
    index = {"format": "aptckpt-run", "version": 1, "checkpoints": legacy}
    (run / "metadata.json").write_text(json.dumps(index))
    records = listed(run)
    assert [(r.global_step, r.is_best) for r in records] == [(1, True), (2, False)]
    mgr = CheckpointManager(run, keep=KeepLast(1) | KeepBest(1))
    mgr.save(3, {"w": torch.ones(1)}, metrics={"loss": 2.0})
    # the legacy best (step 1, flagged; also the older of a tie, so the best score) is kept
    assert [r.global_step for r in mgr.checkpoints()] == [1, 3]
    assert json.loads((run / "metadata.json").read_text())["version"] == 2
    assert [r.is_best for r in listed(run)] == [True, False]


def test_record_helpers():
    record = _run_index.CheckpointRecord(
        Path("/r/checkpoints/a"), "checkpoints/a", "epoch", 0, 1, None, True, "t"
    )
    assert record.to_json()["path"] == "checkpoints/a" and "rel_path" not in record.to_json()
    assert _run_index.order(record) == (0, 1, 1)
    meta = _run_index.run_metadata(
        sequence=1, kind="temp", epoch=0, global_step=1, batch_index=2, metrics={}, is_best=False
    )
    assert meta["version"] == _run_index.RUN_VERSION and meta["batch_index"] == 2


def test_a_checkpoint_replaced_under_its_name_is_read_from_its_new_manifest(tmp_path, decodes):
    """The index still describes the checkpoint that was there before (a save killed
    before the index write, an older release that replaced names, a hand copy)."""
    run, records = make_run(tmp_path)
    meta = {"sequence": 9, "kind": "epoch", "epoch": 0, "global_step": 1, "is_best": False}
    aptckpt.save(
        {"global_step": 1, "w": torch.zeros(2)},
        records[0].path,
        metadata={"aptckpt_run": {**meta, "metrics": {"loss": 7.0}, "batch_index": None}},
        overwrite=True,
    )
    decodes.clear()
    now = listed(run)
    assert decodes == [records[0].path.name]
    assert [r.sequence for r in now] == [2, 3, 4, 9]
    latest = CheckpointManager(run, read_only=True).latest()
    assert latest is not None and latest.path == records[0].path
    assert latest.metrics == {"loss": 7.0} and not latest.is_best
