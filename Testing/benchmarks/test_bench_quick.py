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
    active = quick["active_windows"]
    # counted window passes (a hook on the network), fp32 here so every forward is of kind "fwd"
    assert rows["segmentation"]["passes"]["fwd"] == quick["windows"] + 2  # + the determinism check
    assert rows["Saliency"]["passes"] == {"fwd_bwd": active, "fwd": 0, "fwd_fp32": 0, "fwd_bwd_fp32": 0}
    ig = rows["IntegratedGradients"]
    # one forward+backward per gradient evaluation (Lobatto nodes: 13 at the default of 16 steps, more
    # where an interval was halved: 6 each), and only the allowances' F_w(x), F_w(b) as forwards of its own
    assert ig["passes"]["fwd_bwd"] >= 13 * active and (ig["passes"]["fwd_bwd"] - 13 * active) % 6 == 0
    assert ig["passes"]["fwd"] == 2 * active
    units = quick["unit_costs"]
    for r in quick["rows"]:
        assert r["seconds"] > 0 and r["floor_s"] > 0 and r["cpu_s"] >= 0
        assert r["x_floor"] == pytest.approx(r["seconds"] / r["floor_s"])
        assert r["min_cpu_s"] == pytest.approx(sum(n * units[k][1] for k, n in r["passes"].items() if n))
    assert ig["floor_cpu_s"] == pytest.approx(ig["passes"]["fwd_bwd"] * units["fwd_bwd"][1])
    saliency = rows["Saliency"]
    assert saliency["x_saliency_pass"] == pytest.approx(1.0)
    assert ig["x_saliency_pass"] == pytest.approx(
        ig["seconds"] / (ig["passes"]["fwd_bwd"] * saliency["seconds"] / saliency["passes"]["fwd_bwd"]))
    assert quick["total_s"] == pytest.approx(sum(r["seconds"] for r in quick["rows"]))
    assert quick["idle_wall_estimate_s"] == pytest.approx(quick["total_cpu_s"] / quick["threads"])
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
        by = r["by_metric"]
        # forwards per metric: 16 infidelity draws, 20 deletion and 19 insertion steps (F(baseline)
        # shared, the unperturbed ends rerun no window); localisation and map statistics none
        assert by["infidelity"]["passes"]["fwd"] in (16, 17)  # + the unperturbed windows once per session
        assert by["deletion"]["passes"]["fwd"] == 20 and by["insertion"]["passes"]["fwd"] == 19
        assert all(sum(by[m]["passes"].values()) == 0 for m in ("relevance_mass", "relevance_rank", "sparseness", "complexity"))
        assert r["metrics_passes"]["fwd"] == sum(v["passes"]["fwd"] for v in by.values())
        assert r["sensitivity_passes"]["fwd_bwd"] == 2 * r["attribution_passes"]["fwd_bwd"]  # 2 samples
        # best x: the counted passes priced at the measured CPU cost of each kind, over the attribution's
        units = cost["unit_costs"]
        price = lambda counts: sum(n * units[k][1] for k, n in counts.items() if n)  # noqa: E731
        assert r["attribution_min_cpu_s"] == pytest.approx(price(r["attribution_passes"]))
        assert r["metrics_best_x"] == pytest.approx(price(r["metrics_passes"]) / price(r["attribution_passes"]))
        assert by["deletion"]["best_x"] == pytest.approx(price(by["deletion"]["passes"]) / price(r["attribution_passes"]))
    # every metric forward is a window rerun by the patched score (+ its unperturbed windows once)
    counted = sum(r["metrics_passes"]["fwd"] for r in cost["rows"])
    assert counted == cost["score_counters"]["windows_rerun"] + cost["active_windows"]
