"""Quantitative evaluation of explanations (issue 5): faithfulness, robustness, localisation,
complexity and the randomisation sanity check, one row per method.

    from EsegetaLib.metrics import evaluate
    report = evaluate(session, explanation.results, metrics="all")
    report.write("out/")   # metrics.csv, metrics.json, curves.json, deletion_insertion.png

Metrics depend only on a score function and an explain function (see context.py); `evaluate`
adapts an `ExplainSession`, `evaluate_maps` takes plain callables. Column meanings:
docs/readme/metrics.md.
"""
from .evaluate import (DEFAULT_METRICS, METRIC_PARAMS, METRICS, evaluate, evaluate_maps, parse_metrics,
                       resolve_params)
from .report import MetricsReport

__all__ = ["DEFAULT_METRICS", "METRICS", "METRIC_PARAMS", "MetricsReport", "evaluate", "evaluate_maps",
           "parse_metrics", "resolve_params"]
