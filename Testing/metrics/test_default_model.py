"""The bundled default model on a crop of the bundled sample: Integrated Gradients passes the
randomisation sanity check and beats a random map on deletion and relevance mass."""
from __future__ import annotations

import numpy as np
import pytest

from EsegetaLib.errors import EsegetaError
from EsegetaLib.results import MethodResult


@pytest.fixture(scope="module")
def sample_session():
    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.models import load_default_model
    from EsegetaLib.options import EngineOptions, Target
    from EsegetaLib.sample import load_sample, load_sample_labels

    try:
        image, labels, model = load_sample(), load_sample_labels(), load_default_model()
    except EsegetaError as exc:
        pytest.skip(f"bundled sample/model not available: {exc}")
    vessels = labels.array[0] > 0
    # The 32^3 crop (the model's divisor is 8) holding the most vessel voxels, on a coarse grid.
    best, corner = -1, (0, 0, 0)
    for i in range(0, vessels.shape[0] - 31, 8):
        for j in range(0, vessels.shape[1] - 31, 8):
            for k in range(0, vessels.shape[2] - 31, 8):
                n = int(vessels[i:i + 32, j:j + 32, k:k + 32].sum())
                if n > best:
                    best, corner = n, (i, j, k)
    i, j, k = corner
    crop = image.array[:, i:i + 32, j:j + 32, k:k + 32]
    spacing = tuple(float(s) for s in np.linalg.norm(image.ijk_to_ras[:3, :3], axis=0))
    session = ExplainSession(crop, model, Target(class_index=1, region="predicted"),
                             EngineOptions(device="cpu"), spacing=spacing)
    if session.region.sum() < 50:
        pytest.skip("the default model finds no vessel in the crop")
    return session


def test_integrated_gradients_on_the_default_model(sample_session):
    from EsegetaLib.metrics import evaluate

    ig = sample_session.attribute("IntegratedGradients", {"n_steps": 8})
    rng = np.random.default_rng(0)
    control = MethodResult("random", rng.normal(size=ig.attribution.shape).astype(np.float32), {}, 0.0)
    report = evaluate(sample_session, {"IntegratedGradients": ig, "random": control},
                      metrics="deletion,relevance_mass,randomisation",
                      params={"randomisation": {"max_stages": 3}, "deletion": {"n_steps": 10}})
    rows = {r["method"]: r for r in report.rows}
    print(rows)
    assert rows["IntegratedGradients"]["randomisation_pass"] is True
    assert "randomisation_pass" not in rows["random"]  # a map without a method cannot be recomputed
    assert rows["IntegratedGradients"]["deletion_auc"] < rows["random"]["deletion_auc"]
    assert rows["IntegratedGradients"]["relevance_mass"] > rows["random"]["relevance_mass"] + 0.2
