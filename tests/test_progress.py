"""Progress reported by the library (verify, convert, collect_garbage) as work done, and
the bars the command line draws with it: only on terminals, never in --json output."""

from __future__ import annotations

import io
import json
import sys
import threading

import pytest
import torch
from tqdm import tqdm

import aptckpt
from aptckpt import _progress
from aptckpt.cli import main


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    return {
        "big": torch.randn(300, 1000),  # several chunks
        "small": torch.arange(10),
        "ints": torch.randint(0, 5, (5000,)),  # compresses: stored as a codec chunk
        "step": 3,
    }


def _collect() -> tuple[list[tuple[int, int]], _progress.ProgressCallback]:
    calls: list[tuple[int, int]] = []
    lock = threading.Lock()

    def progress(advance: int, total: int) -> None:
        with lock:
            calls.append((advance, total))

    return calls, progress


@pytest.mark.parametrize("backend", ["zstd", "torch", "delta"])
def test_verify_reports_every_stored_byte_once(tmp_path, backend):
    options = {"store": str(tmp_path / "store"), "local_below": 0} if backend == "delta" else {}
    path = tmp_path / "ckpt"
    aptckpt.save(_state(), path, backend=backend, **options)
    calls, progress = _collect()
    aptckpt.verify(path, progress=progress)
    stored = aptckpt.inspect(path).stored_bytes
    assert {total for _, total in calls} == {stored}
    assert sum(advance for advance, _ in calls) == stored
    assert all(advance >= 0 for advance, _ in calls) and len(calls) >= 2


def test_verify_without_progress_reads_through_the_plain_reader(tmp_path, monkeypatch):
    aptckpt.save(_state(), tmp_path / "ckpt")
    monkeypatch.setattr(_progress, "counting", None)  # any use would fail
    assert aptckpt.verify(tmp_path / "ckpt").tensors == 3


def test_a_large_checkpoint_reports_in_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(_progress, "_GROUP_BYTES", 64 << 10)
    w = torch.randn(1 << 18)  # 1 MiB, in 16 raw chunks
    aptckpt.save({"w": w}, tmp_path / "ckpt", codec="none", chunk_size=64 << 10)
    calls, progress = _collect()
    aptckpt.verify(tmp_path / "ckpt", progress=progress)
    advances = [a for a, _ in calls if a]
    assert len(advances) >= 8 and sum(advances) == aptckpt.inspect(tmp_path / "ckpt").stored_bytes


def test_convert_reports_the_source_bytes(tmp_path):
    aptckpt.save(_state(), tmp_path / "src", backend="torch")
    calls, progress = _collect()
    aptckpt.convert(tmp_path / "src", tmp_path / "dst", backend="zstd", progress=progress)
    stored = aptckpt.inspect(tmp_path / "src").stored_bytes
    assert sum(a for a, _ in calls) == stored and calls[-1][1] == stored
    assert aptckpt.verify(tmp_path / "dst").tensors == 3


def test_collect_garbage_reports_checkpoints_and_objects(tmp_path):
    run = tmp_path / "run"
    aptckpt.save({"a": torch.randn(2000)}, run / "c1", backend="delta", local_below=0)
    aptckpt.save({"a": torch.randn(2000)}, run / "c2", backend="delta", local_below=0)
    aptckpt.delete(run / "c1")
    calls, progress = _collect()
    report = aptckpt.collect_garbage(run, progress=progress)
    total = calls[-1][1]
    files = report.kept_objects + report.removed_objects + report.kept_packs + report.removed_packs
    assert total == report.checkpoints + files
    assert sum(a for a, _ in calls) == total and report.removed_packs >= 1


def test_damage_stops_the_count_short_and_is_still_reported(tmp_path):
    path = tmp_path / "ckpt"
    aptckpt.save(_state(), path, backend="torch")
    data = path / "state.pt"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    calls, progress = _collect()
    with pytest.raises(aptckpt.errors.IntegrityError):
        aptckpt.verify(path, progress=progress)
    assert sum(a for a, _ in calls) <= aptckpt.inspect(path).stored_bytes


# ---------------------------------------------------------------- bars


def test_bars_only_on_terminals(monkeypatch):
    stream = io.StringIO()
    with _progress.bar(100, "x", stream=stream) as bar:
        assert bar.disable
        bar.update(50)
    assert stream.getvalue() == ""
    tty = FakeTTY()
    with _progress.bar(None, "x", stream=tty) as bar:
        assert not bar.disable
        _progress.reporter(bar)(100, 200)  # the total is announced with the work
        assert (bar.n, bar.total) == (100, 200)
    assert "x:" in tty.getvalue() and "/200" in tty.getvalue()
    with _progress.bar(100, "x", stream=io.StringIO(), enabled=True) as bar:
        assert not bar.disable  # forced


def test_cli_verify_output_stays_clean_off_a_terminal(tmp_path, capsys):
    aptckpt.save(_state(), tmp_path / "a")
    aptckpt.save(_state(), tmp_path / "b", backend="torch")
    assert main(["verify", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "\r" not in out and out.splitlines()[-1].endswith("2 OK, 0 failed")


def test_cli_json_output_has_no_bar_even_on_a_terminal(tmp_path, capsys, monkeypatch):
    aptckpt.save(_state(), tmp_path / "a")
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["verify", "--json", str(tmp_path)]) == 0
    assert tty.getvalue() == ""
    assert json.loads(capsys.readouterr().out)[0]["ok"] is True


def test_cli_verify_bar_counts_bytes_on_a_terminal(tmp_path, capsys, monkeypatch):
    aptckpt.save(_state(), tmp_path / "a")
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(_progress, "_GROUP_BYTES", 1)  # a draw per chunk
    seen: list[int] = []
    real = _progress.bar

    def spying(*args, **kwargs):
        made = real(*args, **kwargs)
        update = made.update
        made.update = lambda n=1: (seen.append(n), update(n))[1]
        return made

    monkeypatch.setattr(_progress, "bar", spying)
    assert main(["verify", str(tmp_path / "a")]) == 0
    assert sum(seen) == aptckpt.inspect(tmp_path / "a").stored_bytes
    assert "verify:" in tty.getvalue()


def test_cli_gc_json_stays_clean(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    aptckpt.save({"a": torch.randn(2000)}, run / "c1", backend="delta", local_below=0)
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["gc", "--json", str(run)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert tty.getvalue() == "" and doc["kept_objects"] + doc["kept_packs"] >= 1
    assert main(["gc", str(run)]) == 0
    assert "gc:" in tty.getvalue()


@pytest.mark.parametrize("backend", ["zstd", "torch", "delta"])
def test_verify_on_object_storage_reports_every_stored_byte(memory_url, backend):
    url = f"{memory_url}/ckpt"
    options = {"store": f"{memory_url}/store", "local_below": 0} if backend == "delta" else {}
    aptckpt.save(_state(), url, backend=backend, **options)
    calls, progress = _collect()
    aptckpt.verify(url, progress=progress)
    stored = aptckpt.inspect(url).stored_bytes
    assert sum(a for a, _ in calls) == stored and {t for _, t in calls} == {stored}


def test_cli_verify_of_a_remote_run_counts_its_bytes(memory_url, capsys, monkeypatch):
    aptckpt.save(_state(), f"{memory_url}/a")
    aptckpt.save(_state(), f"{memory_url}/b", backend="torch")
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["verify", memory_url]) == 0
    total = sum(aptckpt.inspect(f"{memory_url}/{n}").stored_bytes for n in "ab")
    shown = tqdm.format_sizeof(total, divisor=1000)
    assert "100%" in tty.getvalue() and f"{shown}/{shown}" in tty.getvalue()  # all bytes
    assert capsys.readouterr().out.splitlines()[-1] == "2 checkpoint(s): 2 OK, 0 failed"
