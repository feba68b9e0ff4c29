"""Plain edits (no attention control, no mask) on the shipped shapes model: their digests and their latents.

``tests/data/plain_edits.json`` holds the digests the engine gave *before* the call-plan rewrite (recorded with
``python -m tests.support.plain_reference --write``), so a test can tell whether a plain edit is still the same bytes.
Bytes are defined per CPU kernel set and thread count: the file records both, and the test compares only where they
match (one thread, as a CPU actor runs).

``tests/data/plain_latents.npz`` holds each plain edit's sampled x0 latent (float32, (rows, 4, 8, 8) per case, about
10 KB), recorded with ``--write-latents`` by the engine before the plan/executor split, on the machine named in
``plain_latents.json`` (torch, CPU capability and model name, one thread). Other machines compare within
``LATENT_ATOL``: why that figure, see its comment.
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
LATENTS = REFERENCE.with_name("plain_latents.npz")
LATENTS_MACHINE = REFERENCE.with_name("plain_latents.json")
#: Max abs difference allowed between a plain edit's x0 latent and the recorded one off the recording machine. The
#: latents reach |4|; on one machine a change of kernel shapes alone (batch 3 padded vs unbatched) moved them by at
#: most 6e-6, while a real change (sampling guidance 1 % lower) moved every guided row by 4.5e-3 to 2.8e-2: 2e-4 is
#: 30 times the float noise and 20 times under the smallest real change measured.
LATENT_ATOL = 2e-4
BATCH = 3  # fixed engine batch size: every call padded to 3 rows, as the job runs


def machine() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def latent_machine() -> dict[str, str]:
    """What the latents' bytes depend on besides the code: torch, the CPU's kernel set and model, one thread."""
    return {**machine(), "cpu_model": cpu_model(), "threads": "1"}


def scene_images() -> list[np.ndarray]:
    from ddim_worker.shapes import scenes as S

    rng = np.random.default_rng(7)
    return [S.render(S.random_scene(rng, renderer="pil")) for _ in range(4)]


def cases(images: list[np.ndarray]) -> dict[str, list]:
    """Named lists of rows, each list edited in one ``engine.edit`` call."""
    from ddim_worker.core.engine import EditRow

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


def run_outputs(model: Path, batch_size: int | None = BATCH) -> dict[str, list]:
    """Every case's outputs, one ``engine.edit`` call per case."""
    from ddim_worker.core.engine import EditEngine

    engine = EditEngine.from_pretrained(str(model), size=64, batch_size=batch_size)
    return {name: engine.edit(rows) for name, rows in cases(scene_images()).items()}


def run_cases(model: Path, batch_size: int | None = BATCH) -> dict[str, list]:
    return {name: digests(outputs) for name, outputs in run_outputs(model, batch_size).items()}


def record(model: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"machine": machine(), "fixed_batch": run_cases(model), "unbatched": run_cases(model, None)}
    finally:
        torch.set_num_threads(threads)


def latents(outputs: dict[str, list]) -> dict[str, np.ndarray]:
    """Each case's x0 latents, (rows, C, h, w) float32, and its passes as (rows, 2) int (inversion, sampling)."""
    out = {}
    for name, outs in outputs.items():
        out[name] = np.stack([o.latent.numpy() for o in outs]).astype(np.float32)
        out[f"{name}:passes"] = np.array([[o.inversion_passes, o.sampling_passes] for o in outs], dtype=np.int64)
    return out


def record_latents(model: Path, batch_size: int | None = BATCH) -> dict[str, np.ndarray]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return latents(run_outputs(model, batch_size))
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--write", action="store_true", help=f"write {REFERENCE}")
    p.add_argument("--write-latents", action="store_true", help=f"write {LATENTS} and {LATENTS_MACHINE}")
    args = p.parse_args(argv)
    from ddim_worker.shapes.model import make_shapes_model

    if args.write_latents:
        with tempfile.TemporaryDirectory() as tmp:
            arrays = record_latents(make_shapes_model(Path(tmp) / "shapes"))
        np.savez(LATENTS, **arrays)
        LATENTS_MACHINE.write_text(json.dumps({"machine": latent_machine(), "batch_size": BATCH}, indent=1) + "\n")
        print(json.dumps({k: list(v.shape) for k, v in arrays.items()}))
        return 0
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
