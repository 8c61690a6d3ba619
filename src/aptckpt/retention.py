"""Retention: which checkpoints of a run are kept, and which one is the best.

A :class:`RetentionPolicy` answers two questions for the
:class:`~aptckpt.CheckpointManager`:

* :meth:`RetentionPolicy.is_best` -- is a checkpoint about to be saved the best
  of the run so far? Decided *before* the save commits and recorded in the
  checkpoint's manifest, so the flag survives the loss of the run's index.
* :meth:`RetentionPolicy.split` -- once a checkpoint has committed, which
  checkpoints stay: the last ``keep_last`` regular ones (by save sequence), the
  newest ``keep_best`` flagged best, and temporaries until a later regular
  checkpoint exists.

Metrics that rank nothing: a missing metric, NaN, a bool, or a value that is not
a number never makes a checkpoint best and is ignored when earlier checkpoints
are compared; infinities compare as such; integers too large for a float count
as infinite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aptckpt._run_index import CheckpointRecord, order

__all__ = ["RetentionPolicy"]


@dataclass(frozen=True)
class RetentionPolicy:
    """What a run keeps.

    Args:
        keep_last: regular checkpoints kept, newest first (None: all).
        keep_best: best checkpoints kept besides them.
        best_metric: the metric that ranks checkpoints.
        best_mode: ``"min"`` (lower is better) or ``"max"``.
    """

    keep_last: int | None = 3
    keep_best: int = 1
    best_metric: str = "loss"
    best_mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_last is not None and (type(self.keep_last) is not int or self.keep_last < 1):
            raise ValueError(
                f"keep_last must be an int of at least 1 (or None to keep all), got "
                f"{self.keep_last!r}"
            )
        if type(self.keep_best) is not int or self.keep_best < 0:
            raise ValueError(f"keep_best must be an int >= 0, got {self.keep_best!r}")
        if not isinstance(self.best_metric, str):
            raise ValueError(f"best_metric must be a metric name, got {self.best_metric!r}")

    def score(self, metrics: Mapping[str, Any]) -> float | None:
        """The ranking value of ``metrics``, or None if it ranks nothing."""
        value = metrics.get(self.best_metric)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, int):
            try:
                return float(value)
            except OverflowError:
                return math.inf if value > 0 else -math.inf
        return None if math.isnan(value) else float(value)

    def is_best(self, metrics: Mapping[str, Any], earlier: Iterable[CheckpointRecord]) -> bool:
        """True if a regular checkpoint with ``metrics`` is at least as good as every
        earlier regular checkpoint that has a score (ties: the newer is best)."""
        value = self.score(metrics)
        if value is None:
            return False
        ranked = [
            s for r in earlier if r.kind == "epoch" and (s := self.score(r.metrics)) is not None
        ]
        if self.best_mode == "max":
            return all(s <= value for s in ranked)
        return all(s >= value for s in ranked)

    def split(
        self, records: Iterable[CheckpointRecord], new: CheckpointRecord
    ) -> tuple[list[CheckpointRecord], list[CheckpointRecord]]:
        """Split ``records`` into those kept and those dropped once ``new`` (one of
        them, committed) is the run's newest checkpoint; ``new`` is always kept."""
        records = list(records)
        regular = sorted((r for r in records if r.kind == "epoch"), key=order)
        keep = {new.rel_path}
        keep |= {r.rel_path for r in (regular[-self.keep_last :] if self.keep_last else regular)}
        if self.keep_best:
            keep |= {r.rel_path for r in [r for r in regular if r.is_best][-self.keep_best :]}
        kept, dropped = [], []
        for r in records:
            stale_temp = r.kind == "temp" and new.kind == "epoch" and order(r) < order(new)
            if (r.kind == "epoch" and r.rel_path not in keep) or stale_temp:
                dropped.append(r)
            else:
                kept.append(r)
        return kept, dropped
