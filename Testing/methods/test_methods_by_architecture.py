"""A slice of scripts/methods_by_architecture.py (the methods x architectures table in
docs/readme/architectures.md), through the script's own code: every cell ran or was refused with one
line, none crashed."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "methods_by_architecture.py"
METHODS = ["Saliency", "IntegratedGradients", "GradCAM", "LayerConductance"]


def _script():
    spec = importlib.util.spec_from_file_location("methods_by_architecture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table():
    pytest.importorskip("monai")
    script = _script()
    logged = []
    cells, ig = script.run(["UNet", "SegResNetDS"], METHODS, ["eager", "torchscript", "pt2"], [], 0,
                           log=logged.append)
    return script, cells, logged


def test_no_cell_crashes(table):
    script, cells, logged = table
    assert len(cells) == 2 * 3 * len(METHODS)
    errors = {k: c.reason for k, c in cells.items() if c.status == "error"}
    assert not errors, errors
    assert not [line for line in logged if "Traceback" in line]
    for (arch, fmt, method), cell in cells.items():
        assert cell.status in ("ran", "refused")
        if cell.status == "refused":
            assert cell.reason and "\n" not in cell.reason
    # eager runs everything here; TorchScript hides layers: the layer methods are refused, with the reason
    assert all(cells[(a, "eager", m)].status == "ran" for a in ("UNet", "SegResNetDS") for m in METHODS)
    assert cells[("UNet", "torchscript", "GradCAM")].status == "refused"
    assert "TorchScript" in cells[("UNet", "torchscript", "GradCAM")].reason
    assert cells[("UNet", "torchscript", "IntegratedGradients")].status == "ran"
    # LayerConductance on the default (bypassed) layer: completeness stated undefined, with the share
    # of the gradient that goes around the layer, not a pass
    conductance = cells[("UNet", "eager", "LayerConductance")]
    assert conductance.checks["completeness"] == "not_run" and 0 < conductance.completeness < 1
    ig = cells[("UNet", "eager", "IntegratedGradients")]
    assert ig.checks["completeness"] == "pass" and ig.completeness <= 0.01 and ig.steps >= 16


def test_markdown_lists_every_cell_and_reason(table):
    script, cells, _ = table
    text = script.markdown(cells, METHODS, ["UNet", "SegResNetDS"], ["eager", "torchscript", "pt2"], [],
                           ["python scripts/methods_by_architecture.py --test"], 60.0)
    for method in METHODS:
        assert text.count(f"| {method} |") == 3
    assert "## Refusal reasons" in text and "TorchScript" in text and "**error**:" not in text
