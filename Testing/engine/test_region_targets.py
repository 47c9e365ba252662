"""Component and boundary targets on the bundled (trained) vessel model and synthetic tubes whose
walls the model places itself: equality with the ROI target, non-zero gradients, one-line errors,
geodesic limits, and where a boundary map puts its mass."""
import numpy as np
import pytest
from scipy import ndimage

from conftest import vessel_tubes as tubes
from EsegetaLib.engine import ExplainSession
from EsegetaLib.errors import EsegetaError
from EsegetaLib.options import EngineOptions, Target
from EsegetaLib.regions import component_at, geodesic_distance

SPACING = (0.4, 0.4, 0.4)


@pytest.fixture(scope="module")
def model():
    from EsegetaLib.models import load_default_model

    return load_default_model()


def _options(model):
    return EngineOptions(device="cpu", divisor=model.card.divisor)


def _session(model, volume, target, **extra):
    options = _options(model)
    options.extra.update(extra)
    return ExplainSession(volume, model, target, options, spacing=SPACING)


def test_component_target_equals_roi_target_of_that_component(model):
    volume = tubes((32, 32, 32), ((16, 9), (16, 23)), 2.5)
    session = _session(model, volume, Target(class_index=1, region="component", point=(16, 9, 16)))
    seg = session.segmentation == 1
    labels, count = ndimage.label(seg, np.ones((3, 3, 3)))
    assert count == 2, "the model should segment the two tubes apart"
    expected = labels == labels[16, 9, 16]
    assert (session.region == expected).all()
    roi = _session(model, volume, Target(class_index=1, region="roi", mask=expected))
    for method in ("Saliency", "IntegratedGradients"):
        a = session.attribute(method, {"n_steps": 8} if method == "IntegratedGradients" else None).attribution
        b = roi.attribute(method, {"n_steps": 8} if method == "IntegratedGradients" else None).attribution
        assert np.array_equal(a, b), method
        assert np.abs(a).sum() > 0 and np.isfinite(a).all()


def test_click_outside_segmentation_is_one_line_naming_nearest_voxel(model):
    volume = tubes((32, 32, 32), ((16, 16),), 2.5)
    with pytest.raises(EsegetaError) as info:
        _session(model, volume, Target(class_index=1, region="component", point=(2, 2, 16)))
    text = str(info.value)
    assert "\n" not in text and "not in the segmentation" in text and "nearest segmented voxel is (" in text
    near = tuple(int(v) for v in text.split("nearest segmented voxel is (")[1].split(")")[0].split(","))
    probe = _session(model, volume, Target(class_index=1, region="whole"))
    seg = probe.segmentation == 1
    assert seg[near]
    # it is the nearest: no segmented voxel is closer to the click
    d = np.sqrt(((np.argwhere(seg) - np.array([2, 2, 16])) ** 2).sum(axis=1))
    assert np.isclose(np.sqrt(((np.array(near) - [2, 2, 16]) ** 2).sum()), d.min())


def test_geodesic_limit_keeps_the_branch_near_the_click(model):
    volume = tubes((32, 32, 32), ((16, 16),), 2.5)
    full = _session(model, volume, Target(class_index=1, region="component", point=(16, 16, 16)))
    near = _session(model, volume, Target(class_index=1, region="component", point=(16, 16, 16), geodesic_mm=2.0))
    assert near.region.sum() < full.region.sum() and (near.region <= full.region).all()
    ks = np.argwhere(near.region)[:, 2]
    # along a straight tube, 2 mm at 0.4 mm spacing is 5 voxels each way from the click
    assert ks.min() >= 16 - 5 and ks.max() <= 16 + 5 and ks.min() <= 12 and ks.max() >= 20
    dist = geodesic_distance(full.region, (16, 16, 16), SPACING)
    assert (dist[near.region] <= 2.0).all() and np.isfinite(dist[full.region]).all()
    assert np.abs(near.attribute("Saliency").attribution).sum() > 0


def test_geodesic_distance_follows_the_component_not_the_straight_line():
    # a U: two arms joined at the bottom; the far arm's top is 6 voxels away straight, ~26 along the U
    u = np.zeros((3, 20, 12), bool)
    u[1, 2:18, 2] = u[1, 2:18, 8] = u[1, 17, 2:9] = True
    dist = geodesic_distance(u, (1, 2, 2), (1.0, 1.0, 1.0))
    # 15 down, 6 across, 15 up; each corner is cut by one diagonal step (sqrt 2 instead of 2)
    assert dist[1, 2, 2] == 0 and dist[1, 2, 8] == pytest.approx(36 - 2 * (2 - np.sqrt(2)), abs=1e-6)
    assert component_at(u, (1, 2, 2)).sum() == u.sum()


def test_boundary_map_mass_lies_at_the_wall(model, capsys):
    """A tube of radius 5 voxels; the model places its wall; a boundary band of one voxel each side
    on that component. The |map| mass within 2 voxels of the model's wall is reported and must be
    well above that shell's share of the volume and above the plain component target's."""
    volume = tubes((32, 32, 32), ((16, 16),), 5.0)
    point = (16, 16, 16)
    plain = _session(model, volume, Target(class_index=1, region="component", point=point))
    wall = _session(model, volume, Target(class_index=1, region="component", point=point, boundary_mm=0.4))
    comp = plain.region
    inside = ndimage.distance_transform_edt(comp) - 0.5
    outside = ndimage.distance_transform_edt(~comp) - 0.5
    shell = np.where(comp, inside, outside) <= 2.0
    t = wall.targets[0]
    assert (t.sign[comp] >= 0).all() and (t.sign[~comp] <= 0).all() and (t.sign > 0).any() and (t.sign < 0).any()
    share = shell.mean()
    lines = []
    for method in ("Saliency", "InputXGradient", "IntegratedGradients"):
        params = {"n_steps": 16} if method == "IntegratedGradients" else None
        a = np.abs(wall.attribute(method, params).map)
        b = np.abs(plain.attribute(method, params).map)
        frac, frac_plain = a[shell].sum() / a.sum(), b[shell].sum() / b.sum()
        lines.append(f"{method}: boundary {frac:.3f}, component {frac_plain:.3f}, shell share of volume {share:.3f}")
        assert frac > 3 * share and frac > frac_plain, lines[-1]
    assert a[shell].sum() / a.sum() > 0.5
    with capsys.disabled():
        print("\nboundary map mass within 2 voxels of the wall: " + "; ".join(lines))


def test_boundary_errors_are_one_line(model):
    volume = tubes((32, 32, 32), ((16, 16),), 2.5)
    with pytest.raises(EsegetaError, match="at least 0.4 mm"):
        _session(model, volume, Target(class_index=1, region="boundary", boundary_mm=0.1))
    with pytest.raises(EsegetaError, match="has none"):
        _session(model, volume, Target(class_index=1, region="whole", boundary_mm=1.0))
    with pytest.raises(EsegetaError, match="geodesic"):
        _session(model, volume, Target(class_index=1, region="predicted", geodesic_mm=1.0))
    session = _session(model, volume, Target(class_index=1, region="boundary"))  # default band: one voxel
    assert session.targets[0].info["boundary_mm"] == pytest.approx(0.4)
    assert session.region_weights.min() == -1 and session.region_weights.max() == 1
