"""The committed shortcut-trained UNet of the ground-truth zoo really uses the planted marker, and
Integrated Gradients finds the evidence where a random map and an edge detector do not.

The model (examples/groundtruth/zoo, made by scripts/train_groundtruth_zoo.py) and the volumes
(EsegetaLib.groundtruth, held-out seeds) are real; figures are printed (pytest -s)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from EsegetaLib import groundtruth as G

REPO = Path(__file__).resolve().parents[2]
ZOO = Path(os.environ.get("ESEGETA_GROUNDTRUTH_ZOO", REPO / "examples" / "groundtruth" / "zoo"))
CARD = ZOO / "shortcut_UNet.json"
pytestmark = pytest.mark.skipif(not CARD.is_file(), reason=f"{CARD} missing (scripts/train_groundtruth_zoo.py)")


@pytest.fixture(scope="module")
def model():
    from EsegetaLib.models import load_model

    return load_model(str(CARD))


def session_for(model, volume, spacing, region="predicted"):
    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.options import EngineOptions, Target

    return ExplainSession(volume[None], model, Target(class_index=1, region=region),
                          EngineOptions(device="cpu", precision="fp32"), spacing=spacing)


def test_the_model_loses_its_vessels_when_the_marker_is_removed(model):
    kept, lost = [], []
    for seed in (100, 101, 102):
        case = G.shortcut_case(seed)
        spacing = case.record["spacing"]
        with_cue = session_for(model, case.image, spacing, region="whole").segmentation == 1
        without = session_for(model, case.without_cue, spacing, region="whole").segmentation == 1
        dice = 2 * (with_cue & case.labels.astype(bool)).sum() / (with_cue.sum() + case.labels.sum())
        kept.append(dice)
        lost.append(1.0 - without.sum() / max(1, with_cue.sum()))
        print(f"seed {seed}: Dice with marker {dice:.3f}, predicted vessel voxels {with_cue.sum()} -> "
              f"{without.sum()} without the marker ({lost[-1]:.0%} lost)")
    assert np.mean(kept) > 0.4  # it does segment the labelled vessels
    assert np.mean(lost) > 0.3  # and most of that depends on the marker


def sobel_edges(volume: np.ndarray) -> np.ndarray:
    """The edge-detector control of Adebayo et al. 2018: gradient magnitude of the image (no model)."""
    return ndimage.generic_gradient_magnitude(volume.astype(np.float64), ndimage.sobel).astype(np.float32)


def test_integrated_gradients_finds_the_cue_and_the_randomisation_check_flags_the_edge_detector(model):
    from EsegetaLib.metrics import evaluate
    from EsegetaLib.metrics.evaluate import evaluate_maps

    case = G.shortcut_case(100)
    session = session_for(model, case.image, case.record["spacing"])
    ig = session.attribute("IntegratedGradients")
    rng = np.random.default_rng(0)
    maps = {"IntegratedGradients": ig.attribution,
            "Random": rng.random(case.image.shape, dtype=np.float32)[None],
            "EdgeDetector": sobel_edges(case.image)[None]}
    truth = case.relevance.astype(bool)
    report = evaluate(session, {"IntegratedGradients": ig}, metrics=["relevance_mass", "vxap", "pointing_game"],
                      reference_mask=truth)
    ig_row = report.rows[0]
    controls = evaluate_maps(session.volume, {k: v for k, v in maps.items() if k != "IntegratedGradients"},
                             session.score, metrics=["relevance_mass", "vxap", "randomisation"],
                             stats=session.stats, network=session.network, region=session.region,
                             reference_mask=truth, params={"randomisation": {"max_stages": 2}},
                             make_explain_fns={"EdgeDetector": lambda net: (lambda x: torch.from_numpy(
                                 sobel_edges(x[0].cpu().numpy())[None]))})
    rows = {r["method"]: r for r in controls.rows}
    share = truth.mean()
    print(f"ground truth: {truth.sum()} voxels ({share:.2%} of the volume); IG steps "
          f"{ig.diagnostics.get('n_steps', ig.params.get('n_steps'))}")
    for name, row in [("IntegratedGradients", ig_row), ("Random", rows["Random"]), ("EdgeDetector", rows["EdgeDetector"])]:
        print(f"{name:20s} GT relevance mass {row['relevance_mass']:.3f}  VxAP {row['vxap']:.3f}"
              + (f"  pointing game {row['pointing_game']:.0f}" if "pointing_game" in row else "")
              + (f"  randomisation pass {row['randomisation_pass']} (rho {row['randomisation_spearman_signed']:.2f})"
                 if "randomisation_pass" in row else ""))
    assert ig_row["relevance_mass"] > 2 * rows["Random"]["relevance_mass"]
    assert ig_row["relevance_mass"] > 2 * rows["EdgeDetector"]["relevance_mass"]
    # VxAP ranks voxels: an edge map ranks the bright marker and tube walls high too (0.30 against IG's
    # 0.42 on the first model trained); the mass, which weighs the ranks, separates them far better.
    assert ig_row["vxap"] > max(10 * rows["Random"]["vxap"], rows["EdgeDetector"]["vxap"])
    # The edge detector does not depend on the model: its map survives the randomised network.
    assert rows["EdgeDetector"]["randomisation_pass"] is False
