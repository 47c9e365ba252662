"""The command line's target options: --region component/components/boundary, --classes, --boundary:
parsing, one-line errors (exit 2), and the result folder with a folder per target."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import vessel_tubes
from EsegetaLib.cli import main
from EsegetaLib.errors import EsegetaError
from EsegetaLib.io import read_image
from EsegetaLib.runner import parse_region_request

from helpers import write_volume


def test_region_syntax():
    r = parse_region_request("component:16, 9,16")
    assert (r.kind, r.point, r.geodesic_mm) == ("component", (16, 9, 16), None)
    assert parse_region_request("component:1,2,3:7.5").geodesic_mm == 7.5
    assert parse_region_request("boundary").boundary_mm is None
    assert parse_region_request("Boundary:0.8").boundary_mm == 0.8
    assert parse_region_request("components:50").min_voxels == 50
    for bad, fragment in (("component:1,2", "three voxel indices"), ("component:1,2,3:x", "not a number"),
                          ("boundary:-1", "must be positive"), ("components:2.5", "whole number"),
                          ("point:1,2,3:4", "three voxel indices"), ("branch:1", "component:I,J,K")):
        with pytest.raises(EsegetaError, match=fragment):
            parse_region_request(bad)


@pytest.fixture(scope="module")
def tubes_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("targets")
    affine = np.diag([0.4, 0.4, 0.4, 1.0])
    return write_volume(folder / "tubes.nii.gz", vessel_tubes((32, 32, 32), ((16, 9), (16, 23)), 2.5)[None], affine)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_click_outside_the_vessel_is_one_line(capsys, tubes_file, tmp_path):
    code, cap = _run(capsys, "explain", tubes_file, "--region", "component:2,2,16", "--out", tmp_path / "r",
                     "--metrics", "none", "--no-scene", "--device", "cpu", "--quiet")
    errors = [line for line in cap.err.splitlines() if line.startswith("esegeta: error:")]
    assert code == 2 and len(errors) == 1 and "nearest segmented voxel is (" in errors[0], cap.err
    assert "Traceback" not in cap.err and not (tmp_path / "r").exists()


def test_components_and_boundary_write_a_folder_per_target(capsys, tubes_file, tmp_path):
    out = tmp_path / "r"
    code, cap = _run(capsys, "explain", tubes_file, "--region", "components", "--boundary", "0.4",
                     "--methods", "Saliency,DeepLift", "--out", out, "--metrics", "relevance_mass", "--no-scene",
                     "--device", "cpu", "--quiet")
    assert code == 0, cap.err
    run = json.loads((out / "run.json").read_text())
    names = [t["name"] for t in run["target"]["targets"]]
    assert names == ["component_1", "component_2"] and run["target"]["boundary_mm"] == 0.4
    for name in names:
        region = read_image(out / "attributions" / name / "region.nii.gz").array[0]
        assert set(np.unique(region).tolist()) == {-1.0, 0.0, 1.0}
        for method in ("Saliency", "DeepLift"):
            a = read_image(out / "attributions" / name / f"{method}.nii.gz").array[0]
            assert np.abs(a).sum() > 0
            result = run["results"][f"{name}/{method}"]
            expected = "batched" if method == "Saliency" else "one target at a time"
            assert result["diagnostics"]["multi_target"].startswith(expected)
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert sorted((r["target"], r["method"]) for r in rows) == sorted(
        (n, f"{n}/{m}") for n in names for m in ("Saliency", "DeepLift"))
    assert all(r["relevance_mass"] == r["relevance_mass"] for r in rows)


def test_classes_all_names_targets_by_class(capsys, tubes_file, tmp_path):
    out = tmp_path / "r"
    code, cap = _run(capsys, "explain", tubes_file, "--classes", "all", "--region", "component:16,9,16",
                     "--out", out, "--metrics", "none", "--no-scene", "--device", "cpu", "--quiet")
    assert code == 2 and "--classes does not combine with --region component" in cap.err
    code, cap = _run(capsys, "explain", tubes_file, "--classes", "background,vessel", "--region", "whole",
                     "--methods", "Saliency", "--out", out, "--metrics", "none", "--no-scene", "--device", "cpu",
                     "--quiet")
    assert code == 0, cap.err
    assert sorted(p.name for p in (out / "attributions").iterdir()) == ["background", "vessel"]
    # the run names every class it explains, and the table says which target each row is (#15)
    run = json.loads((out / "run.json").read_text())
    assert run["target"]["class_index"] == [0, 1] and run["target"]["class_name"] == ["background", "vessel"]
    assert [t["name"] for t in run["target"]["targets"]] == ["background", "vessel"]
    assert run["parameters"]["class_index"] == [0, 1]
    import csv

    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["target"], r["method"]) for r in rows) == [("background", "background/Saliency"),
                                                                ("vessel", "vessel/Saliency")]
    from EsegetaLib.results import target_label, target_segment_names

    assert target_label(run["target"]) == "background, vessel"
    assert target_segment_names(run["target"]) == {0: "background", 1: "vessel"}


def test_each_targets_curves_and_figure(capsys, tubes_file, tmp_path):
    """--region components with deletion/insertion: curves.json keyed by target, each target's
    curves those of a single run explaining that component alone (--region component:I,J,K), and
    a figure per target read back as an image."""
    import matplotlib.image

    out, single = tmp_path / "r", tmp_path / "one"
    argv = ["--methods", "Saliency,InputXGradient", "--metrics", "deletion,insertion", "--no-scene",
            "--device", "cpu", "--precision", "fp32", "--quiet"]
    code, cap = _run(capsys, "explain", tubes_file, "--region", "components", "--out", out, *argv)
    assert code == 0, cap.err
    curves = json.loads((out / "curves.json").read_text())
    assert sorted(curves) == ["component_1", "component_2"]
    for target, by_method in curves.items():
        assert sorted(by_method) == ["InputXGradient", "Saliency"]
        for curve in (c for m in by_method.values() for c in (m["deletion"], m["insertion"])):
            assert len(curve["fraction"]) == len(curve["normalised"]) > 2
        picture = matplotlib.image.imread(out / "deletion_insertion" / f"{target}.png")
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.std() > 0
    clicked = next(t for t in curves
                   if read_image(out / "attributions" / t / "region.nii.gz").array[0][16, 9, 16] == 1)
    code, cap = _run(capsys, "explain", tubes_file, "--region", "component:16,9,16", "--out", single, *argv)
    assert code == 0, cap.err
    alone = json.loads((single / "curves.json").read_text())
    for method in ("Saliency", "InputXGradient"):
        for mode in ("deletion", "insertion"):
            np.testing.assert_allclose(curves[clicked][method][mode]["normalised"], alone[method][mode]["normalised"],
                                       rtol=1e-5, atol=1e-6)
    other = next(t for t in curves if t != clicked)
    assert not np.allclose(curves[other]["Saliency"]["deletion"]["normalised"],
                           alone["Saliency"]["deletion"]["normalised"])
