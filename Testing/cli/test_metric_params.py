"""`--metric-param METRIC.NAME=VALUE`: typed values, unknown names refused in one line before any work."""
import pytest

from EsegetaLib.cli import main
from EsegetaLib.errors import EsegetaError
from EsegetaLib.runner import parse_metric_params


def test_values_are_typed_and_checked():
    assert parse_metric_params(["sensitivity.n_samples=4", "randomisation.within=region",
                                "deletion.margin_mm=1.5", "infidelity.normalize=false"]) == {
        "sensitivity": {"n_samples": 4}, "randomisation": {"within": "region"},
        "deletion": {"margin_mm": 1.5}, "infidelity": {"normalize": False}}
    with pytest.raises(EsegetaError, match="sensitivity has no parameter 'samples'"):
        parse_metric_params(["sensitivity.samples=4"])
    with pytest.raises(EsegetaError, match="unknown metric 'sensitiviti'"):
        parse_metric_params(["sensitiviti.n_samples=4"])
    with pytest.raises(EsegetaError, match="not METRIC.NAME=VALUE"):
        parse_metric_params(["n_samples=4"])


def test_cli_refuses_a_bad_metric_parameter_before_any_work(tmp_path, capsys):
    code = main(["explain", "missing-is-not-read-first.nii.gz", "--out", str(tmp_path / "out"),
                 "--metric-param", "deletion.steps=3"])
    err = capsys.readouterr().err
    assert code == 2 and "deletion has no parameter 'steps'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
