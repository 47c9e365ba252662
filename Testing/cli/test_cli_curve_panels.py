"""`--metrics deletion` (without insertion): deletion_insertion.png draws the deletion panel only,
with no empty insertion panel and no matplotlib "No artists with labels" warning."""
from __future__ import annotations

import json
import warnings

import matplotlib.image
import pytest

from EsegetaLib.cli import main

from helpers import shared_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return shared_inputs(tmp_path_factory)


def test_deletion_only_draws_one_panel_without_warning(inputs, tmp_path, capsys):
    from EsegetaLib.metrics.report import MetricsReport

    out = tmp_path / "result"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["explain", str(inputs["nifti"]), "--model", str(inputs["model"]), "--out", str(out),
                     "--methods", "Saliency", "--region", "components", "--metrics", "deletion",
                     "--device", "cpu", "--no-scene"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "No artists with labels" not in captured.err
    assert not [w for w in caught if "No artists" in str(w.message)], [str(w.message) for w in caught]
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves["Saliency"]) >= {"deletion"} and not curves["Saliency"].get("insertion")
    figure = MetricsReport(curves=curves).figure()
    assert [ax.get_title().split(":")[0] for ax in figure.axes] == ["deletion"]
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()][0].startswith("Saliency")
    # The PNG on disk is the one-panel figure (5 x 4 in at 110 dpi), not the two-panel one (10 x 4 in).
    height, width = matplotlib.image.imread(out / "deletion_insertion.png").shape[:2]
    assert (width, height) == (550, 440)


def test_both_curves_draw_two_panels():
    from EsegetaLib.metrics.report import MetricsReport

    curve = {"fraction": [0.0, 0.5, 1.0], "normalised": [1.0, 0.4, 0.0], "auc": 0.45}
    report = MetricsReport(curves={"Saliency": {"deletion": curve, "insertion": curve}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = report.figure()
    assert [ax.get_title().split(":")[0] for ax in figure.axes] == ["deletion", "insertion"]
