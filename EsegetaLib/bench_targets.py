"""`esegeta bench --targets K`: K targets in one batched run beside K single-target runs.

The K targets are K pieces of the model's own vessel segmentation (its voxels split into K runs of
equal size along I), given as one `rois` target; each single run explains one piece as an `roi`.
Three timings per method:
- batched: one `explain` with the K targets (one segmentation, one forward per window, the K
  cotangents backpropagated together);
- K singles: K separate `explain` calls, what a user running one target at a time waits for;
- K in one session: the K targets one after another in one `ExplainSession` (segmentation shared),
  which isolates what sharing the forward and batching the backward buy.
The maps of the batched run are compared with the single runs' (largest relative difference).
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import numpy as np
import torch

TARGET_METHODS = ("Saliency", "IntegratedGradients")


def split_segmentation(labels: np.ndarray, k: int, class_index: int = 1) -> List[np.ndarray]:
    """The voxels of `class_index` split into `k` boolean masks of (nearly) equal size, ordered along I."""
    coords = np.argwhere(labels == class_index)
    if len(coords) < k:
        raise SystemExit(f"esegeta bench: the model segments only {len(coords)} voxels; cannot make {k} targets")
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0]))
    masks = []
    for part in np.array_split(coords[order], k):
        mask = np.zeros(labels.shape, bool)
        mask[tuple(part.T)] = True
        masks.append(mask)
    return masks


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def targets_study(loaded, device: torch.device, size: str = "sample", k: int = 8,
                  methods: Sequence[str] = TARGET_METHODS, quick: bool = False, vjp: str = "auto") -> Dict:
    """Time K targets batched against K single runs; returns a JSON-ready dict and prints a table."""
    from .api import explain
    from .benchmark import bench_params, make_volume
    from .engine import ExplainSession
    from .options import EngineOptions, Target

    array, spacing = make_volume(size)
    options = EngineOptions(device=device.type, precision="fp32", divisor=loaded.card.divisor,
                            target_batch=k, extra={"target_vjp": vjp})
    probe = explain(array, loaded, ["Saliency"], Target(class_index=1, region="whole"), options, spacing=spacing)
    masks = split_segmentation(probe.segmentation, k)
    rows = []
    label = "x".join(map(str, array.shape[1:]))
    for name in methods:
        params = bench_params(name, quick)
        explain(array, loaded, [(name, params)], Target(class_index=1, region="roi", mask=masks[0]), options,
                spacing=spacing)  # warm-up: imports, allocator
        t_batched, batched = _timed(lambda: explain(array, loaded, [(name, params)],
                                                    Target(class_index=1, region="rois", masks=masks), options,
                                                    spacing=spacing), device)
        t_singles, singles = _timed(lambda: [explain(array, loaded, [(name, params)],
                                                     Target(class_index=1, region="roi", mask=m), options,
                                                     spacing=spacing) for m in masks], device)

        def one_session():
            session = ExplainSession(array, loaded, Target(class_index=1, region="rois", masks=masks), options,
                                     spacing=spacing)
            return [session.attribute(name, params, target=j) for j in range(k)]

        t_session, _ = _timed(one_session, device)
        worst = 0.0
        for j, single in enumerate(singles):
            a = batched.results[f"roi_{j + 1}/{name}"].attribution
            b = single.results[name].attribution
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
        diag = batched.results[f"roi_1/{name}"].diagnostics
        rows.append({"size": label, "method": name, "targets": k, "batched_s": t_batched, "singles_s": t_singles,
                     "one_session_s": t_session, "ratio_to_singles": t_batched / t_singles,
                     "ratio_to_one_session": t_batched / t_session, "max_relative_difference": worst,
                     "target_vjp": diag.get("target_vjp"), "params": params,
                     "voxels_per_target": int(masks[0].sum())})
        print(format_rows(rows[-1:]), flush=True)
    return {"device": str(device), "size": label, "targets": k, "threads": torch.get_num_threads(), "rows": rows}


def format_rows(rows: List[Dict]) -> str:
    lines = ["| size | method | K | batched s | K singles s | x singles | K in one session s | x session | "
             "max rel diff | backward |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['method']} | {r['targets']} | {r['batched_s']:.2f} | {r['singles_s']:.2f} | "
                     f"{r['ratio_to_singles']:.2f} | {r['one_session_s']:.2f} | {r['ratio_to_one_session']:.2f} | "
                     f"{r['max_relative_difference']:.1e} | {r['target_vjp']} |")
    return "\n".join(lines)
