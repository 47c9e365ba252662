"""Targets: every region and score gives a finite, non-zero gradient on real networks; heads; masks."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_net_batchnorm_relu, make_unet_instancenorm_prelu
from engine_helpers import SALIENCY, tube_volume
from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaError
from EsegetaLib.options import EngineOptions, Target
from EsegetaLib.targets import TargetScore, region_mask

IMAGE, TUBES = tube_volume((16, 16, 16), seed=3)


def _targets(session_probe):
    """Targets for a class the network does predict on IMAGE (random weights)."""
    labels = session_probe.segmentation
    c = int(np.bincount(labels.ravel(), minlength=2)[1:].argmax() + 1) if labels.max() > 0 else 0
    return [Target(class_index=c, region="predicted"), Target(class_index=c, region="whole"),
            Target(class_index=c, region="roi", mask=TUBES), Target(class_index=c, region="point", point=(8, 7, 9)),
            Target(class_index=c, region="point", point=(8, 7, 9), radius=2),
            Target(class_index=c, region="whole", score="probability"),
            Target(class_index=c, region="roi", mask=TUBES, score="probability", reduction="mean")]


@pytest.mark.parametrize("factory", [make_unet_instancenorm_prelu, make_net_batchnorm_relu])
def test_every_target_gives_nonzero_gradient(factory):
    net = factory()
    options = EngineOptions(patch_size=12, divisor=4)  # 8 windows of 12^3 over 16^3
    probe = ExplainSession(IMAGE, net, Target(region="whole"), options)
    for target in _targets(probe):
        session = ExplainSession(IMAGE, net, target, options)
        attribution = session.attribute(SALIENCY).attribution
        assert attribution.shape == (1, 16, 16, 16)
        assert np.isfinite(attribution).all()
        assert np.abs(attribution).sum() > 0, f"zero gradient for {target.region}/{target.score}"


def test_target_score_is_weighted_class_score():
    net = make_unet_instancenorm_prelu()
    x = torch.from_numpy(IMAGE)[None, None]
    weights = torch.rand((1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = net(x)
        for score, expected in (("logit", logits[:, 1]), ("probability", torch.softmax(logits, 1)[:, 1])):
            value = TargetScore(net, Target(class_index=1, score=score), torch.device("cpu"))(x, weights)
            assert torch.allclose(value, (expected * weights[:, 0]).sum(), rtol=1e-5)
        sig = TargetScore(net, Target(class_index=0, score="probability", activation="sigmoid"), torch.device("cpu"))
        assert torch.allclose(sig(x, weights), (torch.sigmoid(logits[:, 0]) * weights[:, 0]).sum(), rtol=1e-5)


def test_point_ball_and_roi_regions():
    ball = region_mask(Target(region="point", point=(5, 5, 5), radius=2), (12, 12, 12))
    assert ball.sum() == 33 and ball[5, 5, 5] and ball[7, 5, 5] and not ball[7, 6, 5]
    assert region_mask(Target(region="point", point=(0, 0, 0)), (4, 4, 4)).sum() == 1
    roi = region_mask(Target(region="roi", mask=TUBES.astype(np.uint8)), TUBES.shape)
    assert roi.dtype == bool and (roi == TUBES).all()


def test_predicted_region_is_fixed_from_blended_model():
    net = make_unet_instancenorm_prelu()
    session = ExplainSession(IMAGE, net, Target(class_index=1, region="predicted"), EngineOptions(patch_size=12, divisor=4))
    assert (session.region == (session.segmentation == 1)).all()
    assert np.allclose(session.probabilities.sum(axis=0), 1.0, atol=1e-5)
    # Sigmoid: a threshold per channel.
    sig = ExplainSession(IMAGE, net, Target(class_index=1, region="predicted", activation="sigmoid", threshold=0.5),
                         EngineOptions(patch_size=12, divisor=4))
    assert (sig.region == (sig.probabilities[1] > 0.5)).all()


class _DeepSupervision(nn.Module):
    """Returns [full resolution, half resolution] like deep-supervision UNets, or a dict."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.net, self.as_dict = make_unet_instancenorm_prelu(), as_dict

    def forward(self, x):
        full = self.net(x)
        half = nn.functional.avg_pool3d(full, 2)
        return {"seg": full, "aux": half} if self.as_dict else [full, half]


def test_heads_list_and_dict():
    options = EngineOptions(patch_size=12, divisor=4)
    plain = ExplainSession(IMAGE, make_unet_instancenorm_prelu(), Target(region="whole"), options)
    expected = plain.attribute(SALIENCY).attribution
    for net, head in ((_DeepSupervision(), 0), (_DeepSupervision(True), 0), (_DeepSupervision(True), "seg")):
        session = ExplainSession(IMAGE, net, Target(region="whole", head=head), options)
        np.testing.assert_allclose(session.attribute(SALIENCY).attribution, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(EsegetaError, match="output grid .* differs from its input grid"):
        ExplainSession(IMAGE, _DeepSupervision(), Target(region="whole", head=1), options)
    with pytest.raises(EsegetaError, match="head"):
        ExplainSession(IMAGE, _DeepSupervision(True), Target(region="whole", head="nope"), options)


def test_softmax_forced_on_a_one_channel_model_says_so():
    """The user asked for softmax, not for class 1: the message names the real problem."""
    from EsegetaLib.errors import EsegetaError
    from EsegetaLib.options import Target
    from EsegetaLib.targets import check_class

    with pytest.raises(EsegetaError, match="softmax needs at least 2 output channels; this model has 1"):
        check_class(Target(class_index=1, activation="softmax"), 1)
    check_class(Target(class_index=0, activation="sigmoid"), 1)  # the detected default is fine
