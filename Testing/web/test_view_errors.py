"""`esegeta view` refuses a missing or damaged result with one line, before any server starts."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess

import pytest

from web_browser import REPO, viewer_command, viewer_env
from web_fixtures import write_result


def run_view(*args, cli=False, timeout=240):
    done = subprocess.run(viewer_command(*args, cli=cli), cwd=REPO, env=viewer_env(), text=True,
                          capture_output=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(rc, stdout, stderr, *fragments):
    assert rc == 2, (rc, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("esegeta: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "http://" not in stdout  # no server was started


@pytest.fixture
def result(tmp_path):
    return write_result(tmp_path / "result", with_plot=False)


def test_missing_result(tmp_path):
    """Through the real `esegeta` command line (the others use the same handler directly)."""
    assert_one_line_error(*run_view(str(tmp_path / "nowhere"), cli=True), "does not exist")


def test_directory_that_is_not_a_result(tmp_path):
    assert_one_line_error(*run_view(str(tmp_path)), "no run.json")


def test_damaged_run_json(result):
    (result / "run.json").write_text('{"inputs": [')
    assert_one_line_error(*run_view(str(result)), "run.json", "damaged")


def test_result_without_maps(result):
    shutil.rmtree(result / "attributions")
    assert_one_line_error(*run_view(str(result)), "no attribution maps")


def test_input_volume_moved_away(result):
    volume = json.loads((result / "run.json").read_text())["inputs"][0]["path"]
    shutil.move(volume, volume + ".moved")
    assert_one_line_error(*run_view(str(result)), "input volume", "is missing")


def test_file_that_is_not_a_scene(result):
    assert_one_line_error(*run_view(str(result / "metrics.csv")), "not an .mrb")


def test_damaged_mrb(tmp_path):
    bundle = tmp_path / "esegeta.mrb"
    bundle.write_bytes(b"PK\x03\x04 this is not a zip archive")
    assert_one_line_error(*run_view(str(bundle)), "not a readable .mrb")


def test_bad_port(result):
    assert_one_line_error(*run_view(str(result), "--port", "70000"), "--port")


def test_port_in_use(result):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(*run_view(str(result), "--port", str(port)), f"port {port}", "in use")


def test_damaged_map_is_reported_before_serving(result):
    with gzip.open(result / "attributions" / "Saliency.nii.gz", "wb") as handle:
        handle.write(b"not a NIfTI header" * 40)
    assert_one_line_error(*run_view(str(result)), "Saliency.nii.gz", "Cannot read")


def test_public_host_warns_about_no_authentication(result):
    import socket

    with socket.socket() as taken:  # so that no server starts here
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, stdout, stderr = run_view(str(result), "--host", "0.0.0.0", "--port", str(port))
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 2, stderr
    assert "no authentication" in lines[0] and "0.0.0.0" in lines[0]
    assert lines[1].startswith("esegeta: error: Cannot listen on port")
