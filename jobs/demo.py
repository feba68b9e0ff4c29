"""`make demo`: the one-image edit, then the real Ray job on the example manifest, on a local Ray instance.

Uses the tiny random-weight model (no weights can be downloaded here), so the pictures are noise-like; the point is
the whole path: manifest -> fetch -> engine actors -> PNGs, latents, results.parquet, job.json under out/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_worker.cli import main as cli_main
from ddim_worker.job.driver import main as job_main

REPO = Path(__file__).resolve().parents[1]
# Small settings so the demo takes seconds on a laptop CPU; the defaults (512 px, 50 steps, start 10) are the textbook's.
DEMO_SETTINGS = ["--size", "64", "--num-steps", "20", "--start-step", "4"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(REPO / "models" / "tiny"))
    p.add_argument("--output", default=str(REPO / "out"))
    args = p.parse_args(argv)
    out = Path(args.output)
    print("== one image: ddim-edit edit")
    status = cli_main(["edit", str(REPO / "manifests" / "demo" / "house.jpg"),
                       "--source-prompt", "a picture of a house", "--edit-prompt", "a picture of a red house",
                       "--model", args.model, *DEMO_SETTINGS, "--out", str(out / "edit-one.png")])
    if status:
        return status
    print("== the batch job: ddim-edit run manifests/demo.parquet")
    return job_main([str(REPO / "manifests" / "demo.parquet"), "--output", str(out / "demo"), "--model", args.model,
                     *DEMO_SETTINGS, "--batch-size", "4"])


if __name__ == "__main__":
    sys.exit(main())
