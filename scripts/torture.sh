#!/usr/bin/env bash
# The slow torture runs (hundreds of SIGKILLs per backend, exhaustive corruption
# sweeps, long fuzzing) with the thorough hypothesis profile, with the compiled
# core and with the pure-Python twin. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE=thorough
exec bash scripts/test.sh -m slow "$@"
