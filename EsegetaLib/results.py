"""What `explain` returns: plain arrays and dictionaries, ready for any writer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np


@dataclass
class MethodResult:
    name: str
    attribution: np.ndarray  # float32, shape of the input volume: (C, I, J, K)
    params: Dict[str, Any]  # resolved parameters, defaults included
    seconds: float
    diagnostics: Dict[str, Any] = field(default_factory=dict)  # e.g. convergence_delta, n_windows
    metadata: Dict[str, Any] = field(default_factory=dict)  # MethodSpec.metadata()

    @property
    def map(self) -> np.ndarray:
        """The spatial map (I, J, K): channels summed (what is displayed)."""
        return self.attribution.sum(axis=0)


@dataclass
class Explanation:
    segmentation: np.ndarray  # uint8/int16 label map (I, J, K) from the same sliding-window model
    region: np.ndarray  # bool (I, J, K): the target region that was explained
    results: Dict[str, MethodResult]
    target: Dict[str, Any]
    engine: Dict[str, Any]  # resolved device, precision, patch size, overlap, batch size, windows
    seconds: float = 0.0
    probabilities: Optional[np.ndarray] = None  # (n_classes, I, J, K) float32 when kept
