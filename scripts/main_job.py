"""The main job: the APT reference training, killed and resumed, ends bit for bit where
an uninterrupted run ends; and what checkpointing costs with each backend.

1. Train the reference model (``aptckpt.apt.train_model``, default sizes) without
   interruption, in this process, into ``<out>/uninterrupted-<backend>``.
2. Run the same training as ``python -m aptckpt.apt`` in a subprocess into
   ``<out>/killed``; SIGKILL it mid-epoch right after its first temporary checkpoint
   commits; move the run directory to ``<out>/resumed`` (as if to another
   machine) and resume it there with ``--resume-from auto``.
3. Compare the final checkpoints of 1 and 2: model, optimizer, scheduler, loss
   history, metrics and RNG states must be equal bit for bit. Exit status 1 if not.
4. Train uninterrupted with the other backends too, check that they end in the same
   state, and print for each backend the share of wall time the loop was blocked by
   checkpoints (saves are asynchronous: the loop waits for a copy of the state).

Run: ``./scripts/run.sh`` (or ``.venv/bin/python scripts/main_job.py --help``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import aptckpt
from aptckpt.apt import TrainResult, train_model
from aptckpt.apt._support import fmt_bytes
from aptckpt.manager import CheckpointManager
from aptckpt.testing import assert_state_equal

BACKENDS = ("torch", "zstd", "delta")
EPOCHS, BATCH_SIZE, LEARNING_RATE = 3, 16, 3e-3


def final_state(run_dir: Path) -> Any:
    record = CheckpointManager(run_dir, read_only=True).latest()
    if record is None or record.kind != "epoch":
        raise SystemExit(f"FAIL: {run_dir} holds no final checkpoint")
    return aptckpt.load(record.path)


def indent(line: str) -> None:
    print(f"    | {line}", flush=True)


def uninterrupted(out: Path, backend: str, temp_freq: int) -> TrainResult:
    return train_model(
        EPOCHS,
        BATCH_SIZE,
        LEARNING_RATE,
        out / f"uninterrupted-{backend}",
        temp_checkpoint_freq=temp_freq,
        backend=backend,
        log=indent,
    )


def killed_and_resumed(out: Path, backend: str, temp_freq: int) -> Path:
    """Train in a subprocess, SIGKILL it after its first temporary checkpoint, move, resume."""
    cli = [
        sys.executable,
        "-m",
        "aptckpt.apt",
        f"--epochs={EPOCHS}",
        f"--batch-size={BATCH_SIZE}",
        f"--learning-rate={LEARNING_RATE}",
        f"--temp-checkpoint-freq={temp_freq}",
        f"--backend={backend}",
        "--no-progress",
        "--threads=1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*cli, "--checkpoint-dir=killed"],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    killed = False
    for line in proc.stdout:
        indent(line.rstrip("\n"))
        if line.startswith("  temp checkpoint"):  # printed once the checkpoint has committed
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.communicate(timeout=120)
    if not killed or proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"FAIL: the training subprocess was not killed (status {proc.returncode})")
    print(f"    SIGKILL sent right after that line (pid {proc.pid})", flush=True)

    shutil.move(out / "killed", out / "resumed")
    print("  moved the run directory killed/ -> resumed/; resuming with --resume-from auto")
    result = subprocess.run(
        [*cli, "--checkpoint-dir=resumed", "--resume-from=auto"],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    for line in result.stdout.splitlines():
        indent(line)
    if result.returncode != 0:
        raise SystemExit(f"FAIL: the resumed run exited with status {result.returncode}")
    if "(temporary," not in result.stdout:
        raise SystemExit("FAIL: the resumed run did not start from a temporary checkpoint")
    return out / "resumed"


def compare(label: str, expected: Any, actual: Any) -> None:
    try:
        assert_state_equal(expected, actual)
    except AssertionError as err:
        raise SystemExit(f"FAIL: {label}: {err}") from err
    tensors = aptckpt.tree.flatten(expected).tensors
    n_bytes = sum(leaf.tensor.numel() * leaf.tensor.element_size() for leaf in tensors)
    print(
        f"  OK {label}: equal bit for bit -- model, optimizer, scheduler, loss history "
        f"({len(expected['loss_history'])} steps), metrics, RNG states ({len(tensors)} tensors, "
        f"{fmt_bytes(n_bytes)})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    parser.add_argument(
        "--backend", default="zstd", choices=BACKENDS, help="backend of the kill test (zstd)"
    )
    parser.add_argument(
        "--temp-checkpoint-freq",
        type=int,
        default=20,
        help="temporary checkpoint every N steps in every run (default 20)",
    )
    args = parser.parse_args()
    # The CLI's default; the same count in every run compared (reductions split by
    # thread count round differently), and the tiny model gains nothing from more.
    torch.set_num_threads(1)
    print(
        f"aptckpt {aptckpt.__version__} (core: {aptckpt.IMPLEMENTATION}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    root = args.out or Path(tempfile.mkdtemp(prefix="aptckpt-main-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    print(f"\n[1] uninterrupted reference training, backend {args.backend}, in {root}")
    results = {args.backend: uninterrupted(root, args.backend, args.temp_checkpoint_freq)}
    expected = final_state(root / f"uninterrupted-{args.backend}")

    print(f"\n[2] the same training in a subprocess, SIGKILLed mid-epoch, backend {args.backend}")
    resumed = killed_and_resumed(root, args.backend, args.temp_checkpoint_freq)

    print("\n[3] final checkpoints compared")
    compare("killed + moved + resumed vs uninterrupted", expected, final_state(resumed))

    print("\n[4] uninterrupted training with the other backends")
    for backend in BACKENDS:
        if backend not in results:
            print(f"  backend {backend}:")
            results[backend] = uninterrupted(root, backend, args.temp_checkpoint_freq)
            compare(
                f"{backend} vs {args.backend}",
                expected,
                final_state(root / f"uninterrupted-{backend}"),
            )

    first = results[args.backend]
    print(
        f"\ntime blocked by checkpoints, uninterrupted runs ({EPOCHS} epochs x "
        f"{first.global_step // EPOCHS} steps, {first.model.num_parameters():,} parameters, "
        f"a temporary checkpoint every {args.temp_checkpoint_freq} steps):"
    )
    header = ("backend", "saves", "wall s", "blocked s", "blocked/wall", "written")
    print("  {:8} {:>5} {:>7} {:>9} {:>12} {:>9}".format(*header))
    for backend in BACKENDS:
        r = results[backend]
        saves = len(r.checkpoints) + len(r.temp_checkpoints)
        print(
            f"  {backend:8} {saves:5d} {r.wall_seconds:7.2f} {r.checkpoint_seconds:9.3f} "
            f"{100 * r.blocked_fraction:11.2f}% {fmt_bytes(r.bytes_written):>9}"
        )
    print(
        "  (asynchronous saves: blocked = the staging copies plus any wait for a save still "
        "persisting, and the wait for the last one; single runs on a shared machine, not a "
        "benchmark; written = bytes each save stored, for delta only new objects)"
    )
    print(f"\nmain job done in {time.perf_counter() - start:.1f}s")
    if args.out is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
