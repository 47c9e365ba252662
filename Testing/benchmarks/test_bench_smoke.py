"""The benchmark's code path on a tiny volume (figures are in docs/PERFORMANCE.md, not asserted).

Asserts facts only: with one window, Esegeta's map equals plain Captum's (r = 1), every runner
produced a row, the floor counts the windows Occlusion actually reran, the overlap bookkeeping is
filled in, and the option study reports fp32 against itself exactly and CUDA-only options as n/a.
"""
import json

import pytest

from EsegetaLib.benchmark import run
from EsegetaLib.commands.bench import build_parser


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = build_parser().parse_args(["--quick", "--device", "cpu", "--sizes", "24",
                                      "--methods", "Saliency,Occlusion", "--json", str(out),
                                      "--options-study", "--study-size", "16", "--threads", "1",
                                      "--study-skip", "torch.compile"])  # compiling takes minutes on CPU
    run(args)
    return json.loads(out.read_text())


def test_every_runner_has_a_row_and_one_window_matches_captum(report):
    assert report["environment"]["threads"] == "1"
    rows = {(r["method"], r["runner"]): r for r in report["rows"]}
    assert len(rows) == len(report["rows"]) == 6  # one row per (method, runner)
    for method in ("Saliency", "Occlusion"):
        for runner in ("esegeta", "captum", "torchesegeta"):
            assert rows[(method, runner)]["seconds"] > 0
            assert rows[(method, runner)]["load"] is not None
        assert rows[(method, "esegeta")]["floor_s"] > 0
        # one window covers the volume: Esegeta and plain Captum compute the same map
        assert rows[(method, "captum")]["corr_with_esegeta"] > 0.999


def test_floor_counts_windows_rerun_and_overlap(report):
    geometry = report["floors"]["24x24x24"]
    assert geometry["windows"] == 1 and geometry["voxels_processed_over_volume"] >= 1.0
    assert geometry["overlap_and_padding_voxels"] == geometry["voxels_per_pass"] - 24 ** 3
    occlusion = next(r for r in report["rows"] if r["method"] == "Occlusion" and r["runner"] == "esegeta")
    rerun = occlusion["extra"]["diagnostics"]["windows_rerun"]
    assert rerun > 1 and occlusion["extra"]["window_passes"] == rerun + geometry["active_windows"]
    assert "resident set" in report["peak_memory"]  # CPU: says what the peak column measures


def test_option_study_rows(report):
    model = {r["option"]: r for r in report["options"]["model"]}
    assert model["fp32 (baseline)"]["ratio_to_fp32"] == 1.0
    assert model["fp32 (baseline)"]["corr_with_fp32"] == pytest.approx(1.0)
    assert model["cudnn.benchmark"]["note"].startswith("n/a") and model["fp16 autocast"]["note"].startswith("n/a")
    assert model["torch.compile"]["seconds"] is None and "left out" in model["torch.compile"]["note"]
    assert 0.9 < model["bf16 autocast"]["corr_with_fp32"] <= 1.0 + 1e-9
    assert 0.999 < model["channels-last-3d"]["corr_with_fp32"] <= 1.0 + 1e-9
    engine = [r for r in report["options"]["engine"] if r["option"] == "precision=bf16"]
    assert len(engine) == 2 and all(r["corr_with_fp32"] > 0.9 for r in engine)
