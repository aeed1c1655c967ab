#!/usr/bin/env bash
# The main job: set up, then run a short DEVFT fine-tuning of SmolLM2-135M-Instruct and print
# held-out accuracy and eval loss before and after.
#   bash scripts/quickstart.sh              # on a local fleet: a secured Mosquitto, the coordinator
#                                           # and 4 torch-free devft-edge device processes (ONNX Runtime)
#   bash scripts/quickstart.sh --simulate   # simulated clients in one process (eager torch)
# Extra arguments go to `devft run` (e.g. -o rounds_per_stage=2). It runs the named config `quickstart`
# (server_sdk/configs/quickstart.yaml; `devft configs quickstart` prints it): the paper's fixed stage
# schedule (schedule: fixed) to show every developmental stage; devft's default schedule is `auto`,
# which on SmolLM2-135M moves to the full model after one round (README: What to expect). It evaluates
# the full model at stage ends (eval_every: 3), and scores accuracy only at the start and the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
name="quickstart-$(date +%Y%m%d-%H%M%S)"
if [ "${1:-}" = "--simulate" ]; then
  shift
  .venv/bin/devft run --config quickstart --name "$name" "$@"
else
  # DEVFT_KEEP_ARTIFACTS=1 (read here only) keeps every stage's artifacts: devft run --keep-artifacts
  keep=()
  if [ "${DEVFT_KEEP_ARTIFACTS:-0}" != "0" ]; then keep=(--keep-artifacts); fi
  # a generous round deadline: the 4 devices share this machine's cores with the coordinator
  .venv/bin/devft run --fleet local:4 --round-timeout 900 --config quickstart "${keep[@]}" --name "$name" "$@"
  .venv/bin/devft report "runs/$name"
  # The finished run's last stage artifacts and the devices' blob store (about 1.6 GB for SmolLM2) serve no
  # later step: free them (report, adapter, checkpoints and data stay). DEVFT_KEEP_ARTIFACTS=1 keeps them
  # (e.g. for `devft-edge bench` on the last stage's files) and only lists them.
  if [ "${DEVFT_KEEP_ARTIFACTS:-0}" != "0" ]; then
    .venv/bin/devft clean --dry-run "runs/$name"
  else
    echo "freeing the finished run's stage artifacts and device caches (DEVFT_KEEP_ARTIFACTS=1 keeps them):"
    .venv/bin/devft clean "runs/$name"
  fi
fi
