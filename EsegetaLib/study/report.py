"""`report.md`: a short, readable account of a study: what ran, what failed and why, the summary
table (median and IQR per model x method x metric) and the figures."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

from .aggregate import DIRECTIONS, case_table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(header: List[str], rows: List[List[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: Path, spec, frame, summary, figures: Dict[str, Path], study_record: Dict[str, Any]) -> Path:
    cases = case_table(frame)
    counts = cases["status"].value_counts().to_dict()
    lines = [f"# Study: {spec.name}", ""]
    if spec.description:
        lines += [spec.description, ""]
    engine = study_record.get("executor", {})
    lines += [
        f"- {len(spec.volumes)} volumes x {len(spec.models)} models x {len(spec.methods)} methods "
        f"= {len(cases)} cases: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
        f"{counts.get('pending', 0)} not run",
        f"- models: {', '.join(m.name for m in spec.models)}; methods: {', '.join(m.name for m in spec.methods)}",
        f"- target: class {spec.class_index if spec.class_index is not None else 'default'}, region {spec.region}; "
        f"study seed {spec.seed} (each case's seed is in study.csv)",
        f"- engine: {engine.get('engine', '?')}"
        + (f" at {engine['address']}" if engine.get("address") else "")
        + f"; devices: {', '.join(sorted(str(d) for d in frame['device'].dropna().unique())) or '-'}",
        f"- started {study_record.get('started')}, finished {study_record.get('finished')}",
        "- tables: [study.csv](study.csv) (also study.parquet), [summary.csv](summary.csv); "
        "provenance: [study.json](study.json) and each case's run.json", "",
    ]
    failed = cases[cases["status"] == "failed"]
    if len(failed):
        lines += ["## Failed cases", "",
                  _table(["volume", "model", "attempts", "error"],
                         [[r.volume, r.model, r.attempts, r.error] for r in failed.itertuples()]), ""]
    refused = frame[frame["status"] == "refused"]
    if len(refused):
        lines += ["## Refused methods", "",
                  "Refused on that model and volume (no map; the case's other methods ran):", "",
                  _table(["volume", "model", "method", "reason"],
                         [[r.volume, r.model, r.method, r.error] for r in refused.itertuples()]), ""]
    if len(summary):
        lines += ["## Summary", "", "Median [IQR] over volumes; n = finished volumes (+ refused ones). "
                  "Arrows: which way is better.", ""]
        metrics = [m for m in dict.fromkeys(summary["metric"]) if m != "refused"]
        header = ["model", "method", "n"] + [m + {1: " ↑", -1: " ↓"}.get(DIRECTIONS.get(m, 0), "") for m in metrics]
        rows = []
        for (model, method), group in summary.groupby(["model", "method"], sort=False):
            by_metric = {r.metric: r for r in group.itertuples()}
            done = group[group["metric"] != "refused"]
            n = str(int(done["n"].max())) if len(done) else "0"
            if "refused" in by_metric:
                n += f" (+{int(by_metric['refused'].n)} refused)"
            row = [model, method, n]
            for metric in metrics:
                r = by_metric.get(metric)
                if str(metric).startswith("check_"):  # a trust check: how many passed, warned, failed
                    row.append(str(r.note) if r is not None else "-")
                    continue
                row.append(f"{_cell(r.median)} [{_cell(r.iqr)}]" if r is not None and r.n
                           else "refused" if not len(done) else "-")
            rows.append(row)
        lines += [_table(header, rows), ""]
    titles = {"summary": "Models and methods at a glance", "distributions": "Metric distributions", "ranking": "Method ranking per metric",
              "gallery": "The same slice across methods"}
    for key, title in titles.items():
        if key in figures:
            relative = Path(figures[key]).relative_to(out).as_posix()
            lines += [f"## {title}", "", f"![{title}]({relative})", ""]
    path = Path(out) / "report.md"
    temporary = path.with_name(".report.md.tmp")
    temporary.write_text("\n".join(lines))
    temporary.replace(path)
    return path
