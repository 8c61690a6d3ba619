"""Resource faults: the disk fills up (ENOSPC) or refuses (EACCES, EIO) in the middle
of a save, at every storage call a save makes, one at a time.

A fault injector wraps the calls through which aptckpt changes the filesystem
(opening for writing, write, pwrite and the native parallel pwrite, fsync,
mkdir, rename/replace) for paths inside the test's directory. A clean save is
counted first; then the save is repeated once per call with exactly that call
failing. Each time: a clear error (WriteError naming the problem and the fix),
earlier checkpoints intact bit for bit, no temp debris, and the target either
absent or -- when the failure came after the commit -- complete.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

import aptckpt
from aptckpt import _accel
from aptckpt.backends import torch as torch_backend
from aptckpt.errors import WriteError
from aptckpt.manager import CheckpointManager
from aptckpt.retention import KeepLast
from aptckpt.storage.local import _atomic
from aptckpt.testing import assert_state_equal
from conftest import direct_io_supported

WRITE_ERRORS = (errno.ENOSPC, errno.EIO)
META_ERRORS = (errno.EACCES, errno.ENOSPC)
#: What each error must tell the user to do.
REMEDY = {errno.ENOSPC: "free space", errno.EIO: "check the disk", errno.EACCES: "permissions"}


class InjectedFault(Exception):
    pass


class Faults:
    """Counts the storage calls under ``root``; the ``fail_at``-th raises ``errno_``."""

    def __init__(self, root: Path, fail_at: int | None = None, errno_: int = errno.ENOSPC):
        self.root = str(root)
        self.fail_at = fail_at
        self.errno = errno_
        self.calls: list[str] = []
        self.log: list[tuple[str, str]] = []  # (op, path) of every call seen
        self.fired: str | None = None

    def _inside(self, path: Any) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(self.root)
        except TypeError:
            return False

    def _fd_inside(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root)
        except OSError:
            return False

    def hit(self, op: str, where: Any) -> None:
        self.calls.append(op)
        self.log.append((op, os.fspath(where) if isinstance(where, (str, os.PathLike)) else ""))
        if self.fail_at is not None and len(self.calls) - 1 == self.fail_at:
            self.fired = f"{op} {where}"
            raise OSError(self.errno, os.strerror(self.errno), str(where))


class _FaultyFile:
    """A file object whose writes go through the injector."""

    def __init__(self, f: Any, faults: Faults) -> None:
        self._f, self._faults = f, faults

    def write(self, data: Any) -> int:
        self._faults.hit("file.write", self._f.name)
        return self._f.write(data)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@contextmanager
def injected(monkeypatch: pytest.MonkeyPatch, faults: Faults) -> Iterator[Faults]:
    real = {
        name: getattr(os, name)
        for name in ("open", "write", "pwrite", "ftruncate", "fsync", "mkdir", "rename", "replace")
    }
    real_pwrite_many = _accel.pwrite_many
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & writing and faults._inside(path):
            faults.hit("open", path)
        return real["open"](path, flags, *args, **kwargs)  # type: ignore[no-any-return]

    def on_fd(name: str) -> Callable[..., Any]:
        def call(fd: int, *args: Any) -> Any:
            if faults._fd_inside(fd):
                faults.hit(name, os.readlink(f"/proc/self/fd/{fd}"))
            return real[name](fd, *args)

        return call

    def on_path(name: str) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if faults._inside(path):
                faults.hit(name, path)
            return real[name](path, *args, **kwargs)

        return call

    def pwrite_many(fd: int, buffers: Any, offsets: Any, threads: int = 0) -> int:
        if faults._fd_inside(fd):
            half = len(buffers) // 2  # a failure part-way: some bytes reached the file
            if faults.fail_at is not None and len(faults.calls) == faults.fail_at and half:
                real_pwrite_many(fd, buffers[:half], offsets[:half], threads)
            faults.hit("pwrite_many", os.readlink(f"/proc/self/fd/{fd}"))
        return real_pwrite_many(fd, buffers, offsets, threads)  # type: ignore[no-any-return]

    def file_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not (any(c in mode for c in "wxa+") and faults._inside(path)):
            return builtins.open(path, mode, *args, **kwargs)
        faults.hit("open", path)
        return _FaultyFile(builtins.open(path, mode, *args, **kwargs), faults)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "write", on_fd("write"))
    monkeypatch.setattr(os, "pwrite", on_fd("pwrite"))
    monkeypatch.setattr(os, "ftruncate", on_fd("ftruncate"))
    monkeypatch.setattr(os, "fsync", on_fd("fsync"))
    for name in ("mkdir", "rename", "replace"):
        monkeypatch.setattr(os, name, on_path(name))
    monkeypatch.setattr(_accel, "pwrite_many", pwrite_many)
    for module in (_atomic, torch_backend):
        monkeypatch.setattr(module, "open", file_open, raising=False)
    try:
        yield faults
    finally:
        monkeypatch.undo()


def check_message(err: WriteError, code: int) -> None:
    """The error says what failed and what to do about it."""
    message = str(err)
    assert os.strerror(code) in message and err.errno == code, message
    assert REMEDY[code] in message, message


def state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 64, generator=g),
        "b": torch.randn(64, generator=g).to(torch.bfloat16),
        "step": seed,
        "frozen": torch.arange(4096, dtype=torch.float32),
    }


def debris(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if _atomic.is_temporary(name):
                found.append(os.path.join(dirpath, name))
        if os.path.basename(dirpath) == "tmp" and filenames:
            found += [os.path.join(dirpath, n) for n in filenames]
    return found


#: Cases: backend, options, and whether data files are written with O_DIRECT (bounce buffers
#: written by a background thread with os.pwrite, a padded tail, ftruncate) or buffered (zstd
#: raw chunks then go through the core's parallel pwrite_many straight from tensor memory).
OPTIONS = {
    "torch": ("torch", {}, True),
    "torch-buffered": ("torch", {}, False),
    "zstd": ("zstd", {"chunk_size": 4096, "shard_size": 16384}, True),
    "zstd-raw": ("zstd", {"chunk_size": 4096, "shard_size": 16384, "codec": "none"}, True),
    "zstd-raw-buffered": (
        "zstd",
        {"chunk_size": 4096, "shard_size": 16384, "codec": "none"},
        False,
    ),
    "delta": ("delta", {"chunk_size": 4096}, True),
    # The first 20000 bytes of the save through the page cache, the rest O_DIRECT: a shard
    # switches in the middle, later shards are direct from the start.
    "zstd-raw-cached": (
        "zstd",
        {"chunk_size": 4096, "shard_size": 16384, "codec": "none"},
        "20000",
    ),
}


def _io_env(direct: bool | str) -> dict[str, str]:
    """The environment of a case: O_DIRECT on or off, and a page-cache budget in bytes."""
    cached = direct if isinstance(direct, str) else "never"
    return {"APTCKPT_DIRECT_IO": "1" if direct else "0", "APTCKPT_CACHED_WRITES": cached}


def sweep(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prepare: Callable[[Path], dict[Path, Any]],
    act: Callable[[Path], Path],
    errnos: tuple[int, ...],
) -> tuple[int, list[str]]:
    """Fail each storage call of ``act`` in turn; return (faults injected, ops seen)."""
    base = tmp_path / "base"
    earlier = prepare(base)
    counted = tmp_path / "counted"
    shutil.copytree(base, counted, symlinks=True)
    with injected(monkeypatch, Faults(counted)) as counting:
        act(counted)
    ops = counting.calls
    assert ops, "the injector saw no storage call"
    injected_count = 0
    for index in range(len(ops)):
        for code in errnos:
            work = tmp_path / f"case-{index}-{code}"
            shutil.copytree(base, work, symlinks=True)
            restore = {work / p.relative_to(base): s for p, s in earlier.items()}
            faults = Faults(work, fail_at=index, errno_=code)
            with injected(monkeypatch, faults):
                try:
                    target = act(work)
                except WriteError as err:
                    check_message(err, code)
                    target = None
                except OSError as err:  # pragma: no cover - must not happen
                    pytest.fail(f"raw {type(err).__name__} at '{faults.fired}': {err}")
            assert faults.fired is not None
            injected_count += 1
            for path, expected in restore.items():
                assert_state_equal(expected, aptckpt.load(path))
            assert debris(work) == [], f"debris after a fault at {faults.fired}"
            if target is not None:
                aptckpt.verify(target)  # the fault came after the commit and was survivable
            shutil.rmtree(work)
    return injected_count, ops


@pytest.mark.parametrize("case", OPTIONS)
def test_every_storage_call_of_a_save_can_fail(tmp_path, monkeypatch, case):
    backend, options, direct = OPTIONS[case]

    def prepare(base: Path) -> dict[Path, Any]:
        aptckpt.save(state(0), base / "s0", backend=backend, **options)
        return {base / "s0": state(0)}

    def act(root: Path) -> Path:
        new = state(1)
        new["frozen"] = state(0)["frozen"]  # delta: some chunks unchanged, some xor-encoded
        aptckpt.save(new, root / "s1", backend=backend, **options)
        aptckpt.save(state(0), root / "s0", backend=backend, overwrite=True, **options)
        return root / "s1"

    # Not monkeypatch.setenv: the injector's monkeypatch.undo() would drop it mid-sweep.
    with mock.patch.dict(os.environ, _io_env(direct)):
        count, ops = sweep(tmp_path, monkeypatch, prepare, act, WRITE_ERRORS)
    print(f"\n{case}: {count} faults injected over {len(ops)} storage calls: {sorted(set(ops))}")
    assert {"open", "fsync", "rename"} <= set(ops)
    if case == "zstd-raw-buffered":
        assert "pwrite_many" in ops
    if direct and backend != "delta" and direct_io_supported(tmp_path):
        assert {"pwrite", "ftruncate"} <= set(ops)


def test_every_storage_call_of_a_manager_save_can_fail(tmp_path, monkeypatch):
    """The manager's whole save: checkpoint, index, tokenizer files, retention, GC."""

    def prepare(base: Path) -> dict[Path, Any]:
        with CheckpointManager(base, backend="delta", keep=KeepLast(1)) as m:
            m.save(1, {"w": state(0)["w"]})
        return {}

    def act(root: Path) -> Path:
        with CheckpointManager(root, backend="delta", keep=KeepLast(1)) as m:
            before = {r.path: aptckpt.load(r.path) for r in m.checkpoints()}
            try:
                return m.save(2, {"w": state(1)["w"]})
            finally:
                survivors = {r.path for r in m.checkpoints()}
                assert survivors, "a failed save left the run without a checkpoint"
                for path in survivors & before.keys():
                    assert_state_equal(before[path], aptckpt.load(path))

    count, ops = sweep(tmp_path, monkeypatch, prepare, act, META_ERRORS)
    print(f"\nmanager: {count} faults injected over {len(ops)} storage calls")


@pytest.mark.parametrize("case", OPTIONS)
def test_durability_order(tmp_path, monkeypatch, case):
    """Every byte a checkpoint needs is fsynced before the rename that makes it
    visible, and the parent directory after it (store objects: before the manifest)."""
    backend, options, direct = OPTIONS[case]
    with mock.patch.dict(os.environ, _io_env(direct)):
        aptckpt.save(state(0), tmp_path / "s0", backend=backend, **options)
        with injected(monkeypatch, Faults(tmp_path)) as faults:
            aptckpt.save(state(1), tmp_path / "s1", backend=backend, **options)
    log = faults.log
    (commit,) = [
        i for i, (op, path) in enumerate(log) if op == "rename" and ".s1.tmp-" in Path(path).name
    ]
    temp_dir = log[commit][1]
    manifest = os.path.join(temp_dir, "manifest.msgpack")
    before, after = log[:commit], log[commit + 1 :]
    synced = {path for op, path in before if op == "fsync"}
    data = {path for op, path in before if op == "open" and path.startswith(temp_dir)}
    assert data and data <= synced  # every data file and the manifest
    for path in data:  # ... after its last write (direct writes: the padded tail, ftruncate)
        last_write = max(
            i
            for i, (op, p) in enumerate(before)
            if p == path and op in {"write", "pwrite", "ftruncate", "file.write", "open"}
        )
        assert last_write < max(
            i for i, (op, p) in enumerate(before) if p == path and op == "fsync"
        )
    assert manifest in synced and temp_dir in synced
    assert ("fsync", str(tmp_path)) in after  # the parent directory, after the rename
    if backend == "delta":
        objects = [i for i, (op, path) in enumerate(before) if op == "replace"]
        named = {path for op, path in before if op == "open" and "/aptckpt-store/tmp/" in path}
        manifest_written = next(i for i, (op, path) in enumerate(before) if path == manifest)
        assert objects and max(objects) < manifest_written  # objects named before the manifest
        assert named <= synced
        assert any(  # the folder the objects were renamed into (loose or packed)
            ("fsync", str(tmp_path / "aptckpt-store" / folder)) in before
            for folder in ("objects", "packs")
        )
