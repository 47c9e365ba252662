"""Side-by-side timing: Esegeta vs plain Captum vs TorchEsegeta's configuration vs the floor.

One run, one model, several volume sizes; prints a table and writes JSON. The floor of a method is
the number of network passes it needs times the measured per-sample cost of one pass at the best
batch size, on the voxels actually processed (a patched run's floor counts its windows, and the
report says how many voxels the overlap adds). Peak memory: CUDA max_memory_allocated; CPU the
resident-set peak above the call's start. Out-of-memory (plain Captum on a volume that does not fit)
is a row, not a crash. The option study (bf16/fp16, torch.compile, channels-last-3d, cudnn.benchmark)
is in bench_options.py. Figures and how to read them: docs/PERFORMANCE.md.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import threading
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


def load_average() -> Optional[float]:
    """1-minute load average: timings on a shared CPU are only comparable at similar load."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - not POSIX
        return None


class PeakMemory:
    """Peak memory of one call. CUDA: torch.cuda.max_memory_allocated (tensors only, absolute, weights
    included). CPU: the peak resident set size above the level at the start of the call, sampled
    every 5 ms from /proc/self/statm (the CPU allocator has no peak counter; ru_maxrss is a lifetime
    high-water mark and would not tell one runner from another)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, None, threading.Event()

    @staticmethod
    def _rss() -> Optional[int]:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
            return None

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            rss = self._rss()
            if rss is not None:
                self._high = max(self._high, rss)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start = self._rss()
            self._high = self._start or 0
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            rss = self._rss()
            if self._start is not None and rss is not None:
                self.peak = max(self._high, rss) - self._start
        return False


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1):
    """(best seconds over `repeats`, result of the last call, peak bytes: see PeakMemory)."""
    best, out = math.inf, None
    with PeakMemory(device) as memory:
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out = fn()
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return best, out, memory.peak


def pearson(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def out_of_memory(error: BaseException, device: torch.device) -> bool:
    """True (and the cache released) for an out-of-memory error, so the caller can report it."""
    from .device import is_out_of_memory, release_memory

    if is_out_of_memory(error):
        release_memory(device)
        return True
    return False


# --------------------------------------------------------------------------- the floor
def fwd_bwd_step(network: torch.nn.Module, x: torch.Tensor, backward: bool, head: int = -1):
    """One forward (+ the input gradient of a class score, as every gradient method takes it:
    torch.autograd.grad w.r.t. the input only, so no weight gradients are computed or stored)."""
    if not backward:
        with torch.no_grad():
            out = network(x)
        return out[0] if isinstance(out, (list, tuple)) else out
    x = x.detach().requires_grad_(True)
    out = network(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return torch.autograd.grad(out[:, head].float().sum(), x)[0]


def pass_cost(network: torch.nn.Module, shape, channels: int, device: torch.device,
              backward: bool, batch_sizes=(1, 2, 4, 8, 16), budget_s: float = 20.0) -> Dict[str, float]:
    """Per-sample seconds of one forward(+backward) at the best batch size that fits (a batch
    that runs out of memory ends the search)."""
    results = {}
    spent = 0.0
    for bs in batch_sizes:
        x = torch.randn((bs, channels) + tuple(shape), device=device)
        try:
            fwd_bwd_step(network, x, backward)  # warm-up
            t, _, _ = timed(lambda: fwd_bwd_step(network, x, backward), device, repeats=2)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory ends the search
            if not out_of_memory(exc, device):
                raise
            break
        results[bs] = t / bs
        spent += 3 * t
        if spent > budget_s:
            break
    if not results:
        raise RuntimeError(f"one {tuple(shape)} window does not fit on {device}")
    best_bs = min(results, key=results.get)
    return {"per_sample_s": results[best_bs], "best_batch": best_bs, "by_batch": results}


def floor_seconds(spec, params, diagnostics: Dict, n_windows: int, n_active: int, costs: Dict) -> Dict:
    """The floor of one Esegeta run, in passes over windows of the patch size:

    - the segmentation pass every run makes: one forward per window (all windows);
    - gradient methods: passes per window (IG: n_steps; noise tunnels: nt_samples; else 1) forward+
      backward on each window touching the region (GradCAM's backward stops at a layer: its floor is
      counted as a full forward+backward, an upper bound);
    - perturbation methods: one forward per active window for the unperturbed score plus one per
      window actually rerun (the result's diagnostics `windows_rerun`).
    Overlap is counted: every window is a full patch, so the floor is on the voxels processed.
    """
    seg = n_windows * costs[False]["per_sample_s"]
    if spec.patching == "global":
        passes = float(diagnostics.get("windows_rerun", 0)) + n_active
        work = passes * costs[False]["per_sample_s"]
        kind = "forward"
    else:
        per_window = {"IntegratedGradients": params.get("n_steps", 1)}.get(spec.name, 1)
        if spec.patching == "noise_tunnel":
            per_window = int(params.get("nt_samples", 1)) * (int(params.get("n_steps", 1)) if
                                                             params.get("base_method") == "IntegratedGradients" else 1)
        passes = float(per_window) * n_active
        work = passes * costs[True]["per_sample_s"]
        kind = "forward+backward"
    return {"floor_s": seg + work, "window_passes": passes, "pass_kind": kind, "segmentation_s": seg}


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
    load: Optional[float] = None
    extra: Dict = field(default_factory=dict)


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    ok = a is not None and b is not None and b > 0 and not (math.isnan(a) or math.isnan(b))
    return f"{a / b:.2f}" if ok else "-"


def format_table(rows: List[Row]) -> str:
    """Seconds, ratio to the floor, to plain Captum and to TorchEsegeta, peak memory, load."""
    by_key = {(r.size, r.method, r.runner): r for r in rows}
    lines = [f"{'size':>12} {'method':>20} {'runner':>13} {'seconds':>9} {'x floor':>8} "
             f"{'x captum':>9} {'x TorchEs.':>10} {'peak MB':>8} {'r':>6} {'load':>5}  note"]
    for r in rows:
        cap = by_key.get((r.size, r.method, "captum"))
        te = by_key.get((r.size, r.method, "torchesegeta"))
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        corr = "" if r.corr_with_esegeta is None else format(r.corr_with_esegeta, ".3f")
        lines.append(
            f"{r.size:>12} {r.method:>20} {r.runner:>13} {r.seconds:9.3f} {_ratio(r.seconds, r.floor_s):>8} "
            f"{_ratio(r.seconds, cap and cap.seconds):>9} {_ratio(r.seconds, te and te.seconds):>10} "
            f"{peak:>8} {corr:>6} {'' if r.load is None else r.load:>5}  {r.note}")
    return "\n".join(lines)


def environment() -> Dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": _cpu_name(), "cpu_count": str(os.cpu_count()), "threads": str(torch.get_num_threads())}
    try:
        import captum

        info["captum"] = captum.__version__
    except Exception:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}"
        info["cuda"] = str(torch.version.cuda)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor()


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
    """Plain Captum on the whole (padded) volume: one whole-volume forward for the predicted region,
    then the catalogue's Captum call with a single whole-volume score (the same parameters as
    Esegeta), Captum's NoiseTunnel for noise tunnels, internal batch `batch`."""
    from captum.attr import NoiseTunnel, Saliency

    from .methods import noise as nt
    from .targets import TargetScore

    x = session.volume[None].to(session.device, session.dtype)
    xp, crop = _pad_to(x, session.options.divisor)
    score = TargetScore(session.network, session.target, session.device)
    # a plain-Captum user needs the prediction too: one whole-volume forward gives the region
    with torch.no_grad():
        predicted = score.logits(xp).argmax(1, keepdim=True) == session.target.class_index
    rp = torch.zeros_like(xp[:, :1])
    rp[crop] = predicted[crop].to(rp.dtype)
    del predicted
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


def _warm_up(loaded, methods, device) -> None:
    """One untimed run of each method on a tiny volume: imports, lazy initialisation, allocator."""
    from .api import explain
    from .options import EngineOptions, Target

    array, spacing = make_volume("24")
    options = EngineOptions(device=device.type, divisor=loaded.card.divisor)
    for name in methods:
        explain(array, loaded, [(name, bench_params(name, True))], Target(class_index=1, region="whole"),
                options, spacing=spacing)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("esegeta bench: --device cuda but this torch sees no CUDA device")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def apply_memory_cap(device: torch.device, cap_gb: Optional[float]) -> Optional[str]:
    """Cap this process's CUDA memory (torch's allocator refuses beyond it: an OOM, like a smaller
    card). On CPU the cap is not applied; the note says so."""
    if not cap_gb:
        return None
    if device.type != "cuda":
        return "memory cap ignored on CPU"
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), device)
    return f"capped at {cap_gb:g} GB of {total / 2**30:.0f} GB"


def default_sizes(quick: bool, device: torch.device) -> str:
    return "sample,64,96" if quick or device.type == "cpu" else "sample,256,tof"


def _geometry(session, array) -> Dict:
    """Windows, patch and how many voxels the overlap (and the padding) adds per pass."""
    patch = tuple(int(n) for n in session.grid.patch)
    window_voxels = int(np.prod(patch))
    volume_voxels = int(np.prod(array.shape[1:]))
    n_windows, n_active = len(session.windows), len(session.active)
    return {"shape": list(array.shape[1:]), "patch": list(patch), "windows": n_windows, "active_windows": n_active,
            "overlap": session.options.overlap, "volume_voxels": volume_voxels,
            "voxels_per_pass": n_windows * window_voxels,
            "overlap_and_padding_voxels": n_windows * window_voxels - volume_voxels,
            "voxels_processed_over_volume": n_windows * window_voxels / float(volume_voxels)}


def bench_captum(session, spec, params, batches, device, label, reference) -> Row:
    """The best internal batch of plain Captum on the whole volume; an out-of-memory is a result."""
    best, notes, tried = None, [], {}
    for batch in batches:
        try:
            t, out, peak = timed(lambda: run_captum_whole(session, spec, params, batch), device)
        except Exception as exc:  # noqa: BLE001 - out of memory is reported, anything else raised
            if not out_of_memory(exc, device):
                raise
            notes.append(f"out of memory at internal batch {batch}")
            break
        tried[batch] = round(t, 4)
        if best is None or t < best[0]:
            best = (t, out.cpu().numpy(), peak, batch)
        del out
    if best is None:
        return Row(label, spec.name, "captum", float("nan"), None, note="; ".join(notes) + ": cannot run whole",
                   load=load_average())
    notes.insert(0, f"internal batch {best[3]} (tried {','.join(map(str, batches))})")
    return Row(label, spec.name, "captum", best[0], best[2], None, pearson(best[1], reference),
               note="; ".join(notes), load=load_average(), extra={"seconds_by_internal_batch": tried})


def bench_torchesegeta(session, spec, params, device, label, reference) -> Row:
    try:
        t, out, peak = timed(lambda: run_torchesegeta(session, spec, params), device)
    except Exception as exc:  # noqa: BLE001
        if not out_of_memory(exc, device):
            raise
        return Row(label, spec.name, "torchesegeta", float("nan"), None, note="out of memory", load=load_average())
    return Row(label, spec.name, "torchesegeta", t, peak, None, pearson(out.numpy(), reference),
               note="64^3, overlap 12, batch 1, average", load=load_average())


def run(args) -> Dict:
    """`esegeta bench`: see the module docstring. `--threads` holds only for this call."""
    saved = torch.get_num_threads()
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(int(args.threads))
        if getattr(args, "quick_look", False) or getattr(args, "metrics_cost", False):
            from .bench_quick import run_extras

            return run_extras(args)
        return _run(args)
    finally:
        torch.set_num_threads(saved)


def _run(args) -> Dict:
    from .api import explain
    from .engine import ExplainSession
    from .methods import get_method
    from .models import load_default_model
    from .options import EngineOptions, Target

    device = pick_device(args.device)
    cap_note = apply_memory_cap(device, args.memory_cap_gb)
    sizes = [v for v in (default_sizes(args.quick, device) if args.sizes is None else args.sizes).split(",") if v]
    methods = [m for m in args.methods.split(",") if m]
    skip = set(filter(None, args.skip.split(",")))
    batches = (1, 4) if args.quick else (1, 4, 16)
    loaded = load_default_model()
    if sizes:
        _warm_up(loaded, methods, device)
    rows: List[Row] = []
    floors: Dict[str, Dict] = {}
    report = {"environment": environment(), "device": str(device), "quick": bool(args.quick),
              "command": "esegeta bench " + " ".join(getattr(args, "argv", None) or []),
              "memory_cap_gb": args.memory_cap_gb, "memory_cap": cap_note, "floors": floors,
              "peak_memory": "CUDA: torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "CPU: peak resident set size above the level at the call's start (/proc/self/statm, 5 ms)",
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_average_start": load_average(), "_rows": rows}
    for size in sizes:
        array, spacing = make_volume(size)
        # Esegeta at the API's defaults (whole volume in one window up to 128^3, else 96^3 patches,
        # overlap 0.25, batch 'auto'), fp32 so that the runners compute the same function.
        batch = getattr(args, "batch_size", "auto") or "auto"
        options = EngineOptions(device=device.type, precision="fp32", divisor=loaded.card.divisor,
                                patch_size=args.patch_size, batch_size=batch if batch == "auto" else int(batch))
        target = Target(class_index=1, region="predicted")
        session = ExplainSession(array, loaded, target, options, spacing=spacing)
        geometry = _geometry(session, array)
        patch = tuple(geometry["patch"])
        costs = {b: pass_cost(session.network, patch, array.shape[0], device, backward=b) for b in (True, False)}
        label = "x".join(map(str, array.shape[1:]))
        floors[label] = {**geometry, "fwd_bwd_per_window_s": costs[True]["per_sample_s"],
                         "fwd_per_window_s": costs[False]["per_sample_s"],
                         "best_batch_fwd_bwd": costs[True]["best_batch"], "best_batch_fwd": costs[False]["best_batch"],
                         "esegeta_batch_size": session.batch_size}
        print(f"\n{label}: {geometry['windows']} windows of {'x'.join(map(str, patch))} "
              f"({geometry['active_windows']} touch the region); overlap and padding add "
              f"{geometry['overlap_and_padding_voxels']} voxels per pass "
              f"(x{geometry['voxels_processed_over_volume']:.2f}); fwd+bwd {costs[True]['per_sample_s']:.4f} s, "
              f"fwd {costs[False]['per_sample_s']:.4f} s per window", flush=True)
        for name in methods:
            spec = get_method(name)
            params = spec.resolve_params(bench_params(spec.name, args.quick))
            try:
                t, expl, peak = timed(lambda: explain(array, loaded, [(spec.name, params)], target, options,
                                                      spacing=spacing), device)
            except Exception as exc:  # noqa: BLE001 - Esegeta's own OOM message is an EsegetaError
                if not out_of_memory(exc, device):
                    raise
                rows.append(Row(label, spec.name, "esegeta", float("nan"), None, note="out of memory",
                                load=load_average()))
                continue
            result = expl.results[spec.name]
            reference = np.asarray(result.attribution)
            floor = floor_seconds(spec, params, result.diagnostics, geometry["windows"],
                                  geometry["active_windows"], costs)
            rows.append(Row(label, spec.name, "esegeta", t, peak, floor["floor_s"], 1.0,
                            note=f"{floor['window_passes']:.0f} {floor['pass_kind']} window passes "
                                 f"+ segmentation", load=load_average(),
                            extra={**floor, "diagnostics": {k: v for k, v in result.diagnostics.items()
                                                            if isinstance(v, (int, float, str))}}))
            del expl
            if "captum" not in skip:
                rows.append(bench_captum(session, spec, params, batches, device, label, reference))
            if "torchesegeta" not in skip:
                rows.append(bench_torchesegeta(session, spec, params, device, label, reference))
            print(format_table([r for r in rows if r.size == label and r.method == spec.name]), flush=True)
            _write(args.json_path, report)  # after every method: a stopped run keeps what it measured
    if getattr(args, "targets", None):
        from .bench_targets import targets_study

        report["targets"] = targets_study(loaded, device, getattr(args, "targets_size", None) or "sample",
                                          int(args.targets), quick=args.quick,
                                          vjp=getattr(args, "targets_vjp", "auto") or "auto")
        _write(args.json_path, report)
    if getattr(args, "targets_bound", False):
        from .bench_bound import targets_bound

        report["targets_bound"] = targets_bound(loaded, device, getattr(args, "targets_size", None) or "sample",
                                                int(args.targets or 8),
                                                measured=(report.get("targets") or {}).get("rows"))
        _write(args.json_path, report)
    if getattr(args, "options_study", False):
        from .bench_options import option_study

        skip_options = set(filter(None, (getattr(args, "study_skip", "") or "").split(",")))
        def save(study):
            report["options"] = study
            _write(args.json_path, report)

        report["options"] = option_study(loaded, device, args.study_size, args.quick, skip_options, save)
    report["load_average_end"] = load_average()
    print()
    print(format_table(rows))
    _write(args.json_path, report)
    print(f"\nwrote {args.json_path}")
    return {k: v for k, v in report.items() if k != "_rows"}


def markdown(report: Dict) -> str:
    """The JSON of a run as docs/PERFORMANCE.md tables (runners, then the option study)."""
    rows = [Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__}) for r in report.get("rows", [])]
    by_key = {(r.size, r.method, r.runner): r for r in rows}
    out = ["| size | method | runner | seconds | x floor | x Captum | x TorchEsegeta | peak MB | r | load | note |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        cap, te = by_key.get((r.size, r.method, "captum")), by_key.get((r.size, r.method, "torchesegeta"))
        seconds = "-" if r.seconds is None or math.isnan(r.seconds) else f"{r.seconds:.2f}"
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        corr = "" if r.corr_with_esegeta is None else f"{r.corr_with_esegeta:.3f}"
        out.append(f"| {r.size} | {r.method} | {r.runner} | {seconds} | {_ratio(r.seconds, r.floor_s)} | "
                   f"{_ratio(r.seconds, cap and cap.seconds)} | {_ratio(r.seconds, te and te.seconds)} | {peak} | "
                   f"{corr} | {'' if r.load is None else r.load} | {r.note} |")
    if not rows:
        out = []
    study = report.get("options")
    if study:
        out += ["", f"Option study on {'x'.join(map(str, study['size']))}, {study.get('threads', '?')} thread(s):", "",
                "| level | option | seconds | x fp32 | r with fp32 | load | note |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in study["engine"] + study["model"]:
            f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
            first = f"; first call {r['first_call_s']:.1f} s" if r.get("first_call_s", 0) > 5 else ""
            out.append(f"| {r['level']} | {r['option']} | {f(r['seconds'], '.4f')} | {f(r['ratio_to_fp32'], '.2f')} | "
                       f"{f(r['corr_with_fp32'], '.4f')} | {r.get('load', '')} | {r.get('note', '')}{first} |")
    return "\n".join(out)


def _write(path: str, report: Dict) -> None:
    report["rows"] = [r.__dict__ for r in report["_rows"]]
    with open(path, "w") as handle:
        json.dump({k: v for k, v in report.items() if k != "_rows"}, handle, indent=1, default=str)


def main(argv=None) -> int:
    from .commands.bench import build_parser

    args = build_parser().parse_args(argv)
    if args.from_json:
        for path in args.from_json:
            with open(path) as handle:
                print(markdown(json.load(handle)))
        return 0
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
