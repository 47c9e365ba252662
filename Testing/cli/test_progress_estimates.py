"""Progress that can be trusted: the time-left estimates of a real run, recorded, against the time
that was actually left; and a closed progress pipe changes neither the exit status nor the result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from EsegetaLib.io import read_image

from helpers import REPO, shared_inputs

# Four methods incl. a perturbation method, kept cheap (small IG, coarse Occlusion).
METHODS = "Saliency,IntegratedGradients,GradCAM,Occlusion"
PARAMS = {"IntegratedGradients": {"n_steps": 4}, "Occlusion": {"window_fraction": 0.25}}


class Recorder:
    """A progress callback with the CLI's `estimate` hook: (seconds since start, fraction, left, message)."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.left = None
        self.records = []

    def estimate(self, seconds):
        self.left = seconds

    def __call__(self, fraction, message=""):
        self.records.append((time.monotonic() - self.t0, float(fraction), self.left, message))


def test_estimates_on_the_bundled_sample_stay_within_3x_of_the_time_left(tmp_path):
    from EsegetaLib.models import DEFAULT_CARD
    from EsegetaLib.runner import ExplainRequest, execute, prepare
    from EsegetaLib.sample import resource_path

    if not resource_path(DEFAULT_CARD).is_file():
        pytest.skip("the bundled model is not in this checkout")
    request = ExplainRequest(volume=resource_path("sample_tof.nii.gz"), model=None, methods=METHODS,
                             params={k: dict(v) for k, v in PARAMS.items()}, device="cpu", metrics="none",
                             scene=False)
    prepared = prepare(request)
    recorder = Recorder()
    execute(prepared, tmp_path / "out", progress=recorder)
    end = time.monotonic() - recorder.t0
    fractions = [f for _, f, _, _ in recorder.records]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # never backwards, ends at 100 %
    checked = []
    for t, fraction, left, message in recorder.records:
        if fraction < 0.10 or left is None or fraction >= 1.0:
            continue
        actual = end - t
        checked.append((round(fraction, 3), round(left, 1), round(actual, 1), message))
        # 3x, plus a second for the last reports where both are a fraction of a second
        assert left <= 3.0 * actual + 1.0, (fraction, left, actual, message)
    print("\n".join(map(str, checked)))
    assert len(checked) >= 3  # estimates were given once meaningful
    # the perturbation method's lines carry a total
    occlusion = [m for _, _, _, m in recorder.records if m.startswith("Occlusion:") and "volumes evaluated" in m]
    assert occlusion and all("/" in m.split("volumes evaluated")[0] for m in occlusion)
    # nothing is estimated before something was measured
    assert recorder.records[0][2] is None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return shared_inputs(tmp_path_factory)


def _argv(inputs, out):
    return [sys.executable, "-m", "EsegetaLib", "explain", str(inputs["nifti"]), "--model", str(inputs["model"]),
            "--out", str(out), "--methods", "Saliency,Occlusion", "--metrics", "none", "--no-scene",
            "--region", "whole", "--device", "cpu"]


def test_a_closed_progress_pipe_changes_neither_exit_status_nor_results(inputs, tmp_path):
    """`esegeta explain ... 2>&1 | head -1`: the reader goes away at once; the run goes on."""
    from EsegetaLib.cli import main

    assert main(_argv(inputs, tmp_path / "reference")[3:] + ["--quiet"]) == 0
    read, write = os.pipe()
    os.close(read)  # nobody will ever read: every write gets EPIPE
    piped = subprocess.run(_argv(inputs, tmp_path / "piped"), cwd=REPO, stdout=write, stderr=write, timeout=300)
    os.close(write)
    assert piped.returncode == 0
    for name in ("Saliency", "Occlusion"):
        a = read_image(tmp_path / "reference" / "attributions" / f"{name}.nii.gz").array
        b = read_image(tmp_path / "piped" / "attributions" / f"{name}.nii.gz").array
        np.testing.assert_array_equal(a, b)
    run = json.loads((tmp_path / "piped" / "run.json").read_text())
    assert run["command"] == "explain"
