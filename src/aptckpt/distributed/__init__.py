"""Collective saves and loads over ``torch.distributed``: every rank of a process group writes
its own shards into one checkpoint, and any world size loads it.

The entry points are :func:`aptckpt.save` and :func:`aptckpt.load` with ``process_group=``;
this package holds the protocol (:mod:`._save`), the box arithmetic of DTensors
(:mod:`._boxes`), the coordinator's merge (:mod:`._merge`), box-wise reads (:mod:`._read`,
:mod:`._load`) and what crosses the group (:mod:`._comm`). Nothing here is imported until a
collective call or a checkpoint saved by several ranks needs it.
"""

from aptckpt.tree import PerRank, per_rank

__all__ = ["PerRank", "per_rank"]
