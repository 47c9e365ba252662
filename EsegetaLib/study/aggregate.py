"""Collect every case's tables into the study's: `study.csv`/`study.parquet` (one row per volume x
model x method) and `summary.csv` (per model x method x metric: n, mean, median, quartiles, IQR).

Row status: "done" (the method's map and metrics), "refused" (the method was refused on that
model and volume; `error` says why; the case's other methods are "done"), "failed" or "pending"
(the whole case).  summary.csv gives each refused model x method one row with metric "refused",
n = the volumes it was refused on and the reason in `note`.

Everything is read back from the case folders on disk, not from the driver's memory, so a resumed
study, or one whose cases ran on other machines, aggregates the same way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .cases import case_dir, case_state

ID_COLUMNS = ["volume", "model", "method", "status"]
CASE_COLUMNS = ["attribution_s", "device", "case_seconds", "attempts", "seed", "error"]
# +1: higher is better, -1: lower is better (see docs/readme/study.md); drives the ranking.
DIRECTIONS: Dict[str, int] = {
    "infidelity": -1, "infidelity_rel": -1, "sensitivity_max": -1, "sensitivity_avg": -1,
    "deletion_auc": -1, "insertion_auc": +1, "relevance_mass": +1, "relevance_rank": +1,
    "sparseness": +1, "complexity": -1, "complexity_rel": -1,
    "randomisation_spearman": -1, "randomisation_spearman_signed": -1, "randomisation_ssim": -1,
    "randomisation_pass": +1, "convergence_delta": -1,
    "vxap": +1, "pointing_game": +1, "topology_auc": -1,
    # Where the relevance goes (Agg2Exp-style shares): more in the reference mask is better; the
    # others describe a map rather than rank it (0: no direction, still in summary.csv).
    "share_reference": +1, "share_segmentation": 0, "share_boundary": 0, "share_elsewhere": -1,
}
SHARES = ("share_segmentation", "share_boundary", "share_reference", "share_elsewhere")


def _case_rows(out: Path, task: Dict[str, Any], methods: List[str]) -> List[Dict[str, Any]]:
    state = case_state(out, task)
    base = {"volume": task["volume"], "model": task["model"], "status": state["status"], "seed": task["seed"],
            "case_seconds": state.get("seconds"), "attempts": state.get("attempts"),
            "error": state.get("error") or ""}
    if state["status"] != "done":
        return [dict(base, method=method, device=None) for method in methods]
    tables = json.loads((case_dir(out, task["volume"], task["model"]) / "metrics.json").read_text())
    rows = []
    for row in tables["rows"]:
        merged = dict(base)
        merged.update({k: v for k, v in row.items()})
        merged["device"] = row.get("device") or state.get("device")
        rows.append(merged)
    refused = state.get("refused") or {}
    rows += [dict(base, method=method, status="refused", error=reason, device=None)
             for method, reason in refused.items()]
    order = {method: n for n, method in enumerate(methods)}  # study order (several targets: "<target>/<m>")
    rows.sort(key=lambda r: order.get(str(r["method"]).rpartition("/")[2], len(order)))
    return rows


def case_table(frame):
    """One row per case (volume x model) with the case's status: done (refused methods included),
    failed or pending."""
    cases = frame.drop_duplicates(["volume", "model"]).copy()
    cases["status"] = cases["status"].replace("refused", "done")
    return cases


def study_table(out: Path, tasks: List[Dict[str, Any]], methods: List[str]):
    """A pandas DataFrame: one row per volume x model x method, in study order."""
    import pandas as pd

    rows = [row for task in tasks for row in _case_rows(Path(out), task, methods)]
    frame = pd.DataFrame(rows)
    metric_cols = [c for c in frame.columns if c not in ID_COLUMNS + CASE_COLUMNS
                   and not c.endswith("_s") and not c.endswith("_peak_mb")]
    numeric = [c for c in metric_cols if not c.endswith("_note")]  # <metric>_note: why it is NaN
    timing_cols = sorted(c for c in frame.columns if c not in ID_COLUMNS + CASE_COLUMNS + metric_cols)
    ordered = ID_COLUMNS + metric_cols + [c for c in CASE_COLUMNS if c in frame.columns] + timing_cols
    frame = frame[ordered]
    for column in numeric + ["attribution_s", "case_seconds"]:
        if column in frame.columns:
            frame[column] = _numeric_if_lossless(frame[column])
    return frame


def _numeric_if_lossless(column):
    """The column as numbers when every value is one (or missing); otherwise unchanged, so that text
    columns (the trust report: `trust`, `check_<name>` = pass|warn|fail|not_run, a target's name)
    keep their values instead of being coerced to NaN."""
    import pandas as pd

    converted = pd.to_numeric(column, errors="coerce")
    text = column.astype(str).str.strip().str.lower()
    present = column.notna() & ~text.isin(["", "nan", "none"])
    return converted if not (present & converted.isna()).any() else column


def metric_columns(frame) -> List[str]:
    """The evaluation metrics present (not timings, standard errors or bookkeeping)."""
    return [c for c in frame.columns if c in DIRECTIONS and frame[c].notna().any()]


def note_column(metric: str, columns) -> Optional[str]:
    """The column saying why `metric` is NaN where it is (metrics write `<metric>_note`; the
    relevance shares and the randomisation columns share one note per metric)."""
    for name in (f"{metric}_note", "relevance_shares_note" if metric.startswith("share_") else "",
                 f"{metric.split('_')[0]}_note"):
        if name and name in columns:
            return name
    return None


def summary_table(frame):
    """Per model x method x metric over the finished volumes: n, mean, median, q1, q3, IQR."""
    import pandas as pd

    done = frame[frame["status"] == "done"]
    rows = []
    for column in metric_columns(frame) + ["attribution_s"]:
        if column not in done.columns:
            continue
        notes = note_column(column, done.columns)
        for (model, method), group in done.groupby(["model", "method"], sort=False):
            values = group[column].dropna().to_numpy(dtype=float)
            note = "" if notes is None else " | ".join(dict.fromkeys(
                str(v) for v in group.loc[group[column].isna(), notes].dropna() if str(v)))
            if not values.size:  # a metric that does not apply (IG's convergence delta for Saliency)
                if note:  # or one that could not be computed: say why
                    rows.append({"model": model, "method": method, "metric": column, "n": 0, "mean": np.nan,
                                 "median": np.nan, "q1": np.nan, "q3": np.nan, "iqr": np.nan, "note": note})
                continue
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            rows.append({"model": model, "method": method, "metric": column, "n": int(values.size),
                         "mean": float(values.mean()), "median": float(median), "q1": float(q1),
                         "q3": float(q3), "iqr": float(q3 - q1), "note": note})
    rows += _trust_rows(done)
    refused = frame[frame["status"] == "refused"]
    for (model, method), group in refused.groupby(["model", "method"], sort=False):
        reasons = list(dict.fromkeys(str(e) for e in group["error"]))
        rows.append({"model": model, "method": method, "metric": "refused", "n": int(len(group)),
                     "mean": np.nan, "median": np.nan, "q1": np.nan, "q3": np.nan, "iqr": np.nan,
                     "note": " | ".join(reasons)})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _trust_rows(done) -> List[Dict[str, Any]]:
    """Per model x method x trust check (`check_<name>`): n = volumes the check ran on, mean = the
    share that passed, note = the count of each status (e.g. "warn 1, pass 2"), so a warn or a fail
    shows in summary.csv and not only in study.csv."""
    rows = []
    checks = [c for c in done.columns if c.startswith("check_") and not c.endswith("_value")]
    for column in checks:
        for (model, method), group in done.groupby(["model", "method"], sort=False):
            statuses = [str(v) for v in group[column].dropna() if str(v) not in ("", "nan")]
            if not statuses:
                continue
            counts = {s: statuses.count(s) for s in ("fail", "warn", "pass", "not_run") if s in statuses}
            ran = [s for s in statuses if s != "not_run"]
            rows.append({"model": model, "method": method, "metric": column, "n": len(ran),
                         "mean": (ran.count("pass") / len(ran)) if ran else np.nan, "median": np.nan,
                         "q1": np.nan, "q3": np.nan, "iqr": np.nan,
                         "note": ", ".join(f"{s} {n}" for s, n in counts.items())})
    return rows


SUMMARY_COLUMNS = ["model", "method", "metric", "n", "mean", "median", "q1", "q3", "iqr", "note"]


def write_tables(out: Path, frame, summary) -> Dict[str, Path]:
    """study.csv, study.parquet and summary.csv, each replaced atomically."""
    out = Path(out)
    paths = {"csv": out / "study.csv", "parquet": out / "study.parquet", "summary": out / "summary.csv"}
    _atomic(paths["csv"], lambda p: frame.to_csv(p, index=False))
    _atomic(paths["parquet"], lambda p: frame.to_parquet(p, index=False))
    _atomic(paths["summary"], lambda p: summary.to_csv(p, index=False))
    return paths


def _atomic(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    temporary.replace(path)
