#!/usr/bin/env bash
# Set up, then run the test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Build the cached default model once (about 20 s) so tests that use its tokenizer start fast.
.venv/bin/python -c "from server_sdk.engine.model import load_base_model; load_base_model()" >/dev/null
# -v: a line per test as it ends, with the suite's percentage; tests/heartbeat.py adds a line every 30 s while
# one test runs (none is silent for longer); --durations: the ten slowest at the end.
.venv/bin/python -m pytest -v --durations=10 "$@"
