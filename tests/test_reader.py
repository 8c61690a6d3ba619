"""_reader: loads racing a deletion, and files this user may not read."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt.errors import (
    CheckpointDeletedError,
    CheckpointNotFoundError,
    StoreBusyError,
)
from aptckpt.objectstore import ObjectStore
from aptckpt.storage.local import _reader
from aptckpt.testing import assert_state_equal
from privileges import needs_root, reachable_tmp, run_as_nobody

BACKENDS = {
    "zstd": {"chunk_size": 4096},
    "torch": {},
    # every tensor a loose object of the store (packs: tests/test_delta_packs.py)
    "delta": {"chunk_size": 4096, "local_below": 0, "pack_below": 0},
}


def state(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=gen), "b": torch.randn(64, generator=gen)}


def delete_after_the_manifest(monkeypatch: pytest.MonkeyPatch, collect: bool) -> None:
    """Make the next load's checkpoint vanish right after its manifest is read, as
    retention (and its garbage collection) running in another process would."""
    real = _reader.CheckpointReader.read_manifest

    def read_then_delete(self: _reader.CheckpointReader) -> Any:
        manifest = real(self)
        monkeypatch.undo()  # once
        aptckpt.delete(self.root)
        if collect:
            aptckpt.collect_garbage(self.root.parent)
        return manifest

    monkeypatch.setattr(_reader.CheckpointReader, "read_manifest", read_then_delete)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_deleted_while_loading_is_reported_deleted_not_damaged(
    tmp_path, monkeypatch, backend
):
    aptckpt.save(state(0), tmp_path / "keep", backend=backend, **BACKENDS[backend])
    for call in (aptckpt.load, aptckpt.verify):
        aptckpt.save(state(1), tmp_path / "c", backend=backend, **BACKENDS[backend])
        delete_after_the_manifest(monkeypatch, collect=backend == "delta")
        with pytest.raises(CheckpointDeletedError, match=r"deleted while loading.*retry") as info:
            call(tmp_path / "c")
        assert isinstance(info.value, CheckpointNotFoundError)  # "not found" handlers catch it
        assert isinstance(info.value, FileNotFoundError)
    assert_state_equal(state(0), aptckpt.load(tmp_path / "keep"))


def test_a_load_in_progress_keeps_its_objects_from_garbage_collection(tmp_path, monkeypatch):
    aptckpt.save(
        state(0), tmp_path / "c", backend="delta", chunk_size=4096, local_below=0, pack_below=0
    )
    real = ObjectStore.read_into
    seen: list[BaseException] = []

    def deleted_and_collected_mid_read(self: ObjectStore, name: bytes, out: Any) -> None:
        if not seen:
            aptckpt.delete(tmp_path / "c")  # retention, racing the load
            try:
                aptckpt.collect_garbage(tmp_path, wait=False)
            except StoreBusyError as err:  # the load holds the store: GC is postponed
                seen.append(err)
        real(self, name, out)

    monkeypatch.setattr(ObjectStore, "read_into", deleted_and_collected_mid_read)
    loaded = aptckpt.load(tmp_path / "c", verify=True)
    monkeypatch.undo()
    assert len(seen) == 1
    assert_state_equal(state(0), loaded)
    report = aptckpt.collect_garbage(tmp_path)  # once the load is done, GC goes ahead
    assert report.checkpoints == 0 and report.kept_objects == 0 and report.removed_objects > 0


def test_a_checkpoint_being_deleted_is_reported_deleted(tmp_path, monkeypatch):
    aptckpt.save(state(0), tmp_path / "c")
    seen: list[BaseException] = []
    real_rmtree = aptckpt.storage.local._atomic.shutil.rmtree

    def rmtree_racing_a_load(path: Any, *args: Any, **kwargs: Any) -> None:
        with pytest.raises(CheckpointDeletedError, match="being deleted") as info:
            aptckpt.load(tmp_path / "c")
        seen.append(info.value)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(aptckpt.storage.local._atomic.shutil, "rmtree", rmtree_racing_a_load)
    aptckpt.delete(tmp_path / "c")
    assert len(seen) == 1
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        aptckpt.load(tmp_path / "c")


@pytest.mark.parametrize("backend", ["zstd", "delta"])
def test_loads_racing_saves_and_retention_never_see_damage(tmp_path, backend):
    """A trainer saves and deletes the previous checkpoint (and, for delta, collects
    garbage) while a reader keeps loading the newest it finds: every load returns a
    whole state or says the checkpoint was deleted -- never damage, never a raw error."""
    options = BACKENDS[backend]
    aptckpt.save(state(0), tmp_path / "s00000", backend=backend, **options)
    done = threading.Event()
    problems: list[BaseException] = []
    outcomes = {"loaded": 0, "gone": 0}

    def train() -> None:
        try:
            for i in range(1, 25):
                aptckpt.save(state(i), tmp_path / f"s{i:05d}", backend=backend, **options)
                aptckpt.delete(tmp_path / f"s{i - 1:05d}")
                if backend == "delta":
                    # a load may hold the store: then GC is postponed, as the manager does
                    with contextlib.suppress(StoreBusyError):
                        aptckpt.collect_garbage(tmp_path, wait=False)
        finally:
            done.set()

    def read() -> None:
        while not done.is_set():
            names = sorted(n for n in os.listdir(tmp_path) if n.startswith("s"))
            if not names:
                continue
            try:
                loaded = aptckpt.load(tmp_path / names[-1])
            except CheckpointNotFoundError:
                outcomes["gone"] += 1
            except BaseException as err:
                problems.append(err)
                return
            else:
                assert_state_equal(state(int(names[-1][1:])), loaded)
                outcomes["loaded"] += 1

    threads = [threading.Thread(target=train), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert outcomes["loaded"] > 0


def test_a_closed_reader_refuses_to_open_files(tmp_path):
    aptckpt.save(state(0), tmp_path / "c")
    with _reader.CheckpointReader(tmp_path / "c") as reader:
        manifest = reader.read_manifest()
    with pytest.raises(ValueError, match="closed"):
        reader.open(manifest.files[0])


# ------------------------------------------------------------- permissions

_LOAD_AS_NOBODY = """
from aptckpt.errors import UnreadableError
for path in sys.argv[1:]:
    for call in (aptckpt.load, aptckpt.verify, aptckpt.inspect):
        try:
            call(path)
        except UnreadableError as err:
            assert isinstance(err, PermissionError)
            print(os.path.basename(path), "UnreadableError", err)
        except BaseException as err:
            print(os.path.basename(path), "WRONG", type(err).__name__, err)
        else:
            print(os.path.basename(path), "READ")
"""

#: What is made unreadable, and whether ``inspect`` (which reads only the manifest) notices.
_UNREADABLE = {
    "zstd-manifest": True,
    "zstd-data": False,
    "torch-data": False,
    "zstd-directory": True,
    "delta-object": False,
}


@pytest.mark.core_independent
@needs_root
def test_files_this_user_may_not_read_are_unreadable_errors():
    with reachable_tmp() as root:
        for case in _UNREADABLE:
            backend, target = case.split("-")
            ckpt = root / case / "c"
            aptckpt.save(state(0), ckpt, backend=backend, **BACKENDS[backend])
            if target == "manifest":
                (ckpt / "manifest.msgpack").chmod(0)
            elif target == "data":
                next(p for p in ckpt.iterdir() if p.name != "manifest.msgpack").chmod(0)
            elif target == "directory":
                ckpt.chmod(0)
            else:
                for obj in (root / case / "aptckpt-store" / "objects").iterdir():
                    obj.chmod(0)
        proc = run_as_nobody(_LOAD_AS_NOBODY, *(root / case / "c" for case in _UNREADABLE))
        assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 * len(_UNREADABLE), proc.stdout
    assert not any(" WRONG " in line for line in lines), proc.stdout
    for case, by_inspect in _UNREADABLE.items():
        mine = lines[:3]
        lines = lines[3:]
        assert all(line.split()[1] == "UnreadableError" for line in mine[:2]), (case, mine)
        assert mine[2].split()[1] == ("UnreadableError" if by_inspect else "READ"), (case, mine)
        assert all("Permission denied" in line and "permissions" in line for line in mine[:2])


def test_announced_ranges_are_read_ahead_in_a_window(tmp_path, monkeypatch):
    """read_into asks the kernel for the announced bytes up to _READ_AHEAD past the read,
    each byte once, adjacent chunks as one request, and nothing that was not announced."""
    from aptckpt.storage.local import _reader

    window = 1000
    monkeypatch.setattr(_reader, "_READ_AHEAD", window)
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    advised: list[tuple[int, int]] = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, start, length, advice: advised.append((start, length))
    )
    fd = os.open(path, os.O_RDONLY)
    try:
        files = _reader.LocalDataFiles([fd], {})
        # chunks 0-300 and 300-600 are adjacent (one run); 5000-9000 is another run
        files.expect(0, [(300, 600), (0, 300), (5000, 9000)])
        out = memoryview(bytearray(300))
        assert files.read_into(0, 0, out, None) is None
        assert bytes(out) == (bytes(range(256)) * 2)[:300]
        assert advised == [(0, 600)]  # up to 1000: only the first run
        files.read_into(0, 300, out, None)
        assert advised == [(0, 600)]  # nothing new below 1300
        files.read_into(0, 5000, out, None)
        assert advised[1:] == [(5000, 1000)]  # the window into the second run
        files.read_into(0, 5300, out, None)
        assert advised[2:] == [(6000, 300)]  # only what was not advised yet
        files.read_into(0, 8900, out[:100], None)
        assert advised[3:] == [(6300, 2700)]  # to the end of the run, never past it
        assert sum(length for _, length in advised) == 600 + 4000
    finally:
        os.close(fd)
