"""Side-by-side timing: Esegeta vs plain Captum vs TorchEsegeta's configuration vs the floor.

One run, one model, several volume sizes; prints a table and writes JSON. The floor of a method is
the number of network passes it needs times the measured per-sample cost of one pass at the best
batch size, on the voxels actually processed (a patched run's floor counts its windows, and the
report says how many voxels the overlap adds).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

BENCH_METHODS = ("Saliency", "IntegratedGradients", "SmoothGrad", "GradCAM", "Occlusion", "KernelShap")


# --------------------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:  # CPU: the process's high-water mark (resource is POSIX-only)
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # pragma: no cover
        return None


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1):
    """(best seconds over `repeats`, result of the last call, peak bytes)."""
    best, out = math.inf, None
    _reset_peak(device)
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out, _peak_bytes(device)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


# --------------------------------------------------------------------------- the floor
def pass_cost(network: torch.nn.Module, shape, channels: int, device: torch.device,
              backward: bool, batch_sizes=(1, 2, 4, 8, 16), budget_s: float = 20.0) -> Dict[str, float]:
    """Per-sample seconds of one forward(+backward) at the best batch size that fits."""
    results = {}
    spent = 0.0
    for bs in batch_sizes:
        x = torch.randn((bs, channels) + tuple(shape), device=device, requires_grad=backward)

        def step():
            out = network(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            if backward:
                out[:, -1].sum().backward()
            return None

        try:
            step()  # warm-up
            t, _, _ = timed(step, device, repeats=2)
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # OOM ends the search
            if "out of memory" not in str(exc).lower() and not isinstance(exc, torch.OutOfMemoryError):
                raise
            break
        results[bs] = t / bs
        spent += 3 * t
        if spent > budget_s:
            break
    best_bs = min(results, key=results.get)
    return {"per_sample_s": results[best_bs], "best_batch": best_bs, "by_batch": results}


@dataclass
class Row:
    size: str
    method: str
    runner: str
    seconds: float
    peak_bytes: Optional[int]
    floor_s: Optional[float] = None
    corr_with_esegeta: Optional[float] = None
    note: str = ""
    extra: Dict = field(default_factory=dict)


def format_table(rows: List[Row]) -> str:
    """Seconds, ratio to the floor, to plain Captum and to TorchEsegeta, peak memory."""
    by_key = {(r.size, r.method, r.runner): r for r in rows}
    lines = [f"{'size':>14} {'method':>20} {'runner':>13} {'seconds':>9} {'x floor':>8} "
             f"{'x captum':>9} {'x TorchEsegeta':>15} {'peak MB':>9} {'r':>6}  note"]
    for r in rows:
        cap = by_key.get((r.size, r.method, "captum"))
        te = by_key.get((r.size, r.method, "torchesegeta"))
        ratio = lambda o: f"{r.seconds / o.seconds:.2f}" if o and o.seconds else "-"  # noqa: E731
        lines.append(
            f"{r.size:>14} {r.method:>20} {r.runner:>13} {r.seconds:9.3f} "
            f"{(r.seconds / r.floor_s if r.floor_s else float('nan')):8.2f} {ratio(cap):>9} {ratio(te):>15} "
            f"{(r.peak_bytes or 0) / 2**20:9.0f} "
            f"{'' if r.corr_with_esegeta is None else format(r.corr_with_esegeta, '.3f'):>6}  {r.note}"
        )
    return "\n".join(lines)


def environment() -> Dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "threads": str(torch.get_num_threads())}
    try:
        import captum

        info["captum"] = captum.__version__
    except Exception:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="esegeta bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CPU-sized volumes and fewer steps")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--methods", default=",".join(BENCH_METHODS))
    parser.add_argument("--sizes", default=None, help="comma list: sample, 64, 96, 256, tof (448x448x160)")
    parser.add_argument("--memory-cap-gb", type=float, default=None, help="GPU memory cap forcing patches")
    parser.add_argument("--json", dest="json_path", default="benchmark.json")
    parser.add_argument("--skip", default="", help="comma list of runners to skip: captum,torchesegeta")
    return parser
