#!/usr/bin/env bash
# Set everything up, then run the whole test suite twice: with the compiled core
# (required, so a broken build cannot hide behind the fallback) and with the
# pure-Python twin. Extra arguments go to pytest (e.g. -m slow for torture runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== tests, native core =="
APTCKPT_NATIVE=require .venv/bin/python -m pytest "$@"
echo "== tests, pure-Python twin (APTCKPT_NATIVE=disable) =="
APTCKPT_NATIVE=disable .venv/bin/python -m pytest "$@"
