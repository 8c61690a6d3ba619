"""Attacks on run directories from outside: what broke, kept as regression tests.

Each test is one attack on :class:`~aptckpt.CheckpointManager`, the commit protocol
or the APT loop that an outside tester found to break a promise of
docs/guarantees.md (§1 atomicity, §4 every failure an ``AptckptError``, §6 one writer
per run). They fail until the library is fixed; each docstring says what happens now
and what is promised.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import aptckpt
from aptckpt import _background, _run_index
from aptckpt import manager as manager_module
from aptckpt._runlock import LOCK_NAME
from aptckpt.errors import AptckptError
from aptckpt.manager import CheckpointManager
from aptckpt.retention import KeepAll, KeepBest, KeepLast
from aptckpt.storage.local import _temps
from aptckpt.training_state import MAX_COUNT

# above the API: its reads and hashes are covered in both runs by the API-level tests
pytestmark = pytest.mark.core_independent


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((16,), float(value))}


def run_is_free(run: Path) -> bool:
    """Whether another writer could take ``run`` now: a probe of the run lock through a
    new open file description (which conflicts with this process's own lock too)."""
    fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # drops the probe's lock, if it got one
    return True


@contextlib.contextmanager
def gated_after_commit(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold every save between its commit and its index/retention until the event is set."""
    gate = threading.Event()
    real = manager_module.CheckpointManager._after_commit

    def after_commit(self: CheckpointManager, rel: str) -> None:
        gate.wait(30)
        real(self, rel)

    monkeypatch.setattr(manager_module.CheckpointManager, "_after_commit", after_commit)
    try:
        yield gate
    finally:
        gate.set()


# ------------------------------------------------------------------ §6: one writer per run


def test_close_releases_the_run_while_an_exception_of_a_save_is_kept(tmp_path):
    """Now: the run lock lives as long as any frame of a failed save does, so a kept
    exception (a notebook's ``sys.last_value``, a test report) keeps the run locked
    after ``close()`` and another process gets ``RunBusyError`` naming this one.
    Promised (§6): held "until ``close()``"."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run)

    class Broken:
        def state_dict(self) -> dict[str, torch.Tensor]:
            raise RuntimeError("state_dict failed")

    with pytest.raises(RuntimeError) as info:
        mgr.save(1, {"model": Broken()})
    kept = info.value  # what an interactive session keeps of the last error
    mgr.close()
    assert run_is_free(run), "close() did not release the run lock while a save's error is kept"
    del kept


def test_close_during_the_hand_off_of_a_background_save_keeps_the_run_locked(tmp_path, monkeypatch):
    """Now: ``close()`` from another thread (or a signal handler) landing after the
    background save was submitted but before the manager recorded it waits for nothing
    and drops the run lock while the save still commits, indexes and prunes: a second
    process can then take the run and write into it at the same time.
    Promised (§6): one writer per run; ``close()`` finishes the save in flight."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    real_submit = _background.submit

    closer: list[threading.Thread] = []

    def submit(*args, **kwargs):
        handle = real_submit(*args, **kwargs)
        closer.append(threading.Thread(target=mgr.close))  # another thread's close ...
        closer[0].start()
        closer[0].join(2)  # ... lands exactly here (a fixed close may wait for the save)
        return handle

    monkeypatch.setattr(_background, "submit", submit)
    with gated_after_commit(monkeypatch) as gate:
        handle = mgr.save(1, state(1), blocking=False)
        try:
            assert not handle.done()
            assert not run_is_free(run), "the run lock was released with a save in flight"
        finally:
            gate.set()
            handle.wait()
            closer[0].join()


def test_a_forked_child_using_the_manager_does_not_hang_on_the_parents_save(tmp_path, monkeypatch):
    """Now: a child forked while a background save is in flight (a ``fork``
    multiprocessing worker that is handed the manager, e.g. to evaluate ``best()``)
    waits forever in ``latest()``, ``best()``, ``save()`` or ``close()``: the save's
    future belongs to the parent's thread, which the child does not have.
    Promised: an answer or an ``AptckptError``, never a hang."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    mgr.save(1, state(1), metrics={"loss": 1.0})
    with gated_after_commit(monkeypatch) as gate:
        handle = mgr.save(2, state(2), metrics={"loss": 0.5}, blocking=False)
        pid = os.fork()
        if pid == 0:  # the child: no tensor work, just the manager
            signal.alarm(5)  # a hang ends the child, not the test run
            code = 0
            try:
                mgr.latest()
            except AptckptError:
                pass
            except BaseException:
                code = 2
            os._exit(code)
        try:
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        finally:
            gate.set()
            handle.wait()
    assert done and not os.WIFSIGNALED(status), "the child hung in latest() (killed by its alarm)"
    assert os.WEXITSTATUS(status) == 0


def test_a_manager_whose_run_was_moved_does_not_start_a_second_run(tmp_path):
    """Now: after the run directory is moved (``mv run archive``) a manager holding it
    saves into a *new* directory at the old path -- a second run, no lock file there,
    with the best flag decided without the moved checkpoints (a worse checkpoint
    becomes "best") -- and another process may take that path as a writer meanwhile.
    Promised (§6): one writer per run; a failure is an ``AptckptError`` naming the
    problem. Either the save refuses, or it lands in the run the manager holds."""
    run, moved = tmp_path / "run", tmp_path / "archive"
    mgr = CheckpointManager(run, keep=KeepLast(1) | KeepBest(1))
    mgr.save(1, state(1), metrics={"loss": 0.1})
    run.rename(moved)
    try:
        path = mgr.save(2, state(2), metrics={"loss": 0.9})
    except AptckptError:
        assert not run.exists(), "a refused save must not recreate the old path"
        return
    assert Path(path).parent.parent.resolve() == moved.resolve(), (
        f"the save started a second run at the old path: {path}"
    )


# ------------------------------------------------------------------ §1: sequence numbers


def test_a_run_at_the_largest_sequence_number_never_hides_new_saves(tmp_path):
    """Now: a checkpoint whose run metadata says ``sequence = 2**63 - 1`` (copied in,
    or saved with ``aptckpt.save(..., metadata=...)``) makes the next save number itself
    ``2**63``, which listing rejects as malformed and reads as 0: every new save is the
    *oldest* checkpoint, ``latest()`` stays on the planted one (a resume goes back), and
    with ``keep=KeepLast(1)`` each save prunes the previous one. Promised (§1): "latest" is
    the complete checkpoint saved last -- or the save is refused with an AptckptError."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepLast(1))
    meta = _run_index.run_metadata(
        sequence=MAX_COUNT,
        kind="epoch",
        epoch=0,
        global_step=100,
        batch_index=None,
        metrics={},
        is_best=False,
    )
    planted = {"w": torch.zeros(16), "global_step": 100, "epoch": 0, "metrics": {}}
    aptckpt.save(planted, run / "checkpoints" / "planted", metadata={_run_index.RUN_KEY: meta})
    try:
        saved = [mgr.save(step, state(step)) for step in (101, 102)]
    except AptckptError:
        return  # refusing to number past the largest count is a kept promise
    latest = mgr.latest()
    assert latest is not None and latest.path == saved[-1], (
        f"latest() is {latest and latest.rel_path}, not the checkpoint saved last"
    )


def test_a_resumed_run_with_a_long_model_name_can_save_a_step_again(tmp_path):
    """Now: a step saved again after a resume is named ``<name>_seq<n>``, which for a
    ``model_name`` the constructor accepted (240 characters: the plain names fit in
    255 bytes) is too long, so the resumed run cannot save that step at all
    (``InvalidNameError`` telling the user to "choose a shorter name" -- a name the
    manager made). Promised (§1): a step saved again is saved under another name."""
    run = tmp_path / "run"
    name = "m" * 240
    mgr = CheckpointManager(run, model_name=name, keep=KeepAll())
    first = mgr.save(5, state(5))
    mgr.save(6, state(6))
    mgr.restore({}, first)
    again = mgr.save(6, state(7))  # the resumed run reaches step 6 again
    assert aptckpt.load(again)["w"][0].item() == 7.0


def test_a_tokenizer_file_name_too_long_is_refused_before_anything_commits(tmp_path):
    """Now: a tokenizer file named with 256 bytes passes the name check, the checkpoint
    commits, and then writing ``tokenizer/`` fails with ``WriteError`` ("File name too
    long ... fix the cause") -- on every save of the run. Promised (house rules, like
    ``InvalidNameError`` for checkpoint names): a name the file system cannot take is
    refused before anything is written."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    with pytest.raises((ValueError, AptckptError)):
        mgr.save_checkpoint(
            torch.nn.Linear(2, 2), None, None, 0, 1, [], {"loss": 1.0}, tokenizer={"x" * 256: b"v"}
        )
    assert mgr.checkpoints() == [], "the save committed before refusing the tokenizer's name"


# ------------------------------------------------------------------ §1: replacing


_DIES_REMOVING_THE_OLD = """
import os, shutil, sys, torch, aptckpt
from aptckpt.storage.local import _atomic
_atomic._exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE
real = shutil.rmtree
def rmtree(path, *args, **kwargs):
    if ".old-" in os.fspath(path) or ".trash-" in os.fspath(path):  # the replaced one, removed
        os.unlink(os.path.join(path, sorted(os.listdir(path))[0]))  # part of it is gone
        os._exit(9)
    return real(path, *args, **kwargs)
_atomic.shutil.rmtree = rmtree
aptckpt.save({"v": torch.full((64,), 2.0)}, sys.argv[1], overwrite=True)
"""


def test_an_old_checkpoint_killed_while_being_removed_never_comes_back(tmp_path):
    """Now: without RENAME_EXCHANGE, a replacement killed while it removes the old
    checkpoint (after the new one took the name: the replacement committed) leaves a
    half-removed ``.c.old-*``; once ``c`` is deleted, the next save in the folder
    "restores" that half-removed directory as ``c`` -- a visible checkpoint that fails
    to load (or a directory without its manifest). Promised (§1, format.md §1): no
    directory named ``<name>`` without a complete manifest, nothing partial visible."""
    aptckpt.save({"v": torch.full((64,), 1.0)}, tmp_path / "c")
    proc = subprocess.run([sys.executable, "-c", _DIES_REMOVING_THE_OLD, str(tmp_path / "c")])
    assert proc.returncode == 9
    assert aptckpt.load(tmp_path / "c")["v"][0].item() == 2.0  # the replacement committed
    aptckpt.delete(tmp_path / "c")
    aptckpt.save({"v": 0}, tmp_path / "other")  # its cleanup settles the old entry
    if (tmp_path / "c").exists():
        loaded = aptckpt.load(tmp_path / "c")  # a visible checkpoint must be whole
        assert loaded["v"][0].item() == 1.0


# ------------------------------------------------------------------ §4: hostile entries


def test_a_lock_file_recording_a_name_with_a_nul_byte_is_not_a_value_error(tmp_path):
    """Now: a planted ``.<stem>.lock-<token>`` whose recorded name holds a NUL byte
    (and hashes to its stem) beside an ``old`` entry makes every writer of the folder
    -- ``CheckpointManager(run)`` and every ``aptckpt.save`` there -- raise a bare
    ``ValueError: embedded null byte`` from the rename that would restore it: the run
    can no longer be written. Promised (§4): hostile entries are judged or left, and
    every failure is an ``AptckptError``."""
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(1, state(1))
    folder = run / "checkpoints"
    recorded = "A" * 300 + "\x00"
    stem, token = _temps.stem_of(recorded), "0123456789abcdef"
    (folder / f".{stem}.old-{token}").mkdir()
    (folder / f".{stem}.lock-{token}").write_bytes(recorded.encode())
    with CheckpointManager(run) as mgr:  # takes the run: cleans up
        mgr.save(2, state(2))
    aptckpt.save(state(3), folder / "plain")
    assert [r.global_step for r in CheckpointManager(run, read_only=True).checkpoints()] == [1, 2]


def test_a_directory_at_metadata_json_is_named_in_the_error(tmp_path):
    """Now: with a directory planted at ``metadata.json`` every save commits, then raises
    a ``WriteError`` naming the hidden temp file (``.metadata.json.tmp-*``) and saying
    "fix the cause"; nothing is ever pruned again. Promised (§4 and the house rules):
    the message names the problem (``metadata.json`` is a directory) and the fix."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    mgr.save(1, state(1))
    (run / "metadata.json").unlink()
    (run / "metadata.json").mkdir()
    with pytest.raises(aptckpt.WriteError) as info:
        mgr.save(2, state(2))
    message = str(info.value)
    assert f"'{run / 'metadata.json'}'" in message, message
    assert ".tmp-" not in message, message
    assert "fix the cause" not in message, message


# ------------------------------------------------------------------ the APT loop


def _tiny(d_model: int):
    from aptckpt.apt.corpus import default_corpus
    from aptckpt.apt.model import APTConfig
    from aptckpt.apt.tokenizer import CharTokenizer

    vocab = CharTokenizer.from_text(default_corpus()).vocab_size
    return APTConfig(vocab_size=vocab, d_model=d_model, n_layer=1, n_head=2, context=8)


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_resuming_with_another_model_shape_is_refused_before_loading(tmp_path):
    """Now: ``train_model(resume_from="auto")`` with another ``model_config`` raises
    torch's ``RuntimeError`` ("size mismatch for ...") from ``load_state_dict`` -- the
    loop restores the checkpoint before it checks that the run matches -- and
    ``python -m aptckpt.apt`` dies with a traceback. Promised (``train_model``'s
    docstring): ``ValueError`` for "a checkpoint of a run with other ... model shape";
    the CLI prints ``error: cannot resume ...`` and exits 1."""
    from aptckpt.apt import train_model
    from aptckpt.apt.__main__ import main

    common = dict(
        batch_size=4,
        temp_checkpoint_freq=0,
        max_steps_per_epoch=2,
        log=None,
        progress=False,
        async_checkpoints=False,
    )
    train_model(1, checkpoint_dir=tmp_path, model_config=_tiny(16), **common)
    with pytest.raises(ValueError, match="model"):
        train_model(
            2, checkpoint_dir=tmp_path, resume_from="auto", model_config=_tiny(32), **common
        )
    argv = ["--epochs", "2", "--batch-size", "4", "--max-steps-per-epoch", "2"]
    argv += ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--context", "8"]
    argv += ["--no-progress", "--sync-checkpoints", "--temp-checkpoint-freq", "0"]
    argv += ["--checkpoint-dir", str(tmp_path), "--resume-from", "auto"]
    assert main(argv) == 1


# ------------------------------------------------------------------ §6: links inside the store


@pytest.mark.parametrize("attack", ["writer", "gc"])
def test_a_store_tmp_folder_that_is_a_link_is_never_emptied(tmp_path, attack):
    """Now: with ``<run>/aptckpt-store/tmp`` a symbolic link to a directory outside the
    run, creating a writing manager (its cleanup on taking the run) and every garbage
    collection (``aptckpt gc``, the manager's retention) delete every file in the
    linked directory -- files that were never aptckpt's. Promised (§6): nothing a
    manager or GC writes or deletes goes through a link out of the run (refuse, naming
    the link)."""
    run = tmp_path / "run"
    with CheckpointManager(run, backend="delta") as mgr:
        mgr.save(1, state(1))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    store_tmp = run / "aptckpt-store" / "tmp"
    store_tmp.rmdir()
    store_tmp.symlink_to(precious)
    with contextlib.suppress(aptckpt.errors.UnsafePathError):
        if attack == "writer":
            CheckpointManager(run, backend="delta").close()  # cleans up on taking the run
        else:
            aptckpt.collect_garbage(run)  # aptckpt gc, or the manager's retention
    assert (precious / "thesis.tex").exists(), "a file outside the run was deleted"


def test_a_delta_save_refuses_a_store_whose_objects_folder_is_a_link(tmp_path):
    """Now: with ``<run>/aptckpt-store/objects`` a link to another run's objects, a
    manager's ``delta`` save writes its objects into the other run's store and commits
    a checkpoint that every load refuses (``UnsafePathError``: "stores never contain
    links"); the other run's garbage collection then deletes those objects, so the
    committed checkpoint is gone for good. Promised (§6): nothing a manager writes
    goes through a link; a refused save writes nothing."""
    other = tmp_path / "other"
    with CheckpointManager(other, backend="delta") as mgr:
        mgr.save(1, {"x": torch.randn(300_000)})
    other_objects = other / "aptckpt-store" / "objects"
    before = sorted(os.listdir(other_objects))
    run = tmp_path / "run"
    with CheckpointManager(run, backend="delta") as mgr:
        mgr.save(1, state(1))
    objects = run / "aptckpt-store" / "objects"
    for entry in objects.iterdir():
        entry.unlink()
    objects.rmdir()
    objects.symlink_to(other_objects)
    mgr = CheckpointManager(run, backend="delta")
    try:
        path = mgr.save(2, {"y": torch.randn(300_000)})
    except aptckpt.errors.UnsafePathError:
        assert sorted(os.listdir(other_objects)) == before
        return
    finally:
        mgr.close()
    try:
        aptckpt.load(path)
    except aptckpt.errors.UnsafePathError as err:
        pytest.fail(f"the save committed a checkpoint no load accepts: {err}")


def test_a_store_lock_that_is_a_link_creates_nothing_outside_the_run(tmp_path):
    """Now: the store's ``LOCK`` is opened with ``O_CREAT`` following links, so a
    ``<run>/aptckpt-store/LOCK`` planted as a link to a missing path makes every
    ``delta`` save create that file outside the run (run as root: any path, e.g.
    ``/etc/nologin``). The run's own lock is opened with ``O_NOFOLLOW`` for exactly
    this reason. Promised (§6): nothing a manager writes goes through a link."""
    run = tmp_path / "run"
    with CheckpointManager(run, backend="delta") as mgr:
        mgr.save(1, state(1))
    outside = tmp_path / "outside" / "created-by-aptckpt"
    outside.parent.mkdir()
    lock = run / "aptckpt-store" / "LOCK"
    lock.unlink()
    lock.symlink_to(outside)
    with (
        contextlib.suppress(aptckpt.errors.UnsafePathError),
        CheckpointManager(run, backend="delta") as mgr,
    ):
        mgr.save(2, state(2))
    assert not outside.exists(), "a save created a file outside the run through the store's LOCK"


# ------------------------------------------------------------------ aptckpt verify on a live run


def test_verify_of_a_live_run_never_calls_a_new_checkpoint_damaged(tmp_path, monkeypatch, capsys):
    """Now: ``aptckpt verify RUN`` lists the checkpoints, then walks the run again for
    directories with data files but no manifest; a checkpoint the trainer commits in
    between is not in the first list and is reported ``DAMAGED`` ("its manifest was
    deleted ... restore the checkpoint from a copy"), exit 1. Promised (§3): damage is
    never claimed for what is not damage."""
    from aptckpt.cli import _verify, main

    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepAll())
    mgr.save(1, state(1))
    real = _verify.find_checkpoints

    def find_then_train(root, *args, **kwargs):
        found = real(root, *args, **kwargs)
        mgr.save(2, state(2))  # the trainer commits meanwhile
        return found

    monkeypatch.setattr(_verify, "find_checkpoints", find_then_train)
    code = main(["verify", str(run)])
    out = capsys.readouterr().out
    assert "DAMAGED" not in out, out
    assert code == 0, out


def test_verify_of_a_live_run_does_not_fail_for_a_checkpoint_retention_deleted(
    tmp_path, monkeypatch, capsys
):
    """Now: a checkpoint the trainer's retention deletes after ``aptckpt verify RUN``
    listed it is reported ``FAILED`` ("the path does not exist") and verify exits 1: a
    monitoring job alarms on every healthy run that prunes while it is verified.
    Promised (§6): any number of readers beside the writer; a checkpoint deleted while
    it is read is "deleted", not a failure of the run."""
    from aptckpt.cli import _verify, main

    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=KeepAll())
    mgr.save(1, state(1))
    mgr.save(2, state(2))
    real = _verify.find_checkpoints

    def find_then_prune(root, *args, **kwargs):
        found = real(root, *args, **kwargs)
        aptckpt.delete(run / "checkpoints" / "apt_model_epoch0_step1")  # retention, meanwhile
        return found

    monkeypatch.setattr(_verify, "find_checkpoints", find_then_prune)
    code = main(["verify", str(run)])
    out = capsys.readouterr().out
    assert "FAILED" not in out and "DAMAGED" not in out, out
    assert code == 0, out
