"""Progress by the work actually left: how many window passes each stage of a run needs, and a plan
that turns each stage's own progress into one run fraction and a time-left estimate.

Units: one window forward pass. A forward+backward pass counts as `BACKWARD_FORWARDS` forwards until
the run has measured both. Per stage:
- segmentation: every window once (forward);
- a gradient, layer or noise-tunnel method: windows in the region x passes per window (forward +
  backward): IG's `n_steps`, GradientShap's `n_samples`, a noise tunnel's `nt_samples` x its base ...;
- a perturbation method: volumes it evaluates (Occlusion: one per window position inside the region's
  box, FeatureAblation one per feature, ShapleyValueSampling samples x features, Lime/KernelShap
  samples, RISE masks) x the windows each evaluation reruns (forward only);
- metrics: deletion/insertion steps and infidelity samples x the region's windows (forward only).
Several targets (`--classes`, `--region components`) count each target's windows and passes:
K single-target runs, or for the methods that batch targets one forward per window and one backward
row per target (`method_work`); their metrics run target by target.

The plan measures seconds per unit as the run goes (pooled over the stages done, the current
stage's own pace once it has moved), so time left = the units left x what such a unit has cost
here. No estimate is given before 10 % of the work is done and timed; until then the percentage is
the share of the work done. Why our own code: the estimate needs the engine's own counts
(windows, passes, perturbations); tqdm's rate only knows a fraction.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

FORWARD, BACKWARD = "forward", "backward"
BACKWARD_FORWARDS = 3.0  # a forward+backward pass costs about 3 forwards (until measured)
MEASURED_SHARE = 0.10  # no time estimate before this share of the work is done and timed
_REPEATS = ("n_steps", "n_samples", "n_baselines")  # parameters that multiply a method's passes


# --------------------------------------------------------------------------------- estimates
def passes_per_window(spec, params: Dict[str, Any]) -> float:
    """Forward+backward passes per window for a gradient/layer/noise-tunnel method at `params`:
    the catalogue's cost, scaled when a repeat count (n_steps, n_samples, ...) differs from its default."""
    from .methods import get_method

    if spec.patching == "noise_tunnel":
        base = get_method(params.get("base_method") or "Saliency")
        inner = {k: v for k, v in params.items() if k in {p.name for p in base.params}}
        return float(params.get("nt_samples", 16)) * passes_per_window(base, base.resolve_params(inner))
    cost = max(float(spec.cost), 0.5)
    defaults = spec.defaults()
    for name in _REPEATS:
        if name in params and defaults.get(name):
            return cost * float(params[name]) / float(defaults[name])
    return cost


def _count_context(session, params):
    from .methods.base import MethodContext

    inputs = torch.empty((1, session.volume.shape[0]) + tuple(session.stats.shape), device="meta")
    region = torch.from_numpy(session.region)[None, None]
    return MethodContext(forward=None, network=None, inputs=inputs, params=params, stats=session.stats,
                         region=region)


def _box_shape(ctx) -> Tuple[Tuple[slice, ...], Tuple[int, ...]]:
    from .methods.features import region_box

    box = region_box(ctx)
    return box, tuple(s.stop - s.start for s in box)


def _blocks(box, block: Sequence[int], stride: Optional[Sequence[int]] = None) -> List[Tuple[slice, ...]]:
    """The blocks a grid (stride = block) or a sliding window (Occlusion) visits inside `box`."""
    stride = block if stride is None else stride
    per_axis = []
    for s, b, st in zip(box, block, stride):
        n = s.stop - s.start
        if stride is block:
            starts = range(0, n, b)
        else:  # Captum's Occlusion: 1 + ceil((n - window) / stride) positions, the last one truncated
            starts = [k * st for k in range(int(math.ceil(max(n - b, 0) / st)) + 1)]
        per_axis.append([slice(s.start + a, min(s.start + a + b, s.stop)) for a in starts])
    return [(i, j, k) for i in per_axis[0] for j in per_axis[1] for k in per_axis[2]]


def _windows_touching(session, box: Tuple[slice, ...]) -> int:
    """Windows in the region whose voxels overlap `box` (what one perturbation of `box` reruns)."""
    n = 0
    for index in session.active:
        window = session.windows[index]
        if all(w.start < b.stop and b.start < w.stop for w, b in zip(window, box)):
            n += 1
    return n


def perturbation_work(spec, params: Dict[str, Any], session) -> Tuple[int, float]:
    """(volumes evaluated, window forwards) of a perturbation method on this session, before it runs."""
    from .methods.features import block_voxels

    ctx = _count_context(session, params)
    box, shape = _box_shape(ctx)
    whole = _windows_touching(session, box)
    name = spec.name
    if name == "FeatureVisualization":  # one forward+backward of one window per step, no volume scored
        from .methods.featurevis import auto_steps

        steps = int(params.get("steps") or 0) or auto_steps(session.grid.patch)
        return 0, 2.0 + steps * BACKWARD_FORWARDS
    if name == "TopActivatingWindows":  # the layer over every window, then one backward per box
        return 0, float(len(session.windows)) + int(params.get("k", 5)) * BACKWARD_FORWARDS
    if name == "Occlusion":
        from .methods.perturbation import occlusion_window

        window, stride = occlusion_window(ctx)
        window = tuple(min(w, n) for w, n in zip(window, shape))
        blocks = _blocks(box, window, stride)
        evaluations = len(blocks) + 1  # Captum scores the unperturbed input first
        per_block = sum(_windows_touching(session, b) for b in blocks) / max(len(blocks), 1)
        return evaluations, whole + len(blocks) * per_block
    if name == "ScoreCAM":  # one volume per channel (+ the baseline); the count is known once the layer ran
        channels = int(getattr(session, "layer_channels", 0) or 32)
        if int(params.get("max_channels") or 0) > 0:
            channels = min(channels, int(params["max_channels"]))
        return channels + 1, whole + (channels + 1) * whole
    if name == "RISE":
        evaluations = int(params.get("n_masks", 512))
        return evaluations, whole + evaluations * whole
    block = tuple(min(b, n) for b, n in zip(block_voxels(session.stats, params), shape))
    blocks = _blocks(box, block)
    n_features = len(blocks)
    per_block = sum(_windows_touching(session, b) for b in blocks) / max(n_features, 1)
    if name == "FeatureAblation":
        evaluations = n_features + 1
        return evaluations, whole + n_features * per_block
    if name == "ShapleyValueSampling":  # features are added one by one: most evaluations touch the box
        evaluations = int(params.get("n_samples", 8)) * n_features + 1
        return evaluations, whole + (evaluations - 1) * whole
    # Lime (+2: the score scale), KernelShap, any sampler of random feature subsets: each sample
    # touches the box. SLIC features: the count is the grid's, an upper bound (SLIC merges).
    evaluations = int(params.get("n_samples", 256)) + (2 if name == "Lime" else 0)
    return evaluations, whole + evaluations * whole


def single_target_work(spec, params: Dict[str, Any], session) -> Tuple[float, str]:
    """(units, kind) of one method for the session's current target alone."""
    if spec.patching == "global":
        return perturbation_work(spec, params, session)[1], FORWARD
    return max(len(session.active), 1) * passes_per_window(spec, params), BACKWARD


def per_target(session, measure: Callable[[Any], Any]) -> List[Any]:
    """`measure(session)` with the session switched to each of its targets in turn (then restored):
    one value per target; a session with one target (or none resolved) gives one value."""
    targets = getattr(session, "targets", None) or []
    if len(targets) <= 1:
        return [measure(session)]
    saved = session.current_target
    try:
        values = []
        for k in range(len(targets)):
            session.select_target(k)
            values.append(measure(session))
        return values
    finally:
        session.select_target(saved)


def method_work(spec, params: Dict[str, Any], session) -> Tuple[float, str]:
    """(units, kind) of one method on this session, every target counted.

    K targets cost K single-target runs, except for the methods that batch targets
    (`multitarget.batches_targets`), counted as the engine runs them: per group of
    `options.target_batch` targets, the windows in any of the group's regions in chunks of the
    session's batch size; per chunk one forward per window and, per window, as many backward rows
    as the most targets any window of the chunk has (the rows' cotangents are backpropagated
    together, zero rows included). A forward is 1 / BACKWARD_FORWARDS of a forward+backward unit,
    a backward the rest."""
    targets = getattr(session, "targets", None) or []
    if len(targets) <= 1:
        return single_target_work(spec, params, session)
    from .multitarget import batches_targets

    if not batches_targets(spec, params):
        units = sum(u for u, _ in per_target(session, lambda s: single_target_work(spec, params, s)))
        return units, (FORWARD if spec.patching == "global" else BACKWARD)
    passes = passes_per_window(spec, params)
    active = per_target(session, lambda s: frozenset(s.active))
    size = max(1, int(getattr(session.options, "target_batch", 8) or 8))
    batch = max(1, int(getattr(session, "batch_size", 1) or 1))
    units = passes * sum(group_units(active[a:a + size], batch) for a in range(0, len(active), size))
    return max(units, passes), BACKWARD


def window_order(group: Sequence[frozenset]) -> List[int]:
    """The windows of a group of targets (their active windows) in the order a batched pass runs
    them: by how many of the targets each serves, then by index. A chunk's backward passes carry
    one row per window for each slot up to the chunk's largest count, so windows of equal counts
    together carry no zero rows."""
    return sorted(frozenset().union(*group), key=lambda i: (sum(i in g for g in group), i))


def group_units(group: Sequence[frozenset], batch: int) -> float:
    """Forward+backward units of one batched pass over a group of targets (their active windows):
    the windows in chunks of `batch`; per chunk one forward per window and, per window, as many
    backward rows as the most targets any window of the chunk has."""
    forwards = backwards = 0
    windows = window_order(group)
    for c in range(0, len(windows), max(1, batch)):
        chunk = windows[c:c + max(1, batch)]
        forwards += len(chunk)
        backwards += len(chunk) * max(sum(i in g for g in group) for i in chunk)
    forward_share = 1.0 / BACKWARD_FORWARDS
    return forwards * forward_share + backwards * (1.0 - forward_share)


def metric_work(metric: str, params: Dict[str, Any], session, method_units: float) -> Tuple[float, str]:
    """(units, kind) of one metric of one method (the same windows' forwards the metric reruns)."""
    windows = max(len(session.active), 1)
    if metric in ("deletion", "insertion"):
        return (int(params.get("n_steps", 20)) + 1) * windows, FORWARD
    if metric == "infidelity":
        return (int(params.get("n_samples", 16)) + 1) * windows, FORWARD
    if metric == "sensitivity":
        return int(params.get("n_samples", 10)) * method_units, BACKWARD
    if metric == "randomisation":
        return int(params.get("max_stages", 8)) * method_units, BACKWARD
    return 0.05 * windows, FORWARD  # mass, rank, sparseness, complexity: array sums, no model run


# --------------------------------------------------------------------------------- the plan
class WorkPlan:
    """Stages with estimated units; `stage(name)` gives the callback a stage reports (fraction of
    its own work, message) to. The run's fraction is time done / (time done + time left)."""

    def __init__(self, progress: Optional[Callable[[float, str], Any]], names: Sequence[str],
                 clock: Callable[[], float] = time.monotonic):
        self.progress = progress
        self.clock = clock
        self.names = list(names)
        self.units: Dict[str, Optional[float]] = {n: None for n in self.names}
        self.kinds: Dict[str, str] = {n: FORWARD for n in self.names}
        self.weights: Dict[str, List[float]] = {}  # a stage's items (metrics): units per item
        self.started = clock()
        self.done_units = {FORWARD: 0.0, BACKWARD: 0.0}  # finished stages
        self.done_seconds = {FORWARD: 0.0, BACKWARD: 0.0}
        self.current: Optional[str] = None
        self.stage_started = self.started
        self.stage_fraction = 0.0
        self.fraction = 0.0
        self.remaining: Optional[float] = None
        self.finished: List[str] = []

    def set(self, name: str, units: float, kind: str = FORWARD, items: Optional[Sequence[float]] = None) -> None:
        self.units[name] = float(units)
        self.kinds[name] = kind
        if items is not None:
            self.weights[name] = [float(w) for w in items]

    def stage(self, name: str) -> Callable[[Optional[float], str], None]:
        """Start stage `name` (the previous one is finished) and return its progress callback."""
        if self.current is not None and self.current != name:
            self._finish(self.current)
        if self.current != name:
            # the stage's clock starts at its first report: set-up before it (loading, probing
            # the batch size) is not the per-pass cost the estimate extrapolates
            self.current, self.stage_started, self.stage_fraction = name, None, 0.0

        def report(fraction: Optional[float], message: str = "") -> None:
            self.report(name, fraction, message)
        return report

    def _finish(self, name: str) -> None:
        units = self.units.get(name) or 0.0
        kind = self.kinds[name]
        if self.stage_started is not None and units > 0:
            self.done_units[kind] += units
            self.done_seconds[kind] += self.clock() - self.stage_started
        self.finished.append(name)

    def _item_fraction(self, name: str, fraction: float) -> float:
        """Count-based fraction over a stage's items -> the share of its units (metrics)."""
        weights = self.weights.get(name)
        if not weights:
            return fraction
        total = sum(weights) or 1.0
        k = fraction * len(weights)
        whole = int(math.floor(k + 1e-9))
        done = sum(weights[:whole]) + (weights[whole] * (k - whole) if whole < len(weights) else 0.0)
        return min(1.0, done / total)

    def rate(self, kind: str) -> Optional[float]:
        """Seconds per unit of `kind`, from everything measured so far (finished stages and the
        moving one), pooled in forward-equivalents: the larger stages, which batch better and
        carry no warm-up, weigh most."""
        units, seconds = 0.0, 0.0
        for k in (FORWARD, BACKWARD):
            factor = BACKWARD_FORWARDS if k == BACKWARD else 1.0
            units += self.done_units[k] * factor
            seconds += self.done_seconds[k]
        name = self.current
        if name is not None and self.units.get(name) and self.stage_fraction > 0 and self.stage_started is not None:
            factor = BACKWARD_FORWARDS if self.kinds[name] == BACKWARD else 1.0
            units += self.stage_fraction * self.units[name] * factor
            seconds += self.clock() - self.stage_started
        if units <= 0 or seconds <= 0:
            return None
        return seconds / units * (BACKWARD_FORWARDS if kind == BACKWARD else 1.0)

    def work_done(self) -> Optional[Tuple[float, float]]:
        """(done, total) in forward-equivalents, or None while some stage's work is unknown."""
        done = total = 0.0
        for name in self.names:
            units = self.units[name]
            if units is None:
                return None
            units *= BACKWARD_FORWARDS if self.kinds[name] == BACKWARD else 1.0
            total += units
            if name in self.finished:
                done += units
            elif name == self.current:
                done += self.stage_fraction * units
        return done, total

    def time_left(self) -> Optional[float]:
        """Seconds left, or None while it cannot be estimated: unknown work, or less than
        MEASURED_SHARE of it done (the first small stages carry warm-up and set-up: on a busy
        2-core machine they made a window pass look six times dearer than it was)."""
        work = self.work_done()
        if work is None or work[0] < MEASURED_SHARE * work[1]:
            return None
        left = 0.0
        for name in self.names:
            if name in self.finished:
                continue
            units = self.units[name]
            if name == self.current:
                elapsed = 0.0 if self.stage_started is None else self.clock() - self.stage_started
                if self.stage_fraction > 0.02 and elapsed > 0:
                    # the stage's own pace, once it has moved
                    left += elapsed * (1.0 - self.stage_fraction) / self.stage_fraction
                    continue
                units *= 1.0 - self.stage_fraction
            rate = self.rate(self.kinds[name])
            if rate is None:
                return None
            left += units * rate
        return left

    def report(self, name: str, fraction: Optional[float], message: str = "") -> None:
        if name == self.current and self.stage_started is None:
            self.stage_started = self.clock()
        if fraction is not None:
            self.stage_fraction = min(max(self._item_fraction(name, float(fraction)), 0.0), 1.0)
        left = self.time_left()
        self.remaining = left
        if left is not None:
            done = self.clock() - self.started
            # never backwards: a grown estimate shows as more time left, not a lower percentage
            self.fraction = max(self.fraction, min(0.999, done / max(done + left, 1e-9)))
        else:  # no time estimate yet: the share of the work done
            work = self.work_done()
            if work is not None and work[1] > 0:
                self.fraction = max(self.fraction, min(0.999, work[0] / work[1]))
        if self.progress is None:
            return
        estimate = getattr(self.progress, "estimate", None)
        if callable(estimate):
            estimate(left)
        self.progress(self.fraction, message)

    def finish(self, message: str = "done") -> None:
        if self.current is not None:
            self._finish(self.current)
            self.current = None
        self.fraction, self.remaining = 1.0, 0.0
        if self.progress is not None:
            estimate = getattr(self.progress, "estimate", None)
            if callable(estimate):
                estimate(0.0)
            self.progress(1.0, message)


def method_stages(specs) -> List[str]:
    """Stage names of a run's methods, in order (unique even when a method repeats)."""
    return [f"method {i}: {spec.name}" for i, spec in enumerate(specs)]


def plan_methods(plan: WorkPlan, session, specs_params, stages: Sequence[str]) -> Dict[str, float]:
    """Once the session exists: the segmentation's and every method's units. Returns units per stage."""
    plan.set("segmentation", len(session.windows) + 2, FORWARD)  # + the determinism check's 2 forwards
    units = {}
    for stage, (spec, params) in zip(stages, specs_params):
        try:
            amount, kind = method_work(spec, spec.resolve_params(params), session)
        except Exception:  # noqa: BLE001 - an estimate only: fall back to the catalogue's cost
            amount, kind = max(len(session.active), 1) * max(float(spec.cost), 1.0), BACKWARD
        plan.set(stage, amount, kind)
        units[stage] = amount * (BACKWARD_FORWARDS if kind == BACKWARD else 1.0)
    return units
