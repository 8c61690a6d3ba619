"""Accelerate ``save_state`` / ``load_state`` through aptckpt.

Two functions stand in for ``accelerator.save_state(dir)`` and
``accelerator.load_state(dir)``::

    from aptckpt.integrations.accelerate import load_state, save_state

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.register_for_checkpointing(my_counter)        # any object with state_dict()
    save_state(accelerator, "runs/a/step-500", extra={"epoch": 3, "batches_done": 120})
    loaded = load_state(accelerator, "runs/a/step-500")       # verified; accelerator.step restored
    loader = accelerator.skip_first_batches(loader, loaded.extra["batches_done"])

One aptckpt checkpoint holds everything ``save_state`` writes as separate files
(several of them pickles, and ``load_state`` unpickles ``custom_checkpoint_*.pkl``
with ``weights_only=False``):

* ``models``: each prepared model's *unwrapped* state dict (no ``module.`` or
  ``_orig_mod.`` prefixes; tied weights stored once and tied again on load),
  after the hooks of ``register_save_state_pre_hook`` ran (a hook that pops a
  weight takes that model's saving over, as with ``save_state``);
* ``optimizers``, ``schedulers``, the grad ``scaler``;
* ``dataloaders``: per prepared loader, its epoch counter (``iteration``, which
  seeds a ``SeedableRandomSampler`` at every ``iter()``), the seed and epoch of
  such a sampler, the state of a torch generator driving its sampler, and
  ``state_dict()`` of a stateful loader (``use_stateful_dataloader``);
* ``rng``: Python, NumPy, torch CPU and CUDA generators; ``step`` (``accelerator.step``);
* ``custom``: ``state_dict()`` of every object given to ``register_for_checkpointing``
  (it must hold what aptckpt stores: tensors and plain values; anything that needs
  pickle is refused at save time, naming its key path);
* ``extra``: plain values of the caller's (epoch, batches done, ...), returned by
  :func:`load_state`.

Where the epoch stood is the caller's, as with Accelerate: pass the batches done
in ``extra`` and skip them with ``accelerator.skip_first_batches`` after loading.
With ``DataLoaderConfiguration(use_seedable_sampler=True)`` the order of every
epoch depends only on the seed and the epoch, so a resumed run sees the batches an
uninterrupted one would.

The save is atomic (the manifest commits it), any backend (``backend="delta"``
for incremental saves), and ``output_dir`` may be a URL (``s3://bucket/run/step-500``
with ``storage_options``). ``output_dir=None`` follows Accelerate's automatic naming
(``ProjectConfiguration(automatic_checkpoint_naming=True)``: ``checkpoints/checkpoint_<i>``
in the project directory, at most ``total_limit`` kept; ``load_state(accelerator)``
takes the newest committed one, and the next save follows it instead of colliding
with ``checkpoint_0`` as a fresh Accelerator's would).

Supported: one process (CPU, one GPU, mixed precision). FSDP, DeepSpeed,
Megatron-LM, XLA and multi-process runs are refused with :class:`IntegrationError`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

try:
    # accelerate ships no type information (no py.typed)
    import accelerate  # type: ignore[import-untyped]
    from accelerate import Accelerator
    from accelerate.utils import DistributedType  # type: ignore[import-untyped]
except ImportError as err:  # pragma: no cover -- the test module skips without accelerate
    raise ImportError(
        "aptckpt.integrations.accelerate needs accelerate: pip install 'aptckpt[hf]'"
    ) from err

import torch

import aptckpt
from aptckpt.api import SaveInfo
from aptckpt.errors import (
    AptckptError,
    CheckpointNotFoundError,
    FormatError,
    IntegrationError,
    IntoMismatchError,
)
from aptckpt.storage import StorageOptions, is_url
from aptckpt.training_state import capture_rng, restore_rng

__all__ = ["LoadedState", "load_state", "save_state"]

log = logging.getLogger("aptckpt")

# Accelerator attributes read (they are what its own save_state reads).
_ACCELERATOR_API = (
    "_models",
    "_optimizers",
    "_schedulers",
    "_dataloaders",
    "_custom_objects",
    "_save_model_state_pre_hook",
    "_load_model_state_pre_hook",
)
_NAMED = re.compile(r"^checkpoint_(\d+)$")


@dataclass(frozen=True)
class LoadedState:
    """What :func:`load_state` restored.

    Attributes:
        path: the checkpoint loaded.
        step: ``accelerator.step`` as saved (now restored).
        extra: the ``extra`` values given to :func:`save_state`.
    """

    path: str
    step: int
    extra: dict[str, Any]


def _check(accelerator: Accelerator) -> None:
    missing = [name for name in _ACCELERATOR_API if not hasattr(accelerator, name)]
    if missing:
        raise IntegrationError(
            f"this Accelerator (accelerate {accelerate.__version__}) lacks {missing}, which "
            "aptckpt.integrations.accelerate reads (tested with accelerate 1.16); install "
            "accelerate>=1.0,<2 or use accelerator.save_state",
            framework="accelerate",
        )
    refused = {
        DistributedType.FSDP: "FSDP",
        DistributedType.DEEPSPEED: "DeepSpeed",
        DistributedType.MEGATRON_LM: "Megatron-LM",
        DistributedType.XLA: "XLA",
    }
    what = refused.get(accelerator.distributed_type)
    if what is None and accelerator.num_processes > 1:
        what = f"{accelerator.num_processes} processes"
    if what is not None:
        raise IntegrationError(
            f"aptckpt.integrations.accelerate saves one process's state; this run uses {what}. "
            "Use accelerator.save_state for it, or aptckpt.save(..., process_group=...) "
            "with the state your loop gathers",
            framework="accelerate",
        )


def _sampler_state(dataloader: Any) -> dict[str, Any]:
    state: dict[str, Any] = {}
    get = getattr(dataloader, "get_sampler", None)
    sampler = get() if get is not None else getattr(dataloader, "sampler", None)
    if sampler is not None:
        if hasattr(sampler, "initial_seed") and hasattr(sampler, "epoch"):  # SeedableRandomSampler
            state["seed"] = int(sampler.initial_seed)
            state["epoch"] = int(sampler.epoch)
        generator = getattr(sampler, "generator", None)
        if isinstance(generator, torch.Generator):
            state["generator"] = generator.get_state()
    iteration = getattr(dataloader, "iteration", None)  # DataLoaderShard's epoch counter
    if isinstance(iteration, int):
        state["iteration"] = iteration
    if getattr(dataloader, "use_stateful_dataloader", False):
        state["loader"] = dataloader.state_dict()
    return state


def _restore_sampler(dataloader: Any, state: Mapping[str, Any]) -> None:
    if "iteration" in state and hasattr(dataloader, "set_epoch"):
        # The loader's counter sets the sampler's epoch at every iter(): restored first.
        dataloader.set_epoch(state["iteration"])
    get = getattr(dataloader, "get_sampler", None)
    sampler = get() if get is not None else getattr(dataloader, "sampler", None)
    if sampler is not None:
        if "seed" in state and hasattr(sampler, "initial_seed"):
            sampler.initial_seed = state["seed"]
            sampler.epoch = state["epoch"]
        generator = getattr(sampler, "generator", None)
        if "generator" in state and isinstance(generator, torch.Generator):
            generator.set_state(state["generator"])
    if "loader" in state and getattr(dataloader, "use_stateful_dataloader", False):
        dataloader.load_state_dict(state["loader"])


def _check_fit(path: str, index: int, model: Any, weights: Any, *, strict: bool) -> None:
    """Refuse saved ``weights`` that do not fit ``model`` (the ``index``-th prepared one):
    other keys (with ``strict``) or other shapes, so that no model is half-restored."""
    own = model.state_dict()
    missing = tuple(sorted(set(own) - set(weights))) if strict else ()
    unexpected = tuple(sorted(set(weights) - set(own))) if strict else ()
    shapes = [
        f"{key}: saved {tuple(value.shape)}, here {tuple(own[key].shape)}"
        for key, value in weights.items()
        if key in own
        and isinstance(value, torch.Tensor)
        and isinstance(own[key], torch.Tensor)
        and not torch.nn.parameter.is_lazy(own[key])  # a lazy module takes any shape
        and value.shape != own[key].shape
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part
            for part in (
                f"missing {list(missing[:5])}" if missing else "",
                f"unexpected {list(unexpected[:5])}" if unexpected else "",
                f"other shapes ({', '.join(shapes[:5])})" if shapes else "",
            )
            if part
        )
        raise IntoMismatchError(
            f"{path}: model {index} saved ({type(model).__name__}) does not fit the model "
            f"prepared {index}-th here: {detail}. Prepare the same models, in the same order, "
            "as the run that saved it (strict=False lets keys differ); nothing was loaded",
            missing=missing,
            unexpected=unexpected,
        )


def _automatic_dir(accelerator: Accelerator) -> str:
    config = accelerator.project_configuration
    if not config.automatic_checkpoint_naming:
        raise ValueError(
            "save_state/load_state need a directory unless the Accelerator's "
            "ProjectConfiguration has automatic_checkpoint_naming=True"
        )
    return os.path.join(accelerator.project_dir, "checkpoints")


def _named(folder: str) -> list[tuple[int, str]]:
    """The committed ``checkpoint_<i>`` in ``folder``, oldest first (a damaged one is
    skipped with a warning: it neither blocks a resume from a later one nor is pruned)."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _NAMED.match(name)
        if match is None:
            continue
        path = os.path.join(folder, name)
        try:
            aptckpt.inspect(path)
        except CheckpointNotFoundError:
            continue
        except AptckptError as err:  # damaged: left in place, neither loaded nor pruned
            log.warning("skipping %s: %s", path, err)
            continue
        found.append((int(match.group(1)), path))
    return sorted(found)


def save_state(
    accelerator: Accelerator,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    backend: str = "zstd",
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: StorageOptions | None = None,
    **options: Any,
) -> SaveInfo:
    """Save everything ``accelerator.save_state`` saves, as one aptckpt checkpoint.

    Args:
        accelerator: the ``Accelerator`` whose prepared objects are saved.
        output_dir: the checkpoint to create: a local path or a URL (``s3://...``);
            ``None`` with automatic checkpoint naming (see the module docstring).
        backend: an aptckpt backend (``"zstd"``, ``"delta"``, ``"torch"``, a plugin's).
        extra: plain values of the caller's, returned by :func:`load_state`.
        overwrite: replace a checkpoint already at ``output_dir`` (atomically).
        storage_options: the fsspec options for a URL (credentials, ``endpoint_url``).
        **options: backend options (``level=3``, ``codec="none"``, ``store=...``).

    Returns:
        What aptckpt wrote.

    Raises:
        IntegrationError: an Accelerate set-up this cannot save (see the module docstring).
        UnsupportedObjectError: a registered object's state holds something aptckpt does
            not store, named by key path.
        CheckpointExistsError: ``output_dir`` is taken and ``overwrite`` is false.
    """
    _check(accelerator)
    automatic = output_dir is None
    if output_dir is None:
        folder = _automatic_dir(accelerator)
        path = os.path.join(folder, f"checkpoint_{accelerator.save_iteration}")
    else:
        path = os.fspath(output_dir)
    models = accelerator._models
    weights = [accelerator.unwrap_model(m, keep_torch_compile=False).state_dict() for m in models]
    for hook in accelerator._save_model_state_pre_hook.values():
        hook(models, weights, path)
    scaler = accelerator.scaler
    state = {
        "models": weights,
        "optimizers": [opt.state_dict() for opt in accelerator._optimizers],
        "schedulers": [sched.state_dict() for sched in accelerator._schedulers],
        "dataloaders": [_sampler_state(dl) for dl in accelerator._dataloaders],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng(),
        "step": int(accelerator.step),
        "iteration": int(accelerator.save_iteration),
        "custom": [obj.state_dict() for obj in accelerator._custom_objects],
        "extra": dict(extra or {}),
    }
    info: SaveInfo = aptckpt.save(
        state,
        path,
        backend=backend,
        overwrite=overwrite,
        storage_options=storage_options,
        metadata={"framework": "accelerate", "accelerate_version": accelerate.__version__},
        **options,
    )
    accelerator.project_configuration.iteration += 1  # as accelerator.save_state does
    if automatic:
        limit = accelerator.project_configuration.total_limit
        if limit is not None and limit > 0:
            committed = _named(folder)
            for _, old in committed[: max(len(committed) - limit, 0)]:
                aptckpt.delete(old)
    return info


def load_state(
    accelerator: Accelerator,
    input_dir: str | os.PathLike[str] | None = None,
    *,
    storage_options: StorageOptions | None = None,
    strict: bool = True,
) -> LoadedState:
    """Restore what :func:`save_state` saved into the prepared objects of ``accelerator``.

    Every chunk is verified; nothing is unpickled. Tensors go where the objects they
    fill live (models and optimizer states on their devices).

    Args:
        accelerator: the ``Accelerator`` with the same objects prepared and registered,
            in the same order, as when the state was saved.
        input_dir: the checkpoint (local path or URL); ``None`` with automatic checkpoint
            naming: the newest committed ``checkpoint_<i>``.
        storage_options: the fsspec options for a URL.
        strict: model keys must match exactly (``load_state_dict(strict=...)``).

    Returns:
        The saved step (also set on ``accelerator.step``) and ``extra``.

    Raises:
        CheckpointNotFoundError: no committed checkpoint there.
        IntegrityError: damaged data, naming file and tensor.
        FormatError: the checkpoint holds another number of models, optimizers,
            schedulers, loaders or registered objects than ``accelerator`` has, or was
            not written by :func:`save_state`.
        IntoMismatchError: a saved model does not fit the one prepared in its place
            (other keys with ``strict``, other shapes); raised before any is filled.
    """
    _check(accelerator)
    if input_dir is None:
        folder = _automatic_dir(accelerator)
        committed = _named(folder)
        if not committed:
            raise CheckpointNotFoundError(folder, "no committed checkpoint_<i> in it")
        path = committed[-1][1]
    else:
        path = os.fspath(input_dir)
    if not is_url(path):
        path = os.path.abspath(path)
    state = aptckpt.load(path, map_location="cpu", storage_options=storage_options)
    expected = ("models", "optimizers", "schedulers", "dataloaders", "rng", "step", "custom")
    if not isinstance(state, dict) or any(key not in state for key in expected):
        raise FormatError(
            f"{path} was not written by aptckpt.integrations.accelerate.save_state "
            f"(it holds {sorted(state) if isinstance(state, dict) else type(state).__name__})",
            path=path,
        )
    models = list(accelerator._models)
    for hook in accelerator._load_model_state_pre_hook.values():
        hook(models, path)
    counts = {
        "models": (len(state["models"]), len(models)),
        "optimizers": (len(state["optimizers"]), len(accelerator._optimizers)),
        "schedulers": (len(state["schedulers"]), len(accelerator._schedulers)),
        "dataloaders": (len(state["dataloaders"]), len(accelerator._dataloaders)),
        "registered objects": (len(state["custom"]), len(accelerator._custom_objects)),
    }
    wrong = {what: n for what, n in counts.items() if n[0] != n[1]}
    if wrong:
        detail = ", ".join(
            f"{saved} {what} saved, {have} here" for what, (saved, have) in wrong.items()
        )
        raise FormatError(
            f"{path} does not fit this Accelerator: {detail}. Prepare and register the same "
            "objects, in the same order, as the run that saved it",
            path=path,
        )
    unwrapped = [accelerator.unwrap_model(m, keep_torch_compile=False) for m in models]
    for index, (model, weights) in enumerate(zip(unwrapped, state["models"], strict=True)):
        _check_fit(path, index, model, weights, strict=strict)  # before anything is filled
    for model, weights in zip(unwrapped, state["models"], strict=True):
        model.load_state_dict(weights, strict=strict)
    for opt, saved in zip(accelerator._optimizers, state["optimizers"], strict=True):
        opt.load_state_dict(saved)
    for sched, saved in zip(accelerator._schedulers, state["schedulers"], strict=True):
        sched.load_state_dict(saved)
    for dl, saved in zip(accelerator._dataloaders, state["dataloaders"], strict=True):
        _restore_sampler(dl, saved)
    if accelerator.scaler is not None and state.get("scaler") is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    for obj, saved in zip(accelerator._custom_objects, state["custom"], strict=True):
        obj.load_state_dict(saved)
    restore_rng(state["rng"])
    accelerator.step = int(state["step"])
    config = accelerator.project_configuration
    if config.automatic_checkpoint_naming and isinstance(state.get("iteration"), int):
        # The next automatic save follows the loaded one instead of colliding with it.
        config.iteration = max(config.iteration, state["iteration"] + 1)
    return LoadedState(path=path, step=int(state["step"]), extra=dict(state.get("extra") or {}))
