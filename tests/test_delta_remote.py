"""The ``delta`` backend and its object store on an object store (``memory://``): sharing,
loads, damage named by URL, the age rule of garbage collection, cheap base finding."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch

import aptckpt
from aptckpt.backends import delta
from aptckpt.objectstore import ObjectStore
from aptckpt.storage import resolve
from aptckpt.storage.remote import FsspecStorage
from aptckpt.storage.remote._writer import RemoteCheckpointWriter
from aptckpt.testing import assert_state_equal

CHUNK = 4096
GRACE = 600.0


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh run URL in the process-wide memory file system, removed afterwards."""
    monkeypatch.setenv("APTCKPT_REMOTE_GRACE_S", str(GRACE))
    bucket = f"delta-{uuid.uuid4().hex[:12]}"
    yield f"memory://{bucket}/run"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


def save(state: Any, url: str, **options: Any) -> aptckpt.SaveInfo:
    options.setdefault("chunk_size", CHUNK)
    options.setdefault("local_below", 0)
    options.setdefault("pack_below", 0)  # loose objects here; tests/test_delta_packs.py: packs
    return aptckpt.save(state, url, backend="delta", **options)


def training_state(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "frozen": torch.randn(64, 256, generator=gen),
        "trained": torch.randn(32, 256, generator=gen),
        "small": torch.arange(10.0),
        "step": 0,
    }


def manifest(url: str) -> Any:
    storage, path = resolve(url)
    with storage.open_checkpoint(path) as reader:
        return reader.read_manifest()


def store_of(url: str) -> ObjectStore:
    storage, path = resolve(url)
    return ObjectStore.open(storage.join(path, "aptckpt-store"), storage=storage)


def objects(url: str) -> dict[bytes, str]:
    return {name: path for name, path, _ in store_of(url).names()}


def age(path: str, seconds: float) -> None:
    """Make the memory file system say ``path`` was written ``seconds`` ago."""
    found = fsspec.filesystem("memory").store[path]
    found.created = datetime.datetime.now(tz=datetime.timezone.utc) - datetime.timedelta(
        seconds=seconds
    )
    if hasattr(found, "modified"):
        found.modified = found.created


def test_store_lives_in_the_parent_prefix_and_resaves_share_objects(run):
    state = training_state()
    first = save(state, f"{run}/s0", local_below=1024)
    storage, path = resolve(run)
    assert [e.name for e in storage.list(path)] == ["aptckpt-store", "s0"]
    before = objects(run)
    state["trained"][0, :8] += 1.0  # one chunk of one tensor changes
    second = save(state, f"{run}/s1", local_below=1024)
    after = objects(run)
    assert set(before) <= set(after)
    assert len(after) - len(before) == 1  # the changed chunk: one new object
    assert second.stored_bytes < first.stored_bytes / 20
    assert_state_equal(state, aptckpt.load(f"{run}/s1"))
    aptckpt.verify(f"{run}/s0")
    loaded = aptckpt.load(f"{run}/s0")
    assert not torch.equal(loaded["trained"], state["trained"])


def test_damage_names_the_object_url(run):
    state = training_state()
    save(state, f"{run}/s0")
    payload = delta.parse_payload(manifest(f"{run}/s0"), "t")
    victim = payload.chunks[1][0]  # 'trained', chunk 0
    store = store_of(run)
    path = store.path(victim.name)
    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat(path))
    data[len(data) // 2] ^= 1
    fs.pipe(path, bytes(data))
    url = f"{run}/aptckpt-store/objects/{victim.name.hex()}"
    with pytest.raises(aptckpt.IntegrityError, match=r"state\['trained'\], chunk 0") as info:
        aptckpt.verify(f"{run}/s0")
    assert url in str(info.value)
    fs.rm(path)
    with pytest.raises(aptckpt.IntegrityError, match="missing from the store") as info:
        aptckpt.load(f"{run}/s0")
    assert url in str(info.value)


def test_gc_age_rule(run):
    """Old unreferenced objects go; fresh unreferenced ones (a save in flight may commit
    a manifest reaching them) and referenced ones, however old, stay."""
    save(training_state(0), f"{run}/s0")
    kept_state = training_state(1)
    save(kept_state, f"{run}/s1")
    referenced = objects(run)
    aptckpt.delete(f"{run}/s0")
    s1 = delta.parse_payload(manifest(f"{run}/s1"), "t")
    reached = {o.name for o in s1.objects}
    orphans = sorted(set(referenced) - reached)
    assert len(orphans) >= 4
    old, fresh = orphans[: len(orphans) // 2], orphans[len(orphans) // 2 :]
    for name in old:
        age(referenced[name], 2 * GRACE)
    for name in reached:
        age(referenced[name], 10 * GRACE)
    dry = aptckpt.collect_garbage(run, dry_run=True)
    assert (dry.removed_objects, dry.young_objects) == (len(old), len(fresh))
    assert set(objects(run)) == set(referenced)
    report = aptckpt.collect_garbage(run, storage_options=None)
    assert report.checkpoints == 1
    assert report.removed_objects == len(old)
    assert report.young_objects == len(fresh)
    assert report.store == f"{run}/aptckpt-store"
    assert set(objects(run)) == reached | set(fresh)
    assert_state_equal(kept_state, aptckpt.load(f"{run}/s1"))
    for name in fresh:
        age(referenced[name], 2 * GRACE)
    assert aptckpt.collect_garbage(f"{run}/aptckpt-store").removed_objects == len(fresh)
    assert set(objects(run)) == reached


def test_a_save_killed_before_its_manifest_leaves_objects_gc_takes_after_grace(run, monkeypatch):
    state = training_state()
    save(state, f"{run}/s0")
    committed = objects(run)

    def killed(self: Any, manifest_bytes: bytes) -> None:
        raise KeyboardInterrupt  # after the objects, before the manifest

    state["trained"] += 1.0
    with monkeypatch.context() as patched:
        patched.setattr(RemoteCheckpointWriter, "commit", killed)
        with pytest.raises(KeyboardInterrupt):
            save(state, f"{run}/s1")
    storage, path = resolve(f"{run}/s1")
    assert not storage.is_checkpoint(path)
    written = set(objects(run)) - set(committed)
    assert written  # the dead save's objects, reached by no manifest
    report = aptckpt.collect_garbage(run)
    assert (report.removed_objects, report.young_objects) == (0, len(written))
    for name, where in objects(run).items():
        if name in written:
            age(where, 2 * GRACE)
    report = aptckpt.collect_garbage(run)
    assert report.removed_objects == len(written)
    assert set(objects(run)) == set(committed)
    aptckpt.verify(f"{run}/s0")


def test_an_old_unreferenced_object_is_written_again_not_trusted(run):
    """Without locks a save counts on an object it finds only while it is young: an old
    unreferenced one may be collected before the save commits."""
    state = {"w": torch.randn(4096)}
    save(state, f"{run}/a")
    aptckpt.delete(f"{run}/a")
    names = objects(run)
    for where in names.values():
        age(where, GRACE)  # older than half the grace: not to be counted on
    info = save(state, f"{run}/b")
    assert info.stored_bytes > 0  # written again (refreshing their age) ...
    fresh = store_of(run).storage
    assert all(
        fresh.info(where).mtime > datetime.datetime.now().timestamp() - 60  # type: ignore[union-attr]
        for where in names.values()
    )
    assert aptckpt.collect_garbage(run).removed_objects == 0  # ... so GC keeps them
    assert_state_equal(state, aptckpt.load(f"{run}/b"))


def test_base_finding_lists_only_the_parent_folder(run, monkeypatch):
    state = training_state()
    for i in range(3):
        save(state, f"{run}/ckpts/s{i}", store=f"{run}/aptckpt-store")
        state["trained"][i] += 1.0
    listed: list[str] = []
    real_list, real_walk = FsspecStorage.list, FsspecStorage.walk

    def list_(self: FsspecStorage, folder: str) -> Any:
        listed.append(folder)
        return real_list(self, folder)

    def walk(self: FsspecStorage, folder: str) -> Any:
        listed.append(f"walk {folder}")
        return real_walk(self, folder)

    with monkeypatch.context() as patched:
        patched.setattr(FsspecStorage, "list", list_)
        patched.setattr(FsspecStorage, "walk", walk)
        info = save(state, f"{run}/ckpts/s3", store=f"{run}/aptckpt-store")
    _, parent = resolve(f"{run}/ckpts")
    assert listed == [parent]  # one listing: the checkpoints next to the new one
    assert info.stored_bytes < 10_000  # and it found the newest as its base
    payload = delta.parse_payload(manifest(f"{run}/ckpts/s3"), "t")
    assert payload.base == "ckpts/s2"
    assert_state_equal(state, aptckpt.load(f"{run}/ckpts/s3"))
