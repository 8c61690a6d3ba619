"""The reference training loop: the APT model trained with resumable checkpoints.

:func:`train_model` trains :class:`~aptckpt.apt.model.APTModel` on a corpus
(by default :func:`~aptckpt.apt.corpus.default_corpus`) with AdamW and a
warmup-then-cosine learning rate, saving through a
:class:`~aptckpt.manager.CheckpointManager`: a regular checkpoint after every
epoch and a temporary one every ``temp_checkpoint_freq`` optimizer steps.

Contract: a run killed at any instant and resumed with ``resume_from="auto"``
(same arguments) ends with model weights, optimizer and scheduler state, loss
history and RNG states equal bit for bit to a run never interrupted, whichever
checkpoint -- temporary or regular -- it resumed from. What makes it hold:

* the manager captures and restores the Python, NumPy, torch CPU and CUDA RNG
  states at the exact point of the save;
* the data order of epoch ``e`` comes from a private generator seeded
  ``seed + e`` (:mod:`aptckpt.apt.data`), so skipping ``batch_index`` batches
  draws nothing from the global RNG;
* nothing between a save and the next step draws random numbers, and the
  resumed loop runs the same statements as the uninterrupted one (the model is
  built the same way and then overwritten; per-epoch averages are recomputed
  from the loss history rather than from a running sum);
* saving consumes no randomness, so the checkpoint cadence and the backend do
  not change the trajectory.

Bit-identical also needs the same floating-point reductions: the same number
of torch intra-op threads (``torch.set_num_threads``; recorded in the
checkpoint, and a resume with another count says so) and, on CUDA,
deterministic kernels (``torch.use_deterministic_algorithms(True)``). The loop
sets neither for the caller.

Conventions (those of the trainer this loop recreates): ``epoch`` in a
checkpoint is the 0-based epoch in progress; a regular checkpoint is taken
after epoch ``epoch`` finished (resume continues at ``epoch + 1``, batch 0); a
temporary checkpoint after batch ``k`` of epoch ``e`` records ``epoch=e,
batch_index=k`` (resume skips the first ``k`` batches of epoch ``e``).
"""

from __future__ import annotations

import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from aptckpt import _progress
from aptckpt.apt import _parallel
from aptckpt.apt._support import (
    Clock,
    evaluate,
    fmt_bytes,
    mean,
    one_at_a_time,
    warmup_cosine,
)
from aptckpt.apt.corpus import corpus_digest, default_corpus
from aptckpt.apt.data import Batches, split_tokens
from aptckpt.apt.model import APTConfig, APTModel
from aptckpt.apt.tokenizer import CharTokenizer
from aptckpt.errors import CheckpointNotFoundError
from aptckpt.manager import CheckpointManager, ResumeInfo
from aptckpt.registry import get_backend
from aptckpt.retention import KeepBest, KeepLast, SaveEvery

__all__ = ["TrainResult", "train_model"]

MODEL_NAME = "apt_model"
_DEFAULT_DIR = "./outputs"
# Fixed hyper-parameters of the reference loop (recorded in every checkpoint's config).
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
MIN_LR_RATIO = 0.1
VAL_FRACTION = 0.1
MAX_VAL_WINDOWS = 128
VAL_BATCH = 64  # windows per evaluation forward pass (no gradients: larger is cheaper)
# Training settings that must match for a resume to continue the same trajectory.
# `epochs` may change (the schedule then changes, and the loop says so).
_RESUME_KEYS = (
    "batch_size",
    "learning_rate",
    "seed",
    "steps_per_epoch",
    "weight_decay",
    "grad_clip",
)

Log = Callable[[str], object]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_model` produced.

    Attributes:
        model: the trained model (in train mode, on the training device).
        tokenizer: the tokenizer it was trained with.
        config: the model's shape.
        optimizer, scheduler: their final state (what a further resume would load).
        losses: training loss of every optimizer step of the run, resumed part included.
        epoch_losses: mean training loss of each epoch this call finished.
        checkpoints: regular (end-of-epoch) checkpoints this call wrote; older
            ones may since have been removed by retention.
        temp_checkpoints: temporary checkpoints this call wrote (each regular
            checkpoint removes the temporaries before it).
        checkpoint_seconds: wall time the loop was blocked by checkpoints: inside
            save calls (with asynchronous saves: the snapshot copy and any wait for
            the previous save) and waiting for the last save at the end.
        train_seconds: wall time spent training and evaluating, saves excluded.
        wall_seconds: wall time of the whole call.
        bytes_written: bytes the saves of this call stored.
        global_step: optimizer steps of the run, resumed part included.
        run_dir: the checkpoint directory.
        resumed_from: the checkpoint the run resumed from, or ``None``.
    """

    model: APTModel
    tokenizer: CharTokenizer
    config: APTConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    losses: tuple[float, ...]
    epoch_losses: tuple[float, ...]
    checkpoints: tuple[str, ...]
    temp_checkpoints: tuple[str, ...]
    checkpoint_seconds: float
    train_seconds: float
    wall_seconds: float
    bytes_written: int
    global_step: int
    run_dir: str
    resumed_from: str | None

    @property
    def checkpoint_fraction(self) -> float:
        """Checkpointing time as a fraction of training time."""
        return self.checkpoint_seconds / self.train_seconds if self.train_seconds else 0.0

    @property
    def blocked_fraction(self) -> float:
        """Share of the call's wall time the loop was blocked by checkpoints."""
        return self.checkpoint_seconds / self.wall_seconds if self.wall_seconds else 0.0


def train_model(
    epochs: int = 3,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    checkpoint_dir: str | os.PathLike[str] = _DEFAULT_DIR,
    resume_from: str | os.PathLike[str] | None = None,
    temp_checkpoint_freq: int = 100,
    backend: str = "zstd",
    *,
    model_config: APTConfig | None = None,
    seed: int = 0,
    keep_last: int = 3,
    save_path: str | os.PathLike[str] | None = None,
    max_steps_per_epoch: int | None = None,
    progress: bool | None = None,
    log: Log | None = print,
    corpus: str | None = None,
    device: str | torch.device = "cpu",
    async_checkpoints: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    parallel: str | None = None,
) -> TrainResult:
    """Train the APT model, checkpointing into ``checkpoint_dir``; resumable bit for bit.

    Args:
        epochs: passes over the training data.
        batch_size: sequences per optimizer step.
        learning_rate: peak learning rate (linear warmup, cosine decay to 10%).
        checkpoint_dir: the run directory (checkpoints, temporaries,
            ``metadata.json``, ``tokenizer/``); it can be moved or copied and
            resumed elsewhere.
        resume_from: ``None`` starts fresh (seeding every RNG from ``seed``);
            ``"auto"`` resumes from the newest complete checkpoint of the run,
            temporary or regular, or starts fresh if there is none;
            ``"latest"``, ``"best"`` or a checkpoint path resume from that one
            and fail if it does not exist.
        temp_checkpoint_freq: take a temporary checkpoint every this many
            optimizer steps (``0`` disables); none at an epoch's last step,
            where the regular checkpoint follows.
        backend: checkpoint backend (``"zstd"``, ``"torch"``, ``"delta"``, or a plugin).
        model_config: the model's shape; default :class:`APTConfig` with the
            tokenizer's vocabulary size.
        seed: seeds Python, NumPy and torch for a fresh run, and the data order.
        keep_last: regular checkpoints kept (the best one is kept besides).
        save_path: deprecated alias of ``checkpoint_dir``.
        max_steps_per_epoch: cap on optimizer steps per epoch (short runs).
        progress: draw a progress bar (``None``: only when stderr is a terminal).
        log: called with one line per epoch and per temporary checkpoint;
            ``None`` for silence.
        corpus: training text; default :func:`~aptckpt.apt.corpus.default_corpus`.
        device: where to train.
        async_checkpoints: save in the background (``blocking=False``): the loop
            waits only for the copy of the state into host staging buffers (and
            for the previous save, if it is still running). ``False`` saves
            synchronously. Either way the run is bit-identical.
        storage_options: for a ``checkpoint_dir`` URL (``s3://bucket/runs/apt``), the
            options of its fsspec file system (see :func:`aptckpt.save`).
        parallel: ``"ddp"`` or ``"fsdp"`` (FSDP2) to train on every rank of the job
            ``torchrun`` started (:mod:`aptckpt.apt._parallel`): each rank trains on its
            rows of every global batch and writes its own shards of every checkpoint; a
            run resumes bit for bit at the same world size, and at another one with
            weights and optimizer exact. Only rank 0 logs.

    Returns:
        A :class:`TrainResult`.

    Raises:
        CheckpointNotFoundError: ``resume_from`` names a checkpoint that does not exist.
        UnknownBackendError: ``backend`` is not registered.
        ValueError: invalid arguments, or a checkpoint of a run with other
            hyper-parameters, model shape, tokenizer or corpus.
    """
    if save_path is not None:
        warnings.warn(
            "train_model(save_path=...) is deprecated; use checkpoint_dir=... (same meaning)",
            DeprecationWarning,
            stacklevel=2,
        )
        if os.fspath(checkpoint_dir) != _DEFAULT_DIR:
            raise ValueError("pass checkpoint_dir or the deprecated save_path, not both")
        checkpoint_dir = save_path
    if epochs < 1 or batch_size < 1 or keep_last < 1:
        raise ValueError(
            "epochs, batch_size and keep_last must be at least 1, "
            f"got {epochs}, {batch_size}, {keep_last}"
        )
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if temp_checkpoint_freq < 0:
        raise ValueError(
            f"temp_checkpoint_freq must be >= 0 (0 disables), got {temp_checkpoint_freq}"
        )
    get_backend(backend)  # an unknown name fails now, not at the first save

    text = corpus if corpus is not None else default_corpus()
    tokenizer = CharTokenizer.from_text(text)
    if model_config is None:
        model_config = APTConfig(vocab_size=tokenizer.vocab_size)
    elif model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model_config.vocab_size {model_config.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size}"
        )
    started = time.perf_counter()
    ranks, device = _parallel.setup(parallel, torch.device(device))
    if not ranks.coordinator:
        log = None
    run = _Run(
        text,
        tokenizer,
        model_config,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        max_steps_per_epoch=max_steps_per_epoch,
        device=device,
        log=log if log is not None else _silent,
        blocking=not async_checkpoints,
        ranks=ranks,
    )
    manager = CheckpointManager(
        checkpoint_dir,
        backend=backend,
        model_name=MODEL_NAME,
        keep=KeepLast(keep_last) | KeepBest(1, "loss", "min"),
        temporary_every=SaveEvery(steps=temp_checkpoint_freq) if temp_checkpoint_freq else None,
        storage_options=storage_options,
        process_group=ranks.group,
    )
    run.resume(manager, resume_from, checkpoint_dir)
    if run.resumed_from is None:
        run.log(
            f"training APT ({run.model.num_parameters():,} parameters, vocab "
            f"{tokenizer.vocab_size}) for {epochs} epoch(s) x {run.data.steps_per_epoch} steps, "
            f"backend {backend}, checkpoints in {os.fspath(checkpoint_dir)}"
            + (f", {ranks.kind} on {ranks.world} ranks" if ranks.kind else "")
        )
    run.train(manager, progress)
    with run.clock.span("checkpoint"):
        manager.close()  # the last save, if still in flight, finishes (or raises) here
    run.wait_for_reports()
    wall = time.perf_counter() - started
    run.log(
        f"blocked on checkpoints {run.clock.checkpoint:.3f}s of {wall:.2f}s wall "
        f"({100 * run.clock.checkpoint / wall:.2f}%), "
        f"{'asynchronous' if async_checkpoints else 'synchronous'} saves"
    )
    return TrainResult(
        model=run.model,
        tokenizer=tokenizer,
        config=model_config,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        losses=tuple(run.losses),
        epoch_losses=tuple(run.epoch_losses),
        checkpoints=tuple(run.checkpoints),
        temp_checkpoints=tuple(run.temps),
        checkpoint_seconds=run.clock.checkpoint,
        train_seconds=run.clock.train,
        wall_seconds=wall,
        bytes_written=run.clock.bytes,
        global_step=run.global_step,
        run_dir=os.fspath(checkpoint_dir),
        resumed_from=run.resumed_from,
    )


class _Run:
    """The state of one training run and the loop over it."""

    def __init__(
        self,
        text: str,
        tokenizer: CharTokenizer,
        config: APTConfig,
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
        max_steps_per_epoch: int | None,
        device: torch.device,
        log: Log,
        blocking: bool = True,
        ranks: _parallel.Parallel | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.ranks = ranks if ranks is not None else _parallel.Parallel()
        self.epochs = epochs
        self.blocking = blocking
        self._report_lock = threading.Lock()  # completion reports come from the save thread
        # Reports of asynchronous saves not yet logged: the summary waits for them, so that
        # it comes after the last epoch's line rather than racing it.
        self._unreported = 0
        self._reported = threading.Condition()
        self.device = device
        self.log = one_at_a_time(log)
        tokens = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
        train_tokens, self.val_tokens = split_tokens(tokens, val_fraction=VAL_FRACTION)
        self.data = Batches(
            train_tokens, config.context, batch_size, seed=seed, max_steps=max_steps_per_epoch
        )
        total_steps = epochs * self.data.steps_per_epoch
        warmup = min(100, max(1, total_steps // 10))
        self.run_config: dict[str, Any] = {
            "model": config.to_dict(),
            "training": {
                "epochs": epochs,
                "batch_size": batch_size,
                "learning_rate": learning_rate,
                "weight_decay": WEIGHT_DECAY,
                "grad_clip": GRAD_CLIP,
                "warmup_steps": warmup,
                "seed": seed,
                "max_steps_per_epoch": max_steps_per_epoch,
                "steps_per_epoch": self.data.steps_per_epoch,
                # Not checked on resume (moving a run is legitimate) but reported:
                # float reductions split by thread count round differently.
                "torch_threads": torch.get_num_threads(),
            },
            "tokenizer": "CharTokenizer",
        }
        self.extra = {"data": {"seed": seed, "corpus_sha256": corpus_digest(text)}}

        # A fresh run and a resumed one execute the same statements up to the
        # load: seed, build, then (when resuming) overwrite model, optimizer,
        # scheduler and every RNG state from the checkpoint.
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.model = APTModel(config).to(device)
        #: What trains: the model, or its DDP wrapper (FSDP2 shards the model in place).
        self.net = self.ranks.wrap(self.model, device)
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=learning_rate, betas=BETAS, weight_decay=WEIGHT_DECAY
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(warmup, total_steps, floor=MIN_LR_RATIO)
        )
        self.start_epoch, self.start_batch, self.global_step = 0, 0, 0
        self.losses: list[float] = []
        self.epoch_losses: list[float] = []
        self.checkpoints: list[str] = []
        self.temps: list[str] = []
        self.resumed_from: str | None = None
        self.clock = Clock()

    def resume(
        self,
        manager: CheckpointManager,
        resume_from: str | os.PathLike[str] | None,
        run_dir: str | os.PathLike[str],
    ) -> None:
        """Load the checkpoint ``resume_from`` names, if any (see :func:`train_model`)."""
        if resume_from is None:
            return
        target = None if resume_from == "auto" else os.fspath(resume_from)
        try:
            epoch, self.global_step, history, _ = manager.load_checkpoint(
                self.net,
                self.optimizer,
                self.scheduler,
                checkpoint_path=target,
                map_location=self.device,
                check=self._check_resumable,  # before the model is touched
            )
        except CheckpointNotFoundError:
            if resume_from != "auto":
                raise
            self.log(f"no checkpoint in {os.fspath(run_dir)}; starting a fresh run")
            return
        info = manager.last_loaded
        if info is None:  # load_checkpoint always sets it
            raise RuntimeError("CheckpointManager.load_checkpoint did not set last_loaded")
        self.losses = list(history)
        if info.batch_index is None:
            self.start_epoch = epoch + 1
        else:
            self.start_epoch, self.start_batch = epoch, info.batch_index
        self.resumed_from = os.fspath(info.path)
        kind = f"temporary, after batch {self.start_batch} of" if info.temporary else "end of"
        self.log(
            f"resumed from {self.resumed_from} ({kind} epoch {epoch + 1}, step "
            f"{self.global_step}); continuing at epoch {self.start_epoch + 1}, "
            f"batch {self.start_batch}"
        )
        training = info.config["training"]
        if training["epochs"] != self.epochs:
            self.log(
                f"note: the run was started for {training['epochs']} epochs, now {self.epochs}; "
                "the learning-rate schedule changes accordingly"
            )
        threads = self.run_config["training"]["torch_threads"]
        if training.get("torch_threads") != threads:
            self.log(
                f"note: the checkpoint was written with {training.get('torch_threads')} torch "
                f"threads, this process uses {threads}; the run continues exactly but will not "
                "be bit-identical to one that never stopped (reductions round differently)"
            )

    def _check_resumable(self, info: ResumeInfo) -> None:
        """Refuse a checkpoint whose run differs in what shapes the trajectory."""
        where = os.fspath(info.path)
        saved = info.config
        if not isinstance(saved, dict) or "model" not in saved or "training" not in saved:
            raise ValueError(f"checkpoint '{where}' was not written by aptckpt.apt.train_model")
        diffs = []
        if saved["model"] != self.run_config["model"]:
            diffs.append(f"model_config {saved['model']} != {self.run_config['model']}")
        for key in _RESUME_KEYS:
            before, now = saved["training"].get(key), self.run_config["training"][key]
            if before != now:
                diffs.append(f"{key} {before!r} != {now!r}")
        saved_data = (info.extra or {}).get("data", {})
        if saved_data.get("corpus_sha256") != self.extra["data"]["corpus_sha256"]:
            diffs.append("the corpus differs")
        if info.tokenizer_files is not None and info.tokenizer_files != self.tokenizer.files():
            diffs.append("the tokenizer differs")
        if diffs:
            raise ValueError(
                f"cannot resume from '{where}': its run used other settings ("
                + "; ".join(diffs)
                + "); pass the run's original arguments, or start a fresh run in another "
                "checkpoint_dir"
            )

    def train(self, manager: CheckpointManager, progress: bool | None) -> None:
        """Run the remaining epochs, checkpointing as :func:`train_model` describes."""
        steps = self.data.steps_per_epoch
        self.model.train()
        for epoch in range(self.start_epoch, self.epochs):
            first = self.start_batch if epoch == self.start_epoch else 0
            epoch_start = len(self.losses) - first  # this epoch's first loss in self.losses
            desc = f"epoch {epoch + 1}/{self.epochs}"
            bar = _progress.bar(steps, desc, unit="step", enabled=progress)
            with self.clock.span("train"), bar:
                bar.update(first)
                for batch_index, inputs, targets in self.data.epoch(epoch, start=first):
                    loss = self._step(inputs, targets)
                    manager.log_metrics(
                        self.global_step, train_loss=loss, lr=self.scheduler.get_last_lr()[0]
                    )
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    bar.update(1)
                    done = batch_index + 1
                    if manager.should_save_temp(self.global_step) and done < steps:
                        self._save(manager, epoch, epoch_start, batch_index=done)
                train_loss = mean(self.losses[epoch_start:])
                val_loss = evaluate(
                    self.model,
                    self.val_tokens,
                    batch_size=VAL_BATCH,
                    max_windows=MAX_VAL_WINDOWS,
                    device=self.device,
                )
            self.epoch_losses.append(train_loss)
            if val_loss is not None:
                manager.log_metrics(self.global_step, val_loss=val_loss)
            self._save(manager, epoch, epoch_start, val_loss=val_loss)

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        inputs, targets = self.ranks.rows(inputs), self.ranks.rows(targets)
        logits = self.net(inputs.to(self.device))
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.to(self.device).reshape(-1)
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        self.losses.append(self.ranks.mean(loss))
        return self.losses[-1]

    def _save(
        self,
        manager: CheckpointManager,
        epoch: int,
        epoch_start: int,
        *,
        batch_index: int | None = None,
        val_loss: float | None = None,
    ) -> None:
        """A temporary checkpoint (``batch_index`` given) or the end-of-epoch one."""
        temporary = batch_index is not None
        train_loss = mean(self.losses[epoch_start:])
        metrics = {"train_loss": train_loss}
        if not temporary:
            # "loss" is what the manager ranks best checkpoints by.
            metrics["loss"] = train_loss if val_loss is None else val_loss
            if val_loss is not None:
                metrics["val_loss"] = val_loss
        with self.clock.span("checkpoint"):
            saved = manager.save_checkpoint(
                self.net,
                self.optimizer,
                self.scheduler,
                epoch,
                self.global_step,
                self.losses,
                metrics,
                tokenizer=self.tokenizer,
                config=self.run_config,
                batch_index=batch_index,
                temporary=temporary,
                extra=self.extra,
                blocking=self.blocking,
            )
        report = _Report(epoch, batch_index, self.global_step, train_loss, val_loss)
        if self.blocking:
            self._committed(manager, report, time.perf_counter())
        else:  # reported once committed, from the save thread
            started = time.perf_counter()
            with self._reported:
                self._unreported += 1
            saved.add_done_callback(lambda _: self._report(manager, report, started))

    def _report(self, manager: CheckpointManager, report: _Report, started: float) -> None:
        try:
            self._committed(manager, report, started)
        finally:
            with self._reported:
                self._unreported -= 1
                self._reported.notify_all()

    def wait_for_reports(self) -> None:
        """Return once every asynchronous save's report is logged (call after the saves
        ended: ``manager.close()`` returns as soon as a save's result is set, before the
        save thread runs its completion callbacks)."""
        with self._reported:
            self._reported.wait_for(lambda: self._unreported == 0)

    def _committed(self, manager: CheckpointManager, report: _Report, started: float) -> None:
        """Account for and log a save that has committed (not called if it failed)."""
        record = manager.last_saved
        if record is None or record.global_step != report.global_step:
            return  # it failed: the error is raised by the next save or the final wait
        path = os.fspath(record.path)
        info = manager.last_save_info  # what the save wrote (delta: only the new objects)
        written = info.stored_bytes if info is not None else record.bytes
        with self._report_lock:
            self.clock.bytes += written
            if report.batch_index is not None:
                self.temps.append(path)
                self.log(
                    f"  temp checkpoint {path} (epoch {report.epoch + 1}, batch "
                    f"{report.batch_index}, step {report.global_step}, {fmt_bytes(written)})"
                )
                return
            self.checkpoints.append(path)
            val = "" if report.val_loss is None else f", val loss {report.val_loss:.4f}"
            later = time.perf_counter() - started
            background = "" if self.blocking else f", committed {later:.3f}s later"
            self.log(
                f"epoch {report.epoch + 1}/{self.epochs}: train loss {report.train_loss:.4f}{val}"
                f"{' (best)' if record.is_best else ''}, checkpoint {path}, "
                f"{fmt_bytes(written)} written{background}"
            )


@dataclass(frozen=True)
class _Report:
    """What the log line of a checkpoint says besides what the manager records."""

    epoch: int
    batch_index: int | None
    global_step: int
    train_loss: float
    val_loss: float | None


def _silent(_: str) -> None:
    return None
