"""Collective saves and loads over ``torch.distributed``: every rank of a process group writes
its own shards into one checkpoint, and any world size loads it.

The entry points are :func:`aptckpt.save` and :func:`aptckpt.load` with ``process_group=``;
this package holds the protocol (:mod:`._save`), the box arithmetic of DTensors
(:mod:`._boxes`), the coordinator's merge (:mod:`._merge`), box-wise reads (:mod:`._read`,
:mod:`._load`) and what crosses the group (:mod:`._comm`). Nothing here is imported until a
collective call or a checkpoint saved by several ranks needs it.
"""

from typing import Any

from aptckpt.tree import PerRank, per_rank

__all__ = ["PerRank", "group_rank", "load_model_state", "model_state", "per_rank"]


def model_state(model: Any, optimizer: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The state dicts to save of a model sharded or replicated by torch.distributed (FSDP2,
    DDP, tensor parallel) and its optimizer, keyed by parameter name (DTensors stay
    sharded): :func:`torch.distributed.checkpoint.state_dict.get_state_dict`. Saved with
    ``aptckpt.save(..., process_group=G)``; loaded back with :func:`load_model_state`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model), None
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return model_sd, optim_sd


def load_model_state(
    path: Any,
    model: Any,
    optimizer: Any = None,
    *,
    process_group: Any,
    model_key: str = "model",
    optimizer_key: str = "optimizer",
    **load_options: Any,
) -> Any:
    """Load ``state[model_key]`` (and ``state[optimizer_key]``) of the checkpoint at
    ``path`` into a sharded ``model`` (and ``optimizer``), at any world size and
    placement: each rank reads only its shards, then
    :func:`torch.distributed.checkpoint.state_dict.set_state_dict` installs them. Returns
    the :class:`~aptckpt.IntoResult` of the load (the rest of the state included)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    from aptckpt.api import load

    model_sd, optim_sd = model_state(model, optimizer)  # optimizer state made if still lazy
    target: dict[str, Any] = {model_key: model_sd}
    if optimizer is not None:
        target[optimizer_key] = optim_sd
    result = load(path, into=target, process_group=process_group, strict=False, **load_options)
    if result.missing_keys:
        from aptckpt.errors import IntoMismatchError

        raise IntoMismatchError(
            f"checkpoint '{path}' lacks {len(result.missing_keys)} tensors of the model or "
            f"optimizer (e.g. {result.missing_keys[0]}); nothing was installed",
            missing=result.missing_keys,
            unexpected=(),
        )
    if optimizer is None:
        set_model_state_dict(model, target[model_key])
    else:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=target[model_key],
            optim_state_dict=target[optimizer_key],
        )
    return result


def group_rank(process_group: Any) -> int:
    """This process's rank in ``process_group`` (0 without one)."""
    if process_group is None:
        return 0
    import torch.distributed as dist

    return int(dist.get_rank(process_group))
