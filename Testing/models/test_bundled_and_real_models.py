"""The bundled default vessel model on the bundled sample, and a real pretrained network (MindGrab)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from EsegetaLib.errors import EsegetaError
from EsegetaLib.io import read_image
from EsegetaLib.models import load_default_model, load_model
from EsegetaLib.sample import load_sample, load_sample_labels, resource_path

from conftest import shared_file


def dice(a, b) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def default_model():
    return load_default_model()


def test_default_model_card(default_model):
    card = default_model.card
    # InstanceNorm keeping running statistics (scripts/train_default_model.py says why)
    assert card.architecture == "UNet" and card.arguments["norm"] == ["instance", {"track_running_stats": True}]
    assert card.arguments["act"] == "prelu" and card.in_channels == 1
    assert card.classes == ["background", "vessel"] and card.activation == "softmax"
    assert card.normalization["type"] == "percentile" and card.metrics["dice_heldout_mean"] > 0.45
    assert resource_path(card.weights).stat().st_size < 5_000_000


def test_default_model_finds_the_vessels_of_the_bundled_sample(default_model):
    """Recomputed here, not read from the card: the whole sample in one window."""
    sample = load_sample()
    truth = load_sample_labels().array[0] > 0
    network = default_model.network_for(sample.array)
    x = torch.from_numpy(sample.array[None])  # 96x96x64 is a multiple of the divisor 8
    with torch.no_grad():
        labels = network(x).argmax(1)[0].numpy()
    score = dice(labels == 1, truth)
    assert score > 0.7, score
    assert abs(score - default_model.card.metrics["dice_bundled_sample"]) < 0.1


def test_default_model_gradients_reach_the_original_intensities(default_model):
    sample = load_sample()
    crop = sample.array[:, 24:56, 24:56, 16:48]
    network = default_model.network_for(sample.array)
    x = torch.from_numpy(np.ascontiguousarray(crop)[None]).requires_grad_(True)
    network(x)[:, 1].sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().max()) > 0


def test_default_model_refuses_two_channels(default_model):
    with pytest.raises(EsegetaError, match="expects 1 input channel"):
        default_model.network_for(np.zeros((2, 8, 8, 8), np.float32))


def test_mindgrab_torchscript_segments_a_brain():
    """A real pretrained network nobody here wrote (GroupNorm + GELU MeshNet), via TorchScript.

    A 96^3 crop at 1 mm (its dilated convolutions need that much context) across the front of
    the head: air, scalp, skull, eyes and brain. One compact brain inside the head, nothing in the
    air. (About 15 s on one free core.)
    """
    from scipy import ndimage

    model_path = shared_file("models", "mindgrab", "mindgrab.ts.pt")
    t1 = read_image(shared_file("models", "mindgrab", "t1_crop.nii.gz"))
    loaded = load_model(model_path, normalization="minmax")
    assert loaded.card.architecture == "torchscript" and loaded.card.in_channels == 1
    network = loaded.network_for(t1.array)  # min-max constants from the whole head (0..255)
    box = (slice(None), slice(80, 176), slice(80, 176), slice(158, 254))
    crop = np.ascontiguousarray(t1.array[box])
    with torch.no_grad():
        out = network(torch.from_numpy(crop[None]))
    assert out.shape == (1, 2, 96, 96, 96)
    brain = out.argmax(1)[0].numpy() == 1
    head = crop[0] > 0
    assert 0.15 < brain.mean() < 0.45
    assert brain[~head].mean() < 0.005  # nothing in the air
    components, count = ndimage.label(brain)
    assert np.bincount(components.ravel())[1:].max() > 0.95 * brain.sum()  # one compact brain
    deep = head[:, :, :16] & (crop[0, :, :, :16] > 30)  # tissue towards the centre of the head
    assert brain[:, :, :16][deep].mean() > 0.7
    far_side = brain[:, :, 64:]  # the face side of the crop: eyes, scalp, air
    assert far_side.mean() < 0.01
