"""The committed contrast-trained DynUNet of the ground-truth zoo follows the tube-versus-shell
contrast: on a held-out volume it segments the tubes brighter than their shells, and when every
shell is moved to the other side of its tube's level (the generator's counterfactual, same tubes
and noise) it drops those tubes and segments the others.  Figures printed (pytest -s)."""
import os
from pathlib import Path

import pytest

from EsegetaLib import groundtruth as G

REPO = Path(__file__).resolve().parents[2]
ZOO = Path(os.environ.get("ESEGETA_GROUNDTRUTH_ZOO", REPO / "examples" / "groundtruth" / "zoo"))
CARD = ZOO / "contrast_DynUNet.json"
pytestmark = pytest.mark.skipif(not CARD.is_file(), reason=f"{CARD} missing (scripts/train_groundtruth_zoo.py)")


def test_the_contrast_model_follows_the_shell_contrast():
    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.models import load_model
    from EsegetaLib.options import EngineOptions, Target

    model = load_model(str(CARD))
    case = G.contrast_case(101)  # held out (training used seeds 0-23)

    def segment(volume):
        return ExplainSession(volume[None], model, Target(class_index=1, region="whole"),
                              EngineOptions(device="cpu", precision="fp32"),
                              spacing=case.record["spacing"]).segmentation == 1

    def dice(a, b):
        return 2 * (a & b).sum() / max(1, a.sum() + b.sum())

    pred, flipped = segment(case.image), segment(case.contrast_flipped)
    labels, flipped_labels = case.labels.astype(bool), case.flipped_labels.astype(bool)
    kept = (pred & flipped).sum() / max(1, pred.sum())
    print(f"Dice {dice(pred, labels):.3f}; contrast flipped: {1 - kept:.0%} of the predicted vessel gone, "
          f"Dice against the flipped labels {dice(flipped, flipped_labels):.3f}")
    assert dice(pred, labels) > 0.6
    assert kept < 0.2 and dice(flipped, flipped_labels) > 0.6
