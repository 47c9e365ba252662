"""Cancel, out-of-memory halving, reduced precision with the fp32 retry, determinism."""
import threading

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_unet_instancenorm_prelu
from engine_helpers import IG, SALIENCY, pearson, relative_l2, tube_volume
from EsegetaLib.api import explain
from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaCancelled
from EsegetaLib.methods.base import MethodSpec
from EsegetaLib.options import EngineOptions, Target

VOLUME = np.random.default_rng(4).standard_normal((24, 24, 24))
PATCHED = dict(patch_size=16, divisor=4)  # 8 windows


@pytest.fixture(scope="module")
def net64():
    return make_unet_instancenorm_prelu().double()


def test_cancel_from_progress_callback_returns_nothing(net64):
    calls = []

    def progress(fraction, message):
        calls.append(message)
        if message.startswith("TestSaliency: window"):
            raise EsegetaCancelled("stopped by the user")

    with pytest.raises(EsegetaCancelled):
        explain(VOLUME, net64, [SALIENCY, IG], Target(region="whole"), EngineOptions(**PATCHED), progress=progress)
    assert not any(m.startswith("TestIG") for m in calls)  # nothing ran after the cancel


def test_cancel_event_mid_run_leaves_session_clean(net64):
    event = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append(message)
        if "TestIG: window 3/" in message:
            event.set()

    options = EngineOptions(batch_size=1, **PATCHED)
    session = ExplainSession(VOLUME, net64, Target(region="whole"), options, progress=progress, cancel=event)
    with pytest.raises(EsegetaCancelled):
        session.attribute(IG, {"n_steps": 2})
    assert "TestIG: window 4/8" not in seen
    # No partial state: the same session, once the flag is cleared, gives the uncancelled map.
    event.clear()
    session.progress = None
    again = session.attribute(IG, {"n_steps": 2}).attribution
    fresh = ExplainSession(VOLUME, net64, Target(region="whole"), options).attribute(IG, {"n_steps": 2})
    np.testing.assert_array_equal(again, fresh.attribution)
    # A callable flag works too, checked before the first batch.
    with pytest.raises(EsegetaCancelled):
        explain(VOLUME, net64, [SALIENCY], Target(region="whole"), EngineOptions(**PATCHED), cancel=lambda: True)


class _OutOfMemoryAbove2(nn.Module):
    """Raises CUDA's out-of-memory error type for backward-carrying batches larger than 2."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.largest_ok = 0

    def forward(self, x):
        if torch.is_grad_enabled() and x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        self.largest_ok = max(self.largest_ok, x.shape[0]) if torch.is_grad_enabled() else self.largest_ok
        return self.net(x)


def test_out_of_memory_halves_batch_and_matches_batch_one(net64):
    wrapped = _OutOfMemoryAbove2(net64)
    session = ExplainSession(VOLUME, wrapped, Target(region="whole"), EngineOptions(**PATCHED))
    assert session.batch_size == 8  # the CPU 'auto' batch for 8 small windows
    one = ExplainSession(VOLUME, net64, Target(region="whole"), EngineOptions(batch_size=1, **PATCHED))
    for spec, params in ((SALIENCY, {}), (IG, {"n_steps": 2})):
        result = session.attribute(spec, params)
        reference = one.attribute(spec, params).attribution
        assert result.diagnostics["batch_size"] == 2
        np.testing.assert_allclose(result.attribution, reference, rtol=1e-10, atol=1e-12 * np.abs(reference).max())
    assert wrapped.largest_ok == 2


class _OverflowsInHalf(nn.Module):
    """Large activations (x100 weights on raw intensities) overflow fp16 to inf, then inf - inf = NaN;
    full precision is fine. The kind of network the fp32 retry exists for."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv3d(1, 2, 3, padding=1)
        self.diff = nn.Conv3d(2, 2, 1)
        with torch.no_grad():
            self.big.weight.normal_(100.0, 1.0, generator=torch.Generator().manual_seed(0))
            self.diff.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).view(2, 2, 1, 1, 1) * 1e-3)

    def forward(self, x):
        return self.diff(self.big(x))


def test_fp32_retry_on_non_finite_autocast():
    image = (np.random.default_rng(0).uniform(50, 100, (16, 16, 16))).astype(np.float32)
    net = _OverflowsInHalf()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(net(torch.from_numpy(image)[None, None])).all()
    # The probability score makes the gradient depend on the (non-finite) activations.
    target = Target(class_index=1, region="whole", score="probability")
    half = ExplainSession(image, net, target, EngineOptions(precision="fp16", **PATCHED))
    assert half.counters["fp32_retries"] >= 1  # the segmentation pass
    full = ExplainSession(image, net, target, EngineOptions(**PATCHED))
    result = half.attribute(SALIENCY)
    assert result.diagnostics["fp32_retries"] >= 1
    assert np.isfinite(result.attribution).all()
    np.testing.assert_allclose(result.attribution, full.attribute(SALIENCY).attribution, rtol=1e-6)
    assert (half.segmentation == full.segmentation).all()


def test_bf16_on_cpu_correlates_with_fp32():
    net = make_unet_instancenorm_prelu()
    image, _ = tube_volume((24, 24, 24), seed=9)
    maps = {}
    for precision in ("fp32", "bf16"):
        session = ExplainSession(image, net, Target(class_index=1, region="whole"),
                                 EngineOptions(precision=precision, **PATCHED))
        maps[precision] = session.attribute(IG, {"n_steps": 8})
    r = pearson(maps["bf16"].attribution, maps["fp32"].attribution)
    l2 = relative_l2(maps["bf16"].attribution, maps["fp32"].attribution)
    print(f"\nbf16 vs fp32 IG on CPU: r = {r:.4f}, relative L2 = {l2:.3f}, "
          f"{maps['fp32'].seconds:.2f} s fp32 / {maps['bf16'].seconds:.2f} s bf16")
    assert maps["bf16"].diagnostics["precision"] == "bf16"
    assert r >= 0.95


def _noisy_baseline(x_full, stats, params, generator):
    return {"baselines": x_full + torch.randn(x_full.shape, generator=generator, dtype=x_full.dtype)}


def test_seeded_and_deterministic_on_cpu(net64):
    """A method drawing from the engine's generator gives identical maps on reruns; another seed differs."""
    spec = MethodSpec("TestNoisyIG", "gradient", True, True, False, 8.0, "additive", IG.params, IG.attribute,
                      prepare=_noisy_baseline)
    maps, small = [], VOLUME[:16, :16, :16]
    for seed in (0, 0, 1):
        session = ExplainSession(small, net64, Target(region="whole"), EngineOptions(seed=seed, patch_size=12, divisor=4))
        maps.append(session.attribute(spec, {"n_steps": 2}).attribution)
    np.testing.assert_array_equal(maps[0], maps[1])
    assert not np.array_equal(maps[0], maps[2])


def test_one_window_batches_steps_and_halves_them_on_out_of_memory(net64):
    """A volume in one window still batches IG steps (auto batch counts samples, not windows); an
    out-of-memory error then halves the steps per forward instead of failing the run."""
    wrapped = _OutOfMemoryAbove2(net64)
    options = dict(PATCHED, patch_size=None)
    session = ExplainSession(VOLUME, wrapped, Target(region="whole"), EngineOptions(**options))
    assert len(session.windows) == 1 and session.batch_size > 2
    one = ExplainSession(VOLUME, net64, Target(region="whole"), EngineOptions(batch_size=1, **options))
    params = {"n_steps": 8}
    result = session.attribute(IG, params)
    reference = one.attribute(IG, params).attribution
    assert result.diagnostics["batch_size"] == 2 and wrapped.largest_ok == 2
    np.testing.assert_allclose(result.attribution, reference, rtol=1e-10, atol=1e-12 * np.abs(reference).max())
