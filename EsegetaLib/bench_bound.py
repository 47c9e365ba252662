"""`esegeta bench --targets-bound`: the best ratio K targets can reach against K single runs on this
device, from the network's own forward and backward costs, printed beside the measured ratio.

Every target needs its own vector-Jacobian product through the network; what a batched run can
share is the forward (and the segmentation pass). So with, per window,
F = a forward that records the graph, B_1 = one input-gradient backward, B_K = the K targets'
backwards (the cheapest of: K backwards through one retained graph, one vmap'd backward
`is_grads_batched=True`, the K backwards through a channels-last-3d copy, or a forward of K
identical rows and one backward of K cotangent rows),
the best achievable ratio of one pass per target (Saliency-like) is

    (F + B_K) / (K (F + B_1)),

and with the fixed forwards every run makes on a one-window volume (segmentation + the determinism
check's two forwards, S = 3 forwards without a graph): (S + F + B_K) / (K (S + F + B_1)).
Integrated Gradients batches its steps (`internal_batch_size`), so its passes run at batch m: its
bound is (F_m + B_K,m) / (K (F_m + B_m)), B_K,m = K backwards of batch m through one graph.

No parameter gradient is computed in any of these (autograd.grad with respect to the input only);
`weight_gradient_calls` counts, below autograd (a TorchDispatchMode on aten.convolution_backward),
the convolution backwards that were asked for a weight gradient: it must be 0.
Why our own timing code: the quantities are the engine's (graph retained, K cotangents), which no
benchmark library measures.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class WeightGradientCounter(TorchDispatchMode):
    """Counts aten.convolution_backward calls, and those asked for the weight's gradient
    (output_mask[1]) - what `requires_grad` on the parameters would cost if autograd computed it."""

    def __init__(self):
        super().__init__()
        self.calls = self.weight_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.convolution_backward.default:
            self.calls += 1
            mask = kwargs.get("output_mask", args[10] if len(args) > 10 else None)
            if mask is not None and bool(mask[1]):
                self.weight_calls += 1
        return func(*args, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_times(variants: Dict[str, Callable[[], object]], device: torch.device, repeats: int) -> Dict[str, float]:
    """Best-of-`repeats` seconds per variant, the variants interleaved so that a loaded machine's
    slow spells fall on all of them alike (the minimum is the least disturbed run)."""
    for fn in variants.values():  # warm-up: allocator, oneDNN primitives
        fn()
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _logits(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = network(x)
    return out[0] if isinstance(out, (list, tuple)) else out


def pass_costs(network: torch.nn.Module, window: torch.Tensor, k: int = 8, steps_batch: int = 8,
               repeats: int = 5) -> Dict[str, float]:
    """Seconds of the network's passes on `window` (1, C, *S): see the module docstring."""
    device = window.device
    network = network.eval()
    x1 = window.detach()
    xk = x1.expand(k, *x1.shape[1:]).contiguous()
    xm = x1.expand(steps_batch, *x1.shape[1:]).contiguous()

    def graph(x):
        leaf = x.clone().requires_grad_(True)
        return leaf, _logits(network, leaf)

    leaf1, out1 = graph(x1)
    leafm, outm = graph(xm)
    generator = torch.Generator(device="cpu").manual_seed(0)
    cot1 = torch.randn((k,) + tuple(out1.shape), generator=generator).to(device, out1.dtype)
    cotm = torch.randn((k,) + tuple(outm.shape), generator=generator).to(device, outm.dtype)
    rows = cot1[:, 0]  # (K, classes, *S): one cotangent per row of a K-row batch

    def no_graph():
        with torch.no_grad():
            _logits(network, x1)

    def vmap_k():
        torch.autograd.grad(out1, leaf1, cot1, is_grads_batched=True, retain_graph=True)

    def rows_k():
        leaf, out = graph(xk)
        torch.autograd.grad(out, leaf, rows)

    variants = {
        "S_forward": no_graph,
        "F": lambda: graph(x1),
        "B_1": lambda: torch.autograd.grad(out1, leaf1, cot1[0], retain_graph=True),
        "B_K_loop": lambda: [torch.autograd.grad(out1, leaf1, cot1[g], retain_graph=True) for g in range(k)],
        "B_K_vmap": vmap_k,
        "F_K_plus_B_K_rows": rows_k,
        "F_m": lambda: graph(xm),
        "B_m": lambda: torch.autograd.grad(outm, leafm, cotm[0], retain_graph=True),
        "B_K_m_loop": lambda: [torch.autograd.grad(outm, leafm, cotm[g], retain_graph=True) for g in range(k)],
    }
    # the same K backwards through a channels-last-3d copy of the network (another memory layout,
    # other convolution kernels where the build has them)
    import copy

    last = copy.deepcopy(network).to(memory_format=torch.channels_last_3d)
    leaf_last = x1.clone().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    out_last = _logits(last, leaf_last)
    variants["B_K_loop_channels_last"] = lambda: [torch.autograd.grad(out_last, leaf_last, cot1[g], retain_graph=True)
                                                  for g in range(k)]
    vmap_counter = WeightGradientCounter()
    try:
        with vmap_counter:
            vmap_k()
    except RuntimeError:  # an operator without a batching rule: the engine loops instead
        variants.pop("B_K_vmap")
    costs = _best_times(variants, device, repeats)
    counter = WeightGradientCounter()
    with counter:
        torch.autograd.grad(out1, leaf1, cot1[0], retain_graph=True)
    costs["convolution_backward_calls"] = counter.calls
    costs["weight_gradient_calls"] = counter.weight_calls
    # convolution backwards one vmap'd backward of K cotangents ran: K x the above when PyTorch has
    # no batching rule for them here and falls back to a loop over the K (then vmap cannot win)
    costs["vmap_convolution_backward_calls"] = vmap_counter.calls
    costs["parameters_with_grad"] = sum(p.grad is not None for p in network.parameters())
    return costs


def bounds(costs: Dict[str, float], k: int) -> Dict[str, float]:
    """The best achievable batched/singles ratios from `pass_costs` (module docstring)."""
    f, b1 = costs["F"], costs["B_1"]
    shared = [f + costs["B_K_loop"], costs["F_K_plus_B_K_rows"]]
    if "B_K_loop_channels_last" in costs:
        shared.append(f + costs["B_K_loop_channels_last"])
    if "B_K_vmap" in costs:
        shared.append(f + costs["B_K_vmap"])
    best = min(shared)
    s = 3.0 * costs["S_forward"]
    return {"one_pass": best / (k * (f + b1)),
            "one_pass_with_segmentation": (s + best) / (k * (s + f + b1)),
            "steps": (costs["F_m"] + costs["B_K_m_loop"]) / (k * (costs["F_m"] + costs["B_m"])),
            "backward_share": b1 / (f + b1)}


def targets_bound(loaded, device: torch.device, size: str = "sample", k: int = 8, steps_batch: int = 8,
                  repeats: int = 5, measured: Optional[List[Dict]] = None) -> Dict:
    """The bound on the `--targets` case's window (the bundled model, the same volume and patch),
    printed beside the measured ratios of `measured` (targets_study rows) when given."""
    from .benchmark import make_volume
    from .engine import ExplainSession
    from .options import EngineOptions, Target

    array, spacing = make_volume(size)
    options = EngineOptions(device=device.type, precision="fp32", divisor=loaded.card.divisor)
    session = ExplainSession(array, loaded, Target(class_index=1, region="whole"), options, spacing=spacing)
    window = session._window_batch(session._x_pad, [0]).to(session.device, session.dtype)
    costs = pass_costs(session.network, window, k=k, steps_batch=steps_batch, repeats=repeats)
    result = {"device": str(device), "size": "x".join(map(str, array.shape[1:])), "targets": k,
              "window": list(session.grid.patch), "n_windows": len(session.windows), "steps_batch": steps_batch,
              "threads": torch.get_num_threads(), "repeats": repeats, "costs": costs, "bounds": bounds(costs, k)}
    result["rows"] = side_by_side(result, measured or [])
    print(format_bound(result), flush=True)
    return result


def side_by_side(result: Dict, measured: List[Dict]) -> List[Dict]:
    """One row per measured method: its measured ratio beside the bound of its kind of pass."""
    b = result["bounds"]
    rows = []
    for row in measured:
        kind = "steps" if row["method"] == "IntegratedGradients" else "one_pass_with_segmentation"
        rows.append({"method": row["method"], "measured": row["ratio_to_singles"], "bound": b[kind],
                     "bound_kind": kind})
    return rows


def format_bound(result: Dict) -> str:
    c, b, k, m = result["costs"], result["bounds"], result["targets"], result["steps_batch"]
    vmap = f"{c['B_K_vmap']:.3f}" if "B_K_vmap" in c else "-"
    lines = [f"K = {k} targets, {result['size']} volume, window {'x'.join(map(str, result['window']))}, "
             f"{result['threads']} thread(s), best of {result['repeats']} (seconds):",
             "| S (fwd, no graph) | F | B_1 | B_K loop | B_K loop, channels-last-3d | B_K vmap | F_K + B_K rows "
             "| F_m | B_m | B_K,m loop |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| {c['S_forward']:.3f} | {c['F']:.3f} | {c['B_1']:.3f} | {c['B_K_loop']:.3f} | "
             f"{c.get('B_K_loop_channels_last', float('nan')):.3f} | {vmap} | "
             f"{c['F_K_plus_B_K_rows']:.3f} | {c['F_m']:.3f} | {c['B_m']:.3f} | {c['B_K_m_loop']:.3f} |",
             f"bound, one pass per target: {b['one_pass']:.2f}; with the segmentation pass: "
             f"{b['one_pass_with_segmentation']:.2f}; IG steps at batch {m}: {b['steps']:.2f} "
             f"(backward = {b['backward_share']:.0%} of a forward+backward); weight-gradient convolution "
             f"backwards: {c['weight_gradient_calls']} of {c['convolution_backward_calls']}; convolution "
             f"backwards in one vmap'd backward of {k}: {c['vmap_convolution_backward_calls']}"]
    if result.get("rows"):
        lines += ["| method | measured batched / singles | best achievable |", "| --- | ---: | ---: |"]
        lines += [f"| {r['method']} | {r['measured']:.2f} | {r['bound']:.2f} |" for r in result["rows"]]
    return "\n".join(lines)
