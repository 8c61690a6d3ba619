"""URLs are refused by every entry point with a clear error, and nothing is created locally
(``s3://bucket/x`` is a valid relative path: it used to create a directory named ``s3:``)."""

from __future__ import annotations

import pytest
import torch

import aptckpt
from aptckpt._paths import local_path

URLS = ["s3://bucket/runs/a", "file:///tmp/x", "gs://b/c", "az://c/d", "memory://x", "S3://B/x"]


@pytest.mark.parametrize("url", URLS)
def test_every_entry_point_refuses_a_url_and_creates_nothing(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "local")
    calls = [
        lambda: aptckpt.save({"w": torch.ones(2)}, url),
        lambda: aptckpt.save({"w": torch.ones(2)}, url, blocking=False),
        lambda: aptckpt.load(url),
        lambda: aptckpt.inspect(url),
        lambda: aptckpt.verify(url),
        lambda: aptckpt.delete(url),
        lambda: aptckpt.convert(url, tmp_path / "out"),
        lambda: aptckpt.convert(tmp_path / "local", url),
    ]
    for call in calls:
        with pytest.raises(aptckpt.UnsupportedPathError, match="URL") as info:
            call()
        assert isinstance(info.value, ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]


def test_file_urls_name_the_local_path_to_use():
    with pytest.raises(aptckpt.UnsupportedPathError, match="'/tmp/x'"):
        local_path("file:///tmp/x")


@pytest.mark.parametrize("path", ["runs/a", "/abs/s3:/x", "C://x", "a:b", "./s3://x", "s3:/x"])
def test_local_paths_with_colons_are_accepted(path):
    assert local_path(path) == path


@pytest.mark.parametrize("read_only", [False, True])
def test_a_manager_refuses_a_url_run_directory(tmp_path, monkeypatch, read_only):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(aptckpt.UnsupportedPathError, match="run directories"):
        aptckpt.CheckpointManager("s3://bucket/runs/a", read_only=read_only)
    assert list(tmp_path.iterdir()) == []
