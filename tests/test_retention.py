"""Retention and save policies: the best flag, which checkpoints stay, when a save is due,
and the Lightning / Hugging Face settings mapped onto the rules."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aptckpt._run_index import CheckpointRecord
from aptckpt.retention import (
    Keep,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepLast,
    Metric,
    SaveEvery,
    from_lightning,
    from_transformers,
    is_best,
    split,
)

pytestmark = pytest.mark.core_independent


def rec(
    seq: int,
    loss: Any = None,
    *,
    kind: str = "epoch",
    best: bool = False,
    step: int | None = None,
    epoch: int = 0,
) -> CheckpointRecord:
    metrics = {} if loss is None else {"loss": loss}
    name = f"{'checkpoints' if kind == 'epoch' else 'temp'}/c{seq}"
    return CheckpointRecord(
        Path("/run") / name,
        name,
        kind,  # type: ignore[arg-type]
        epoch,
        seq if step is None else step,
        None,
        best,
        "",
        metrics,
        sequence=seq,
    )


def seqs(records: list[CheckpointRecord]) -> list[int]:
    return [r.sequence for r in records]


def kept_after(keep: Keep, records: list[CheckpointRecord]) -> list[int]:
    return seqs(split(keep, records, records[-1])[0])


# ---------------------------------------------------------------- metrics and the best flag


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
    assert Metric("loss", "max").score({"loss": value}) == score
    assert Metric("loss", "min").score({"loss": value}) == (None if score is None else -score)


def test_is_best_ignores_what_ranks_nothing_and_a_tie_is_no_improvement():
    low, high = Metric("loss", "min"), Metric("loss", "max")
    earlier = [rec(1, 2.0), rec(2, float("nan")), rec(3, True), rec(4), rec(5, 0.1, kind="temp")]
    assert is_best(low, {"loss": 1.5}, earlier)  # the temporary's 0.1 does not count
    assert not is_best(low, {"loss": 2.0}, earlier)  # a tie: the older stays the best
    assert not is_best(low, {"loss": 2.5}, earlier)
    assert not is_best(low, {"loss": float("nan")}, [])
    assert is_best(low, {"loss": float("inf")}, [])  # the first ranked value is the best
    assert not is_best(low, {"loss": float("inf")}, earlier)
    assert is_best(high, {"loss": 10**400}, earlier)


# ---------------------------------------------------------------- the rules


def test_keep_last_and_best_keep_current_temporaries():
    keep = KeepLast(2) | KeepBest(1)
    records = [rec(1, 0.5, best=True), rec(2, 0.9), rec(3, kind="temp"), rec(4, 0.8), rec(5)]
    kept, dropped = split(keep, records, records[-1])
    assert seqs(kept) == [1, 4, 5] and seqs(dropped) == [2, 3]
    new_temp = rec(6, kind="temp")
    kept, _ = split(keep, [*records, new_temp], new_temp)  # a temporary drops no temporary
    assert {3, 6} <= set(seqs(kept))
    assert kept_after(KeepAll(), records) == [1, 2, 4, 5]


def test_keep_best_is_the_top_k_by_score():
    records = [rec(1, 3.0), rec(2, 1.0), rec(3, None), rec(4, 2.0), rec(5, 5.0), rec(6, 4.0)]
    assert KeepBest(2).select(records) == {"checkpoints/c2", "checkpoints/c4"}
    assert KeepBest(2, mode="max").select(records) == {"checkpoints/c5", "checkpoints/c6"}
    assert KeepBest(10).select(records) == {f"checkpoints/c{i}" for i in (1, 2, 4, 5, 6)}
    ties = [rec(1, 1.0), rec(2, 1.0), rec(3, 1.0)]
    assert KeepBest(2).select(ties) == {"checkpoints/c1", "checkpoints/c2"}  # older first


def test_the_runs_best_is_kept_even_unscored_when_rules_rank_by_a_metric():
    """An explicit ``is_best=True`` without a metric: ``best()`` points at it, so the
    rules never drop it while they rank by a metric; without a ranking rule they may."""
    records = [rec(1, None, best=True), rec(2, 3.0), rec(3, 2.0), rec(4, 1.0)]
    assert kept_after(KeepLast(1) | KeepBest(1), records) == [1, 4]
    assert kept_after(KeepLast(1), records) == [4]


def test_keep_every_keeps_a_thinned_history():
    records = [rec(i, step=10 * i, epoch=i - 1) for i in range(1, 8)]
    assert kept_after(KeepLast(1) | KeepEvery(30), records) == [3, 6, 7]
    # epochs 0..6 ended: the 3rd and 6th completed (epochs 2 and 5, as SaveEvery(epochs=3))
    assert kept_after(KeepLast(1) | KeepEvery(3, "epoch"), records) == [3, 6, 7]


def test_keep_last_including_counts_the_best_among_the_n():
    records = [rec(1, 0.1), rec(2, 0.5), rec(3, 0.4), rec(4, 0.3)]
    assert kept_after(KeepLast(2, including=KeepBest(1)), records) == [1, 4]
    assert kept_after(KeepLast(3, including=KeepBest(1)), records) == [1, 3, 4]
    assert kept_after(KeepLast(9, including=KeepBest(1)), records) == [1, 2, 3, 4]  # n > len
    newest_best = [rec(1, 0.5), rec(2, 0.4), rec(3, 0.1)]
    assert kept_after(KeepLast(2, including=KeepBest(1)), newest_best) == [2, 3]


def test_rules_compose_flat_and_name_their_metrics():
    keep = KeepLast(3) | (KeepBest(2, "acc", "max") | KeepEvery(5))
    assert repr(keep) == (
        "KeepLast(n=3, including=None) | KeepBest(k=2, metric='acc', mode='max') | "
        "KeepEvery(n=5, by='step')"
    )
    assert keep.ranks_by_metric == (Metric("acc", "max"),)
    assert KeepLast(2, including=KeepBest(1, "f1", "max")).ranks_by_metric == (Metric("f1", "max"),)
    assert (KeepLast(1) | KeepAll()).ranks_by_metric == ()


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: KeepLast(0), ValueError, r"KeepLast\(n\)"),
        (lambda: KeepLast(1.5), ValueError, r"KeepLast\(n\)"),
        (lambda: KeepLast(True), ValueError, r"KeepLast\(n\)"),
        (lambda: KeepLast(2, including=3), TypeError, "including"),
        (lambda: KeepBest(0), ValueError, r"KeepBest\(k\)"),
        (lambda: KeepBest(1, "loss", "lowest"), ValueError, "mode must be"),
        (lambda: KeepBest(1, ""), ValueError, "non-empty"),
        (lambda: KeepEvery(0), ValueError, r"KeepEvery\(n\)"),
        (lambda: KeepEvery(2, "batch"), ValueError, "by="),
        (lambda: Metric(3), ValueError, "non-empty string"),  # type: ignore[arg-type]
        (lambda: SaveEvery(), ValueError, "one of steps= or epochs="),
        (lambda: SaveEvery(steps=2, epochs=1), ValueError, "one of"),
        (lambda: SaveEvery(steps=0), ValueError, "steps="),
        (lambda: KeepLast(1) | 3, TypeError, "unsupported operand"),
    ],
)
def test_bad_policies_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ---------------------------------------------------------------- invariants, any history

histories = st.lists(
    st.tuples(
        st.sampled_from(["epoch", "epoch", "epoch", "temp"]),
        st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-5, 5)),
        st.booleans(),
    ),
    min_size=1,
    max_size=25,
)
rules = st.lists(
    st.one_of(
        st.builds(KeepLast, st.integers(1, 5)),
        st.builds(KeepBest, st.integers(1, 4), st.just("loss"), st.sampled_from(["min", "max"])),
        st.builds(KeepEvery, st.integers(1, 4)),
        st.builds(
            KeepLast,
            st.integers(1, 4),
            st.builds(
                KeepBest, st.integers(1, 2), st.just("loss"), st.sampled_from(["min", "max"])
            ),
        ),
    ),
    min_size=1,
    max_size=3,
)


@given(histories, rules)
def test_split_invariants(history, chosen):
    keep = chosen[0]
    for rule in chosen[1:]:
        keep = keep | rule
    records = [
        rec(i, loss, kind=kind, best=best and kind == "epoch")
        for i, (kind, loss, best) in enumerate(history, start=1)
    ]
    new = records[-1]
    kept, dropped = split(keep, records, new)
    assert sorted(seqs(kept) + seqs(dropped)) == seqs(records)  # a partition
    assert new in kept
    regular = [r for r in records if r.kind == "epoch"]
    assert {r.rel_path for r in kept if r.kind == "epoch"} >= keep.select(regular)
    flagged = [r for r in regular if r.is_best]
    if keep.ranks_by_metric and flagged:
        assert flagged[-1] in kept  # best() never points at a deleted checkpoint
    for r in kept:
        if r.kind == "temp" and new.kind == "epoch":
            assert r is new or r.sequence > new.sequence
    for rule in chosen:  # union: each rule's choice survives
        if isinstance(rule, KeepLast) and rule.including is None:
            assert set(seqs(regular[-rule.n :])) <= set(seqs(kept))


# ---------------------------------------------------------------- when to save


def test_save_every_steps_and_epochs():
    steps = SaveEvery(steps=3)
    assert [s for s in range(10) if steps.due(s)] == [3, 6, 9]  # never at step 0
    epochs = SaveEvery(epochs=2)
    assert not epochs.due(5)  # only at the end of an epoch
    assert [e for e in range(6) if epochs.due(0, epoch_ended=e)] == [1, 3, 5]


# ---------------------------------------------------------------- the trainers' settings


def lightning_top_k(scores: list[float], k: int, mode: str) -> set[int]:
    """Lightning's ModelCheckpoint: the ``k`` best seen so far; a new score replaces the
    k-th only when strictly better (torch.lt / torch.gt), so on a tie the older stays."""
    kept: list[int] = []
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    for i, score in enumerate(scores):
        if len(kept) < k:
            kept.append(i)
            continue
        worst = max(kept, key=lambda j: (scores[j] if mode == "min" else -scores[j], -j))
        if better(score, scores[worst]):
            kept[kept.index(worst)] = i
    return {i + 1 for i in kept}


@given(st.data(), st.integers(1, 4), st.sampled_from(["min", "max"]), st.booleans())
def test_lightning_settings_keep_what_model_checkpoint_keeps(data, k, mode, save_last):
    """Replayed with ties for the top 1. (For k >= 2 Lightning evicts the *older* of scores
    tied at the k-th place -- dict order in ``best_k_models`` -- while a later tie never
    enters: no rule over the checkpoints alone says which, so k >= 2 replays distinct
    scores.)"""
    values = [-1.0, 0.0, 0.5, 2.0, 7.0]
    if k == 1:
        scores = data.draw(st.lists(st.sampled_from(values), min_size=1, max_size=20))
    else:
        scores = data.draw(st.lists(st.floats(-100, 100), min_size=1, max_size=20, unique=True))
    keep = from_lightning(save_top_k=k, monitor="loss", mode=mode, save_last=save_last)
    records: list[CheckpointRecord] = []
    metric = Metric("loss", mode)
    for i, score in enumerate(scores, start=1):
        new = rec(i, score, best=is_best(metric, {"loss": score}, records))
        records, _ = split(keep, [*records, new], new)  # pruned after every save
    # the newest is never dropped: Lightning does not write a checkpoint outside the top k,
    # a manager keeps it (without save_last) until the next save
    assert set(seqs(records)) == lightning_top_k(scores, k, mode) | {len(scores)}


def test_lightning_settings_without_a_monitor_and_the_edges():
    assert from_lightning(save_top_k=2) == KeepLast(2)
    assert from_lightning(save_top_k=-1, monitor="loss") == KeepAll()
    assert from_lightning(save_top_k=0, save_last=True) == KeepLast(1)
    assert from_lightning(3, "val_acc", "max", save_last=True) == KeepBest(3, "val_acc", "max") | (
        KeepLast(1)
    )
    with pytest.raises(ValueError, match="keeps no checkpoint"):
        from_lightning(save_top_k=0)
    with pytest.raises(ValueError, match="save_top_k"):
        from_lightning(save_top_k=-2)


def hf_rotate(steps: list[int], limit: int | None, best: int | None) -> set[int]:
    """transformers' rotate_checkpoints, modelled: keep the newest and the best, delete the
    oldest others until ``limit`` (or the protected count) remain."""
    if limit is None or limit <= 0 or len(steps) <= limit:
        return set(steps)
    protected = {steps[-1]} | ({best} if best is not None else set())
    keep_n = max(limit, len(protected))
    remaining, kept = len(steps), set(steps)
    for s in steps:
        if remaining <= keep_n:
            break
        if s not in protected:
            kept.discard(s)
            remaining -= 1
    return kept


@given(
    st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]), min_size=1, max_size=20),
    st.one_of(st.none(), st.integers(-1, 5)),
    st.sampled_from([None, "loss", "accuracy"]),
)
def test_transformers_settings_keep_what_the_trainer_keeps(scores, limit, metric_name):
    keep = from_transformers(save_total_limit=limit, metric_for_best_model=metric_name)
    name = None if metric_name is None else f"eval_{metric_name}"
    mode = "min" if metric_name == "loss" else "max"
    records: list[CheckpointRecord] = []
    on_disk: list[int] = []
    best_step = None
    for i, score in enumerate(scores, start=1):
        metrics = {name: score} if name else {}
        flagged = name is not None and is_best(Metric(name, mode), metrics, records)
        new = CheckpointRecord(
            Path(f"/run/c{i}"), f"c{i}", "epoch", 0, i, None, flagged, "", metrics, sequence=i
        )
        records, _ = split(keep, [*records, new], new)
        if flagged:
            best_step = i
        on_disk = sorted(hf_rotate([*on_disk, i], limit, best_step))
    assert seqs(records) == on_disk
