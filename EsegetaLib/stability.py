"""Explanation stability under test-time augmentation: where is the explanation itself uncertain?

`--stability flips` reruns the model and each method on the volume mirrored along every
combination of the three axes (8 volumes, the identity included), each map mirrored back onto the
input grid; `--stability noise:N[:F]` on N copies with Gaussian noise of F x the volume's standard
deviation added (default F = 0.05), each drawn from the run's seed.  For every method:

    mean map  m = mean_a T_a^-1(map_a)          coefficient of variation  cv = std_a / |m|

(std with the population convention, 1/n; cv is 0 where the maps agree and where m = 0 as well, and
|m| is floored at 1e-6 of max |m| so that near-zero means do not divide by zero).  For the
prediction: the mean of the augmented class probabilities mapped back, and its entropy
H = -sum_c p_c ln p_c (nats) per voxel.

Every augmented run explains the same question: the target's fixed (signed) region is mapped with
the volume and given to the model as a region of interest, so a mirrored 'predicted' target is the
original prediction mirrored, not the model's prediction on the mirrored volume.  One target per
run: several targets are refused (run them one by one).  A mirror of an equivariant model (e.g.
symmetric kernels) returns the plain map exactly; a CNN learned on one orientation generally does
not, which is what the maps show.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import EsegetaError

NOISE_FRACTION = 0.05  # default noise stdev, a fraction of the volume's standard deviation
CV_FLOOR = 1e-6  # |mean| floored at this fraction of max |mean| in the coefficient of variation
STABILITY_TOLERANCE = 0.5  # median cv inside the region above which the trust check warns


@dataclass(frozen=True)
class StabilitySpec:
    """kind: 'flips' | 'noise'; samples: noise draws; fraction: noise stdev / volume stdev."""
    kind: str
    samples: int = 8
    fraction: float = NOISE_FRACTION

    @property
    def label(self) -> str:
        return "flips" if self.kind == "flips" else f"noise:{self.samples}:{self.fraction:g}"


def parse_stability(text: Optional[str]) -> Optional[StabilitySpec]:
    """'flips' | 'noise:N' | 'noise:N:F' -> StabilitySpec; None / '' / 'none' -> None."""
    if text is None or str(text).strip().lower() in ("", "none", "off"):
        return None
    parts = str(text).strip().lower().split(":")
    if parts == ["flips"]:
        return StabilitySpec("flips")
    if parts[0] == "noise" and len(parts) in (2, 3):
        try:
            samples = int(parts[1])
            fraction = float(parts[2]) if len(parts) == 3 else NOISE_FRACTION
        except ValueError:
            samples, fraction = 0, -1.0
        if samples >= 1 and fraction >= 0.0:
            return StabilitySpec("noise", samples, fraction)
    raise EsegetaError(f"--stability '{text}' is not 'flips', 'noise:N' or 'noise:N:F' (N draws >= 1, "
                       "F = noise stdev as a fraction of the volume's, default 0.05).")


@dataclass
class Augmentation:
    """forward: (C, I, J, K) volume -> augmented volume; inverse: a (..., I, J, K) map -> the input grid."""
    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]
    region: Callable[[np.ndarray], np.ndarray]  # the (I, J, K) target region carried along


def _flip(axes: Tuple[int, ...]):
    def apply(a: np.ndarray) -> np.ndarray:
        if not axes:
            return a
        return np.ascontiguousarray(np.flip(a, axis=tuple(a.ndim - 3 + ax for ax in axes)))
    return apply


def augmentations(spec: Optional[StabilitySpec], volume: np.ndarray, seed: int = 0) -> List[Augmentation]:
    """The augmented runs of `spec` for a (C, I, J, K) volume; None: the identity alone."""
    identity = lambda a: a  # noqa: E731
    if spec is None:
        return [Augmentation("identity", identity, identity, identity)]
    if spec.kind == "flips":
        out = []
        for n in range(4):
            for axes in itertools.combinations(range(3), n):
                f = _flip(axes)
                name = "identity" if not axes else "flip_" + "".join("IJK"[a] for a in axes)
                out.append(Augmentation(name, f, f, f))
        return out
    rng = np.random.default_rng(int(seed))
    sigma = float(spec.fraction) * float(np.std(volume))
    out = []
    for i in range(spec.samples):
        noise = (rng.standard_normal(volume.shape) * sigma).astype(volume.dtype)
        out.append(Augmentation(f"noise_{i}", lambda a, e=noise: a + e, identity, identity))
    return out


def mean_and_cv(maps: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """(mean, coefficient of variation) over maps of one shape, float32 (see the module docstring)."""
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in maps])
    mean = stack.mean(axis=0)
    std = stack.std(axis=0)
    same = (stack == stack[0]).all(axis=0)  # identical maps: exactly the map and 0 (no rounding of the mean)
    mean[same], std[same] = stack[0][same], 0.0
    scale = np.abs(mean)
    floor = CV_FLOOR * float(scale.max()) if scale.size and scale.max() > 0 else 1.0
    cv = np.where(std > 0, std / np.maximum(scale, floor), 0.0)
    return mean.astype(np.float32), cv.astype(np.float32)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """-sum_c p_c ln p_c over axis 0 (nats), float32; a one-channel (sigmoid) map uses p and 1 - p."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape[0] == 1:
        p = np.concatenate([p, 1.0 - p])
    p = np.clip(p, 1e-12, 1.0)
    return (-(p * np.log(p)).sum(axis=0)).astype(np.float32)


@dataclass
class StabilityResult:
    spec_label: str
    augmentations: List[str]
    maps: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # method -> (mean, cv) (I,J,K)
    mean_probabilities: Optional[np.ndarray] = None  # (n_classes, I, J, K)
    prediction_entropy: Optional[np.ndarray] = None  # (I, J, K)

    def summary(self, region: np.ndarray) -> Dict[str, Any]:
        """JSON-ready figures: median cv inside the region per method, mean entropy inside/outside."""
        region = np.asarray(region, dtype=bool)
        out: Dict[str, Any] = {"augmentation": self.spec_label, "runs": list(self.augmentations), "methods": {}}
        for name, (_, cv) in self.maps.items():
            out["methods"][name] = {"median_cv_in_region": float(np.median(cv[region])) if region.any() else None}
        if self.prediction_entropy is not None:
            h = self.prediction_entropy
            out["prediction_entropy_mean_in_region"] = float(h[region].mean()) if region.any() else None
            out["prediction_entropy_mean"] = float(h.mean())
        return out


def _augmented_target(target, sign: np.ndarray):
    """The target as a fixed signed region of interest (the region carried with the volume)."""
    return dataclasses.replace(target, region="roi", mask=sign, masks=None, mask_names=None, point=None,
                               boundary_mm=None, geodesic_mm=None, classes=None)


def run_stability(session, network_for: Callable[[np.ndarray], Any], methods: Sequence[Tuple[str, Dict[str, Any]]],
                  spec: Optional[StabilitySpec], progress: Optional[Callable[[float, str], None]] = None
                  ) -> StabilityResult:
    """Rerun `methods` [(name, params)] under the augmentations of `spec` (None: the identity alone),
    each in its own engine session on the augmented volume with the session's target region carried
    along; `network_for(volume)` gives the network for a volume (a model's preprocessing may depend
    on it).  Returns the mean and cv map of every method and the prediction's mean and entropy."""
    from .engine import ExplainSession

    if len(session.targets) > 1:
        raise EsegetaError("--stability explains one target at a time; run each class or component separately "
                           "(without --classes / components).")
    volume = session.volume.numpy()
    sign = session.targets[0].sign
    runs = augmentations(spec, volume, int(session.options.seed))
    maps: Dict[str, List[np.ndarray]] = {name: [] for name, _ in methods}
    probabilities: List[np.ndarray] = []
    for n, aug in enumerate(runs):
        if progress is not None:
            progress(n / len(runs), f"stability: {aug.name} ({n + 1}/{len(runs)})")
        augmented = aug.forward(volume)
        target = _augmented_target(session.target, aug.region(sign))
        other = ExplainSession(augmented, network_for(augmented), target, session.options,
                               spacing=session.stats.spacing, cancel=session.cancel)
        probabilities.append(aug.inverse(other.probabilities))
        for name, params in methods:
            maps[name].append(aug.inverse(other.attribute(name, params).map))
    result = StabilityResult(spec.label if spec is not None else "none", [a.name for a in runs])
    for name, values in maps.items():
        result.maps[name] = mean_and_cv(values)
    result.mean_probabilities = np.mean(np.stack(probabilities), axis=0).astype(np.float32)
    result.prediction_entropy = entropy(result.mean_probabilities)
    if progress is not None:
        progress(1.0, "stability: done")
    return result


def add_stability_check(method_result, stability: StabilityResult, name: str, region: np.ndarray) -> None:
    """Trust check "stability" on a method's plain result: the median cv inside the region."""
    region = np.asarray(region, dtype=bool)
    if name not in stability.maps or not region.any():
        return
    value = float(np.median(stability.maps[name][1][region]))
    status = "pass" if value <= STABILITY_TOLERANCE else "warn"
    detail = (f"median coefficient of variation of the map inside the region under {stability.spec_label} "
              f"({len(stability.augmentations)} runs): {value:.3g} (warn above {STABILITY_TOLERANCE:g}); "
              "see the _stability_cv map for where the explanation is uncertain.")
    method_result.add_check("stability", status, value, detail)
