"""The small parsers behind the command line's options (no model runs)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from EsegetaLib.errors import EsegetaError
from EsegetaLib.runner import (parse_param_assignments, parse_region, resolve_class, resolve_methods,
                               resolve_metrics, split_list)


def test_region_forms():
    assert parse_region("predicted") == ("predicted", None, None)
    assert parse_region("WHOLE") == ("whole", None, None)
    region, mask, point = parse_region("roi:masks/vessel.nrrd")
    assert region == "roi" and str(mask) == "masks/vessel.nrrd" and point is None
    assert parse_region("point: 4, 5 ,6") == ("point", None, (4, 5, 6))
    for bad in ("point:1,2,3,4", "point:1.5,2,3", "roi", "predicted:1", ""):
        with pytest.raises(EsegetaError, match="--region"):
            parse_region(bad)


def test_param_assignments_group_by_method():
    parsed = parse_param_assignments(["IntegratedGradients.n_steps=32", "Occlusion.window_mm = 4.5",
                                      "IntegratedGradients.baseline=zero", "GradCAM++.layer=model.1"])
    assert parsed == {"IntegratedGradients": {"n_steps": "32", "baseline": "zero"},
                      "Occlusion": {"window_mm": "4.5"}, "GradCAM++": {"layer": "model.1"}}


def test_methods_are_validated_and_matched_case_insensitively():
    methods = resolve_methods("saliency, integratedgradients", {"IntegratedGradients": {"n_steps": "8"}})
    assert methods == [("Saliency", {}), ("IntegratedGradients", {"n_steps": "8"})]
    assert len(resolve_methods("all", {})) >= 20
    with pytest.raises(EsegetaError, match="Did you mean 'GradCAM'"):
        resolve_methods("GradCAN", {})
    with pytest.raises(EsegetaError, match="No method"):
        resolve_methods("", {})


def test_choice_parameters_accept_their_spelling_from_the_command_line():
    spec_choice = next(p for p in __import__("EsegetaLib.methods", fromlist=["get_method"])
                       .get_method("IntegratedGradients").params if p.kind == "choice")
    value = str(spec_choice.choices[-1]).upper()
    [(name, params)] = resolve_methods("IntegratedGradients", {"IntegratedGradients": {spec_choice.name: value}})
    assert params[spec_choice.name] == spec_choice.choices[-1]


def test_class_defaults_and_names():
    softmax = SimpleNamespace(classes=["background", "artery", "vein"], activation="softmax")
    assert resolve_class(softmax, None) == (1, "artery")
    assert resolve_class(softmax, "VEIN") == (2, "vein")
    assert resolve_class(softmax, "0") == (0, "background")
    sigmoid = SimpleNamespace(classes=["vessel"], activation="sigmoid")
    assert resolve_class(sigmoid, None) == (0, "vessel")
    bare = SimpleNamespace(classes=None, activation="softmax")
    assert resolve_class(bare, None) == (1, "class 1")
    with pytest.raises(EsegetaError, match="out of range.*0=background, 1=artery, 2=vein"):
        resolve_class(softmax, 3)
    with pytest.raises(EsegetaError, match="no classes"):
        resolve_class(bare, "liver")
    with pytest.raises(EsegetaError, match="out of range"):
        resolve_class(softmax, "-1")


def test_metrics_choices():
    from EsegetaLib.metrics import DEFAULT_METRICS, METRICS

    assert resolve_metrics("none") == "none" and resolve_metrics("") == "none"
    assert resolve_metrics("default") == list(DEFAULT_METRICS)
    assert resolve_metrics("all") == list(METRICS)
    assert resolve_metrics("Sparseness, complexity") == ["sparseness", "complexity"]
    with pytest.raises(EsegetaError, match="Did you mean 'sparseness'"):
        resolve_metrics("sparsenes")


def test_split_list():
    assert split_list(" a, b ,,c ") == ["a", "b", "c"] and split_list(["x ", ""]) == ["x"] and split_list(None) == []
