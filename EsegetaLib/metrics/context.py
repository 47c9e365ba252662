"""What every metric needs, independent of the engine: a score function, the input, a baseline.

The metrics never touch `ExplainSession` internals. They see
- `score_fn(batch (N, C, *S)) -> (N,)`: the target score F of perturbed copies (no gradient);
- `explain_fn(x (C, *S)) -> (C, *S)`: the method's attribution of a perturbed input (only for
  sensitivity and the randomisation check);
plus the input, the reference mask, the baseline, the intensity spread, the batch size, a seed and
a cancel flag. `evaluate` builds one `MetricContext` from a session; tests build it from a plain
network scored over the whole volume (the one-window case of the patched score).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ..errors import EsegetaCancelled, EsegetaError, is_cancelled

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
ExplainFn = Callable[[torch.Tensor], torch.Tensor]


class RerunRefused(EsegetaError):
    """A metric that reruns the method (sensitivity on perturbed inputs, randomisation on a
    randomised network) met a refusal of that rerun (e.g. DeepLift missing summation to delta on the
    randomised copy): the metric is not computed for that map and its `<metric>_note` says why."""


@dataclass
class MetricContext:
    inputs: torch.Tensor  # (C, *S) on the metrics' device
    score_fn: ScoreFn
    baseline: torch.Tensor  # (C, *S): what "removed" means (deletion/insertion)
    spread: float  # intensity spread of the volume (99th - 1st percentile): scales noise radii
    region: Optional[torch.Tensor] = None  # bool (*S): reference mask for localisation
    spacing: Tuple[float, ...] = (1.0, 1.0, 1.0)  # mm per voxel: distances in mm (domains, bands, tolerances)
    segmentation: Optional[Any] = None  # bool (*S) numpy: the model's segmentation of the target class
    # (N, C, *S) perturbed volumes -> (N, *S) bool segmentations of the target class (topology metrics)
    segment_fn: Optional[Callable[[torch.Tensor], Any]] = None
    batch_size: int = 4  # perturbed copies per score_fn call
    seed: int = 0
    cancel: Any = None
    progress: Optional[Callable[[float, str], None]] = None
    # Scores shared by all methods (same perturbations for every method): computed once.
    cache: Dict[Any, torch.Tensor] = field(default_factory=dict)
    # Progress of the metric being computed: its share of the whole run and its label (set by
    # evaluate_maps before each metric; `report` maps a fraction within the metric onto it).
    span: Tuple[float, float] = (0.0, 1.0)
    label: str = "metrics"

    def __post_init__(self) -> None:
        if self.inputs.dim() < 2:
            raise EsegetaError("metrics need an input shaped (C, I, J, K); got a tensor without channels.")
        if tuple(self.baseline.shape) != tuple(self.inputs.shape):
            raise EsegetaError(
                f"the baseline's shape {tuple(self.baseline.shape)} differs from the input's "
                f"{tuple(self.inputs.shape)}; give a baseline on the input grid."
            )
        if not math.isfinite(self.spread) or self.spread <= 0:
            raise EsegetaError("the volume has no intensity spread (constant image); metrics cannot perturb it.")
        self.batch_size = max(1, int(self.batch_size))

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def check_cancel(self) -> None:
        if is_cancelled(self.cancel):
            raise EsegetaCancelled("metrics cancelled")

    def report(self, fraction: float, message: str = "") -> None:
        """Progress within the current metric: `fraction` in [0, 1] of it, shown as '<label>: message'."""
        if self.progress is not None:
            a, b = self.span
            self.progress(a + (b - a) * min(max(float(fraction), 0.0), 1.0),
                          f"{self.label}: {message}" if message else self.label)

    def generator(self, *stream: int) -> torch.Generator:
        """A generator seeded by (seed, *stream): draws are reproducible batch by batch and the
        same for every method, so methods are compared on identical perturbations."""
        gen = torch.Generator(device=self.device)
        value = int(self.seed)
        for s in stream:
            value = (value * 1_000_003 + int(s) + 1) % (2**63 - 1)
        gen.manual_seed(value)
        return gen

    def score(self, batch: torch.Tensor) -> torch.Tensor:
        """score_fn on `batch`, as float64 on the metrics' device, with the shape checked."""
        self.check_cancel()
        with torch.no_grad():
            out = self.score_fn(batch)
        out = torch.as_tensor(out).to(device=self.device, dtype=torch.float64).reshape(-1)
        if out.numel() != batch.shape[0]:
            raise RuntimeError(f"score_fn returned {out.numel()} values for a batch of {batch.shape[0]}")
        return out

    def score_input(self) -> torch.Tensor:
        """F(x), computed once."""
        if "F(x)" not in self.cache:
            self.cache["F(x)"] = self.score(self.inputs.unsqueeze(0))[0]
        return self.cache["F(x)"]


def attribution_tensor(attribution: Any, ctx: MetricContext) -> torch.Tensor:
    """An attribution (numpy or torch, (C,*S) or (*S)) as (C,*S) in the input dtype on the metrics device."""
    a = torch.as_tensor(attribution).to(device=ctx.device, dtype=ctx.inputs.dtype)
    if a.shape == ctx.inputs.shape[1:]:
        a = a.unsqueeze(0).expand_as(ctx.inputs) / ctx.inputs.shape[0]
    if tuple(a.shape) != tuple(ctx.inputs.shape):
        raise EsegetaError(
            f"attribution shape {tuple(a.shape)} does not match the input {tuple(ctx.inputs.shape)}."
        )
    if not torch.isfinite(a).all():
        raise EsegetaError("the attribution contains NaN or infinite values; rerun the method in fp32.")
    return a


def batch_ranges(total: int, batch_size: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, total, batch_size):
        yield start, min(total, start + batch_size)


def resolve_baseline(inputs: torch.Tensor, stats, baseline: Any = None, params: Optional[dict] = None) -> torch.Tensor:
    """The deletion/insertion reference, (C, *S): the engine's own baselines (methods/baselines.py;
    default the blurred input, which removes thin bright structures but keeps the local intensity
    level), a choice name (blur, constant_low, mean, zero, noise), a number, or an array."""
    from ..methods.baselines import make_baseline

    if baseline is None or isinstance(baseline, str):
        choice = {"baseline": baseline or "blur", **(params or {})}
        with torch.no_grad():
            return make_baseline(inputs[None], stats, choice, torch.Generator().manual_seed(0))[0]
    if isinstance(baseline, (int, float)):
        return torch.full_like(inputs, float(baseline))
    b = torch.as_tensor(np.asarray(baseline) if not isinstance(baseline, torch.Tensor) else baseline)
    b = b.to(device=inputs.device, dtype=inputs.dtype)
    if tuple(b.shape) == tuple(inputs.shape[1:]):
        b = b.unsqueeze(0).expand_as(inputs).clone()
    if tuple(b.shape) != tuple(inputs.shape):
        raise EsegetaError(f"baseline shape {tuple(b.shape)} does not match the input {tuple(inputs.shape)}.")
    return b


def intensity_spread(stats) -> float:
    """99th - 1st percentile of the volume (its standard deviation if they coincide)."""
    spread = float(stats.high) - float(stats.low)
    return spread if spread > 0 else float(stats.std)


class Meter:
    """Wall time and peak memory of one metric on one method.

    CUDA: the peak of `torch.cuda.max_memory_allocated` above the level at the start. CPU (Linux):
    the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above its resident
    size at the start; NaN where the kernel offers neither."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds = float("nan")
        self.peak_mb = float("nan")

    @contextmanager
    def measure(self):
        start_mem = self._start()
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds = time.perf_counter() - t0
            self.peak_mb = self._peak(start_mem)

    def _start(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return float(torch.cuda.memory_allocated(self.device))
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets the peak RSS (VmHWM) to the current RSS
            return _proc_status_kb("VmRSS") * 1024.0
        except OSError:
            return float("nan")

    def _peak(self, start: float) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - start) / 2**20
        try:
            return max(0.0, _proc_status_kb("VmHWM") * 1024.0 - start) / 2**20
        except (OSError, ValueError):
            return float("nan")


def _proc_status_kb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    raise ValueError(key)
