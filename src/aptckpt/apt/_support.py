"""Helpers of the reference loop: LR schedule, evaluation, timing, formatting, logging.

None of them draws from a global RNG; the bit-identical resume of
:mod:`aptckpt.apt.train` depends on that.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch.nn import functional as F

from aptckpt.apt.model import APTModel

__all__ = ["Clock", "evaluate", "fmt_bytes", "mean", "one_at_a_time", "warmup_cosine"]


def warmup_cosine(warmup: int, total: int, *, floor: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine decay to ``floor``.

    A closure, not a callable object: ``LambdaLR`` then keeps no lambda state in
    its state dict; the schedule is rebuilt from the run's arguments on resume.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def evaluate(
    model: APTModel,
    tokens: torch.Tensor,
    *,
    batch_size: int,
    max_windows: int,
    device: torch.device,
) -> float | None:
    """Mean next-token loss over held-out windows, in eval mode (no dropout, no RNG).

    Returns ``None`` when ``tokens`` is too short for one window.
    """
    context = model.config.context
    if len(tokens) <= context:
        return None
    windows = tokens.unfold(0, context + 1, context)[:max_windows]
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size].to(device)
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
        return total / (len(windows) * context)
    finally:
        model.train(was_training)


def mean(values: list[float]) -> float:
    """Exact mean (``math.fsum``): independent of how the list was built up.

    A running sum was rejected: a resumed epoch would add its losses in another
    grouping than an uninterrupted one and could round differently.
    """
    return math.fsum(values) / len(values) if values else float("nan")


class Clock:
    """Splits wall time into training, checkpointing and bookkeeping; counts bytes.

    ``bytes`` is summed by the caller. Spans nest: a span's own time excludes
    the spans opened inside it, so a save inside the training span counts as
    checkpoint time only.
    """

    def __init__(self) -> None:
        self.seconds = {"train": 0.0, "checkpoint": 0.0, "other": 0.0}
        self.bytes = 0
        self._nested = 0.0

    @property
    def train(self) -> float:
        return self.seconds["train"]

    @property
    def checkpoint(self) -> float:
        return self.seconds["checkpoint"]

    @contextlib.contextmanager
    def span(self, field: str) -> Iterator[None]:
        start = time.perf_counter()
        outer, self._nested = self._nested, 0.0
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[field] += elapsed - self._nested
            self._nested = outer + elapsed


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def one_at_a_time(log: Callable[[str], object]) -> Callable[[str], object]:
    """``log``, called by one thread at a time: the save thread reports asynchronous saves
    while the training thread logs, and ``print`` writes a line and its newline as two
    writes, so two unserialised lines could come out as ``...laterblocked on...``."""
    lock = threading.Lock()

    def serialised(line: str) -> object:
        with lock:
            return log(line)

    return serialised
