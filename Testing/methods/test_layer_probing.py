"""The automatic layer receives a usable gradient from the target (#11 item 6), and says so."""
import numpy as np
import pytest
import torch

from EsegetaLib.api import explain
from EsegetaLib.errors import EsegetaError
from EsegetaLib.options import EngineOptions, Target

OPTS = EngineOptions(device="cpu", divisor=16)
VOL = np.random.RandomState(0).rand(16, 16, 16).astype(np.float32)


def _checks(result):
    return {c.name: c for c in result.checks}


def test_segresnetds_unused_head_is_passed_over():
    from monai.networks.nets import SegResNetDS

    torch.manual_seed(0)
    net = SegResNetDS(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 2, 2), dsdepth=2).eval()
    expl = explain(VOL, net, ["GradCAM", "LayerIntegratedGradients"], target=Target(region="whole"), options=OPTS)
    for result in expl.results.values():
        check = _checks(result)["layer_gradient"]
        assert check.status == "pass" and check.value > 0
        assert "head" not in result.diagnostics["layer"] and "not on the output's path" in check.detail
        assert np.abs(result.map).max() > 0


def test_segresnet_groupnorm_zeroed_gradcam_weights_are_passed_over():
    """MONAI's SegResNet: a per-channel GroupNorm after the structural default makes every Grad-CAM
    weight zero there; the probe moves on to a layer whose channel weights do not vanish."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    net = SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 2), blocks_up=(1,)).eval()
    result = explain(VOL, net, ["GradCAM"], target=Target(region="whole"), options=OPTS).results["GradCAM"]
    check = _checks(result)["layer_gradient"]
    assert "Grad-CAM weights vanish" in check.detail and result.diagnostics["layer"] != "up_samples.0.0"
    assert check.status == "pass" and result.diagnostics["layer_cam_weight_ratio"] > 1e-3
    assert np.abs(result.map).max() > 0


def test_named_layer_off_the_path_is_refused():
    from monai.networks.nets import SegResNetDS

    torch.manual_seed(0)
    net = SegResNetDS(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 2, 2), dsdepth=2).eval()
    with pytest.raises(EsegetaError) as err:
        explain(VOL, net, [("GradCAM", {"layer": "up_layers.0.head"})], target=Target(region="whole"), options=OPTS)
    assert "not on the path" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_swinunetr_gets_a_default_layer():
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)).eval()
    vol = np.random.RandomState(0).rand(64, 64, 64).astype(np.float32)  # 32^3 leaves 1 voxel at its deepest norm
    result = explain(vol, net, ["GradCAM"], target=Target(region="whole"),
                     options=EngineOptions(device="cpu", divisor=32)).results["GradCAM"]
    assert _checks(result)["layer_gradient"].status == "pass" and result.diagnostics["layer"]
    print("SwinUNETR automatic layer:", result.diagnostics["layer"], _checks(result)["layer_gradient"].detail)
