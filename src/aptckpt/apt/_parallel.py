"""Data-parallel training of the reference loop: DDP or FSDP2 over torch.distributed.

Launched by ``torchrun --nproc-per-node N -m aptckpt.apt --parallel ddp|fsdp``: the process
group comes from torchrun's environment (gloo on CPU, NCCL on GPUs). Every rank sees the
same global batches in the same order (the data order depends on the seed and the epoch
only) and trains on its rows of each (``tensor_split``), so the global batch, and with it
the trajectory's data, is the same at any world size; gradients are averaged over the
ranks (DDP's all-reduce, FSDP's reduce-scatter). Losses are averaged over the ranks, so
every rank logs and saves the same history.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KINDS", "Parallel", "setup"]

KINDS = ("ddp", "fsdp")


@dataclass
class Parallel:
    """How this process takes part in training: ``kind`` None is one process."""

    kind: str | None = None
    rank: int = 0
    world: int = 1

    @property
    def group(self) -> Any:
        """The process group checkpoints are saved over (None: one process)."""
        if self.kind is None:
            return None
        import torch.distributed as dist

        return dist.group.WORLD

    @property
    def coordinator(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module to train: ``model`` wrapped by DDP, or sharded in place by FSDP2 (each
        block, then the root, which holds the tied embedding and head)."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world,))
            for block in getattr(model, "blocks", ()):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch."""
        if self.kind is None:
            return batch
        return batch.tensor_split(self.world)[self.rank]

    def mean(self, value: torch.Tensor) -> float:
        """``value`` averaged over the ranks (every rank gets the same float)."""
        if self.kind is None:
            return float(value.item())
        import torch.distributed as dist

        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return float(total.item()) / self.world


def setup(kind: str | None, device: torch.device) -> tuple[Parallel, torch.device]:
    """Join the job torchrun started (``kind`` ``"ddp"`` or ``"fsdp"``); the device this
    rank trains on (``cuda:LOCAL_RANK`` when training on CUDA)."""
    if kind is None:
        return Parallel(), device
    if kind not in KINDS:
        raise ValueError(f"parallel must be one of {', '.join(KINDS)} or None, got {kind!r}")
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("parallel training needs torch.distributed, which this torch lacks")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(
                f"parallel={kind!r} needs a process group: launch with torchrun "
                f"(torchrun --nproc-per-node N -m aptckpt.apt --parallel {kind} ...)"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Parallel(kind, dist.get_rank(), dist.get_world_size()), device
