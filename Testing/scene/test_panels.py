"""Preview panels read on their own: one per method with its name and a colour bar in its colours,
orientation letters from each view's axes, an overview sheet, thin volumes at their proportions.
Checked on the rendered pixels (and looked at: docs/images/preview_panel.png is one of them)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (pip install esegeta[scene]) not installed")
pytest.importorskip("matplotlib")

from EsegetaLib.slicer import panels as PN, previews as P, scene as S  # noqa: E402

from .test_review import make_case  # noqa: E402


def pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(float)


def text_ink(text: str, fontsize: float, weight: str) -> np.ndarray:
    """The text alone, rendered by matplotlib as the panels render it: a dark-ink mask cropped."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 1), dpi=PN.PANEL_DPI)
    fig.text(0.02, 0.3, text, fontsize=fontsize, fontweight=weight)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    plt.close(fig)
    return crop_ink(image)


def crop_ink(rgb: np.ndarray) -> np.ndarray:
    ink = rgb.mean(axis=2) < 128
    rows, cols = np.nonzero(ink)
    return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def assert_text(image: np.ndarray, box, text: str, fontsize: float, weight: str = "bold") -> None:
    x0, y0, x1, y1 = box
    found = crop_ink(image[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2])
    expected = text_ink(text, fontsize, weight)
    assert abs(found.shape[0] - expected.shape[0]) <= 2 and abs(found.shape[1] - expected.shape[1]) <= 2, \
        (text, found.shape, expected.shape)
    h, w = min(found.shape[0], expected.shape[0]) - 1, min(found.shape[1], expected.shape[1]) - 1
    # glyphs land on sub-pixel positions: the best of one-pixel shifts
    agreement = max((found[a:a + h, b:b + w] == expected[:h, :w]).mean() for a in (0, 1) for b in (0, 1))
    assert agreement > 0.9, (text, agreement)
    other = text_ink(text[::-1], fontsize, weight)  # the same letters in another order must not match
    if other.shape == expected.shape:
        assert (found[:h, :w] == other[:h, :w]).mean() < agreement


def assert_colour_bar(image: np.ndarray, box, cmap) -> None:
    """The bar's middle column, bottom to top, runs through the map's colour table in order."""
    x0, y0, x1, y1 = box
    column = image[y0 + 2:y1 - 2, (x0 + x1) // 2][::-1] / 255.0  # bottom (low) to top (high)
    table = cmap(np.linspace(0.0, 1.0, 256))[:, :3]
    distance = np.linalg.norm(column[:, None, :] - table[None, :, :], axis=2)
    index = distance.argmin(axis=1)
    assert distance.min(axis=1).max() < 0.05  # every pixel is a colour of the table
    assert index[0] < 20 and index[-1] > 235  # from its low end to its high end
    assert (np.diff(index) >= -3).all()  # in order


@pytest.fixture(scope="module")
def review(tmp_path_factory):
    from EsegetaLib.io import Image as EImage
    from EsegetaLib.slicer import review as R

    volume, affine, explanation, metrics = make_case()
    out = tmp_path_factory.mktemp("panels")
    built = S.build_review_scene((volume, affine), explanation, metrics, class_name="vessel")
    try:
        result = PN.write_panels(built["scene"], out / "previews", built["input"], built["maps"],
                                 built["segmentation"], region=explanation.region, three_d=False,
                                 metadata={"Saliency": {"family": "gradient"},
                                           "IntegratedGradients": {"family": "gradient"}})
        colours = {m: PN.colour_bar_of(node) for m, node in built["maps"].items()}
    finally:
        S.release_scene(built["scene"])
    return result, colours, explanation


def test_one_panel_per_method_with_its_name_and_colour_bar(review):
    result, colours, explanation = review
    names = [p.split("/")[-1] for p in result["paths"]]
    assert names == ["Saliency.png", "IntegratedGradients.png", "overview.png"]
    for method in explanation.results:
        image = pixels(result["paths"][names.index(f"{method}.png")])
        layout = result["layouts"][method]
        assert image.shape[:2] == layout["size"][::-1]
        assert_text(image, layout["title"], method, 16)
        cmap, low, high = colours[method]
        assert_colour_bar(image, layout["colour_bar"], cmap)
        assert high > 0 and (low < 0) == (method == "IntegratedGradients")  # signed map: symmetric range


def test_the_overview_has_a_row_per_method_on_the_same_slices(review):
    result, colours, explanation = review
    image = pixels(result["paths"][-1])
    rows = result["layouts"]["overview"]["rows"]
    assert [r["method"] for r in rows] == list(explanation.results)
    for row in rows:
        assert_text(image, row["name"], row["method"], 12)
        assert_colour_bar(image, row["colour_bar"], colours[row["method"]][0])


def test_panels_cut_through_the_strongest_attribution_inside_the_region(review):
    result, _, explanation = review
    for method, center in result["centers"].items():
        i, j, k = center["ijk"]
        assert explanation.region[i, j, k]
    # the make_case blob peaks at (15, 10, 8) on the tube
    assert result["centers"]["Saliency"]["ijk"] == [15, 10, 8]


def test_orientation_letters_follow_the_view_axes():
    # Slicer's default axial view: screen right = patient left, screen up = anterior
    assert P.orientation_letters((-1, 0, 0), (0, 1, 0)) == {"right": "L", "left": "R", "top": "A", "bottom": "P"}
    # coronal: right = L, up = S; sagittal: right = P, up = S (Slicer's presets)
    assert P.orientation_letters((-1, 0, 0), (0, 0, 1)) == {"right": "L", "left": "R", "top": "S", "bottom": "I"}
    assert P.orientation_letters((0, -1, 0), (0, 0, 1))["right"] == "P"
    # an oblique axis takes the nearest direction
    assert P.orientation_letters((0.3, 0.9, 0.1), (0, 0.1, 0.99))["right"] == "A"


def test_a_thin_anisotropic_volume_is_shown_at_its_proportions():
    """157x393x34 voxels of 0.7x0.7x2.5 mm (an aortic CT slab): the sagittal view is 275 x 85 mm,
    rendered in a viewport of that aspect, not squeezed into a square."""
    scene = S.new_scene()
    try:
        affine = np.diag([0.7, 0.7, 2.5, 1.0])
        shape = (157, 393, 34)
        background = S.add_image(scene, None, "ct", array=np.zeros(shape, np.float32), ijk_to_ras=affine)[0]
        for orientation, (wide, high) in (("Sagittal", (393 * 0.7, 34 * 2.5)), ("Axial", (157 * 0.7, 393 * 0.7))):
            view = P.render_view(scene, orientation, background)
            h, w, _ = view["rgb"].shape
            assert abs(w / h - wide / high) < 0.03 * (wide / high), (orientation, w, h)
            assert min(w, h) >= 128  # a thin slab is still readable
    finally:
        S.release_scene(scene)
