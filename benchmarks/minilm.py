"""MiniLM-scale workloads: the states a user fine-tuning a small sentence encoder saves.

Role: the 20-300 MB end of the benchmark set (issue 16). ``all-MiniLM-L6-v2`` is a BERT encoder
with 6 layers, hidden size 384, 12 heads, intermediate size 1536, a 30,522-token vocabulary and 512
positions: 22.7M parameters, 91 MB in fp32. Nothing is downloaded: the encoder is written in plain
``torch.nn`` with that shape, initialised as BERT is (normal, std 0.02) and trained for a few AdamW
steps of masked-token prediction on seeded random tokens, so the weights have moved off their
initialisation and the optimizer moments hold real data.

Contract: ``build(layers)`` returns the workloads, each a state a user would save:

* ``L<n> fp32 weights``: ``model.state_dict()`` (91 MB for 6 layers);
* ``L<n> bf16 weights``: the same weights in bf16 (45 MB);
* ``L<n> fp32 weights + AdamW``: ``{"model": ..., "optimizer": opt.state_dict(), "step": n}``
  (273 MB).

Run ``python benchmarks/minilm.py`` to print their sizes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    layers: int = 6
    hidden: int = 384
    heads: int = 12
    intermediate: int = 1536
    vocab: int = 30522
    positions: int = 512
    steps: int = 4
    batch: int = 4
    seq: int = 64
    lr: float = 1e-3
    seed: int = 2026


class Encoder(nn.Module):
    """A BERT encoder: token + position + segment embeddings, post-LayerNorm blocks, an MLM
    head tied to the token embeddings."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.positions = nn.Embedding(cfg.positions, cfg.hidden)
        self.segments = nn.Embedding(2, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden,
            cfg.heads,
            cfg.intermediate,
            dropout=0.1,
            activation="gelu",
            batch_first=True,
            layer_norm_eps=1e-12,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.head_transform = nn.Linear(cfg.hidden, cfg.hidden)
        self.head_norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        x = self.tokens(ids) + self.positions(pos) + self.segments(torch.zeros_like(ids))
        x = self.blocks(self.norm(x))
        x = self.head_norm(F.gelu(self.head_transform(x)))
        return x @ self.tokens.weight.T + self.head_bias


def build(layers: int = 6) -> dict[str, dict[str, Any]]:
    """The three states of an encoder of ``layers`` layers, by name (see the module doc)."""
    cfg = EncoderConfig(layers=layers)
    torch.manual_seed(cfg.seed)
    model = Encoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.steps):
        ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=gen)
        masked = torch.rand(ids.shape, generator=gen) < 0.15
        logits = model(ids.masked_fill(masked, 103))
        loss = F.cross_entropy(logits[masked], ids[masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    weights = {k: v for k, v in model.state_dict().items()}
    return {
        f"MiniLM-L{layers} fp32 weights": weights,
        f"MiniLM-L{layers} bf16 weights": {k: v.to(torch.bfloat16) for k, v in weights.items()},
        f"MiniLM-L{layers} fp32 weights + AdamW": {
            "model": weights,
            "optimizer": opt.state_dict(),
            "step": cfg.steps,
        },
    }


def main() -> None:
    from workload import tensor_bytes

    start = time.perf_counter()
    for name, state in build().items():
        print(f"{name}: {tensor_bytes(state) / 1e6:.1f} MB")
    print(f"built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
