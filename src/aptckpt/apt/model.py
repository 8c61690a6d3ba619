"""The APT model: a small decoder-only transformer language model.

GPT-style pre-norm blocks (causal self-attention, then an MLP), learned
position embeddings, and an output projection tied to the token embedding, so
that the state dict holds one tensor under two keys (``tok_emb.weight`` and
``head.weight``) -- the aliasing a checkpoint library must keep. Dropout is on
in training mode, so a run's outcome depends on the torch RNG state, which a
resumed run must therefore restore exactly.

The defaults are tiny (about 0.1 M parameters) so that the reference training
loop finishes in seconds on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["APTConfig", "APTModel"]


@dataclass(frozen=True)
class APTConfig:
    """Shape of an :class:`APTModel`.

    Attributes:
        vocab_size: number of token ids (at least the tokenizer's vocabulary).
        d_model: width of the residual stream; a multiple of ``n_head``.
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        context: longest sequence the model accepts (size of the position table).
        dropout: dropout probability used in training mode, in ``[0, 1)``.
    """

    vocab_size: int = 128
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    context: int = 64
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"APTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"APTConfig.d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"APTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what a checkpoint's ``config`` stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> APTConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown APTConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(data))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees only positions ``<= t``.

    Written out rather than calling ``F.scaled_dot_product_attention``: the
    fused kernel picks its implementation (and its dropout RNG use) by
    platform, and the reference loop wants one code path everywhere.
    """

    mask: torch.Tensor

    def __init__(self, config: APTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.attn_drop = nn.Dropout(config.dropout)
        self.resid_drop = nn.Dropout(config.dropout)
        causal = torch.tril(torch.ones(config.context, config.context, dtype=torch.bool))
        # Not persistent: derived from the config, so it stays out of checkpoints.
        self.register_buffer("mask", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        head_dim = width // self.n_head
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~self.mask[:time, :time], float("-inf"))
        weights = self.attn_drop(F.softmax(scores, dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(batch, time, width)
        projected: torch.Tensor = self.resid_drop(self.proj(out))
        return projected


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: APTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class APTModel(nn.Module):
    """Decoder-only transformer LM with tied input/output embeddings.

    ``model(idx)`` maps token ids ``(batch, time)`` to next-token logits
    ``(batch, time, vocab_size)``; ``time`` may not exceed ``config.context``.
    """

    def __init__(self, config: APTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(_init_weights)
        self.head.weight = self.tok_emb.weight  # tied: one tensor, two state-dict keys

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, time), got {tuple(idx.shape)}")
        time = idx.shape[1]
        if time > self.config.context:
            raise ValueError(
                f"sequence length {time} exceeds the model's context {self.config.context}"
            )
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.ln_f(x))
        return logits

    def num_parameters(self) -> int:
        """Parameters counted once (the tied embedding is one tensor)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` by ``max_new_tokens`` tokens.

        ``temperature=0`` picks the most likely token (no RNG); otherwise tokens
        are sampled, from ``generator`` when given so that the caller's global
        RNG state is left alone.
        """
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.context :])[:, -1, :]
            if temperature <= 0.0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def _init_weights(module: nn.Module) -> None:
    # GPT-2's initialisation: small normal weights, zero biases.
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
