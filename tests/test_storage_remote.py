"""The object-store storage (aptckpt.storage.remote) on memory:// and on a real S3 API
server (moto, loopback): sinks, commit, overwrite, abort, races, debris, leases,
reads, and failures injected at the seam between the storage and the file system."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aptckpt import _accel
from aptckpt import manifest as mf
from aptckpt.errors import (
    CheckpointDeletedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    InvalidNameError,
    UnsupportedPathError,
    WriteError,
)
from aptckpt.storage import LOCAL, RawRead, resolve
from aptckpt.storage.local._directio import DirectWriter
from conftest import S3_SECRET

fsspec = pytest.importorskip("fsspec")

from aptckpt.storage.remote import FsspecStorage, RetryPolicy  # noqa: E402
from aptckpt.storage.remote._writer import TOKEN  # noqa: E402

PART = 1024
FAST = RetryPolicy(tries=4, wait=0.001, wait_max=0.002)


@pytest.fixture(params=["memory", "s3"])
def where(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """(url, storage_options) of an empty place in each kind of store."""
    if request.param == "memory":
        return request.getfixturevalue("memory_url"), {}
    return request.getfixturevalue("s3_url"), request.getfixturevalue("s3_options")


def tuned(
    url: str, options: dict[str, Any], fs: Any = None, **kw: Any
) -> tuple[FsspecStorage, str]:
    """A storage of its own (small parts, quick retries) over ``url``'s file system."""
    shared, path = FsspecStorage.for_url(url, options)
    kw.setdefault("part_size", PART)
    kw.setdefault("retry", FAST)
    return FsspecStorage(fs or shared.fs, shared.scheme, options=options, **kw), path


def save(storage: FsspecStorage, path: str, files: dict[str, bytes], **kw: Any) -> bytes:
    """Write ``files`` as one checkpoint whose manifest lists them; the manifest bytes."""
    with storage.create_checkpoint(path, **kw) as writer:
        for name, data in files.items():
            with writer.open(name) as sink:
                sink.write(data)
        writer.sync_files()
        manifest = fake_manifest(writer.sizes())
        writer.commit(manifest)
    return manifest


def fake_manifest(records: list[mf.FileRecord]) -> bytes:
    """A valid manifest of an empty state that lists ``records`` as its data files."""
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


def read_back(storage: FsspecStorage, path: str) -> dict[str, bytes]:
    with storage.open_checkpoint(path) as reader:
        records = reader.read_manifest().files
        with reader.open_files(records) as files:
            assert not files.failed
            return {
                r.path.split("/", 1)[1]: files.read(i, 0, r.size) for i, r in enumerate(records)
            }


def objects(storage: FsspecStorage, path: str) -> list[str]:
    return [rel for rel, _ in storage.walk(path)]


# ------------------------------------------------------------------ resolving


def test_for_url_caches_one_storage_per_options_and_hides_credentials(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    a, path = resolve(s3_url + "/ck/", s3_options)
    b, _ = resolve(s3_url, dict(s3_options))
    assert a is b and path == s3_url[5:] + "/ck"
    assert a.display(path) == s3_url + "/ck"
    other, _ = resolve(s3_url, {**s3_options, "secret": "another-secret"})
    assert other is not a
    assert S3_SECRET not in repr(a) and S3_SECRET not in a.display(path)


def test_unknown_scheme_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnsupportedPathError, match="unknown URL scheme 'nosuch://'"):
        resolve("nosuch://bucket/x")

    def missing(name: str) -> Any:
        raise ImportError("Install s3fs to access S3", name="s3fs")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(UnsupportedPathError, match=r"pip install 'aptckpt\[s3\]'"):
        FsspecStorage.for_url("s3://bucket/x")


def test_endpoint_and_credentials_from_the_environment(
    s3_url: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage, path = FsspecStorage.for_url(s3_url + "/env", {})
    storage.write_file(storage.join(path, "x"), b"from env")
    assert storage.read_file(storage.join(path, "x"), limit=100) == b"from env"


# ------------------------------------------------------------------ sinks


@pytest.mark.parametrize("size", [0, 1, PART - 1, PART, PART + 1, 3 * PART])
def test_sink_boundaries_and_digests(
    where: tuple[str, dict[str, Any]], size: int, tmp_path: Path
) -> None:
    storage, path = tuned(*where)
    data = bytes((i * 7 + size) % 251 for i in range(size))
    with storage.create_checkpoint(path) as writer:
        with writer.open("f.bin", digest_chunk_size=100) as sink:
            for start in range(0, size, 333):  # pieces that straddle every part boundary
                sink.write(memoryview(data)[start : start + 333])
        assert sink.size == size
        with DirectWriter(tmp_path / "local.bin", digest_chunk_size=100) as local:
            local.write(data)
        assert sink.digests() == local.digests() == _accel.hash_chunks(data, 100)
        writer.commit(fake_manifest(writer.sizes()))
    assert writer.sizes()[0].size == size
    assert read_back(storage, path) == {"f.bin": data}


def test_multipart_parts_upload_in_parallel_with_bounded_memory(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    storage, path = tuned(s3_url, s3_options, in_flight=3)
    real = storage.store.upload_part
    lock = threading.Lock()
    running, peak, calls = 0, 0, 0

    def counted(*args: Any) -> str:
        nonlocal running, peak, calls
        with lock:
            running += 1
            calls += 1
            peak = max(peak, running)
        time.sleep(0.02)
        try:
            return real(*args)
        finally:
            with lock:
                running -= 1

    storage.store.upload_part = counted  # type: ignore[method-assign]
    data = bytes(range(256)) * (10 * PART // 256)
    save(storage, path, {"big.bin": data})
    assert calls == 10 and 1 < peak <= 3
    assert read_back(storage, path) == {"big.bin": data}


# ------------------------------------------------------------ commit protocol


def test_commit_exists_overwrite_abort_delete(where: tuple[str, dict[str, Any]]) -> None:
    storage, path = tuned(*where)
    with pytest.raises(CheckpointNotFoundError):
        storage.open_checkpoint(path)
    save(storage, path, {"a": b"one"})
    assert storage.is_checkpoint(path)
    first = {rel.split("/")[0] for rel in objects(storage, path)} - {mf.MANIFEST_NAME}
    assert len(first) == 1 and TOKEN.fullmatch(first.pop())

    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        storage.create_checkpoint(path)

    save(storage, path, {"a": b"two", "b": b"2"}, overwrite=True)
    assert read_back(storage, path) == {"a": b"two", "b": b"2"}
    tokens = {rel.split("/")[0] for rel in objects(storage, path)} - {mf.MANIFEST_NAME}
    assert len(tokens) == 1  # the replaced data is gone

    def failing_save() -> None:
        with storage.create_checkpoint(path, overwrite=True) as writer:
            with writer.open("a") as sink:
                sink.write(b"three")
            raise RuntimeError("the save fails")

    with pytest.raises(RuntimeError):
        failing_save()
    assert read_back(storage, path) == {"a": b"two", "b": b"2"}
    assert {rel.split("/")[0] for rel in objects(storage, path)} - {mf.MANIFEST_NAME} == tokens

    storage.delete_checkpoint(path)
    assert not storage.is_checkpoint(path) and objects(storage, path) == []
    with pytest.raises(CheckpointNotFoundError):
        storage.delete_checkpoint(path)


def test_names_given_to_data_prefixes_are_refused(where: tuple[str, dict[str, Any]]) -> None:
    storage, path = tuned(*where)
    with pytest.raises(InvalidNameError):
        storage.create_checkpoint(storage.join(path, "data-1700000000000-0123456789abcdef"))


def test_racing_saves_one_commits(where: tuple[str, dict[str, Any]]) -> None:
    """Both pass the early existence check; the conditional create lets one commit. (On
    S3 the two commits run one after the other: moto checks then writes, so a true race
    there proves nothing; memory:// races threads.)"""
    storage, path = tuned(*where)
    writers = [storage.create_checkpoint(path) for _ in range(2)]
    for i, writer in enumerate(writers):
        with writer.open("a") as sink:
            sink.write(b"writer %d" % i)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def commit(writer: Any) -> None:
        barrier.wait()
        try:
            with writer:
                writer.commit(fake_manifest(writer.sizes()))
            outcomes.append("won")
        except CheckpointExistsError:
            outcomes.append("lost")

    if storage.scheme == "memory":
        threads = [threading.Thread(target=commit, args=(w,)) for w in writers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        barrier = threading.Barrier(1)
        for w in writers:
            commit(w)
    assert sorted(outcomes) == ["lost", "won"]
    tokens = {rel.split("/")[0] for rel in objects(storage, path)} - {mf.MANIFEST_NAME}
    assert len(tokens) == 1  # the loser's data was removed
    assert read_back(storage, path)["a"] in (b"writer 0", b"writer 1")


def test_uncommitted_save_is_never_a_checkpoint(where: tuple[str, dict[str, Any]]) -> None:
    storage, folder = tuned(*where)
    path = storage.join(folder, "ck")
    with storage.create_checkpoint(path) as writer:
        with writer.open("a") as sink:
            sink.write(b"x" * (3 * PART))
        assert [e.name for e in storage.list(folder)] == [storage.name(path)]
        assert not storage.is_checkpoint(path)
        with pytest.raises(CheckpointNotFoundError, match="never committed"):
            storage.open_checkpoint(path)
        writer.commit(fake_manifest(writer.sizes()))
    assert storage.is_checkpoint(path)


# -------------------------------------------------------------------- debris


def test_debris_grace_rule(
    where: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, folder = tuned(*where)
    path = storage.join(folder, "ck")
    save(storage, path, {"a": b"kept"})
    stale = storage.join(path, "data-1000000000000-00000000000000aa")
    storage.write_file(storage.join(stale, "x"), b"died")
    orphan = storage.join(folder, "never-committed", "data-1000000000000-00000000000000bb")
    storage.write_file(storage.join(orphan, "y"), b"died too")
    live = storage.create_checkpoint(storage.join(folder, "in-flight"))
    with live.open("z") as sink:
        sink.write(b"still saving")

    monkeypatch.setenv("APTCKPT_REMOTE_GRACE_S", "3600")  # fresh objects: nothing goes
    assert storage.remove_debris(folder) == 0

    time.sleep(0.01)
    monkeypatch.setenv("APTCKPT_REMOTE_GRACE_S", "0")  # everything unnamed is stale now
    live_prefix = live.prefix
    assert storage.remove_debris(folder) == 3
    assert storage.info(storage.join(stale, "x")) is None
    assert storage.info(storage.join(orphan, "y")) is None
    assert storage.info(storage.join(live_prefix, "z")) is None
    assert read_back(storage, path) == {"a": b"kept"}  # what a manifest names stays
    live.abort()


# --------------------------------------------------------------------- leases


def test_lease_take_renew_expire_takeover(where: tuple[str, dict[str, Any]]) -> None:
    storage, folder = tuned(*where)
    path = storage.join(folder, "LEASE")
    first = storage.lease(path, owner={"host": "a", "pid": 1}, ttl=0.3)
    with pytest.raises(FileExistsError) as held:
        storage.lease(path, owner={"host": "b", "pid": 2}, ttl=0.3)
    assert '"host": "a"' in held.value.filename
    first.renew()
    time.sleep(0.4)  # first stops renewing: expired
    second = storage.lease(path, owner={"host": "b", "pid": 2}, ttl=30)
    with pytest.raises(FileExistsError, match="lost"):
        first.renew()
    first.release()  # not ours: leaves second's alone
    assert storage.info(path) is not None
    second.renew()
    second.release()
    assert storage.info(path) is None


# ---------------------------------------------------------------------- reads


def test_reads_verify_coalesce_and_report(where: tuple[str, dict[str, Any]]) -> None:
    storage, path = tuned(*where)
    data = bytes(range(256)) * 12  # 3 KiB
    save(storage, path, {"d": data, "e": b"gone soon"})
    token = next(r for r in objects(storage, path) if r.endswith("/e")).split("/")[0]
    records = [mf.FileRecord(f"{token}/d", len(data)), mf.FileRecord(f"{token}/e", 9)]
    with storage.open_checkpoint(path) as reader:
        reader.read_manifest()
        with reader.open_files(records) as files:
            outs = [bytearray(500) for _ in range(7)]
            reads = [
                RawRead(0, i * 500, memoryview(o), _accel.xxh3_128(data[i * 500 : i * 500 + 500]))
                for i, o in enumerate(outs)
            ]
            reads[2] = RawRead(0, 1000, memoryview(outs[2]), b"\0" * 16)  # a wrong digest
            found = files.read_verify(reads, threads=3)
            assert found == [(2, "digest"), (6, "eof")]  # 3000..3500 runs past the end
            assert bytes(outs[1]) == data[500:1000]
            assert files.stream(0).read() == data
            assert files.read(0, len(data) - 2, 100) == data[-2:]

    storage.remove_file(storage.join(path, token, "e"))
    with storage.open_checkpoint(path) as reader:
        reader.read_manifest()
        with reader.open_files(records) as files:
            assert list(files.failed) == [1] and files.failed[1].size is None
            assert "'" + f"{token}/e" + "' is missing" in str(files.failed[1].error)

    with storage.open_checkpoint(path) as reader:
        reader.read_manifest()
        with reader.open_files(records[:1]) as files:
            save(storage, path, {"d": b"replaced"}, overwrite=True)
            with pytest.raises(CheckpointDeletedError):
                files.read(0, 0, 10)


def test_a_copied_checkpoint_reads_locally(
    where: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    storage, path = tuned(*where)
    save(storage, path, {"d": b"portable", "sub/e": b"nested"})
    root = tmp_path / "copy"
    for rel, _ in storage.walk(path):
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_file(storage.join(path, rel), limit=1 << 20))
    with LOCAL.open_checkpoint(str(root)) as reader:
        records = reader.read_manifest().files  # validates the token-prefixed paths
        files = reader.open_files(records)
        with files:
            assert not files.failed
            assert sorted(files.read(i, 0, r.size) for i, r in enumerate(records)) == [
                b"nested",
                b"portable",
            ]


# ----------------------------------------------------------------- files API


def test_files_api(where: tuple[str, dict[str, Any]]) -> None:
    storage, folder = tuned(*where)
    a = storage.join(folder, "dir", "a")
    with pytest.raises(FileNotFoundError):
        storage.read_file(a, limit=10)
    assert storage.create_file(a, b"first")
    assert not storage.create_file(a, b"second")
    assert storage.read_file(a, limit=5) == b"first"
    with pytest.raises(OSError, match="larger") as big:
        storage.read_file(a, limit=4)
    assert big.value.errno == errno.EFBIG
    storage.write_file(a, b"replaced")
    assert storage.read_range(a, 2, 100) == b"placed" and storage.read_range(a, 50, 5) == b""
    storage.put_files([(storage.join(folder, f"p{i}"), bytes([i]) * i) for i in range(5)])
    assert [e.name for e in storage.list(folder)] == ["dir", "p0", "p1", "p2", "p3", "p4"]
    assert [(e.kind, e.size) for e in storage.list(folder)][:2] == [("dir", 0), ("file", 0)]
    assert [rel for rel, _ in storage.walk(folder)][:2] == ["dir/a", "p0"]
    entry = storage.info(a)
    assert entry is not None and entry.kind == "file" and entry.size == 8 and entry.mtime > 0
    storage.makedirs(storage.join(folder, "nothing"))
    storage.remove_tree(storage.join(folder, "dir"))
    storage.remove_file(storage.join(folder, "p1"))
    storage.remove_file(storage.join(folder, "p1"))  # already gone: no error
    assert [e.name for e in storage.list(folder)] == ["p0", "p2", "p3", "p4"]
    assert storage.list(storage.join(folder, "absent")) == []


# ------------------------------------------------------------ injected faults


class Flaky:
    """A file system that fails some calls first: ``plan[name]`` lists what each next
    call of ``name`` (``call_s3``: its S3 method) raises, None passing through."""

    def __init__(self, fs: Any, plan: dict[str, list[BaseException | None]]) -> None:
        self._fs, self.plan = fs, plan
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            key = args[0] if name == "call_s3" else name
            self.calls[key] = self.calls.get(key, 0) + 1
            queue = self.plan.get(key)
            if queue:
                err = queue.pop(0)
                if err is not None:
                    raise err
            return attr(*args, **kwargs)

        return wrapped


def client_error(status: int, code: str, message: str, operation: str = "PutObject") -> OSError:
    """What s3fs raises for an S3 error answer."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )
    translated: OSError = translate_boto_error(error)
    return translated


def test_dropped_connections_and_503s_are_retried(
    where: tuple[str, dict[str, Any]],
) -> None:
    pytest.importorskip("botocore")
    base_storage, path = tuned(*where)
    flaky = Flaky(base_storage.fs, {})
    storage, _ = tuned(*where, fs=flaky)
    if storage.store.s3:  # a part's connection drops
        flaky.plan["upload_part"] = [None, ConnectionResetError(104, "reset by peer")]
    flaky.plan["pipe_file"] = [  # then the store is overloaded, then slow
        client_error(503, "SlowDown", "reduce your request rate"),
        TimeoutError("timed out"),
    ]
    data = b"x" * (3 * PART)
    save(storage, path, {"big": data, "small": b"tiny"})
    assert read_back(storage, path) == {"big": data, "small": b"tiny"}
    if storage.store.s3:
        assert flaky.calls["upload_part"] == 4  # 3 parts, one of them twice


def test_permission_denied_is_clear_and_secret_free(
    where: tuple[str, dict[str, Any]],
) -> None:
    pytest.importorskip("botocore")
    base_storage, path = tuned(*where)
    save(base_storage, path, {"a": b"earlier"})
    denied = client_error(403, "AccessDenied", f"Access Denied for secret {S3_SECRET}")
    flaky = Flaky(base_storage.fs, {})
    storage, _ = tuned(*where, fs=flaky)
    flaky.plan["upload_part"] = [denied]  # S3: the first part
    flaky.plan["pipe_file"] = [denied]  # memory: the manifest
    with pytest.raises(WriteError) as failed:
        save(storage, path, {"big": b"y" * (3 * PART)}, overwrite=True)
    message = str(failed.value)
    assert "AccessDenied" in message or "Access Denied" in message
    assert storage.display(path) in message and "credentials" in message
    if storage.store.s3:  # the secret is in these storage options: scrubbed
        assert S3_SECRET not in message and "***" in message
    assert failed.value.errno == errno.EACCES
    # never retried: each of the 3 parts (S3; some may have been in flight) or the one PUT
    assert (
        flaky.calls["upload_part" if storage.store.s3 else "pipe_file"] <= 3
        if (storage.store.s3)
        else flaky.calls["pipe_file"] == 1
    )
    # nothing of the failed save is visible; the earlier checkpoint is intact
    assert read_back(base_storage, path) == {"a": b"earlier"}
    assert len({r.split("/")[0] for r in objects(base_storage, path)}) == 2


def test_permanent_error_mid_save_leaves_nothing(where: tuple[str, dict[str, Any]]) -> None:
    base_storage, path = tuned(*where)
    save(base_storage, path, {"a": b"earlier"})
    flaky = Flaky(base_storage.fs, {})
    storage, _ = tuned(*where, fs=flaky)
    flaky.plan["pipe_file"] = [
        None,
        FileNotFoundError(errno.ENOENT, "The specified bucket does not exist"),
    ]
    with pytest.raises(WriteError, match="bucket does not exist"):
        save(storage, path, {"one": b"1", "two": b"2", "three": b"3"}, overwrite=True)
    assert read_back(base_storage, path) == {"a": b"earlier"}
    assert len({r.split("/")[0] for r in objects(base_storage, path)}) == 2


def test_missing_bucket(s3_url: str, s3_options: dict[str, Any]) -> None:
    storage, _ = tuned(s3_url, s3_options)
    path = "aptckpt-no-such-bucket/ck"
    with pytest.raises(CheckpointNotFoundError, match="bucket 'aptckpt-no-such-bucket' does not"):
        storage.open_checkpoint(path)
    with pytest.raises(WriteError, match="bucket does not exist") as failed:
        save(storage, path, {"a": b"1"})
    assert "s3://aptckpt-no-such-bucket/ck" in str(failed.value)


def test_credentials_never_in_manifests_or_messages(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    storage, path = tuned(s3_url, s3_options)
    manifest = save(storage, path, {"a": b"1"})
    assert S3_SECRET.encode() not in manifest
    stored = storage.read_file(storage.join(path, mf.MANIFEST_NAME), limit=1 << 20)
    assert S3_SECRET.encode() not in stored
    with pytest.raises(CheckpointExistsError) as exists:
        storage.create_checkpoint(path)
    assert S3_SECRET not in str(exists.value) and S3_SECRET not in repr(storage)
