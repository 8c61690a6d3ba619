"""load(..., into=...): saved tensors written into existing ones, in place."""

from __future__ import annotations

import pytest
import torch

import aptckpt
from aptckpt.testing import assert_state_equal

BACKENDS = ["zstd", "delta", "torch"]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    m[2].weight = torch.nn.Parameter(m[2].weight.detach().to(torch.bfloat16))  # mixed dtypes
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_is_filled_in_place(tmp_path, backend):
    saved = model()
    aptckpt.save(saved.state_dict(), tmp_path / "c", backend=backend, chunk_size=256)
    target = model()
    for p in target.parameters():
        p.data.zero_()
    before = {k: v.data_ptr() for k, v in target.state_dict().items()}
    state = aptckpt.load(tmp_path / "c", into=target)
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == before  # same memory
    assert_state_equal(saved.state_dict(), target.state_dict())
    assert state["0.weight"] is target[0].weight  # the destination object itself
    assert target[0].weight.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_part_of_a_state_strided_destinations_and_the_rest_allocated(tmp_path, backend):
    g = torch.Generator().manual_seed(1)
    saved = {
        "model": {"w": torch.randn(8, 8, generator=g)},
        "opt": {"m": torch.randn(5, generator=g)},
    }
    aptckpt.save(saved, tmp_path / "c", backend=backend)
    strided = torch.zeros(8, 16)[:, ::2]  # not contiguous: filled by one copy
    state = aptckpt.load(tmp_path / "c", into={"model": {"w": strided}})
    assert state["model"]["w"] is strided and torch.equal(strided, saved["model"]["w"])
    assert torch.equal(state["opt"]["m"], saved["opt"]["m"])  # no destination: allocated


def test_a_mismatched_destination_is_refused_before_reading(tmp_path):
    aptckpt.save({"w": torch.ones(4)}, tmp_path / "c")
    dest = torch.zeros(5)
    with pytest.raises(ValueError, match=r"state\['w'\] is float32 \(5,\)"):
        aptckpt.load(tmp_path / "c", into={"w": dest})
    assert torch.equal(dest, torch.zeros(5))


def test_damage_is_still_detected(tmp_path):
    aptckpt.save({"w": torch.ones(1000)}, tmp_path / "c", codec="none")
    shard = next((tmp_path / "c").glob("shard-*"))
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(aptckpt.IntegrityError, match="shard"):
        aptckpt.load(tmp_path / "c", into={"w": torch.zeros(1000)})
