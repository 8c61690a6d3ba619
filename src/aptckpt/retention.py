"""Retention and save policies: small objects that say which checkpoints a run keeps,
which one is the best, and when a save is due.

Retention rules (:class:`Keep`) compose with ``|``; a checkpoint stays when any rule
keeps it::

    keep = KeepLast(3) | KeepBest(2, "val_loss", "min") | KeepEvery(10, "epoch")
    CheckpointManager("outputs", keep=keep, temporary_every=SaveEvery(steps=500))

* :class:`KeepLast` -- the ``n`` newest regular checkpoints (by save sequence).
* :class:`KeepBest` -- the ``k`` best regular checkpoints by a :class:`Metric`
  (ties: the older ranks higher, as in Lightning and Hugging Face).
* :class:`KeepEvery` -- those whose step (or epoch) is a multiple of ``n``: a thinned
  history that outlives ``KeepLast``.
* :class:`KeepAll` -- every regular checkpoint.

Rules only ever look at *regular* checkpoints. Temporaries (mid-epoch saves) stay
until a later regular checkpoint exists, whatever the rules; the newest checkpoint is
never dropped; and when the rules rank by a metric (a :class:`KeepBest`), the run's
best checkpoint (the newest one flagged best when saved: what
:meth:`~aptckpt.CheckpointManager.best` returns, even one flagged with an explicit
``is_best=True``) is never dropped either.

The *best flag* is decided by a :class:`Metric` before a save commits and recorded in
the checkpoint's manifest, so it survives the loss of the run's index
(:func:`is_best`). Metrics that rank nothing: a missing metric, NaN, a bool, or a value
that is not a number never makes a checkpoint best and is ignored when earlier
checkpoints are compared; infinities compare as such; integers too large for a float
count as infinite.

The trainers' own settings map onto these rules: :func:`from_lightning`
(``ModelCheckpoint(save_top_k, monitor, mode, save_last)``) and
:func:`from_transformers` (``TrainingArguments(save_total_limit,
metric_for_best_model, greater_is_better)``).

When to save (:class:`SaveEvery`): every ``n`` global steps or every ``n`` epochs;
:meth:`~aptckpt.CheckpointManager.due` asks the manager's policies.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aptckpt._run_index import CheckpointRecord, order

__all__ = [
    "Keep",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "Metric",
    "SaveEvery",
    "from_lightning",
    "from_transformers",
    "is_best",
    "split",
]

Mode = Literal["min", "max"]


def _count(value: object, what: str, least: int = 1) -> int:
    if type(value) is not int or value < least:
        raise ValueError(f"{what} must be an int of at least {least}, got {value!r}")
    return value


@dataclass(frozen=True)
class Metric:
    """A metric that ranks checkpoints: its ``name`` in the saved metrics, and whether
    lower (``"min"``) or higher (``"max"``) is better."""

    name: str = "loss"
    mode: Mode = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a metric is named by a non-empty string, got {self.name!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def score(self, metrics: Mapping[str, Any]) -> float | None:
        """The ranking value of ``metrics`` (higher is better), or None if it ranks nothing."""
        value = metrics.get(self.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, int):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf if value > 0 else -math.inf
        elif math.isnan(value):
            return None
        else:
            number = float(value)
        return -number if self.mode == "min" else number


# ---------------------------------------------------------------- retention rules


class Keep(ABC):
    """A retention rule: which of a run's regular checkpoints it keeps. Rules compose
    with ``|`` (a checkpoint stays when any of them keeps it)."""

    @abstractmethod
    def select(self, regular: Sequence[CheckpointRecord]) -> set[str]:
        """The ``rel_path`` of each checkpoint of ``regular`` (oldest first) this rule keeps."""

    @property
    def ranks_by_metric(self) -> tuple[Metric, ...]:
        """The metrics this rule ranks by (the first decides a manager's best flag)."""
        return ()

    def __or__(self, other: Keep) -> Keep:
        if not isinstance(other, Keep):
            return NotImplemented
        return AnyOf((*_rules(self), *_rules(other)))


def _rules(rule: Keep) -> tuple[Keep, ...]:
    return rule.rules if isinstance(rule, AnyOf) else (rule,)


@dataclass(frozen=True)
class KeepLast(Keep):
    """The ``n`` newest regular checkpoints; with ``including``, what that rule keeps
    counts among the ``n`` (Hugging Face's ``save_total_limit`` with a best model:
    ``KeepLast(2, including=KeepBest(1, "eval_loss"))`` keeps the best and the newest,
    or the two newest when the best is the newest)."""

    n: int = 3
    including: Keep | None = None

    def __post_init__(self) -> None:
        _count(self.n, "KeepLast(n)")
        if self.including is not None and not isinstance(self.including, Keep):
            raise TypeError(f"KeepLast(including=) takes a Keep rule, got {self.including!r}")

    @property
    def ranks_by_metric(self) -> tuple[Metric, ...]:
        return self.including.ranks_by_metric if self.including is not None else ()

    def select(self, regular: Sequence[CheckpointRecord]) -> set[str]:
        if self.including is None:
            return {r.rel_path for r in regular[-self.n :]}
        kept = self.including.select(regular)
        others = [r.rel_path for r in regular if r.rel_path not in kept]
        room = max(self.n - len(kept), 0)
        return kept | set(others[max(len(others) - room, 0) :] if room else ())


@dataclass(frozen=True)
class KeepBest(Keep):
    """The ``k`` best regular checkpoints by ``metric`` (``mode``: ``"min"`` or
    ``"max"``); checkpoints whose metric ranks nothing are not among them."""

    k: int = 1
    metric: str = "loss"
    mode: Mode = "min"

    def __post_init__(self) -> None:
        _count(self.k, "KeepBest(k)")
        Metric(self.metric, self.mode)  # checks both

    @property
    def ranks_by_metric(self) -> tuple[Metric, ...]:
        return (Metric(self.metric, self.mode),)

    def select(self, regular: Sequence[CheckpointRecord]) -> set[str]:
        metric = self.ranks_by_metric[0]
        scored = [
            (s, i, r) for i, r in enumerate(regular) if (s := metric.score(r.metrics)) is not None
        ]
        scored.sort(key=lambda t: (-t[0], t[1]))  # best first; ties: the older first
        return {r.rel_path for _, _, r in scored[: self.k]}


@dataclass(frozen=True)
class KeepEvery(Keep):
    """Regular checkpoints whose global step (``by="step"``) or count of completed epochs
    (``by="epoch"``: a checkpoint of epoch ``e``, counted from 0, completes ``e + 1``, as
    :class:`SaveEvery` counts them) is a multiple of ``n``: history that
    :class:`KeepLast` would drop."""

    n: int
    by: Literal["step", "epoch"] = "step"

    def __post_init__(self) -> None:
        _count(self.n, "KeepEvery(n)")
        if self.by not in ("step", "epoch"):
            raise ValueError(f"KeepEvery(by=) must be 'step' or 'epoch', got {self.by!r}")

    def select(self, regular: Sequence[CheckpointRecord]) -> set[str]:
        def position(r: CheckpointRecord) -> int:
            return r.global_step if self.by == "step" else r.epoch + 1

        return {r.rel_path for r in regular if position(r) % self.n == 0}


@dataclass(frozen=True)
class KeepAll(Keep):
    """Every regular checkpoint."""

    def select(self, regular: Sequence[CheckpointRecord]) -> set[str]:
        return {r.rel_path for r in regular}


@dataclass(frozen=True)
class AnyOf(Keep):
    """What any of ``rules`` keeps (made by ``rule | rule``)."""

    rules: tuple[Keep, ...]

    def __post_init__(self) -> None:
        for rule in self.rules:
            if not isinstance(rule, Keep):
                raise TypeError(f"a retention rule must be a Keep (KeepLast, ...), got {rule!r}")

    @property
    def ranks_by_metric(self) -> tuple[Metric, ...]:
        return tuple(m for rule in self.rules for m in rule.ranks_by_metric)

    def select(self, regular: Sequence[CheckpointRecord]) -> set[str]:
        return set().union(*(rule.select(regular) for rule in self.rules))

    def __repr__(self) -> str:
        return " | ".join(repr(rule) for rule in self.rules)


# ---------------------------------------------------------------- applying them


def is_best(
    metric: Metric, metrics: Mapping[str, Any], earlier: Iterable[CheckpointRecord]
) -> bool:
    """True if a regular checkpoint with ``metrics`` is better by ``metric`` than every
    earlier regular checkpoint that has a score (a tie is no improvement: the older stays
    the best, as in Lightning's ``ModelCheckpoint`` and the Hugging Face ``Trainer``)."""
    value = metric.score(metrics)
    if value is None:
        return False
    return all(
        s < value
        for r in earlier
        if r.kind == "epoch" and (s := metric.score(r.metrics)) is not None
    )


def split(
    keep: Keep, records: Iterable[CheckpointRecord], new: CheckpointRecord
) -> tuple[list[CheckpointRecord], list[CheckpointRecord]]:
    """Split ``records`` into those kept and those dropped once ``new`` (one of them,
    committed) is the run's newest checkpoint: what ``keep`` keeps, ``new``, the run's
    best (when ``keep`` ranks by a metric) and temporaries newer than the newest
    regular checkpoint."""
    records = list(records)
    regular = sorted((r for r in records if r.kind == "epoch"), key=order)
    kept_paths = keep.select(regular) | {new.rel_path}
    flagged = [r for r in regular if r.is_best]
    if keep.ranks_by_metric and flagged:
        kept_paths.add(flagged[-1].rel_path)
    kept, dropped = [], []
    for r in records:
        stale_temp = r.kind == "temp" and new.kind == "epoch" and order(r) < order(new)
        if (r.kind == "epoch" and r.rel_path not in kept_paths) or stale_temp:
            dropped.append(r)
        else:
            kept.append(r)
    return kept, dropped


# ---------------------------------------------------------------- when to save


@dataclass(frozen=True)
class SaveEvery:
    """A save is due every ``steps`` global steps, or at the end of every ``epochs``-th
    epoch (one of the two)."""

    steps: int | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("SaveEvery takes one of steps= or epochs=")
        if self.steps is not None:
            _count(self.steps, "SaveEvery(steps=)")
        if self.epochs is not None:
            _count(self.epochs, "SaveEvery(epochs=)")

    def due(self, global_step: int, *, epoch_ended: int | None = None) -> bool:
        """True if a save is due after ``global_step`` (and, with ``epoch_ended``, once
        that epoch -- counted from 0 -- has ended)."""
        if self.steps is not None:
            return global_step > 0 and global_step % self.steps == 0
        assert self.epochs is not None
        return epoch_ended is not None and (epoch_ended + 1) % self.epochs == 0


# ---------------------------------------------------------------- the trainers' settings


def from_lightning(
    save_top_k: int = 1,
    monitor: str | None = None,
    mode: Mode = "min",
    save_last: bool | None = None,
) -> Keep:
    """The rule Lightning's ``ModelCheckpoint(save_top_k=, monitor=, mode=, save_last=)``
    applies: the ``save_top_k`` best by ``monitor`` (all for -1), or without a monitor
    the ``save_top_k`` newest; ``save_last`` also keeps the newest."""
    if type(save_top_k) is not int or save_top_k < -1:
        raise ValueError(f"save_top_k must be -1, 0 or a positive int, got {save_top_k!r}")
    rules: list[Keep] = []
    if save_top_k == -1:
        rules.append(KeepAll())
    elif save_top_k > 0:
        rules.append(
            KeepLast(save_top_k) if monitor is None else KeepBest(save_top_k, monitor, mode)
        )
    if save_last:
        rules.append(KeepLast(1))
    if not rules:
        raise ValueError("save_top_k=0 without save_last keeps no checkpoint: nothing to retain")
    return AnyOf(tuple(rules)) if len(rules) > 1 else rules[0]


def from_transformers(
    save_total_limit: int | None = None,
    metric_for_best_model: str | None = None,
    greater_is_better: bool | None = None,
) -> Keep:
    """The rule Hugging Face's ``Trainer`` applies to its ``checkpoint-N`` folders: at most
    ``save_total_limit`` of them (None or <= 0: all), the best by ``metric_for_best_model`` (an
    ``eval_`` metric; ``greater_is_better`` defaults as in ``TrainingArguments``: False for
    a name ending in ``loss``) always among them, the rest the newest. (The newest
    checkpoint is never dropped, so with a limit of 1 and an older best, two stay -- as
    in the ``Trainer``.)"""
    best: Keep | None = None
    if metric_for_best_model is not None:
        name = metric_for_best_model
        name = name if name.startswith("eval_") else f"eval_{name}"
        if greater_is_better is None:
            greater_is_better = not name.endswith("loss")
        best = KeepBest(1, name, "max" if greater_is_better else "min")
    if save_total_limit is None or (type(save_total_limit) is int and save_total_limit <= 0):
        return KeepAll()  # as in the Trainer: no limit
    _count(save_total_limit, "save_total_limit")
    return KeepLast(save_total_limit, including=best)
