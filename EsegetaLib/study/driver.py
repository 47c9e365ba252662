"""Run a study: validate, plan the cases, run those not finished, then aggregate into tables,
figures and a report.  The command `esegeta study` and Python callers both use `run_study`."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from ..errors import EsegetaError
from .cases import is_finished, make_task, write_json_atomic
from .executors import ENGINES, run_local, run_ray
from .spec import StudySpec, load_study

STUDY_RECORD = "study.json"


@dataclass
class StudyOutcome:
    out: Path
    counts: Dict[str, int]
    failed: List[Dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0

    @property
    def exit_status(self) -> int:
        """0 when every case finished; 1 when any failed (the tables and report are written anyway)."""
        return 1 if self.counts.get("failed") or self.counts.get("pending") else 0


def check_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EsegetaError(f"Output '{out}' exists and is not a folder; choose another --out.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / STUDY_RECORD).is_file():
            raise EsegetaError(f"Output folder '{out}' is not empty and holds no study ({STUDY_RECORD}); "
                               "choose another --out.")
        if not resume:
            raise EsegetaError(f"Output folder '{out}' holds an earlier study; add --resume to finish it "
                               "(finished cases are kept) or choose another --out.")


def _versions(engine: str) -> Dict[str, Any]:
    from importlib import metadata

    from ..provenance import versions

    found = versions()
    for package in ("pandas", "pyarrow", "matplotlib", "ray", "pyyaml"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def run_study(study: Union[str, Path, StudySpec], out: Union[str, Path], engine: str = "local",
              address: Optional[str] = None, resume: bool = False, quiet: bool = False,
              argv: Optional[List[str]] = None, note: Optional[Callable[[str], None]] = None) -> StudyOutcome:
    """Validate everything first (a bad study file or output folder costs nothing), then run."""
    from ..provenance import sha256_file, utc_now

    note = note or ((lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True)))
    if engine not in ENGINES:
        raise EsegetaError(f"--engine must be one of {', '.join(ENGINES)}; got {engine!r}.")
    if address and engine != "ray":
        raise EsegetaError("--address names a Ray cluster; add --engine ray.")
    spec = study if isinstance(study, StudySpec) else load_study(study)
    out = Path(out).absolute()
    check_out_dir(out, resume)
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise EsegetaError("--engine ray needs Ray: pip install 'ray>=2.9' (or use --engine local).") from None
    out.mkdir(parents=True, exist_ok=True)
    tasks = [make_task(spec, case, out) for case in spec.cases]
    todo = [task for task in tasks if not (resume and is_finished(out, task))]
    skipped = len(tasks) - len(todo)
    record: Dict[str, Any] = {
        "schema": "esegeta-study/1", "study_file": spec.file, "study_sha256": sha256_file(Path(spec.file)),
        "argv": argv, "engine": engine, "address": address, "resume": resume, "started": utc_now(),
        "finished": None, "status": "running", "versions": _versions(engine), "study": spec.resolved(),
    }
    write_json_atomic(out / STUDY_RECORD, record)
    note(f"esegeta study '{spec.name}': {len(tasks)} cases ({len(spec.volumes)} volumes x {len(spec.models)} models),"
         f" {len(spec.methods)} methods each; {skipped} already finished, {len(todo)} to run on {engine}")

    counts = {"done": skipped, "failed": 0}
    failures: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = _progress_bar(len(tasks), skipped, quiet)

    def on_result(result: Dict[str, Any]) -> None:
        counts["done" if result["status"] == "done" else "failed"] += 1
        if result["status"] != "done":
            failures.append(result)
            bar.write(f"case {result['volume']}/{result['model']} failed after {result.get('attempts')} "
                      f"attempt(s): {result.get('error')}", file=sys.stderr)
        bar.set_postfix_str(f"done {counts['done']}, failed {counts['failed']}", refresh=False)
        bar.update(1)

    try:
        if engine == "local":
            executor = run_local(todo, on_result)
        else:
            executor = run_ray(todo, on_result, address=address, engine=spec.engine,
                               note=(lambda text: None) if quiet else (lambda text: bar.write(text, file=sys.stderr)))
    finally:
        bar.close()
    record["executor"] = executor
    outcome = aggregate(spec, out, tasks, record)
    outcome.skipped, outcome.seconds = skipped, time.perf_counter() - t0
    note(f"{outcome.counts.get('done', 0)} cases done, {outcome.counts.get('failed', 0)} failed in "
         f"{outcome.seconds:.0f} s; report: {out / 'report.md'}")
    return outcome


def _progress_bar(total: int, initial: int, quiet: bool):
    """Overall progress: cases finished (done or failed) of all, with the time left."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="case", desc="study", disable=quiet, file=sys.stderr,
                dynamic_ncols=True, postfix=f"done {initial}, failed 0", mininterval=0)


def aggregate(spec: StudySpec, out: Path, tasks: List[Dict[str, Any]], record: Dict[str, Any]) -> StudyOutcome:
    """Tables, figures, report and the final study.json, from what is on disk."""
    from ..provenance import utc_now
    from .aggregate import case_table, study_table, summary_table, write_tables
    from .figures import write_figures
    from .report import write_report

    frame = study_table(out, tasks, [m.name for m in spec.methods])
    summary = summary_table(frame)
    tables = write_tables(out, frame, summary)
    figures = write_figures(out, frame, spec, int(spec.engine["gallery_cases"]))
    cases = case_table(frame)
    counts = {k: int(v) for k, v in cases["status"].value_counts().items()}
    failed = [{"volume": r.volume, "model": r.model, "error": r.error, "attempts": r.attempts}
              for r in cases[cases["status"] == "failed"].itertuples()]
    refused = frame[frame["status"] == "refused"]
    if len(refused):  # methods refused on a model (their cases are done)
        record["refused"] = [{"volume": r.volume, "model": r.model, "method": r.method, "reason": r.error}
                             for r in refused.itertuples()]
    record.update({"finished": utc_now(), "status": "complete" if counts.get("done", 0) == len(tasks) else "incomplete",
                   "counts": counts, "failed": failed,
                   "outputs": {k: Path(v).relative_to(out).as_posix() for k, v in {**tables, **figures}.items()}})
    report = write_report(out, spec, frame, summary, figures, record)
    record["outputs"]["report"] = report.relative_to(out).as_posix()
    write_json_atomic(out / STUDY_RECORD, record)
    return StudyOutcome(out=out, counts=counts, failed=failed)
