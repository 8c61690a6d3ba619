"""aptckpt.integrations.accelerate: save_state/load_state through aptckpt.

A small language model with tied input/output weights and dropout (so that the RNG
matters), AdamW, a LambdaLR schedule, a shuffled loader with Accelerate's seedable
sampler, and a registered object holding a tensor and plain values.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("accelerate")

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch import nn

import aptckpt
from aptckpt.integrations.accelerate import load_state, save_state
from aptckpt.testing import assert_state_equal

# Above the API: the reads and hashes it uses are covered in both runs elsewhere.
pytestmark = pytest.mark.core_independent


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 37, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.hidden(self.embed(x)))))


class Counter:
    """What users register: state_dict/load_state_dict over tensors and plain values."""

    def __init__(self) -> None:
        self.n = 0
        self.seen = torch.zeros(4)
        self.tags: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seen": self.seen.clone(), "tags": list(self.tags)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.seen, self.tags = state["n"], state["seen"].clone(), list(state["tags"])


def _fresh_accelerator(**kwargs: Any) -> Accelerator:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(
        cpu=True,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=11),
        **kwargs,
    )


def _setup(**kwargs: Any) -> tuple[Accelerator, Any, Any, Any, Any, Counter]:
    torch.manual_seed(0)
    acc = _fresh_accelerator(**kwargs)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    data = torch.utils.data.TensorDataset(torch.randint(0, 37, (24, 8)))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    counter = Counter()
    acc.register_for_checkpointing(counter)
    return acc, model, opt, loader, sched, counter


def _train(
    acc: Accelerator, model: Any, opt: Any, sched: Any, loader: Any, counter: Counter, steps: int
) -> None:
    done = 0
    while done < steps:
        for (x,) in loader:
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            counter.n += 1
            counter.seen += loss.detach()
            counter.tags.append(f"s{counter.n}")
            done += 1
            if done == steps:
                return


def _snapshot(model: Any, opt: Any, sched: Any, counter: Counter) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "counter": counter.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
    )


def test_round_trip_restores_everything_and_training_continues_identically(tmp_path: Path) -> None:
    acc, model, opt, loader, sched, counter = _setup()
    _train(acc, model, opt, sched, loader, counter, 5)
    loader.set_epoch(1)
    info = save_state(acc, tmp_path / "step-5", extra={"epoch": 1, "batches_done": 2})
    before = _snapshot(model, opt, sched, counter)
    step = acc.step
    _train(acc, model, opt, sched, loader, counter, 4)
    straight = _snapshot(model, opt, sched, counter)

    acc2, model2, opt2, loader2, sched2, counter2 = _setup()
    torch.manual_seed(999)  # a different RNG state, which the load must replace
    loaded = load_state(acc2, tmp_path / "step-5")
    assert loaded.extra == {"epoch": 1, "batches_done": 2} and loaded.step == step == acc2.step
    assert loaded.path == str(tmp_path / "step-5")
    assert_state_equal(_snapshot(model2, opt2, sched2, counter2), before)
    assert loader2.get_sampler().epoch == 1 and loader2.get_sampler().initial_seed == 11
    # tied weights came back tied, into the same parameters
    assert model2.head.weight is model2.embed.weight
    _train(acc2, model2, opt2, sched2, loader2, counter2, 4)
    assert_state_equal(_snapshot(model2, opt2, sched2, counter2), straight)
    # one aptckpt checkpoint, no pickles
    assert info.backend == "zstd"
    names = {p.name for p in (tmp_path / "step-5").iterdir()}
    assert "manifest.msgpack" in names and not any(
        n.endswith((".pkl", ".pt", ".safetensors")) for n in names
    )
    saved = aptckpt.load(tmp_path / "step-5")
    assert saved["models"][0]["head.weight"] is saved["models"][0]["embed.weight"]


def test_grad_scaler_state_round_trips(tmp_path: Path) -> None:
    acc, *_ = _setup()
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
    acc.scaler.scale(torch.ones(()))  # makes its scale tensor
    acc.scaler.update(new_scale=123.0)
    saved = acc.scaler.state_dict()
    save_state(acc, tmp_path / "c")
    acc2, *_ = _setup()
    acc2.scaler = torch.amp.GradScaler("cpu")
    load_state(acc2, tmp_path / "c")
    assert acc2.scaler.state_dict() == saved and saved["scale"] == 123.0


def test_save_pre_hook_takes_over_and_damage_is_named(tmp_path: Path) -> None:
    acc, *_ = _setup()
    seen: list[str] = []

    def hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        seen.append(output_dir)
        weights.pop()  # this model is saved elsewhere by the user

    acc.register_save_state_pre_hook(hook)
    save_state(acc, tmp_path / "c", backend="delta")
    assert seen == [str(tmp_path / "c")]
    assert aptckpt.load(tmp_path / "c")["models"] == []
    stored = [  # the store's objects and packs, or a local shard
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and (p.suffix == ".bin" or {"objects", "packs"} & set(p.parts))
    ]
    data = max(stored, key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    acc2, *_ = _setup()
    acc2.register_load_state_pre_hook(lambda models, input_dir: models.pop())
    with pytest.raises(aptckpt.IntegrityError, match=re.escape(str(tmp_path / "c"))):
        load_state(acc2, tmp_path / "c")


def test_mismatched_accelerator_and_foreign_checkpoint_are_refused(tmp_path: Path) -> None:
    acc, *_ = _setup()
    save_state(acc, tmp_path / "c")
    acc2, *_ = _setup()
    acc2.register_for_checkpointing(Counter())
    with pytest.raises(aptckpt.FormatError, match="1 registered objects saved, 2 here"):
        load_state(acc2, tmp_path / "c")
    aptckpt.save({"model": {"w": torch.zeros(2)}}, tmp_path / "other")
    with pytest.raises(aptckpt.FormatError, match="not written by"):
        load_state(acc2, tmp_path / "other")
    with pytest.raises(aptckpt.CheckpointNotFoundError):
        load_state(acc2, tmp_path / "absent")


def test_unstorable_registered_state_is_refused_by_key_path(tmp_path: Path) -> None:
    acc, *_ = _setup()

    class Bad:
        def state_dict(self) -> dict[str, Any]:
            return {"fn": lambda: 0}

        def load_state_dict(self, state: Any) -> None:
            pass

    acc.register_for_checkpointing(Bad())
    with pytest.raises(aptckpt.UnsupportedObjectError, match=r"custom.*1.*fn"):
        save_state(acc, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_automatic_naming_keeps_total_limit_and_loads_the_newest(tmp_path: Path) -> None:
    config = ProjectConfiguration(
        project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2
    )
    acc, model, opt, loader, sched, counter = _setup(project_config=config)
    for _ in range(3):
        _train(acc, model, opt, sched, loader, counter, 1)
        save_state(acc, extra={"n": counter.n})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint_1", "checkpoint_2"]
    config2 = ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True)
    acc2, *_ = _setup(project_config=config2)
    loaded = load_state(acc2)
    assert loaded.path.endswith("checkpoint_2") and loaded.extra == {"n": 3}
    save_state(acc2)  # follows the loaded one
    assert (tmp_path / "checkpoints" / "checkpoint_3" / "manifest.msgpack").is_file()


def test_object_store_round_trip(s3_url: str, s3_options: dict[str, Any]) -> None:
    acc, model, opt, loader, sched, counter = _setup()
    _train(acc, model, opt, sched, loader, counter, 2)
    url = f"{s3_url}/run/step-2"
    save_state(acc, url, storage_options=s3_options)
    before = _snapshot(model, opt, sched, counter)
    acc2, model2, opt2, _, sched2, counter2 = _setup()
    load_state(acc2, url, storage_options=s3_options)
    assert_state_equal(_snapshot(model2, opt2, sched2, counter2), before)


def test_many_processes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    acc, *_ = _setup()
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(aptckpt.IntegrationError, match="2 processes"):
        save_state(acc, tmp_path / "c")
