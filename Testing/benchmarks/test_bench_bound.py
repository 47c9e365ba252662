"""`esegeta bench --targets-bound` (figures in docs/PERFORMANCE.md, not asserted): facts only.
The weight-gradient counter sees a parameter gradient when one is computed and none in the input
gradients the bound times; the bound's formula is the one documented; the command writes it beside
the measured ratios."""
import json

import pytest
import torch

from conftest import make_unet_instancenorm_prelu
from EsegetaLib.bench_bound import WeightGradientCounter, bounds, pass_costs


def test_counter_sees_weight_gradients_only_when_computed():
    net = make_unet_instancenorm_prelu()
    x = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    with WeightGradientCounter() as input_only:
        torch.autograd.grad(net(x)[:, 1].sum(), x)
    with WeightGradientCounter() as training:
        net(x)[:, 1].sum().backward()
    assert input_only.calls > 0 and input_only.weight_calls == 0
    assert training.weight_calls > 0  # loss.backward() also asks for every weight's gradient
    net.zero_grad(set_to_none=True)


def test_pass_costs_and_bound_formula():
    net = make_unet_instancenorm_prelu()
    costs = pass_costs(net, torch.randn(1, 1, 16, 16, 16), k=3, steps_batch=2, repeats=1)
    assert costs["weight_gradient_calls"] == 0 and costs["convolution_backward_calls"] > 0
    assert costs["parameters_with_grad"] == 0
    assert costs["vmap_convolution_backward_calls"] >= costs["convolution_backward_calls"] > 0
    made = {"S_forward": 1.0, "F": 1.0, "B_1": 2.0, "B_K_loop": 6.0, "B_K_vmap": 5.0, "F_K_plus_B_K_rows": 9.0,
            "F_m": 1.5, "B_m": 3.0, "B_K_m_loop": 9.0}
    b = bounds(made, k=3)
    assert b["one_pass"] == pytest.approx((1 + 5) / (3 * 3))
    assert b["one_pass_with_segmentation"] == pytest.approx((3 + 6) / (3 * 6))
    assert b["steps"] == pytest.approx((1.5 + 9) / (3 * 4.5))


def test_bench_option_prints_the_bound_beside_the_measured_ratio(tmp_path, capsys):
    from EsegetaLib.benchmark import run
    from EsegetaLib.commands.bench import build_parser

    out = tmp_path / "bench.json"
    run(build_parser().parse_args(["--quick", "--device", "cpu", "--sizes", "", "--targets", "2",
                                   "--targets-size", "24", "--targets-bound", "--methods", "Saliency",
                                   "--threads", "1", "--json", str(out)]))
    report = json.loads(out.read_text())
    rows = report["targets_bound"]["rows"]
    assert [r["method"] for r in rows] == [r["method"] for r in report["targets"]["rows"]]
    for row, measured in zip(rows, report["targets"]["rows"]):
        assert row["measured"] == measured["ratio_to_singles"]
        assert row["bound"] == report["targets_bound"]["bounds"][row["bound_kind"]]
    assert "best achievable" in capsys.readouterr().out
