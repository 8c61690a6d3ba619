"""Training state: what a trainer passes to a save is checked, and what a loaded
checkpoint says is checked before anything is restored from it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aptckpt.errors import FormatError
from aptckpt.training_state import (
    capture_rng,
    count,
    plain_metrics,
    restore_rng,
    resume_info,
    tokenizer_files,
)


@pytest.mark.parametrize("value", [0, 7, np.int64(3), torch.tensor(5), 2**63 - 1])
def test_count_accepts_integers(value):
    assert count(value, "step") == int(value)


@pytest.mark.parametrize("value", [-1, True, 1.0, "3", None, 2**63, torch.tensor(1.5)])
def test_count_refuses_the_rest(value):
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        count(value, "step")


def test_plain_metrics():
    got = plain_metrics({"a": torch.tensor(0.5), "b": np.float32(2), 3: "x", "n": None})
    assert got == {"a": 0.5, "b": 2.0, "3": "x", "n": None}
    for bad in (torch.ones(2), np.ones(2), [1.0], {"x": 1}, b"x", 1j):
        with pytest.raises(ValueError, match="metric 'm'"):
            plain_metrics({"m": bad})


def test_tokenizer_files():
    assert tokenizer_files({"a.json": "x", "b": b"y"}) == {"a.json": b"x", "b": b"y"}
    assert tokenizer_files(None) is None
    for name in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="plain file name"):
            tokenizer_files({name: b""})
    with pytest.raises(TypeError):
        tokenizer_files(3)


def good_state() -> dict[str, Any]:
    return {"global_step": 3, "epoch": 1, "batch_index": None, "metrics": {"loss": 1.0}}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("global_step", "x"),
        ("global_step", -1),
        ("global_step", True),
        ("epoch", 1.5),
        ("batch_index", "2"),
        ("metrics", [1, 2]),
        ("loss_history", 5),
    ],
)
def test_resume_info_refuses_malformed_fields(key, value):
    state = {**good_state(), key: value}
    with pytest.raises(FormatError, match=f"malformed '{key}'"):
        resume_info(Path("/run/checkpoints/c"), state, temporary=False)


def test_resume_info():
    info = resume_info(Path("/run/temp/c"), good_state(), temporary=True)
    assert (info.epoch, info.global_step, info.batch_index, info.temporary) == (1, 3, None, True)
    assert info.metrics == {"loss": 1.0} and info.loss_history == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.pop("python"),
        lambda s: s.update(python=5),
        lambda s: s["numpy"].update(keys=[1, 2]),
        lambda s: s["numpy"].update(pos="x"),
        lambda s: s.update(torch=torch.zeros(3, dtype=torch.uint8)),
        lambda s: s.update(cuda=[1]),
    ],
)
def test_restore_rng_refuses_a_malformed_state_and_changes_nothing(damage):
    state = capture_rng()
    damage(state)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    with pytest.raises(FormatError, match="restore_rng=False"):
        restore_rng(state)
    assert random.random() == random.Random(11).random()
    assert np.random.rand() == np.random.RandomState(11).rand()
    assert torch.equal(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(11)))
