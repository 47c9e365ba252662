"""`esegeta explain` end to end on representative header variants (the ones readers disagree on),
checked with ITK (SimpleITK) only: each map and the segmentation are on the input's grid, and the map
values sit on the voxels they were computed for. Bad headers: one line on stderr, exit status 2."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "cli"))

import header_family as H  # noqa: E402
from helpers import write_torchscript  # noqa: E402

from EsegetaLib.cli import main  # noqa: E402
from EsegetaLib.io import extension_for, read_image  # noqa: E402

sitk = pytest.importorskip("SimpleITK")
sitk.ProcessObject.SetGlobalWarningDisplay(False)

REPRESENTATIVES = H.representatives()
BLOB = H.BLOB


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_torchscript(tmp_path_factory.mktemp("model") / "unet.pt")


def itk_grid(image):
    return (np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()),
            np.asarray(image.GetDirection()))


def ijk_array(image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


@pytest.mark.parametrize("variant", REPRESENTATIVES, ids=[v.name for v in REPRESENTATIVES])
def test_explain_outputs_overlay_the_input_in_itk(tmp_path, model, variant, capsys):
    path = variant.make(tmp_path)
    out = tmp_path / "result"
    code = main(["explain", str(path), "--model", str(model), "--out", str(out), "--methods",
                 "Saliency,InputXGradient", "--param", "Saliency.absolute=false", "--region", "whole",
                 "--metrics", "none", "--device", "cpu", "--no-scene"])
    assert code == 0, capsys.readouterr().err
    ext = extension_for(read_image(path))  # outputs come in the input's format family
    source = sitk.ReadImage(str(path))
    files = {n: sitk.ReadImage(str(out / "attributions" / f"{n}{ext}")) for n in ("Saliency", "InputXGradient")}
    files["segmentation"] = sitk.ReadImage(str(out / f"segmentation{ext}"))
    for what, image in files.items():
        for a, b in zip(itk_grid(image), itk_grid(source)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=what)
        assert image.GetSize() == source.GetSize()
    x = ijk_array(source)
    saliency, ixg = ijk_array(files["Saliency"]), ijk_array(files["InputXGradient"])
    # Input x gradient is non-zero exactly where the input is (the bright voxels) ...
    assert set(map(tuple, np.argwhere(ixg != 0))) <= set(BLOB)
    assert all(ixg[ijk] != 0 for ijk in BLOB)
    # ... and equals the gradient map times the input there, voxel for voxel in ITK's index space.
    np.testing.assert_allclose(ixg, saliency * x, rtol=1e-4, atol=1e-6 * np.abs(ixg).max())
    # Each bright voxel's map value is at the bright voxel's physical point (ITK, LPS).
    for ijk in BLOB:
        point = source.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk))
        index = files["InputXGradient"].TransformPhysicalPointToIndex(point)
        assert tuple(index) == ijk and ixg[index] != 0


BAD = [v for v in H.all_variants() if v.refuse is not None and v.name in (
    "nifti sheared sform, no qform", "nifti zero pixdim", "nifti NaN in sform", "nifti 2-D image",
    "nrrd non-orthogonal directions", "nrrd space right-anterior-superior-time (4-D)", "mha zero ElementSpacing")]


@pytest.mark.parametrize("variant", BAD, ids=[v.name for v in BAD])
def test_bad_header_one_line_exit_2(tmp_path, model, variant, capsys):
    path = variant.make(tmp_path)
    code = main(["explain", str(path), "--model", str(model), "--out", str(tmp_path / "result"),
                 "--methods", "Saliency", "--metrics", "none", "--device", "cpu", "--no-scene"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]  # progress lines may precede it
    assert len(errors) == 1 and variant.refuse in errors[0] and path.name in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "result").exists()
