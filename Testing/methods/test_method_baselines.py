"""Baselines: IG completeness on the InstanceNorm+PReLU UNet with the default baseline at the default
step count, zero baseline shown much worse; the other baseline choices do what they say."""
import numpy as np
import pytest
import torch

from EsegetaLib.errors import EsegetaError
from EsegetaLib.methods import get_method
from EsegetaLib.methods.baselines import gaussian_blur, make_baseline
from method_helpers import make_context, make_unet_instancenorm_prelu, run_method, stats_of, structured_volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _relative_completeness(ctx, attr):
    with torch.no_grad():
        fx = ctx.forward(ctx.inputs, *ctx.forward_args).double().sum()
        fb = ctx.forward(ctx.prepared["baselines"], *ctx.forward_args).double().sum()
    return float(abs(attr.double().sum() - (fx - fb)) / abs(fx - fb))


def test_integrated_gradients_completeness_default_vs_zero_baseline():
    network = make_unet_instancenorm_prelu()
    x = structured_volume(24)
    spec = get_method("IntegratedGradients")
    assert spec.defaults()["baseline"] == "blur"
    # the fixed 32-step rule (adaptive IG would refine the zero baseline's path until it too is complete)
    fixed = {"adaptive": False, "n_steps": 32}
    spec, ctx = make_context("IntegratedGradients", network, x, dict(fixed), internal_batch_size=8)
    attr, diag = run_method(spec, ctx)
    default_error = _relative_completeness(ctx, attr)
    spec, zctx = make_context("IntegratedGradients", network, x, {"baseline": "zero", **fixed},
                               internal_batch_size=8)
    zattr, zdiag = run_method(spec, zctx)
    zero_error = _relative_completeness(zctx, zattr)
    print(f"IG completeness error at n_steps={ctx.params['n_steps']} on the InstanceNorm+PReLU UNet (24^3): "
          f"default (blur) baseline {default_error:.5f}, zero baseline {zero_error:.5f}")
    assert default_error <= 0.02
    assert zero_error > 10 * default_error and zero_error > 0.05
    # the reported diagnostics are exactly this relative delta
    assert diag["relative_convergence_delta"] == pytest.approx(default_error, rel=1e-3, abs=1e-7)
    assert zdiag["relative_convergence_delta"] == pytest.approx(zero_error, rel=1e-3, abs=1e-7)
    # Captum's signed delta, additive over windows
    assert diag["convergence_delta"] == pytest.approx(float(attr.double().sum()) - diag["score_change"])


def test_baseline_choices():
    x = structured_volume(16, 2)
    stats = stats_of(x, spacing=(0.5, 1.0, 2.0))
    assert torch.equal(make_baseline(x, stats, {"baseline": "zero"}), torch.zeros_like(x))
    assert torch.allclose(make_baseline(x, stats, {"baseline": "constant_low"}), torch.full_like(x, stats.low))
    assert torch.allclose(make_baseline(x, stats, {"baseline": "mean"}), torch.full_like(x, stats.mean))
    noise = make_baseline(x, stats, {"baseline": "noise"}, torch.Generator().manual_seed(0))
    assert abs(float(noise.mean()) - stats.mean) < 0.1 and abs(float(noise.std()) - stats.std) < 0.1
    user = np.arange(16 ** 3, dtype=np.float32).reshape(16, 16, 16)
    out = make_baseline(x, stats, {"baseline": "user", "baseline_volume": user})
    assert out.shape == x.shape and float(out[0, 1, 2, 3, 4]) == user[2, 3, 4]
    with pytest.raises(EsegetaError, match="resample it to the input grid"):
        make_baseline(x, stats, {"baseline": "user", "baseline_volume": np.zeros((8, 8, 8))})
    with pytest.raises(EsegetaError, match="baseline_volume"):
        make_baseline(x, stats, {"baseline": "user"})


def test_blur_sigma_is_in_millimetres():
    # an impulse blurred with sigma 2 mm: per-axis voxel sigma = 2 / spacing
    x = torch.zeros(1, 1, 31, 31, 31)
    x[0, 0, 15, 15, 15] = 1.0
    out = gaussian_blur(x, 2.0, (0.5, 1.0, 2.0))[0, 0]
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    grid = torch.arange(31, dtype=torch.float64) - 15
    for axis, spacing in enumerate((0.5, 1.0, 2.0)):
        profile = out.sum(dim=tuple(a for a in range(3) if a != axis)).double()
        sigma_vox = float(torch.sqrt((profile * grid ** 2).sum() / profile.sum()))
        assert sigma_vox == pytest.approx(2.0 / spacing, rel=0.02)


def test_the_blur_sigma_used_is_recorded_not_zero():
    """blur_sigma_mm = 0 means automatic (8 voxels of the coarsest spacing): the result's params (run.json)
    give the sigma used, the same one make_baseline blurs with; an explicit sigma is kept as given."""
    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.methods.baselines import blur_sigma_used
    from EsegetaLib.options import EngineOptions, Target

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1))
    x = structured_volume(8)[0].numpy()
    session = ExplainSession(x, net, Target(class_index=1, region="whole"), EngineOptions(device="cpu", divisor=1),
                             spacing=(2.0, 1.0, 0.5))
    auto = session.attribute("IntegratedGradients", {"adaptive": False, "n_steps": 4})
    assert auto.params["baseline"] == "blur" and auto.params["blur_sigma_mm"] == pytest.approx(16.0)
    assert blur_sigma_used({"blur_sigma_mm": 0.0}, session.stats) == pytest.approx(16.0)
    given = session.attribute("IntegratedGradients", {"adaptive": False, "n_steps": 4, "blur_sigma_mm": 3.0})
    assert given.params["blur_sigma_mm"] == 3.0
