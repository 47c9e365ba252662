"""Guided backpropagation and deconvolution below autograd, for ANY rectifier and ANY model format.

Captum's GuidedBackprop/Deconvolution hook `nn.ReLU` modules only; on networks built with PReLU,
LeakyReLU, ELU, GELU, SiLU, functional calls, TorchScript or `torch.export` programs they silently
return the plain gradient.  Here the rule is applied where every model format meets: PyTorch's
dispatcher.  A `torch.utils._python_dispatch.TorchDispatchMode` is active during the forward and the
backward pass; it sees the backward kernel of every activation (`aten.threshold_backward` for ReLU,
`aten.leaky_relu_backward`, `aten._prelu_kernel_backward`, `aten.elu_backward` (ELU, SELU, CELU),
`aten.gelu_backward`, `aten.silu_backward`, `aten.mish_backward`, `aten.hardswish_backward`,
`aten.hardtanh_backward` (ReLU6, Hardtanh), `aten.softplus_backward`), whether the activation was a
module (reused or not), a functional call, an in-place op, or an op inside TorchScript or an exported
program, and rewrites its result:

- guided backpropagation (Springenberg et al. 2015): grad_in = relu(f'(x) * grad_out).  For ReLU this
  is exactly Captum's rule (forward gate x > 0 and backward gate grad_out > 0).  For other rectifiers
  the true local derivative f'(x) takes the place of the forward gate (a PReLU's negative slope or
  GELU's smooth gate is kept) and only the positive part of the resulting gradient is passed on.
- deconvolution (Zeiler & Fergus 2014): grad_in = relu(grad_out), the forward gate ignored, for every
  rectifier; exactly Captum's rule for ReLU.

Sigmoid, tanh and hardsigmoid are gates, not rectifiers (attention gates, the output's sigmoid): their
gradients pass unchanged.  An activation composed of elementary ops, x * sigmoid(a x) (MONAI `Swish`)
or x * tanh(softplus(x)) (MONAI `Mish`), has no single backward kernel to rewrite: it is detected in
the forward pass and the run is refused with its name (use `nn.SiLU` / `nn.Mish`, which the rule
covers).  A run that meets no rectifier at all is refused too, since its map would be the plain
gradient.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from ..errors import EsegetaError

aten = torch.ops.aten

# Backward kernels of rectifiers (overload packets): the first argument is grad_out in every one.
RECTIFIER_BACKWARD = {
    aten.threshold_backward: "ReLU/Threshold",
    aten.leaky_relu_backward: "LeakyReLU",
    aten._prelu_kernel_backward: "PReLU",
    aten.elu_backward: "ELU/SELU/CELU",
    aten.gelu_backward: "GELU",
    aten.silu_backward: "SiLU",
    aten.mish_backward: "Mish",
    aten.hardswish_backward: "Hardswish",
    aten.hardtanh_backward: "ReLU6/Hardtanh",
    aten.softplus_backward: "Softplus",
}
# Forward ops whose output may gate its own input (x * sigmoid(a x), x * tanh(softplus(x))).
_GATES = (aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_)
_CHAIN = (aten.softplus, aten.mul)  # elementwise steps between x and the gate (a x, softplus(x))
_MUL = (aten.mul, aten.mul_)


def call_op(func, args, kwargs):
    """func(*args, **kwargs), re-wrapping numbers where the op's schema wants a Tensor: the TorchScript
    interpreter passes some 0-dim "wrapped number" tensors (e.g. to aten::equal in a traced SwinUNETR),
    which reach Python dispatch modes as plain ints and no longer match the schema."""
    try:
        return func(*args, **kwargs)
    except RuntimeError as error:
        if "Expected a value of type 'Tensor'" not in str(error):
            raise
        schema = func._schema.arguments
        fixed = [torch.tensor(a) if isinstance(a, (int, float, bool)) and i < len(schema)
                 and str(schema[i].type) == "Tensor" else a for i, a in enumerate(args)]
        return func(*fixed, **kwargs)


def _packet(func):
    return getattr(func, "overloadpacket", func)


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


class RectifierRules(TorchDispatchMode):
    """Dispatch mode: inside it, the backward of every rectifier follows `rule` ("guided" or
    "deconvolution").  `seen` counts rectifier backward calls, `changed` those whose result the rule
    altered; `by_kind` the calls per rectifier type; `composed` names composed activations found."""

    def __init__(self, rule: str):
        super().__init__()
        if rule not in ("guided", "deconvolution"):
            raise ValueError(rule)
        self.rule = rule
        self.seen = 0
        self.changed = 0
        self.zeroed = 0  # calls where the rule turned a non-zero backward signal into zeros everywhere
        self.by_kind: Dict[str, int] = {}
        self.composed: Dict[str, int] = {}
        self._roots = WeakTensorKeyDictionary()  # tensor -> the tensor an elementwise chain started from
        self._gates = WeakTensorKeyDictionary()  # gate output -> gate name

    def _root(self, t):
        return self._roots.get(t, t)

    def _track_forward(self, packet, args, out) -> None:
        """Note elementwise chains x -> a x -> sigmoid/tanh, and a product of a gate with its own root."""
        if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            return
        if packet in _GATES:
            self._roots[out] = self._root(args[0])
            self._gates[out] = "sigmoid" if packet in (aten.sigmoid, aten.sigmoid_) else "tanh"
        elif packet in _MUL and len(args) > 1:
            a, b = args[0], args[1]
            if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor):
                for x, gate in ((a, b), (b, a)):
                    if gate in self._gates and self._root(gate) is self._root(x):
                        name = "x * sigmoid(a x) (Swish)" if self._gates[gate] == "sigmoid" else "x * tanh(softplus(x)) (Mish)"
                        self.composed[name] = self.composed.get(name, 0) + 1
                        return
                if b.dim() == 0 or b.numel() == 1:
                    self._roots[out] = self._root(a)
                elif a.dim() == 0 or a.numel() == 1:
                    self._roots[out] = self._root(b)
            elif isinstance(a, torch.Tensor):
                self._roots[out] = self._root(a)
        elif packet in _CHAIN:
            self._roots[out] = self._root(args[0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = _packet(func)
        kind = RECTIFIER_BACKWARD.get(packet)
        if kind is None:
            out = call_op(func, args, kwargs)
            if packet in _GATES or packet in _MUL or packet in _CHAIN:
                self._track_forward(packet, args, out)
            return out
        self.seen += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        result = func(*args, **kwargs)
        grad_in = _first(result)
        if self.rule == "guided":
            new = torch.clamp(grad_in, min=0)
        else:
            new = torch.clamp(args[0], min=0).to(grad_in.dtype)
        if not torch.equal(new, grad_in):
            self.changed += 1
            if not bool(new.any()):
                self.zeroed += 1
        if isinstance(result, (tuple, list)):
            return type(result)([new, *result[1:]])
        return new

    def diagnostics(self) -> Dict[str, Any]:
        """Counts that add up over windows (the engine sums numeric diagnostics)."""
        return {"rule_calls_changed": self.changed, "rule_calls_seen": self.seen, "rule_calls_zeroed": self.zeroed}


def is_torchscript(network: torch.nn.Module) -> bool:
    return isinstance(network, torch.jit.ScriptModule) or any(
        isinstance(m, torch.jit.ScriptModule) for m in network.modules()
    )


def rectified_gradients(forward: torch.nn.Module, inputs: torch.Tensor, forward_args: tuple, rule: str,
                        method: str):
    """(d forward(inputs).sum() / d inputs with the guided or deconvolution rule on every rectifier,
    diagnostics {"rule_calls_changed", "rule_calls_seen"}).

    inputs: (B, C, *S); forward: (B, C, *S) [+ forward_args] -> (B,).  Raises EsegetaError when the
    forward pass holds a composed activation the rule cannot reach, or no rectifier at all."""
    mode = RectifierRules(rule)
    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad(), mode:
        score = forward(x, *(forward_args or ()))
        if mode.composed:
            names = ", ".join(sorted(mode.composed))
            raise EsegetaError(
                f"{method} cannot apply its rule to the composed activation {names} in this model (no single "
                "backward kernel to rewrite); build it with nn.SiLU / nn.Mish, or use Saliency or IntegratedGradients."
            )
        grads = torch.autograd.grad(score.sum(), x)[0]
    if mode.seen == 0:
        raise EsegetaError(
            f"{method} found no rectifier (ReLU, PReLU, LeakyReLU, ELU, GELU, SiLU, ReLU6, ...) on the path "
            "from the input to the score, so its map would be the plain gradient; use Saliency instead."
        )
    return grads, mode.diagnostics()


def add_rule_check(result) -> None:
    """Trust check "rectifier_rule": the share of backward calls the method's rule changed (value),
    from the diagnostics summed over windows: rectifiers for guided backprop and deconvolution, every
    non-linear op (activations, norm layers, products, softmax, max-pool) for the DeepLift family.
    pass when the rule met such calls and changed at least one; warn when it changed none (the map
    is then the plain gradient)."""
    diag = getattr(result, "diagnostics", {}) or {}
    seen = int(diag.get("rule_calls_seen", 0) or 0)
    changed = int(diag.get("rule_calls_changed", 0) or 0)
    what = "non-linear op" if "DeepLift" in str(getattr(result, "name", "")) else "rectifier"
    if seen == 0:
        result.add_check("rectifier_rule", "not_run", None,
                         f"no {what} backward call was seen, so the map is the plain gradient")
        return
    status = "pass" if changed > 0 else "warn"
    detail = (f"the rule changed {changed} of {seen} {what} backward calls (dispatcher level: modules, "
              "functional, in-place, TorchScript and exported programs alike)")
    if changed == 0:
        detail += "; none changed, so the map equals the plain gradient"
    result.add_check("rectifier_rule", status, changed / seen, detail)


def rectified_trust(result) -> None:
    """MethodSpec.trust of GuidedBackprop and Deconvolution: the "rectifier_rule" check, and the
    refusal of a map that is zero at every voxel.  Both rules pass back only positive signals at
    each rectifier; when every signal reaching a rectifier is <= 0 (e.g. at the rectifier nearest
    the output of a model that reads the class out through negative weights only, as the trained
    SegResNet of the ground-truth zoo does) the rule zeroes it and nothing reaches the input.  A map
    of zeros would say the volume holds no evidence, which the model's plain gradient contradicts."""
    add_rule_check(result)
    if bool(np.any(result.attribution)):
        return
    diag = getattr(result, "diagnostics", {}) or {}
    zeroed, seen = int(diag.get("rule_calls_zeroed", 0) or 0), int(diag.get("rule_calls_seen", 0) or 0)
    if zeroed:
        why = (f"the rule removed the whole backward signal at {zeroed} of {seen} rectifier calls: every "
               "gradient reaching that rectifier was <= 0 (this model reads the class out through negative "
               "weights there), and the rule passes back positive signals only")
    else:
        why = "the target's gradient is zero at every voxel"
    raise EsegetaError(f"{result.name}'s map is zero at every voxel: {why}; use Saliency, InputXGradient or "
                       "IntegratedGradients on this model.")

