"""Makes the demo images and manifest in this folder (run from the repo root: python manifests/make_demo.py).

The images are drawn here from simple shapes: made for this project, no third-party content, CC0 (public domain).
The manifest uses paths relative to itself, and one image carries three edit prompts (augmentation = several rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def draw(kind: str, size: int = 96) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "sunset":
        sky = np.stack([0.9 - 0.3 * yy, 0.4 + 0.2 * yy, 0.3 + 0.5 * yy], -1)
        img = Image.fromarray((np.clip(sky, 0, 1) * 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        d.ellipse([30, 40, 66, 76], fill=(250, 200, 60))
        d.rectangle([0, 66, size, size], fill=(30, 60, 120))
    elif kind == "house":
        img = Image.new("RGB", (size, size), (150, 200, 240))
        d = ImageDraw.Draw(img)
        d.rectangle([0, 70, size, size], fill=(70, 150, 60))
        d.rectangle([28, 44, 68, 76], fill=(200, 60, 50))
        d.polygon([(22, 46), (48, 22), (74, 46)], fill=(90, 50, 40))
    elif kind == "checkerboard":
        board = ((xx * 6).astype(int) + (yy * 6).astype(int)) % 2
        img = Image.fromarray((np.stack([board * 220, board * 220, 40 + board * 180], -1)).astype(np.uint8))
    else:  # tree
        img = Image.new("RGB", (size, size), (200, 230, 250))
        d = ImageDraw.Draw(img)
        d.rectangle([0, 74, size, size], fill=(90, 160, 70))
        d.rectangle([44, 50, 52, 80], fill=(100, 70, 40))
        d.ellipse([26, 16, 70, 60], fill=(40, 130, 50))
    return img


def main() -> None:
    rows = []
    for kind, fmt in (("sunset", "png"), ("house", "jpg"), ("checkerboard", "png"), ("tree", "jpg")):
        name = f"demo/{kind}.{fmt}"
        draw(kind).save(HERE / name, quality=92) if fmt == "jpg" else draw(kind).save(HERE / name)
        rows.append({"id": kind, "image_url": name, "source_prompt": f"a picture of a {kind}",
                     "edit_prompt": f"a watercolor painting of a {kind}"})
    rows += [
        {"id": "house-winter", "image_url": "demo/house.jpg", "source_prompt": "a picture of a house",
         "edit_prompt": "a picture of a house in winter with snow"},
        {"id": "house-blue", "image_url": "demo/house.jpg", "source_prompt": "a picture of a house",
         "edit_prompt": "a picture of a blue house"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), HERE / "demo.parquet")


if __name__ == "__main__":
    main()
