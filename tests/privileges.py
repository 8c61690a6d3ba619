"""What a user without permissions sees: snippets run as ``nobody`` (uid 65534).

The suite runs as root, who may read anything; a subprocess imports aptckpt as root
(the interpreter may live where nobody can reach), then drops to ``nobody`` before
running the snippet. Its directories must be reachable by ``nobody``: pytest's
``tmp_path`` is not (``/tmp/pytest-of-root`` is private), :func:`reachable_tmp` is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="dropping privileges to nobody needs root",
)

_DROP = (
    "import os, sys, torch, aptckpt\n"
    f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
    "assert os.geteuid() != 0\n"
)


def run_as_nobody(
    code: str, *args: object, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (``sys.argv[1:]`` are ``args``) as nobody; stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, "-c", _DROP + textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def reachable_tmp() -> Iterator[Path]:
    """A temporary directory that ``nobody`` may enter and read (not write)."""
    path = Path(tempfile.mkdtemp(prefix="aptckpt-perm-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        for directory, subdirs, _ in os.walk(path):
            for name in subdirs:  # make everything removable again
                os.chmod(os.path.join(directory, name), 0o755)
        shutil.rmtree(path)
