"""`esegeta study`: models x methods x volumes, on this machine or a Ray cluster (issue 8).

    from EsegetaLib.study import run_study
    outcome = run_study("study.yaml", "out/", engine="local")   # or engine="ray", address=...

Modules: `spec` (the YAML study file, validated all at once), `cases` (one case = one model on one
volume, run as `esegeta explain` runs, with a completion marker), `executors` (local, Ray),
`aggregate` (study.csv/parquet, summary.csv), `figures`, `report`, `driver` (all of it in order).
User documentation: docs/readme/study.md.
"""
from .driver import StudyOutcome, run_study
from .spec import StudyIssue, StudySpec, StudySpecError, load_study

__all__ = ["StudyIssue", "StudyOutcome", "StudySpec", "StudySpecError", "load_study", "run_study"]
