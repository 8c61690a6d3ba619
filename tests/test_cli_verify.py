"""``aptckpt verify``: a directory it cannot read is a failure, never a silent OK."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt.cli import main
from privileges import needs_root, reachable_tmp, run_as_nobody


def run(capsys: Any, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_verify_of_a_run_fails_on_a_directory_it_cannot_list(capsys, tmp_path, monkeypatch):
    aptckpt.save({"w": torch.ones(3)}, tmp_path / "a")
    aptckpt.save({"w": torch.ones(3)}, tmp_path / "private" / "b")
    real = os.scandir

    def scandir(path: Any) -> Any:
        if os.fspath(path) == str(tmp_path / "private"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, out, _ = run(capsys, "verify", tmp_path)
    assert code == 1
    assert "OK       a" in out
    assert "FAILED   private" in out and "not verified" in out
    assert "1 failed" in out


_VERIFY_AS_NOBODY = """
from aptckpt.cli import main
print("exit", main(["verify", sys.argv[1]]))
"""


@pytest.mark.core_independent
@needs_root
def test_verify_as_a_user_who_cannot_read_part_of_the_run_exits_1():
    with reachable_tmp() as run_dir:
        aptckpt.save({"w": torch.ones(3)}, run_dir / "a")
        aptckpt.save({"w": torch.ones(3)}, run_dir / "private" / "b", backend="delta")
        aptckpt.save({"w": torch.ones(3)}, run_dir / "listable" / "c")
        (run_dir / "private").chmod(0o700)
        (run_dir / "listable" / "c").chmod(0o744)  # listable, not searchable
        proc = run_as_nobody(_VERIFY_AS_NOBODY, run_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("exit 1"), proc.stdout
    assert "FAILED   private" in proc.stdout, proc.stdout
    assert proc.stdout.count("FAILED   listable/c") == 1, proc.stdout
    assert "3 checkpoint(s): 1 OK, 2 failed" in proc.stdout, proc.stdout


def test_verify_of_one_checkpoint_does_not_walk_it(capsys, tmp_path):
    aptckpt.save({"w": torch.ones(3)}, tmp_path / "a")
    code, out, _ = run(capsys, "verify", tmp_path / "a")
    assert code == 0 and out.startswith("OK")
