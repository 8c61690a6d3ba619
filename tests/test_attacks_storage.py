"""Adversarial tests of the storage seam (object stores through fsspec, s3 on moto):
boundaries, hostile names, credentials, concurrency and faults. Each test states the
property it attacks."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt import manifest as mf
from aptckpt.errors import (
    AptckptError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    InvalidNameError,
)
from aptckpt.storage import RawRead
from conftest import S3_SECRET

fsspec = pytest.importorskip("fsspec")

from aptckpt.retention import KeepLast  # noqa: E402
from aptckpt.storage.remote import FsspecStorage, RetryPolicy  # noqa: E402

PART = 1024
FAST = RetryPolicy(tries=4, wait=0.001, wait_max=0.002)


@pytest.fixture(params=["memory", "s3"])
def where(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if request.param == "memory":
        return request.getfixturevalue("memory_url"), {}
    return request.getfixturevalue("s3_url"), request.getfixturevalue("s3_options")


def tuned(
    url: str, options: dict[str, Any], fs: Any = None, **kw: Any
) -> tuple[FsspecStorage, str]:
    shared, path = FsspecStorage.for_url(url, options)
    kw.setdefault("part_size", PART)
    kw.setdefault("retry", FAST)
    return FsspecStorage(fs or shared.fs, shared.scheme, options=options, **kw), path


def small_parts(
    monkeypatch: pytest.MonkeyPatch, url: str, options: dict[str, Any]
) -> FsspecStorage:
    """Make the cached storage the API uses for ``url`` use PART-byte parts."""
    shared, _ = FsspecStorage.for_url(url, options)
    monkeypatch.setattr(shared, "part_size", PART)
    monkeypatch.setattr(shared, "retry", FAST)
    monkeypatch.setattr(shared.store, "policy", FAST)
    return shared


def fake_manifest(records: list[mf.FileRecord]) -> bytes:
    return mf.encode(
        mf.Manifest(
            backend="zstd",
            options={},
            skeleton=["dict", []],
            tensors=(),
            files=tuple(records),
            payload=None,
        )
    )


SIZES = [0, 1, PART - 1, PART, PART + 1, 2 * PART, 3 * PART, 3 * PART + 1]


# ------------------------------------------------------------- boundaries at the seam


@pytest.mark.parametrize("step", [7, PART + 3])
def test_sink_sizes_around_the_part_size_round_trip(
    where: tuple[str, dict[str, Any]], step: int | None
) -> None:
    """Every size around a part boundary, written in pieces of every shape, reads back
    exactly: whole, streamed, and by verified ranged reads (joined up to a part)."""
    storage, path = tuned(*where, in_flight=2)
    blobs = {f"f{n}": bytes((i * 31 + n) % 251 for i in range(n)) for n in SIZES}
    with storage.create_checkpoint(path) as writer:
        for name, data in blobs.items():
            with writer.open(name) as sink:
                if step is None:
                    sink.write(data)
                else:
                    for i in range(0, len(data), step):
                        sink.write(memoryview(data)[i : i + step])
        writer.sync_files()
        records = writer.sizes()
        writer.commit(fake_manifest(records))
    assert [r.size for r in records] == SIZES
    reader = storage.open_checkpoint(path)
    files = reader.open_files(reader.read_manifest().files)
    assert not files.failed
    for index, data in enumerate(blobs.values()):
        assert files.stream(index).read() == data
        assert files.read(index, 0, len(data) + 10) == data
    # reads of exactly a part each, and reads crossing the parts, digests checked
    reads = []
    for index, data in enumerate(blobs.values()):
        for off in range(0, len(data), PART // 2):
            chunk = data[off : off + PART // 2]
            reads.append(RawRead(index, off, bytearray(len(chunk)), aptckpt_digest(chunk)))
    assert files.read_verify(reads, 4) == []
    for r in reads:
        data = list(blobs.values())[r.file]
        assert bytes(r.out) == data[r.offset : r.offset + len(r.out)]


def aptckpt_digest(data: bytes) -> bytes:
    from aptckpt import _accel

    return _accel.xxh3_128(data)


def _state(sizes: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{n}": torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g) for n in sizes}


@pytest.mark.parametrize("backend", ["zstd", "torch"])
def test_api_round_trip_with_chunks_equal_to_the_part(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """save/load/verify/inspect through s3 with PART-byte parts and (zstd) chunks of
    exactly PART bytes, uncompressed, so stored objects are multiples of the part."""
    small_parts(monkeypatch, s3_url, s3_options)
    state = _state(SIZES)
    opts: dict[str, Any] = {"codec": "none", "chunk_size": PART} if backend == "zstd" else {}
    url = f"{s3_url}/ck"
    aptckpt.save(state, url, backend=backend, storage_options=s3_options, **opts)
    got = aptckpt.load(url, storage_options=s3_options)
    assert got.keys() == state.keys()
    for k in state:
        assert torch.equal(got[k], state[k])
    aptckpt.verify(url, storage_options=s3_options)
    info = aptckpt.inspect(url, storage_options=s3_options)
    assert len(info.tensors) == len(state)
    # load into preallocated tensors
    into = {k: torch.zeros_like(v) for k, v in state.items()}
    result = aptckpt.load(url, into=into, storage_options=s3_options)
    assert not result.missing_keys and not result.unexpected_keys
    for k in state:
        assert torch.equal(into[k], state[k])


# ------------------------------------------------------------------- damage on s3


def _two_checkpoints(url: str, options: dict[str, Any]) -> tuple[str, str, Any]:
    """Two zstd checkpoints of equal layout, different bytes; (url_a, url_b, fs)."""
    a, b = f"{url}/a", f"{url}/b"
    g = torch.Generator().manual_seed(1)
    sa = {"w": torch.randn(600, generator=g), "v": torch.randn(300, generator=g)}
    sb = {"w": torch.randn(600, generator=g), "v": torch.randn(300, generator=g)}
    aptckpt.save(sa, a, storage_options=options, codec="none", chunk_size=PART)
    aptckpt.save(sb, b, storage_options=options, codec="none", chunk_size=PART)
    storage, _ = FsspecStorage.for_url(url, options)
    return a, b, storage.fs


def _data_objects(fs: Any, url: str) -> list[str]:
    return sorted(p for p in fs.find(url) if not p.endswith(mf.MANIFEST_NAME))


DAMAGE = ["truncate", "missing", "extra-byte", "flip-byte", "other-checkpoint", "empty"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_and_load_catch_damaged_data_on_s3(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """Every kind of damage to a data object is an IntegrityError naming the checkpoint's
    URL (never a raw botocore error, never wrong tensors)."""
    small_parts(monkeypatch, s3_url, s3_options)
    a, b, fs = _two_checkpoints(s3_url, s3_options)
    victim = _data_objects(fs, a)[0]
    data = fs.cat_file(victim)
    if damage == "truncate":
        fs.pipe_file(victim, data[:-5])
    elif damage == "missing":
        fs.rm_file(victim)
    elif damage == "extra-byte":
        fs.pipe_file(victim, data + b"\0")
    elif damage == "flip-byte":
        fs.pipe_file(victim, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "empty":
        fs.pipe_file(victim, b"")
    else:
        other = _data_objects(fs, b)[0]
        assert fs.size(other) == len(data)
        fs.pipe_file(victim, fs.cat_file(other))
    with pytest.raises(IntegrityError) as caught:
        aptckpt.verify(a, storage_options=s3_options)
    assert a.removeprefix("s3://") in str(caught.value)
    with pytest.raises(IntegrityError):
        aptckpt.load(a, storage_options=s3_options)
    # the other checkpoint is untouched
    aptckpt.verify(b, storage_options=s3_options)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "huge-claim"])
def test_damaged_manifest_on_s3_is_a_format_error(
    s3_url: str, s3_options: dict[str, Any], damage: str
) -> None:
    """A manifest truncated / replaced by garbage is a FormatError (or Integrity) naming
    the URL, for load, inspect and verify; the listing of a run does not crash."""
    url = f"{s3_url}/ck"
    aptckpt.save({"w": torch.arange(100.0)}, url, storage_options=s3_options)
    storage, _ = FsspecStorage.for_url(url, s3_options)
    fs = storage.fs
    m = f"{url}/{mf.MANIFEST_NAME}"
    data = fs.cat_file(m)
    fs.pipe_file(
        m,
        {
            "truncate": data[: len(data) // 2],
            "garbage": b"\x93garbage" * 50,
            "empty": b"",
            "huge-claim": b"\xdd\xff\xff\xff\xff",  # msgpack array32 of 4G entries
        }[damage],
    )
    for fn in (aptckpt.load, aptckpt.inspect, aptckpt.verify):
        with pytest.raises((FormatError, IntegrityError)) as caught:
            fn(url, storage_options=s3_options)
        assert "ck" in str(caught.value)


# ------------------------------------------------------------------ hostile names


HOSTILE = ["with space", "uni-é中", "pct%20x", "%", "q?x", "hash#x", "dbl//x", "trail/"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_checkpoint_names_round_trip_on_s3(
    s3_url: str, s3_options: dict[str, Any], name: str
) -> None:
    """Names with spaces, unicode, %, ?, #, // and a trailing slash save, list, load,
    verify and delete as themselves; nothing lands outside the checkpoint's prefix."""
    state = {"w": torch.arange(10.0)}
    url = f"{s3_url}/run/{name}"
    info = aptckpt.save(state, url, storage_options=s3_options)
    assert torch.equal(aptckpt.load(url, storage_options=s3_options)["w"], state["w"])
    aptckpt.verify(info.path, storage_options=s3_options)
    storage, path = FsspecStorage.for_url(url, s3_options)
    objects = storage.fs.find(s3_url)
    assert objects and all(o.startswith(path + "/") for o in objects), objects
    aptckpt.delete(url, storage_options=s3_options)
    assert storage.fs.find(s3_url) == []


def test_version_id_in_a_url_never_writes_another_object(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    """s3fs reads '?versionId=' in a path as an object version and drops it from the key:
    a save to '<run>/ck?versionId=1' must not write (or clobber) the object '<run>/ck'."""
    storage, path = FsspecStorage.for_url(s3_url, s3_options)
    storage.fs.pipe_file(f"{path}/run/ck", b"precious user data")
    url = f"{s3_url}/run/ck?versionId=1"
    with pytest.raises(AptckptError):
        aptckpt.save({"w": torch.arange(4.0)}, url, storage_options=s3_options, overwrite=True)
    assert storage.fs.cat_file(f"{path}/run/ck") == b"precious user data"
    # the storage itself refuses such a checkpoint path too (a run joined with a name)
    with pytest.raises(InvalidNameError):
        storage.create_checkpoint(f"{path}/run/ck?versionId=2", overwrite=True)
    assert storage.fs.cat_file(f"{path}/run/ck") == b"precious user data"


def test_checkpoint_at_a_prefix_holding_unrelated_objects(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving, overwriting, deleting and sweeping debris at a prefix that already holds
    a user's objects (some named like aptckpt's own) leaves every one of them alone."""
    monkeypatch.setenv("APTCKPT_REMOTE_GRACE_S", "0")
    storage, path = FsspecStorage.for_url(s3_url, s3_options)
    fs = storage.fs
    mine = {
        f"{path}/ck/notes.txt": b"n",
        f"{path}/ck/data/x.bin": b"d",
        f"{path}/ck/data-1/x.bin": b"d1",  # not a token (too short)
        f"{path}/ck/sub/manifest.msgpack": b"not a manifest",
    }
    for key, data in mine.items():
        fs.pipe_file(key, data)
    url = f"{s3_url}/ck"
    aptckpt.save({"w": torch.arange(4.0)}, url, storage_options=s3_options)
    aptckpt.save({"w": torch.arange(5.0)}, url, storage_options=s3_options, overwrite=True)
    storage.remove_debris(path, exclusive=True)
    storage.remove_debris(f"{path}/ck", exclusive=True)
    assert aptckpt.load(url, storage_options=s3_options)["w"].numel() == 5
    aptckpt.delete(url, storage_options=s3_options)
    for key, data in mine.items():
        assert fs.cat_file(key) == data


def test_bucket_root_checkpoint_round_trip(s3_url: str, s3_options: dict[str, Any]) -> None:
    """A checkpoint at the root of a bucket saves, loads, refuses a second save, deletes."""
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    url = f"s3://{bucket}"
    aptckpt.save({"w": torch.arange(3.0)}, url, storage_options=s3_options)
    assert aptckpt.load(f"{url}/", storage_options=s3_options)["w"].numel() == 3
    with pytest.raises(CheckpointExistsError):
        aptckpt.save({"w": torch.arange(3.0)}, f"{url}/", storage_options=s3_options)
    aptckpt.delete(url, storage_options=s3_options)
    with pytest.raises(CheckpointNotFoundError):
        aptckpt.load(url, storage_options=s3_options)


def test_non_checkpoint_named_like_a_checkpoint_in_a_run(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    """A run on s3 whose checkpoints/ holds an object and a folder named like the
    manager's checkpoints (no manifest): the manager lists neither, saves past them, and
    its retention never deletes them."""
    storage, path = FsspecStorage.for_url(s3_url, s3_options)
    fs = storage.fs
    alien = {
        f"{path}/checkpoints/apt_model_epoch0_step1": b"a file, not a checkpoint",
        f"{path}/checkpoints/apt_model_epoch0_step2/readme": b"a folder without manifest",
    }
    for key, data in alien.items():
        fs.pipe_file(key, data)
    mgr = aptckpt.CheckpointManager(s3_url, storage_options=s3_options, keep=KeepLast(1))
    try:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.arange(float(step))})
        records = mgr.checkpoints()
        assert [r.global_step for r in records] == [3]
    finally:
        mgr.close()
    for key, data in alien.items():
        assert fs.cat_file(key) == data


# ------------------------------------------------------------------- credentials


def _no_secret(secret: str, *texts: object) -> None:
    for text in texts:
        assert secret not in str(text), text


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    out = []
    for record in caplog.records:
        out.append(record.getMessage())
        if record.exc_info:
            out.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(out)


def _quick(url: str, options: dict[str, Any]) -> None:
    """Retries of the cached storage of ``url`` made fast (a failing endpoint retries)."""
    shared, _ = FsspecStorage.for_url(url, options)
    shared.retry = shared.store.policy = RetryPolicy(tries=2, wait=0.001, wait_max=0.002)


def test_secrets_never_shown_for_a_dead_endpoint(
    s3_options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint nothing listens on (a connection refused deep in botocore, retried):
    the error names the URL, and neither it, its repr, its notes nor any log record at
    DEBUG holds the secret."""
    caplog.set_level(logging.DEBUG)
    opts = dict(s3_options, endpoint_url="http://127.0.0.1:1")
    url = "s3://some-bucket/run/ck"
    _quick(url, opts)
    for action in (
        lambda: aptckpt.save({"w": torch.arange(3.0)}, url, storage_options=opts),
        lambda: aptckpt.load(url, storage_options=opts),
    ):
        with pytest.raises(AptckptError) as caught:
            action()
        err = caught.value
        assert "some-bucket/run/ck" in str(err)
        _no_secret(S3_SECRET, str(err), repr(err), getattr(err, "__notes__", ""))
    _no_secret(S3_SECRET, _log_text(caplog))


def test_secrets_never_shown_for_a_missing_bucket(
    s3_options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = "s3://no-such-bucket-aptckpt/run/ck"
    _quick(url, s3_options)
    with pytest.raises(AptckptError) as caught:
        aptckpt.save({"w": torch.arange(3.0)}, url, storage_options=s3_options)
    assert "no-such-bucket-aptckpt" in str(caught.value)
    _no_secret(S3_SECRET, str(caught.value), repr(caught.value))
    with pytest.raises(CheckpointNotFoundError) as missing:
        aptckpt.load(url, storage_options=s3_options)
    assert "bucket" in str(missing.value)
    _no_secret(S3_SECRET, str(missing.value), _log_text(caplog))


class _Echo403:
    """A file system whose writes fail with a 403 that echoes the request's credentials
    (as a misconfigured proxy or a verbose SDK message may)."""

    def __init__(self, fs: Any, secret: str) -> None:
        self._fs, self._secret = fs, secret

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def _deny(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(
            f"Access Denied for key=fake-key-id secret={self._secret} "
            f"url=http://fake-key-id:{self._secret}@host/bucket"
        )

    pipe_file = call_s3 = _deny


def test_secrets_scrubbed_from_a_403_that_echoes_them(
    s3_url: str, s3_options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    shared, path = FsspecStorage.for_url(s3_url, s3_options)
    storage = FsspecStorage(
        _Echo403(shared.fs, S3_SECRET), "s3", options=s3_options, part_size=PART, retry=FAST
    )

    def attempt() -> None:
        with storage.create_checkpoint(f"{path}/ck") as w:
            with w.open("f") as sink:
                sink.write(b"x" * 10)
            w.commit(fake_manifest(w.sizes()))

    with pytest.raises(AptckptError) as caught:
        attempt()
    err = caught.value
    assert "403" in str(err) or "credentials" in str(err)
    _no_secret(S3_SECRET, str(err), repr(err), _log_text(caplog))


def test_secrets_absent_from_everything_a_remote_run_writes_or_returns(
    s3_url: str, s3_options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A manager on s3: no object of the run (manifests, metadata.json, lease), no
    SaveInfo, CheckpointRecord, the manager's repr or its attributes' reprs (which a
    crash reporter capturing locals shows) holds the secret or the key id."""
    caplog.set_level(logging.DEBUG)
    mgr = aptckpt.CheckpointManager(s3_url, storage_options=s3_options, keep=KeepLast(3))
    try:
        mgr.save(1, {"w": torch.arange(4.0)}, metrics={"loss": 1.0})
        handle = mgr.save(2, {"w": torch.arange(4.0)}, blocking=False)
        mgr.wait()
        shown = [repr(mgr), repr(handle), repr(mgr.last_save_info)]
        shown += [repr(v) for v in vars(mgr).values()]
        shown += [repr(r) for r in mgr.checkpoints()]
        storage, path = FsspecStorage.for_url(s3_url, s3_options)
        blobs = [storage.fs.cat_file(p) for p in storage.fs.find(path)]
    finally:
        mgr.close()
    for blob in blobs:
        assert S3_SECRET.encode() not in blob
        assert b"fake-key-id" not in blob
    _no_secret(S3_SECRET, *shown, _log_text(caplog))


# ------------------------------------------------------------------- concurrency


def _run_threads(targets: list[Any]) -> list[BaseException | None]:
    barrier = threading.Barrier(len(targets))
    outcome: list[BaseException | None] = [None] * len(targets)

    def go(i: int) -> None:
        barrier.wait()
        try:
            targets[i]()
        except BaseException as err:  # reported to the test
            outcome[i] = err

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcome


def test_threads_saving_different_checkpoints_under_one_prefix(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    small_parts(monkeypatch, s3_url, s3_options)
    states = {f"ck{i}": {"w": torch.full((700,), float(i))} for i in range(6)}
    outcome = _run_threads(
        [
            (lambda n=n, s=s: aptckpt.save(s, f"{s3_url}/{n}", storage_options=s3_options))
            for n, s in states.items()
        ]
    )
    assert outcome == [None] * len(states)
    for n, s in states.items():
        assert torch.equal(aptckpt.load(f"{s3_url}/{n}", storage_options=s3_options)["w"], s["w"])


@pytest.mark.parametrize("rounds", [2])
def test_racing_overwrites_leave_one_whole_checkpoint_and_no_debris(
    where: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, rounds: int
) -> None:
    """Two threads overwrite one name at once: the result is exactly one of the two
    (loadable, verified), and after the debris sweep (grace 0) only its data is left."""
    url, options = where
    small_parts(monkeypatch, url, options)
    monkeypatch.setenv("APTCKPT_REMOTE_GRACE_S", "0")
    ck = f"{url}/ck"
    aptckpt.save({"w": torch.zeros(900)}, ck, storage_options=options)
    storage, path = FsspecStorage.for_url(ck, options)
    for r in range(rounds):
        a, b = torch.full((900,), 1.0 + r), torch.full((900,), -1.0 - r)
        outcome = _run_threads(
            [
                lambda t=t: aptckpt.save(
                    {"w": t}, ck, storage_options=options, overwrite=True, codec="none"
                )
                for t in (a, b)
            ]
        )
        assert outcome == [None, None]
        aptckpt.verify(ck, storage_options=options)
        got = aptckpt.load(ck, storage_options=options)["w"]
        assert torch.equal(got, a) or torch.equal(got, b)
        storage.remove_debris(storage.parent(path), exclusive=True)
        named = {f"{path}/{f.path}" for f in aptckpt.inspect(ck, storage_options=options).files}
        left = {storage.strip(p) for p in storage.fs.find(path)}
        assert left == named | {f"{path}/{mf.MANIFEST_NAME}"}


def test_manager_background_saves_in_a_loop_then_close(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    """Non-blocking saves on s3 in a loop (each waits for the last), close() at once:
    every checkpoint kept by retention is whole, the lease is released."""
    mgr = aptckpt.CheckpointManager(s3_url, storage_options=s3_options, keep=KeepLast(2))
    state = {"w": torch.zeros(2000)}
    for step in range(1, 5):
        state["w"].fill_(float(step))
        mgr.save(step, state, blocking=False)
    mgr.close()
    reader = aptckpt.CheckpointManager(s3_url, storage_options=s3_options, read_only=True)
    records = reader.checkpoints()
    assert [r.global_step for r in records] == [3, 4]
    for r in records:
        got = aptckpt.load(r.path, storage_options=s3_options)
        assert torch.equal(got["w"], torch.full((2000,), float(r.global_step)))
    storage, path = FsspecStorage.for_url(s3_url, s3_options)
    assert not storage.fs.exists(f"{path}/.aptckpt-run.lock")
    # and a new writer takes the run at once
    aptckpt.CheckpointManager(s3_url, storage_options=s3_options).close()


@pytest.mark.slow  # two interpreters importing torch: ~12 s
def test_two_processes_race_for_one_run(s3_url: str, s3_options: dict[str, Any]) -> None:
    """Two processes create a manager on one s3 run at the same instant: exactly one
    takes it, the other gets RunBusyError."""
    import json
    import os
    import subprocess
    import sys
    import time

    url = s3_url + "/run"
    start = time.time() + 4.0
    code = (
        "import json, sys, time, aptckpt\n"
        "time.sleep(max(0.0, float(sys.argv[3]) - time.time()))\n"
        "try:\n"
        "    m = aptckpt.CheckpointManager(sys.argv[1], storage_options=json.loads(sys.argv[2]))\n"
        "except aptckpt.RunBusyError:\n"
        "    print('BUSY'); sys.exit(3)\n"
        "print('TOOK'); sys.stdout.flush(); time.sleep(2); m.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", code, url, json.dumps(s3_options), str(start)]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs


# ------------------------------------------------------------------ faults at the seam


class Faulty:
    """A file system whose methods go through ``hook(name, real, args, kwargs)``."""

    def __init__(self, fs: Any, hook: Any) -> None:
        self._fs, self._hook = fs, hook
        self.lock = threading.Lock()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr) or name.startswith("_") or name in ("split_path",):
            return attr

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return self._hook(name, attr, args, kwargs)

        return wrapped


def _api_on(
    monkeypatch: pytest.MonkeyPatch, url: str, options: dict[str, Any], hook: Any
) -> Faulty:
    """Make the storage the API uses for ``url`` go through a Faulty file system."""
    shared = small_parts(monkeypatch, url, options)
    faulty = Faulty(shared.fs, hook)
    monkeypatch.setattr(shared, "fs", faulty)
    monkeypatch.setattr(shared.store, "fs", faulty)
    return faulty


_IO = {"pipe_file", "cat_file", "info", "ls", "find", "call_s3", "rm", "rm_file", "exists"}


def test_every_third_request_dropped_save_load_verify_still_work(
    where: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection dropped on every 3rd request (any kind): saves, overwrites, loads,
    verifies and deletes all succeed through the retries, with the right bytes."""
    url, options = where
    count = [0]
    lock = threading.Lock()

    def hook(name: str, real: Any, args: Any, kwargs: Any) -> Any:
        if name in _IO:
            with lock:
                count[0] += 1
                drop = count[0] % 3 == 0
            if drop:
                raise ConnectionResetError(104, "Connection reset by peer")
        return real(*args, **kwargs)

    _api_on(monkeypatch, url, options, hook)
    state = _state(SIZES)
    ck = f"{url}/ck"
    aptckpt.save(state, ck, storage_options=options, codec="none", chunk_size=PART)
    aptckpt.save(state, ck, storage_options=options, overwrite=True, chunk_size=PART)
    got = aptckpt.load(ck, storage_options=options)
    assert all(torch.equal(got[k], state[k]) for k in state)
    aptckpt.verify(ck, storage_options=options)
    aptckpt.delete(ck, storage_options=options)
    with pytest.raises(CheckpointNotFoundError):
        aptckpt.load(ck, storage_options=options)
    assert count[0] > 10


def test_manifest_create_succeeds_then_its_answer_is_lost(
    where: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's conditional create reaches the store, then the connection drops:
    the retry finds the manifest there (412). The save must count as committed (it is
    ours), not as a lost race that removes the data the manifest names."""
    url, options = where
    fired = [False]

    def hook(name: str, real: Any, args: Any, kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if name == "pipe_file" and str(args[0]).endswith(mf.MANIFEST_NAME) and not fired[0]:
            fired[0] = True
            raise ConnectionResetError(104, "Connection reset by peer")
        return result

    _api_on(monkeypatch, url, options, hook)
    ck = f"{url}/ck"
    state = {"w": torch.arange(700.0)}
    aptckpt.save(state, ck, storage_options=options)
    assert fired[0]
    assert torch.equal(aptckpt.load(ck, storage_options=options)["w"], state["w"])
    aptckpt.verify(ck, storage_options=options)


def test_manifest_written_then_the_store_goes_away_is_not_told_as_nothing_committed(
    where: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's create reaches the store, then every request fails until the save
    gives up: the checkpoint *is* committed (it loads later), so the error must not say
    'Nothing was committed', and its data must not be removed."""
    url, options = where
    down = [False]

    def hook(name: str, real: Any, args: Any, kwargs: Any) -> Any:
        if down[0] and name in _IO:
            raise ConnectionResetError(104, "Connection reset by peer")
        result = real(*args, **kwargs)
        if name == "pipe_file" and str(args[0]).endswith(mf.MANIFEST_NAME):
            down[0] = True
            raise ConnectionResetError(104, "Connection reset by peer")
        return result

    _api_on(monkeypatch, url, options, hook)
    ck = f"{url}/ck"
    state = {"w": torch.arange(700.0)}
    with pytest.raises(AptckptError) as caught:
        aptckpt.save(state, ck, storage_options=options)
    down[0] = False
    # the truth: it was committed, whole
    assert torch.equal(aptckpt.load(ck, storage_options=options)["w"], state["w"])
    assert "Nothing was committed" not in str(caught.value), str(caught.value)


def test_short_reads_are_never_wrong_tensors(
    where: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that answers ranged reads with fewer bytes than asked (no error): the
    load fails (retries or an error), it never returns tensors with missing bytes."""
    url, options = where
    ck = f"{url}/ck"
    state = {"w": torch.arange(2000.0)}
    aptckpt.save(state, ck, storage_options=options, codec="none", chunk_size=PART)
    short = [True]

    def hook(name: str, real: Any, args: Any, kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if short[0] and name == "cat_file" and "/data-" in str(args[0]) and len(result) > 8:
            return result[:-8]
        return result

    _api_on(monkeypatch, url, options, hook)
    for verify in (True, False):
        failed: AptckptError | None = None
        try:
            got = aptckpt.load(ck, storage_options=options, verify=verify)
        except AptckptError as err:
            failed = err
        if failed is not None:
            assert "ck" in str(failed)
        else:
            assert torch.equal(got["w"], state["w"])


@pytest.mark.parametrize("what", ["delete", "overwrite"])
def test_checkpoint_deleted_or_replaced_while_a_load_reads_it(
    where: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """Another writer deletes / overwrites the checkpoint after the load read its
    manifest, before its data reads: CheckpointDeletedError, never a mix."""
    from aptckpt.errors import CheckpointDeletedError

    url, options = where
    ck = f"{url}/ck"
    state = {"w": torch.arange(3000.0)}
    aptckpt.save(state, ck, storage_options=options, codec="none", chunk_size=PART)
    shared, _ = FsspecStorage.for_url(url, options)
    real_fs = shared.fs
    other, path = tuned(url, options, fs=real_fs)
    fired = [False]
    lock = threading.Lock()

    def hook(name: str, real: Any, args: Any, kwargs: Any) -> Any:
        if name == "cat_file" and "/data-" in str(args[0]):
            with lock:
                if not fired[0]:
                    fired[0] = True
                    if what == "delete":
                        other.delete_checkpoint(f"{path}/ck")
                    else:
                        w = other.create_checkpoint(f"{path}/ck", overwrite=True)
                        with w.open("x") as sink:
                            sink.write(b"new")
                        w.commit(fake_manifest(w.sizes()))
        return real(*args, **kwargs)

    _api_on(monkeypatch, url, options, hook)
    with pytest.raises(CheckpointDeletedError) as caught:
        aptckpt.load(ck, storage_options=options)
    assert "ck" in str(caught.value)


# ------------------------------------------------------------------------- leases


def test_close_releases_the_lease_even_when_a_renewal_lands_during_the_release(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() reads the lease's tag, then deletes it if unchanged. A renewal by the
    background thread landing between the two (a slow store) changes the tag: the
    delete is refused and the lease stays live for a whole ttl after a clean close, so
    the next trainer gets RunBusyError. close() must stop renewing before it releases."""
    from aptckpt import _runlock
    from aptckpt.storage.remote._store import Store

    monkeypatch.setattr(_runlock, "LEASE_TTL", 0.4)  # renewals every 0.1 s
    real_tagged = Store.tagged
    closing = threading.Event()

    def slow_tagged(self: Store, path: str) -> Any:
        found = real_tagged(self, path)
        if (
            closing.is_set()
            and path.endswith(".aptckpt-run.lock")
            and threading.current_thread() is threading.main_thread()
        ):
            time.sleep(0.35)  # the answer is slow to come back
        return found

    monkeypatch.setattr(Store, "tagged", slow_tagged)
    mgr = aptckpt.CheckpointManager(s3_url, storage_options=s3_options)
    time.sleep(0.15)
    closing.set()
    mgr.close()
    closing.clear()
    storage, path = FsspecStorage.for_url(s3_url, s3_options)
    time.sleep(0.05)
    assert not storage.fs.exists(f"{path}/.aptckpt-run.lock")


def test_a_holder_whose_lease_lapsed_unnoticed_does_not_save(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewing thread hangs on a dead connection for longer than the ttl; the
    lease expires and another writer takes the run. The holder's next save must not
    write into the run (RunBusyError): nothing told it the lease was lost, but nothing
    renewed it within its ttl either."""
    from aptckpt import _runlock
    from aptckpt.errors import RunBusyError
    from aptckpt.storage.remote._store import Store

    monkeypatch.setattr(_runlock, "LEASE_TTL", 0.6)  # renewals every 0.15 s
    hang = threading.Event()
    freed = threading.Event()
    real_tagged = Store.tagged

    def hung_tagged(self: Store, path: str) -> Any:
        if hang.is_set() and threading.current_thread().name == "aptckpt-lease":
            freed.wait(10)  # a connection that never answers
        return real_tagged(self, path)

    monkeypatch.setattr(Store, "tagged", hung_tagged)
    mgr = aptckpt.CheckpointManager(s3_url, storage_options=s3_options, keep=KeepLast(3))
    other = None
    try:
        mgr.save(1, {"w": torch.arange(3.0)})
        hang.set()
        time.sleep(1.0)  # past the ttl: the lease expired on the store
        storage, path = FsspecStorage.for_url(s3_url, s3_options)
        other = storage.lease(f"{path}/.aptckpt-run.lock", owner={"pid": 1, "host": "x"}, ttl=60)
        with pytest.raises(RunBusyError):
            mgr.save(2, {"w": torch.arange(3.0)})
        assert not storage.fs.exists(f"{path}/checkpoints/apt_model_epoch0_step2")
    finally:
        freed.set()
        hang.clear()
        with contextlib.suppress(Exception):
            mgr.close()
        if other is not None:
            other.release()


# --------------------------------------------------------------------- URL forms


def test_an_upper_case_scheme_names_the_same_place(s3_url: str, s3_options: dict[str, Any]) -> None:
    """'S3://bucket/key' is 's3://bucket/key' (schemes are case-insensitive, and the
    storage is picked case-insensitively): it must not save under a key or bucket that
    starts with 'S3:'."""
    upper = "S3" + s3_url[2:]
    aptckpt.save({"w": torch.arange(3.0)}, f"{upper}/ck", storage_options=s3_options)
    assert aptckpt.load(f"{s3_url}/ck", storage_options=s3_options)["w"].numel() == 3
    info = aptckpt.inspect(f"{upper}/ck", storage_options=s3_options)
    assert info.path == f"{s3_url}/ck"


def test_credentials_in_a_url_are_refused_not_scrubbed_into_the_path(memory_url: str) -> None:
    """'memory://user:pw@x/ck' must not save at the path '***@x/ck' (where any other
    user:password would land too); the error never shows the password."""
    url = memory_url.replace("memory://", "memory://user:hunter2pw@") + "/ck"
    with pytest.raises(AptckptError) as caught:
        aptckpt.save({"w": torch.arange(3.0)}, url)
    assert "hunter2pw" not in str(caught.value)
    assert "storage_options" in str(caught.value)


# ------------------------------------------------------------ hostile run contents


@pytest.mark.parametrize(
    "planted",
    [b'{"version": 1, "checkpoints": "nope"}', "prefix"],
)
def test_hostile_metadata_json_in_an_s3_run(
    s3_url: str, s3_options: dict[str, Any], planted: bytes | str
) -> None:
    """metadata.json replaced by garbage, JSON of the wrong shape, or a 'folder' (objects
    under metadata.json/): the manager rebuilds its index from the manifests and saves."""
    storage, path = FsspecStorage.for_url(s3_url, s3_options)
    with aptckpt.CheckpointManager(s3_url, storage_options=s3_options, keep=KeepLast(3)) as mgr:
        mgr.save(1, {"w": torch.arange(3.0)})
    if planted == "prefix":
        storage.fs.rm_file(f"{path}/metadata.json")
        storage.fs.pipe_file(f"{path}/metadata.json/x", b"{}")
    else:
        assert isinstance(planted, bytes)
        storage.fs.pipe_file(f"{path}/metadata.json", planted)
    with aptckpt.CheckpointManager(s3_url, storage_options=s3_options, keep=KeepLast(3)) as mgr:
        assert [r.global_step for r in mgr.checkpoints()] == [1]
        mgr.save(2, {"w": torch.arange(4.0)})
        assert [r.global_step for r in mgr.checkpoints()] == [1, 2]
        latest = mgr.latest()
        assert latest is not None
        assert aptckpt.load(latest.path, storage_options=s3_options)["w"].numel() == 4


def test_cli_storage_option_typo_never_echoes_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    """`--storage-option <secret>` (the KEY= forgotten) is a usage error that must not
    print the value back (terminals and CI logs keep it)."""
    from aptckpt.cli._common import UsageError, parse_storage_options

    with pytest.raises(UsageError) as caught:
        parse_storage_options(["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"])
    assert "wJalrXUtnFEMI" not in str(caught.value)


def test_lease_renewal_failures_are_logged_without_secrets(
    s3_url: str,
    s3_options: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A renewal (and the release) failing with an error that echoes the credentials: the
    warnings the lease thread logs are scrubbed like every other message."""
    from aptckpt import _runlock

    caplog.set_level(logging.DEBUG, logger="aptckpt")
    monkeypatch.setattr(_runlock, "LEASE_TTL", 0.4)  # renewals every 0.1 s
    shared, _ = FsspecStorage.for_url(s3_url, s3_options)
    deny = threading.Event()

    def hook(name: str, real: Any, args: Any, kwargs: Any) -> Any:
        if deny.is_set() and name == "call_s3" and args[0] in ("put_object", "delete_object"):
            raise PermissionError(f"Access Denied (secret={S3_SECRET})")
        return real(*args, **kwargs)

    faulty = Faulty(shared.fs, hook)
    monkeypatch.setattr(shared.store, "fs", faulty)
    mgr = aptckpt.CheckpointManager(s3_url, storage_options=s3_options)
    deny.set()
    time.sleep(0.3)
    mgr.close()
    deny.clear()
    text = _log_text(caplog)
    assert "renewing the run lease" in text
    _no_secret(S3_SECRET, text)


def test_a_store_error_while_taking_a_lease_is_an_aptckpt_error_without_secrets(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's lease object exists (a dead holder's) and reading it is denied with a
    message echoing the credentials: CheckpointManager() raises an AptckptError naming
    the lease's URL, scrubbed -- not the file system's raw exception."""
    shared, path = FsspecStorage.for_url(s3_url, s3_options)
    shared.fs.pipe_file(f"{path}/.aptckpt-run.lock", b'{"expires": 0}')

    def hook(name: str, real: Any, args: Any, kwargs: Any) -> Any:
        if name in ("cat_file", "info") and str(args[0]).endswith(".aptckpt-run.lock"):
            raise PermissionError(f"Access Denied (secret={S3_SECRET})")
        return real(*args, **kwargs)

    monkeypatch.setattr(shared.store, "fs", Faulty(shared.fs, hook))
    with pytest.raises(AptckptError) as caught:
        aptckpt.CheckpointManager(s3_url, storage_options=s3_options)
    assert ".aptckpt-run.lock" in str(caught.value)
    _no_secret(S3_SECRET, str(caught.value), repr(caught.value))


def test_a_manager_made_before_a_fork_reads_in_the_child(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    """A read-only manager of an s3 run made in the parent (a data-loader or evaluation
    worker forked from the trainer): in the child it lists and loads, instead of the
    file system's 'This class is not fork-safe'."""
    import os

    with aptckpt.CheckpointManager(s3_url, storage_options=s3_options, keep=KeepLast(3)) as mgr:
        mgr.save(1, {"w": torch.arange(3.0)})
    reader = aptckpt.CheckpointManager(s3_url, storage_options=s3_options, read_only=True)
    assert [r.global_step for r in reader.checkpoints()] == [1]  # used in the parent first
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            steps = [r.global_step for r in reader.checkpoints()]
            latest = reader.latest()
            assert latest is not None
            w = aptckpt.load(latest.path, storage_options=s3_options)["w"]
            said = f"ok {steps} {w.tolist()}"
        except BaseException as err:
            said = f"{type(err).__name__}: {err}"
        os.write(write_end, said.encode()[:4000])
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode()
    assert said == "ok [1] [0.0, 1.0, 2.0]", said


@pytest.mark.parametrize("fail_at", ["part", "complete"])
def test_a_multipart_upload_failing_for_good_leaves_no_upload_or_object(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    """A permanent error on the 3rd part (others in flight) or on completing the upload:
    the save raises, no object of it is visible and no incomplete upload is left to be
    billed."""
    from aptckpt.errors import WriteError
    from test_storage_remote import client_error

    count = [0]
    lock = threading.Lock()

    def hook(name: str, real: Any, args: Any, kwargs: Any) -> Any:
        if name == "call_s3":
            op = args[0]
            with lock:
                count[0] += op == "upload_part"
                third = count[0] == 3 and op == "upload_part"
            if (fail_at == "part" and third) or (
                fail_at == "complete" and op == "complete_multipart_upload"
            ):
                raise client_error(403, "AccessDenied", "denied", "UploadPart")
        return real(*args, **kwargs)

    faulty = _api_on(monkeypatch, s3_url, s3_options, hook)
    with pytest.raises(WriteError):
        aptckpt.save(
            {"w": torch.zeros(3000)}, f"{s3_url}/ck", storage_options=s3_options, codec="none"
        )
    assert count[0] >= 3 if fail_at == "part" else count[0] >= 1  # the fault was met
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    real = faulty._fs
    assert real.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    assert real.find(s3_url) == []


def test_the_debris_sweep_never_takes_a_long_multipart_upload_still_in_flight(
    s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One big data file uploading for longer than the grace age (each part arriving in
    time): a sweep meanwhile (another process's gc) must not abort it -- 'a save in
    flight keeps finishing objects, so it is never taken'; here the save keeps
    finishing *parts*."""
    # moto stamps parts to the second: the grace leaves room for that
    monkeypatch.setenv("APTCKPT_REMOTE_GRACE_S", "1.5")

    def hook(name: str, real: Any, args: Any, kwargs: Any) -> Any:
        if name == "call_s3" and args[0] == "upload_part":
            time.sleep(0.2)  # a slow link: each part takes a while
        return real(*args, **kwargs)

    _api_on(monkeypatch, s3_url, s3_options, hook)
    shared, path = FsspecStorage.for_url(s3_url, s3_options)
    monkeypatch.setattr(shared, "in_flight", 1)
    sweeper, _ = tuned(s3_url, s3_options, fs=shared.fs._fs)
    stop = threading.Event()
    swept: list[int] = []

    def sweep() -> None:
        while not stop.wait(0.2):
            swept.append(sweeper.remove_debris(path))

    thread = threading.Thread(target=sweep)
    thread.start()
    try:
        state = {"w": torch.arange(3072.0)}  # 12 KiB: 12 parts, ~2.4 s
        aptckpt.save(state, f"{s3_url}/ck", storage_options=s3_options, codec="none")
    finally:
        stop.set()
        thread.join()
    assert torch.equal(aptckpt.load(f"{s3_url}/ck", storage_options=s3_options)["w"], state["w"])
    assert swept
