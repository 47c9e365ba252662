"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) for 3D segmentation
networks: the method, its refusals and its conservation check.  The rules are in `lrp_rules.py`.

Top-level relevance: the target's weights (window blending x region, as in every score) times the
class logit at each voxel, R_out = w * z_c, so the explained quantity is the weighted logit sum
sum(w * z_c) (the target's logit score; with a probability score LRP still explains the logit, as is
standard).  The map R_x = x * c_x has the input's shape, one value per input channel and voxel.  The
backward pass is linear in the top-level weights, so the map of the patched model is the sum of the
windows' maps ("additive", exact).

Before the relevance pass, the network is refused with the layer's name when it has no rule for it:
modules of a type without a rule (checked before the forward pass: sigmoid gates, tanh, softmax,
bounded activations, attention and recurrent modules; `lrp_rules.NO_RULE_MODULES`), TorchScript
models and exported programs (no modules to hook: use a model card with the network's class), and,
watched op by op during the forward pass (`_OpWatch`, a `TorchDispatchMode`), any op on an
input-dependent tensor outside the rule layers whose gradient is not its LRP rule, in any module
(unknown modules included): non-homogeneous activations called functionally, softmax, products of
two activations (attention and gating), division by an activation, convolutions, matrix products
and normalisations called functionally.  A convolution or matrix product with one constant operand
outside a module (the resampling matrices of nnU-Net and bundle pipelines) gets LRP-0 from its
gradient, counted in the check's detail.

Trust check "conservation": the input's total relevance against the explained score, relative to
sum |w * z_c|; pass within `CONSERVATION_TOLERANCE`, warn beyond, fail when the input's total has the
opposite sign to the score or the miss exceeds 100 % (the map is still given: input + biases + stabiliser +
offsets = score holds, and the detail says so).  Its detail says how much the
layers' biases, the stabiliser / rule and the normalisation offsets absorbed, and what is left
unaccounted (constants added outside layers; ~0 for the networks the rules cover).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from ..errors import EsegetaError
from .base import MethodContext, MethodSpec, ParamSpec
from .layers import inplace_disabled
from .lrp_rules import NORM_RULES, RULES, assign_composite, check_modules, lrp_rules
from .rescale import LINEAR, _name, _tensors

CONSERVATION_TOLERANCE = 0.01

# ops whose gradient is the LRP rule only inside a hooked module (where the hook replaces it)
MODULE_ONLY = frozenset({
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "addbmm", "einsum",
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "native_group_norm", "native_layer_norm", "cudnn_batch_norm",
    "miopen_batch_norm",
})
_CONDITIONAL = frozenset({"mul", "mul_", "div", "div_", "masked_fill", "masked_fill_", "where"})
# positively homogeneous activations (relevance passes unchanged through the gradient) and routing
HOMOGENEOUS = frozenset({"relu", "relu_", "leaky_relu", "leaky_relu_", "_prelu_kernel", "prelu"})
ROUTING = frozenset({"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
                     "max_pool3d_with_indices", "adaptive_max_pool2d", "adaptive_max_pool3d",
                     "upsample_bicubic2d"})
ALLOWED = (LINEAR - MODULE_ONLY - _CONDITIONAL) | HOMOGENEOUS | ROUTING
# The input's preprocessing chain: ops that only move voxels (views, crops, permutations, stacking) or
# map each voxel by itself with constants (normalisation: offsets, scales, clipping, masks).  A tensor
# made from x by these alone keeps an index map to x's voxels; where it enters a rule layer its
# relevance passes to those voxels unchanged (lrp_rules._ChainPass), as through any elementwise map.
_CHAIN_SAME = frozenset({"clone", "_to_copy", "alias", "detach", "contiguous", "lift_fresh", "lift_fresh_copy"})
_CHAIN_INDEX = frozenset({"view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "slice",
                          "select", "squeeze", "unsqueeze", "flip", "narrow", "stack", "cat", "expand", "movedim",
                          "unbind", "split", "split_with_sizes", "index"})
_CHAIN_ELEMENTWISE = frozenset({"sub", "add", "mul", "div", "rsub", "neg", "clamp", "clamp_min", "clamp_max", "where",
                                "masked_fill"})


class _OpWatch(TorchDispatchMode):
    """Follows which tensors depend on the input during the forward pass and records the first op on
    such a tensor that has no LRP rule outside a hooked module (`found`, with the module it ran in)."""

    def __init__(self, x: torch.Tensor, state: Dict[str, Any], stack: List[str]):
        super().__init__()
        self.tainted = WeakTensorKeyDictionary()
        self.tainted[x] = True
        self.state, self.stack = state, stack
        self.found: Optional[str] = None
        self.functional_linear = 0  # convolutions / matrix products with a constant operand outside modules
        self.chain = WeakTensorKeyDictionary()  # preprocessing-chain tensor -> index map into x (int64)
        self.chain[x] = torch.arange(x.numel(), device=x.device).view(x.shape)
        state["chain"] = self.chain

    def _follow_chain(self, name: str, args, kwargs, out) -> bool:
        """Give `out` an index map when the op keeps the input's preprocessing chain going (see
        _CHAIN_*); True when it did."""
        base = name[:-1] if name.endswith("_") and name[:-1] in _CHAIN_ELEMENTWISE else name
        flat = _tensors(list(args) + list(kwargs.values()))
        chained = [t for t in flat if t in self.chain]
        if not chained or any(t in self.tainted and t not in self.chain for t in flat):
            return False
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if base in _CHAIN_SAME:
            maps = [self.chain[chained[0]]]
        elif base in _CHAIN_ELEMENTWISE:
            if base == "where" and len(chained) == 2:
                maps = [torch.where(args[0], self.chain[args[1]], self.chain[args[2]])]
            elif len(chained) == 1:
                maps = [self.chain[chained[0]].expand(outs[0].shape)]
            else:
                return False
        elif base in _CHAIN_INDEX:
            def swap(a):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    return self.chain[a] if a in self.chain else torch.full(a.shape, -1, dtype=torch.long, device=a.device)
                if isinstance(a, (list, tuple)):
                    return type(a)(swap(v) for v in a)
                return a
            try:  # the index map may be laid out differently (a view the data allowed may not fit it)
                mapped = self._current(*swap(tuple(args)), **{k: swap(v) for k, v in kwargs.items()})
            except (RuntimeError, TypeError, ValueError):
                return False  # the chain stops here: this op's relevance takes LRP-0 from the gradient
            maps = list(mapped) if isinstance(mapped, (tuple, list)) else [mapped]
        else:
            return False
        for t, m in zip(outs, maps):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(m.shape) == tuple(t.shape):
                self.chain[t] = m
        return True

    def _why(self, name: str, args, kwargs) -> Optional[str]:
        """None when the op has an LRP rule; else what it is."""
        if name in ALLOWED:
            return None
        tainted = [bool(isinstance(a, torch.Tensor) and a in self.tainted) for a in args]
        if name in ("mul", "mul_"):
            return None if sum(tainted) <= 1 else "a product of two activations (attention or gating)"
        if name in ("div", "div_"):
            return "a division by an activation" if len(tainted) > 1 and tainted[1] else None
        if name in ("masked_fill", "masked_fill_", "where"):
            return None
        if name in ("threshold", "threshold_"):
            return None if all(float(v) == 0.0 for v in args[1:3]) else "a threshold with a non-zero level"
        if name in ("clamp", "clamp_", "clamp_min", "clamp_min_"):
            lo = args[1] if len(args) > 1 else kwargs.get("min")
            hi = args[2] if len(args) > 2 else kwargs.get("max")
            if hi is None and lo is not None and not isinstance(lo, torch.Tensor) and float(lo) == 0.0:
                return None  # clamp(min=0) is ReLU
            return "a clamp (not positively homogeneous)"
        if name in MODULE_ONLY:
            if sum(tainted) >= 2:
                return f"a product of two activations ({name}: attention)"
            if "norm" in name:
                return f"{name} called outside a module (no layer to attach the rule to)"
            # a linear map with a constant operand (e.g. a resampling matrix): LRP-0 from its gradient
            self.functional_linear += 1
            return None
        if "softmax" in name:
            return "a softmax inside the network"
        return name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._current = func
        ins = _tensors(list(args) + list(kwargs.values()))
        if not any(t in self.tainted for t in ins):
            return out
        outs = [t for t in _tensors(out if isinstance(out, (tuple, list)) else [out]) if t.is_floating_point()]
        for t in outs:
            self.tainted[t] = True
        schema = getattr(func, "_schema", None)
        if schema is not None and schema.is_mutable:  # in-place writes (acc[w] += out): the written tensor
            for a, arg in zip(args, schema.arguments):  # and the tensor it is a view of now depend on x
                if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write \
                        and a.is_floating_point():
                    self.tainted[a] = True
                    if a._base is not None:
                        self.tainted[a._base] = True
        if self.state.get("depth", 0) > 0 or self.found is not None or not outs:
            return out
        if self._follow_chain(_name(func), args, kwargs, out):
            return out
        why = self._why(_name(func), args, kwargs)
        if why is not None:
            where = self.stack[-1] if self.stack else "the network's forward"
            self.found = f"{why} in {where}"
        return out


def _module_stack(network: torch.nn.Module, stack: List[str]):
    """Hooks that keep `stack` = the names of the modules now running (for refusal messages)."""
    handles = []
    for name, module in network.named_modules():
        label = f"'{name}' ({type(module).__name__})" if name else f"the network's forward ({type(module).__name__})"

        def push(m, args, label=label):
            stack.append(label)

        def pop(m, args, output):
            if stack:
                stack.pop()
        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop))
    return handles


def _logits(ctx: MethodContext, x: torch.Tensor) -> torch.Tensor:
    forward = ctx.forward
    return forward.logits(x) if hasattr(forward, "logits") else ctx.network(x)


def check_params(params: Dict[str, Any]) -> None:
    if params.get("rule") == "alpha_beta" and abs(float(params["alpha"]) - float(params["beta"]) - 1.0) > 1e-9:
        raise EsegetaError(f"LRP alpha-beta needs alpha - beta = 1 (so that relevance is conserved); got "
                           f"alpha={params['alpha']}, beta={params['beta']}.")


def lrp(ctx: MethodContext):
    """(B, C, *S) relevance R_x = x * c_x of the weighted class logits; diagnostics for conservation."""
    params = ctx.params
    check_params(params)
    network = ctx.network
    check_modules(network)
    rule = params.get("rule", "epsilon")
    options = {k: params[k] for k in ("epsilon", "gamma", "alpha", "beta", "norm_rule") if k in params}
    options.setdefault("norm_rule", "centred")
    state: Dict[str, Any] = {}
    stack: List[str] = []
    handles = _module_stack(network, stack)
    try:
        # in-place activations would overwrite the inputs the rules keep: run out of place
        with torch.enable_grad(), inplace_disabled(network), lrp_rules(network, rule, options, state):
            x = ctx.inputs.detach().requires_grad_(True)
            state["input"] = x
            watch = _OpWatch(x, state, stack)
            with watch:
                logits = _logits(ctx, x)
            if watch.found:
                raise EsegetaError(f"LRP has no rule for {watch.found}; use IntegratedGradients or DeepLift on "
                                   "this network.")
            if rule == "composite":
                assign_composite(logits)
            weights = ctx.forward_args[0] if ctx.forward_args else torch.ones_like(logits[:, :1])
            class_index = int(getattr(ctx.forward, "class_index", 1))
            top = torch.zeros_like(logits)
            top[:, class_index] = weights[:, 0].to(logits.dtype)
            c_x = torch.autograd.grad(logits, x, top)[0]
    finally:
        for handle in handles:
            handle.remove()
    relevance = (x.detach() * c_x).detach()
    if state.get("input_relevance") is not None:  # passed through the model's intensity normalisation
        relevance = relevance + state["input_relevance"].to(relevance.dtype)
    out_relevance = (top * logits.detach()).double()
    absorbed = state.get("absorbed", {})
    diag = {"lrp_explained": out_relevance.sum(), "lrp_output_abs": out_relevance.abs().sum(),
            "lrp_relevance": relevance.double().sum(), "lrp_absorbed_bias": float(absorbed.get("bias", 0.0)),
            "lrp_absorbed_rule": float(absorbed.get("rule", 0.0)),
            "lrp_absorbed_norm": float(absorbed.get("norm", 0.0)), "lrp_rule_layers": len(state.get("layers", [])),
            "lrp_functional_linear": watch.functional_linear + state.get("linear_modules", 0)}
    return relevance.to(ctx.inputs.dtype), diag


def add_conservation_check(result) -> None:
    """Trust check "conservation": total input relevance vs the explained score sum(w * z_c)."""
    d = result.diagnostics
    explained, total, scale = d.get("lrp_explained"), d.get("lrp_relevance"), d.get("lrp_output_abs")
    if not all(isinstance(v, (int, float)) for v in (explained, total, scale)) or not scale:
        return
    value = abs(explained - total) / scale
    bias, rule, norm = (float(d.get(k, 0.0)) for k in ("lrp_absorbed_bias", "lrp_absorbed_rule", "lrp_absorbed_norm"))
    rest = explained - total - bias - rule - norm
    def pct(v):
        return f"{100 * v / scale:+.3g} %"
    detail = (f"input relevance {total:.6g} vs explained score {explained:.6g} (sum of weight x class logit): "
              f"{100 * value:.3g} % not conserved (tolerance {CONSERVATION_TOLERANCE:.0%}); absorbed by biases "
              f"{pct(bias)}, by the stabiliser/rule {pct(rule)}, by normalisation offsets {pct(norm)}, "
              f"unaccounted {pct(rest)} (percentages of sum |weight x logit| = {scale:.6g})")
    if d.get("lrp_functional_linear"):
        detail += (f"; {int(d['lrp_functional_linear'])} linear map(s) outside the rule layers (convolutions or "
                   "matrix products with a constant operand, resampling) took LRP-0")
    # Opposite signs (or a miss beyond the whole score): the map's sign no longer reads as the score's
    # direction.  The map is kept: input + biases + stabiliser + offsets = score still holds (accounted above).
    opposite = explained * total < 0 and abs(explained) > CONSERVATION_TOLERANCE * scale
    if opposite:
        detail = ("the input's relevance has the opposite sign to the score; the biases/normalisation offsets carry "
                  "it: read the map's sign with care; " + detail)
    elif value > 1.0:
        detail = ("more than 100 % of the score is not in the input's relevance; the biases/normalisation offsets "
                  "carry it: read the map's magnitudes with care; " + detail)
    status = "pass" if value <= CONSERVATION_TOLERANCE else ("fail" if opposite or value > 1.0 else "warn")
    result.add_check("conservation", status, value, detail)


SPECS = [
    MethodSpec(
        name="LRP", family="gradient", signed=True, needs_baseline=False, needs_layer=False, cost=2.0,
        patching="additive", captum=None,  # own rules: Captum 0.9 has none for Conv3d
        params=(
            ParamSpec("rule", "choice", "epsilon", choices=RULES,
                      help="epsilon; gamma (positive contributions favoured); alpha_beta; composite = epsilon on "
                           "the logit layer, gamma on the other convolutions"),
            ParamSpec("epsilon", "float", 1e-6, minimum=0.0, maximum=1e6,
                      help="stabiliser added to every denominator with its sign (activation units); larger values "
                           "absorb weak, contradictory relevance"),
            ParamSpec("gamma", "float", 0.25, minimum=0.0, maximum=1e3, help="gamma rule: weight of the positive parts"),
            ParamSpec("alpha", "float", 2.0, minimum=1.0, maximum=1e3, help="alpha-beta rule: positive share (alpha - beta = 1)"),
            ParamSpec("beta", "float", 1.0, minimum=0.0, maximum=1e3, help="alpha-beta rule: negative share"),
            ParamSpec("norm_rule", "choice", "centred", choices=NORM_RULES,
                      help="InstanceNorm/GroupNorm/LayerNorm: centred = the affine map x -> k (x - mean(x)) + bias with "
                           "the standard deviation held fixed (only the bias absorbs relevance); affine = k x + o with "
                           "mean and standard deviation held fixed (the offset -k mean absorbs relevance too)"),
        ),
        attribute=lrp, trust=add_conservation_check, requires_eager=True,
        description="layer-wise relevance propagation (epsilon / gamma / alpha-beta rules) of the weighted class logits",
    ),
]
