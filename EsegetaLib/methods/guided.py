"""Guided backpropagation and deconvolution for ANY rectifier, not only `nn.ReLU`.

Captum's GuidedBackprop/Deconvolution hook `nn.ReLU` modules only; on networks built with PReLU,
LeakyReLU, ELU, GELU, SiLU or functional `torch.relu`/`F.relu` calls (MONAI, nnU-Net, MeshNet) they
silently return the plain gradient.  Here every rectifier call made during the forward pass is
intercepted with a `torch.overrides.TorchFunctionMode` (this sees module activations, which call
`torch.nn.functional`, and functional calls alike) and routed through an autograd function that
applies the modified backward rule:

- guided backpropagation: grad_in = relu(f'(x) * grad_out).  For ReLU this is exactly Captum's rule
  (relu of the ReLU's gradient: forward gate x > 0 and backward gate grad_out > 0).  For other
  rectifiers the true local derivative f'(x) takes the place of the forward gate (so a PReLU's
  negative slope, or GELU's smooth gate, is kept) and only the positive part of the resulting
  gradient is passed on: no negative evidence flows backwards through any activation.
- deconvolution (Zeiler & Fergus): grad_in = relu(grad_out), the forward gate ignored, for every
  rectifier, exactly Captum's rule for ReLU.

In-place variants (relu_, inplace=True modules) are computed out of place.  TorchScript models run
their activations inside the TorchScript interpreter, where nothing can be intercepted: guided
methods refuse them with an EsegetaError (use an eager `nn.Module`, or a torch.export program's
`.module()`, whose ATen rectifier calls are intercepted by name).  As a guard, a run in which no rectifier was intercepted raises too, since its
map would silently be the plain gradient.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import EsegetaError

# Names of rectifier functions as seen by __torch_function__ (functional, torch.* and Tensor methods).
RECTIFIER_NAMES = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "rrelu_",
    "elu", "elu_", "selu", "selu_", "celu", "celu_", "gelu", "silu", "mish", "hardswish", "softplus",
})
INPLACE_TO_OUT_OF_PLACE = {
    "relu_": torch.relu, "leaky_relu_": F.leaky_relu, "elu_": F.elu, "selu_": torch.selu,
    "celu_": torch.celu, "rrelu_": F.rrelu,
}


class _GuidedGate(torch.autograd.Function):
    """Identity placed before a rectifier: its backward sees f'(x) * grad_out and keeps the positive part."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.clamp(grad, min=0)


class _DeconvRectifier(torch.autograd.Function):
    """Returns the rectifier's output but backpropagates relu(grad_out), ignoring f'(x)."""

    @staticmethod
    def forward(ctx, x, y):
        return y.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.clamp(grad, min=0), None


class RectifierRules(TorchFunctionMode):
    """Context manager: inside it, every rectifier call gets the `rule` ("guided" or "deconvolution")."""

    def __init__(self, rule: str):
        super().__init__()
        if rule not in ("guided", "deconvolution"):
            raise ValueError(rule)
        self.rule = rule
        self.intercepted = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # torch.export programs call ATen overloads ("gelu.default"): same rule by base name
        name = getattr(func, "__name__", "").split(".")[0]
        if name not in RECTIFIER_NAMES or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        self.intercepted += 1
        if name in INPLACE_TO_OUT_OF_PLACE:
            func = INPLACE_TO_OUT_OF_PLACE[name]
        if "inplace" in kwargs:
            kwargs = dict(kwargs, inplace=False)
        x = args[0]
        if self.rule == "guided":
            return func(_GuidedGate.apply(x), *args[1:], **kwargs)
        y = func(x, *args[1:], **kwargs)
        return _DeconvRectifier.apply(x, y)


def is_torchscript(network: torch.nn.Module) -> bool:
    return isinstance(network, torch.jit.ScriptModule) or any(
        isinstance(m, torch.jit.ScriptModule) for m in network.modules()
    )


def check_interceptable(network: torch.nn.Module, method: str) -> None:
    if is_torchscript(network):
        raise EsegetaError(
            f"{method} cannot modify the activations of a TorchScript model (they run inside the "
            "TorchScript interpreter); load the model as an eager PyTorch module, or use Saliency/"
            "IntegratedGradients instead."
        )


def rectified_gradients(forward: torch.nn.Module, network: torch.nn.Module, inputs: torch.Tensor,
                        forward_args: tuple, rule: str, method: str) -> torch.Tensor:
    """d forward(inputs).sum() / d inputs with the guided or deconvolution rule on every rectifier.

    The gradient is taken with Captum's `Saliency(abs=False)` (plain gradient machinery) while the
    mode rewrites the rectifiers' backward."""
    from captum.attr import Saliency

    check_interceptable(network, method)
    mode = RectifierRules(rule)
    with mode:
        grads = Saliency(forward).attribute(inputs, abs=False, additional_forward_args=forward_args or None)
    if mode.intercepted == 0:
        raise EsegetaError(
            f"{method} found no rectifier (ReLU, PReLU, LeakyReLU, ELU, GELU, SiLU, ...) in the "
            "network's forward pass, so its map would be the plain gradient; use Saliency instead."
        )
    return grads
