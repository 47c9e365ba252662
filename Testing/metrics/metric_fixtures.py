"""Fixtures of the metric tests: a small float64 network scored over a fixed region (references
against Captum and Quantus) and a briefly trained tube segmenter (metrics must rank real maps above
random ones)."""
from __future__ import annotations

import hashlib
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metric_helpers as helpers  # noqa: E402


@pytest.fixture(scope="module")
def small_case():
    """16^3 tube volume, the MONAI UNet (random weights) in float64, its predicted-style
    region, the score module and a context on the CPU."""
    net = helpers.make_tube_net(seed=1).double().eval()
    vol, mask = helpers.tube_volume(16, seed=3)
    x = torch.from_numpy(vol).double()
    score = helpers.RegionScore(net, mask).double()
    return {"net": net, "x": x, "mask": mask, "score": score}


@pytest.fixture(scope="session")
def trained_case(request):
    """A UNet trained for a few seconds on tube volumes (weights cached by pytest between runs,
    keyed by the training code), a new test volume, its predicted region and the score."""
    size = 16
    key = hashlib.sha1(inspect.getsource(helpers).encode()).hexdigest()[:12]
    folder = Path(request.config.cache.mkdir("esegeta-metrics"))
    path = folder / f"tube_net_{key}.pt"
    net = helpers.make_tube_net()
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        net = helpers.train_tube_net(steps=40, size=size)
        torch.save(net.state_dict(), path)
    net.eval()
    vol, mask = helpers.tube_volume(size, seed=7)
    x = torch.from_numpy(vol)
    with torch.no_grad():
        pred = net(x[None]).argmax(1)[0].numpy().astype(bool)
    dice = 2 * (pred & mask).sum() / (pred.sum() + mask.sum())
    assert dice > 0.6, f"the tube net did not learn (Dice {dice:.2f})"
    return {"net": net, "x": x, "mask": mask, "region": pred, "score": helpers.RegionScore(net, pred)}
