"""What `explain` returns: plain arrays and dictionaries, ready for any writer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

TRUST_STATUSES = ("pass", "warn", "fail", "not_run")


@dataclass
class TrustCheck:
    """One line of a result's trust report: a guarantee checked on the model at hand.

    name:   short stable key, e.g. "completeness", "rectifier_rule", "layer_gradient", "determinism",
            "randomisation", "conservation".
    status: one of TRUST_STATUSES ("not_run" says why in `detail`: a check must never be silently absent).
    value:  the number behind the status (relative error, fraction, norm, ...), or None.
    detail: one plain-language sentence (what was checked, the tolerance, what to do on warn/fail).
    """
    name: str
    status: str
    value: Optional[float] = None
    detail: str = ""

    def __post_init__(self):
        if self.status not in TRUST_STATUSES:
            raise ValueError(f"trust status must be one of {TRUST_STATUSES}, not {self.status!r}")

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "status": self.status, "value": self.value, "detail": self.detail}


@dataclass
class MethodResult:
    name: str
    attribution: np.ndarray  # float32, shape of the input volume: (C, I, J, K)
    params: Dict[str, Any]  # resolved parameters, defaults included
    seconds: float
    diagnostics: Dict[str, Any] = field(default_factory=dict)  # e.g. convergence_delta, n_windows
    metadata: Dict[str, Any] = field(default_factory=dict)  # MethodSpec.metadata()
    checks: List[TrustCheck] = field(default_factory=list)  # the trust report of this map
    # method-specific outputs beyond the map, written by EsegetaLib/method_outputs.py: e.g.
    # "feature_volume" (C, *window) float32 of a feature visualisation, "rois" (top activating windows)
    outputs: Dict[str, Any] = field(default_factory=dict)

    @property
    def model_level(self) -> bool:
        """True for a model-level visualisation: `attribution` is no map of this input (all zeros)."""
        return (self.metadata or {}).get("level") == "model"

    def add_check(self, name: str, status: str, value: Optional[float] = None, detail: str = "") -> TrustCheck:
        """Record (or replace) the check called `name`; returns it."""
        check = TrustCheck(name, status, None if value is None else float(value), detail)
        self.checks = [c for c in self.checks if c.name != name] + [check]
        return check

    @property
    def map(self) -> np.ndarray:
        """The spatial map (I, J, K): channels summed (what is displayed)."""
        return self.attribution.sum(axis=0)


TARGET_SEPARATOR = "/"


def target_label(target: Dict[str, Any]) -> str:
    """A run's target record (run.json "target") -> a short label: its class name, the class names
    joined ("artery_a, artery_b") when the run explains several classes, else "class N"."""
    name, index = target.get("class_name"), target.get("class_index", 1)
    if isinstance(name, (list, tuple)):
        return ", ".join(str(n) for n in name)
    if name:
        return str(name)
    if isinstance(index, (list, tuple)):
        return "classes " + ", ".join(str(i) for i in index)
    return f"class {index}"


def target_segment_names(target: Dict[str, Any]) -> Dict[int, str]:
    """{class index: name} of the class(es) a run's target record explains (segment names)."""
    index, name = target.get("class_index", 1), target.get("class_name")
    if isinstance(index, (list, tuple)):
        names = list(name) if isinstance(name, (list, tuple)) else []
        return {int(i): str(names[n]) if n < len(names) else f"class {i}" for n, i in enumerate(index)}
    return {int(index): target_label(target)}


@dataclass
class Explanation:
    """`results` is keyed by method name; with several targets by "<target>/<method>" (one map per
    target and method; `targets` then lists each target's name, class, voxel count and region
    facts, and `target_regions` holds each target's signed region, int8 (I, J, K))."""
    segmentation: np.ndarray  # uint8/int16 label map (I, J, K) from the same sliding-window model
    region: np.ndarray  # bool (I, J, K): the target region that was explained (union of the targets')
    results: Dict[str, MethodResult]
    target: Dict[str, Any]
    engine: Dict[str, Any]  # resolved device, precision, patch size, overlap, batch size, windows
    seconds: float = 0.0
    probabilities: Optional[np.ndarray] = None  # (n_classes, I, J, K) float32 when kept
    targets: List[Dict[str, Any]] = field(default_factory=list)  # several targets: one record each
    target_regions: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def multi_target(self) -> bool:
        return len(self.targets) > 1

    def by_target(self) -> Dict[str, Dict[str, MethodResult]]:
        """{target name: {method: result}}; a single-target run is one entry named after its target
        (or "target")."""
        if not self.multi_target:
            name = self.targets[0]["name"] if self.targets else "target"
            return {name: dict(self.results)}
        out: Dict[str, Dict[str, MethodResult]] = {t["name"]: {} for t in self.targets}
        for key, result in self.results.items():
            target, _, method = key.partition(TARGET_SEPARATOR)
            out.setdefault(target, {})[method] = result
        return out
