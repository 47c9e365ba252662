"""Layer-wise relevance propagation (LRP) rules for 1-D/2-D/3-D networks, as a modified backward pass.

Relevance is carried in gradient-times-input form: the backward pass carries c with R = a * c at every
tensor a (R: the relevance of a's units), and the input's relevance is x * c_x.  In this form:

- every op that is affine in one tensor (views, concatenation, padding, nearest/linear/cubic
  interpolation, average pooling, sums, additions of two activations, multiplication or division by
  a constant) gets the LRP-0 rule from its plain gradient: for y = sum_j w_j a_j + b,
  R_j = a_j w_j R_y / y is a_j * (w_j c_y).  A residual addition y = u + v therefore splits R_y in
  proportion to the summands (R_u = u R_y / y), concatenation splits by channel, and a constant
  offset keeps the share b / y of R_y ("absorbed");
- positively homogeneous activations (ReLU, LeakyReLU, PReLU: f(z) = f'(z) z) pass relevance
  unchanged through their plain gradient (R_z = z f'(z) c_a = a c_a = R_a), as standard LRP does;
  other rectifier-like activation modules with f(0) = 0 (GELU, ELU, CELU, SELU, SiLU, Mish,
  Hardswish) pass it unchanged by a hook (c_z = c_a f(z) / z, f'(0) at z = 0);
- max pooling routes each output's relevance to its winner (the gradient's routing);
- the model's own intensity normalisation of the input (`models.base.IntensityNormalization`, an
  elementwise per-channel affine map, optionally clipped) passes relevance unchanged to each voxel,
  so the map is the relevance of the image the network reads, voxel by voxel (its offset keeps none);
  so does preprocessing inside a pipeline's forward before its first hooked layer (voxel moves and
  per-voxel maps with constants, followed by the op watch with an index map to x: `_ChainPass`);
- convolutions (ConvNd, ConvTransposeNd) and Linear get the chosen rule in their backward (forward
  hooks and `_RuleFunction`), with z = W a + b the module's output and s() the stabiliser
  s(z) = z + eps * sign(z) (sign(0) = +1), a+ = max(a, 0), a- = min(a, 0), W+ / W- the parts of W:
  * epsilon (Bach et al. 2015): R_a = a * W^T (R_z / s(z));
  * gamma (Montavon et al. 2019, in the generalised form for signed inputs of Andeol et al. 2021,
    as zennit implements it): where z > 0, R_z is shared among the positive contributions
    a+ (W + gamma W+) and a- (W + gamma W-) (bias b + gamma b+ in the denominator); where z < 0 among
    the negative ones a+ (W + gamma W-) and a- (W + gamma W+) (bias b + gamma b-);
  * alpha-beta (Bach et al. 2015; alpha - beta = 1): R_a = alpha * (positive share) - beta * (negative
    share) with z+ = W+ a+ + W- a- + b+ and z- = W- a+ + W+ a- + b-;
  * composite: epsilon on the layer that produces the logits (the first rule layer met walking the
    autograd graph back from the logits), gamma on every other convolution (Montavon et al. 2019: LRP-0/epsilon in the upper
    layers, gamma in the lower ones);
- BatchNorm with running statistics directly after a convolution or Linear (the BatchNorm's input is
  the convolution's output tensor) is merged into it (W' = W * g / sqrt(v + e), b' = (b - m) g /
  sqrt(v + e) + beta per output channel) and the rule applies to the merged layer;
- normalisation with statistics from the input (InstanceNorm, GroupNorm, LayerNorm, BatchNorm in
  training mode or without running statistics, and a BatchNorm not directly after a rule layer): the
  normalisation is taken as the affine map it is at the current input, then the epsilon rule on it.
  Two readings of "the affine map at the current input" (`norm_rule`):
  * "centred" (default): y = k * (x - mean(x)) + bias, with k = weight / sqrt(var + eps) from the
    current statistics held fixed and the mean kept as the linear map it is (each unit's share of the
    mean is routed back to it): R_x = x * (t - mean(t)), t = k * R_y / s(y), means over each
    statistic's group.  Only the bias keeps a share of the relevance;
  * "affine": y = k * x + o per channel (and sample, or group), with o = bias - k * mean(x) held fixed
    as well: R_x = x * k * R_y / s(y).  The offset o keeps its share, which is large when the mean is
    large against the spread (measured: 61 % of a random-weight MONAI DynUNet's score lost, against
    < 0.001 % with "centred"; Testing/methods/test_lrp_monai.py).
  BatchNorm with running statistics is a constant affine map: both readings give k * R_y / s(y).

Written here rather than with zennit's hooks (zennit, LGPL-3.0, is the reference in the tests): its
rules carry relevance itself through the backward pass, so every op without a hook (functional
additions, interpolation, normalisation) would need one, it has no rule for InstanceNorm/GroupNorm, and
its package imports torchvision, which Slicer's Python does not need otherwise.  The formulas are
re-derived from the papers; no zennit code is copied.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EsegetaError
from .common import is_exported_program

RULES = ("epsilon", "gamma", "alpha_beta", "composite")
NORM_RULES = ("centred", "affine")
RULE_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
# rectifier-like activations with f(0) = 0 that are not positively homogeneous: relevance passed by a hook
ACTIVATION_MODULES = (nn.GELU, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Mish, nn.Hardswish)
NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps * sign(z), with sign(0) = +1 (the denominator never vanishes for eps > 0)."""
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (eps = 0: LRP-0 at units with z = 0, whose relevance is 0)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _affine_fn(module: nn.Module, kwargs: Dict[str, Any], a: torch.Tensor):
    """f(a, weight, bias): the module's map with the given parameters (a convolution, transposed
    convolution or Linear, with the module's geometry)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        n = a.dim() - 2
        output_padding = module._output_padding(a, kwargs.get("output_size"), module.stride, module.padding,
                                                module.kernel_size, n, module.dilation)
        conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
        return lambda t, w, b: conv(t, w, b, module.stride, module.padding, output_padding, module.groups,
                                    module.dilation)
    if isinstance(module, nn.modules.conv._ConvNd):
        return lambda t, w, b: module._conv_forward(t, w, b)
    return lambda t, w, b: F.linear(t, w, b)


def _out_channel_view(module: nn.Module, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast against the module's output `like`."""
    if isinstance(module, nn.Linear):
        return v
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def _scale_out_channels(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight with each output channel o multiplied by scale[o] (conv: dim 0; transposed conv:
    dim 1 within each group; Linear: rows)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        g = module.groups
        w = weight.view(g, weight.shape[0] // g, weight.shape[1], *weight.shape[2:])
        s = scale.view(g, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
        return (w * s).view_as(weight)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1)))


def _channels_match(layer: nn.Module, y: torch.Tensor) -> bool:
    """Whether a BatchNorm on the layer's output y normalises the layer's output channels (dim 1 of y;
    a Linear's features are its last dim, so only for 2-D outputs)."""
    return not isinstance(layer, nn.Linear) or y.dim() == 2


class LayerRule:
    """One call of a rule layer: its map f, (possibly BatchNorm-merged) parameters, rule and options."""

    def __init__(self, name: str, module: nn.Module, fn, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 rule: str, options: Dict[str, float], state: Dict[str, Any]):
        self.name, self.module, self.fn = name, module, fn
        self.weight, self.bias = weight, bias
        self.rule, self.options, self.state = rule, options, state

    def merged_with(self, bn: nn.modules.batchnorm._BatchNorm, name: str) -> "LayerRule":
        """The layer followed by an eval-mode BatchNorm, as one layer (W', b' per output channel)."""
        scale = (bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)) / torch.sqrt(
            bn.running_var.detach() + bn.eps)
        shift = (bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)) - \
            bn.running_mean.detach() * scale
        bias = shift if self.bias is None else self.bias * scale + shift
        return LayerRule(f"{self.name}+{name}", self.module, self.fn,
                         _scale_out_channels(self.module, self.weight, scale), bias, self.rule, self.options,
                         self.state)

    # ------------------------------------------------------------------ the backward rules
    def _vjp(self, a: torch.Tensor, weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """W^T s for the module's linear map with `weight` (a vector-Jacobian product, bias-free)."""
        with torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            out = self.fn(leaf, weight, None)
            return torch.autograd.grad(out, leaf, s)[0]

    def backward(self, a: torch.Tensor, z: torch.Tensor, c_z: torch.Tensor) -> torch.Tensor:
        """c_a (so that R_a = a * c_a) from c_z (R_z = z * c_z) by the layer's rule."""
        eps = float(self.options["epsilon"])
        w = self.weight.detach().to(a.dtype)
        b = None if self.bias is None else self.bias.detach().to(a.dtype)
        relevance = z * c_z
        bias_absorbed = torch.zeros((), dtype=torch.float64, device=a.device)
        if self.rule == "epsilon":
            den = stabilise(z, eps)
            s = _safe_div(relevance, den)
            c_a = self._vjp(a, w, s)
            if b is not None:
                bias_absorbed = (_out_channel_view(self.module, b, z) * s).double().sum()
        else:
            ap, an = a.clamp(min=0), a.clamp(max=0)
            pos, neg = a > 0, a < 0
            wp, wn = w.clamp(min=0), w.clamp(max=0)
            bp = None if b is None else b.clamp(min=0)
            bn = None if b is None else b.clamp(max=0)
            if self.rule == "gamma":
                gamma = float(self.options["gamma"])
                w_up, w_down = w + gamma * wp, w + gamma * wn  # positive / negative parts enhanced
                b_up = None if b is None else b + gamma * bp
                b_down = None if b is None else b + gamma * bn
                z_pos = self.fn(ap, w_up, b_up) + self.fn(an, w_down, None)
                z_neg = self.fn(ap, w_down, b_down) + self.fn(an, w_up, None)
                s_pos = torch.where(z > 0, _safe_div(relevance, stabilise(z_pos, eps)), torch.zeros_like(z))
                s_neg = torch.where(z < 0, _safe_div(relevance, stabilise(z_neg, eps)), torch.zeros_like(z))
                c_a = pos * (self._vjp(a, w_up, s_pos) + self._vjp(a, w_down, s_neg)) + \
                    neg * (self._vjp(a, w_down, s_pos) + self._vjp(a, w_up, s_neg))
                if b is not None:
                    bias_absorbed = (_out_channel_view(self.module, b_up, z) * s_pos).double().sum() + \
                        (_out_channel_view(self.module, b_down, z) * s_neg).double().sum()
            else:  # alpha_beta
                alpha, beta = float(self.options["alpha"]), float(self.options["beta"])
                z_pos = self.fn(ap, wp, bp) + self.fn(an, wn, None)
                z_neg = self.fn(ap, wn, bn) + self.fn(an, wp, None)
                s_pos = _safe_div(relevance, stabilise(z_pos, eps))
                s_neg = _safe_div(relevance, stabilise(z_neg, eps))
                c_a = alpha * (pos * self._vjp(a, wp, s_pos) + neg * self._vjp(a, wn, s_pos)) - \
                    beta * (pos * self._vjp(a, wn, s_neg) + neg * self._vjp(a, wp, s_neg))
                if b is not None:
                    bias_absorbed = alpha * (_out_channel_view(self.module, bp, z) * s_pos).double().sum() - \
                        beta * (_out_channel_view(self.module, bn, z) * s_neg).double().sum()
        absorbed = relevance.double().sum() - (a * c_a).double().sum()
        acc = self.state["absorbed"]
        acc["bias"] = acc.get("bias", 0.0) + float(bias_absorbed)
        acc["rule"] = acc.get("rule", 0.0) + float(absorbed - bias_absorbed)
        return c_a


class _RuleFunction(torch.autograd.Function):
    """Output y of a rule layer with input a; backward: the layer's LRP rule (`LayerRule.backward`)."""

    @staticmethod
    def forward(ctx, a, y, layer):
        ctx.save_for_backward(a, y)
        ctx.layer = layer
        return y.detach().clone()

    @staticmethod
    def backward(ctx, c_y):
        a, y = ctx.saved_tensors
        return ctx.layer.backward(a, y, c_y), None, None


class _ActivationPass(torch.autograd.Function):
    """Output a = f(z) of an elementwise activation; backward: relevance passed unchanged,
    c_z = c_a * f(z) / z (R_z = R_a), with `slope0` = f'(0) where z = 0."""

    @staticmethod
    def forward(ctx, z, a, slope0):
        ctx.save_for_backward(z, a)
        ctx.slope0 = slope0
        return a.detach().clone()

    @staticmethod
    def backward(ctx, c_a):
        z, a = ctx.saved_tensors
        ratio = torch.where(z != 0, a / torch.where(z != 0, z, torch.ones_like(z)), torch.full_like(z, ctx.slope0))
        return c_a * ratio, None, None


class _InputPass(torch.autograd.Function):
    """Output y of an elementwise map of the network's input x (the model's intensity normalisation);
    backward: its relevance R_y = y * c_y passed unchanged to the input voxels, stored in
    state["input_relevance"] (c_x = R_y / x would be undefined where x = 0)."""

    @staticmethod
    def forward(ctx, x, y, state):
        ctx.save_for_backward(y)
        ctx.state = state
        return y.detach().clone()

    @staticmethod
    def backward(ctx, c_y):
        (y,) = ctx.saved_tensors
        relevance = (y * c_y).detach()
        held = ctx.state.get("input_relevance")
        ctx.state["input_relevance"] = relevance if held is None else held + relevance
        return torch.zeros_like(c_y), None, None


class _ChainPass(torch.autograd.Function):
    """A tensor a made from the network's input x by preprocessing alone (voxel moves and per-voxel
    maps with constants: the input's normalisation, cropping, axis order), where it enters a rule
    layer; backward: its relevance R_a = a * c_a passed unchanged to the x voxels `index` names
    (summed where one voxel feeds several), stored in state["input_relevance"]."""

    @staticmethod
    def forward(ctx, a, index, state):
        ctx.save_for_backward(a, index)
        ctx.state = state
        return a.detach().clone()

    @staticmethod
    def backward(ctx, c_a):
        a, index = ctx.saved_tensors
        x = ctx.state["input"]
        relevance = (a * c_a).detach().reshape(-1)
        flat = index.reshape(-1)
        valid = flat >= 0
        buffer = torch.zeros(x.numel(), dtype=relevance.dtype, device=relevance.device)
        buffer.index_add_(0, flat[valid], relevance[valid])
        held = ctx.state.get("input_relevance")
        ctx.state["input_relevance"] = buffer.view(x.shape) if held is None else held + buffer.view(x.shape)
        return torch.zeros_like(c_a), None, None


def _input_maps():
    """Elementwise input maps whose relevance passes unchanged (EsegetaLib's intensity normalisation)."""
    from ..models.base import IntensityNormalization
    return (IntensityNormalization,)


def _linear_modules():
    """EsegetaLib's own linear pipeline modules whose ops are trusted (LRP-0 from their gradient): the
    separable resampling of nnU-Net/bundle pipelines (a clip after a cubic resampling drops the
    relevance of clipped voxels: counted as unaccounted by the conservation check)."""
    from ..models.resampling import SeparableResample
    return (SeparableResample,)


def _slope_at_zero(module: nn.Module) -> float:
    with torch.no_grad():
        d = torch.tensor([1e-6, -1e-6], dtype=torch.float64)
        return float((module(d)[0] - module(d)[1]) / 2e-6)


def _norm_map(module: nn.Module, x: torch.Tensor):
    """(k, mean_fn) of a normalisation at input x: the scale k (broadcast to x) with the statistics
    held fixed, and mean_fn(t) = t's mean over each statistic's group (broadcast back), or None when
    the statistics are constants (running statistics)."""
    xd = x.detach()
    if isinstance(module, nn.GroupNorm):
        n, c = xd.shape[:2]
        g = module.num_groups
        grouped = xd.reshape(n, g, -1)
        var = grouped.var(dim=2, unbiased=False, keepdim=True)
        inv = torch.rsqrt(var + module.eps).expand(n, g, grouped.shape[2]).reshape(xd.shape)
        weight = module.weight.detach().view(1, c, *([1] * (xd.dim() - 2))) if module.affine else 1.0
        k = inv * weight

        def mean_fn(t):
            return t.reshape(n, g, -1).mean(dim=2, keepdim=True).expand(n, g, grouped.shape[2]).reshape(t.shape)
        return k, mean_fn
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(xd.dim() - len(module.normalized_shape), xd.dim()))
        var = xd.var(dim=dims, unbiased=False, keepdim=True)
        k = torch.rsqrt(var + module.eps)
        if module.weight is not None:
            k = k * module.weight.detach()
        return k.expand_as(xd), (lambda t: t.mean(dim=dims, keepdim=True).expand_as(t))
    # BatchNorm / InstanceNorm
    channel_shape = (1, xd.shape[1]) + (1,) * (xd.dim() - 2)
    weight = module.weight.detach().view(channel_shape) if module.weight is not None else 1.0
    running = module.running_var is not None and (
        not module.training if isinstance(module, nn.modules.batchnorm._BatchNorm)
        else (module.track_running_stats and not module.training))
    if running:
        k = torch.rsqrt(module.running_var.detach().view(channel_shape) + module.eps) * weight
        return k.expand_as(xd), None
    dims = (0,) + tuple(range(2, xd.dim())) if isinstance(module, nn.modules.batchnorm._BatchNorm) \
        else tuple(range(2, xd.dim()))
    var = xd.var(dim=dims, unbiased=False, keepdim=True)
    k = torch.rsqrt(var + module.eps) * weight
    return k.expand_as(xd), (lambda t: t.mean(dim=dims, keepdim=True).expand_as(t))


class _NormFunction(torch.autograd.Function):
    """Output y of a normalisation with input x; backward: the epsilon rule on its affine map at the
    current statistics (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, y, module, options, state):
        ctx.save_for_backward(x, y)
        ctx.module, ctx.options, ctx.state = module, options, state
        return y.detach().clone()

    @staticmethod
    def backward(ctx, c_y):
        x, y = ctx.saved_tensors
        k, mean_fn = _norm_map(ctx.module, x)
        k = k.to(x.dtype)
        relevance = y * c_y
        s = _safe_div(relevance, stabilise(y, float(ctx.options["epsilon"])))
        t = k * s
        if ctx.options["norm_rule"] == "centred" and mean_fn is not None:
            t = t - mean_fn(t)
        acc = ctx.state["absorbed"]
        acc["norm"] = acc.get("norm", 0.0) + float(relevance.double().sum() - (x * t).double().sum())
        return t, None, None, None, None


def check_modules(network: nn.Module) -> None:
    """Refuse, before any work, networks whose layers LRP has no rule for (one line naming them)."""
    if isinstance(network, torch.jit.ScriptModule) or any(isinstance(m, torch.jit.ScriptModule)
                                                           for m in network.modules()):
        raise EsegetaError("LRP cannot run on a TorchScript model: it needs the network's modules to attach its "
                           "rules, which TorchScript hides; give a model card (the network's Python class and its "
                           "weights, see docs/readme/models.md) or the eager nn.Module.")
    if is_exported_program(network):
        raise EsegetaError("LRP cannot run on an exported program (.pt2): it needs the network's modules to attach "
                           "its rules, and an exported program's layers are graph ops; give a model card (the "
                           "network's Python class and its weights, see docs/readme/models.md) or the eager "
                           "nn.Module.")
    bad = [f"'{name}' ({type(m).__name__})" for name, m in network.named_modules() if isinstance(m, NO_RULE_MODULES)]
    if bad:
        raise EsegetaError(
            f"LRP has no rule for layer {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}: it has rules "
            "for convolutions, Linear, BatchNorm/InstanceNorm/GroupNorm/LayerNorm, ReLU/LeakyReLU/PReLU and other "
            "rectifiers, pooling, upsampling, concatenation and residual additions; use IntegratedGradients or "
            "DeepLift on this network.")


# Modules LRP has no rule for (gates, bounded or non-zero-at-zero activations, softmax, attention,
# recurrence): refused before the forward pass.  Other modules need no rule of their own: the op watch
# (methods/lrp.py) checks every op they run outside the hooked modules.
NO_RULE_MODULES = (nn.Sigmoid, nn.Tanh, nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin, nn.Hardsigmoid,
                   nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
                   nn.LogSigmoid, nn.Threshold, nn.RReLU, nn.GLU, nn.MultiheadAttention, nn.modules.rnn.RNNBase,
                   nn.modules.rnn.RNNCellBase, nn.Embedding, nn.Bilinear, nn.LocalResponseNorm,
                   nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@contextlib.contextmanager
def lrp_rules(network: nn.Module, rule: str, options: Dict[str, Any], state: Dict[str, Any]):
    """Forward hooks that give every convolution/Linear its rule and every normalisation the norm rule
    (merging eval BatchNorm into the layer before it).  `state["depth"]` > 0 while a hooked module runs
    (the op watch trusts its ops); `state["layers"]` lists the rule-layer calls in forward order."""
    handles = []
    outputs = {}  # id(output tensor of a rule layer) -> (tensor, LayerRule, input): BatchNorm merging
    state.setdefault("layers", [])
    state.setdefault("absorbed", {})
    state.setdefault("depth", 0)
    names = {m: n or type(m).__name__ for n, m in network.named_modules()}
    base_rule = "gamma" if rule == "composite" else rule  # composite: see assign_composite

    def enter(module, args, kwargs=None):
        state["depth"] += 1
        a = args[0] if args else None
        chain = state.get("chain")
        if chain is not None and isinstance(a, torch.Tensor) and a is not state.get("input") and a in chain \
                and a.requires_grad and not isinstance(module, _input_maps()):
            return (_ChainPass.apply(a, chain[a], state),) + tuple(args[1:])
        return None

    def leave():
        state["depth"] -= 1

    def rule_hook(module, args, kwargs, output):
        leave()
        a = args[0] if args else None
        if not isinstance(a, torch.Tensor) or not isinstance(output, torch.Tensor) or not a.requires_grad:
            return output
        layer = LayerRule(names[module], module, _affine_fn(module, kwargs, a), module.weight,
                          module.bias, base_rule, options, state)
        state["layers"].append(layer)
        out = _RuleFunction.apply(a, output, layer)
        outputs[id(out)] = (out, layer, a)
        return out

    def norm_hook(module, args, output):
        leave()
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or not x.requires_grad:
            return output
        before = outputs.get(id(x))
        if before is not None and before[0] is x and isinstance(module, nn.modules.batchnorm._BatchNorm) \
                and not module.training and module.running_var is not None and _channels_match(before[1].module, x):
            merged = before[1].merged_with(module, names[module])
            layers = state["layers"]
            layers[layers.index(before[1])] = merged  # the merged layer takes the conv's place
            out = _RuleFunction.apply(before[2], output, merged)
            outputs[id(out)] = (out, merged, before[2])
            return out
        return _NormFunction.apply(x, output, module, options, state)

    def activation_hook(module, args, output):
        leave()
        z = args[0] if args else None
        if not isinstance(z, torch.Tensor) or not isinstance(output, torch.Tensor) or not z.requires_grad:
            return output
        return _ActivationPass.apply(z, output, slopes[module])

    def input_hook(module, args, output):
        leave()
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or not x.requires_grad:
            return output
        if x is not state.get("input") or output.shape != x.shape:
            raise EsegetaError(f"LRP: the elementwise input map '{names[module]}' ({type(module).__name__}) is "
                               "applied to something other than the network's input; no rule for it there.")
        return _InputPass.apply(x, output, state)

    def leave_hook(module, args, output):
        leave()
        state["linear_modules"] = state.get("linear_modules", 0) + 1

    slopes = {}
    input_maps = _input_maps()
    linear_modules = _linear_modules()
    for module in network.modules():
        if isinstance(module, linear_modules):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave_hook))
        elif isinstance(module, input_maps):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(input_hook))
        elif isinstance(module, ACTIVATION_MODULES):
            slopes[module] = _slope_at_zero(module)
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(activation_hook))
        elif isinstance(module, RULE_MODULES):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(rule_hook, with_kwargs=True))
        elif isinstance(module, NORM_MODULES):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(norm_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()


def assign_composite(logits: torch.Tensor) -> int:
    """composite: epsilon on the rule layers that produce the logits (the first rule layers met walking
    the autograd graph back from `logits`: the head, or every head it sums), gamma elsewhere (the
    layers' base rule).  Returns how many layers got epsilon."""
    seen, stack, heads = set(), [logits.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        layer = getattr(node, "layer", None)
        if isinstance(layer, LayerRule):
            layer.rule = "epsilon"
            heads += 1
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return heads
