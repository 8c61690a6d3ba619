#!/usr/bin/env bash
# Set everything up, then run the main job: the reference APT training with
# checkpoints, killed mid-epoch with SIGKILL, resumed with --resume-from auto, and
# checked bit for bit against an uninterrupted run; then checkpointing cost per backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/main_job.py "$@"
