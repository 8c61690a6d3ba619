"""CheckpointManager on object storage (memory:// and s3:// against the moto server):
index, retention, best, temporaries, resume bit for bit, URL strings, the run lease,
portability between a local run directory and a bucket, the CLI on URLs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import aptckpt
from aptckpt import CheckpointManager
from aptckpt.cli import main as cli
from aptckpt.retention import KeepBest, KeepLast, SaveEvery
from aptckpt.testing import assert_state_equal
from test_manager import Tokenizer, Trainer

pytest.importorskip("s3fs")


@pytest.fixture(params=["memory", "s3"])
def remote(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any] | None]:
    """(run URL, storage_options) on each kind of object store."""
    if request.param == "memory":
        return request.getfixturevalue("memory_url") + "/run", None
    url = request.getfixturevalue("s3_url")
    return url + "/run", request.getfixturevalue("s3_options")


def _fs(url: str, options: dict[str, Any] | None) -> Any:
    protocol = url.split("://", 1)[0]
    extra = {"skip_instance_cache": True, "use_listings_cache": False} if protocol == "s3" else {}
    return fsspec.filesystem(protocol, **(options or {}), **extra)


def _index(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    with _fs(url, options).open(url + "/metadata.json", "rb") as f:
        doc = json.loads(f.read())
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("backend", ["zstd", "torch", "delta"])
def test_resume_from_object_storage_is_bit_identical(remote, backend):
    url, options = remote
    straight = Trainer()
    for _ in range(8):
        straight.step()

    first = Trainer()
    with CheckpointManager(url, backend=backend, keep=KeepLast(2), storage_options=options) as mgr:
        for step in range(1, 6):
            first.step()
            path = first.save(mgr, 0, step, tokenizer=Tokenizer())
            assert isinstance(path, str) and path.startswith(url + "/checkpoints/")
        latest = mgr.latest()
        assert latest is not None and latest.global_step == 5
        assert isinstance(latest.path, str) and latest.path == path
        assert isinstance(mgr.run_dir, str) and mgr.run_dir == url

    resumed = Trainer(seed=1)  # other weights and RNG streams until restored
    with CheckpointManager(url, backend=backend, keep=KeepLast(2), storage_options=options) as mgr:
        epoch, step, losses, _metrics = mgr.load_checkpoint(
            resumed.model, resumed.optimizer, resumed.scheduler, scaler=resumed.scaler
        )
        assert (epoch, step) == (0, 5) and len(losses) == 5
        resumed.losses = list(losses)
        for _ in range(3):
            resumed.step()
    assert_state_equal(resumed.state(), straight.state())
    doc = _index(url, options)
    assert [e["global_step"] for e in doc["checkpoints"]] == [4, 5]  # keep=KeepLast(2)
    fs = _fs(url, options)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(url + "/checkpoints", detail=False)}
    assert names == {"apt_model_epoch0_step4", "apt_model_epoch0_step5"}  # pruned for real
    assert fs.cat(url + "/tokenizer/vocab.json") == Tokenizer().files()["vocab.json"]


def test_best_temporaries_and_read_only(remote):
    url, options = remote
    with CheckpointManager(
        url,
        keep=KeepLast(1) | KeepBest(1),
        temporary_every=SaveEvery(steps=2),
        storage_options=options,
    ) as mgr:
        for step, loss in ((1, 5.0), (2, 1.0), (3, 3.0)):
            mgr.save(step, {"w": torch.full((3,), float(step))}, metrics={"loss": loss})
        mgr.save(4, {"w": torch.zeros(3)}, temporary=True, batch_index=7)
        best = mgr.best()
        assert best is not None and best.global_step == 2
        assert mgr.latest().kind == "temp"
        assert mgr.resolve("best") == best.path
        assert mgr.resolve("checkpoints/apt_model_epoch0_step3") == url + (
            "/checkpoints/apt_model_epoch0_step3"
        )
    reader = CheckpointManager(url, read_only=True, storage_options=options)
    assert [(r.kind, r.global_step) for r in reader.checkpoints()] == [
        ("epoch", 2),
        ("epoch", 3),
        ("temp", 4),
    ]
    state = reader.restore({}, "latest")
    assert state["batch_index"] == 7 and reader.last_loaded.temporary


def test_a_second_writer_gets_run_busy_and_a_released_run_is_taken(remote):
    url, options = remote
    first = CheckpointManager(url, storage_options=options)
    first.save(1, {"w": torch.ones(2)})
    # Leases are per process; a second process is what they exclude. Within one process,
    # managers share the run (as locally): check the lease object instead.
    fs = _fs(url, options)
    holder = json.loads(fs.cat(url + "/.aptckpt-run.lock"))
    assert holder["owner"]["pid"] == os.getpid()
    first.close()
    assert not fs.exists(url + "/.aptckpt-run.lock")  # released on close
    with CheckpointManager(url, storage_options=options) as again:
        again.save(2, {"w": torch.ones(2)})
        assert again.latest().global_step == 2


def test_credentials_never_reach_the_run(s3_url, s3_options):
    url = s3_url + "/run"
    with CheckpointManager(url, storage_options=s3_options) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    fs = _fs(url, s3_options)
    secret = s3_options["secret"].encode()
    for path in fs.find(url):
        assert secret not in fs.cat(path), path
        assert s3_options["secret"] not in path


def test_a_local_run_copied_to_a_bucket_resumes_there_and_back(tmp_path, s3_url, s3_options):
    local = tmp_path / "run"
    trainer = Trainer()
    with CheckpointManager(local, backend="zstd") as mgr:
        for step in (1, 2):
            trainer.step()
            trainer.save(mgr, 0, step)
    url = s3_url + "/copied"
    fs = _fs(url, s3_options)
    fs.put(str(local) + "/", url + "/", recursive=True)  # any tool that copies files
    remote_mgr = CheckpointManager(url, storage_options=s3_options)
    latest = remote_mgr.latest()
    assert latest is not None and latest.global_step == 2 and latest.path.startswith("s3://")
    state = remote_mgr.restore({}, "latest")
    assert_state_equal(state["model"], trainer.model.state_dict())
    remote_mgr.save(3, {"w": torch.ones(1)})  # it goes on writing there
    remote_mgr.close()

    back = tmp_path / "back"
    fs.get(url + "/", str(back) + "/", recursive=True)
    with CheckpointManager(back) as mgr:
        assert [r.global_step for r in mgr.checkpoints()][-1] == 3
        assert isinstance(mgr.latest().path, Path)
        assert aptckpt.verify(mgr.latest().path).tensors >= 1


def test_cli_lists_verifies_and_inspects_urls(s3_url, s3_options, capsys):
    url = s3_url + "/run"
    with CheckpointManager(url, storage_options=s3_options) as mgr:
        mgr.save(1, {"w": torch.ones(2)}, metrics={"loss": 1.0})
        path = mgr.save(2, {"w": torch.ones(2)}, metrics={"loss": 0.5})
    opts = [
        "--storage-option",
        f"endpoint_url={s3_options['endpoint_url']}",
        "--storage-option",
        "key=fake-key-id",
        "--storage-option",
        f"secret={s3_options['secret']}",
        "--storage-option",
        "client_kwargs.region_name=us-east-1",
    ]
    assert cli(["ls", url, "--json", *opts]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [r["step"] for r in listed] == [1, 2]
    assert cli(["verify", url, *opts]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoint(s): 2 OK" in out
    assert cli(["inspect", path, "--json", *opts]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == path
    assert cli(["inspect", url + "/nope", *opts]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and s3_options["secret"] not in err


def test_another_process_gets_run_busy_naming_the_holder(s3_url, s3_options):
    """The lease excludes a second process while the first holds the run, and a released
    run is taken at once."""
    import subprocess
    import sys

    url = s3_url + "/run"
    code = (
        "import json, sys, aptckpt\n"
        "try:\n"
        "    aptckpt.CheckpointManager(sys.argv[1], storage_options=json.loads(sys.argv[2]))\n"
        "except aptckpt.RunBusyError as err:\n"
        "    print('BUSY', err); sys.exit(3)\n"
        "print('TOOK')\n"
    )
    args = [sys.executable, "-c", code, url, json.dumps(s3_options)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with CheckpointManager(url, storage_options=s3_options):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert f"process {os.getpid()}" in proc.stdout
        assert s3_options["secret"] not in proc.stdout + proc.stderr
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "TOOK" in proc.stdout, proc.stderr[-2000:]
