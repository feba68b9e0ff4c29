"""Inversion quality per method: reconstruction fidelity and cost over a fixed set of images and settings.

    python jobs/quality.py --arch tiny [--device cpu] [--json PATH]

Each image is inverted under its source prompt and resampled with the *same* prompt, so a perfect inversion gives
the input back: PSNR/SSIM against the preprocessed input, MSE against the encoded latent. Random-weight models
(no downloads here) have a VAE that cannot reproduce pixels, so on them the latent MSE is the telling column.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from ddim_worker.core.settings import DEFAULTS
from ddim_worker.synthetic import pictures

METHODS = ("ddim", "negative-prompt", "fixed-point:1", "fixed-point:3", "null-text:10", "noise")
#: The fixed settings: few steps and guidance above 1 (the defaults' guidance), where plain DDIM inversion drifts the
#: most.
SETTINGS = {"num_steps": 20, "start_step": 4, "guidance_scale": DEFAULTS.guidance_scale,
            "inversion_guidance": DEFAULTS.inversion_guidance}


def quality_table(engine, methods=METHODS, settings=SETTINGS, count: int = 4) -> list[dict]:
    from ddim_worker.core.engine import EditRow

    images = pictures(count, engine.size, seed=1)  # deterministic: the same pictures on every run
    table = []
    for method in methods:
        rows = [EditRow(image, "a picture", "a picture", inversion=method, seed=i, **settings)
                for i, image in enumerate(images)]
        started = time.perf_counter()
        outs = engine.edit(rows, measure_fidelity=True)
        seconds = time.perf_counter() - started
        n, s = settings["num_steps"], settings["start_step"]
        table.append({
            "method": method,
            "psnr_db": float(np.mean([o.psnr for o in outs])),
            "ssim": float(np.mean([o.ssim for o in outs])),
            "latent_mse": float(np.mean([o.latent_mse for o in outs])),
            "inversion_passes": outs[0].inversion_passes,
            "sampling_passes": n - s,  # the edit itself; the fidelity resample is measurement, not cost
            "seconds_per_image": seconds / len(rows),
        })
    return table


def markdown(table: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| method | PSNR (dB) | SSIM | latent MSE | inversion passes | sampling passes | "
             "s/image |", "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['latent_mse']:.5f} | "
                     f"{r['inversion_passes']} | {r['sampling_passes']} | {r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", help="tiny | small | sd15 (random weights, built locally)")
    p.add_argument("--model", default=None, help="a real model folder or hub id instead of --arch")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from ddim_worker.core.engine import EditEngine
    from ddim_worker.tiny_model import ARCHS, make_model

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(make_model(Path(tmp) / args.arch, args.arch))
        size = ARCHS[args.arch]["size"] if not args.model else 512
        engine = EditEngine.from_pretrained(model, device=args.device, dtype=args.dtype, size=size)
        table = quality_table(engine)
    title = (f"Inversion quality, {args.model or args.arch} model, {engine.device} {str(engine.dtype)[6:]}, "
             f"n={SETTINGS['num_steps']} s={SETTINGS['start_step']} w={SETTINGS['guidance_scale']}")
    print(markdown(table, title))
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "settings": SETTINGS, "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
