"""Small fixed states for torture tests (fuzzers, corruption sweeps) and their seeds."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["small_state"]


def small_state() -> dict[str, Any]:
    """A few kilobytes of state with floats, bfloat16, bytes, zeros, nesting and plain
    values: every reader path, small enough to save thousands of times."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(8, 8, generator=gen),
            "b": torch.zeros(5, dtype=torch.bfloat16),
            "ids": torch.randint(0, 256, (40,), dtype=torch.uint8, generator=gen),
            "zeros": torch.zeros(64),
        },
        "opt": {"state": {0: {"m": torch.arange(6.0)}}, "lr": 0.1},
        "meta": ("x", 3, None),
    }
