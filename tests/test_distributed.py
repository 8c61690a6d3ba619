"""Collective saves and loads (``process_group=``) on real gloo process groups.

One spawn round of four processes runs every scenario (tests/_ranks.py): saves at world
sizes 1, 2 and 4 (subgroups of the four), loads at 1, 2, 3 and 4, for FSDP2 (``fully_shard``
on CPU meshes), DDP-style replicas and a 2-D DTensor mesh, every backend, local disk and
S3; bit-exact against the full tensors every rank can build from the same seed. A second
round kills a rank in the middle of a save.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from _ranks import check, run_round, skip_unless_multiprocess
from aptckpt.retention import KeepBest, KeepLast
from conftest import S3_SECRET

skip_unless_multiprocess()
dist = pytest.importorskip("torch.distributed")


# ----------------------------------------------------------------- helpers (every rank)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(13, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7, bias=False)
    )


def _groups() -> dict[int, Any]:
    """Process groups over ranks 0..n-1 for n = 1..4 (every rank makes every one)."""
    world = dist.get_world_size()
    made = {n: dist.new_group(list(range(n))) for n in range(1, world)}
    made[world] = dist.group.WORLD
    return made


def _fsdp(n: int, groups: dict[int, Any], seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The seeded model (and AdamW after one step) sharded over ranks 0..n-1."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    fully_shard(model, mesh=DeviceMesh.from_group(groups[n], "cpu"))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    torch.manual_seed(seed + 1)
    model(torch.randn(4, 13)).sum().backward()
    optim.step()
    return model, optim


def _fresh_fsdp(n: int, groups: dict[int, Any]) -> tuple[torch.nn.Module, Any]:
    """A differently seeded model, whose optimizer state exists (zero), to load into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = _fsdp(n, groups, seed=99)
    get_state_dict(model, optim)
    return model, optim


def _full(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly DTensor) flat state, whole (collective over its mesh)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _full(value).items()})
        elif isinstance(value, torch.Tensor):
            out[key] = value.full_tensor() if hasattr(value, "full_tensor") else value
    return out


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _flat(model: Any, optim: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd}


# ---------------------------------------------------------------------------- scenarios


def fsdp_saved_at_4_loads_at_1_2_3_4(rank: int, world: int, work: Path, extra: Any) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    groups = _groups()
    model, optim = _fsdp(world, groups)
    state = _flat(model, optim)
    want = _full(state)
    info = aptckpt.save(state, work / "ck", process_group=dist.group.WORLD)
    assert len(info.files) == world  # every rank wrote its own shard file
    for n in range(1, world + 1):
        if rank >= n:
            continue
        fresh, fresh_optim = _fresh_fsdp(n, groups)
        target = _flat(fresh, fresh_optim)
        aptckpt.load(work / "ck", into=target, process_group=groups[n])
        set_state_dict(
            fresh, fresh_optim, model_state_dict=target["model"], optim_state_dict=target["optim"]
        )
        _assert_same(_full(_flat(fresh, fresh_optim)), want)
    if rank == 0:  # one process, no group: whole tensors
        whole = aptckpt.load(work / "ck")
        _assert_same(_full(whole), want)


def saved_at_2_and_1_load_at_4_and_3(rank: int, world: int, work: Path, extra: Any) -> None:
    groups = _groups()
    want = _full(_flat(*_fsdp(world, groups)))
    for saved_at in (1, 2):
        if rank < saved_at:
            model, optim = _fsdp(saved_at, groups)
            aptckpt.save(
                _flat(model, optim), work / f"at{saved_at}", process_group=groups[saved_at]
            )
        dist.barrier()
        for n in (world, 3):
            if rank >= n:
                continue
            fresh, fresh_optim = _fresh_fsdp(n, groups)
            target = _flat(fresh, fresh_optim)
            aptckpt.load(work / f"at{saved_at}", into=target, process_group=groups[n])
            _assert_same(_full(target), want)


def two_d_mesh_loads_as_shard1_and_plain(rank: int, world: int, work: Path, extra: Any) -> None:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    groups = _groups()
    torch.manual_seed(5)
    w, b, odd = torch.randn(9, 6), torch.randn(5), torch.randn(3, 2).to(torch.bfloat16)
    mesh = init_device_mesh("cpu", (2, 2))
    state = {
        "w": distribute_tensor(w, mesh, [Shard(0), Shard(1)]),
        "b": distribute_tensor(b, mesh, [Replicate(), Shard(0)]),
        "odd": distribute_tensor(odd, mesh, [Shard(0), Replicate()]),
    }
    aptckpt.save(state, work / "ck", process_group=dist.group.WORLD, chunk_size=16)
    if rank < 3:
        mesh3 = DeviceMesh.from_group(groups[3], "cpu")
        target = {
            "w": distribute_tensor(torch.zeros(9, 6), mesh3, [Shard(1)]),
            "b": distribute_tensor(torch.zeros(5), mesh3, [Replicate()]),
            "odd": torch.zeros(3, 2, dtype=torch.bfloat16),
        }
        aptckpt.load(work / "ck", into=target, process_group=groups[3])
        assert torch.equal(target["w"].full_tensor(), w)
        assert torch.equal(target["b"].full_tensor(), b)
        assert torch.equal(target["odd"], odd)
    if rank == 0:
        whole = aptckpt.load(work / "ck")
        assert torch.equal(whole["w"], w) and torch.equal(whole["b"], b)
        assert torch.equal(whole["odd"], odd)


def replicas_written_once_spread_and_per_rank_values(
    rank: int, world: int, work: Path, extra: Any
) -> None:
    groups = _groups()
    torch.manual_seed(3)
    replicas = {f"p{i}": torch.randn(50 + i) for i in range(8)}  # DDP: the same on every rank
    state = {
        "model": replicas,
        "rng": aptckpt.per_rank(torch.full((4,), rank, dtype=torch.uint8)),
        "loader": {"position": 100 + rank},  # a plain value: kept per rank
        "epoch": 2,
    }
    info = aptckpt.save(state, work / "ck", process_group=dist.group.WORLD, codec="none")
    assert info.raw_bytes == sum(t.nbytes for t in replicas.values()) + 4 * world
    assert len(info.files) == world  # the replicas were spread over every rank
    got = aptckpt.load(work / "ck", process_group=dist.group.WORLD)
    assert torch.equal(got["rng"], torch.full((4,), rank, dtype=torch.uint8))
    assert got["loader"]["position"] == 100 + rank and got["epoch"] == 2
    _assert_same(got["model"], replicas)
    if rank < 2:  # another world size: the replicas whole, per-rank values of ranks 0, 1
        target = {"model": {k: torch.zeros_like(v) for k, v in replicas.items()}}
        result = aptckpt.load(work / "ck", into=target, process_group=groups[2], strict=False)
        _assert_same(target["model"], replicas)
        assert result.state["loader"]["position"] == 100 + rank


def diverged_replicas_are_refused(rank: int, world: int, work: Path, extra: Any) -> None:
    state = {"same": torch.ones(3), "w": torch.full((3,), 1.0 if rank != 2 else 2.0)}
    with pytest.raises(aptckpt.ReplicaDivergenceError) as caught:
        aptckpt.save(state, work / "ck", process_group=dist.group.WORLD)
    assert caught.value.key_path == "state['w']"
    assert caught.value.groups == [(0, 1, 3), (2,)]
    assert "state['w']" in str(caught.value)
    assert not (work / "ck").exists()


def a_rank_raising_fails_every_rank(rank: int, world: int, work: Path, extra: Any) -> None:
    aptckpt.save({"x": torch.ones(2)}, work / "old", process_group=dist.group.WORLD)
    state: dict[str, Any] = {"x": torch.ones(2), "bad": object() if rank == 1 else 1}
    with pytest.raises(aptckpt.CollectiveError) as caught:
        aptckpt.save(state, work / "ck", process_group=dist.group.WORLD)
    assert set(caught.value.failures) == {1}
    assert "rank 1" in str(caught.value) and "state['bad']" in str(caught.value)
    assert not (work / "ck").exists()
    assert torch.equal(aptckpt.load(work / "old")["x"], torch.ones(2))
    dist.barrier()
    # bad backend options on one rank only: caught before anything is created
    with pytest.raises(aptckpt.CollectiveError):
        aptckpt.save(
            {"x": torch.ones(2)},
            work / "ck2",
            process_group=dist.group.WORLD,
            level=1 if rank else 999,
        )
    assert not (work / "ck2").exists()


def every_backend_and_s3(rank: int, world: int, work: Path, extra: Any) -> None:
    groups = _groups()
    model, optim = _fsdp(world, groups)
    state = _flat(model, optim)
    want = _full(state)
    cases: list[tuple[str, str, dict[str, Any], Any]] = [
        (str(work / "zstd"), "zstd", {}, None),
        (str(work / "none"), "zstd", {"codec": "none"}, None),
        (str(work / "torch"), "torch", {}, None),
        (str(work / "run" / "delta"), "delta", {}, None),
    ]
    if extra.get("s3_url"):
        cases.append((f"{extra['s3_url']}/zstd", "zstd", {}, extra["s3_options"]))
    for path, backend, options, storage_options in cases:
        aptckpt.save(
            state,
            path,
            process_group=dist.group.WORLD,
            backend=backend,
            storage_options=storage_options,
            **options,
        )
        if rank < 3:
            fresh, fresh_optim = _fresh_fsdp(3, groups)
            target = _flat(fresh, fresh_optim)
            aptckpt.load(
                path, into=target, process_group=groups[3], storage_options=storage_options
            )
            _assert_same(_full(target), want)
        if rank == 0:
            aptckpt.verify(path, storage_options=storage_options)
            _assert_same(_full(aptckpt.load(path, storage_options=storage_options)), want)


def dcp_and_aptckpt_load_the_same(rank: int, world: int, work: Path, extra: Any) -> None:
    import torch.distributed.checkpoint as dcp

    groups = _groups()
    model, optim = _fsdp(world, groups)
    state = _flat(model, optim)
    dcp.save(state, checkpoint_id=str(work / "dcp"))
    aptckpt.save(state, work / "apt", process_group=dist.group.WORLD)
    if rank < 2:
        a_model, a_optim = _fresh_fsdp(2, groups)
        a = _flat(a_model, a_optim)
        aptckpt.load(work / "apt", into=a, process_group=groups[2])
        d_model, d_optim = _fresh_fsdp(2, groups)
        d = _flat(d_model, d_optim)
        dcp.load(d, checkpoint_id=str(work / "dcp"), process_group=groups[2])
        _assert_same(_full(a), _full(d))


def async_saves_snapshot_and_commit_collectively(
    rank: int, world: int, work: Path, extra: Any
) -> None:
    groups = _groups()
    model, optim = _fsdp(world, groups)
    state = _flat(model, optim)
    want = {k: v.clone() for k, v in _full(state).items()}
    first = aptckpt.save(state, work / "a", process_group=dist.group.WORLD, blocking=False)
    with torch.no_grad():  # the state may change at once: the snapshot was taken
        for p in model.parameters():
            p.to_local().add_(1.0)
    second = aptckpt.save(
        {"step": rank * 0 + 7}, work / "b", process_group=dist.group.WORLD, blocking=False
    )
    assert first.wait().path.endswith("/a")
    assert second.wait().tensors == 0
    if rank < 2:
        fresh, fresh_optim = _fresh_fsdp(2, groups)
        target = _flat(fresh, fresh_optim)
        aptckpt.load(work / "a", into=target, process_group=groups[2])
        _assert_same(_full(target), want)
    assert aptckpt.load(work / "b")["step"] == 7


def manager_saves_prunes_and_resumes_at_any_world_size(
    rank: int, world: int, work: Path, extra: Any
) -> None:
    groups = _groups()
    model, optim = _fsdp(world, groups)
    run = work / "run"
    manager = aptckpt.CheckpointManager(
        run, keep=KeepLast(2) | KeepBest(1), process_group=dist.group.WORLD
    )
    torch.manual_seed(1000 + rank)  # each rank's own RNG stream
    for step in (1, 2, 3):
        manager.log_metrics(step * 10, loss=1.0 / step)  # recorded once, by group rank 0
        handle = manager.save_checkpoint(
            model,
            optim,
            None,
            epoch=step,
            global_step=step * 10,
            loss_history=[1.0],
            metrics={"loss": 1.0 / step},
            blocking=step != 2,
        )
        if step == 2:
            handle.wait()
    expected_rng = torch.get_rng_state()
    want = _full(_flat(model, optim))
    manager.close()
    if rank == 0:
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names == ["apt_model_epoch2_step20", "apt_model_epoch3_step30"], names
        assert (run / "metadata.json").exists()
        history = aptckpt.CheckpointManager(run, read_only=True).history()
        assert [p.step for p in history.points] == [10, 20, 30]
        assert [(e.step, e.blocking) for e in history.saves] == [
            (10, True),
            (20, False),
            (30, True),
        ]
        assert all(0 <= e.blocked_s <= e.save_s for e in history.saves)
    dist.barrier()
    torch.manual_seed(0)  # scramble: the resume must restore this rank's own stream
    fresh, fresh_optim = _fresh_fsdp(world, groups)
    again = aptckpt.CheckpointManager(run, process_group=dist.group.WORLD)
    epoch, step, _, _ = again.load_checkpoint(fresh, fresh_optim)
    assert (epoch, step) == (3, 30)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    _assert_same(_full(_flat(fresh, fresh_optim)), want)
    again.close()
    if rank < 2:  # the same checkpoint on two ranks
        small, small_optim = _fresh_fsdp(2, groups)
        reader = aptckpt.CheckpointManager(run, read_only=True, process_group=groups[2])
        reader.load_checkpoint(small, small_optim)
        _assert_same(_full(_flat(small, small_optim)), want)


SCENARIOS = [
    fsdp_saved_at_4_loads_at_1_2_3_4,
    saved_at_2_and_1_load_at_4_and_3,
    two_d_mesh_loads_as_shard1_and_plain,
    replicas_written_once_spread_and_per_rank_values,
    diverged_replicas_are_refused,
    a_rank_raising_fails_every_rank,
    every_backend_and_s3,
    dcp_and_aptckpt_load_the_same,
    async_saves_snapshot_and_commit_collectively,
    manager_saves_prunes_and_resumes_at_any_world_size,
]


@pytest.fixture(scope="module")
def round_of_four(tmp_path_factory: pytest.TempPathFactory, request: Any) -> Any:
    extra: dict[str, Any] = {}
    try:  # the S3 server of the session (native run only), reached by every rank
        admin = request.getfixturevalue("s3_admin")
        endpoint = request.getfixturevalue("s3_endpoint")
    except pytest.skip.Exception:
        admin = None
    if admin is not None:
        bucket = f"aptckpt-ranks-{uuid.uuid4().hex[:12]}"
        admin.call_s3("create_bucket", Bucket=bucket)
        extra = {
            "s3_url": f"s3://{bucket}/test",
            "s3_options": {
                "key": "fake-key-id",
                "secret": S3_SECRET,
                "endpoint_url": endpoint,
                "client_kwargs": {"region_name": "us-east-1"},
            },
        }
    return run_round(4, tmp_path_factory.mktemp("ranks4"), SCENARIOS, extra)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_scenario(round_of_four: Any, scenario: Any) -> None:
    check(round_of_four, scenario)
