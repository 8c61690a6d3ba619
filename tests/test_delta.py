"""The ``delta`` backend: sharing, xor chains, keyframes, GC, crashes, convert, hostile payloads."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aptckpt
from aptckpt import manifest as mf
from aptckpt.backends import delta
from aptckpt.errors import (
    BackendError,
    FormatError,
    IntegrityError,
    StoreBusyError,
    StoreNotFoundError,
    UnreadableError,
    UnsafePathError,
    WriteError,
)
from aptckpt.objectstore import ObjectStore
from aptckpt.testing import assert_state_equal
from privileges import NOBODY, needs_root, reachable_tmp, run_as_nobody

CHUNK = 4096


def payload(path: Path) -> dict[str, Any]:
    doc = msgpack.unpackb((path / mf.MANIFEST_NAME).read_bytes(), raw=False)
    assert isinstance(doc["payload"], dict)
    return doc["payload"]


def rewrite_payload(path: Path, **changes: Any) -> None:
    doc = msgpack.unpackb((path / mf.MANIFEST_NAME).read_bytes(), raw=False)
    doc["payload"].update(changes)
    (path / mf.MANIFEST_NAME).write_bytes(mf.pack_document(doc))


def object_names(run: Path) -> set[bytes]:
    return {name for name, _, _ in ObjectStore.open(run / "aptckpt-store").names()}


def codecs(path: Path) -> dict[str, tuple[str, ...]]:
    return {t.key: t.codecs for t in aptckpt.inspect(path).tensors}


def save(state: Any, path: Path, **options: Any) -> aptckpt.SaveInfo:
    options.setdefault("chunk_size", CHUNK)
    options.setdefault("local_below", 0)  # the small tensors here test the store's mechanics
    # ... of loose objects (tests/test_delta_packs.py tests packs)
    options.setdefault("pack_below", 0)
    return aptckpt.save(state, path, backend="delta", **options)


def training_state(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "frozen": torch.randn(64, 256, generator=gen),
        "trained": torch.randn(32, 256, generator=gen),
        "bf16": torch.randn(4096, generator=gen).to(torch.bfloat16),
        "step": 0,
    }


def step(state: dict[str, Any], lr: float = 1e-4) -> None:
    state["trained"] += lr * torch.randn_like(state["trained"])
    state["step"] += 1


# ------------------------------------------------------------------ sharing


def test_unchanged_state_writes_nothing_new(tmp_path):
    state = training_state()
    first = save(state, tmp_path / "s0")
    assert first.stored_bytes > 0 and first.files == ()
    before = object_names(tmp_path)
    second = save(state, tmp_path / "s1")
    assert second.stored_bytes == 0
    assert second.manifest_bytes == (tmp_path / "s1" / mf.MANIFEST_NAME).stat().st_size
    assert object_names(tmp_path) == before
    assert os.listdir(tmp_path / "s1") == [mf.MANIFEST_NAME]
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))


def test_small_tensors_are_kept_in_the_checkpoint_not_as_objects(tmp_path):
    # local_below (the default before packs): small tensors in the checkpoint's own shard.
    state = {f"t{i}": torch.full((4,), float(i)) for i in range(3000)}
    state["big"] = torch.randn(64 << 10)
    first = save(state, tmp_path / "s0", local_below=16 << 10)
    assert first.files == ("shard-00000.bin",)
    objects = tmp_path / "aptckpt-store" / "objects"
    assert first.stored_bytes == 3000 * 16 + sum(p.stat().st_size for p in objects.iterdir())
    big = aptckpt.inspect(tmp_path / "s0").tensors[-1]
    assert len(object_names(tmp_path)) == -(-big.nbytes // CHUNK)  # only the big tensor's
    state["t7"] += 1
    second = save(state, tmp_path / "s1", local_below=16 << 10)
    assert second.stored_bytes == 3000 * 16  # the shard again; no new object
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))
    aptckpt.verify(tmp_path / "s0")
    info = aptckpt.inspect(tmp_path / "s1")
    assert info.tensors[0].codecs == ("raw",) and info.tensors[0].stored_bytes == 16


def test_only_changed_tensor_is_written_as_xor_delta(tmp_path):
    state = training_state()
    first = save(state, tmp_path / "s0")
    step(state)
    second = save(state, tmp_path / "s1")
    trained_bytes = state["trained"].nbytes
    assert 0 < second.stored_bytes < trained_bytes
    assert second.stored_bytes < first.stored_bytes / 3
    layout = codecs(tmp_path / "s1")
    assert layout["state['trained']"] == ("xor+shuffle4+zstd",)
    assert layout["state['frozen']"] == ("shuffle4+zstd",)
    assert payload(tmp_path / "s1")["base"] == "s0"
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))


def test_unrelated_new_content_falls_back_to_whole_chunks(tmp_path):
    state = training_state()
    save(state, tmp_path / "s0")
    state["trained"] = torch.randn(32, 256, generator=torch.Generator().manual_seed(9))
    save(state, tmp_path / "s1")
    assert codecs(tmp_path / "s1")["state['trained']"] == ("shuffle4+zstd",)
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))


def test_zeroed_tensor_is_stored_whole_not_as_delta(tmp_path):
    state = training_state()
    save(state, tmp_path / "s0")
    state["trained"].zero_()
    info = save(state, tmp_path / "s1")
    assert "xor" not in "".join(codecs(tmp_path / "s1")["state['trained']"])
    assert info.stored_bytes < 1000  # zeros compress to almost nothing
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))


def test_identical_chunks_in_one_save_are_stored_once(tmp_path):
    block = torch.randn(CHUNK // 4)
    state = {"a": block.clone(), "b": block.clone(), "c": torch.cat([block, block])}
    save(state, tmp_path / "s0")
    assert len(object_names(tmp_path)) == 1
    assert_state_equal(state, aptckpt.load(tmp_path / "s0"))


def test_tensor_whose_shape_or_dtype_changed_is_stored_fresh(tmp_path):
    state = training_state()
    save(state, tmp_path / "s0")
    state["trained"] = state["trained"][:16].clone()
    state["bf16"] = state["bf16"].float()
    save(state, tmp_path / "s1")
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))


def test_chunk_size_change_still_dedupes_nothing_wrongly(tmp_path):
    state = training_state()
    save(state, tmp_path / "s0")
    step(state)
    save(state, tmp_path / "s1", chunk_size=1024)
    assert "xor" not in str(codecs(tmp_path / "s1"))
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))


# ------------------------------------------------------- chains and keyframes


@pytest.mark.parametrize("every", [1, 2, 3, 8])
def test_keyframes_bound_chains(tmp_path, every):
    state = training_state()
    expected = []
    for i in range(10):
        save(state, tmp_path / f"s{i}", keyframe_every=every)
        expected.append({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
        step(state)
    for i in range(10):
        p = payload(tmp_path / f"s{i}")
        assert p["since_keyframe"] == i % every
        parsed = delta.parse_payload(aptckpt_manifest(tmp_path / f"s{i}"), "t")
        depth = max(o.depth for o in parsed.objects)
        assert depth <= i % every < every
        if p["since_keyframe"] == 0:
            assert all(o.base is None for o in parsed.objects)
        assert_state_equal(expected[i], aptckpt.load(tmp_path / f"s{i}"))


def aptckpt_manifest(path: Path) -> mf.Manifest:
    return mf.decode((path / mf.MANIFEST_NAME).read_bytes())


def test_explicit_base_and_default_newest(tmp_path):
    state = training_state()
    save(state, tmp_path / "a")
    step(state)
    save(state, tmp_path / "b")
    step(state)
    save(state, tmp_path / "c", base=tmp_path / "a")
    assert payload(tmp_path / "c")["base"] == "a"
    save(state, tmp_path / "d")
    assert payload(tmp_path / "d")["base"] == "c"
    assert_state_equal(state, aptckpt.load(tmp_path / "c"))


def test_base_must_be_a_delta_checkpoint_of_the_same_store(tmp_path):
    state = training_state()
    aptckpt.save(state, tmp_path / "z", backend="zstd")
    with pytest.raises(BackendError, match="not a delta checkpoint"):
        save(state, tmp_path / "c", base=tmp_path / "z")
    save(state, tmp_path / "other" / "x")  # its own store in other/
    with pytest.raises(BackendError, match="same store"):
        save(state, tmp_path / "c", base=tmp_path / "other" / "x")
    with pytest.raises(aptckpt.CheckpointNotFoundError):
        save(state, tmp_path / "c", base=tmp_path / "missing")
    assert not (tmp_path / "c").exists()


def test_store_option_shared_by_nested_directories(tmp_path):
    state = training_state()
    store = tmp_path / "run" / "objects-here"
    save(state, tmp_path / "run" / "checkpoints" / "s0", store=store)
    step(state)
    save(state, tmp_path / "run" / "temp" / "s1", store=store)
    assert payload(tmp_path / "run" / "temp" / "s1")["store"] == {"up": 2, "name": "objects-here"}
    assert payload(tmp_path / "run" / "temp" / "s1")["base"] == "checkpoints/s0"
    assert_state_equal(state, aptckpt.load(tmp_path / "run" / "temp" / "s1"))


def test_store_outside_the_run_is_refused(tmp_path):
    with pytest.raises(UnsafePathError, match="next to the checkpoint"):
        save({"w": torch.ones(3)}, tmp_path / "a" / "c", store=tmp_path / "b" / "store")
    assert not (tmp_path / "a" / "c").exists()


def test_foreign_directory_is_not_taken_as_store(tmp_path):
    (tmp_path / "aptckpt-store").mkdir()
    (tmp_path / "aptckpt-store" / "mine.txt").write_text("x")
    with pytest.raises(FormatError, match="not an aptckpt object store"):
        save({"w": torch.ones(3)}, tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["aptckpt-store"]


@pytest.mark.parametrize(
    "bad",
    [{"keyframe_every": 0}, {"keyframe_every": 1000}, {"base": 3}, {"local_below": -1}],
)
def test_bad_options(tmp_path, bad):
    with pytest.raises(BackendError):
        save({}, tmp_path / "c", **bad)


def test_options_recorded_without_paths(tmp_path):
    save({"w": torch.ones(2)}, tmp_path / "c", base=None, store=tmp_path / "aptckpt-store")
    assert aptckpt.inspect(tmp_path / "c").options == {
        "level": 1,
        "chunk_size": CHUNK,
        "keyframe_every": 8,
        "local_below": 0,
        "pack_below": 0,
    }


# ------------------------------------------------------------ portability


def test_run_directory_moves_whole(tmp_path):
    state = training_state()
    for i in range(3):
        step(state)
        save(state, tmp_path / "run" / "ckpts" / f"s{i}")
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    shutil.rmtree(tmp_path / "run")
    assert_state_equal(state, aptckpt.load(tmp_path / "moved" / "ckpts" / "s2"))
    aptckpt.verify(tmp_path / "moved" / "ckpts" / "s0")


def test_single_checkpoint_copied_alone_says_how_to_ship_it(tmp_path):
    save(training_state(), tmp_path / "run" / "s0")
    shutil.copytree(tmp_path / "run" / "s0", tmp_path / "alone" / "s0")
    with pytest.raises(IntegrityError, match=r"aptckpt.convert\(\)"):
        aptckpt.load(tmp_path / "alone" / "s0")


@pytest.mark.parametrize("target", ["zstd", "torch"])
def test_convert_makes_a_standalone_checkpoint(tmp_path, target):
    state = training_state()
    state["param"] = torch.nn.Parameter(torch.randn(3))
    state["tied"] = state["frozen"]
    for i in range(3):
        step(state)
        save(state, tmp_path / "run" / f"s{i}")
    info = aptckpt.convert(tmp_path / "run" / "s2", tmp_path / "ship" / "s2", backend=target)
    assert info.backend == target
    shutil.rmtree(tmp_path / "run")
    loaded = aptckpt.load(tmp_path / "ship" / "s2")
    assert loaded["tied"] is loaded["frozen"]
    assert isinstance(loaded["param"], torch.nn.Parameter)
    assert_state_equal(state, loaded)


def test_convert_keeps_metadata_and_devices_without_moving(tmp_path):
    state = {"w": torch.randn(10)}
    aptckpt.save(state, tmp_path / "c", backend="delta", metadata={"epoch": 4})
    rewrite = aptckpt_manifest(tmp_path / "c")
    assert rewrite.tensors[0].device == "cpu"
    aptckpt.convert(tmp_path / "c", tmp_path / "z")
    assert aptckpt.inspect(tmp_path / "z").metadata == {"epoch": 4}
    with pytest.raises(aptckpt.CheckpointExistsError):
        aptckpt.convert(tmp_path / "c", tmp_path / "c", backend="delta", overwrite=True)
    # any backend to delta as well
    aptckpt.convert(tmp_path / "z", tmp_path / "d", backend="delta")
    assert_state_equal(state, aptckpt.load(tmp_path / "d"))


# ------------------------------------------------------- garbage collection


def test_gc_keeps_everything_reachable_through_chains(tmp_path):
    state = training_state()
    states = []
    for i in range(5):
        save(state, tmp_path / f"s{i}")
        states.append({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
        step(state)
    for i in (0, 1, 3):  # the keyframe and two links of the chain
        aptckpt.delete(tmp_path / f"s{i}")
    report = aptckpt.collect_garbage(tmp_path)
    assert report.checkpoints == 2 and report.removed_objects == 0
    for i in (2, 4):
        assert_state_equal(states[i], aptckpt.load(tmp_path / f"s{i}"))


def test_gc_frees_old_chains_after_a_keyframe(tmp_path):
    state = training_state()
    for i in range(6):
        save(state, tmp_path / f"s{i}", keyframe_every=3)
        step(state)
    for i in range(3):
        aptckpt.delete(tmp_path / f"s{i}")
    before = object_names(tmp_path)
    dry = aptckpt.collect_garbage(tmp_path, dry_run=True)
    assert dry.removed_objects > 0 and object_names(tmp_path) == before
    report = aptckpt.collect_garbage(tmp_path / "aptckpt-store")
    assert report.removed_objects == dry.removed_objects
    assert report.removed_bytes == dry.removed_bytes
    reached = set()
    for i in range(3, 6):
        reached |= {
            o.name for o in delta.parse_payload(aptckpt_manifest(tmp_path / f"s{i}"), "t").objects
        }
        aptckpt.verify(tmp_path / f"s{i}")
    assert object_names(tmp_path) == reached
    assert report.kept_objects == len(reached)


def test_gc_ignores_other_backends_and_other_stores(tmp_path):
    aptckpt.save({"w": torch.ones(5)}, tmp_path / "z", backend="zstd")
    save({"w": torch.ones(5)}, tmp_path / "sub" / "d")  # store sub/aptckpt-store
    save({"w": torch.zeros(5)}, tmp_path / "d")
    assert aptckpt.collect_garbage(tmp_path).checkpoints == 1
    assert aptckpt.collect_garbage(tmp_path / "sub").checkpoints == 1
    aptckpt.verify(tmp_path / "sub" / "d")


def test_gc_refuses_when_a_manifest_is_unreadable(tmp_path):
    save({"w": torch.ones(5)}, tmp_path / "a")
    save({"w": torch.zeros(5)}, tmp_path / "b")
    aptckpt.delete(tmp_path / "a")
    (tmp_path / "b" / mf.MANIFEST_NAME).write_bytes(b"\xc1 damaged")
    before = object_names(tmp_path)
    with pytest.raises(FormatError, match=r"removed nothing.*Repair or delete"):
        aptckpt.collect_garbage(tmp_path)
    assert object_names(tmp_path) == before


def test_gc_refuses_a_directory_it_cannot_list(tmp_path, monkeypatch):
    """A checkpoint in a directory GC cannot read may reach any object: nothing goes."""
    save({"w": torch.ones(5)}, tmp_path / "a")
    save({"w": torch.zeros(5)}, tmp_path / "hidden" / "b", store=tmp_path / "aptckpt-store")
    aptckpt.delete(tmp_path / "a")
    before = object_names(tmp_path)
    real = os.scandir

    def scandir(path: Any) -> Any:
        if os.fspath(path) == str(tmp_path / "hidden"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UnreadableError, match=r"cannot read directory '.*hidden'.*removed"):
        aptckpt.collect_garbage(tmp_path)
    monkeypatch.undo()
    assert object_names(tmp_path) == before
    aptckpt.verify(tmp_path / "hidden" / "b")
    assert aptckpt.collect_garbage(tmp_path).removed_objects > 0  # readable again: collected


_GC_AS_NOBODY = """
from aptckpt.errors import UnreadableError
try:
    aptckpt.collect_garbage(sys.argv[1])
except UnreadableError as err:
    print("refused:", err)
except BaseException as err:
    print("WRONG", type(err).__name__, err)
else:
    print("COLLECTED")
"""


@pytest.mark.core_independent
@needs_root
@pytest.mark.parametrize("hidden", ["directory", "searchable_only", "manifest"])
def test_gc_by_a_user_who_cannot_read_part_of_the_run_removes_nothing(hidden):
    with reachable_tmp() as run:
        save({"w": torch.ones(5)}, run / "a")
        save({"w": torch.zeros(5)}, run / "private" / "b", store=run / "aptckpt-store")
        aptckpt.delete(run / "a")
        os.chown(run / "aptckpt-store", NOBODY, NOBODY)  # nobody could remove objects
        for directory, _, files in os.walk(run / "aptckpt-store"):
            os.chown(directory, NOBODY, NOBODY)
            for name in files:
                os.chown(os.path.join(directory, name), NOBODY, NOBODY)
        before = object_names(run)
        if hidden == "directory":
            (run / "private").chmod(0o700)
        elif hidden == "searchable_only":
            (run / "private" / "b").chmod(0o744)  # listable, not searchable
        else:
            (run / "private" / "b" / mf.MANIFEST_NAME).chmod(0o600)
        proc = run_as_nobody(_GC_AS_NOBODY, run)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("refused:"), proc.stdout
        assert "nothing was removed" in proc.stdout and "private" in proc.stdout
        assert object_names(run) == before
        aptckpt.verify(run / "private" / "b")


def test_gc_on_a_read_only_file_system_raises_write_error_and_keeps_checkpoints(
    tmp_path, monkeypatch
):
    state = training_state()
    for i in range(4):
        save(state, tmp_path / f"s{i}", keyframe_every=2)
        step(state)
    for i in range(2):
        aptckpt.delete(tmp_path / f"s{i}")
    before = object_names(tmp_path)
    real_open = os.open

    def read_only_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def read_only_unlink(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    dry = aptckpt.collect_garbage(tmp_path, dry_run=True)  # the lock, taken read-only
    assert dry.removed_objects > 0
    with pytest.raises(WriteError, match=r"Read-only file system.*mounted read-only") as info:
        aptckpt.collect_garbage(tmp_path)
    assert info.value.errno == errno.EROFS
    monkeypatch.undo()
    assert object_names(tmp_path) == before
    for i in range(2, 4):
        aptckpt.verify(tmp_path / f"s{i}")


_ON_READ_ONLY_MOUNT = """
set -e
mount --bind "$1" "$2"
mount -o remount,bind,ro "$2"
"$3" -c '
import sys, aptckpt
from aptckpt.errors import WriteError
print("dry", aptckpt.collect_garbage(sys.argv[1], dry_run=True).removed_objects)
try:
    aptckpt.collect_garbage(sys.argv[1])
except WriteError as err:
    print("refused", err.errno, err)
aptckpt.load(sys.argv[1] + "/s1")
print("loaded")
' "$2"
"""


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], check=False, capture_output=True)
    return probe.returncode == 0


@pytest.mark.core_independent
@pytest.mark.skipif(not _can_mount(), reason="needs unshare -m (root)")
def test_gc_on_a_real_read_only_mount(tmp_path):
    run, mount = tmp_path / "run", tmp_path / "mnt"
    mount.mkdir()
    for i in range(2):
        save({"w": torch.randn(2000) + i}, run / f"s{i}")
    aptckpt.delete(run / "s0")
    before = object_names(run)
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", _ON_READ_ONLY_MOUNT, "sh", run, mount, sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] != "dry 0" and lines[0].startswith("dry ")
    assert lines[1].startswith(f"refused {errno.EROFS} ") and "mounted read-only" in lines[1]
    assert lines[2] == "loaded"  # a load takes the store lock read-only
    assert object_names(run) == before


@pytest.mark.parametrize(
    "where",
    [
        "aptckpt-store/c",
        "aptckpt-store/objects/c",
        "other-store/c",
        ".x.tmp-0123456789abcdef/c",
        ".y.trash-12-ab/sub/c",
    ],
)
def test_delta_checkpoints_where_gc_would_not_look_are_refused(tmp_path, where):
    save({"w": torch.ones(5)}, tmp_path / "first")
    ObjectStore.create(tmp_path / "other-store")
    before = object_names(tmp_path)
    with pytest.raises(UnsafePathError, match="garbage collection"):
        save({"w": torch.zeros(5)}, tmp_path / where, store=tmp_path / "aptckpt-store")
    assert object_names(tmp_path) == before
    assert not (tmp_path / where).exists()


def test_gc_waits_for_or_refuses_a_save_in_flight(tmp_path):
    save({"w": torch.ones(5)}, tmp_path / "a")
    store = ObjectStore.open(tmp_path / "aptckpt-store")
    with store.lock(exclusive=False), pytest.raises(StoreBusyError):
        aptckpt.collect_garbage(tmp_path, wait=False)


def test_gc_of_something_that_is_not_a_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no object store"):
        aptckpt.collect_garbage(tmp_path)


def test_delete_removes_the_manifest_first(tmp_path, monkeypatch):
    save({"w": torch.ones(5)}, tmp_path / "a")

    def crash(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(OSError, match="power cut"):
        aptckpt.delete(tmp_path / "a")
    assert not aptckpt.storage.local._atomic.is_checkpoint(tmp_path / "a")
    with pytest.raises(aptckpt.CheckpointNotFoundError):
        aptckpt.load(tmp_path / "a")


# ----------------------------------------------------- crashes and damage


def test_interrupted_save_leaves_committed_checkpoints_and_gc_cleans_up(tmp_path, monkeypatch):
    state = training_state()
    save(state, tmp_path / "s0")
    reference = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    before = object_names(tmp_path)
    state["trained"] = torch.randn(32, 256)
    state["frozen"] = torch.randn(64, 256)
    real_put = ObjectStore.put
    calls = []

    def failing_put(self: ObjectStore, name: bytes, data: Any) -> int:
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_put(self, name, data)

    monkeypatch.setattr(ObjectStore, "put", failing_put)
    with pytest.raises(WriteError, match="No space left"):
        save(state, tmp_path / "s1", threads=1)
    monkeypatch.undo()
    assert not (tmp_path / "s1").exists()
    assert object_names(tmp_path) == before  # nothing got a name
    assert len(calls) == 3  # two objects were written before the failure ...
    assert os.listdir(tmp_path / "aptckpt-store" / "tmp") == []  # ... and removed by it
    assert_state_equal(reference, aptckpt.load(tmp_path / "s0"))
    aptckpt.collect_garbage(tmp_path)
    assert object_names(tmp_path) == before
    assert os.listdir(tmp_path / "aptckpt-store" / "tmp") == []


def test_interrupted_gc_breaks_nothing(tmp_path, monkeypatch):
    state = training_state()
    for i in range(6):
        save(state, tmp_path / f"s{i}", keyframe_every=3)
        step(state)
    for i in range(3):
        aptckpt.delete(tmp_path / f"s{i}")
    real_unlink = Path.unlink
    count = [0]

    def failing_unlink(self: Path, missing_ok: bool = False) -> None:
        count[0] += 1
        if count[0] == 2:
            raise OSError(5, "I/O error")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", failing_unlink)
    with pytest.raises(OSError, match="I/O error"):
        aptckpt.collect_garbage(tmp_path)
    monkeypatch.undo()
    for i in range(3, 6):
        aptckpt.verify(tmp_path / f"s{i}")
    aptckpt.collect_garbage(tmp_path)
    for i in range(3, 6):
        aptckpt.verify(tmp_path / f"s{i}")


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, aptckpt
    run = sys.argv[1]
    torch.manual_seed(0)
    state = {"w": torch.randn(1 << 20), "f": torch.randn(1 << 19)}
    for i in range(10_000):
        state["w"] += 1e-4 * torch.randn_like(state["w"])
        aptckpt.save(state, f"{run}/s{i:05d}", backend="delta", chunk_size=1 << 16,
                     keyframe_every=3)
        torch.save(state, f"{run}/expected-{i:05d}.pt")
        print(i, flush=True)
    """
)


def test_sigkill_during_saves_leaves_every_committed_checkpoint_loadable(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for _ in range(4):  # let a few saves finish, then kill one mid-flight
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    committed = sorted(p for p in run.iterdir() if p.name.startswith("s"))
    assert len(committed) >= 4
    aptckpt.collect_garbage(run)
    for ckpt in committed:
        expected = run / f"expected-{ckpt.name[1:]}.pt"
        loaded = aptckpt.load(ckpt)
        if expected.exists():
            assert_state_equal(torch.load(expected, weights_only=True), loaded)
    # the run goes on: a new save after the crash uses the surviving store
    aptckpt.save(loaded, run / "after", backend="delta", chunk_size=1 << 16)
    assert_state_equal(loaded, aptckpt.load(run / "after"))


def test_damaged_object_names_object_and_tensor(tmp_path):
    state = training_state()
    save(state, tmp_path / "s0")
    step(state)
    save(state, tmp_path / "s1")
    parsed = delta.parse_payload(aptckpt_manifest(tmp_path / "s0"), "t")
    trained = parsed.chunks[1][0]  # tensor 1 is 'trained', its first chunk
    path = Path(ObjectStore.open(tmp_path / "aptckpt-store").path(trained.name))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    # s0 reaches it directly; s1 reaches it as the base of an xor chain
    for ckpt in ("s0", "s1"):
        with pytest.raises(IntegrityError, match=r"tensor state\['trained'\], chunk 0") as info:
            aptckpt.verify(tmp_path / ckpt)
        assert info.value.tensor == "state['trained']"
        assert path.name in str(info.value)
    assert_state_equal(state["frozen"], aptckpt.load(tmp_path / "s1", verify=False)["frozen"])


def test_missing_object_is_reported(tmp_path):
    save(training_state(), tmp_path / "s0")
    parsed = delta.parse_payload(aptckpt_manifest(tmp_path / "s0"), "t")
    Path(ObjectStore.open(tmp_path / "aptckpt-store").path(parsed.chunks[0][0].name)).unlink()
    with pytest.raises(IntegrityError, match="missing from the store"):
        aptckpt.load(tmp_path / "s0")


def test_save_after_objects_vanished_rewrites_them(tmp_path):
    state = training_state()
    save(state, tmp_path / "s0")
    shutil.rmtree(tmp_path / "aptckpt-store" / "objects")
    (tmp_path / "aptckpt-store" / "objects").mkdir()
    step(state)
    save(state, tmp_path / "s1")
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))


def _object_row(p: dict[str, Any], index: int, **fields: Any) -> list[Any]:
    order = ["name", "size", "raw_size", "codec", "digest", "base"]
    row = list(p["objects"][index])
    for key, value in fields.items():
        row[order.index(key)] = value
    return row


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: {"store": {"up": 0, "name": "aptckpt-store"}}, "out of range"),
        (lambda p: {"store": {"up": 1, "name": "../etc"}}, "unsafe"),
        (lambda p: {"store": "aptckpt-store"}, "names no store"),
        (lambda p: {"since_keyframe": 9}, "since_keyframe"),
        (lambda p: {"objects": [_object_row(p, 0, base=0), *p["objects"][1:]]}, "earlier"),
        (lambda p: {"objects": [_object_row(p, 0, base=-1), *p["objects"][1:]]}, "earlier"),
        (lambda p: {"objects": [_object_row(p, 0, raw_size=5), *p["objects"][1:]]}, "fit its"),
        (lambda p: {"chunks": [p["chunks"][0], p["chunks"][0]]}, "decodes to 400 bytes"),
        (lambda p: {"objects": [_object_row(p, 0, codec=99), *p["objects"][1:]]}, "missing codec"),
        (lambda p: {"objects": [_object_row(p, 0, name=b"x"), *p["objects"][1:]]}, "16-byte"),
        (lambda p: {"objects": [[1, 2], *p["objects"][1:]]}, "6-item"),
        (lambda p: {"chunks": [[99], *p["chunks"][1:]]}, "missing object"),
        (lambda p: {"chunks": p["chunks"][:-1]}, "every tensor"),
        (lambda p: {"base": "/etc/passwd"}, "unsafe"),
        (lambda p: {"codecs": [[{"id": "lz4"}]]}, "unknown codec step"),
    ],
)
def test_hostile_payloads_are_refused(tmp_path, mutate, message):
    save({"a": torch.randn(100), "b": torch.randn(50)}, tmp_path / "c")
    rewrite_payload(tmp_path / "c", **mutate(payload(tmp_path / "c")))
    with pytest.raises(FormatError, match=message):
        aptckpt.load(tmp_path / "c")


def test_xor_object_without_base_is_refused(tmp_path):
    state = {"a": torch.randn(1000)}
    save(state, tmp_path / "s0")
    state["a"] += 1e-6
    save(state, tmp_path / "s1")
    p = payload(tmp_path / "s1")
    rows = [list(r) for r in p["objects"]]
    xor_row = next(i for i, r in enumerate(rows) if r[5] is not None)
    rows[xor_row][5] = None
    rewrite_payload(tmp_path / "s1", objects=rows)
    with pytest.raises(FormatError, match="exactly when its codec starts with xor"):
        aptckpt.load(tmp_path / "s1")


# ------------------------------------------------- random histories (property)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("save"), st.sampled_from(["small", "big", "same", "new", "shape"])),
            st.tuples(st.just("delete"), st.integers(0, 20)),
            st.tuples(st.just("gc"), st.just(0)),
        ),
        min_size=1,
        max_size=12,
    ),
    every=st.integers(1, 4),
)
def test_random_histories_never_break_a_checkpoint(tmp_path_factory, ops, every):
    """Any interleaving of saves, deletions and collections keeps every remaining
    checkpoint loadable, bit for bit."""
    run = tmp_path_factory.mktemp("run")
    gen = torch.Generator().manual_seed(len(ops))
    state = {"w": torch.randn(700, generator=gen), "v": torch.randn(300, generator=gen).half()}
    alive: dict[Path, dict[str, torch.Tensor]] = {}
    for n, (op, arg) in enumerate(ops):
        if op == "save":
            if arg == "small":
                state["w"][::7] += 1e-3
            elif arg == "big":
                state["w"] = state["w"] * 1.5
            elif arg == "new":
                state["v"] = torch.randn(300, generator=gen).half()
            elif arg == "shape":
                state["w"] = torch.randn(int(torch.randint(1, 900, (1,), generator=gen)))
            path = run / f"c{n}"
            aptckpt.save(state, path, backend="delta", chunk_size=256, keyframe_every=every)
            alive[path] = {k: v.clone() for k, v in state.items()}
        elif op == "delete" and alive:
            victim = sorted(alive)[arg % len(alive)]
            aptckpt.delete(victim)
            del alive[victim]
        elif op == "gc" and (run / "aptckpt-store").exists():
            aptckpt.collect_garbage(run)
    if (run / "aptckpt-store").exists():
        aptckpt.collect_garbage(run)
    for path, expected in alive.items():
        assert_state_equal(expected, aptckpt.load(path))


def test_recent_chunks_in_memory_give_the_same_checkpoints_as_decoding(tmp_path, monkeypatch):
    """Deltas taken against chunks kept in memory from the last save, or decoded from
    the store, are the same bytes; a clobbered memory entry is not used."""

    def history(run: Path) -> list[Any]:
        torch.manual_seed(0)  # step() draws from the global generator
        state = training_state()
        for i in range(4):
            save(state, run / f"s{i}")
            step(state)
        return [payload(run / f"s{i}")["objects"] for i in range(4)]

    with_cache = history(tmp_path / "cached")
    kept = delta._recent._stores.get(str(tmp_path / "cached" / "aptckpt-store"))
    assert kept  # the last save's new chunks stayed in memory
    monkeypatch.setenv("APTCKPT_DELTA_CACHE_BYTES", "0")
    assert history(tmp_path / "decoded") == with_cache
    monkeypatch.delenv("APTCKPT_DELTA_CACHE_BYTES")
    for entries in delta._recent._stores.values():
        for buffer in entries.values():
            buffer[0] ^= 1  # memory corruption, or a caller mutating a kept chunk
    state = aptckpt.load(tmp_path / "cached" / "s3")
    step(state)
    save(state, tmp_path / "cached" / "s4")
    assert_state_equal(state, aptckpt.load(tmp_path / "cached" / "s4"))


def test_dense_changes_keep_chains_short(tmp_path):
    """When every value changes, an xor link saves little, so chains are cut early
    rather than growing to keyframe_every: loads stay cheap."""
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64 * 1024, generator=gen)}
    for i in range(8):
        save(state, tmp_path / f"s{i}", chunk_size=64 * 1024)
        state["w"] = state["w"] + 1e-2 * torch.randn(64 * 1024, generator=gen)
    depths = [
        max(o.depth for o in delta.parse_payload(aptckpt_manifest(tmp_path / f"s{i}"), "t").objects)
        for i in range(8)
    ]
    assert max(depths) <= 2, depths


def test_damage_in_the_local_shard_is_found_and_named(tmp_path):
    state = {"small": torch.arange(100.0), "big": torch.randn(64 << 10)}
    save(state, tmp_path / "s0", local_below=16 << 10)
    shard = tmp_path / "s0" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[8] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(aptckpt.IntegrityError, match=r"state\['small'\].*shard-00000.bin"):
        aptckpt.load(tmp_path / "s0")
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(aptckpt.IntegrityError, match="truncated"):
        aptckpt.load(tmp_path / "s0")
    shard.unlink()
    with pytest.raises(aptckpt.IntegrityError, match="missing"):
        aptckpt.verify(tmp_path / "s0")


def test_a_base_that_kept_a_tensor_in_its_shard_is_no_delta_base_for_it(tmp_path):
    # The same key stored locally in the base (under its local_below) and as objects now.
    state = {"w": torch.zeros(2048)}  # 8 KiB
    save(state, tmp_path / "a", local_below=16 << 10)
    state["w"][0] = 1
    save(state, tmp_path / "b", local_below=0, base=tmp_path / "a")
    assert_state_equal(state, aptckpt.load(tmp_path / "b"))


def test_bases_named_outside_the_path_rule_are_not_recorded_and_saves_go_on(tmp_path):
    # Lightning names checkpoints "epoch=3-step=40.ckpt": "=" is outside the manifest path
    # rule, so the informational base name is left out instead of failing the save.
    state = {"w": torch.randn(64 << 10)}
    save(state, tmp_path / "epoch=0.ckpt")
    state["w"][:10] += 1
    save(state, tmp_path / "epoch=1.ckpt")
    save(state, tmp_path / "plain")
    save(state, tmp_path / "plain2")
    payloads = [
        delta.parse_payload(aptckpt_manifest(tmp_path / n), "t")
        for n in ("epoch=1.ckpt", "plain", "plain2")
    ]
    assert [p.base for p in payloads] == [None, None, "plain"]  # recorded where it can be
    assert [p.since_keyframe for p in payloads] == [1, 2, 3]  # each still deltas on the last
    assert_state_equal(state, aptckpt.load(tmp_path / "epoch=1.ckpt"))
