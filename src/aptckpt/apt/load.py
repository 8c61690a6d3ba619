"""Load a trained APT model from a checkpoint, for inference, on any machine.

Every checkpoint the reference loop writes embeds the model config and the
tokenizer files, so a single checkpoint directory -- regular, best, temporary,
or one converted to a standalone ``zstd``/``torch`` checkpoint with
:func:`aptckpt.convert` -- is enough: no run directory, no corpus, no code
beyond this package. The optimizer state in the checkpoint is ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from aptckpt.api import load
from aptckpt.apt.model import APTConfig, APTModel
from aptckpt.apt.tokenizer import CharTokenizer
from aptckpt.errors import CheckpointNotFoundError, FormatError
from aptckpt.manifest import MANIFEST_NAME

__all__ = ["load_model"]


def load_model(
    path: str | os.PathLike[str],
) -> tuple[APTModel, CharTokenizer, APTConfig]:
    """The model (on CPU, in eval mode), tokenizer and config saved at ``path``.

    Args:
        path: a checkpoint directory; or a run directory, whose best
            checkpoint is used (its newest one if none is ranked best).

    Raises:
        CheckpointNotFoundError: nothing loadable at ``path``.
        FormatError: the checkpoint was not written by the reference loop
            (no model config or tokenizer in it).
    """
    checkpoint = _resolve(Path(path))
    state = load(checkpoint, map_location="cpu")
    where = os.fspath(checkpoint)
    if not isinstance(state, dict):
        raise FormatError("not a training checkpoint (its state is not a dict)", path=where)
    config = _model_config(state.get("config"), where)
    files = state.get("tokenizer")
    if not isinstance(files, dict) or not all(isinstance(v, bytes) for v in files.values()):
        raise FormatError("the checkpoint holds no tokenizer files", path=where)
    tokenizer = CharTokenizer.from_files(files)
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise FormatError("the checkpoint holds no model state dict", path=where)
    # Building the model draws its (discarded) initial weights from torch's
    # global RNG; fork it so loading leaves the caller's random state alone.
    with torch.random.fork_rng(devices=[]):
        model = APTModel(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise FormatError(f"model weights do not fit the saved config: {err}", path=where) from err
    model.eval()
    return model, tokenizer, config


def _resolve(path: Path) -> Path:
    if (path / MANIFEST_NAME).is_file():
        return path
    if (path / "checkpoints").is_dir() or (path / "metadata.json").is_file():
        from aptckpt.manager import CheckpointManager  # only needed for run directories

        manager = CheckpointManager(path, read_only=True)
        record = manager.best() or manager.latest()
        if record is None:
            raise CheckpointNotFoundError(path, "the run directory holds no checkpoint")
        return Path(record.path)  # a local run: its records are paths
    raise CheckpointNotFoundError(
        path, f"neither a checkpoint (no {MANIFEST_NAME}) nor a run directory"
    )


def _model_config(config: Any, where: str) -> APTConfig:
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise FormatError("the checkpoint holds no model config ('config.model')", path=where)
    try:
        return APTConfig.from_dict(config["model"])
    except (TypeError, ValueError) as err:
        raise FormatError(f"invalid model config: {err}", path=where) from err
