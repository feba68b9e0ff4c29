"""What one inversion per image saves in the job: an augmentation manifest against one of distinct images.

    python jobs/grouping_benchmark.py [--arch small] [--images 8] [--edits 4] [--json PATH]

Two manifests with the same number of rows, run side by side through the real job on one local Ray instance:
``augment`` (``--images`` images x ``--edits`` edit prompts: one inversion serves ``--edits`` rows) and ``distinct``
(images x edits distinct images, one edit each). Reported per job: steady rows/s (from the PNGs' times, start-up
excluded), the UNet samples the job ran (padding included) and the ideal count for its work, from ``job.json``.
The order is augment, distinct, distinct, augment, so that drift on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from ddim_worker.bench.jobs import steady_rows_per_s
from ddim_worker.synthetic import pictures

#: The issue's setting: the small model at 128 px, 20 steps, start step 4, batch size 4, CFG 3.5 both ways.
SETTINGS = dict(num_steps=20, start_step=4, batch_size=4)


def manifests(root: Path, images: int, edits: int, size: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = images * edits
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(pictures(total, size, seed=7)):
        Image.fromarray(pixels).save(root / "img" / f"p{i}.png")
    augment = [{"id": f"a{i}-{k}", "image_url": f"img/p{i}.png", "source_prompt": "a picture",
                "edit_prompt": f"a picture, variant {k}"} for i in range(images) for k in range(edits)]
    distinct = [{"id": f"d{i}", "image_url": f"img/p{i}.png", "source_prompt": "a picture",
                 "edit_prompt": f"a picture, variant {i % edits}"} for i in range(total)]
    out = {}
    for name, rows in (("augment", augment), ("distinct", distinct)):
        out[name] = root / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), out[name])
    return out


def run(arch: str, images: int, edits: int, work: Path) -> dict[str, Any]:
    import ray

    from ddim_worker.job.config import JobConfig
    from ddim_worker.job.driver import run_job
    from ddim_worker.tiny_model import ARCHS, make_model

    size = ARCHS[arch]["size"]
    model = make_model(work / arch, arch)
    paths = manifests(work, images, edits, size)
    # a new local instance (never a cluster left running on this machine): 2 cores + 2 slots for the I/O stages
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {"augment": [], "distinct": []}
    for k, name in enumerate(("augment", "distinct", "distinct", "augment")):
        out = work / f"out-{k}-{name}"
        summary = run_job(JobConfig.from_flat(dict(manifest=str(paths[name]), output=str(out), model=str(model),
                                                   size=size, report=False, cpus_per_actor=2, **SETTINGS)))
        best, mean = steady_rows_per_s(out / "images", SETTINGS["batch_size"] * summary["config"]["calls_per_task"])
        runs[name].append({"steady_rows_per_s": mean, "best_rows_per_s": best,
                           "unet_samples": summary["unet_samples"], "ideal_unet_samples": summary["ideal_unet_samples"],
                           "inversions": summary["inversions"], "rows": summary["computed"],
                           "wall_seconds": summary["wall_seconds"]})
    ray.shutdown()
    mean = {name: sum(r["steady_rows_per_s"] or 0 for r in rs) / len(rs) for name, rs in runs.items()}
    return {"arch": arch, "size": size, "images": images, "edits": edits, "settings": SETTINGS, "runs": runs,
            "augment_vs_distinct": mean["augment"] / mean["distinct"] if mean["distinct"] else None}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Grouping in the job: {report['images']} images x {report['edits']} edit prompts against "
             f"{report['images'] * report['edits']} distinct images, `{report['arch']}` model at {report['size']} px, "
             f"{report['settings']}",
             "", "| job | steady rows/s | UNet samples run | ideal | inversions |", "|---|---|---|---|---|"]
    for name, rs in report["runs"].items():
        for r in rs:
            lines.append(f"| {name} | {r['steady_rows_per_s'] or 0:.3f} | {r['unet_samples']} | "
                         f"{r['ideal_unet_samples']} | {r['inversions']} |")
    lines += ["", f"augment / distinct, steady rows/s: **{report['augment_vs_distinct']:.2f}x** (ideal 1.6x)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="small")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--edits", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args.arch, args.images, args.edits, Path(tmp))
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
