"""Generate the committed golden checkpoints of the current format version.

Run once per format version (``python tests/golden/make_golden.py``; version 4, saved by a
process group of two ranks: ``python tests/golden/make_golden.py --sharded``; version 5, a
``delta`` run whose objects are packed: ``--packed``); the files
under ``tests/golden/v<N>/`` are then committed and never regenerated: they
prove that every later aptckpt still reads them. The state is built from fixed
byte patterns (no RNG), so it can be rebuilt exactly by the tests.
"""

from __future__ import annotations

import collections
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import aptckpt
from aptckpt import _dtypes

HERE = Path(__file__).parent


def golden_state(version: int = aptckpt.FORMAT_VERSION) -> dict[str, Any]:
    """The state every golden checkpoint of format ``version`` holds."""
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
        **(_v3_values() if version >= 3 else {}),
    }


def _v3_values() -> dict[str, Any]:
    """What format version 3 added: containers of torch state dicts, numpy values, sparse,
    quantized and expanded tensors, large bytes and str stored as data."""
    weight = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 5
    weight[::2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors
        per_tensor = torch.quantize_per_tensor(weight, 0.25, 3, torch.qint8)
        per_channel = torch.quantize_per_channel(
            weight,
            torch.tensor([0.5, 0.25, 0.125, 1.0], dtype=torch.float64),
            torch.tensor([0, 1, 2, 3]),
            1,
            torch.quint8,
        )
    return {
        "v3": {
            "counter": collections.Counter({30: 1, 80: 2}),
            "defaultdict": collections.defaultdict(list, {"a": [1]}),
            "set": {1, "b", (2, 3)},
            "frozenset": frozenset({b"x", None}),
            "np_scalars": [
                np.float64(-0.0),
                np.int32(-7),
                np.bool_(True),
                np.complex64(1j),
                np.str_("s"),
                np.uint64(2**64 - 1),
            ],
            "ndarray": np.arange(12, dtype=np.int16).reshape(3, 4),
            "coo": weight.to_sparse(),
            "csr": weight.to_sparse_csr(),
            "quantized": per_tensor,
            "per_channel": per_channel,
            "expanded": torch.tensor([1.5, -2.0]).expand(1000, 2),
            "large_bytes": bytes(range(256)) * 256,  # exactly MAX_INLINE_BYTES: stored as data
            "large_str": "é" * (1 << 15),
        }
    }


GOLDEN = {
    "zstd": {"codec": "zstd", "chunk_size": 256, "shard_size": 16 << 10},
    "zstd-raw": {"codec": "none", "chunk_size": 256},
    "torch": {"chunk_size": 256},
    "delta": {"chunk_size": 256, "keyframe_every": 8, "local_below": 64},
}
#: The ``delta`` golden is a run directory: a chain of checkpoints and their store.
DELTA_CHAIN = ("s0", "s1", "s2")


def delta_state(index: int, version: int = aptckpt.FORMAT_VERSION) -> dict[str, Any]:
    """The state of checkpoint ``DELTA_CHAIN[index]``: the golden state with the tied
    weight nudged, so later saves hold unchanged chunks and xor-deltas."""
    state = golden_state(version)
    state["tied"]["a"].add_(index / 1024)  # "a" and "b" are one tensor
    return state


#: Checkpoints saved by a process group of two ranks (format version 4).
SHARDED_GOLDEN = {name: GOLDEN[name] for name in ("zstd", "zstd-raw", "torch")}
SHARDED_VERSION = 4
#: The newest version a single-process save writes without packs.
SINGLE_PROCESS_VERSION = 3
#: ``delta`` checkpoints whose small objects are packed (format version 5), as a run
#: directory like the version 3 one. The state is the version 3 golden state.
PACKED_GOLDEN = {"delta": {"chunk_size": 256, "keyframe_every": 8}}
PACKED_VERSION = 5
_SHARDED_WORLD = 2


def sharded_state(rank: int) -> dict[str, Any]:
    """What rank ``rank`` holds: the golden state replicated, a matrix sharded by rows
    unevenly (a DTensor when a process group is up), and values of its own."""
    matrix = torch.arange(15, dtype=torch.float32).reshape(5, 3) / 7
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        matrix = distribute_tensor(matrix, mesh, [Shard(0)])
    return {
        "golden": golden_state(SINGLE_PROCESS_VERSION),
        "matrix": matrix,
        "mine": aptckpt.per_rank(torch.tensor([rank, 10 * rank], dtype=torch.int16)),
        "note": f"rank {rank}",
    }


def sharded_expected() -> dict[str, Any]:
    """What one process loads from a sharded golden: whole tensors, rank 0's values."""
    state = sharded_state(0)
    state["mine"] = state["mine"].value
    return state


def _sharded_rank(rank: int, root: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{root}/store", rank=rank, world_size=_SHARDED_WORLD
    )
    for name, options in SHARDED_GOLDEN.items():
        path = HERE / f"v{SHARDED_VERSION}" / name
        aptckpt.save(
            sharded_state(rank),
            path,
            backend=name.split("-")[0],
            metadata={"golden": name},
            process_group=dist.group.WORLD,
            **options,
        )
    dist.destroy_process_group()


def main_sharded() -> None:
    import tempfile

    import torch.multiprocessing as mp

    for name in SHARDED_GOLDEN:
        shutil.rmtree(HERE / f"v{SHARDED_VERSION}" / name, ignore_errors=True)
    with tempfile.TemporaryDirectory() as root:
        mp.spawn(_sharded_rank, args=(root,), nprocs=_SHARDED_WORLD)
    print("wrote", HERE / f"v{SHARDED_VERSION}")


def main_packed() -> None:
    for name, options in PACKED_GOLDEN.items():
        path = HERE / f"v{PACKED_VERSION}" / name
        shutil.rmtree(path, ignore_errors=True)
        for index, checkpoint in enumerate(DELTA_CHAIN):
            aptckpt.save(
                delta_state(index, SINGLE_PROCESS_VERSION),
                path / checkpoint,
                backend="delta",
                metadata={"golden": name},
                **options,
            )
            assert aptckpt.inspect(path / checkpoint).format_version == PACKED_VERSION
        print("wrote", path)


def main() -> None:
    version = SINGLE_PROCESS_VERSION
    if aptckpt.FORMAT_VERSION == SHARDED_VERSION and "--sharded" in sys.argv:
        main_sharded()
        return
    if aptckpt.FORMAT_VERSION == PACKED_VERSION and "--packed" in sys.argv:
        main_packed()
        return
    for name, options in GOLDEN.items():
        backend = name.split("-")[0]
        path = HERE / f"v{version}" / name
        shutil.rmtree(path, ignore_errors=True)
        if backend == "delta":
            for index, checkpoint in enumerate(DELTA_CHAIN):
                aptckpt.save(
                    delta_state(index, version),
                    path / checkpoint,
                    backend=backend,
                    metadata={"golden": name},
                    **options,
                )
        else:
            aptckpt.save(
                golden_state(version), path, backend=backend, metadata={"golden": name}, **options
            )
        print("wrote", path)


if __name__ == "__main__":
    main()
