"""Run the chosen metrics on every method's map: `evaluate_maps` (plain functions) and `evaluate`
(an `ExplainSession`: its patched score F, its region, its baseline, its methods)."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import EsegetaError
from .complexity import complexity, sparseness
from .context import ExplainFn, Meter, MetricContext, RerunRefused, ScoreFn, intensity_spread, resolve_baseline
from .deletion import deletion_insertion
from .groundtruth import pointing_game, relevance_shares, topology_deletion, voxel_average_precision
from .infidelity import infidelity
from .localisation import relevance_mass, relevance_rank
from .randomisation import parameter_randomisation
from .report import MetricsReport
from .sensitivity import sensitivity

# Every metric and its parameters' defaults (overridable per metric through `params`).
METRIC_PARAMS: Dict[str, Dict[str, Any]] = {
    "infidelity": {"n_samples": 16, "perturbation": "blocks", "noise": 0.01, "block": 4, "fraction": 0.25,
                   "normalize": True},
    "sensitivity": {"n_samples": 10, "radius": 0.02},
    "deletion": {"n_steps": 20, "block": 1, "domain": "foreground", "margin_mm": 2.0},
    "insertion": {"n_steps": 20, "block": 1, "domain": "foreground", "margin_mm": 2.0},
    "relevance_mass": {"relevance": "positive"},
    "relevance_rank": {"relevance": "positive"},
    "vxap": {"relevance": "positive"},
    "pointing_game": {"relevance": "positive", "tolerance_mm": 0.0},
    "topology_deletion": {"n_steps": 10, "block": 1, "max_fraction": 1.0, "domain": "region", "margin_mm": 2.0},
    "relevance_shares": {"band_mm": 1.0},
    "sparseness": {},
    "complexity": {},
    "randomisation": {"max_stages": 8, "threshold": 0.5, "within": "volume", "margin": 2},
}
METRICS = tuple(METRIC_PARAMS)
# Cheap ones: a few dozen forward passes at most. Sensitivity (n attributions per method) and the
# randomisation check (one attribution per stage) cost like re-running the method many times.
DEFAULT_METRICS = ("infidelity", "deletion", "insertion", "relevance_mass", "relevance_rank",
                   "sparseness", "complexity")
NEEDS_EXPLAIN = ("sensitivity", "randomisation")
# Against a reference mask (ground truth, or a user ROI standing in for it): `--reference-mask`.
GROUND_TRUTH_METRICS = ("relevance_mass", "relevance_rank", "vxap", "pointing_game", "relevance_shares")


def parse_metrics(spec: Union[None, str, Iterable[str]]) -> list:
    """None -> DEFAULT_METRICS; 'all'; 'none'; 'a,b' or a list of names (unknown names suggest the closest)."""
    if spec is None:
        return list(DEFAULT_METRICS)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n.lower() for n in names if n]
    if names == ["all"]:
        return list(METRICS)
    if names in (["none"], []):
        return []
    out = []
    for name in names:
        if name in ("all", "none"):
            raise EsegetaError("'all' and 'none' cannot be combined with metric names.")
        if name not in METRIC_PARAMS:
            hint = difflib.get_close_matches(name, METRICS, n=1)
            raise EsegetaError(f"Unknown metric '{name}'." + (f" Did you mean '{hint[0]}'?" if hint else "")
                               + f" Metrics: {', '.join(METRICS)}, all, none.")
        if name not in out:
            out.append(name)
    return out


def resolve_params(params: Optional[Mapping[str, Mapping[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    resolved = {m: dict(p) for m, p in METRIC_PARAMS.items()}
    for metric, given in (params or {}).items():
        if metric not in resolved:
            raise EsegetaError(f"params for unknown metric '{metric}'; metrics: {', '.join(METRICS)}.")
        for key, value in dict(given).items():
            if key not in resolved[metric]:
                raise EsegetaError(f"metric {metric} has no parameter '{key}'; it has "
                                   f"{', '.join(resolved[metric]) or 'none'}.")
            resolved[metric][key] = value
    for metric in ("infidelity", "sensitivity"):
        if int(resolved[metric]["n_samples"]) < 2:
            raise EsegetaError(f"{metric} needs n_samples >= 2 (10 or more to mean anything).")
    return resolved


def _run_metric(name: str, attribution, ctx: MetricContext, p: Dict[str, Any], explain_fn, make_explain_fn,
                network, reference_mask, explain_many=None):
    if name == "infidelity":
        return infidelity(attribution, ctx, **p)
    if name == "sensitivity":
        return sensitivity(attribution, ctx, explain_fn, explain_many=explain_many, **p)
    if name in ("deletion", "insertion"):
        return deletion_insertion(attribution, ctx, mode=name, spacing=ctx.spacing, **p)
    if name == "vxap":
        return voxel_average_precision(attribution, ctx, mask=reference_mask, **p)
    if name == "pointing_game":
        return pointing_game(attribution, ctx, mask=reference_mask, spacing=ctx.spacing, **p)
    if name == "topology_deletion":
        return topology_deletion(attribution, ctx, ctx.segment_fn, spacing=ctx.spacing, **p)
    if name == "relevance_shares":
        return relevance_shares(attribution, ctx, segmentation=ctx.segmentation, mask=reference_mask,
                                spacing=ctx.spacing, **p)
    if name == "relevance_mass":
        return relevance_mass(attribution, ctx, mask=reference_mask, **p)
    if name == "relevance_rank":
        return relevance_rank(attribution, ctx, mask=reference_mask, **p)
    if name == "sparseness":
        return sparseness(attribution, ctx)
    if name == "complexity":
        return complexity(attribution, ctx)
    if name == "randomisation":
        return parameter_randomisation(attribution, ctx, network, make_explain_fn, **p)
    raise KeyError(name)


def evaluate_maps(inputs, attributions: Mapping[str, Any], score_fn: ScoreFn, *,
                  metrics=None, params=None, stats=None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  explain_fns: Optional[Mapping[str, ExplainFn]] = None,
                  make_explain_fns: Optional[Mapping[str, Callable[[torch.nn.Module], ExplainFn]]] = None,
                  explain_many_fns: Optional[Mapping[str, Callable[..., torch.Tensor]]] = None,
                  network: Optional[torch.nn.Module] = None, region=None, reference_mask=None,
                  baseline=None, batch_size: int = 4, seed: int = 0, cancel: Any = None,
                  progress: Optional[Callable[[float, str], Any]] = None, device=None,
                  attribution_seconds: Optional[Mapping[str, float]] = None, segmentation=None,
                  segment_fn: Optional[Callable[[torch.Tensor], Any]] = None) -> MetricsReport:
    """Metrics of each named map. inputs: (C,*S) (or (*S)); score_fn: (N,C,*S) -> (N,) target scores;
    explain_fns[name](x) -> map of x (sensitivity, one perturbed volume at a time), or
    explain_many_fns[name](xs (n,C,*S), progress=None) -> (n,C,*S) maps (sensitivity, batched: the
    session's `attribute_many`); make_explain_fns[name](net) -> explain function on
    a network copy, with `network` (randomisation); region: the explained region (default reference
    mask); baseline: tensor/array, number or choice name (default: the engine's blurred input)."""
    from ..engine import as_volume, volume_stats

    names = parse_metrics(metrics)
    p = resolve_params(params)
    x_np = as_volume(inputs, "The input")
    if stats is None:
        stats = volume_stats(x_np, spacing)
    dev = torch.device(device) if device is not None else (
        inputs.device if isinstance(inputs, torch.Tensor) else torch.device("cpu"))
    x = torch.as_tensor(x_np, device=dev)
    region_t = None if region is None else torch.as_tensor(np.asarray(region, dtype=bool), device=dev)
    mask_t = None if reference_mask is None else torch.as_tensor(np.asarray(reference_mask, dtype=bool), device=dev)
    ctx = MetricContext(inputs=x, score_fn=score_fn, baseline=resolve_baseline(x, stats, baseline),
                        spread=intensity_spread(stats), region=region_t, batch_size=batch_size, seed=seed,
                        cancel=cancel, progress=progress, spacing=tuple(float(v) for v in stats.spacing),
                        segmentation=None if segmentation is None else np.asarray(segmentation, dtype=bool),
                        segment_fn=segment_fn)
    explain_fns = dict(explain_fns or {})
    explain_many_fns = dict(explain_many_fns or {})
    make_explain_fns = dict(make_explain_fns or {})
    report = MetricsReport(settings={"metrics": names, "params": {m: p[m] for m in names}, "seed": seed,
                                     "device": str(dev), "batch_size": ctx.batch_size,
                                     "intensity_spread": ctx.spread,
                                     "reference": "user mask" if mask_t is not None else "explained region"})
    total = max(1, len(attributions) * len(names))
    step = 0
    for method, attribution in attributions.items():
        row: Dict[str, Any] = {"method": method}
        if attribution_seconds and method in attribution_seconds:
            row["attribution_s"] = float(attribution_seconds[method])
        for name in names:
            ctx.check_cancel()
            ctx.span, ctx.label = (step / total, (step + 1) / total), f"metric {name} of {method}"
            ctx.report(0.0)
            step += 1
            if name in NEEDS_EXPLAIN and (
                    (name == "sensitivity" and method not in explain_fns and method not in explain_many_fns)
                    or (name == "randomisation" and (method not in make_explain_fns or network is None))):
                continue  # a precomputed map without its method: nothing to recompute
            if name == "topology_deletion" and segment_fn is None:
                report.settings.setdefault("not_run", {})[f"{method}/{name}"] = (
                    "needs the model's segmentation of perturbed volumes (run through a session)")
                continue
            meter = Meter(dev)
            try:
                with meter.measure():
                    values = _run_metric(name, attribution, ctx, p[name], explain_fns.get(method),
                                         make_explain_fns.get(method), network, mask_t,
                                         explain_many_fns.get(method))
            except RerunRefused as exc:  # not computed for this map: say why, keep the other metrics
                row[f"{name}_note"] = str(exc)
                report.settings.setdefault("not_run", {})[f"{method}/{name}"] = str(exc)
                continue
            curve = values.pop("curve", None)
            stages = values.pop("stages", None)
            if curve is not None:
                curve["auc"] = values.get(f"{name}_auc")
                report.curves.setdefault(method, {})[name] = curve
            if stages is not None:
                report.stages[method] = stages
            row.update(values)
            row[f"{name}_s"] = meter.seconds
            row[f"{name}_peak_mb"] = meter.peak_mb
        report.rows.append(row)
    if progress:
        progress(1.0, "metrics done")
    return report


def _class_foreground(probs: np.ndarray, target) -> np.ndarray:
    """Voxels the model assigns to the target's class (as the 'predicted' region; may be empty)."""
    c = int(target.class_index)
    if target.activation == "sigmoid":
        return probs[c] > target.threshold
    return probs.argmax(axis=0) == c


MODEL_LEVEL_SKIP = ("model-level visualisation: no map of this input, so no metric of an attribution of the "
                    "target applies (skipped)")


def _skipped_row(name: str) -> Dict[str, Any]:
    return {"method": name, "metrics_skipped": MODEL_LEVEL_SKIP}


def _result_items(results) -> Dict[str, Any]:
    if hasattr(results, "results") and isinstance(results.results, Mapping):
        results = results.results
    if isinstance(results, Mapping):
        return dict(results)
    return {r.name: r for r in results}


def evaluate(session, results, metrics=None, params=None, reference_mask=None, baseline=None,
             batch_size: Optional[int] = None, seed: Optional[int] = None, cancel: Any = None,
             progress: Optional[Callable[[float, str], Any]] = None) -> MetricsReport:
    """Metrics of `results` (an Explanation, {name: MethodResult} or a list) computed by `session`.

    The score is the session's patched F (only windows a perturbation touches rerun), on the
    session's device and precision; the reference mask is the explained region unless given; the
    baseline is the engine's blurred input unless given; sensitivity and randomisation rerun each
    method with its resolved parameters (randomisation on a re-initialised copy of the network, the
    region held fixed)."""
    from ..engine import ExplainSession
    from ..methods.base import get_method

    items = _result_items(results)
    if not items:
        raise EsegetaError("no explanation to evaluate; run at least one method first.")
    # A model-level visualisation (feature visualisation) has no map of this input: every metric here
    # tests a map of the input against the target's score or region, so none applies to it.
    skipped = {name: r for name, r in items.items() if (r.metadata or {}).get("level") == "model"}
    items = {name: r for name, r in items.items() if name not in skipped}
    if not items:
        return MetricsReport(rows=[_skipped_row(name) for name in skipped])
    x = session.volume  # host (C, I, J, K) in the network's dtype
    if batch_size is None:
        per_copy = x.numel() * x.element_size()
        batch_size = int(max(1, min(8, (256 * 2**20) // max(1, per_copy))))
    seed = int(session.options.seed if seed is None else seed)
    cancel = session.cancel if cancel is None else cancel
    # the session's current target as a fixed (signed) mask: its class, its region or boundary band
    current = session.targets[session.current_target] if hasattr(session, "targets") else None
    roi_target = dataclasses.replace(session.target, region="roi", mask=np.asarray(session.region, dtype=bool)) \
        if current is None else dataclasses.replace(
            session.target, region="roi", mask=current.sign.copy(), class_index=current.class_index,
            classes=None, boundary_mm=None, geodesic_mm=None, masks=None)

    def explain_many_fn_for(result):
        # the perturbed volumes in the precision the result was finally computed in (an 'auto' run
        # may have rerun this method in fp32)
        full = session.amp_dtype is not None and (result.diagnostics or {}).get("precision") == "fp32"

        def explain_many(xs: torch.Tensor, progress=None) -> torch.Tensor:
            return session.attribute_many((result.metadata or {}).get("name", result.name), result.params,
                                          xs, full_precision=full, progress=progress)
        return explain_many

    def make_explain_fn_for(result):
        def make(net: torch.nn.Module) -> ExplainFn:
            other = ExplainSession(x.numpy(), net, roi_target, session.options, spacing=session.stats.spacing,
                                   cancel=cancel)

            def explain_fn(xp: torch.Tensor) -> torch.Tensor:
                try:
                    out = other.attribute((result.metadata or {}).get("name", result.name), result.params,
                                          inputs=xp.detach().cpu())
                except EsegetaError as exc:  # the method refuses its map on this network copy
                    raise RerunRefused(f"{result.name} was refused on the randomised network: {exc}") from None
                return torch.from_numpy(out.attribution)
            return explain_fn
        return make

    def registered(result) -> bool:  # maps made elsewhere (e.g. a random control) cannot be rerun
        try:
            get_method((result.metadata or {}).get("name", result.name))
            return True
        except EsegetaError:
            return False

    rerun = {name: r for name, r in items.items() if registered(r)}
    whole = dataclasses.replace(session.target, region="whole", mask=None, point=None)

    def segment_fn(xs: torch.Tensor) -> np.ndarray:
        """The sliding-window model's segmentation of the target class for each perturbed volume."""
        masks = []
        for xp in xs:
            other = ExplainSession(xp.detach().cpu().numpy(), session.network, whole, session.options,
                                   spacing=session.stats.spacing, cancel=cancel)
            masks.append(_class_foreground(other.probabilities, session.target))
        return np.stack(masks)
    report = evaluate_maps(
        x, {name: r.attribution for name, r in items.items()}, session.score,
        metrics=metrics, params=params, stats=session.stats, device=session.device,
        explain_many_fns={name: explain_many_fn_for(r) for name, r in rerun.items()},
        make_explain_fns={name: make_explain_fn_for(r) for name, r in rerun.items()},
        network=session.network, region=session.region, reference_mask=reference_mask, baseline=baseline,
        batch_size=batch_size, seed=seed, cancel=cancel, progress=progress,
        attribution_seconds={name: r.seconds for name, r in items.items()},
        segmentation=_class_foreground(session.probabilities, session.target), segment_fn=segment_fn)
    for row in report.rows:  # activation maps: the metrics read them as if they were attributions
        result = items.get(row.get("method"))
        if result is not None and (result.metadata or {}).get("explains_target") is False:
            row["metrics_note"] = ("activation-based map, not an attribution of the target: the metrics say how "
                                   "the channel's activation relates to the target's score and region")
    report.rows.extend(_skipped_row(name) for name in skipped)
    report.settings["windows"] = len(session.windows)
    report.settings["precision"] = session.precision
    report.settings["precision_requested"] = session.options.precision
    return report
