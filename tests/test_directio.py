"""DirectWriter: the file holds exactly the bytes written, whatever the write sizes and the
path taken (O_DIRECT bounce buffers, the buffered fallback, a file system refusing O_DIRECT at
open or at a write); digests computed on the way in equal the file's; errors surface and no
write outlives the descriptor."""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptckpt import _accel
from aptckpt.storage.local import _directio
from aptckpt.storage.local._directio import BLOCK_SIZE, DirectWriter
from conftest import direct_io_supported

SMALL = 4 * BLOCK_SIZE  # a small bounce buffer so that examples cross many buffer boundaries


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


pieces = st.lists(st.binary(max_size=3 * SMALL), max_size=12)


@settings(max_examples=60, deadline=None)
@given(parts=pieces, direct=st.booleans(), chunk=st.sampled_from([16, 4096, 5000, 1 << 20]))
def test_file_holds_the_bytes_written_and_their_digests(tmp_path_factory, parts, direct, chunk):
    path = tmp_path_factory.mktemp("dw") / "f.bin"
    with DirectWriter(path, direct=direct, digest_chunk_size=chunk, buffer_size=SMALL) as f:
        for part in parts:
            assert f.write(part) == len(part)
    expected = b"".join(parts)
    assert path.read_bytes() == expected
    assert f.size == len(expected)
    assert f.digests() == _accel.hash_chunks(expected, chunk)


@pytest.mark.parametrize("direct", [True, False])
def test_write_many_takes_any_buffers(tmp_path, direct):
    import numpy as np

    arrays = [np.arange(n, dtype=np.float32) for n in (0, 1, 1000, 3 * SMALL)]
    with DirectWriter(tmp_path / "f", direct=direct, buffer_size=SMALL) as f:
        f.write_many(arrays)
        f.write(b"tail")
    assert (tmp_path / "f").read_bytes() == b"".join(a.tobytes() for a in arrays) + b"tail"


def test_direct_io_is_used_where_the_file_system_takes_it(tmp_path):
    if not direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    with DirectWriter(tmp_path / "f", direct=True) as f:
        assert f.direct and _is_direct(f.fd)
        f.write(b"x" * 5)
    assert (tmp_path / "f").stat().st_size == 5  # the padded tail was truncated away


def test_environment_turns_direct_io_off(tmp_path, monkeypatch):
    monkeypatch.setenv("APTCKPT_DIRECT_IO", "off")
    with DirectWriter(tmp_path / "f") as f:
        assert not f.direct and not _is_direct(f.fd)


def test_refused_at_open_falls_back_to_buffered(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path: Any, flags: int, *args: Any) -> int:
        fd = real_open(path, flags & ~os.O_DIRECT, *args)  # Linux creates the file first
        if flags & os.O_DIRECT:
            os.close(fd)
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return fd

    monkeypatch.setattr(os, "open", refusing)
    with DirectWriter(tmp_path / "f", direct=True, buffer_size=SMALL) as f:
        assert not f.direct
        f.write(b"abc" * SMALL)
    assert (tmp_path / "f").read_bytes() == b"abc" * SMALL


def test_refused_at_a_write_goes_on_buffered(tmp_path, monkeypatch):
    if not direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    real_pwrite = os.pwrite
    refused = []

    def picky(fd: int, data: Any, offset: int) -> int:
        if _is_direct(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", picky)
    data = os.urandom(3 * SMALL + 7)
    with DirectWriter(tmp_path / "f", direct=True, buffer_size=SMALL) as f:
        f.write(data)
    assert refused == [0]
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_background_write_is_raised_and_nothing_outlives_the_file(
    tmp_path, monkeypatch, code
):
    real_pwrite = os.pwrite
    calls = []

    def failing(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    f = DirectWriter(tmp_path / "f", direct=True, buffer_size=SMALL)
    if not f.direct:
        f.abort()
        pytest.skip("this file system refuses O_DIRECT")
    # noqa: the error surfaces at a later write or at close, whichever waits for it first
    with pytest.raises(OSError, match=os.strerror(code)) as caught:  # noqa: PT012
        for _ in range(8):
            f.write(b"z" * SMALL)
        f.close()
    assert caught.value.errno == code
    f.abort()  # idempotent after the failure
    assert f.fd == -1
    assert f._pending == type(f._pending)()  # every write ended before the descriptor closed


def test_leaving_by_an_exception_waits_for_writes_and_closes(tmp_path):
    with pytest.raises(KeyError), DirectWriter(tmp_path / "f", buffer_size=SMALL) as f:  # noqa: PT012
        f.write(b"q" * (5 * SMALL))
        raise KeyError("caller failed")
    assert f.fd == -1
    assert not f._pending


def test_bounce_buffers_are_reused_between_files(tmp_path):
    with DirectWriter(tmp_path / "a", direct=True) as f:
        f.write(b"a" * (_directio.BUFFER_SIZE + 1))
    pooled = list(_directio._pool)
    assert pooled
    with DirectWriter(tmp_path / "b", direct=True) as f:
        f.write(b"b")
        if f.direct:
            assert f._buffer in pooled


def test_buffer_size_must_be_block_aligned(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        DirectWriter(tmp_path / "f", buffer_size=1000)
    assert not (tmp_path / "f").exists()


def test_digests_need_a_closed_writer(tmp_path):
    f = DirectWriter(tmp_path / "f", digest_chunk_size=16)
    with pytest.raises(RuntimeError, match="closed writer"):
        f.digests()
    f.close()
    assert f.digests() == b""


def test_supported_probes_without_leaving_a_file(tmp_path):
    expected = direct_io_supported(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with DirectWriter(tmp_path / "f", direct=True) as f:
        assert f.direct == expected
    assert not direct_io_supported(tmp_path / "missing")


def test_pooled_buffers_are_private_to_a_forked_child(tmp_path):
    with DirectWriter(tmp_path / "a", direct=True) as f:
        f.write(b"a" * (_directio.BUFFER_SIZE + 1))
    assert _directio._pool
    pooled = _directio._pool[0]
    pooled[:6] = b"parent"
    pid = os.fork()
    if pid == 0:  # the child: its pool starts empty, and writing its copy changes nothing above
        pooled[:6] = b"child!"
        os._exit(0 if not _directio._pool else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pooled[:6] == b"parent"


def _boundaries(n: int) -> list[int]:
    """0, 1, n-1, n, n+1 and a few multiples of ``n`` (k*n-1, k*n, k*n+1)."""
    sizes = {0, 1, n - 1, n, n + 1}
    for k in (2, 3, 4, 5):  # past the buffers in flight (_IN_FLIGHT + 1)
        sizes |= {k * n - 1, k * n, k * n + 1}
    return sorted(s for s in sizes if s >= 0)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", _boundaries(SMALL) + _boundaries(BLOCK_SIZE)[:8])
def test_every_size_around_a_buffer_or_block_boundary_is_written_exactly(tmp_path, direct, size):
    data = os.urandom(size)
    for split in {size, SMALL, BLOCK_SIZE, 1000}:  # one write, buffer-sized, block-sized, odd
        path = tmp_path / f"f-{split}"
        with DirectWriter(path, direct=direct, digest_chunk_size=SMALL, buffer_size=SMALL) as f:
            for start in range(0, size, max(split, 1)):
                f.write(data[start : start + max(split, 1)])
        assert path.read_bytes() == data, (size, split)
        assert f.size == size
        assert f.digests() == _accel.hash_chunks(data, SMALL)


@pytest.mark.parametrize("size", [0, 1, SMALL - 1, SMALL, SMALL + 1, 2 * SMALL, 3 * SMALL])
def test_write_many_around_the_join_thresholds(tmp_path, monkeypatch, size):
    # write_many joins buffers below _SMALL_WRITE into runs of about _JOINED_WRITE: shrink
    # both so that runs end exactly on, just before and just after a bounce buffer.
    monkeypatch.setattr(_directio, "_SMALL_WRITE", SMALL // 2)
    monkeypatch.setattr(_directio, "_JOINED_WRITE", SMALL)
    pieces = [os.urandom(n) for n in (size, SMALL // 2 - 1, SMALL // 2, 1, size, SMALL - 1)]
    for direct in (True, False):
        path = tmp_path / f"f-{direct}"
        options = {"direct": direct, "digest_chunk_size": BLOCK_SIZE, "buffer_size": SMALL}
        with DirectWriter(path, **options) as f:
            f.write_many(pieces)
        expected = b"".join(pieces)
        assert path.read_bytes() == expected
        assert f.digests() == _accel.hash_chunks(expected, BLOCK_SIZE)


def test_an_interrupt_while_closing_leaves_no_descriptor(tmp_path, monkeypatch):
    import concurrent.futures

    shutdown = concurrent.futures.ThreadPoolExecutor.shutdown

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> None:
        shutdown(self, *args, **kwargs)
        raise KeyboardInterrupt

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "shutdown", interrupted)
    writer = DirectWriter(tmp_path / "f", direct=True, buffer_size=SMALL)
    writer.write(os.urandom(3 * SMALL))  # buffers handed to the write thread
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    monkeypatch.undo()
    assert set(os.listdir("/proc/self/fd")) == before


def _cached_budgets() -> list[int]:
    return sorted(
        {
            0,
            1,
            BLOCK_SIZE - 1,
            BLOCK_SIZE,
            BLOCK_SIZE + 1,
            SMALL - 1,
            SMALL,
            SMALL + 1,
            3 * SMALL,
            10 * SMALL,
        }
    )


@pytest.mark.parametrize("budget", _cached_budgets())
def test_a_cached_head_then_direct_writes_hold_the_bytes(tmp_path, budget):
    from aptckpt.storage.local._cachepolicy import CacheBudget

    size = 5 * SMALL + 123
    data = os.urandom(size)
    for split in (size, SMALL, BLOCK_SIZE, 1000, 1):
        if split == 1 and budget > SMALL:
            continue  # byte by byte is slow; the small budgets cover it
        path = tmp_path / f"f-{split}"
        cache = CacheBudget(budget)
        options = {"direct": True, "digest_chunk_size": SMALL, "buffer_size": SMALL}
        with DirectWriter(path, cache=cache, **options) as f:
            for start in range(0, size, split):
                f.write(data[start : start + split])
        assert path.read_bytes() == data, (budget, split)
        assert f.digests() == _accel.hash_chunks(data, SMALL)
        # Cached: what the budget granted, rounded up to the block where O_DIRECT starts.
        expected = min(size, -(-budget // BLOCK_SIZE) * BLOCK_SIZE) if budget else 0
        assert f.cached == expected, (budget, split)
        if direct_io_supported(tmp_path) and expected < size:
            assert f.direct, (budget, split)


def test_a_budget_spans_the_files_of_a_save(tmp_path):
    from aptckpt.storage.local._cachepolicy import CacheBudget

    cache = CacheBudget(4 * SMALL)
    sizes = []
    for name in ("a", "b", "c"):
        with DirectWriter(tmp_path / name, direct=True, cache=cache, buffer_size=SMALL) as f:
            f.write_many([os.urandom(SMALL // 2 + 1) for _ in range(3)])
        sizes.append(f.cached)
        assert (tmp_path / name).stat().st_size == 3 * (SMALL // 2 + 1)
    whole = 3 * (SMALL // 2 + 1)
    # a and b fit; c gets the rest, rounded up to the block where O_DIRECT starts
    left = 4 * SMALL - 2 * whole
    assert sizes == [whole, whole, -(-left // BLOCK_SIZE) * BLOCK_SIZE]
    assert cache.left == 0


def test_a_cached_file_where_o_direct_is_refused_stays_buffered(tmp_path, monkeypatch):
    from aptckpt.storage.local._cachepolicy import CacheBudget

    real = fcntl.fcntl

    def refuse_direct(fd: int, cmd: int, arg: Any = 0) -> Any:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(_directio.fcntl, "fcntl", refuse_direct)
    data = os.urandom(3 * SMALL + 5)
    with DirectWriter(
        tmp_path / "f", direct=True, cache=CacheBudget(SMALL), buffer_size=SMALL
    ) as f:
        f.write(data)
    assert not f.direct and (tmp_path / "f").read_bytes() == data
