#!/usr/bin/env bash
# Install PyTorch into a virtual environment, choosing the build for this machine:
#   - torch already importable there              -> kept as it is (your CUDA, ROCm or CPU build);
#   - not Linux (macOS, Windows)                  -> the default index (its wheel is the CPU/MPS build);
#   - Linux with an NVIDIA GPU (nvidia-smi lists one, or /proc/driver/nvidia exists)
#                                                 -> the default index (on PyPI: the CUDA build);
#   - Linux without one, PyTorch's CPU index reachable (checked with a 5 s timeout)
#                                                 -> the CPU-only build from that index (192 MB
#                                                    instead of ~0.5 GB plus several GB of CUDA libraries);
#   - Linux without one, that index unreachable   -> the default index, whatever it serves (a local
#                                                    mirror's file, or PyPI's CUDA build, which also runs on CPU).
# A CPU-index install that fails falls back to the default index too.
#
# Usage: bash scripts/install_torch.sh VENV_PYTHON
# Environment: ESEGETA_TORCH_VERSION (default 2.13.0), ESEGETA_TORCH_CPU_INDEX (default PyTorch's),
#   ESEGETA_TORCH_DRY_RUN=1 prints the decision and the pip command without running it,
#   ESEGETA_NVIDIA_SMI, ESEGETA_PROC_NVIDIA and ESEGETA_UNAME override what is probed (for the tests).
set -euo pipefail

PY="${1:?usage: install_torch.sh VENV_PYTHON}"
VERSION="${ESEGETA_TORCH_VERSION:-2.13.0}"
CPU_INDEX="${ESEGETA_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
PROC_NVIDIA="${ESEGETA_PROC_NVIDIA:-/proc/driver/nvidia}"
SMI="${ESEGETA_NVIDIA_SMI:-nvidia-smi}"
SYSTEM="${ESEGETA_UNAME:-$(uname -s)}"

has_nvidia_gpu() {
    if command -v "$SMI" >/dev/null 2>&1 && "$SMI" -L 2>/dev/null | grep -q '^GPU'; then
        return 0
    fi
    [ -e "$PROC_NVIDIA" ]
}

index_reachable() {  # a quick probe, so that an unreachable index costs seconds, not pip's retries
    "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import os, sys, urllib.parse, urllib.request
url = sys.argv[1].rstrip("/")
if url.startswith("file:"):  # a local folder index (offline mirrors, the tests)
    sys.exit(0 if os.path.isdir(urllib.request.url2pathname(urllib.parse.urlparse(url).path)) else 1)
urllib.request.urlopen(url + "/torch/", timeout=5).close()
EOF
}

pip_install() {  # pip_install REASON [pip arguments...]
    local reason="$1"; shift
    echo "torch: $reason"
    if [ -n "${ESEGETA_TORCH_DRY_RUN:-}" ]; then
        echo "pip install torch==$VERSION $*"
        return 0
    fi
    "$PY" -m pip install -q --disable-pip-version-check "torch==$VERSION" "$@"
}

if existing=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "torch: keeping the installed torch $existing"
    exit 0
fi
if [ "$SYSTEM" != Linux ]; then
    pip_install "default index ($SYSTEM: its torch wheel is the CPU build)"
elif has_nvidia_gpu; then
    pip_install "default index (an NVIDIA GPU is present: the CUDA build)"
elif index_reachable "$CPU_INDEX"; then
    pip_install "CPU-only build from $CPU_INDEX (no NVIDIA GPU found)" --index-url "$CPU_INDEX" \
        || pip_install "default index (the CPU index failed)"
else
    pip_install "default index ($CPU_INDEX is not reachable; no NVIDIA GPU found)"
fi
