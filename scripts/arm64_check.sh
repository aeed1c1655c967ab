#!/usr/bin/env bash
# Does a devft device on arm64 (Raspberry Pi, Jetson) take part in a real fleet round and train exactly as an
# x86_64 device does? Checked without a board: an arm64 Debian root run under qemu-user emulation. Correctness
# only; emulated timings mean nothing. Not part of the default test run (needs root, apt and debootstrap).
#
#   sudo scripts/arm64_check.sh                  # the fleet check (default)
#   sudo scripts/arm64_check.sh --executorch     # also the older ExecuTorch training + ORT eval check (~3 GB wheels)
#   DEVFT_ARM64_MODELS=tiny sudo -E scripts/arm64_check.sh   # only the tiny model (default: "tiny smollm2")
#
# The host side (coordinator, x86_64 device) uses the repo's .venv (or $DEVFT_PYTHON) and needs plain onnxruntime
# as its `onnxruntime` module; a PYTHONPATH given by the caller is kept (after the repo), e.g. a directory holding
# plain onnxruntime while the venv still has onnxruntime-training.
#
# Steps (each cached under $DEVFT_ARM64_CACHE, default /var/cache/devft-arm64, so a rerun takes minutes; delete
# a piece to rebuild it):
#   1. host: apt-get install qemu-user-static debootstrap binfmt-support; enable binfmt for aarch64
#   2. root/: debootstrap --arch=arm64 bookworm (Python 3.11) from the Debian mirror in /etc/apt/sources.list.d
#   3. wheels/: the project's wheel (built on the host from a copy of the working tree) and, downloaded on the
#      host with `pip download --platform manylinux*_aarch64`, the aarch64 wheels of its base dependencies and
#      `edge` extra, read from pyproject.toml: onnxruntime, numpy, tokenizers, safetensors, paho-mqtt, psutil
#      and what they pull. No torch.
#   4. mounts (/proc, /dev, a fake /sys: the host /sys makes ORT abort on emulated aarch64, see
#      shared/reference/arm64-emulation.md; the work directory at the same path as on the host), a venv in the
#      root, `pip install --no-index --find-links /wheels 'devft[edge]'` (no network inside the root).
#   5. for each model (tiny random LLaMA; SmolLM2-135M's 4-layer stage-1 submodel): the same one-device fleet
#      run twice (scripts/arm64_check.py fleet): secured Mosquitto on 127.0.0.1 + the coordinator on the host,
#      device dev-000 once as `devft-edge run` in the arm64 root (chroot + qemu-user, sharing the host network),
#      once as an x86_64 process here.
#      A server-side MQTT observer keeps each round's control message and global adapter; the round is then
#      trained again on x86_64 from exactly those inputs (the device's training steps).
#   6. compare (scripts/arm64_check.py compare): every round, the arm64 device's loss within 1e-5 of the x86_64
#      replay from identical inputs (and the replay equal to the x86_64 device's own loss), every update of both
#      devices accepted, device aarch64 without torch -> benchmarks/results/arm64.json and the arm64 block of
#      benchmarks/RESULTS.md. The drift between the two independent runs is reported, not gated.
#   --executorch adds the older check in a second venv of the same root (torch 2.13.0 CUDA 13 aarch64 build with
#   the nvidia-* libraries its loader needs, executorch 1.5.1, onnxruntime 1.19.2): ExecuTorch SGD steps on a tiny
#   stage + ORT evaluation on both machines, and `devft-edge bench` on the ExecuTorch artifacts.
# Exit status 0 = PASS, 1 = FAIL (losses differ, an update refused), other = setup error.
set -euo pipefail

EXECUTORCH=0
for arg in "$@"; do
  case $arg in
    --executorch) EXECUTORCH=1 ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "unknown argument $arg (use --executorch or nothing)" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DEVFT_ARM64_CACHE:-/var/cache/devft-arm64}
ROOTFS=$CACHE/root
WHEELS=$CACHE/wheels
WORK=$CACHE/work
HOST_PY=${DEVFT_PYTHON:-$REPO/.venv/bin/python}
MODELS=${DEVFT_ARM64_MODELS:-tiny smollm2}
SUITE=bookworm
PYTAG=(--python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
PLATFORMS=()
for v in 17 25 26 27 28; do PLATFORMS+=(--platform "manylinux_2_${v}_aarch64"); done
PLATFORMS+=(--platform manylinux2014_aarch64 --platform any)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

log() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)" >&2; }
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, mount): sudo $0" >&2; exit 2; }
[ -x "$HOST_PY" ] || { echo "no host python at $HOST_PY; create the venv (scripts/setup.sh) or set DEVFT_PYTHON" >&2; exit 2; }
# the coordinator validates exports and the x86_64 device trains with plain onnxruntime (onnxruntime-training
# owns the same module name and lacks what the portable format needs)
"$HOST_PY" - <<'EOF' || exit 2
import sys
from importlib.metadata import PackageNotFoundError, version
import onnxruntime
v = onnxruntime.__version__
try:
    training = version("onnxruntime-training") == v and "site-packages" in onnxruntime.__file__
except PackageNotFoundError:
    training = False
if training or tuple(int(x) for x in v.split(".")[:2]) < (1, 17):
    sys.exit(f"host onnxruntime {v} at {onnxruntime.__file__} is onnxruntime-training or older than 1.17: install "
             "plain onnxruntime>=1.17 (pip install 'devft[edge]'), or put a directory holding it first on PYTHONPATH")
EOF

log "1. host tools"
if ! command -v debootstrap >/dev/null || [ ! -e /usr/bin/qemu-aarch64-static ] || ! command -v update-binfmts >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap binfmt-support
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

log "2. arm64 Debian root at $ROOTFS"
if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  rm -rf "$ROOTFS.partial"
  nice -n 10 debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$ROOTFS.partial" "$MIRROR"
  mv "$ROOTFS.partial" "$ROOTFS"
fi

log "3. the devft wheel and the aarch64 wheels of the edge install in $WHEELS"
mkdir -p "$WHEELS" "$WORK"
# build from a copy of the working tree (tracked and untracked files git does not ignore): no build/ in the repo
rm -rf "$WORK/src" "$WORK/dist" && mkdir -p "$WORK/src"
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"
"$HOST_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src" >&2
DEVFT_WHEEL=$(ls "$WORK"/dist/devft-*.whl)
# the requirements of a device: the base dependencies plus the edge extra, as pyproject.toml declares them
mapfile -t EDGE_REQS < <("$HOST_PY" -c "
import tomllib; p = tomllib.load(open('$REPO/pyproject.toml', 'rb'))['project']
print('\n'.join(p['dependencies'] + p['optional-dependencies']['edge']))")
STAMP=$(printf '%s\n' "${EDGE_REQS[@]}" | sha256sum | cut -c1-16)
if [ ! -e "$WHEELS/.downloaded-$STAMP" ]; then
  "$HOST_PY" -m pip download -q --only-binary=:all: "${PLATFORMS[@]}" "${PYTAG[@]}" -d "$WHEELS" "${EDGE_REQS[@]}"
  touch "$WHEELS/.downloaded-$STAMP"
fi
du -sh "$WHEELS" >&2

log "4. mounts and the edge install inside the root"
FAKESYS=$CACHE/fakesys
mkdir -p "$FAKESYS/devices/system/cpu"
for f in online possible present; do echo 0-1 > "$FAKESYS/devices/system/cpu/$f"; done
for n in 0 1; do
  mkdir -p "$FAKESYS/devices/system/cpu/cpu$n/regs/identification"
  echo 0x00000000410fd083 > "$FAKESYS/devices/system/cpu/cpu$n/regs/identification/midr_el1"  # Cortex-A72 (Pi 4)
done
MOUNTS=()
cleanup() { for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
bind() { mkdir -p "$2"; mountpoint -q "$2" || { mount "${@:3}" "$1" "$2"; MOUNTS+=("$2"); }; }
bind proc "$ROOTFS/proc" -t proc
bind /dev "$ROOTFS/dev" --bind
bind "$FAKESYS" "$ROOTFS/sys" --bind
bind "$WHEELS" "$ROOTFS/wheels" --bind -o ro
bind "$WORK" "$ROOTFS$WORK" --bind  # the same absolute path inside: credentials, shards, caches, logs
in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/opt/devft/venv/bin:/usr/bin:/bin HOME=/root LC_ALL=C.UTF-8 "$@"; }

if [ ! -e "$ROOTFS/opt/devft/venv/installed-$STAMP" ]; then
  rm -rf "$ROOTFS/opt/devft/venv"
  in_root python3 -m venv /opt/devft/venv
  # dependencies resolved from the local wheels only: proves the cached set is the complete edge install
  in_root nice -n 10 pip install -q --no-compile --no-index --find-links /wheels --disable-pip-version-check \
    "$WORK/dist/$(basename "$DEVFT_WHEEL")[edge]"
  touch "$ROOTFS/opt/devft/venv/installed-$STAMP"
fi
# this working tree's code, every run
in_root pip install -q --no-compile --no-index --no-deps --force-reinstall --disable-pip-version-check \
  "$WORK/dist/$(basename "$DEVFT_WHEEL")"
in_root python -c "import platform, onnxruntime, importlib.util as u, edge_runtime.client; \
print(platform.machine(), 'onnxruntime', onnxruntime.__version__, 'torch importable:', u.find_spec('torch') is not None)"
in_root devft-edge --help >/dev/null
du -sh "$ROOTFS/opt/devft/venv" >&2

NOTE="Debian $SUITE arm64 root (debootstrap) under qemu-user-static $(dpkg-query -W -f='${Version}' qemu-user-static \
2>/dev/null || echo '?'); devft installed from its wheel with the edge extra, from a local wheel cache \
(pip --no-index): $(in_root pip list --format=freeze 2>/dev/null | grep -iE '^(onnxruntime|numpy|tokenizers|safetensors|paho-mqtt|psutil)==' \
| tr '\n' ' ')(venv $(du -sh "$ROOTFS/opt/devft/venv" | cut -f1)); fake /sys of a 2-core Cortex-A72."

log "5. fleet runs: the same one-device run with an x86_64 and an emulated arm64 device ($MODELS)"
for model in $MODELS; do
  for arch in x86_64 arm64; do
    log "5. $model, $arch device"
    (cd "$REPO" && nice -n 5 "$HOST_PY" scripts/arm64_check.py fleet --model "$model" --arch "$arch" \
      --work "$WORK" --rootfs "$ROOTFS") >/dev/null
  done
done

log "6. compare"
set +e
# shellcheck disable=SC2086
(cd "$REPO" && "$HOST_PY" scripts/arm64_check.py compare --work "$WORK" --models $MODELS \
  --out "$REPO/benchmarks/results/arm64.json" --markdown "$REPO/benchmarks/RESULTS.md" --setup-note "$NOTE") >/dev/null
STATUS=$?
set -e
"$HOST_PY" -c "import json; d = json.load(open('$REPO/benchmarks/results/arm64.json')); print(d['result'], \
[(c['case'], c['max_loss_diff'], c['accepted_events']) for c in d['cases']])"

[ "$EXECUTORCH" = 1 ] || exit $STATUS

log "7. (--executorch) aarch64 wheels of torch, executorch and onnxruntime 1.19.2 in $WHEELS/executorch"
# torch for aarch64 on PyPI is the CUDA 13 build; with its dependencies it pulls the whole nvidia-* set plus
# triton and cuda-bindings. Its shared libraries list CUDA libraries as DT_NEEDED (libtorch_cpu.so alone needs
# libcudart and libcupti), so `import torch` fails without them. We install torch --no-deps, its pure-Python
# deps, and only the nvidia-* wheels whose libraries the loader needs (no triton, cuda-bindings, nvtx or
# cusolver): 2.7 GB of a 4.0 GB venv. CUDA code never runs. nvidia-nccl-cu13==2.29.7, torch's pin, has no
# aarch64 wheel on the index; 2.32.3 provides the same libnccl.so.2. On a Pi, use the CPU-only wheel from
# download.pytorch.org/whl/cpu instead.
ET_WHEELS=$WHEELS/executorch
ET_REQS=(onnxruntime==1.19.2 numpy flatbuffers packaging protobuf sympy mpmath coloredlogs humanfriendly
  executorch==1.5.1 torchao==0.18.0 pyyaml ruamel.yaml tabulate typing-extensions
  torch==2.13.0 filelock networkx jinja2 markupsafe fsspec setuptools
  "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cupti==13.0.85" "nvidia-cublas==13.1.1.3"
  "nvidia-cufft==12.0.0.61" "nvidia-cufile==1.15.1.6" "nvidia-curand==10.4.0.35" "nvidia-cusparse==12.6.3.3"
  "nvidia-cuda-nvrtc==13.0.88" "nvidia-nvjitlink>=13.0.88,<14" "nvidia-cudnn-cu13==9.20.0.48"
  "nvidia-cusparselt-cu13==0.8.1" "nvidia-nccl-cu13==2.32.3" "nvidia-nvshmem-cu13==3.4.5")
mkdir -p "$ET_WHEELS"
for req in "${ET_REQS[@]}"; do  # one requirement at a time, no dependencies, skipped when cached
  stem=${req%%[=<>]*}; stem=${stem//[-.]/_}
  if ! compgen -G "$ET_WHEELS/${stem}-*.whl" >/dev/null && ! compgen -G "$ET_WHEELS/${stem,,}-*.whl" >/dev/null; then
    "$HOST_PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" "${PYTAG[@]}" -d "$ET_WHEELS" "$req"
  fi
done
ET_STAMP=$(ls "$ET_WHEELS" | sha256sum | cut -c1-16)
in_et() { chroot "$ROOTFS" /usr/bin/env -i PATH=/opt/devft/venv-executorch/bin:/usr/bin:/bin HOME=/root LC_ALL=C.UTF-8 "$@"; }
if [ ! -e "$ROOTFS/opt/devft/venv-executorch/installed-$ET_STAMP" ]; then
  rm -rf "$ROOTFS/opt/devft/venv-executorch"
  in_et python3 -m venv /opt/devft/venv-executorch
  in_et sh -c 'pip install -q --no-compile --no-index --no-deps --disable-pip-version-check /wheels/executorch/*.whl'
  touch "$ROOTFS/opt/devft/venv-executorch/installed-$ET_STAMP"
fi
rm -rf "$ROOTFS/opt/devft/src" && mkdir -p "$ROOTFS/opt/devft/src/scripts"
cp -r "$REPO/edge_runtime" "$ROOTFS/opt/devft/src/"  # the device part only: no export/, server_sdk/
cp "$REPO/scripts/arm64_check.py" "$ROOTFS/opt/devft/src/scripts/"

log "8. (--executorch) tiny stage: export on the host, ExecuTorch training + ORT eval on x86_64 and arm64"
ET_WORK=$WORK/executorch
mkdir -p "$ET_WORK"
if [ ! -e "$ET_WORK/artifacts/input_ids.npy" ]; then
  rm -rf "$ET_WORK/artifacts"
  (cd "$REPO" && "$HOST_PY" scripts/arm64_check.py et-export "$ET_WORK/artifacts")
fi
(cd "$REPO" && "$HOST_PY" scripts/arm64_check.py et-train "$ET_WORK/artifacts" "$ET_WORK/x86_64.json") >/dev/null
in_et nice -n 10 python /opt/devft/src/scripts/arm64_check.py et-train "$ET_WORK/artifacts" "$ET_WORK/arm64.json" >/dev/null
# devft-edge bench in the root: checks the command runs there (emulated timings mean nothing; not in the results)
in_et sh -c "cd /opt/devft/src && python -m edge_runtime.bench $ET_WORK/artifacts/executorch --batch 2 --seq 16 \
  --steps 2 --warmup 1 --note 'qemu-user emulation, not a timing' --out $ET_WORK/arm64-bench.json"
ET_NOTE="Debian $SUITE arm64 root under qemu-user-static; wheels installed with --no-deps: onnxruntime 1.19.2, \
executorch 1.5.1, torchao 0.18.0, torch 2.13.0 (the CUDA 13 aarch64 build from PyPI) with only the nvidia-* \
libraries its loader needs (venv $(du -sh "$ROOTFS/opt/devft/venv-executorch" | cut -f1))."
(cd "$REPO" && "$HOST_PY" scripts/arm64_check.py et-compare "$ET_WORK/x86_64.json" "$ET_WORK/arm64.json" \
  --markdown "$REPO/benchmarks/RESULTS.md" --setup-note "$ET_NOTE") || STATUS=1
exit $STATUS
