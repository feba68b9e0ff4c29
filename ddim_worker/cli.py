"""``ddim-edit``: the command line.

Subcommands: ``run`` (the Ray batch job on a manifest), ``edit`` (one image), ``sample`` (text-to-image),
``make-tiny-model`` (a random-weight SD-shaped model for tests), the shapes model's ``make-shapes-model`` and
``train-shapes-model``, and its scorer's ``make-shapes-scorer`` and ``train-shapes-scorer``. Edit settings have the same names everywhere: ``--num-steps`` here, ``num_steps`` in a
manifest column or a config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ddim_worker.core.settings import EditSettings, EngineSettings, SettingError


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("ddim-edit")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _settings_arguments(parser: argparse.ArgumentParser, fields: list[str] | None = None) -> None:
    from ddim_worker.job.args import add_field_argument

    group = parser.add_argument_group("edit settings")
    for spec in dataclasses.fields(EditSettings):
        add_field_argument(group, spec.name, spec)
    engine = parser.add_argument_group("engine")
    for spec in dataclasses.fields(EngineSettings):
        if fields is None or spec.name in fields:
            add_field_argument(engine, spec.name, spec)


def _edit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="edit one image: invert under the source prompt, sample under the edit prompt",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("image", help="input image file")
    p.add_argument("--source-prompt", required=True, help="a description of the input image")
    p.add_argument("--edit-prompt", required=True, help="a description of the wanted image (not an instruction)")
    p.add_argument("--model", required=True, help="diffusers folder, Hub id or s3:// folder of an SD 1.x model")
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    p.add_argument("--variant", default=None, help="weights variant of --model, e.g. fp16")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output PNG path")
    _settings_arguments(p, ["size", "dtype"])


def _pick(kind: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in vars(args).items() if k in names})


def cmd_edit(args: argparse.Namespace) -> int:
    from ddim_worker.core.engine import EditEngine, EditRow
    from ddim_worker.core.images import ImageError, decode_image, encode_png
    from ddim_worker.model_source import local_model_path
    from ddim_worker.core.models import ModelLoadError

    try:
        settings, engine_settings = _pick(EditSettings, args), _pick(EngineSettings, args)
    except SettingError as exc:
        print(f"ddim-edit edit: error: {exc}", file=sys.stderr)
        return 2
    try:
        image = decode_image(Path(args.image).read_bytes())
    except (OSError, ImageError) as exc:
        print(f"ddim-edit edit: error: cannot read {args.image}: {exc}", file=sys.stderr)
        return 2
    try:
        engine = EditEngine.from_pretrained(local_model_path(args.model), device=args.device, dtype=engine_settings.dtype,
                                            size=engine_settings.size, revision=args.revision, variant=args.variant)
    except ModelLoadError as exc:
        print(f"ddim-edit edit: error: {exc}", file=sys.stderr)
        return 2
    row = EditRow.from_settings(image, args.source_prompt, args.edit_prompt, settings)
    started = time.perf_counter()
    try:
        [out] = engine.edit([row])
    except ValueError as exc:
        print(f"ddim-edit edit: error: {exc}", file=sys.stderr)
        return 2
    text = {"source_prompt": row.source_prompt, "edit_prompt": row.edit_prompt, "model": args.model,
            "settings": " ".join(f"{k}={v}" for k, v in settings.as_dict().items() if k != "negative_prompt")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(encode_png(out.image, text))
    print(f"wrote {args.out} ({out.image.shape[1]}x{out.image.shape[0]}) in {time.perf_counter() - started:.2f}s, "
          f"{out.inversion_passes + out.sampling_passes} UNet passes")
    return 0


def _tiny_parser(sub: argparse._SubParsersAction) -> None:
    from ddim_worker.tiny_model import ARCHS

    p = sub.add_parser("make-tiny-model", help="build a random-weight SD-shaped pipeline locally (for tests)")
    p.add_argument("path")
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHS))
    p.add_argument("--seed", type=int, default=0)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from ddim_worker.tiny_model import make_model

    path = make_model(args.path, args.arch, args.seed)
    print(f"model ({args.arch}) at {path}")
    return 0


def _shapes_cli() -> Any:
    """The shapes model's subcommands (train, make, sample), where that package is present."""
    try:
        from ddim_worker.shapes import cli as shapes_cli
    except ImportError:
        return None
    return shapes_cli


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="ddim-edit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ddim-edit {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the Ray batch job on a manifest (see `ddim-edit run --help`)", add_help=False)
    sub.add_parser("pack", help="pack an earlier run's edited dataset into OUTPUT/dataset (see `ddim-edit pack "
                                "--help`)", add_help=False)
    _edit_parser(sub)
    _tiny_parser(sub)
    handlers = {"edit": cmd_edit, "make-tiny-model": cmd_make_tiny_model}
    shapes = _shapes_cli()
    if shapes is not None:
        shapes.add_parsers(sub)
        handlers.update(shapes.HANDLERS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from ddim_worker.job.driver import main as run_main

        return run_main(argv[1:])
    if argv[:1] == ["pack"]:
        from ddim_worker.job.pack_command import main as pack_main

        return pack_main(argv[1:])
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
