"""Helpers for the engine tests: method specs written directly on Captum (so the engine is tested
independently of the catalogue), an independent one-graph reference of the blended model (MONAI's
`sliding_window_inference`), and a small vessel-like model trained in seconds."""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, Occlusion, Saliency
from torch import nn

from EsegetaLib.methods.base import MethodSpec, ParamSpec


def _saliency(ctx):
    return Saliency(ctx.forward).attribute(ctx.inputs, additional_forward_args=ctx.forward_args, abs=False)


def _ig(ctx):
    attr, delta = IntegratedGradients(ctx.forward).attribute(
        ctx.inputs, baselines=ctx.prepared["baselines"], additional_forward_args=ctx.forward_args,
        n_steps=ctx.params["n_steps"], internal_batch_size=ctx.internal_batch_size * ctx.inputs.shape[0],
        return_convergence_delta=True)
    return attr, {"convergence_delta": delta}


def _low_baseline(x_full, stats, params, generator):
    return {"baselines": torch.full_like(x_full, stats.low)}


def _occlusion(ctx):
    size = ctx.params["block"]
    window = (ctx.inputs.shape[1], size, size, size)
    return Occlusion(ctx.forward).attribute(ctx.inputs, sliding_window_shapes=window, strides=window,
                                            baselines=float(ctx.stats.low), perturbations_per_eval=4)


SALIENCY = MethodSpec("TestSaliency", "gradient", True, False, False, 1.0, "additive", (), _saliency)
IG = MethodSpec("TestIG", "gradient", True, True, False, 8.0, "additive",
                (ParamSpec("n_steps", "int", 8, minimum=1),), _ig, prepare=_low_baseline)
OCCLUSION = MethodSpec("TestOcclusion", "perturbation", True, False, False, 50.0, "global",
                       (ParamSpec("block", "int", 4, minimum=1),), _occlusion)


class OneGraphF(nn.Module):
    """F(x) = sum_v region * blended class-c logit, the blended model built by MONAI in one graph
    (after padding at the end with `pad_mode`, like the engine when the volume is small)."""

    def __init__(self, net, class_index: int, region, patch: Sequence[int], overlap: float = 0.25,
                 padded_shape=None, pad_mode: str = "replicate"):
        super().__init__()
        self.net, self.c, self.patch, self.overlap = net, class_index, tuple(patch), overlap
        self.register_buffer("region", torch.as_tensor(np.asarray(region, dtype=np.float64)))
        self.padded_shape, self.pad_mode = padded_shape, pad_mode

    def forward(self, x):
        from monai.inferers import sliding_window_inference

        shape = x.shape[2:]
        if self.padded_shape is not None:
            extra = [p - s for p, s in zip(self.padded_shape, shape)]
            x = F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]), mode=self.pad_mode)
        out = sliding_window_inference(x, self.patch, 4, lambda p: self.net(p)[:, self.c:self.c + 1],
                                       overlap=self.overlap, mode="gaussian", sigma_scale=0.125)
        out = out[:, 0, :shape[0], :shape[1], :shape[2]]
        return (out * self.region.to(out.dtype)).flatten(1).sum(1)


def tube_volume(shape=(32, 32, 32), seed: int = 0, n_tubes: int = 4):
    """Bright curved tubes on a darker noisy background, and their mask (a vessel-like toy)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n_tubes):
        start, direction = rng.uniform(0, 1, 3) * np.array(shape), rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        bend, radius = rng.normal(size=3) * 0.01, rng.uniform(1.2, 2.5)
        offsets = grid - start
        t = offsets @ direction
        centre = start + t[..., None] * direction + (t[..., None] ** 2) * bend
        mask |= np.linalg.norm(grid - centre, axis=-1) < radius
    image = 0.3 + 0.05 * rng.standard_normal(shape) + 0.6 * mask
    return image.astype(np.float32), mask


@functools.lru_cache(maxsize=1)
def trained_tube_unet(steps: int = 80):
    """A small InstanceNorm+PReLU UNet trained for a few seconds to segment the tubes."""
    from conftest import make_unet_instancenorm_prelu

    torch.manual_seed(0)
    net = make_unet_instancenorm_prelu().train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(steps):
        image, mask = tube_volume((24, 24, 24), seed=100 + step, n_tubes=3)
        x = torch.from_numpy(image)[None, None]
        y = torch.from_numpy(mask.astype(np.int64))[None]
        loss = F.cross_entropy(net(x), y, weight=torch.tensor([1.0, 3.0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def pearson(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1])


def relative_l2(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
