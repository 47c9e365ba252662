"""Metrics against a ground-truth relevance mask, and where a cohort's relevance goes.

These need a mask of the voxels that really carry the evidence (the synthetic benchmark of
`EsegetaLib.groundtruth` records it; on real data a user ROI can stand in). Relevance mass and rank
in the mask are `localisation.relevance_mass/rank` with that mask as the reference.

- voxel average precision (VxAP; SE3D, Chiu et al. 2024): the average precision of ranking voxels by
  their attribution against the mask (scikit-learn's `average_precision_score`, the step-wise area
  under the precision-recall curve). A random map scores about the mask's share of the volume.
- pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop"): 1 if the
  voxel of highest attribution lies in the mask, dilated by `tolerance_mm`; else 0.
- topology-aware deletion: voxels are removed (set to the baseline) in order of attribution, and after
  each step the model's *segmentation* is compared with the unperturbed one by clDice (Shit et al.,
  CVPR 2021: the harmonic mean of the skeleton of one mask inside the other, both ways) and by its
  number of connected components. A faithful map breaks the segmented vessel tree quickly: a small
  area under the clDice curve.
- relevance shares (as Agg2Exp, WACV 2025, aggregates CT organ explanations): the share of absolute
  attribution inside the segmentation, in a band around its boundary, inside the reference mask, and
  outside all three (the sets may overlap; each share is of the whole map's absolute sum).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from ..errors import EsegetaError
from .context import MetricContext, attribution_tensor, batch_ranges
from .deletion import deletion_domain, domain_features, feature_ranks
from .localisation import RELEVANCE, _mask, undefined_note

SegmentFn = Callable[[torch.Tensor], np.ndarray]  # (N, C, *S) perturbed volumes -> (N, *S) bool masks


def _ranked_values(attribution, ctx: MetricContext, relevance: str) -> torch.Tensor:
    if relevance not in RELEVANCE:
        raise EsegetaError(f"relevance must be one of {', '.join(RELEVANCE)}; got {relevance!r}.")
    a = attribution_tensor(attribution, ctx).sum(0).double()
    return a if relevance == "positive" else a.abs()


def voxel_average_precision(attribution, ctx: MetricContext, mask=None, relevance: str = "positive") -> Dict[str, float]:
    """VxAP of the map against the mask (reference mask, else the explained region)."""
    from sklearn.metrics import average_precision_score

    m = _mask(ctx, mask)
    if not bool(m.any()) or bool(m.all()):
        return {"vxap": float("nan"), "vxap_note": f"the reference mask is {'empty' if not bool(m.any()) else 'full'}"}
    scores = _ranked_values(attribution, ctx, relevance)
    return {"vxap": float(average_precision_score(m.flatten().cpu().numpy(), scores.flatten().cpu().numpy()))}


def pointing_game(attribution, ctx: MetricContext, mask=None, relevance: str = "positive",
                  tolerance_mm: float = 0.0, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Dict[str, float]:
    """1.0 if the maximum of the map lies in the mask grown by `tolerance_mm` (ties: first voxel)."""
    m = _mask(ctx, mask).cpu().numpy()
    if tolerance_mm > 0:
        distance = ndimage.distance_transform_edt(~m, sampling=spacing)
        m = distance <= tolerance_mm
    scores = _ranked_values(attribution, ctx, relevance)
    if not bool(torch.isfinite(scores).all()) or float(scores.max()) == float(scores.min()):
        return {"pointing_game": float("nan"), "pointing_game_note": "the map is flat or not finite: it points nowhere"}
    index = np.unravel_index(int(torch.argmax(scores.flatten())), tuple(scores.shape))
    return {"pointing_game": float(bool(m[index]))}


def _skeleton(mask: np.ndarray) -> np.ndarray:
    from skimage.morphology import skeletonize

    return skeletonize(mask).astype(bool) if mask.any() else mask


def cl_dice(reference: np.ndarray, predicted: np.ndarray) -> float:
    """clDice (Shit et al. 2021): 2 Tprec Tsens / (Tprec + Tsens), Tprec = |S(P) & G| / |S(P)|,
    Tsens = |S(G) & P| / |S(G)|, S = skeleton (scikit-image). 1 for equal masks, 0 when either is empty."""
    reference, predicted = reference.astype(bool), predicted.astype(bool)
    if not reference.any() or not predicted.any():
        return 1.0 if not reference.any() and not predicted.any() else 0.0
    sp, sg = _skeleton(predicted), _skeleton(reference)
    t_prec = (sp & reference).sum() / max(1, sp.sum())
    t_sens = (sg & predicted).sum() / max(1, sg.sum())
    return 0.0 if t_prec + t_sens == 0 else float(2 * t_prec * t_sens / (t_prec + t_sens))


def topology_deletion(attribution, ctx: MetricContext, segment_fn: Optional[SegmentFn], n_steps: int = 10,
                      block: int = 1, max_fraction: float = 1.0, domain: str = "region", margin_mm: float = 2.0,
                      spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Dict[str, object]:
    """The clDice and component-count curves of the segmentation as top-attributed voxels are deleted.

    Steps are `n_steps` equal counts of features up to `max_fraction` of the deletion domain (as in
    `deletion`; default the explained region grown by `margin_mm`). The area under clDice over the
    fraction deleted is `topology_auc` (lower: the map finds what holds the vessel tree together)."""
    if segment_fn is None:
        raise EsegetaError("topology_deletion needs the model's segmentation of perturbed volumes; "
                           "run it through `evaluate` with a session.")
    a = attribution_tensor(attribution, ctx).sum(0)
    where = deletion_domain(ctx, domain, margin_mm, spacing)
    ranks = feature_ranks(a, int(block), where)
    n_features = domain_features(where, tuple(a.shape), int(block))
    counts = np.unique(np.round(np.linspace(0, n_features * float(max_fraction), int(n_steps) + 1)).astype(np.int64))
    x, b = ctx.inputs, ctx.baseline
    masks = []
    for start, stop in batch_ranges(len(counts), ctx.batch_size):
        ctx.check_cancel()
        ctx.report(start / len(counts), f"segmentations {start + 1}-{stop}/{len(counts)}")
        k = torch.as_tensor(counts[start:stop], device=ctx.device, dtype=torch.int32)
        changed = (ranks.unsqueeze(0) < k.view(-1, *([1] * ranks.dim()))).unsqueeze(1)
        masks.extend(np.asarray(segment_fn(torch.where(changed, b.unsqueeze(0), x.unsqueeze(0)))).astype(bool))
    reference = masks[0]
    cl = [cl_dice(reference, m) for m in masks]
    components = [int(ndimage.label(m)[1]) for m in masks]
    fractions = counts / n_features  # of the domain's features
    auc = float(np.trapezoid(cl, fractions)) if hasattr(np, "trapezoid") else float(np.trapz(cl, fractions))
    return {"topology_auc": auc,
            "curve": {"fraction": fractions.tolist(), "cldice": cl, "components": components, "block": int(block),
                      "domain": domain, "domain_voxels": int(a.numel() if where is None else where.sum())}}


def relevance_shares(attribution, ctx: MetricContext, segmentation=None, mask=None, band_mm: float = 1.0,
                     spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Dict[str, float]:
    """Shares of the map's absolute sum: in the segmentation, within `band_mm` of its boundary (both
    sides), in the reference mask (if any) and outside all of them."""
    a = attribution_tensor(attribution, ctx).sum(0).abs().double().cpu().numpy()
    total = float(a.sum())
    if total == 0.0:
        return {"share_segmentation": float("nan"), "share_boundary": float("nan"),
                "share_reference": float("nan"), "share_elsewhere": float("nan"),
                "relevance_shares_note": "the map is zero at every voxel"}
    seg = np.zeros(a.shape, bool) if segmentation is None else np.asarray(segmentation, bool)
    inside = ndimage.distance_transform_edt(seg, sampling=spacing)
    outside = ndimage.distance_transform_edt(~seg, sampling=spacing)
    # Voxel centres within band_mm of the boundary surface (half a voxel from the first shell).
    half = 0.5 * float(min(spacing))
    band = seg.any() & (((inside > 0) & (inside - half <= band_mm)) | ((outside > 0) & (outside - half <= band_mm)))
    out = {"share_segmentation": float(a[seg].sum()) / total, "share_boundary": float(a[band].sum()) / total}
    covered = seg | band
    reference = None if mask is None else np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, bool)
    if reference is not None:
        out["share_reference"] = float(a[reference].sum()) / total
        covered = covered | reference
    else:
        out["share_reference"] = float("nan")
    out["share_elsewhere"] = float(a[~covered].sum()) / total
    return out
