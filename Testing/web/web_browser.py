"""Helpers for the browser tests: the viewer in a subprocess, headless Chromium, pixels of a view.

Chromium is Debian's package (/usr/bin/chromium), driven by Playwright's Python package; no
browser is ever downloaded. Tests skip, saying so, only where that binary (or Playwright) is absent.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "Testing" / "artifacts" / "web"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 180  # loading Slicer's libraries on a busy 2-core machine is slow
URL_PATTERN = re.compile(r"(http://\S+?/)\s")


def chromium_path() -> str:
    """/usr/bin/chromium (or $ESEGETA_CHROMIUM), or skip the test with the reason."""
    path = os.environ.get("ESEGETA_CHROMIUM", "/usr/bin/chromium")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        found = shutil.which("chromium")
        if found is None:
            pytest.skip(f"Chromium not found at {path}: install the Debian package `chromium` "
                        "(CI installs it in scripts/test.sh) to run the browser tests of `esegeta view`")
        path = found
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright's Python package is missing: pip install playwright (no browser download needed)")
    return path


def viewer_command(*args: str, cli: bool = True) -> List[str]:
    """`esegeta view ARGS` through the CLI, or (`cli=False`) through `python -m EsegetaLib.web`, the
    same parser and handler without importing every other command (faster on a busy machine)."""
    return [sys.executable, "-m", "EsegetaLib", "view", *args] if cli else \
        [sys.executable, "-m", "EsegetaLib.web", *args]


def viewer_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("DISPLAY", None)  # offscreen (EGL), as on a server
    return env


class ViewerProcess:
    """`esegeta view ... --port 0` in a subprocess; `.url` once it printed its address."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(viewer_command(*args), cwd=REPO, env=viewer_env(), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        self._url_ready = threading.Event()
        self.url: Optional[str] = None
        threading.Thread(target=self._pump, args=(self.process.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr, False), daemon=True).start()

    def _pump(self, stream, lines, look_for_url):
        for line in stream:
            lines.append(line)
            match = URL_PATTERN.search(line) if look_for_url else None
            if match and self.url is None:
                self.url = match.group(1)
                self._url_ready.set()

    def wait_for_url(self, timeout: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._url_ready.wait(0.5):
                return self.url
            if self.process.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"viewer did not print its address (rc={self.process.poll()}); stderr: "
                             f"{''.join(self.stderr)[-2000:]}")

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C (SIGINT), as a user would; returns the exit status."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"viewer did not stop within {timeout:.0f} s of SIGINT") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)


def view_pixels(page, tag: str, square: bool = False) -> np.ndarray:
    """RGB pixels (H, W, 3) of the Slicer view `tag` (Red, Green, Yellow, ThreeD) as shown.
    `square`: only the centred square of side min(H, W), where a cubic volume fitted to the view
    lies (the colour legend sits at the view's right edge, outside it)."""
    from PIL import Image

    box = page.locator(f'.esegeta-view[data-view="{tag}"]').bounding_box()
    assert box is not None and box["width"] > 50 and box["height"] > 50, f"view {tag} is not on the page"
    png = page.screenshot(clip=box)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    if square:
        h, w = pixels.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        pixels = pixels[top:top + side, left:left + side]
    return pixels


def color_mask(pixels: np.ndarray, rgb, tolerance: int = 24) -> np.ndarray:
    """Pixels within `tolerance` (per channel, 0-255) of `rgb` (JPEG frames are not exact)."""
    return np.all(np.abs(pixels - np.asarray(rgb, dtype=np.int16)) <= tolerance, axis=-1)


def centroid(mask: np.ndarray):
    """(x, y) of a mask's pixels as fractions of the view's width and height."""
    rows, cols = np.nonzero(mask)
    return cols.mean() / mask.shape[1], rows.mean() / mask.shape[0]


def wait_until(condition: Callable[[], bool], timeout: float = 45.0, what: str = "condition") -> None:
    """Poll `condition` (views update asynchronously, as rendered frames arrive)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def save_screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path
