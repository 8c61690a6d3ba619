#!/usr/bin/env bash
# Set up .venv with everything aptckpt needs, and build + install aptckpt into it.
# Needs only Python >= 3.10, a C++17 compiler and CMake; idempotent and incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch is pinned (constraints.txt): an unpinned torch pulls several GB of CUDA packages.
# transformers and accelerate are test extras (the state zoo, tests/test_zoo.py); s3fs
# and moto[server] run the object-storage tests against a local S3 API server
# (tests/conftest.py starts it on 127.0.0.1); lightning is the Lightning integration's
# test extra, matplotlib draws `aptckpt plot`; the constraints keep them from moving torch.
"${PIP[@]}" install -c constraints.txt \
    "torch==2.13.0" numpy msgpack zstandard xxhash \
    "scikit-build-core>=0.11" "pybind11>=2.12" \
    tqdm pytest hypothesis safetensors transformers accelerate "lightning>=2.4" omegaconf matplotlib \
    ruff mypy \
    "s3fs>=2024.6" "moto[server]>=5.0"
# --no-build-isolation reuses the build tools above, and build/ keeps the C++ build
# incremental between runs. APTCKPT_REQUIRE_NATIVE=1: a failed C++ build is an error here,
# not the pure-Python fallback a user's `pip install` takes (docs/install.md).
APTCKPT_REQUIRE_NATIVE=1 "${PIP[@]}" install -c constraints.txt --no-build-isolation --no-deps .
.venv/bin/python -c "import aptckpt; print(f'aptckpt {aptckpt.__version__} installed, core: {aptckpt.IMPLEMENTATION}')"
