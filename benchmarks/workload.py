"""Standard benchmark workload: a GPT-2-style decoder after a few real AdamW steps.

Role: build, deterministically from a seed, the training state every benchmark in ``benchmarks/``
saves and loads, so that figures from different scripts and different runs describe the same bytes.

Contract:
    ``build_workload(scale)`` returns a :class:`Workload` holding

    * ``state``: ``{"model": model.state_dict(), "optimizer": opt.state_dict(), "step": int,
      "config": dict, "rng": torch.get_rng_state()}`` -- fp32 weights plus AdamW moments (about
      1.9 GB at ``scale="full"``). The input and output embeddings are tied as in GPT-2, so the
      model state dict holds two names (``wte.weight``, ``lm_head.weight``) for one tensor.
    * ``bf16_weights``: ``{"model": {name: bf16 copy}}`` with the tie kept (one bf16 tensor under
      both names).

    Nothing is cached on disk: the state is rebuilt in memory each time (about a minute on two
    cores at full scale), which keeps the benchmark free of stale cache files.

Run ``python benchmarks/workload.py --scale small`` to print a summary of the workload.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT-2-style decoder and of the short training run that fills the optimizer."""

    n_layer: int
    d_model: int
    n_head: int
    vocab: int
    context: int
    batch: int
    seq: int
    steps: int
    lr: float = 3e-4
    weight_decay: float = 0.1
    seed: int = 1234


# "full": 11 layers rather than the 10 of the research baselines, because the embeddings are tied
# here (as in GPT-2): 10 tied layers give only 143M parameters, below the 150M the benchmark asks
# for; 11 give 155.6M (weights 0.62 GB + AdamW moments 1.25 GB = 1.87 GB).
# The batch is tiny on purpose: the steps exist to make the moments real data, not to train.
SCALES: dict[str, ModelConfig] = {
    "full": ModelConfig(
        n_layer=11, d_model=1024, n_head=16, vocab=16384, context=256, batch=2, seq=128, steps=6
    ),
    "small": ModelConfig(
        n_layer=6, d_model=512, n_head=8, vocab=8192, context=256, batch=2, seq=128, steps=6
    ),
}


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention then a 4x GELU MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2-style decoder with learned positions and tied input/output embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self._init_weights(cfg)

    def _init_weights(self, cfg: ModelConfig) -> None:
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # LayerNorm and bias defaults (ones / zeros / uniform) are fine
            std = 0.02
            if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                std /= math.sqrt(2 * cfg.n_layer)
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@dataclasses.dataclass(frozen=True)
class Workload:
    """The training state to checkpoint, its bf16 weights, and how they were made."""

    scale: str
    config: ModelConfig
    n_params: int
    state: dict[str, Any]
    bf16_weights: dict[str, Any]
    build_seconds: float
    losses: tuple[float, ...]


def build_workload(scale: str = "full") -> Workload:
    """Build the model, run ``config.steps`` AdamW steps on seeded random tokens, return the state.

    Args:
        scale: ``"full"`` (155.6M parameters) or ``"small"`` (about 21M).

    Returns:
        The :class:`Workload`; identical tensors for identical seeds and thread counts.
    """
    cfg = SCALES[scale]
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.steps):
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)  # free the gradients: only the state is kept
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())  # counts the tied tensor once

    weights = model.state_dict()
    state: dict[str, Any] = {
        "model": weights,
        "optimizer": opt.state_dict(),
        "step": cfg.steps,
        "config": dataclasses.asdict(cfg),
        "rng": torch.get_rng_state(),
    }
    # Keep the tie in the bf16 copy too: convert each distinct tensor once.
    converted: dict[int, torch.Tensor] = {}
    bf16: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        key = t.untyped_storage().data_ptr()
        if key not in converted:
            converted[key] = t.to(torch.bfloat16)
        bf16[name] = converted[key]
    return Workload(
        scale=scale,
        config=cfg,
        n_params=n_params,
        state=state,
        bf16_weights={"model": bf16},
        build_seconds=time.perf_counter() - t0,
        losses=tuple(losses),
    )


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(dotted.name, tensor)`` for every tensor leaf of a nested dict/list/tuple.

    Names join keys with dots (``optimizer.state.3.exp_avg``); aliased tensors appear once per name.
    """
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def unique_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """Flat ``name -> tensor`` dict with each distinct storage kept once (first name wins).

    This is what a format without aliasing (safetensors) can store, and the set of bytes the raw
    write/read limits move.
    """
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in iter_tensors(obj):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def tensor_bytes(obj: Any) -> int:
    """Bytes of tensor data in ``obj``, each distinct tensor counted once."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(obj).values())


def describe(w: Workload) -> str:
    """One paragraph describing the workload for reports."""
    c = w.config
    n_tensors = sum(1 for _ in iter_tensors(w.state))
    return (
        f"GPT-2-style decoder ({c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, "
        f"vocab {c.vocab}, context {c.context}, tied embeddings), "
        f"{w.n_params / 1e6:.1f}M parameters, "
        f"after {c.steps} AdamW steps (lr {c.lr}, wd {c.weight_decay}) on random tokens "
        f"(batch {c.batch} x {c.seq}, seed {c.seed}); full state = "
        f"{tensor_bytes(w.state['model']) / 1e9:.3f} GB fp32 weights + "
        f"{tensor_bytes(w.state['optimizer']) / 1e9:.3f} GB AdamW state = "
        f"{tensor_bytes(w.state) / 1e9:.3f} GB in {n_tensors} tensor entries "
        f"({len(unique_tensors(w.state))} distinct); bf16 weights = "
        f"{tensor_bytes(w.bf16_weights) / 1e9:.3f} GB. Built in {w.build_seconds:.0f} s."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    args = parser.parse_args()
    w = build_workload(args.scale)
    print(describe(w))
    print("losses:", ", ".join(f"{x:.4f}" for x in w.losses))


if __name__ == "__main__":
    main()
