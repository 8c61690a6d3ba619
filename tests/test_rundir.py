"""The run directory's links and odd entries: nothing the manager writes follows a link
out of the run, and nothing it reads there can hang it."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt import _rundir
from aptckpt.errors import UnsafePathError
from aptckpt.manager import CheckpointManager
from aptckpt.retention import KeepLast

# above the API: its reads and hashes are covered in both runs by the API-level tests
pytestmark = pytest.mark.core_independent

DEBRIS = ".x.tmp-1-0badc0de"  # what a crashed save leaves: removed in the run, never elsewhere


def elsewhere(tmp_path: Path) -> Path:
    """Another project's folder, with a file and a temp-like entry in it."""
    other = tmp_path / "other"
    other.mkdir(exist_ok=True)
    (other / "vocab.json").write_text("theirs")
    (other / DEBRIS).write_text("theirs too")
    return other


def untouched(other: Path) -> bool:
    return sorted(os.listdir(other)) == sorted([DEBRIS, "vocab.json"]) and (
        (other / "vocab.json").read_text() == "theirs"
    )


@pytest.mark.parametrize("folder", ["checkpoints", "temp", "tokenizer", "aptckpt-store"])
def test_a_writer_refuses_a_run_whose_folder_is_a_link(tmp_path, folder):
    run = tmp_path / "run"
    run.mkdir()
    other = elsewhere(tmp_path)
    os.symlink(other, run / folder)
    with pytest.raises(UnsafePathError, match=f"'{run / folder}' is a symbolic link") as info:
        CheckpointManager(run, backend="delta")
    assert str(other) in str(info.value) and "real directory" in str(info.value)
    assert untouched(other)
    reader = CheckpointManager(run, read_only=True)  # reading through it is harmless
    assert reader.checkpoints() == []


def test_a_link_planted_between_saves_is_refused_before_writing(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    mgr.save(1, {"w": torch.ones(1)})
    other = elsewhere(tmp_path)
    assert not (run / "temp").exists()  # no temporary checkpoint yet
    os.symlink(other, run / "temp")
    with pytest.raises(UnsafePathError, match="temp' is a symbolic link"):
        mgr.save(2, {"w": torch.ones(1)}, temporary=True, batch_index=1)
    assert untouched(other)
    with pytest.raises(UnsafePathError):
        mgr.save_checkpoint(torch.nn.Linear(1, 1), None, None, 0, 3, [], {}, tokenizer={"a": b""})
    assert untouched(other) and [r.global_step for r in mgr.checkpoints()] == [1]


def test_tokenizer_files_replace_links_without_following_them(tmp_path):
    run = tmp_path / "run"
    other = elsewhere(tmp_path)
    (run / "tokenizer").mkdir(parents=True)
    os.symlink(other / "vocab.json", run / "tokenizer" / "vocab.json")
    os.mkfifo(run / "tokenizer" / "merges.txt")
    mgr = CheckpointManager(run)
    files = {"vocab.json": b'{"a": 0}', "merges.txt": b"a b"}
    mgr.save_checkpoint(torch.nn.Linear(1, 1), None, None, 0, 1, [], {}, tokenizer=files)
    assert untouched(other)
    for name, data in files.items():
        assert not (run / "tokenizer" / name).is_symlink()
        assert (run / "tokenizer" / name).read_bytes() == data


def test_metadata_json_link_is_replaced_not_written_through(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = elsewhere(tmp_path)
    os.symlink(other / "vocab.json", run / "metadata.json")
    mgr = CheckpointManager(run)
    mgr.save(1, {"w": torch.ones(1)})
    assert untouched(other)
    assert not (run / "metadata.json").is_symlink()
    assert [r.global_step for r in CheckpointManager(run, read_only=True).checkpoints()] == [1]


def test_a_checkpoint_reached_through_a_link_is_not_the_runs(tmp_path):
    """A link in checkpoints/ to another run's checkpoint: not listed, not pruned, and a
    save of its name goes elsewhere."""
    foreign = tmp_path / "foreign"
    aptckpt.save({"w": torch.zeros(1)}, foreign)
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepLast(1))
    mgr.save(1, {"w": torch.ones(1)})
    os.symlink(foreign, run / "checkpoints" / "apt_model_epoch0_step5")
    mgr.save(2, {"w": torch.ones(1)})
    assert [r.global_step for r in mgr.checkpoints()] == [2]
    assert mgr.save(5, {"w": torch.ones(1)}).name == "apt_model_epoch0_step5_seq3"
    assert aptckpt.load(foreign)["w"].tolist() == [0.0]


def run_with_timeout(fn: Any, seconds: float = 20) -> Any:
    """``fn()``, failing the test instead of hanging it."""
    result: list[Any] = []

    def call() -> None:
        try:
            result.append(("ok", fn()))
        except BaseException as err:
            result.append(("err", err))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hung"
    kind, value = result[0]
    if kind == "err":
        raise value
    return value


def test_run_reads_refuse_what_is_not_a_small_regular_file(tmp_path):
    run = _rundir.Run.at(tmp_path, None)
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/zero", tmp_path / "zero")
    (tmp_path / "big").write_bytes(b"x" * 11)
    for name in ("fifo", "zero", "big"):
        with pytest.raises(OSError):  # noqa: PT011 - the errno is what differs
            run_with_timeout(lambda name=name: run.read(name, limit=10))
    assert run.read("big", limit=11) == b"x" * 11
    with pytest.raises(FileNotFoundError):
        run.read("missing", limit=10)


def test_ensure_folder_creates_and_refuses_links(tmp_path):
    run = _rundir.Run.at(tmp_path, None)
    assert Path(_rundir.ensure_folder(run, "tokenizer")).is_dir()
    os.symlink(tmp_path / "tokenizer", tmp_path / "linked")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        _rundir.ensure_folder(run, "linked")
    assert _rundir.write_small_file(run, "tokenizer", "a", b"1")
    assert not _rundir.write_small_file(run, "tokenizer", "a", b"1")  # same bytes
