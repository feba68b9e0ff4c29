"""Train the shapes scorer: a small CLIP (transformers ``CLIPModel`` + ``CLIPProcessor``) on shapes scenes and their
captions, on CPU, seeded, so that the candidate filter (``--scorer``) can be measured honestly without a download.

Every step draws one scene for each of the 54 captions (so a batch has no two equal captions and CLIP's contrastive
loss has one positive per row), drawn by the four renderers and degraded like the shapes model's edits are (blur,
noise, a little colour drift). Beside the caption loss, a second contrastive loss pairs each scene with another
drawn at the same place and size but with random colour, shape and background, with soft targets (scenes of a
nearby layout count a little, ``layout_targets``): the image embedding then holds the picture's layout as well as
its caption, and its similarity falls smoothly as the layout drifts. A real CLIP knows far more about a picture than its caption says, which is
what its image-image similarity measures; a CLIP that knew only the caption would find a recoloured picture no
closer to its input than any other picture of two of the three words. With the layout in it, an edit that keeps the
layout stays close to its input (InstructPix2Pix's image similarity >= 0.7) and one that moves or grows the shape
does not.

    python -m ddim_worker.shapes.train_scorer PATH [--steps 2000] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ddim_worker.core.scorer import projected
from ddim_worker.shapes import scenes as S

#: Both towers: 64 wide, 3 layers, 4 heads; 64-dim projections (about 0.3 M parameters).
TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
PROJECTION = 64
LAYOUT_WEIGHT = 0.5  # the layout loss beside the caption loss
LAYOUT_TEMPERATURE = 0.1
LAYOUT_SIGMA = 0.06  # of the layout's distance (centre and radius over the side): about 4 px
EVAL_SEED = 424_242
CAPTIONS = [S.caption(c, s, b) for c, s, b in itertools.product(S.COLOURS, S.SHAPES, S.BACKGROUNDS)]


def log(work: Path, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(work / "train.log", "a") as handle:
        handle.write(line + "\n")


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What an edit by the shapes model looks like next to a clean render: softer edges, noise, drifted colours."""
    if rng.random() < 0.5:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2)))))
    out = image.astype(np.float32) + rng.normal(0, rng.uniform(0, 6), image.shape) + rng.normal(0, 8, (1, 1, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def draw(rng: np.random.Generator, captions: list[str],
         clean: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene per caption, and one more of each at the same place and size with random words: images
    (n, 64, 64, 3) uint8 each, and the layouts (n, 3): centre x, centre y, radius over the picture's side."""
    images, twins, layouts = [], [], []
    for text in captions:
        colour, shape, background = S.parse_caption(text)
        scene = S.random_scene(rng, renderer=str(rng.choice(S.RENDERERS))).with_(colour=colour, shape=shape,
                                                                                 background=background)
        other = S.random_scene(rng, renderer=str(rng.choice(S.RENDERERS)))
        twin = scene.with_(colour=other.colour, shape=other.shape, background=other.background)
        for out, item in ((images, scene), (twins, twin)):
            image = S.render(item)
            out.append(image if clean else degrade(image, rng))
        layouts.append((scene.cx / S.SIZE, scene.cy / S.SIZE, scene.r / S.SIZE))
    return np.stack(images), np.stack(twins), np.asarray(layouts, np.float32)


def layout_targets(layouts: np.ndarray) -> torch.Tensor:
    """Soft targets of the image-image loss: each scene's twin most, scenes of a nearby layout a little (a Gaussian
    of the layouts' distance), so that similarity falls smoothly as a shape moves or grows, as a real CLIP's does,
    rather than at the first pixel."""
    g = torch.from_numpy(layouts)
    return torch.softmax(-torch.cdist(g, g).pow(2) / (2 * LAYOUT_SIGMA ** 2), dim=-1)


def pixel_values(processor, images: np.ndarray) -> torch.Tensor:
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


@torch.no_grad()
def evaluate(model, processor, tokens: dict, seed: int = EVAL_SEED, n: int = 4) -> dict[str, float]:
    """Held-out scenes (clean and degraded): how often the image's nearest caption is its own, per attribute."""
    rng = np.random.default_rng(seed)
    text = F.normalize(projected(model.get_text_features(**tokens)), dim=-1)
    hits = {"caption": 0, "colour": 0, "shape": 0, "background": 0}
    total = 0
    for k in range(n):
        images, _, _ = draw(rng, CAPTIONS, clean=k % 2 == 0)
        image = F.normalize(projected(model.get_image_features(pixel_values=pixel_values(processor, images))), dim=-1)
        best = (image @ text.T).argmax(-1).tolist()
        for i, j in enumerate(best):
            truth, guess = S.parse_caption(CAPTIONS[i]), S.parse_caption(CAPTIONS[j])
            hits["caption"] += truth == guess
            for name, a, b in zip(("colour", "shape", "background"), truth, guess):
                hits[name] += a == b
        total += len(best)
    return {name: round(count / total, 4) for name, count in hits.items()}


def train(path: Path, work: Path, steps: int, seed: int, lr: float = 2e-3) -> dict[str, float]:
    from ddim_worker.tiny_model import build_clip_scorer

    work.mkdir(parents=True, exist_ok=True)
    (work / "train.log").unlink(missing_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, processor = build_clip_scorer(seed, projection_dim=PROJECTION, tower=TOWER)
    tokens = processor(text=CAPTIONS, padding=True, return_tensors="pt")
    params = list(model.parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    log(work, f"train shapes scorer: {sum(p.numel() for p in model.parameters()):,} parameters, {steps} steps of "
              f"{len(CAPTIONS)} scenes, seed {seed}, {torch.get_num_threads()} threads")
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        for group in optimiser.param_groups:
            warm = min(1.0, (step + 1) / 100)
            group["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        images, twins, layouts = draw(rng, CAPTIONS)
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pixel_values(processor, images), return_loss=True)
        twin = F.normalize(projected(model.get_image_features(pixel_values=pixel_values(processor, twins))), dim=-1)
        logits = out.image_embeds @ twin.T / LAYOUT_TEMPERATURE
        target = layout_targets(layouts)
        layout = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        loss = out.loss + LAYOUT_WEIGHT * layout
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if step % 250 == 0 or step == steps - 1:
            model.eval()
            figures = evaluate(model, processor, tokens)
            model.train()
            log(work, f"step {step}: caption {out.loss.item():.4f} layout {layout.item():.4f} "
                      f"held-out {json.dumps(figures)} ({time.perf_counter() - started:.0f}s)")
    model.eval()
    figures = evaluate(model, processor, tokens)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.copy2(work / "train.log", tmp / "train.log")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    log(work, f"wrote {path}: held-out {json.dumps(figures)} in {time.perf_counter() - started:.0f}s")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddim_worker.shapes.train_scorer")
    parser.add_argument("path", help="output folder (a transformers CLIP folder)")
    parser.add_argument("--work", default=None, help="the training log (default PATH.work)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.path)
    train(path, Path(args.work) if args.work else path.with_name(path.name + ".work"), args.steps, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
