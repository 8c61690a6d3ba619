"""_temps: hidden entries of saves in progress, judged by their owner's lock, never by a pid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import aptckpt
from aptckpt.errors import CheckpointExistsError, InvalidNameError
from aptckpt.storage.local import _atomic, _temps

# protocol of the storage layer, not the core's reads and hashes (covered in both runs)
pytestmark = pytest.mark.core_independent

#: Holds an owner with a temp directory beside argv[1] until its stdin closes; prints the
#: entry's name, then (with argv[2] == "fork") forks a child that outlives it.
_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from aptckpt.storage.local import _temps
    owner = _temps.Owner(Path(sys.argv[1]))
    owner.entry("tmp").mkdir()
    if sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:
            owner.release()  # a child leaving the save's block: must not drop the parent's lock
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
    print(owner.entry("tmp").name, flush=True)
    sys.stdin.read()
    if sys.argv[2] == "fork":
        os._exit(0)  # dies without cleaning up, its child still alive
    """
)


def hold(final: Path, mode: str = "plain") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(final), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def entries(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if _temps.is_temporary(n))


def test_a_live_owners_entries_stay_whatever_its_pid_and_go_once_it_dies(tmp_path):
    with hold(tmp_path / "c") as holder:
        assert holder.stdout is not None
        name = holder.stdout.readline().strip()
        (tmp_path / "alias").symlink_to(tmp_path)
        for parent in (tmp_path, tmp_path / "alias"):  # spelling does not matter
            assert _temps.remove_stale_temps(parent) == []
            assert _temps.remove_stale_temps(parent, exclusive=True) == []  # not even for the run
        assert name in os.listdir(tmp_path)
        holder.kill()  # no cleanup of its own: the kernel drops its lock
        holder.wait()
    removed = _temps.remove_stale_temps(tmp_path)
    assert name in removed and entries(tmp_path) == []


def test_a_forked_child_neither_keeps_nor_drops_its_parents_lock(tmp_path):
    with hold(tmp_path / "c", "fork") as holder:
        assert holder.stdout is not None and holder.stdin is not None
        child = int(holder.stdout.readline())
        name = holder.stdout.readline().strip()
        try:
            # the child has released its copy: the parent's lock must still hold
            assert _temps.remove_stale_temps(tmp_path) == []
            holder.stdin.close()
            holder.wait()
            # the parent died without cleaning up; its child lives on but holds nothing
            assert name in _temps.remove_stale_temps(tmp_path)
            assert entries(tmp_path) == []
        finally:
            holder.kill()
            os.kill(child, 9)


def test_cleanup_racing_a_new_owner_never_removes_its_entries(tmp_path):
    """A cleanup may take a lock file its owner has created but not locked yet; the
    owner then notices and starts over with another token."""
    done = threading.Event()
    failures: list[str] = []

    def clean() -> None:
        while not done.is_set():
            _temps.remove_stale_temps(tmp_path)

    def own() -> None:
        try:
            for _ in range(300):
                with _temps.Owner(tmp_path / "c") as owner:
                    entry = owner.entry("tmp")
                    entry.mkdir()
                    os.sched_yield()
                    if not entry.is_dir() or not (tmp_path / owner._lock_path.name).exists():
                        failures.append(entry.name)
                    entry.rmdir()
        finally:
            done.set()

    # The cleaner probes only tokens this process does not own yet: the window between
    # creating a lock file and locking it, which is the one at stake.
    threads = [threading.Thread(target=own), threading.Thread(target=clean)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert entries(tmp_path) == []


def test_threads_saving_into_one_folder_by_a_link_and_by_its_real_path(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    errors: list[BaseException] = []

    def saves(parent: Path, prefix: str) -> None:
        try:
            for i in range(15):
                aptckpt.save({"w": torch.full((2048,), float(i))}, parent / f"{prefix}{i}")
        except BaseException as err:
            errors.append(err)

    threads = [
        threading.Thread(target=saves, args=(real, "a")),
        threading.Thread(target=saves, args=(tmp_path / "link", "b")),
        threading.Thread(target=saves, args=(real, "c")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert entries(real) == []
    for prefix in "abc":
        for i in range(15):
            assert torch.equal(aptckpt.load(real / f"{prefix}{i}")["w"], torch.full((2048,), i))


_SAVER = textwrap.dedent(
    """
    import sys, torch, aptckpt
    parent, prefix = sys.argv[1], sys.argv[2]
    failed = 0
    for i in range(30):
        try:
            aptckpt.save({"w": torch.full((1 << 16,), float(i))}, f"{parent}/{prefix}{i}")
        except Exception as err:
            failed += 1
            print(type(err).__name__, err, file=sys.stderr)
    print(failed)
    """
)


@pytest.mark.skipif(
    shutil.which("unshare") is None
    or subprocess.run(["unshare", "--pid", "--fork", "true"], check=False).returncode != 0,
    reason="unshare --pid is not available (needs root or user namespaces)",
)
def test_savers_in_two_pid_namespaces_never_remove_each_others_saves(tmp_path):
    """Two containers sharing a volume: each saver is pid 1 in its own namespace, so
    the other's pid means nothing here. 35 of 60 saves failed when temps named a pid."""
    procs = [
        subprocess.Popen(
            ["unshare", "--pid", "--fork", sys.executable, "-c", _SAVER, str(tmp_path), prefix],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in ("a", "b")
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "0", err
    assert entries(tmp_path) == []
    assert len(os.listdir(tmp_path)) == 60
    aptckpt.verify(tmp_path / "a29")
    aptckpt.verify(tmp_path / "b29")


@pytest.mark.parametrize("size", [1, 2, 230, 231, 232, 254, 255])
@pytest.mark.parametrize("char", ["a", "é"])
def test_names_up_to_name_max_save_replace_delete_and_clean_up(tmp_path, monkeypatch, size, char):
    name = (char * size).encode()[:size].decode(errors="ignore") or "a"
    path = tmp_path / name
    aptckpt.save({"v": 1}, path)
    aptckpt.save({"v": 2}, path, overwrite=True)  # by exchange
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    aptckpt.save({"v": 3}, path, overwrite=True)  # by two renames, through an ``old`` name
    assert aptckpt.load(path) == {"v": 3}
    owner = _temps.Owner(path)
    for kind in ("tmp", "trash", "old", "lock"):
        entry = owner.entry(kind).name
        assert len(os.fsencode(entry)) <= _temps.NAME_MAX
        assert _temps.is_temporary(entry)
    owner.entry("tmp").mkdir()  # a save that died (its lock dropped, entries left)
    owner._fd, fd = None, owner._fd
    _temps._owned.pop(owner.token)
    assert fd is not None
    os.close(fd)
    assert sorted(_temps.remove_stale_temps(tmp_path)) == sorted(
        [owner.entry("tmp").name, owner.entry("lock").name]
    )
    aptckpt.delete(path)
    assert os.listdir(tmp_path) == []


def test_names_longer_than_name_max_are_refused_before_writing(tmp_path):
    with pytest.raises(InvalidNameError, match=r"256 bytes.*at most 255"):
        aptckpt.save({"v": 1}, tmp_path / ("a" * 256))
    with pytest.raises(InvalidNameError, match="at most 255"):
        aptckpt.save({"v": 1}, tmp_path / ("é" * 128))  # 256 bytes
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "name",
    [".c.tmp-0123456789abcdef", ".c.old-fedcba9876543210", ".c.tmp-12-ab", ".x.lock-" + "0" * 16],
)
def test_names_of_hidden_entries_are_refused_as_checkpoint_names(tmp_path, name):
    with pytest.raises(InvalidNameError, match="hidden entries"):
        aptckpt.save({"v": 1}, tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_truncated_stems_stay_distinct_and_recognisable():
    a, b = "x" * 300, "x" * 299 + "y"
    assert _temps.stem_of(a) != _temps.stem_of(b)
    assert _temps.stem_of("é" * 200).encode()  # cut on a character boundary
    assert _temps.is_temporary(f".{_temps.stem_of(a)}.trash-{'0' * 16}")


def test_a_lock_file_left_without_entries_is_removed_once_unlocked(tmp_path):
    owner = _temps.Owner(tmp_path / "c")
    assert _temps.remove_stale_temps(tmp_path) == []  # ours and in use
    fd = owner._fd
    owner._fd = None
    _temps._owned.pop(owner.token)
    assert _temps.remove_stale_temps(tmp_path) == []  # still locked (by our descriptor)
    assert fd is not None
    os.close(fd)
    assert _temps.remove_stale_temps(tmp_path) == [owner.entry("lock").name]


def test_an_existing_checkpoint_blocks_a_plain_save_after_cleanup(tmp_path):
    aptckpt.save({"v": 1}, tmp_path / "c")
    with pytest.raises(CheckpointExistsError):
        aptckpt.save({"v": 2}, tmp_path / "c")
    assert os.listdir(tmp_path) == ["c"]


def test_a_path_without_a_name_is_refused(tmp_path):
    with pytest.raises(InvalidNameError, match="names no directory"):
        aptckpt.save({"v": 1}, "/")
