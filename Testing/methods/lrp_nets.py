"""Networks and the zennit reference for the LRP tests (a plain module shared by test_lrp*.py).

zennit (LGPL-3.0) is called, never copied.  Its package `__init__` imports `zennit.torchvision`
(canonizers for torchvision's ResNet/VGG), which needs torchvision; Testing/conftest.py registers
the package without that `__init__` where torchvision cannot load, and the submodules used here
(rules, composites, canonizers) do not import torchvision.  Tests skip when zennit is not installed at all."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn


def import_zennit():
    """(rules, composites, canonizers) modules of zennit; skips the test when it is not installed.
    (Testing/conftest.py makes `import zennit` work where torchvision cannot load.)"""
    if importlib.util.find_spec("zennit") is None:
        pytest.skip("zennit is not installed (pip install zennit; the test extra has it)")
    from zennit import canonizers, composites, rules
    return rules, composites, canonizers


def _block(cin: int, cout: int, bias: bool) -> nn.Sequential:
    # eps=0: zennit's MergeBatchNorm leaves the BatchNorm computing x / sqrt(1 + eps) (running_var set to
    # 1, eps kept), so its reference equals the merged network exactly only with eps = 0
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm3d(cout, eps=0.0), nn.ReLU())


class BatchNormUNet(nn.Module):
    """A two-level 3D UNet with BatchNorm + ReLU blocks and concatenation skips: max and average
    pooling down, trilinear upsampling and a transposed convolution up, a 1x1x1 head."""

    def __init__(self, features: int = 4, bias: bool = True, in_channels: int = 1, out_channels: int = 2):
        super().__init__()
        f = features
        self.enc1 = _block(in_channels, f, bias)
        self.down1 = nn.MaxPool3d(2)
        self.enc2 = _block(f, 2 * f, bias)
        self.down2 = nn.AvgPool3d(2)
        self.bottom = _block(2 * f, 2 * f, bias)
        self.up2 = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.dec2 = _block(4 * f, 2 * f, bias)
        self.up1 = nn.ConvTranspose3d(2 * f, f, 2, stride=2, bias=bias)
        self.dec1 = _block(2 * f, f, bias)
        self.head = nn.Conv3d(f, out_channels, 1, bias=bias)

    def decoder(self, x):
        """The two decoder levels' outputs (d2, d1)."""
        e1 = self.enc1(x)
        e2 = self.enc2(self.down1(e1))
        b = self.bottom(self.down2(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        return d2, self.dec1(torch.cat([self.up1(d2), e1], 1))

    def forward(self, x):
        return self.head(self.decoder(x)[1])


def make_batchnorm_unet(bias: bool = True, seed: int = 0) -> BatchNormUNet:
    """float64, eval; BatchNorm statistics and scales randomised (bias-free: running mean and BatchNorm
    bias zero, so no layer has an offset and LRP-epsilon must conserve relevance)."""
    torch.manual_seed(seed)
    net = BatchNormUNet(bias=bias)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(-0.5, 1.5)  # some negative scales: the merge must flip those channels
                if bias:
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.bias.uniform_(-0.1, 0.1)
    return net.eval().double()


def zennit_lrp(net: nn.Module, x: torch.Tensor, top: torch.Tensor, rule: str, epsilon: float = 1e-9,
               gamma: float = 0.25, alpha: float = 2.0, beta: float = 1.0) -> torch.Tensor:
    """zennit's relevance of x for output relevance top * net(x): `rule` on every convolution (composite:
    epsilon on `head`, gamma elsewhere), ReLU passes, pooling by averaging and upsampling by zennit's
    Norm rule (LRP-0 of a parameter-free linear map), BatchNorm merged by SequentialMergeBatchNorm."""
    rules, composites, canonizers = import_zennit()
    make = {"epsilon": lambda: rules.Epsilon(epsilon=epsilon),
            "gamma": lambda: rules.Gamma(gamma=gamma, stabilizer=epsilon),
            "alpha_beta": lambda: rules.AlphaBeta(alpha=alpha, beta=beta, stabilizer=epsilon)}
    name_map = []
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            kind = ("epsilon" if name == "head" else "gamma") if rule == "composite" else rule
            name_map.append(((name,), make[kind]()))
        elif isinstance(module, nn.ReLU):
            name_map.append(((name,), rules.Pass()))
        elif isinstance(module, (nn.AvgPool3d, nn.Upsample)):
            name_map.append(((name,), rules.Norm(stabilizer=1e-30)))
    composite = composites.NameMapComposite(name_map=name_map, canonizers=[canonizers.SequentialMergeBatchNorm()])
    xx = x.detach().clone().requires_grad_(True)
    with composite.context(net) as modified:
        out = modified(xx)
        relevance, = torch.autograd.grad(out, xx, top * out.detach())
    return relevance.detach()
