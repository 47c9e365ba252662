"""`esegeta view` end to end: a real server in a subprocess, headless Chromium, pixels of Slicer's views.

The result (see web_fixtures) has attribution blocks over black background, so a block's pixels are
exactly the colour table's entry for the block's value times the overlay opacity. Expected colours
come from the scene bridge's display rule (range) and colour tables, independently of the viewer.
Screenshots go to Testing/artifacts/web/.
"""
from __future__ import annotations

import numpy as np
import pytest

from web_browser import (ViewerProcess, centroid, color_mask, launch_browser, save_screenshot, view_pixels,
                         wait_until, chromium_path)
from web_fixtures import arrays, write_result

MIN_BLOCK_PIXELS = 1500  # an 8x8 mm block in a ~350 px tall view of 32 mm is ~7000 px
START_OPACITY = 0.5  # the page starts with the exported scene's foreground opacity


def table_colour(table: str, value: float, low: float, high: float) -> np.ndarray:
    """RGB 0-255 that Slicer shows for `value` with window [low, high] and colour table `table`
    (built from the same matplotlib map as the scene bridge's table): entry floor(fraction * N)."""
    from EsegetaLib.slicer import colors

    rgba = colors.colormap_rgba(table)
    index = int(np.clip(np.floor((value - low) / (high - low) * len(rgba)), 0, len(rgba) - 1))
    return rgba[index, :3] * 255.0


def expected_colours():
    """Block colours at opacity 1 for each method, from the bridge's display rule."""
    from EsegetaLib.slicer import colors
    from EsegetaLib.slicer.scene import display_range

    _, _, maps = arrays()
    sal = display_range(maps["Saliency"], signed=False)
    ig = display_range(maps["IntegratedGradients"], signed=True)
    return {
        "saliency": table_colour(colors.UNSIGNED_TABLE, 0.5, sal["low"], sal["high"]),
        "positive": table_colour(colors.SIGNED_TABLE, 0.5, ig["low"], ig["high"]),
        "negative": table_colour(colors.SIGNED_TABLE, -0.5, ig["low"], ig["high"]),
    }


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    chromium_path()  # skip before starting anything when there is no browser
    folder = write_result(tmp_path_factory.mktemp("view") / "result")
    process = ViewerProcess(str(folder), "--port", "0")
    process.wait_for_url()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def page(viewer):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(viewer.url)
        page.locator('.esegeta-view[data-view="Red"]').wait_for(timeout=60_000)
        yield page
        browser.close()


def block_mask(page, view: str, colour, opacity: float):
    return color_mask(view_pixels(page, view, square=True), opacity * np.asarray(colour))


def box_of(page, tag: str):
    """The view's box on the page, or None when the view is not shown (one query: no race with
    the layout being rebuilt)."""
    from playwright.sync_api import Error as PlaywrightError

    locator = page.locator(f'.esegeta-view[data-view="{tag}"]')
    try:
        return locator.bounding_box(timeout=2000) if locator.count() else None
    except PlaywrightError:  # removed between the two calls: not shown
        return None


def select(page, field_class: str, option: str) -> None:
    """Choose `option` in a Vuetify select, as a user does (open the menu, click the item)."""
    page.locator(f".{field_class}").click()
    page.get_by_role("option", name=option, exact=True).click()


def press_on_slider(page, slider_class: str, key: str) -> None:
    thumb = page.locator(f".{slider_class} [role=slider]")
    thumb.focus()
    page.keyboard.press(key)


def test_address_is_loopback_and_printed(viewer):
    assert viewer.url.startswith("http://127.0.0.1:")
    assert int(viewer.url.rsplit(":", 1)[1].strip("/")) > 0  # --port 0 became a real port


def test_overlay_shows_colour_table_where_attribution_is_high(page):
    colours = expected_colours()
    wait_until(lambda: block_mask(page, "Red", colours["saliency"], START_OPACITY).sum() > MIN_BLOCK_PIXELS,
               what="the Saliency block in the axial view")
    save_screenshot(page, "01_saliency")
    mask = block_mask(page, "Red", colours["saliency"], START_OPACITY)
    x, y = centroid(mask)
    # +I is patient right = screen left; +J is anterior = screen top (Slicer's axial convention).
    assert x < 0.5 and y < 0.5, (x, y)
    rows, cols = np.nonzero(mask)
    assert cols.max() < mask.shape[1] / 2 and rows.max() < mask.shape[0] / 2  # nowhere else
    # The block lies off the central sagittal and coronal slices: no overlay there.
    for view in ("Green", "Yellow"):
        assert block_mask(page, view, colours["saliency"], START_OPACITY).sum() < 20
    # The segmentation outline (the bridge's first segment colour) is drawn around the centre.
    from EsegetaLib.slicer.scene import default_segment_colors

    outline = color_mask(view_pixels(page, "Red", square=True), np.asarray(default_segment_colors(1)[0]) * 255, 40)
    assert outline.sum() > 50
    ox, oy = centroid(outline)
    assert abs(ox - 0.5) < 0.1 and abs(oy - 0.5) < 0.1
    assert "Inferno" in page.locator(".esegeta-legend").inner_text()
    # Slicer's colour legend at the view's right edge: the table's top colour at full intensity.
    assert legend_pixels(page, "Inferno") > 30


def legend_pixels(page, table: str) -> int:
    from EsegetaLib.slicer import colors

    pixels = view_pixels(page, "Red")
    strip = pixels[:, int(0.8 * pixels.shape[1]):]
    return int(color_mask(strip, colors.colormap_rgba(table)[-1, :3] * 255).sum())


def test_method_selector_switches_overlay(page):
    colours = expected_colours()
    select(page, "esegeta-method", "IntegratedGradients")
    wait_until(lambda: block_mask(page, "Red", colours["positive"], START_OPACITY).sum() > MIN_BLOCK_PIXELS,
               what="the IntegratedGradients blocks")
    save_screenshot(page, "02_integrated_gradients")
    pixels = view_pixels(page, "Red", square=True)
    positive = color_mask(pixels, START_OPACITY * colours["positive"])
    negative = color_mask(pixels, START_OPACITY * colours["negative"])
    assert negative.sum() > MIN_BLOCK_PIXELS
    assert color_mask(pixels, START_OPACITY * colours["saliency"]).sum() < 20  # the Saliency overlay is gone
    px, py = centroid(positive)
    nx, ny = centroid(negative)
    assert px > 0.5 and py > 0.5, (px, py)  # low I, low J: screen right, bottom
    assert nx < 0.5 and ny > 0.5, (nx, ny)  # high I, low J: screen left, bottom
    assert "DivergingBlueRed" in page.locator(".esegeta-legend").inner_text()
    assert legend_pixels(page, "DivergingBlueRed") > 30 and legend_pixels(page, "Inferno") < 10


def test_opacity_slider_changes_overlay(page):
    colours = expected_colours()
    press_on_slider(page, "esegeta-opacity", "End")  # opacity 1: the table's own colour
    wait_until(lambda: block_mask(page, "Red", colours["positive"], 1.0).sum() > MIN_BLOCK_PIXELS,
               what="the overlay at opacity 1")
    save_screenshot(page, "03_opacity_1")
    assert block_mask(page, "Red", colours["positive"], START_OPACITY).sum() < 20
    press_on_slider(page, "esegeta-opacity", "Home")  # opacity 0: background only (black there)
    wait_until(lambda: block_mask(page, "Red", colours["positive"], 1.0).sum() < 20
               and block_mask(page, "Red", colours["negative"], 1.0).sum() < 20, what="no overlay at opacity 0")
    save_screenshot(page, "04_opacity_0")
    pixels = view_pixels(page, "Red", square=True)
    h, w = pixels.shape[:2]
    # Where the positive block was (screen right, bottom) the input is black.
    assert np.all(pixels[int(0.70 * h):int(0.80 * h), int(0.62 * w):int(0.68 * w)] < 30)
    press_on_slider(page, "esegeta-opacity", "End")


def test_threshold_slider_hides_weak_values(page):
    colours = expected_colours()
    wait_until(lambda: block_mask(page, "Red", colours["negative"], 1.0).sum() > MIN_BLOCK_PIXELS,
               what="the overlay back at opacity 1")
    press_on_slider(page, "esegeta-threshold", "End")  # hide |value| below the window's top (1.0)
    wait_until(lambda: block_mask(page, "Red", colours["positive"], 1.0).sum() < 20
               and block_mask(page, "Red", colours["negative"], 1.0).sum() < 20,
               what="|0.5| blocks hidden by the threshold")
    save_screenshot(page, "05_threshold_max")
    press_on_slider(page, "esegeta-threshold", "Home")
    wait_until(lambda: block_mask(page, "Red", colours["negative"], 1.0).sum() > MIN_BLOCK_PIXELS,
               what="blocks shown again at threshold 0")


def test_one_large_view_and_volume_rendering(page):
    four = box_of(page, "ThreeD")
    select(page, "esegeta-layout", "3D")
    wait_until(lambda: (box_of(page, "ThreeD") or {"width": 0})["width"] > 1.5 * four["width"]
               and box_of(page, "Red") is None, what="the 3D view alone, large")
    colours = expected_colours()

    def blue_and_red():
        pixels = view_pixels(page, "ThreeD")
        red, blue = pixels[..., 0], pixels[..., 2]
        return (blue > red + 60), (red > blue + 60)  # the background is grey

    wait_until(lambda: all(mask.sum() > 2000 for mask in blue_and_red()), timeout=90,
               what="the map's volume rendering (blue and red evidence) in the 3D view")
    save_screenshot(page, "06_volume_rendering")
    blue, red = blue_and_red()
    # Slicer's default 3D camera looks from anterior: patient right (+I, the negative block) on the left.
    assert centroid(blue)[0] < 0.5 < centroid(red)[0]
    select(page, "esegeta-layout", "Four views")
    wait_until(lambda: box_of(page, "Red") is not None, what="the four views back")
    wait_until(lambda: block_mask(page, "Red", colours["negative"], 1.0).sum() > MIN_BLOCK_PIXELS,
               what="the axial view after the layout change")
    save_screenshot(page, "07_four_views")


def test_metrics_plot_and_parameters_on_page(page):
    table = page.locator(".esegeta-metrics")
    metrics = table.inner_text()
    # methods as rows, quality metrics only, short headers with the full names as tooltips
    assert "Del. AUC" in metrics and "Ins. AUC" in metrics and "0.81" in metrics
    assert [r.split("\t")[0] for r in metrics.strip().splitlines()[1:]] == ["Saliency", "IntegratedGradients"]
    assert "attribution" not in metrics
    assert table.locator("th[title=deletion_auc]").count() == 1
    # the table fits the side panel: nothing sticks out to the right
    fits = page.evaluate("""() => { const t = document.querySelector('.esegeta-metrics table');
        const d = document.querySelector('.v-navigation-drawer');
        return [t.getBoundingClientRect().right, d.getBoundingClientRect().right]; }""")
    assert fits[0] <= fits[1] + 1, fits
    # timings and memory behind the switch
    assert page.locator(".esegeta-metrics-details").count() == 0
    page.locator(".esegeta-details-switch input").check()
    details = page.locator(".esegeta-metrics-details")
    details.wait_for(timeout=10_000)
    assert "attribution s" in details.inner_text() and "3.2" in details.inner_text()
    page.locator(".esegeta-details-switch input").uncheck()
    plot = page.locator(".esegeta-plot")
    assert plot.evaluate("img => img.naturalWidth") > 100  # the PNG decoded in the browser
    # the curves at full width: the dialog's image spans most of the window
    page.locator(".esegeta-curves-button").click()
    large = page.locator(".esegeta-plot-large")
    large.wait_for(timeout=10_000)
    small = plot.bounding_box()
    # as large as the window allows: most of its width, or most of its height (aspect kept)
    wait_until(lambda: large.bounding_box()["width"] > 2.5 * small["width"]
               and large.evaluate("i => i.getBoundingClientRect().bottom") <= 800, what="the curves at full width")
    save_screenshot(page, "08_curves_full_width")
    page.keyboard.press("Escape")
    wait_until(lambda: page.locator(".esegeta-plot-large").count() == 0
               or not page.locator(".esegeta-plot-large").is_visible(), what="the dialog closed")
    parameters = page.locator(".esegeta-parameters").inner_text()
    assert "parameters.methods.IntegratedGradients.n_steps" in parameters and "predicted" in parameters


def test_slice_views_carry_names_and_orientation_letters(page):
    red = page.locator('.esegeta-view[data-view="Red"]')
    assert red.locator(".esegeta-view-name").inner_text().startswith("Axial")
    letters = {edge: red.locator(f".esegeta-letter-{edge}").inner_text() for edge in ("left", "right", "top", "bottom")}
    assert letters == {"left": "R", "right": "L", "top": "A", "bottom": "P"}  # Slicer's radiological axial
    green = page.locator('.esegeta-view[data-view="Green"]')
    assert green.locator(".esegeta-view-name").inner_text().startswith("Coronal")
    assert green.locator(".esegeta-letter-top").inner_text() == "S"
    # the letters sit at the edges they name
    box = red.bounding_box()
    left = red.locator(".esegeta-letter-left").bounding_box()
    right = red.locator(".esegeta-letter-right").bounding_box()
    assert left["x"] < box["x"] + 0.2 * box["width"] and right["x"] > box["x"] + 0.8 * box["width"]


def test_ctrl_c_stops_the_server(viewer, page):
    assert viewer.interrupt() == 0
    assert any("stopped" in line for line in viewer.stdout)
    assert not any("Traceback" in line for line in viewer.stderr), "".join(viewer.stderr)[-2000:]
