"""One-channel sigmoid models: detected (class 0 = foreground), explained with the defaults, their
segmentation is sigmoid(logit) > 0.5; `--activation` overrides."""
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
from EsegetaLib.models import load_model  # noqa: E402

SHAPE = (32, 32, 16)  # multiples of the divisor: one unpadded window, comparable with a direct forward


@pytest.fixture(scope="module")
def sigmoid_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sigmoid")
    net = make_unet_instancenorm_prelu(out_channels=1, seed=4)
    last = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
    with torch.no_grad():  # the output bias moved so that part of the volume is foreground
        last.bias.fill_(0.3)
    path = folder / "one_channel.ts"
    torch.jit.trace(net, torch.zeros(1, 1, 16, 16, 16)).save(str(path))
    volume = write_volume(folder / "volume.nii.gz", volume_array(SHAPE))
    return net, path, volume


def logits_of(net, volume_path):
    from EsegetaLib.io import read_image

    image = read_image(volume_path)
    with torch.no_grad():
        return net(torch.from_numpy(image.array[None]))[0, 0].numpy()


def test_one_channel_model_is_detected_as_sigmoid(sigmoid_model):
    _, path, _ = sigmoid_model
    loaded = load_model(path)
    assert loaded.card.activation == "sigmoid" and loaded.out_channels == 1
    assert loaded.card.classes == ["foreground"] and "one output channel" in loaded.activation_source
    assert load_model(path, activation="softmax").card.activation == "softmax"  # the override wins


@pytest.mark.parametrize("region", ["predicted", "whole"])
def test_default_run_explains_class_0_and_segments_sigmoid_above_half(sigmoid_model, tmp_path, capsys, region):
    from EsegetaLib.io import read_image

    net, path, volume = sigmoid_model
    out = tmp_path / "run"
    code = main(["explain", str(volume), "--model", str(path), "--out", str(out), "--methods", "Saliency",
                 "--metrics", "none", "--no-scene", "--device", "cpu", "--region", region])
    assert code == 0, capsys.readouterr().err
    logits = logits_of(net, volume)
    expected = (1 / (1 + np.exp(-logits))) > 0.5
    segmentation = read_image(out / "segmentation.nii.gz").array[0]
    assert 100 < expected.sum() < expected.size - 100  # both classes present: the check can fail
    np.testing.assert_array_equal(segmentation > 0, expected)
    assert set(np.unique(segmentation)) == {0, 1}
    run = json.loads((out / "run.json").read_text())
    assert run["target"]["class_index"] == 0 and run["target"]["activation"] == "sigmoid"
    assert run["parameters"]["model_description"]["activation_source"].startswith("detected")
    saliency = read_image(out / "attributions" / "Saliency.nii.gz").array
    assert np.abs(saliency).sum() > 0


def test_activation_softmax_on_one_channel_is_a_one_line_error(sigmoid_model, tmp_path, capsys):
    _, path, volume = sigmoid_model
    code = main(["explain", str(volume), "--model", str(path), "--out", str(tmp_path / "run"),
                 "--activation", "softmax", "--class", "0", "--device", "cpu", "--no-scene", "--metrics", "none"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("esegeta: error:")]
    assert code == 2 and len(lines) == 1 and "sigmoid" in lines[0], err
