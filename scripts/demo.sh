#!/usr/bin/env bash
# Set up a virtual environment and run the demo: the bundled vessel model explained on the bundled
# synthetic TOF-MRA sample. Usage: bash scripts/demo.sh [esegeta demo options, e.g. --out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${ESEGETA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch==2.13.0: the CPU-only build on Linux without an NVIDIA GPU, an installed torch kept
# (see scripts/install_torch.sh for every case).
bash scripts/install_torch.sh "$VENV/bin/python"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[full,scene]"
exec "$VENV/bin/esegeta" demo "$@"
