"""Shared test configuration: hypothesis profiles and the active implementation.

Profiles (``HYPOTHESIS_PROFILE``): ``default`` keeps the default run lean for CI
on 2 cores; ``thorough`` is for the slow torture run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import aptckpt

settings.register_profile(
    "default",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def direct_io_supported(directory: Path) -> bool:
    """Whether the file system holding ``directory`` accepts ``O_DIRECT`` at open (a probe
    file is created and removed)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / f".direct-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    os.close(fd)
    return True


def terminal_line(config: pytest.Config, text: str) -> None:
    """Write a line to the terminal past output capturing (torture tests report counts)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_line(text)


def pytest_report_header(config: pytest.Config) -> str:
    return f"aptckpt {aptckpt.__version__}, core: {aptckpt.IMPLEMENTATION}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``core_independent`` (trainer integrations, plots, policies: code
    above the API whose reads and hashes other tests cover in both runs) run once, in
    the native run; ``APTCKPT_TEST_ALL=1`` runs them in the pure-Python run too."""
    if os.environ.get("APTCKPT_NATIVE") != "disable" or os.environ.get("APTCKPT_TEST_ALL"):
        return
    skip = pytest.mark.skip(
        reason="core-independent: runs in the native run (APTCKPT_TEST_ALL=1: here too)"
    )
    for item in items:
        if item.get_closest_marker("core_independent"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _unmeasured_disks() -> None:
    """Each test starts with no disk speed measured, so whether a save writes through the page
    cache (``storage/local/_cachepolicy.py``) does not depend on the tests run before it."""
    from aptckpt.storage.local import _cachepolicy

    _cachepolicy.forget()


# ------------------------------------------------------------------ object stores
#
# A real S3 API server on loopback (moto's, threaded, in this process) for the whole
# session; a fresh bucket per test. Credentials are fake and go through
# storage_options only: the environment is left alone.

#: Parts this small are accepted by the test server (S3 itself takes 5 MiB and up), so
#: multipart boundaries are exercised with kilobytes.
S3_MIN_PART = 256
#: A fake secret: tests check it never appears in a message, a manifest or a repr.
S3_SECRET = "fake-secret-never-shown-0123456789"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server on 127.0.0.1 (skips without moto[server] and s3fs).

    Only in the native run of the suite: the S3 tests check the object-store protocol,
    which does not depend on the core; the pure-Python run's time budget goes to what
    does, and it still runs every object-store test on ``memory://`` (same storage code,
    the core's twin hashing every chunk)."""
    if os.environ.get("APTCKPT_NATIVE") == "disable" and not os.environ.get("APTCKPT_TEST_S3"):
        pytest.skip("S3 server tests run with the native core (APTCKPT_TEST_S3=1: here too)")
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import logging

    import moto.s3.models as s3_models

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
    saved = s3_models.S3_UPLOAD_PART_MIN_SIZE
    s3_models.S3_UPLOAD_PART_MIN_SIZE = S3_MIN_PART
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        s3_models.S3_UPLOAD_PART_MIN_SIZE = saved


@pytest.fixture
def s3_options(s3_endpoint: str) -> dict[str, Any]:
    """storage_options reaching the test server with fake credentials."""
    return {
        "key": "fake-key-id",
        "secret": S3_SECRET,
        "endpoint_url": s3_endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }


@pytest.fixture(scope="session")
def s3_admin(s3_endpoint: str) -> Any:
    """An s3fs file system of the tests' own, for making and removing buckets."""
    import s3fs

    options = {
        "key": "fake-key-id",
        "secret": S3_SECRET,
        "endpoint_url": s3_endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }
    return s3fs.S3FileSystem(**options, skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture
def s3_url(s3_admin: Any, s3_options: dict[str, Any]) -> Iterator[str]:
    """``s3://<a fresh bucket>/test``; the bucket is emptied and removed afterwards."""
    import uuid

    bucket = f"aptckpt-{uuid.uuid4().hex[:16]}"
    fs = s3_admin
    fs.call_s3("create_bucket", Bucket=bucket)
    yield f"s3://{bucket}/test"
    with contextlib.suppress(Exception):
        fs.rm(bucket, recursive=True)


@pytest.fixture
def memory_url() -> Iterator[str]:
    """``memory://<a fresh prefix>``, removed afterwards."""
    import uuid

    fsspec = pytest.importorskip("fsspec")
    prefix = f"aptckpt-test-{uuid.uuid4().hex[:16]}"
    yield f"memory://{prefix}"
    with contextlib.suppress(FileNotFoundError):
        fsspec.filesystem("memory").rm(f"/{prefix}", recursive=True)
