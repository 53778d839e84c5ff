#!/usr/bin/env bash
# Create .venv if absent, then run the test suite (slow tests excluded; add -m "" to run all).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
