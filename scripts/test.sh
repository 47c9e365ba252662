#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run the whole test suite.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${ESEGETA_VENV:-.venv}

# Headless Chromium (browser test of `esegeta view`) and Mesa EGL (offscreen 3D previews).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch==2.13.0: the CPU-only build on Linux without an NVIDIA GPU, an installed torch kept
# (see scripts/install_torch.sh for every case).
bash scripts/install_torch.sh "$VENV/bin/python"
# The installed torch pinned in the same command, so that the nnunet extra's dependencies
# (timm -> torchvision) resolve against it instead of upgrading it.
TORCH_PIN="torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[full,scene,study,test,nnunet]" "$TORCH_PIN"
exec "$VENV/bin/python" -m pytest Testing -q "$@"
