"""Why GuidedBackprop had no positive relevance on the trained SegResNet of the ground-truth zoo:
its map is zero at every voxel.  The output's 1x1 convolution reads the vessel class through
negative weights from every channel of the rectifier below it, so every gradient reaching that
rectifier is <= 0 and the guided rule (positive signals only) removes all of it.  Captum's
GuidedBackprop (this SegResNet uses nn.ReLU, which Captum hooks) gives the same zero map, so the
zero is the method's, not the dispatcher rule's; the engine now refuses the map with that reason
(and a study records the refusal per method), while the plain gradient is non-zero."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from EsegetaLib import groundtruth as G
from EsegetaLib.errors import EsegetaError

REPO = Path(__file__).resolve().parents[2]
ZOO = Path(os.environ.get("ESEGETA_GROUNDTRUTH_ZOO", REPO / "examples" / "groundtruth" / "zoo"))
pytestmark = pytest.mark.skipif(not (ZOO / "shortcut_SegResNet.json").is_file(), reason=f"no zoo in {ZOO}")


def test_guided_backprop_zero_map_is_refused_with_its_reason(tmp_path):
    from captum.attr import GuidedBackprop

    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.runner import ExplainRequest, prepare

    G.write_benchmark(tmp_path, "shortcut", [100])
    volume = next(tmp_path.glob("shortcut_*/image.nii.gz"))
    prepared = prepare(ExplainRequest(volume=volume, model=ZOO / "shortcut_SegResNet.json", methods=["Saliency"],
                                      class_index="vessel", device="cpu", precision="fp32", metrics="none",
                                      scene=False))
    image = prepared.image
    network = prepared.model.network_for(image.array, spacing=image.spacing, affine=image.ijk_to_ras)
    session = ExplainSession(image.array, network, prepared.target, prepared.options, spacing=image.spacing)

    # The cause: the vessel logit's weights on the last rectifier's channels are all negative.
    head = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    weights = head.weight.detach().reshape(head.weight.shape[0], -1)[1]
    print("vessel weights of the output convolution:", np.round(weights.numpy(), 3))
    assert head.kernel_size == (1, 1, 1) and bool((weights < 0).all())

    with pytest.raises(EsegetaError, match=r"GuidedBackprop's map is zero at every voxel: the rule removed the "
                                           r"whole backward signal at 1 of \d+ rectifier calls"):
        session.attribute("GuidedBackprop", {})
    assert np.abs(session.attribute("Saliency", {}).map).max() > 0

    # Captum's rule on the same network and score gives the same zero map.
    region = torch.from_numpy(np.asarray(session.region))[None]

    class Score(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return (self.net(x)[:, 1] * region).sum(dim=(1, 2, 3))[:, None]

    x = session.volume.float()[None].clone().requires_grad_(True)
    reference = GuidedBackprop(Score(network)).attribute(x, target=0)
    assert not bool(reference.any())
