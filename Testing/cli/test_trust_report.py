"""The trust report (#11) in every output: metrics.csv/json, run.json, the Slicer metrics table of
the review scene, and what `esegeta view` reads back from the result."""
import csv
import json

import pytest

from helpers import shared_inputs
from EsegetaLib.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return shared_inputs(tmp_path_factory)


def test_trust_report_in_csv_json_and_view(inputs, tmp_path, capsys):
    out = tmp_path / "result"
    code = main(["explain", str(inputs["volume"]), "--model", str(inputs["model"]), "--out", str(out),
                 "--methods", "Saliency,IntegratedGradients", "--region", "whole",
                 "--metrics", "randomisation", "--no-scene", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    with open(out / "metrics.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    ig = rows["IntegratedGradients"]
    assert ig["check_completeness"] == "pass" and float(ig["check_completeness_value"]) <= 0.01
    assert ig["check_determinism"] == "pass"
    assert float(ig["steps_used_mean"]) >= 4
    assert "completeness=pass" in ig["trust"] and "determinism=pass" in ig["trust"]
    # the randomisation check ran on the TorchScript model, and joined the trust report
    for row in rows.values():
        assert row["check_randomisation"] in ("pass", "warn"), row
        assert "randomisation=" in row["trust"]
    assert "check_completeness" not in rows["Saliency"] or rows["Saliency"]["check_completeness"] == ""
    run = json.loads((out / "run.json").read_text())
    checks = {c["name"]: c for c in run["results"]["IntegratedGradients"]["checks"]}
    assert checks["completeness"]["status"] == "pass" and checks["completeness"]["value"] <= 0.01
    assert {"determinism", "randomisation"} <= set(checks)
    assert all(set(c) == {"name", "status", "value", "detail"} for c in checks.values())
    # esegeta view reads metrics.csv/run.json: the trust columns are on its page
    from EsegetaLib.web.result import load_result

    viewer = load_result(out)
    assert "trust" in viewer.metrics_columns


def test_trust_report_in_slicer_metrics_table(inputs, tmp_path):
    pytest.importorskip("slicer", reason="slicer-core (pip install esegeta[scene]) not installed")
    import numpy as np

    from EsegetaLib.api import explain
    from EsegetaLib.runner import basic_rows
    from EsegetaLib.slicer import scene as S
    from conftest import make_unet_instancenorm_prelu

    expl = explain(np.random.RandomState(0).rand(16, 16, 16).astype(np.float32), make_unet_instancenorm_prelu(),
                   ["IntegratedGradients"])
    rows = basic_rows(expl, {}, "cpu")
    scene = S.new_scene()
    try:
        table = S.add_metrics_table(scene, rows)
        got = S.table_rows(table)[0]
        assert got["check_completeness"] == "pass" and "determinism=pass" in got["trust"]
        assert table.GetColumnTitle("trust") == "Trust report"
    finally:
        S.release_scene(scene)


def test_checks_that_fall_short_are_said_on_the_terminal(inputs, tmp_path, capsys):
    """A map that misses its guarantee is written (the user asked for it) and said on stderr, one line
    per check, naming method, check and figure; the passing checks stay silent."""
    out = tmp_path / "short"
    code = main(["explain", str(inputs["volume"]), "--model", str(inputs["model"]), "--out", str(out),
                 "--methods", "IntegratedGradients", "--param", "IntegratedGradients.adaptive=false",
                 "--param", "IntegratedGradients.n_steps=2", "--param", "IntegratedGradients.baseline=zero",
                 "--region", "whole", "--metrics", "none", "--no-scene", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    short = [c for c in run["results"]["IntegratedGradients"]["checks"] if c["status"] in ("warn", "fail")]
    said = [line for line in err.splitlines() if "trust: IntegratedGradients" in line]
    assert short and len(said) == len(short)
    completeness = next(c for c in short if c["name"] == "completeness")  # 2 steps from zero: far off
    assert any("completeness warn" in line and f"{completeness['value']:.3g}" in line for line in said)
    assert not any("determinism" in line for line in said)  # it passed


def test_path_method_missing_its_tolerance_is_refused_in_one_line(inputs, tmp_path, capsys):
    """Adaptive IG that cannot meet its tolerance from any baseline at the step cap: exit 2, one line
    naming the baselines tried and what to do, no result folder; allow_incomplete=true writes it."""
    out = tmp_path / "refused"
    params = ["--param", "IntegratedGradients.n_steps=4", "--param", "IntegratedGradients.max_steps=4",
              "--param", "IntegratedGradients.tolerance=0.000001"]
    code = main(["explain", str(inputs["volume"]), "--model", str(inputs["model"]), "--out", str(out),
                 "--methods", "IntegratedGradients", *params, "--region", "whole", "--metrics", "none",
                 "--no-scene", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "baselines tried: blur" in err and "noise" in err and "allow_incomplete=true" in err
    code = main(["explain", str(inputs["volume"]), "--model", str(inputs["model"]), "--out", str(out),
                 "--methods", "IntegratedGradients", *params, "--param", "IntegratedGradients.allow_incomplete=true",
                 "--region", "whole", "--metrics", "none", "--no-scene", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    checks = {c["name"]: c for c in json.loads((out / "run.json").read_text())["results"]["IntegratedGradients"]["checks"]}
    used = json.loads((out / "run.json").read_text())["results"]["IntegratedGradients"]["diagnostics"]["baseline_used"]
    assert checks["completeness"]["status"] == "warn"
    assert checks["baseline"]["status"] == ("pass" if used == "blur" else "warn"), (used, checks["baseline"])


def test_a_fallback_baseline_is_a_warning():
    """The map from another baseline than the one asked for meets completeness, but answers another
    question ('why this output rather than that of the fallback volume'): the check warns, so the
    terminal and every table say it; the requested baseline that met the tolerance passes."""
    import numpy as np

    from EsegetaLib.results import MethodResult
    from EsegetaLib.trust import add_baseline_check

    def result():
        return MethodResult(name="IntegratedGradients", attribution=np.zeros((1, 2, 2, 2), np.float32), seconds=0.0,
                            params={"baseline": "zero"})

    fell_back = result()
    add_baseline_check(fell_back, "zero", "blur", [("zero", 0.555), ("blur", 0.0063)])
    check = {c.name: c for c in fell_back.checks}["baseline"]
    assert check.status == "warn" and check.value == 0.0063 and "zero 55.5 %" in check.detail
    kept = result()
    add_baseline_check(kept, "zero", "zero", [("zero", 0.004)])
    assert {c.name: c for c in kept.checks}["baseline"].status == "pass"
