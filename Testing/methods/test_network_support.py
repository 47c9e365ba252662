"""Methods that hook layers or intercept activations are refused on TorchScript before any work."""
import numpy as np
import pytest
import torch

from conftest import make_unet_instancenorm_prelu
from EsegetaLib.api import explain
from EsegetaLib.cli import main
from EsegetaLib.errors import EsegetaError
from EsegetaLib.methods import all_methods


def _scripted():
    return torch.jit.trace(make_unet_instancenorm_prelu(), torch.randn(1, 1, 16, 16, 16))


def test_layer_methods_flagged_and_dispatcher_rules_not():
    eager = {s.name for s in all_methods() if s.requires_eager}
    assert {"GradCAM", "GradCAM++", "GuidedGradCam"} <= eager
    # guided backprop, deconvolution and DeepLift rewrite backward kernels at the dispatcher: any format
    assert not {"Saliency", "IntegratedGradients", "Occlusion", "GuidedBackprop", "Deconvolution",
                "DeepLift", "DeepLiftShap"} & eager


def test_explain_refuses_all_at_once_before_running():
    calls = []
    with pytest.raises(EsegetaError) as err:
        explain(np.random.rand(16, 16, 16).astype(np.float32), _scripted(),
                ["Saliency", "GradCAM", "GuidedBackprop", "GradCAM++"], progress=lambda f, m: calls.append(m))
    message = str(err.value)
    assert "GradCAM," in message and "GradCAM++" in message
    assert "Saliency" not in message and "GuidedBackprop" not in message
    assert "\n" not in message and calls == []  # nothing ran


def test_cli_exit_2_and_no_output(tmp_path, capsys):
    import nibabel as nib

    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), np.eye(4)), volume)
    model = tmp_path / "m.pt"
    _scripted().save(str(model))
    out = tmp_path / "out"
    code = main(["explain", str(volume), "--model", str(model), "--methods", "Saliency,GradCAM",
                 "--out", str(out), "--quiet"])
    assert code == 2
    assert "TorchScript" in capsys.readouterr().err
    assert not out.exists()


def test_lrp_refusal_asks_for_a_model_card_not_pt2():
    # LRP attaches a rule to each module: neither TorchScript nor an exported program (.pt2) has them
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(2, 2, 1))
    scripted = torch.jit.trace(net.eval(), torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(EsegetaError) as err:
        explain(np.random.rand(8, 8, 8).astype(np.float32), scripted, ["LRP", "GradCAM"])
    message = str(err.value)
    lrp_part, gradcam_part = message.split("; GradCAM")
    assert "LRP cannot run on a TorchScript model" in lrp_part and "model card" in lrp_part
    assert "docs/readme/models.md" in lrp_part and ".pt2" not in lrp_part and "hook layers" not in message
    assert "torch.export (.pt2)" in gradcam_part  # a layer method can still run on an exported program
    assert "\n" not in message
