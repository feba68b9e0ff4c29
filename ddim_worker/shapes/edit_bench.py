"""The edit benchmark of the shapes model: held-out scenes, one edit each, judged from pixels with the known mask.

Two tables. **Inversion methods** (``--methods``): colour edits per inversion method and setting: edit success,
background PSNR, shape IoU, reconstruction PSNR, UNet passes and seconds per edit. **Edits that keep what they
should** (``--kinds``): colour, shape and background edits (``edit_kinds``) per method of keeping: plain, attention
control (Prompt-to-Prompt), PnP Inversion (``pnp``) and its add-source variant (``direct``) with it, masks, null-text with control (``CONTROL_METHODS``). Also the
model's own checks: text-to-image colour match and reconstruction colour kept (edit prompt == source prompt).

    python -m ddim_worker.shapes.edit_bench --model M [--count 24] [--kinds colour,shape,background] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np

from ddim_worker.shapes import scenes as S
from ddim_worker.core.settings import DEFAULTS

HELD_OUT_SEED = 424_242
METHODS = ("ddim", "negative-prompt", "fixed-point:3", "null-text:10", "noise")


def held_out(count: int, seed: int = HELD_OUT_SEED) -> list[S.Scene]:
    """Scenes the model never saw, drawn by PIL (1x and supersampled), as an outside evaluator would."""
    rng = np.random.default_rng(seed)
    return [S.random_scene(rng, renderer=("pil", "pil-ss4")[i % 2], r_range=(10.0, 22.0)) for i in range(count)]


def colour_edits(scenes: list[S.Scene], seed: int = HELD_OUT_SEED) -> list[tuple[S.Scene, str]]:
    """(scene, new colour): every scene's shape gets another palette colour, seeded."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for sc in scenes:
        others = [c for c in S.COLOURS if c != sc.colour]
        out.append((sc, others[rng.integers(len(others))]))
    return out


def judge(image: np.ndarray, source: np.ndarray, scene: S.Scene, target_colour: str) -> dict:
    m = S.mask(scene)
    outside = ~S._dilate(m, 2)
    seg = S.segment(image, scene.background)
    iou = float((seg & m).sum() / max(1, (seg | m).sum()))
    return {"success": S.shape_colour(image, m) == target_colour, "bg_psnr": S.psnr(image, source, outside),
            "iou": iou, "bg_kept": S.background_colour(image, m) == scene.background}


def edit_table(engine, count: int = 24, methods=METHODS, start_steps=(10, 20), guidances=(3.5, 7.5),
               num_steps: int = DEFAULTS.num_steps, measure_fidelity: bool = True, batch: int = 24) -> list[dict]:
    from ddim_worker.core.engine import EditRow

    pairs = colour_edits(held_out(count))
    sources = [S.render(sc) for sc, _ in pairs]
    table = []
    for method, start, w in itertools.product(methods, start_steps, guidances):
        rows = [EditRow(image=src, source_prompt=sc.caption, edit_prompt=sc.with_(colour=new).caption,
                        num_steps=num_steps, start_step=start, guidance_scale=w, inversion_guidance=1.0,
                        inversion=method, seed=i) for i, (src, (sc, new)) in enumerate(zip(sources, pairs))]
        started = time.perf_counter()
        outs = []
        for k in range(0, len(rows), batch):
            outs += engine.edit(rows[k:k + batch], measure_fidelity=measure_fidelity)
        seconds = time.perf_counter() - started
        judged = [judge(o.image, src, sc, new) for o, src, (sc, new) in zip(outs, sources, pairs)]
        table.append({
            "method": method, "start_step": start, "guidance": w,
            "success": float(np.mean([j["success"] for j in judged])),
            "bg_psnr": float(np.mean([j["bg_psnr"] for j in judged])),
            "bg_kept": float(np.mean([j["bg_kept"] for j in judged])),
            "iou": float(np.mean([j["iou"] for j in judged])),
            "rec_psnr": float(np.mean([o.psnr for o in outs])) if measure_fidelity else None,
            # the edit's own passes: inversion (+ null-text's optimisation) and n - s sampling steps; the fidelity
            # resample (measure_fidelity) is measurement, not cost (it is in the seconds, though)
            "unet_passes": float(np.mean([o.inversion_passes + num_steps - start for o in outs])),
            "seconds_per_edit": seconds / len(rows),
        })
        print(row_text(table[-1]), flush=True)
    return table


def reconstruction_check(engine, count: int = 24, start_step: int = 20, num_steps: int = DEFAULTS.num_steps) -> dict:
    """Edit prompt == source prompt through DDIM: colour kept and PSNR against the input."""
    from ddim_worker.core.engine import EditRow

    scenes = held_out(count, HELD_OUT_SEED + 7)
    sources = [S.render(sc) for sc in scenes]
    rows = [EditRow(image=src, source_prompt=sc.caption, edit_prompt=sc.caption, num_steps=num_steps,
                    start_step=start_step, guidance_scale=1.0, inversion_guidance=1.0, seed=i)
            for i, (src, sc) in enumerate(zip(sources, scenes))]
    outs = engine.edit(rows)
    kept = [S.shape_colour(o.image, S.mask(sc)) == sc.colour and S.background_colour(o.image, S.mask(sc)) ==
            sc.background for o, sc in zip(outs, scenes)]
    vae = engine.decode(engine.encode_images(engine.preprocess(sources)))
    vae_kept = [S.shape_colour(v, S.mask(sc)) == sc.colour for v, sc in zip(vae, scenes)]
    return {"colour_kept": float(np.mean(kept)), "psnr": float(np.mean([S.psnr(o.image, s) for o, s in
                                                                        zip(outs, sources)])),
            "vae_psnr": float(np.mean([S.psnr(v, s) for v, s in zip(vae, sources)])),
            "vae_colour_kept": float(np.mean(vae_kept))}


def t2i_check(engine, per_caption: int = 1, num_steps: int = DEFAULTS.num_steps, guidance: float = 7.5, eta: float = 0.0) -> dict:
    """Text-to-image for every caption (54), judged from pixels: shape colour (the pixels unlike the background) and
    background colour (the border) against the prompt; shape by a rough fill-ratio test."""
    from ddim_worker.shapes.sample import text_to_image

    captions = [S.caption(c, s, b) for c in S.COLOURS for s in S.SHAPES for b in S.BACKGROUNDS]
    prompts = [c for c in captions for _ in range(per_caption)]
    images = []
    for k in range(0, len(prompts), 27):
        images.append(text_to_image(engine, prompts[k:k + 27], list(range(k, k + len(prompts[k:k + 27]))),
                                    num_steps, guidance, eta))
    images = np.concatenate(images)
    fg_ok = bg_ok = both = 0
    for img, p in zip(images, prompts):
        colour, shape, background = S.parse_caption(p)
        border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                                 img[:, -2:].reshape(-1, 3)])
        bg = S.nearest(np.median(border.astype(np.float32), 0), S.BACKGROUNDS)
        seg = S.segment(img, bg)
        fg = S.nearest(np.median(img[seg].astype(np.float32), 0), S.COLOURS) if seg.sum() > 8 else None
        fg_ok += fg == colour
        bg_ok += bg == background
        both += fg == colour and bg == background
    n = len(prompts)
    return {"shape_colour": fg_ok / n, "background": bg_ok / n, "both": both / n, "images": images, "prompts": prompts}


#: The ways of keeping what an edit should not change, as per-row settings (the benchmark's second table). The
#: control fractions are the recommended ones (``settings.CONTROL_WHEN_NAMED``), and "p2p 0.8/0.4" the paper's.
def control_methods() -> dict[str, dict]:
    from ddim_worker.core.settings import CONTROL_WHEN_NAMED

    control = dict(CONTROL_WHEN_NAMED)
    return {
        "plain": {},
        "p2p 0.8/0.4": {"cross_replace": 0.8, "self_replace": 0.4},
        "p2p": control,
        "pnp + p2p": {"inversion": "pnp", **control},
        "direct + p2p": {"inversion": "direct", **control},
        "mask": {"mask": "auto"},
        "direct + p2p + mask": {"inversion": "direct", "mask": "auto", **control},
        "null-text + p2p": {"inversion": "null-text:10", **control},
    }


def kinds_table(engine, kinds=("colour", "shape", "background"), methods: dict[str, dict] | None = None,
                count: int = 24, batch: int = 24) -> list[dict]:
    """Every edit kind x method on ``count`` held-out scenes (the same scenes for every method), at the model's
    recommended steps, start step and guidance: the kind's figures (``edit_kinds.judge``), UNet passes (the edit's
    own, its share of the source branch, the mask's) and seconds per edit."""
    from ddim_worker.core.engine import EditRow
    from ddim_worker.shapes.edit_kinds import edits, judge, mask_iou, summarise
    from ddim_worker.shapes.model import edit_settings

    recommended = edit_settings()
    num_steps, start_step = recommended["num_steps"], recommended["start_step"]
    guidance, inversion_guidance = recommended["guidance_scale"], recommended["inversion_guidance"]

    methods = control_methods() if methods is None else methods
    scenes = held_out(count)
    sources = [S.render(sc) for sc in scenes]
    table = []
    for kind in kinds:
        targets = edits(kind, scenes, HELD_OUT_SEED)
        for name, settings in methods.items():
            rows = [EditRow(image=src, source_prompt=sc.caption, edit_prompt=t.caption, num_steps=num_steps,
                            start_step=start_step, guidance_scale=guidance, inversion_guidance=inversion_guidance,
                            seed=i, **settings) for i, (src, sc, t) in enumerate(zip(sources, scenes, targets))]
            started = time.perf_counter()
            outs = []
            for k in range(0, len(rows), batch):
                outs += engine.edit(rows[k:k + batch])
            seconds = time.perf_counter() - started
            figures = summarise([judge(kind, o.image, src, sc, t) for o, src, sc, t in
                                 zip(outs, sources, scenes, targets)])
            if all(o.mask is not None for o in outs):  # how well mask auto found the region to change
                ious = np.array([mask_iou(kind, o.mask, sc, t) for o, sc, t in zip(outs, scenes, targets)])
                figures.update(mask_iou=float(ious.mean()), masks_wrong=float((ious < 0.5).mean()))
            passes = np.mean([o.inversion_passes + o.sampling_passes + o.source_passes + o.mask_passes
                              for o in outs])
            table.append({"kind": kind, "method": name, **figures, "unet_passes": float(passes),
                          "seconds_per_edit": seconds / len(rows)})
            print(kind_text(table[-1]), flush=True)
    return table


#: The columns of each kind's table: (key, heading, format).
KIND_COLUMNS = {
    "colour": [("success", "edit success", ".2f"), ("bg_psnr", "background PSNR (dB)", ".1f"),
               ("iou", "shape IoU", ".2f")],
    "shape": [("success", "edit success", ".2f"), ("bg_psnr", "background PSNR (dB)", ".1f"),
              ("colour_kept", "colour kept", ".2f"), ("centroid_shift", "centroid shift (px, median)", ".2f"),
              ("area_ratio", "area ratio (median)", ".2f")],
    "background": [("success", "edit success", ".2f"), ("colour_kept", "shape colour kept", ".2f"),
                   ("shape_psnr", "shape PSNR (dB)", ".1f"), ("iou", "shape IoU", ".2f"),
                   ("flatness", "flatness (dB)", ".1f")],
}


def kind_header(kind: str) -> str:
    names = [heading for _, heading, _ in KIND_COLUMNS[kind]] + ["UNet passes", "s/edit"]
    return "| method | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1)


def kind_text(r: dict) -> str:
    cells = [format(r[key], fmt) for key, _, fmt in KIND_COLUMNS[r["kind"]]]
    masks = f" (mask IoU {r['mask_iou']:.2f}, wrong {r['masks_wrong']:.2f})" if "mask_iou" in r else ""
    return f"| {r['kind']}: {r['method']} | " + " | ".join(cells) + \
        f" | {r['unet_passes']:.0f} | {r['seconds_per_edit']:.2f} |{masks}"


def row_text(r: dict) -> str:
    rec = f"{r['rec_psnr']:.1f}" if r.get("rec_psnr") is not None else "-"
    return (f"| {r['method']} | {r['start_step']} | {r['guidance']} | {r['success']:.2f} | {r['bg_psnr']:.1f} | "
            f"{r['bg_kept']:.2f} | {r['iou']:.2f} | {rec} | {r['unet_passes']:.0f} | {r['seconds_per_edit']:.2f} |")


HEADER = ("| method | start step | guidance | edit success | background PSNR (dB) | background kept | shape IoU | "
          "reconstruction PSNR (dB) | UNet passes | s/edit |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--start-steps", default="10,20")
    p.add_argument("--guidances", default="3.5,7.5")
    p.add_argument("--no-fidelity", action="store_true")
    p.add_argument("--checks", action="store_true", help="also text-to-image and reconstruction checks")
    p.add_argument("--only-checks", action="store_true")
    p.add_argument("--kinds", default=None, help="edit kinds for the second table (colour,shape,background)")
    p.add_argument("--control-methods", default=None, help="names from control_methods(), comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    from ddim_worker.core.engine import EditEngine

    torch.set_num_threads(args.threads)
    engine = EditEngine.from_pretrained(args.model, device="cpu", dtype="fp32", size=64)
    result: dict = {}
    if args.checks or args.only_checks:
        t0 = time.perf_counter()
        t2i = t2i_check(engine, per_caption=2)
        t2i.pop("images")
        t2i.pop("prompts")
        result["t2i"] = t2i
        result["reconstruction"] = reconstruction_check(engine)
        print(json.dumps(result), f"{time.perf_counter() - t0:.0f}s", flush=True)
    if args.kinds:
        methods = control_methods()
        if args.control_methods:
            methods = {name: methods[name] for name in args.control_methods.split(",")}
        result["kinds"] = kinds_table(engine, args.kinds.split(","), methods, args.count)
    if not args.only_checks and not args.kinds:
        print(HEADER)
        result["edits"] = edit_table(engine, args.count, args.methods.split(","),
                                     [int(s) for s in args.start_steps.split(",")],
                                     [float(g) for g in args.guidances.split(",")],
                                     measure_fidelity=not args.no_fidelity)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
