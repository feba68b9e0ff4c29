"""Makes the shapes demo's images and manifest in this folder (run from the repo root: python manifests/make_shapes_demo.py).

Scenes of the shapes model's world (one shape of one colour on a plain background, 64 x 64), drawn here, CC0: edits of
the colour, the shape and the background, and one scene with three edit prompts (augmentation: several rows). Each row
carries the settings the shapes model recommends for its kind of edit (``edit_settings.json``'s ``per_edit``: masks
for colour and background edits, no attention control for background edits) as per-row columns.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ddim_worker.shapes.model import edit_settings  # noqa: E402
from ddim_worker.shapes.scenes import Scene, caption, render  # noqa: E402

#: The per-row setting columns (null where a kind keeps the job's setting).
SETTING_COLUMNS = ("inversion", "cross_replace", "self_replace", "mask")

#: (name, scene, [(what changes, the edited scene's colour, shape, background), ...])
SCENES = [
    ("red-circle", Scene("red", "circle", "white", 30.0, 34.0, 16.0),
     [("colour", "blue", "circle", "white"), ("shape", "red", "square", "white"),
      ("background", "red", "circle", "black")]),
    ("yellow-square", Scene("yellow", "square", "gray", 34.0, 30.0, 14.0), [("colour", "purple", "square", "gray")]),
    ("green-triangle", Scene("green", "triangle", "white", 32.0, 33.0, 18.0),
     [("colour", "orange", "triangle", "white")]),
    ("blue-square", Scene("blue", "square", "black", 30.0, 32.0, 13.0), [("background", "blue", "square", "white")]),
    ("orange-circle", Scene("orange", "circle", "gray", 33.0, 31.0, 15.0), [("colour", "green", "circle", "gray")]),
]


def main() -> None:
    folder = HERE / "shapes"
    folder.mkdir(exist_ok=True)
    rows = []
    per_edit = edit_settings()["per_edit"]
    for name, scene, edits in SCENES:
        Image.fromarray(render(scene)).save(folder / f"{name}.png")
        for what, colour, shape, background in edits:
            rows.append({"id": f"{name}-{what}-{colour}-{shape}-{background}", "image_url": f"shapes/{name}.png",
                         "source_prompt": scene.caption, "edit_prompt": caption(colour, shape, background),
                         "edit": what, **{k: per_edit[what].get(k) for k in SETTING_COLUMNS}})
    schema = pa.schema([("id", pa.string()), ("image_url", pa.string()), ("source_prompt", pa.string()),
                        ("edit_prompt", pa.string()), ("edit", pa.string()), ("inversion", pa.string()),
                        ("cross_replace", pa.float64()), ("self_replace", pa.float64()), ("mask", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), HERE / "shapes.parquet")
    print(f"{len(rows)} rows, {len(SCENES)} images -> {HERE / 'shapes.parquet'}")


if __name__ == "__main__":
    main()
