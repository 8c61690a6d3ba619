"""How a path picks its storage (``aptckpt.storage.resolve``): URLs go to fsspec and
never become local directories (``s3://bucket/x`` is a valid relative path: it used to
create a directory named ``s3:``); ``file://`` URLs and paths with colons stay local;
schemes nobody knows, and storage options for local paths, are refused up front."""

from __future__ import annotations

import os

import pytest
import torch

import aptckpt
from aptckpt.storage import LOCAL, is_url, resolve


@pytest.mark.parametrize("path", ["runs/a", "/abs/s3:/x", "C://x", "a:b", "./s3://x", "s3:/x"])
def test_local_paths_with_colons_stay_local(path):
    assert not is_url(path)
    storage, where = resolve(path)
    assert storage is LOCAL and where == os.path.abspath(path)


def test_file_urls_are_local_paths():
    assert resolve("file:///tmp/x") == (LOCAL, "/tmp/x")
    assert resolve("FILE:///tmp/x")[1] == "/tmp/x"
    with pytest.raises(aptckpt.UnsupportedPathError, match="names a host"):
        resolve("file://host/tmp/x")


def test_storage_options_for_a_local_path_are_refused(tmp_path):
    with pytest.raises(aptckpt.UnsupportedPathError, match="storage_options"):
        aptckpt.save({"w": torch.ones(1)}, tmp_path / "c", storage_options={"key": "k"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["nosuchscheme://bucket/x", "NOSUCH://b/c"])
def test_an_unknown_scheme_is_refused_and_creates_nothing(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    calls = [
        lambda: aptckpt.save({"w": torch.ones(2)}, url),
        lambda: aptckpt.save({"w": torch.ones(2)}, url, blocking=False),
        lambda: aptckpt.load(url),
        lambda: aptckpt.inspect(url),
        lambda: aptckpt.verify(url),
        lambda: aptckpt.delete(url),
        lambda: aptckpt.convert(url, tmp_path / "out"),
        lambda: aptckpt.CheckpointManager(url),
        lambda: aptckpt.CheckpointManager(url, read_only=True),
    ]
    for call in calls:
        with pytest.raises(aptckpt.UnsupportedPathError, match="nosuch") as info:
            call()
        assert isinstance(info.value, ValueError)
    assert list(tmp_path.iterdir()) == []


def test_a_url_save_creates_nothing_locally(tmp_path, monkeypatch, memory_url):
    monkeypatch.chdir(tmp_path)
    info = aptckpt.save({"w": torch.ones(2)}, memory_url + "/c")
    assert info.path == memory_url + "/c"
    assert list(tmp_path.iterdir()) == []
    assert aptckpt.load(memory_url + "/c")["w"].tolist() == [1.0, 1.0]
