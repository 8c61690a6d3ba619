"""cli: every subcommand's output, exit codes, exports, progress bars, the entry points."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

import aptckpt
from aptckpt.cli import main
from aptckpt.retention import KeepAll

# above the API: its reads and hashes are covered in both runs by the API-level tests
pytestmark = pytest.mark.core_independent


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def make_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 8, generator=gen)
    return {
        "model": {"w": w, "tied": w, "b": torch.zeros(3), "layers": [{"k": torch.ones(4)}]},
        "opt": {"state": {0: {"m": torch.arange(5, dtype=torch.float32)}}},
        "step": 5,
        "name": "run-a",
    }


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    aptckpt.save(make_state(), path, metadata={"epoch": 3, "note": "hi"})
    return path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def pairs(out):
    """The ``name  value`` lines of a key/value block, as a dict."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines() if "  " in line)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


# ---------------------------------------------------------------- info, inspect


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f"aptckpt         {aptckpt.__version__}" in out
    assert f"torch           {torch.__version__}" in out
    assert ("native (C++)" if aptckpt.NATIVE else "pure Python") in out
    assert "delta, torch, zstd" in out and f"format version  {aptckpt.FORMAT_VERSION}" in out
    code, out, _ = run(capsys, "info", "--json")
    doc = json.loads(out)
    assert doc["implementation"] == aptckpt.IMPLEMENTATION and doc["native"] is aptckpt.NATIVE
    assert doc["format_version"] == aptckpt.FORMAT_VERSION and doc["threads"] >= 1
    assert {"delta", "torch", "zstd"} <= set(doc["backends"]) and doc["simd"]


def test_info_with_the_compiled_core_says_nothing_of_costs(capsys, monkeypatch):
    monkeypatch.setattr(aptckpt, "NATIVE", True)
    code, out, _ = run(capsys, "info")
    assert code == 0 and pairs(out)["core"] == "native (C++)"
    assert "speed" not in pairs(out) and "pip install" not in out
    doc = json.loads(run(capsys, "info", "--json")[1])
    assert doc["native_unavailable"] is None and doc["pure_slowdown"] is None


@pytest.mark.parametrize(
    ("mode", "reason", "core", "fix"),
    [
        ("disable", None, "pure Python (APTCKPT_NATIVE=disable)", "unset APTCKPT_NATIVE"),
        (
            "auto",
            "missing",
            "pure Python: this installation has no compiled core (a pure-Python wheel)",
            "pip install --force-reinstall --no-deps --no-cache-dir aptckpt (binary wheels",
        ),
        (
            "auto",
            "ImportError: libstdc++.so.6: cannot open shared object file",
            "pure Python: the compiled core did not import (ImportError: libstdc++.so.6: cannot",
            "pip install --force-reinstall --no-deps --no-cache-dir aptckpt (binary wheels",
        ),
    ],
)
def test_info_with_the_twin_says_why_what_it_costs_and_how_to_get_the_core(
    capsys, monkeypatch, mode, reason, core, fix
):
    from aptckpt import _accel
    from aptckpt.cli._info import PURE_SLOWDOWN

    monkeypatch.setenv("APTCKPT_NATIVE", mode)
    monkeypatch.setattr(aptckpt, "NATIVE", False)
    monkeypatch.setattr(_accel, "NATIVE_UNAVAILABLE", reason)
    code, out, _ = run(capsys, "info")
    p = pairs(out)
    assert code == 0 and p["core"].startswith(core), out
    assert p["speed"].startswith(
        f"about {PURE_SLOWDOWN['load']:.1f}x the compiled core's CPU time for verified loads, "
        f"{PURE_SLOWDOWN['verify']:.1f}x for verify"
    ), out
    assert "(measured: benchmarks/bench_cores.py" in p["speed"], out
    assert p["native core"].startswith(fix), out
    doc = json.loads(run(capsys, "info", "--json")[1])
    assert doc["native_unavailable"] == ("disabled" if mode == "disable" else reason)
    assert {k: doc["pure_slowdown"][k] for k in PURE_SLOWDOWN} == PURE_SLOWDOWN


def test_info_in_a_process_whose_compiled_core_is_missing():
    # what the pure-Python wheel is: no aptckpt._native at all (None in sys.modules makes
    # the import fail as a missing module does)
    code = (
        "import sys; sys.modules['aptckpt._native'] = None\n"
        "from aptckpt.cli import main; sys.exit(main(['info', '--json']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "APTCKPT_NATIVE"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["implementation"] == "python" and doc["native"] is False
    assert doc["native_unavailable"] == "missing" and doc["pure_slowdown"]["load"] > 1


def test_info_quotes_what_bench_cores_measured():
    from aptckpt.cli._info import PURE_SLOWDOWN

    results = Path(__file__).parents[1] / "benchmarks" / "RESULTS-cores.md"
    rows = {
        cells[0]: float(cells[-1].rstrip("x"))  # the CPU-time ratio
        for line in results.read_text().splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
        if cells[-1].endswith("x")
    }
    assert {op: rows[op] for op in PURE_SLOWDOWN} == PURE_SLOWDOWN, "rerun bench_cores.py?"


def test_inspect(capsys, ckpt):
    code, out, _ = run(capsys, "inspect", ckpt)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["path", str(ckpt)]
    assert lines[1].split() == ["backend", "zstd"]
    assert "level=1 codec=auto" in out and "raw bytes       304 B" in out
    assert "epoch         3" in out and "note          'hi'" in out
    header = next(line for line in lines if line.startswith("key"))
    assert header.split() == ["key", "dtype", "shape", "bytes", "stored", "codecs"]
    row = next(line for line in lines if line.startswith("state['model']['w']"))
    assert row.split()[:5] == ["state['model']['w']", "float32", "(8,", "8)", "256"]
    assert "state['opt']['state'][0]['m']" in out and "store bytes" not in out

    code, out, _ = run(capsys, "inspect", "--json", ckpt)
    doc = json.loads(out)
    assert doc["backend"] == "zstd" and doc["metadata"] == {"epoch": 3, "note": "hi"}
    assert doc["raw_bytes"] == 304 and doc["files"][0]["path"] == "shard-00000.bin"
    w = doc["tensors"][0]
    assert w["key"] == "state['model']['w']" and w["dtype"] == "float32"
    assert w["shape"] == [8, 8] and w["nbytes"] == 256


def test_inspect_delta_shows_store_bytes(capsys, tmp_path):
    aptckpt.save(make_state(), tmp_path / "run" / "c1", backend="delta", local_below=0)
    code, out, _ = run(capsys, "inspect", tmp_path / "run" / "c1")
    assert code == 0 and "backend         delta" in out
    assert "store bytes" in out and "files           0 (0 B)" in out


# ---------------------------------------------------------------- verify


def test_verify_one_and_a_tree(capsys, tmp_path, ckpt):
    code, out, _ = run(capsys, "verify", ckpt)
    assert code == 0 and out.startswith(f"OK       {ckpt}  zstd ") and "4 tensors" in out

    run_dir = tmp_path / "run"
    aptckpt.save(make_state(), run_dir / "step-2", backend="delta")
    aptckpt.save(make_state(1), run_dir / "step-10", backend="delta")
    aptckpt.save(make_state(), run_dir / "nested" / "ckpt")
    # Not checkpoints: a save's leftover temp dir (it even has a manifest) and the store.
    temp = run_dir / ".step-3.tmp-999999-abcd"
    temp.mkdir()
    (temp / "manifest.msgpack").write_bytes(b"half-written")
    code, out, _ = run(capsys, "verify", run_dir)
    assert code == 0
    names = [line.split()[1] for line in out.splitlines() if line.startswith("OK")]
    assert names == ["nested/ckpt", "step-2", "step-10"]  # natural order
    assert out.splitlines()[-1] == "3 checkpoint(s): 3 OK, 0 failed"
    assert "/s" in out  # throughput

    code, out, _ = run(capsys, "verify", "--json", run_dir)
    doc = json.loads(out)
    assert [d["ok"] for d in doc] == [True] * 3
    assert doc[1]["path"] == str(run_dir / "step-2") and doc[1]["backend"] == "delta"


def test_verify_damage_names_file_and_tensor_and_checks_all(capsys, tmp_path):
    root = tmp_path / "runs"
    aptckpt.save(make_state(), root / "a")
    aptckpt.save(make_state(), root / "b")
    shard = root / "a" / "shard-00000.bin"
    flip_byte(shard, 0)  # tensor state['model']['w']
    flip_byte(shard, shard.stat().st_size - 1)  # tensor state['opt']['state'][0]['m']
    code, out, _ = run(capsys, "verify", root)
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "DAMAGED  a"
    assert "state['model']['w']" in lines[1] and "'shard-00000.bin'" in lines[1]
    assert "state['opt']['state'][0]['m']" in lines[2]
    assert lines[3].startswith("OK       b ")  # the next checkpoint was still checked
    assert lines[-1] == "2 checkpoint(s): 1 OK, 1 failed"

    code, out, _ = run(capsys, "verify", "--json", root / "a")
    assert code == 1
    (doc,) = json.loads(out)
    assert doc["ok"] is False and doc["file"] == "shard-00000.bin"
    assert doc["tensor"] == "state['model']['w']" and len(doc["problems"]) == 2


def test_verify_reports_unreadable_manifest_as_failure(capsys, tmp_path, ckpt):
    (ckpt / "manifest.msgpack").write_bytes(b"\x00garbage")
    code, out, _ = run(capsys, "verify", ckpt)
    assert code == 1 and out.startswith(f"FAILED   {ckpt}\n    ")


def run_unprivileged(argv, cwd):
    """Run the CLI as user nobody (tests run as root, who reads everything); returns
    (exit status, stdout, stderr). aptckpt is imported before privileges are dropped:
    nobody may not read this interpreter's files."""
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(aptckpt.__file__).parents[1])!r})\n"
        "from aptckpt.cli import main\n"
        "import aptckpt.backends.zstd, aptckpt.backends.torch, aptckpt.backends.delta\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"sys.exit(main({[str(a) for a in argv]!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def shared_tmp():
    """A directory user nobody can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="aptckpt-cli-"))
    path.chmod(0o755)
    yield path
    for p in path.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges to nobody")
def test_verify_reports_a_directory_it_cannot_list(shared_tmp):
    run_dir = shared_tmp / "run"
    for name in ("a", "b", "c"):
        aptckpt.save(make_state(), run_dir / name)
    for p in shared_tmp.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (run_dir / "b").chmod(0)
    code, out, err = run_unprivileged(["verify", run_dir], shared_tmp)
    assert code == 1, err
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["OK", "a"], ["OK", "c"]]
    assert lines[2] == "FAILED   b" and "Permission denied" in lines[3]
    assert "were not verified" in lines[3]
    assert lines[-1] == "3 checkpoint(s): 2 OK, 1 failed"
    # Named directly: the same FAILED line, not "no checkpoints beneath".
    code, out, _ = run_unprivileged(["verify", run_dir / "b"], shared_tmp)
    assert code == 1 and out.startswith("FAILED ") and "Permission denied" in out


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "{missing}"],
        ["verify", "{missing}"],
        ["diff", "{missing}", "{missing}"],
        ["convert", "{missing}", "{tmp}/out"],
        ["convert", "{missing}", "{tmp}/out.pt", "--to", "torch-file"],
        ["gc", "{missing}"],
        ["ls", "{missing}"],
    ],
)
def test_missing_path_is_one_clear_line(capsys, tmp_path, argv):
    missing = tmp_path / "nope"
    code, out, err = run(capsys, *(a.format(missing=missing, tmp=tmp_path) for a in argv))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"aptckpt {argv[0]}: error: ")
    assert str(missing) in err and ("does not exist" in err or "no object store" in err)


def test_unknown_backend_and_bad_options(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "out", "--backend", "zstd2")
    assert code == 2
    assert "unknown backend 'zstd2'; available: 'delta', 'torch', 'zstd'" in err
    code, _, err = run(
        capsys, "convert", ckpt, tmp_path / "out", "--backend", "torch", "--level", 3
    )
    assert code == 2 and "backend 'torch' has no option 'level'" in err
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "out", "--option", "codec")
    assert code == 2 and "--option 'codec' is not KEY=VALUE" in err
    code, _, err = run(
        capsys, "convert", ckpt, tmp_path / "o.pt", "--to", "torch-file", "--level", 3
    )
    assert code == 2 and "apply to checkpoints, not --to torch-file" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o.pt").exists()


def test_usage_errors(capsys, ckpt):
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err
    assert main(["bogus"]) == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"aptckpt {aptckpt.__version__}"
    assert main(["verify", "--help"]) == 0
    code, _, err = run(capsys, "inspect", ckpt / "shard-00000.bin")
    assert code == 2 and "not a checkpoint directory" in err


def test_os_error_is_one_line(capsys, ckpt, tmp_path):
    dst = tmp_path / "no-such-dir" / "out.pt"
    code, _, err = run(capsys, "convert", ckpt, dst, "--to", "torch-file")
    assert code == 2 and err.count("\n") == 1
    assert "No such file or directory" in err and "no-such-dir" in err


def test_damage_while_reading_exits_1(capsys, tmp_path, ckpt):
    other = tmp_path / "other"
    aptckpt.save(make_state(), other)
    flip_byte(other / "shard-00000.bin", 0)
    code, _, err = run(capsys, "convert", other, tmp_path / "out.pt", "--to", "torch-file")
    assert code == 1 and "is damaged" in err and "state['model']['w']" in err
    # diff's 1 means "they differ": damage there is trouble, 2, as in diff(1).
    code, _, err = run(capsys, "diff", ckpt, other)
    assert code == 2 and "is damaged" in err and "state['model']['w']" in err


# ---------------------------------------------------------------- diff


def test_diff(capsys, tmp_path):
    model = {"w": torch.ones(10), "same": torch.arange(6).reshape(2, 3)}
    a = {"model": model, "step": 5, "old": 1, "h": torch.zeros(2), "s": torch.zeros(2)}
    b = {"model": {k: v.clone() for k, v in model.items()}, "step": 6, "new": torch.ones(1)}
    b.update(h=torch.zeros(2, dtype=torch.float16), s=torch.zeros(3))
    b["model"]["w"][0] += 0.5
    b["model"]["w"][3] -= 2.0
    aptckpt.save(a, tmp_path / "a")
    aptckpt.save(b, tmp_path / "b")
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert code == 1  # different, as diff(1)
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line}
    w = "state['model']['w']"
    assert rows[w].split() == [w, "changed", "2/10", "2", "0.6519"]
    assert rows["state['step']"].split() == ["state['step']", "5", "->", "6"]
    assert rows["state['h']"].split() == ["state['h']", "dtype", "float32", "->", "float16"]
    assert rows["state['s']"].split() == ["state['s']", "shape", "(2,)", "->", "(3,)"]
    assert "only in A" in rows["state['old']"] and "only in B" in rows["state['new']"]
    assert "state['model']['same']" not in rows  # unchanged keys only with --all
    assert out.splitlines()[-1] == ("different: 1 same, 4 changed, 1 only in A, 1 only in B")
    code, out, _ = run(capsys, "diff", "--all", tmp_path / "a", tmp_path / "b")
    assert code == 1 and "state['model']['same']" in out

    code, out, _ = run(capsys, "diff", "--json", tmp_path / "a", tmp_path / "b")
    assert code == 1
    keys = {r["key"]: r for r in json.loads(out)["keys"]}
    row = keys[w]
    assert (row["status"], row["differing"], row["numel"], row["max_abs_diff"]) == (
        "changed",
        2,
        10,
        2.0,
    )
    assert math.isclose(row["rel_l2"], math.sqrt(4.25 / 10))
    assert keys["state['model']['same']"]["status"] == "same" and keys["state['step']"]["b"] == 6


def test_diff_and_inspect_spell_keys_alike(capsys, tmp_path, ckpt):
    _, out, _ = run(capsys, "inspect", "--json", ckpt)
    inspected = {t["key"] for t in json.loads(out)["tensors"]}
    _, out, _ = run(capsys, "diff", "--json", ckpt, ckpt)
    diffed = {r["key"] for r in json.loads(out)["keys"]}
    assert inspected == {
        "state['model']['w']",  # and its tied twin, listed once by inspect
        "state['model']['b']",
        "state['model']['layers'][0]['k']",
        "state['opt']['state'][0]['m']",
    }
    assert inspected <= diffed and "state['model']['tied']" in diffed


def test_diff_keeps_keys_a_dotted_spelling_would_merge(capsys, tmp_path):
    aptckpt.save({"a.b": 1, "a": {"b": 2}}, tmp_path / "x")
    aptckpt.save({"a.b": 1, "a": {"b": 3}}, tmp_path / "y")
    code, out, _ = run(capsys, "diff", tmp_path / "x", tmp_path / "y")
    assert code == 1
    assert "state['a']['b']  2 -> 3" in out and "state['a.b']" not in out


def test_diff_identical_nested_keys_and_nan(capsys, tmp_path):
    state = make_state()
    state["model"]["n"] = torch.tensor([float("nan"), 1.0])
    aptckpt.save(state, tmp_path / "a")
    aptckpt.save(state, tmp_path / "b", backend="torch")
    code, out, _ = run(capsys, "diff", "--all", tmp_path / "a", tmp_path / "b")
    assert code == 0 and out.splitlines()[-1].startswith("identical: 8 same, 0 changed")
    assert "state['opt']['state'][0]['m']" in out and "state['model']['layers'][0]['k']" in out
    code, _, _ = run(capsys, "diff", "--json", tmp_path / "a", tmp_path / "b")
    assert code == 0

    state["model"]["n"] = torch.tensor([1.0, 1.0])
    aptckpt.save(state, tmp_path / "c")
    code, out, _ = run(capsys, "diff", "--json", tmp_path / "a", tmp_path / "c")
    assert code == 1
    n = next(r for r in json.loads(out)["keys"] if r["key"] == "state['model']['n']")
    assert n["differing"] == 1 and n["max_abs_diff"] == "nan"  # strict JSON: NaN as a string


# ---------------------------------------------------------------- convert


def test_convert_to_another_backend(capsys, tmp_path, ckpt):
    dst = tmp_path / "as-torch"
    code, out, _ = run(capsys, "convert", ckpt, dst, "--backend", "torch")
    assert code == 0 and out.startswith(f"converted {ckpt} -> {dst} (torch): 4 tensors")
    assert aptckpt.inspect(dst).backend == "torch"
    loaded = aptckpt.load(dst)
    assert torch.equal(loaded["model"]["w"], make_state()["model"]["w"])

    code, _, err = run(capsys, "convert", ckpt, dst, "--level", 9)
    assert code == 2 and "--overwrite" in err and "overwrite=True" not in err
    code, _, _ = run(
        capsys, "convert", ckpt, dst, "--level", 9, "--overwrite", "--option", "codec=none"
    )
    assert code == 0 and aptckpt.inspect(dst).options["level"] == 9
    assert aptckpt.inspect(dst).options["codec"] == "none"


def test_convert_to_torch_file(capsys, tmp_path, ckpt):
    dst = tmp_path / "export.pt"
    code, out, _ = run(capsys, "convert", ckpt, dst, "--to", "torch-file")
    assert code == 0 and out.startswith(f"wrote {dst} (torch-file, ")
    state = torch.load(dst, weights_only=True)
    expected = make_state()
    assert torch.equal(state["model"]["w"], expected["model"]["w"])
    assert state["model"]["tied"] is state["model"]["w"]  # aliasing survives
    assert state["opt"]["state"][0]["m"].tolist() == [0, 1, 2, 3, 4]
    assert state["step"] == 5 and state["name"] == "run-a"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "export.pt"]  # no temp file left
    assert dst.stat().st_mode & 0o777 == 0o666 & ~_umask()

    code, _, err = run(capsys, "convert", ckpt, dst, "--to", "torch-file")
    assert code == 2 and "exists; pass --overwrite" in err
    code, _, _ = run(capsys, "convert", ckpt, dst, "--to", "torch-file", "--overwrite")
    assert code == 0 and sorted(os.listdir(tmp_path)) == ["ckpt", "export.pt"]


def test_export_never_replaces_a_device_or_fifo(capsys, tmp_path, ckpt):
    # Special files of our own: were the refusal broken, /dev/null itself would be replaced.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    specials = [(fifo, stat.S_ISFIFO)]
    if os.geteuid() == 0:  # a device node (null's numbers) needs root
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        specials.append((tmp_path / "null", stat.S_ISCHR))
    for dst, _ in specials:
        for to in ("torch-file", "safetensors"):
            code, _, err = run(capsys, "convert", ckpt, dst, "--to", to, "--overwrite")
            # safetensors to a name without the suffix writes a directory (HF's layout)
            assert code == 2 and ("is not a regular file" in err or "is not a directory" in err)
    assert all(kind(os.lstat(dst).st_mode) for dst, kind in specials)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_to_torch_file_refuses_empty_bytes(capsys, tmp_path):
    aptckpt.save({"x": b""}, tmp_path / "c")
    code, _, err = run(capsys, "convert", tmp_path / "c", tmp_path / "x.pt", "--to", "torch-file")
    assert code == 2 and "cannot store empty bytes (b'') at state['x']" in err
    assert not (tmp_path / "x.pt").exists()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_convert_to_safetensors(capsys, tmp_path, ckpt):
    st = pytest.importorskip("safetensors.torch")
    dst = tmp_path / "model.safetensors"
    code, out, err = run(capsys, "convert", ckpt, dst, "--to", "safetensors")
    assert code == 0 and out.startswith(f"wrote {dst} (safetensors, ")
    assert "tied tensor name(s) stored once, recorded in __metadata__ as 'tied' -> 'w'" in err
    tensors = st.load_file(dst)
    assert sorted(tensors) == ["b", "layers.0.k", "w"]  # the tie stored once, HF's way
    assert torch.equal(tensors["w"], make_state()["model"]["w"])
    with st.safe_open(dst, "pt") as f:
        assert f.metadata()["tied"] == "w" and f.metadata()["format"] == "pt"
    assert dst.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not the writer's 0600 temp file

    # No "model" entry: the whole state, nested keys dotted; a plain value is refused,
    # naming it and the way out (--select the weights).
    flat = tmp_path / "flat"
    aptckpt.save({"w": torch.ones(2), "step": 3, "nested": {"x": torch.ones(1)}}, flat)
    code, _, err = run(capsys, "convert", flat, tmp_path / "f.safetensors", "--to", "safetensors")
    assert code == 2 and "'step' is not a tensor (int)" in err and "select" in err
    assert not (tmp_path / "f.safetensors").exists()
    code, _, err = run(
        capsys, "convert", flat, tmp_path / "f.safetensors", "--to", "safetensors",
        "--select", "nested",
    )  # fmt: skip
    assert code == 0 and sorted(st.load_file(tmp_path / "f.safetensors")) == ["x"]

    aptckpt.save({"model": {"c": torch.zeros(2, dtype=torch.complex128)}}, tmp_path / "c128")
    code, _, err = run(
        capsys, "convert", tmp_path / "c128", tmp_path / "c.st", "--to", "safetensors"
    )
    assert code == 2 and "'c' is a torch.complex128 tensor" in err and "'torch-file'" in err
    assert not (tmp_path / "c.st").exists()


def test_convert_to_dcp_and_between_foreign_formats(capsys, tmp_path, ckpt):
    dst = tmp_path / "dcp"
    code, out, err = run(capsys, "convert", ckpt, dst, "--to", "dcp")
    assert code == 0 and out.startswith(f"wrote {dst} (dcp, 5 tensors, ")
    assert "DCP keeps no ties" in err and "non-string dict keys become strings" in err
    code, out, _ = run(capsys, "convert", dst, tmp_path / "back")  # imported, unpickled never
    assert code == 0 and out.startswith("imported ")
    back = aptckpt.load(tmp_path / "back")
    assert torch.equal(back["model"]["tied"], make_state()["model"]["w"])
    assert back["opt"]["state"]["0"]["m"].tolist() == [0, 1, 2, 3, 4]
    # foreign to foreign, no checkpoint between: DCP -> sharded safetensors directory
    hf = tmp_path / "hf"
    code, out, err = run(
        capsys, "convert", dst, hf, "--to", "safetensors", "--max-shard-size", "200B"
    )
    assert code == 0 and ", 4 files)" in out, (out, err)
    assert (hf / "model.safetensors.index.json").is_file()
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "o", "--select", "model")
    assert code == 2 and "--select and --max-shard-size apply to exports" in err
    code, _, err = run(capsys, "convert", ckpt, dst, "--to", "dcp")
    assert code == 2 and "exists; pass --overwrite" in err


def test_convert_to_safetensors_without_the_package(capsys, monkeypatch, tmp_path, ckpt):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import now fails
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "m.st", "--to", "safetensors")
    assert code == 2 and "pip install safetensors" in err
    assert not (tmp_path / "m.st").exists()


def test_progress_bars_on_a_terminal(capsys, monkeypatch, tmp_path, ckpt):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["convert", str(ckpt), str(tmp_path / "c2")]) == 0
    size = aptckpt.inspect(ckpt).stored_bytes
    # a bar of the source's bytes, cleared when done (the result line follows on stdout)
    assert "convert:" in tty.getvalue() and f"/{size} " in tty.getvalue()
    assert aptckpt.verify(tmp_path / "c2").tensors == 4
    tty.seek(0)
    tty.truncate()
    assert main(["verify", str(tmp_path)]) == 0
    total = size + aptckpt.inspect(tmp_path / "c2").stored_bytes
    assert "verify:" in tty.getvalue() and f"/{total} " in tty.getvalue()
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "2 checkpoint(s): 2 OK, 0 failed"


def test_ctrl_c_under_a_progress_bar_stops_the_work_and_its_temp_file(
    capsys, monkeypatch, tmp_path, ckpt
):
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    started = []

    def slow_write(flat, f):  # an export that takes a while, as a large one does
        f.write(b"partial")
        started.append(threading.current_thread())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr("aptckpt._exports.write_torch_file", slow_write)
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # Ctrl-C, as the terminal sends it
        code = main(["convert", str(ckpt), str(tmp_path / "out.pt"), "--to", "torch-file"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 130 and "interrupted" in sys.stderr.getvalue()
    assert started == [threading.main_thread()]  # where the signal lands
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no out.pt, no temporary left


# ---------------------------------------------------------------- gc


def test_gc_dry_run_then_real(capsys, tmp_path):
    run_dir = tmp_path / "run"
    aptckpt.save(
        {"a": torch.ones(1000), "b": torch.randn(1000)},
        run_dir / "c1",
        backend="delta",
        local_below=0,
    )
    aptckpt.save({"a": torch.ones(1000)}, run_dir / "c2", backend="delta", local_below=0)
    aptckpt.delete(run_dir / "c1")
    store = run_dir / "aptckpt-store"
    files_before = sorted(p for p in store.rglob("*") if p.is_file())

    code, out, _ = run(capsys, "gc", "--dry-run", run_dir)
    assert code == 0
    rows = pairs(out)
    assert rows["store"] == str(store) and rows["checkpoints"].startswith("1 ")
    # c2 reached too little of c1's pack to share it (it copied "a" into its own)
    assert rows["would remove"].startswith("0 objects, 1 packs, ")
    assert rows["would free"].endswith("KB")
    assert "nothing was removed" in out
    assert sorted(p for p in store.rglob("*") if p.is_file()) == files_before

    code, out, _ = run(capsys, "gc", run_dir)
    real = pairs(out)
    assert (
        code == 0
        and real["removed"] == rows["would remove"]
        and real["freed"] == rows["would free"]
    )
    assert len([p for p in store.rglob("*") if p.is_file()]) == len(files_before) - 1
    assert torch.equal(aptckpt.load(run_dir / "c2")["a"], torch.ones(1000))

    code, out, _ = run(capsys, "gc", "--json", run_dir)
    doc = json.loads(out)
    assert code == 0 and doc["removed_objects"] == doc["removed_packs"] == 0
    assert doc["kept_packs"] >= 1
    assert doc["dry_run"] is False


def test_gc_on_a_run_without_a_store_has_nothing_to_collect(capsys, tmp_path, ckpt):
    run_dir = tmp_path / "run"
    mgr = aptckpt.CheckpointManager(run_dir)  # zstd: no store
    mgr.save_checkpoint(Tiny(), None, None, 0, 1, [], {"loss": 1.0})
    mgr.close()
    for path in (run_dir, ckpt):
        code, out, err = run(capsys, "gc", path)
        assert code == 0 and err == ""
        assert out.startswith(f"nothing to collect: '{path}' has no object store")
    code, out, _ = run(capsys, "gc", "--json", "--dry-run", run_dir)
    doc = json.loads(out)
    assert code == 0 and doc["store"] is None and doc["removed_objects"] == 0
    assert doc["dry_run"] is True and doc["note"].startswith("nothing to collect")


def test_gc_on_a_delta_checkpoint_points_to_its_run(capsys, tmp_path):
    aptckpt.save({"w": torch.ones(3)}, tmp_path / "run" / "c1", backend="delta")
    code, _, err = run(capsys, "gc", tmp_path / "run" / "c1")
    assert code == 2 and "is a delta checkpoint" in err and "aptckpt-store" in err
    code, _, err = run(capsys, "gc", tmp_path / "run" / "c1" / "shard.bin")
    assert code == 2 and "does not exist" in err


# ---------------------------------------------------------------- ls


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)


def test_ls(capsys, tmp_path):
    run_dir = tmp_path / "run"
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = aptckpt.CheckpointManager(run_dir, backend="delta", keep=KeepAll())
    mgr.save_checkpoint(model, opt, None, 0, 10, [2.0], {"loss": 1.5, "acc": 0.25})
    metrics = {"loss": 1.2}
    mgr.save_checkpoint(model, opt, None, 1, 15, [1.0], metrics, temporary=True, batch_index=5)
    records = mgr.checkpoints()

    code, out, _ = run(capsys, "ls", run_dir)
    assert code == 0
    lines = out.splitlines()
    header = ["step", "epoch", "kind", "metrics", "best", "written", "backend", "path"]
    assert lines[0].split() == header
    first = lines[1].split()
    assert first[:5] == ["10", "0", "epoch", "loss=1.5", "acc=0.25"]
    assert first[-2:] == ["delta", records[0].rel_path]
    second = lines[2].split()
    assert second[:4] == ["15", "1", "temp", "loss=1.2"] and second[-1] == records[1].rel_path
    assert len(lines) == 3

    code, out, _ = run(capsys, "ls", "--json", run_dir)
    doc = json.loads(out)["checkpoints"]
    assert [d["step"] for d in doc] == [10, 15]
    assert doc[0]["path"] == str(records[0].path) and doc[1]["batch_index"] == 5
    assert doc[0]["metrics"] == {"loss": 1.5, "acc": 0.25} and doc[0]["bytes"] > 0
    assert doc[0]["best_when_saved"] is True and doc[0]["is_best"] is True


def test_ls_marks_only_the_runs_best(capsys, tmp_path):
    model = Tiny()
    mgr = aptckpt.CheckpointManager(tmp_path, keep=KeepAll())
    for step, loss in ((10, 1.5), (20, 0.9), (30, 1.1)):
        mgr.save_checkpoint(model, None, None, step // 10, step, [], {"loss": loss})
    assert [r.is_best for r in mgr.checkpoints()] == [True, True, False]  # best when saved
    code, out, _ = run(capsys, "ls", tmp_path)
    assert code == 0
    assert [line.split()[4] == "*" for line in out.splitlines()[1:]] == [False, True, False]
    _, out, _ = run(capsys, "ls", "--json", tmp_path)
    assert [d["is_best"] for d in json.loads(out)["checkpoints"]] == [False, True, False]


def test_ls_on_a_run_without_checkpoints_yet_lists_nothing(capsys, tmp_path):
    aptckpt.CheckpointManager(tmp_path / "run").close()  # opened, never saved
    code, out, err = run(capsys, "ls", tmp_path / "run")
    assert code == 0 and out == "" and "has no checkpoints yet" in err
    code, out, _ = run(capsys, "ls", "--json", tmp_path / "run")
    assert code == 0 and json.loads(out)["checkpoints"] == []


def test_ls_on_what_is_not_a_run(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, "ls", ckpt)
    assert code == 2 and f"use: aptckpt inspect {ckpt}" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "ls", empty)
    assert code == 2 and "no metadata.json and no checkpoints" in err
    code, _, err = run(capsys, "ls", tmp_path)  # holds a checkpoint, but is no run
    assert code == 2 and "aptckpt verify lists them" in err


# ---------------------------------------------------------------- entry points


def test_python_m_aptckpt_info():
    proc = subprocess.run(
        [sys.executable, "-m", "aptckpt", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == aptckpt.__version__


def test_closed_pipe_exits_as_sigpipe_would(tmp_path, ckpt):
    aptckpt.save(make_state(1), tmp_path / "other")
    # `aptckpt diff a b | head -0`: the reader is gone before a line is written. Not 1,
    # which would say "they differ"; no traceback either.
    with open(tmp_path / "stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aptckpt", "diff", "--all", ckpt, tmp_path / "other"],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        proc.stdout.close()
        code = proc.wait(timeout=120)
    err = (tmp_path / "stderr").read_text()
    assert code == 128 + signal.SIGPIPE, err
    assert err == ""


def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "aptckpt"
    if not script.exists():
        pytest.skip("the aptckpt console script is not installed in this environment")
    proc = subprocess.run(
        [str(script), "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    missing = tmp_path / "nope"
    expected = f"aptckpt inspect: error: no checkpoint at '{missing}': the path does not exist\n"
    assert proc.stderr == expected
