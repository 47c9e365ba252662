"""`explain`: the one call the CLI, the Slicer module and the metrics use."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .engine import ExplainSession, ProgressFn
from .errors import EsegetaError
from .methods.base import MethodSpec, check_network_support, get_method
from .methods.layers import check_layer_names
from .options import EngineOptions, Target
from .results import TARGET_SEPARATOR, Explanation
from .work import WorkPlan, method_stages, plan_methods

MethodRequest = Union[str, MethodSpec, Tuple[Union[str, MethodSpec], Dict[str, Any]]]


def resolve_methods(methods: Union[MethodRequest, Iterable[MethodRequest], Dict[str, Dict[str, Any]]]
                    ) -> List[Tuple[MethodSpec, Dict[str, Any]]]:
    """Names, specs, (name, params) pairs or {name: params} -> validated (spec, params), before any run."""
    if isinstance(methods, (str, MethodSpec)) or (isinstance(methods, tuple) and len(methods) == 2
                                                  and isinstance(methods[1], dict)):
        methods = [methods]
    if isinstance(methods, dict):
        methods = list(methods.items())
    resolved = []
    for item in methods:
        name, params = (item if isinstance(item, (tuple, list)) else (item, None))
        spec = name if isinstance(name, MethodSpec) else get_method(name)
        resolved.append((spec, spec.resolve_params(params)))
    if not resolved:
        raise EsegetaError("No method given; name at least one (run 'esegeta methods' to list them).")
    return resolved


def _target_record(target: Target, region_voxels: int) -> Dict[str, Any]:
    record = dataclasses.asdict(target)
    record["mask"] = None if target.mask is None else f"{int(np.asarray(target.mask).astype(bool).sum())} voxels"
    record["class_names"] = None if target.class_names is None else list(target.class_names)
    record["classes"] = None if target.classes is None else [int(c) for c in target.classes]
    record["region_voxels"] = region_voxels
    return record


def explain(volume, network, methods, target: Optional[Target] = None,
            options: Optional[EngineOptions] = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
            progress: Optional[ProgressFn] = None, cancel: Any = None,
            keep_probabilities: bool = False) -> Explanation:
    """Explain `network`'s segmentation of `volume` with each of `methods`.

    volume: (I,J,K) or (C,I,J,K); network: an nn.Module (or a LoadedModel with `network_for`).
    Progress runs from 0 to 1 across segmentation and methods (weighted by each method's cost);
    a cancelled run raises EsegetaCancelled and returns nothing.
    """
    started = time.perf_counter()
    target = target if target is not None else Target()
    options = options if options is not None else EngineOptions()
    requests = resolve_methods(methods)
    if isinstance(network, torch.nn.Module):
        check_network_support([spec for spec, _ in requests], network)
        check_layer_names(requests, network)
    # Progress by the work left (work.py): windows x passes per method, measured seconds per pass.
    stages = method_stages([spec for spec, _ in requests])
    plan = WorkPlan(progress, ["segmentation"] + stages)
    session = ExplainSession(volume, network, target, options, spacing=spacing,
                             progress=plan.stage("segmentation") if progress else None, cancel=cancel)
    plan_methods(plan, session, requests, stages)
    results = {}
    for stage, (spec, params) in zip(stages, requests):
        session.check_cancel()
        if progress is not None:
            session.progress = plan.stage(stage)
        key, k = spec.name, 2
        while key in results or f"{session.target_names[0]}{TARGET_SEPARATOR}{key}" in results:
            key, k = f"{spec.name}#{k}", k + 1
        if len(session.targets) == 1:
            results[key] = session.attribute(spec, params)
        else:
            for name, result in session.attribute_targets(spec, params).items():
                results[f"{name}{TARGET_SEPARATOR}{key}"] = result
    if progress is not None:
        plan.finish("done")
    engine = {"device": str(session.device), "precision": session.precision,
              "precision_requested": options.precision, "precision_reason": session.precision_reason,
              "batch_size": session.batch_size, "divisor": options.divisor, "blend": options.blend,
              "windows": [[[w.start, w.stop] for w in window] for window in session.windows],
              "dtype": str(session.dtype).replace("torch.", "")}
    engine.update({k: v for k, v in describe_grid(session).items()})
    return Explanation(segmentation=session.segmentation, region=session.regions_union, results=results,
                       target=_target_record(target, int(session.regions_union.sum())), engine=engine,
                       seconds=time.perf_counter() - started,
                       probabilities=session.probabilities if keep_probabilities else None,
                       targets=target_records(session), target_regions=target_regions(session))


def target_records(session: ExplainSession) -> List[Dict[str, Any]]:
    """One JSON-ready record per target: name, class index, region facts (voxels, point, band...)."""
    return [{"name": t.name, "class_index": t.class_index, **t.info} for t in session.targets]


def target_regions(session: ExplainSession) -> Dict[str, np.ndarray]:
    """Each target's signed region (int8: +1 region / inside band, -1 outside band) when there are several."""
    if len(session.targets) == 1:
        return {}
    return {t.name: t.sign for t in session.targets}


def describe_grid(session: ExplainSession) -> Dict[str, Any]:
    from .windows import describe

    return describe(session.grid, len(session.active))
