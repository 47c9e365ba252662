"""The option study of `esegeta bench --options-study`: one speed option at a time against fp32.

Each option is reported with its time ratio to the fp32 baseline (< 1 is faster) and the Pearson
correlation of its map (or input gradient) with the fp32 one. Two levels:

- engine: what `EngineOptions` offers today (`precision` fp32 / bf16 / fp16), through `api.explain`;
- model: options the engine does not offer yet (`torch.compile`, channels-last-3d,
  `cudnn.benchmark`) and autocast itself, measured on the network directly as one forward plus the
  input gradient per sample, the unit every gradient method repeats.
Options that do not exist on the device (fp16 autocast and cudnn.benchmark on CPU) are "n/a".
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from .benchmark import bench_params, fwd_bwd_step, load_average, make_volume, out_of_memory, pearson, timed


def _na(option: str, level: str, why: str) -> Dict:
    return {"option": option, "level": level, "seconds": None, "ratio_to_fp32": None, "corr_with_fp32": None,
            "note": f"n/a: {why}", "load": load_average()}


def _engine_rows(loaded, device, array, spacing, quick: bool, rows: List[Dict], save) -> List[Dict]:
    from .api import explain
    from .options import EngineOptions, Target

    target = Target(class_index=1, region="predicted")
    for method in ("Saliency", "IntegratedGradients"):
        params = bench_params(method, quick)
        base = None
        for precision in ("fp32", "bf16", "fp16"):
            option = f"precision={precision}"
            if precision == "fp16" and device.type != "cuda":
                rows.append({**_na(option, f"engine {method}", "fp16 autocast is a CUDA option"), "method": method})
                continue
            save()
            options = EngineOptions(device=device.type, precision=precision, divisor=loaded.card.divisor)
            run = lambda: explain(array, loaded, [(method, params)], target, options, spacing=spacing)  # noqa: E731
            try:
                run()  # warm-up (autocast kernels, allocator)
                seconds, result, peak = timed(run, device)
            except Exception as exc:  # noqa: BLE001 - report, do not stop the study
                if out_of_memory(exc, device):
                    rows.append({**_na(option, f"engine {method}", "out of memory"), "method": method})
                    continue
                rows.append({**_na(option, f"engine {method}", f"{type(exc).__name__}: {exc}"), "method": method})
                continue
            attribution = np.asarray(result.results[method].attribution, np.float64)
            if base is None:
                base = (seconds, attribution)
            rows.append({"option": option, "level": f"engine {method}", "method": method, "seconds": seconds,
                         "ratio_to_fp32": seconds / base[0], "corr_with_fp32": pearson(attribution, base[1]),
                         "peak_bytes": peak, "note": "api.explain, whole run", "load": load_average()})
            print(f"  engine {method:20s} {option:22s} {seconds:8.3f} s  x{seconds / base[0]:.2f}  "
                  f"r={rows[-1]['corr_with_fp32']:.4f}  load {rows[-1]['load']}", flush=True)
    return rows


def _model_variants(network, device):
    """(name, network, input memory format, context factory, applicable or why not)."""
    cuda = device.type == "cuda"

    def autocast(dtype):
        return lambda: torch.autocast(device_type=device.type, dtype=dtype)

    def cudnn_benchmark():
        @contextlib.contextmanager
        def flag():
            saved = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            try:
                yield
            finally:
                torch.backends.cudnn.benchmark = saved
        return flag()

    plain = contextlib.nullcontext
    yield "fp32 (baseline)", network, torch.contiguous_format, plain, None
    yield "bf16 autocast", network, torch.contiguous_format, autocast(torch.bfloat16), None
    yield ("fp16 autocast", network, torch.contiguous_format, autocast(torch.float16),
           None if cuda else "fp16 autocast is a CUDA option")
    yield ("channels-last-3d", lambda: copy.deepcopy(network).to(memory_format=torch.channels_last_3d),
           torch.channels_last_3d, plain, None)
    yield ("cudnn.benchmark", network, torch.contiguous_format, cudnn_benchmark,
           None if cuda else "cuDNN exists only on CUDA")
    # last: compiling takes a minute or more
    yield "torch.compile", lambda: torch.compile(copy.deepcopy(network)), torch.contiguous_format, plain, None


def _model_rows(loaded, device, array, batch: int, repeats: int, rows: List[Dict], save,
                skip=frozenset()) -> List[Dict]:
    network = loaded.network_for(array).to(device)
    x = torch.from_numpy(np.ascontiguousarray(array))[None].repeat(batch, 1, 1, 1, 1).to(device)
    base = None
    for name, net, memory_format, context, why_not in _model_variants(network, device):
        save()
        if why_not or name in skip:
            rows.append(_na(name, "model fwd+grad", why_not or "left out (--study-skip)"))
            continue
        try:
            started = time.perf_counter()
            net = net() if not isinstance(net, torch.nn.Module) else net
            xi = x.contiguous(memory_format=memory_format)
            with context():
                grad = fwd_bwd_step(net, xi, backward=True)  # warm-up; compiles for torch.compile
            first_call = time.perf_counter() - started
            with context():
                seconds, grad, peak = timed(lambda: fwd_bwd_step(net, xi, backward=True), device, repeats)
        except Exception as exc:  # noqa: BLE001 - an option that fails here is a finding
            if out_of_memory(exc, device):
                rows.append(_na(name, "model fwd+grad", "out of memory"))
            else:
                rows.append(_na(name, "model fwd+grad", f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
            continue
        per_sample = seconds / batch
        grad = grad.detach().float().cpu().numpy()
        if base is None:
            base = (per_sample, grad)
        rows.append({"option": name, "level": "model fwd+grad", "seconds": per_sample,
                     "ratio_to_fp32": per_sample / base[0], "corr_with_fp32": pearson(grad, base[1]),
                     "peak_bytes": peak, "first_call_s": first_call, "load": load_average(),
                     "note": f"per sample, batch {batch}, best of {repeats}; not offered by EngineOptions yet"
                     if name in ("channels-last-3d", "torch.compile", "cudnn.benchmark") else
                     f"per sample, batch {batch}, best of {repeats}"})
        print(f"  model  {name:22s} {per_sample:8.4f} s/sample  x{per_sample / base[0]:.2f}  "
              f"r={rows[-1]['corr_with_fp32']:.4f}  first call {first_call:.1f} s  load {rows[-1]['load']}",
              flush=True)
    return rows


def option_study(loaded, device: torch.device, size: Optional[str], quick: bool, skip=frozenset(),
                 save=lambda study: None) -> Dict:
    """Both levels on one generated cube (CPU default 48^3, CUDA default 128^3). `save(study)` is
    called before each option, so a run stopped by a time limit keeps the rows it measured."""
    size = size or ("128" if device.type == "cuda" else "48")
    array, spacing = make_volume(size)
    print(f"\noption study on {'x'.join(map(str, array.shape[1:]))} ({device}):", flush=True)
    batch = 4 if device.type == "cuda" else 1
    repeats = 5 if device.type == "cuda" else 2
    study = {"size": list(array.shape[1:]), "batch": batch, "repeats": repeats,
             "threads": torch.get_num_threads(), "engine": [], "model": []}
    _engine_rows(loaded, device, array, spacing, quick, study["engine"], lambda: save(study))
    _model_rows(loaded, device, array, batch, repeats, study["model"], lambda: save(study), skip)
    save(study)
    return study
