"""scripts/install_torch.sh chooses the torch build for the machine (the choice, not the download:
ESEGETA_TORCH_DRY_RUN prints the decision and the pip command; the probes are pointed at fakes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

SCRIPT = REPO / "scripts" / "install_torch.sh"


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """A Python without torch (site-packages off), a fake nvidia-smi listing a GPU, one listing
    none, a local folder standing in for a reachable CPU index, and a /proc entry."""
    folder = tmp_path_factory.mktemp("install_fakes")
    python = folder / "python-without-torch"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    gpu = folder / "nvidia-smi-gpu"
    gpu.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    nogpu = folder / "nvidia-smi-none"
    nogpu.write_text('#!/bin/sh\necho "No devices were found" >&2; exit 6\n')
    for path in (python, gpu, nogpu):
        path.chmod(0o755)
    (folder / "index").mkdir()
    (folder / "proc_nvidia").mkdir()
    return folder


def choose(fakes, python=None, smi="no-such-nvidia-smi", proc=None, index=None, system="Linux"):
    env = dict(os.environ, ESEGETA_TORCH_DRY_RUN="1", ESEGETA_NVIDIA_SMI=str(smi), ESEGETA_UNAME=system,
               ESEGETA_PROC_NVIDIA=str(proc or fakes / "no_proc_nvidia"),
               ESEGETA_TORCH_CPU_INDEX=index or (fakes / "index").as_uri())
    result = subprocess.run(["bash", str(SCRIPT), str(python or fakes / "python-without-torch")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_no_nvidia_gpu_takes_the_cpu_index(fakes):
    decision, command = choose(fakes)
    assert "CPU-only build" in decision
    assert command == f"pip install torch==2.13.0 --index-url {(fakes / 'index').as_uri()}"
    # nvidia-smi present but listing no GPU (driver tools without a card) is still "no GPU"
    assert choose(fakes, smi=fakes / "nvidia-smi-none")[1] == command


@pytest.mark.parametrize("probe", ["smi", "proc"])
def test_an_nvidia_gpu_takes_the_default_index(fakes, probe):
    kwargs = {"smi": fakes / "nvidia-smi-gpu"} if probe == "smi" else {"proc": fakes / "proc_nvidia"}
    decision, command = choose(fakes, **kwargs)
    assert "NVIDIA GPU is present" in decision
    assert command == "pip install torch==2.13.0"


def test_an_unreachable_cpu_index_falls_back_to_the_default_index(fakes):
    decision, command = choose(fakes, index=(fakes / "no-index-here").as_uri())
    assert "not reachable" in decision and command == "pip install torch==2.13.0"


def test_other_systems_take_the_default_index(fakes):
    decision, command = choose(fakes, system="Darwin")
    assert "Darwin" in decision and command == "pip install torch==2.13.0"


def test_an_installed_torch_is_kept(fakes):
    import torch

    lines = choose(fakes, python=Path(sys.executable))
    assert lines == [f"torch: keeping the installed torch {torch.__version__}"]


def test_the_setup_scripts_use_it():
    for name in ("test.sh", "demo.sh"):
        text = (REPO / "scripts" / name).read_text()
        assert 'bash scripts/install_torch.sh "$VENV/bin/python"' in text
        assert 'pip install -q --disable-pip-version-check "torch' not in text
