"""Plain edits (no attention control, no mask) on the shipped shapes model, and the digests of their outputs.

``tests/data/plain_edits.json`` holds the digests the engine gave *before* the call-plan rewrite (recorded with
``python -m tests.support.plain_reference --write``), so a test can tell whether a plain edit is still the same bytes.
Bytes are defined per CPU kernel set and thread count: the file records both, and the test compares only where they
match (one thread, as a CPU actor runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "plain_edits.json"
BATCH = 3  # fixed engine batch size: every call padded to 3 rows, as the job runs


def machine() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def scene_images() -> list[np.ndarray]:
    from ddim_worker.shapes import scenes as S

    rng = np.random.default_rng(7)
    return [S.render(S.random_scene(rng, renderer="pil")) for _ in range(4)]


def cases(images: list[np.ndarray]) -> dict[str, list]:
    """Named lists of rows, each list edited in one ``engine.edit`` call."""
    from ddim_worker.engine import EditRow

    src = ["a red circle on a white background", "a blue square on a gray background"]

    def row(i: int, **kw) -> EditRow:
        base = dict(image=images[i], source_prompt=src[i % 2], edit_prompt=src[(i + 1) % 2], num_steps=10,
                    start_step=4, guidance_scale=3.5, inversion_guidance=1.0, seed=i)
        base.update(kw)
        return EditRow(**base)

    return {
        "mixed": [row(0), row(1, guidance_scale=1.0), row(2, eta=0.5), row(3, inversion_guidance=3.5),
                  row(0, edit_prompt="a green circle on a white background")],
        "methods": [row(0, inversion="negative-prompt"), row(1, inversion="fixed-point:1"),
                    row(2, inversion="noise"), row(3, inversion="null-text:2", num_steps=6, start_step=3)],
        "deeper": [row(2, start_step=2, negative_prompt="blurry")],
    }


def digests(outputs: list) -> list[dict[str, str]]:
    def sha(array: np.ndarray | torch.Tensor) -> str:
        data = array.numpy() if isinstance(array, torch.Tensor) else array
        return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()[:16]

    return [{"image": sha(o.image), "trajectory": sha(o.trajectory.latents),
             "passes": f"{o.inversion_passes}/{o.sampling_passes}"} for o in outputs]


def run_cases(model: Path, batch_size: int | None = BATCH) -> dict[str, list]:
    from ddim_worker.engine import EditEngine

    engine = EditEngine.from_pretrained(str(model), size=64, batch_size=batch_size)
    out = {}
    for name, rows in cases(scene_images()).items():
        out[name] = digests(engine.edit(rows))
    return out


def record(model: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"machine": machine(), "fixed_batch": run_cases(model), "unbatched": run_cases(model, None)}
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--write", action="store_true", help=f"write {REFERENCE}")
    args = p.parse_args(argv)
    from ddim_worker.shapes.model import make_shapes_model

    with tempfile.TemporaryDirectory() as tmp:
        result = record(make_shapes_model(Path(tmp) / "shapes"))
    text = json.dumps(result, indent=1)
    if args.write:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
