"""The main job (until the reference training loop lands): a realistic training
state saved and loaded with every backend, timed, checked bit for bit.

The state is what a trainer needs to resume: a GPT-style model after a few real
AdamW steps, optimizer moments, LR scheduler, step counters, loss history,
metrics, config, and the Python / NumPy / torch RNG states. For each backend it
prints save and load times, bytes on disk, and shows that a flipped bit in a
copy is caught by ``aptckpt.verify``.

Run: ``./scripts/run.sh`` (or ``.venv/bin/python scripts/main_job.py --help``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import aptckpt
from aptckpt.testing import assert_state_equal


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only LM with tied input/output embeddings (like GPT-2)."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.tok(idx) + self.pos(torch.arange(t))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def training_state(*, d: int, layers: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    config = {"vocab": 4096, "d_model": d, "layers": layers, "heads": 8, "ctx": 64, "lr": 3e-4}
    model = TinyGPT(config["vocab"], d, layers, config["heads"], config["ctx"])
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, config["vocab"], (4, config["ctx"]))
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, config["vocab"]), idx[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    np_state = np.random.get_state()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 0,
        "global_step": steps,
        "batch_in_epoch": steps,
        "loss_history": losses,
        "metrics": {"train_loss": losses[-1], "best_loss": min(losses)},
        "config": config,
        "rng": {
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "torch": torch.get_rng_state(),
        },
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="directory for checkpoints")
    args = parser.parse_args()

    print(
        f"aptckpt {aptckpt.__version__} (core: {aptckpt.IMPLEMENTATION}), torch {torch.__version__}"
    )
    state, seconds = timed(training_state, d=args.d_model, layers=args.layers, steps=args.steps)
    n_params = (
        sum(t.numel() for t in state["model"].values()) - state["model"]["head.weight"].numel()
    )
    raw = sum(
        t.numel() * t.element_size()
        for t in aptckpt.tree.flatten(state).tensors
        for t in [t.tensor]
    )
    print(
        f"training state: {n_params / 1e6:.1f}M parameters after {args.steps} AdamW steps, "
        f"{fmt_bytes(raw)} of tensors ({seconds:.1f}s to build)\n"
    )

    root = args.out or Path(tempfile.mkdtemp(prefix="aptckpt-main-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    ref_path = root / "torch_save.pt"
    _, save_s = timed(torch.save, state, ref_path)
    _, load_s = timed(torch.load, ref_path, weights_only=True)
    rows.append(("torch.save / torch.load (reference)", save_s, load_s, ref_path.stat().st_size))
    for label, backend, options in [
        ("aptckpt zstd", "zstd", {}),
        ("aptckpt zstd codec=none", "zstd", {"codec": "none"}),
        ("aptckpt torch", "torch", {}),
    ]:
        path = root / label.replace(" ", "_").replace("=", "-")
        info, save_s = timed(aptckpt.save, state, path, backend=backend, overwrite=True, **options)
        loaded, load_s = timed(aptckpt.load, path)
        assert_state_equal(state, loaded)
        rows.append((label, save_s, load_s, info.stored_bytes))
        print(
            f"{label}: saved {info.tensors} tensors to {path} -> files {', '.join(info.files)}; "
            "loaded back bit-exact (tied embedding still tied: "
            f"{loaded['model']['tok.weight'] is loaded['model']['head.weight']})"
        )

    print(f"\n{'':38} {'save s':>8} {'load s':>8} {'on disk':>10} {'vs raw':>7}")
    for label, save_s, load_s, size in rows:
        print(f"{label:38} {save_s:8.3f} {load_s:8.3f} {fmt_bytes(size):>10} {raw / size:6.2f}x")
    print("(save times include fsync for aptckpt, not for torch.save; single run, not a benchmark)")

    damaged = root / "damaged"
    shutil.copytree(root / "aptckpt_zstd", damaged, dirs_exist_ok=True)
    shard = damaged / "shard-00000.bin"
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    try:
        aptckpt.verify(damaged)
    except aptckpt.IntegrityError as err:
        print(f"\nflipped one bit in a copy; verify says: {err}")
    else:
        raise SystemExit("a flipped bit went undetected")
    info = aptckpt.inspect(root / "aptckpt_zstd")
    print(
        f"\ninspect: backend {info.backend}, format v{info.format_version}, {len(info.tensors)} "
        f"tensors, {fmt_bytes(info.raw_bytes)} raw -> {fmt_bytes(info.stored_bytes)} stored"
    )
    if args.out is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
