"""`esegeta explain` end to end on a small generated volume with real models: every output read
back (geometry voxel for voxel, one float32 file per method, checksums), the model card's settings
in effect, and cancellation (in process and by Ctrl-C) leaving the output directory as it was."""
from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import zipfile

import nibabel as nib
import nrrd
import numpy as np
import pytest

from EsegetaLib.cli import main
from EsegetaLib.errors import EsegetaCancelled
from EsegetaLib.io import read_image

from helpers import REPO, SHAPE, shared_inputs, siblings, snapshot, write_volume


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return shared_inputs(tmp_path_factory)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_explain_writes_every_output_on_the_input_grid(inputs, tmp_path, capsys):
    out = tmp_path / "result"
    code = main(["explain", str(inputs["nifti"]), "--model", str(inputs["model"]), "--out", str(out),
                 "--methods", "Saliency,InputXGradient", "--param", "Saliency.absolute=false", "--region", "whole", "--metrics", "none",
                 "--device", "auto", "--no-scene"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: no CUDA GPU" in captured.err or "cuda" in json.loads((out / "run.json").read_text())["device"]["device"]
    assert f"Results written to {out}" in captured.out
    assert f"esegeta view {out}" in captured.out and "Slicer" in captured.out  # how to open it

    source = read_image(inputs["nifti"])
    files = sorted(p.name for p in (out / "attributions").iterdir())
    assert files == ["InputXGradient.nii.gz", "Saliency.nii.gz"]
    maps = {}
    for name in ("Saliency", "InputXGradient"):
        path = out / "attributions" / f"{name}.nii.gz"
        image = read_image(path)
        assert image.array.shape == (1,) + SHAPE
        np.testing.assert_allclose(image.ijk_to_ras, source.ijk_to_ras, atol=1e-6)
        assert nib.load(str(path)).get_data_dtype() == np.float32
        assert np.isfinite(image.array).all() and np.ptp(image.array) > 0
        maps[name] = image.array[0]
    # InputXGradient = input x gradient (Saliency is the signed gradient): a fact about the maps, not the files.
    np.testing.assert_allclose(maps["InputXGradient"], maps["Saliency"] * source.array[0], rtol=1e-4,
                               atol=1e-6 * np.abs(maps["InputXGradient"]).max())

    segmentation = read_image(out / "segmentation.nii.gz")
    assert segmentation.array.shape == (1,) + SHAPE
    np.testing.assert_allclose(segmentation.ijk_to_ras, source.ijk_to_ras, atol=1e-6)
    assert nib.load(str(out / "segmentation.nii.gz")).get_data_dtype() == np.uint8
    assert set(np.unique(segmentation.array)) <= {0, 1}

    run = json.loads((out / "run.json").read_text())
    by_role = {item["role"]: item for item in run["inputs"]}
    assert by_role["volume"]["sha256"] == sha256(inputs["nifti"])
    assert by_role["model"]["sha256"] == sha256(inputs["model"])
    assert by_role["volume"]["path"] == str(inputs["nifti"].resolve())
    for record in run["outputs"]:
        assert record["sha256"] == sha256(out / record["path"])
    assert {r["path"] for r in run["outputs"]} >= {"attributions/Saliency.nii.gz", "segmentation.nii.gz",
                                                   "metrics.csv", "metrics.json"}
    assert run["parameters"]["region"] == "whole" and run["parameters"]["seed"] == 0
    assert set(run["parameters"]["methods"]) == {"Saliency", "InputXGradient"}
    assert run["versions"]["torch"] and run["versions"]["captum"] and run["versions"]["python"]
    assert run["device"]["device"] == "cpu"
    assert run["timings"]["total_seconds"] >= run["timings"]["engine_seconds"] > 0

    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["Saliency", "InputXGradient"]
    assert all(float(row["attribution_s"]) > 0 and row["device"] == "cpu" for row in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["method"] for row in metrics["rows"]] == ["Saliency", "InputXGradient"]
    assert siblings(out) == ["result"]  # no temporary folder left beside it
    assert not (out / "esegeta.mrb").exists() and run["scene"]["written"] is False


def test_nrrd_in_nrrd_out_and_model_card_settings(inputs, tmp_path, capsys):
    """The card's class names, activation, patch size and divisor are what the engine used."""
    out = tmp_path / "nrrd_result"
    code = main(["explain", str(inputs["nrrd"]), "--model", str(inputs["card"]), "--out", str(out),
                 "--methods", "IntegratedGradients", "--param", "IntegratedGradients.n_steps=4",
                 "--class", "vessel", "--region", "point:12,10,8", "--metrics", "sparseness,complexity",
                 "--quiet", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""  # --quiet and an explicit device: nothing to say
    source = read_image(inputs["nrrd"])
    path = out / "attributions" / "IntegratedGradients.nrrd"
    image = read_image(path)
    np.testing.assert_allclose(image.ijk_to_ras, source.ijk_to_ras, atol=1e-6)
    assert image.array.shape == (1,) + SHAPE
    assert nrrd.read_header(str(path))["type"] == "float"
    assert (out / "segmentation.nrrd").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["parameters"]["class_index"] == 1 and run["parameters"]["class_name"] == "vessel"
    assert run["parameters"]["methods"]["IntegratedGradients"]["n_steps"] == 4
    assert run["target"]["activation"] == "softmax" and run["target"]["point"] == [12, 10, 8]
    assert run["engine"]["divisor"] == 4
    assert run["engine"]["n_windows"] > 1  # the card's 16^3 patch on a 24x20x16 volume
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["IntegratedGradients"]
    # the metrics module's columns, with runtime, device and peak memory merged in
    assert 0 < float(rows[0]["sparseness"]) < 1 and float(rows[0]["complexity"]) > 0
    assert rows[0]["device"] == "cpu" and float(rows[0]["attribution_s"]) > 0
    assert float(rows[0]["convergence_delta"]) >= 0
    diagnostics = run["results"]["IntegratedGradients"]["diagnostics"]
    assert float(rows[0]["relative_convergence_delta"]) == pytest.approx(abs(diagnostics["relative_convergence_delta"]))
    roles = {item["role"]: item for item in run["inputs"]}
    assert roles["model"]["sha256"] == sha256(inputs["card"])
    assert roles["model weights"]["sha256"] == sha256(inputs["folder"] / "unet_weights.pt")
    # The Slicer review scene, when slicer-core is installed (the scene tests check its contents).
    if run["scene"]["written"]:
        with zipfile.ZipFile(out / "esegeta.mrb") as bundle:
            names = bundle.namelist()
        assert any(name.endswith(".mrml") for name in names)
        assert any("IntegratedGradients" in name for name in names), names
        assert run["scene"]["previews"] and all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                                                for p in run["scene"]["previews"])
    else:
        pytest.importorskip("slicer", reason=run["scene"]["note"])
        raise AssertionError(run["scene"]["note"])


def test_roi_region_bf16_and_overwrite_replacing_an_earlier_result(inputs, tmp_path, capsys):
    mask = np.zeros((1,) + SHAPE, np.float32)
    mask[0, 8:16, 6:14, 4:12] = 1
    mask_path = write_volume(tmp_path / "roi.nii.gz", mask)
    out = tmp_path / "again"
    argv = ["explain", str(inputs["nifti"]), "--model", str(inputs["model"]), "--out", str(out), "--quiet",
            "--methods", "Saliency", "--region", f"roi:{mask_path}", "--metrics", "none", "--device", "cpu",
            "--no-scene"]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["target"]["region_voxels"] == 8 * 8 * 8
    assert {i["role"]: i["sha256"] for i in run["inputs"]}["mask"] == sha256(mask_path)
    (out / "attributions" / "Stale.nii.gz").write_bytes(b"from another run")
    assert main(argv) == 2  # refuses without --overwrite
    assert (out / "attributions" / "Stale.nii.gz").exists()
    time.sleep(1.1)
    assert main(argv + ["--overwrite", "--precision", "bf16"]) == 0
    assert sorted(p.name for p in (out / "attributions").iterdir()) == ["Saliency.nii.gz"]
    rerun = json.loads((out / "run.json").read_text())
    assert rerun["started"] != run["started"]
    assert rerun["engine"]["precision"] == "bf16" and rerun["parameters"]["precision"] == "bf16"
    assert siblings(out) == ["again", "roi.nii.gz"]
    capsys.readouterr()


def test_cancel_mid_run_leaves_the_directory_as_it_was(inputs, tmp_path):
    """The engine's cancel flag, set after the first progress report of a method: nothing written."""
    from EsegetaLib.runner import ExplainRequest, execute, prepare

    out = tmp_path / "cancelled"
    out.mkdir()
    (out / "run.json").write_text('{"earlier": true}')
    before = snapshot(out)
    cancel = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append((fraction, message))
        if "IntegratedGradients" in message:
            cancel.set()

    request = ExplainRequest(volume=inputs["nifti"], model=inputs["model"],
                             methods=["Saliency", "IntegratedGradients"], region="whole", metrics="none",
                             device="cpu")
    with pytest.raises(EsegetaCancelled):
        execute(prepare(request), out, overwrite=True, progress=progress, cancel=cancel)
    assert any("Saliency" in m for _, m in seen)  # it was mid-way, after the first method
    assert snapshot(out) == before
    assert siblings(out) == ["cancelled"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_leaves_the_directory_as_it_was(inputs, tmp_path, signum):
    """A real Ctrl-C (or the SIGTERM a front end sends to cancel) to `python -m EsegetaLib explain`
    mid-way: exit 130, the earlier result untouched, no temporary folder left."""
    out = tmp_path / "interrupted"
    out.mkdir()
    (out / "run.json").write_text('{"earlier": true}')
    before = snapshot(out)
    argv = [sys.executable, "-m", "EsegetaLib", "explain", str(inputs["nifti"]), "--model", str(inputs["model"]),
            "--out", str(out), "--overwrite", "--methods", "IntegratedGradients", "--param",
            "IntegratedGradients.n_steps=1024", "--region", "whole", "--metrics", "none", "--device", "cpu",
            "--batch-size", "1"]
    process = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in process.stderr:  # progress lines arrive once the method runs
            lines.append(line)
            if "IntegratedGradients" in line and "%]" in line:
                break
        time.sleep(0.5)
        assert process.poll() is None, "".join(lines)
        assert any(p.name.startswith(".esegeta-") for p in tmp_path.iterdir())  # work in progress exists
        process.send_signal(signum)
        rest = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, "".join(lines) + rest
    assert "cancelled" in rest and "Traceback" not in rest
    assert snapshot(out) == before
    assert siblings(out) == ["interrupted"]


def _quick(inputs, out, *extra):
    return ["explain", str(inputs["nifti"]), "--model", str(inputs["model"]), "--out", str(out), "--methods",
            "Saliency", "--region", "whole", "--metrics", "none", "--device", "cpu", *extra]


def test_internal_error_exits_1_and_leaves_nothing(inputs, tmp_path, capsys, monkeypatch):
    """A failure that is not the user's (injected while writing): status 1, one line, no traceback
    unless --debug, and no half-written output."""
    import EsegetaLib.runner as runner

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runner, "write_images", broken)
    out = tmp_path / "failed"
    assert main(_quick(inputs, out, "--quiet", "--no-scene")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["esegeta: internal error: RuntimeError: disk on fire (run again with --debug for the "
                   "traceback, and please report it)."]
    assert not out.exists() and siblings(out) == []
    assert main(_quick(inputs, out, "--quiet", "--no-scene", "--debug")) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_failing_review_scene_is_a_warning_not_a_lost_run(inputs, tmp_path, capsys, monkeypatch):
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    import EsegetaLib.slicer.review as review

    def broken(*args, **kwargs):
        raise RuntimeError("no OpenGL today")

    monkeypatch.setattr(review, "write_review", broken)
    out = tmp_path / "no_scene"
    assert main(_quick(inputs, out, "--quiet")) == 0
    err = capsys.readouterr().err
    assert "warning: the Slicer review scene could not be written (RuntimeError: no OpenGL today)" in err
    run = json.loads((out / "run.json").read_text())
    assert run["scene"]["written"] is False and not (out / "esegeta.mrb").exists()
    assert (out / "attributions" / "Saliency.nii.gz").is_file()


@pytest.mark.parametrize("model", [None, "bundled"])
def test_the_bundled_model_is_the_default_and_has_a_name(inputs, tmp_path, capsys, model):
    """No --model, or --model bundled (as study files and Slicer accept): the bundled vessel UNet."""
    from EsegetaLib.models import DEFAULT_CARD
    from EsegetaLib.sample import resource_path

    out = tmp_path / "bundled"
    argv = ["explain", str(inputs["nifti"]), "--out", str(out), "--methods", "Saliency", "--metrics", "none",
            "--no-scene", "--device", "cpu", "--quiet"] + (["--model", model] if model else [])
    assert main(argv) == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["parameters"]["model"] == "bundled default model"
    card = json.loads(resource_path(DEFAULT_CARD).read_text())
    assert run["parameters"]["model_card"]["name"] == card["name"]
    assert read_image(out / "attributions" / "Saliency.nii.gz").array.shape == (1,) + SHAPE
