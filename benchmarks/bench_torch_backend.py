"""The ``torch`` backend's verified load against ``torch.load(weights_only=True)``, as a table.

Standalone script, not a test::

    PYTHONPATH=src python benchmarks/bench_torch_backend.py [--rounds 7] [--big | --only-big]
        [--before MAIN_CHECKOUT/src] [--dir DIR]

Workloads (built in memory, seeded): a MiniLM-size BERT encoder (6 layers, hidden 384,
intermediate 1536, vocab 30522, 512 positions; about 22.7M parameters) after three AdamW
steps on random tokens -- its fp32 weights (91 MB), a bf16 copy (45 MB), and the weights
with the AdamW state (273 MB); with ``--big`` also the 1.87 GB state of
``benchmarks/workload.py`` (``scale="full"``).

For each workload, ``--rounds`` interleaved rounds, each timing both contenders on the
same state in the same conditions:

* ``after save``: ``aptckpt.save(backend="torch")`` then at once ``aptckpt.load`` (verified,
  the default); ``torch.save`` + fsync then at once ``torch.load`` -- the file was just
  written by this process. torch.save's buffered writes leave its pages in the cache;
  aptckpt's local saves write with ``O_DIRECT`` (``APTCKPT_DIRECT_IO``, storage/local), so
  its file is *not* cached afterwards and this is a cold read for aptckpt;
* ``warm``: the file read once beforehand (page cache);
* ``cold``: the file's pages dropped (fsync + ``posix_fadvise(DONTNEED)``, checked with
  ``mincore``).

The order of the contenders rotates between rounds. ``--before OTHER/src`` adds a third
contender: the ``torch`` backend's read as another checkout has it (e.g. a worktree of the
main branch), run in the same rounds. Reported: medians (min-max) in
milliseconds and the ratio aptckpt / torch.load of the medians, the median CPU time
(user + system, all threads) of each load -- the steadier figure on a machine whose cores
other work shares -- and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from any directory

import _sysutil
import aptckpt
from aptckpt import _accel
from aptckpt.backends.torch import TorchBackend


class _Layer(nn.Module):
    def __init__(self, d: int, inner: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d)
        self.intermediate = nn.Linear(d, inner)
        self.output = nn.Linear(inner, d)
        self.out_norm = nn.LayerNorm(d)
        self.heads = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = self.attn_norm(x + self.attn_out(y))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class MiniLM(nn.Module):
    """The shapes of all-MiniLM-L6-v2 (a BERT encoder), randomly initialised."""

    def __init__(self, vocab: int = 30522, d: int = 384, inner: int = 1536, layers: int = 6):
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.position = nn.Embedding(512, d)
        self.token_type = nn.Embedding(2, d)
        self.norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(_Layer(d, inner) for _ in range(layers))
        self.pooler = nn.Linear(d, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1])
        x = self.norm(self.word(tokens) + self.position(pos) + self.token_type.weight[0])
        for layer in self.layers:
            x = layer(x)
        return torch.tanh(self.pooler(x[:, 0]))


def minilm_states() -> dict[str, Any]:
    torch.manual_seed(7)
    model = MiniLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        tokens = torch.randint(0, 30522, (4, 64), generator=gen)
        loss = model(tokens).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "MiniLM fp32 weights": weights,
        "MiniLM bf16 weights": {k: v.to(torch.bfloat16) for k, v in weights.items()},
        "MiniLM fp32 + AdamW": {"model": weights, "optimizer": opt.state_dict()},
    }


def _nbytes(state: Any) -> int:
    from aptckpt import tree

    return sum(leaf.tensor.nbytes for leaf in tree.flatten(state).tensors)


#: CPU seconds (user + system, all threads) of each timed load, by (condition, contender).
CPU: dict[tuple[str, str, str], list[float]] = {}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn: Callable[[], Any], key: tuple[str, str, str] | None = None) -> float:
    cpu = _cpu()
    start = time.perf_counter()
    out = fn()
    took = time.perf_counter() - start
    if key is not None:
        CPU.setdefault(key, []).append(_cpu() - cpu)
    del out
    return took


def _torch_save(state: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _old_reader(src: Path) -> Callable[..., Any]:
    """``TorchBackend.read`` of another aptckpt checkout's ``backends/torch.py`` (run on this
    checkout's other modules), to time two versions in the same rounds."""
    spec = importlib.util.spec_from_file_location(
        "aptckpt.backends._torch_before", src / "aptckpt" / "backends" / "torch.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.TorchBackend.read  # type: ignore[no-any-return]


def bench(
    name: str, state: Any, workdir: Path, rounds: int, before: Callable[..., Any] | None
) -> dict[str, Any]:
    ck = workdir / "ck"
    pt = workdir / "state.pt"
    times: dict[tuple[str, str], list[float]] = {}

    def aptckpt_load() -> Any:
        return aptckpt.load(ck)

    def before_load() -> Any:
        with mock.patch.object(TorchBackend, "read", before):
            return aptckpt.load(ck)

    def torch_load() -> Any:
        return torch.load(pt, weights_only=True, map_location="cpu")

    def aptckpt_save() -> None:
        _sysutil.remove(ck)
        aptckpt.save(state, ck, backend="torch")

    def torch_save() -> None:
        _sysutil.remove(pt)
        _torch_save(state, pt)

    contenders: dict[str, tuple[Callable[[], None], Path, Callable[[], Any]]] = {
        "aptckpt": (aptckpt_save, ck, aptckpt_load),
        "torch.load": (torch_save, pt, torch_load),
    }
    if before is not None:
        contenders["before"] = (aptckpt_save, ck, before_load)
    names = list(contenders)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for who in order:  # right after a save in this process
            save, path, load = contenders[who]
            save()
            gc.collect()
            times.setdefault(("after save", who), []).append(
                _timed(load, (name, "after save", who))
            )
            gc.collect()
        for cond in ("warm", "cold"):
            for who in order:
                save, path, load = contenders[who]
                if cond == "warm":
                    _sysutil.prewarm(path)
                else:
                    _sysutil.evict(path)
                    resident = _sysutil.resident_fraction(path)
                    if resident > 0.01:
                        print(f"warning: {resident:.0%} of {path} still cached", file=sys.stderr)
                times.setdefault((cond, who), []).append(_timed(load, (name, cond, who)))
                gc.collect()
    return {"name": name, "bytes": _nbytes(state), "times": times}


def _cell(values: list[float]) -> str:
    lo, mid, hi = (1e3 * v for v in (min(values), statistics.median(values), max(values)))
    return f"{mid:.1f} ({lo:.1f}-{hi:.1f})"


def report(results: list[dict[str, Any]], load_before: str, load_after: str) -> str:
    lines = [
        f"aptckpt {aptckpt.__version__} from {Path(aptckpt.__file__).parent}, core "
        f"{_accel.IMPLEMENTATION}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"APTCKPT_DIRECT_IO={os.environ.get('APTCKPT_DIRECT_IO', 'unset')}; "
        f"load average before {load_before}, after {load_after}. Times: median (min-max) wall ms;"
        " CPU: median CPU ms of the process during the load (user + system, all threads)",
        "",
        "| workload | tensor bytes | condition | aptckpt load ms | torch.load ms | ratio "
        "| before ms | before ratio | CPU ms aptckpt / torch.load / before |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for cond in ("after save", "warm", "cold"):
            a, t = res["times"][(cond, "aptckpt")], res["times"][(cond, "torch.load")]
            ratio = statistics.median(a) / statistics.median(t)
            b = res["times"].get((cond, "before"))
            old = f"{_cell(b)} | {statistics.median(b) / statistics.median(t):.2f}x" if b else "|"
            cpu = " / ".join(
                f"{1e3 * statistics.median(CPU[(res['name'], cond, who)]):.0f}"
                for who in ("aptckpt", "torch.load", "before")
                if (res["name"], cond, who) in CPU
            )
            lines.append(
                f"| {res['name']} | {res['bytes'] / 1e6:.0f} MB | {cond} | {_cell(a)} | "
                f"{_cell(t)} | {ratio:.2f}x | {old} | {cpu} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--big", action="store_true", help="also the 1.87 GB state")
    parser.add_argument("--only-big", action="store_true", help="only the 1.87 GB state")
    parser.add_argument("--dir", type=Path, default=None, help="where files go (a local disk)")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="the src/ of another aptckpt checkout: its torch backend's read is timed too",
    )
    args = parser.parse_args()
    states: dict[str, Any] = {} if args.only_big else minilm_states()
    if args.big or args.only_big:
        from workload import build_workload

        states["GPT 1.87 GB state"] = build_workload("full").state
    before = _old_reader(args.before) if args.before is not None else None
    load_before = _sysutil.loadavg()
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-torch-") as tmp:
        for name, state in states.items():
            results.append(bench(name, state, Path(tmp), args.rounds, before))
            print(f"done: {name}", file=sys.stderr)
    print(report(results, load_before, _sysutil.loadavg()))


if __name__ == "__main__":
    main()
