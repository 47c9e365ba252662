"""Model-parameter randomisation sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps").

The network's parameterised layers are re-initialised one by one from the output side (cascading:
every stage keeps the layers randomised before it), the map is recomputed on the randomised copy,
and compared with the original by Spearman rank correlation and SSIM. A map that explains the model
must change once the model is gone; one that barely changes (an edge detector, the input itself)
fails.

Layer order and re-initialisation follow Quantus' MPRT (`named_modules` that define
`reset_parameters`, reversed; the RNG seeded with seed + 1 before each reset) so the test can use
Quantus as the reference, except that modules without parameters of their own (non-affine norms)
are skipped: re-initialising them changes nothing and would only cost attributions. Modules
without `reset_parameters` (TorchScript submodules, exported programs) are redrawn tensor by tensor
with the same default initialisation (`redraw_parameters`), so the check runs on every model format.

Pass/fail: the map of the fully randomised network must have |Spearman rho| < `threshold` (0.5) with
the original, on the signed maps. Why signed: the sign says whether a voxel is evidence for or
against the class, and a network with random weights has no consistent evidence, so a map that
explains the model must lose its sign pattern. Magnitudes of input-times-gradient maps (IG,
InputXGradient) keep the |x - baseline| structure by construction whatever the weights (Adebayo et
al. saw this too); the absolute-value Spearman and the SSIM are reported beside the flag for that
reading. Why 0.5: by Cohen's convention |rho| >= 0.5 is a strong association; a map that still
shares that much rank order with the original after every weight was redrawn depends more on the
input than on the model. Measured on a trained tube UNet (Testing/metrics): the input itself 1.0,
Saliency 0.05, InputXGradient 0.06, Integrated Gradients 0.04.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import EsegetaError
from .context import ExplainFn, MetricContext, attribution_tensor


def randomisable_layers(network: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """Modules with parameters of their own, output side first: those with `reset_parameters`
    (eager PyTorch) and those without (TorchScript submodules, exported programs), which
    `redraw_parameters` re-initialises tensor by tensor."""
    layers = [
        (name, module)
        for name, module in network.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    return layers[::-1]


@torch.no_grad()
def redraw_parameters(module: torch.nn.Module) -> None:
    """Re-initialise a module's own parameters tensor by tensor, as PyTorch's `reset_parameters` of
    the common layers does, for modules that lack it (TorchScript keeps parameters, not methods):
    weights with >= 2 dims ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the bound of nn.Conv/nn.Linear's
    kaiming_uniform(a=sqrt(5))), their biases from the same bound; 1-dim weights of norm layers 1 and
    biases 0, PReLU slopes 0.25 (their reset values)."""
    params = dict(module.named_parameters(recurse=False))
    kind = getattr(module, "original_name", type(module).__name__)
    bound = None
    for value in params.values():
        if value.dim() >= 2:
            fan_in = value.shape[1] * int(torch.tensor(value.shape[2:]).prod()) if value.dim() > 2 else value.shape[1]
            bound = 1.0 / max(1.0, float(fan_in)) ** 0.5
            break
    for name, value in params.items():
        if value.dim() >= 2 or (bound is not None and name.endswith("bias")):
            value.uniform_(-bound, bound)
        elif kind == "PReLU":
            value.fill_(0.25)
        elif name.endswith("bias"):
            value.zero_()
        else:
            value.fill_(1.0)


def randomised_copies(network: torch.nn.Module, seed: int = 0):
    """Yield (layer name, network copy) with one more layer re-initialised each time (cascading)."""
    model = copy.deepcopy(network)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    for name, module in randomisable_layers(model):
        with torch.random.fork_rng(devices=devices):  # leave the caller's global RNG untouched
            torch.manual_seed(seed + 1)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                redraw_parameters(module)
        yield name, model


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    v = v.flatten()
    sorted_v, order = torch.sort(v, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2  # mean of start+1 .. end
    ranks = torch.empty_like(avg[inverse])
    ranks[order] = avg[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(torch.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: Optional[float] = None, win_size: int = 7) -> float:
    """Mean SSIM of two 3-D maps with skimage's defaults (uniform 7^3 window, K1=0.01, K2=0.03,
    sample covariance, border of win_size//2 excluded), in torch so it runs on the GPU.
    Valid (unpadded) box filtering gives exactly skimage's cropped interior."""
    a, b = a.double()[None, None], b.double()[None, None]
    if min(a.shape[2:]) < win_size:
        return float("nan")
    if data_range is None:
        data_range = float(torch.max(a.max(), b.max()) - torch.min(a.min(), b.min()))
    if data_range == 0:
        return float("nan")
    kernel = torch.full((1, 1, win_size, win_size, win_size), 1.0 / win_size ** 3, dtype=a.dtype, device=a.device)
    n = win_size ** 3
    cov_norm = n / (n - 1.0)

    def box(t):
        return F.conv3d(t, kernel)

    ux, uy = box(a), box(b)
    vx = cov_norm * (box(a * a) - ux * ux)
    vy = cov_norm * (box(b * b) - uy * uy)
    vxy = cov_norm * (box(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _normalise_by_max(m: torch.Tensor) -> torch.Tensor:
    peak = m.abs().max()
    return m / peak if float(peak) > 0 else m


def compare_maps(original: torch.Tensor, other: torch.Tensor,
                 within: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Spearman (absolute and signed) and SSIM of |maps| scaled to max 1, as Quantus' MPRT does;
    the rank correlations over the voxels of `within` (bool) when given, SSIM over the whole map."""
    oa, ob = _normalise_by_max(original.abs()), _normalise_by_max(other.abs())
    pick = (lambda t: t[within]) if within is not None else (lambda t: t)
    return {"spearman": spearman(pick(oa), pick(ob)), "spearman_signed": spearman(pick(original), pick(other)),
            "ssim": ssim(oa, ob)}


def neighbourhood(region: torch.Tensor, margin: int) -> torch.Tensor:
    """The region dilated by `margin` voxels (a cube), as a bool mask."""
    if margin <= 0:
        return region.bool()
    grown = torch.nn.functional.max_pool3d(region.float()[None, None], 2 * margin + 1, stride=1, padding=margin)
    return grown[0, 0] > 0


def parameter_randomisation(attribution, ctx: MetricContext, network: torch.nn.Module,
                            make_explain_fn: Callable[[torch.nn.Module], ExplainFn],
                            max_stages: Optional[int] = 8, threshold: float = 0.5,
                            within: str = "volume", margin: int = 2) -> Dict[str, object]:
    """Cascading randomisation. `make_explain_fn(net)` gives the method's explain function on a
    network copy (same target, same region). `max_stages` evaluates at most that many evenly
    spaced stages (always the last, fully randomised one); None evaluates every layer.

    within="volume" ranks every voxel (Quantus' MPRT). within="region" ranks only the reference
    region dilated by `margin` voxels: for a score summed over a region, the gradient magnitude of
    ANY convolutional network peaks in that region's receptive field, so a whole-volume rank
    correlation mostly measures the region's geometry (on the bundled model Saliency gave 0.955
    over the volume, -0.03 within the region)."""
    if within not in ("volume", "region"):
        raise EsegetaError(f"randomisation 'within' must be 'volume' or 'region'; got {within!r}.")
    mask = None
    if within == "region":
        if ctx.region is None or not bool(ctx.region.any()):
            raise EsegetaError("randomisation within='region' needs a non-empty reference region.")
        mask = neighbourhood(ctx.region.to(ctx.inputs.device), int(margin))
    a = attribution_tensor(attribution, ctx).sum(0)
    layers = randomisable_layers(network)
    if not layers:
        return {"randomisation_spearman": float("nan"), "randomisation_ssim": float("nan"),
                "randomisation_pass": None, "stages": [],
                "randomisation_note": "the network has no parameters that could be redrawn"}
    n = len(layers)
    if max_stages is None or max_stages >= n:
        chosen = set(range(n))
    else:
        step = n / max(1, int(max_stages))
        chosen = {min(n - 1, int(round((k + 1) * step)) - 1) for k in range(int(max_stages))} | {n - 1}
    stages: List[Dict[str, object]] = []
    for index, (name, model) in enumerate(randomised_copies(network, ctx.seed)):
        ctx.check_cancel()
        if index not in chosen:
            continue
        ctx.report(len(stages) / max(1, len(chosen)), f"stage {len(stages) + 1}/{len(chosen)} (layers up to {name})")
        e = attribution_tensor(make_explain_fn(model)(ctx.inputs), ctx).sum(0)
        stages.append({"stage": index + 1, "layer": name, **compare_maps(a, e, mask)})
    last = stages[-1]
    rho = last["spearman_signed"]
    passed = None if rho != rho else bool(abs(rho) < threshold)
    out = {"randomisation_spearman": last["spearman"], "randomisation_spearman_signed": last["spearman_signed"],
           "randomisation_ssim": last["ssim"], "randomisation_pass": passed, "stages": stages}
    if passed is None:  # a rank correlation with a constant map is undefined: say which map
        where = "the compared voxels" if mask is not None else "the volume"
        flat = [name for name, t in (("the original map", a), ("the fully randomised network's map", e))
                if bool((t if mask is None else t[mask]).unique().numel() <= 1)]
        out["randomisation_note"] = (f"{' and '.join(flat) or 'a map'} is constant over {where} "
                                     f"(e.g. a rectified CAM that is zero there), so the rank correlation is undefined")
    return out
