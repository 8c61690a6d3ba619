"""``aptckpt plot``: a picture of a run, local or on object storage; the runs it must not
choke on (empty, one checkpoint, no history); matplotlib as an optional extra."""

from __future__ import annotations

import struct
import sys

import pytest
import torch

import aptckpt
from aptckpt.cli import main

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.core_independent


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _run(path, *, backends=("zstd",), history=True, steps=12, every=4, **kwargs):
    for i, backend in enumerate(backends):
        options = {"local_below": 0} if backend == "delta" else {}
        with aptckpt.CheckpointManager(
            path, backend=backend, keep=aptckpt.KeepAll(), backend_options=options, **kwargs
        ) as mgr:
            for step in range(i * steps + 1, (i + 1) * steps + 1):
                if history:
                    mgr.log_metrics(step, loss=3.0 / step, val_loss=3.5 / step)
                if step % every == 0:
                    mgr.save(
                        step,
                        {"w": torch.randn(2000)},
                        metrics={"loss": 3.0 / step},
                        temporary=step % (2 * every) != 0,
                        batch_index=step if step % (2 * every) != 0 else None,
                        blocking=step % 3 != 0,
                    )


def test_plot_a_run_with_several_backends(tmp_path, capsys):
    run = tmp_path / "run"
    _run(run, backends=("zstd", "delta", "torch"))
    out = tmp_path / "run.png"
    assert main(["plot", str(run), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "36 step(s) of loss, val_loss, 9 save(s) timed" in printed
    width, height = _png_size(out)
    assert width > 800 and height > 600 and out.stat().st_size < 200_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.png")]  # no temp left


def test_svg_has_the_parts_of_the_picture(tmp_path):
    run = tmp_path / "run"
    _run(run, backends=("zstd", "delta"), steps=14)  # ends on a temporary checkpoint
    out = tmp_path / "run.svg"
    assert main(["plot", str(run), "-o", str(out), "--metric", "val_loss", "--log-y"]) == 0
    svg = out.read_text()
    parts = ("val_loss", "best", "temporary checkpoint", "saved, since deleted", "since deleted")
    for text in (*parts, "zstd", "delta", "training blocked", "until committed"):
        assert text in svg, text
    assert ">loss<" not in svg  # only the metric asked for


def test_a_run_without_history_plots_its_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    _run(run, history=False)
    import shutil

    shutil.rmtree(run / "history")  # as saved by an aptckpt without it
    out = tmp_path / "run.svg"
    assert main(["plot", str(run), "-o", str(out)]) == 0
    svg = out.read_text()
    assert "checkpoint size (no save history)" in svg and "no save timings recorded" in svg
    assert "0 save(s) timed" in capsys.readouterr().out


def test_one_checkpoint_and_an_empty_run(tmp_path):
    one = tmp_path / "one"
    with aptckpt.CheckpointManager(one) as mgr:
        mgr.save(5, {"w": torch.ones(3)}, metrics={"loss": 1.0})
    assert main(["plot", str(one), "-o", str(tmp_path / "one.png")]) == 0
    empty = tmp_path / "empty"
    aptckpt.CheckpointManager(empty).close()
    assert main(["plot", str(empty), "-o", str(tmp_path / "empty.png")]) == 0
    assert _png_size(tmp_path / "empty.png")[0] > 0


def test_what_is_not_a_run(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    aptckpt.save({"w": torch.ones(3)}, ckpt)
    assert main(["plot", str(ckpt), "-o", str(tmp_path / "a.png")]) == 2
    assert "single checkpoint, not a run" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["plot", str(tmp_path / "plain"), "-o", str(tmp_path / "a.png")]) == 2
    assert "not a run of aptckpt.CheckpointManager" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "a.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "a.gif")]) == 2
    assert "use one of .png, .svg, .pdf" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "no/a.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "a.png"), "--metric", "acc"])
    assert "no metric 'acc' in the run; it has: 'loss', 'val_loss'" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_without_matplotlib_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    _run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "a.png")]) == 2
    assert "pip install 'aptckpt[plot]'" in capsys.readouterr().err


def test_plot_a_run_on_object_storage(memory_url, tmp_path, capsys):
    with aptckpt.CheckpointManager(memory_url) as mgr:
        for step in (1, 2, 3):
            mgr.log_metrics(step, loss=1.0 / step)
        mgr.save(3, {"w": torch.randn(100)}, metrics={"loss": 0.3}, blocking=False)
    out = tmp_path / "remote.svg"
    assert main(["plot", memory_url, "-o", str(out)]) == 0
    assert "1 checkpoint(s), 3 step(s) of loss, 1 save(s) timed" in capsys.readouterr().out
    assert memory_url in out.read_text()  # the title names the run


def test_plot_a_run_on_s3_through_the_storage_options(s3_url, s3_options, tmp_path, capsys):
    with aptckpt.CheckpointManager(s3_url, storage_options=s3_options) as mgr:
        mgr.log_metrics(1, loss=1.0)
        mgr.save(1, {"w": torch.randn(100)}, metrics={"loss": 1.0})
    opts = [
        f"--storage-option=endpoint_url={s3_options['endpoint_url']}",
        "--storage-option=key=fake-key-id",
        f"--storage-option=secret={s3_options['secret']}",
        "--storage-option=client_kwargs.region_name=us-east-1",
    ]
    out = tmp_path / "s3.svg"
    assert main(["plot", s3_url, "-o", str(out), *opts]) == 0
    printed = capsys.readouterr()
    assert "1 checkpoint(s), 1 step(s) of loss, 1 save(s) timed" in printed.out
    assert s3_options["secret"] not in out.read_text() + printed.out + printed.err


def test_the_moving_average_skips_a_diverged_step():
    import math

    from aptckpt.cli._plot import _smooth

    assert _smooth([1.0, 2.0, math.nan, 4.0], 2) == [1.0, 1.5, 2.0, 4.0]
    assert math.isnan(_smooth([math.nan], 3)[0])
    assert _smooth([float(i) for i in range(10)], 3)[-1] == 8.0
