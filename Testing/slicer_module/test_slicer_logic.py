"""The Slicer module's decisions, tested without Slicer (EsegetaLib.slicer.slicer_logic)."""
from __future__ import annotations

import json
from importlib import metadata

import pytest

from EsegetaLib.slicer import slicer_logic as L
from EsegetaLib.errors import EsegetaError
from module_source import REPO

REQUIREMENTS = REPO / "Resources" / "requirements.txt"


# ------------------------------------------------------------------------------ dependencies
def test_requirements_file_is_what_the_engine_needs_and_never_slicers_own_packages():
    lines = L.load_requirements(REQUIREMENTS)
    names = {L._canonical(L._requirement(line).name) for line in lines}
    assert {"captum", "monai", "nibabel", "pynrrd", "scipy", "tqdm"} <= names
    protected = {L._canonical(n) for n in L.PROTECTED_PACKAGES + L.FORBIDDEN_PACKAGES}
    assert names.isdisjoint(protected)


def test_a_protected_or_forbidden_package_in_requirements_is_refused(tmp_path):
    for line in ("numpy>=2", "SimpleITK", "slicer-core==5.11", "trame_slicer", "torch>=2"):
        path = tmp_path / "requirements.txt"
        path.write_text(f"captum>=0.7\n{line}\n")
        with pytest.raises(EsegetaError, match="must not be installed into Slicer"):
            L.load_requirements(path)


def test_missing_requirements_against_what_is_installed():
    numpy = metadata.version("numpy")
    major = int(numpy.split(".")[0])
    reqs = ["numpy>=1.0", f"numpy<{major}", "esegeta-package-that-does-not-exist>=1",
            'captum>=0.1; python_version < "3"']  # marker false here: not needed
    assert L.missing_requirements(reqs) == [f"numpy<{major}", "esegeta-package-that-does-not-exist>=1"]


def test_dependency_plan_and_its_single_confirmation():
    plan = L.dependency_plan(["esegeta-package-that-does-not-exist>=1", "numpy>=1"], minimum_torch="999.0")
    assert plan.torch_needed and plan.torch_requirement == ">=999.0"
    assert plan.pip_missing == ["esegeta-package-that-does-not-exist>=1"]
    text = plan.confirmation()
    assert "PyTorch >=999.0" in text and "esegeta-package-that-does-not-exist>=1" in text
    assert "Every package Slicer already has (numpy, SimpleITK, scipy, ...) is kept" in text
    assert L.dependency_plan(["numpy>=1"], minimum_torch="2.1").nothing_to_do


def test_protection_constraints_pin_every_installed_distribution_but_those_being_installed():
    text = L.protection_constraints(["captum>=0.7", "monai"])
    pins = dict(line.split("==") for line in text.split())
    assert pins["numpy"] == metadata.version("numpy")
    assert pins["torch"] == metadata.version("torch")
    assert pins["scipy"] == metadata.version("scipy")  # bundled by Slicer, not in the old fixed list
    installed = {L._canonical(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    assert {L._canonical(name) for name in pins} == installed - {"captum", "monai"}


def test_torch_version_comparison_ignores_local_build_labels():
    assert L._release("2.13.0+cu128") == (2, 13, 0)
    assert L._release("2.1") == (2, 1, 0)
    assert L._release("2.10.1") > L._release("2.9.9")


# ------------------------------------------------------------------------------ method panel
@pytest.fixture(scope="module")
def catalog():
    pytest.importorskip("captum")
    return L.method_catalog()


def test_catalog_is_the_registry(catalog):
    from EsegetaLib.methods import all_methods

    assert sorted(m["name"] for m in catalog) == sorted(s.name for s in all_methods())
    families = [m["family"] for m in catalog]
    assert families == sorted(families, key=["gradient", "layer", "perturbation"].index)


def test_every_registered_parameter_gets_an_editor_that_holds_its_default(catalog):
    count = 0
    for method in catalog:
        for param in method["params"]:
            editor = L.param_editor(param)
            count += 1
            kind, value = param["kind"], param["default"]
            if editor["widget"] in ("QSpinBox", "QDoubleSpinBox"):
                assert editor["minimum"] <= value <= editor["maximum"], (method["name"], param)
                if editor["widget"] == "QDoubleSpinBox":
                    assert round(value, editor["decimals"]) == pytest.approx(value, rel=1e-6, abs=1e-12), param
            elif editor["widget"] == "QComboBox":
                assert editor["value"] in editor["choices"]
            elif editor["widget"] == "QCheckBox":
                assert kind == "bool"
            else:
                assert editor["widget"] == "QLineEdit" and (kind == "str" or value is None)
            # what the editor shows, passed back unchanged, is no change at all
            assert L.edited_params(method, {param["name"]: editor["value"]}) == {}, (method["name"], param)
    assert count > 10


def test_edited_params_keep_only_changes_and_validate_with_the_registry(catalog):
    from EsegetaLib.methods import get_method

    ig = next(m for m in catalog if m["name"] == "IntegratedGradients")
    steps = next(p for p in ig["params"] if p["name"] == "n_steps")
    chosen = L.edited_params(ig, {"n_steps": steps["default"] + 8, "not_a_parameter": 3})
    assert chosen == {"n_steps": steps["default"] + 8}
    assert get_method("IntegratedGradients").resolve_params(chosen)["n_steps"] == steps["default"] + 8


def test_text_fields_parse_numbers_and_lists():
    method = {"name": "M", "params": [{"name": "window", "kind": "int", "default": None},
                                      {"name": "label", "kind": "str", "default": "a"}]}
    assert L.edited_params(method, {"window": " 12 ", "label": "b"}) == {"window": 12, "label": "b"}
    assert L.edited_params(method, {"window": "[4, 4, 2]"}) == {"window": [4, 4, 2]}
    assert L.edited_params(method, {"window": ""}) == {}


def test_tooltip_says_family_sign_cost_and_approximation(catalog):
    cam = next(m for m in catalog if m["approximation"])
    text = L.method_tooltip(cam)
    assert cam["family"] in text and "cost" in text and cam["approximation"] in text


def test_metric_names_come_from_the_metrics_module():
    pytest.importorskip("captum")
    from EsegetaLib.metrics import DEFAULT_METRICS, METRICS

    names = L.metric_names()
    assert sorted(names) == sorted(METRICS) and names[: len(DEFAULT_METRICS)] == list(DEFAULT_METRICS)


# ------------------------------------------------------------------------------ settings -> request
def settings(**changes):
    values = dict(methods=["Saliency", "IntegratedGradients"], method_params={"IntegratedGradients": {"n_steps": 8}})
    values.update(changes)
    return L.PanelSettings(**values)


def test_request_fields_are_the_cli_request(catalog):
    from EsegetaLib.runner import ExplainRequest

    fields = L.request_fields(settings(device="GPU", patch_size=64, metrics=["deletion"]), catalog)
    assert fields == {"model": None, "methods": ["Saliency", "IntegratedGradients"],
                      "params": {"IntegratedGradients": {"n_steps": 8}}, "class_index": 1,
                      "region": "predicted", "device": "cuda", "precision": "auto", "patch_size": 64,
                      "overlap": 0.25, "metrics": ["deletion"], "activation": None, "fold": None,
                      "classes": None}
    ExplainRequest(volume="x.nii.gz", **fields)  # every key is a request field
    every = L.request_fields(settings(region="predicted+classes:all"), catalog)
    assert (every["region"], every["classes"]) == ("predicted", "all")
    assert L.request_fields(settings(region="boundary"), catalog)["region"] == "boundary"
    vessel = L.request_fields(settings(region="component", has_point=True), catalog)
    assert vessel["region"] == "component"  # SceneRun appends the placed point's voxel: component:I,J,K
    assert L.request_fields(settings(), catalog)["metrics"] == "none"
    assert L.request_fields(settings(), catalog)["patch_size"] is None


@pytest.mark.parametrize("changes, message", [
    (dict(methods=[]), "Tick at least one method"),
    (dict(methods=["NoSuchMethod"]), "not available"),
    (dict(region="roi"), "'a segment': choose the segmentation"),
    (dict(region="point"), "'a point': place a point"),
    (dict(region="component"), "'this vessel \\(click\\)': place a point"),
    (dict(region="everywhere"), "the model's segmentation, a segment, a point, the whole volume"),
    (dict(class_index=3, n_classes=2), "has 2 classes"),
    (dict(patch_size=8), "'Patch size' must be one of the listed sizes"),
    (dict(patch_size=100), "'Patch size' must be one of the listed sizes"),
    (dict(overlap=1.0), "below 1"),
    (dict(device="TPU"), "Device must be"),
    (dict(model_path="/no/such/model.pt"), "does not exist"),
])
def test_request_fields_name_what_to_fix(catalog, changes, message):
    with pytest.raises(EsegetaError, match=message):
        L.request_fields(settings(**changes), catalog)


def test_names_and_params_round_trip_through_the_parameter_node_strings():
    assert L.split_names(" Saliency,,GradCAM , Saliency") == ["Saliency", "GradCAM"]
    assert L.join_names(["A", "B", "A"]) == "A,B"
    stored = json.dumps({"IntegratedGradients": {"n_steps": 8}})
    assert L.load_params_json(stored) == {"IntegratedGradients": {"n_steps": 8}}
    assert L.load_params_json("not json") == {} and L.load_params_json("[1]") == {}


def test_model_card_summary_without_torch(tmp_path):
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "VesselNet", "architecture": "UNet", "classes": ["background", "vessel"],
                                "description": "TOF vessels", "patch_size": [96, 96, 64],
                                "normalization": {"type": "percentile"}}))
    summary = L.model_card_summary(str(card))
    assert summary["classes"] == ["background", "vessel"]
    for text in ("VesselNet", "TOF vessels", "1 = vessel", "[96, 96, 64]", "percentile"):
        assert text in summary["text"]
    bare = tmp_path / "net.pt"
    bare.write_bytes(b"x")
    assert "no model card" in L.model_card_summary(str(bare))["text"]
    assert L.model_card_summary("")["classes"] is None
    assert "does not exist" in L.model_card_summary(str(tmp_path / "missing.json"))["text"]


# ------------------------------------------------------------------------------ progress and errors
def test_progress_view():
    view = L.progress_view({"fraction": 0.25, "message": "Saliency (1/2): window 3/8"}, started_seconds=30.0)
    assert view.percent == 25
    assert view.text.startswith("Saliency (1/2): window 3/8") and "about 1 min 30 s left" in view.text
    assert L.progress_view({"fraction": 1.7}).percent == 100


def test_failure_views():
    oom = L.failure_view({"kind": "memory", "message": "CUDA out of memory", "details": "trace"})
    assert "CPU" in oom.message and "smaller patch" in oom.message and oom.details == "trace"
    user = L.failure_view({"kind": "user", "message": "Model file 'x' does not exist.", "details": "tb"})
    assert user.message == "Model file 'x' does not exist." and not user.cancelled
    assert L.failure_view({"kind": "cancelled"}).cancelled
    assert "report it" in L.failure_view({"kind": "internal", "message": "KeyError: 'x'"}).message
