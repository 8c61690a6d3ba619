"""Deterministic batching for the reference loop, resumable at any batch.

The token stream is cut into non-overlapping windows of ``context + 1`` tokens
(input and next-token target, sharing one token at the seam). Epoch ``e``
visits the windows in the order ``torch.randperm(n, generator=G)`` with
``G = torch.Generator().manual_seed(seed + e)``: a private generator, never
the global RNG, so the order depends only on ``(seed, e)``. A run resumed at
``(epoch, batch_index)`` therefore rebuilds the same permutation and skips the
first ``batch_index`` batches without drawing anything, and the global RNG
(which dropout uses) sees exactly the same calls as in a run never
interrupted. A ``DataLoader`` with a sampler was the rejected alternative: its
default sampler seeds itself from the global RNG and its iterator state is not
checkpointable.

The last incomplete batch of an epoch is dropped, so every step has the same
shape.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["Batches", "split_tokens"]


def split_tokens(
    tokens: torch.Tensor, *, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D token stream into (train, validation): the last ``val_fraction`` is held out."""
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token tensor, got shape {tuple(tokens.shape)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cut = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:cut], tokens[cut:]


class Batches:
    """Batches of ``(inputs, targets)`` for each epoch, in a seed-determined order.

    Args:
        tokens: 1-D integer tensor, the token stream.
        context: tokens per example.
        batch_size: examples per batch.
        seed: base seed of the per-epoch orders.
        shuffle: ``False`` visits windows in stream order (evaluation).
        max_steps: cap on batches per epoch (short runs, tests).
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        context: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        max_steps: int | None = None,
    ) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"expected a 1-D token tensor, got shape {tuple(tokens.shape)}")
        if context < 1 or batch_size < 1:
            raise ValueError(
                f"context and batch_size must be positive, got {context}, {batch_size}"
            )
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be positive or None, got {max_steps}")
        self.context, self.batch_size = context, batch_size
        self.seed, self.shuffle = seed, shuffle
        n_windows = (len(tokens) - 1) // context
        # unfold: window i is tokens[i*context : i*context + context + 1] (a view, no copy).
        self.windows = tokens.unfold(0, context + 1, context)[:n_windows]
        steps = n_windows // batch_size
        if max_steps is not None:
            steps = min(steps, max_steps)
        if steps == 0:
            raise ValueError(
                f"{len(tokens)} tokens make {n_windows} windows of {context + 1}, "
                f"not one batch of {batch_size}; use a smaller batch_size or context"
            )
        self.steps_per_epoch = steps

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        """Window indices of ``epoch``, from a private generator seeded ``seed + epoch``."""
        n = len(self.windows)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=generator)

    def epoch(
        self, epoch: int, *, start: int = 0
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(batch_index, inputs, targets)`` of ``epoch``, from batch ``start`` on.

        ``inputs`` and ``targets`` are ``(batch_size, context)`` int64 tensors;
        ``targets`` is ``inputs`` shifted by one token.
        """
        if not 0 <= start <= self.steps_per_epoch:
            raise ValueError(f"start batch {start} is outside [0, {self.steps_per_epoch}]")
        order = self.order(epoch)
        for batch_index in range(start, self.steps_per_epoch):
            rows = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            chunk = self.windows[rows].long()
            yield batch_index, chunk[:, :-1], chunk[:, 1:]
