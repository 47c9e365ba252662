"""The default model's training script is deterministic and trains on what the generator makes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_default_model.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_is_deterministic():
    script = load_script()
    a, _ = script.train(iterations=2, batch=1, log_every=1000, train_seeds=[1000], empty_seeds=[3000])
    b, _ = script.train(iterations=2, batch=1, log_every=1000, train_seeds=[1000], empty_seeds=[3000])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in a.state_dict().values())


def test_patches_and_held_out_split():
    script = load_script()
    volume, labels = script.random_volume(1000)
    norm = script.normalized(volume)
    centres = script.candidates(volume, labels)
    rng = np.random.default_rng(0)
    x, y = script.sample_patch(norm, labels, centres, rng)
    assert x.shape == (1, script.PATCH, script.PATCH, script.PATCH) and y.shape == x.shape[1:]
    assert set(np.unique(y)) <= {0, 1}
    # Vessel-centred patches contain vessel; hard negatives are bright but not vessel.
    assert len(centres[0]) and len(centres[1])
    assert not labels[tuple(centres[1].T)].any()
    assert not set(script.TRAIN_SEEDS) & set(script.HELDOUT_SEEDS)
