#!/usr/bin/env bash
# Set everything up, then run the main job: save and load a realistic training
# state with every backend, printing what was done and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/main_job.py "$@"
