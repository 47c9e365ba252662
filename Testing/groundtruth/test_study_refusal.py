"""A method refused on a case's model does not fail the case: the study records it per method
(study.csv status "refused" with the reason, summary.csv a "refused" row, the report a table) and
the case's other methods run.  Real refusals on the trained ground-truth UNet (PReLU,
InstanceNorm): ExcitationBackprop has no rule for PReLU, and DeepLift with a summation-to-delta
tolerance no map on this network meets."""
import json
import os
from pathlib import Path

import pytest
import yaml

from EsegetaLib import groundtruth as G

REPO = Path(__file__).resolve().parents[2]
ZOO = Path(os.environ.get("ESEGETA_GROUNDTRUTH_ZOO", REPO / "examples" / "groundtruth" / "zoo"))
pytestmark = pytest.mark.skipif(not (ZOO / "shortcut_UNet.json").is_file(), reason=f"no zoo in {ZOO}")


def test_refused_methods_are_recorded_per_method(tmp_path):
    import pandas as pd

    from EsegetaLib.cli import main

    G.write_benchmark(tmp_path / "data", "shortcut", [100])
    study = {
        "name": "refusals", "seed": 1,
        "volumes": [{"glob": "data/shortcut_*/image.nii.gz", "reference": "{dir}/relevance.nii.gz"}],
        "models": [{"name": "UNet", "path": str(ZOO / "shortcut_UNet.json")}],
        "methods": ["Saliency", "ExcitationBackprop", {"name": "DeepLift", "params": {"tolerance": 1e-12}}],
        "target": {"class": "vessel", "region": "predicted"},
        "metrics": ["relevance_mass"],
        "engine": {"device": "cpu", "precision": "fp32", "scene": False, "gallery_cases": 0},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out)]) == 0  # the case is done, not failed

    table = pd.read_csv(out / "study.csv").set_index("method")
    print(table[["status", "relevance_mass", "error"]].to_string())
    assert list(table.index) == ["Saliency", "ExcitationBackprop", "DeepLift"]  # study order
    assert table.loc["Saliency", "status"] == "done" and table.loc["Saliency", "relevance_mass"] > 0
    assert table.loc["ExcitationBackprop", "status"] == "refused"
    assert "PReLU" in table.loc["ExcitationBackprop", "error"]
    assert table.loc["DeepLift", "status"] == "refused"
    assert "summation to delta" in table.loc["DeepLift", "error"]
    assert table.loc[["ExcitationBackprop", "DeepLift"], "relevance_mass"].isna().all()

    summary = pd.read_csv(out / "summary.csv")
    refused = summary[summary["metric"] == "refused"].set_index("method")
    assert sorted(refused.index) == ["DeepLift", "ExcitationBackprop"] and (refused["n"] == 1).all()
    assert "summation to delta" in refused.loc["DeepLift", "note"]
    assert set(summary[summary["metric"] != "refused"]["method"]) == {"Saliency"}

    record = json.loads((out / "study.json").read_text())
    assert record["status"] == "complete" and record["counts"] == {"done": 1}
    assert sorted(r["method"] for r in record["refused"]) == ["DeepLift", "ExcitationBackprop"]
    case = out / "cases" / table["volume"].iloc[0] / "UNet"
    assert sorted(json.loads((case / "run.json").read_text())["refused"]) == ["DeepLift", "ExcitationBackprop"]
    assert sorted(p.name for p in (case / "attributions").iterdir()) == ["Saliency.nii.gz"]
    report = (out / "report.md").read_text()
    assert "## Refused methods" in report and "| UNet | DeepLift | 0 (+1 refused) | refused |" in report
