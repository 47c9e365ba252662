"""Metrics through the real engine: patched score F on a volume larger than one window, methods
rerun by the session, device/precision/batching/cancel, the files written, the metric names."""
from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import metric_helpers as helpers
from metric_fixtures import small_case, trained_case  # noqa: F401  (fixtures)
from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaCancelled, EsegetaError
from EsegetaLib.methods.baselines import make_baseline
from EsegetaLib.metrics import DEFAULT_METRICS, METRICS, evaluate, parse_metrics
from EsegetaLib.options import EngineOptions, Target

SMALL = {"infidelity": {"n_samples": 4}, "sensitivity": {"n_samples": 2}, "deletion": {"n_steps": 6, "block": 4},
         "insertion": {"n_steps": 6, "block": 4}, "randomisation": {"max_stages": 2}}


@pytest.fixture(scope="module")
def session_run(trained_case):
    vol, _ = helpers.tube_volume(24, n_tubes=3, seed=11)  # 8 windows of 16^3
    options = EngineOptions(device="cpu", patch_size=16, overlap=0.25, batch_size=4, divisor=4)
    session = ExplainSession(vol, trained_case["net"], Target(class_index=1, region="predicted"), options)
    results = {m: session.attribute(m, p) for m, p in (("InputXGradient", None),
                                                        ("IntegratedGradients", {"n_steps": 8}))}
    return session, results


def test_metrics_run_patch_wise_through_the_session(session_run, tmp_path):
    session, results = session_run
    assert len(session.windows) > 1 and session.region.any()
    report = evaluate(session, results, metrics="all", params=SMALL)
    assert [r["method"] for r in report.rows] == list(results)
    for row in report.rows:
        for name in ("infidelity", "infidelity_se", "sensitivity_max", "sensitivity_avg", "deletion_auc",
                     "insertion_auc", "relevance_mass", "relevance_rank", "sparseness", "complexity",
                     "randomisation_spearman", "randomisation_ssim"):
            assert np.isfinite(row[name]), (row["method"], name)
        assert isinstance(row["randomisation_pass"], bool)
        for metric in METRICS:
            assert row[f"{metric}_s"] >= 0 and f"{metric}_peak_mb" in row
        assert row["attribution_s"] == results[row["method"]].seconds
    # The curves are scores of the patched model F: their ends are F(x) and F(engine baseline).
    curve = report.curves["IntegratedGradients"]["deletion"]
    x = session.volume
    baseline = make_baseline(x[None], session.stats, {"baseline": "blur"})[0]
    assert curve["score"][0] == pytest.approx(float(session.score(x[None])[0]), rel=1e-9)
    assert curve["score"][-1] == pytest.approx(float(session.score(baseline[None])[0]), rel=1e-9)
    # The explained region is the default reference; a user mask replaces it.
    r = {row["method"]: row for row in report.rows}
    mask = np.zeros(session.region.shape, bool)
    mask[:16] = True
    user = evaluate(session, results, metrics="relevance_mass", reference_mask=mask)
    a = np.clip(results["InputXGradient"].map, 0, None)
    assert user.rows[0]["relevance_mass"] == pytest.approx(a[:16].sum() / a.sum(), rel=1e-6)
    assert r["InputXGradient"]["relevance_mass"] == pytest.approx(a[session.region].sum() / a.sum(), rel=1e-6)
    # Files: read back what was written.
    paths = report.write(tmp_path)
    with open(paths["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert [t["method"] for t in table] == list(results)
    assert float(table[1]["deletion_auc"]) == pytest.approx(report.rows[1]["deletion_auc"], rel=1e-12)
    data = json.loads(paths["json"].read_text())
    assert data["rows"][0]["infidelity"] == pytest.approx(report.rows[0]["infidelity"], rel=1e-12)
    assert len(data["randomisation_stages"]["InputXGradient"]) == 2
    curves = json.loads(paths["curves"].read_text())
    assert curves["InputXGradient"]["insertion"]["normalised"][-1] == pytest.approx(1.0)
    assert paths["png"].stat().st_size > 10_000


def test_batching_device_and_precision(session_run, trained_case):
    session, results = session_run
    sizes = []
    original = session.score

    def recording(batch):
        sizes.append(batch.shape[0])
        return original(batch)

    try:
        session.score = recording
        one = evaluate(session, results, metrics="infidelity,deletion", params=SMALL, batch_size=1)
        assert set(sizes) == {1}
        sizes.clear()
        three = evaluate(session, results, metrics="infidelity,deletion", params=SMALL, batch_size=3)
        assert max(sizes) == 3
    finally:
        del session.score
    for a, b in zip(one.rows, three.rows):  # same draws whatever the batching; float32 convolutions
        # sum in a batch-dependent order (~1e-7 relative per score), hence 1e-5
        assert a["infidelity"] == pytest.approx(b["infidelity"], rel=1e-5)
        assert a["deletion_auc"] == pytest.approx(b["deletion_auc"], rel=1e-5)
    assert one.settings["device"] == str(session.device)
    # bf16 autocast: the same metrics, computed in the session's precision, stay close to fp32.
    vol = session.volume.numpy()
    low = ExplainSession(vol, trained_case["net"], Target(class_index=1), EngineOptions(
        device="cpu", precision="bf16", patch_size=16, overlap=0.25, batch_size=4, divisor=4))
    bf = evaluate(low, results, metrics="deletion,relevance_mass", params=SMALL)
    assert bf.settings["precision"] == "bf16"
    assert bf.rows[1]["deletion_auc"] == pytest.approx(one.rows[1]["deletion_auc"], abs=0.1)


def test_cancel_between_batches(session_run):
    session, results = session_run
    event = threading.Event()
    event.set()
    with pytest.raises(EsegetaCancelled):
        evaluate(session, results, metrics="sparseness", cancel=event)
    calls = []
    original = session.score

    def counting(batch):
        calls.append(1)
        return original(batch)

    try:
        session.score = counting
        with pytest.raises(EsegetaCancelled):  # set after the second score batch: stops at the third
            evaluate(session, results, metrics="deletion", params=SMALL, batch_size=1,
                     cancel=lambda: len(calls) >= 2)
        assert len(calls) == 2
    finally:
        del session.score


def test_metric_names_and_parameters():
    assert parse_metrics(None) == list(DEFAULT_METRICS)
    assert parse_metrics("all") == list(METRICS)
    assert parse_metrics("none") == [] and parse_metrics([]) == []
    assert parse_metrics("Deletion, sparseness") == ["deletion", "sparseness"]
    with pytest.raises(EsegetaError, match="Did you mean 'infidelity'"):
        parse_metrics("infidelty")
    with pytest.raises(EsegetaError, match="cannot be combined"):
        parse_metrics("all,deletion")
    from EsegetaLib.metrics import resolve_params
    with pytest.raises(EsegetaError, match="no parameter 'samples'"):
        resolve_params({"infidelity": {"samples": 3}})
    with pytest.raises(EsegetaError, match="n_samples >= 2"):
        resolve_params({"sensitivity": {"n_samples": 1}})
    assert resolve_params(None)["infidelity"]["n_samples"] >= 10
    assert resolve_params(None)["sensitivity"]["n_samples"] >= 10


def test_meter_measures_time_and_peak_memory():
    """In a fresh process: inside a long test run, a 64 MiB block can reuse pages the process already
    holds, and then the resident peak (what the meter reports on CPU) rightly does not grow."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from EsegetaLib.metrics.context import Meter\n"
        "meter = Meter(torch.device('cpu'))\n"
        "with meter.measure():\n"
        "    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
        "    block += 1\n"
        "    del block\n"
        "print(meter.seconds, meter.peak_mb)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    seconds, peak_mb = (float(v) for v in out.stdout.split()[-2:])
    assert seconds > 0
    if np.isfinite(peak_mb):  # Linux /proc available
        assert peak_mb >= 48


def test_user_mistakes_are_one_line_errors(small_case):
    from EsegetaLib.metrics import evaluate_maps

    x = small_case["x"]
    with pytest.raises(EsegetaError, match="does not match the input"):
        evaluate_maps(x, {"bad": np.zeros((2, 3, 4))}, helpers.score_fn_of(small_case["score"]), metrics="sparseness")
    with pytest.raises(EsegetaError, match="no intensity spread"):
        evaluate_maps(torch.ones_like(x), {"m": x}, helpers.score_fn_of(small_case["score"]), metrics="sparseness")
    with pytest.raises(EsegetaError, match="reference mask"):
        evaluate_maps(x, {"m": x}, helpers.score_fn_of(small_case["score"]), metrics="relevance_mass")
