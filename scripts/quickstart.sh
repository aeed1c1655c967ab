#!/usr/bin/env bash
# The main job: set up, then run a short DEVFT fine-tuning of SmolLM2-135M-Instruct with
# simulated clients (about 10 minutes on 2 CPU cores) and print accuracy before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/devft run --name "quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
