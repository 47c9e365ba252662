"""Default layers for common architectures, named layers, upsampling; perturbation features and the
region restriction."""
import pytest
import torch
from torch import nn

from EsegetaLib.errors import EsegetaError
from EsegetaLib.methods.common import to_input_grid
from EsegetaLib.methods.features import CroppedForward, block_voxels, grid_mask, region_box, slic_mask
from EsegetaLib.methods.layers import resolve_layer
from method_helpers import (make_context, make_net_batchnorm_relu, make_unet_instancenorm_prelu, run_method,
                            stats_of, structured_volume)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _monai(name):
    from monai.networks import nets
    return {
        "UNet": lambda: make_unet_instancenorm_prelu(),
        "BasicUNet": lambda: nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)),
        "DynUNet": lambda: nets.DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2]),
        "SegResNet": lambda: nets.SegResNet(3, init_filters=8, in_channels=1, out_channels=2),
    }[name]().eval()


@pytest.mark.parametrize("arch, expected", [
    ("UNet", "model.1.submodule.2"),  # the decoder block at 1/2 resolution
    ("BasicUNet", "upcat_2"),  # the last up-block before full resolution
    ("DynUNet", "upsamples.0"),
    ("SegResNet", "up_samples.2.0"),
])
def test_default_layer_for_monai_networks(arch, expected):
    network = _monai(arch)
    x = torch.zeros(1, 1, 32, 32, 32)
    name, module = resolve_layer(network, None, x)
    assert name == expected
    shapes = {}

    def hook(module, args, out):
        shapes.setdefault("out", out.shape)

    module.register_forward_hook(hook)
    with torch.no_grad():
        network(x)
    assert max(shapes["out"][2:]) < 32  # at reduced resolution


def test_default_layer_for_sequential_and_non_downsampling_nets():
    assert resolve_layer(make_net_batchnorm_relu(), None)[0] == "6"  # the last half-resolution conv
    flat = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.GELU(), nn.Conv3d(4, 4, 3, padding=1), nn.GELU(),
                         nn.Conv3d(4, 2, 1))
    assert resolve_layer(flat, None)[0] == "2"  # the last conv before the 1x1 classifier


def test_named_layer_and_suggestion():
    net = make_unet_instancenorm_prelu()
    name, module = resolve_layer(net, "model.0.conv")
    assert module is dict(net.named_modules())["model.0.conv"]
    with pytest.raises(EsegetaError, match="Did you mean 'model.1.submodule.2'") as err:
        resolve_layer(net, "model.1.submodul.2")
    assert "\n" not in str(err.value)


def test_layer_maps_are_upsampled_and_shared_over_channels():
    layer_map = torch.arange(8, dtype=torch.float32).view(1, 1, 2, 2, 2)
    x = torch.zeros(1, 3, 4, 6, 8)
    out = to_input_grid(layer_map, x)
    assert out.shape == x.shape
    expected = torch.nn.functional.interpolate(layer_map, size=(4, 6, 8), mode="trilinear", align_corners=False)
    torch.testing.assert_close(out.sum(dim=1, keepdim=True), expected)
    network = make_unet_instancenorm_prelu(in_channels=2)
    x = structured_volume(16, 2)
    spec, ctx = make_context("GradCAM", network, x, {"layer": "model.0.conv"})
    attr = run_method(spec, ctx)[0]
    assert attr.shape == x.shape and torch.equal(attr[:, 0], attr[:, 1])


def test_grid_blocks_in_mm_and_fraction():
    x = structured_volume(16)
    stats = stats_of(x, spacing=(0.5, 1.0, 2.0))
    assert block_voxels(stats, {"block_mm": 4.0}) == (8, 4, 2)
    assert block_voxels(stats, {"block_mm": 0.0, "block_fraction": 0.25}) == (4, 4, 4)
    mask = grid_mask((16, 16, 16), (8, 4, 2))
    assert mask.shape == (1, 1, 16, 16, 16) and int(mask.max()) + 1 == 2 * 4 * 8
    assert torch.equal(torch.bincount(mask.flatten()), torch.full((64,), 64))


def test_slic_supervoxels_follow_the_volume():
    x = torch.zeros(1, 1, 16, 16, 16)
    x[..., :8, :, :] = 1.0  # two halves
    stats = stats_of(x)
    mask = slic_mask(x, stats, {"block_fraction": 0.5, "slic_compactness": 0.01})[0, 0]
    assert int(mask.max()) + 1 == len(torch.unique(mask))  # consecutive ids
    for label in torch.unique(mask):  # no supervoxel straddles the edge
        assert len(torch.unique(x[0, 0][mask == label])) == 1


def test_region_restriction_crops_and_pastes():
    network = make_unet_instancenorm_prelu()
    x = structured_volume(16)
    spec, ctx = make_context("FeatureAblation", network, x, {"block_fraction": 0.25, "margin_mm": 1.0})
    box = region_box(ctx)
    assert box == (slice(3, 13),) * 3  # region 4..11 plus a 1 mm (1 voxel) margin
    cropped = CroppedForward(ctx.forward, x, box)
    with torch.no_grad():
        torch.testing.assert_close(cropped(x[(slice(None), slice(None)) + box], *ctx.forward_args),
                                   ctx.forward(x, *ctx.forward_args))
    attr = run_method(spec, ctx)[0]
    outside = torch.ones_like(attr, dtype=torch.bool)
    outside[(slice(None), slice(None)) + box] = False
    assert float(attr[outside].abs().max()) == 0.0 and float(attr[~outside].abs().max()) > 0
