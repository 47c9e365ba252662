"""Model loading (TorchScript, torch.export, model cards), safety, and the normalisation layer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from EsegetaLib.errors import EsegetaError
from EsegetaLib.models import ModelCard, load_model, make_normalization

from conftest import make_unet_instancenorm_prelu

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32],
             "strides": [2, 2], "num_res_units": 1, "norm": "instance", "act": "prelu"}


def volume(channels=1, seed=0, shape=(16, 16, 16)):
    rng = np.random.default_rng(seed)
    return (rng.gamma(2.0, 150.0, size=(channels, *shape)) + 20).astype(np.float32)


def write_card(folder, network, **fields) -> str:
    torch.save(network.state_dict(), folder / "weights.pt")
    card = {"name": "tiny", "architecture": "UNet", "arguments": UNET_ARGS, "weights": "weights.pt",
            "in_channels": 1, "classes": ["background", "vessel"], "activation": "softmax",
            "normalization": {"type": "zscore"}, "patch_size": [32, 32, 32], "divisor": 4}
    card.update(fields)
    (folder / "card.json").write_text(json.dumps(card))
    return str(folder / "card.json")


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_model_card_loads_monai_network_with_its_weights(tmp_path):
    reference = make_unet_instancenorm_prelu(seed=3)
    loaded = load_model(write_card(tmp_path, reference))
    assert loaded.card.classes == ["background", "vessel"] and loaded.card.in_channels == 1
    assert not loaded.network.training
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), reference(x), rtol=0, atol=0)
    assert loaded.engine_hints() == {"patch_size": [32, 32, 32], "divisor": 4,
                                     "activation": "softmax", "head": 0}


def test_network_for_puts_fixed_normalisation_first(tmp_path):
    """network_for(v)(x) == network((x - mean(v)) / std(v)): constants from v, held fixed for any x."""
    reference = make_unet_instancenorm_prelu(seed=3)
    loaded = load_model(write_card(tmp_path, reference))
    v = volume()
    wrapped = loaded.network_for(v)
    mean, std = float(v.astype(np.float64).mean()), float(v.astype(np.float64).std())
    for x in (torch.from_numpy(v[None]), torch.from_numpy(v[None]) * 0.5 + 7):  # a perturbed input too
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), reference((x - mean) / std), rtol=1e-4, atol=1e-5)
    # Gradients reach the original intensities: d(score)/dx = d(score)/d(normalised x) / std.
    x = torch.from_numpy(v[None]).requires_grad_(True)
    wrapped(x)[:, 1].sum().backward()
    z = ((torch.from_numpy(v[None]) - mean) / std).requires_grad_(True)
    reference(z)[:, 1].sum().backward()
    torch.testing.assert_close(x.grad, z.grad / std, rtol=1e-3, atol=1e-7)
    assert float(x.grad.abs().sum()) > 0


def test_normalisations_match_monai_transforms():
    """Each normalisation gives what the MONAI transform of the same name gives, per channel."""
    from monai.transforms import NormalizeIntensity, ScaleIntensity, ScaleIntensityRangePercentiles

    v = volume(channels=2)
    v[1, :4] = 0  # some background for the non-zero z-score

    def apply(spec):
        with torch.no_grad():
            return make_normalization(v, spec)(torch.from_numpy(v[None]))[0].numpy()

    np.testing.assert_allclose(apply("zscore"), NormalizeIntensity(channel_wise=True)(v), atol=1e-4)
    nz = apply({"type": "zscore", "nonzero": True})
    ref = NormalizeIntensity(nonzero=True, channel_wise=True)(v)
    mask = v != 0  # MONAI leaves zeros at 0; our layer maps them with the same constants
    np.testing.assert_allclose(nz[mask], np.asarray(ref)[mask], atol=1e-4)
    np.testing.assert_allclose(apply("minmax"), ScaleIntensity(0.0, 1.0, channel_wise=True)(v), atol=1e-5)
    for clip in (True, False):
        spec = {"type": "percentile", "lower": 2.0, "upper": 98.0, "clip": clip}
        expected = np.stack([ScaleIntensityRangePercentiles(2.0, 98.0, 0.0, 1.0, clip=clip)(c[None])[0]
                             for c in v])
        np.testing.assert_allclose(apply(spec), expected, atol=1e-5)
    np.testing.assert_array_equal(apply("none"), v)
    constant = np.full((1, 4, 4, 4), 5.0, np.float32)  # no division by zero
    with torch.no_grad():
        assert torch.isfinite(make_normalization(constant, "zscore")(torch.from_numpy(constant[None]))).all()


def test_torchscript_and_export_files(tmp_path):
    net = make_unet_instancenorm_prelu(seed=5)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net(x)
    torch.jit.save(torch.jit.trace(net, x), str(tmp_path / "net.ts"))
    for name in ("net.ts",):
        loaded = load_model(tmp_path / name)
        assert loaded.card.architecture == "torchscript" and loaded.card.in_channels == 1
        with torch.no_grad():
            torch.testing.assert_close(loaded.network(x), expected, rtol=1e-5, atol=1e-6)
    # torch.export with a dynamic spatial size (multiple of the divisor 4), as sliding windows need.
    dims = {"x": {2: torch.export.Dim("d", min=1, max=64) * 4, 3: torch.export.Dim("h", min=1, max=64) * 4,
                  4: torch.export.Dim("w", min=1, max=64) * 4}}
    program = torch.export.export(net, (x,), dynamic_shapes=dims)
    torch.export.save(program, str(tmp_path / "net.pt2"))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(tmp_path / "net.pt2", normalization="zscore")
        # torch's own pytree FutureWarning is silenced at the load site only, not for the process
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == \
        ["`isinstance(treespec, LeafSpec)` is deprecated"]
    assert loaded.card.architecture == "export" and loaded.card.normalization["type"] == "zscore"
    y = torch.randn(1, 1, 24, 16, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(y), net(y), rtol=1e-5, atol=1e-6)
    # A card may point at a TorchScript file to give it classes and a normalisation.
    (tmp_path / "ts_card.json").write_text(json.dumps(
        {"name": "ts", "architecture": "torchscript", "weights": "net.ts", "classes": ["bg", "fg"],
         "normalization": {"type": "percentile", "lower": 1, "upper": 99, "clip": False}}))
    card_model = load_model(tmp_path / "ts_card.json")
    assert card_model.card.in_channels == 1 and card_model.card.normalization["upper"] == 99


def test_arbitrary_pickles_are_refused(tmp_path):
    """torch.save(model) is a pickle that could run code: refused with an explanation, never loaded."""
    net = make_unet_instancenorm_prelu()
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(EsegetaError) as e:
        load_model(tmp_path / "whole.pt")
    assert "arbitrary code" in one_line(e) and "torch.jit" in str(e.value)
    torch.save(net, tmp_path / "weights.pt")  # the same pickle named as a card's weights
    (tmp_path / "card.json").write_text(json.dumps(
        {"name": "x", "architecture": "UNet", "arguments": UNET_ARGS, "weights": "weights.pt"}))
    with pytest.raises(EsegetaError) as e:
        load_model(tmp_path / "card.json")
    assert "arbitrary code" in one_line(e)


def test_state_dict_alone_needs_a_card(tmp_path):
    torch.save(make_unet_instancenorm_prelu().state_dict(), tmp_path / "sd.pth")
    with pytest.raises(EsegetaError) as e:
        load_model(tmp_path / "sd.pth")
    assert "model card" in one_line(e)


@pytest.mark.parametrize("name,content", [
    ("notes.pt", b"hello, I am not a model\n"),
    ("random.pt2", bytes(range(256)) * 8),
    ("image.ts", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
])
def test_not_a_model(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(EsegetaError) as e:
        load_model(tmp_path / name)
    assert "not a model" in one_line(e)


def test_bad_paths_and_cards(tmp_path):
    with pytest.raises(EsegetaError, match="not found"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(EsegetaError, match="folder"):
        load_model(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(EsegetaError, match="unknown model file type"):
        load_model(tmp_path / "m.onnx")
    cases = {
        "broken.json": "{not json",
        "list.json": "[1, 2]",
        "noarch.json": json.dumps({"name": "x"}),
        "unknown.json": json.dumps({"name": "x", "architecture": "NoSuchNet"}),
        "badargs.json": json.dumps({"name": "x", "architecture": "UNet", "arguments": {"bogus": 1}}),
        "badnorm.json": json.dumps({"name": "x", "architecture": "UNet", "normalization": "robust"}),
        "typo.json": json.dumps({"name": "x", "architecture": "UNet", "clases": ["a"]}),
        "noweights.json": json.dumps({"name": "x", "architecture": "UNet", "arguments": UNET_ARGS,
                                      "weights": "absent.pt"}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(EsegetaError) as e:
            load_model(tmp_path / name)
        one_line(e)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    path = write_card(tmp_path, make_unet_instancenorm_prelu(),
                      arguments={**UNET_ARGS, "channels": [4, 8, 16]})
    with pytest.raises(EsegetaError) as e:
        load_model(path)
    message = one_line(e)
    print(f"\n{message}")
    assert "do not fit UNet(spatial_dims=3, in_channels=1" in message and "('spatial_dims'" not in message
    # the size mismatch is named with both shapes, not filed under "unexpected"
    first = "model.0.conv.unit0.conv.weight (8, 1, 3, 3, 3) in the weights vs (4, 1, 3, 3, 3) in the network"
    assert "differ in shape: " + first in message and "unexpected" not in message and "missing" not in message
    assert "check the card's network arguments" in message


def test_weights_with_missing_and_unexpected_names(tmp_path):
    # a card without residual units: the weights' residual-path names are unexpected, its own missing
    path = write_card(tmp_path, make_unet_instancenorm_prelu(), arguments={**UNET_ARGS, "num_res_units": 0})
    with pytest.raises(EsegetaError) as e:
        load_model(path)
    message = one_line(e)
    print(f"\n{message}")
    assert "missing: " in message and "unexpected: " in message and " more" in message


def test_channel_count_is_checked(tmp_path):
    net = make_unet_instancenorm_prelu(in_channels=2)
    args = {**UNET_ARGS, "in_channels": 2}
    loaded = load_model(write_card(tmp_path, net, arguments=args, in_channels=2))
    with pytest.raises(EsegetaError) as e:
        loaded.network_for(volume(channels=1))
    assert "expects 2 input channel(s) but the volume has 1" in one_line(e)
    loaded.network_for(volume(channels=2))  # the right count passes


def test_card_round_trip(tmp_path):
    card = ModelCard(name="n", architecture="UNet", arguments=UNET_ARGS, normalization="minmax",
                     classes=["a", "b"])
    card.normalization = {"type": "minmax", "clip": False}
    card.write(tmp_path / "c.json")
    assert ModelCard.read(tmp_path / "c.json") == card
