"""The ground-truth study in reduced form (2 volumes, the UNet trained and random, 2 methods): cohort
folders named from their paths, ground-truth metrics and relevance shares in the study tables."""
import os
from pathlib import Path

import pytest
import yaml

from EsegetaLib import groundtruth as G

REPO = Path(__file__).resolve().parents[2]
ZOO = Path(os.environ.get("ESEGETA_GROUNDTRUTH_ZOO", REPO / "examples" / "groundtruth" / "zoo"))
pytestmark = pytest.mark.skipif(not (ZOO / "shortcut_UNet.json").is_file(), reason=f"no zoo in {ZOO}")


def test_reduced_groundtruth_study(tmp_path, capsys):
    import pandas as pd

    from EsegetaLib.cli import main

    G.write_benchmark(tmp_path / "data", "shortcut", [100, 101])
    study = {
        "name": "groundtruth-ci", "seed": 1,
        "volumes": [{"glob": "data/shortcut_*/image.nii.gz", "reference": "{dir}/relevance.nii.gz"}],
        "models": [{"name": "UNet", "path": str(ZOO / "shortcut_UNet.json")},
                   {"name": "UNet-random", "path": str(ZOO / "shortcut_UNet_random.json")}],
        "methods": ["Saliency", "InputXGradient"],
        "target": {"class": "vessel", "region": "whole"},
        "metrics": ["relevance_mass", "vxap", "pointing_game", "relevance_shares", "topology_deletion",
                    "randomisation"],
        "metric_params": {"topology_deletion": {"n_steps": 3, "max_fraction": 0.3},
                          "randomisation": {"max_stages": 1}},
        "engine": {"device": "cpu", "precision": "fp32", "scene": False, "gallery_cases": 0},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "study.csv")
    assert sorted(table["volume"].unique()) == ["shortcut_0100", "shortcut_0101"]
    assert (table["status"] == "done").all() and len(table) == 8
    for column in ("relevance_mass", "vxap", "pointing_game", "share_reference", "share_segmentation",
                   "share_boundary", "share_elsewhere", "topology_auc", "randomisation_pass"):
        assert table[column].notna().all(), column
    shares = table[["share_segmentation", "share_elsewhere"]]
    assert ((shares >= 0) & (shares <= 1)).all().all()
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert {"vxap", "share_reference", "topology_auc"} <= set(summary["metric"])
    assert (tmp_path / "out" / "figures" / "relevance_shares.png").stat().st_size > 10_000
    print(table[["volume", "model", "method", "relevance_mass", "vxap", "share_reference", "topology_auc"]]
          .to_string(index=False))
