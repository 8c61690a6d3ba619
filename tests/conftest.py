"""Shared test configuration: hypothesis profiles and the active implementation.

Profiles (``HYPOTHESIS_PROFILE``): ``default`` keeps the default run lean for CI
on 2 cores; ``thorough`` is for the slow torture run.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

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
