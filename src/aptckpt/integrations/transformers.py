"""Hugging Face ``Trainer`` checkpoints through aptckpt.

One line for the user: build :class:`AptckptTrainer` where ``Trainer`` was built
(or mix :class:`AptckptTrainerMixin` into a ``Trainer`` subclass such as TRL's),
and every ``checkpoint-N/`` the trainer writes is an aptckpt checkpoint::

    from aptckpt.integrations.transformers import AptckptTrainer

    trainer = AptckptTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train(resume_from_checkpoint=True)

``checkpoint-N/`` then holds::

    config.json, generation_config.json   model.config / generation_config.save_pretrained
    tokenizer files                       processing_class.save_pretrained
    training_args.json                    TrainingArguments.to_json_string()
    trainer_state.json                    TrainerState.save_to_json, exactly as HF writes it
    aptckpt/                              the aptckpt checkpoint: model, optimizer, scheduler,
                                          grad scaler, RNG states (Python, NumPy, torch, CUDA)

The ``aptckpt/`` checkpoint is written last, so its manifest is the commit marker
of the whole directory: a ``checkpoint-N/`` without a committed ``aptckpt/``
(a save killed half-way) is never resumed from; ``resume_from_checkpoint=True``
takes the newest *complete* checkpoint. Everything is loaded back through aptckpt,
every chunk verified. A ``checkpoint-N/`` written by the plain ``Trainer`` (HF's
own ``model.safetensors``, ``optimizer.pt``, ...) still resumes, by HF's loaders,
so a run can switch to aptckpt half-way.

Why a ``Trainer`` subclass and not a ``TrainerCallback``: a callback's ``on_save``
runs *after* the trainer wrote its pickles and rotated its checkpoints, and no
callback hook loads anything; only the trainer's own save and load steps can put
aptckpt in HF's place. The overridden steps are private methods of ``Trainer``
(``_save_checkpoint``, ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``,
``_load_scaler``, ``_load_rng_state``, ``_load_best_model``); their names and
parameters are checked against the installed ``transformers`` when the trainer is
built, and a version that moved them is refused with :class:`IntegrationError`.

``training_args.bin`` (a pickle of ``TrainingArguments``, which ``Trainer`` never
reads back) is replaced by ``training_args.json``: the same arguments, readable
without running code, in checkpoints and in ``trainer.save_model(dir)``. That
export otherwise stays HF's (``model.safetensors``, config, tokenizer), since that
is what the Hub and ``from_pretrained`` read; :func:`export_pretrained` turns a
checkpoint into such a directory.

Retention stays HF's: ``save_total_limit`` keeps the newest checkpoints (and the
best one, ``metric_for_best_model``) by HF's ``rotate_checkpoints``, which this
module calls after the new checkpoint committed; ``load_best_model_at_end`` loads
the best checkpoint's weights through aptckpt. With ``backend="delta"`` the run's
checkpoints share one object store, ``<output_dir>/aptckpt-store``, whose
unreachable objects are collected after each rotation.

Supported: one training process (CPU or one GPU). Multi-process set-ups
(DeepSpeed, FSDP, DDP, XLA, SageMaker MP) are refused when the trainer is built.
"""

from __future__ import annotations

import contextlib
import inspect as _inspect
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

try:
    import transformers
    from transformers import Trainer
    from transformers.trainer_callback import ExportableState, TrainerState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
except ImportError as err:  # pragma: no cover -- the test module skips without transformers
    raise ImportError(
        "aptckpt.integrations.transformers needs transformers: pip install 'aptckpt[hf]'"
    ) from err

import aptckpt
from aptckpt.errors import (
    CheckpointNotFoundError,
    FormatError,
    IntegrationError,
    IntoMismatchError,
)
from aptckpt.integrations._hf_checkpoints import (
    CHECKPOINT_RE,
    STATE_DIR,
    STORE_DIR,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_NAME,
    checkpoint_kind,
    export_pretrained,
    incomplete,
    interrupted,
    last_checkpoint,
)
from aptckpt.training_state import capture_rng, restore_rng

if TYPE_CHECKING:
    from torch import nn

    _TrainerBase = Trainer
else:
    _TrainerBase = object

__all__ = [
    "STATE_DIR",
    "TRAINING_ARGS_NAME",
    "AptckptTrainer",
    "AptckptTrainerMixin",
    "checkpoint_kind",
    "export_pretrained",
    "last_checkpoint",
]

log = logging.getLogger("aptckpt")

# The Trainer methods overridden or called, with the parameters relied on.
_TRAINER_API: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("model", "trial"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_scaler": ("checkpoint",),
    "_load_rng_state": ("checkpoint",),
    "_load_best_model": (),
    "_get_output_dir": ("trial",),
    "_push_from_checkpoint": ("checkpoint_folder",),
    "_issue_warnings_after_load": ("load_result",),
    "store_flos": (),
    "_save": ("output_dir", "state_dict"),
    "train": ("resume_from_checkpoint", "trial", "ignore_keys_for_eval"),
}
_TESTED = "5.25"


def _check_transformers() -> None:
    """Refuse a ``transformers`` whose Trainer moved the methods this module overrides."""
    version = transformers.__version__
    major = int(re.match(r"\d+", version).group()) if re.match(r"\d+", version) else 0  # type: ignore[union-attr]
    problems = []
    if major != 5:
        problems.append(f"major version {major}, not 5")
    for name, params in _TRAINER_API.items():
        method = getattr(Trainer, name, None)
        if method is None:
            problems.append(f"Trainer.{name} is gone")
            continue
        found = tuple(_inspect.signature(method).parameters)[1:]
        if found[: len(params)] != params:
            problems.append(f"Trainer.{name}{found} no longer takes {params}")
    if problems:
        raise IntegrationError(
            f"aptckpt.integrations.transformers supports transformers 5.x (tested with "
            f"{_TESTED}); the installed {version} differs: {'; '.join(problems)}. Install a "
            f"tested version (pip install 'transformers>=5,<6') or save with the plain Trainer.",
            framework="transformers",
        )


class AptckptTrainerMixin(_TrainerBase):
    """Makes a ``transformers.Trainer`` (sub)class save and resume ``checkpoint-N``
    through aptckpt. Put it first: ``class MyTrainer(AptckptTrainerMixin, SFTTrainer)``.

    Keyword arguments (besides the trainer's own):
        aptckpt_backend: the aptckpt backend of the checkpoints (``"zstd"``,
            ``"delta"``, ``"torch"``, or a plugin's).
        aptckpt_options: backend options (``{"level": 3}``, ``{"codec": "none"}``).

    Raises:
        IntegrationError: an incompatible ``transformers``, or a multi-process set-up.
        UnknownBackendError: ``aptckpt_backend`` is not registered.
    """

    def __init__(
        self,
        *args: Any,
        aptckpt_backend: str = "zstd",
        aptckpt_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        _check_transformers()
        if aptckpt_backend not in aptckpt.available_backends():
            raise aptckpt.UnknownBackendError(aptckpt_backend, sorted(aptckpt.available_backends()))
        self.aptckpt_backend = aptckpt_backend
        self.aptckpt_options = dict(aptckpt_options or {})
        super().__init__(*args, **kwargs)
        refused = [
            what
            for what, on in (
                ("DeepSpeed", self.is_deepspeed_enabled),
                ("FSDP", self.is_fsdp_enabled or bool(getattr(self, "is_fsdp_xla_enabled", False))),
                (f"{self.args.world_size} processes", self.args.world_size > 1),
            )
            if on
        ]
        if refused:
            raise IntegrationError(
                f"AptckptTrainer saves from one training process; this run uses "
                f"{', '.join(refused)}. Use the plain Trainer for it, or aptckpt.save with "
                "process_group= in your own loop.",
                framework="transformers",
            )

    # ------------------------------------------------------------------ save

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``checkpoint-N/`` as HF lays it out, with the aptckpt checkpoint written last."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state_dir = os.path.join(output_dir, STATE_DIR)
        if self.args.should_save:
            # Saving a step again (a run resumed from an earlier checkpoint) replaces it:
            # its commit goes first (atomically), then the rest, so that a kill below
            # never leaves old weights beside new side files.
            if os.path.isdir(state_dir):
                with contextlib.suppress(CheckpointNotFoundError):
                    aptckpt.delete(state_dir)
            if os.path.isdir(output_dir):
                shutil.rmtree(output_dir)
            os.makedirs(output_dir)
            self._save_pretrained_files(output_dir)

        # Best-model bookkeeping, as Trainer._save_checkpoint does it.
        if (
            self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
            and self.state.best_global_step
        ):
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.exists(best):
                self.state.best_model_checkpoint = best

        if not self.args.should_save:
            return
        stateful: Any = self.state.stateful_callbacks  # a dict by the time a save runs
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                name = callback.__class__.__name__
                if isinstance(stateful[name], list):
                    stateful[name].append(callback.state())
                else:
                    stateful[name] = callback.state()
        self.state.save_to_json(os.path.join(output_dir, TRAINER_STATE_NAME))

        options = dict(self.aptckpt_options)
        if self.aptckpt_backend == "delta":
            options.setdefault("store", os.path.join(run_dir, STORE_DIR))
        aptckpt.save(
            self._training_state(),
            state_dir,
            backend=self.aptckpt_backend,
            metadata={
                "framework": "transformers",
                "transformers_version": transformers.__version__,
                "global_step": self.state.global_step,
            },
            **options,
        )

        if self.args.push_to_hub:
            self._push_from_checkpoint(output_dir)
        self._remove_interrupted(run_dir)
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )
        if self.aptckpt_backend == "delta" and "store" not in self.aptckpt_options:
            aptckpt.collect_garbage(os.path.join(run_dir, STORE_DIR))

    def _remove_interrupted(self, run_dir: str) -> None:
        """Remove the ``checkpoint-M`` whose aptckpt save was interrupted (a killed run):
        HF's rotation would count them, and keep the newest of them as "the checkpoint to
        resume from" while deleting complete ones. Directories aptckpt did not begin are
        left to HF's rotation, as before."""
        for name in os.listdir(run_dir):
            path = os.path.join(run_dir, name)
            if CHECKPOINT_RE.match(name) and os.path.isdir(path) and interrupted(path):
                log.warning("removing %s: its save was interrupted", path)
                shutil.rmtree(path, ignore_errors=True)

    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
    ) -> None:
        """``trainer.save_model(dir)``, the export: HF's ``save_pretrained`` layout
        (``model.safetensors``, config, tokenizer), with ``training_args.json`` in place of
        the pickled ``training_args.bin``."""
        super()._save(output_dir, state_dict)
        target = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save or target is None:
            return
        pickled = os.path.join(target, "training_args.bin")
        if os.path.isfile(pickled):
            os.remove(pickled)
        with open(os.path.join(target, TRAINING_ARGS_NAME), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())  # type: ignore[no-untyped-call]

    def _save_pretrained_files(self, output_dir: str) -> None:
        """What ``save_pretrained`` writes besides the weights: config, generation
        config, the tokenizer/processor, and the arguments as JSON -- those first, as
        the mark of a directory an aptckpt save began (see ``interrupted``)."""
        with open(os.path.join(output_dir, TRAINING_ARGS_NAME), "w", encoding="utf-8") as f:
            # HF's own JSON of the arguments; it masks every *_token value.
            f.write(self.args.to_json_string())  # type: ignore[no-untyped-call]
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        config = getattr(model, "config", None)
        if isinstance(model, transformers.PreTrainedModel) and config is not None:
            config.dtype = str(model.dtype).split(".")[1]
            config.architectures = [type(model).__name__]
            config.save_pretrained(output_dir)
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(output_dir)
        processor: Any = self.processing_class
        if processor is None:  # as Trainer._save: the collator's tokenizer then
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)

    def _training_state(self) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        state: dict[str, Any] = {"model": model.state_dict()}
        if not self.args.save_only_model:
            optimizer, scheduler = self.optimizer, self.lr_scheduler  # both set by train()
            state["optimizer"] = optimizer.state_dict() if optimizer is not None else None
            state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
            scaler = getattr(self.accelerator, "scaler", None)
            state["scaler"] = scaler.state_dict() if scaler is not None else None
            state["rng"] = capture_rng()
        return state

    # ------------------------------------------------------------------ load

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest complete
        checkpoint (:func:`last_checkpoint`), and a path must be a complete one.

        Raises:
            CheckpointNotFoundError: no complete checkpoint to resume from, naming why.
        """
        if resume_from_checkpoint is True:
            output_dir = self.args.output_dir or "."
            found = last_checkpoint(output_dir)
            if found is None:
                raise CheckpointNotFoundError(
                    output_dir,
                    "no complete checkpoint-N to resume from; train without "
                    "resume_from_checkpoint to start afresh",
                )
            resume_from_checkpoint = found
        elif resume_from_checkpoint not in (None, False):
            path = os.fspath(resume_from_checkpoint)  # type: ignore[arg-type]
            if checkpoint_kind(path) is None:
                raise incomplete(path)
            resume_from_checkpoint = path
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _saved(self, checkpoint: str, *keys: str) -> dict[str, Any]:
        """The parts ``keys`` of the aptckpt checkpoint of ``checkpoint`` (absent ones
        left out), every chunk verified, on the CPU."""
        path = os.path.join(checkpoint, STATE_DIR)
        with aptckpt.open(path) as view:
            saved_step = (view.metadata or {}).get("global_step")
            state_file = os.path.join(checkpoint, TRAINER_STATE_NAME)
            step = TrainerState.load_from_json(state_file).global_step
            if saved_step != step:
                raise FormatError(
                    f"{state_file} says step {step} but the aptckpt checkpoint beside it was "
                    f"saved at step {saved_step}: the directory was altered; resume from "
                    "another checkpoint-N",
                    path=checkpoint,
                )
            return {key: view.get(key) for key in keys if key in view}

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        if checkpoint_kind(resume_from_checkpoint) != "aptckpt":
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        self._load_weights(resume_from_checkpoint, model)

    def _load_weights(self, checkpoint: str, model: nn.Module | None) -> None:
        """Fill ``model`` (default: the trainer's) in place; tied weights stay tied."""
        target = model if model is not None else self.model
        assert target is not None  # Trainer.__init__ refuses a trainer without one
        weights = self._saved(checkpoint, "model")["model"]
        where = os.path.join(checkpoint, STATE_DIR)
        expected, saved = set(target.state_dict()), set(weights)
        missing, unexpected = tuple(sorted(expected - saved)), tuple(sorted(saved - expected))
        if missing or unexpected:
            raise IntoMismatchError(
                f"the model saved in {where} does not fit this model: missing "
                f"{list(missing[:5])}, unexpected {list(unexpected[:5])}; build the model "
                "from the checkpoint's config.json",
                missing=missing,
                unexpected=unexpected,
            )
        try:
            target.load_state_dict(weights)
        except RuntimeError as err:  # shapes
            raise IntoMismatchError(
                f"the model saved in {where} does not fit this model ({err}); build the "
                "model from the checkpoint's config.json",
                missing=(),
                unexpected=(),
            ) from err

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or checkpoint_kind(checkpoint) != "aptckpt":
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        parts = self._saved(checkpoint, "optimizer", "scheduler")
        # none with save_only_model (nor HF's files then)
        if parts.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(parts["optimizer"])
        if parts.get("scheduler") is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(parts["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or checkpoint_kind(checkpoint) != "aptckpt":
            super()._load_scaler(checkpoint)
            return
        saved = self._saved(checkpoint, "scaler").get("scaler")
        scaler = getattr(self.accelerator, "scaler", None)
        if saved is not None and scaler is not None:
            scaler.load_state_dict(saved)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or checkpoint_kind(checkpoint) != "aptckpt":
            super()._load_rng_state(checkpoint)
            return
        saved = self._saved(checkpoint, "rng").get("rng")
        if saved is not None:
            restore_rng(saved)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or checkpoint_kind(best) != "aptckpt":
            super()._load_best_model()
            return
        log.info("loading the best model from %s (score %s)", best, self.state.best_metric)
        self._load_weights(best, None)


class AptckptTrainer(AptckptTrainerMixin, Trainer):
    """``transformers.Trainer`` whose ``checkpoint-N/`` are aptckpt checkpoints
    (see :mod:`aptckpt.integrations.transformers`)."""
