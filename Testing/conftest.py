"""Shared fixtures: small real 3D networks and the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Precision 'auto' (the default) picks bf16 on CPUs with native bf16 (EsegetaLib.device.native_bf16).
# Pin the capability answer to "no" so that every test computes the same numbers on any CI CPU
# (subprocesses inherit it); the precision tests set it explicitly. Export 1 to run the suite in bf16.
os.environ.setdefault("ESEGETA_NATIVE_BF16", "0")
SHARED_DATA = Path(os.environ.get("ESEGETA_SHARED_DATA", REPO.parent / "shared" / "data"))


def _zennit_without_its_torchvision_part() -> None:
    """Let `import zennit` work where torchvision cannot load.

    zennit (the LRP tests' reference; quantus imports it too whenever it is installed) imports
    `zennit.torchvision` from its package `__init__`, which needs torchvision. Next to the CPU torch
    used here there is no torchvision that loads (PyPI's build fails with "operator torchvision::nms
    does not exist"), so `import zennit`, and with it `import quantus`, would fail. The package is
    then registered without running that `__init__`; its other submodules do not use torchvision.
    """
    import importlib.util
    import sys

    spec = importlib.util.find_spec("zennit")
    if spec is None:
        return
    try:
        import zennit  # noqa: F401
    except Exception:  # noqa: BLE001 - torchvision absent, or a build that does not match torch
        for key in [k for k in sys.modules if k == "zennit" or k.startswith("zennit.")]:
            del sys.modules[key]
        sys.modules["zennit"] = importlib.util.module_from_spec(spec)


_zennit_without_its_torchvision_part()


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not available: {path} (only present beside the dev checkout)")
    return path


def vessel_tubes(shape, centres, radius, seed=0):
    """Bright straight tubes along K with a partial-volume edge and mild noise, TOF-like intensities
    (the bundled vessel model segments them, placing each wall itself): float32 (I, J, K)."""
    import numpy as np

    g = np.indices(shape).astype(np.float32)
    vol = np.full(shape, 0.28, np.float32)
    for a, b in centres:
        r = np.sqrt((g[0] - a) ** 2 + (g[1] - b) ** 2)
        vol += 0.7 * np.clip(radius + 0.5 - r, 0, 1)
    vol += 0.02 * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return vol * 1000


def make_unet_instancenorm_prelu(in_channels: int = 1, out_channels: int = 2, seed: int = 0):
    """MONAI UNet with InstanceNorm + PReLU (the style of real vessel models); 2 poolings -> divisor 4."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
               channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="instance", act="prelu")
    return net.eval()


def make_net_batchnorm_relu(in_channels: int = 1, out_channels: int = 2, seed: int = 0):
    """A small conv net with BatchNorm + nn.ReLU, a down/up path (divisor 2)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv3d(in_channels, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
        nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.Conv3d(16, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
        nn.Conv3d(16, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
        nn.Conv3d(8, out_channels, 1),
    )
    # Non-trivial running statistics so eval-mode BatchNorm is not the identity.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def unet_in_prelu():
    return make_unet_instancenorm_prelu()


@pytest.fixture
def net_bn_relu():
    return make_net_batchnorm_relu()
