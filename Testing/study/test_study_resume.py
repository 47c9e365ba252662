"""A study whose driver is killed midway and one of whose cases raises: finished cases survive
untouched, `--resume` completes the rest, and the failing case is reported with its error."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from study_helpers import PICKY_SHAPE, write_picky_torchscript, write_study, write_unet_card, write_volumes

from EsegetaLib.cli import main

REPO = Path(__file__).resolve().parents[2]


def _markers(out: Path):
    return sorted(out.glob("cases/*/*/case.json"))


def test_killed_driver_and_failing_case_then_resume(tmp_path, capsys):
    write_volumes(tmp_path, [(24, 24, 24), PICKY_SHAPE])
    write_unet_card(tmp_path)
    write_picky_torchscript(tmp_path)
    study = write_study(tmp_path / "resume.yaml", [{"glob": "vol?.nii.gz"}],
                        [{"name": "unet", "path": "unet.json"}, {"name": "picky", "path": "picky.pt"}])
    out = tmp_path / "out"

    # 1. The driver is killed (SIGKILL: no cleanup at all) once two cases have finished.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    driver = subprocess.Popen([sys.executable, "-m", "EsegetaLib", "study", str(study), "--out", str(out), "--quiet"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(_markers(out)) < 2 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = {p: p.read_bytes() for p in _markers(out)}
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    assert 2 <= len(finished) < 4, driver.stderr.read().decode()[-2000:]
    for marker in finished:  # every finished case is whole
        case = marker.parent
        assert json.loads(marker.read_text())["status"] == "done"
        assert (case / "run.json").is_file() and (case / "metrics.json").is_file()
        assert len(list((case / "attributions").iterdir())) == 3
    assert not (out / "study.csv").exists()  # the killed driver never aggregated

    # 2. Resume: the finished cases are kept as they are; the rest run; the picky case fails.
    capsys.readouterr()
    assert main(["study", str(study), "--out", str(out), "--resume"]) == 1  # 1: a case failed
    captured = capsys.readouterr()
    assert f"{len(finished)} already finished, {4 - len(finished)} to run" in captured.err
    assert "case vol1/picky failed after 2 attempt(s)" in captured.err
    assert "picky model: the last axis is the longest" in captured.err
    for marker, content in finished.items():
        assert marker.read_bytes() == content and marker.stat().st_mtime_ns == stamps[marker]
    assert len(_markers(out)) == 3
    assert not list(out.glob("cases/*/.esegeta-*"))  # no partial folder left from the killed run

    frame = pd.read_csv(out / "study.csv")
    failed = frame[frame["status"] == "failed"]
    assert set(zip(failed["volume"], failed["model"])) == {("vol1", "picky")} and len(failed) == 3
    assert failed["error"].str.contains("picky model: the last axis is the longest").all()
    assert set(failed["attempts"]) == {2}  # one retry (engine.retries: 1), then recorded as failed
    assert failed[["sparseness", "complexity", "relevance_mass"]].isna().all().all()
    assert (frame[frame["status"] == "done"].groupby(["volume", "model"]).size() == 3).all()
    assert not (out / "cases" / "vol1" / "picky").exists()  # a failed case leaves no folder ...
    record = json.loads((out / "cases" / "vol1" / "picky.failed.json").read_text())  # ... but its error
    assert "picky model" in record["error"] and len(record["errors"]) == 2 and "Traceback" in record["traceback"]
    report = (out / "report.md").read_text()
    assert "## Failed cases" in report and "| vol1 | picky | 2 |" in report
    study_record = json.loads((out / "study.json").read_text())
    assert study_record["status"] == "incomplete" and study_record["counts"] == {"done": 3, "failed": 1}
    assert study_record["failed"][0]["volume"] == "vol1"

    # 3. Resuming a study with nothing left but the failure retries only that case, and again reports it.
    markers_before = {p: p.stat().st_mtime_ns for p in _markers(out)}
    assert main(["study", str(study), "--out", str(out), "--resume", "--quiet"]) == 1
    assert {p: p.stat().st_mtime_ns for p in _markers(out)} == markers_before
    assert "picky model" in capsys.readouterr().err
