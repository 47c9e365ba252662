"""The metrics' forward passes (#18 item 2), counted by a hook on the network: every window the
patched score reruns is one forward, without autograd bookkeeping (`torch.inference_mode`) and in
the run's precision (bf16 autocast here); nothing else runs the network."""
from __future__ import annotations

import numpy as np
import torch

from EsegetaLib.bench_quick import PassCounter
from EsegetaLib.engine import ExplainSession
from EsegetaLib.metrics import evaluate
from EsegetaLib.options import EngineOptions, Target


def _unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="instance", act="prelu").eval()


def test_metric_forwards_are_inference_mode_run_precision_window_reruns():
    rng = np.random.RandomState(2)
    volume = rng.rand(24, 24, 24).astype(np.float32)
    volume[6:14, 6:14, :] += 1.5
    session = ExplainSession(volume, _unet(), Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", precision="bf16", patch_size=16, overlap=0.25, divisor=4))
    assert len(session.windows) > 1
    result = session.attribute("Saliency")
    seen = []
    hook = session.network.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
                                          args[0].shape[0])))
    try:
        with PassCounter(session.network, session) as counter:
            evaluate(session, {"Saliency": result}, metrics=["infidelity", "deletion", "insertion"],
                     params={"infidelity": {"n_samples": 4}, "deletion": {"n_steps": 4}, "insertion": {"n_steps": 4}})
    finally:
        hook.remove()
    assert seen and all(inference and amp for inference, amp, _ in seen)
    counts = counter.total()
    assert counts["fwd_bwd"] == counts["fwd_fp32"] == counts["fwd_bwd_fp32"] == 0
    # one forward per window the patched score reran, + the unperturbed windows once
    assert sum(n for _, _, n in seen) == counts["fwd"] == session.score_counters["windows_rerun"] + len(session.active)
