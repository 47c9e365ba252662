"""One case (a model on a volume): run it the way `esegeta explain` does, and record its state.

A case folder `cases/<volume>/<model>/` is written by `runner.execute`, which builds it in a hidden
sibling and renames it into place, so it is never half-written.  `case.json` (the completion
marker) is written after that, last, by an atomic rename; a case counts as finished only when
its marker says `done` with the same fingerprint (the same inputs and settings).  A failed case
leaves no folder, only `cases/<volume>/<model>.failed.json` with its error; `--resume` redoes it.  A method refused on the case's model (it cannot run there, or its
map misses its guarantee) does not fail the case: the others run, and the marker's `refused` names
each refused method with the reason (study.csv: status "refused").

`run_case` takes and returns plain dicts so that it runs unchanged in this process or in a Ray
worker on another machine (which then needs the same paths, e.g. a shared file system).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import EsegetaCancelled, EsegetaError

MARKER = "case.json"
FAILED_SUFFIX = ".failed.json"


def case_dir(out: Path, volume: str, model: str) -> Path:
    return Path(out) / "cases" / volume / model


def failed_file(out: Path, volume: str, model: str) -> Path:
    return Path(out) / "cases" / volume / f"{model}{FAILED_SUFFIX}"


def make_task(spec, case, out: Path) -> Dict[str, Any]:
    """Everything a worker needs to run one case, as plain values."""
    engine = spec.engine
    task = {
        "volume": case.volume.name, "model": case.model.name,
        "volume_path": case.volume.path, "mask_path": case.volume.mask, "model_path": case.model.path,
        "methods": [m.name for m in spec.methods], "params": {m.name: dict(m.params) for m in spec.methods},
        "class_index": spec.class_index,
        "region": f"roi:{case.volume.mask}" if spec.region == "roi" else spec.region,
        "metrics": spec.metrics, "seed": case.seed,
        "engine": {k: engine[k] for k in ("device", "precision", "patch_size", "overlap", "batch_size", "scene")},
    }
    if case.volume.reference:  # only when given: earlier studies keep their fingerprints
        task["reference_path"] = case.volume.reference
    for key in ("activation", "fold"):  # only when given, for the same reason
        if getattr(case.model, key, None) is not None:
            task[key] = getattr(case.model, key)
    for key in ("classes", "boundary_mm"):  # several targets / a boundary band: only when given
        if getattr(spec, key, None) is not None:
            task[key] = getattr(spec, key)
    if spec.metric_params:
        task["metric_params"] = spec.metric_params
    if engine.get("stability") is not None:  # only when given (fingerprints of earlier studies)
        task["stability"] = str(engine["stability"])
    task["fingerprint"] = fingerprint(task)
    task["retries"] = int(engine["retries"])
    task["out"] = str(Path(out).resolve())
    return task


def fingerprint(task: Dict[str, Any]) -> str:
    """Hash of what determines a case's result (inputs and settings, not retries or where it runs)."""
    text = json.dumps(task, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_marker(out: Path, volume: str, model: str) -> Optional[Dict[str, Any]]:
    path = case_dir(out, volume, model) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(out: Path, task: Dict[str, Any]) -> bool:
    marker = read_marker(out, task["volume"], task["model"])
    return bool(marker and marker.get("status") == "done" and marker.get("fingerprint") == task["fingerprint"])


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: readers see all or nothing."""
    from ..provenance import jsonable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(jsonable(data), stream, indent=2, allow_nan=False)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _clear_leftovers(folder: Path) -> None:
    """Hidden partial folders of an earlier attempt that was killed (SIGKILL skips cleanup)."""
    from ..outputs import leftovers

    for path in leftovers(folder):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


def _request(task: Dict[str, Any]):
    from ..runner import ExplainRequest

    engine = task["engine"]
    return ExplainRequest(volume=task["volume_path"], model=task["model_path"], methods=list(task["methods"]),
                          params={k: dict(v) for k, v in task["params"].items() if v},
                          class_index=task["class_index"], region=task["region"], device=engine["device"],
                          precision=engine["precision"], patch_size=engine["patch_size"],
                          overlap=float(engine["overlap"]), batch_size=engine["batch_size"],
                          metrics=task["metrics"], seed=int(task["seed"]), scene=bool(engine["scene"]),
                          reference_mask=task.get("reference_path"), activation=task.get("activation"),
                          fold=task.get("fold"), metric_params=task.get("metric_params") or {},
                          classes=task.get("classes"), boundary_mm=task.get("boundary_mm"),
                          stability=task.get("stability"), on_refusal="record")


def _first_line(exc: BaseException) -> str:
    """The error in one line. TorchScript puts the real message last, after its own tracebacks."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(exc):
        text = lines[-1]
    else:
        text = " ".join(lines)
    text = text[:400]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_case(task: Dict[str, Any]) -> Dict[str, Any]:
    """Run one case with up to `retries` extra attempts after an unexpected error (bad input, an
    `EsegetaError`, fails the same way every time and is not retried).  Returns the case record;
    never raises for a failed case (it is recorded), only for cancellation."""
    from ..runner import execute, prepare

    out = Path(task["out"])
    folder = case_dir(out, task["volume"], task["model"])
    failed = failed_file(out, task["volume"], task["model"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(folder)
    started, attempts, errors = time.time(), 0, []
    record: Dict[str, Any] = {"volume": task["volume"], "model": task["model"], "seed": task["seed"],
                              "fingerprint": task["fingerprint"], "host": os.uname().nodename, "pid": os.getpid()}
    while True:
        attempts += 1
        try:
            prepared = prepare(_request(task))
            if folder.exists() and not (folder / "run.json").is_file():
                shutil.rmtree(folder)  # not a result (runner.execute would refuse to replace it)
            execute(prepared, folder, overwrite=True, command="study", argv=None)
            break
        except (KeyboardInterrupt, EsegetaCancelled):
            raise
        except EsegetaError as exc:  # the user's input: the same every time
            errors.append(_first_line(exc))
            return _record_failure(failed, record, attempts, errors, started, retried=False)
        except Exception as exc:  # noqa: BLE001 - recorded with its traceback, retried a bounded number of times
            errors.append(_first_line(exc))
            record["traceback"] = traceback.format_exc(limit=8)
            if attempts > int(task.get("retries", 0)):
                return _record_failure(failed, record, attempts, errors, started, retried=True)
    record.pop("traceback", None)
    run = json.loads((folder / "run.json").read_text())
    record.update({"status": "done", "attempts": attempts, "errors": errors,
                   "seconds": time.time() - started, "device": run.get("engine", {}).get("device"),
                   "warnings": prepared.warnings, "refused": dict(prepared.refused), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_json_atomic(folder / MARKER, record)  # last: the case is finished from now on
    if failed.exists():
        failed.unlink()
    return record


def _record_failure(failed: Path, record, attempts, errors, started, retried: bool) -> Dict[str, Any]:
    record.update({"status": "failed", "attempts": attempts, "errors": errors, "error": errors[-1],
                   "retried": retried, "seconds": time.time() - started,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_json_atomic(failed, record)
    return record


def lost_case(task: Dict[str, Any], error: str) -> Dict[str, Any]:
    """Record a case whose worker was lost (after Ray's own retries) as failed with the error."""
    record = {"volume": task["volume"], "model": task["model"], "seed": task["seed"],
              "fingerprint": task["fingerprint"], "status": "failed", "attempts": None,
              "errors": [error], "error": error, "retried": True, "seconds": None,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(failed_file(Path(task["out"]), task["volume"], task["model"]), record)
    return record


def case_state(out: Path, task: Dict[str, Any]) -> Dict[str, Any]:
    """What is on disk for a case: done (its marker), failed (its error) or pending."""
    if is_finished(out, task):
        return read_marker(out, task["volume"], task["model"])
    path = failed_file(out, task["volume"], task["model"])
    try:
        record = json.loads(path.read_text())
        if record.get("fingerprint") == task["fingerprint"]:
            return record
    except (OSError, ValueError):
        pass
    return {"volume": task["volume"], "model": task["model"], "seed": task["seed"], "status": "pending"}
