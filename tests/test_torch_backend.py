"""torch backend: what its file holds for tensors torch.save mishandles, interrupted saves,
and files torch.load cannot read told apart from damaged ones."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import time

import pytest
import torch

import aptckpt
from aptckpt.backends import torch as torch_backend
from aptckpt.errors import FormatError, IntegrityError
from aptckpt.storage.local import _directio
from aptckpt.testing import assert_state_equal
from aptckpt.testing.conformance import storage_views_state


def open_fds():
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def test_views_of_odd_storages_load_with_plain_torch_load(tmp_path):
    state = storage_views_state()
    aptckpt.save(state, tmp_path / "c", backend="torch")
    plain = torch.load(tmp_path / "c" / "state.pt", weights_only=True)
    assert_state_equal(state, plain)
    assert_state_equal(state, aptckpt.load(tmp_path / "c"))
    # The bool tensor's stored bytes are kept, not normalised to 0/1 by a value copy.
    assert plain["bools"].view(torch.uint8).tolist() == [1, 0, 7, 9]


def test_small_view_of_a_large_storage_writes_only_the_view(tmp_path):
    big = torch.zeros(1 << 20)  # 4 MiB
    aptckpt.save({"head": big[:4]}, tmp_path / "c", backend="torch")
    assert (tmp_path / "c" / "state.pt").stat().st_size < 64 << 10


def test_overlapping_views_load_independent_like_other_backends(tmp_path):
    base = torch.arange(6.0)
    aptckpt.save({"all": base, "tail": base[2:]}, tmp_path / "c", backend="torch")
    loaded = aptckpt.load(tmp_path / "c")
    loaded["all"][3] = 100.0
    assert loaded["tail"].tolist() == [2.0, 3.0, 4.0, 5.0]


def test_whole_storage_tensors_are_written_as_they_are(tmp_path):
    # No copy where none is needed: an expanded tensor keeps its zero stride.
    expanded = torch.ones(1, 6).expand(4, 6)
    aptckpt.save({"e": expanded}, tmp_path / "c", backend="torch")
    plain = torch.load(tmp_path / "c" / "state.pt", weights_only=True)
    assert plain["e"].stride() == (0, 1) and torch.equal(plain["e"], expanded)


def save_unreadable(path):
    """A checkpoint whose state.pt torch.load refuses, as older aptckpt versions wrote it."""
    saved = torch_backend._alone
    torch_backend._alone = list  # what the backend did before: tensors as they are
    try:
        aptckpt.save({"t": storage_views_state()["five_bytes_as_int16"]}, path, backend="torch")
    finally:
        torch_backend._alone = saved


@pytest.mark.parametrize("verify", [True, False])
def test_file_torch_cannot_read_is_not_called_damaged(tmp_path, verify):
    save_unreadable(tmp_path / "c")
    with pytest.raises(FormatError, match="The file is not damaged") as info:
        aptckpt.load(tmp_path / "c", verify=verify)
    assert not isinstance(info.value, IntegrityError)
    assert "record size" in str(info.value)  # torch's own reason
    assert "save the state again" in str(info.value)


def test_damaged_file_torch_cannot_read_is_damage_without_verify(tmp_path):
    aptckpt.save({"w": torch.ones(100)}, tmp_path / "c", backend="torch")
    data = bytearray((tmp_path / "c" / "state.pt").read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, 26)  # the first member: data.pkl
    data[30 + name_len + extra_len] ^= 0xFF  # the pickle's first opcode
    (tmp_path / "c" / "state.pt").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="is damaged"):
        aptckpt.load(tmp_path / "c", verify=False)


def test_other_torch_version_is_named(tmp_path, monkeypatch):
    save_unreadable(tmp_path / "c")
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    with pytest.raises(FormatError, match=r"load it with torch 2\.[^ ]*, then save"):
        aptckpt.load(tmp_path / "c")


# ---------------------------------------------------------------- interruptions


@pytest.mark.parametrize("at", [1, 2, 5, -1])
def test_ctrl_c_during_a_torch_save_arrives_as_keyboard_interrupt(tmp_path, monkeypatch, at):
    state = {f"w{i}": torch.randn(64, 64) for i in range(8)}
    aptckpt.save(state, tmp_path / "warm", backend="torch")  # imports and pools warmed up
    calls = []
    write = _directio.DirectWriter.write

    def counted(self, data):
        calls.append(1)
        return write(self, data)

    monkeypatch.setattr(_directio.DirectWriter, "write", counted)
    aptckpt.save(state, tmp_path / "count", backend="torch")
    total = len(calls)
    target = total if at == -1 else at  # -1: the last write (torch's end of the zip)
    assert total > 5

    def interrupted(self, data):
        calls.append(1)
        if len(calls) == target:
            raise KeyboardInterrupt
        return write(self, data)

    monkeypatch.setattr(_directio.DirectWriter, "write", interrupted)
    calls.clear()
    before = open_fds()
    with pytest.raises(KeyboardInterrupt) as info:
        aptckpt.save(state, tmp_path / "c", backend="torch")
    assert info.value.__suppress_context__ or info.value.__context__ is None
    assert open_fds() == before
    assert not (tmp_path / "c").exists()
    assert sorted(os.listdir(tmp_path)) == ["count", "warm"]  # no temporary left


def test_ctrl_c_from_a_signal_never_surfaces_as_runtime_error(tmp_path):
    state = {f"w{i}": torch.randn(256, 256) for i in range(16)}  # 4 MiB
    started = time.perf_counter()
    aptckpt.save(state, tmp_path / "warm", backend="torch")
    took = time.perf_counter() - started
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    outcomes = set()
    try:
        for k in range(12):
            path = tmp_path / f"c{k}"
            try:
                signal.setitimer(signal.ITIMER_REAL, took * (k + 0.5) / 12)
                aptckpt.save(state, path, backend="torch")
                signal.setitimer(signal.ITIMER_REAL, 0)
                outcomes.add("saved")
            except KeyboardInterrupt:
                signal.setitimer(signal.ITIMER_REAL, 0)
                outcomes.add("interrupted")
                # Interrupted at any point: committed whole, or not at all.
                if path.exists():
                    assert_state_equal(state, aptckpt.load(path))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert "interrupted" in outcomes
