"""The panel's torch-free half: the checked-in method catalogue against the registries, the panel
set-up with torch blocked, presets, region and class choices, patch sizes, wording of errors,
the Slicer log, platform checks and the model path saved with a scene."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from EsegetaLib.errors import EsegetaError
from EsegetaLib.slicer import slicer_logic as L
from module_source import REPO


def test_checked_in_catalogue_is_the_registry():
    pytest.importorskip("captum")
    current = L.registry_catalog()
    stored = L.load_catalog()
    assert stored == current, ("EsegetaLib/resources/method_catalog.json is out of date with the method or "
                               "metric registry: run  python -m EsegetaLib.slicer.slicer_logic --write-catalog")
    from EsegetaLib.methods import all_methods
    from EsegetaLib.metrics import METRICS

    assert sorted(m["name"] for m in stored["methods"]) == sorted(s.name for s in all_methods())
    assert sorted(stored["metrics"]) == sorted(METRICS)


BLOCKED = textwrap.dedent("""
    import json, sys
    for name in ("torch", "captum", "monai", "torchvision"):
        sys.modules[name] = None  # any import of them raises ImportError
    sys.path.insert(0, sys.argv[1])
    from EsegetaLib.slicer import slicer_logic as L
    from EsegetaLib.slicer import dependencies, qt_panel, slicer_run, worker  # the rest of the panel's imports
    catalog = L.method_catalog()
    editors = [L.param_editor(p) for m in catalog for p in m["params"]]
    tips = [L.method_tooltip(m) for m in catalog]
    fields = L.request_fields(L.PanelSettings(methods=L.preset_methods("Quick look", catalog)), catalog)
    summary = L.model_card_summary("")
    L.class_choices(summary), L.method_families(catalog), L.metric_names()
    L.failure_view({"kind": "memory", "message": "x"})
    heavy = sorted(n for n in ("torch", "captum", "monai", "scipy", "skimage", "sklearn", "nibabel", "matplotlib")
                   if sys.modules.get(n) is not None)
    print(json.dumps({"methods": len(catalog), "editors": len(editors), "heavy": heavy, "fields": fields}))
""")


def test_panel_set_up_imports_no_torch():
    """Everything the panel does before Apply, in a Python where torch cannot be imported."""
    done = subprocess.run([sys.executable, "-c", BLOCKED, str(REPO)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["methods"] >= 20 and report["editors"] > 10
    assert report["heavy"] == []
    assert report["fields"]["methods"] == ["Saliency", "IntegratedGradients", "GradCAM"]


def test_presets_name_registered_methods_and_every_method_has_a_plain_tooltip():
    catalog = L.method_catalog()
    names = {m["name"] for m in catalog}
    for preset, methods in L.PRESETS.items():
        assert set(methods) <= names, preset
        assert L.preset_methods(preset, catalog) == list(methods)
        assert preset in L.PRESET_TOOLTIPS
    assert set(L.PRESETS["Quick look"]) < set(L.PRESETS["Thorough"])
    assert L.preset_for(["GradCAM", "Saliency", "IntegratedGradients"]) == "Quick look"
    assert L.preset_for(["Saliency"]) == "Custom"
    assert sorted(L.PLAIN_TOOLTIPS) == sorted(names), "a method without a plain-language tooltip"
    for meta in catalog:
        assert L.method_tooltip(meta).splitlines()[0] == L.PLAIN_TOOLTIPS[meta["name"]]
    families = L.method_families(catalog)
    assert [title for title, _ in families] == ["Gradients (fast)", "Deep layers (fast, coarse)", "Perturbation (slow)"]
    assert sum(len(items) for _, items in families) == len(catalog)
    with pytest.raises(EsegetaError, match="Unknown preset"):
        L.preset_methods("Everything", catalog)


def test_region_choices_are_words_for_the_engines_regions():
    from EsegetaLib.options import REGIONS

    assert [c.label for c in L.REGION_CHOICES][:4] == [
        "the model's segmentation", "a segment", "a point", "the whole volume"]
    assert {c.region for c in L.REGION_CHOICES} <= set(REGIONS)
    assert L.region_choice("roi").needs == "segment" and L.region_choice("point").needs == "point"
    # the radiologist's questions: this vessel (a placed point), its wall, every class at once
    assert [c.label for c in L.REGION_CHOICES][4:] == ["this vessel (click)", "the vessel wall", "every class"]
    assert L.region_choice("component").needs == "point" and L.region_choice("boundary").needs is None
    assert L.region_choice("predicted+classes:all").classes == "all"
    assert len({c.value for c in L.REGION_CHOICES}) == len(L.REGION_CHOICES)


def test_class_menu_lists_names_background_last(tmp_path):
    card = tmp_path / "model.json"
    card.write_text(json.dumps({"name": "m", "classes": ["background", "vessel", "aneurysm"]}))
    summary = L.model_card_summary(str(card))
    assert L.class_choices(summary) == [(1, "vessel (1)"), (2, "aneurysm (2)"), (0, "background (0)")]
    assert L.class_choices({"classes": None}) == [(1, "class 1"), (0, "class 0")]
    # the imported run is labelled by the chosen class; "every class" names no single one (run.json lists them)
    chosen = L.PanelSettings(methods=["Saliency"], model_path=str(card), class_index=2)
    assert L.class_name(chosen) == "aneurysm"
    every = L.PanelSettings(methods=["Saliency"], model_path=str(card), class_index=2,
                            region=L.region_choice("predicted+classes:all").value)
    assert L.class_name(every) is None


def test_only_valid_patch_sizes_are_offered_and_accepted():
    for size in L.PATCH_SIZE_CHOICES:
        assert size == 0 or (size % 16 == 0 and size >= 32)
        fields = L.request_fields(L.PanelSettings(methods=["Saliency"], patch_size=size), L.method_catalog())
        assert fields["patch_size"] == (size or None)
    assert L.patch_size_label(0) == "the model's own" and L.patch_size_label(64) == "64 voxels"


def test_a_real_device_error_names_the_panel_control():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    from EsegetaLib import runner
    from EsegetaLib.slicer.worker import classify_error

    volume = REPO / "EsegetaLib" / "resources" / "sample_tof.nii.gz"
    with pytest.raises(EsegetaError) as caught:
        runner.prepare(runner.ExplainRequest(volume=str(volume), methods="Saliency", device="cuda"))
    assert "--device" in str(caught.value)
    view = L.failure_view({"kind": classify_error(caught.value, "cuda")[0],
                           "message": classify_error(caught.value, "cuda")[1]})
    assert "--" not in view.message and "'Device' GPU" in view.message and "'Device' CPU" in view.message


def test_worker_lines_for_slicers_log():
    events = [{"event": "started", "pid": 1}, {"event": "log", "message": "loading"},
              {"event": "progress", "fraction": 0.1, "message": "Saliency (1/2): window 1/8"},
              {"event": "progress", "fraction": 0.2, "message": "Saliency (1/2): window 2/8"},
              {"event": "warning", "message": "no CUDA GPU; --device cpu used"},
              {"event": "progress", "fraction": 0.6, "message": "GradCAM (2/2): window 1/8"},
              {"event": "done", "seconds": 12.4}]
    assert L.log_entries(events) == [
        ("info", "loading"), ("info", "Saliency (1/2): window 1/8"),
        ("warning", "no CUDA GPU; 'Device' CPU used"), ("info", "GradCAM (2/2): window 1/8"),
        ("info", "Finished in 12 s.")]


def test_supported_slicer_versions_and_intel_macs():
    assert L.slicer_version_problem("5.8.1") and "5.10" in L.slicer_version_problem("5.8.1")
    assert L.slicer_version_problem("5.10.0") is None and L.slicer_version_problem("5.13.0-2026-11-01") is None
    assert "Intel" in L.platform_problem("Darwin", "x86_64", "2.0.2")
    assert L.platform_problem("Darwin", "arm64", "2.4.6") is None
    assert L.platform_problem("Darwin", "x86_64", "1.26.4") is None
    assert L.platform_problem("Linux", "x86_64", "2.4.6") is None
    # the same floor is declared where Slicer users and the Extensions Index read it
    readme = (REPO / "docs" / "readme" / "slicer.md").read_text(encoding="utf-8")
    assert "Slicer 5.10 or later" in readme


def test_model_path_is_saved_relative_to_the_scene(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    scene = slicer.vtkMRMLScene()
    scene.SetRootDirectory(str(tmp_path / "scene"))
    model = tmp_path / "models" / "unet.pt"
    model.parent.mkdir()
    model.write_bytes(b"model")
    relative = L.stored_model_path(str(model), scene.GetRootDirectory())
    assert relative == "../models/unet.pt"
    assert L.resolved_model_path(str(model), relative, scene.GetRootDirectory()) == str(model)  # as chosen
    # the scene folder and the model moved together to a colleague's machine
    moved = tmp_path / "colleague"
    (moved / "models").mkdir(parents=True)
    (moved / "models" / "unet.pt").write_bytes(b"model")
    model.unlink()
    assert L.resolved_model_path(str(model), relative, str(moved / "scene")) == str(moved / "models" / "unet.pt")
    # nothing there either: the chosen path stays, and the run's error names it
    assert L.resolved_model_path(str(model), relative, str(tmp_path / "elsewhere")) == str(model)
    assert L.stored_model_path("", str(tmp_path)) == "" and L.resolved_model_path("", "", None) == ""
    # through the panel's settings (a namespace standing in for the parameter node)
    from types import SimpleNamespace

    pn = SimpleNamespace(modelPath=str(model), modelPathRelative=relative, methods="Saliency", methodParams="{}",
                         targetClass=1, region="predicted", roiSegmentation=None, regionPoint=None, device="auto",
                         precision="auto", patchSize=0, overlap=0.25, metrics="")
    assert L.panel_settings(pn, str(moved / "scene")).model_path == str(moved / "models" / "unet.pt")
