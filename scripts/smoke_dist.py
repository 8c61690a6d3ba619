"""Smoke test of an installed aptckpt; scripts/check_dist.sh runs it once per wheel, in a fresh
virtual environment, from a folder outside the checkout.

usage: python scripts/smoke_dist.py --core native|python WORKDIR

What a user does first: save, load and verify with each built-in backend, the command line
(``aptckpt info``, ``inspect``, ``verify``, including a damaged checkpoint), a
``CheckpointManager`` run that is resumed, and a save to an fsspec URL when fsspec is installed.
It also checks what it runs: aptckpt from the environment's site-packages (not a source tree),
the core the wheel promises (``--core``), the ``py.typed`` marker, and no build tools around.
Standard library, torch and aptckpt only; not collected by pytest (it lives in scripts/).
Exits non-zero at the first problem, saying which.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

import aptckpt
from aptckpt import CheckpointManager


def check(ok: object, what: str) -> None:
    if not ok:
        sys.exit(f"smoke test FAILED: {what}")


def cli(*argv: object, expect: int = 0) -> str:
    """Run the installed ``aptckpt`` console script; return its stdout."""
    exe = Path(sys.executable).parent / "aptckpt"
    proc = subprocess.run(
        [str(exe), *map(str, argv)], capture_output=True, text=True, timeout=300, check=False
    )
    check(
        proc.returncode == expect,
        f"`aptckpt {' '.join(map(str, argv))}` exited {proc.returncode}, expected {expect}:\n"
        f"{proc.stdout}{proc.stderr}",
    )
    check("Traceback" not in proc.stderr, f"a traceback from `aptckpt {argv[0]}`:\n{proc.stderr}")
    return proc.stdout


def installation(core: str) -> None:
    where = Path(aptckpt.__file__).resolve().parent
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    check(where.parent in site, f"aptckpt was imported from {where}, not from site-packages")
    check(
        importlib.metadata.version("aptckpt") == aptckpt.__version__,
        "the installed distribution's version differs from aptckpt.__version__",
    )
    files = {str(f) for f in importlib.metadata.files("aptckpt") or []}
    check("aptckpt/py.typed" in files, "the py.typed marker is not installed")
    check(core == aptckpt.IMPLEMENTATION, f"core is {aptckpt.IMPLEMENTATION!r}, expected {core!r}")
    natives = [f for f in files if f.startswith("aptckpt/_native")]
    check(bool(natives) == (core == "native"), f"compiled files installed: {natives}")
    tools = [m for m in ("scikit_build_core", "pybind11", "cmake", "ninja") if _importable(m)]
    check(not tools, f"build tools in the environment: {tools}")
    print(f"installed: aptckpt {aptckpt.__version__} from {where}, core {aptckpt.IMPLEMENTATION}")


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def state(seed: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=gen)
    return {
        "model": {"w": w, "tied": w, "b": torch.zeros(256, dtype=torch.bfloat16)},
        "opt": {"step": torch.tensor(3), "m": torch.randn(1 << 18, generator=gen)},
        "epoch": 2,
        "name": "smoke",
    }


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def api(work: Path) -> Path:
    original = state(0)
    for backend in ("zstd", "torch", "delta"):
        path = work / f"ckpt-{backend}"
        info = aptckpt.save(original, path, backend=backend)
        check(info.raw_bytes > 0, f"{backend}: save wrote nothing")
        loaded = aptckpt.load(path)
        check(same(original, loaded), f"{backend}: the loaded state differs from the saved one")
        model = loaded["model"]  # type: ignore[index]
        check(model["w"] is model["tied"], f"{backend}: the tie between w and tied is lost")
        aptckpt.verify(path)
    print("api: save, load, verify with zstd, torch, delta: ok")
    return work / "ckpt-zstd"


def command_line(ckpt: Path, core: str) -> None:
    doc = json.loads(cli("info", "--json"))
    check(doc["implementation"] == core, f"`aptckpt info --json` says {doc['implementation']}")
    check(doc["version"] == aptckpt.__version__, "`aptckpt info` gives another version")
    text = cli("info")
    check(("native (C++)" if core == "native" else "pure Python") in text, text)
    if core == "python":
        check("this installation has no compiled core" in text, text)
        check("CPU time" in text and "pip install" in text, text)
    check("backend         zstd" in cli("inspect", ckpt), "`aptckpt inspect` names no backend")
    check("OK" in cli("verify", ckpt), "`aptckpt verify` of a sound checkpoint")
    # damage one stored byte: verify must fail, naming the file
    data = max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    out = cli("verify", ckpt, expect=1)
    check("DAMAGED" in out and "digest mismatch" in out, f"verify of a damaged one said:\n{out}")
    print("cli: info, inspect, verify (sound and damaged): ok")


def manager(work: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = work / "run"
    with CheckpointManager(run) as mgr:
        for epoch in range(3):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.save_checkpoint(
                model, opt, None, epoch, (epoch + 1) * 10, [loss.item()], {"loss": loss.item()}
            )
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = torch.nn.Linear(16, 4)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    with CheckpointManager(run) as mgr:
        epoch, step, history, _ = mgr.load_checkpoint(fresh, fresh_opt)
        check((epoch, step) == (2, 30), f"resumed at epoch {epoch}, step {step}")
        check(len(history) == 1, f"loss history {history}")
        check(same(expected, fresh.state_dict()), "the resumed model differs")
        check(len(mgr.checkpoints()) == 3, f"{len(mgr.checkpoints())} checkpoints listed")
    check("OK" in cli("verify", run), "`aptckpt verify` of the run")
    print("manager: 3 saves, resume from the latest, verify the run: ok")


def remote() -> None:
    if not _importable("fsspec"):
        print("remote: fsspec not installed, skipped")
        return
    url = f"memory://aptckpt-smoke/{time.monotonic_ns()}/ckpt"
    original = state(1)
    aptckpt.save(original, url)
    check(same(original, aptckpt.load(url)), "memory:// round trip")
    print("remote: save + load through fsspec (memory://): ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--core", choices=["native", "python"], required=True)
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    installation(args.core)
    ckpt = api(args.workdir)
    command_line(ckpt, args.core)
    manager(args.workdir)
    remote()
    print(f"smoke test passed ({args.core} core)")


if __name__ == "__main__":
    main()
