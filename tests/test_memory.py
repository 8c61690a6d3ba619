"""_memory: fresh tensors for loads (huge-page advice) and populating pages before a decode."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from aptckpt import _memory


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (1 << 20,), ((4 << 20) + 3,), (2, 3 << 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.complex64])
def test_empty_is_an_ordinary_tensor(shape, dtype):
    t = _memory.empty(shape, dtype)
    assert t.shape == shape
    assert t.dtype == dtype
    assert t.is_contiguous()
    t.fill_(1)  # writable everywhere, huge-page advised or not
    assert bool((t == 1).all())
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, (64 << 10) - 1, 64 << 10, (1 << 20) + 3])
@pytest.mark.parametrize("offset", [0, 1, 4095])
def test_populate_keeps_contents_at_every_size_and_alignment(size, offset):
    data = bytearray(os.urandom(size + offset))
    before = bytes(data)
    _memory.populate(memoryview(data)[offset:])
    assert bytes(data) == before


def test_the_environment_turns_the_hints_off(monkeypatch):
    monkeypatch.setenv("APTCKPT_HUGEPAGES", "off")
    assert _memory._madvise() is None
    monkeypatch.setenv("APTCKPT_HUGEPAGES", "1")
    expected = sys.platform.startswith("linux") and os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled"
    )
    assert (_memory._madvise() is not None) == (expected and _memory.hugepages_enabled())
