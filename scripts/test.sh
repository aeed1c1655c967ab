#!/usr/bin/env bash
# Set up, then run the test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Build the cached default model once (about 20 s) so tests that use its tokenizer start fast.
.venv/bin/python -c "from server_sdk.engine.model import load_base_model; load_base_model()" >/dev/null
# -n 2: two pytest-xdist workers (most tests wait on brokers, devices and subprocesses, so two share two cores
# well: 18 min 41 s against about 28 min serial on a busy 2-core machine); --dist worksteal keeps the slow tests
# from queueing behind one worker. -v: a line per test as it ends, with the suite's percentage;
# tests/heartbeat.py adds a line every 30 s for each test still running (none is silent for longer);
# --durations: the ten slowest at the end. Extra arguments go to pytest (`-n 0` runs serially).
.venv/bin/python -m pytest -v -n 2 --dist worksteal --durations=10 "$@"
