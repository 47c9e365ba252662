"""Small real pieces for the metric tests: bright-tube volumes, a briefly trained 3D net, a
whole-volume target score (the one-window case of the engine's patched score) and Captum
explanations of it."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def tube_volume(size: int = 24, n_tubes: int = 3, seed: int = 0, noise: float = 0.15):
    """(1, S, S, S) float32 volume with bright straight tubes (radius ~1.5 voxels) on a noisy,
    smoothly varying background, and the tube mask (S, S, S)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float64)
    mask = np.zeros((size,) * 3, bool)
    for _ in range(n_tubes):
        p = rng.uniform(size * 0.25, size * 0.75, 3)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        rel = grid - p
        dist = np.linalg.norm(rel - (rel @ d)[..., None] * d, axis=-1)
        mask |= dist < rng.uniform(1.2, 2.0)
    background = 0.2 * np.sin(grid[..., 0] / size * 3 + rng.uniform(0, 6)) * np.cos(grid[..., 1] / size * 2)
    vol = background + mask * 1.0 + rng.normal(0, noise, mask.shape)
    return vol[None].astype(np.float32), mask


def make_tube_net(seed: int = 0):
    """The conftest-style MONAI UNet (InstanceNorm + PReLU, the style of real vessel models)."""
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                num_res_units=1, norm="instance", act="prelu")


def train_tube_net(seed: int = 0, steps: int = 40, size: int = 16):
    """make_tube_net trained a few seconds (Adam, weighted cross-entropy) to segment tubes."""
    net = make_tube_net(seed)
    data = [tube_volume(size, seed=100 + k) for k in range(8)]
    xs = torch.from_numpy(np.stack([v for v, _ in data]))
    ys = torch.from_numpy(np.stack([m for _, m in data])).long()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    weight = torch.tensor([1.0, 5.0])  # tubes are a few % of voxels
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(xs), (4,))
        loss = nn.functional.cross_entropy(net(xs[idx]), ys[idx], weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


class RegionScore(nn.Module):
    """F(x) = sum over a fixed region of class c's logit (what the engine computes in one window)."""

    def __init__(self, net: nn.Module, region: np.ndarray, class_index: int = 1):
        super().__init__()
        self.net = net
        self.c = class_index
        self.register_buffer("region", torch.as_tensor(region, dtype=torch.float32))

    def forward(self, x):
        return (self.net(x)[:, self.c] * self.region).flatten(1).sum(1)


def score_fn_of(score: RegionScore):
    def score_fn(batch):
        with torch.no_grad():
            return score(batch).double()
    return score_fn


def captum_explain_fn(score: nn.Module, method: str, baseline: torch.Tensor = None, n_steps: int = 16):
    """x (C,*S) -> attribution (C,*S) with Captum on the whole-volume score."""
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    def explain(x):
        with torch.enable_grad():
            xb = x[None].detach().clone().requires_grad_(True)
            if method == "Saliency":
                a = Saliency(score).attribute(xb, abs=False)
            elif method == "InputXGradient":
                a = InputXGradient(score).attribute(xb)
            elif method == "IntegratedGradients":
                a = IntegratedGradients(score).attribute(xb, baselines=baseline[None], n_steps=n_steps,
                                                         internal_batch_size=n_steps)
            else:
                raise KeyError(method)
        return a[0].detach()
    return explain
