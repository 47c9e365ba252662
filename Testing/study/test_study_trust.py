"""The trust report survives aggregation: study.csv/study.parquet hold the same `trust` and
`check_<name>` statuses (pass|warn|fail|not_run) as each case's own metrics.csv, and summary.csv
and report.md count them per model x method (a warn must not vanish on the way into the table)."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_helpers import write_study, write_unet_card, write_volumes  # noqa: E402


def test_study_keeps_trust_statuses(tmp_path):
    from EsegetaLib.cli import main

    (vol,) = write_volumes(tmp_path, [(24, 24, 24)])
    card = write_unet_card(tmp_path)
    study = write_study(tmp_path / "trust.yaml", [{"name": "v0", "path": str(vol)}],
                        [{"name": "unet", "path": str(card)}],
                        methods=["Saliency", "LRP"], metrics=["sparseness"])
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out), "--quiet"]) == 0
    own = pd.read_csv(out / "cases" / "v0" / "unet" / "metrics.csv").set_index("method")
    status_columns = [c for c in own.columns if c == "trust" or (c.startswith("check_") and not c.endswith("_value"))]
    assert "trust" in status_columns and len(status_columns) >= 2, list(own.columns)
    assert own["trust"].notna().all() and own["check_determinism"].notna().all()
    # LRP's conservation on this net is a warn (LRP's rules do not conserve through InstanceNorm and
    # PReLU) at the time of writing: the status that was lost; whatever it is, it must survive.
    print(own[status_columns].to_string())
    for table in (pd.read_csv(out / "study.csv"), pd.read_parquet(out / "study.parquet")):
        mine = table.set_index("method").loc[own.index]
        for column in status_columns:
            assert mine[column].fillna("").tolist() == own[column].fillna("").tolist(), column
        for column in [c for c in own.columns if c.startswith("check_") and c.endswith("_value")]:
            pd.testing.assert_series_equal(mine[column].astype(float), own[column].astype(float),
                                           check_names=False)
    summary = pd.read_csv(out / "summary.csv")
    checks = summary[summary["metric"].str.startswith("check_")]
    assert len(checks), summary["metric"].tolist()
    expected = {(m, c) for m in own.index for c in status_columns if c != "trust" and pd.notna(own.loc[m, c])}
    assert {(r.method, r.metric) for r in checks.itertuples()} == expected
    for row in checks.itertuples():
        status = own.loc[row.method, row.metric]
        assert row.note == f"{status} 1" and row.n == 1 and row.mean == (status == "pass"), (row.metric, row.note)
    report = (out / "report.md").read_text()
    assert next(iter(checks["metric"])) in report
