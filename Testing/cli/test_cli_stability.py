"""`esegeta explain --stability`: the mean and coefficient-of-variation maps of each method and the
prediction's entropy written on the input grid and read back, the "stability" trust check and the
run.json summary; a malformed value refused in one line before anything is written."""
from __future__ import annotations

import json

import numpy as np
import pytest

from EsegetaLib.cli import main
from EsegetaLib.io import read_image

from helpers import shared_inputs, snapshot


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return shared_inputs(tmp_path_factory)


def test_explain_with_noise_stability_writes_mean_cv_and_entropy(inputs, tmp_path, capsys):
    out = tmp_path / "result"
    code = main(["explain", str(inputs["nifti"]), "--model", str(inputs["model"]), "--out", str(out),
                 "--methods", "Saliency", "--region", "whole", "--metrics", "none", "--device", "cpu",
                 "--no-scene", "--stability", "noise:2:0.1"])
    assert code == 0, capsys.readouterr().err
    source = read_image(inputs["nifti"])
    plain = read_image(out / "attributions" / "Saliency.nii.gz")
    files = sorted(p.name for p in (out / "stability").iterdir())
    assert files == ["Saliency_cv.nii.gz", "Saliency_mean.nii.gz", "prediction_entropy.nii.gz"]
    for name in files:
        image = read_image(out / "stability" / name)
        assert image.array.shape[1:] == source.array.shape[1:]
        np.testing.assert_allclose(image.ijk_to_ras, source.ijk_to_ras, atol=1e-6)
    mean = read_image(out / "stability" / "Saliency_mean.nii.gz").array[0]
    cv = read_image(out / "stability" / "Saliency_cv.nii.gz").array[0]
    entropy = read_image(out / "stability" / "prediction_entropy.nii.gz").array[0]
    assert float(np.abs(mean).max()) > 0 and float(cv.max()) > 0  # two noise draws differ
    assert not np.array_equal(mean, plain.array[0])
    assert 0.0 <= float(entropy.min()) and float(entropy.max()) <= np.log(2.0) + 1e-5
    record = json.loads((out / "run.json").read_text())
    assert record["stability"]["augmentation"] == "noise:2:0.1"
    assert record["stability"]["runs"] == ["noise_0", "noise_1"]
    median = record["stability"]["methods"]["Saliency"]["median_cv_in_region"]
    assert median == pytest.approx(float(np.median(cv)), rel=1e-5)
    check = {c["name"]: c for c in record["results"]["Saliency"]["checks"]}["stability"]
    assert check["value"] == pytest.approx(median, rel=1e-6) and check["status"] in ("pass", "warn")


def test_malformed_stability_is_one_line_and_writes_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "result"
    code = main(["explain", str(inputs["nifti"]), "--model", str(inputs["model"]), "--out", str(out),
                 "--methods", "Saliency", "--metrics", "none", "--no-scene", "--stability", "noise:zero"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("esegeta: error:")]
    assert code == 2 and len(errors) == 1 and "--stability 'noise:zero'" in errors[0] and "Traceback" not in err
    assert snapshot(out) is None
