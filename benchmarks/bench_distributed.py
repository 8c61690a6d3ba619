"""Collective checkpoints on torch.distributed: aptckpt vs DCP vs the raw write limit, at 1, 2
and 4 ranks on this machine, and loads at another world size than the save's.

Role: the figures of issue 14's "Benchmark" bullet (``benchmarks/RESULTS-distributed.md``).

Setup: ``torch.multiprocessing.spawn`` of N ranks on one CPU machine, gloo over TCP on
127.0.0.1 (a free port per spawn), a CPU mesh ``init_device_mesh("cpu", (N,))``, and the
workload's GPT-2-style decoder (``workload.GPT``) with its embeddings *untied* (see Notes in
the report: aptckpt's box-wise load refuses a saved tensor with two destinations), FSDP2
``fully_shard`` on each block and on the root, one AdamW step on seeded random tokens (a
different batch per rank, as data parallelism does). The state every contender saves is
``{"model": ..., "optim": ...}`` from ``torch.distributed.checkpoint.state_dict.get_state_dict``
(DTensors sharded on dim 0; AdamW ``step`` as a plain tensor every rank holds).

One spawn per world size. In it, ``--reps`` interleaved rounds (after one warm-up round, not
reported, which also checks every load bit for bit), the starting contender rotating each
round. Contenders, each timed on every rank between a barrier and its own return, the round's
figure being the slowest rank's time (``all_reduce(MAX)``):

* ``raw write, buffered + fsync``: every rank ``write(2)``s its local shards' bytes (the same
  tensors, ``to_local()``) into its own file and ``fsync``s it -- the limit the ratios use;
  ``raw write, O_DIRECT + fsync`` (aligned reused buffer, as ``bench_backends.py``);
* ``aptckpt.save(state, path, process_group=WORLD)`` with ``zstd`` level 1 and with
  ``codec="none"`` and ``blocking=False`` (stall until it returns, and until the handle's
  ``wait()``);
* ``dcp.save(state, checkpoint_id=path)`` (``FileSystemWriter`` defaults: one file per rank,
  one thread, ``sync_files=True``) and ``dcp.async_save`` on the gloo default group (stall:
  until it returns; total: until ``.result()`` returns).

Each save is followed by loads of what it wrote into the targets of a *fresh* model and
optimizer (``get_state_dict`` of a second model built with another seed, zeroed before each
load): cold (``fsync`` + ``posix_fadvise(DONTNEED)`` of the checkpoint's files, checked with
``mincore``) and warm (after reading every file once). ``aptckpt.load(path, into=state,
process_group=WORLD)`` vs ``dcp.load(state, checkpoint_id=path)`` vs every rank reading its
raw file back into a pre-touched buffer.

Resharding: the world size ``--reshard-from`` (default 2) also saves, untimed, a source
checkpoint of each kind plus the full tensors (``full_tensor()``) as the reference; then one
spawn per ``--reshard-to`` world size (default 1 and 3: 3 shards dim 0 unevenly) loads them
(interleaved rounds, cold and warm): aptckpt ``load(into=..., process_group=...)`` vs
``dcp.load``, and as a limit every rank reading an even 1/N share of the source's raw bytes.
Every loaded tensor's ``full_tensor()`` is compared with the reference bit for bit once per
contender (warm-up round).

Before each timed operation, untimed: ``gc.collect()``, ``malloc_trim``, ``os.sync()``, a
barrier. Threads: ``torch.set_num_threads(max(1, cores // N))``; aptckpt and DCP keep their
default thread counts. Rank 0 writes the per-round timings to ``benchmarks/_work/dist/``; the
parent renders the report.

Usage::

    python benchmarks/bench_distributed.py --scale small --reps 2 --out benchmarks/_work/d.md
    python benchmarks/bench_distributed.py --scale full --reps 3   # writes RESULTS-distributed.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import mmap
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from any directory

import _sysutil
from _stats import fmt_bytes, fmt_gbps, fmt_ratio, fmt_s, median, paired_ratio, table
from workload import GPT, ModelConfig, iter_tensors

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKDIR = HERE / "_work" / "dist"  # gitignored
_rel = _sysutil.repo_relative

#: ``full``: 50.5M parameters untied (0.202 GB fp32 weights + 0.404 GB AdamW moments), a size
#: at which the whole run (1, 2, 4 ranks, resharding at 1 and 3) takes minutes on 2 cores.
#: vocab 16384 does not divide by 3: the 3-rank loads get uneven shards.
SCALES: dict[str, ModelConfig] = {
    "full": ModelConfig(
        n_layer=6, d_model=640, n_head=10, vocab=16384, context=256, batch=2, seq=64, steps=1
    ),
    "small": ModelConfig(
        n_layer=2, d_model=256, n_head=4, vocab=4096, context=128, batch=2, seq=32, steps=1
    ),
}

RAW = "raw write, buffered + fsync"
RAW_DIRECT = "raw write, O_DIRECT + fsync"
APT_ZSTD = "aptckpt save, zstd level 1"
APT_NONE = "aptckpt save, zstd codec=none"
APT_ASYNC = "aptckpt save, blocking=False"
DCP = "dcp.save"
DCP_ASYNC = "dcp.async_save"
SAVES = (RAW, RAW_DIRECT, APT_ZSTD, APT_NONE, APT_ASYNC, DCP, DCP_ASYNC)

RAW_READ = "raw read (each rank its own file)"
RAW_SPLIT = "raw read, even 1/N share of the source's raw files"
APT_LOAD = "aptckpt.load(into=, process_group=)"
DCP_LOAD = "dcp.load"
#: what each save's checkpoint is loaded with, and the name of the loader's row
LOADERS = {
    RAW: RAW_READ,
    APT_ZSTD: f"{APT_LOAD}, zstd",
    APT_NONE: f"{APT_LOAD}, codec=none",
    DCP: DCP_LOAD,
}
SOURCES = {APT_ZSTD: "apt-zstd", APT_NONE: "apt-none", DCP: "dcp"}
#: each save's directory under the world size's work directory
DIRS = {
    RAW: "raw",
    RAW_DIRECT: "raw-direct",
    APT_ZSTD: "apt-zstd",
    APT_NONE: "apt-none",
    APT_ASYNC: "apt-async",
    DCP: "dcp",
    DCP_ASYNC: "dcp-async",
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the model and its state, on every rank


def build(cfg: ModelConfig, seed: int, mesh: Any, rank: int) -> tuple[Any, Any]:
    """The FSDP2 model (embeddings untied) and its AdamW after one step on this rank's batch."""
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)  # the same initial weights on every rank, as a real job has
    model = GPT(dataclass_replace(cfg, seed=seed))
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach().clone())
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    for _ in range(cfg.steps):
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def dataclass_replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def state_of(model: Any, opt: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, a plain tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a DTensor)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if full_tensor is not None else t


def global_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in iter_tensors(state))


def zero(state: Any) -> None:
    """Overwrite every target, so that a check after a load proves the load wrote it."""
    with torch.no_grad():
        for _, t in iter_tensors(state):
            local(t).zero_()


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # bytes, not values: NaN payloads and -0.0 count (reshape: a 0-d tensor has no byte view)
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


# ---------------------------------------------------------------------------------------------
# the rank-side harness


class Rank:
    """One rank's view of the run: timing, settling, errors, rank-0 file work."""

    def __init__(self, rank: int, world: int) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = rank
        self.world = world
        self.errors: dict[str, str] = {}

    def barrier(self) -> None:
        self.dist.barrier()

    def on_zero(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only, then a barrier; rank 0's result (None elsewhere)."""
        out = fn() if self.rank == 0 else None
        self.barrier()
        return out

    def settle(self) -> None:
        gc.collect()
        _sysutil.trim_heap()
        if self.rank == 0:
            os.sync()
        self.barrier()

    def timed(
        self, name: str, fn: Callable[[], Any], extra: tuple[str, ...] = ()
    ) -> dict[str, float]:
        """Time ``fn`` on every rank from a common barrier; the slowest rank's seconds (``s``)
        and figures ``fn`` returns (named in ``extra``), or ``{}`` when it failed on any rank."""
        self.settle()
        start = time.perf_counter()
        error = ""
        found: dict[str, float] = {}
        try:
            out = fn()
            found = dict(out) if isinstance(out, dict) else {}  # dcp.save returns its Metadata
        except Exception as err:
            error = f"rank {self.rank}: {type(err).__name__}: {err}"
            traceback.print_exc()
        found["s"] = time.perf_counter() - start
        keys = ["s", *extra]  # the same on every rank, whatever failed where
        figures = [float(found.get(k, 0.0)) for k in keys] + [1.0 if error else 0.0]
        values = torch.tensor(figures, dtype=torch.float64)
        self.dist.all_reduce(values, op=self.dist.ReduceOp.MAX)
        if values[-1] > 0:
            messages: list[str] = [""] * self.world
            self.dist.all_gather_object(messages, error)
            self.errors.setdefault(name, "; ".join(e for e in messages if e))
            return {}
        return {k: float(v) for k, v in zip(keys, values[:-1].tolist(), strict=True)}

    def check(self, name: str, loaded: Any, reference: Callable[[str], torch.Tensor]) -> str:
        """Compare every tensor of ``loaded`` (its ``full_tensor()``) with ``reference(key)``
        bit for bit, on rank 0; every rank learns the verdict."""
        bad: list[str] = []
        count = 0
        for key, t in iter_tensors(loaded):
            whole = full(t)
            ref = reference(key)  # collective too when it is a DTensor's full_tensor()
            if self.rank == 0:
                count += 1
                if not _same_bytes(whole, ref):
                    bad.append(key)
        verdict = [
            f"bit-exact ({count} tensors)"
            if not bad
            else f"**DIFFERS** in {len(bad)} of {count} tensors, e.g. {bad[:3]}"
        ]
        self.dist.broadcast_object_list(verdict, src=0)
        return str(verdict[0])


class RawFiles:
    """Each rank's local shard bytes in its own file (``rank-N.bin`` in the checkpoint dir)."""

    def __init__(self, state: Any, rank: int) -> None:
        tensors = [local(t) for _, t in iter_tensors(state)]
        self.io = _sysutil.RawIO([t for t in tensors if t.numel()])
        self.rank = rank

    def path(self, directory: Path) -> Path:
        return directory / f"rank-{self.rank}.bin"

    def write(self, directory: Path, direct: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (self.io.write_direct if direct else self.io.write_buffered)(self.path(directory))

    def read(self, directory: Path) -> None:
        self.io.read_buffered(self.path(directory))


def _touched(size: int) -> mmap.mmap:
    buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))
    memoryview(buf)[:] = b"\1" * len(buf)
    return buf


class SplitRead:
    """The resharding load's limit: rank r of N reads bytes [r*T/N, (r+1)*T/N) of the source
    ranks' raw files laid end to end (T = all of them), into a pre-touched buffer."""

    def __init__(self, files: list[Path], rank: int, world: int) -> None:
        sizes = [f.stat().st_size for f in files]
        total = sum(sizes)
        lo, hi = total * rank // world, total * (rank + 1) // world
        self.pieces: list[tuple[Path, int, int]] = []  # (file, offset, length)
        pos = 0
        for f, size in zip(files, sizes, strict=True):
            a, b = max(lo, pos), min(hi, pos + size)
            if b > a:
                self.pieces.append((f, a - pos, b - a))
            pos += size
        self.nbytes = hi - lo
        self.buf = _touched(self.nbytes)

    def __call__(self) -> None:
        view = memoryview(self.buf)
        at = 0
        for f, offset, length in self.pieces:
            fd = os.open(f, os.O_RDONLY)
            try:
                done = 0
                while done < length:
                    n = os.preadv(
                        fd, [view[at + done : at + min(length, done + (64 << 20))]], offset + done
                    )
                    if n == 0:
                        raise OSError(f"{f}: short read at {offset + done}")
                    done += n
            finally:
                os.close(fd)
            at += length


def _init(rank: int, world: int, port: int) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    warnings.filterwarnings("ignore", category=UserWarning)  # DCP's per-call notices
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    return init_device_mesh("cpu", (world,))


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Meter:
    """CPU used outside the ranks during a round: machine busy time (/proc/stat) minus the CPU
    time of every rank, as a share of all vCPUs (kernel writeback included: an upper bound)."""

    def __init__(self, r: Rank) -> None:
        self.r = r
        self.start = self._machine(), _cpu_seconds(), time.monotonic()

    @staticmethod
    def _machine() -> tuple[float, float]:
        vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = vals
        hz = os.sysconf("SC_CLK_TCK")
        return (user + nice + system + irq + softirq) / hz, steal / hz

    def read(self) -> dict[str, float]:
        (b0, s0), c0, w0 = self.start
        own = torch.tensor([_cpu_seconds() - c0], dtype=torch.float64)
        self.r.dist.all_reduce(own)
        b1, s1 = self._machine()
        capacity = max(time.monotonic() - w0, 1e-9) * (os.cpu_count() or 1)
        return {
            "foreign": max(0.0, (b1 - b0) - float(own[0])) / capacity,
            "steal": (s1 - s0) / capacity,
        }


# ---------------------------------------------------------------------------------------------
# one world size: saves, same-world loads, and (optionally) the resharding sources


def save_round(rank: int, world: int, port: int, cfg: dict[str, Any]) -> None:
    """The spawn target of one world size's save/load rounds."""
    import torch.distributed.checkpoint as dcp

    import aptckpt

    mesh = _init(rank, world, port)
    r = Rank(rank, world)
    mc = ModelConfig(**cfg["model"])
    t0 = time.perf_counter()
    model, opt = build(mc, mc.seed, mesh, rank)
    state = state_of(model, opt)
    fresh_model, fresh_opt = build(mc, mc.seed + 100, mesh, rank)
    target = state_of(fresh_model, fresh_opt)
    built_s = time.perf_counter() - t0
    group = r.dist.group.WORLD
    work = Path(cfg["work"]) / f"w{world}"
    r.on_zero(lambda: (_sysutil.remove(work), work.mkdir(parents=True)))
    raw = RawFiles(state, rank)
    infos: dict[str, Any] = {}
    pending: list[Any] = []

    def apt_save(options: dict[str, Any]) -> Callable[[Path], dict[str, float] | None]:
        def run(path: Path) -> None:
            info = aptckpt.save(state, path, process_group=group, **options)
            infos[str(options)] = {
                "raw_bytes": info.raw_bytes,
                "stored_bytes": info.stored_bytes,
                "seconds": info.seconds,
            }

        return run

    def dcp_async(path: Path) -> dict[str, float]:
        start = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(path))
        stall = time.perf_counter() - start
        pending.append(future)
        future.result()
        pending.clear()
        return {"stall": stall}

    def apt_async(path: Path) -> dict[str, float]:
        start = time.perf_counter()
        handle = aptckpt.save(state, path, process_group=group, blocking=False)
        stall = time.perf_counter() - start
        handle.wait()
        return {"stall": stall}

    saves: dict[str, Callable[[Path], dict[str, float] | None]] = {
        RAW: lambda p: raw.write(p, direct=False),
        RAW_DIRECT: lambda p: raw.write(p, direct=True),
        APT_ZSTD: apt_save({"backend": "zstd", "codec": "zstd"}),
        APT_NONE: apt_save({"backend": "zstd", "codec": "none"}),
        APT_ASYNC: apt_async,
        DCP: lambda p: dcp.save(state, checkpoint_id=str(p)),
        DCP_ASYNC: dcp_async,
    }

    def apt_load(path: Path) -> None:
        result = aptckpt.load(path, into=target, process_group=group)
        if result.missing_keys or result.unexpected_keys:
            raise AssertionError(
                f"missing {result.missing_keys}, unexpected {result.unexpected_keys}"
            )

    loads: dict[str, Callable[[Path], None]] = {
        RAW: raw.read,
        APT_ZSTD: apt_load,
        APT_NONE: apt_load,
        DCP: lambda p: dcp.load(target, checkpoint_id=str(p)),
    }

    r.barrier()

    times: dict[str, list[float]] = {n: [] for n in SAVES}
    extra: dict[str, dict[str, list[float]]] = {n: {} for n in SAVES}
    load_s: dict[str, dict[str, list[float]]] = {n: {"cold": [], "warm": []} for n in loads}
    resident: dict[str, list[float]] = {"cold": [], "warm": []}
    disk: dict[str, int] = {}
    checks: dict[str, str] = {}
    warmup: dict[str, float] = {}
    cpu: list[dict[str, float]] = []
    names = list(SAVES)
    reps = int(cfg["reps"])
    for rep in range(reps + 1):  # round 0 warms up (first collectives, page cache) and checks
        meter = Meter(r)
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            if name in r.errors:
                continue
            path = work / DIRS[name]
            r.on_zero(lambda p=path: _sysutil.remove(p))
            got = r.timed(
                name,
                lambda n=name, p=path: saves[n](p),
                ("stall",) if name in (APT_ASYNC, DCP_ASYNC) else (),
            )
            if not got:
                continue
            if rep == 0:
                warmup[name] = got["s"]
            else:
                times[name].append(got["s"])
                for k, v in got.items():
                    if k != "s":
                        extra[name].setdefault(k, []).append(v)
            size = r.on_zero(lambda p=path: (os.sync(), _sysutil.disk_bytes(p))[1])
            if rank == 0:
                disk[name] = size
            if name in loads:
                for temp in ("cold", "warm"):
                    lname = f"{LOADERS[name]}/{temp}"
                    if lname in r.errors:
                        continue
                    zero(target)
                    if name == RAW:
                        raw.io.clear_buffer()
                    prep = _sysutil.evict if temp == "cold" else _sysutil.prewarm
                    frac = r.on_zero(
                        lambda p=path, f=prep: (f(p), _sysutil.resident_fraction(p))[1]
                    )
                    got = r.timed(lname, lambda n=name, p=path: loads[n](p))
                    if not got:
                        continue
                    if rep == 0 and temp == "warm":
                        checks[LOADERS[name]] = check_load(r, name, raw, target, state)
                    elif rep > 0:
                        load_s[name][temp].append(got["s"])
                        if rank == 0:
                            resident[temp].append(frac)
            r.on_zero(lambda p=path: _sysutil.remove(p))
        if rep:
            cpu.append(meter.read())
        if rank == 0:
            _log(f"world {world}: round {rep} done")

    if world == cfg["reshard_from"]:
        make_sources(r, state, raw, Path(cfg["work"]) / "source", saves)
    if rank == 0:
        out = {
            "world": world,
            "built_s": built_s,
            "state_bytes": global_bytes(state),
            "local_bytes_rank0": raw.io.nbytes,
            "tensors": sum(1 for _ in iter_tensors(state)),
            "save_s": times,
            "save_extra": extra,
            "load_s": {LOADERS[k]: v for k, v in load_s.items()},
            "warmup_s": warmup,
            "resident": resident,
            "disk_bytes": disk,
            "checks": checks,
            "errors": r.errors,
            "apt_info": infos,
            "cpu": cpu,
            "torch_threads": torch.get_num_threads(),
        }
        Path(cfg["result"]).write_text(json.dumps(out, indent=1))
    r.barrier()
    r.dist.destroy_process_group()


def check_load(r: Rank, name: str, raw: RawFiles, target: Any, state: Any) -> str:
    """Bit-exactness of what ``name``'s loader put into ``target`` (or into the raw buffer)."""
    if name == RAW:
        try:
            raw.io.check_buffer()
            ok = 1.0
        except AssertionError:
            ok = 0.0
        flag = torch.tensor([ok])
        r.dist.all_reduce(flag, op=r.dist.ReduceOp.MIN)
        return "bit-exact (every rank's buffer)" if flag[0] > 0 else "**DIFFERS**"
    originals = dict(iter_tensors(state))
    return r.check(name, target, lambda key: full(originals[key]))


def make_sources(
    r: Rank, state: Any, raw: RawFiles, source: Path, saves: dict[str, Callable[[Path], Any]]
) -> None:
    """Untimed: the checkpoints the resharding loads read, and the full tensors to check them."""
    r.on_zero(lambda: (_sysutil.remove(source), source.mkdir(parents=True)))
    for name, sub in SOURCES.items():
        saves[name](source / sub)
        r.barrier()
    raw.write(source / "raw", direct=False)
    reference = {}
    for key, t in iter_tensors(state):
        whole = full(t)  # collective: every rank takes part, rank 0 keeps it
        if r.rank == 0:
            reference[key] = whole
    if r.rank == 0:
        torch.save(reference, source / "reference.pt")
    del reference
    r.barrier()


# ---------------------------------------------------------------------------------------------
# loads at another world size


def reshard_round(rank: int, world: int, port: int, cfg: dict[str, Any]) -> None:
    """The spawn target of the loads of the resharding sources at ``world`` ranks."""
    import torch.distributed.checkpoint as dcp

    import aptckpt

    mesh = _init(rank, world, port)
    r = Rank(rank, world)
    mc = ModelConfig(**cfg["model"])
    model, opt = build(mc, mc.seed + 100, mesh, rank)
    target = state_of(model, opt)
    group = r.dist.group.WORLD
    source = Path(cfg["work"]) / "source"
    reference = torch.load(source / "reference.pt", weights_only=True) if rank == 0 else {}
    raw_files = sorted((source / "raw").glob("rank-*.bin"), key=lambda p: int(p.stem[5:]))
    split = SplitRead(raw_files, rank, world)

    def apt_load(path: Path) -> None:
        result = aptckpt.load(path, into=target, process_group=group)
        if result.missing_keys or result.unexpected_keys:
            raise AssertionError(
                f"missing {result.missing_keys}, unexpected {result.unexpected_keys}"
            )

    loaders: dict[str, tuple[Path, Callable[[Path], None]]] = {
        RAW_SPLIT: (source / "raw", lambda p: split()),
        LOADERS[APT_ZSTD]: (source / SOURCES[APT_ZSTD], apt_load),
        LOADERS[APT_NONE]: (source / SOURCES[APT_NONE], apt_load),
        DCP_LOAD: (source / SOURCES[DCP], lambda p: dcp.load(target, checkpoint_id=str(p))),
    }
    load_s: dict[str, dict[str, list[float]]] = {n: {"cold": [], "warm": []} for n in loaders}
    checks: dict[str, str] = {}
    resident: dict[str, list[float]] = {"cold": [], "warm": []}
    cpu: list[dict[str, float]] = []
    names = list(loaders)
    reps = int(cfg["reps"])
    for rep in range(reps + 1):
        meter = Meter(r)
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            path, fn = loaders[name]
            for temp in ("cold", "warm"):
                if f"{name}/{temp}" in r.errors:
                    continue
                zero(target)
                prep = _sysutil.evict if temp == "cold" else _sysutil.prewarm
                frac = r.on_zero(lambda p=path, f=prep: (f(p), _sysutil.resident_fraction(p))[1])
                got = r.timed(f"{name}/{temp}", lambda f=fn, p=path: f(p))
                if not got:
                    continue
                if rep == 0 and temp == "warm" and name != RAW_SPLIT:
                    checks[name] = r.check(name, target, lambda key: reference.get(key))
                elif rep > 0:
                    load_s[name][temp].append(got["s"])
                    if rank == 0:
                        resident[temp].append(frac)
        if rep:
            cpu.append(meter.read())
        if rank == 0:
            _log(f"load at {world}: round {rep} done")
    if rank == 0:
        out = {
            "world": world,
            "load_s": load_s,
            "checks": checks,
            "errors": r.errors,
            "resident": resident,
            "cpu": cpu,
            "split_bytes_rank0": split.nbytes,
        }
        Path(cfg["result"]).write_text(json.dumps(out, indent=1))
    r.barrier()
    r.dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the parent: spawns, collects, renders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average " + _sysutil.loadavg()


def spawn(target: Callable[..., None], world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``target`` on ``world`` ranks; rank 0's JSON, or the failure."""
    import torch.multiprocessing as mp

    result = Path(cfg["result"])
    result.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        mp.spawn(target, args=(world, _free_port(), cfg), nprocs=world, join=True)
    except Exception as err:  # a rank died: report it, go on with the other world sizes
        return {
            "world": world,
            "failed": f"{type(err).__name__}: {err}"[:2000],
            "wall_s": time.perf_counter() - start,
        }
    out: dict[str, Any] = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - start
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--reps", type=int, default=3, help="timed rounds per world size")
    p.add_argument("--worlds", default="1,2,4", help="world sizes of the save rounds")
    p.add_argument("--reshard-from", type=int, default=2, help="world size of the source save")
    p.add_argument("--reshard-to", default="1,3", help="world sizes loading it ('' = none)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-distributed.md")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="measure nothing: render the report of an earlier run from its JSON dump",
    )
    return p.parse_args(argv)


def rerender(args: argparse.Namespace) -> None:
    """Write the report of an earlier run again from its JSON dump (after a change of layout)."""
    dump = json.loads(args.from_json.read_text())
    meta = dump["meta"]
    words = ["python", _rel(sys.argv[0]), "--from-json", _rel(args.from_json)]
    if args.out != HERE / "RESULTS-distributed.md":
        words += ["--out", _rel(args.out)]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta["notes"] = [
        *meta.get("notes", []),
        *args.note,
        f"Rendered again {now} from `{_rel(args.from_json)}` by `{' '.join(words)}`.",
    ]
    runs = {int(k): v for k, v in dump["runs"].items()}
    reshards = {int(k): v for k, v in dump["reshards"].items()}
    args.out.write_text(render(meta, runs, reshards))
    _log(f"wrote {_rel(args.out)} from {_rel(args.from_json)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json is not None:
        rerender(args)
        return
    worlds = [int(w) for w in args.worlds.split(",") if w]
    targets = [int(w) for w in args.reshard_to.split(",") if w]
    if targets and args.reshard_from not in worlds:
        worlds.append(args.reshard_from)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    uptime_start = _uptime()
    command = "python " + " ".join(shlex.quote(a) for a in [_rel(sys.argv[0]), *sys.argv[1:]])
    cfg: dict[str, Any] = {
        "model": dataclass_asdict(SCALES[args.scale]),
        "reps": args.reps,
        "work": str(WORKDIR),
        "reshard_from": args.reshard_from if targets else -1,
    }
    runs: dict[int, dict[str, Any]] = {}
    for world in worlds:
        _log(f"world size {world}: spawning {world} rank(s) ...")
        runs[world] = spawn(save_round, world, {**cfg, "result": str(WORKDIR / f"w{world}.json")})
        _log(
            f"world size {world}: {runs[world].get('failed', 'done')} "
            f"({runs[world]['wall_s']:.0f} s)"
        )
    reshards: dict[int, dict[str, Any]] = {}
    if targets and "failed" not in runs.get(args.reshard_from, {"failed": 1}):
        for world in targets:
            _log(f"resharding load at {world} rank(s) ...")
            reshards[world] = spawn(
                reshard_round, world, {**cfg, "result": str(WORKDIR / f"reshard{world}.json")}
            )
    shutil.rmtree(WORKDIR / "source", ignore_errors=True)
    for world in worlds:
        shutil.rmtree(WORKDIR / f"w{world}", ignore_errors=True)
    import aptckpt  # noqa: F401  (for the versions line)

    meta = {
        "date": f"{started:%Y-%m-%d %H:%M} UTC",
        "duration_s": time.perf_counter() - t_start,
        "command": command,
        "uptime_start": uptime_start,
        "uptime_end": _uptime(),
        "machine": _sysutil.machine_info(WORKDIR),
        "versions": _sysutil.versions(REPO),
        "scale": args.scale,
        "model": cfg["model"],
        "reps": args.reps,
        "reshard_from": args.reshard_from,
        "notes": args.note,
    }
    stamp = f"{started:%Y%m%d-%H%M%S}"
    dump = WORKDIR / f"results-distributed-{args.scale}-{stamp}.json"
    dump.write_text(json.dumps({"meta": meta, "runs": runs, "reshards": reshards}, indent=1))
    args.out.write_text(render(meta, runs, reshards))
    _log(f"wrote {_rel(args.out)} and {_rel(dump)}")


def dataclass_asdict(cfg: ModelConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# report

UNTIED = (
    "The workload's tied embeddings are untied here (`lm_head.weight` a clone of `wte.weight`), "
    "as in the first run of this benchmark: then (git 0a141ec) a box-wise load into two "
    "destinations of one saved tensor failed; fixed in aeac71d (each stored tensor is read "
    "once for every target that needs it; tests/test_attacks_distributed.py covers tied "
    "destinations). Kept untied so that the figures compare with that run."
)


def _ratio(ref: list[float], xs: list[float]) -> str:
    return fmt_ratio(paired_ratio(ref, xs)) if ref and xs else "—"


def _cpu_line(run: dict[str, Any]) -> str:
    cpu = run.get("cpu", [])
    foreign = ", ".join(f"{100 * c['foreign']:.0f}%" for c in cpu) or "—"
    steal = ", ".join(f"{100 * c['steal']:.0f}%" for c in cpu) or "—"
    return (
        f"CPU busy outside the ranks per round (other processes and kernel threads, share "
        f"of all vCPUs): {foreign}; hypervisor steal: {steal}."
    )


def summary_table(runs: dict[int, dict[str, Any]]) -> str:
    ok = {w: r for w, r in sorted(runs.items()) if "failed" not in r}
    header = ["save (median s; vs raw write; vs dcp.save)"] + [
        f"{w} rank{'s' * (w > 1)}" for w in ok
    ]
    rows = []
    for name in SAVES:
        row = [name]
        for run in ok.values():
            xs = run["save_s"].get(name, [])
            if not xs:
                row.append("failed" if name in run["errors"] else "—")
                continue
            row.append(
                f"{median(xs):.3f} s; {_ratio(run['save_s'][RAW], xs)}; "
                f"{_ratio(run['save_s'][DCP], xs)}"
            )
        rows.append(row)
    for name in (APT_ASYNC, DCP_ASYNC):
        rows.append(
            [f"{name}: stall until it returns"]
            + [
                f"{median(r['save_extra'][name]['stall']):.3f} s"
                if r["save_extra"].get(name, {}).get("stall")
                else "—"
                for r in ok.values()
            ]
        )
    for loader in (LOADERS[APT_ZSTD], LOADERS[APT_NONE], DCP_LOAD):
        row = [f"load warm: {loader} (vs raw read; vs dcp.load)"]
        for run in ok.values():
            xs = run["load_s"].get(loader, {}).get("warm", [])
            ref = run["load_s"].get(RAW_READ, {}).get("warm", [])
            dl = run["load_s"].get(DCP_LOAD, {}).get("warm", [])
            row.append(f"{median(xs):.3f} s; {_ratio(ref, xs)}; {_ratio(dl, xs)}" if xs else "—")
        rows.append(row)
    return table(header, rows)


def save_table(run: dict[str, Any]) -> str:
    nbytes = run["state_bytes"]
    raw, dcp_t = run["save_s"].get(RAW, []), run["save_s"].get(DCP, [])
    rows = []
    for name in SAVES:
        xs = run["save_s"].get(name, [])
        label = name + (" **(failed)**" if name in run["errors"] else "")
        rows.append(
            [
                label,
                fmt_bytes(run["disk_bytes"].get(name)),
                fmt_s(xs),
                fmt_gbps(nbytes, xs),
                _ratio(raw, xs),
                _ratio(dcp_t, xs),
                fmt_s(run["warmup_s"].get(name) and [run["warmup_s"][name]]),
            ]
        )
        if name in (APT_ASYNC, DCP_ASYNC) and run["save_extra"].get(name, {}).get("stall"):
            st = run["save_extra"][name]["stall"]
            rows.append(
                [
                    f"{name}: stall (until it returns)",
                    "",
                    fmt_s(st),
                    "",
                    _ratio(raw, st),
                    _ratio(dcp_t, st),
                    "",
                ]
            )
    return table(
        [
            "save",
            "on disk",
            "seconds, median [min-max]",
            "GB/s",
            "vs raw write",
            "vs dcp.save",
            "warm-up round (first call)",
        ],
        rows,
    )


def load_table(
    loads: dict[str, Any],
    checks: dict[str, str],
    errors: dict[str, str],
    nbytes: int,
    raw_name: str,
) -> str:
    rows = []
    for name, lt in loads.items():
        cells = [name]
        for temp in ("cold", "warm"):
            xs = lt.get(temp, [])
            ref = loads.get(raw_name, {}).get(temp, [])
            dl = loads.get(DCP_LOAD, {}).get(temp, [])
            failed = f"{name}/{temp}" in errors
            cells += [
                fmt_s(xs) + (" **(failed)**" if failed else ""),
                fmt_gbps(nbytes, xs),
                _ratio(ref, xs),
                _ratio(dl, xs),
            ]
        cells.append(checks.get(name, "—" if name.startswith("raw read, even") else "not checked"))
        rows.append(cells)
    return table(
        [
            "load",
            "cold s, median [min-max]",
            "cold GB/s",
            "cold vs raw read",
            "cold vs dcp.load",
            "warm s, median [min-max]",
            "warm GB/s",
            "warm vs raw read",
            "warm vs dcp.load",
            "check (warm-up round)",
        ],
        rows,
    )


def render(
    meta: dict[str, Any], runs: dict[int, dict[str, Any]], reshards: dict[int, dict[str, Any]]
) -> str:
    m, v = meta["machine"], meta["versions"]
    mc = meta["model"]
    any_run = next((r for r in runs.values() if "failed" not in r), {})
    nbytes = any_run.get("state_bytes", 0)
    out = [
        "# aptckpt benchmark: collective saves and loads (torch.distributed, CPU, gloo)",
        "",
        "Generated by `benchmarks/bench_distributed.py`; the method is in its docstring and in "
        "`benchmarks/README.md`. Absolute times on this shared 2-vCPU machine drift; compare the "
        "ratios, taken within each round. With more ranks than cores (4 ranks on 2 vCPUs) the "
        "ranks time-share the CPUs: those rows measure contention as much as the libraries.",
        "",
        f"- **Date**: {meta['date']} (run took {meta['duration_s'] / 60:.1f} min)",
        f"- **Command**: `{meta['command']}`",
        f"- **Machine**: {m['cpu']}; {m['cores']}; RAM {m['ram']}; Linux {m['kernel']}",
        f"- **Filesystem**: {m['filesystem']}",
        "- **Machine load** (`uptime`; the machine is shared with other agents): before: "
        f"`{meta['uptime_start']}`; after: `{meta['uptime_end']}`",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "git"),
        f"- **Tree**: git {v['git']}",
        f"- **Repetitions**: {meta['reps']} timed rounds per world size after one warm-up round; "
        "cells are median [min-max] seconds of the slowest rank; GB/s = the state's bytes "
        "(all ranks together) / median time; ratios are medians of per-round ratios "
        "t_reference / t_row (> 1x = faster than the reference).",
        "",
        "## Workload",
        "",
        f"`workload.GPT` ({mc['n_layer']} layers, d_model {mc['d_model']}, {mc['n_head']} heads, "
        f"vocab {mc['vocab']}, context {mc['context']}) with **untied** embeddings, FSDP2 "
        "`fully_shard` per block and at the root on `init_device_mesh('cpu', (N,))`, one AdamW "
        f"step on seeded random tokens (batch {mc['batch']} x {mc['seq']}, a different batch per "
        "rank); state = `{'model', 'optim'}` from `get_state_dict(model, opt)`: "
        f"{fmt_bytes(nbytes)} of tensors in {any_run.get('tensors', '?')} entries (DTensors "
        "sharded on dim 0, plus AdamW's `step` scalars every rank holds). Load targets: the same "
        "from a second model built with another seed, zeroed before every load.",
        "",
        "## Summary",
        "",
        summary_table(runs),
        "",
    ]
    for world, run in sorted(runs.items()):
        out += [f"## {world} rank{'s' * (world > 1)}", ""]
        if "failed" in run:
            out += [f"**The spawn failed**: `{run['failed']}`", ""]
            continue
        res = run["resident"]
        out += [
            f"Model built in {run['built_s']:.0f} s; this world size took "
            f"{run['wall_s']:.0f} s; torch threads per rank {run['torch_threads']}; rank 0 "
            f"holds {fmt_bytes(run['local_bytes_rank0'])} of the state.",
            _cpu_line(run),
            "",
            "### Save",
            "",
            save_table(run),
            "",
            "### Load at the same world size",
            "",
            "Cold: after fsync + `posix_fadvise(DONTNEED)` of the checkpoint's files (resident "
            f"before the cold loads: at most {100 * max(res['cold'], default=0):.1f}% of its "
            "pages); warm: after reading every file once (at least "
            f"{100 * min(res['warm'], default=0):.1f}% resident).",
            "",
            load_table(run["load_s"], run["checks"], run["errors"], run["state_bytes"], RAW_READ),
            "",
        ]
    if reshards:
        src = meta["reshard_from"]
        out += [
            f"## Loads at another world size (saved by {src} ranks)",
            "",
            f"The sources were saved once, untimed, by the {src}-rank spawn; the reference is "
            "their `full_tensor()`s, saved by rank 0. Each loaded tensor's `full_tensor()` is "
            "compared with it bit for bit once per contender (warm-up round). The raw row reads "
            "an even share of the source's raw bytes per rank: the I/O a perfect resharding "
            "reader needs, with no decoding and no copying into shards.",
            "",
        ]
        for world, run in sorted(reshards.items()):
            out += [f"### Loaded by {world} rank{'s' * (world > 1)}", ""]
            if "failed" in run:
                out += [f"**The spawn failed**: `{run['failed']}`", ""]
                continue
            out += [
                _cpu_line(run) + f" Took {run['wall_s']:.0f} s.",
                "",
                load_table(run["load_s"], run["checks"], run["errors"], nbytes, RAW_SPLIT),
                "",
            ]
    notes = [UNTIED, *meta["notes"]]
    for world, run in sorted(runs.items()):
        if "failed" in run:
            continue
        for name, err in run["errors"].items():
            notes.append(f"{world} rank(s): **{name} failed**: `{err[:500]}`")
    for world, run in sorted(reshards.items()):
        for name, err in run.get("errors", {}).items():
            notes.append(f"load at {world} rank(s): **{name} failed**: `{err[:500]}`")
    out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
