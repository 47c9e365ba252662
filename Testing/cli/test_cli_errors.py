"""Every expected mistake: exit status 2, one line on stderr saying what is wrong and what to do,
no traceback, and the output directory exactly as it was."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from EsegetaLib.cli import main

from helpers import REPO, SHAPE, oblique_affine, shared_inputs, siblings, snapshot, write_volume


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return shared_inputs(tmp_path_factory)


@pytest.fixture
def out(tmp_path):
    """An existing earlier result: every failure must leave it byte for byte as it was."""
    folder = tmp_path / "result"
    folder.mkdir()
    (folder / "run.json").write_text('{"earlier": true}')
    (folder / "attributions").mkdir()
    (folder / "attributions" / "Saliency.nii.gz").write_bytes(b"earlier map")
    return folder


def run_cli(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_bad_input(capsys, argv, out, *fragments):
    before, beside = snapshot(out), siblings(out)
    code, stdout, stderr = run_cli(capsys, argv)
    lines = [line for line in stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("esegeta: error:")]
    assert code == 2, stderr
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment.lower() in error_lines[0].lower(), error_lines[0]
    assert snapshot(out) == before
    assert siblings(out) == beside
    return error_lines[0]


def explain(inputs, out, *extra, volume=None, model=None):
    return ["explain", volume or inputs["volume"], "--model", model or inputs["model"], "--out", out,
            "--overwrite", "--quiet", "--region", "whole", "--metrics", "none", *extra]


def test_missing_volume(capsys, inputs, out):
    assert_bad_input(capsys, explain(inputs, out, volume=inputs["folder"] / "nope.nii.gz"), out,
                     "nope.nii.gz", "does not exist")


def test_volume_that_is_a_folder(capsys, inputs, out):
    assert_bad_input(capsys, explain(inputs, out, volume=inputs["folder"]), out, "folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_volume(capsys, inputs, out, tmp_path):
    locked = write_volume(tmp_path / "locked.nii.gz")
    locked.chmod(0)
    assert_bad_input(capsys, explain(inputs, out, volume=locked), out, "cannot be read", "permissions")


def test_truncated_volume(capsys, inputs, out, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(inputs["volume"].read_bytes()[:200])
    assert_bad_input(capsys, explain(inputs, out, volume=broken), out, "broken.nii.gz")


def test_a_file_that_is_not_an_image(capsys, inputs, out, tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_bytes(gzip.compress(b"these are my notes, not a volume\n" * 20))
    assert_bad_input(capsys, explain(inputs, out, volume=text), out, "notes.nii.gz")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert_bad_input(capsys, explain(inputs, out, volume=other), out, "notes.txt", "extension")


def test_a_model_file_that_is_not_a_model(capsys, inputs, out, tmp_path):
    fake = tmp_path / "model.pt"
    fake.write_bytes(os.urandom(2048))
    assert_bad_input(capsys, explain(inputs, out, model=fake), out, "model.pt")
    missing = tmp_path / "missing.pt"
    assert_bad_input(capsys, explain(inputs, out, model=missing), out, "missing.pt")


def test_a_pickled_model_is_refused(capsys, inputs, out, tmp_path):
    import torch

    from helpers import make_unet_instancenorm_prelu

    pickled = tmp_path / "pickled.pt"
    torch.save(make_unet_instancenorm_prelu(), pickled)
    assert_bad_input(capsys, explain(inputs, out, model=pickled), out, "pickle")


def test_model_expecting_more_channels(capsys, inputs, out):
    assert_bad_input(capsys, explain(inputs, out, model=inputs["model2ch"]), out, "2 input channel", "1")


def test_mask_on_another_grid(capsys, inputs, out, tmp_path):
    small = write_volume(tmp_path / "small_mask.nii.gz", np.ones((1, 10, 10, 10), np.float32))
    assert_bad_input(capsys, explain(inputs, out, "--region", f"roi:{small}"), out, "another grid", "resample")
    moved = oblique_affine()
    moved[:3, 3] += 5.0  # same shape, shifted: a different grid all the same
    shifted = write_volume(tmp_path / "shifted_mask.nii.gz", np.ones((1,) + SHAPE, np.float32), moved)
    assert_bad_input(capsys, explain(inputs, out, "--region", f"roi:{shifted}"), out, "another grid")


def test_empty_mask_and_missing_mask(capsys, inputs, out, tmp_path):
    empty = write_volume(tmp_path / "empty_mask.nii.gz", np.zeros((1,) + SHAPE, np.float32))
    assert_bad_input(capsys, explain(inputs, out, "--region", f"roi:{empty}"), out, "no voxel")
    assert_bad_input(capsys, explain(inputs, out, "--region", f"roi:{tmp_path / 'gone.nrrd'}"), out,
                     "gone.nrrd", "does not exist")


@pytest.mark.parametrize("point", ["24,0,0", "0,-1,0", "5,5,16"])
def test_point_outside_the_volume(capsys, inputs, out, point):
    assert_bad_input(capsys, explain(inputs, out, "--region", f"point:{point}"), out, "outside the volume",
                     "24, 20, 16")


@pytest.mark.parametrize("region", ["point:1,2", "point:a,b,c", "roi:", "everything"])
def test_malformed_region(capsys, inputs, out, region):
    assert_bad_input(capsys, explain(inputs, out, "--region", region), out, "--region")


def test_non_empty_output_without_overwrite(capsys, inputs, out):
    argv = [a for a in explain(inputs, out) if a != "--overwrite"]
    assert_bad_input(capsys, argv, out, "not empty", "--overwrite")


def test_overwrite_never_empties_a_folder_that_is_not_a_result(capsys, inputs, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    assert_bad_input(capsys, explain(inputs, folder), folder, "not an Esegeta result")


def test_cuda_when_there_is_none(capsys, inputs, out):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_bad_input(capsys, explain(inputs, out, "--device", "cuda"), out, "CUDA", "--device cpu")


def test_unknown_method_suggests_the_closest(capsys, inputs, out):
    message = assert_bad_input(capsys, explain(inputs, out, "--methods", "Saliency,IntegratedGradient"), out,
                               "IntegratedGradient")
    assert "Did you mean 'IntegratedGradients'" in message


@pytest.mark.parametrize("param, fragments", [
    ("IntegratedGradients.n_steps=abc", ("n_steps", "int")),
    ("IntegratedGradients.n_steps=0", ("n_steps", ">=")),
    ("IntegratedGradients.n_stepz=8", ("n_stepz", "Did you mean 'n_steps'")),
    ("Occlusion.window=8", ("Occlusion", "not among the methods")),
    ("n_steps=8", ("METHOD.NAME=VALUE",)),
])
def test_bad_method_parameters(capsys, inputs, out, param, fragments):
    assert_bad_input(capsys, explain(inputs, out, "--methods", "IntegratedGradients", "--param", param), out,
                     *fragments)


@pytest.mark.parametrize("option, fragments", [
    (["--overlap", "1.5"], ("--overlap", "[0, 1)")),
    (["--patch-size", "-4"], ("--patch-size", "positive")),
    (["--batch-size", "many"], ("--batch-size",)),
    (["--precision", "fp8"], ("--precision", "fp8")),
    (["--device", "tpu"], ("--device", "tpu")),
    (["--class", "7"], ("--class", "out of range")),
    (["--class", "liver"], ("liver", "vessel")),
    (["--metrics", "infidelityy"], ("infidelityy",)),
])
def test_bad_option_values(capsys, inputs, out, option, fragments):
    assert_bad_input(capsys, explain(inputs, out, *option, model=inputs["card"]), out, *fragments)


def test_missing_required_arguments(capsys, out):
    assert_bad_input(capsys, ["explain", "--out", out], out, "required", "VOLUME")


def test_debug_shows_the_traceback(capsys, inputs, out):
    code, _, stderr = run_cli(capsys, explain(inputs, out, "--debug", volume=inputs["folder"] / "nope.nii.gz"))
    assert code == 2 and "Traceback" in stderr and stderr.strip().splitlines()[-1].startswith("esegeta: error:")


def test_exit_status_and_message_through_python_dash_m(inputs, out):
    """The real entry point in a subprocess: status 2, one line, nothing else on stderr."""
    before = snapshot(out)
    result = subprocess.run([sys.executable, "-m", "EsegetaLib", *map(str, explain(inputs, out, "--methods", "Salency"))],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("esegeta: error: Unknown method 'Salency'. Did you mean 'Saliency'?")
    assert snapshot(out) == before


def test_a_misspelt_layer_is_refused_before_the_segmentation(capsys, inputs, out):
    # GradCAM (like FeatureVisualization) checks its layer name first: no segmentation, nothing written
    line = assert_bad_input(capsys, explain(inputs, out, "--methods", "Saliency,GradCAM", "--param",
                                            "GradCAM.layer=network.model.1.submodul", model=inputs["card"]),
                            out, "GradCAM: the network has no layer 'network.model.1.submodul'", "did you mean")
    assert "'network.model.1.submodule'" in line


def test_api_refuses_a_misspelt_layer_before_any_progress():
    import torch

    from EsegetaLib.api import explain as api_explain
    from EsegetaLib.errors import EsegetaError

    from collections import OrderedDict

    net = torch.nn.Sequential(OrderedDict(conv1=torch.nn.Conv3d(1, 4, 3, padding=1), relu=torch.nn.ReLU(),
                                          conv2=torch.nn.Conv3d(4, 2, 1)))
    calls = []
    with pytest.raises(EsegetaError, match=r"GradCAM\+\+: the network has no layer 'conv3'.*Did you mean 'conv2', 'conv1'"):
        api_explain(np.random.rand(8, 8, 8).astype(np.float32), net, [("GradCAM++", {"layer": "conv3"})],
                    progress=lambda f, m: calls.append(m))
    assert calls == []  # the segmentation never started
