"""`esegeta bench --quick-look --metrics-cost` on tiny volumes: the code path and the bookkeeping
(figures are in docs/PERFORMANCE.md, never asserted): every step has a floor from its passes, the
ratios are the quotients shown, and batched sensitivity equals the one-by-one path."""
import json

import pytest

from EsegetaLib.benchmark import run
from EsegetaLib.commands.bench import build_parser


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "extras.json"
    args = build_parser().parse_args(["--device", "cpu", "--threads", "1", "--quick-look", "--quick-look-size", "24x32x16",
                                      "--metrics-cost", "--metrics-cost-size", "24", "--sensitivity-samples", "2",
                                      "--metrics-cost-methods", "Saliency,GradCAM", "--sensitivity-one-by-one",
                                      "--precision", "fp32", "--json", str(out)])
    run(args)
    return json.loads(out.read_text())


def test_quick_look_rows_and_floors(report):
    quick = report["quick_look"]
    assert quick["size"] == [24, 32, 16] and quick["precision"] == "fp32" and quick["threads"] == 1
    steps = [r["step"] for r in quick["rows"]]
    assert steps == ["segmentation", "Saliency", "IntegratedGradients", "GradCAM"]
    rows = {r["step"]: r for r in quick["rows"]}
    assert rows["segmentation"]["passes"] == quick["windows"]
    assert rows["Saliency"]["passes"] == quick["active_windows"]
    ig = rows["IntegratedGradients"]
    assert ig["passes"] >= 2 * quick["active_windows"]  # steps per window x windows
    for r in quick["rows"]:
        assert r["seconds"] > 0 and r["floor_s"] > 0 and r["cpu_s"] >= 0
        assert r["x_floor"] == pytest.approx(r["seconds"] / r["floor_s"])
    assert quick["total_s"] == pytest.approx(sum(r["seconds"] for r in quick["rows"]))
    assert quick["within_budget"] == (quick["total_s"] <= 180.0)


def test_metrics_cost_rows(report):
    cost = report["metrics_cost"]
    assert [r["method"] for r in cost["rows"]] == ["Saliency", "GradCAM"]
    for r in cost["rows"]:
        assert r["metrics_x"] == pytest.approx(r["metrics_s"] / r["attribution_s"])
        assert r["sensitivity_goal"] == pytest.approx(1 + 0.6 * 2)
        assert set(r["by_metric_s"]) >= {"infidelity", "deletion", "insertion"}
        # the batched and the one-by-one sensitivity are the same number (same draws)
        assert r["sensitivity_max"] == pytest.approx(r["sensitivity_one_by_one_max"], rel=1e-4)
    assert cost["score_counters"]["volumes_evaluated"] > 0
