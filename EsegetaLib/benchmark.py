"""Side-by-side timing: Esegeta vs plain Captum vs TorchEsegeta's configuration vs the floor.

One run, one model, several volume sizes; prints a table and writes JSON. The floor of a method is
the number of network passes it needs times the measured per-sample cost of one pass at the best
batch size, on the voxels actually processed (a patched run's floor counts its windows, and the
report says how many voxels the overlap adds).
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .commands.bench import BENCH_METHODS  # noqa: F401  (one list, shared with the CLI)


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




# --------------------------------------------------------------------------- the three runners
def bench_params(method: str, quick: bool) -> Dict:
    """The same parameters for every runner. Perturbations cover the whole volume (no region
    restriction), since plain Captum and TorchEsegeta cannot restrict them."""
    steps = 16 if quick else 50
    return {
        "Saliency": {"absolute": False},
        "IntegratedGradients": {"n_steps": steps},
        "SmoothGrad": {"nt_samples": 4 if quick else 16},
        "GradCAM": {},
        "Occlusion": {"restrict_to_region": False, **({"window_fraction": 0.25} if quick else {})},
        "KernelShap": {"n_samples": 32 if quick else 256, "restrict_to_region": False},
    }[method]


def _pad_to(x: torch.Tensor, divisor: int):
    """Edge-pad the spatial axes to a multiple of `divisor`; returns (padded, crop slices)."""
    shape = x.shape[2:]
    target = [int(math.ceil(n / divisor) * divisor) for n in shape]
    pads = []
    for n, t in reversed(list(zip(shape, target))):
        pads += [0, t - n]
    padded = torch.nn.functional.pad(x, pads, mode="replicate") if any(pads) else x
    return padded, (slice(None), slice(None)) + tuple(slice(0, n) for n in shape)


def _context(spec, forward, network, x, params, stats, region, prepared, batch, forward_args=()):
    from .methods.base import MethodContext

    gen = torch.Generator().manual_seed(0)
    return MethodContext(forward=forward, network=network, inputs=x, params=params, stats=stats,
                         forward_args=forward_args, prepared=prepared, layer=None, region=region,
                         generator=gen, internal_batch_size=batch)


def run_captum_whole(session, spec, params, batch: int) -> torch.Tensor:
    """Plain Captum on the whole (padded) volume: the catalogue's Captum call with a single
    whole-volume score, Captum's NoiseTunnel for noise tunnels, internal batch `batch`."""
    from captum.attr import NoiseTunnel, Saliency

    from .methods import noise as nt
    from .targets import TargetScore

    x = session.volume[None].to(session.device, session.dtype)
    region = torch.from_numpy(session.region)[None, None].to(session.device, session.dtype)
    xp, crop = _pad_to(x, session.options.divisor)
    rp, _ = _pad_to(region, session.options.divisor)
    rp = rp * 0
    rp[crop] = region
    score = TargetScore(session.network, session.target, session.device)
    if spec.patching == "noise_tunnel":
        sigma = nt.stdev(session.stats, params)
        attr = NoiseTunnel(Saliency(score)).attribute(
            xp, nt_type=nt.NT_TYPES[spec.name], nt_samples=params["nt_samples"], stdevs=sigma,
            nt_samples_batch_size=batch, additional_forward_args=(rp,), abs=True)
        return attr[crop].detach()
    prepared = spec.prepare(xp, session.stats, params, torch.Generator().manual_seed(0)) if spec.prepare else {}
    if spec.patching == "global":
        # perturbation methods call forward(x) alone: bind the region as a closure module
        class WholeScore(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.score = score

            def forward(self, v, *unused):
                return self.score(v, rp.expand(v.shape[0], *rp.shape[1:]))

        ctx = _context(spec, WholeScore(), session.network, xp, params, session.stats, rp, prepared, batch)
    else:
        ctx = _context(spec, score, session.network, xp, params, session.stats, rp, prepared, batch, (rp,))
    out = spec.attribute(ctx)
    out = out[0] if isinstance(out, tuple) else out
    if spec.finalize is not None:
        out = spec.finalize(out, params)
    return out[crop].detach()


def run_torchesegeta(session, spec, params, patch: int = 64, overlap: int = 12) -> torch.Tensor:
    """TorchEsegeta's configuration: torchio grid patches (64^3, overlap 12), batch 1, each patch
    scored on its own (its own predicted mask), Captum per patch, patches averaged."""
    import torchio as tio
    from captum.attr import NoiseTunnel, Saliency

    from .methods import noise as nt
    from .targets import TargetScore

    x = session.volume.float()
    subject = tio.Subject(image=tio.ScalarImage(tensor=x))
    size = tuple(min(patch, n) for n in x.shape[1:])
    size = tuple(max(session.options.divisor, (s // session.options.divisor) * session.options.divisor) for s in size)
    sampler = tio.inference.GridSampler(subject, size, overlap if min(size) > overlap else 0)
    aggregator = tio.inference.GridAggregator(sampler, overlap_mode="average")
    loader = torch.utils.data.DataLoader(sampler, batch_size=1)
    score = TargetScore(session.network, session.target, session.device)
    full = x[None].to(session.device, session.dtype)
    prepared_full = spec.prepare(full, session.stats, params, torch.Generator().manual_seed(0)) if spec.prepare else {}
    for batch in loader:
        xb = batch["image"][tio.DATA].to(session.device, session.dtype)
        loc = batch[tio.LOCATION][0]
        index = (slice(None), slice(None)) + tuple(slice(int(loc[a]), int(loc[a + 3])) for a in range(3))
        with torch.no_grad():
            logits = score.logits(xb)
        own = (logits.argmax(1, keepdim=True) == session.target.class_index).to(xb.dtype)
        if own.sum() == 0:  # TorchEsegeta scored every patch; an empty mask gives a zero map
            own = torch.zeros_like(own)
        prepared = {k: v[index] if v.shape[0] == 1 else v[(slice(None),) + index] for k, v in prepared_full.items()}
        if spec.patching == "noise_tunnel":
            attr = NoiseTunnel(Saliency(score)).attribute(
                xb, nt_type=nt.NT_TYPES[spec.name], nt_samples=params["nt_samples"],
                stdevs=nt.stdev(session.stats, params), nt_samples_batch_size=1,
                additional_forward_args=(own,), abs=True)
        elif spec.patching == "global":
            class PatchScore(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.score = score

                def forward(self, v, *unused):
                    return self.score(v, own.expand(v.shape[0], *own.shape[1:]))

            attr = spec.attribute(_context(spec, PatchScore(), session.network, xb, params, session.stats,
                                           own, prepared, 1))
        else:
            attr = spec.attribute(_context(spec, score, session.network, xb, params, session.stats, own,
                                           prepared, 1, (own,)))
        attr = attr[0] if isinstance(attr, tuple) else attr
        if spec.finalize is not None and spec.patching != "noise_tunnel":
            attr = spec.finalize(attr, params)
        aggregator.add_batch(attr.detach().float().cpu(), batch[tio.LOCATION])
    return aggregator.get_output_tensor()[None]


# --------------------------------------------------------------------------- the driver
def make_volume(size: str, seed: int = 0):
    """(array (C,I,J,K), spacing) for a size name: the bundled sample or a generated TOF-like cube."""
    from .sample import generate_tof_like, load_sample

    if size == "sample":
        image = load_sample()
        return image.array, tuple(image.spacing)
    shape = (448, 448, 160) if size == "tof" else tuple(int(v) for v in size.split("x")) if "x" in size else (int(size),) * 3
    image, _ = generate_tof_like(shape, (0.4, 0.4, 0.5), seed)
    return image.array, tuple(image.spacing)


def _passes(spec, params, result_diag: Dict) -> Dict[str, float]:
    """(passes, backward?) a method needs per window: the floor's multiplier."""
    if spec.patching == "global":
        return {"window_passes": float(result_diag.get("windows_rerun", 0)), "backward": False}
    steps = {"IntegratedGradients": params.get("n_steps", 1), "SmoothGrad": params.get("nt_samples", 1)}
    return {"window_passes": float(steps.get(spec.name, 1)), "backward": True}


def _warm_up(loaded, methods, device) -> None:
    """One untimed run of each method on a tiny volume: imports, lazy initialisation, allocator."""
    from .api import explain
    from .options import EngineOptions, Target

    array, spacing = make_volume("24")
    options = EngineOptions(device=device.type, divisor=loaded.card.divisor)
    for name in methods:
        explain(array, loaded, [(name, bench_params(name, True))], Target(class_index=1, region="whole"),
                options, spacing=spacing)


def run(args) -> Dict:
    from .api import explain
    from .engine import ExplainSession
    from .methods import get_method
    from .models import load_default_model
    from .options import EngineOptions, Target

    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.memory_cap_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), device)
    sizes = (args.sizes or ("sample,64,96" if args.quick or device.type == "cpu" else "sample,256,tof")).split(",")
    skip = set(filter(None, args.skip.split(",")))
    loaded = load_default_model()
    _warm_up(loaded, args.methods.split(","), device)
    rows: List[Row] = []
    floors: Dict[str, Dict] = {}
    for size in sizes:
        array, spacing = make_volume(size)
        options = EngineOptions(device=device.type, precision="fp32", divisor=loaded.card.divisor)
        target = Target(class_index=1, region="predicted")
        session = ExplainSession(array, loaded, target, options, spacing=spacing)
        patch = tuple(session.grid.patch) if hasattr(session.grid, "patch") else tuple(
            w.stop - w.start for w in session.windows[0])
        n_windows = len(session.active)
        window_voxels = int(np.prod(patch))
        overlap_factor = n_windows * window_voxels / float(np.prod(array.shape[1:]))
        costs = {b: pass_cost(session.network, patch, array.shape[0], device, backward=b) for b in (True, False)}
        floors[size] = {"patch": list(patch), "windows": n_windows, "voxels_processed_over_volume": overlap_factor,
                        "fwd_bwd_per_window_s": costs[True]["per_sample_s"], "fwd_per_window_s": costs[False]["per_sample_s"],
                        "best_batch": costs[True]["best_batch"], "shape": list(array.shape[1:])}
        label = "x".join(map(str, array.shape[1:]))
        for name in args.methods.split(","):
            spec = get_method(name)
            params = spec.resolve_params(bench_params(spec.name, args.quick))
            t, expl, peak = timed(lambda: explain(array, loaded, [(spec.name, params)], target, options,
                                                  spacing=spacing), device)
            result = expl.results[spec.name]
            reference = result.attribution
            need = _passes(spec, params, result.diagnostics)
            per = costs[need["backward"]]["per_sample_s"]
            windows = 1.0 if spec.patching == "global" else n_windows
            # + the segmentation pass every explain run makes (one forward per window)
            floor = need["window_passes"] * windows * per + n_windows * costs[False]["per_sample_s"]
            rows.append(Row(label, spec.name, "esegeta", t, peak, floor, 1.0,
                            note=f"{n_windows} windows of {'x'.join(map(str, patch))}"))
            if "captum" not in skip:
                best = None
                for batch in ((1, 4) if args.quick else (1, 4, 16)):
                    try:
                        tc, out, pk = timed(lambda: run_captum_whole(session, spec, params, batch), device)
                    except (torch.OutOfMemoryError, RuntimeError) as exc:
                        if "out of memory" in str(exc).lower() or isinstance(exc, torch.OutOfMemoryError):
                            rows.append(Row(label, spec.name, "captum", float("nan"), None, note=f"OOM at batch {batch}"))
                            break
                        raise
                    if best is None or tc < best[0]:
                        best = (tc, out, pk, batch)
                if best:
                    rows.append(Row(label, spec.name, "captum", best[0], best[2], None,
                                    pearson(best[1].cpu().numpy(), reference), note=f"internal batch {best[3]}"))
            if "torchesegeta" not in skip:
                tt, out, pk = timed(lambda: run_torchesegeta(session, spec, params), device)
                rows.append(Row(label, spec.name, "torchesegeta", tt, pk, None,
                                pearson(out.numpy(), reference), note="64^3, overlap 12, batch 1, average"))
            print(format_table([r for r in rows if r.size == label and r.method == spec.name]), flush=True)
    report = {"environment": environment(), "device": str(device), "quick": bool(args.quick),
              "memory_cap_gb": args.memory_cap_gb, "floors": floors,
              "rows": [r.__dict__ for r in rows], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print()
    print(format_table(rows))
    with open(args.json_path, "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    print(f"\nwrote {args.json_path}")
    return report


def main(argv=None) -> int:
    from .commands.bench import build_parser

    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
