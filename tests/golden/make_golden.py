"""Generate the committed golden checkpoints of the current format version.

Run once per format version (``python tests/golden/make_golden.py``); the files
under ``tests/golden/v<N>/`` are then committed and never regenerated: they
prove that every later aptckpt still reads them. The state is built from fixed
byte patterns (no RNG), so it can be rebuilt exactly by the tests.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path
from typing import Any

import torch

import aptckpt
from aptckpt import _dtypes

HERE = Path(__file__).parent


def golden_state() -> dict[str, Any]:
    pattern = bytes(range(256)) * 4
    tensors = {}
    for name, dtype in sorted(_dtypes.DTYPES.items()):
        count = 24 // dtype.itemsize * 2
        raw = torch.frombuffer(bytearray(pattern[: count * dtype.itemsize]), dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(2, -1).clone()
    weight = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 7
    od: collections.OrderedDict[str, Any] = collections.OrderedDict(w=weight.t())
    od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    return {
        "dtypes": tensors,
        "tied": {"a": weight, "b": weight},
        "param": torch.nn.Parameter(weight[:2].clone()),
        "frozen": torch.nn.Parameter(weight[2:4].clone(), requires_grad=False),
        "odict": od,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
        "plain": (
            None,
            True,
            -(2**63),
            2**64 - 1,
            2**70,
            -0.0,
            float("nan"),
            1.5 + 2j,
            "ü",
            b"\x00",
            torch.bfloat16,
            torch.device("cpu"),
            torch.Size([3, 4]),
        ),
        "empty": torch.empty(0, 4, dtype=torch.float16),
    }


GOLDEN = {
    "zstd": {"chunk_size": 64, "shard_size": 512},
    "zstd-raw": {"codec": "none", "chunk_size": 64},
    "torch": {"chunk_size": 256},
    "delta": {"chunk_size": 64, "keyframe_every": 8},
}
#: The ``delta`` golden is a run directory: a chain of checkpoints and their store.
DELTA_CHAIN = ("s0", "s1", "s2")


def delta_state(index: int) -> dict[str, Any]:
    """The state of checkpoint ``DELTA_CHAIN[index]``: the golden state with the tied
    weight nudged, so later saves hold unchanged chunks and xor-deltas."""
    state = golden_state()
    state["tied"]["a"].add_(index / 1024)  # "a" and "b" are one tensor
    return state


def main() -> None:
    version = aptckpt.FORMAT_VERSION
    for name, options in GOLDEN.items():
        backend = name.split("-")[0]
        path = HERE / f"v{version}" / name
        shutil.rmtree(path, ignore_errors=True)
        if backend == "delta":
            for index, checkpoint in enumerate(DELTA_CHAIN):
                aptckpt.save(
                    delta_state(index),
                    path / checkpoint,
                    backend=backend,
                    metadata={"golden": name},
                    **options,
                )
        else:
            aptckpt.save(
                golden_state(), path, backend=backend, metadata={"golden": name}, **options
            )
        print("wrote", path)


if __name__ == "__main__":
    main()
