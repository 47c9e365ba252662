"""Several targets in one pass: one forward per window, one batched backward over the targets.

Captum computes one score per example and one backward per call, so K targets normally cost K
forward and K backward passes (captum #612). The gradient methods that are linear in the gradient
of a weighted score (Saliency, InputXGradient, IntegratedGradients, guided backpropagation,
deconvolution, and noise tunnels over them) only ever need d(score_k)/dx. `MultiTargetScore`
gives Captum a batch whose rows are (window, target) pairs - identical window inputs repeated, one
row per target - and whose forward is a custom autograd function that

- runs the network once per distinct input (rows with the same window and the same position in
  Captum's expansion - the integration step, the input/baseline half - are the same tensor; this
  is checked element for element and the sharing dropped when it fails, so the result is exact
  whatever the method does with its inputs);
- in backward, forms each row's cotangent on the logits (its class, weights and incoming gradient)
  and backpropagates all of them through the network in ONE vectorised vector-Jacobian product
  (`torch.autograd.grad(..., is_grads_batched=True)`, PyTorch's vmap over the backward).

The method itself (Captum's Saliency/IG/..., the engine's guided rules) is unchanged: it sees an
ordinary batch of examples. When vmap cannot batch an operator of the network, the cotangents are
backpropagated one after another through the same graph (still one forward), noted in `plan`.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from .device import is_out_of_memory
from .targets import TargetScore, class_score_map


VJP_MODES = ("auto", "vmap", "loop")


class TargetRows:
    """Which window and which target class each row of a batch is, for `len(windows)` rows.

    A plain object, not a tensor: Captum passes it through its input expansion untouched, so a
    forward called on M expanded copies (IG steps, DeepLift's input/baseline halves) sees
    M * len(self) rows, row r being row r % len(self) of the original batch. Methods that pick
    their own rows (adaptive IG) pass `subset(rows)`."""

    def __init__(self, windows: Sequence[int], classes: Sequence[int], vjp: str = "auto",
                 counters: Dict[str, int] = None):
        if len(windows) != len(classes):
            raise ValueError("one class per row")
        if vjp not in VJP_MODES:
            raise ValueError(f"vjp must be one of {VJP_MODES}")
        self.vjp = vjp
        self.windows = [int(w) for w in windows]
        self.classes = [int(c) for c in classes]
        # shared with every subset: forwards run, rows they served, vmap fallbacks
        self.counters = counters if counters is not None else {"forwards": 0, "rows": 0, "inputs": 0,
                                                               "vmap_fallbacks": 0}

    def __len__(self) -> int:
        return len(self.windows)

    def subset(self, index: Sequence[int]) -> "TargetRows":
        return TargetRows([self.windows[i] for i in index], [self.classes[i] for i in index], self.vjp,
                          self.counters)

    @property
    def vmap_fallbacks(self) -> int:
        return self.counters["vmap_fallbacks"]


class _Plan:
    """Row -> distinct input, row -> cotangent slot, for one forward call of N rows.

    Rows of the same window whose inputs are equal element for element share one network input
    (found through two checksums per row, confirmed with torch.equal): Captum's expanded copies,
    adaptive IG's points at the same position of the path, for every target at once."""

    def __init__(self, x: torch.Tensor, rows: TargetRows):
        n, n0 = int(x.shape[0]), len(rows)
        if n % n0:
            raise ValueError(f"{n} rows are not a multiple of the {n0} target rows")
        flat = x.detach().flatten(1)
        probe = torch.linspace(1.0, 2.0, flat.shape[1], device=flat.device, dtype=flat.dtype)
        sums = torch.stack([flat.sum(dim=1), (flat * probe).sum(dim=1)], dim=1).tolist()
        groups: Dict[tuple, List[int]] = {}
        unique: List[int] = []
        row_unique: List[int] = []
        for r in range(n):
            key = (rows.windows[r % n0], sums[r][0], sums[r][1])
            match = next((u for u in groups.get(key, []) if torch.equal(flat[r], flat[unique[u]])), None)
            if match is None:
                match = len(unique)
                unique.append(r)
                groups.setdefault(key, []).append(match)
            row_unique.append(match)
        self.first = torch.as_tensor(unique, device=x.device)
        self.row_unique = row_unique
        self.row_class = [rows.classes[r % n0] for r in range(n)]
        seen: Dict[int, int] = {}
        self.slot = []
        for u in row_unique:
            self.slot.append(seen.get(u, 0))
            seen[u] = seen.get(u, 0) + 1
        self.n_slots = max(seen.values())
        rows.counters["forwards"] += 1
        rows.counters["rows"] += n
        rows.counters["inputs"] += len(unique)


def _row_maps(logits: torch.Tensor, plan: _Plan, scorer: TargetScore) -> torch.Tensor:
    """(U, n_classes, *S) logits of the distinct inputs -> (N, *S) class score map of every row."""
    maps = {c: class_score_map(logits, scorer.target, c) for c in sorted(set(plan.row_class))}
    return torch.stack([maps[c][u] for c, u in zip(plan.row_class, plan.row_unique)])


class _SharedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, scorer, plan, rows):
        with torch.enable_grad():
            xu = x[plan.first].detach().requires_grad_(True)
            logits = scorer.logits(xu)
        ctx.scorer, ctx.plan, ctx.rows = scorer, plan, rows
        ctx.xu, ctx.logits = xu, logits
        ctx.save_for_backward(weights)
        with torch.no_grad():
            return (_row_maps(logits.detach(), plan, scorer) * weights[:, 0]).flatten(1).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_scores):
        (weights,) = ctx.saved_tensors
        plan, scorer, logits, xu = ctx.plan, ctx.scorer, ctx.logits, ctx.xu
        rows_idx = torch.as_tensor(plan.row_unique, device=xu.device)
        slots = torch.as_tensor(plan.slot, device=xu.device)
        cot = _cotangents(logits, weights, grad_scores, plan, scorer, slots)  # (slots, U, n_classes, *S)
        grads = _batched_vjp(logits, xu, cot, ctx.rows)  # (slots, U, C, *S)
        return grads[slots, rows_idx].to(xu.dtype), None, None, None, None


def _cotangents(logits, weights, grad_scores, plan: _Plan, scorer: TargetScore, slots) -> torch.Tensor:
    """(slots, U, n_classes, *S): the cotangent on the logits of each distinct input, one slot per
    row sharing that input (a slot never holds two rows of one input). The head (softmax, class
    pick, weights) is differentiated here: directly for logit scores (the cotangent is the row's
    weights times its incoming gradient, on its class's channel), with autograd otherwise."""
    if scorer.target.score == "logit":
        cot = logits.new_zeros((plan.n_slots,) + tuple(logits.shape))
        rows = torch.arange(len(plan.row_unique), device=logits.device)
        unique = torch.as_tensor(plan.row_unique, device=logits.device)
        classes = torch.as_tensor(plan.row_class, device=logits.device)
        shape = (-1,) + (1,) * (weights.dim() - 2)
        values = weights[:, 0].to(cot.dtype) * grad_scores.reshape(shape).to(cot.dtype)
        cot.index_put_((slots, unique, classes), values[rows], accumulate=True)
        return cot
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(True)
        maps = _row_maps(leaf, plan, scorer)
        shape = (-1,) + (1,) * (maps.dim() - 1)
        contrib = maps * weights[:, 0].to(maps.dtype) * grad_scores.reshape(shape).to(maps.dtype)
        out = []
        for g in range(plan.n_slots):
            part = contrib[slots == g].sum()
            out.append(torch.autograd.grad(part, leaf, retain_graph=g + 1 < plan.n_slots)[0])
    return torch.stack(out)


def _batched_vjp(logits: torch.Tensor, xu: torch.Tensor, cot: torch.Tensor, rows: TargetRows) -> torch.Tensor:
    """(slots, U, C, *S): the network's vector-Jacobian product for every slot's cotangent.

    `rows.vjp` "vmap": one vectorised backward (is_grads_batched); "loop": the cotangents one after
    another through the same retained graph (measured faster on CPUs, where a backward's cost grows
    with its batch and vmap adds copies: docs/PERFORMANCE.md); "auto": vmap on accelerators, loop on CPU."""
    if cot.shape[0] == 1:
        return torch.autograd.grad(logits, xu, cot[0])[0][None]
    mode = rows.vjp if rows.vjp != "auto" else ("loop" if xu.device.type == "cpu" else "vmap")
    if mode == "vmap":
        try:
            return torch.autograd.grad(logits, xu, cot, is_grads_batched=True, retain_graph=True)[0]
        except RuntimeError as error:
            if is_out_of_memory(error):
                raise
            # an operator without a vmap rule: one cotangent after another through the same graph
            rows.counters["vmap_fallbacks"] += 1
    parts = [torch.autograd.grad(logits, xu, cot[g], retain_graph=g + 1 < cot.shape[0])[0]
             for g in range(cot.shape[0])]
    return torch.stack(parts)


class MultiTargetScore(nn.Module):
    """(N, C, *S) rows, (N, 1, *S) weights, `TargetRows` -> (N,) scores, row r scoring its target's
    class with its weights; the network runs once per distinct input (see the module docstring).

    Wraps the engine's `TargetScore` (same network, head, activation, autocast) as a child module."""

    def __init__(self, scorer: TargetScore):
        super().__init__()
        self.scorer = scorer

    @property
    def network(self) -> nn.Module:
        return self.scorer.network

    def forward(self, x: torch.Tensor, weights: torch.Tensor, rows: TargetRows) -> torch.Tensor:
        # Scores are built inside the custom function, so the weights' score (the scalar weighted
        # sum) has the weights' full precision, as in TargetScore.
        weights = weights.to(x.dtype)
        plan = _Plan(x, rows)
        if torch.is_grad_enabled() and x.requires_grad:
            return _SharedForward.apply(x, weights, self.scorer, plan, rows)
        logits = self.scorer.logits(x[plan.first])
        return (_row_maps(logits, plan, self.scorer) * weights[:, 0]).flatten(1).sum(dim=1)


# Methods whose patched map is a sum over examples of a function of d(weighted score)/dx alone,
# computed from Captum's gradient machinery on the engine's forward: they can share the forward and
# backpropagate the targets' cotangents together. DeepLift(Shap) and GradientShap are left out:
# DeepLift pairs inputs with baselines inside its hooks, the Shap methods split the batch example by
# example (their targets run one at a time, said in the result).
BATCHED_METHODS = ("Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop", "Deconvolution")


def batches_targets(spec, params) -> bool:
    """True when `spec` (with `params`) can run several targets in one batched pass."""
    if spec.patching == "noise_tunnel":
        return str(params.get("base_method")) in BATCHED_METHODS
    return spec.patching == "additive" and spec.name in BATCHED_METHODS
