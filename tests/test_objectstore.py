"""objectstore: layout, durability rules, locking, safe reads, store locations."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import msgpack
import pytest

from aptckpt import _accel, objectstore
from aptckpt.errors import (
    FormatError,
    IntegrityError,
    StoreBusyError,
    UnreadableError,
    UnsafePathError,
)
from aptckpt.objectstore import ObjectStore
from aptckpt.storage import LocalStorage


def put(store: ObjectStore, data: bytes) -> bytes:
    name = _accel.xxh3_128(data)
    store.put(name, data)
    store.sync()
    return name


def test_create_makes_layout_and_reopens(tmp_path):
    store = ObjectStore.create(tmp_path / "s")
    assert sorted(os.listdir(tmp_path / "s")) == ["LOCK", "STORE", "objects", "packs", "tmp"]
    assert objectstore.is_store(tmp_path / "s")
    name = put(store, b"hello")
    again = ObjectStore.create(tmp_path / "s")  # idempotent
    assert again.read(name, 5) == b"hello"
    assert ObjectStore.open(tmp_path / "s").read(name, 5) == b"hello"


def test_create_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(FormatError, match="not an aptckpt object store"):
        ObjectStore.create(tmp_path / "s")
    assert os.listdir(tmp_path / "s") == ["notes.txt"]


def test_open_missing_store_names_the_fix(tmp_path):
    with pytest.raises(IntegrityError, match=r"copy the whole run directory.*convert"):
        ObjectStore.open(tmp_path / "nope", where="ckpt")


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        (b"garbage", "not an aptckpt store marker"),
        (msgpack.packb({"format": "aptckpt-store", "version": 99}), "layout version 99"),
        (msgpack.packb({"format": "other", "version": 1}), "not an aptckpt store marker"),
    ],
)
def test_bad_marker_is_refused(tmp_path, marker, message):
    ObjectStore.create(tmp_path / "s")
    (tmp_path / "s" / "STORE").write_bytes(marker)
    with pytest.raises(FormatError, match=message):
        ObjectStore.open(tmp_path / "s")


def test_put_is_content_addressed_idempotent_and_named_at_sync(tmp_path):
    store = ObjectStore.create(tmp_path / "s")
    data = os.urandom(1000)
    name = _accel.xxh3_128(data)
    assert store.put(name, data) == 1000
    assert not Path(store.path(name)).exists()  # written (whole, durably) at sync at the latest
    store.sync()
    assert Path(store.path(name)).name == name.hex()
    assert Path(store.path(name)).read_bytes() == data
    assert os.listdir(tmp_path / "s" / "tmp") == []
    assert [n for n in os.listdir(tmp_path / "s" / "objects")] == [name.hex()]  # no debris
    assert store.put(name, data) == 0  # present: nothing written
    store.sync()
    assert [(n, s) for n, _, s in store.names()] == [(name, 1000)]


def test_read_checks_size_and_presence(tmp_path):
    store = ObjectStore.create(tmp_path / "s")
    name = put(store, b"abcdef")
    with pytest.raises(IntegrityError, match="is 6 bytes, manifest says 7"):
        store.read(name, 7)
    Path(store.path(name)).unlink()
    with pytest.raises(IntegrityError, match="missing from the store"):
        store.read(name, 6)
    out = bytearray(6)
    with pytest.raises(IntegrityError, match="missing"):
        store.read_into(name, memoryview(out))


def test_links_are_refused(tmp_path):
    store = ObjectStore.create(tmp_path / "s")
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    name = _accel.xxh3_128(b"secret")
    Path(store.path(name)).symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        store.read(name, 6)
    # the objects directory itself a link
    other = _accel.xxh3_128(b"other")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / other.hex()).write_bytes(b"other")
    shutil.rmtree(store.objects)
    Path(store.objects).symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        store.read(other, 5)


def test_names_skip_foreign_files(tmp_path):
    store = ObjectStore.create(tmp_path / "s")
    name = put(store, b"x")
    objects = Path(store.objects)
    (objects / "zz").mkdir()
    (objects / "not-hex").write_bytes(b"")
    (objects / "README").write_text("hi")
    assert [n for n, _, _ in store.names()] == [name]


def test_lock_shared_allows_shared_but_not_exclusive(tmp_path):
    store = ObjectStore.create(tmp_path / "s")
    with (
        store.lock(exclusive=False),
        store.lock(exclusive=False),
        pytest.raises(StoreBusyError, match="in use"),
        store.lock(exclusive=True, wait=False),
    ):
        pass
    with store.lock(exclusive=True, wait=False):
        pass  # free again


def test_exclusive_lock_waits_for_the_save(tmp_path):
    store = ObjectStore.create(tmp_path / "s")
    order = []
    held = threading.Event()

    def save() -> None:
        with store.lock(exclusive=False):
            held.set()
            threading.Event().wait(0.2)
            order.append("save done")

    worker = threading.Thread(target=save)
    worker.start()
    held.wait()
    with store.lock(exclusive=True):
        order.append("gc")
    worker.join()
    assert order == ["save done", "gc"]


def test_a_read_only_user_still_holds_the_lock_that_keeps_gc_out(tmp_path, monkeypatch):
    """Loads hold the store lock shared; a user who may not write the lock file (or a
    read-only mount) takes it through a read-only descriptor."""
    store = ObjectStore.create(tmp_path / "s")
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with store.reading():
        monkeypatch.undo()
        with pytest.raises(StoreBusyError, match="a load"), store.lock(exclusive=True, wait=False):
            pass
    with store.lock(exclusive=True, wait=False):
        pass  # released


def test_a_load_without_any_access_to_the_lock_file_goes_on(tmp_path, monkeypatch):
    store = ObjectStore.create(tmp_path / "s")
    name = put(store, b"data")
    (tmp_path / "s" / "LOCK").unlink()
    monkeypatch.setattr(os, "open", _refusing(os.open, "LOCK"))
    with store.reading():
        assert store.read(name, 4) == b"data"


def _refusing(real, name):
    def open_(path, flags, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == name:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, flags, *args, **kwargs)

    return open_


def test_unsynced_objects_are_never_named_and_old_temps_are_cleared(tmp_path):
    store = ObjectStore.create(tmp_path / "s")
    with store.lock(exclusive=False):
        store.put(_accel.xxh3_128(b"y"), b"y")  # a save that died before sync()
    store.sync()  # nothing left to write: the lock's end dropped it
    assert list(store.names()) == []
    (tmp_path / "s" / "tmp" / "abc.123-0badf00d").write_bytes(b"y")  # an older version's
    assert store.clear_tmp() == 1
    assert os.listdir(tmp_path / "s" / "tmp") == []


# ----------------------------------------------------------------- locations


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_location_round_trip(tmp_path, depth):
    parent = tmp_path.joinpath(*[f"d{i}" for i in range(depth)])
    checkpoint = parent / "ckpt"
    store = tmp_path / "aptckpt-store"
    up, name = objectstore.location_of(store, checkpoint)
    assert (up, name) == (depth + 1, "aptckpt-store")
    assert objectstore.resolve_location(checkpoint, up, name, where="w") == os.path.realpath(store)


@pytest.mark.parametrize(
    "store", ["elsewhere/aptckpt-store", "runs/a/ckpt/store", "runs/a/.hidden"], ids=str
)
def test_location_must_contain_the_checkpoint(tmp_path, store):
    with pytest.raises(UnsafePathError):
        objectstore.location_of(tmp_path / store, tmp_path / "runs" / "a" / "ckpt")


def test_location_depth_is_bounded(tmp_path):
    deep = tmp_path.joinpath(*["d"] * objectstore.MAX_STORE_DEPTH) / "ckpt"
    with pytest.raises(UnsafePathError, match="levels below"):
        objectstore.location_of(tmp_path / "s", deep)


@pytest.mark.parametrize(
    ("up", "name"),
    [(0, "s"), (17, "s"), ("1", "s"), (True, "s"), (1, "../s"), (1, "a/b"), (1, ".s"), (1, "")],
)
def test_hostile_locations_are_refused(tmp_path, up, name):
    with pytest.raises(FormatError):
        objectstore.resolve_location(tmp_path / "ckpt", up, name, where="w")


def test_find_checkpoints_skips_temps_store_and_links(tmp_path):
    for rel in ("a/c1", "a/b/c2", ".c3.tmp-123-abcdef01", "aptckpt-store/objects/c4"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "manifest.msgpack").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    found = objectstore.find_checkpoints(tmp_path, skip=tmp_path / "aptckpt-store")
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p in found) == ["a/b/c2", "a/c1"]


def test_find_checkpoints_strict_names_a_directory_it_cannot_read(tmp_path, monkeypatch):
    (tmp_path / "a" / "c1").mkdir(parents=True)
    (tmp_path / "a" / "c1" / "manifest.msgpack").write_bytes(b"")
    (tmp_path / "b").mkdir()
    real = os.scandir

    def scandir(path):
        if os.fspath(path) == str(tmp_path / "b"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert [Path(p).name for p in objectstore.find_checkpoints(tmp_path)] == ["c1"]  # skipped
    with pytest.raises(UnreadableError, match=r"cannot read directory '.*/b'") as info:
        list(objectstore.find_checkpoints(tmp_path, strict=True))
    assert info.value.path == str(tmp_path / "b")


def test_store_appears_complete_or_not_at_all(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # dies before the marker is written

    monkeypatch.setattr(LocalStorage, "create_file", killed)
    with pytest.raises(KeyboardInterrupt):
        ObjectStore.create(tmp_path / "aptckpt-store")
    monkeypatch.undo()
    # no marker-less store with contents that would block the next save: the marker comes
    # first, into an empty directory, which the next save uses
    assert os.listdir(tmp_path / "aptckpt-store") == []
    assert not objectstore.is_store(tmp_path / "aptckpt-store")
    store = ObjectStore.create(tmp_path / "aptckpt-store")
    assert objectstore.is_store(store.root)
    assert ObjectStore.create(tmp_path / "aptckpt-store").root == store.root


def _blobs(count: int, size: int) -> list[tuple[bytes, bytes]]:
    blobs = [os.urandom(size) for _ in range(count)]
    return [(_accel.xxh3_128(b), b) for b in blobs]


def test_full_batches_are_written_behind_and_all_named_by_sync(tmp_path, monkeypatch):
    monkeypatch.setattr(objectstore, "_BATCH_BYTES", 3000)
    store = ObjectStore.create(tmp_path / "s")
    seen: list[int] = []
    real = store.storage.put_files

    def spy(items, **kwargs):
        seen.append(len(items))
        return real(items, **kwargs)

    monkeypatch.setattr(store.storage, "put_files", spy)
    blobs = _blobs(10, 1000)
    for name, data in blobs:
        store.put(name, data)
    assert sum(seen) >= 6  # three full batches went to the storage before sync
    store.sync()
    assert sum(seen) == 10 and store._writer is None  # no thread outlives sync
    for name, data in blobs:
        assert store.read(name, len(data)) == data


def test_an_error_written_behind_surfaces_at_the_next_put_or_sync(tmp_path, monkeypatch):
    monkeypatch.setattr(objectstore, "_BATCH_BYTES", 3000)
    store = ObjectStore.create(tmp_path / "s")

    def full_disk(items, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.storage, "put_files", full_disk)

    def save() -> None:
        for name, data in _blobs(20, 1000):  # the first batch fails behind; a later put sees it
            store.put(name, data)
        store.sync()

    with pytest.raises(OSError, match="No space"):
        save()
    store.discard_pending()
    assert store._writer is None and store._writing is None


def test_a_failed_save_waits_for_the_batch_behind_before_discarding(tmp_path, monkeypatch):
    monkeypatch.setattr(objectstore, "_BATCH_BYTES", 3000)
    store = ObjectStore.create(tmp_path / "s")
    release = threading.Event()
    real = store.storage.put_files
    done: list[int] = []

    def slow(items, **kwargs):
        release.wait(5)
        real(items, **kwargs)
        done.append(len(items))

    monkeypatch.setattr(store.storage, "put_files", slow)
    for name, data in _blobs(3, 1000):
        store.put(name, data)  # the third fills a batch: written behind, held by `slow`
    threading.Timer(0.2, release.set).start()
    store.discard_pending()  # returns only once that batch has ended: nothing writes after
    assert done == [3] and store._writer is None


def test_puts_from_many_threads_lose_no_object(tmp_path, monkeypatch):
    monkeypatch.setattr(objectstore, "_BATCH_BYTES", 5000)
    store = ObjectStore.create(tmp_path / "s")
    blobs = _blobs(64, 700)

    def worker(part: list[tuple[bytes, bytes]]) -> None:
        for name, data in part:
            store.put(name, data)

    threads = [threading.Thread(target=worker, args=(blobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.sync()
    for name, data in blobs:
        assert store.read(name, len(data)) == data
