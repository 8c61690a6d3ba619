"""Checks what a release file holds; scripts/build_dist.sh runs it on every file in dist/.

usage::

    python scripts/dist_contents.py sdist dist/aptckpt-0.1.0.tar.gz
    python scripts/dist_contents.py wheel dist/aptckpt-0.1.0-cp311-...whl --core native
    python scripts/dist_contents.py wheel dist/aptckpt-0.1.0-py3-none-any.whl --core python

Standard library only (it runs under any interpreter). Prints one line per file checked and
exits 1 listing every problem: a compiled object where none belongs (the checkout's
git-ignored ``src/aptckpt/_native*.so`` must never reach a release file), build or
environment folders, a missing license, CHANGELOG, ``py.typed`` or source file, or a wheel
whose tag does not match its core.
"""

from __future__ import annotations

import argparse
import email.message
import email.parser
import fnmatch
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Never in an sdist (paths relative to its top folder).
SDIST_FORBIDDEN = [
    "*.so", "*.so.*", "*.pyc", "*.whl", "*.tar.gz",
    "build/*", "dist/*", ".venv/*", ".venv-*/*", ".whl/*", "outputs/*", "benchmarks/_work/*",
    ".git/*", "*/__pycache__/*", ".pytest_cache/*", ".hypothesis/*", ".mypy_cache/*",
    ".ruff_cache/*",
]  # fmt: skip
SDIST_REQUIRED = [
    "PKG-INFO", "pyproject.toml", "CMakeLists.txt", "LICENSE", "README.md", "CHANGELOG.md",
    "constraints.txt", "src/aptckpt/__init__.py", "src/aptckpt/py.typed",
    "src/aptckpt/_pyimpl.py", "cpp/bindings.cpp",
]  # fmt: skip
WHEEL_REQUIRED = [
    "aptckpt/__init__.py", "aptckpt/py.typed", "aptckpt/_pyimpl.py", "aptckpt/_accel.py",
    "aptckpt/cli/__init__.py",
]  # fmt: skip
WHEEL_FORBIDDEN = ["tests/*", "benchmarks/*", "cpp/*", "build/*", "*/__pycache__/*", "*.pyc"]


def _matches(name: str, patterns: list[str]) -> list[str]:
    return [p for p in patterns if fnmatch.fnmatchcase(name, p)]


def _metadata(text: str) -> email.message.Message:
    return email.parser.HeaderParser().parsestr(text)


def _check_metadata(meta: email.message.Message, problems: list[str]) -> None:
    if meta.get("License-Expression") != "Apache-2.0":
        problems.append(f"License-Expression is {meta.get('License-Expression')!r}")
    if "LICENSE" not in meta.get_all("License-File", []):
        problems.append("no License-File: LICENSE in the metadata")
    if not meta.get("Requires-Python"):
        problems.append("no Requires-Python in the metadata")
    extras = set(meta.get_all("Provides-Extra", []))
    for extra in ("s3", "lightning", "hf", "plot", "test"):
        if extra not in extras:
            problems.append(f"no extra [{extra}] in the metadata")


def check_sdist(path: Path) -> list[str]:
    problems: list[str] = []
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        top = members[0].name.split("/")[0]
        names = {m.name.split("/", 1)[1] for m in members if "/" in m.name and m.isfile()}
        for m in members:
            if not m.name.startswith(f"{top}/") and m.name != top:
                problems.append(f"{m.name} lies outside the top folder {top}/")
            if m.issym() or m.islnk():
                problems.append(f"{m.name} is a link")
        pkg_info = tar.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        _check_metadata(_metadata(pkg_info.read().decode()), problems)
    for name in sorted(names):
        if _matches(name, SDIST_FORBIDDEN):
            problems.append(f"{name} must not be in the sdist")
    problems += [f"{name} is missing" for name in SDIST_REQUIRED if name not in names]
    # Every tracked file the build reads (the package, the C++ core) must be in it.
    if (ROOT / ".git").exists():
        tracked = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "src", "cpp"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        problems += [f"{name} (tracked) is missing" for name in tracked if name not in names]
    print(f"{path.name}: {len(names)} files, {path.stat().st_size} bytes")
    return problems


def check_wheel(path: Path, core: str) -> list[str]:
    problems: list[str] = []
    tags = path.name[: -len(".whl")].split("-")[2:]
    pure = tags == ["py3", "none", "any"]
    with zipfile.ZipFile(path) as whl:
        names = whl.namelist()
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        meta = _metadata(whl.read(f"{dist_info}/METADATA").decode())
        wheel_meta = _metadata(whl.read(f"{dist_info}/WHEEL").decode())
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
    _check_metadata(meta, problems)
    for name in names:
        if _matches(name, WHEEL_FORBIDDEN):
            problems.append(f"{name} must not be in the wheel")
    problems += [f"{name} is missing" for name in WHEEL_REQUIRED if name not in names]
    if f"{dist_info}/licenses/LICENSE" not in names:
        problems.append(f"{dist_info}/licenses/LICENSE is missing")
    if "aptckpt = aptckpt.cli:main" not in entry_points:
        problems.append("the aptckpt console script is not declared")
    for backend in ("delta", "torch", "zstd"):
        if f"{backend} = aptckpt.backends.{backend}:" not in entry_points:
            problems.append(f"the {backend} backend entry point is missing")
    compiled = [n for n in names if re.search(r"\.so(\.|$)", n)]
    natives = [n for n in compiled if re.fullmatch(r"aptckpt/_native\.cpython-\d+-[^/]+\.so", n)]
    if core == "python":
        if not pure:
            problems.append(f"a pure-Python wheel must be tagged py3-none-any, not {tags}")
        if wheel_meta.get("Root-Is-Purelib") != "true":
            problems.append("a pure-Python wheel must say Root-Is-Purelib: true")
        problems += [f"{n}: a pure-Python wheel holds no compiled code" for n in compiled]
    else:
        if pure or not tags[0].startswith("cp"):
            problems.append(f"a wheel with the compiled core needs a CPython tag, not {tags}")
        if len(natives) != 1:
            problems.append(f"expected one aptckpt/_native*.so, found {natives}")
        elif f"cpython-{tags[0][2:]}-" not in natives[0]:
            problems.append(f"{natives[0]} was built for another Python than the tag {tags[0]}")
        # auditwheel grafts libraries it had to bundle into aptckpt.libs/; there should be
        # none (the core needs only glibc and libstdc++, which every manylinux system has).
        problems += [f"{n}: unexpected compiled file" for n in compiled if n not in natives]
    print(f"{path.name}: {len(names)} files, {path.stat().st_size} bytes, core {core}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("kind", choices=["sdist", "wheel"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--core", choices=["native", "python"], default="native")
    args = parser.parse_args(argv)
    check = check_sdist if args.kind == "sdist" else lambda f: check_wheel(f, args.core)
    problems = check(args.file)
    for problem in problems:
        print(f"  PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
