"""Helpers for the method tests: the engine's forward shape (sum of class-1 logit over a mask, mask as
a forward arg), synthetic volumes with structure, volume statistics, a context builder.

(A plain module, not a conftest.py: several test folders share the `conftest` module name.)"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from EsegetaLib.methods import MethodContext, VolumeStats, get_method


def _shared_conftest():
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("esegeta_testing_shared_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SHARED = _shared_conftest()
make_unet_instancenorm_prelu = _SHARED.make_unet_instancenorm_prelu
make_net_batchnorm_relu = _SHARED.make_net_batchnorm_relu
shared_file = _SHARED.shared_file


class MaskedLogitSum(torch.nn.Module):
    """F(x) = sum over voxels of weights * class-1 logit, one score per example, like the engine."""

    def __init__(self, network: torch.nn.Module, class_index: int = 1):
        super().__init__()
        self.network = network
        self.class_index = class_index

    def forward(self, x, weights):
        out = self.network(x)[:, self.class_index:self.class_index + 1]
        return (out * weights).flatten(1).sum(1)


def structured_volume(n: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """(1, C, n, n, n): a ramp, two blobs and noise (blurring it leaves large-scale structure)."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij")
    base = (0.3 * z + 2.0 * torch.exp(-((x - 0.2) ** 2 + (y + 0.1) ** 2) / 0.05)
            + 1.5 * torch.exp(-((z + 0.3) ** 2 + (x + 0.4) ** 2) / 0.03))
    chans = [base * (1 + 0.3 * c) + 0.2 * torch.randn(n, n, n, generator=g) for c in range(channels)]
    return torch.stack(chans)[None].float()


def stats_of(x: torch.Tensor, spacing=(1.0, 1.0, 1.0)) -> VolumeStats:
    a = x.detach().cpu().numpy()
    return VolumeStats(float(a.mean()), float(a.std()), float(np.percentile(a, 1)), float(np.percentile(a, 99)),
                       tuple(spacing), tuple(x.shape[2:]))


def roi_weights(x: torch.Tensor) -> torch.Tensor:
    """A central box covering ~1/8 of the volume, (B, 1, *S) (batch dimension for Captum's expansion)."""
    w = torch.zeros((x.shape[0], 1) + tuple(x.shape[2:]))
    sl = tuple(slice(n // 4, n // 4 + max(1, n // 2)) for n in x.shape[2:])
    w[(slice(None), slice(None)) + sl] = 1.0
    return w


def make_context(name, network, x, params=None, seed=0, internal_batch_size=4, region=True):
    """(spec, ctx) as the engine would build them for one window covering the volume."""
    spec = get_method(name)
    resolved = spec.resolve_params(params or {})
    stats = stats_of(x)
    prepared = spec.prepare(x, stats, resolved, torch.Generator().manual_seed(seed)) if spec.prepare else {}
    weights = roi_weights(x)
    forward = MaskedLogitSum(network)
    forward.training = False  # not .eval(): exported programs refuse train()/eval() calls
    ctx = MethodContext(forward=forward, network=network, inputs=x, params=resolved,
                        stats=stats, forward_args=(weights,), prepared=prepared,
                        region=weights[:1] if region else None, generator=torch.Generator().manual_seed(seed),
                        internal_batch_size=internal_batch_size)
    return spec, ctx


def run_method(spec, ctx):
    """attribute + finalize, as the engine does for one window; returns (map, diagnostics)."""
    out = spec.attribute(ctx)
    attr, diag = (out if isinstance(out, tuple) else (out, {}))
    if spec.finalize is not None:
        attr = spec.finalize(attr, ctx.params)
    return attr.detach(), diag
