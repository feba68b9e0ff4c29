"""The edits-that-keep benchmark through the real job: held-out scenes as PNG files and a manifest, ``ddim-edit run``
once per method (as a user runs it: a local Ray, the CLI's flags), its output PNGs judged by ``edit_kinds``.

Colour, shape and background edits of the same held-out scenes (drawn by PIL, a seed the in-process benchmark does
not use) are rows of one manifest; each method is one job over it. A last job edits every image with three colour
prompts under attention control and direct inversion and reads job.json: one inversion and one source branch per
image, so the UNet samples run equal the ideal.

    python -m ddim_worker.shapes.job_bench --model M --work DIR [--count 24] [--json OUT] [--scorer CLIP]

With ``--scorer`` one more job makes four candidates per row and keeps what the scorer passes (``filter_check``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ddim_worker.outputs import OutputLayout
from ddim_worker.shapes import scenes as S
from ddim_worker.shapes.edit_bench import held_out
from ddim_worker.shapes.edit_kinds import KINDS, edits, judge, summarise

#: Scenes none of the other benchmarks draw.
JOB_SEED = 515_151

#: (name, extra flags): each a job over the same manifest. The bare control flags take the recommended fractions.
METHODS = (
    ("plain", []),
    ("p2p 0.8/0.4", ["--cross-replace", "0.8", "--self-replace", "0.4"]),
    ("p2p", ["--cross-replace", "--self-replace"]),
    ("direct + p2p", ["--cross-replace", "--self-replace", "--inversion", "direct"]),
    ("mask", ["--mask", "auto"]),
)

#: The job's fixed settings: the shapes model's recommended steps, start step and guidance.
SETTINGS = ["--num-steps", "50", "--start-step", "20", "--guidance-scale", "3.5", "--inversion-guidance", "1",
            "--size", "64", "--dtype", "fp32"]


def write_inputs(folder: Path, count: int) -> dict[str, tuple[str, S.Scene, S.Scene]]:
    """PNGs of ``count`` held-out scenes and a manifest with one row per (scene, kind): rows by id."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = held_out(count, JOB_SEED)
    rows, index = [], {}
    for i, sc in enumerate(scenes):
        Image.fromarray(S.render(sc)).save(folder / f"scene{i}.png")
    for kind in KINDS:
        for i, (sc, target) in enumerate(zip(scenes, edits(kind, scenes, JOB_SEED))):
            rid = f"{kind}-{i}"
            rows.append({"id": rid, "image_url": f"scene{i}.png", "source_prompt": sc.caption,
                         "edit_prompt": target.caption})
            index[rid] = (kind, sc, target)
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return index


def run_job(manifest: Path, output: Path, model: str, flags: list[str]) -> dict:
    command = [sys.executable, "-m", "ddim_worker.cli", "run", str(manifest), "--output", str(output), "--model",
               model, *SETTINGS, *flags, "--allow-local-files", "--no-report", "--overwrite"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
    record = json.loads((output / "job.json").read_text())
    record["wall_seconds"] = time.perf_counter() - started
    return record


def judge_job(output: Path, folder: Path, index: dict) -> dict[str, dict]:
    """The figures of each kind from the job's PNGs (and how many rows had a mask written)."""
    judged: dict[str, list] = {kind: [] for kind in KINDS}
    masks = 0
    layout = OutputLayout(str(output))  # where the job writes each row's images
    for rid, (kind, sc, target) in index.items():
        image = np.asarray(Image.open(layout.image("edited", rid)).convert("RGB"))
        source = S.render(sc)
        judged[kind].append(judge(kind, image, source, sc, target))
        masks += Path(layout.image("mask", rid)).exists()
    out = {kind: summarise(values) for kind, values in judged.items()}
    out["masks_written"] = masks
    return out


def augmentation_check(folder: Path, model: str, work: Path, images: int = 4) -> dict:
    """Every image with three colour prompts, control and direct inversion: job.json's samples against the ideal.

    Four images, batch size 4: an image's source branch and its three edits fill one call, the four inversions one
    call, and the 12 rows are one actor task (16 rows: 4 calls of 4), so nothing is padded. (Where a task boundary
    falls between an image's rows, each side samples its own source branch, and both are counted in the ideal.)"""
    scenes = held_out(images, JOB_SEED + 1)
    rows = []
    for i, sc in enumerate(scenes):
        Image.fromarray(S.render(sc)).save(folder / f"aug{i}.png")
        for colour in [c for c in S.COLOURS if c != sc.colour][:3]:
            rows.append({"id": f"aug{i}-{colour}", "image_url": f"aug{i}.png", "source_prompt": sc.caption,
                         "edit_prompt": sc.with_(colour=colour).caption})
    pq.write_table(pa.Table.from_pylist(rows), folder / "augment.parquet")
    record = run_job(folder / "augment.parquet", work / "augment", model,
                     ["--cross-replace", "--self-replace", "--inversion", "direct", "--batch-size", "4"])
    return {"rows": len(rows), "images": images, "inversions": record["inversions"],
            "unet_samples": record["unet_samples"], "ideal_unet_samples": record["ideal_unet_samples"]}


#: The filter's job: the shapes model's recommended settings per kind of edit (``edit_settings.json``, as rows'
#: columns), four candidates per row drawing both attention fractions, and the scorer.
RECOMMENDED_FLAGS = ["--inversion", "direct", "--cross-replace", "--self-replace"]
#: The filter's job: four candidates per row, each drawn as its kind's ``candidates_per_edit`` says (columns).
FILTER_FLAGS = [*RECOMMENDED_FLAGS, "--candidates", "4"]


def per_kind_manifest(folder: Path, index: dict, candidates: bool = False) -> Path:
    """The manifest again, each row with its kind's recommended settings as columns (the demo's way); with
    ``candidates``, also its kind's candidate draws (``candidates_per_edit``: colour and shape edits draw their
    attention control, background edits, masked without control, their noise: eta > 0, seed + k)."""
    from ddim_worker.shapes.model import edit_settings

    settings = edit_settings()
    per_edit = {kind: {**settings["per_edit"][kind], **(settings["candidates_per_edit"][kind] if candidates else {})}
                for kind in KINDS}
    names = sorted({name for values in per_edit.values() for name in values})
    rows = []
    for rid, (kind, sc, target) in index.items():
        n = int(rid.rsplit("-", 1)[1])
        rows.append({"id": rid, "image_url": f"scene{n}.png", "source_prompt": sc.caption,
                     "edit_prompt": target.caption, **{k: per_edit[kind].get(k) for k in names}})
    path = folder / ("manifest-candidates.parquet" if candidates else "manifest-per-kind.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def filter_check(folder: Path, index: dict, model: str, scorer: str, work: Path, flags: list[str]) -> dict:
    """The recommended settings per kind (``before``: one edit per row, no scorer), then one job with candidates and
    the scorer: per kind, how many rows it kept and how often the kept and the dropped (filtered) edits succeed,
    judged from the PNGs (a filtered row's PNG is written too), and the UNet samples per row next to the ideal."""
    from ddim_worker.job.ledger import read_table

    manifest = per_kind_manifest(folder, index)
    run_job(manifest, work / "recommended", model, RECOMMENDED_FLAGS)
    before = judge_job(work / "recommended", folder, index)
    output = work / "filter"
    record = run_job(per_kind_manifest(folder, index, candidates=True), output, model, [*flags, "--scorer", scorer])
    layout = OutputLayout(str(output))
    status = {r["id"]: r["status"] for r in read_table(layout, images=False).to_pylist()}
    judged: dict[str, dict[str, list]] = {kind: {"kept": [], "dropped": []} for kind in KINDS}
    for rid, (kind, sc, target) in index.items():
        image = np.asarray(Image.open(layout.image("edited", rid)).convert("RGB"))
        side = "kept" if status[rid] == "ok" else "dropped"
        judged[kind][side].append(judge(kind, image, S.render(sc), sc, target)["success"])
    kinds = {kind: {"rows": len(v["kept"]) + len(v["dropped"]), "kept": len(v["kept"]),
                    "success_kept": float(np.mean(v["kept"])) if v["kept"] else None,
                    "success_dropped": float(np.mean(v["dropped"])) if v["dropped"] else None}
             for kind, v in judged.items()}
    rows = sum(k["rows"] for k in kinds.values())
    kept = [s for v in judged.values() for s in v["kept"]]
    dropped = [s for v in judged.values() for s in v["dropped"]]
    return {"flags": flags, "before": before, "kinds": kinds, "keep_rate": len(kept) / max(rows, 1),
            "success_kept": float(np.mean(kept)) if kept else None,
            "success_dropped": float(np.mean(dropped)) if dropped else None,
            "counts": record["counts"], "unet_samples_per_row": record["unet_samples"] / max(rows, 1),
            "ideal_unet_samples_per_row": record["ideal_unet_samples"] / max(rows, 1),
            "inversions": record["inversions"], "wall_seconds": record["wall_seconds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True, help="folder for the inputs and the jobs' outputs")
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--methods", default=",".join(name for name, _ in METHODS))
    p.add_argument("--json", default=None)
    p.add_argument("--scorer", default=None, help="a CLIP folder (make-shapes-scorer's): also run the filter's job")
    p.add_argument("--no-augmentation", action="store_true", help="skip the augmentation check")
    args = p.parse_args(argv)
    work = Path(args.work)
    folder = work / "inputs"
    index = write_inputs(folder, args.count)
    report: dict = {"count": args.count, "seed": JOB_SEED, "settings": SETTINGS, "methods": {}}
    for name, flags in METHODS:
        if name not in args.methods.split(","):
            continue
        output = work / name.replace(" ", "").replace("+", "-").replace("/", "_")
        record = run_job(folder / "manifest.parquet", output, args.model, flags)
        figures = judge_job(output, folder, index)
        report["methods"][name] = {"flags": flags, "figures": figures, "unet_samples": record["unet_samples"],
                                   "ideal_unet_samples": record["ideal_unet_samples"],
                                   "wall_seconds": record["wall_seconds"]}
        print(name, json.dumps(figures), flush=True)
    if args.scorer:
        report["filter"] = filter_check(folder, index, args.model, args.scorer, work, FILTER_FLAGS)
        print("filter", json.dumps(report["filter"]), flush=True)
    if not args.no_augmentation:
        report["augmentation"] = augmentation_check(folder, args.model, work)
        print("augmentation", json.dumps(report["augmentation"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
