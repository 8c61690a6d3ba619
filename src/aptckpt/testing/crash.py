"""Crash torture: SIGKILL a checkpointing training run at random instants and check,
after every kill, what a run directory promises.

One *episode* trains the reference APT model (:func:`aptckpt.apt.train_model`,
a small shape) twice in forked children: once uninterrupted, then again into a
second run directory, SIGKILLed after a random delay and restarted with
``resume_from="auto"``, over and over, until the kill budget is spent; a last
restart runs to the end. The run saves a temporary checkpoint every other step
and keeps one regular checkpoint, so retention deletes, temporaries are
replaced and, with ``delta``, garbage collection runs: kills land in every part
of the save path. Episodes with even seeds save in the background (the loop's
default: kills then also land while the save thread persists and the loop
trains on), odd seeds synchronously. After each kill a fresh process checks:

1. every visible entry of ``checkpoints/`` and ``temp/`` is a complete
   checkpoint that loads and verifies (nothing partial is visible as complete);
2. ``metadata.json`` parses and every checkpoint it lists exists, loads and
   verifies;
3. "latest" resolves to a complete checkpoint -- the one saved last;
4. a writing :class:`~aptckpt.manager.CheckpointManager` can take the run (the
   dead owner's lock is gone) and, having taken it, no temp or trash entry and
   no object-store temp file is left;
5. with ``delta``, the store's garbage collection can read every manifest.

At the end the interrupted run's final checkpoint must equal the uninterrupted
one's bit for bit (model, optimizer, scheduler, loss history, metrics, RNG).

With ``--s3`` the killed run lives in a bucket of an S3 API server (moto's, started
on 127.0.0.1 by the driver as a separate process, stopped at the end): the same
checks, through the storage layer, with two differences the protocol defines. A
save killed mid-upload leaves data objects under its own prefix with no manifest:
never listed, never loaded, removed by the restart (the harness sets the grace
age ``APTCKPT_REMOTE_GRACE_S`` to 0: only one writer runs). The dead victim's run
lease stays until it expires (the harness sets ``APTCKPT_LEASE_TTL_S`` to 1 s):
the checker's writer waits for that, as a real restart would.

Run it: ``python -m aptckpt.testing.crash --backend delta --kills 50 [--s3]``; it
prints a JSON report and exits 1 on any failure. The driver process imports
torch but runs no tensor operation, so forking it is safe; every child uses one
torch thread (the same floating-point reductions in every run).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import aptckpt
from aptckpt import _background, api
from aptckpt.apt import train_model
from aptckpt.apt.model import APTConfig
from aptckpt.apt.train import _Run
from aptckpt.errors import RunBusyError
from aptckpt.manager import CheckpointManager
from aptckpt.objectstore import DEFAULT_STORE_NAME
from aptckpt.storage import resolve
from aptckpt.storage.local._atomic import CheckpointWriter, is_checkpoint, is_temporary
from aptckpt.testing._compare import assert_state_equal

__all__ = ["EpisodeReport", "check_run", "run_episode"]

#: A small model (about 30k parameters) and a short schedule: many saves per second.
MODEL = APTConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, context=16)
TRAINING: dict[str, Any] = dict(
    epochs=3,
    batch_size=8,
    learning_rate=3e-3,
    temp_checkpoint_freq=2,
    keep_last=1,
    max_steps_per_epoch=10,
    model_config=MODEL,
    seed=0,
    log=None,
    progress=False,
)
_FOLDERS = ("checkpoints", "temp")
#: storage_options of the S3 server of ``--s3`` runs (fake credentials), else None.
_S3: dict[str, Any] | None = None
_BUCKET = "aptckpt-crash"
#: Share of kills timed from the fork rather than from the start of training, so that
#: startup and the resume load are killed too.
EARLY_KILLS = 0.2
#: What a victim was doing when it was killed (innermost first wins).
PHASES = (
    "startup",  # building the model, resuming (loading the checkpoint)
    "training",  # steps and evaluation
    "save: snapshot",  # copying the state into staging buffers (asynchronous saves)
    "save: data",  # a backend writing and syncing data files / store objects
    "save: commit",  # manifest, fsync, rename
    "index",  # replacing metadata.json
    "retention delete",
    "garbage collection",
)


@dataclass
class EpisodeReport:
    """What one episode did and found."""

    backend: str
    seed: int
    asynchronous: bool = False
    kills: int = 0
    #: kills after which the run held a save's temporary files: the kill landed mid-save
    kills_mid_save: int = 0
    #: what the victim was doing at each kill: phase name -> count
    kill_phases: dict[str, int] = field(default_factory=dict)
    checks: int = 0
    restarts: int = 0
    final_equal: bool = False
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _preload() -> None:
    """Import in the driver what every child would import on its first optimizer
    step (torch's optimizers pull in torch._dynamo: over a second), so that kills
    land in training and saving rather than in imports. Imports only: the driver
    must run no tensor operation before it forks."""
    for module in ("torch._dynamo", "torch.optim"):
        importlib.import_module(module)


#: Phases whose boundaries are also hit exactly: the victim kills itself when it
#: enters or leaves one of them (short phases that timed kills rarely hit; the
#: staging copy of an asynchronous save takes milliseconds, and only asynchronous
#: victims reach it: the others are killed by their timer).
TRAPS = ("save: snapshot", "save: commit", "index", "retention delete", "garbage collection")
#: Share of victims given such a trap.
TRAPPED = 0.3


def _instrument(phase: mmap.mmap, trap: tuple[str, int, bool] | None) -> None:
    """In a victim: record in shared memory which phase it is in; with ``trap``
    ``(phase, n, at_exit)``, SIGKILL itself on entering (or leaving) that phase
    for the ``n``-th time."""
    entries: dict[str, int] = {}

    def track(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        code = PHASES.index(label)

        def sprung(at_exit: bool) -> bool:
            return trap is not None and trap[0] == label and trap[1:] == (entries[label], at_exit)

        @functools.wraps(original)
        def tracked(*args: Any, **kwargs: Any) -> Any:
            previous = phase[0]
            phase[0] = code
            entries[label] = entries.get(label, 0) + 1
            if sprung(False):
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if sprung(True):
                os.kill(os.getpid(), signal.SIGKILL)
            phase[0] = previous
            return result

        setattr(owner, name, tracked)

    phase[0] = PHASES.index("startup")
    track(_Run, "train", "training")
    track(_background._Staging, "snapshot", "save: snapshot")
    track(api.PendingSave, "persist", "save: data")  # on the save thread when asynchronous
    track(CheckpointWriter, "commit", "save: commit")
    if _S3 is not None:
        from aptckpt.storage.remote._writer import RemoteCheckpointWriter

        track(RemoteCheckpointWriter, "commit", "save: commit")
    track(CheckpointManager, "_write_index", "index")
    track(CheckpointManager, "_delete", "retention delete")
    track(CheckpointManager, "_collect_garbage", "garbage collection")


def _train(
    run_dir: Path | str,
    backend: str,
    resume: bool,
    asynchronous: bool,
    phase: mmap.mmap | None = None,
    trap: tuple[str, int, bool] | None = None,
) -> None:
    if phase is not None:
        _instrument(phase, trap)
    train_model(
        checkpoint_dir=run_dir,
        backend=backend,
        resume_from="auto" if resume else None,
        async_checkpoints=asynchronous,
        storage_options=_S3 if isinstance(run_dir, str) else None,
        **TRAINING,
    )


def _in_child(work: Callable[[], Any], result: Path | None = None) -> int:
    """Fork; run ``work`` in the child (its JSON-able return value goes to
    ``result``); return the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    status = 0
    try:
        torch.set_num_threads(1)
        value = work()
        if result is not None:
            result.write_text(json.dumps(value))
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        os._exit(status)


def _wait_for_phase(phase: mmap.mmap, pid: int, startup: int, limit: float = 30.0) -> None:
    """Wait until the victim leaves its startup phase (or exits, or ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while phase[0] == startup and time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return  # it exited (left unreaped for the caller)
        time.sleep(0.0005)


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _debris(run_dir: Path) -> list[str]:
    """Hidden temp/trash entries and store temp files in the run."""
    found = []
    for folder in (run_dir, *(run_dir / f for f in (*_FOLDERS, "tokenizer"))):
        if folder.is_dir():
            found += [str(p.relative_to(run_dir)) for p in folder.iterdir() if is_temporary(p.name)]
    store_tmp = run_dir / DEFAULT_STORE_NAME / "tmp"
    if store_tmp.is_dir():
        found += [str(p.relative_to(run_dir)) for p in store_tmp.iterdir()]
    return found


def check_run(run_dir: Path | str, backend: str) -> dict[str, Any]:
    """Check a run directory after a crash (items 1-5 of the module docstring)."""
    if isinstance(run_dir, str):
        return check_remote_run(run_dir, backend)
    failures: list[str] = []
    complete: dict[str, int] = {}  # rel path -> sequence
    for folder in _FOLDERS:
        directory = run_dir / folder
        if not directory.is_dir():
            continue
        for entry in sorted(directory.iterdir()):
            rel = f"{folder}/{entry.name}"
            if is_temporary(entry.name):
                continue
            if not is_checkpoint(entry):
                failures.append(f"{rel} is visible but has no manifest (partial checkpoint)")
                continue
            try:
                state = aptckpt.load(entry)  # verifies every digest: one read, not two
                info = aptckpt.inspect(entry)
            except aptckpt.AptckptError as err:
                failures.append(f"{rel} is visible as complete but broken: {err}")
                continue
            if not isinstance(state, dict) or "model" not in state:
                failures.append(f"{rel} loaded something other than a training state")
            complete[rel] = int(info.metadata["aptckpt_run"]["sequence"])
    index = run_dir / "metadata.json"
    if index.exists():
        try:
            listed = [e["path"] for e in json.loads(index.read_text())["checkpoints"]]
        except (ValueError, KeyError, TypeError) as err:
            failures.append(f"metadata.json is unreadable: {err}")
            listed = []
        failures += [
            f"metadata.json lists {rel}, which is not a complete checkpoint"
            for rel in listed
            if rel not in complete
        ]
    latest = CheckpointManager(run_dir, read_only=True).latest()
    if complete:
        newest = max(complete, key=complete.__getitem__)
        if latest is None or latest.rel_path != newest:
            got = latest.rel_path if latest else None
            failures.append(f"latest resolves to {got}, not the last complete save {newest}")
    elif latest is not None:
        failures.append(f"latest resolves to {latest.rel_path} but no checkpoint is complete")
    debris = _debris(run_dir)
    try:
        CheckpointManager(run_dir, backend=backend).close()  # the restart's first step
    except aptckpt.AptckptError as err:
        failures.append(f"a new writer cannot take the run: {err}")
    left = _debris(run_dir)
    if left:
        failures.append(f"leftovers survive a restart: {left}")
    if (run_dir / DEFAULT_STORE_NAME).is_dir():
        try:
            aptckpt.collect_garbage(run_dir, dry_run=True)
        except aptckpt.AptckptError as err:
            failures.append(f"garbage collection cannot read the run: {err}")
    return {"failures": failures, "debris": len(debris)}


def _remote_debris(storage: Any, root: str) -> list[str]:
    """Data of saves that never committed: checkpoint folders without a manifest, and
    data prefixes no manifest names."""
    found = []
    for folder in _FOLDERS:
        for entry in storage.list(storage.join(root, folder)):
            ckpt = storage.join(root, folder, entry.name)
            named: set[str] = set()
            if storage.is_checkpoint(ckpt):
                with storage.open_checkpoint(ckpt) as reader:
                    named = {f.path.split("/", 1)[0] for f in reader.read_manifest().files}
            found += [
                f"{folder}/{entry.name}/{child.name}"
                for child in storage.list(ckpt)
                if child.kind == "dir" and child.name not in named
            ]
    return found


def check_remote_run(url: str, backend: str) -> dict[str, Any]:
    """:func:`check_run` for a run on object storage, through the storage layer."""
    failures: list[str] = []
    storage, root = resolve(url, _S3)
    complete: dict[str, int] = {}
    for folder in _FOLDERS:
        for entry in storage.list(storage.join(root, folder)):
            rel = f"{folder}/{entry.name}"
            where = storage.join(root, rel)
            if not storage.is_checkpoint(where):
                leftovers = [c.name for c in storage.list(where)]
                if any(not n.startswith("data-") for n in leftovers):
                    failures.append(f"{rel} has no manifest but holds {leftovers}")
                continue
            try:
                state = aptckpt.load(f"{url}/{rel}", storage_options=_S3)
                info = aptckpt.inspect(f"{url}/{rel}", storage_options=_S3)
            except aptckpt.AptckptError as err:
                failures.append(f"{rel} is visible as complete but broken: {err}")
                continue
            if not isinstance(state, dict) or "model" not in state:
                failures.append(f"{rel} loaded something other than a training state")
            complete[rel] = int(info.metadata["aptckpt_run"]["sequence"])
    try:
        index = storage.read_file(storage.join(root, "metadata.json"), limit=1 << 26)
    except FileNotFoundError:
        index = None
    if index is not None:
        try:
            listed = [e["path"] for e in json.loads(index)["checkpoints"]]
        except (ValueError, KeyError, TypeError) as err:
            failures.append(f"metadata.json is unreadable: {err}")
            listed = []
        failures += [
            f"metadata.json lists {rel}, which is not a complete checkpoint"
            for rel in listed
            if rel not in complete
        ]
    latest = CheckpointManager(url, read_only=True, storage_options=_S3).latest()
    if complete:
        newest = max(complete, key=complete.__getitem__)
        if latest is None or latest.rel_path != newest:
            got = latest.rel_path if latest else None
            failures.append(f"latest resolves to {got}, not the last complete save {newest}")
    elif latest is not None:
        failures.append(f"latest resolves to {latest.rel_path} but no checkpoint is complete")
    debris = _remote_debris(storage, root)
    deadline = time.monotonic() + 30
    while True:  # the dead victim's lease expires after its ttl: a restart waits that long
        try:
            CheckpointManager(url, backend=backend, storage_options=_S3).close()
            break
        except RunBusyError as err:
            if time.monotonic() > deadline:
                failures.append(f"a new writer cannot take the run: {err}")
                break
            time.sleep(0.2)
        except aptckpt.AptckptError as err:
            failures.append(f"a new writer cannot take the run: {err}")
            break
    left = _remote_debris(storage, root)
    if left:
        failures.append(f"leftovers survive a restart: {left}")
    if storage.info(storage.join(root, DEFAULT_STORE_NAME)) is not None:
        try:
            aptckpt.collect_garbage(url, dry_run=True, storage_options=_S3)
        except aptckpt.AptckptError as err:
            failures.append(f"garbage collection cannot read the run: {err}")
    return {"failures": failures, "debris": len(debris)}


def run_episode(
    backend: str, kills: int, *, seed: int = 0, workdir: Path | None = None
) -> EpisodeReport:
    """One episode: an uninterrupted run, then a run killed ``kills`` times and
    resumed, checked after every kill and compared at the end."""
    _preload()
    start = time.perf_counter()
    report = EpisodeReport(backend=backend, seed=seed)
    rng = random.Random(seed)
    root = workdir or Path(tempfile.mkdtemp(prefix="aptckpt-crash-"))
    reference = root / "reference"
    victim: Path | str = root / "run"
    for path in (reference, victim):
        shutil.rmtree(path, ignore_errors=True)
    if _S3 is not None:  # a fresh prefix of the bucket per episode
        victim = f"s3://{_BUCKET}/{root.name}-{seed}/run"

    began = time.perf_counter()
    # Even seeds save in the background (the loop's default), odd seeds synchronously;
    # the reference is always synchronous, so both must end in its exact state.
    asynchronous = seed % 2 == 0
    report.asynchronous = asynchronous
    if _wait(_in_child(lambda: _train(reference, backend, False, False))) != 0:
        report.failures.append("the uninterrupted run failed")
        return report
    duration = time.perf_counter() - began
    # Delays spread the kills over the whole run: each life is short enough that the
    # budget is spent before the run ends, long enough that resumed lives progress.
    longest = max(0.05, 2.0 * duration / max(kills, 1))

    phase = mmap.mmap(-1, 1)  # shared with the forked victims
    while report.kills < kills:
        phase[0] = PHASES.index("startup")  # before the fork: no stale phase is read
        trap = None
        if rng.random() < TRAPPED:
            trap = (rng.choice(TRAPS), rng.randint(1, 2), rng.random() < 0.5)
        pid = _in_child(functools.partial(_train, victim, backend, True, asynchronous, phase, trap))
        if trap is not None or rng.random() >= EARLY_KILLS:  # most: once training has begun
            _wait_for_phase(phase, pid, PHASES.index("startup"))
        # A trapped victim gets longer, to reach its trap; if it does not, the timer kills it.
        time.sleep(rng.uniform(0.0, longest * (4 if trap else 1)))
        os.kill(pid, signal.SIGKILL)
        killed_in = PHASES[phase[0]]
        status = _wait(pid)
        if status == 0:
            break  # it finished before the signal: the run is complete
        if status != -signal.SIGKILL:
            report.failures.append(f"a resumed run failed with status {status}")
            break
        report.kills += 1
        report.kill_phases[killed_in] = report.kill_phases.get(killed_in, 0) + 1
        result = root / "check.json"
        checker = _in_child(lambda: check_run(victim, backend), result)
        if _wait(checker) != 0:
            report.failures.append(f"the check after kill {report.kills} crashed")
            break
        found = json.loads(result.read_text())
        report.checks += 1
        report.kills_mid_save += found["debris"] > 0
        report.failures += [f"after kill {report.kills}: {f}" for f in found["failures"]]
        if report.failures:
            break
        report.restarts += 1

    if not report.failures:
        final = _in_child(lambda: _train(victim, backend, True, asynchronous))
        if _wait(final) != 0:
            report.failures.append("the last resumed run failed")
        else:
            outcome = root / "compare.json"
            _wait(_in_child(lambda: _compare(reference, victim), outcome))
            message = json.loads(outcome.read_text()) if outcome.exists() else "compare crashed"
            report.final_equal = message == ""
            if message:
                report.failures.append(f"final state differs from the uninterrupted run: {message}")
    if workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


def _compare(reference: Path, victim: Path | str) -> str:
    expected = CheckpointManager(reference, read_only=True).latest()
    options = _S3 if isinstance(victim, str) else None
    actual = CheckpointManager(victim, read_only=True, storage_options=options).latest()
    if expected is None or actual is None:
        return "a run has no final checkpoint"
    if (expected.kind, expected.global_step) != (actual.kind, actual.global_step):
        got, want = (actual.kind, actual.global_step), (expected.kind, expected.global_step)
        return f"ended at {got}, not {want}"
    try:
        assert_state_equal(
            aptckpt.load(expected.path), aptckpt.load(actual.path, storage_options=options)
        )
    except AssertionError as err:
        return str(err)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="zstd")
    parser.add_argument("--kills", type=int, default=20, help="kills per episode (default 20)")
    parser.add_argument("--episodes", type=int, default=1, help="episodes (default 1)")
    parser.add_argument(
        "--min-kills",
        type=int,
        default=0,
        help="run more episodes until this many kills happened (a run can end before its "
        "kill budget is spent when the machine is slow)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="keep the run directories here")
    parser.add_argument(
        "--s3",
        action="store_true",
        help="kill runs saving into a bucket of a local S3 API server (needs moto[server], s3fs)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    server = _start_s3() if args.s3 else None
    try:
        return _main(args)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def _start_s3() -> subprocess.Popen[bytes]:
    """An S3 API server (moto) on a free loopback port, in a process of its own (the
    driver forks its victims: it must run no server threads), and its bucket."""
    global _S3
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.1)
    _S3 = {
        "key": "crash-key",
        "secret": "crash-secret",
        "endpoint_url": f"http://127.0.0.1:{port}",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    os.environ["APTCKPT_REMOTE_GRACE_S"] = "0"  # one writer: every orphan is a dead save's
    os.environ["APTCKPT_LEASE_TTL_S"] = "1"  # a dead victim's lease lapses in a second

    def make_bucket() -> None:
        import s3fs

        s3fs.S3FileSystem(**_S3, skip_instance_cache=True).call_s3("create_bucket", Bucket=_BUCKET)

    if _wait(_in_child(make_bucket)) != 0:  # s3fs only in children: no loop thread here
        server.kill()
        raise RuntimeError("could not create the crash bucket")
    return server


def _main(args: argparse.Namespace) -> int:
    reports: list[EpisodeReport] = []
    while len(reports) < args.episodes or (
        sum(r.kills for r in reports) < args.min_kills and len(reports) < 10 * args.episodes + 10
    ):
        episode = len(reports)
        workdir = args.dir / f"episode-{episode}" if args.dir else None
        if workdir:
            workdir.mkdir(parents=True, exist_ok=True)
        seed = args.seed + episode
        reports.append(run_episode(args.backend, args.kills, seed=seed, workdir=workdir))
        if reports[-1].failures:
            break
    totals = {
        "backend": args.backend,
        "storage": "s3" if args.s3 else "local",
        "implementation": aptckpt.IMPLEMENTATION,
        "episodes": len(reports),
        "asynchronous_episodes": sum(r.asynchronous for r in reports),
        "kills": sum(r.kills for r in reports),
        "kills_mid_save": sum(r.kills_mid_save for r in reports),
        "kill_phases": {
            p: sum(r.kill_phases.get(p, 0) for r in reports)
            for p in PHASES
            if any(p in r.kill_phases for r in reports)
        },
        "checks": sum(r.checks for r in reports),
        "final_equal": sum(r.final_equal for r in reports),
        "failures": [f for r in reports for f in r.failures],
        "seconds": round(sum(r.seconds for r in reports), 1),
        "episode_reports": [asdict(r) for r in reports],
    }
    print(json.dumps(totals, indent=1))
    short = totals["kills"] < args.min_kills
    return 1 if totals["failures"] or totals["final_equal"] != len(reports) or short else 0


if __name__ == "__main__":
    sys.exit(main())
