"""A model card's spacing: a volume on another grid is resampled to it inside the explained
function (trilinear in and out, MONAI's sliding window at the card's patch), so the maps are
gradients with respect to the volume's own voxels and land on its grid."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from helpers import volume_array, write_volume  # noqa: E402

from conftest import make_unet_instancenorm_prelu  # noqa: E402

from EsegetaLib.cli import main  # noqa: E402
from EsegetaLib.models import load_model, load_default_model  # noqa: E402

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32], "strides": [2, 2],
             "num_res_units": 1, "norm": "instance", "act": "prelu"}


@pytest.fixture(scope="module")
def card_at_double_spacing(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    net = make_unet_instancenorm_prelu(seed=2)
    torch.save(net.state_dict(), folder / "w.pt")
    card = {"name": "coarse", "architecture": "UNet", "arguments": UNET_ARGS, "weights": "w.pt",
            "classes": ["background", "vessel"], "normalization": {"type": "zscore"}, "patch_size": [16, 16, 16],
            "divisor": 4, "spacing": [0.8, 0.8, 0.8]}
    (folder / "card.json").write_text(json.dumps(card))
    volume = write_volume(folder / "v.nii.gz", volume_array((32, 32, 16)), np.diag([0.4, 0.4, 0.4, 1.0]))
    return net, folder / "card.json", volume


def test_function_is_resample_network_resample(card_at_double_spacing):
    """One window covers the model grid here, so the function is exactly interpolate -> normalised
    network -> interpolate back (float64), and its Saliency is the gradient of that composition."""
    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.io import read_image
    from EsegetaLib.options import EngineOptions, Target

    net, card, volume = card_at_double_spacing
    image = read_image(volume)
    model = load_model(card)
    assert model.resamples(image.spacing) and model.engine_hints(image.spacing)["whole_volume"]
    function = model.network_for(image.array, image.spacing, image.ijk_to_ras).double()
    assert function.record["resampled_to"] == {"shape": [16, 16, 8], "spacing": [0.8, 0.8, 0.8]}
    v = image.array.astype(np.float64)
    mean, std = v.mean(), v.std()
    x = torch.from_numpy(v[None]).requires_grad_(True)
    net64 = net.double()

    def reference(t):
        small = torch.nn.functional.interpolate(t, size=(16, 16, 8), mode="trilinear", align_corners=False)
        return torch.nn.functional.interpolate(net64((small - mean) / std), size=(32, 32, 16), mode="trilinear",
                                               align_corners=False)

    with torch.no_grad():  # the card's normalisation constants are stored in float32
        torch.testing.assert_close(function(x), reference(x), rtol=1e-6, atol=1e-6)
    session = ExplainSession(image.array, function, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", patch_size=image.spatial_shape, divisor=1),
                             spacing=image.spacing)
    result = session.attribute("Saliency", {"absolute": False})
    (grad,) = torch.autograd.grad(reference(x)[0, 1].sum(), x)
    np.testing.assert_allclose(result.map, grad[0, 0].numpy(), rtol=1e-5, atol=1e-9)
    assert float(grad.abs().sum()) > 0


def test_cli_records_the_resampling_and_writes_on_the_input_grid(card_at_double_spacing, tmp_path, capsys):
    from EsegetaLib.io import read_image

    _, card, volume = card_at_double_spacing
    out = tmp_path / "run"
    code = main(["explain", str(volume), "--model", str(card), "--out", str(out), "--methods", "Saliency",
                 "--metrics", "none", "--no-scene", "--device", "cpu", "--region", "whole"])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["engine"]["model_preprocessing"]["resampled_from"]["spacing"] == pytest.approx([0.4] * 3)
    assert read_image(out / "attributions" / "Saliency.nii.gz").array.shape == (1, 32, 32, 16)


def test_the_bundled_model_on_its_own_spacing_is_not_resampled():
    from EsegetaLib.io import read_image
    from EsegetaLib.sample import resource_path

    model = load_default_model()
    image = read_image(resource_path("sample_tof.nii.gz"))
    assert not model.resamples(image.spacing) and "whole_volume" not in model.engine_hints(image.spacing)


def test_the_window_reported_is_the_models(card_at_double_spacing):
    """The card's patch (16^3, cut to its 16x16x8 grid) at 0.8 mm covers 32x32x16 voxels of 0.4 mm."""
    from EsegetaLib.io import read_image

    _, card, volume = card_at_double_spacing
    image = read_image(volume)
    function = load_model(card).network_for(image.array, image.spacing, image.ijk_to_ras)
    assert function.window_text == ("16x16x8 voxels at 0.8x0.8x0.8 mm on the model's 16x16x8 grid, "
                                    "= 32x32x16 input voxels (I x J x K at 0.4x0.4x0.4 mm)")
