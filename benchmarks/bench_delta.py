"""Benchmark of the ``delta`` backend: bytes and time of incremental checkpoints in four scenarios.

Role: the figures behind ``benchmarks/RESULTS-delta.md``. Every scenario trains the standard
workload model (``workload.py``) for real on CPU and takes a series of checkpoints with
``aptckpt.save(..., backend="delta")``, each against the previous one (``base=`` passed
explicitly, default ``keyframe_every``), and in the same round saves the same state with
``backend="zstd"`` (and a raw write + fsync of the state's bytes) for reference:

1. **frozen backbone**: >= 90% of the parameters frozen, AdamW over the rest; 10 checkpoints.
   Delta bytes vs the zstd size of what changed (the trainable parameters and their optimizer
   state, saved alone with zstd in the same round); delta save time vs a zstd save of the full
   state. Targets: bytes <= 1.1x, time <= 0.3x.
2. **bf16 weights at lr 1e-5**: the model cast to bf16, trained with AdamW and, separately, plain
   SGD at lr 1e-5 (bf16 rounding swallows most updates); checkpoints 10 steps apart. Delta bytes
   vs zstd bytes of the same state, per delta save and amortised over a keyframe cycle.
   Target: >= 10x fewer bytes per delta save.
3. **dense fp32 AdamW**: all parameters trainable. Delta bytes vs zstd bytes (requirement: never
   more), save times, and warm load time of the last delta checkpoint vs a zstd load.
4. **unchanged state**: the state of scenario 3's last checkpoint saved again with delta, a few
   times, interleaved with zstd saves of it. Target: bytes and time <= 5% of the zstd save.
5. **many small tensors**: a state of ``--small-tensors`` (default 100,000) tensors of 16 fp32
   each, saved a few times with 1% of them changed in between, delta and zstd interleaved.
   Target: a delta save takes no longer than a zstd save (it writes far less).
6. **reference run**: the reference APT loop (``python -m aptckpt.apt --epochs 3
   --temp-checkpoint-freq 10``, asynchronous saves) run once per backend and repetition; the
   share of its wall time blocked by checkpoints, as it prints it, and each save's
   ``blocked_s`` from the run's history. Target: delta blocks <= 1.5x the share zstd blocks.

Method: ratios are taken within a round (the same state, seconds apart) and the median of the
per-round ratios is reported; the order of the timed saves rotates from round to round; every
timed operation is preceded by ``gc.collect()`` and ``os.sync()`` (untimed). The last delta
checkpoint of every series is loaded and compared bit for bit with the state it saved.

Usage::

    python benchmarks/bench_delta.py --scale small --out benchmarks/_work/RESULTS-delta-small.md
    python benchmarks/bench_delta.py --scale full                    # writes RESULTS-delta.md
    python benchmarks/bench_delta.py --scale small --scenarios 1,4
    python benchmarks/bench_delta.py --scenarios 5,6 --small-tensors 20000 --reference-reps 1
    python benchmarks/bench_delta.py --from-json benchmarks/_work/results-delta-full-<stamp>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from any directory

import _sysutil
from _stats import fmt_bytes, fmt_s, median, table
from bench_backends import _log, _settle, _timed, check_nested, touch
from workload import GPT, ModelConfig, build_workload, describe, tensor_bytes, unique_tensors

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# gitignored: every file the benchmark writes goes here (BENCH_DELTA_WORKDIR: another folder,
# so that two runs -- before and after -- can go at once)
WORKDIR = Path(os.environ.get("BENCH_DELTA_WORKDIR") or HERE / "_work")
_rel = _sysutil.repo_relative
MANIFEST_NAME = "manifest.msgpack"

# Targets from the delta backend's brief.
TARGET_FROZEN_BYTES = 1.1  # delta bytes / zstd bytes of what changed, at most
TARGET_FROZEN_TIME = 0.3  # delta save time / zstd save time of the full state, at most
TARGET_BF16_FEWER = 10.0  # zstd bytes / delta bytes, at least
TARGET_DENSE_BYTES = 1.0  # delta bytes / zstd bytes, at most, for every checkpoint
TARGET_UNCHANGED = 0.05  # delta bytes and time / zstd, at most
TARGET_SMALL_TIME = 1.0  # delta save time / zstd save time of many small tensors, at most
TARGET_BLOCKED = 1.5  # delta's blocked share of the reference run / zstd's, at most
REFERENCE_ARGS = ["--epochs", "3", "--temp-checkpoint-freq", "10"]
REFERENCE_BACKENDS = ("zstd", "torch", "delta")

BF16_LR = 1e-5


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many checkpoints, steps and repetitions each scenario takes."""

    frozen_ckpts: int = 10
    frozen_steps: int = 3
    bf16_ckpts: int = 6
    bf16_steps: int = 10
    dense_ckpts: int = 6
    dense_steps: int = 3
    load_reps: int = 3
    unchanged_reps: int = 7
    small_saves: int = 4


# Same counts at both scales, so that "small" exercises the same keyframe positions.
PLANS = {"full": Plan(), "small": Plan()}


# ---------------------------------------------------------------------------------------------
# helpers


def raw_write(state: Any, path: Path) -> None:
    """The physical reference: write(2) of every distinct tensor's bytes into one file, fsync.

    Same as ``_sysutil.RawIO.write_buffered``, without RawIO's pre-touched read buffers (the
    size of the state), which this benchmark never reads into.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in unique_tensors(state).values():
            mv = memoryview(_sysutil.byte_view(t))
            while mv:
                mv = mv[os.write(fd, mv[: _sysutil.CHUNK]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_payload(path: Path) -> Any:
    """The backend payload of a committed checkpoint (for since_keyframe and the object table)."""
    from aptckpt import manifest as mf

    assert mf.MANIFEST_NAME == MANIFEST_NAME
    return mf.decode((path / MANIFEST_NAME).read_bytes(), where=str(path)).payload


def timed_save(aptckpt: Any, state: Any, path: Path, backend: str, **opts: Any) -> dict[str, Any]:
    """One timed ``aptckpt.save``: wall seconds (after settling) and the SaveInfo fields."""
    _settle()
    dt, info = _timed(lambda: aptckpt.save(state, path, backend=backend, overwrite=True, **opts))
    manifest = (path / MANIFEST_NAME).stat().st_size
    return {
        "seconds": dt,
        "info_seconds": info.seconds,
        "stored_bytes": info.stored_bytes,
        "manifest_bytes": manifest,
        # SaveInfo.stored_bytes leaves the manifest out (for every backend); a delta save of an
        # unchanged state writes nothing else, so the figures here add it.
        "written_bytes": info.stored_bytes + manifest,
        "raw_bytes": info.raw_bytes,
    }


def timed_raw(state: Any, path: Path) -> dict[str, Any]:
    _settle()
    dt, _ = _timed(lambda: raw_write(state, path))
    return {"seconds": dt, "bytes": path.stat().st_size}


def run_ops(ops: list[tuple[str, Callable[[], dict[str, Any]]]], rnd: int) -> dict[str, Any]:
    """Run one round's timed operations, the starting one rotating with the round number."""
    k = rnd % len(ops)
    out = {}
    for name, fn in ops[k:] + ops[:k]:
        out[name] = fn()
    return out


class DeltaChain:
    """A series of delta checkpoints in one run directory, each saved against the previous one."""

    def __init__(self, aptckpt: Any, run: Path, prefix: str = "ckpt") -> None:
        self.aptckpt, self.run, self.prefix = aptckpt, run, prefix
        self.prev: Path | None = None
        self.prev_names: set[bytes] = set()
        self.count = 0

    def save(self, state: Any, **opts: Any) -> dict[str, Any]:
        path = self.run / f"{self.prefix}-{self.count:03d}"
        rec = timed_save(self.aptckpt, state, path, "delta", base=self.prev, **opts)
        rec.update(self._describe(path))
        if not opts:  # a probe with other options does not extend the chain
            self.prev, self.prev_names = path, {row[0] for row in read_payload(path)["objects"]}
            self.count += 1
        return rec

    def _describe(self, path: Path) -> dict[str, Any]:
        p = read_payload(path)
        rows = p["objects"]
        new = [r for r in rows if r[0] not in self.prev_names]
        depth: list[int] = []
        for r in rows:  # a row's base is an earlier row
            depth.append(0 if r[5] is None else depth[r[5]] + 1)
        return {
            "path": path.name,
            "since_keyframe": p["since_keyframe"],
            "keyframe_every": p["keyframe_every"],
            "keyframe": p["since_keyframe"] == 0,
            # a tensor kept in the checkpoint's own shard (local_below) has nil here
            "chunks": sum(len(c) for c in p["chunks"] if c is not None)
            + sum(len(c) for c in (p.get("local") or {}).get("chunks", []) if c is not None),
            "objects": len(rows),
            "new_objects": len(new),
            "new_xor": sum(1 for r in new if r[5] is not None),
            "new_object_bytes": sum(r[1] for r in new),
            "new_raw_bytes": sum(r[2] for r in new),
            "max_chain": 1 + max(depth, default=0),  # objects decoded for the deepest chunk
        }


def installed_code(aptckpt: Any) -> dict[str, Any]:
    """Which aptckpt code this run imports: a fingerprint of its files, and its ``.py`` files
    compared with ``src/aptckpt`` at the repository's HEAD (others may commit, or reinstall the
    package into the venv, while a benchmark runs; the fingerprint is taken again at the end).
    """
    root = Path(aptckpt.__file__).resolve().parent
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    differ = []
    for f in files:
        if f.suffix != ".py":
            continue
        rel = f.relative_to(root).as_posix()
        at_head = subprocess.run([*git, "show", f"HEAD:src/aptckpt/{rel}"], capture_output=True)
        if at_head.returncode != 0 or at_head.stdout != f.read_bytes():
            differ.append(rel)
    return {
        "fingerprint": digest.hexdigest()[:16],
        "head": head.stdout.strip() or "unknown",
        "py_files": sum(1 for f in files if f.suffix == ".py"),
        "py_differ_from_head": differ,
    }


def make_batch(cfg: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=gen)


def train(model: GPT, opt: torch.optim.Optimizer, cfg: ModelConfig, gen: torch.Generator,
          steps: int) -> float:  # fmt: skip
    """``steps`` real optimizer steps on seeded random tokens (tiny batch: bytes, not learning)."""
    loss = torch.zeros(())
    for _ in range(steps):
        tokens = make_batch(cfg, gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab).float(), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def fresh_model(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> GPT:
    """The workload model with the workload's trained weights (copied, tie kept)."""
    model = GPT(cfg)
    model.load_state_dict(weights)
    assert model.lm_head.weight is model.wte.weight
    return model


def count_params(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def verify_load(aptckpt: Any, path: Path, state: Any) -> str:
    """Load ``path`` and compare it bit for bit with ``state``; 'ok' or the error."""
    try:
        check_nested(aptckpt.load(path), state)
        return "ok"
    except Exception as err:  # reported, not raised: the other figures still stand
        return f"{type(err).__name__}: {err}"
    finally:
        gc.collect()


def fresh_dir(path: Path) -> Path:
    _sysutil.remove(path)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------------------
# scenario 1: frozen backbone


def choose_trainable(model: GPT) -> tuple[str, list[torch.nn.Module]]:
    """Last block + final norm if that leaves >= 90% frozen, else the last block's MLP + norm."""
    total = count_params(list(model.parameters()))
    last = model.blocks[-1]
    options = [
        ("last transformer block + final LayerNorm", [last, model.ln_f]),
        (
            "last block's MLP (ln_2, c_fc, mlp_proj) + final LayerNorm",
            [last.ln_2, last.c_fc, last.mlp_proj, model.ln_f],
        ),
    ]
    for label, mods in options:
        n = count_params([p for m in mods for p in m.parameters()])
        if n / total <= 0.10:
            return label, mods
    raise RuntimeError("no trainable subset leaves >= 90% of the parameters frozen")


def scenario_frozen(aptckpt: Any, wl: Any, plan: Plan) -> dict[str, Any]:
    cfg = wl.config
    run = fresh_dir(WORKDIR / "delta-frozen")
    model = fresh_model(cfg, wl.state["model"])
    model.requires_grad_(False)
    label, mods = choose_trainable(model)
    for m in mods:
        m.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    n_total = count_params(list(model.parameters()))
    n_train = count_params(trainable)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    chain = DeltaChain(aptckpt, run)
    rounds: list[dict[str, Any]] = []
    meter = _sysutil.CpuMeter()
    step = 0
    state: dict[str, Any] = {}
    for k in range(plan.frozen_ckpts):
        loss = train(model, opt, cfg, gen, plan.frozen_steps)
        step += plan.frozen_steps
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
        changed = {
            "model": {n: t for n, t in state["model"].items() if n in names},
            "optimizer": state["optimizer"],
            "step": step,
        }
        ops = [
            ("delta", lambda s=state: chain.save(s)),
            ("zstd_full", lambda s=state: timed_save(aptckpt, s, run / "ref-zstd-full", "zstd")),
            ("zstd_changed", lambda c=changed: timed_save(aptckpt, c, run / "ref-zstd-ch", "zstd")),
            ("raw", lambda s=state: timed_raw(s, run / "ref-raw.bin")),
        ]
        r = run_ops(ops, k)
        r["loss"] = loss
        r["step"] = step
        rounds.append(r)
        for ref in ("ref-zstd-full", "ref-zstd-ch", "ref-raw.bin"):
            _sysutil.remove(run / ref)
        d = r["delta"]
        _log(
            f"[frozen {k + 1}/{plan.frozen_ckpts}] delta {_b(d['written_bytes'])} "
            f"(since_keyframe {d['since_keyframe']}) {d['seconds']:.3f} s; changed-zstd "
            f"{_b(r['zstd_changed']['written_bytes'])}; zstd full "
            f"{_b(r['zstd_full']['written_bytes'])} {r['zstd_full']['seconds']:.3f} s; "
            f"raw {r['raw']['seconds']:.3f} s"
        )
    cpu = meter.read()
    check = verify_load(aptckpt, chain.prev, state) if chain.prev else "no checkpoint"
    out = {
        "trainable": label,
        "params_total": n_total,
        "params_trainable": n_train,
        "state_bytes": tensor_bytes(state),
        "changed_bytes": tensor_bytes({"m": [p.data for p in trainable], "o": state["optimizer"]}),
        "steps_between": plan.frozen_steps,
        "rounds": rounds,
        "cpu": cpu,
        "verify_last": check,
        "loadavg_end": _sysutil.loadavg(),
    }
    _sysutil.remove(run)
    return out


# ---------------------------------------------------------------------------------------------
# scenario 2: bf16 weights at lr 1e-5


def _bf16_changed(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Fraction of bf16 elements (by bit pattern) and number of tensors that changed."""
    changed = total = tensors = 0
    seen: set[int] = set()
    for name, t in after.items():
        if t.untyped_storage().data_ptr() in seen:
            continue  # the tied tensor once
        seen.add(t.untyped_storage().data_ptr())
        n = int((t.view(torch.int16) != before[name].view(torch.int16)).sum())
        changed, total, tensors = changed + n, total + t.numel(), tensors + (n > 0)
    return {"elements_changed": changed / total, "tensors_changed": tensors, "tensors": len(seen)}


def scenario_bf16(aptckpt: Any, wl: Any, plan: Plan, optimizer: str) -> dict[str, Any]:
    cfg = wl.config
    run = fresh_dir(WORKDIR / f"delta-bf16-{optimizer}")
    model = fresh_model(cfg, wl.state["model"]).to(torch.bfloat16)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=BF16_LR, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=BF16_LR)  # no momentum: no optimizer state
    gen = torch.Generator().manual_seed(cfg.seed + 12)
    # Two chains in sub-directories of the run (each with its own store): the weights snapshot
    # (the target) and, for AdamW, the full training state with the bf16 moments.
    keys = ["weights", "full"] if optimizer == "adamw" else ["weights"]
    chains = {key: DeltaChain(aptckpt, fresh_dir(run / key)) for key in keys}
    rounds: list[dict[str, Any]] = []
    meter = _sysutil.CpuMeter()
    step = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def snapshot(step: int) -> dict[str, Any]:
        weights = model.state_dict()
        out = {"weights": {"model": weights, "step": step}}
        if "full" in chains:
            out["full"] = {"model": weights, "optimizer": opt.state_dict(), "step": step}
        return out

    states: dict[str, Any] = {}
    for k in range(plan.bf16_ckpts):
        loss = train(model, opt, cfg, gen, plan.bf16_steps)
        step += plan.bf16_steps
        states = snapshot(step)
        weights = states["weights"]["model"]
        ops: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        for key, chain in chains.items():
            ops.append((f"delta_{key}", lambda c=chain, s=states[key]: c.save(s)))
            ref = run / key / "ref-zstd"
            ops.append(
                (f"zstd_{key}", lambda s=states[key], p=ref: timed_save(aptckpt, s, p, "zstd"))
            )
        r = run_ops(ops, k)
        r["changed"] = _bf16_changed(before, weights)
        r["loss"] = loss
        r["step"] = step
        rounds.append(r)
        before = {n: v.clone() for n, v in weights.items()}
        for key in chains:
            _sysutil.remove(run / key / "ref-zstd")
        _log(
            f"[bf16-{optimizer} {k + 1}/{plan.bf16_ckpts}] "
            + "; ".join(
                f"{key}: delta {_b(r[f'delta_{key}']['written_bytes'])} vs zstd "
                f"{_b(r[f'zstd_{key}']['written_bytes'])}"
                for key in chains
            )
            + f"; {100 * r['changed']['elements_changed']:.3f}% of elements changed"
        )
    checks = {key: verify_load(aptckpt, c.prev, states[key]) if c.prev else "none"
              for key, c in chains.items()}  # fmt: skip
    # A keyframe's cost: the next checkpoint (as many steps on) saved against the last one with
    # keyframe_every = its since_keyframe + 1, so that it is a keyframe and reuses what the next
    # real keyframe of the cycle would reuse (every object its base reaches is shallower than
    # that; each aptckpt version's own keyframe rule applies). It is the last save of the
    # chain, so it changes no figure above.
    train(model, opt, cfg, gen, plan.bf16_steps)
    step += plan.bf16_steps
    next_states = snapshot(step)
    probes = {}
    for key, chain in chains.items():
        last = read_payload(chain.prev)["since_keyframe"] if chain.prev else 0
        probes[key] = chain.save(next_states[key], keyframe_every=last + 1)
        assert probes[key]["keyframe"]
        _log(f"[bf16-{optimizer}] {key}: keyframe probe {_b(probes[key]['written_bytes'])}")
    cpu = meter.read()
    out = {
        "optimizer": optimizer,
        "lr": BF16_LR,
        "steps_between": plan.bf16_steps,
        "weights_bytes": tensor_bytes(states["weights"]),
        "full_bytes": tensor_bytes(states["full"]) if "full" in states else None,
        "rounds": rounds,
        "keyframe_probe": probes,
        "cpu": cpu,
        "verify_last": checks,
        "loadavg_end": _sysutil.loadavg(),
    }
    _sysutil.remove(run)
    return out


# ---------------------------------------------------------------------------------------------
# scenario 5: many small tensors


def _store_files(run: Path) -> int:
    store = run / "aptckpt-store"
    return sum(
        len(os.listdir(store / sub)) for sub in ("objects", "packs") if (store / sub).is_dir()
    )


def scenario_small(aptckpt: Any, plan: Plan, count: int) -> dict[str, Any]:
    run = fresh_dir(WORKDIR / "delta-small")
    gen = torch.Generator().manual_seed(5)
    state = {f"t{i:06d}": torch.randn(16, generator=gen) for i in range(count)}
    chain = DeltaChain(aptckpt, run)
    rounds: list[dict[str, Any]] = []
    meter = _sysutil.CpuMeter()
    for k in range(plan.small_saves):
        for i in range(k % 100, count, 100) if k else ():  # 1% of the tensors change
            state[f"t{i:06d}"].add_(1.0)
        files_before = _store_files(run)

        def delta_save(s: Any = state, before: int = files_before) -> dict[str, Any]:
            rec = chain.save(s)
            rec["store_files"] = _store_files(run) - before
            return rec

        ops = [
            ("delta", delta_save),
            ("zstd", lambda s=state: timed_save(aptckpt, s, run / "ref-zstd", "zstd")),
        ]
        r = run_ops(ops, k)
        rounds.append(r)
        _sysutil.remove(run / "ref-zstd")
        _log(
            f"[small {k + 1}/{plan.small_saves}] delta {r['delta']['seconds']:.2f} s "
            f"{_b(r['delta']['written_bytes'])} ({r['delta']['store_files']} store files); "
            f"zstd {r['zstd']['seconds']:.2f} s {_b(r['zstd']['written_bytes'])}"
        )
    check = verify_load(aptckpt, chain.prev, state) if chain.prev else "no checkpoint"
    out = {
        "tensors": count,
        "state_bytes": tensor_bytes(state),
        "rounds": rounds,
        "cpu": meter.read(),
        "verify_last": check,
        "loadavg_end": _sysutil.loadavg(),
    }
    _sysutil.remove(run)
    return out


# ---------------------------------------------------------------------------------------------
# scenario 6: the reference run's blocked share per backend

_BLOCKED = re.compile(r"blocked on checkpoints ([0-9.]+)s = ([0-9.]+)% of ([0-9.]+)s wall")


def reference_run(aptckpt: Any, backend: str, run: Path) -> dict[str, Any]:
    """One reference run (``python -m aptckpt.apt``) with ``backend``, importing the same
    aptckpt as this benchmark; its printed blocked share and its history's saves."""
    _settle()
    env = dict(os.environ)
    code = str(Path(aptckpt.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "aptckpt.apt", *REFERENCE_ARGS, "--checkpoint-dir", str(run),
           "--backend", backend, "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    found = _BLOCKED.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"reference run with {backend} failed: {proc.stdout}{proc.stderr}")
    saves = aptckpt.CheckpointManager(run).history().saves
    return {
        "backend": backend,
        "blocked_s": float(found.group(1)),
        "blocked_pct": float(found.group(2)),
        "wall_s": float(found.group(3)),
        "saves": len(saves),
        "save_blocked_s": [e.blocked_s for e in saves],
        "save_s": [e.save_s for e in saves],
        "bytes_written": [e.bytes_written for e in saves],
    }


def scenario_reference(aptckpt: Any, reps: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in REFERENCE_BACKENDS}
    meter = _sysutil.CpuMeter()
    for k in range(reps):
        order = REFERENCE_BACKENDS if k % 2 == 0 else REFERENCE_BACKENDS[::-1]
        for backend in order:
            run = fresh_dir(WORKDIR / f"delta-reference-{backend}")
            r = reference_run(aptckpt, backend, run)
            runs[backend].append(r)
            _sysutil.remove(run)
            _log(
                f"[reference {k + 1}/{reps}] {backend}: blocked {r['blocked_s']:.3f} s = "
                f"{r['blocked_pct']:.2f}% of {r['wall_s']:.1f} s, {r['saves']} saves"
            )
    return {
        "args": REFERENCE_ARGS,
        "reps": reps,
        "runs": runs,
        "cpu": meter.read(),
        "loadavg_end": _sysutil.loadavg(),
    }


# ---------------------------------------------------------------------------------------------
# scenarios 3 and 4: dense fp32 AdamW, then the unchanged state again


def scenario_dense(aptckpt: Any, wl: Any, plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scenario 3; returns its results and what scenario 4 continues from (chain, state)."""
    cfg = wl.config
    run = fresh_dir(WORKDIR / "delta-dense")
    model = fresh_model(cfg, wl.state["model"])
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt.load_state_dict(wl.state["optimizer"])  # continue the workload's training
    gen = torch.Generator().manual_seed(cfg.seed + 13)
    chain = DeltaChain(aptckpt, run)
    rounds: list[dict[str, Any]] = []
    meter = _sysutil.CpuMeter()
    step = int(wl.state["step"])
    state: dict[str, Any] = {}
    for k in range(plan.dense_ckpts):
        loss = train(model, opt, cfg, gen, plan.dense_steps)
        step += plan.dense_steps
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
        _sysutil.remove(run / "ref-zstd")
        ops = [
            ("delta", lambda s=state: chain.save(s)),
            ("zstd", lambda s=state: timed_save(aptckpt, s, run / "ref-zstd", "zstd")),
            ("raw", lambda s=state: timed_raw(s, run / "ref-raw.bin")),
        ]
        r = run_ops(ops, k)
        r["loss"] = loss
        r["step"] = step
        rounds.append(r)
        _sysutil.remove(run / "ref-raw.bin")
        d, z = r["delta"], r["zstd"]
        _log(
            f"[dense {k + 1}/{plan.dense_ckpts}] delta {_b(d['written_bytes'])} "
            f"{d['seconds']:.3f} s (since_keyframe {d['since_keyframe']}, {d['new_xor']} xor / "
            f"{d['new_objects']} new objects); zstd {_b(z['written_bytes'])} "
            f"{z['seconds']:.3f} s; raw {r['raw']['seconds']:.3f} s"
        )
    model.requires_grad_(False)
    assert chain.prev is not None
    # Warm loads of the last delta checkpoint and of the same state's zstd checkpoint: one
    # untimed, verified load of each first (it also fills the page cache), then interleaved.
    paths = {"delta": chain.prev, "zstd": run / "ref-zstd"}
    checks = {key: verify_load(aptckpt, p, state) for key, p in paths.items()}
    loads: dict[str, list[float]] = {key: [] for key in paths}
    order = list(paths)
    for rep in range(plan.load_reps):
        for key in order[rep % 2 :] + order[: rep % 2]:
            _settle()
            dt, loaded = _timed(lambda p=paths[key]: touch(aptckpt.load(p)))
            del loaded
            loads[key].append(dt)
            _log(f"[dense load {rep + 1}/{plan.load_reps}] {key}: warm {dt:.3f} s")
    gc.collect()
    _sysutil.remove(run / "ref-zstd")
    out = {
        "state_bytes": tensor_bytes(state),
        "steps_between": plan.dense_steps,
        "rounds": rounds,
        "loads": loads,
        "load_chain_depth": rounds[-1]["delta"]["since_keyframe"] + 1,
        "load_max_chain": rounds[-1]["delta"]["max_chain"],
        "verify_last": checks,
        "cpu": meter.read(),
        "loadavg_end": _sysutil.loadavg(),
    }
    del model, opt
    return out, {"chain": chain, "state": state, "run": run}


def scenario_unchanged(aptckpt: Any, plan: Plan, chain: DeltaChain, state: Any,
                       run: Path) -> dict[str, Any]:  # fmt: skip
    """Scenario 4: the exact state of the chain's last checkpoint saved again, interleaved."""
    meter = _sysutil.CpuMeter()
    rounds = []
    for rep in range(plan.unchanged_reps):
        ops = [
            ("delta", lambda: chain.save(state)),
            ("zstd", lambda: timed_save(aptckpt, state, run / "ref-zstd", "zstd")),
        ]
        r = run_ops(ops, rep)
        rounds.append(r)
        _sysutil.remove(run / "ref-zstd")
        d, z = r["delta"], r["zstd"]
        _log(
            f"[unchanged {rep + 1}/{plan.unchanged_reps}] delta {_b(d['written_bytes'])} "
            f"{d['seconds']:.3f} s (since_keyframe {d['since_keyframe']}); zstd "
            f"{_b(z['written_bytes'])} {z['seconds']:.3f} s"
        )
    check = verify_load(aptckpt, chain.prev, state) if chain.prev else "none"
    return {
        "state_bytes": tensor_bytes(state),
        "rounds": rounds,
        "verify_last": check,
        "cpu": meter.read(),
        "loadavg_end": _sysutil.loadavg(),
    }


# ---------------------------------------------------------------------------------------------
# report


def _b(n: float | None) -> str:
    """Bytes: kB below 0.1 MB (manifests), else as ``_stats.fmt_bytes``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    return f"{n / 1e3:.1f} kB" if n < 100e3 else fmt_bytes(int(n))


def _ok(met: bool) -> str:
    return "**met**" if met else "**MISSED**"


def _x(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.2f}x"


def _x3(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.3f}x"


def _pct(v: float, digits: int = 1) -> str:
    return "—" if math.isnan(v) else f"{100 * v:.{digits}f}%"


def _spread(xs: list[float], fmt: Callable[[float], str]) -> str:
    if not xs:
        return "—"
    return f"{fmt(median(xs))} [{fmt(min(xs))}-{fmt(max(xs))}]"


def _cpu_line(cpu: dict[str, float], loadavg_end: str) -> str:
    return (
        f"CPU busy outside this process during the scenario: {100 * cpu['foreign']:.0f}% of "
        f"all vCPUs (hypervisor steal {100 * cpu['steal']:.0f}%); load average at its end "
        f"{loadavg_end}."
    )


def _kind(d: dict[str, Any], first: bool) -> str:
    if first:
        return "first (keyframe, no base)"
    return "**keyframe**" if d["keyframe"] else f"delta (since_keyframe {d['since_keyframe']})"


def _new(d: dict[str, Any]) -> str:
    return f"{d['new_objects']} of {d['chunks']} ({d['new_xor']} xor)"


def summarize(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: what, measured, met."""
    rows: list[dict[str, Any]] = []
    if "frozen" in res:
        rs = res["frozen"]["rounds"][1:]
        deltas = [r for r in rs if not r["delta"]["keyframe"]]
        b = [r["delta"]["written_bytes"] / r["zstd_changed"]["written_bytes"] for r in deltas]
        t = [r["delta"]["seconds"] / r["zstd_full"]["seconds"] for r in deltas]
        rows.append({
            "scenario": "1 frozen backbone",
            "target": f"delta bytes / zstd bytes of what changed <= {TARGET_FROZEN_BYTES}x",
            "measured": f"median {_x3(median(b))}, worst {_x3(max(b, default=math.nan))} "
                        f"over {len(b)} delta saves",
            "met": bool(b) and max(b) <= TARGET_FROZEN_BYTES,
        })  # fmt: skip
        rows.append({
            "scenario": "1 frozen backbone",
            "target": f"delta save time / zstd save time (full state) <= {TARGET_FROZEN_TIME}x",
            "measured": f"median {_x3(median(t))} [{_x3(min(t, default=math.nan))}-"
                        f"{_x3(max(t, default=math.nan))}] over {len(t)} delta saves",
            "met": bool(t) and median(t) <= TARGET_FROZEN_TIME,
        })  # fmt: skip
    for opt in ("adamw", "sgd"):
        key = f"bf16-{opt}"
        if key not in res:
            continue
        rs = [r for r in res[key]["rounds"][1:] if not r["delta_weights"]["keyframe"]]
        f = [r["zstd_weights"]["written_bytes"] / r["delta_weights"]["written_bytes"] for r in rs]
        am = bf16_amortised(res[key], "weights")
        rows.append({
            "scenario": f"2 bf16 weights, {'AdamW' if opt == 'adamw' else 'SGD'} lr 1e-5",
            "target": f"zstd bytes / delta bytes >= {TARGET_BF16_FEWER:.0f}x (per delta save)",
            "measured": f"median {_x3(median(f))}, worst {_x3(min(f, default=math.nan))} over "
                        f"{len(f)} delta saves; amortised over a keyframe cycle "
                        f"{_x3(am['ratio'])}",
            "met": bool(f) and min(f) >= TARGET_BF16_FEWER,
        })  # fmt: skip
    if "dense" in res:
        rs = res["dense"]["rounds"]
        b = [r["delta"]["written_bytes"] / r["zstd"]["written_bytes"] for r in rs]
        rows.append({
            "scenario": "3 dense fp32 AdamW",
            "target": "delta bytes <= zstd bytes, every checkpoint",
            "measured": f"delta/zstd worst {_x3(max(b))}, median {_x3(median(b))} over "
                        f"{len(b)} checkpoints",
            "met": max(b) <= TARGET_DENSE_BYTES,
        })  # fmt: skip
    if "unchanged" in res:
        rs = [r for r in res["unchanged"]["rounds"] if not r["delta"]["keyframe"]]
        b = [r["delta"]["written_bytes"] / r["zstd"]["written_bytes"] for r in rs]
        t = [r["delta"]["seconds"] / r["zstd"]["seconds"] for r in rs]
        rows.append(
            {
                "scenario": "4 unchanged state",
                "target": f"delta bytes <= {TARGET_UNCHANGED:.0%} of a zstd save",
                "measured": f"median {_pct(median(b), 3)} over {len(b)} non-keyframe re-saves",
                "met": bool(b) and median(b) <= TARGET_UNCHANGED,
            }
        )
        rows.append({
            "scenario": "4 unchanged state",
            "target": f"delta save time <= {TARGET_UNCHANGED:.0%} of a zstd save",
            "measured": f"median {_pct(median(t))} [{_pct(min(t, default=math.nan))}-"
                        f"{_pct(max(t, default=math.nan))}] over {len(t)} non-keyframe re-saves",
            "met": bool(t) and median(t) <= TARGET_UNCHANGED,
        })  # fmt: skip
    if "small" in res:
        rs = res["small"]["rounds"][1:]
        t = [r["delta"]["seconds"] / r["zstd"]["seconds"] for r in rs]
        rows.append({
            "scenario": f"5 {res['small']['tensors']:,} small tensors",
            "target": f"delta save time / zstd save time <= {TARGET_SMALL_TIME}x (saves after "
                      "the first)",
            "measured": f"median {_x3(median(t))} [{_x3(min(t, default=math.nan))}-"
                        f"{_x3(max(t, default=math.nan))}] over {len(t)} saves",
            "met": bool(t) and median(t) <= TARGET_SMALL_TIME,
        })  # fmt: skip
    if "reference" in res:
        runs = res["reference"]["runs"]
        share = {b: median([r["blocked_pct"] for r in rs]) for b, rs in runs.items()}
        rows.append({
            "scenario": "6 reference run",
            "target": f"delta blocked share / zstd's <= {TARGET_BLOCKED}x",
            "measured": ", ".join(f"{b} {share[b]:.2f}%" for b in runs)
                        + f" (median of {res['reference']['reps']})",
            "met": share["delta"] <= TARGET_BLOCKED * share["zstd"],
        })  # fmt: skip
    return rows


def bf16_amortised(r: dict[str, Any], key: str) -> dict[str, Any]:
    """Bytes per save over one keyframe cycle: one keyframe (the probe) + (K-1) delta saves."""
    rounds = r["rounds"]
    deltas = [x[f"delta_{key}"]["written_bytes"] for x in rounds[1:]
              if not x[f"delta_{key}"]["keyframe"]]  # fmt: skip
    zstd = median([x[f"zstd_{key}"]["written_bytes"] for x in rounds])
    every = rounds[0][f"delta_{key}"]["keyframe_every"]
    kf = r["keyframe_probe"][key]["written_bytes"]
    per_save = (kf + (every - 1) * median(deltas)) / every if deltas else math.nan
    return {
        "keyframe_every": every,
        "keyframe_bytes": kf,
        "first_bytes": rounds[0][f"delta_{key}"]["written_bytes"],
        "delta_median": median(deltas),
        "per_save": per_save,
        "zstd_median": zstd,
        "ratio": zstd / per_save if per_save else math.nan,
        "bound": every * zstd / kf if kf else math.nan,
    }


def render_frozen(r: dict[str, Any]) -> list[str]:
    rows = []
    for i, x in enumerate(r["rounds"]):
        d, zc, zf, raw = x["delta"], x["zstd_changed"], x["zstd_full"], x["raw"]
        rows.append([
            str(i + 1),
            _kind(d, i == 0),
            _b(d["written_bytes"]),
            _b(zc["written_bytes"]),
            "— (whole state)" if i == 0 else _x(d["written_bytes"] / zc["written_bytes"]),
            _new(d),
            f"{d['seconds']:.3f}",
            f"{zf['seconds']:.3f}",
            _x(d["seconds"] / zf["seconds"]),
            f"{zc['seconds']:.3f}",
            f"{raw['seconds']:.3f}",
        ])  # fmt: skip
    later = r["rounds"][1:]
    dl = [x for x in later if not x["delta"]["keyframe"]]
    kf = [x for x in later if x["delta"]["keyframe"]]

    def agg(xs: list[dict[str, Any]], label: str) -> list[str]:
        return [
            label,
            f"{len(xs)} saves",
            _spread([x["delta"]["written_bytes"] for x in xs], _b),
            _spread([x["zstd_changed"]["written_bytes"] for x in xs], _b),
            _spread([x["delta"]["written_bytes"] / x["zstd_changed"]["written_bytes"] for x in xs],
                    _x),
            "",
            _spread([x["delta"]["seconds"] for x in xs], lambda v: f"{v:.3f}"),
            _spread([x["zstd_full"]["seconds"] for x in xs], lambda v: f"{v:.3f}"),
            _spread([x["delta"]["seconds"] / x["zstd_full"]["seconds"] for x in xs], _x),
            _spread([x["zstd_changed"]["seconds"] for x in xs], lambda v: f"{v:.3f}"),
            _spread([x["raw"]["seconds"] for x in xs], lambda v: f"{v:.3f}"),
        ]  # fmt: skip

    summary = [agg(dl, "**delta saves**")] + ([agg(kf, "**keyframe saves**")] if kf else [])
    every = r["rounds"][0]["delta"]["keyframe_every"]
    kf_idx = [str(i + 1) for i, x in enumerate(r["rounds"]) if i and x["delta"]["keyframe"]]
    raw_gbps = r["state_bytes"] / median([x["raw"]["seconds"] for x in r["rounds"]]) / 1e9
    head = [
        "checkpoint", "kind", "delta written", "changed, zstd", "delta / changed",
        "new objects (of chunks)", "delta save s", "zstd full save s", "delta / zstd time",
        "zstd changed save s", "raw write+fsync s",
    ]  # fmt: skip
    return [
        "## 1. Frozen-backbone fine-tuning",
        "",
        f"Trainable: {r['trainable']} = {r['params_trainable']:,} of {r['params_total']:,} "
        f"parameters (**{100 * r['params_trainable'] / r['params_total']:.2f}% trainable, "
        f"{100 * (1 - r['params_trainable'] / r['params_total']):.2f}% frozen**, the tied "
        f"embedding counted once); AdamW (lr from the workload) over the trainable ones only; "
        f"{r['steps_between']} optimizer steps between checkpoints. Saved state "
        f"`{{model: state_dict, optimizer: state_dict, step}}` = {_b(r['state_bytes'])} "
        f"of tensors, of which {_b(r['changed_bytes'])} (trainable weights + their AdamW "
        f"state) change between checkpoints. *Changed, zstd*: those tensors alone (plus the "
        f"optimizer's param groups and the step) saved with `backend='zstd'` in the same round. "
        f"*Raw write*: `write(2)` of all {_b(r['state_bytes'])} of tensor bytes + fsync "
        f"({raw_gbps:.2f} GB/s at the median).",
        "",
        f"`keyframe_every` = {every} (the default). Keyframe saves among checkpoints 2..: "
        f"{', '.join(kf_idx) or 'none'} (`since_keyframe` back to 0); they are listed and "
        "aggregated separately below. Targets apply to the delta saves.",
        "",
        table(head, rows),
        "",
        "Aggregates over checkpoints 2.., median [min-max]:",
        "",
        table(head, summary),
        "",
        f"Last delta checkpoint loaded and compared bit for bit with the saved state: "
        f"{r['verify_last']}.",
        "",
        _cpu_line(r["cpu"], r["loadavg_end"]),
        "",
    ]


def render_bf16(r: dict[str, Any]) -> list[str]:
    name = "AdamW" if r["optimizer"] == "adamw" else "SGD (no momentum)"
    has_full = r["full_bytes"] is not None
    rows = []
    for i, x in enumerate(r["rounds"]):
        d, z = x["delta_weights"], x["zstd_weights"]
        row = [
            str(i + 1),
            _kind(d, i == 0),
            f"{100 * x['changed']['elements_changed']:.3f}%",
            f"{x['changed']['tensors_changed']} / {x['changed']['tensors']}",
            _b(d["written_bytes"]),
            _b(z["written_bytes"]),
            _x(z["written_bytes"] / d["written_bytes"]),
            _new(d),
            f"{d['seconds']:.3f}",
            f"{z['seconds']:.3f}",
        ]
        if has_full:
            df, zf = x["delta_full"], x["zstd_full"]
            row += [_b(df["written_bytes"]), _b(zf["written_bytes"]),
                    _x(zf["written_bytes"] / df["written_bytes"])]  # fmt: skip
        rows.append(row)
    head = [
        "checkpoint", "kind", "bf16 elements changed since previous", "tensors changed",
        "delta written", "zstd written", "zstd / delta", "new objects (of chunks)", "delta save s",
        "zstd save s",
    ]  # fmt: skip
    if has_full:
        head += ["full state: delta", "full state: zstd", "full: zstd / delta"]
    am = bf16_amortised(r, "weights")
    lines = [
        f"### 2{'a' if r['optimizer'] == 'adamw' else 'b'}. {name}, lr {r['lr']:g}",
        "",
        f"The workload model cast to bf16 (parameters in bf16, no fp32 master copy), trained with "
        f"{name} at lr {r['lr']:g}, {r['steps_between']} steps between checkpoints. Saved "
        f"state: `{{model: bf16 state_dict, step}}` = {_b(r['weights_bytes'])} of tensors"
        + (
            f"; the *full state* columns add the optimizer's state_dict (bf16 AdamW moments, "
            f"{_b(r['full_bytes'])} in all) in a second chain, for information, no target."
            if has_full
            else "; plain SGD holds no per-parameter state, so this is the whole training state."
        ),
        "",
        table(head, rows),
        "",
        f"Amortised over a keyframe cycle (`keyframe_every` = {am['keyframe_every']}): one "
        f"keyframe + {am['keyframe_every'] - 1} delta saves. The keyframe's cost is measured on "
        f"the next checkpoint ({r['steps_between']} more steps), saved against the last one with "
        f"`keyframe_every` = its `since_keyframe` + 1, so that it is a keyframe that reuses "
        f"what the next real keyframe would: "
        f"{_b(am['keyframe_bytes'])} (first save of the series: "
        f"{_b(am['first_bytes'])}). Per save: ({_b(am['keyframe_bytes'])} + "
        f"{am['keyframe_every'] - 1} x {_b(am['delta_median'])}) / "
        f"{am['keyframe_every']} = {_b(am['per_save'])}, vs zstd "
        f"{_b(am['zstd_median'])} per save: **{_x(am['ratio'])} fewer bytes** "
        f"(with a keyframe as large as this one, no cycle of {am['keyframe_every']} can do "
        f"better than {_x(am['bound'])}).",
    ]
    if has_full:
        amf = bf16_amortised(r, "full")
        lines += [
            "",
            f"Full state (with moments), amortised the same way: keyframe "
            f"{_b(amf['keyframe_bytes'])}, per save {_b(amf['per_save'])} vs "
            f"zstd {_b(amf['zstd_median'])}: {_x(amf['ratio'])} fewer bytes.",
        ]
    lines += [
        "",
        "Last delta checkpoint of each series loaded and compared bit for bit: "
        + ", ".join(f"{k} {v}" for k, v in r["verify_last"].items())
        + ".",
        "",
        _cpu_line(r["cpu"], r["loadavg_end"]),
        "",
    ]
    return lines


def render_dense(r: dict[str, Any]) -> list[str]:
    rows = []
    for i, x in enumerate(r["rounds"]):
        d, z, raw = x["delta"], x["zstd"], x["raw"]
        rows.append([
            str(i + 1),
            _kind(d, i == 0),
            _b(d["written_bytes"]),
            _b(z["written_bytes"]),
            _x(d["written_bytes"] / z["written_bytes"]),
            _new(d),
            f"{d['seconds']:.3f}",
            f"{z['seconds']:.3f}",
            _x(d["seconds"] / z["seconds"]),
            f"{raw['seconds']:.3f}",
        ])  # fmt: skip
    ld, lz = r["loads"]["delta"], r["loads"]["zstd"]
    lratio = [a / b for a, b in zip(ld, lz, strict=True)]
    return [
        "## 3. Dense fp32 AdamW training",
        "",
        f"All parameters trainable; the workload's model and AdamW state, trained on for "
        f"{r['steps_between']} steps between checkpoints. Saved state `{{model, optimizer, step}}` "
        f"= {_b(r['state_bytes'])} of tensors.",
        "",
        table(
            [
                "checkpoint",
                "kind",
                "delta written",
                "zstd written",
                "delta / zstd",
                "new objects (of chunks)",
                "delta save s",
                "zstd save s",
                "delta / zstd time",
                "raw write+fsync s",
            ],
            rows,
        ),
        "",
        f"Warm load (after one untimed load of each), {len(ld)} interleaved repetitions, "
        f"`aptckpt.load` with digest verification, then one byte read per page:",
        "",
        table(
            ["checkpoint", "seconds, median [min-max]", "vs zstd load (time ratio)"],
            [
                [
                    f"last delta checkpoint ({_chain(r)})",
                    fmt_s(ld),
                    _x(median(lratio)),
                ],
                ["zstd checkpoint of the same state", fmt_s(lz), "1.00x"],
            ],
        ),
        "",
        "Loaded and compared bit for bit with the saved state: "
        + ", ".join(f"{k} {v}" for k, v in r["verify_last"].items())
        + ".",
        "",
        _cpu_line(r["cpu"], r["loadavg_end"]),
        "",
    ]


def _chain(r: dict[str, Any]) -> str:
    """The last delta checkpoint's position in its keyframe cycle and, if recorded, its longest
    chain (older JSON dumps only bound it by the position)."""
    since = r["load_chain_depth"] - 1
    if "load_max_chain" in r:
        return f"`since_keyframe` {since}, longest chain {r['load_max_chain']} objects"
    return f"`since_keyframe` {since}: chains of at most {since + 1} objects"


def render_unchanged(r: dict[str, Any]) -> list[str]:
    rows = []
    for i, x in enumerate(r["rounds"]):
        d, z = x["delta"], x["zstd"]
        rows.append([
            str(i + 1),
            "**keyframe**" if d["keyframe"] else f"delta (since_keyframe {d['since_keyframe']})",
            _b(d["written_bytes"]),
            _b(z["written_bytes"]),
            _pct(d["written_bytes"] / z["written_bytes"], 3),
            str(d["new_objects"]),
            f"{d['seconds']:.3f}",
            f"{z['seconds']:.3f}",
            _pct(d["seconds"] / z["seconds"]),
        ])  # fmt: skip
    kf = [i + 1 for i, x in enumerate(r["rounds"]) if x["delta"]["keyframe"]]
    return [
        "## 4. Saving an unchanged state again",
        "",
        f"The state of scenario 3's last checkpoint ({_b(r['state_bytes'])}), saved again "
        f"with delta against the previous checkpoint of the same chain, {len(r['rounds'])} times, "
        f"each round interleaved with a zstd save of the same state (order alternating). "
        f"The chain continues scenario 3's, so its `since_keyframe` counter runs on"
        + (
            f"; re-save {', '.join(map(str, kf))} falls on a keyframe -- it is shown but left "
            f"out of the target medians."
            if kf
            else "."
        ),
        "",
        table(
            [
                "re-save",
                "kind",
                "delta written",
                "zstd written",
                "delta / zstd bytes",
                "new objects",
                "delta save s",
                "zstd save s",
                "delta / zstd time",
            ],
            rows,
        ),
        "",
        f"Last re-saved checkpoint loaded and compared bit for bit: {r['verify_last']}.",
        "",
        _cpu_line(r["cpu"], r["loadavg_end"]),
        "",
    ]


def render_small(r: dict[str, Any]) -> list[str]:
    head = ["save", "kind", "delta written", "zstd written", "new store files", "delta save s",
            "zstd save s", "delta / zstd time"]  # fmt: skip
    rows = []
    for i, x in enumerate(r["rounds"], 1):
        d, z = x["delta"], x["zstd"]
        rows.append([
            str(i), _kind(d, i == 1), _b(d["written_bytes"]), _b(z["written_bytes"]),
            str(d["store_files"]), f"{d['seconds']:.3f}", f"{z['seconds']:.3f}",
            _x(d["seconds"] / z["seconds"]),
        ])  # fmt: skip
    return [
        "## 5. Many small tensors",
        "",
        f"{r['tensors']:,} tensors of 16 fp32 each ({_b(r['state_bytes'])} of tensors), saved "
        f"{len(r['rounds'])} times with delta (each against the previous) and zstd, the order "
        f"alternating; 1% of the tensors change between saves. *New store files*: files the "
        f"delta save added to the store (loose objects and packs).",
        "",
        table(head, rows),
        "",
        f"Last delta checkpoint loaded and compared bit for bit: {r['verify_last']}.",
        "",
        _cpu_line(r["cpu"], r["loadavg_end"]),
        "",
    ]


def render_reference(r: dict[str, Any]) -> list[str]:
    head = ["backend", "blocked share of wall time", "blocked s", "wall s", "saves",
            "blocked per save, ms", "save until committed, s"]  # fmt: skip
    rows = []
    for backend, runs in r["runs"].items():
        per_save = [1000 * b for x in runs for b in x["save_blocked_s"]]
        commit = [s for x in runs for s in x["save_s"]]
        rows.append([
            backend,
            _spread([x["blocked_pct"] / 100 for x in runs], _pct),
            fmt_s([x["blocked_s"] for x in runs]), fmt_s([x["wall_s"] for x in runs]),
            str(runs[0]["saves"]),
            f"{median(per_save):.1f} [{min(per_save):.1f}-{max(per_save):.1f}]",
            fmt_s(commit),
        ])  # fmt: skip
    return [
        "## 6. Reference run: time blocked by checkpoints",
        "",
        f"`python -m aptckpt.apt {' '.join(r['args'])} --checkpoint-dir D --backend B "
        f"--no-progress` (asynchronous saves), {r['reps']} run(s) per backend, the order of the "
        f"backends reversed every other repetition. *Blocked share*: as the run prints it "
        f"(median [min-max] over runs); per save: `blocked_s` and `save_s` from the run's "
        f"history (all runs pooled).",
        "",
        table(head, rows),
        "",
        _cpu_line(r["cpu"], r["loadavg_end"]),
        "",
    ]


def _code_line(start: dict[str, Any], end: dict[str, Any]) -> str:
    differ = start["py_differ_from_head"]
    same = (
        f"its {start['py_files']} Python files are identical to `src/aptckpt` at git "
        f"{start['head']}"
        if not differ
        else f"its Python files differ from `src/aptckpt` at git {start['head']} in "
        + ", ".join(f"`{d}`" for d in differ)
    )
    if end["fingerprint"] == start["fingerprint"]:
        kept = "unchanged at the end of the run"
    else:
        kept = "**CHANGED during the run (reinstalled?): the figures may mix two versions**"
    return f"the imported aptckpt (files fingerprint {start['fingerprint']}, {kept}); {same}."


def observations(res: dict[str, Any]) -> list[str]:
    """Facts read off the results that the tables alone do not make obvious."""
    out = []
    saves = [
        x["delta"]
        for key in ("frozen", "dense", "unchanged")
        if key in res
        for x in res[key]["rounds"]
    ]
    zero = [d for d in saves if d["stored_bytes"] == 0]
    if zero:
        sizes = [d["manifest_bytes"] for d in zero]
        out.append(
            f"`SaveInfo.stored_bytes` was 0 for {len(zero)} delta save(s) that added no store "
            f"object, although each wrote its manifest ({_b(min(sizes))}-{_b(max(sizes))}); "
            f"the byte figures here add the "
            f"manifest to `stored_bytes` for every backend."
        )
    if saves:
        out.append(
            f"Delta manifests grow along a chain (each lists every object it reaches, xor bases "
            f"included): {_b(min(d['manifest_bytes'] for d in saves))} to "
            f"{_b(max(d['manifest_bytes'] for d in saves))} in this run."
        )
    if "dense" in res:
        rs = res["dense"]["rounds"]
        by_depth = ", ".join(
            f"{x['delta']['since_keyframe']}: {x['delta']['seconds'] / x['zstd']['seconds']:.2f}x"
            for x in rs
        )
        out.append(
            f"Scenario 3 (no target on time), delta save time / zstd save time per checkpoint, "
            f"by `since_keyframe`: {by_depth}."
        )
        ld, lz = res["dense"]["loads"]["delta"], res["dense"]["loads"]["zstd"]
        ratio = median([a / b for a, b in zip(ld, lz, strict=True)])
        out.append(
            f"Scenario 3, warm load: the last delta checkpoint ({_chain(res['dense'])}) "
            f"took {_x(ratio)} the time of "
            f"the zstd checkpoint of the same state (median of per-round ratios)."
        )
    if "unchanged" in res:
        kf = [x for x in res["unchanged"]["rounds"] if x["delta"]["keyframe"]]
        for x in kf:
            d, z = x["delta"], x["zstd"]
            out.append(
                f"Scenario 4: the unchanged state re-saved on a keyframe wrote "
                f"{_b(d['written_bytes'])} ({_pct(d['written_bytes'] / z['written_bytes'])} "
                f"of a zstd save) in {_pct(d['seconds'] / z['seconds'])} of its time."
            )
    return out


def render(meta: dict[str, Any], res: dict[str, Any]) -> str:
    m, v = meta["machine"], meta["versions"]
    summary = summarize(res)
    out = [
        "# aptckpt `delta` backend: incremental checkpoint bytes and time",
        "",
        "Generated by `benchmarks/bench_delta.py`; see `benchmarks/README.md`. Every figure "
        "compares saves of the same state taken in the same round, seconds apart; absolute times "
        "on this shared 2-vCPU machine drift between runs, so compare ratios.",
        "",
        f"- **Date**: {meta['date']} (run took {meta['duration_s'] / 60:.1f} min)",
        f"- **Command**: `{meta['command']}`",
        *(
            [f"- **Report rendered again** (same figures): {meta['rendered_again']}"]
            if meta.get("rendered_again")
            else []
        ),
        f"- **Machine**: {m['cpu']}; {m['cores']}; torch threads {m['torch_threads']}; "
        f"RAM {m['ram']}; Linux {m['kernel']}",
        f"- **Filesystem**: {m['filesystem']}",
        f"- **Load average** (1/5/15 min): at start {meta['loadavg_start']}, at end "
        f"{meta['loadavg_end']}; `uptime` at start: `{meta['uptime_start']}`",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "git"),
        f"- **Tree**: git {v['git']}",
        f"- **Code measured**: {_code_line(meta['code_start'], meta['code_end'])}",
        f"- **Options**: delta with defaults (`keyframe_every` {meta['keyframe_every']}, zstd "
        f"level {meta['level']}, chunk {meta['chunk_size'] >> 20} MiB, store `aptckpt-store` in "
        f"the run directory), `base=` the previous checkpoint of the series passed explicitly; "
        f"zstd with defaults (level {meta['level']}). **Bytes written** = `SaveInfo.stored_bytes` "
        f"+ the manifest's size: `stored_bytes` counts the data files and the new store objects "
        f"but not the manifest, for every backend, so a delta save that adds no object reports 0 "
        f"(see Notes); for delta the manifest is the checkpoint directory's only file. "
        f"GB = 10^9 bytes, kB = 10^3.",
        f"- **Scale**: `{meta['scale']}` -- {meta['workload']}",
        "",
        "## Targets",
        "",
        table(
            ["scenario", "target", "measured", "result"],
            [[s["scenario"], s["target"], s["measured"], _ok(s["met"])] for s in summary],
            align="llll",
        ),
        "",
    ]
    notes = [*meta.get("notes", []), *observations(res)]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if "frozen" in res:
        out += render_frozen(res["frozen"])
    if any(k.startswith("bf16") for k in res):
        out += [
            "## 2. bf16 weights at a low learning rate",
            "",
            "Most bf16 weights do not change at lr 1e-5: an update smaller than half a bf16 ulp "
            "of the weight rounds away. With AdamW the update is about lr per element whatever "
            "the gradient, so the small weights (|w| below ~2.5e-3) still move; with plain SGD "
            "the update is lr x gradient, far below the ulp of nearly every weight.",
            "",
        ]
        for key in ("bf16-adamw", "bf16-sgd"):
            if key in res:
                out += render_bf16(res[key])
    if "dense" in res:
        out += render_dense(res["dense"])
    if "unchanged" in res:
        out += render_unchanged(res["unchanged"])
    if "small" in res:
        out += render_small(res["small"])
    if "reference" in res:
        out += render_reference(res["reference"])
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# main


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(PLANS), default="full")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-delta.md")
    parser.add_argument(
        "--scenarios",
        default="1,2,3,4,5,6",
        help="comma list of 1 (frozen), 2 (bf16), 3 (dense), 4 (unchanged; runs 3 first), "
        "5 (many small tensors), 6 (reference run's blocked share per backend)",
    )
    parser.add_argument(
        "--small-tensors", type=int, default=100_000, help="tensors of scenario 5 (default 100000)"
    )
    parser.add_argument(
        "--reference-reps", type=int, default=2, help="runs per backend in scenario 6 (default 2)"
    )
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for the report's Notes (repeatable), e.g. about other runs",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="measure nothing: render the report again from a results-delta-*.json dump",
    )
    parser.add_argument(
        "--bf16-optimizers",
        default="adamw,sgd",
        help="comma list of adamw, sgd: the optimizers of scenario 2",
    )
    args = parser.parse_args(argv)
    args.scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if not args.scenarios <= {"1", "2", "3", "4", "5", "6"}:
        parser.error("--scenarios takes a comma list of 1, 2, 3, 4, 5, 6")
    args.bf16_optimizers = [s for s in args.bf16_optimizers.split(",") if s]
    if not set(args.bf16_optimizers) <= {"adamw", "sgd"}:
        parser.error("--bf16-optimizers takes a comma list of adamw, sgd")
    return args


def rerender(args: argparse.Namespace, command: str) -> None:
    """Write the report of an earlier run again from its JSON dump (after a change of layout)."""
    dump = json.loads(args.from_json.read_text())
    meta, res = dump["meta"], dump["results"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta["rendered_again"] = f"{now} from `{_rel(args.from_json)}` by `{command}`"
    meta["notes"] = [*meta.get("notes", []), *args.note]
    args.out.write_text(render(meta, res) + "\n")
    _log(f"wrote {_rel(args.out)} from {_rel(args.from_json)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json is not None:
        words = ["python", _rel(sys.argv[0]), "--from-json", _rel(args.from_json)]
        if args.out != HERE / "RESULTS-delta.md":
            words += ["--out", _rel(args.out)]
        if args.note:
            words.append(f"--note ... ({len(args.note)}, under Notes)")
        rerender(args, " ".join(words))
        return
    WORKDIR.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    loadavg_start = _sysutil.loadavg()
    uptime = os.popen("uptime").read().strip()
    command = "python " + " ".join(shlex.quote(a) for a in [_rel(sys.argv[0]), *sys.argv[1:]])
    import aptckpt
    from aptckpt import _config

    if "delta" not in aptckpt.available_backends():
        sys.exit(
            f"aptckpt at {aptckpt.__file__} has no 'delta' backend: reinstall the working tree "
            "(.venv/bin/pip install --no-build-isolation --no-deps -q .)"
        )
    versions = _sysutil.versions(REPO)
    code_start = installed_code(aptckpt)
    plan = PLANS[args.scale]
    _log(f"building workload ({args.scale}) ...")
    wl = build_workload(args.scale)
    wl_text = describe(wl)
    _log(wl_text)

    res: dict[str, Any] = {}
    if "1" in args.scenarios:
        _log("scenario 1: frozen backbone")
        res["frozen"] = scenario_frozen(aptckpt, wl, plan)
    if "2" in args.scenarios:
        for opt in args.bf16_optimizers:
            _log(f"scenario 2: bf16 weights, {opt} lr {BF16_LR}")
            res[f"bf16-{opt}"] = scenario_bf16(aptckpt, wl, plan, opt)
    if args.scenarios & {"3", "4"}:
        _log("scenario 3: dense fp32 AdamW")
        dense, cont = scenario_dense(aptckpt, wl, plan)
        if "3" in args.scenarios:
            res["dense"] = dense
        del wl
        gc.collect()
        if "4" in args.scenarios:
            _log("scenario 4: unchanged state saved again")
            res["unchanged"] = scenario_unchanged(
                aptckpt, plan, cont["chain"], cont["state"], cont["run"]
            )
        _sysutil.remove(cont["run"])
        del cont
    if "5" in args.scenarios:
        _log(f"scenario 5: {args.small_tensors:,} small tensors")
        res["small"] = scenario_small(aptckpt, plan, args.small_tensors)
    if "6" in args.scenarios:
        _log("scenario 6: the reference run, per backend")
        res["reference"] = scenario_reference(aptckpt, args.reference_reps)
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "command": command,
        "machine": _sysutil.machine_info(WORKDIR),
        "versions": versions,
        "loadavg_start": loadavg_start,
        "loadavg_end": _sysutil.loadavg(),
        "uptime_start": uptime,
        "code_start": code_start,
        "code_end": installed_code(aptckpt),
        "scale": args.scale,
        "plan": dataclasses.asdict(plan),
        "workload": wl_text,
        "keyframe_every": _config.DEFAULT_KEYFRAME_EVERY,
        "level": _config.DEFAULT_ZSTD_LEVEL,
        "chunk_size": _config.DEFAULT_CHUNK_SIZE,
        "notes": list(args.note),
    }
    report = render(meta, res)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    stamp = started.strftime("%Y%m%d-%H%M%S")
    raw_json = WORKDIR / f"results-delta-{args.scale}-{stamp}.json"
    payload = {"meta": meta, "results": res, "targets": summarize(res)}
    raw_json.write_text(json.dumps(_jsonable(payload), indent=1))
    _log(f"wrote {_rel(args.out)} and {_rel(raw_json)}")


if __name__ == "__main__":
    main()
