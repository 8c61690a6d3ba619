"""Crash consistency: a training run SIGKILLed at random instants, every backend.

Each case runs :mod:`aptckpt.testing.crash` in a fresh interpreter (it forks its
victims, which a pytest process that already ran torch must not do): after every
kill the run directory is checked (nothing partial visible, the index lists only
complete checkpoints, latest resolves, a restart takes the lock and leaves no
debris), and the run resumed to the end equals an uninterrupted one bit for bit.
The default run kills a few dozen times; ``-m slow`` hundreds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BACKENDS = ("torch", "zstd", "delta")


def torture(
    backend: str, *, kills: int, episodes: int, seed: int, min_kills: int, s3: bool = False
) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aptckpt.testing.crash",
            f"--backend={backend}",
            f"--kills={kills}",
            f"--episodes={episodes}",
            f"--seed={seed}",
            f"--min-kills={min_kills}",
            *(["--s3"] if s3 else []),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.stdout, proc.stderr
    report = json.loads(proc.stdout)
    assert report["failures"] == [], proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["final_equal"] == report["episodes"]  # every episode resumed to the same bits
    assert report["kills"] >= min_kills
    assert report["checks"] == report["kills"]
    print(
        f"\n{backend} ({report['storage']}): {report['kills']} kills survived, "
        f"phases {report['kill_phases']}, "
        f"{report['kills_mid_save']} left a save's temp files, "
        f"{report['asynchronous_episodes']}/{report['episodes']} episodes with background saves "
        f"({report['seconds']} s)"
    )
    return report


# the commit protocol under kills does not depend on the core (its writes and hashes are
# covered in both runs by the API-level tests): the pure-Python run skips it
@pytest.mark.core_independent
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_kills_lose_nothing(backend):
    # 8 kills each in the default run (CI's budget); -m slow runs hundreds
    torture(backend, kills=8, episodes=1, seed=BACKENDS.index(backend), min_kills=8)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_hundreds_of_random_kills_lose_nothing(backend):
    report = torture(backend, kills=25, episodes=12, seed=1000, min_kills=200)
    assert {"save: snapshot", "save: data", "save: commit", "index"} <= set(report["kill_phases"])
    assert 0 < report["asynchronous_episodes"] < report["episodes"]  # both kinds of saves


@pytest.mark.parametrize(
    "backend", ["zstd", *(pytest.param(b, marks=pytest.mark.slow) for b in ("torch", "delta"))]
)
@pytest.mark.skipif(
    os.environ.get("APTCKPT_NATIVE") == "disable",
    reason="the commit protocol under kills does not depend on the core; the pure-Python "
    "run's budget goes to the code that does (the local torture runs in both)",
)
def test_random_kills_lose_nothing_on_s3(backend):
    """The same on a bucket of a local S3 API server: kills mid-upload leave nothing
    visible, the restart waits out the dead writer's lease and removes its data. (One
    backend and two kills by default: each kill costs a lease expiry; ``-m slow`` runs all
    three.)"""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    torture(backend, kills=2, episodes=1, seed=BACKENDS.index(backend), min_kills=2, s3=True)
