"""_atomic: the commit protocol and safe reading."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import aptckpt
from aptckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    UnsafePathError,
    WriteError,
)
from aptckpt.storage.local import _atomic, _temps


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    aptckpt.save({"v": torch.ones(2)}, tmp_path / "c")

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr("aptckpt.backends.zstd.ZstdBackend.write", boom)
    with pytest.raises(RuntimeError, match="injected"):
        aptckpt.save({"v": torch.zeros(2)}, tmp_path / "c", overwrite=True)
    with pytest.raises(RuntimeError, match="injected"):
        aptckpt.save({"v": torch.zeros(2)}, tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["c"]
    assert torch.equal(aptckpt.load(tmp_path / "c")["v"], torch.ones(2))


@pytest.mark.core_independent
def test_crash_before_manifest_leaves_no_checkpoint_and_next_save_cleans(tmp_path):
    code = (
        "import os, aptckpt, torch\n"
        "import aptckpt.storage.local._atomic as a\n"
        "a.CheckpointWriter.commit = lambda self, m: os._exit(9)\n"
        f"aptckpt.save({{'w': torch.ones(1000)}}, {str(tmp_path / 'c')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == 9
    leftovers = sorted(os.listdir(tmp_path))  # the temp directory and its owner's lock file
    assert len(leftovers) == 2 and leftovers[0].startswith(".c.lock-")
    assert leftovers[1].startswith(".c.tmp-")
    with pytest.raises(CheckpointNotFoundError):
        aptckpt.load(tmp_path / "c")
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c")  # removes the dead process's temp dir
    assert os.listdir(tmp_path) == ["c"]


def test_refuses_to_replace_foreign_directories_and_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for name in ("data", "file"):
        with pytest.raises(CheckpointExistsError, match="not an aptckpt checkpoint"):
            aptckpt.save({"v": 1}, tmp_path / name, overwrite=True)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep"
    assert (tmp_path / "file").read_text() == "keep"


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "c").mkdir()
    aptckpt.save({"v": 1}, tmp_path / "c")
    assert aptckpt.load(tmp_path / "c") == {"v": 1}


def test_overwrite_falls_back_without_renameat2(tmp_path, monkeypatch):
    aptckpt.save({"v": 1}, tmp_path / "c")
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    aptckpt.save({"v": 2}, tmp_path / "c", overwrite=True)
    assert aptckpt.load(tmp_path / "c") == {"v": 2}
    assert os.listdir(tmp_path) == ["c"]


def test_parents_are_created(tmp_path):
    aptckpt.save({"v": 1}, tmp_path / "a" / "b" / "c")
    assert aptckpt.load(tmp_path / "a" / "b" / "c") == {"v": 1}


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        aptckpt.load(tmp_path / "missing")
    torch.save({"a": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointNotFoundError, match=r"torch\.load"):
        aptckpt.load(tmp_path / "plain.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="manifest"):
        aptckpt.load(tmp_path / "empty")


def test_symlinked_data_file_is_refused(tmp_path):
    aptckpt.save({"w": torch.ones(10)}, tmp_path / "c")
    shard = tmp_path / "c" / "shard-00000.bin"
    os.rename(shard, tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", shard)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        aptckpt.load(tmp_path / "c")


def test_truncated_and_missing_files_detected(tmp_path):
    aptckpt.save({"w": torch.ones(1000)}, tmp_path / "c")
    shard = tmp_path / "c" / "shard-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    with pytest.raises(IntegrityError, match="truncated") as info:
        aptckpt.load(tmp_path / "c")
    assert info.value.file == "shard-00000.bin"
    shard.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        aptckpt.load(tmp_path / "c")


def test_interrupted_delete_leaves_no_visible_directory(tmp_path, monkeypatch):
    aptckpt.save({"v": torch.ones(2)}, tmp_path / "c")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies before the files are gone

    monkeypatch.setattr(_atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        aptckpt.delete(tmp_path / "c")
    monkeypatch.undo()
    (leftover,) = os.listdir(tmp_path)
    assert _atomic.is_temporary(leftover) and ".trash-" in leftover
    aptckpt.save({"v": torch.ones(2)}, tmp_path / "d")  # the next save there cleans up
    assert os.listdir(tmp_path) == ["d"]


def test_entries_of_older_versions_go_when_old_and_unowned_here_or_under_the_run_lock(tmp_path):
    """Entries named by pid (older versions) carry no lock: a pid alive elsewhere proves
    nothing, so only age (or the run lock: ``exclusive``) makes them stale."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": ".a.tmp-4194999-00000001",
            "same_pid": f".b.trash-{os.getpid()}-00000002",
            "live": f".c.tmp-{live.pid}-00000003",
            "file": ".metadata.json.tmp-4194999-00000004",
            "dead_recent": ".d.tmp-4194998-00000005",
        }
        for key, name in names.items():
            if key == "file":
                (tmp_path / name).write_bytes(b"x")
            else:
                (tmp_path / name).mkdir()
        (tmp_path / "visible").mkdir()
        assert _atomic.remove_stale_temps(tmp_path) == []  # all of them recent
        old = time.time() - _temps.LEGACY_GRACE_S - 60
        for key in ("dead", "same_pid", "live", "file"):
            os.utime(tmp_path / names[key], (old, old))
        removed = _atomic.remove_stale_temps(tmp_path)
        assert sorted(removed) == sorted([names["dead"], names["same_pid"], names["file"]])
        assert sorted(os.listdir(tmp_path)) == sorted(
            [names["live"], names["dead_recent"], "visible"]
        )
        removed = _atomic.remove_stale_temps(tmp_path, exclusive=True)
        assert sorted(removed) == sorted([names["live"], names["dead_recent"]])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_rival_committing_between_check_and_rename(tmp_path, monkeypatch, overwrite):
    real = _atomic.CheckpointWriter._check_target
    raced = []

    def racing(self):
        real(self)
        committing = hasattr(self, "root") and (self.root / "manifest.msgpack").exists()
        if self.final.name == "c" and committing and not raced:
            raced.append(True)  # another process commits 'c' right now
            aptckpt.save({"v": torch.zeros(2)}, tmp_path / "rival")
            os.rename(tmp_path / "rival", tmp_path / "c")

    monkeypatch.setattr(_atomic.CheckpointWriter, "_check_target", racing)
    if overwrite:
        aptckpt.save({"v": torch.ones(2)}, tmp_path / "c", overwrite=True)
        assert torch.equal(aptckpt.load(tmp_path / "c")["v"], torch.ones(2))  # replaced it
    else:
        with pytest.raises(CheckpointExistsError):
            aptckpt.save({"v": torch.ones(2)}, tmp_path / "c")
        assert torch.equal(aptckpt.load(tmp_path / "c")["v"], torch.zeros(2))  # the rival's
    assert os.listdir(tmp_path) == ["c"]


# ------------------------------------------- replacing without RENAME_EXCHANGE

#: Saves argv[1] with overwrite=True on the two-rename path and dies right after the
#: rename named by argv[2] ("first": the old checkpoint is out of the way, the new one
#: not yet in; "second": the new one is in, the old one not yet removed).
_DIES_BETWEEN_RENAMES = """
import os, sys, torch, aptckpt
from aptckpt.storage.local import _atomic
_atomic._exchange = lambda a, b: False
real = os.rename
def rename(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    first = ".old-" in os.fspath(dst)
    if first == (sys.argv[2] == "first"):
        os._exit(9)
_atomic.os.rename = rename
aptckpt.save({"v": torch.full((64,), 2.0)}, sys.argv[1], overwrite=True)
"""


def die_between_renames(path, when):
    proc = subprocess.run(
        [sys.executable, "-c", _DIES_BETWEEN_RENAMES, str(path), when], check=False
    )
    assert proc.returncode == 9


@pytest.mark.core_independent
@pytest.mark.parametrize("recovery", ["load", "save_elsewhere", "save_again", "manager_cleanup"])
def test_a_replacement_killed_between_its_renames_keeps_the_old_checkpoint(tmp_path, recovery):
    old = {"v": torch.full((64,), 1.0)}
    aptckpt.save(old, tmp_path / "c")
    die_between_renames(tmp_path / "c", "first")
    assert not (tmp_path / "c").exists()
    assert any(".c.old-" in n for n in os.listdir(tmp_path))  # the old one, out of its name
    if recovery == "load":
        assert torch.equal(aptckpt.load(tmp_path / "c")["v"], old["v"])
    elif recovery == "save_elsewhere":
        aptckpt.save({"v": 0}, tmp_path / "d")  # its cleanup puts 'c' back, then removes debris
        assert torch.equal(aptckpt.load(tmp_path / "c")["v"], old["v"])
        (tmp_path / "d").rename(tmp_path.parent / f"{tmp_path.name}-d")
    elif recovery == "save_again":
        with pytest.raises(CheckpointExistsError):  # 'c' is back, so a plain save is refused
            aptckpt.save({"v": 3}, tmp_path / "c")
        aptckpt.save({"v": 3}, tmp_path / "c", overwrite=True)
        assert aptckpt.load(tmp_path / "c") == {"v": 3}
    else:
        _atomic.remove_stale_temps(tmp_path, exclusive=True)  # a manager taking the run
        assert torch.equal(aptckpt.load(tmp_path / "c")["v"], old["v"])
    assert os.listdir(tmp_path) == ["c"]


@pytest.mark.core_independent
def test_a_replacement_killed_after_its_renames_leaves_the_new_checkpoint(tmp_path):
    aptckpt.save({"v": torch.full((64,), 1.0)}, tmp_path / "c")
    die_between_renames(tmp_path / "c", "second")
    assert torch.equal(aptckpt.load(tmp_path / "c")["v"], torch.full((64,), 2.0))
    assert _atomic.remove_stale_temps(tmp_path)  # the old one and the lock file go
    assert os.listdir(tmp_path) == ["c"]


def test_a_failed_second_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    aptckpt.save({"v": 1}, tmp_path / "c")
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if os.fspath(dst) == str(tmp_path / "c") and ".tmp-" in os.fspath(src):
            raise OSError(errno.EIO, "I/O error", str(dst))
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(_atomic.os, "rename", rename)
    with pytest.raises(WriteError, match="I/O error"):
        aptckpt.save({"v": 2}, tmp_path / "c", overwrite=True)
    monkeypatch.undo()
    assert aptckpt.load(tmp_path / "c") == {"v": 1}
    assert os.listdir(tmp_path) == ["c"]


def test_a_load_waits_for_a_replacement_between_its_renames(tmp_path, monkeypatch):
    aptckpt.save({"v": 1}, tmp_path / "c")
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    real = os.rename
    between = threading.Event()
    loaded = []

    def slow_rename(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if ".old-" in os.fspath(dst):
            between.set()
            time.sleep(0.3)  # the name is empty meanwhile

    def load_meanwhile():
        between.wait(10)
        loaded.append(aptckpt.load(tmp_path / "c"))

    monkeypatch.setattr(_atomic.os, "rename", slow_rename)
    reader = threading.Thread(target=load_meanwhile)
    reader.start()
    aptckpt.save({"v": 2}, tmp_path / "c", overwrite=True)
    reader.join()
    assert loaded == [{"v": 2}]  # waited for the new one, rather than "does not exist"
    assert os.listdir(tmp_path) == ["c"]


def test_rival_replacements_without_exchange_leave_one_whole_checkpoint(tmp_path, monkeypatch):
    aptckpt.save({"v": -1}, tmp_path / "c")
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    errors = []

    def replace(value):
        try:
            for _ in range(10):
                aptckpt.save({"v": value}, tmp_path / "c", overwrite=True)
        except CheckpointExistsError:
            pass  # "other saves kept committing there": allowed, the name stays whole
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=replace, args=(v,)) for v in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert aptckpt.load(tmp_path / "c")["v"] in range(3)
    assert os.listdir(tmp_path) == ["c"]
