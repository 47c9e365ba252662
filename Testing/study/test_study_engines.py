"""A 3 volumes x 2 models x 3 methods study, run with --engine local and with --engine ray (a local
Ray instance, 2 CPUs): both give the same numbers, tables and figure data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study_helpers import METRICS, write_picky_torchscript, write_study, write_unet_card, write_volumes

from EsegetaLib.cli import main
from EsegetaLib.study.spec import case_seed

NUMERIC = ["sparseness", "complexity", "complexity_rel", "relevance_mass", "convergence_delta"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study_engines")
    write_volumes(folder, [(24, 24, 24), (28, 24, 24), (32, 28, 24)])
    write_unet_card(folder)
    write_picky_torchscript(folder)
    path = write_study(folder / "engines.yaml", [{"glob": "vol?.nii.gz"}],
                       [{"name": "unet", "path": "unet.json"}, {"name": "ts", "path": "picky.pt"}])
    return folder, path


@pytest.fixture(scope="module")
def local_run(study):
    folder, path = study
    out = folder / "local"
    assert main(["study", str(path), "--out", str(out), "--engine", "local", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def ray_run(study):
    pytest.importorskip("ray")
    folder, path = study
    out = folder / "ray"
    assert main(["study", str(path), "--out", str(out), "--engine", "ray", "--quiet"]) == 0
    return out


def test_local_study_tables_provenance_and_report(local_run, study):
    frame = pd.read_csv(local_run / "study.csv")
    assert len(frame) == 3 * 2 * 3
    assert set(frame["status"]) == {"done"}
    assert sorted(frame.groupby(["volume", "model"]).size()) == [3] * 6
    assert set(frame["method"]) == {"Saliency", "InputXGradient", "IntegratedGradients"}
    for metric in METRICS:
        assert frame[metric].notna().all(), metric
    assert frame["attribution_s"].gt(0).all() and set(frame["device"]) == {"cpu"}
    assert frame["convergence_delta"].notna().sum() == 6  # IG only
    # Parquet holds the same table.
    parquet = pd.read_parquet(local_run / "study.parquet")
    assert set(parquet["error"]) == {""}  # (CSV reads empty text back as NaN)
    pd.testing.assert_frame_equal(parquet.drop(columns="error"), frame.drop(columns="error"), check_dtype=False)
    # Seeds: derived from the study seed and the case's names; run.json records the one used.
    for (volume, model), group in frame.groupby(["volume", "model"]):
        seed = case_seed(11, volume, model)
        assert set(group["seed"]) == {seed}
        case = local_run / "cases" / volume / model
        run = json.loads((case / "run.json").read_text())
        assert run["parameters"]["seed"] == seed
        marker = json.loads((case / "case.json").read_text())
        assert marker["status"] == "done" and marker["seed"] == seed
        assert sorted(p.name for p in (case / "attributions").iterdir()) == [
            "InputXGradient.nii.gz", "IntegratedGradients.nii.gz", "Saliency.nii.gz"]
        # The case's own metrics.csv is what the study table holds.
        own = pd.read_csv(case / "metrics.csv").set_index("method")
        mine = group.set_index("method")
        for metric in METRICS:
            np.testing.assert_allclose(mine.loc[own.index, metric], own[metric], rtol=1e-12)
    # summary.csv: recomputed here from study.csv.
    summary = pd.read_csv(local_run / "summary.csv")
    for row in summary.itertuples():
        if row.metric.startswith("check_"):  # a trust check: counts of each status (test_study_trust.py)
            continue
        values = frame[(frame["model"] == row.model) & (frame["method"] == row.method)][row.metric].dropna()
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        assert row.n == len(values) == 3
        np.testing.assert_allclose([row.mean, row.median, row.iqr], [values.mean(), median, q3 - q1], rtol=1e-9)
    assert set(summary["metric"]) >= set(METRICS)
    # study.json: versions and the resolved study; report embeds the figures, which exist.
    record = json.loads((local_run / "study.json").read_text())
    assert record["status"] == "complete" and record["counts"] == {"done": 6}
    assert record["versions"]["torch"] and record["versions"]["captum"]
    assert len(record["study"]["cases"]) == 6 and record["study"]["seed"] == 11
    assert all(Path(v["path"]).is_absolute() for v in record["study"]["volumes"])
    report = (local_run / "report.md").read_text()
    for name in ("summary", "distributions", "ranking", "gallery"):
        assert f"(figures/{name}.png)" in report
        assert (local_run / "figures" / f"{name}.png").stat().st_size > 5000
    assert "| unet | Saliency | 3 |" in report


def test_ranking_follows_metric_direction(local_run):
    frame = pd.read_csv(local_run / "study.csv")
    ranking = pd.read_csv(local_run / "figures" / "ranking.csv")
    # complexity: lower is better, so the method with the lowest mean complexity has the best mean rank
    # when it is lowest on every volume.
    for model, group in frame.groupby("model"):
        wide = group.pivot(index="volume", columns="method", values="complexity")
        best = wide.idxmin(axis=1)
        if best.nunique() == 1:
            ranks = ranking[(ranking["model"] == model) & (ranking["metric"] == "complexity")].set_index("method")
            assert ranks.loc[best.iloc[0], "rank"] == 1.0
    assert ranking["rank"].between(1, 3).all()


def test_ray_gives_the_same_study(local_run, ray_run):
    local = pd.read_csv(local_run / "study.csv").sort_values(["volume", "model", "method"]).reset_index(drop=True)
    remote = pd.read_csv(ray_run / "study.csv").sort_values(["volume", "model", "method"]).reset_index(drop=True)
    assert list(local[["volume", "model", "method", "status", "seed"]].itertuples(index=False)) == \
        list(remote[["volume", "model", "method", "status", "seed"]].itertuples(index=False))
    for column in NUMERIC:
        # convergence_delta is the difference of two sums of ~1e3: summation order (Ray workers run
        # torch with one thread, the local run with the machine's) moves it by ~5e-4 relative.
        rtol = 2e-3 if column == "convergence_delta" else 1e-4
        np.testing.assert_allclose(remote[column], local[column], rtol=rtol, atol=1e-6, equal_nan=True, err_msg=column)
    # The same figure data.
    for name in ("distributions.csv", "ranking.csv"):
        a, b = pd.read_csv(local_run / "figures" / name), pd.read_csv(ray_run / "figures" / name)
        assert list(a.select_dtypes(exclude="number").itertuples(index=False)) == \
            list(b.select_dtypes(exclude="number").itertuples(index=False))
        loose = (a["metric"] == "convergence_delta").to_numpy() if "metric" in a else np.zeros(len(a), bool)
        for rows, rtol in ((~loose, 1e-4), (loose, 2e-3)):  # convergence_delta: see above
            np.testing.assert_allclose(b.select_dtypes("number")[rows], a.select_dtypes("number")[rows],
                                       rtol=rtol, atol=1e-6)
    a, b = np.load(local_run / "figures" / "gallery.npz"), np.load(ray_run / "figures" / "gallery.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) == 2 * 5
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6 * float(np.abs(a[key]).max() or 1))
    record = json.loads((ray_run / "study.json").read_text())
    assert record["executor"]["engine"] == "ray"
    assert record["executor"]["task_resources"] == {"num_cpus": 1, "num_gpus": 0}
    assert record["executor"]["cluster_resources"]["CPU"] == 2
    # Cases ran in Ray workers, not in this process.
    import os

    pids = {json.loads(p.read_text())["pid"] for p in (ray_run / "cases").glob("*/*/case.json")}
    assert len(pids) >= 1 and os.getpid() not in pids
    import ray

    assert not ray.is_initialized()  # the local instance was shut down
