"""Running scenarios on several processes at once (gloo on CPU) for the distributed tests.

A *round* spawns ``world`` processes once (about 5-15 s on this machine, mostly importing
torch) and runs a list of scenario functions in each, in order; every scenario's outcome on
every rank (None, or the traceback) is written to ``<root>/result-<rank>.json`` and read
back by the test process, so one round serves many tests. A scenario that hangs is bounded
by the group's timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Scenario = Callable[[int, int, Path, dict[str, Any]], None]


def skip_unless_multiprocess() -> None:
    """Skip the calling test module where multi-process tests do not run: without
    torch.distributed, and in the pure-Python run of the suite unless
    ``APTCKPT_TEST_DISTRIBUTED=1`` (the protocol does not depend on the core, whose reads
    every other test covers in that run; CI's time budget goes there)."""
    import pytest
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch without torch.distributed", allow_module_level=True)
    if os.environ.get("APTCKPT_NATIVE") == "disable" and not os.environ.get(
        "APTCKPT_TEST_DISTRIBUTED"
    ):
        pytest.skip(
            "multi-process tests run with the native core (APTCKPT_TEST_DISTRIBUTED=1: here too)",
            allow_module_level=True,
        )


def _rank_main(
    rank: int, world: int, root: str, scenarios: Sequence[Scenario], extra: dict[str, Any]
) -> None:
    import torch.distributed as dist

    os.environ.setdefault("APTCKPT_COLLECTIVE_TIMEOUT_S", "30")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    outcomes: dict[str, str | None] = {}
    for scenario in scenarios:
        work = Path(root) / scenario.__name__
        work.mkdir(exist_ok=True)
        dist.barrier()
        try:
            scenario(rank, world, work, extra)
            outcomes[scenario.__name__] = None
        except BaseException:
            outcomes[scenario.__name__] = traceback.format_exc()
        Path(root, f"result-{rank}.json").write_text(json.dumps(outcomes))
    dist.barrier()
    dist.destroy_process_group()


def run_round(
    world: int, root: Path, scenarios: Sequence[Scenario], extra: dict[str, Any] | None = None
) -> dict[str, dict[int, str | None]]:
    """Run ``scenarios`` on ``world`` processes; outcome per scenario and rank."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world, str(root), list(scenarios), extra or {}), nprocs=world)
    results: dict[str, dict[int, str | None]] = {}
    for rank in range(world):
        found = json.loads(Path(root, f"result-{rank}.json").read_text())
        for name, outcome in found.items():
            results.setdefault(name, {})[rank] = outcome
    return results


def check(results: dict[str, dict[int, str | None]], scenario: Scenario) -> None:
    """Fail with every rank's traceback if the scenario failed anywhere."""
    outcomes = results.get(scenario.__name__)
    assert outcomes is not None, f"{scenario.__name__} did not run"
    failed = {rank: tb for rank, tb in outcomes.items() if tb is not None}
    assert not failed, "\n".join(f"--- rank {r}:\n{tb}" for r, tb in sorted(failed.items()))
