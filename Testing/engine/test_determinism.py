"""A model whose output changes between two passes of the same input is refused (#11 item 9)."""
import numpy as np
import pytest
import torch
from torch import nn

from EsegetaLib.api import explain
from EsegetaLib.cli import main
from EsegetaLib.errors import EsegetaError
from EsegetaLib.options import EngineOptions, Target


def _dropout_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout3d(0.3), nn.Conv3d(4, 2, 1))


def _traced(train: bool):
    net = _dropout_net().train(train)
    return torch.jit.trace(net, torch.randn(1, 1, 8, 8, 8), check_trace=False)


VOL = np.random.RandomState(0).rand(16, 16, 16).astype(np.float32)
OPTS = EngineOptions(device="cpu", divisor=1)


def test_traced_in_train_mode_refused_with_how_to_export():
    model = _traced(True)
    model.eval()  # does not help: tracing froze dropout's training flag
    with pytest.raises(EsegetaError) as err:
        explain(VOL, model, ["Saliency"], target=Target(region="whole"), options=OPTS)
    message = str(err.value)
    assert "\n" not in message and "eval()" in message and "different outputs" in message


def test_eval_export_passes_with_check_in_result():
    expl = explain(VOL, _traced(False), ["Saliency"], target=Target(region="whole"), options=OPTS)
    checks = {c.name: c for c in expl.results["Saliency"].checks}
    assert checks["determinism"].status == "pass" and checks["determinism"].value == 0.0


def test_cli_exit_2_no_output(tmp_path, capsys):
    import nibabel as nib

    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(VOL, np.eye(4)), volume)
    model = tmp_path / "m.pt"
    _traced(True).save(str(model))
    out = tmp_path / "out"
    code = main(["explain", str(volume), "--model", str(model), "--methods", "Saliency", "--region", "whole",
                 "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 2
    assert "training mode" in capsys.readouterr().err
    assert not out.exists()
