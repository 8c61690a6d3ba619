#!/usr/bin/env bash
# GPU check: on a machine with a CUDA device, set up what is needed, run the CUDA tests and a
# short CUDA benchmark, and print a summary -- in under 8 minutes (each step has a time limit).
#
# Usage (from anywhere; it works in the repository root):
#   bash scripts/gpu_check.sh                  # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-dry-run    # no GPU: the same steps, the CUDA parts skipped
#   bash scripts/gpu_check.sh --fetch-wheels   # beforehand, on a machine with the registry:
#                                              # wheels of what the GPU machine lacks -> .whl/
# Options:
#   --python PATH      the Python to use (default: see "Which torch" below; also $PYTHON)
#   --wheels DIR       where wheels of missing packages are looked for (default .whl)
#   --install-torch    no CUDA torch found: make .venv-gpu and install torch==2.13.0 there
#                      from the package registry (needs network; see below)
#   --rebuild          build the native core even if one for this Python imports already
#   --bench-gb N       state size of the benchmark in GB (default 1; dry run 0.02)
#   --bench-reps N     timed rounds of the benchmark (default 3)
#   --no-bench, --no-tests   skip that step
#   --fetch-python X.Y Python version of the wheels --fetch-wheels gets (default 3.12)
# Writes, when $OUT is set (the device tool's output folder), gpu_check-summary.md, the logs
# of each step and RESULTS-cuda.md there; the summary is always printed. Exit status: 0 when
# every step passed (on a GPU machine: no CUDA test skipped either), 1 otherwise.
#
# Which torch. The project pins torch==2.13.0 (constraints.txt), the CPU build this
# environment's registry serves. A GPU run needs a CUDA build of torch:
#   1. Already installed (the usual case): the first of --python / $PYTHON, `python3`,
#      /opt/torch/.venv/bin/python3 and .venv/bin/python whose torch sees a CUDA device is
#      used, whatever its torch version (aptckpt needs torch >= 2.4). The lent GPU machines
#      (nvidia-h100-x1, nvidia-h200: /work/.library/device/KINDS.md) have one: python3 3.12
#      with torch 2.11.0+cu130 in /opt/torch/.venv. They reach no network, and a CUDA torch
#      wheel (GBs with its CUDA libraries) is far over what a call carries (64 MiB), so 2.13.0
#      cannot be brought there: the summary states the torch version that ran.
#   2. None found and --install-torch: .venv-gpu is created with the chosen python3 and
#      torch==2.13.0 installed from the registry (-c constraints.txt). The Linux x86-64 torch
#      wheels of the public index are CUDA builds; an index serving the CPU build (as this
#      environment's does) can be replaced for torch by setting TORCH_INDEX_URL to an index
#      of CUDA builds. The script checks that the installed torch sees the device.
# Other packages: aptckpt needs numpy, msgpack, zstandard, xxhash, tqdm; the tests pytest and
# hypothesis. Those missing are installed into /tmp/aptckpt-gpu-site from the wheels in --wheels
# (offline; `--fetch-wheels` downloads them beforehand: the lent GPU machines lack zstandard
# alone), else from the registry when it answers, else the script stops naming them.
# The native core (C++, cpp/) is built with CMake for the chosen Python unless one imports
# already; if the build fails the pure-Python core runs, and the summary says which ran.
#
# On the lent machines, from the repository root here (the device tool copies the tree there):
#   bash scripts/gpu_check.sh --fetch-wheels
#   then device run: command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 540
# and copy RESULTS-cuda.md from what comes back into benchmarks/.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

DRY_RUN=0 FETCH=0 INSTALL_TORCH=0 REBUILD=0 RUN_BENCH=1 RUN_TESTS=1
PY_CHOICE=${PYTHON:-} WHEELS=.whl BENCH_GB="" BENCH_REPS=3 FETCH_PY=3.12
while [ $# -gt 0 ]; do
    case $1 in
        --cpu-dry-run) DRY_RUN=1 ;;
        --fetch-wheels) FETCH=1 ;;
        --install-torch) INSTALL_TORCH=1 ;;
        --rebuild) REBUILD=1 ;;
        --no-bench) RUN_BENCH=0 ;;
        --no-tests) RUN_TESTS=0 ;;
        --python) PY_CHOICE=${2:?--python needs a path}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
        --bench-gb) BENCH_GB=${2:?--bench-gb needs a number}; shift ;;
        --bench-reps) BENCH_REPS=${2:?--bench-reps needs a number}; shift ;;
        --fetch-python) FETCH_PY=${2:?--fetch-python needs X.Y}; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Packages aptckpt and its tests import (module name = distribution name for all of them).
NEEDED=(numpy msgpack zstandard xxhash tqdm pytest hypothesis)
# The lent GPU machines' image lacks these (KINDS.md's package list); --fetch-wheels gets them.
FETCH_DEFAULT=(zstandard)

# ---------------------------------------------------------------- --fetch-wheels (here)
if [ "$FETCH" = 1 ]; then
    fetcher=${PY_CHOICE:-.venv/bin/python}
    [ -x "$fetcher" ] || fetcher=python3
    mkdir -p "$WHEELS"
    for dist in "${FETCH_DEFAULT[@]}"; do
        # the version this checkout's environment runs, when it has one
        version=$("$fetcher" -c "import importlib.metadata as m; print(m.version('$dist'))" \
            2>/dev/null) || version=""
        spec=$dist${version:+==$version}
        echo "gpu_check: fetching a CPython $FETCH_PY manylinux x86-64 wheel of $spec into $WHEELS/"
        "$fetcher" -m pip download -q --no-deps --only-binary=:all: \
            --python-version "$FETCH_PY" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$WHEELS" "$spec" || exit 1
    done
    ls -l "$WHEELS"
    if ! git check-ignore -q "$WHEELS/x.whl" 2>/dev/null; then
        echo "gpu_check: note: $WHEELS is not git-ignored; the device tool carries only ignored" \
            "paths named in carry (add it to .git/info/exclude)"
    fi
    exit 0
fi

# ---------------------------------------------------------------- bookkeeping
SUMMARY=$(mktemp)
LOGDIR=${OUT:-$(mktemp -d)}
mkdir -p "$LOGDIR"
FAILED=0
step_status=()
say() { echo "gpu_check: $*"; }
record() {  # record NAME STATUS SECONDS DETAIL
    step_status+=("| $1 | $2 | $3 s | $4 |")
    [ "$2" = ok ] || [ "$2" = skipped ] || FAILED=1
}
START=$SECONDS
MODE=gpu
if [ "$DRY_RUN" = 1 ]; then
    MODE="cpu-dry-run"
    export CUDA_VISIBLE_DEVICES=""  # a GPU, if any, stays unseen: the CUDA parts skip
fi
say "mode $MODE, repository $ROOT, logs in $LOGDIR"

# ---------------------------------------------------------------- 1. a Python with torch
t0=$SECONDS
probe_torch() {  # probe_torch PYTHON -> prints "version cuda_build devices" or fails
    "$1" - <<'EOF' 2>/dev/null
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(torch.__version__, torch.version.cuda or "none", n)
EOF
}
candidates=()
[ -n "$PY_CHOICE" ] && candidates+=("$PY_CHOICE")
candidates+=(python3 /opt/torch/.venv/bin/python3 .venv/bin/python .venv-gpu/bin/python)
PY="" TORCH_FACTS=""
for c in "${candidates[@]}"; do
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    facts=$(probe_torch "$c") || continue
    read -r _ _ devices <<<"$facts"
    if [ "$devices" -gt 0 ] || { [ "$DRY_RUN" = 1 ] && [ -z "$PY" ]; }; then
        PY=$c TORCH_FACTS=$facts
        [ "$devices" -gt 0 ] && break
    fi
done
if [ -z "$PY" ] && [ "$INSTALL_TORCH" = 1 ] && [ "$DRY_RUN" = 0 ]; then
    say "no Python with a CUDA torch found; installing torch==2.13.0 into .venv-gpu"
    index=()
    [ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
    { python3 -m venv .venv-gpu &&
        .venv-gpu/bin/python -m pip install -q -c constraints.txt "${index[@]}" torch==2.13.0 &&
        .venv-gpu/bin/python -m pip install -q -c constraints.txt "${NEEDED[@]}"; } \
        >"$LOGDIR/gpu_check-install.log" 2>&1
    if facts=$(probe_torch .venv-gpu/bin/python); then
        read -r _ build devices <<<"$facts"
        if [ "$devices" -gt 0 ]; then
            PY=.venv-gpu/bin/python TORCH_FACTS=$facts
        else
            say "the torch installed into .venv-gpu (CUDA build: $build) sees no CUDA device;" \
                "if the build is 'none' the registry served the CPU build: set TORCH_INDEX_URL" \
                "to an index of CUDA builds and rerun"
        fi
    else
        say "installing torch failed (no registry reachable?): see $LOGDIR/gpu_check-install.log"
    fi
fi
if [ -z "$PY" ]; then
    if [ "$DRY_RUN" = 1 ]; then
        say "no Python with torch found among: ${candidates[*]} (pass --python)"
    else
        say "no Python whose torch sees a CUDA device among: ${candidates[*]}." \
            "On a machine without a GPU run --cpu-dry-run; with a GPU but no CUDA torch, pass" \
            "--python or --install-torch (see the top of this script)"
    fi
    exit 1
fi
read -r TORCH_VERSION CUDA_BUILD DEVICES <<<"$TORCH_FACTS"
say "python $PY: torch $TORCH_VERSION, CUDA build $CUDA_BUILD, $DEVICES CUDA device(s)"
record "python + torch" ok $((SECONDS - t0)) "\`$PY\`: torch $TORCH_VERSION, CUDA build $CUDA_BUILD, $DEVICES device(s)"

# ---------------------------------------------------------------- 2. other packages
t0=$SECONDS
SITE=/tmp/aptckpt-gpu-site
missing=()
for m in "${NEEDED[@]}"; do
    "$PY" -c "import $m" 2>/dev/null || missing+=("$m")
done
detail="all present"
if [ ${#missing[@]} -gt 0 ]; then
    say "missing: ${missing[*]}; installing into $SITE"
    still=()
    for m in "${missing[@]}"; do
        wheel=$(compgen -G "$WHEELS/$m-*.whl" | head -n 1)
        if [ -n "$wheel" ]; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "$wheel" >>"$LOGDIR/gpu_check-install.log" 2>&1 || still+=("$m")
        else
            timeout 120 "$PY" -m pip install -q --no-deps --no-cache-dir --target "$SITE" \
                --timeout 10 --retries 0 "$m" >>"$LOGDIR/gpu_check-install.log" 2>&1 ||
                still+=("$m")
        fi
    done
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    for m in "${missing[@]}"; do
        "$PY" -c "import $m" 2>/dev/null || { [[ " ${still[*]} " == *" $m "* ]] || still+=("$m"); }
    done
    if [ ${#still[@]} -gt 0 ]; then
        say "cannot install ${still[*]}: no wheel in $WHEELS and no registry reachable." \
            "Run 'bash scripts/gpu_check.sh --fetch-wheels' where the registry answers (for" \
            "Python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')), and" \
            "carry $WHEELS along"
        record packages failed $((SECONDS - t0)) "missing: ${still[*]}"
        exit 1
    fi
    detail="installed from $WHEELS or the registry: ${missing[*]}"
fi
record packages ok $((SECONDS - t0)) "$detail"

# ---------------------------------------------------------------- 3. the native core
t0=$SECONDS
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
core_imports() { APTCKPT_NATIVE=require "$PY" -c "import aptckpt" 2>/dev/null; }
if [ "$REBUILD" = 0 ] && core_imports; then
    record "native core" ok $((SECONDS - t0)) "a build for this Python imports already"
else
    BUILD=/tmp/aptckpt-gpu-build-$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
    say "building the native core in $BUILD"
    if {
        cmakedir=$("$PY" -m pybind11 --cmakedir) &&
            cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$cmakedir" \
                -DPython_EXECUTABLE="$(command -v "$PY")" &&
            cmake --build "$BUILD" -j "$(nproc)" &&
            cp "$BUILD"/_native*.so src/aptckpt/
    } >"$LOGDIR/gpu_check-build.log" 2>&1 && core_imports; then
        record "native core" ok $((SECONDS - t0)) "built with CMake"
    else
        say "the native core did not build or import (see gpu_check-build.log): pure-Python core"
        record "native core" "failed (pure-Python core runs)" $((SECONDS - t0)) \
            "see gpu_check-build.log"
    fi
fi
CORE=$("$PY" -c "import aptckpt; print(aptckpt.IMPLEMENTATION)" 2>&1) || {
    say "aptckpt does not import: $CORE"
    exit 1
}

# ---------------------------------------------------------------- 4. the CUDA tests
# tests/test_cuda.py, the other tests that use a device (pinned staging, device names), and the
# modules whose code changes with CUDA present (RNG capture, manager, into=).
TESTS=(tests/test_cuda.py tests/test_background.py tests/test_training_state.py
    tests/test_load_into.py tests/test_api.py)
TEST_LINE="not run"
if [ "$RUN_TESTS" = 1 ]; then
    t0=$SECONDS
    say "pytest ${TESTS[*]}"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" \
        >"$LOGDIR/gpu_check-pytest.log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then  # the CUDA tests once more over the pure-Python core's reads
        say "pytest tests/test_cuda.py with APTCKPT_NATIVE=disable"
        APTCKPT_NATIVE=disable timeout 60 "$PY" -m pytest -q -p no:cacheprovider -rs \
            tests/test_cuda.py >>"$LOGDIR/gpu_check-pytest.log" 2>&1
        rc=$?
    fi
    TEST_LINE=$(grep -E '^=*.*(passed|failed|error).* in [0-9.]+s' "$LOGDIR/gpu_check-pytest.log" |
        tr -d '=' | sed 's/^ *//; s/ *$//' | paste -sd ';' | sed 's/;/; pure-Python core: /')
    cuda_skips=$(grep -c 'needs a CUDA device' "$LOGDIR/gpu_check-pytest.log")
    status=ok
    if [ $rc = 124 ]; then
        status="failed (timed out after 150 s)"
    elif [ $rc != 0 ]; then
        status="failed (pytest exit $rc)"
    elif [ "$MODE" = gpu ] && [ "$cuda_skips" -gt 0 ]; then
        status="failed (CUDA tests skipped on a GPU machine)"
    fi
    record "CUDA tests" "$status" $((SECONDS - t0)) "${TEST_LINE:-no result line}; skip lines naming CUDA: $cuda_skips"
    tail -n 25 "$LOGDIR/gpu_check-pytest.log"
else
    record "CUDA tests" skipped 0 "--no-tests"
fi

# ---------------------------------------------------------------- 5. the CUDA benchmark
REPORT=""
if [ "$RUN_BENCH" = 1 ]; then
    t0=$SECONDS
    bench=(benchmarks/bench_cuda.py --reps "$BENCH_REPS")
    [ -n "$BENCH_GB" ] && bench+=(--gb "$BENCH_GB")
    if [ "$DRY_RUN" = 1 ]; then
        bench+=(--cpu-dry-run)
        REPORT=benchmarks/_work/RESULTS-cuda-dryrun.md
    else
        REPORT=benchmarks/RESULTS-cuda.md
    fi
    bench+=(--out "$REPORT")
    say "python ${bench[*]}"
    timeout 210 "$PY" "${bench[@]}" >"$LOGDIR/gpu_check-bench.log" 2>&1
    rc=$?
    if [ $rc = 0 ] && [ -s "$REPORT" ]; then
        record "CUDA benchmark" ok $((SECONDS - t0)) "\`${bench[*]}\` -> $REPORT"
        [ -n "${OUT:-}" ] && cp "$REPORT" "$OUT/$(basename "$REPORT")"
    else
        record "CUDA benchmark" "failed (exit $rc)" $((SECONDS - t0)) "see gpu_check-bench.log"
        tail -n 25 "$LOGDIR/gpu_check-bench.log"
        REPORT=""
    fi
else
    record "CUDA benchmark" skipped 0 "--no-bench"
fi

# ---------------------------------------------------------------- summary
{
    echo "# aptckpt GPU check ($MODE)"
    echo
    echo "- **Date**: $(date -u '+%Y-%m-%d %H:%M') UTC; took $((SECONDS - START)) s (limit 480)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "- **GPU**: $(nvidia-smi --query-gpu=name,memory.total,driver_version \
            --format=csv,noheader 2>/dev/null | head -n 1)"
    else
        echo "- **GPU**: no nvidia-smi"
    fi
    echo "- **Python**: \`$PY\` ($("$PY" -c 'import sys; print(sys.version.split()[0])'));" \
        "torch $TORCH_VERSION (CUDA build $CUDA_BUILD; the project pins 2.13.0 CPU for CI);" \
        "aptckpt core: $CORE"
    echo "- **Tests**: $TEST_LINE"
    echo
    echo "| step | status | time | detail |"
    echo "|:---|:---|---:|:---|"
    printf '%s\n' "${step_status[@]}"
    if [ -n "$REPORT" ]; then
        echo
        sed -n '/^## Save/,$p' "$REPORT" | sed 's/^## /### /'
    fi
    echo
    if [ "$FAILED" = 0 ]; then echo "Result: every step passed."; else echo "Result: FAILED (see the steps above and the logs)."; fi
} >"$SUMMARY"
echo
cat "$SUMMARY"
if [ -n "${OUT:-}" ]; then
    cp "$SUMMARY" "$OUT/gpu_check-summary.md"
fi
rm -f "$SUMMARY"
if [ $((SECONDS - START)) -gt 480 ]; then
    say "warning: took $((SECONDS - START)) s, over the 8-minute budget"
fi
exit "$FAILED"
