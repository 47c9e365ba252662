"""The study file is checked as a whole before any work: every problem listed (file, key, what is
wrong), exit status 2, nothing written.  Plus the pieces the plan rests on (seeds, globs, masks)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from study_helpers import write_volumes

from EsegetaLib.cli import main
from EsegetaLib.study import StudySpecError, load_study
from EsegetaLib.study.spec import case_seed


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study_spec")
    write_volumes(folder, [(24, 24, 24), (24, 24, 24)])
    (folder / "model.pt").write_bytes(b"not checked before the run")
    return folder


def _write(folder: Path, name: str, doc) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False) if not isinstance(doc, str) else doc)
    return path


def test_malformed_study_lists_every_problem_and_exits_2(folder, capsys):
    study = _write(folder, "bad.yaml", {
        "seed": "seven",
        "volumes": [{"path": "vol0.nii.gz"}, {"path": "missing.nii.gz"}, {"glob": "nothing/*.nii.gz"},
                    {"path": "vol1.nii.gz", "name": "vol0"}],
        "models": [{"name": "m", "path": "bundled"}, {"name": "m", "path": "model.pt"},
                   {"name": "x", "path": "absent.pt"}],
        "methods": ["Saliency", "Salency", {"name": "IntegratedGradients", "params": {"n_steps": -3}},
                    {"name": "GradCAM", "params": {"colour": 1}}, "saliency"],
        "target": {"region": "roi", "class": "artery"},
        "metrics": ["sparseness", "sparsness"],
        "engine": {"device": "tpu", "overlap": 1.5, "retires": 2},
        "modles": [],
    })
    out = folder / "bad_out"
    assert main(["study", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert not out.exists()  # rejected before any work
    expected = [
        ("seed", "whole number"),
        ("volumes[1].path", "'missing.nii.gz' does not exist"),
        ("volumes[2].glob", "matches no file"),
        ("volumes[3]", "duplicate volume name 'vol0'"),
        ("models[1]", "duplicate model name 'm'"),
        ("models[2].path", "'absent.pt' does not exist"),
        ("methods[1].name", "Did you mean 'Saliency'"),
        ("methods[2].params", "n_steps"),
        ("methods[3].params", "no parameter 'colour'"),
        ("methods[4]", "duplicate method name 'Saliency'"),
        ("target.region", "needs a mask for every volume"),
        ("target.class", "'artery' is not a class of model 'm' (0=background, 1=vessel)"),
        ("metrics", "Did you mean 'sparseness'"),
        ("engine.device", "tpu"),
        ("engine.overlap", "[0, 1)"),
        ("engine.retires", "did you mean 'retries'"),
        ("modles", "did you mean 'models'"),
    ]
    lines = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    assert len(lines) == len(expected), err
    assert f"has {len(expected)} problem(s); nothing was run" in err
    for key, words in expected:
        assert any(line.startswith(f"{study}: {key}: ") and words in line for line in lines), (key, err)


def test_unreadable_yaml_and_missing_sections(folder, capsys):
    broken = _write(folder, "broken.yaml", "volumes: [vol0.nii.gz\nmodels: {")
    assert main(["study", str(broken), "--out", str(folder / "o1")]) == 2
    assert "is not valid YAML at line" in capsys.readouterr().err
    empty = _write(folder, "empty.yaml", {"seed": 1})
    with pytest.raises(StudySpecError) as info:
        load_study(empty)
    assert [issue.key for issue in info.value.issues] == ["volumes", "models", "methods"]
    assert main(["study", str(folder / "nope.yaml"), "--out", str(folder / "o2")]) == 2


def test_globs_names_masks_and_defaults(folder):
    study = _write(folder, "good.yaml", {
        "volumes": [{"glob": "vol?.nii.gz", "mask": "{name}_roi.nii.gz"}],
        "models": ["bundled", {"name": "ts", "path": "model.pt"}],
        "methods": ["saliency", {"name": "IntegratedGradients", "params": {"n_steps": 8}}],
        "target": {"class": 1, "region": "roi"},
    })
    spec = load_study(study)
    assert [v.name for v in spec.volumes] == ["vol0", "vol1"]
    assert [Path(v.mask).name for v in spec.volumes] == ["vol0_roi.nii.gz", "vol1_roi.nii.gz"]
    assert all(Path(v.path).is_absolute() for v in spec.volumes)
    assert [(m.name, m.path) for m in spec.models] == [("default", None), ("ts", str((folder / "model.pt").resolve()))]
    assert [(m.name, m.params) for m in spec.methods] == [("Saliency", {}), ("IntegratedGradients", {"n_steps": 8})]
    assert spec.metrics == "default" and spec.engine["retries"] == 1 and spec.seed == 0
    assert [c.key for c in spec.cases] == ["vol0/default", "vol0/ts", "vol1/default", "vol1/ts"]
    named = _write(folder, "named.yaml", {"volumes": ["vol0.nii.gz"], "models": [{"name": "ts", "path": "model.pt"}],
                                          "methods": ["Saliency"], "target": {"class": "vessel"}})
    with pytest.raises(StudySpecError, match="model 'ts' names no classes"):
        load_study(named)


def test_layer_methods_on_a_torchscript_model_are_refused_up_front(folder):
    from study_helpers import write_picky_torchscript, write_unet_card

    write_picky_torchscript(folder)
    write_unet_card(folder)
    study = _write(folder, "eager.yaml", {"volumes": ["vol0.nii.gz"],
                                          "models": [{"name": "ts", "path": "picky.pt"}, {"name": "card", "path": "unet.json"}],
                                          "methods": ["Saliency", "GradCAM", "GuidedBackprop"]})
    with pytest.raises(StudySpecError) as info:
        load_study(study)
    assert [issue.key for issue in info.value.issues] == ["methods"]
    # guided backprop works on TorchScript (dispatcher-level rule); the layer method does not
    assert "GradCAM cannot run on model 'ts'" in str(info.value.issues[0])
    study = _write(folder, "eager_ok.yaml", {"volumes": ["vol0.nii.gz"], "models": [{"name": "card", "path": "unet.json"}],
                                             "methods": ["Saliency", "GradCAM"]})
    assert [m.name for m in load_study(study).methods] == ["Saliency", "GradCAM"]


def test_case_seeds_depend_on_names_not_order():
    seeds = {(v, m): case_seed(5, v, m) for v in ("a", "b", "c") for m in ("x", "y")}
    assert len(set(seeds.values())) == 6  # distinct per case
    assert case_seed(5, "b", "y") == seeds[("b", "y")]  # stable (no process-dependent hashing)
    assert case_seed(6, "b", "y") != seeds[("b", "y")]  # and derived from the study seed
    assert all(0 <= s < 2 ** 31 for s in seeds.values())


def test_output_folder_rules(folder, capsys):
    study = _write(folder, "ok.yaml", {"volumes": ["vol0.nii.gz"], "models": ["bundled"], "methods": ["Saliency"]})
    other = folder / "not_a_study"
    other.mkdir()
    (other / "keep.txt").write_text("user's file")
    assert main(["study", str(study), "--out", str(other)]) == 2
    assert main(["study", str(study), "--out", str(other), "--resume"]) == 2
    assert "holds no study" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "user's file"
    assert main(["study", str(study), "--out", str(folder / "o3"), "--address", "auto"]) == 2
    assert "--engine ray" in capsys.readouterr().err


def test_cohort_folders_with_the_same_file_name_get_names_from_their_folders(tmp_path):
    """`sub-*/tof.nii.gz` and `case_*/imaging.nii.gz`: names from the differing path parts; masks and
    ground-truth references found through {dir} and {name} templates."""
    import shutil

    write_volumes(tmp_path, [(20, 20, 20)])
    for sub in ("sub-01", "sub-02", "sub-10"):
        (tmp_path / "data" / sub / "anat").mkdir(parents=True)
        shutil.copy(tmp_path / "vol0.nii.gz", tmp_path / "data" / sub / "anat" / "tof.nii.gz")
        shutil.copy(tmp_path / "vol0.nii.gz", tmp_path / "data" / sub / "anat" / "vessels.nii.gz")
    study = _write(tmp_path, "cohort.yaml", {
        "volumes": [{"glob": "data/sub-*/anat/tof.nii.gz", "reference": "{dir}/vessels.nii.gz",
                     "mask": "data/{name}/anat/vessels.nii.gz"}],
        "models": [{"name": "default", "path": "bundled"}], "methods": ["Saliency"]})
    spec = load_study(study)
    assert [v.name for v in spec.volumes] == ["sub-01", "sub-02", "sub-10"]
    assert all(v.reference.endswith(f"{v.name}/anat/vessels.nii.gz") and v.mask == v.reference for v in spec.volumes)
    from EsegetaLib.study.spec import distinct_names

    assert distinct_names([Path("/x/case_00001/imaging.nii.gz"), Path("/x/case_00002/imaging.nii.gz")]) == \
        ["case_00001", "case_00002"]
    assert distinct_names([Path("/a/s1/t/img.nii.gz"), Path("/a/s2/u/img.nii.gz")]) == ["s1_t", "s2_u"]
    assert distinct_names([Path("/a/x.nii.gz"), Path("/a/y.nii.gz")]) == ["x", "y"]  # unchanged when distinct
    missing = _write(tmp_path, "missing.yaml", {
        "volumes": [{"glob": "data/sub-*/anat/tof.nii.gz", "reference": "{dir}/absent.nii.gz"}],
        "models": [{"name": "default", "path": "bundled"}], "methods": ["Saliency"]})
    with pytest.raises(StudySpecError, match="reference .*absent.nii.gz"):
        load_study(missing)


def test_several_targets_and_boundary_reach_the_request(folder, tmp_path):
    from EsegetaLib.study.cases import _request, make_task

    study = _write(folder, "targets.yaml", {
        "volumes": ["vol0.nii.gz"], "models": ["bundled"], "methods": ["Saliency"],
        "target": {"class": 1, "region": "components:30", "classes": "all", "boundary": 0.8}})
    spec = load_study(study)
    assert (spec.region, spec.classes, spec.boundary_mm) == ("components:30", "all", 0.8)
    task = make_task(spec, spec.cases[0], tmp_path)
    request = _request(task)
    assert (request.region, request.classes, request.boundary_mm) == ("components:30", "all", 0.8)
    plain = load_study(_write(folder, "plain.yaml", {"volumes": ["vol0.nii.gz"], "models": ["bundled"],
                                                     "methods": ["Saliency"], "target": {"class": 1}}))
    assert "classes" not in make_task(plain, plain.cases[0], tmp_path)  # earlier fingerprints unchanged
    bad = _write(folder, "bad_targets.yaml", {
        "volumes": ["vol0.nii.gz"], "models": ["bundled"], "methods": ["Saliency"],
        "target": {"region": "component:1,2", "classes": 3, "boundary": -1}})
    with pytest.raises(StudySpecError) as info:
        load_study(bad)
    text = str(info.value)
    assert "target.classes" in text and "target.boundary" in text and "three voxel indices" in text


def test_engine_stability_reaches_the_request_and_is_validated(folder, tmp_path):
    from EsegetaLib.study.cases import _request, make_task

    base = {"volumes": ["vol0.nii.gz"], "models": ["bundled"], "methods": ["Saliency"], "target": {"class": 1}}
    spec = load_study(_write(folder, "stability.yaml", dict(base, engine={"stability": "noise:4"})))
    task = make_task(spec, spec.cases[0], tmp_path)
    assert task["stability"] == "noise:4" and _request(task).stability == "noise:4"
    plain = load_study(_write(folder, "no_stability.yaml", base))
    assert "stability" not in make_task(plain, plain.cases[0], tmp_path)  # earlier fingerprints unchanged
    with pytest.raises(StudySpecError, match="engine.stability"):
        load_study(_write(folder, "bad_stability.yaml", dict(base, engine={"stability": "mirror"})))
