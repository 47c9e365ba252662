"""run.json building blocks and the progress reporter."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from EsegetaLib import provenance
from EsegetaLib.progress import Progress


def test_file_record_checksums_and_detached_data(tmp_path):
    data = tmp_path / "vol.raw.gz"
    data.write_bytes(b"voxels" * 100)
    header = tmp_path / "vol.nhdr"
    header.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2 2\ndata file: vol.raw.gz\n")
    record = provenance.file_record(header, "volume")
    assert record["sha256"] == hashlib.sha256(header.read_bytes()).hexdigest()
    assert record["bytes"] == header.stat().st_size
    assert record["data_files"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    mhd = tmp_path / "vol.mhd"
    mhd.write_text("ObjectType = Image\nNDims = 3\nElementDataFile = vol.raw.gz\n")
    assert provenance.companion_files(mhd) == [data]


def test_jsonable_handles_numpy_paths_and_non_finite():
    value = {"a": np.float32(1.5), "b": np.arange(3), "c": (1, 2), "d": float("nan"), "e": np.int64(7),
             "p": provenance.Path("/x")}
    assert provenance.jsonable(value) == {"a": 1.5, "b": [0, 1, 2], "c": [1, 2], "d": None, "e": 7, "p": "/x"}
    json.dumps(provenance.jsonable(value), allow_nan=False)


def test_versions_and_device_name_what_matters():
    import torch

    found = provenance.versions()
    assert found["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert found["captum"] and found["python"] and found["esegeta"]
    device = provenance.device_record("cpu")
    assert device["device"] == "cpu" and device["torch_threads"] >= 1 and device["cpu"]


def test_output_records_skip_run_json(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    assert provenance.output_records(tmp_path) == [
        {"path": "sub/a.bin", "bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}]


def test_progress_lines_are_throttled_but_keep_method_changes_and_the_end():
    stream = io.StringIO()
    progress = Progress("lines", stream=stream, interval=3600)
    progress(0.0, "Saliency: patch 1/4")
    progress(0.1, "Saliency: patch 2/4")  # same method, within the interval: dropped
    progress(0.5, "IntegratedGradients: patch 1/4")
    progress(1.0, "done")
    lines = stream.getvalue().splitlines()
    assert [line.split("(")[0].strip() for line in lines] == [
        "[  0%] Saliency: patch 1/4", "[ 50%] IntegratedGradients: patch 1/4", "[100%] done"]
    assert "left" not in lines[1]  # half done after no time at all: no estimate that means nothing


def test_progress_line_estimates_time_left():
    assert Progress.line(0.25, "X", 30.0) == "[ 25%] X (elapsed 30s, about 1m30s left)"
    assert Progress.line(0.25, "X", 3.0) == "[ 25%] X (elapsed 3s)"  # too early for a mean rate
    assert Progress.line(0.01, "X", 300.0) == "[  1%] X (elapsed 5m00s)"  # too little work done
    assert Progress.line(0.25, "X", 3.0, 42.0) == "[ 25%] X (elapsed 3s, about 42s left)"


def test_a_work_plans_estimate_replaces_the_mean_rate():
    stream = io.StringIO()
    progress = Progress("lines", stream=stream, interval=0)
    progress.estimate(None)
    progress(0.5, "Occlusion: 10/80 volumes evaluated")
    progress.estimate(95.0)
    progress(0.6, "Occlusion: 20/80 volumes evaluated")
    lines = stream.getvalue().splitlines()
    assert "left" not in lines[0] and lines[1].endswith("about 1m35s left)")


def test_a_closed_progress_stream_is_dropped_not_raised():
    import os

    read, write = os.pipe()
    os.close(read)
    with open(write, "w") as stream:
        progress = Progress("lines", stream=stream, interval=0)
        progress(0.1, "Saliency: window 1/4")  # EPIPE: no exception, progress goes quiet
        progress.note("a note")
        progress.warn("a warning")
        assert progress.mode == "quiet"


def test_quiet_silences_progress_and_notes_but_not_warnings():
    stream = io.StringIO()
    progress = Progress("quiet", stream=stream)
    progress(0.5, "Saliency")
    progress.note("loading")
    progress.warn("no CUDA GPU")
    assert stream.getvalue() == "warning: no CUDA GPU\n"


def test_bar_mode_draws_a_tqdm_bar():
    stream = io.StringIO()
    with Progress("bar", stream=stream) as progress:
        progress(0.5, "Saliency: patch 2/4")
        progress.note("a note")
    text = stream.getvalue()
    assert "Saliency: patch 2/4" in text and "50%" in text and "a note" in text
