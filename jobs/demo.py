"""`make demo`: the shapes model edits a shipped manifest of scenes with the real Ray job, on a local Ray instance.

The shapes model (``ddim-edit make-shapes-model``: weights trained here and shipped in the package) knows one world:
a shape of one colour on a plain background. The demo edits colours, shapes and backgrounds with the model's
recommended settings (direct inversion with Prompt-to-Prompt attention control; the manifest's rows add a mask to
colour and background edits and drop the control for background edits), then shows the results in
``out/shapes/report.html`` and ``out/shapes/contact-sheet.png`` (input | edited | mask). With ``--scorer`` (the
Makefile passes the shapes scorer) each row is edited four times, its candidates drawing their attention control
(colour and shape edits) or their noise (background edits, ``candidates_per_edit``), and the scorer keeps the best
edit that passes; rows none passes are marked ``[filtered]`` on the contact sheet and
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
    return ["--candidates", "4", "--scorer", scorer, "--batch-size", "5"]


def candidates_manifest(out: Path) -> Path:
    """The shipped manifest with each row's candidate draws for its kind of edit as columns (the shapes model's
    ``candidates_per_edit``: colour and shape edits draw their attention control, background edits their noise),
    written under the output beside a copy of its images (a manifest reads local files in its own folder only)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    draws = edit_settings()["candidates_per_edit"]
    rows = pq.read_table(REPO / "manifests" / "shapes.parquet").to_pylist()
    names = sorted({name for values in draws.values() for name in values})
    for row in rows:
        row.update({name: draws[row["edit"]].get(name) for name in names})
    folder = out / "manifest"
    shutil.copytree(REPO / "manifests" / "shapes", folder / "shapes", dirs_exist_ok=True)
    path = folder / "shapes-candidates.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


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
    manifest = candidates_manifest(out) if args.scorer else REPO / "manifests" / "shapes.parquet"
    print(f"== the batch job: ddim-edit run {manifest}")
    status = job_main([str(manifest), "--output", str(out / "shapes"), "--model",
                       args.model, *flags, *filter_flags(args.scorer), "--overwrite"])  # a fresh demo every time
    if status:
        return status
    print("== text-to-image: ddim-edit sample")
    return cli_main(["sample", "--model", args.model, "--prompt", "a green triangle on a black background",
                     "--num-images", "4", "--out", str(out / "samples")])


if __name__ == "__main__":
    sys.exit(main())
