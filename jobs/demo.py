"""`make demo`: the shapes model edits a shipped manifest of scenes with the real Ray job, on a local Ray instance.

The shapes model (``ddim-edit make-shapes-model``: weights trained here and shipped in the package) knows one world:
a shape of one colour on a plain background. The demo edits colours, shapes and backgrounds with the model's
recommended settings (direct inversion with Prompt-to-Prompt attention control; the manifest's rows add a mask to
colour and background edits and drop the control for background edits), then shows the results in
``out/shapes/report.html`` and ``out/shapes/contact-sheet.png`` (input | edited | mask). With ``--scorer`` (the
Makefile passes the shapes scorer) each row is edited four times, its candidates drawing their attention control,
and the scorer keeps the best edit that passes; rows none passes are marked ``[filtered]`` on the contact sheet and
left out of ``out/shapes/dataset``. First it edits one scene with ``ddim-edit edit``, and it ends with text-to-image
(``ddim-edit sample``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_worker.cli import main as cli_main
from ddim_worker.job.driver import main as job_main
from ddim_worker.shapes.model import edit_settings

REPO = Path(__file__).resolve().parents[1]


def settings_flags() -> list[str]:
    """The shapes model's recommended edit settings as flags (``--num-steps 50 --start-step 20 ...``)."""
    from ddim_worker.job.config import all_fields

    known = all_fields()
    return [item for name, value in edit_settings().items() if name in known
            for item in ("--" + name.replace("_", "-"), str(value))]


def filter_flags(scorer: str | None) -> list[str]:
    """Four candidates per row and the scorer (a call of 5 holds a row's candidates and their source branch)."""
    if not scorer:
        return ["--batch-size", "4"]
    return ["--candidates", "4", "--sample-cross-replace", "0.2:1", "--sample-self-replace", "0.2:1",
            "--scorer", scorer, "--batch-size", "5"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "shapes"))
    p.add_argument("--output", default=str(REPO / "out"))
    p.add_argument("--scorer", default=None, help="a CLIP folder (make-shapes-scorer's): candidates and the filter")
    args = p.parse_args(argv)
    out = Path(args.output)
    flags = settings_flags()
    print("== one image: ddim-edit edit (a red circle becomes blue)")
    status = cli_main(["edit", str(REPO / "manifests" / "shapes" / "red-circle.png"),
                       "--source-prompt", "a red circle on a white background",
                       "--edit-prompt", "a blue circle on a white background", "--model", args.model, *flags,
                       "--out", str(out / "edit-one.png")])
    if status:
        return status
    print("== the batch job: ddim-edit run manifests/shapes.parquet")
    status = job_main([str(REPO / "manifests" / "shapes.parquet"), "--output", str(out / "shapes"), "--model",
                       args.model, *flags, *filter_flags(args.scorer), "--overwrite"])  # a fresh demo every time
    if status:
        return status
    print("== text-to-image: ddim-edit sample")
    return cli_main(["sample", "--model", args.model, "--prompt", "a green triangle on a black background",
                     "--num-images", "4", "--out", str(out / "samples")])


if __name__ == "__main__":
    sys.exit(main())
