"""``ddim-edit``: the command line. Subcommands: ``run`` (the Ray job), ``edit`` (one image), ``make-tiny-model``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def _edit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="edit one image, as the textbook's edit(): invert under the source prompt, "
                                    "sample under the edit prompt")
    p.add_argument("image", help="input image file")
    p.add_argument("--source-prompt", required=True, help="a description of the input image")
    p.add_argument("--edit-prompt", required=True, help="a description of the wanted image (not an instruction)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--model", required=True, help="diffusers folder, hub id or s3:// folder of an SD 1.x model")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--start-step", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.5, help="CFG scale while sampling")
    p.add_argument("--inversion-guidance", type=float, default=3.5, help="CFG scale while inverting")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", required=True, help="output PNG path")


def cmd_edit(args: argparse.Namespace) -> int:
    from ddim_worker.engine import EditEngine, EditRow
    from ddim_worker.images import ImageError, decode_image, encode_png

    try:
        image = decode_image(Path(args.image).read_bytes())
    except (OSError, ImageError) as exc:
        print(f"error: cannot read {args.image}: {exc}", file=sys.stderr)
        return 2
    engine = EditEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, size=args.size)
    row = EditRow(image, args.source_prompt, args.edit_prompt, negative_prompt=args.negative_prompt,
                  num_steps=args.steps, start_step=args.start_step, guidance_scale=args.guidance,
                  inversion_guidance=args.inversion_guidance, seed=args.seed, eta=args.eta)
    started = time.perf_counter()
    try:
        [out] = engine.edit([row])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = {"source_prompt": row.source_prompt, "edit_prompt": row.edit_prompt, "model": args.model,
            "settings": f"steps={row.num_steps} start_step={row.start_step} guidance={row.guidance_scale} "
                        f"inversion_guidance={row.inversion_guidance} seed={row.seed} eta={row.eta}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(encode_png(out.image, text))
    print(f"wrote {args.out} ({out.image.shape[1]}x{out.image.shape[0]}) in {time.perf_counter() - started:.2f}s, "
          f"{out.inversion_passes + out.sampling_passes} UNet passes")
    return 0


def _tiny_parser(sub: argparse._SubParsersAction) -> None:
    from ddim_worker.tiny_model import ARCHS

    p = sub.add_parser("make-tiny-model", help="build a random-weight SD-shaped pipeline locally (for tests/demo)")
    p.add_argument("path")
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHS))
    p.add_argument("--seed", type=int, default=0)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from ddim_worker.tiny_model import make_model

    path = make_model(args.path, args.arch, args.seed)
    print(f"model ({args.arch}) at {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="ddim-edit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the Ray batch job on a manifest (see `ddim-edit run --help`)", add_help=False)
    _edit_parser(sub)
    _tiny_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from jobs.edit import main as run_main

        return run_main(argv[1:])
    args = parser.parse_args(argv)
    handlers = {"edit": cmd_edit, "make-tiny-model": cmd_make_tiny_model}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
