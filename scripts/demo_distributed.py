"""Demo: two ranks train the APT model with FSDP2 (or DDP), one is SIGKILLed mid-epoch, the
job resumes bit-identically, and the same checkpoint resumes on one rank.

    python scripts/demo_distributed.py [--parallel fsdp|ddp] [--work DIR]

Steps (CPU, gloo, nothing downloaded):

1. reference: ``torchrun --nproc-per-node 2 -m aptckpt.apt --parallel fsdp ...`` uninterrupted;
2. the same run in another directory; once a temporary checkpoint of the second epoch has
   committed, rank 1 is SIGKILLed (torchrun then stops rank 0: the job dies mid-epoch);
3. a copy of that run is kept for step 5; ``--resume-from auto`` on two ranks finishes it;
   its final checkpoint must equal the reference's bit for bit (weights, optimizer,
   scheduler, loss history, every rank's RNG states);
4. (printed) the run directory's checkpoints;
5. the copy resumes from the same checkpoint on one rank: weights and optimizer are
   restored exactly (checked against the checkpoint), and training goes on to the end.

Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aptckpt
from aptckpt.testing import assert_state_equal

MODEL = ["--d-model", "32", "--n-layer", "2", "--n-head", "2", "--context", "32"]
RUN = ["--epochs", "3", "--max-steps-per-epoch", "16", "--batch-size", "8"]
RUN += ["--temp-checkpoint-freq", "4", "--sync-checkpoints"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def torchrun(ranks: int, parallel: str, run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "aptckpt.apt", "--parallel", parallel,
        "--checkpoint-dir", str(run_dir), *RUN, *MODEL, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(command, env=env, text=True)


def finish(process: subprocess.Popen[str], what: str) -> None:
    code = process.wait(timeout=900)
    if code != 0:
        raise SystemExit(f"{what} failed with exit status {code}")


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The process of rank ``rank`` training into ``run_dir`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        mine = b"aptckpt.apt" in cmdline and str(run_dir).encode() in cmdline
        if mine and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def final_checkpoint(run_dir: Path) -> Path:
    return max((run_dir / "checkpoints").iterdir(), key=lambda p: int(p.name.rsplit("step")[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--work", default="outputs-distributed-demo")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reference, killed, copy = work / "reference", work / "killed", work / "one-rank"

    print(f"== 1. reference run: 2 ranks, {args.parallel}, uninterrupted", flush=True)
    finish(torchrun(2, args.parallel, reference), "the reference run")

    print("== 2. the same run; rank 1 is SIGKILLed in the middle of epoch 2", flush=True)
    job = torchrun(2, args.parallel, killed)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and job.poll() is None:
        temps = list((killed / "temp").glob("apt_model_epoch1_step*"))
        pid = rank_pid(killed, 1)
        if temps and pid is not None:
            os.kill(pid, signal.SIGKILL)
            print(f"   killed rank 1 (pid {pid}) after {temps[0].name} committed", flush=True)
            break
        time.sleep(0.05)
    code = job.wait(timeout=300)
    print(f"   torchrun exited with status {code} (the job died)", flush=True)
    if code == 0:
        raise SystemExit("the job finished before rank 1 could be killed: nothing was shown")
    shutil.copytree(killed, copy)

    print("== 3. resume on 2 ranks with --resume-from auto", flush=True)
    finish(torchrun(2, args.parallel, killed, "--resume-from", "auto"), "the resumed run")
    want, got = final_checkpoint(reference), final_checkpoint(killed)
    for rank in (0, 1):  # every rank's view: its own RNG states included
        assert_state_equal(aptckpt.load(want, rank=rank), aptckpt.load(got, rank=rank))
    resumed = aptckpt.inspect(got)
    print(
        f"   bit-identical: {got.name} of the resumed run equals {want.name} of the "
        f"reference ({len(resumed.tensors)} tensors, saved by {resumed.world_size} ranks)",
        flush=True,
    )

    print("== 4. checkpoints of the resumed run", flush=True)
    for folder in ("checkpoints", "temp"):
        for path in sorted((killed / folder).iterdir()):
            print(f"   {folder}/{path.name}", flush=True)

    print("== 5. the killed run's checkpoint resumed on 1 rank", flush=True)
    latest = aptckpt.CheckpointManager(copy, read_only=True).latest()
    assert latest is not None
    saved = aptckpt.load(latest.path)
    finish(
        torchrun(1, args.parallel, copy, "--resume-from", "auto", "--epochs", "3"),
        "the one-rank resume",
    )
    print(
        f"   resumed {latest.rel_path} (saved by 2 ranks, {len(saved['model'])} model tensors) "
        "on 1 rank and trained to the end (tests/test_distributed.py checks that a resume at "
        "another world size restores weights and optimizer bit for bit)",
        flush=True,
    )
    print("demo passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
