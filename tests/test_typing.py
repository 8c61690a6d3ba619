"""The typed API is visible to type checkers: ``py.typed`` ships in the package and its
wheel (PEP 561), and ``mypy --strict`` on a user's file catches a wrong call to
:func:`aptckpt.save` and knows what :func:`aptckpt.verify` returns."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import aptckpt


def test_py_typed_is_in_the_package():
    assert importlib.resources.files("aptckpt").joinpath("py.typed").is_file()


def test_py_typed_is_in_the_installed_distribution():
    try:
        files = importlib.metadata.files("aptckpt")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("aptckpt is not installed (tests run from the source tree)")
    assert files is not None
    assert "aptckpt/py.typed" in {str(f) for f in files}, "the wheel lacks py.typed"


def test_mypy_strict_sees_the_public_api(tmp_path):
    pytest.importorskip("mypy")
    user = tmp_path / "user.py"
    user.write_text(
        textwrap.dedent(
            """\
            import aptckpt

            report = aptckpt.verify("runs/a/step-500")
            reveal_type(report)
            info = aptckpt.save({"w": 1}, "runs/a/step-600")
            reveal_type(info.stored_bytes)
            aptckpt.save({"w": 1}, "runs/a/step-700", blocking="yes")
            """
        )
    )
    config = tmp_path / "mypy.ini"
    # torch's own annotations are checked by its project; skipping them keeps this fast
    config.write_text(
        "[mypy]\nstrict = True\n"
        "[mypy-torch.*,numpy.*]\nfollow_imports = skip\n"
        "[mypy-aptckpt.*]\nfollow_imports = silent\n"  # its own checks run on src/
    )
    package_root = Path(aptckpt.__file__).parent.parent  # this tree's aptckpt, not another
    env = {**os.environ, "MYPYPATH": str(package_root)}
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental", "user.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert 'user.py:4: note: Revealed type is "aptckpt.api.VerifyReport"' in out
    assert 'user.py:6: note: Revealed type is "int"' in out
    assert 'user.py:7: error: No overload variant of "save" matches' in out
    assert "Found 1 error in 1 file" in out  # the deliberate one, nothing from aptckpt
