#!/usr/bin/env bash
# Does the devft edge runtime install and train on arm64 (Raspberry Pi, Jetson)? Checked without a
# board: an arm64 Debian root run under qemu-user emulation. Correctness only; emulated timings
# mean nothing. Not part of the default test run (needs root, apt and ~3 GB of wheels).
#
#   sudo scripts/arm64_check.sh          # from anywhere; uses the repo's .venv for the host side
#
# Steps (each cached under $DEVFT_ARM64_CACHE, default /var/cache/devft-arm64, so a rerun takes
# a few minutes; delete a piece to rebuild it):
#   1. host: apt-get install qemu-user-static debootstrap binfmt-support; enable binfmt for aarch64
#   2. root/: debootstrap --arch=arm64 bookworm from the Debian mirror in /etc/apt/sources.list.d
#   3. wheels/: aarch64 wheels, downloaded on the host with `pip download --platform`:
#      onnxruntime==1.19.2 (inference: there is no aarch64 onnxruntime-training wheel),
#      executorch==1.5.1 + torchao==0.18.0, torch==2.13.0, all installed with --no-deps.
#      torch for aarch64 on PyPI is the CUDA 13 build; with its dependencies it pulls the whole
#      nvidia-* set plus triton and cuda-bindings. Its shared libraries list CUDA libraries as
#      DT_NEEDED (libtorch_cpu.so alone needs libcudart and libcupti), so `import torch` fails
#      without them. We install torch --no-deps, its pure-Python deps, and only the nvidia-*
#      wheels whose libraries the loader needs (TORCH_CUDA_LIBS below; no triton, cuda-bindings,
#      nvtx or cusolver): still 2.7 GB installed, of a 4.0 GB venv. CUDA code never runs. nvidia-nccl-cu13==2.29.7, torch's pin, has no
#      aarch64 wheel on the index; 2.32.3 provides the same libnccl.so.2. On a Pi, install the
#      CPU-only wheel from download.pytorch.org/whl/cpu instead.
#   4. mount /proc, /dev and a fake /sys (the host /sys makes torch segfault and ORT abort on
#      emulated aarch64, see docs in shared/reference/arm64-emulation.md), venv in the root,
#      pip install --no-index --no-deps from the wheel cache (no network inside the root).
#   5. host: export a tiny random LLaMA stage (hidden 64, 2 layers) as ExecuTorch artifacts plus a
#      forward ONNX graph (scripts/arm64_check.py export), train it on x86_64 and in the arm64
#      root with the same script (ExecuTorch SGD steps, then ONNX Runtime evaluation of the
#      trained LoRA), compare the losses and write the result into benchmarks/RESULTS.md.
#   6. run `python -m edge_runtime.bench` (devft-edge bench) in the root on the ExecuTorch artifacts;
#      its row lands in $WORK/arm64-bench.json, not in the results (emulated timings).
# Exit status 0 = PASS, 1 = FAIL (losses differ or did not fall), other = setup error.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DEVFT_ARM64_CACHE:-/var/cache/devft-arm64}
ROOTFS=$CACHE/root
WHEELS=$CACHE/wheels
WORK=$CACHE/work
HOST_PY=${DEVFT_PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm
PYTAG=(--python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
EDGE_WHEELS=(onnxruntime==1.19.2 numpy flatbuffers packaging protobuf sympy mpmath coloredlogs humanfriendly)
EXECUTORCH_WHEELS=(executorch==1.5.1 torchao==0.18.0 pyyaml ruamel.yaml tabulate typing-extensions)
TORCH_WHEELS=(torch==2.13.0 filelock typing-extensions sympy networkx jinja2 markupsafe fsspec setuptools)
TORCH_CUDA_LIBS=("nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cupti==13.0.85" "nvidia-cublas==13.1.1.3"
  "nvidia-cufft==12.0.0.61" "nvidia-cufile==1.15.1.6" "nvidia-curand==10.4.0.35" "nvidia-cusparse==12.6.3.3"
  "nvidia-cuda-nvrtc==13.0.88" "nvidia-nvjitlink>=13.0.88,<14" "nvidia-cudnn-cu13==9.20.0.48"
  "nvidia-cusparselt-cu13==0.8.1" "nvidia-nccl-cu13==2.32.3" "nvidia-nvshmem-cu13==3.4.5")

log() { printf '\n== %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, mount): sudo $0" >&2; exit 2; }
[ -x "$HOST_PY" ] || { echo "no host python at $HOST_PY; create the venv (scripts/setup.sh) or set DEVFT_PYTHON" >&2; exit 2; }

log "1. host tools"
if ! command -v debootstrap >/dev/null || [ ! -e /usr/bin/qemu-aarch64-static ] || ! command -v update-binfmts >/dev/null; then
  apt-get update -q && apt-get install -y -q qemu-user-static debootstrap binfmt-support
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

log "2. arm64 Debian root at $ROOTFS"
if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  rm -rf "$ROOTFS.partial"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$ROOTFS.partial" "$MIRROR"
  mv "$ROOTFS.partial" "$ROOTFS"
fi

log "3. aarch64 wheels in $WHEELS"
mkdir -p "$WHEELS"
PLATFORMS=()
for v in 17 25 27 28; do PLATFORMS+=(--platform "manylinux_2_${v}_aarch64"); done
PLATFORMS+=(--platform manylinux2014_aarch64)
fetch() {  # one requirement, no dependencies, skipped when a matching wheel is cached
  local name=${1%%[=<>]*}
  local stem=${name//[-.]/_}
  if ! compgen -G "$WHEELS/${stem}-*.whl" >/dev/null && ! compgen -G "$WHEELS/${stem,,}-*.whl" >/dev/null; then
    "$HOST_PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" "${PYTAG[@]}" -d "$WHEELS" "$1"
  fi
}
for req in "${EDGE_WHEELS[@]}" "${EXECUTORCH_WHEELS[@]}" "${TORCH_WHEELS[@]}" "${TORCH_CUDA_LIBS[@]}"; do fetch "$req"; done
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
mkdir -p "$WORK"
bind "$WORK" "$ROOTFS/devft-check" --bind
in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/opt/devft/venv/bin:/usr/bin:/bin HOME=/root LC_ALL=C.UTF-8 "$@"; }

STAMP=$(ls "$WHEELS" | sha256sum | cut -c1-16)
if [ ! -e "$ROOTFS/opt/devft/installed-$STAMP" ]; then
  rm -rf "$ROOTFS/opt/devft/venv"
  in_root python3 -m venv /opt/devft/venv
  in_root sh -c 'pip install -q --no-compile --no-index --no-deps --disable-pip-version-check /wheels/*.whl'
  touch "$ROOTFS/opt/devft/installed-$STAMP"
fi
rm -rf "$ROOTFS/opt/devft/src" && mkdir -p "$ROOTFS/opt/devft/src/scripts"
cp -r "$REPO/edge_runtime" "$ROOTFS/opt/devft/src/"  # the device part only: no export/, server_sdk/
cp "$REPO/scripts/arm64_check.py" "$ROOTFS/opt/devft/src/scripts/"
in_root python -c "import platform, onnxruntime, torch, executorch; print(platform.machine(), 'onnxruntime', \
onnxruntime.__version__, 'torch', torch.__version__, 'cuda available', torch.cuda.is_available())"
du -sh "$ROOTFS/opt/devft/venv" >&2

log "5. tiny stage: export on the host, train on x86_64 and arm64, compare"
if [ ! -e "$WORK/artifacts/input_ids.npy" ]; then
  rm -rf "$WORK/artifacts"
  (cd "$REPO" && "$HOST_PY" scripts/arm64_check.py export "$WORK/artifacts")
fi
(cd "$REPO" && "$HOST_PY" scripts/arm64_check.py train "$WORK/artifacts" "$WORK/x86_64.json") >/dev/null
in_root python /opt/devft/src/scripts/arm64_check.py train /devft-check/artifacts /devft-check/arm64.json >/dev/null
log "6. devft-edge bench in the arm64 root (checks the command runs there; emulated timings mean nothing)"
rm -f "$WORK/arm64-bench.json"
in_root sh -c 'cd /opt/devft/src && python -m edge_runtime.bench /devft-check/artifacts/executorch --batch 2 --seq 16 \
  --steps 2 --warmup 1 --note "qemu-user emulation, not a timing" --out /devft-check/arm64-bench.json'
NOTE="Debian $SUITE arm64 root (debootstrap) under qemu-user-static $(dpkg-query -W -f='${Version}' qemu-user-static \
2>/dev/null || echo '?'); wheels installed with --no-deps: onnxruntime 1.19.2, executorch 1.5.1, torchao 0.18.0, \
torch 2.13.0 (the CUDA 13 aarch64 build from PyPI) with only the nvidia-* libraries its loader needs \
(venv $(du -sh "$ROOTFS/opt/devft/venv" | cut -f1), of which nvidia-* \
$(du -sh "$ROOTFS"/opt/devft/venv/lib/python3*/site-packages/nvidia | cut -f1) that CPU training never uses)."
cd "$REPO" && "$HOST_PY" scripts/arm64_check.py compare "$WORK/x86_64.json" "$WORK/arm64.json" \
  --markdown "$REPO/benchmarks/RESULTS.md" --setup-note "$NOTE"
