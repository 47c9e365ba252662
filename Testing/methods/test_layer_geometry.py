"""Layer maps land where the layer's units sit on the input grid (#11 item 7): a stride-2
convolution's unit o is centred on input voxel 2o, not 2o + 0.5 as align_corners=False assumes."""
import numpy as np
import torch
from torch import nn

from EsegetaLib.api import explain
from EsegetaLib.methods.common import resample_layer_map
from EsegetaLib.methods.layers import layer_geometry
from EsegetaLib.options import EngineOptions, Target


def _centroid(volume: np.ndarray) -> np.ndarray:
    weights = np.clip(volume, 0, None)
    grids = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    return np.array([(g * weights).sum() / weights.sum() for g in grids])


class _StrideTwo(nn.Module):
    """conv k3 s2 p1 (the layer: its centre tap copies the input) -> upsample -> 1x1 classifier."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.head = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return self.head(self.up(self.layer(x)))


def _centre_tap_conv():
    conv = nn.Conv3d(1, 1, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1, 1] = 1.0
    return conv


def test_geometry_of_strided_modules():
    x = torch.zeros(1, 1, 16, 16, 16)
    conv = _centre_tap_conv()
    assert layer_geometry(_StrideTwo(conv), conv, x) == ((2.0, 0.0),) * 3
    pool = nn.AvgPool3d(2)
    assert layer_geometry(_StrideTwo(pool), pool, x) == ((2.0, 0.5),) * 3
    transposed = nn.Sequential(_centre_tap_conv(), nn.ConvTranspose3d(1, 1, 2, stride=2))
    assert layer_geometry(transposed, transposed[1], x) == ((1.0, -0.5),) * 3


def test_single_feature_lands_within_quarter_voxel():
    layer_map = torch.zeros(1, 1, 8, 8, 8)
    layer_map[0, 0, 3, 2, 5] = 1.0
    placed = resample_layer_map(layer_map, (16, 16, 16), ((2.0, 0.0),) * 3)[0, 0].numpy()
    assert np.abs(_centroid(placed) - np.array([6, 4, 10])).max() <= 0.25
    naive = resample_layer_map(layer_map, (16, 16, 16), None)[0, 0].numpy()  # align_corners=False
    assert np.abs(_centroid(naive) - np.array([6.5, 4.5, 10.5])).max() <= 0.25  # the half-voxel shift fixed


def test_engine_layer_map_of_stride_two_conv_on_the_active_voxel():
    """End to end: an input impulse at voxel v = (6, 4, 10) activates exactly one unit of the
    stride-2 layer; its LayerActivation map, brought to the input grid, is centred on v."""
    volume = np.zeros((16, 16, 16), np.float32)
    volume[6, 4, 10] = 1.0
    conv = _centre_tap_conv()
    expl = explain(volume, _StrideTwo(conv).eval(), [("LayerActivation", {"layer": "layer"})],
                   target=Target(region="whole"), options=EngineOptions(device="cpu", divisor=2))
    result = expl.results["LayerActivation"]
    assert result.diagnostics["layer_geometry"] == [[2.0, 0.0]] * 3
    assert np.abs(_centroid(result.map) - np.array([6, 4, 10])).max() <= 0.25
