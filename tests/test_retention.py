"""RetentionPolicy: the best flag and which checkpoints stay, for every kind of metric."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from aptckpt._run_index import CheckpointRecord
from aptckpt.retention import RetentionPolicy


def rec(seq: int, loss: Any = None, *, kind: str = "epoch", best: bool = False) -> CheckpointRecord:
    metrics = {} if loss is None else {"loss": loss}
    name = f"{'checkpoints' if kind == 'epoch' else 'temp'}/c{seq}"
    return CheckpointRecord(
        Path("/run") / name,
        name,
        kind,
        0,
        seq,
        None,
        best,
        "",
        metrics,
        sequence=seq,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("value", "score"),
    [
        (1, 1.0),
        (2.5, 2.5),
        (float("inf"), math.inf),
        (-float("inf"), -math.inf),
        (10**400, math.inf),
        (-(10**400), -math.inf),
        (float("nan"), None),
        (True, None),
        (False, None),
        ("1.0", None),
        (None, None),
        ([1.0], None),
    ],
)
def test_score(value, score):
    assert RetentionPolicy().score({"loss": value}) == score


def test_is_best_ignores_what_ranks_nothing_and_ties_go_to_the_newer():
    policy = RetentionPolicy(best_mode="min")
    earlier = [rec(1, 2.0), rec(2, float("nan")), rec(3, True), rec(4), rec(5, 0.1, kind="temp")]
    assert policy.is_best({"loss": 2.0}, earlier)  # a tie; the temporary's 0.1 does not count
    assert not policy.is_best({"loss": 2.5}, earlier)
    assert not policy.is_best({"loss": float("nan")}, [])
    assert policy.is_best({"loss": float("inf")}, [])  # the first ranked value is the best
    assert not policy.is_best({"loss": float("inf")}, earlier)
    assert RetentionPolicy(best_mode="max").is_best({"loss": 10**400}, earlier)


def test_split_keeps_last_best_and_current_temporaries():
    policy = RetentionPolicy(keep_last=2, keep_best=1)
    records = [rec(1, best=True), rec(2), rec(3, kind="temp"), rec(4), rec(5)]
    kept, dropped = policy.split(records, records[-1])
    assert [r.sequence for r in kept] == [1, 4, 5] and [r.sequence for r in dropped] == [2, 3]
    new_temp = rec(6, kind="temp")
    kept, dropped = policy.split([*records, new_temp], new_temp)  # a temp drops no temp
    assert 3 in [r.sequence for r in kept] and 6 in [r.sequence for r in kept]
    kept, _ = RetentionPolicy(keep_last=None, keep_best=0).split(records, records[-1])
    assert [r.sequence for r in kept] == [1, 2, 4, 5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_last": 1.5}, "keep_last"),
        ({"keep_best": -1}, "keep_best"),
        ({"keep_best": None}, "keep_best"),
        ({"best_mode": "lowest"}, "best_mode"),
        ({"best_metric": 3}, "best_metric"),
    ],
)
def test_bad_policies_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)
