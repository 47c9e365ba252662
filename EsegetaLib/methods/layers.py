"""Which layer a layer/CAM method explains: a named one, or a sensible default for any network.

Default rule (works for MONAI UNet, BasicUNet, DynUNet, SegResNet, plain Sequential nets and others
without a per-architecture table): run one probe forward with hooks, find the last convolution whose
output is at reduced spatial resolution (the last decoder stage before the final upsampling to the
classifier), then widen it to the largest enclosing block whose modules all work at that same
resolution (e.g. a whole decoder block rather than one of its convolutions; a flat Sequential keeps
the convolution itself, whose signed output rarely rectifies to an all-zero CAM the way a
post-ReLU output of an untrained network can).  Networks that never downsample (e.g. MeshNet's
dilated stack) get the last convolution (widened to its block) before the final classifier.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import EsegetaError

PROBE_SIZES = (32, 64, 128)  # tried in turn: some networks need sizes divisible by 2**k


def _probe_input(network: torch.nn.Module, size: int) -> torch.Tensor:
    in_channels = 1
    for module in network.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Conv1d)):
            in_channels = module.in_channels
            break
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(1, in_channels, size, size, size, device=device, dtype=dtype)


def _record_outputs(network: torch.nn.Module, example: torch.Tensor) -> Tuple[List[str], Dict[str, Tuple[int, ...]]]:
    """Execution order (by completion) of every module that returned a tensor, with its output shape."""
    order: List[str] = []
    shapes: Dict[str, Tuple[int, ...]] = {}
    handles = []

    def hook_for(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                order.append(name)
                shapes[name] = tuple(output.shape)
        return hook

    for name, module in network.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook_for(name)))
    try:
        with torch.no_grad():
            network(example)
    finally:
        for handle in handles:
            handle.remove()
    return order, shapes


def _descendants(name: str, names) -> List[str]:
    prefix = name + "."
    return [n for n in names if n.startswith(prefix)]


def default_layer_name(network: torch.nn.Module, example: Optional[torch.Tensor] = None) -> str:
    """The automatic layer (see module docstring)."""
    if example is not None:
        example = example[:1].detach()
        order, shapes = _record_outputs(network, example)
    else:
        for size in PROBE_SIZES:
            example = _probe_input(network, size)
            try:
                order, shapes = _record_outputs(network, example)
                break
            except RuntimeError:
                if size == PROBE_SIZES[-1]:
                    raise EsegetaError("could not run a probe input through the network to choose a layer; "
                                       "name one with the 'layer' parameter.") from None
    modules = dict(network.named_modules())
    leaves = [n for n in order if len(list(modules[n].children())) == 0 and len(shapes[n]) == example.dim()]
    if not leaves:
        raise EsegetaError("could not find a layer automatically; name one with the 'layer' parameter.")
    in_spatial = tuple(example.shape[2:])
    convs = [n for n in leaves if isinstance(modules[n], torch.nn.modules.conv._ConvNd)]
    reduced = [n for n in (convs or leaves) if tuple(shapes[n][2:]) != in_spatial and all(
        s <= i for s, i in zip(shapes[n][2:], in_spatial))]
    if reduced:
        chosen = reduced[-1]
    else:
        # No downsampling: the last convolution before the classifier (the network's last conv).
        pool = convs or leaves
        chosen = pool[-2] if len(pool) > 1 else pool[-1]
    # Widen to the largest enclosing block working entirely at the chosen output's shape.
    spatial = shapes[chosen][2:]
    parts = chosen.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent not in shapes or shapes[parent] != shapes[chosen]:
            break
        inner = _descendants(parent, shapes)
        if any(shapes[n][2:] != spatial for n in inner if len(shapes[n]) == example.dim()):
            break
        chosen = parent
    return chosen


def resolve_layer(network: torch.nn.Module, name: Optional[str] = None,
                  example: Optional[torch.Tensor] = None) -> Tuple[str, torch.nn.Module]:
    """(name, module) for a dotted module name, or the automatic default when name is None/empty.

    Unknown names raise an EsegetaError suggesting the closest existing names."""
    modules = dict(network.named_modules())
    if name:
        if name in modules:
            return name, modules[name]
        hints = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.3)
        extra = f" Did you mean {', '.join(repr(h) for h in hints)}?" if hints else ""
        raise EsegetaError(f"the network has no layer '{name}'.{extra} Names are those of network.named_modules().")
    chosen = default_layer_name(network, example)
    return chosen, modules[chosen]


def layer_for(ctx) -> torch.nn.Module:
    """The layer for a method call: the engine's `ctx.layer`, else the `layer` parameter / default."""
    if ctx.layer is not None:
        return ctx.layer
    _, module = resolve_layer(ctx.network, ctx.params.get("layer") or None, ctx.inputs)
    return module


@contextlib.contextmanager
def inplace_disabled(network: torch.nn.Module) -> Iterator[int]:
    """Run eager modules out of place for the duration (yields how many were switched).

    A layer method keeps the layer's output tensor (Grad-CAM's activation, the point where Layer
    Integrated Gradients substitutes its path): an in-place activation after the layer
    (`nn.ReLU(inplace=True)`, nnU-Net's `LeakyReLU(inplace=True)`, in-place Dropout, ...) would
    overwrite that tensor, silently changing the map or making autograd refuse.  Every module with a
    boolean `inplace` attribute is switched off and restored afterwards; the numbers are those of
    the same network built with `inplace=False`.  In-place *functional* calls in a custom forward
    cannot be switched: our own hooks clone what they keep, and Captum's Layer Integrated Gradients
    is refused with the reason if autograd reports one (see `refuse_inplace_error`)."""
    switched = []
    for module in network.modules():
        if isinstance(getattr(module, "inplace", None), bool) and module.inplace:
            module.inplace = False
            switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.inplace = True


def refuse_inplace_error(error: BaseException, method: str) -> None:
    """Turn autograd's in-place complaint inside a layer method into a one-line EsegetaError."""
    text = str(error)
    if "in-place operation" in text or "inplace operation" in text:
        raise EsegetaError(
            f"{method}: the network overwrites the layer's output in place with a functional call "
            "(e.g. torch.relu_(x) or F.relu(x, inplace=True)), so the layer's activation cannot be "
            "kept; choose another 'layer' or use an out-of-place activation.") from None
