"""`esegeta methods`, `esegeta --help`, subcommand discovery, and `esegeta demo`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from EsegetaLib.cli import build_parser, command_modules, main
from EsegetaLib.methods import all_methods

from helpers import REPO


def test_methods_json_lists_every_registered_method(capsys):
    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    specs = all_methods()
    assert [m["name"] for m in listed] == [s.name for s in specs]
    for meta, spec in zip(listed, specs):
        assert meta["family"] == spec.family and meta["signed"] == spec.signed
        assert meta["needs_baseline"] == spec.needs_baseline
        assert {p["name"]: p["default"] for p in meta["params"]} == json.loads(json.dumps(spec.defaults()))


def test_methods_table_has_a_row_per_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["method", "family", "signed", "baseline"]
    rows = {line.split()[0]: line.split() for line in out[1:] if line.strip() and not line.startswith(" ")}
    for spec in all_methods():
        assert rows[spec.name][1] == spec.family
        assert rows[spec.name][2] == ("signed" if spec.signed else "unsigned")
    ig = next(line for line in out if line.startswith("IntegratedGradients "))
    assert "n_steps=" in ig and "baseline=" in ig
    # parameters whose default means "chosen from the volume or model" say so, not 0.0 or -
    assert "blur_sigma_mm=auto" in ig and "blur_sigma_mm=0.0" not in ig
    occlusion = next(line for line in out if line.startswith("Occlusion "))
    assert "window_mm=auto" in occlusion and "margin_mm=auto" in occlusion
    assert "layer=auto" in next(line for line in out if line.startswith("GradCAM "))
    assert not any("=0.0," in line or line.endswith("=0.0") for line in out)


def test_subcommands_are_discovered_from_their_modules():
    names = command_modules()
    assert {"explain", "methods", "demo"} <= set(names)
    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(names) <= set(choices)


def test_help_lists_the_commands_and_exits_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("explain", "methods", "demo"))
    assert main(["--version"]) == 0


@pytest.mark.parametrize("name", ["explain", "methods", "demo"])
def test_registering_a_command_does_not_import_torch(name):
    """`add_parser` stays cheap so `esegeta --help` is instant (torch loads in `run`)."""
    code = ("import argparse, sys; from EsegetaLib.commands import {0} as m; "
            "m.add_parser(argparse.ArgumentParser().add_subparsers(), argparse.ArgumentParser(add_help=False)); "
            "print('torch' in sys.modules)").format(name)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_demo_runs_on_the_bundled_sample_and_model(tmp_path):
    """The first experience: the bundled sample and model, one cheap method, and how to open it."""
    from EsegetaLib.sample import resource_path
    from EsegetaLib.models import DEFAULT_CARD
    from EsegetaLib.io import read_image

    if not resource_path(DEFAULT_CARD).is_file():
        pytest.skip(f"the bundled default model {resource_path(DEFAULT_CARD)} is not in this checkout yet")
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "EsegetaLib", "demo", "--out", str(out), "--methods", "Saliency",
                             "--no-scene", "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"Results written to {out}" in result.stdout and "Slicer" in result.stdout
    assert f"esegeta view {out}" in result.stdout
    sample = read_image(resource_path("sample_tof.nii.gz"))
    saliency = read_image(out / "attributions" / "Saliency.nii.gz")
    assert saliency.array.shape == sample.array.shape
    assert (abs(saliency.ijk_to_ras - sample.ijk_to_ras) < 1e-6).all()
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "demo" and run["parameters"]["class_name"]
    segmentation = read_image(out / "segmentation.nii.gz").array
    assert segmentation.any()  # the bundled model finds vessels in the bundled sample
    # the demo's metrics include the faithfulness curves the README shows
    curves = json.loads((out / "curves.json").read_text())
    for mode in ("deletion", "insertion"):
        assert len(curves["Saliency"][mode]["score"]) > 2
    assert (out / "deletion_insertion.png").stat().st_size > 10_000


def test_the_demo_writes_into_an_ignored_folder_and_replaces_only_its_own_result(tmp_path):
    from EsegetaLib.commands.demo import DEFAULT_OUT, _earlier_demo

    ignored = subprocess.run(["git", "check-ignore", "-q", DEFAULT_OUT + "/"], cwd=REPO)
    assert ignored.returncode == 0, f"{DEFAULT_OUT}/ is not ignored by git in the checkout"
    run_json = tmp_path / "run.json"
    assert not _earlier_demo(run_json)
    run_json.write_text(json.dumps({"command": "explain"}))
    assert not _earlier_demo(run_json)  # someone's explain result there is never replaced silently
    run_json.write_text(json.dumps({"command": "demo"}))
    assert _earlier_demo(run_json)
