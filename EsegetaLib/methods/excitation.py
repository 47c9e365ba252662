"""Excitation backprop (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 /
IJCV 2018): the marginal winning probability (MWP) of each unit of a layer, and its contrastive form.

Written here (Captum has none; TorchRay's implementation is 2-D and not a dependency; its ideas, not
its code).  The formulas, re-derived: a unit i of layer l+1 with probability P_i passes it to the units
j of layer l that excite it, in proportion to their excitation:

    P_j = a_j * sum_i W+_ij P_i / Z_i,     Z_i = sum_j' a_j' W+_ij'      (biases ignored; 0 where Z_i = 0)

with a_j >= 0 the activation of unit j and W+ the positive part of the weights.  As a backward pass:
S = P_out / Z with Z the layer applied to a with W+ and no bias, then P_in = a * (W+)^T S, which is
the vector-Jacobian product of the positive layer at S, times a.  Rules per module:

- Conv1/2/3d, ConvTranspose1/2/3d, Linear: the rule above with the module's W+;
- Upsample (linear/bilinear/trilinear) and AvgPool: the rule with the (non-negative) interpolation or
  averaging weights: each output shares its probability among its inputs in proportion to a_j w_ij;
- ReLU, MaxPool (winner takes all), nearest Upsample, concatenation, Dropout, Identity: the plain
  gradient is already the rule (one-to-one or routing connections);
- BatchNorm in eval mode with a positive scale gamma / sqrt(var + eps) in every channel: probabilities
  pass unchanged (for positive scales, merging it into the preceding convolution gives the same P).

The MWP is defined for non-negative activations: every input a of a rule module above the explained
layer must be >= 0 (a ReLU network).  Refused, with the reason: networks with modules that have no rule
(PReLU, LeakyReLU, GELU, ELU, SiLU, InstanceNorm, GroupNorm, LayerNorm, attention ...), functional
non-rectifier activations, residual additions (the proportional split is not implemented), a
BatchNorm with a non-positive scale, and negative inputs to a rule module above the layer (e.g. a
convolution fed by a normalisation without a ReLU in between).  The layer itself may be any layer
(the network's input is normalised and signed, so the map is read at a layer, as in the paper, and
brought to the input grid with the layer's sampling geometry).

Top-level probabilities: the target's weights (window blending x region, as in every score) on the
class's logits; the map sums the layer's MWP over channels and conserves its total up to the units
with Z = 0 ("conservation" trust check).  Contrastive MWP: the same pass from the target class minus
the pass from the contrast class (`contrast_class`, or every other class sharing the weights
equally), rectified when `relu`; refused on one-output (sigmoid) models, which have no contrast class.
The map is linear in the top-level probabilities, so it is exact window by window ("additive").
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import EsegetaError
from .base import MethodContext, MethodSpec, ParamSpec
from .common import LAYER_PARAM, first_tensor, is_exported_program, to_input_grid
from .layers import layer_for

aten = torch.ops.aten

RULE_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.pooling._AvgPoolNd)
PASS_MODULES = (nn.ReLU, nn.modules.pooling._MaxPoolNd, nn.Dropout, nn.Dropout3d, nn.Dropout2d, nn.Identity,
                nn.Flatten, nn.modules.batchnorm._BatchNorm, nn.Upsample)
NEGATIVE_TOLERANCE = 1e-6  # activations below -tolerance x max|a| count as negative
CONSERVATION_TOLERANCE = 0.05

# functional ops the rules do not cover (seen while the network runs)
_NO_RULE_OPS = {
    aten.leaky_relu: "LeakyReLU", aten.leaky_relu_: "LeakyReLU", aten._prelu_kernel: "PReLU",
    aten.prelu: "PReLU", aten.gelu: "GELU", aten.elu: "ELU", aten.elu_: "ELU", aten.silu: "SiLU",
    aten.silu_: "SiLU", aten.mish: "Mish", aten.hardswish: "Hardswish", aten.softplus: "Softplus",
    aten.sigmoid: "sigmoid", aten.tanh: "tanh", aten.native_group_norm: "GroupNorm",
    aten.native_layer_norm: "LayerNorm", aten._softmax: "softmax",
}


# ops that a rule module performs: each call must come from a hooked module (a functional call
# would get the plain gradient instead of the rule)
_RULE_OPS = {
    aten.convolution: "convolution", aten.addmm: "matrix product", aten.mm: "matrix product",
    aten.bmm: "matrix product", aten.upsample_linear1d: "linear interpolation",
    aten.upsample_bilinear2d: "linear interpolation", aten.upsample_trilinear3d: "linear interpolation",
    aten.avg_pool1d: "average pooling", aten.avg_pool2d: "average pooling", aten.avg_pool3d: "average pooling",
}


def _module_kind(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return "convolution"
    if isinstance(module, nn.Linear):
        return "matrix product"
    if isinstance(module, nn.Upsample):
        return "linear interpolation"
    return "average pooling"


class _OpWatch(TorchDispatchMode):
    """Records, while the network runs, ops without an excitation rule: non-rectifier activations,
    normalisations over the sample, residual additions of two activation tensors; and counts the ops
    that rule modules perform (compared with the hooked modules' calls afterwards)."""

    def __init__(self):
        super().__init__()
        self.found: List[str] = []
        self.counts: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "overloadpacket", func)
        name = _NO_RULE_OPS.get(packet)
        kind = _RULE_OPS.get(packet)
        if kind:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        if name:
            self.found.append(name)
        elif packet in (aten.add, aten.add_) and len(args) >= 2 and all(
                isinstance(a, torch.Tensor) and a.dim() >= 3 for a in args[:2]) and args[0].shape == args[1].shape:
            self.found.append("residual addition")
        elif packet in (aten._native_batch_norm_legit, aten.native_batch_norm) and len(args) > 5 and args[5] is True:
            self.found.append("normalisation over the sample (InstanceNorm / training-mode BatchNorm)")
        return func(*args, **kwargs)


def check_network(network: nn.Module) -> None:
    """Refuse (EsegetaError naming them) networks with leaf modules that have no excitation rule."""
    if is_exported_program(network):
        raise EsegetaError(
            "excitation backprop needs the network's own modules, and an exported program (.pt2) keeps only "
            "its operations; load the model as a model card (Python class + weights, docs/readme/models.md), "
            "or use GuidedBackprop, DeepLift or IntegratedGradients, which work on .pt2.")
    bad = sorted({type(m).__name__ for m in network.modules()
                  if len(list(m.children())) == 0 and not isinstance(m, RULE_MODULES + PASS_MODULES)})
    if bad:
        raise EsegetaError(
            f"excitation backprop has no rule for {', '.join(bad)}: it is defined for networks of "
            "convolutions, ReLU, max/average pooling, upsampling and positive-scale BatchNorm (non-negative "
            "activations); use GuidedBackprop, DeepLift or IntegratedGradients on this network.")
    for m in network.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.running_var is not None:
            scale = m.weight.detach() / torch.sqrt(m.running_var.detach() + m.eps)
            if bool((scale <= 0).any()):
                raise EsegetaError(
                    f"excitation backprop: a BatchNorm has a non-positive scale in {int((scale <= 0).sum())} "
                    "channel(s) (it inverts those units, which the pass-through rule cannot express); use "
                    "GuidedBackprop, DeepLift or IntegratedGradients on this network.")


class _PassThrough(torch.autograd.Function):
    """Output y of a one-to-one positive-scale module (eval BatchNorm); backward: P unchanged."""

    @staticmethod
    def forward(ctx, a, y):
        return y.detach().clone()

    @staticmethod
    def backward(ctx, p_out):
        return p_out, None


class _Excite(torch.autograd.Function):
    """Output y of a module; backward: the excitation rule with the module's positive map `positive`."""

    @staticmethod
    def forward(ctx, a, y, positive, state, name):
        ctx.save_for_backward(a)
        ctx.positive, ctx.state, ctx.name = positive, state, name
        return y.detach().clone()

    @staticmethod
    def backward(ctx, p_out):
        (a,) = ctx.saved_tensors
        scale = float(a.detach().abs().max()) if a.numel() else 0.0
        if a.numel() and float(a.min()) < -NEGATIVE_TOLERANCE * max(scale, 1e-30):
            ctx.state["negative"].append(ctx.name)
            return torch.zeros_like(a), None, None, None, None
        ctx.state["busy"] = True  # a module's own positive map (Upsample, AvgPool) must not re-enter the hooks
        try:
            with torch.enable_grad():
                leaf = a.detach().requires_grad_(True)
                z = ctx.positive(leaf)
                safe = torch.where(z > 0, z, torch.ones_like(z))
                s = torch.where(z > 0, p_out / safe, torch.zeros_like(p_out))
                c = torch.autograd.grad(z, leaf, s)[0]
        finally:
            ctx.state["busy"] = False
        return a * c, None, None, None, None


def _positive_map(module: nn.Module):
    """The module's map with negative weights removed and no bias, or None for pass-through modules."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        def fn(a, m=module):
            conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[a.dim() - 2]
            return conv(a, m.weight.clamp(min=0).to(a.dtype), None, m.stride, m.padding, m.output_padding,
                        m.groups, m.dilation)
        return fn
    if isinstance(module, nn.modules.conv._ConvNd):
        def fn(a, m=module):
            w = m.weight.clamp(min=0).to(a.dtype)
            if m.padding_mode != "zeros":
                return m._conv_forward(a, w, None)
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[a.dim() - 2]
            return conv(a, w, None, m.stride, m.padding, m.dilation, m.groups)
        return fn
    if isinstance(module, nn.Linear):
        return lambda a, m=module: F.linear(a, m.weight.clamp(min=0).to(a.dtype))
    if isinstance(module, nn.modules.pooling._AvgPoolNd):
        return module  # non-negative averaging weights (zero padding counted or not, as configured)
    if isinstance(module, nn.Upsample) and module.mode in ("linear", "bilinear", "trilinear", "bicubic"):
        if module.mode == "bicubic":
            return None  # negative kernel lobes: refused in `install`
        return module
    return None


@contextlib.contextmanager
def excitation_rules(network: nn.Module, state: Dict[str, List[str]]):
    """Forward hooks that give every rule module the excitation backward (see the module docstring)."""
    handles = []
    calls = state.setdefault("calls", {})

    def hook_for(name, positive):
        def hook(module, args, output):
            if state.get("busy"):
                return output
            kind = _module_kind(module)
            calls[kind] = calls.get(kind, 0) + 1
            a = args[0] if args else None
            if not isinstance(a, torch.Tensor) or not isinstance(output, torch.Tensor) or not a.requires_grad:
                return output
            return _Excite.apply(a, output, positive, state, name)
        return hook

    def pass_through(module, args, output):
        a = args[0] if args else None
        if not isinstance(a, torch.Tensor) or not isinstance(output, torch.Tensor) or not a.requires_grad:
            return output
        return _PassThrough.apply(a, output)

    for name, module in network.named_modules():
        if isinstance(module, nn.Upsample) and module.mode == "bicubic":
            raise EsegetaError(f"excitation backprop: bicubic upsampling '{name}' has negative weights; no rule.")
        positive = _positive_map(module)
        if positive is not None:
            handles.append(module.register_forward_hook(hook_for(name or type(module).__name__, positive)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_hook(pass_through))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _logits(ctx: MethodContext, x: torch.Tensor) -> torch.Tensor:
    forward = ctx.forward
    return forward.logits(x) if hasattr(forward, "logits") else ctx.network(x)


def top_probabilities(logits: torch.Tensor, weights: torch.Tensor, class_index: int, contrastive: bool,
                      contrast_class: int = -1) -> torch.Tensor:
    """(B, K, *S) top-level probabilities on the logits: the weights at the class, minus (contrastive)
    the same weights at the contrast class or shared equally by every other class."""
    top = torch.zeros_like(logits)
    w = weights[:, 0].to(logits.dtype)
    top[:, class_index] = w
    if contrastive:
        n = logits.shape[1]
        if n < 2:
            raise EsegetaError("ContrastiveExcitationBackprop needs a contrast class; this model has one output "
                               "channel: use ExcitationBackprop.")
        if contrast_class >= 0:
            if contrast_class >= n or contrast_class == class_index:
                raise EsegetaError(f"contrast_class must be another of the model's {n} classes; got {contrast_class}.")
            top[:, contrast_class] -= w
        else:
            for k in range(n):
                if k != class_index:
                    top[:, k] -= w / (n - 1)
    return top


def excitation_map(ctx: MethodContext, contrastive: bool):
    """(B, C, *S) MWP of the layer (channels summed), on the input grid; diagnostics with the masses."""
    check_network(ctx.network)
    layer = layer_for(ctx)
    store = {}

    def keep(module, args, output):
        store["A"] = first_tensor(output)

    state: Dict[str, List[str]] = {"negative": []}
    handle = None
    watch = _OpWatch()
    try:
        with torch.enable_grad(), excitation_rules(ctx.network, state):
            # after the rule hooks: keep the layer's output as the network uses it downstream
            handle = layer.register_forward_hook(keep)
            x = ctx.inputs.detach().requires_grad_(True)
            with watch:
                logits = _logits(ctx, x)
            calls = state.get("calls", {})
            watch.found += [f"{kind} outside a module ({n - calls.get(kind, 0)} functional call(s))"
                            for kind, n in watch.counts.items() if n > calls.get(kind, 0)]
            if watch.found:
                raise EsegetaError(
                    f"excitation backprop has no rule for {', '.join(sorted(set(watch.found)))} in this network's "
                    "forward; it is defined for ReLU networks of convolutions, pooling and upsampling.")
            weights = ctx.forward_args[0] if ctx.forward_args else torch.ones_like(logits[:, :1])
            class_index = int(getattr(ctx.forward, "class_index", 1))
            top = top_probabilities(logits, weights, class_index, contrastive,
                                    int(ctx.params.get("contrast_class", -1)))
            activation = store["A"]
            p_layer = torch.autograd.grad(logits, activation, top)[0]
    finally:
        if handle is not None:
            handle.remove()
    if state["negative"]:
        raise EsegetaError(
            f"excitation backprop needs non-negative activations, but the input of '{state['negative'][0]}' "
            "(above the explained layer) has negative values; choose a layer above it, or use GuidedBackprop, "
            "DeepLift or IntegratedGradients on this network.")
    layer_map = p_layer.detach().sum(dim=1, keepdim=True)
    diag = {"mwp_top_mass": top.detach().double().sum(), "mwp_layer_mass": layer_map.double().sum(),
            "mwp_top_abs_mass": top.detach().double().abs().sum()}
    return to_input_grid(layer_map, ctx.inputs, ctx.layer_geometry), diag


def excitation_backprop(ctx: MethodContext):
    return excitation_map(ctx, contrastive=False)


def contrastive_excitation_backprop(ctx: MethodContext):
    return excitation_map(ctx, contrastive=True)


def _rectify(attribution: torch.Tensor, params) -> torch.Tensor:
    return attribution.clamp(min=0) if params.get("relu", True) else attribution


def add_conservation_check(result) -> None:
    """Trust check "conservation": the layer's total MWP against the top-level total (lost where a
    unit has no excitatory input, Z = 0)."""
    diag = result.diagnostics
    top, layer = diag.get("mwp_top_mass"), diag.get("mwp_layer_mass")
    scale = diag.get("mwp_top_abs_mass")
    if not isinstance(top, (int, float)) or not isinstance(layer, (int, float)) or not scale:
        return
    value = abs(layer - top) / scale
    detail = (f"summed probability at the layer {layer:.4g} vs at the output {top:.4g}: relative loss {value:.2%} "
              f"(tolerance {CONSERVATION_TOLERANCE:.0%}; lost at units without excitatory input)")
    result.add_check("conservation", "pass" if value <= CONSERVATION_TOLERANCE else "warn", value, detail)


SPECS = [
    MethodSpec(
        name="ExcitationBackprop", family="layer", signed=False, needs_baseline=False, needs_layer=True, cost=2.0,
        patching="additive", params=(LAYER_PARAM,), attribute=excitation_backprop, captum=None,
        trust=add_conservation_check,
        description="marginal winning probability (Zhang et al.) at a layer of a ReLU network, upsampled",
    ),
    MethodSpec(
        name="ContrastiveExcitationBackprop", family="layer", signed=True, needs_baseline=False, needs_layer=True,
        cost=2.0, patching="additive",
        params=(LAYER_PARAM,
                ParamSpec("contrast_class", "int", -1, minimum=-1, maximum=1000,
                          help="class subtracted; -1 = every other class, sharing the weights equally"),
                ParamSpec("relu", "bool", True, help="keep only the positive part of the difference")),
        attribute=contrastive_excitation_backprop, finalize=_rectify, captum=None, trust=add_conservation_check,
        description="contrastive MWP: the class's excitation minus the contrast class's (ReLU networks)",
    ),
]
