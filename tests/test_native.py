"""Tests of the compiled core ``aptckpt._native`` and its pure-Python twin ``aptckpt._pyimpl``.

Every contract test runs against both (the ``native`` case is skipped when the extension is not
built); a second group checks that the two give byte-identical results and identical errors; a
third covers what only native code can get wrong: the GIL, the thread pool, fork, and the
AVX2/SSE2/scalar hash kernels.
"""

from __future__ import annotations

import errno
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from aptckpt import _accel, _pyimpl


def _import_native() -> ModuleType | None:
    try:
        from aptckpt import _native
    except ImportError:
        return None
    module: ModuleType = _native
    return module


NATIVE = _import_native()
needs_native = pytest.mark.skipif(NATIVE is None, reason="aptckpt._native is not built")
IMPLS = [
    pytest.param(_pyimpl, id="python"),
    pytest.param(NATIVE, id="native", marks=needs_native),
]
MiB = 1 << 20


def _random(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


DATA = _random(5 * MiB + 123)


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = request.param
    return module


# ---- the surface ----


ACCEL_FUNCTIONS = set(_accel.__all__) - {"IMPLEMENTATION", "NATIVE", "NATIVE_UNAVAILABLE"}


def test_twin_exports_exactly_the_accel_functions() -> None:
    assert set(_pyimpl.__all__) == ACCEL_FUNCTIONS


@needs_native
def test_native_exports_exactly_the_accel_functions() -> None:
    assert {name for name in dir(NATIVE) if not name.startswith("_")} == ACCEL_FUNCTIONS


# ---- XXH3-128 ----


def _boundary_lengths() -> list[int]:
    around = (-65, -64, -63, -1, 0, 1, 63, 64, 65)
    blocks = [k * 1024 + d for k in (1, 2, 3, 4, 16, 17, 64) for d in around]
    return sorted({*range(257), 240, 241, 255, 256, 257, 320, 511, 512, 513, *blocks, 5 * MiB + 7})


def test_xxh3_matches_xxhash_for_every_length_class(impl: ModuleType) -> None:
    for length in _boundary_lengths():
        for start in (0, 3):  # 3: an unaligned slice
            view = memoryview(DATA)[start : start + length]
            assert impl.xxh3_128(view) == xxhash.xxh3_128_digest(view), (length, start)


@given(data=st.binary(max_size=3000), start=st.integers(0, 15))
@pytest.mark.parametrize("module", IMPLS)
def test_xxh3_matches_xxhash_on_random_input(module: ModuleType, data: bytes, start: int) -> None:
    view = memoryview(data)[start:]
    assert module.xxh3_128(view) == xxhash.xxh3_128_digest(view)


def test_xxh3_accepts_any_contiguous_buffer(impl: ModuleType) -> None:
    array = np.frombuffer(DATA[: 4 * 1000], dtype=np.float32).reshape(10, 100)
    expected = xxhash.xxh3_128_digest(array.tobytes())
    assert impl.xxh3_128(array) == expected
    assert impl.xxh3_128(bytearray(array.tobytes())) == expected
    assert impl.xxh3_128(np.empty((0, 3), dtype=np.float64)) == xxhash.xxh3_128_digest(b"")


def test_buffer_arguments_are_validated(impl: ModuleType) -> None:
    strided = np.arange(100, dtype=np.uint8)[::2]
    with pytest.raises(ValueError, match="data must be C-contiguous"):
        impl.xxh3_128(strided)
    with pytest.raises(TypeError, match="data must support the buffer protocol"):
        impl.xxh3_128("text")
    with pytest.raises(ValueError, match="out must be writable"):
        impl.shuffle(b"abcd", 2, b"wxyz")


# ---- chunk hashing ----


def _reference_chunks(data: bytes, size: int) -> bytes:
    return b"".join(xxhash.xxh3_128_digest(data[i : i + size]) for i in range(0, len(data), size))


@pytest.mark.parametrize("size", [1, 1000, 4096, MiB, 5 * MiB + 123, 8 * MiB])
def test_hash_chunks_cuts_the_last_chunk_short(impl: ModuleType, size: int) -> None:
    data = DATA[:5001] if size == 1 else DATA[: 3 * MiB + 5] if size <= 4096 else DATA
    got = impl.hash_chunks(data, size, threads=2)
    assert got == _reference_chunks(data, size)
    assert len(got) == 16 * -(-len(data) // size)


def test_hash_chunks_of_nothing_is_empty(impl: ModuleType) -> None:
    assert impl.hash_chunks(b"", 4096) == b""
    assert impl.hash_chunks_many([], 4096) == []
    assert impl.hash_chunks_many([b"", b"x"], 4096) == [b"", xxhash.xxh3_128_digest(b"x")]


@pytest.mark.parametrize("bad", [0, -1])
def test_chunk_size_and_threads_are_validated(impl: ModuleType, bad: int) -> None:
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        impl.hash_chunks(b"abc", bad)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        impl.hash_chunks_many([b"abc"], bad)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        impl.hash_chunks(b"abc", 1, threads=-1)


def test_hash_chunks_many_equals_hash_chunks_of_each(impl: ModuleType) -> None:
    buffers = [DATA[: 3 * MiB], b"", DATA[7 : 7 + 5000], np.frombuffer(DATA[:4096], np.int64)]
    expected = [impl.hash_chunks(b, 1024) for b in buffers]
    for threads in (0, 1, 2, 7):
        assert impl.hash_chunks_many(buffers, 1024, threads=threads) == expected


# ---- shuffle / unshuffle / xor ----


def _reference_shuffle(data: bytes, itemsize: int) -> bytes:
    n = len(data) // itemsize
    body = np.frombuffer(data[: n * itemsize], np.uint8).reshape(n, itemsize)
    return body.T.tobytes() + data[n * itemsize :]


SHUFFLE_SIZES = [1, 2, 3, 4, 5, 8, 16, 32, 100]


@pytest.mark.parametrize("itemsize", SHUFFLE_SIZES)
def test_shuffle_layout_and_round_trip(impl: ModuleType, itemsize: int) -> None:
    # Lengths around the 16-element vector block, below one item, and not multiples of itemsize.
    lengths = {0, 1, itemsize - 1, 16 * itemsize - 1, 16 * itemsize, 16 * itemsize + 1}
    lengths |= {33 * itemsize + itemsize // 2, 4 * MiB + 3}
    for length in sorted(n for n in lengths if n >= 0):
        data = DATA[:length]
        out = bytearray(length)
        impl.shuffle(data, itemsize, out)
        assert bytes(out) == _reference_shuffle(data, itemsize), length
        back = np.empty(length, np.uint8)
        impl.unshuffle(out, itemsize, back)
        assert back.tobytes() == data, length
        fused = np.empty(length, np.uint8)
        assert impl.unshuffle_hash(out, itemsize, fused) == xxhash.xxh3_128_digest(data), length
        assert fused.tobytes() == data, length


@pytest.mark.parametrize("itemsize", [1, 2, 3, 4, 8, 16])
def test_unshuffle_hash_across_its_segments_and_blocks(impl: ModuleType, itemsize: int) -> None:
    """The core unshuffles 32 KiB of output, then hashes the 1 KiB blocks it completed: lengths
    around both, and around the 240-byte short-input limit of XXH3."""
    segment = 32 << 10
    lengths = {239, 240, 241, 1023, 1024, 1025, segment - 1, segment, segment + 1}
    lengths |= {3 * segment + 1000, 3 * segment + 1024, 4 * MiB, 4 * MiB + 1}
    for length in sorted(lengths):
        data = DATA[:length]
        shuffled = bytearray(length)
        impl.shuffle(data, itemsize, shuffled)
        out = bytearray(length)
        assert impl.unshuffle_hash(shuffled, itemsize, out) == xxhash.xxh3_128_digest(data)
        assert bytes(out) == data, length


def test_shuffle_arguments_are_validated(impl: ModuleType) -> None:
    buf = bytearray(64)
    with pytest.raises(ValueError, match="itemsize must be >= 1"):
        impl.shuffle(b"x" * 64, 0, buf)
    with pytest.raises(ValueError, match="out has 64 bytes but src has 63"):
        impl.unshuffle(b"x" * 63, 4, buf)
    with pytest.raises(ValueError, match="out must not overlap src"):
        impl.shuffle(memoryview(buf)[:32], 4, memoryview(buf)[16:48])


def test_xor(impl: ModuleType) -> None:
    a = np.frombuffer(DATA[: MiB + 3], np.uint8)
    b = np.frombuffer(DATA[7 : MiB + 10], np.uint8)
    expected = (a ^ b).tobytes()
    out = bytearray(a.size)
    impl.xor(a, b, out)
    assert bytes(out) == expected
    in_place = a.copy()
    impl.xor(in_place, b, in_place)
    assert in_place.tobytes() == expected
    in_place = b.copy()
    impl.xor(a, in_place, in_place)
    assert in_place.tobytes() == expected


def test_xor_arguments_are_validated(impl: ModuleType) -> None:
    buf = bytearray(100)
    with pytest.raises(ValueError, match="a has 3 bytes but b has 4"):
        impl.xor(b"abc", b"abcd", bytearray(3))
    with pytest.raises(ValueError, match="out has 2 bytes but a has 3"):
        impl.xor(b"abc", b"abc", bytearray(2))
    with pytest.raises(ValueError, match="out must be a, b, or a buffer overlapping neither"):
        impl.xor(memoryview(buf)[:50], b"x" * 50, memoryview(buf)[10:60])


# ---- positional I/O ----


@pytest.fixture
def rw_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "data.bin", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def _layout(sizes: list[int], seed: int) -> list[int]:
    """Offsets placing the buffers in a shuffled order, with gaps, none overlapping."""
    order = np.random.default_rng(seed).permutation(len(sizes))
    offsets, position = [0] * len(sizes), 0
    for i in order:
        offsets[i] = position
        position += sizes[i] + 13
    return offsets


@pytest.mark.parametrize("threads", [1, 4])
def test_pwrite_then_pread_many(impl: ModuleType, rw_fd: int, threads: int) -> None:
    sizes = [int(s) for s in np.random.default_rng(1).integers(0, 70_000, 40)] + [0, 20 * MiB]
    blobs = [_random(s, seed=i) for i, s in enumerate(sizes)]
    offsets = _layout(sizes, seed=2)
    assert impl.pwrite_many(rw_fd, blobs, offsets, threads=threads) == sum(sizes)
    back = [bytearray(s) for s in sizes]
    impl.pread_many(rw_fd, back, np.array(offsets), threads=threads)
    assert [bytes(b) for b in back] == blobs


def test_pread_past_end_of_file_is_eof_error(impl: ModuleType, rw_fd: int) -> None:
    impl.pwrite_many(rw_fd, [b"x" * 100], [0])
    out = [bytearray(10), bytearray(50)]
    with pytest.raises(EOFError, match=r"buffer 1 \(50 bytes at offset 60\).*after 40 of"):
        impl.pread_many(rw_fd, out, [0, 60])


def _read_layout(tmp_path: Path, seed: int) -> tuple[list[int], list[int], list[int], bytes]:
    """Spans over two files: runs of adjacent small spans (grouped into one preadv), large
    spans, gaps, empty spans, spans past the end of a file; returns (fds, sizes, offsets,
    the expected digests)."""
    rng = np.random.default_rng(seed)
    contents = [_random(300_000, seed=seed), _random(50_000, seed=seed + 1)]
    fds, sizes, offsets = [], [], []
    for which, content in enumerate(contents):
        path = tmp_path / f"f{seed}-{which}.bin"
        path.write_bytes(content)
        fd = os.open(path, os.O_RDONLY)
        position = 0
        while position < len(content) + 100:
            size = int(rng.choice([0, 1, 7, 100, 4096, 70_000]))
            fds.append(fd)
            sizes.append(size)
            offsets.append(position)
            position += size + int(rng.choice([0, 0, 0, 5]))  # mostly adjacent
    digests = b"".join(
        _pyimpl.xxh3_128(contents[0 if fd == fds[0] else 1][o : o + n])
        for fd, n, o in zip(fds, sizes, offsets, strict=True)
    )
    return fds, sizes, offsets, digests


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threads", [1, 3])
def test_read_verify_many_reads_checks_and_names_short_and_damaged(
    impl: ModuleType, tmp_path: Path, seed: int, threads: int
) -> None:
    fds, sizes, offsets, digests = _read_layout(tmp_path, seed)
    try:
        files = {fd: os.pread(fd, 1 << 20, 0) for fd in set(fds)}
        expected_eof = [  # an empty buffer is never cut short
            i
            for i, (fd, n, o) in enumerate(zip(fds, sizes, offsets, strict=True))
            if n and o + n > len(files[fd])
        ]
        damaged = sorted({(7 * seed + 3 * k) % len(sizes) for k in range(3)} - set(expected_eof))
        wrong = bytearray(digests)
        for i in damaged:
            wrong[16 * i] ^= 1
        out = [bytearray(n) for n in sizes]
        found = impl.read_verify_many(fds, out, offsets, bytes(wrong), threads=threads)
        assert found == sorted(
            [(i, "eof") for i in expected_eof] + [(i, "digest") for i in damaged]
        )
        for i, (fd, n, o) in enumerate(zip(fds, sizes, offsets, strict=True)):
            if i not in expected_eof:
                assert bytes(out[i]) == files[fd][o : o + n], i
        unchecked = [bytearray(n) for n in sizes]
        assert impl.read_verify_many(fds, unchecked, offsets, threads=threads) == [
            (i, "eof") for i in expected_eof
        ]
    finally:
        for fd in set(fds):
            os.close(fd)


def test_read_verify_many_never_calls_an_empty_buffer_short(impl: ModuleType, rw_fd: int) -> None:
    os.pwrite(rw_fd, b"0123456789", 0)
    out = [bytearray(20), bytearray(0), bytearray(3)]
    digests = b"".join(impl.xxh3_128(b) for b in (b"x" * 20, b"", b"xyz"))
    assert impl.read_verify_many([rw_fd] * 3, out, [0, 20, 20], digests) == [
        (0, "eof"),
        (2, "eof"),
    ]


def test_read_verify_many_validates_its_arguments(impl: ModuleType, rw_fd: int) -> None:
    with pytest.raises(ValueError, match="got 2 buffers but 1 file descriptors"):
        impl.read_verify_many([rw_fd], [bytearray(1), bytearray(1)], [0, 1])
    with pytest.raises(ValueError, match="digests has 3 bytes; it must hold 16 per buffer"):
        impl.read_verify_many([rw_fd], [bytearray(1)], [0], b"abc")
    with pytest.raises(ValueError, match=r"buffers\[0\] must be writable"):
        impl.read_verify_many([rw_fd], [b"x"], [0])
    with pytest.raises(OSError, match="read_verify_many: buffer 1") as info:
        impl.read_verify_many([rw_fd, -1], [bytearray(0), bytearray(2)], [0, 0])
    assert info.value.errno == errno.EBADF


def test_io_errors_carry_errno(impl: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(OSError, match="pwrite_many: buffer 0") as info:
        impl.pwrite_many(-1, [b"abc"], [0])
    assert info.value.errno == errno.EBADF
    path = tmp_path / "ro.bin"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="pwrite_many") as info:
            impl.pwrite_many(fd, [b"", b"abc"], [0, 0], threads=2)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="pread_many: buffer 0") as info:
        impl.pread_many(-1, [bytearray(3)], [0])
    assert info.value.errno == errno.EBADF


def test_io_arguments_are_validated(impl: ModuleType, rw_fd: int) -> None:
    with pytest.raises(ValueError, match="got 2 buffers but 1 offsets"):
        impl.pwrite_many(rw_fd, [b"a", b"b"], [0])
    with pytest.raises(ValueError, match=r"offsets\[0\]=-1 is out of range"):
        impl.pwrite_many(rw_fd, [b"a"], [-1])
    with pytest.raises(ValueError, match=r"offsets\[0\]=9223372036854775807 is out of range"):
        impl.pwrite_many(rw_fd, [b"a"], [2**63 - 1])
    with pytest.raises(ValueError, match=r"buffers\[0\] must be writable"):
        impl.pread_many(rw_fd, [b"read-only"], [0])


# ---- threads ----


@pytest.mark.parametrize("value", ["", "3", " 5 ", "1_0", "abc", "0", "-2"])
def test_default_threads_follows_config(
    impl: ModuleType, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from aptckpt import _config

    monkeypatch.setenv("APTCKPT_THREADS", value)
    assert impl.default_threads() == _config.threads()


def test_simd_names_the_hash_kernel(impl: ModuleType) -> None:
    allowed = {"python"} if impl is _pyimpl else {"avx2", "sse2", "scalar"}
    assert impl.simd() in allowed


# ---- native and twin agree byte for byte ----


@needs_native
@given(
    data=st.binary(max_size=5000),
    itemsize=st.integers(1, 20),
    chunk=st.integers(1, 700),
    threads=st.integers(0, 3),
)
def test_native_and_twin_agree(data: bytes, itemsize: int, chunk: int, threads: int) -> None:
    assert NATIVE is not None
    assert NATIVE.xxh3_128(data) == _pyimpl.xxh3_128(data)
    assert NATIVE.hash_chunks(data, chunk, threads) == _pyimpl.hash_chunks(data, chunk, threads)
    many = [data, data[1:], b""]
    assert NATIVE.hash_chunks_many(many, chunk) == _pyimpl.hash_chunks_many(many, chunk)
    for name in ("shuffle", "unshuffle", "unshuffle_hash"):
        native_out, twin_out = bytearray(len(data)), bytearray(len(data))
        found = getattr(NATIVE, name)(data, itemsize, native_out)
        assert found == getattr(_pyimpl, name)(data, itemsize, twin_out)
        assert native_out == twin_out
    native_out, twin_out = bytearray(len(data)), bytearray(len(data))
    NATIVE.xor(data, data[::-1], native_out)
    _pyimpl.xor(data, data[::-1], twin_out)
    assert native_out == twin_out


def _error_of(call: object) -> tuple[type[BaseException], int | None, str]:
    try:
        call()  # type: ignore[operator]
    except (OSError, EOFError, ValueError, TypeError) as err:
        return type(err), getattr(err, "errno", None), str(err)
    raise AssertionError("no error raised")


@needs_native
def test_native_and_twin_raise_the_same_errors(rw_fd: int) -> None:
    os.pwrite(rw_fd, b"y" * 10, 0)
    calls = {
        "eof": lambda m: m.pread_many(rw_fd, [bytearray(4), bytearray(8)], [0, 5]),
        "read-ebadf": lambda m: m.read_verify_many([rw_fd, -1], [bytearray(3)] * 2, [0, 3]),
        "read-fds": lambda m: m.read_verify_many([rw_fd], [bytearray(3)] * 2, [0, 3]),
        "ebadf": lambda m: m.pwrite_many(-1, [b"", b"abc"], [0, 7]),
        "offsets": lambda m: m.pread_many(rw_fd, [bytearray(1)], [0, 1]),
        "chunk": lambda m: m.hash_chunks(b"a", 0),
        "size": lambda m: m.shuffle(b"abc", 2, bytearray(4)),
        "readonly": lambda m: m.xor(b"a", b"b", b"c"),
    }
    for name, call in calls.items():
        native = _error_of(lambda call=call: call(NATIVE))
        twin = _error_of(lambda call=call: call(_pyimpl))
        assert native == twin, name


@needs_native
def test_zero_length_buffers_touch_no_file() -> None:
    for module in (NATIVE, _pyimpl):
        assert module is not None
        assert module.pwrite_many(-1, [b"", bytearray()], [0, 0]) == 0
        module.pread_many(-1, [bytearray()], [0])


# ---- what only native code can get wrong ----


@needs_native
def test_native_releases_the_gil() -> None:
    assert NATIVE is not None
    data = np.frombuffer(_random(64 * MiB), np.uint8)
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        start, began = count[0], time.perf_counter()
        time.sleep(0.05)  # the spinner alone: its full speed
        rate = (count[0] - start) / (time.perf_counter() - began)
        start, began = count[0], time.perf_counter()
        NATIVE.hash_chunks_many([data] * 32, 4 * MiB, threads=1)  # 2 GiB of hashing
        elapsed = time.perf_counter() - began
        advanced = count[0] - start
    finally:
        stop.set()
        spinner.join()
    # Holding the GIL, the call would let the spinner run at most one 5 ms switch interval
    # before and one after it; released, the spinner runs for the whole call.
    assert elapsed > 0.03
    assert advanced > rate * elapsed * 0.3, (advanced, rate, elapsed)


@needs_native
def test_concurrent_callers_share_the_pool() -> None:
    assert NATIVE is not None
    buffers = [DATA[i : i + 2 * MiB + i] for i in range(6)]
    expected = [_reference_chunks(b, 65536) for b in buffers]
    results: dict[int, bytes] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = NATIVE.hash_chunks(buffers[i], 65536, threads=2)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(buffers))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [results[i] for i in range(len(buffers))] == expected


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_pool_works_in_a_forked_child() -> None:
    assert NATIVE is not None
    expected = NATIVE.hash_chunks(DATA, 65536, threads=2)  # starts the pool's workers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a threaded process
        pid = os.fork()
    if pid == 0:  # child: the parent's workers are gone; a stale pool would hang here
        ok = NATIVE.hash_chunks(DATA, 65536, threads=2) == expected
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 20
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if status[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the thread pool")
    assert os.waitstatus_to_exitcode(status[1]) == 0


_KERNEL_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("aptckpt._native", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
data = sys.stdin.buffer.read()
lengths = [int(n) for n in sys.argv[2:]]
print(native.simd(), b"".join(native.xxh3_128(data[:n]) for n in lengths).hex())
"""


@needs_native
@pytest.mark.parametrize("kernel", ["sse2", "scalar"])
def test_every_hash_kernel_gives_the_same_digests(kernel: str) -> None:
    assert NATIVE is not None
    assert NATIVE.__file__ is not None
    lengths = [*[n for n in _boundary_lengths() if n > 240][::3], len(DATA)]
    env = {**os.environ, "APTCKPT_SIMD": kernel}
    args = [sys.executable, "-c", _KERNEL_SCRIPT, NATIVE.__file__, *map(str, lengths)]
    proc = subprocess.run(args, input=DATA, env=env, capture_output=True, check=True, timeout=60)
    name, digests = proc.stdout.decode().split()
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert name == kernel
    assert bytes.fromhex(digests) == b"".join(xxhash.xxh3_128_digest(DATA[:n]) for n in lengths)
