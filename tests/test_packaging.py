"""Packaging: type checkers see aptckpt's signatures (py.typed is shipped); a build without a
compiler falls back to the pure-Python wheel (scripts/check_dist.sh tests the built wheels)."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import aptckpt

SRC = Path(aptckpt.__file__).parents[1]

# type checking and wheels do not depend on the core
pytestmark = pytest.mark.core_independent


def test_users_type_checker_sees_typed_signatures(tmp_path):
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(
        "import aptckpt\n\naptckpt.save({'w': 1}, 42)\nreveal_type(aptckpt.inspect)\n"
        "reveal_type(aptckpt.load('c', into={}))\n"
    )
    # torch is skipped: analysing it takes minutes, and only aptckpt's own types matter here.
    # strict, as a careful user runs it: nothing of aptckpt's own may surface as an error.
    (tmp_path / "mypy.ini").write_text(
        "[mypy]\nstrict = True\n[mypy-torch.*,numpy.*]\nfollow_imports = skip\n"
        "[mypy-aptckpt.*]\nfollow_imports = silent\n"
    )
    # PEP 561: a package found on the path counts as typed only with a py.typed marker;
    # without one mypy says "missing library stubs or py.typed marker" and sees Any.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file=mypy.ini", "--cache-dir=.cache", "user.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert "py.typed" not in out, out
    assert 'user.py:3: error: No overload variant of "save" matches' in out, out
    assert (
        'Revealed type is "def (path: str | os.PathLike[str], *, storage_options: '
        'typing.Mapping[str, Any] | None =) -> aptckpt.api.CheckpointInfo"' in out
    ), out
    assert 'Revealed type is "aptckpt.api.IntoResult"' in out, out
    assert "Found 1 error in 1 file" in out, out  # the deliberate one


def test_py_typed_is_in_the_package_and_the_installed_distribution():
    assert importlib.resources.files("aptckpt").joinpath("py.typed").is_file()
    try:
        files = importlib.metadata.files("aptckpt")
    except importlib.metadata.PackageNotFoundError:
        return  # the tests run from a source tree that was never installed
    assert files is not None
    assert "aptckpt/py.typed" in {str(f) for f in files}, "the installed wheel lacks py.typed"


@pytest.mark.slow
def test_wheel_ships_py_typed(tmp_path):
    root = Path(__file__).parents[1]
    pip = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps"]
    subprocess.run(
        [*pip, "-w", tmp_path, root],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    (wheel,) = tmp_path.glob("aptckpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "aptckpt/py.typed" in names and "aptckpt/_foreign.py" in names


# ---------------------------------------------------------------- the pure-Python fallback


def _build_wheel(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[Path]]:
    """``pip wheel`` of this checkout with the build tools of the test environment, in a
    build folder of its own (a failed configure must not poison build/'s CMake cache)."""
    pytest.importorskip("scikit_build_core")
    root = Path(__file__).parents[1]
    out = tmp_path / "wheels"
    clean = {
        k: v for k, v in os.environ.items() if k not in ("APTCKPT_PURE", "APTCKPT_REQUIRE_NATIVE")
    }
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps"),
            *("--no-cache-dir", "-w", str(out), "-C", f"build-dir={tmp_path / 'build'}"),
            str(root),
        ],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return proc, sorted(out.glob("*.whl"))


def test_a_build_without_a_compiler_falls_back_to_the_pure_wheel(tmp_path):
    proc, wheels = _build_wheel(tmp_path, CC="/bin/false", CXX="/bin/false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "retrying due to override" in proc.stdout + proc.stderr
    (wheel,) = wheels
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if ".so" in n], names  # not even the checkout's own core
    assert "aptckpt/_pyimpl.py" in names and "aptckpt/py.typed" in names


@pytest.mark.slow  # about 10 s; the fallback above stays in the default run
def test_require_native_turns_the_fallback_into_an_error(tmp_path):
    proc, wheels = _build_wheel(
        tmp_path, CC="/bin/false", CXX="/bin/false", APTCKPT_REQUIRE_NATIVE="1"
    )
    assert proc.returncode != 0 and wheels == []
    assert "retrying due to override" not in proc.stdout + proc.stderr
