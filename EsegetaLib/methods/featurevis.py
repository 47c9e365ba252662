"""Feature visualisation in 3D: the input volume that a layer channel responds to most.

A model-level visualisation (Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017;
the recipe Lucent implements for 2-D images, re-derived here for volumes, no code copied; Lucent is
2-D only and not a dependency).  It shows what the network's channel looks for in general, NOT why
the model segmented this input: the result is an optimised volume on the model's window grid, not a
map over this input's voxels (`MethodSpec.level = "model"`).

For a layer with output A (1, K, *s) and a channel c, maximise the mean activation
mean_s A_c(x) - tv_weight * TV(u) over a volume x on one window (the model's patch), where

    z   = irfftn(S * P)                  P: a complex spectrum (the parameters), per input channel;
                                         S(f) = 1 / max(|f|, 1/n_max): frequencies in cycles per
                                         voxel, normalised so that mean S^2 = 1.  Gradient steps on P
                                         then change low frequencies as fast as high ones, where
                                         pixel-space steps would mostly add high-frequency noise.
    u   = R^(1/2) z                      channel decorrelation: R is the correlation matrix of the
                                         input volume's channels (voxels as samples); z is
                                         optimised in a whitened space, u has the data's channel
                                         correlations.  With one input channel R = [1]: only the
                                         intensity scaling below remains.
    x_c = m_c + h_c tanh(u_c)            intensities kept in the input's range: m_c, h_c the centre
                                         and half-width of channel c's 1st-99th percentile range.
    TV(u) = mean over voxels and axes of |u[i+1] - u[i]|   (anisotropic total variation)

Each step rolls x by a random shift of up to `jitter` voxels per axis (periodic: the Fourier
parameterisation is periodic too) so that the optimum cannot rely on exact voxel positions; the
spectrum starts as Gaussian noise; Adam takes the steps.  Initial noise and shifts are drawn from a
seeded torch.Generator on the CPU: two runs with the same seed give the same bytes on the same
device.  The starting volume is the "noise" against which the activation factor is reported.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import EsegetaError
from .base import MethodContext, MethodSpec, ParamSpec
from .common import LAYER_PARAM, first_tensor

CHANNEL_PARAM = ParamSpec(
    "channel", "int", -1, minimum=-1, maximum=65535,
    help="channel of the layer's output (0-based); -1 = automatic: the channel most active inside the "
         "target region", auto=True)
SEED_PARAM = ParamSpec("seed", "int", -1, minimum=-1, maximum=2**31 - 1,
                       help="seed of the starting noise and the jitter; -1 = the run's seed", auto=False)
INIT_STD = 0.25  # standard deviation of the starting volume z (before tanh): mild noise around the centre


def auto_steps(window: Sequence[int]) -> int:
    """Optimisation steps scaled to the window: 128 for 32^3, fewer for larger windows (each step is
    one forward+backward of a window), between 32 and 256."""
    voxels = float(np.prod([int(v) for v in window]))
    return int(min(256, max(32, round(128 * math.sqrt(32 ** 3 / max(voxels, 1.0))))))


def auto_lr(window: Sequence[int]) -> float:
    """Adam step size scaled to the window: 0.3 / max S, so that one step moves the lowest
    frequency's contribution by about 0.3 (in tanh units) whatever the window; 0.05 at 16^3, 0.026 at
    32^3, 0.013 at 64^3 (larger steps made the centre-unit objective oscillate in our runs)."""
    return float(0.3 / float(spectrum_scale(window).max()))


def auto_jitter(window: Sequence[int]) -> int:
    """Largest shift per step: 1/24 of the window's smallest side, at least 1 voxel (Lucent shifts a
    224-pixel image by up to 8; on a 16^3 window, shifts of 2 made the centre-unit objective
    oscillate in our runs: 0.45 -> 0.08 after 48 steps where shifts of 1 reached 17)."""
    return max(1, int(round(min(int(v) for v in window) / 24.0)))


def spectrum_scale(shape: Sequence[int]) -> torch.Tensor:
    """(D, H, W//2+1) float64: 1 / max(|f|, 1/max(shape)), normalised to mean square 1."""
    d, h, w = (int(v) for v in shape)
    fz = torch.fft.fftfreq(d, dtype=torch.float64)[:, None, None]
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[None, :, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, None, :]
    freq = torch.sqrt(fz ** 2 + fy ** 2 + fx ** 2)
    scale = 1.0 / torch.clamp(freq, min=1.0 / max(d, h, w))
    return scale / torch.sqrt((scale ** 2).mean())


def channel_sqrt_correlation(volume: torch.Tensor) -> torch.Tensor:
    """(C, C) float64 symmetric square root of the channel correlation matrix of a (C, *S) volume
    (identity for one channel, or for channels without variance)."""
    c = volume.shape[0]
    if c == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    flat = volume.reshape(c, -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1)
    if bool((std <= 0).any()):
        return torch.eye(c, dtype=torch.float64)
    corr = (flat @ flat.T) / (flat.shape[1] - 1) / (std[:, None] * std[None, :])
    values, vectors = torch.linalg.eigh(corr)
    return vectors @ torch.diag(torch.sqrt(torch.clamp(values, min=0.0))) @ vectors.T


def intensity_range(volume: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(centre, half-width) per channel, (C,) float64, of each channel's 1st-99th percentile range."""
    flat = volume.reshape(volume.shape[0], -1).double()
    step = max(1, flat.shape[1] // 2_000_000)
    sample = flat[:, ::step]
    low = torch.quantile(sample, 0.01, dim=1)
    high = torch.quantile(sample, 0.99, dim=1)
    half = torch.clamp((high - low) / 2.0, min=1e-6)
    return (high + low) / 2.0, half


class FourierVolume(torch.nn.Module):
    """x = m + h tanh(R^(1/2) irfftn(S * P)): the parameterised volume (1, C, *window)."""

    def __init__(self, window: Sequence[int], sqrt_corr: torch.Tensor, centre: torch.Tensor, half: torch.Tensor,
                 generator: torch.Generator, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.window = tuple(int(v) for v in window)
        c = sqrt_corr.shape[0]
        freq_shape = self.window[:-1] + (self.window[-1] // 2 + 1,)
        n = float(np.prod(self.window))
        # irfftn with norm="ortho" keeps the energy: a white spectrum of std sigma/sqrt(2) per real
        # and imaginary part gives a volume of std ~sigma (before the 1/f scaling, mean square 1).
        noise = torch.randn((c,) + freq_shape + (2,), generator=generator, dtype=torch.float32) * (INIT_STD / math.sqrt(2.0))
        self.spectrum = torch.nn.Parameter(noise.to(dtype))
        self.register_buffer("scale", spectrum_scale(self.window).to(dtype))
        self.register_buffer("sqrt_corr", sqrt_corr.to(dtype))
        self.register_buffer("centre", centre.to(dtype).view(c, 1, 1, 1))
        self.register_buffer("half_width", half.to(dtype).view(c, 1, 1, 1))
        self.n = n

    def whitened(self) -> torch.Tensor:
        """u = R^(1/2) z, (C, *window): the volume before the intensity mapping."""
        spectrum = torch.view_as_complex(self.spectrum.contiguous()) * self.scale
        z = torch.fft.irfftn(spectrum, s=self.window, dim=(-3, -2, -1), norm="ortho")
        return torch.einsum("ij,j...->i...", self.sqrt_corr, z)

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        u = self.whitened()
        return (self.centre + self.half_width * torch.tanh(u))[None], u


def total_variation(u: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbours along each spatial axis, summed over the axes."""
    tv = u.new_zeros(())
    for axis in range(1, u.dim()):
        tv = tv + (u.narrow(axis, 1, u.shape[axis] - 1) - u.narrow(axis, 0, u.shape[axis] - 1)).abs().mean()
    return tv


def layer_name_of(network: torch.nn.Module, layer: torch.nn.Module) -> str:
    return next((n for n, m in network.named_modules() if m is layer), type(layer).__name__)


def check_channel(channel: int, channels: int, method: str, layer_name: str) -> None:
    """One-line error for a channel the layer does not have."""
    if not 0 <= channel < channels:
        raise EsegetaError(f"{method}: channel {channel} is out of range for layer '{layer_name}', which has "
                           f"{channels} channels (0-{channels - 1}); choose channel=0..{channels - 1} or -1 (automatic).")


class _LayerOutput:
    """Forward hook keeping a layer's output (with its graph) during one network call."""

    def __init__(self, layer: torch.nn.Module):
        self.value: Optional[torch.Tensor] = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = first_tensor(output)

    def remove(self) -> None:
        self.handle.remove()


def channel_activation(network: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor,
                       grad: bool = False) -> torch.Tensor:
    """(B, K, *s) output of `layer` for the network input x (the network's output is discarded)."""
    keeper = _LayerOutput(layer)
    try:
        with torch.set_grad_enabled(grad):
            network(x)
    finally:
        keeper.remove()
    if keeper.value is None:
        raise EsegetaError("the chosen layer did not run on the network's input; name another 'layer'.")
    return keeper.value


def visualise(network: torch.nn.Module, layer: torch.nn.Module, channel: int, window: Sequence[int],
              reference: torch.Tensor, steps: int, lr: float, tv_weight: float, jitter: int,
              generator: torch.Generator, device=None, dtype: torch.dtype = torch.float32,
              layer_name: str = "", method: str = "FeatureVisualization", objective: str = "channel",
              score_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Optimise a (C, *window) volume to maximise `layer`'s channel `channel`: the mean over its units
    (objective "channel") or the unit at the centre of the layer's output ("neuron"); or, with
    objective "target", the scalar score_fn(x) (the target's class score over its region).

    reference: the input volume (C, *S) (its channel correlation and intensity range); generator: a
    seeded CPU generator (starting noise and jitter).  Returns (volume float32 (C, *window),
    diagnostics: activation_start, activation_final (the objective on the starting noise and on the
    result, without jitter), activation_factor (final / start when start > 0, else None),
    activation_gain (final - start), activation_gain_sd (the gain in standard deviations of the
    channel's units on the starting noise), history of the objective every 16 steps)."""
    device = device or reference.device
    reference = reference.detach().to("cpu", torch.float64)
    centre, half = intensity_range(reference)
    param = FourierVolume(window, channel_sqrt_correlation(reference), centre, half, generator, dtype).to(device)
    optimiser = torch.optim.Adam(param.parameters(), lr=float(lr))
    shifts = torch.randint(-int(jitter), int(jitter) + 1, (int(steps), len(window)), generator=generator) \
        if jitter > 0 else torch.zeros((int(steps), len(window)), dtype=torch.long)
    spatial = tuple(range(2, 2 + len(window)))

    def activation_of(x: torch.Tensor, keep=None) -> torch.Tensor:
        if objective == "target":
            return score_fn(x)
        out = channel_activation(network, layer, x, grad=torch.is_grad_enabled())
        check_channel(channel, int(out.shape[1]), method, layer_name)
        if keep is not None:
            keep.append(out[:, channel].detach())
        if objective == "neuron":  # the unit at the centre of the layer's output
            return out[(slice(None), channel) + tuple(n // 2 for n in out.shape[2:])].mean()
        return out[:, channel].mean()

    with torch.no_grad():
        start_x, _ = param()
        units = []
        start = float(activation_of(start_x, units))
        spread = float(units[0].double().std()) if units and units[0].numel() > 1 else 0.0
    history = []
    for step in range(int(steps)):
        optimiser.zero_grad(set_to_none=True)
        x, u = param()
        if jitter > 0:
            x = torch.roll(x, shifts=tuple(int(v) for v in shifts[step]), dims=spatial)
        with torch.enable_grad():
            act = activation_of(x)
            loss = -act + float(tv_weight) * total_variation(u)
        loss.backward()
        optimiser.step()
        if step % 16 == 0 or step == steps - 1:
            history.append([step, float(act.detach())])
    with torch.no_grad():
        final_x, _ = param()
        final = float(activation_of(final_x))
    volume = final_x[0].detach().to("cpu", torch.float32).numpy()
    return volume, {"objective": objective, "activation_start": start, "activation_final": final,
                    "activation_factor": (final / start) if start > 0 else None,
                    "activation_gain": final - start,
                    "activation_gain_sd": (final - start) / spread if spread > 0 else None,
                    "start_unit_sd": spread, "history": history}


def auto_channel(network: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor,
                 region: Optional[torch.Tensor]) -> int:
    """The channel of `layer` most active (mean) inside the region of the window x (all voxels when the
    region is empty or not given); the region (1, 1, *S) is resampled to the layer's grid."""
    with torch.no_grad():
        out = channel_activation(network, layer, x).double()
        if region is not None and bool(region.any()):
            mask = torch.nn.functional.interpolate(region.double(), size=tuple(out.shape[2:]), mode="trilinear",
                                                   align_corners=False)
            if float(mask.sum()) > 0:
                return int(((out * mask).sum(dim=(0,) + tuple(range(2, out.dim()))) / mask.sum()).argmax())
        return int(out.mean(dim=(0,) + tuple(range(2, out.dim()))).argmax())


def centre_window(x: torch.Tensor, window: Sequence[int], centre: Optional[Sequence[int]] = None
                  ) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """A (1, C, *window) crop of x (1, C, *S) around `centre` (default: the middle), edge-padded where
    the volume is smaller than the window; returns (crop, start) with start in x's voxel indices
    (negative where padded)."""
    spatial = tuple(int(v) for v in x.shape[2:])
    window = tuple(int(v) for v in window)
    pad = []
    for n, w in zip(spatial[::-1], window[::-1]):
        extra = max(0, w - n)
        pad += [extra // 2, extra - extra // 2]
    padded = torch.nn.functional.pad(x, pad, mode="replicate") if any(pad) else x
    offsets = [pad[2 * (len(spatial) - 1 - a)] for a in range(len(spatial))]
    centre = [n // 2 for n in spatial] if centre is None else [int(c) for c in centre]
    starts = []
    for a, (w, c) in enumerate(zip(window, centre)):
        n = padded.shape[2 + a]
        starts.append(int(min(max(c + offsets[a] - w // 2, 0), n - w)))
    crop = padded[(slice(None), slice(None)) + tuple(slice(s, s + w) for s, w in zip(starts, window))]
    return crop, tuple(s - o for s, o in zip(starts, offsets))


def feature_visualization(ctx: MethodContext):
    network, layer = ctx.network, ctx.layer
    if layer is None:
        raise EsegetaError("FeatureVisualization needs a layer; name one with the 'layer' parameter.")
    name = layer_name_of(network, layer)
    window = tuple(ctx.patch or ctx.inputs.shape[2:])
    volume = ctx.inputs[0].detach()
    channel = int(ctx.params["channel"])
    if channel < 0 and str(ctx.params["objective"]) != "target":
        crop, _ = centre_window(ctx.inputs, window, _region_centre(ctx.region))
        channel = auto_channel(network, layer, crop, _region_crop(ctx.region, window))
    steps = int(ctx.params["steps"]) or auto_steps(window)
    lr = float(ctx.params["lr"]) or auto_lr(window)
    seed = int(ctx.params["seed"])
    generator = torch.Generator().manual_seed(seed) if seed >= 0 else (ctx.generator or torch.Generator().manual_seed(0))
    dtype = next((p.dtype for p in network.parameters() if p.is_floating_point()), torch.float32)
    objective, why = choose_objective(network, str(ctx.params["objective"]))
    score_fn = None
    if objective == "target":
        score_fn, name, channel = target_score(ctx, window)
    jitter = int(ctx.params["jitter"])
    jitter = auto_jitter(window) if jitter < 0 else jitter
    fv, diag = visualise(network, layer, channel, window, volume, steps, lr, float(ctx.params["tv_weight"]),
                         jitter, generator, device=ctx.inputs.device, dtype=dtype,
                         layer_name=name, objective=objective, score_fn=score_fn)
    diag["objective_note"] = why
    diag.update(layer=name, channel=channel, steps=steps, lr=lr, jitter=jitter, window=list(window),
                seed=seed if seed >= 0 else "run seed",
                level="model-level: a volume that maximises the objective, on the model's window grid; not an "
                      "explanation of this input",
                decorrelation=("one input channel: intensity scaling only" if volume.shape[0] == 1 else
                               f"{volume.shape[0]} input channels decorrelated with the input's channel correlation"))
    diag["outputs"] = {"feature_volume": fv, "layer": name, "channel": channel}
    # No map over this input: the attribution is all zeros (MethodResult.model_level; writers skip it).
    return torch.zeros_like(ctx.inputs), diag


def target_score(ctx: MethodContext, window) -> Tuple[Callable[[torch.Tensor], torch.Tensor], str, int]:
    """(score_fn, name, class) of the "target" objective: the explained class's score (logit or
    probability, as the target says) averaged over the target region's part of a window centred on
    the region (the whole window when the region misses it), through the engine's own scorer."""
    scorer = getattr(ctx.forward, "scorer", None)
    if scorer is None:
        raise EsegetaError("FeatureVisualization: objective 'target' needs the engine's target score; run it "
                           "through explain / ExplainSession.")
    region = _region_crop(ctx.region, window)
    weights = region.to(ctx.inputs.device, ctx.inputs.dtype) if region is not None and bool(region.any()) \
        else torch.ones((1, 1) + tuple(window), device=ctx.inputs.device, dtype=ctx.inputs.dtype)
    weights = weights / weights.sum()
    return (lambda x: scorer(x, weights).sum()), "target", int(scorer.class_index)


PER_SAMPLE_NORMS = (torch.nn.modules.instancenorm._InstanceNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)


def choose_objective(network: torch.nn.Module, requested: str) -> Tuple[str, str]:
    """("channel" | "neuron" | "target", why).  "auto": the channel mean, unless the network normalises each
    sample (InstanceNorm, GroupNorm, LayerNorm): after such a normalisation a channel's mean over
    space is fixed (zero before the activation), so only a single unit can be driven up."""
    if requested == "target":
        return "target", ("the explained class's score averaged over the target region (as it falls in a window "
                          "centred on it); the layer and channel are not used")
    if requested != "auto":
        return requested, f"objective '{requested}' as requested"
    norms = sorted({type(m).__name__ for m in network.modules() if isinstance(m, PER_SAMPLE_NORMS)})
    if norms:
        return "neuron", (f"auto: the network normalises each sample ({', '.join(norms)}), which fixes a channel's "
                          "mean over space; the unit at the window's centre is maximised instead")
    return "channel", "auto: the channel's mean activation over the window"


def _region_centre(region: Optional[torch.Tensor]) -> Optional[Tuple[int, ...]]:
    if region is None or not bool(region.any()):
        return None
    idx = torch.nonzero(region[0, 0]).double().mean(dim=0)
    return tuple(int(round(float(v))) for v in idx)


def _region_crop(region: Optional[torch.Tensor], window) -> Optional[torch.Tensor]:
    if region is None:
        return None
    crop, _ = centre_window(region.float(), window, _region_centre(region))
    return crop


def add_optimisation_check(result) -> None:
    """Trust checks of a feature visualisation: "optimisation" (the objective rose over the starting
    noise: pass from a factor of 2, or 2 standard deviations of the channel's units on the starting
    noise; warn below; fail when it did not rise) and
    "input_level" (not_run: a model-level visualisation is no explanation of this input)."""
    d = result.diagnostics
    start, final, factor = d.get("activation_start"), d.get("activation_final"), d.get("activation_factor")
    if start is None:
        return
    if d.get("objective") == "target":
        what = f"class {d.get('channel')}'s score over the target region: {start:.4g} -> {final:.4g}"
    else:
        unit = "mean activation" if d.get("objective") == "channel" else "centre unit's activation"
        what = f"channel {d.get('channel')} of '{d.get('layer')}': {unit} {start:.4g} -> {final:.4g}"
    gain_sd = d.get("activation_gain_sd")
    if factor is not None and factor >= 2.0:
        result.add_check("optimisation", "pass", factor, f"{what} (x{factor:.3g} over the starting noise).")
    elif gain_sd is not None and gain_sd >= 2.0:
        result.add_check("optimisation", "pass", factor, f"{what}: raised by {gain_sd:.3g} standard deviations of "
                         "the channel's units on the starting noise.")
    elif final > start:
        result.add_check("optimisation", "warn", factor, f"{what}: raised, but by less than a factor of 2 over the "
                         "starting noise (or from a non-positive start); more steps or another lr may help.")
    else:
        result.add_check("optimisation", "fail", factor, f"{what}: the optimisation did not raise the activation; "
                         "try a larger lr, more steps or a smaller tv_weight.")
    result.add_check("input_level", "not_run", None,
                     "model-level visualisation: an optimised volume the channel responds to most, on the model's "
                     "window grid; it does not explain this input and has no map on its grid.")
    relabel_layer_check(result)


def relabel_layer_check(result) -> None:
    """The engine's "layer_gradient" check warns when Grad-CAM's channel weights vanish at the layer;
    methods that use no target gradient at the layer keep only the gradient-reach part of it."""
    for check in result.checks:
        if check.name == "layer_gradient" and check.status == "warn":
            result.add_check("layer_gradient", "pass", check.value,
                             check.detail.split("; Grad-CAM")[0] + " (Grad-CAM weights play no part in this method)")


FV_PARAMS = (
    LAYER_PARAM, CHANNEL_PARAM,
    ParamSpec("objective", "choice", "auto", choices=("auto", "channel", "neuron", "target"),
              help="what is maximised: the channel's mean over the layer's units, its unit at the window "
                   "centre, or the target's class score over its region; auto = neuron for networks with "
                   "per-sample normalisation (InstanceNorm, GroupNorm), else channel"),
    ParamSpec("steps", "int", 0, minimum=0, maximum=10000,
              help="optimisation steps (one forward+backward of one window each); 0 = scaled to the window "
                   "(128 at 32^3, 32-256)", auto=True),
    ParamSpec("lr", "float", 0.0, minimum=0.0, maximum=10.0,
              help="Adam step size on the Fourier coefficients; 0 = scaled to the window (0.3 / the largest "
                   "spectrum weight: 0.05 at 16^3, 0.026 at 32^3)", auto=True),
    ParamSpec("tv_weight", "float", 0.05, minimum=0.0, maximum=100.0,
              help="weight of the total-variation penalty (smoothness of the visualisation)"),
    ParamSpec("jitter", "int", -1, minimum=-1, maximum=64,
              help="largest random shift per axis and step, voxels; -1 = scaled to the window (1/24 of its "
                   "smallest side, at least 1: 1 at 16^3-32^3, 3 at 64^3)", auto=True),
    SEED_PARAM,
)

SPECS = [
    MethodSpec(
        name="FeatureVisualization", family="layer", signed=True, needs_baseline=False, needs_layer=True,
        cost=128.0, patching="global", params=FV_PARAMS, attribute=feature_visualization,
        trust=add_optimisation_check, captum=None, level="model", explains_target=False,
        approximation="model-level: optimises one window-sized volume, independent of the input's content",
        description="model-level feature visualisation: a window-sized volume optimised (3D Fourier "
                    "parameterisation, jitter, total variation) to excite one layer channel; NOT an "
                    "explanation of this input",
    ),
]
