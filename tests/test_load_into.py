"""load(..., into=...): saved tensors written into existing ones, in place, with the
semantics of Module.load_state_dict (strict keys, named mismatches, tied weights either way)."""

from __future__ import annotations

import numpy as np
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
    result = aptckpt.load(tmp_path / "c", into=target)
    state = result.state
    assert result.missing_keys == result.unexpected_keys == ()
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
    with pytest.raises(aptckpt.IntoMismatchError, match=r"unexpected: state\['opt'\]\['m'\]"):
        aptckpt.load(tmp_path / "c", into={"model": {"w": strided}})
    assert not strided.any()  # refused before reading
    result = aptckpt.load(tmp_path / "c", into={"model": {"w": strided}}, strict=False)
    state = result.state
    assert result.unexpected_keys == ("state['opt']['m']",) and result.missing_keys == ()
    assert state["model"]["w"] is strided and torch.equal(strided, saved["model"]["w"])
    assert torch.equal(state["opt"]["m"], saved["opt"]["m"])  # no destination: allocated


def test_a_mismatched_destination_is_refused_before_reading(tmp_path):
    aptckpt.save({"w": torch.ones(4)}, tmp_path / "c")
    dest = torch.zeros(5)
    with pytest.raises(ValueError, match=r"state\['w'\] is a tensor of float32 \(5,\)"):
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


class Tied(torch.nn.Module):
    """A language model's embedding and output head sharing one weight."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(512, 256)
        self.head = torch.nn.Linear(256, 512, bias=False)
        if tied:
            self.head.weight = self.emb.weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_untied_checkpoint_fills_a_tied_model_in_key_order(tmp_path, backend):
    # An EMA copy ({k: v.clone()}) of a tied model is untied: two saved tensors aim at one
    # destination. They used to be decoded into it concurrently: a torn tensor or a false
    # "the stored bytes changed after saving".
    source = Tied()
    ema = {k: v.detach().clone() for k, v in source.state_dict().items()}
    ema["head.weight"] += 1  # the last in key order wins, as with load_state_dict
    aptckpt.save(ema, tmp_path / "c", backend=backend, chunk_size=4096)
    for _ in range(5):  # it was racy
        target = Tied()
        aptckpt.load(tmp_path / "c", into=target)
        assert target.head.weight is target.emb.weight
        assert torch.equal(target.emb.weight, ema["head.weight"])
    reference = Tied()
    reference.load_state_dict(ema)
    assert torch.equal(reference.emb.weight, target.emb.weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tied_checkpoint_fills_every_destination_of_an_untied_model(tmp_path, backend):
    source = Tied()
    aptckpt.save(source.state_dict(), tmp_path / "c", backend=backend)
    target = Tied(tied=False)
    aptckpt.load(tmp_path / "c", into=target)
    assert torch.equal(target.emb.weight, source.emb.weight)
    assert torch.equal(target.head.weight, source.emb.weight)  # filled too, not only the first


def test_a_checkpoint_holding_the_model_under_a_key_is_refused_with_the_fix(tmp_path):
    model = torch.nn.Linear(3, 2)
    aptckpt.save({"model": model.state_dict(), "step": 5}, tmp_path / "c")
    target = torch.nn.Linear(3, 2)
    before = target.weight.detach().clone()
    with pytest.raises(aptckpt.IntoMismatchError, match=r"under \['model'\]") as info:
        aptckpt.load(tmp_path / "c", into=target)
    assert set(info.value.missing_keys) == {"state['weight']", "state['bias']"}
    assert torch.equal(target.weight, before)
    result = aptckpt.load(tmp_path / "c", into={"model": target})
    assert torch.equal(target.weight, model.weight) and result.state["step"] == 5


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefixes_are_named(tmp_path, prefix):
    model = torch.nn.Linear(3, 2)
    aptckpt.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "c")
    with pytest.raises(aptckpt.IntoMismatchError, match=f"starts with '{prefix}'"):
        aptckpt.load(tmp_path / "c", into=torch.nn.Linear(3, 2))


def test_keys_that_match_nothing_are_refused(tmp_path):
    aptckpt.save({"a": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(aptckpt.IntoMismatchError, match="missing") as info:
        aptckpt.load(tmp_path / "c", into={"b": torch.zeros(2)})
    assert info.value.missing_keys == ("state['b']",)
    assert info.value.unexpected_keys == ("state['a']",)
    result = aptckpt.load(tmp_path / "c", into={"b": torch.zeros(2)}, strict=False)
    assert result.missing_keys == ("state['b']",)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_model_is_filled_through_its_wrapper(tmp_path):
    model = torch.nn.Linear(3, 2)
    aptckpt.save(model.state_dict(), tmp_path / "c")
    target = torch.nn.Linear(3, 2)
    aptckpt.load(tmp_path / "c", into=torch.compile(target))  # compiles nothing until called
    assert torch.equal(target.weight, model.weight)


def test_a_meta_model_is_refused_with_the_fix(tmp_path):
    aptckpt.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "c")
    with torch.device("meta"):
        target = torch.nn.Linear(3, 2)
    with pytest.raises(aptckpt.IntoMismatchError, match="to_empty"):
        aptckpt.load(tmp_path / "c", into=target)


def test_every_mismatch_is_named_before_reading(tmp_path):
    aptckpt.save({"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)}, tmp_path / "c")
    dests = {"a": torch.zeros(3), "b": torch.zeros(3, dtype=torch.int64), "c": torch.zeros(1)}
    with pytest.raises(aptckpt.IntoMismatchError) as info:
        aptckpt.load(tmp_path / "c", into=dests)
    assert "state['a']" in str(info.value) and "state['b']" in str(info.value)
    assert not dests["c"].any()


def test_an_optimizer_in_into_is_refused_with_the_fix(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aptckpt.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c")
    with pytest.raises(aptckpt.IntoMismatchError, match="load_state_dict"):
        aptckpt.load(tmp_path / "c", into={"model": model, "opt": opt})


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_destinations_and_arrays_and_expanded_values(tmp_path, backend):
    saved = {
        "a": torch.arange(6.0),
        "b": torch.arange(6.0) + 10,
        "arr": np.arange(4, dtype=np.int32),
        "ones": torch.ones(1).expand(5),
    }
    aptckpt.save(saved, tmp_path / "c", backend=backend)
    storage = torch.zeros(9)
    dests = {
        "a": storage[:6],  # overlaps "b": never decoded into at once
        "b": storage[3:],
        "arr": np.zeros(4, dtype=np.int32),
        "ones": torch.zeros(5),
    }
    aptckpt.load(tmp_path / "c", into=dests)
    assert torch.equal(storage, torch.tensor([0, 1, 2, 10, 11, 12, 13, 14, 15.0]))
    assert np.array_equal(dests["arr"], saved["arr"])
    assert torch.equal(dests["ones"], torch.ones(5))
