"""LRP on models we did not write, as users load them: the real pretrained MeshNet "MindGrab" (GroupNorm,
BatchNorm on batch statistics, GELU, dilated convolutions; shared test data, skipped when absent) on a
crop of its own T1 example, and an nnU-Net v2 residual-encoder folder through its whole inference
pipeline (normalisation, separable resampling, sliding window).  The conservation figures are printed
(-s); the assertions are on the relevance accounting."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from EsegetaLib.engine import ExplainSession
from EsegetaLib.options import EngineOptions, Target
from method_helpers import shared_file


def _check(result):
    return {c.name: c for c in result.checks}["conservation"]


def _share(result, key):
    return result.diagnostics[key] / result.diagnostics["lrp_output_abs"]


def test_real_meshnet_groupnorm_gelu():
    sitk = pytest.importorskip("SimpleITK")
    from test_method_guided import build_meshnet

    folder = shared_file("models", "mindgrab", "model.pth").parent
    network = build_meshnet(folder / "layers.json", torch.load(folder / "model.pth", map_location="cpu",
                                                                weights_only=True))
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "t1_crop.nii.gz"))).astype(np.float32)
    n = 12
    c = [s // 2 for s in image.shape]
    crop = image[tuple(slice(k - n // 2, k + n // 2) for k in c)] / 255.0  # the model's [0, 1] scaling
    results = {}
    session = ExplainSession(crop[None], network, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", precision="fp32", patch_size=n))
    for norm_rule in ("centred", "affine"):
        results[norm_rule] = result = session.attribute("LRP", {"norm_rule": norm_rule})
        print(f"\nLRP-epsilon on MindGrab (GroupNorm, BatchNorm on batch statistics, GELU), norm_rule={norm_rule}: "
              f"{_check(result).detail}")
        assert np.isfinite(result.attribution).all() and result.attribution.std() > 0
        rest = (result.diagnostics["lrp_explained"] - result.attribution.sum() - result.diagnostics["lrp_absorbed_bias"]
                - result.diagnostics["lrp_absorbed_rule"] - result.diagnostics["lrp_absorbed_norm"])
        assert abs(rest) / result.diagnostics["lrp_output_abs"] < 1e-4  # float32: every op covered by a rule
    # its norms have no affine parameters: centred, they keep nothing; holding the mean fixed, much
    assert abs(_share(results["centred"], "lrp_absorbed_norm")) < 1e-3
    assert abs(_share(results["affine"], "lrp_absorbed_norm")) > 0.1


def test_nnunet_folder_pipeline_runs_with_resampling_counted(tmp_path):
    pytest.importorskip("nnunetv2")
    pytest.importorskip("dynamic_network_architectures")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from nnunet_helpers import RESENC, make_nnunet_folder, plans, tube_volume

    from EsegetaLib.models import load_model

    spacing = (0.8, 0.9, 2.5)  # anisotropic: the pipeline resamples to the plans' spacing and back
    model = load_model(make_nnunet_folder(tmp_path, plans_dict=plans(RESENC)), fold=0)
    volume = tube_volume(shape=(30, 26, 14))
    function = model.network_for(volume, spacing).double()
    session = ExplainSession(volume, function, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", patch_size=volume.shape[1:], divisor=1), spacing=spacing)
    result = session.attribute("LRP")
    check = _check(result)
    print(f"\nLRP-epsilon through an nnU-Net ResidualEncoderUNet folder's inference: {check.detail}")
    assert np.isfinite(result.attribution).all() and result.attribution.std() > 0
    assert result.diagnostics["lrp_functional_linear"] > 0 and "took LRP-0" in check.detail
    # the pipeline's z-score passes relevance to the voxels (it kept half of it before): what is left
    # unaccounted is the resampling's clip of cubic overshoot
    d = result.diagnostics
    rest = d["lrp_explained"] - result.attribution.sum() - d["lrp_absorbed_bias"] - d["lrp_absorbed_rule"] \
        - d["lrp_absorbed_norm"]
    assert abs(rest) / d["lrp_output_abs"] < 0.01
