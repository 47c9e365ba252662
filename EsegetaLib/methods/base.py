"""The method registry's protocol: one description and one call shape for every method.

A method is a `MethodSpec`.  The engine (EsegetaLib.engine) decides how it meets the volume, from
`spec.patching`:

- "additive": the map of the patched model is the SUM over patches of the method applied to each
  patch's weighted score (blend weights x region inside the score).  Exact for methods linear in
  the output's (modified) gradient: Saliency (signed), InputXGradient, IntegratedGradients,
  GuidedBackprop, Deconvolution, DeepLift(Shap), GradientShap.  `attribute` is called once per
  patch batch; `finalize` (e.g. abs) is applied once to the summed global map.
- "noise_tunnel": the engine draws global noise per sample, runs the base method (params
  `base_method`) additively on x + noise, then aggregates (`nt_type`: smoothgrad, smoothgrad_sq,
  vargrad).  Exact with global noise.
- "global": perturbation methods; `attribute` is called ONCE with the whole volume and a forward
  that evaluates the patched model's score F, rerunning only patches a perturbation touches.
- "blended": maps non-linear in the gradient (CAM, layer methods): computed per patch and blended
  with the window weights; an approximation, stated in `approximation`.

`attribute(ctx)` returns a tensor shaped like `ctx.inputs`, or `(tensor, diagnostics_dict)`.
Methods that use Captum must pass `additional_forward_args=ctx.forward_args` to it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import EsegetaError

FAMILIES = ("gradient", "layer", "perturbation")
PATCHING = ("additive", "noise_tunnel", "global", "blended")
# What a result describes: "input" = a map over this input's voxels; "model" = a model-level
# visualisation (feature visualisation: an optimised volume on the model's window grid), which is not
# an explanation of this input and has no map on its grid (MethodResult.attribution is all zeros,
# the visualisation is in MethodResult.outputs; writers, metrics, the scene and stability skip it).
LEVELS = ("input", "model")


@dataclass(frozen=True)
class ParamSpec:
    """One tunable parameter with its default and valid range (drives CLI, Slicer panel, checks)."""

    name: str
    kind: str  # "int" | "float" | "bool" | "choice" | "str"
    default: Any
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Optional[Tuple[Any, ...]] = None
    help: str = ""
    auto: bool = False  # the default means "chosen automatically from the volume/model" (shown as auto)

    def validate(self, value: Any, method: str) -> Any:
        """Coerce `value` to this parameter's type or raise a one-line EsegetaError."""
        where = f"parameter '{self.name}' of {method}"
        try:
            if self.kind == "int":
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                value = int(float(value))
            elif self.kind == "float":
                value = float(value)
            elif self.kind == "bool":
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes")
                else:
                    value = bool(value)
        except (TypeError, ValueError):
            raise EsegetaError(f"{where} must be of type {self.kind}, got {value!r}.") from None
        if self.kind == "choice" and value not in self.choices:
            raise EsegetaError(
                f"{where} must be one of {', '.join(map(str, self.choices))}; got {value!r}."
            )
        if self.minimum is not None and value < self.minimum:
            raise EsegetaError(f"{where} must be >= {self.minimum}; got {value}.")
        if self.maximum is not None and value > self.maximum:
            raise EsegetaError(f"{where} must be <= {self.maximum}; got {value}.")
        return value


@dataclass
class VolumeStats:
    """Intensity and geometry facts the methods scale their defaults by (computed once, full volume)."""

    mean: float
    std: float
    low: float  # 1st percentile
    high: float  # 99th percentile
    spacing: Tuple[float, float, float]
    shape: Tuple[int, int, int]


@dataclass
class MethodContext:
    """Everything `MethodSpec.attribute` may use.  Tensors are on the engine's device."""

    forward: torch.nn.Module  # (B, C, *S) [+ forward_args] -> (B,) scores
    network: torch.nn.Module  # the segmentation network (for layer look-ups)
    inputs: torch.Tensor  # (B, C, *S)
    params: Dict[str, Any]
    stats: VolumeStats
    forward_args: Tuple = ()
    prepared: Dict[str, torch.Tensor] = field(default_factory=dict)  # from `prepare`, sliced like inputs
    layer: Optional[torch.nn.Module] = None
    region: Optional[torch.Tensor] = None  # (1, 1, *S) float mask of the target region ("global" only)
    generator: Optional[torch.Generator] = None
    internal_batch_size: int = 1
    # per spatial axis (scale, offset): where the layer's unit o sits on the input grid (scale * o +
    # offset, methods/layers.layer_geometry); None: the align_corners=False convention
    layer_geometry: Optional[Tuple[Tuple[float, float], ...]] = None
    patch: Optional[Tuple[int, ...]] = None  # the model's window (sliding-window patch) size ("global" only)


@dataclass
class MethodSpec:
    name: str
    family: str
    signed: bool
    needs_baseline: bool
    needs_layer: bool
    cost: float  # forward+backward passes per window at default parameters (relative cost)
    patching: str
    params: Tuple[ParamSpec, ...]
    attribute: Callable[[MethodContext], Any]
    description: str = ""
    captum: Optional[str] = None  # the Captum class wrapped, if any
    approximation: str = ""  # non-empty when the patched map is an approximation: why
    finalize: Optional[Callable[[torch.Tensor, Dict[str, Any]], torch.Tensor]] = None
    # prepare(x_full (1,C,*S), stats, params, generator) -> dict of tensors shaped like x_full,
    # e.g. {"baselines": ...}; the engine slices them per patch into ctx.prepared.
    prepare: Optional[Callable[..., Dict[str, torch.Tensor]]] = None
    # True when the method hooks layers: impossible inside TorchScript.
    requires_eager: bool = False
    # trust(result: MethodResult) -> None: adds the method's own TrustChecks (result.add_check) from
    # the summed diagnostics, once per result; may raise EsegetaError to refuse a map that misses its
    # guarantee (e.g. DeepLift's summation-to-delta).
    trust: Optional[Callable[[Any], None]] = None
    level: str = "input"  # LEVELS: "model" for model-level visualisations (see LEVELS)
    # False for maps that are not attributions of the target's score (activations, visualisations):
    # metrics that test an attribution of the target are skipped or read as such.
    explains_target: bool = True

    def defaults(self) -> Dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve_params(self, given: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Defaults overlaid with `given`, each validated; unknown names are an error."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        resolved = self.defaults()
        for key, value in given.items():
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                extra = f" Did you mean '{hint[0]}'?" if hint else ""
                raise EsegetaError(
                    f"{self.name} has no parameter '{key}'; it has {', '.join(known) or 'none'}.{extra}"
                )
            resolved[key] = known[key].validate(value, self.name)
        return resolved

    def metadata(self) -> Dict[str, Any]:
        """JSON-ready description (CLI `esegeta methods --json`, Slicer panel)."""
        return {
            "name": self.name,
            "family": self.family,
            "signed": self.signed,
            "needs_baseline": self.needs_baseline,
            "needs_layer": self.needs_layer,
            "cost": self.cost,
            "patching": self.patching,
            "approximation": self.approximation,
            "captum": self.captum,
            "requires_eager": self.requires_eager,
            "level": self.level,
            "explains_target": self.explains_target,
            "description": self.description,
            "params": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "default": p.default,
                    "min": p.minimum,
                    "max": p.maximum,
                    "choices": list(p.choices) if p.choices else None,
                    "help": p.help,
                    "auto": p.auto,
                }
                for p in self.params
            ],
        }


_REGISTRY: Dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.family not in FAMILIES or spec.patching not in PATCHING or spec.level not in LEVELS:
        raise ValueError(f"bad family/patching/level for {spec.name}")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Look a method up by name (case-insensitive); unknown names suggest the closest."""
    _ensure_loaded()
    lowered = {k.lower(): k for k in _REGISTRY}
    key = lowered.get(str(name).lower())
    if key is None:
        hint = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.4)
        extra = f" Did you mean '{lowered[hint[0]]}'?" if hint else ""
        raise EsegetaError(
            f"Unknown method '{name}'.{extra} Run 'esegeta methods' to list them."
        )
    return _REGISTRY[key]


def all_methods() -> List[MethodSpec]:
    _ensure_loaded()
    return list(_REGISTRY.values())


def check_network_support(specs: Sequence[MethodSpec], network: torch.nn.Module) -> None:
    """Refuse, before any work, methods that cannot run on this network (one line naming them all)."""
    scripted = isinstance(network, torch.jit.ScriptModule) or any(
        isinstance(m, torch.jit.ScriptModule) for m in network.modules())
    if not scripted:
        return
    # Layer methods read a layer by its module name: an exported program (.pt2) keeps those names.
    # Module-rule methods (LRP) attach a rule to each module: only the eager network has them.
    layer = [s.name for s in specs if s.requires_eager and s.needs_layer]
    modules = [s.name for s in specs if s.requires_eager and not s.needs_layer]
    card = "give a model card (the network's Python class and its weights, see docs/readme/models.md)"
    reasons = []
    if modules:
        one = len(modules) == 1
        reasons.append(f"{', '.join(modules)} cannot run on a TorchScript model: {'it needs' if one else 'they need'} "
                       f"the network's modules to attach {'its' if one else 'their'} rules, which TorchScript hides; "
                       f"{card}")
    if layer:
        reasons.append(
            f"{', '.join(layer)} cannot run on a TorchScript model: {'it reads' if len(layer) == 1 else 'they read'} "
            f"a layer by its module name, which TorchScript hides; export the model with torch.export (.pt2) or {card}")
    if reasons:
        raise EsegetaError("; ".join(reasons) + "; or choose gradient or perturbation methods.")


def _ensure_loaded() -> None:
    # The catalogue modules register themselves on import.
    from . import catalog  # noqa: F401
