"""The README's torch.export recipe (#11 "Also"): a program exported with a dynamic batch dimension
batches windows and steps; one exported with a static batch of 1 still runs, one at a time; both
give the eager network's maps, layer methods included (the program is unflattened on load)."""
import numpy as np
import pytest
import torch

from conftest import make_unet_instancenorm_prelu
from EsegetaLib.api import explain
from EsegetaLib.models import load_model
from EsegetaLib.options import EngineOptions, Target

METHODS = ["Saliency", ("IntegratedGradients", {"n_steps": 4, "adaptive": False}), "GradCAM"]
OPTIONS = EngineOptions(device="cpu", divisor=4, patch_size=16)
VOLUME = np.random.RandomState(0).rand(24, 24, 16).astype(np.float32)


def _export(tmp_path, dynamic_batch: bool):
    net = make_unet_instancenorm_prelu()
    # spatial sizes dynamic (multiples of 4 for 2 poolings) - as in the README
    size = {axis: torch.export.Dim(f"s{axis}", min=1, max=16) * 4 for axis in (2, 3, 4)}
    if dynamic_batch:
        # an example batch of 2: torch.export specialises a dimension whose example size is 1
        shapes, example = {0: torch.export.Dim("batch", min=1, max=1024), **size}, torch.randn(2, 1, 16, 16, 16)
    else:
        shapes, example = size, torch.randn(1, 1, 16, 16, 16)
    path = tmp_path / ("dynamic.pt2" if dynamic_batch else "static.pt2")
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes={"x": shapes}), str(path))
    return path, net


def _maps(model):
    expl = explain(VOLUME, model, METHODS, target=Target(region="whole"), options=OPTIONS)
    return expl.results


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    dynamic, net = _export(folder, True)
    static, _ = _export(folder, False)
    return {"dynamic": dynamic, "static": static, "eager": net}


def test_dynamic_batch_program_batches_and_matches_eager(programs):
    results = _maps(load_model(str(programs["dynamic"])))
    eager = _maps(programs["eager"])
    for name in ("Saliency", "IntegratedGradients", "GradCAM"):
        assert results[name].diagnostics["batch_size"] > 1 and "batch_note" not in results[name].diagnostics
        np.testing.assert_allclose(results[name].attribution, eager[name].attribution, rtol=1e-4,
                                   atol=1e-5 * np.abs(eager[name].attribution).max(), err_msg=name)
    assert results["GradCAM"].diagnostics["layer"].endswith(eager["GradCAM"].diagnostics["layer"])


def test_static_batch_one_program_runs_one_at_a_time(programs):
    results = _maps(load_model(str(programs["static"])))
    reference = _maps(load_model(str(programs["dynamic"])))
    for name in ("Saliency", "IntegratedGradients", "GradCAM"):
        d = results[name].diagnostics
        assert d["batch_size"] == 1 and "one at a time" in d["batch_note"]
        np.testing.assert_allclose(results[name].attribution, reference[name].attribution, rtol=1e-4,
                                   atol=1e-5 * np.abs(reference[name].attribution).max(), err_msg=name)
