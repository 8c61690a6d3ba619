"""The directories of Hugging Face ``Trainer`` checkpoints written by
:mod:`aptckpt.integrations.transformers`: their names, what makes one complete,
which one a run resumes from, and the export to HF's ``from_pretrained`` layout.

Only ``os`` calls on the ``checkpoint-N`` directories HF itself manages (listing,
existence) and on HF's side files; the checkpoint data goes through the public
aptckpt API.
"""

from __future__ import annotations

import logging
import os
import re

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import aptckpt
from aptckpt.errors import AptckptError, CheckpointNotFoundError, IntegrationError

log = logging.getLogger("aptckpt")

#: The aptckpt checkpoint inside ``checkpoint-N/``.
STATE_DIR = "aptckpt"
#: The training arguments as JSON, in place of HF's pickled ``training_args.bin``.
TRAINING_ARGS_NAME = "training_args.json"
TRAINER_STATE_NAME = "trainer_state.json"
STORE_DIR = "aptckpt-store"

CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# What HF's own loader accepts as a model in a checkpoint directory.
_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def checkpoint_kind(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """What ``checkpoint_dir`` holds: ``"aptckpt"`` (a committed aptckpt checkpoint
    and ``trainer_state.json``), ``"hf"`` (HF's own weights and ``trainer_state.json``),
    or ``None`` (nothing resumable: absent, or a save that was interrupted).

    Raises:
        FormatError: its aptckpt checkpoint is damaged (an unreadable manifest).
    """
    path = os.fspath(checkpoint_dir)
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        return None
    try:
        aptckpt.inspect(os.path.join(path, STATE_DIR))
    except CheckpointNotFoundError:
        pass
    else:
        return "aptckpt"
    if any(os.path.isfile(os.path.join(path, name)) for name in _HF_WEIGHTS):
        return "hf"
    return None


def last_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (what
    ``resume_from_checkpoint=True`` resumes from), or None.

    Like HF's ``get_last_checkpoint``, but a ``checkpoint-N`` a killed save left
    incomplete is skipped (with a warning) for the newest one before it.
    """
    folder = os.fspath(output_dir)
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        match = CHECKPOINT_RE.match(name)
        if match is not None and os.path.isdir(os.path.join(folder, name)):
            steps.append((int(match.group(1)), name))
    for _, name in sorted(steps, reverse=True):
        path = os.path.join(folder, name)
        try:
            kind = checkpoint_kind(path)
        except AptckptError as err:  # damaged, not interrupted: say so, and go on
            log.warning("skipping %s: %s", path, err)
            continue
        if kind is not None:
            return path
        log.warning("skipping %s: incomplete (its save was interrupted)", path)
    return None


def interrupted(path: str) -> bool:
    """A ``checkpoint-N`` an aptckpt save began (its side files are written first, with
    ``training_args.json``) and never committed. A damaged one (its manifest unreadable)
    is not: it stays where it is for the user to see."""
    if not os.path.isfile(os.path.join(path, TRAINING_ARGS_NAME)):
        return False
    try:
        return checkpoint_kind(path) is None
    except AptckptError:
        return False


def incomplete(path: str) -> CheckpointNotFoundError:
    if not os.path.isdir(path):
        reason = "no such directory"
    elif interrupted(path):
        reason = (
            f"its {STATE_DIR}/ holds no committed checkpoint (the save was interrupted); "
            "resume from an earlier checkpoint-N, or pass resume_from_checkpoint=True for "
            "the newest complete one"
        )
    elif not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        reason = f"it has no {TRAINER_STATE_NAME}, which every Trainer checkpoint-N has"
    else:
        reason = f"neither an aptckpt checkpoint ({STATE_DIR}/) nor HF's model files are in it"
    return CheckpointNotFoundError(path, reason)


def export_pretrained(
    checkpoint_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
) -> str:
    """Write a ``from_pretrained`` directory (config, generation config, tokenizer and
    ``model.safetensors``) from an aptckpt ``checkpoint-N``, for the Hub or for tools
    that read HF's layout. The model class is the one ``config.json`` names.

    Returns:
        ``output_dir``.

    Raises:
        CheckpointNotFoundError: ``checkpoint_dir`` holds no committed aptckpt checkpoint.
        IntegrityError: its data is damaged.
    """
    source, target = os.fspath(checkpoint_dir), os.fspath(output_dir)
    if checkpoint_kind(source) != "aptckpt":
        raise incomplete(source)
    config = transformers.AutoConfig.from_pretrained(source)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise IntegrationError(
            f"{os.path.join(source, 'config.json')} names no model class transformers has "
            f"(architectures={names}); load the weights with aptckpt.load(..., keys=['model'])",
            framework="transformers",
        )
    model = cls(config)
    with aptckpt.open(os.path.join(source, STATE_DIR)) as view:
        weights = view.get("model")
    # The class builds its weights in the default dtype; each takes the saved one first
    # (a bf16 run exports bf16, as the Trainer's own save_model does), so that
    # load_state_dict copies without casting. Tied weights are one tensor: cast once.
    own = model.state_dict(keep_vars=True)
    for key, saved in weights.items():
        built = own.get(key)
        if (
            isinstance(built, torch.Tensor)
            and isinstance(saved, torch.Tensor)
            and built.dtype != saved.dtype
        ):
            built.data = built.data.to(saved.dtype)
    model.load_state_dict(weights)
    model.save_pretrained(target)
    # The rest of the side files are what the tokenizer/processor wrote (vocabularies,
    # merges, templates, preprocessor configs): copied as they are.
    own = {"config.json", "generation_config.json", TRAINER_STATE_NAME, TRAINING_ARGS_NAME}
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if name in own or not os.path.isfile(path) or os.path.islink(path):
            continue
        with open(path, "rb") as src:
            data = src.read()
        with open(os.path.join(target, name), "wb") as dst:
            dst.write(data)
    return target
