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


def _widen(chosen: str, shapes: Dict[str, Tuple[int, ...]], ndim: int) -> str:
    """The largest enclosing block working entirely at the chosen output's shape."""
    spatial = shapes[chosen][2:]
    parts = chosen.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent not in shapes or shapes[parent] != shapes[chosen]:
            break
        inner = _descendants(parent, shapes)
        if any(shapes[n][2:] != spatial for n in inner if len(shapes[n]) == ndim):
            break
        chosen = parent
    return chosen


def _probe_shapes(network: torch.nn.Module, example: Optional[torch.Tensor]):
    if example is not None:
        example = example[:1].detach()
        return example, _record_outputs(network, example)
    for size in PROBE_SIZES:
        example = _probe_input(network, size)
        try:
            return example, _record_outputs(network, example)
        except (RuntimeError, ValueError):  # too small for the network (e.g. a norm over one voxel)
            if size == PROBE_SIZES[-1]:
                raise EsegetaError("could not run a probe input through the network to choose a layer; "
                                   "name one with the 'layer' parameter.") from None
    raise AssertionError("unreachable")


def layer_candidates(network: torch.nn.Module, example: Optional[torch.Tensor] = None) -> List[str]:
    """Automatic layer choices, best first (see the module docstring): the last reduced-resolution
    convolution widened to its block, then the earlier reduced-resolution ones (output side first),
    then the remaining convolutions.  The engine keeps the first that receives a usable gradient
    from the target (`probe_layer`)."""
    example, (order, shapes) = _probe_shapes(network, example)
    modules = dict(network.named_modules())
    ndim = example.dim()
    leaves = [n for n in order if len(list(modules[n].children())) == 0 and len(shapes[n]) == ndim]
    if not leaves:
        raise EsegetaError("could not find a layer automatically; name one with the 'layer' parameter.")
    in_spatial = tuple(example.shape[2:])
    convs = [n for n in leaves if isinstance(modules[n], torch.nn.modules.conv._ConvNd)]
    pool = convs or leaves
    reduced = [n for n in pool if tuple(shapes[n][2:]) != in_spatial and all(
        s <= i for s, i in zip(shapes[n][2:], in_spatial))]
    if reduced:
        ordered = reduced[::-1] + [n for n in pool[::-1] if n not in reduced]
    else:
        # No downsampling: the last convolution before the classifier (the network's last conv).
        ordered = (pool[-2::-1] + pool[-1:]) if len(pool) > 1 else pool
    out: List[str] = []
    for name in ordered:
        wide = _widen(name, shapes, ndim)
        if wide not in out:
            out.append(wide)
    return out


def default_layer_name(network: torch.nn.Module, example: Optional[torch.Tensor] = None) -> str:
    """The automatic layer by structure alone (see the module docstring); the engine also probes
    that the target's gradient reaches it (`choose_layer`)."""
    return layer_candidates(network, example)[0]


CAM_WEIGHT_MIN = 1e-3  # channel-mean gradient / RMS gradient below which Grad-CAM weights vanish


def probe_layer(score_fn, module: torch.nn.Module, x: torch.Tensor) -> Tuple[Optional[float], float]:
    """(||dS/dA||, cam_ratio) of the layer's output A for the score S = score_fn(x).sum().

    None when A is not on the score's path (computed but unused, e.g. MONAI SegResNetDS's
    deep-supervision heads in eval mode, or not computed at all).  cam_ratio =
    ||mean_s dS/dA|| sqrt(n_s) / ||dS/dA|| in [0, 1]: near 0 when every channel's gradient averages
    to zero over space (a per-channel GroupNorm after the layer makes the score blind to a channel's
    constant shift, so every Grad-CAM weight is exactly zero and the map is rounding noise)."""
    store = {}

    def hook(mod, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            store["A"] = out

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            score = score_fn(x.detach().requires_grad_(True)).sum()
            activation = store.get("A")
            if activation is None:
                return None, 0.0
            grad = torch.autograd.grad(score, activation, allow_unused=True)[0]
    finally:
        handle.remove()
    if grad is None:
        return None, 0.0
    grad = grad.detach().double()
    norm = float(grad.norm())
    if norm == 0.0 or grad.dim() < 3:
        return norm, 0.0
    spatial = tuple(range(2, grad.dim()))
    n_s = 1
    for d in spatial:
        n_s *= grad.shape[d]
    ratio = float(grad.mean(dim=spatial).norm()) * n_s ** 0.5 / norm
    return norm, ratio


def choose_layer(network: torch.nn.Module, score_fn, x: torch.Tensor, name: Optional[str] = None):
    """(name, module, gradient norm, cam_ratio, note) of the layer to explain, probed on the window x.

    A named layer must receive a gradient from the target, else EsegetaError.  The automatic choice
    is the first of `layer_candidates` whose gradient is non-zero with non-vanishing Grad-CAM
    weights (cam_ratio >= CAM_WEIGHT_MIN); the note names the candidates passed over and why."""
    modules = dict(network.named_modules())
    if name:
        chosen, module = resolve_layer(network, name)
        norm, ratio = probe_layer(score_fn, module, x)
        if not norm:
            why = "is not on the path from the input to the explained output" if norm is None else \
                "receives an exactly zero gradient from the target"
            raise EsegetaError(f"the layer '{name}' {why}; name a layer the output depends on, or leave "
                               "'layer' empty for the automatic choice.")
        return chosen, module, norm, ratio, f"layer '{chosen}' as named"
    skipped, fallback = [], None
    for candidate in layer_candidates(network, x):
        norm, ratio = probe_layer(score_fn, modules[candidate], x)
        if norm is None:
            skipped.append(f"'{candidate}' (not on the output's path)")
        elif norm == 0.0:
            skipped.append(f"'{candidate}' (zero gradient)")
        elif ratio < CAM_WEIGHT_MIN:
            skipped.append(f"'{candidate}' (Grad-CAM weights vanish: channel-mean gradient {ratio:.1e} of its RMS)")
            fallback = fallback or (candidate, norm, ratio)
        else:
            note = f"automatic layer '{candidate}'" + (f"; passed over {', '.join(skipped)}" if skipped else "")
            return candidate, modules[candidate], norm, ratio, note
    if fallback is not None:
        candidate, norm, ratio = fallback
        return candidate, modules[candidate], norm, ratio, (
            f"automatic layer '{candidate}' (no candidate with non-vanishing Grad-CAM weights); passed over "
            + ", ".join(skipped))
    raise EsegetaError("no layer of the network receives a gradient from the target (tried "
                       f"{', '.join(skipped) or 'none'}); name one with the 'layer' parameter.")


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
        try:  # the automatic candidates, best first, as examples of names that work
            suited = layer_candidates(network, example)[:4]
        except (EsegetaError, RuntimeError, ValueError):
            suited = []
        listed = f" Layers that suit: {', '.join(repr(c) for c in suited)}." if suited else ""
        raise EsegetaError(f"the network has no layer '{name}'.{extra}{listed} Names are those of "
                           "network.named_modules().")
    chosen = default_layer_name(network, example)
    return chosen, modules[chosen]


def check_layer_names(requests, network: torch.nn.Module) -> None:
    """Refuse, before any work (no segmentation, no forward pass), a layer method whose 'layer'
    parameter names no module of `network` (the explained function the engine hooks): one line with
    the method, the closest names and layers that suit (`resolve_layer`).  `requests`: (spec, params)."""
    for spec, params in requests:
        name = (params or {}).get("layer") if spec.needs_layer else None
        if name and name not in dict(network.named_modules()):
            try:
                resolve_layer(network, name)
            except EsegetaError as exc:
                raise EsegetaError(f"{spec.name}: {exc}") from None


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


# ------------------------------------------------------------------------ sampling geometry
# A layer's output unit o along an axis sits at input voxel position scale * o + offset (the centre of
# its receptive field).  Composed module by module from the input (scale 1, offset 0):
#   Conv/Pool (kernel k, stride s, padding p, dilation d):  scale *= s; offset += scale_in (d (k-1)/2 - p)
#   ConvTranspose:  unit j reads input position (j + p - d (k-1)/2) / s
#   Upsample (factor f, align_corners=False): unit j reads input position (j + 0.5) / f - 0.5
# Modules that keep the spatial shape keep the geometry; a tensor not made by a module (a functional
# add, cat, interpolate) takes the geometry of the latest tensor of its spatial shape, else the
# align_corners=False convention (offset (scale - 1) / 2) that plain trilinear upsampling assumes.

Geometry = Tuple[Tuple[float, float], ...]  # per spatial axis: (scale, offset) in input voxels


def _axis(value, n: int):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class _OpParams:
    """kernel_size/stride/padding/dilation of the one convolution or pooling in a module's graph
    (a module of an unflattened torch.export program calls aten ops, not nn.Conv3d)."""

    def __init__(self, kind, kernel_size, stride, padding, dilation=1, transposed=False):
        self.kind, self.kernel_size, self.stride = kind, kernel_size, stride
        self.padding, self.dilation, self.transposed = padding, dilation, transposed


def _graph_op(module: torch.nn.Module, n: int) -> Optional[_OpParams]:
    graph = getattr(module, "graph", None)
    if graph is None or not hasattr(graph, "nodes"):
        return None
    found = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        args = list(node.args) + [None] * 9
        if "conv" in name and "backward" not in name:
            weight = args[1]
            shape = None
            if getattr(weight, "op", None) == "get_attr":
                value = module
                for part in str(weight.target).split("."):
                    value = getattr(value, part, None)
                shape = tuple(value.shape[2:]) if isinstance(value, torch.Tensor) else None
            if shape is None:
                return None
            transposed = "transpose" in name or (name.startswith("aten.convolution") and bool(args[6]))
            found.append(_OpParams("conv", shape, args[3] or 1, args[4] if args[4] is not None else 0,
                                   args[5] or 1, transposed))
        elif "max_pool" in name and "backward" not in name:
            found.append(_OpParams("pool", args[1], args[2] or args[1], args[3] or 0, args[4] or 1))
        elif "avg_pool" in name and "backward" not in name:
            found.append(_OpParams("pool", args[1], args[2] or args[1], args[3] or 0))
    return found[0] if len(found) == 1 else None


def _next_geometry(module: torch.nn.Module, geo: Geometry, in_shape, out_shape) -> Optional[Geometry]:
    n = len(geo)
    op = _graph_op(module, n)
    if op is not None:
        module = op
        if op.transposed:
            k, s, p, d = (_axis(v, n) for v in (op.kernel_size, op.stride, op.padding, op.dilation))
            return tuple((sc / s[a], off + sc * (p[a] - d[a] * (k[a] - 1) / 2) / s[a]) for a, (sc, off) in enumerate(geo))
    if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
        k, s, p, d = (_axis(v, n) for v in (module.kernel_size, module.stride, module.padding, module.dilation))
        return tuple((sc / s[a], off + sc * (p[a] - d[a] * (k[a] - 1) / 2) / s[a]) for a, (sc, off) in enumerate(geo))
    if isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.modules.pooling._MaxPoolNd,
                           torch.nn.modules.pooling._AvgPoolNd, _OpParams)):
        if isinstance(module.padding, str):  # "same"/"valid" convolutions
            pad = tuple(0 for _ in range(n)) if module.padding == "valid" else None
        else:
            pad = _axis(module.padding, n)
        k = _axis(module.kernel_size, n)
        s = _axis(module.stride if module.stride is not None else module.kernel_size, n)
        d = _axis(getattr(module, "dilation", 1), n)
        if pad is None:  # "same": output centred on the input
            pad = tuple(d[a] * (k[a] - 1) / 2 for a in range(n))
        return tuple((sc * s[a], off + sc * (d[a] * (k[a] - 1) / 2 - pad[a])) for a, (sc, off) in enumerate(geo))
    if isinstance(module, torch.nn.Upsample):
        out = []
        for a, (sc, off) in enumerate(geo):
            n_in, n_out = in_shape[a], out_shape[a]
            if module.align_corners and n_out > 1:
                f = (n_in - 1) / (n_out - 1)
                out.append((sc * f, off))
            else:
                f = n_out / n_in
                out.append((sc / f, off + sc * (0.5 / f - 0.5)))
        return tuple(out)
    if tuple(in_shape) == tuple(out_shape):
        return geo
    return None


def default_geometry(layer_shape, input_shape) -> Geometry:
    """The align_corners=False convention: unit o at (o + 0.5) * scale - 0.5."""
    out = []
    for n_l, n_i in zip(layer_shape, input_shape):
        scale = n_i / n_l
        out.append((scale, (scale - 1.0) / 2.0))
    return tuple(out)


def layer_geometry(network: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> Geometry:
    """(scale, offset) per spatial axis of `layer`'s output on the input grid of `x` (see above)."""
    spatial = tuple(x.shape[2:])
    identity = tuple((1.0, 0.0) for _ in spatial)
    known: Dict[int, Tuple[torch.Tensor, Geometry]] = {}  # id -> (the tensor, kept alive so ids stay unique)
    latest: Dict[Tuple[int, ...], Geometry] = {spatial: identity}
    found: Dict[str, Geometry] = {}
    handles = []

    def geometry_of(t: torch.Tensor) -> Geometry:
        shape = tuple(t.shape[2:])
        entry = known.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        if shape in latest:
            return latest[shape]
        return default_geometry(shape, spatial)

    def hook(module, args, output):
        inp = next((a for a in args if isinstance(a, torch.Tensor)), None)
        out = output[0] if isinstance(output, (tuple, list)) else output
        if inp is None or not isinstance(out, torch.Tensor) or out.dim() != x.dim() or inp.dim() != x.dim():
            return
        entry = known.get(id(out))
        if entry is not None and entry[0] is out:  # a block's output, already placed by its last child
            geo = entry[1]
        else:
            geo = _next_geometry(module, geometry_of(inp), tuple(inp.shape[2:]), tuple(out.shape[2:]))
            if geo is None:
                geo = latest.get(tuple(out.shape[2:])) or default_geometry(tuple(out.shape[2:]), spatial)
        known[id(out)] = (out, geo)
        latest[tuple(out.shape[2:])] = geo
        if module is layer:
            found["layer"] = geo

    leaves = [m for m in network.modules() if len(list(m.children())) == 0 or m is layer]
    for module in leaves:
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            network(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    if "layer" not in found:
        raise EsegetaError("the chosen layer did not run on a probe window; name another 'layer'.")
    return found["layer"]
