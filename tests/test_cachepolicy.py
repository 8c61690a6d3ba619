"""The page-cache policy of local saves: which speeds make a disk slow, how much of a save is
cached, the overrides; and that a save obeys it (cached bytes are cached, the rest direct)."""

from __future__ import annotations

import os
import threading

import pytest

import aptckpt
from aptckpt.storage.local import _cachepolicy
from aptckpt.storage.local._cachepolicy import SAMPLE_BYTES, SLOW_DISK, CacheBudget
from aptckpt.storage.local._directio import DirectWriter
from conftest import direct_io_supported


@pytest.fixture(autouse=True)
def _fresh_measurements(monkeypatch):
    monkeypatch.delenv("APTCKPT_CACHED_WRITES", raising=False)
    _cachepolicy.forget()
    yield
    _cachepolicy.forget()


def _device(path) -> int:
    return os.stat(path).st_dev


def test_an_unmeasured_disk_gets_no_cached_bytes(tmp_path):
    assert _cachepolicy.measured_speed(_device(tmp_path)) is None
    assert _cachepolicy.budget_for(tmp_path) == 0


def test_samples_form_only_from_enough_bytes():
    _cachepolicy.record(7, SAMPLE_BYTES - 1, 1.0)
    assert _cachepolicy.measured_speed(7) is None
    _cachepolicy.record(7, 1, 1.0)  # together they make one sample
    assert _cachepolicy.measured_speed(7) == pytest.approx(SAMPLE_BYTES / 2.0)


@pytest.mark.parametrize(("nbytes", "seconds"), [(0, 1.0), (SAMPLE_BYTES, 0.0), (-1, 1.0)])
def test_empty_or_instant_measurements_are_ignored(nbytes, seconds):
    _cachepolicy.record(7, nbytes, seconds)
    assert _cachepolicy.measured_speed(7) is None


def test_the_median_of_the_last_samples_decides():
    for speed in (0.1e9, 5e9, 5e9, 5e9, 0.1e9):
        _cachepolicy.record(7, SAMPLE_BYTES, SAMPLE_BYTES / speed)
    assert _cachepolicy.measured_speed(7) == pytest.approx(5e9)
    for _ in range(3):  # the disk slowed down: three new slow samples outvote the old ones
        _cachepolicy.record(7, SAMPLE_BYTES, SAMPLE_BYTES / 0.1e9)
    assert _cachepolicy.measured_speed(7) == pytest.approx(0.1e9)


@pytest.mark.parametrize(
    ("speed", "cached"),
    [(SLOW_DISK * 0.4, True), (SLOW_DISK * 0.999, True), (SLOW_DISK * 1.001, False)],
)
def test_a_disk_slower_than_the_page_cache_gets_a_budget(tmp_path, speed, cached):
    _cachepolicy.record(_device(tmp_path), SAMPLE_BYTES, SAMPLE_BYTES / speed)
    budget = _cachepolicy.budget_for(tmp_path)
    assert (budget > 0) is cached
    if cached:  # an eighth of the available memory
        assert 0 < budget <= _cachepolicy.available_memory() // 8 + (64 << 20)


@pytest.mark.parametrize(
    ("value", "cached"), [("never", False), ("always", True), ("Never ", False)]
)
def test_the_environment_overrides_the_measurement(tmp_path, monkeypatch, value, cached):
    _cachepolicy.record(_device(tmp_path), SAMPLE_BYTES, SAMPLE_BYTES / (0.1e9))  # slow
    monkeypatch.setenv("APTCKPT_CACHED_WRITES", value)
    assert (_cachepolicy.budget_for(tmp_path) > 0) is cached


@pytest.mark.parametrize(("value", "budget"), [("0", 0), ("1", 1), ("123456", 123456)])
def test_the_environment_can_name_the_bytes_to_cache(tmp_path, monkeypatch, value, budget):
    monkeypatch.setenv("APTCKPT_CACHED_WRITES", value)
    assert _cachepolicy.budget_for(tmp_path) == budget


@pytest.mark.parametrize("value", ["sometimes", "-5", "1e9", ""])
def test_an_unknown_setting_means_auto(tmp_path, monkeypatch, value):
    monkeypatch.setenv("APTCKPT_CACHED_WRITES", value)
    assert _cachepolicy.mode() == "auto"
    assert _cachepolicy.budget_for(tmp_path) == 0


def test_a_missing_directory_gets_no_budget(tmp_path):
    assert _cachepolicy.budget_for(tmp_path / "gone") == 0


def test_a_budget_is_shared_by_threads_without_overdrawing():
    budget = CacheBudget(10_000)
    granted: list[int] = []

    def take() -> None:
        for _ in range(1000):
            granted.append(budget.take(7))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 10_000 and budget.left == 0
    assert CacheBudget(-5).take(3) == 0


def test_direct_writes_are_measured(tmp_path):
    if not direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    if _cachepolicy._counters(_block_stat(tmp_path)) is None:
        pytest.skip("no block device behind this file system")
    with DirectWriter(tmp_path / "f", direct=True) as f:
        f.write(os.urandom(1 << 20) * (SAMPLE_BYTES >> 20))
    assert _cachepolicy.measured_speed(_device(tmp_path)) is not None


def _block_stat(path) -> str:
    device = os.stat(path).st_dev
    return f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat"


def test_a_file_system_without_a_block_device_is_never_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(_cachepolicy, "_counters", lambda path: None)
    with DirectWriter(tmp_path / "f", direct=True) as f:
        f.write(bytes(SAMPLE_BYTES))
    assert _cachepolicy.measured_speed(_device(tmp_path)) is None
    assert _cachepolicy.budget_for(tmp_path) == 0


def test_cgroup_limits_bound_the_available_memory(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    (root / "a" / "b").mkdir(parents=True)
    (root / "memory.max").write_text("max\n")  # the root: no limit
    (root / "a" / "memory.max").write_text(str(3 << 30))
    (root / "a" / "memory.current").write_text(str(1 << 30))
    (root / "a" / "b" / "memory.max").write_text("max\n")
    (root / "a" / "b" / "memory.current").write_text(str(1 << 29))
    (tmp_path / "self-cgroup").write_text("0::/a/b\n")
    monkeypatch.setitem(
        _cachepolicy._CGROUP_FILES, "v2", (str(root), "memory.max", "memory.current")
    )
    real_open = open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/self/cgroup":
            path = tmp_path / "self-cgroup"
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert _cachepolicy.available_memory() <= 2 << 30  # a's limit less a's usage
    monkeypatch.setenv("APTCKPT_CACHED_WRITES", "always")
    assert 0 < _cachepolicy.budget_for(tmp_path) <= (2 << 30) // 8


def test_a_save_to_a_slow_disk_is_cached_and_loads(tmp_path, monkeypatch):
    import torch

    state = {"w": torch.randn(3 << 20), "step": 3}
    monkeypatch.setenv("APTCKPT_CACHED_WRITES", "always")
    aptckpt.save(state, tmp_path / "ckpt", codec="none")
    loaded = aptckpt.load(tmp_path / "ckpt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
    aptckpt.verify(tmp_path / "ckpt")
