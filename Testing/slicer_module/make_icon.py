"""Draw Resources/Icons/Esegeta.png (128x128): a branching vessel tree, its strongest part glowing
with an Inferno heat overlay, on a dark rounded tile. Run: python Testing/slicer_module/make_icon.py"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from matplotlib import colormaps

SIZE, SCALE = 128, 4  # drawn at 4x, then downsampled for smooth edges
OUT = Path(__file__).resolve().parents[2] / "Resources" / "Icons" / "Esegeta.png"


def branches(x, y, angle, length, width, depth, rng, out):
    if depth == 0 or length < 6:
        return
    x2, y2 = x + length * np.cos(angle), y - length * np.sin(angle)
    out.append((x, y, x2, y2, width))
    for turn in (-0.45, 0.5):
        branches(x2, y2, angle + turn + rng.uniform(-0.15, 0.15), length * 0.72, max(1.0, width * 0.68),
                 depth - 1, rng, out)


def main():
    n = SIZE * SCALE
    rng = np.random.default_rng(7)
    segments = []
    branches(n * 0.5, n * 0.93, np.pi / 2, n * 0.30, n * 0.055, 5, rng, segments)
    vessels = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(vessels)
    for x1, y1, x2, y2, w in segments:
        draw.line((x1, y1, x2, y2), fill=255, width=int(w))
        draw.ellipse((x2 - w / 2, y2 - w / 2, x2 + w / 2, y2 + w / 2), fill=255)
    mask = np.asarray(vessels, dtype=np.float64) / 255.0
    yy, xx = np.mgrid[0:n, 0:n]
    heat = np.exp(-(((xx - n * 0.62) / (n * 0.22)) ** 2 + ((yy - n * 0.42) / (n * 0.2)) ** 2))
    glow = np.asarray(Image.fromarray((mask * heat * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(n * 0.03)),
                      dtype=np.float64) / 255.0
    glow = np.clip(glow / max(glow.max(), 1e-6), 0, 1)
    background = np.zeros((n, n, 4))
    background[..., :3] = np.array([0.10, 0.11, 0.16])
    tile = Image.new("L", (n, n), 0)
    ImageDraw.Draw(tile).rounded_rectangle((0, 0, n - 1, n - 1), radius=n * 0.16, fill=255)
    background[..., 3] = np.asarray(tile) / 255.0
    grey = np.array([0.82, 0.84, 0.88])
    inferno = colormaps["inferno"](np.clip(0.35 + 0.65 * heat, 0, 1))[..., :3]
    vessel_colour = grey * (1 - heat[..., None]) + inferno * heat[..., None]
    rgb = background[..., :3] * (1 - mask[..., None]) + vessel_colour * mask[..., None]
    rgb = rgb + np.asarray(colormaps["inferno"](0.8))[None, None, :3] * (glow * 0.55 * (1 - mask))[..., None]
    image = np.dstack([np.clip(rgb, 0, 1), background[..., 3]])
    big = Image.fromarray((image * 255).astype(np.uint8), "RGBA")
    big.resize((SIZE, SIZE), Image.LANCZOS).save(OUT, optimize=True)
    print(OUT)


if __name__ == "__main__":
    main()
