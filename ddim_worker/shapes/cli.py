"""``ddim-edit`` subcommands of the shapes model and its scorer: ``train-shapes-model``, ``make-shapes-model``,
``train-shapes-scorer``, ``make-shapes-scorer``, ``sample``.

The main CLI wires them with ``add_parsers(subparsers)`` and dispatches ``HANDLERS[args.command](args)``.
"""

from __future__ import annotations

import argparse
import time


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-shapes-model", help="train the shapes model here on CPU (seeded; an hour or more) and "
                                                  "write it as a diffusers folder")
    p.add_argument("path", help="output folder")
    p.add_argument("--work", default=None, help="checkpoints and the training log (default PATH.work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)

    p = sub.add_parser("make-shapes-model", help="write the shipped, trained shapes model as a diffusers folder")
    p.add_argument("path", help="output folder")

    p = sub.add_parser("make-shapes-scorer", help="write the shipped shapes scorer (a small CLIP trained here on the "
                                                  "shapes scenes) as a transformers folder, for --scorer")
    p.add_argument("path", help="output folder")

    p = sub.add_parser("train-shapes-scorer", help="train the shapes scorer here on CPU (seeded; about ten minutes) "
                                                   "and write it as a transformers CLIP folder")
    p.add_argument("path", help="output folder")
    p.add_argument("--work", default=None, help="the training log (default PATH.work)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)

    p = sub.add_parser("sample", help="text-to-image with the engine: DDIM from seeded noise")
    p.add_argument("--model", required=True, help="diffusers folder of an SD 1.x model (e.g. make-shapes-model's)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--out", required=True, help="output folder (sample-SEED.png)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")


def cmd_train_shapes_model(args: argparse.Namespace) -> int:
    from ddim_worker.shapes.train import main

    argv = [args.path, "--seed", str(args.seed), "--threads", str(args.threads)]
    if args.work:
        argv += ["--work", args.work]
    return main(argv)


def cmd_make_shapes_model(args: argparse.Namespace) -> int:
    from ddim_worker.shapes.model import make_shapes_model

    started = time.perf_counter()
    path = make_shapes_model(args.path)
    print(f"wrote the shapes model to {path} in {time.perf_counter() - started:.2f}s")
    return 0


def cmd_make_shapes_scorer(args: argparse.Namespace) -> int:
    from ddim_worker.shapes.scorer import make_shapes_scorer

    started = time.perf_counter()
    path = make_shapes_scorer(args.path)
    print(f"wrote the shapes scorer to {path} in {time.perf_counter() - started:.2f}s")
    return 0


def cmd_train_shapes_scorer(args: argparse.Namespace) -> int:
    from ddim_worker.shapes.train_scorer import main

    argv = [args.path, "--steps", str(args.steps), "--seed", str(args.seed), "--threads", str(args.threads)]
    return main(argv + (["--work", args.work] if args.work else []))


def cmd_sample(args: argparse.Namespace) -> int:
    from ddim_worker.shapes.sample import run_sample

    started = time.perf_counter()
    paths = run_sample(args.model, args.prompt, args.num_images, args.out, seed=args.seed, num_steps=args.num_steps,
                       eta=args.eta, guidance_scale=args.guidance_scale, size=args.size, device=args.device,
                       dtype=args.dtype)
    print(f"wrote {len(paths)} images to {args.out} in {time.perf_counter() - started:.1f}s")
    return 0


HANDLERS = {
    "train-shapes-model": cmd_train_shapes_model,
    "make-shapes-model": cmd_make_shapes_model,
    "make-shapes-scorer": cmd_make_shapes_scorer,
    "train-shapes-scorer": cmd_train_shapes_scorer,
    "sample": cmd_sample,
}


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m ddim_worker.shapes.cli``) until the main CLI wires these in."""
    parser = argparse.ArgumentParser(prog="ddim-edit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    return HANDLERS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
