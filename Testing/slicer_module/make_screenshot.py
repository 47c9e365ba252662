"""Compose docs/images/slicer-screenshot.png (the extension's catalog screenshot) from the previews
of a result folder, in Slicer's four-up layout (axial | 3D / coronal | sagittal).

    esegeta demo --methods Saliency,InputXGradient --metrics none --out /tmp/demo
    python Testing/slicer_module/make_screenshot.py /tmp/demo
"""
import sys
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[2] / "docs" / "images" / "slicer-screenshot.png"
TILE, GAP = 384, 4
LAYOUT = (("axial", (0, 0), (0.95, 0.35, 0.31)), ("3d", (1, 0), (0.55, 0.6, 0.9)),
          ("coronal", (0, 1), (0.43, 0.69, 0.38)), ("sagittal", (1, 1), (0.93, 0.84, 0.33)))


def main(result: Path) -> None:
    size = 2 * TILE + GAP
    canvas = Image.new("RGB", (size, size), (24, 24, 30))
    draw = ImageDraw.Draw(canvas)
    for name, (col, row), colour in LAYOUT:
        tile = Image.open(result / "previews" / f"{name}.png").convert("RGB").resize((TILE, TILE), Image.LANCZOS)
        x, y = col * (TILE + GAP), row * (TILE + GAP)
        canvas.paste(tile, (x, y))
        rgb = tuple(int(255 * c) for c in colour)
        draw.rectangle((x, y, x + TILE - 1, y + 17), fill=rgb)
        draw.text((x + 6, y + 3), name if name != "3d" else "3D", fill=(0, 0, 0))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(OUT, optimize=True)
    print(OUT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
