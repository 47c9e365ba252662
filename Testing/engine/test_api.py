"""`explain`: one session, every method, progress from 0 to 1, plain results."""
import numpy as np
import pytest

from conftest import make_unet_instancenorm_prelu
from engine_helpers import IG, OCCLUSION, SALIENCY, tube_volume
from EsegetaLib.api import explain
from EsegetaLib.errors import EsegetaError
from EsegetaLib.options import EngineOptions, Target

IMAGE, TUBES = tube_volume((16, 16, 16), seed=11)


class _Loaded:
    """Stands for models.LoadedModel: `network_for(array)` returns the network to run."""

    def __init__(self, net):
        self.net, self.asked = net, None

    def network_for(self, array):
        self.asked = array.shape
        return self.net


def test_explain_returns_every_method_with_timings_and_diagnostics():
    net = make_unet_instancenorm_prelu()
    progress = []
    loaded = _Loaded(net)
    expl = explain(IMAGE, loaded, [SALIENCY, (IG, {"n_steps": 4}), (OCCLUSION, {"block": 8}), SALIENCY],
                   Target(class_index=1, region="roi", mask=TUBES), EngineOptions(divisor=4, patch_size=12),
                   spacing=(0.5, 0.5, 0.8), progress=lambda f, m: progress.append((f, m)), keep_probabilities=True)
    assert loaded.asked == (1, 16, 16, 16)
    assert list(expl.results) == ["TestSaliency", "TestIG", "TestOcclusion", "TestSaliency#2"]
    np.testing.assert_array_equal(expl.results["TestSaliency"].attribution, expl.results["TestSaliency#2"].attribution)
    for result in expl.results.values():
        assert result.attribution.shape == (1, 16, 16, 16) and result.attribution.dtype == np.float32
        assert result.map.shape == (16, 16, 16)
        assert result.seconds > 0 and result.diagnostics["n_windows"] == 8
    assert expl.results["TestIG"].params == {"n_steps": 4}
    assert "relative_convergence_delta" in expl.results["TestIG"].diagnostics
    assert expl.results["TestOcclusion"].diagnostics["windows_rerun"] > 0
    assert (expl.region == TUBES).all() and expl.segmentation.dtype == np.uint8
    assert expl.probabilities.shape == (2, 16, 16, 16)
    assert expl.target["region"] == "roi" and expl.target["region_voxels"] == int(TUBES.sum())
    assert expl.engine["n_windows"] == 8 and expl.engine["patch_size"] == [12, 12, 12]
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == pytest.approx(1.0)
    assert any("TestIG: window" in m for _, m in progress)
    assert expl.seconds >= sum(r.seconds for r in expl.results.values())


def test_explain_checks_every_method_before_running():
    ran = []
    with pytest.raises(EsegetaError, match="n_steps"):
        explain(IMAGE, make_unet_instancenorm_prelu(), [SALIENCY, (IG, {"n_steps": -1})], Target(region="whole"),
                EngineOptions(divisor=4), progress=lambda f, m: ran.append(m))
    assert ran == []  # rejected before the segmentation pass
