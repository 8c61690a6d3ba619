#!/usr/bin/env bash
# Install each built wheel into a fresh virtual environment with no build tools and smoke-test
# it (scripts/smoke_dist.py: save/load/verify per backend, the CLI, a resumed CheckpointManager
# run): the manylinux wheel of this python (`aptckpt info` must say native), then the
# pure-Python wheel (it must say pure Python); then that `aptckpt[s3]` adds s3fs and what s3fs
# needs. Run after scripts/build_dist.sh; CI runs both (.ci/run). Fails loudly (non-zero).
#
# usage: scripts/check_dist.sh [DIST_DIR]      (default dist/)
# One venv for both wheels: the runtime dependencies (torch pinned by constraints.txt) are
# installed once with the first wheel; each wheel is then installed, tested and uninstalled.
# Installs take binaries only (--only-binary :all:) with CC/CXX=/bin/false: nothing compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
DIST=$(cd "${1:-dist}" && pwd)
VENV=$ROOT/build/dist-check
WORK=$(mktemp -d "${TMPDIR:-/tmp}/aptckpt-check-dist.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say() { printf '\n== %s ==\n' "$*"; }
die() { echo "check_dist: FAILED: $*" >&2; exit 1; }
now() { date +%s%N; }
TIMES=()
lap() {  # what, start
    local ms=$((($(now) - $2) / 1000000))
    TIMES+=("$(printf '%-44s %4d.%d s' "$1" $((ms / 1000)) $((ms % 1000 / 100)))")
}

tag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
shopt -s nullglob
native=("$DIST"/aptckpt-*-"$tag"-"$tag"-manylinux*.whl)
pure=("$DIST"/aptckpt-*-py3-none-any.whl)
[ ${#native[@]} -eq 1 ] || die "expected one $tag manylinux wheel in $DIST, found ${#native[@]}"
[ ${#pure[@]} -eq 1 ] || die "expected one pure-Python wheel in $DIST, found ${#pure[@]}"

# No compiler for anything pip might try to build, and binaries only.
export CC=/bin/false CXX=/bin/false PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$VENV/bin/python" -m pip install -q --only-binary :all: -c "$ROOT/constraints.txt")

say "fresh venv ($VENV, $("$PYTHON" --version))"
t=$(now)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
lap "fresh venv" "$t"

smoke() {  # core wheel
    local core=$1 wheel=$2 t
    say "$(basename "$wheel"): install, smoke test (core $core)"
    t=$(now)
    "${PIP[@]}" "$wheel" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; die "pip install $wheel"; }
    lap "install $(basename "$wheel" | cut -d- -f3-)" "$t"
    t=$(now)
    # from a folder outside the checkout, so nothing imports the source tree
    (cd "$WORK" && "$VENV/bin/python" "$ROOT/scripts/smoke_dist.py" --core "$core" "$WORK/$core") \
        || die "smoke test of $(basename "$wheel")"
    lap "smoke test, $core core" "$t"
    "$VENV/bin/aptckpt" info | sed -n '4,6p' | sed 's/^/    /'
}

smoke native "${native[0]}"

say "aptckpt[s3]: what the extra adds"
t=$(now)
"$VENV/bin/python" -m pip freeze --all | sort >"$WORK/before"
"${PIP[@]}" "${native[0]}[s3]" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; die "pip install aptckpt[s3]"; }
"$VENV/bin/python" -m pip freeze --all | sort >"$WORK/after"
added=$(comm -13 "$WORK/before" "$WORK/after" | tr '\n' ' ')
echo "added: $added"
# fsspec is there already: torch depends on it too
[[ $added == *s3fs==* ]] && grep -q '^fsspec==' "$WORK/after" || die "aptckpt[s3] did not add s3fs"
"$VENV/bin/python" - <<'PY' || die "aptckpt cannot open an s3:// URL with the [s3] extra"
import fsspec
import aptckpt.storage.remote as remote
fsspec.get_filesystem_class("s3")  # s3fs imports, with the aiobotocore it needs
print("s3:// resolves to", fsspec.get_filesystem_class("s3").__module__)
PY
lap "aptckpt[s3] extra" "$t"

t=$(now)
"$VENV/bin/python" -m pip uninstall -q -y aptckpt || die "pip uninstall aptckpt"
lap "uninstall" "$t"
smoke python "${pure[0]}"

say "time"
printf '%s\n' "${TIMES[@]}"
echo "check_dist: both wheels passed"
