"""The sliding-window engine: runs any registered method on a volume of any size.

What is explained is the model as it is run (DESIGN.md, "What a patched run explains"): windows
blended with weights w_p that sum to 1 at every voxel, score F(x) = sum_p sum_v w_p * region *
s(out_p(x_p)). The same blended model gives the segmentation the user sees. How a method meets the
windows follows `MethodSpec.patching` (see methods/base.py):

- additive: the method runs per batch of windows on each window's weighted score; the maps are
  summed on the padded grid and folded back through the padding (exact for gradient-type maps);
- noise_tunnel: global noise per sample, the base method additive, then mean / mean of squares /
  variance over samples;
- global: the method sees the whole volume and a forward computing F, which reruns only the windows
  whose voxels a perturbation changed (each window's unperturbed score is cached);
- blended: per-window maps blended with the window weights (an approximation, stated by the spec).

Windows whose part of the region is empty contribute nothing to F and are skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .device import (autocast_dtype, free_memory_bytes, is_out_of_memory, release_memory,
                     resolve_device, resolve_precision)
from .errors import EsegetaCancelled, EsegetaError, is_cancelled
from .methods.base import MethodContext, MethodSpec, VolumeStats, get_method
from .options import EngineOptions, Target
from .results import MethodResult
from .trust import (COMPLETENESS_TOLERANCE, DETERMINISM_TOLERANCE, add_baseline_check, add_completeness_check,
                    add_determinism_check, add_layer_check, baseline_candidates, refuse_incomplete,
                    require_determinism)
from .multitarget import VJP_MODES, MultiTargetScore, TargetRows, batches_targets
from .targets import ResolvedTarget, TargetScore, check_class, check_target, labels_from, probabilities, resolve_targets
from .windows import WindowGrid, choose_patch, fit_patch

ProgressFn = Callable[[float, str], Any]


# ----------------------------------------------------------------------------- input checks
def as_volume(volume: Any, what: str = "The volume") -> np.ndarray:
    """(I,J,K) or (C,I,J,K) array -> (C,I,J,K) float array; one-line errors otherwise."""
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    array = np.asarray(volume)
    if array.dtype.kind not in "fiub":
        raise EsegetaError(f"{what} must be numeric; got dtype {array.dtype}.")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise EsegetaError(
            f"{what} must be a 3D array (I,J,K) or 4D with channels first (C,I,J,K); got shape {array.shape}."
        )
    if min(array.shape) < 1:
        raise EsegetaError(f"{what} is empty: shape {array.shape}.")
    array = array.astype(np.float64 if array.dtype == np.float64 else np.float32, copy=False)
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise EsegetaError(
            f"{what} has {bad} NaN or infinite voxel{'s' if bad != 1 else ''}; fill or mask them before explaining."
        )
    return array


def volume_stats(array: np.ndarray, spacing: Sequence[float]) -> VolumeStats:
    """Intensity facts over the whole volume (subsampled beyond 8 M values, for speed)."""
    flat = array.reshape(-1)
    step = max(1, flat.size // (8 * 1024 * 1024))
    sample = flat[::step].astype(np.float64)
    low, high = np.percentile(sample, [1.0, 99.0])
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0)))
    if len(spacing) != 3 or min(spacing) <= 0:
        raise EsegetaError(f"spacing must be three positive millimetre values; got {spacing}.")
    return VolumeStats(mean=float(sample.mean()), std=float(sample.std()), low=float(low), high=float(high),
                       spacing=spacing, shape=tuple(int(s) for s in array.shape[1:]))


def _first_conv(network: nn.Module) -> Optional[nn.Module]:
    for module in network.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            return module
    return None


def _network_dtype(network: nn.Module) -> torch.dtype:
    for p in network.parameters():
        if p.is_floating_point():
            return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


def _split(output: Any) -> Tuple[torch.Tensor, Dict[str, Any]]:
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict):
        return output[0], dict(output[1])
    if isinstance(output, (tuple, list)):  # Captum returns a tuple for tuple inputs
        output = output[0]
    return output, {}


def _all_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return all(_all_finite(v) for v in value)
    return True


class _Diagnostics:
    """Sums numeric diagnostics over window batches (deltas add up like F); keeps the rest."""

    def __init__(self):
        self.values: Dict[str, Any] = {}

    def add(self, diag: Dict[str, Any]) -> None:
        for key, value in diag.items():
            if isinstance(value, torch.Tensor):
                value = float(value.detach().double().sum()) if value.is_floating_point() else value.tolist()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    isinstance(self.values.get(key), (int, float)):
                combine = max if key.endswith("_max") else (lambda a, b: a + b)
                self.values[key] = combine(self.values[key], value)
            else:
                self.values[key] = value


# ----------------------------------------------------------------------------- the session
class ExplainSession:
    """One volume, one network, one target: the blended sliding-window model, its segmentation and
    fixed region, and `attribute` for any registered method. See docs/ARCHITECTURE.md."""

    def __init__(self, volume, network, target: Optional[Target] = None,
                 options: Optional[EngineOptions] = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 progress: Optional[ProgressFn] = None, cancel: Any = None,
                 progress_span: Tuple[float, float] = (0.0, 1.0)):
        self.target = target if target is not None else Target()
        self.options = options if options is not None else EngineOptions()
        check_target(self.target)
        self.progress, self.cancel = progress, cancel
        self.progress_span = progress_span
        array = as_volume(volume)
        if hasattr(network, "network_for") and not isinstance(network, nn.Module):
            # A LoadedModel: its preprocessing built in (formats that resample need the spacing).
            import inspect

            takes_spacing = "spacing" in inspect.signature(network.network_for).parameters
            network = network.network_for(array, spacing=spacing) if takes_spacing else network.network_for(array)
        if not isinstance(network, nn.Module):
            raise EsegetaError(f"The model must be a torch.nn.Module; got {type(network).__name__}.")
        if getattr(network, "whole_volume", False):
            # It resamples and runs its own sliding window inside (nnU-Net, MONAI bundles, cards on
            # another grid): it must see the whole volume, in one window, unpadded.
            from dataclasses import replace

            self.options = replace(self.options, patch_size=tuple(int(s) for s in array.shape[1:]), divisor=1)
        self.device = resolve_device(self.options.device)
        self.dtype = _network_dtype(network)
        # "auto" -> bf16 where the device computes it natively, else fp32 (device.resolve_precision)
        self.precision, self.precision_reason = resolve_precision(self.options.precision, self.device, self.dtype)
        self.amp_dtype = autocast_dtype(self.precision)
        self.network = network.eval().to(self.device)
        conv = _first_conv(self.network)
        if conv is not None and conv.in_channels != array.shape[0]:
            raise EsegetaError(
                f"The model expects {conv.in_channels} input channel(s) but the volume has {array.shape[0]}; "
                "pass a (C,I,J,K) array with the model's channels."
            )
        self.volume = torch.from_numpy(np.ascontiguousarray(array)).to(self.dtype)  # host (C,I,J,K)
        self.stats = volume_stats(array, spacing)
        shape = self.stats.shape
        extra = self.options.extra or {}
        requested = choose_patch(shape, self.options.patch_size, int(self.options.divisor),
                                 int(self.options.max_window_voxels), int(self.options.default_patch))
        patch = fit_patch(shape, requested, int(self.options.divisor)) if self.options.fit_patch else requested
        self.grid = WindowGrid.build(shape, patch, float(self.options.overlap), self.options.blend,
                                     extra.get("pad_mode", "edge"))
        self.grid.requested = requested
        self.windows = self.grid.windows
        self.host = self._use_host_accumulators()
        self.scorer = TargetScore(self.network, self.target, self.device, self.amp_dtype)
        self.counters = {"oom_retries": 0, "fp32_retries": 0}
        self._x_pad = self.grid.pad(self.volume[None])  # (1, C, *padded), host
        self.batch_size = self._initial_batch_size()

        self.probabilities = self._blended_probabilities()  # (n_classes, I, J, K) float32
        # Every method assumes the same input gives the same output: refuse a model that does not.
        self.determinism = require_determinism(
            self._full_precision_logits, self._window_batch(self._x_pad, [0]),
            float(extra.get("determinism_tolerance", DETERMINISM_TOLERANCE)))
        self.n_classes = int(self.probabilities.shape[0])
        self.segmentation = labels_from(self.probabilities, self.target)
        # Every score asked for (several classes or components give several); regions held fixed.
        self.targets: List[ResolvedTarget] = resolve_targets(self.target, shape, self.probabilities,
                                                             self.stats.spacing)
        self.select_target(0)

    # -- targets
    @property
    def target_names(self) -> List[str]:
        return [t.name for t in self.targets]

    @property
    def regions_union(self) -> np.ndarray:
        """(I, J, K) bool: every target's region (the one region for a single target)."""
        if len(self.targets) == 1:
            return self.region
        return np.logical_or.reduce([t.region for t in self.targets])

    def _target_index(self, which: Union[int, str]) -> int:
        if isinstance(which, str):
            if which not in self.target_names:
                raise EsegetaError(f"No target named {which!r}; the targets are {', '.join(self.target_names)}.")
            return self.target_names.index(which)
        if not 0 <= int(which) < len(self.targets):
            raise EsegetaError(f"Target {which} is out of range: there are {len(self.targets)} targets.")
        return int(which)

    def select_target(self, which: Union[int, str]) -> ResolvedTarget:
        """Make target `which` (index or name) the one that `attribute`, `score`, `region`,
        `window_weights` and `active` refer to; returns it."""
        k = self._target_index(which)
        t = self.targets[k]
        self.current_target = k
        self.region = t.region
        self.region_weights = t.weights()  # (I, J, K) float64, signed for boundary targets
        self.region_voxels = int(self.region.sum())
        self._region_pad = self._weights_pad(t)
        self.active = self._active_windows(self._region_pad)
        self.scorer.class_index = t.class_index
        self._base_scorer: Optional[PatchedScore] = None
        return t

    def _weights_pad(self, t: ResolvedTarget) -> torch.Tensor:
        return self.grid.embed(torch.from_numpy(t.weights()))

    def _active_windows(self, weights_pad: torch.Tensor) -> List[int]:
        return [i for i, w in enumerate(self.windows) if bool(weights_pad[w].any())]

    # -- set-up helpers
    def _full_precision_logits(self, x: torch.Tensor) -> torch.Tensor:
        saved, self.scorer.amp_dtype = self.scorer.amp_dtype, None
        try:
            return self.scorer.logits(x)
        finally:
            self.scorer.amp_dtype = saved

    def _use_host_accumulators(self) -> bool:
        choice = self.options.host_accumulator
        if choice == "auto":
            return self.device.type != "cpu" and int(np.prod(self.grid.padded_shape)) * self.volume.shape[0] > 2 ** 25
        return bool(choice)

    def _initial_batch_size(self) -> int:
        size = self.options.batch_size
        if size != "auto":
            if isinstance(size, bool) or int(size) < 1:
                raise EsegetaError(f"batch_size must be 'auto' or a positive integer; got {size!r}.")
            return int(size)
        voxels = int(np.prod(self.grid.patch))
        # Samples per forward pass, not windows: a one-window volume still batches its IG steps,
        # noise samples and perturbations (capping by the window count ran them one at a time).
        if self.device.type == "cuda":
            return max(1, self._probe_cuda_batch(voxels))
        # CPU: memory is rarely the limit, the cores are; a few million voxels per batch.
        budget = int((self.options.extra or {}).get("cpu_batch_voxels", 2 ** 21))
        return max(1, min(8, budget // voxels))

    def _probe_cuda_batch(self, voxels: int) -> int:
        """Peak memory of one window's forward+backward -> how many fit in 60 % of free memory."""
        try:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            x = self._x_pad[(slice(None), slice(None)) + self.windows[0]].to(self.device).requires_grad_(True)
            w = torch.ones((1, 1) + self.grid.patch, device=self.device, dtype=self.dtype)
            score = self.scorer(x, w).sum()
            torch.autograd.grad(score, x)
            per_window = max(1, torch.cuda.max_memory_allocated(self.device) - before)
            del x, w, score
        except Exception as error:  # noqa: BLE001 - a failed probe means: start small
            if not is_out_of_memory(error):
                raise
            release_memory(self.device)
            return 1
        release_memory(self.device)
        free = free_memory_bytes(self.device) or 0
        return max(1, min(32, int(0.6 * free // per_window)))

    # -- progress, cancel, batches
    def _report(self, fraction: Optional[float], message: str) -> None:
        """Progress within the current span; `None` keeps the last fraction (message only)."""
        if fraction is None:
            fraction = getattr(self, "_last_fraction", 0.0)
        self._last_fraction = fraction
        if self.progress is not None:
            a, b = self.progress_span
            self.progress(a + (b - a) * min(max(fraction, 0.0), 1.0), message)

    def check_cancel(self) -> None:
        if is_cancelled(self.cancel):
            raise EsegetaCancelled("Cancelled; nothing was kept.")

    def _window_batch(self, x_pad: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """(len, C, *patch) on the device, from a padded (1, C, *padded) host or device tensor."""
        parts = [x_pad[(0, slice(None)) + self.windows[i]] for i in indices]
        return torch.stack(parts).to(self.device, self.dtype)

    def window_weights(self, indices: Sequence[int]) -> torch.Tensor:
        """(len, 1, *patch): blending weight x region (/ region size for 'mean') per window.

        Kept per window (host, the network's dtype) while they fit in 256 MB: every pass of every
        method and metric asks for them again, and computing one costs about a tenth of a small
        window's forward+backward (measured on a 48^3 window)."""
        cache = getattr(self, "_weight_cache", None)
        if cache is None or cache[0] is not self._region_pad:
            patch_bytes = int(np.prod(self.grid.patch)) * torch.finfo(self.dtype).bits // 8
            keep = len(self.windows) * patch_bytes <= 256 * 2**20
            cache = self._weight_cache = (self._region_pad, {} if keep else None)
        parts = []
        for i in indices:
            part = None if cache[1] is None else cache[1].get(i)
            if part is None:
                part = (self.grid.weight(self.windows[i]) * self._region_pad[self.windows[i]]).to(self.dtype)
                if cache[1] is not None:
                    cache[1][i] = part
            parts.append(part)
        return torch.stack(parts)[:, None].to(self.device, self.dtype)

    def run_batches(self, items: Sequence[Any], work: Callable[[Sequence[Any]], Any],
                    report: Optional[Callable[[int, int], None]] = None) -> Iterator[Tuple[Sequence[Any], Any]]:
        """Yield (chunk, work(chunk)) over `items` in batches of `self.batch_size`.

        Cancel is checked before each batch. Out-of-memory halves the batch size and retries;
        under autocast a batch giving non-finite values is rerun in full precision.
        """
        i, n = 0, len(items)
        while i < n:
            self.check_cancel()
            size = min(self.batch_size, n - i)
            chunk = items[i:i + size]
            try:
                result = self._finite_or_fp32(work, chunk)
            except Exception as error:  # noqa: BLE001 - out-of-memory and fixed batch sizes are handled here
                if not is_out_of_memory(error):
                    if isinstance(error, (EsegetaError, EsegetaCancelled)) or self.batch_size == 1 or \
                            getattr(self, "batch_fixed_at_one", False):
                        raise
                    # A program exported with a static batch of 1 (torch.export without a dynamic
                    # batch dimension) refuses more: run windows and steps one at a time. If one at a
                    # time fails too, the original error is the real one.
                    saved = self.batch_size
                    self.batch_size, self.batch_fixed_at_one = 1, True
                    try:
                        result = self._finite_or_fp32(work, chunk[:1])
                    except (EsegetaError, EsegetaCancelled):  # the one-line reason of a single window
                        self.batch_size, self.batch_fixed_at_one = saved, False
                        raise
                    except Exception:  # noqa: BLE001
                        self.batch_size, self.batch_fixed_at_one = saved, False
                        raise error from None
                    self.batch_note = (f"the model refused a batch of {saved} ({_first_line(error)}); windows "
                                       "and steps run one at a time (export it with a dynamic batch dimension "
                                       "to batch them)")
                    yield chunk[:1], result
                    i += 1
                    if report is not None:
                        report(i, n)
                    continue
                release_memory(self.device)
                # Fewer windows per chunk first; with one window, fewer steps/samples per forward.
                smaller = (size if size > 1 else self.batch_size) // 2
                if smaller < 1:
                    raise EsegetaError(
                        f"Out of memory on {self.device} even with one {self.grid.patch} window; "
                        "choose a smaller patch_size, precision 'bf16', or device 'cpu'."
                    ) from None
                self.batch_size = smaller
                self.counters["oom_retries"] += 1
                continue
            yield chunk, result
            i += size
            if report is not None:
                report(i, n)

    def _finite_or_fp32(self, work, chunk):
        result = work(chunk)
        if self.scorer.amp_dtype is not None and not _all_finite(result):
            self.counters["fp32_retries"] += 1
            saved, self.scorer.amp_dtype = self.scorer.amp_dtype, None
            try:
                result = work(chunk)
            finally:
                self.scorer.amp_dtype = saved
        return result

    # -- the blended model's output
    def _blended_probabilities(self) -> np.ndarray:
        acc: Optional[torch.Tensor] = None
        first = [True]
        n = len(self.windows)

        def work(chunk):
            xb = self._window_batch(self._x_pad, chunk)
            try:
                with torch.no_grad():
                    logits = self.scorer.logits(xb)
            except (EsegetaError, EsegetaCancelled):
                raise
            except RuntimeError as error:
                if first[0] and not is_out_of_memory(error) and len(chunk) > 1:
                    raise  # run_batches retries one window at a time (a static batch of 1)
                if first[0] and not is_out_of_memory(error):
                    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    raise EsegetaError(
                        f"The model failed on a {tuple(xb.shape)} window ({line}); check its input channels "
                        f"and that every size divisible by divisor={self.options.divisor} suits it."
                    ) from None
                raise
            if first[0]:
                check_class(self.target, int(logits.shape[1]))
                first[0] = False
            return probabilities(logits.to(torch.float32 if self.dtype == torch.float32 else self.dtype),
                                 self.target.activation)

        model_window = getattr(self.network, "window_text", None)
        if model_window:  # a model that resamples: its own window, not the engine's one whole-volume pass
            self._report(0.0, f"Segmenting: the model's window {model_window}; one pass over the whole "
                              f"{'x'.join(map(str, self.grid.patch))} input volume")
        else:
            self._report(0.0, f"Segmenting: {n} window{'s' if n != 1 else ''} of {self.grid.patch}")
        report = lambda done, total: self._report(done / total, f"Segmenting: window {done}/{total}")
        for chunk, probs in self.run_batches(list(range(n)), work, report):
            if not _all_finite(probs):
                raise EsegetaError("The model gives non-finite outputs on this volume, even in fp32; check its weights and input scaling.")
            if acc is None:
                acc = torch.zeros((probs.shape[1],) + self.grid.padded_shape, dtype=torch.float64)
            for k, i in enumerate(chunk):
                w = self.windows[i]
                acc[(slice(None),) + w] += probs[k].double().cpu() * self.grid.weight(w)
        return self.grid.crop(acc).to(torch.float32).numpy()

    # -- the patched score F
    def score(self, batch) -> torch.Tensor:
        """F for a batch of whole volumes (N, C, I, J, K) (no grad): only changed windows rerun."""
        if self._base_scorer is None:
            self._base_scorer = PatchedScore(self, self.volume)
        batch = torch.as_tensor(batch)
        if batch.dim() == 4:
            batch = batch[None]
        return self._base_scorer(batch.to(self.device, self.dtype)).double()

    @property
    def score_counters(self) -> Dict[str, int]:
        """How much work `score` has done: volumes evaluated and windows rerun (a window reruns only
        when a perturbation changed one of its voxels; the unperturbed window scores are cached)."""
        scorer = self._base_scorer
        return {"volumes_evaluated": scorer.evaluations if scorer else 0,
                "windows_rerun": scorer.windows_rerun if scorer else 0}

    # -- attribution
    def attribute(self, method: Union[str, MethodSpec], params: Optional[Dict[str, Any]] = None,
                  inputs=None, target: Optional[Union[int, str]] = None) -> MethodResult:
        """Run one method on the session's volume (or on `inputs`, a volume of the same shape) for
        the selected target (or `target`, an index or name, which becomes the selected one).

        Under bf16/fp16 autocast the result carries a "precision" check. With precision 'auto', a
        method whose completeness check fails under bf16 is rerun in fp32 (the check says so and
        gives both errors; `seconds` counts both runs)."""
        if target is not None:
            self.select_target(target)
        spec = method if isinstance(method, MethodSpec) else get_method(method)
        resolved = spec.resolve_params(params)
        x = self.volume if inputs is None else self._as_input(inputs)
        started = time.perf_counter()
        result = self._attribute_checked(spec, resolved, x)
        result = self._complete_or_refuse(spec, resolved, x, result)
        if spec.trust is not None:  # the method's own checks (may refuse), on the final map
            spec.trust(result)
        result.seconds = time.perf_counter() - started
        return result

    def _attribute_checked(self, spec: MethodSpec, resolved: Dict[str, Any], x: torch.Tensor) -> MethodResult:
        """`_attribute` with the precision guard (autocast: the "precision" check, fp32 rerun)."""
        result = self._attribute(spec, resolved, x)
        if self.amp_dtype is not None:
            result = self._precision_guard(spec, resolved, x, result)
        return result

    def _complete_or_refuse(self, spec: MethodSpec, params: Dict[str, Any], x: torch.Tensor,
                            result: MethodResult) -> MethodResult:
        """Adaptive path methods (params with `allow_incomplete`): a map that misses the completeness
        tolerance at max_steps is recomputed from the next baseline in trust.BASELINE_FALLBACK (unless
        `baseline_fallback` is off); the first that meets it is returned with a "baseline" check saying
        which was used; when none does, the method is refused (EsegetaError), or with
        `allow_incomplete` the requested baseline's map is returned with its completeness warning.
        `adaptive=False` (a fixed rule chosen knowingly) keeps today's warning."""
        if "allow_incomplete" not in params or not params.get("adaptive", False):
            return result
        requested = params.get("baseline", "blur")
        status, value = completeness_status(result)
        tried, best = [(requested, value)], result
        if status is None:  # no completeness defined for this map (e.g. a layer that is not a cut)
            return result
        if status != "pass":
            seconds = result.seconds
            for baseline in baseline_candidates(requested, bool(params.get("baseline_fallback", True)))[1:]:
                rerun = self._attribute_checked(spec, dict(params, baseline=baseline), x)
                seconds += rerun.seconds
                status, value = completeness_status(rerun)
                tried.append((baseline, value))
                if status == "pass":
                    best = rerun
                    break
            best.seconds = seconds
            if status != "pass":
                if not params.get("allow_incomplete", False):
                    refuse_incomplete(spec.name, tried, float(params.get("tolerance", COMPLETENESS_TOLERANCE)),
                                      int(params.get("max_steps", 0)))
                best = result  # the requested baseline's map, with its completeness warning
        add_baseline_check(best, requested, best.params.get("baseline", requested), tried)
        return best

    def _as_input(self, inputs) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(as_volume(inputs, "The input"))).to(self.dtype)
        if tuple(x.shape) != tuple(self.volume.shape):
            raise EsegetaError(f"The input has shape {tuple(x.shape)}; the session's volume is {tuple(self.volume.shape)}.")
        return x

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """Autocast off for the block (the fp32 rerun of a method that lost completeness in bf16)."""
        saved = self.amp_dtype, self.scorer.amp_dtype
        self.amp_dtype = self.scorer.amp_dtype = None
        try:
            yield
        finally:
            self.amp_dtype, self.scorer.amp_dtype = saved

    def _params_used(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """The parameters as run, for the result (run.json): an automatic blur sigma (0) as the value used."""
        if params.get("baseline") == "blur" and "blur_sigma_mm" in params:
            from .methods.baselines import blur_sigma_used

            return dict(params, blur_sigma_mm=blur_sigma_used(params, self.stats))
        return params

    def _attribute(self, spec: MethodSpec, resolved: Dict[str, Any], x: torch.Tensor) -> MethodResult:
        started = time.perf_counter()
        self.counters = {"oom_retries": 0, "fp32_retries": 0}
        seed = int(self.options.seed)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            # A CPU generator: the same noise and baselines on every device.
            generator = torch.Generator().manual_seed(seed)
            self._report(0.0, f"{spec.name}: starting on {len(self.active)} of {len(self.windows)} windows")
            attribution, diag = self._run_guarded(spec, resolved, x, generator)
        # float32 maps (the contract); a float64 network keeps float64 so exactness can be checked.
        attribution = attribution.to(torch.float64 if self.dtype == torch.float64 else torch.float32).cpu()
        if not bool(torch.isfinite(attribution).all()):
            bad = int((~torch.isfinite(attribution)).sum())
            raise EsegetaError(f"{spec.name} produced {bad} non-finite values; try precision 'fp32' or other parameters.")
        diag.update(self.counters)
        if getattr(self, "batch_note", None):
            diag["batch_note"] = self.batch_note
        diag.update(n_windows=len(self.windows), n_windows_in_region=len(self.active),
                    batch_size=self.batch_size, device=str(self.device), precision=self.active_precision,
                    precision_requested=self.options.precision)
        if len(self.targets) > 1:
            diag["target"] = self.targets[self.current_target].name
        self._report(1.0, f"{spec.name}: done")
        outputs = diag.pop("outputs", None) or {}  # method-specific outputs (MethodResult.outputs)
        resolved = self._params_used(resolved)
        result = MethodResult(name=spec.name, attribution=attribution.numpy(), params=resolved,
                              seconds=time.perf_counter() - started, diagnostics=diag, metadata=spec.metadata(),
                              outputs=outputs)
        self._trust_report(result, resolved)
        return result

    def _trust_report(self, result: MethodResult, params: Dict[str, Any]) -> None:
        """The checks every result carries (methods may have added their own already)."""
        add_determinism_check(result, self.determinism)
        add_completeness_check(result, result.diagnostics, params.get("tolerance"))
        add_layer_check(result, result.diagnostics)

    def _run_guarded(self, spec: MethodSpec, params: Dict[str, Any], x: torch.Tensor, generator):
        """`_run`; layer methods with the network's in-place modules switched off (their kept layer
        output must not be overwritten downstream: methods/layers.inplace_disabled)."""
        if not spec.needs_layer:
            return self._run(spec, params, x, generator)
        from .methods.layers import inplace_disabled, refuse_inplace_error

        with inplace_disabled(self.network) as switched:
            try:
                attribution, diag = self._run(spec, params, x, generator)
            except RuntimeError as error:
                refuse_inplace_error(error, spec.name)
                raise
        if switched:
            diag["inplace_modules_switched"] = switched
        return attribution, diag

    @property
    def active_precision(self) -> str:
        """The precision the network runs in right now ('fp32' inside `full_precision`)."""
        return "fp32" if self.scorer.amp_dtype is None else self.precision

    def _precision_guard(self, spec: MethodSpec, params: Dict[str, Any], x: torch.Tensor,
                         result: MethodResult) -> MethodResult:
        """The "precision" trust check of a map computed under autocast; under 'auto', the fp32
        rerun of a method whose completeness check does not pass."""
        how = f"{self.precision} autocast ({self.precision_reason})"
        status, value = completeness_status(result)
        if status is None:
            result.add_check("precision", "not_run", None,
                             f"computed under {how}; {spec.name} has no completeness check to confirm that "
                             "reduced precision kept the map; choose precision fp32 for a full-precision map.")
            return result
        if status == "pass":
            result.add_check("precision", "pass", value,
                             f"computed under {how}; the completeness check held (relative error {_g(value)}).")
            return result
        if self.options.precision != "auto":
            result.add_check("precision", "warn", value,
                             f"computed under {how} as requested; completeness relative error {_g(value)} is over "
                             f"tolerance: rerun with precision fp32 (or 'auto', which does so).")
            return result
        with self.full_precision():
            rerun = self._attribute(spec, params, x)
        status32, value32 = completeness_status(rerun)
        rerun.add_check("precision", "pass" if status32 == "pass" else "warn", value,
                        f"{self.precision} autocast lost completeness (relative error {_g(value)}, over tolerance); "
                        f"this map was recomputed in fp32 (relative error {_g(value32)}).")
        rerun.diagnostics["reduced_precision_relative_convergence_delta"] = value
        rerun.diagnostics["reduced_precision_seconds"] = result.seconds
        return rerun

    def attribute_many(self, method: Union[str, MethodSpec], params: Optional[Dict[str, Any]], inputs,
                       full_precision: bool = False, progress: Optional[ProgressFn] = None) -> torch.Tensor:
        """Maps of one method for several volumes of the session's shape: (S, C, I, J, K) -> (S, C, I, J, K)
        float32 (float64 for a float64 network), host.

        Additive and blended methods send the copies through the windows together (as many copies
        as fill a batch with every active window and the method's passes per window), each copy with its own `prepare` (a baseline of
        its own input) drawn from the same seed as `attribute` draws it: the maps equal
        `attribute(inputs=x_s).attribution` one by one, up to float summation order. Noise tunnels
        and global (perturbation) methods run copy by copy. `full_precision` runs with autocast
        off (to match a map that was rerun in fp32). No trust checks, no fp32 rerun: this serves
        metrics such as sensitivity that compare maps with the method's own result.
        `progress(fraction, message)` covers the whole call."""
        spec = method if isinstance(method, MethodSpec) else get_method(method)
        resolved = spec.resolve_params(params)
        xs = torch.as_tensor(inputs)
        if xs.dim() == 4:
            xs = xs[None]
        if xs.dim() != 5 or tuple(xs.shape[1:]) != tuple(self.volume.shape):
            raise EsegetaError(f"attribute_many needs (S, C, I, J, K) volumes of the session's shape "
                               f"{tuple(self.volume.shape)}; got {tuple(xs.shape)}.")
        xs = xs.detach().cpu().to(self.dtype)
        n = int(xs.shape[0])
        out = torch.empty(tuple(xs.shape), dtype=torch.float64 if self.dtype == torch.float64 else torch.float32)
        saved = self.progress, self.progress_span
        if progress is not None:
            self.progress, self.progress_span = progress, (0.0, 1.0)
        try:
            with self.full_precision() if full_precision else contextlib.nullcontext():
                if spec.patching in ("additive", "blended"):
                    self._many_windows(spec, resolved, xs, out)
                else:
                    for j in range(n):
                        self.progress_span = (j / n, (j + 1) / n) if progress is not None else saved[1]
                        out[j] = torch.from_numpy(self._attribute(spec, resolved, xs[j]).attribution)
        finally:
            self.progress, self.progress_span = saved
        return out

    def _many_windows(self, spec: MethodSpec, params: Dict[str, Any], xs: torch.Tensor, out: torch.Tensor) -> None:
        self.counters = {"oom_retries": 0, "fp32_retries": 0}
        seed, n = int(self.options.seed), int(xs.shape[0])
        layer, _ = self._layer(spec, params)
        # Copies share a pass only where one copy leaves the batch part empty: a method with many
        # passes per window (IG's steps) already fills its batches, and splitting them between
        # copies only makes smaller batches (measured: slower).
        per_copy = max(1, len(self.active)) * max(1, int(round(float(spec.cost))))
        group = max(1, self.batch_size // per_copy)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        for j0 in range(0, n, group):
            j1 = min(n, j0 + group)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                # each copy's prepare from a generator seeded as `attribute` seeds it
                prepared = [self._prepare(spec, params, xs[j], torch.Generator().manual_seed(seed))
                            for j in range(j0, j1)]
                x_pad = self.grid.pad(xs[j0:j1])
                budgets = [self._path_budgets(spec, params, prepared[k], x_pad[k:k + 1]) for k in range(j1 - j0)]
                acc, _ = self._windows_pass(spec, params, x_pad, prepared, layer,
                                            torch.Generator().manual_seed(seed), blended=spec.patching == "blended",
                                            report_base=(j0 / n, j1 / n),
                                            budgets=None if budgets[0] is None else budgets)
            for k in range(j1 - j0):
                part = acc[k:k + 1]
                attribution = self.grid.crop(part)[0] if spec.patching == "blended" else self.grid.fold(part)[0]
                if spec.finalize is not None:
                    attribution = spec.finalize(attribution, params)
                out[j0 + k] = attribution.to(out.dtype).cpu()
            del acc

    # -- several targets
    def attribute_targets(self, method: Union[str, MethodSpec], params: Optional[Dict[str, Any]] = None
                          ) -> Dict[str, MethodResult]:
        """One map per target, {target name: MethodResult}, in target order.

        Methods linear in the gradient of a weighted score (`multitarget.batches_targets`) run
        `options.target_batch` targets per pass: one forward per window and one batched backward.
        Others run one target at a time; `diagnostics['multi_target']` says which happened."""
        spec = method if isinstance(method, MethodSpec) else get_method(method)
        resolved = spec.resolve_params(params)
        saved = self.current_target
        try:
            if len(self.targets) == 1:
                result = self.attribute(spec, resolved, target=0)
                return {self.targets[0].name: result}
            if not batches_targets(spec, resolved):
                out = {}
                why = (f"one target at a time: {spec.name} is not a sum of per-example gradients of a "
                       "weighted score, so its targets cannot share one backward pass")
                # each target's share of the stage's progress: its own work (work.py), so that the
                # bar moves at one pace across targets of different sizes
                from .work import per_target, single_target_work

                shares = np.cumsum([0.0] + [max(u, 1e-9) for u, _ in per_target(
                    self, lambda s: single_target_work(spec, resolved, s))])
                shares /= shares[-1]
                span = self.progress_span
                ran: Dict[Any, str] = {}  # target-free methods: what they depend on -> the target that ran it
                try:
                    for k, t in enumerate(self.targets):
                        a, b = (span[0] + (span[1] - span[0]) * float(f) for f in shares[k:k + 2])
                        self.progress_span = (a, b)
                        key = self._target_free_key(spec, resolved, k)
                        if key is not None and key in ran:
                            first = out[ran[key]]
                            out[t.name] = dataclasses.replace(first, diagnostics=dict(
                                first.diagnostics, target=t.name, multi_target=(
                                    f"run once, for target {ran[key]}: {spec.name} does not depend on the target "
                                    "beyond its layer and region, which are the same here; this result is that one")))
                            continue
                        result = self.attribute(spec, resolved, target=k)
                        result.diagnostics["multi_target"] = why
                        out[t.name] = result
                        if key is not None:
                            ran[key] = t.name
                finally:
                    self.progress_span = span
                return out
            return self._attribute_batched(spec, resolved)
        finally:
            self.select_target(saved)

    def _target_free_key(self, spec: MethodSpec, params: Dict[str, Any], k: int):
        """For a method that explains no target (`explains_target=False`: FeatureVisualization,
        TopActivatingWindows) what its result depends on under target k: the layer (the automatic
        choice probes the target's gradient), the region (the automatic channel and window) and, for
        FeatureVisualization's 'target' objective, the class; None for methods that explain a target."""
        if spec.explains_target:
            return None
        self.select_target(k)
        _, layer = self._layer(spec, params)
        region = hashlib.sha1(np.ascontiguousarray(np.asarray(self.region.cpu() if torch.is_tensor(self.region)
                                                              else self.region)).tobytes()).hexdigest()
        return (layer, region, self.targets[k].class_index if params.get("objective") == "target" else None)

    def _attribute_batched(self, spec: MethodSpec, params: Dict[str, Any]) -> Dict[str, MethodResult]:
        from .work import group_units

        size = max(1, int(getattr(self.options, "target_batch", 8) or 8))
        groups = [list(range(a, min(a + size, len(self.targets)))) for a in range(0, len(self.targets), size)]
        out: Dict[str, MethodResult] = {}
        seed = int(self.options.seed)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # each group's share of the stage's progress: its work (work.group_units), one pace throughout
        active = [frozenset(self._active_windows(self._weights_pad(t))) for t in self.targets]
        shares = np.cumsum([0.0] + [max(group_units([active[k] for k in g], self.batch_size), 1e-9) for g in groups])
        shares /= shares[-1]
        # the stage's clock starts at its first report (work.WorkPlan): report before any work
        windows = len(frozenset().union(*active))
        self._report(0.0, f"{spec.name}: starting on {windows} of {len(self.windows)} windows "
                          f"({len(self.targets)} targets)")
        for n, group in enumerate(groups):
            started = time.perf_counter()
            self.counters = {"oom_retries": 0, "fp32_retries": 0}
            span = self.progress_span
            a, b = (span[0] + (span[1] - span[0]) * float(f) for f in shares[n:n + 2])
            self.progress_span = (a, b)
            try:
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)  # every group draws what a single-target run draws
                    generator = torch.Generator().manual_seed(seed)
                    maps, diags = self._run_targets(spec, params, self.volume, generator, group)
            finally:
                self.progress_span = span
            seconds = time.perf_counter() - started
            for k, attribution, diag in zip(group, maps, diags):
                attribution = attribution.to(torch.float64 if self.dtype == torch.float64 else torch.float32).cpu()
                if not bool(torch.isfinite(attribution).all()):
                    bad = int((~torch.isfinite(attribution)).sum())
                    raise EsegetaError(f"{spec.name} produced {bad} non-finite values for target "
                                       f"{self.targets[k].name}; try precision 'fp32' or other parameters.")
                diag.update(self.counters)
                diag.update(n_windows=len(self.windows), batch_size=self.batch_size, device=str(self.device),
                            precision=self.active_precision, precision_requested=self.options.precision,
                            target=self.targets[k].name,
                            multi_target=f"batched: {len(group)} targets shared one forward per window and "
                                         f"one backward pass ({seconds:.3f} s for the {len(group)})",
                            targets_in_pass=len(group), pass_seconds=seconds)
                result = MethodResult(name=spec.name, attribution=attribution.numpy(),
                                      params=self._params_used(params), seconds=seconds / len(group),
                                      diagnostics=diag, metadata=spec.metadata())
                self._trust_report(result, result.params)
                self.select_target(k)  # the guards' reruns are of this target
                if self.amp_dtype is not None:
                    result = self._precision_guard(spec, params, self.volume, result)
                result = self._complete_or_refuse(spec, params, self.volume, result)
                out[self.targets[k].name] = result
        self._report(1.0, f"{spec.name}: done ({len(self.targets)} targets)")
        return out

    def _run_targets(self, spec, params, x, generator, group: List[int]):
        """Maps and diagnostics of `group`'s targets from one batched pass (noise tunnels: one per sample)."""
        if spec.patching == "noise_tunnel":
            return self._noise_tunnel_targets(spec, params, x, generator, group)
        prepared = self._prepare(spec, params, x, generator)
        acc, diags = self._targets_pass(spec, params, self.grid.pad(x[None]), prepared, generator, group)
        maps = []
        for g, diag in enumerate(diags):
            attribution = self.grid.fold(acc[g:g + 1])[0]
            _steps_used(diag)
            _relative_delta(diag, attribution)
            if spec.finalize is not None:
                attribution = spec.finalize(attribution, params)
            maps.append(attribution)
        return maps, diags

    def _noise_tunnel_targets(self, spec, params, x, generator, group: List[int]):
        from .methods import noise as nt

        base = get_method(params["base_method"])
        inner = nt.base_params(params)
        kind = params.get("nt_type") or nt.NT_TYPES.get(spec.name, "smoothgrad")
        samples = int(params["nt_samples"])
        sigma = nt.stdev(self.stats, params)
        prepared = self._prepare(base, inner, x, generator)
        aggregators = [nt.Aggregator(kind) for _ in group]
        for j in range(samples):
            noisy = x + nt.draw(x[None], sigma, 1, generator)[0].to(x.dtype)
            acc, _ = self._targets_pass(base, inner, self.grid.pad(noisy[None]), prepared, generator, group,
                                        report_base=(j / samples, (j + 1) / samples))
            for g, aggregator in enumerate(aggregators):
                sample = self.grid.fold(acc[g:g + 1])[0]
                if base.finalize is not None:
                    sample = base.finalize(sample, inner)
                aggregator.add(sample.to(torch.float64))
        maps = []
        for aggregator in aggregators:
            out = aggregator.result()
            maps.append(spec.finalize(out, params) if spec.finalize is not None else out)
        diags = [{"noise_stdev": sigma, "base_method": base.name, "nt_type": kind} for _ in group]
        return maps, diags

    def _targets_pass(self, spec, params, x_pad, prepared, generator, group: List[int],
                      report_base: Tuple[float, float] = (0.0, 1.0)):
        """Per-window maps of `spec` for every target of `group` at once, summed into padded
        accumulators (G, C, *padded). A batch's rows are (window, target) pairs; `MultiTargetScore`
        runs the network once per window and backpropagates the rows' cotangents together."""
        acc_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        acc_device = torch.device("cpu") if self.host else self.device
        acc = torch.zeros((len(group),) + tuple(x_pad.shape[1:]), dtype=acc_dtype, device=acc_device)
        weights_pad = [self._weights_pad(self.targets[k]) for k in group]
        active = [set(self._active_windows(w)) for w in weights_pad]
        from .work import window_order

        # windows with as many targets together (work.window_order): every row of a chunk's backward
        # slot is then a real (window, target) pair, not a zero cotangent carried along
        windows = window_order(active)
        multi = MultiTargetScore(self.scorer)
        per_target = [_Diagnostics() for _ in group]
        counters = {"vmap_fallbacks": 0}
        vjp = str((self.options.extra or {}).get("target_vjp", "auto"))
        if vjp not in VJP_MODES:
            raise EsegetaError(f"target_vjp must be one of {', '.join(VJP_MODES)}; got {vjp!r}.")

        def work(chunk):
            rows = [(i, g) for i in chunk for g in range(len(group)) if i in active[g]]
            inputs = torch.stack([x_pad[(0, slice(None)) + self.windows[i]] for i, _ in rows]).to(self.device, self.dtype)
            weights = torch.stack([self.grid.weight(self.windows[i]) * weights_pad[g][self.windows[i]]
                                   for i, g in rows])[:, None].to(self.device, self.dtype)
            layout = TargetRows([i for i, _ in rows], [self.targets[group[g]].class_index for _, g in rows],
                                vjp=vjp)
            sliced = {key: self._slice_prepared(value, [i for i, _ in rows]) for key, value in prepared.items()}
            ctx = MethodContext(
                forward=multi, network=self.network, inputs=inputs, params=params, stats=self.stats,
                forward_args=(weights, layout), prepared=sliced, layer=None, region=None, generator=generator,
                internal_batch_size=max(1, self.batch_size // len(chunk)))
            attribution, diag = _split(spec.attribute(ctx))
            changes = None
            if "score_change" in diag:  # completeness per target: F_k(x) - F_k(baseline) per row
                from .methods.common import baselines_of

                with torch.no_grad():
                    changes = (multi(inputs, weights, layout) - multi(baselines_of(ctx), weights, layout)).double().cpu()
            for key, value in layout.counters.items():
                counters[key] = counters.get(key, 0) + value
            return rows, attribution.detach(), diag, changes

        a, b = report_base
        report = lambda done, total: self._report(a + (b - a) * done / total,
                                                  f"{spec.name}: window {done}/{total} ({len(group)} targets)")
        for _, (rows, attribution, diag, changes) in self.run_batches(windows, work, report):
            attribution = attribution.to(acc_device, acc_dtype)
            sums = attribution.flatten(1).double().sum(dim=1).cpu()
            for r, (i, g) in enumerate(rows):
                acc[(g, slice(None)) + self.windows[i]] += attribution[r]
            for g, record in enumerate(per_target):
                mine = [r for r, (_, h) in enumerate(rows) if h == g]
                if not mine:
                    continue
                shared = {k: v for k, v in diag.items()
                          if k not in ("convergence_delta", "score_change", "relative_convergence_delta")}
                if changes is not None:
                    change = float(changes[mine].sum())
                    shared.update(convergence_delta=float(sums[mine].sum()) - change, score_change=change)
                record.add(shared)
        diags = []
        for g, record in enumerate(per_target):
            values = dict(record.values)
            values.update(n_windows_in_region=len(active[g]), vmap_fallbacks=counters["vmap_fallbacks"],
                          rows_per_network_input=counters.get("rows", 0) / max(1, counters.get("inputs", 0)),
                          target_vjp=vjp if vjp != "auto" else ("loop" if self.device.type == "cpu" else "vmap"))
            diags.append(values)
        return acc, diags

    def _run(self, spec: MethodSpec, params: Dict[str, Any], x: torch.Tensor, generator) -> Tuple[torch.Tensor, Dict]:
        if spec.patching == "global":
            return self._global(spec, params, x, generator)
        if spec.patching == "noise_tunnel":
            return self._noise_tunnel(spec, params, x, generator)
        layer, layer_name = self._layer(spec, params)
        diag = dict(self._last_layer_probe) if layer_name else {}
        prepared = self._prepare(spec, params, x, generator)
        x_pad = self.grid.pad(x[None])
        budgets = self._path_budgets(spec, params, prepared, x_pad)
        acc, more = self._windows_pass(spec, params, x_pad, prepared, layer, generator,
                                       blended=spec.patching == "blended", budgets=budgets)
        diag.update(more)
        _steps_used(diag)
        if spec.patching == "blended":
            attribution = self.grid.crop(acc)[0]
            _relative_delta(diag, None)
        else:
            attribution = self.grid.fold(acc)[0]
            _relative_delta(diag, attribution)
        if spec.finalize is not None:
            attribution = spec.finalize(attribution, params)
        return attribution, diag

    def _window_scores(self, *volumes: torch.Tensor) -> List[Dict[int, float]]:
        """F of each active window on padded (1, C, *padded) volumes (no grad), in full precision
        (the reference of completeness checks, even when the run uses autocast); the volumes' windows
        share batches."""
        values: List[Dict[int, float]] = [{} for _ in volumes]

        def work(chunk):
            xb = torch.cat([self._window_batch(volumes[v], [i]) for v, i in chunk])
            with torch.no_grad(), self.scorer.full_precision():
                return self.scorer(xb, self.window_weights([i for _, i in chunk]))

        items = [(v, i) for v in range(len(volumes)) for i in self.active]
        for chunk, out in self.run_batches(items, work):
            for (v, i), value in zip(chunk, out.double().cpu().tolist()):
                values[v][i] = value
        return values

    def _path_budgets(self, spec: MethodSpec, params: Dict[str, Any], prepared: Dict[str, torch.Tensor],
                      x_pad: torch.Tensor) -> Optional[Dict[int, Tuple[float, float, float]]]:
        """Per window (absolute completeness error allowed, F_w(b), F_w(x)) for an adaptive path
        method: the allowances keep all windows together within tolerance x |F(x) - F(baseline)| of
        the whole volume (half shared equally, half in proportion to each window's |F_w(x) - F_w(b)|);
        F_w are full-precision scores, handed to the method as its path ends (IG needs no forward of
        its own for them). `x_pad`: the explained input, padded (1, C, *padded) (a perturbed copy has
        its own allowances)."""
        if spec.patching != "additive" or not params.get("adaptive") or "tolerance" not in params or \
                "baselines" not in prepared or not self.active:
            return None
        on_x, on_b = self._window_scores(x_pad, prepared["baselines"])
        change = {i: on_x[i] - on_b[i] for i in self.active}
        total = abs(sum(change.values()))
        spread = sum(abs(v) for v in change.values()) or 1.0
        allowed = float(params["tolerance"]) * total
        n = len(self.active)
        return {i: (allowed * (0.5 * abs(change[i]) / spread + 0.5 / n), on_b[i], on_x[i]) for i in self.active}

    def _layer(self, spec: MethodSpec, params: Dict[str, Any]):
        """(module, name) of a layer method's layer, probed on the first window in the region: the
        target's gradient must reach it (methods/layers.choose_layer); the probe is kept per layer
        parameter and target for the trust report ("layer_gradient")."""
        if not spec.needs_layer:
            return None, None
        from .methods.layers import choose_layer, layer_geometry

        key = (params.get("layer") or "", getattr(self, "current_target", 0))
        cache = self.__dict__.setdefault("_layer_probes", {})
        if key not in cache:
            first = self.active[:1] or [0]
            x = self._window_batch(self._x_pad, first)
            weights = self.window_weights(first)
            from .methods.layers import inplace_disabled

            from .device import autocast

            # the structural probes (layer order, shapes, geometry) in the run's precision: they read
            # no values, and a full-precision forward costs 2-3 bf16 ones on CPUs
            with inplace_disabled(self.network), autocast(self.device, self.amp_dtype):
                chosen = choose_layer(self.network, lambda inp: self.scorer(inp, weights), x, key[0] or None)
                cache[key] = chosen + (layer_geometry(self.network, chosen[1], x),)
        name, module, norm, ratio, note, geometry = cache[key]
        self._last_layer_probe = {"layer": name, "layer_gradient_norm": norm, "layer_cam_weight_ratio": ratio,
                                  "layer_note": note, "layer_geometry": [list(g) for g in geometry]}
        return module, name

    def _prepare(self, spec, params, x, generator) -> Dict[str, torch.Tensor]:
        """`spec.prepare` on the whole volume (baselines etc.), padded like the volume."""
        if spec.prepare is None:
            return {}
        full = spec.prepare(x[None].to(self.device), self.stats, params, generator) or {}
        return {k: self.grid.pad(v.detach().to("cpu" if self.host else self.device)) for k, v in full.items()}

    def _windows_pass(self, spec, params, x_pad, prepared, layer, generator, blended=False,
                      report_base: Tuple[float, float] = (0.0, 1.0),
                      budgets: Union[None, Dict[int, Tuple[float, float, float]],
                                     List[Dict[int, Tuple[float, float, float]]]] = None) -> Tuple[torch.Tensor, Dict]:
        """Sum (or blend) per-window maps of `spec` into padded accumulators (S, C, *padded), one per
        input copy in `x_pad` (S, C, *padded): S > 1 batches noise samples (or perturbed copies)
        together. `prepared` (and an adaptive path method's per-window `budgets`): one dict shared by
        all copies, or a list with one dict per copy."""
        acc_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        acc_device = torch.device("cpu") if self.host else self.device
        acc = torch.zeros(tuple(x_pad.shape), dtype=acc_dtype, device=acc_device)
        diags = _Diagnostics()
        items = [(s, i) for s in range(x_pad.shape[0]) for i in self.active]
        probe = getattr(self, "_last_layer_probe", None) if layer is not None else None
        geometry = tuple(tuple(g) for g in probe["layer_geometry"]) if probe else None

        def work(chunk):
            windows = [i for _, i in chunk]
            inputs = torch.stack([x_pad[(s, slice(None)) + self.windows[i]] for s, i in chunk])
            sliced = self._prepared_for(prepared, chunk)
            if budgets is not None:
                rows = torch.tensor([(budgets[s] if isinstance(budgets, list) else budgets)[i] for s, i in chunk],
                                    dtype=torch.float64)
                sliced["delta_budget"], sliced["path_ends"] = rows[:, 0], rows[:, 1:]
            ctx = MethodContext(
                forward=self.scorer, network=self.network, inputs=inputs.to(self.device, self.dtype),
                params=params, stats=self.stats, forward_args=(self.window_weights(windows),),
                prepared=sliced,
                layer=layer, region=None, generator=generator,
                # per example: B windows x this many steps fill one forward of `batch_size`
                internal_batch_size=max(1, self.batch_size // len(chunk)),
                layer_geometry=geometry)
            attribution, diag = _split(spec.attribute(ctx))
            return attribution.detach(), diag

        a, b = report_base
        report = lambda done, total: self._report(a + (b - a) * done / total,
                                                  f"{spec.name}: window {done}/{total}")
        for chunk, (attribution, diag) in self.run_batches(items, work, report):
            attribution = attribution.to(acc_device, acc_dtype)
            for k, (s, i) in enumerate(chunk):
                w = (slice(None),) + self.windows[i]
                part = attribution[k]
                if blended:
                    part = part * self.grid.weight(self.windows[i]).to(acc_device, acc_dtype)
                acc[(s,) + w] += part
            diags.add(diag)
        return acc, diags.values

    def _prepared_for(self, prepared, chunk: Sequence[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        """`prepared` sliced to the (copy, window) pairs of a chunk."""
        if not isinstance(prepared, list):
            return {k: self._slice_prepared(v, [i for _, i in chunk]) for k, v in prepared.items()}
        return {k: torch.cat([self._slice_prepared(prepared[s][k], [i]) for s, i in chunk])
                for k in (prepared[0] if prepared else {})}

    def _slice_prepared(self, value: torch.Tensor, chunk: Sequence[int]) -> torch.Tensor:
        """Leading dim 1 -> (B, C, *patch); a stack of N samples -> (B, N, C, *patch)."""
        parts = [value[(slice(None), slice(None)) + self.windows[i]] for i in chunk]
        out = torch.cat(parts) if value.shape[0] == 1 else torch.stack(parts)
        return out.to(self.device, self.dtype)

    def _noise_tunnel(self, spec, params, x, generator) -> Tuple[torch.Tensor, Dict]:
        """Global noise per sample; the base method additive over the windows of x + noise; the
        base's finalize per sample map; then the catalogue's aggregator (Captum's formulas)."""
        from .methods import noise as nt

        base = get_method(params["base_method"])
        if base.patching != "additive":
            raise EsegetaError(f"{spec.name} needs an additive gradient method as base; {base.name} is {base.patching}.")
        inner = nt.base_params(params)
        kind = params.get("nt_type") or nt.NT_TYPES.get(spec.name, "smoothgrad")
        samples = int(params["nt_samples"])
        sigma = nt.stdev(self.stats, params)
        layer, layer_name = self._layer(base, inner)
        prepared = self._prepare(base, inner, x, generator)  # baselines from the clean volume, like Captum
        aggregator = nt.Aggregator(kind)
        diag: Dict[str, Any] = {"noise_stdev": sigma, "base_method": base.name, "nt_type": kind}
        if layer_name:
            diag["layer"] = layer_name
        # Samples go through the windows together, as many as fill a batch with every active window
        # (one window: `batch_size` samples per pass); the noise is drawn in the same order as one by one.
        group = max(1, self.batch_size // max(1, len(self.active)))
        for j0 in range(0, samples, group):
            j1 = min(samples, j0 + group)
            noisy = torch.stack([x + nt.draw(x[None], sigma, 1, generator)[0].to(x.dtype) for _ in range(j0, j1)])
            acc, _ = self._windows_pass(base, inner, self.grid.pad(noisy), prepared, layer, generator,
                                        report_base=(j0 / samples, j1 / samples))
            for k in range(j1 - j0):
                sample = self.grid.fold(acc[k:k + 1])[0]
                if base.finalize is not None:
                    sample = base.finalize(sample, inner)
                aggregator.add(sample.to(torch.float64))
        out = aggregator.result()
        if spec.finalize is not None:
            out = spec.finalize(out, params)
        return out, diag

    def layer_activation(self, layer: nn.Module, x: Optional[torch.Tensor] = None,
                         geometry=None) -> torch.Tensor:
        """(1, K, I, J, K) float32 (float64 for a float64 network) on the device: `layer`'s output of every window of `x` (default:
        the session's volume; host (C, I, J, K)), brought to the window's input grid with the layer's
        sampling geometry (methods/common.resample_layer_map) and blended with the window weights
        (which sum to 1 at every voxel): the sliding-window model's layer activation on the volume."""
        from .methods.common import first_tensor, resample_layer_map

        x_pad = self._x_pad if x is None else self.grid.pad(x[None])
        store: Dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            store["A"] = first_tensor(output).detach()

        acc: Optional[torch.Tensor] = None
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32

        def work(chunk):
            with torch.no_grad():
                self.scorer.logits(self._window_batch(x_pad, chunk))
            return resample_layer_map(store.pop("A").to(dtype), self.grid.patch, geometry)

        handle = layer.register_forward_hook(hook)
        try:
            for chunk, maps in self.run_batches(list(range(len(self.windows))), work):
                if acc is None:
                    self.layer_channels = int(maps.shape[1])  # work.perturbation_work's count
                    acc = torch.zeros((1, maps.shape[1]) + tuple(self.grid.padded_shape), dtype=dtype,
                                      device=maps.device)
                for k, i in enumerate(chunk):
                    w = self.windows[i]
                    acc[(0, slice(None)) + w] += maps[k] * self.grid.weight(w).to(maps.device, maps.dtype)
        finally:
            handle.remove()
        return self.grid.crop(acc)

    def _global(self, spec, params, x, generator) -> Tuple[torch.Tensor, Dict]:
        layer, layer_name = self._layer(spec, params)
        diag: Dict[str, Any] = dict(self._last_layer_probe) if layer_name else {}
        geometry, activation = None, None
        if layer is not None:  # a perturbation method on a layer (Score-CAM): its blended activation
            geometry = tuple(tuple(g) for g in self._last_layer_probe["layer_geometry"])
            if spec.level != "model":  # a model-level visualisation does not read this volume's layer
                activation = self.layer_activation(layer, x, geometry)
        forward = PatchedScore(self, x, label=spec.name)
        try:  # how many volumes and window forwards to expect: progress with a total
            from .work import perturbation_work

            forward.expected_evaluations, forward.expected_windows = perturbation_work(spec, params, self)
        except Exception:  # noqa: BLE001 - an estimate only; the method itself reports real errors
            pass
        region = torch.from_numpy(self.region).to(self.device, self.dtype)[None, None]
        inputs = x[None].to(self.device)
        prepared = dict(spec.prepare(inputs, self.stats, params, generator) or {}) if spec.prepare else {}
        if activation is not None:
            prepared["layer_activation"] = activation
        ctx = MethodContext(forward=forward, network=self.network, inputs=inputs, params=params,
                            stats=self.stats, forward_args=(), prepared=prepared,
                            layer=layer, region=region, generator=generator,
                            internal_batch_size=self.batch_size, layer_geometry=geometry,
                            patch=tuple(int(p) for p in self.grid.patch))
        attribution, more = _split(spec.attribute(ctx))
        diag.update(more)
        diag.update(windows_rerun=forward.windows_rerun, volumes_evaluated=forward.evaluations)
        attribution = attribution.detach()[0].cpu()
        if spec.finalize is not None:
            attribution = spec.finalize(attribution, params)
        return attribution, diag


def _g(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def completeness_status(result: MethodResult) -> Tuple[Optional[str], Optional[float]]:
    """(status, relative error) of a result's completeness: its "completeness" TrustCheck when it
    has one (pass/warn/fail), else its relative convergence delta against trust.COMPLETENESS_TOLERANCE;
    (None, None) for methods without a completeness property (or a check that did not run)."""
    for check in result.checks:
        if check.name == "completeness":
            if check.status == "not_run":
                return None, None
            return check.status, check.value
    delta = result.diagnostics.get("relative_convergence_delta")
    if isinstance(delta, (int, float)) and not isinstance(delta, bool):
        return ("pass" if float(delta) <= COMPLETENESS_TOLERANCE else "warn"), float(delta)
    return None, None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


def _steps_used(diag: Dict[str, Any]) -> None:
    """Adaptive path methods: mean and max gradient evaluations per window from the summed counts."""
    total, examples = diag.pop("steps_total", None), diag.pop("path_examples", None)
    if total is not None and examples:
        diag["steps_used_mean"] = float(total) / float(examples)
        diag["steps_used_max"] = int(diag.pop("steps_max", 0))


def _relative_delta(diag: Dict[str, Any], attribution: Optional[torch.Tensor]) -> None:
    """Completeness error of F from window sums: delta and F(x) - F(baseline) add up over windows
    (Captum's delta = sum(attr) - (F(x) - F(b))); the relative error is recomputed from the sums."""
    delta = diag.get("convergence_delta")
    if not isinstance(delta, (int, float)) or isinstance(delta, bool):
        return
    change = diag.get("score_change")
    if not isinstance(change, (int, float)):
        if attribution is None:
            diag.pop("relative_convergence_delta", None)
            return
        change = float(attribution.double().sum()) - float(delta)
        diag["score_change"] = change
    diag["relative_convergence_delta"] = abs(float(delta)) / max(abs(float(change)), 1e-12)


class PatchedScore(nn.Module):
    """F on whole volumes (N, C, I, J, K) -> (N,) float64, rerunning only windows that changed.

    Each window's score on `base` is computed once; a perturbed volume costs only the windows whose
    voxels (after padding) differ from `base`. Counts reruns for the diagnostics.
    """

    def __init__(self, session: ExplainSession, base: torch.Tensor, label: str = "score"):
        super().__init__()
        self.session = session
        self.scorer = session.scorer
        self.label = label
        self.base_pad = session.grid.pad(base[None].to(session.device, session.dtype))
        self.cached: Optional[torch.Tensor] = None
        self.windows_rerun = 0
        self.evaluations = 0
        self.windows_run = 0  # including the unperturbed pass (progress)
        self.expected_evaluations: Optional[int] = None  # set by the engine when it can count them
        self.expected_windows: Optional[float] = None

    def _scores(self, x_pad: torch.Tensor, pairs: List[Tuple[int, int]], report=None) -> torch.Tensor:
        s = self.session
        values = torch.zeros(len(pairs), dtype=torch.float64)

        def work(chunk):
            xb = torch.stack([x_pad[(b, slice(None)) + s.windows[i]] for b, i in chunk])
            # scores only (no autograd bookkeeping), in the run's precision (the scorer's autocast)
            with torch.inference_mode():
                return self.scorer(xb.to(s.device, s.dtype), s.window_weights([i for _, i in chunk]))

        done = 0
        for chunk, out in s.run_batches(pairs, work, report):
            values[done:done + len(chunk)] = out.double().cpu()
            done += len(chunk)
        return values

    def forward(self, x: torch.Tensor, *unused) -> torch.Tensor:
        s = self.session
        if self.cached is None:
            cached = torch.zeros(len(s.windows), dtype=torch.float64)
            cached[s.active] = self._scores(self.base_pad, [(0, i) for i in s.active])
            self.cached = cached
            self.windows_run += len(s.active)
        x = x.detach().to(s.device, s.dtype)
        x_pad = s.grid.pad(x)
        changed = (x_pad != self.base_pad).any(dim=1)  # (N, *padded)
        pairs = [(b, i) for b in range(x.shape[0]) for i in s.active if bool(changed[(b,) + s.windows[i]].any())]
        totals = torch.full((x.shape[0],), float(self.cached.sum()), dtype=torch.float64)
        if pairs:
            new = self._scores(x_pad, pairs)
            for (b, i), value in zip(pairs, new):
                totals[b] += value - self.cached[i]
        self.windows_rerun += len(pairs)
        self.windows_run += len(pairs)
        self.evaluations += int(x.shape[0])
        if self.expected_evaluations:
            total = max(self.expected_evaluations, self.evaluations)
            fraction = min(0.99, self.windows_run / max(self.expected_windows or 1.0, self.windows_run, 1.0))
            s._report(fraction, f"{self.label}: {self.evaluations}/{total} volumes evaluated, "
                                f"{self.windows_rerun} windows rerun")
        else:
            s._report(None, f"{self.label}: {self.evaluations} volumes evaluated, {self.windows_rerun} windows rerun")
        return totals.to(x.device)
