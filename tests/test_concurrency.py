"""Concurrency between processes.

* Two trainers on one run directory: the second CheckpointManager is refused
  (tests/test_runlock.py).
* Plain ``aptckpt.save`` calls from several processes into one directory and one
  ``delta`` object store, with garbage collection running beside them: all
  succeed, and every committed checkpoint loads bit for bit.
* Two processes saving the same name: without ``overwrite`` one wins and the
  other gets CheckpointExistsError; with it, the name ends up holding one
  complete checkpoint, never a mix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aptckpt
from aptckpt.testing import assert_state_equal

# protocol of the storage layer, not the core's reads and hashes (covered in both runs)
pytestmark = pytest.mark.core_independent

WORKER = """
import sys, torch, aptckpt
from pathlib import Path
run, who, count, backend = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
one_name, overwrite = sys.argv[5] == "same", sys.argv[6] == "overwrite"
torch.set_num_threads(1)
refused = 0
for i in range(count):
    g = torch.Generator().manual_seed(1000 * who + i)
    own = torch.randn(5000, generator=g)
    state = {"shared": torch.arange(20000, dtype=torch.float32), "own": own, "who": who, "i": i}
    name = "same" if one_name else f"w{who}-s{i}"
    try:
        aptckpt.save(state, run / name, backend=backend, chunk_size=8192, overwrite=overwrite)
    except aptckpt.CheckpointExistsError:
        refused += 1
print(refused)
"""

COLLECTOR = """
import sys, time, aptckpt

run = sys.argv[1]
collections = 0
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        aptckpt.collect_garbage(run)
        collections += 1
    except aptckpt.StoreNotFoundError:
        pass
    time.sleep(0.01)
print(collections)
"""


def expected(who: int, i: int) -> dict:
    g = torch.Generator().manual_seed(1000 * who + i)
    return {
        "shared": torch.arange(20000, dtype=torch.float32),
        "own": torch.randn(5000, generator=g),
        "who": who,
        "i": i,
    }


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    return out.strip()


def test_processes_saving_into_one_store_with_gc_running(tmp_path: Path) -> None:
    run, count = tmp_path / "run", 12
    workers = [spawn(WORKER, str(run), str(w), str(count), "delta", "own", "-") for w in (1, 2)]
    collector = spawn(COLLECTOR, str(run), "8")
    for w in workers:
        assert finish(w) == "0"
    assert int(finish(collector)) > 0
    for who in (1, 2):
        for i in range(count):
            path = run / f"w{who}-s{i}"
            assert_state_equal(expected(who, i), aptckpt.load(path))
    aptckpt.collect_garbage(run)
    assert aptckpt.load(run / "w1-s0")["who"] == 1  # nothing reachable was collected


def test_two_processes_saving_one_name(tmp_path: Path) -> None:
    for overwrite in ("-", "overwrite"):
        run = tmp_path / overwrite
        procs = [spawn(WORKER, str(run), str(w), "6", "zstd", "same", overwrite) for w in (1, 2)]
        refused = [int(finish(p)) for p in procs]
        state = aptckpt.load(run / "same")
        assert_state_equal(expected(state["who"], state["i"]), state)  # one whole save
        if overwrite == "-":  # the first commit won; every later attempt was refused
            assert sum(refused) == 11
        else:
            assert refused == [0, 0]
