"""Scale benchmark: the real job on generated LAION-style manifests of 10 k - 1 M rows, for a fixed time each.

    python jobs/scale_benchmark.py --rows 10000,100000,1000000 --seconds 90 --json docs/scale-cpu.json

For each size it writes a manifest (a folder of Parquet shards with columns ``URL``, ``TEXT``, ``target``, ``key``,
``score``; ``URL`` holds paths, relative to the manifest folder, of a few small PNGs written beside it), runs
``ddim-edit run`` on it as a subprocess (its own session) with the tiny model and small settings, and measures:

- ``rss_peak_mb``: the driver process's peak VmRSS (``/proc/<pid>/status``, sampled every 0.2 s);
- ``rss_before_ray_mb``: its peak VmRSS before it had any child process (``ray.init`` starts the GCS and raylet as its
  children), i.e. the CLI with torch & co imported; ``rss_growth_mb`` = peak - that;
- ``first_png_s``: seconds from start to the first PNG under ``OUT/images/``; ``indexed_s``: until the driver logged
  the manifest's row count (the id index over the whole manifest is done);
- ``steady_rows_per_s``: PNGs whose mtime falls in the second half of the window, per second of that half (it
  understates the rate when the first PNG comes after the window's middle; ``rows_per_s_after_first_png`` is all PNGs
  over the time from the first one to the window's end).

Then it stops the job (SIGINT; SIGKILL to its process group after a grace period). Everything is written to a JSON and
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ddim_worker.bench.procfs import MB, has_children, load_average, read_status
from ddim_worker.synthetic import picture_bytes

COLUMNS = "image_url=URL,source_prompt=TEXT,edit_prompt=target"
JOB_ARGS = ("--size", "64", "--num-steps", "4", "--start-step", "1", "--batch-size", "8", "--no-report")
_WORDS = ("photo", "painting", "drawing", "sketch", "cartoon", "watercolor", "portrait", "picture")
_SUBJECTS = ("dog", "cat", "house", "car", "bird", "horse", "flower", "tree", "city", "river", "mountain", "beach",
             "street", "sky", "puppy", "face")
_EDITS = ("in winter", "at sunset", "in the rain", "with snow", "in red", "in blue", "oil painting style",
          "as a sketch")
_INDEXED = re.compile(r"manifest .*: (\d+) rows in (\d+) row groups")


# -- the manifest -----------------------------------------------------------------------------------------------------

def write_images(folder: Path, count: int = 16, size: int = 64) -> list[str]:
    """``count`` distinct small PNGs under ``folder/images/``; their paths relative to ``folder``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / "images" / f"img-{i:03d}.png"
        if not path.exists():
            path.write_bytes(picture_bytes(7000 + i, size))
        paths.append(f"images/img-{i:03d}.png")
    return paths


def manifest_table(rows: int, images: list[str], captions_per_image: int = 4, start: int = 0,
                   seed: int = 0) -> pa.Table:
    """``rows`` LAION-style rows (vectorised: no Python per row). Each row picks an image; ``TEXT`` is one of
    ``captions_per_image`` captions of that image; ``target`` is unique per row, so every content-hash id is too."""
    rng = np.random.default_rng(seed + start)
    n = len(images)
    index = np.arange(start, start + rows, dtype=np.int64)
    image = rng.integers(0, n, rows)
    variant = rng.integers(0, captions_per_image, rows)
    captions = [f"a {_WORDS[(i + v) % len(_WORDS)]} of a {_SUBJECTS[i % len(_SUBJECTS)]} {v}"
                for i in range(n) for v in range(captions_per_image)]
    caption_index = image * captions_per_image + variant
    text = pa.array(captions).take(pa.array(caption_index))
    edit = pa.array(list(_EDITS)).take(pa.array(rng.integers(0, len(_EDITS), rows)))
    number = pc.cast(pa.array(index), pa.string())
    target = pc.binary_join_element_wise(text, edit, pc.binary_join_element_wise("#", number, ""), " ")
    key = pc.binary_join_element_wise("k", pc.utf8_lpad(number, 9, "0"), "")
    return pa.table({"URL": pa.array(images).take(pa.array(image)), "TEXT": text, "target": target, "key": key,
                     "score": pa.array(rng.random(rows).astype(np.float32))})


def write_manifest(folder: str | os.PathLike, rows: int, files: int = 4, row_group_rows: int = 65536,
                   images: int = 16, image_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """A folder of ``files`` Parquet shards (``part-NNNNN.parquet``) of ``rows`` rows in all, row groups of
    ``row_group_rows``, with ``images`` PNGs beside them; skipped when the folder already holds that many rows."""
    started = time.monotonic()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = write_images(folder, images, image_size)
    existing = sorted(folder.glob("part-*.parquet"))
    if existing and sum(pq.ParquetFile(p).metadata.num_rows for p in existing) == rows:
        return {"folder": str(folder), "rows": rows, "files": len(existing), "seconds": 0.0, "reused": True}
    for p in existing:
        p.unlink()
    per = -(-rows // files)
    written = 0
    for f in range(files):
        count = min(per, rows - written)
        if count <= 0:
            break
        table = manifest_table(count, paths, start=written, seed=seed)
        pq.write_table(table, folder / f"part-{f:05d}.parquet", row_group_size=row_group_rows)
        written += count
    return {"folder": str(folder), "rows": rows, "files": f + 1 if rows else 0,
            "seconds": round(time.monotonic() - started, 3), "reused": False}


# -- the driver process -----------------------------------------------------------------------------------------------

def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen, grace_s: float) -> str:
    """SIGINT to the driver; SIGKILL to its whole process group (Ray's processes included) after ``grace_s``."""
    how = "exited"
    if proc.poll() is None:
        how = "sigint"
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            how = "sigkill"
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left (raylet, workers) goes too
    except ProcessLookupError:
        pass
    proc.wait()
    return how


ENTRY = "ddim_worker.cli run"


def job_command(manifest: str, out: str, model: str, extra: tuple[str, ...] = JOB_ARGS,
                entry: str = ENTRY) -> list[str]:
    """``ddim-edit run`` (as ``python -m ddim_worker.cli run``, the same entry point) on the manifest; ``entry`` may
    name another module (``-m``) or a script (``*.py``, e.g. ``jobs/edit.py``) taking the same options."""
    first, *rest = entry.split()
    head = [sys.executable, first] if first.endswith(".py") else [sys.executable, "-m", first]
    return [*head, *rest, manifest, "--output", out, "--model", model, "--columns", COLUMNS, *extra]


def run_job_for(command: list[str], out: str | os.PathLike, seconds: float, log_path: str | os.PathLike,
                sample_s: float = 0.2, grace_s: float = 20.0) -> dict[str, Any]:
    """Run ``command`` for ``seconds``, sampling the driver's RSS and watching ``out/images``; then stop it."""
    images = Path(out) / "images"
    load_before = load_average()
    with open(log_path, "wb") as log:
        started = time.monotonic()
        wall_start = time.time()
        # SIGINT at its default (a KeyboardInterrupt in Python): a benchmark started in the background by a
        # non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and the job would only ever be SIGKILLed.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)
        peak: dict[str, int] = {}
        before_ray = 0
        ray_started_s = first_png_s = None
        first_png_rss = 0
        while time.monotonic() - started < seconds and proc.poll() is None:
            status = read_status(proc.pid)
            for name, value in status.items():
                peak[name] = max(peak.get(name, 0), value)
            if ray_started_s is None:
                if has_children(proc.pid):
                    ray_started_s = time.monotonic() - started
                else:
                    before_ray = max(before_ray, status.get("VmRSS", 0))
            if first_png_s is None and images.is_dir() and any(images.rglob("*.png")):
                first_png_s = time.monotonic() - started
                first_png_rss = status.get("VmRSS", 0)
            time.sleep(sample_s)
        elapsed = time.monotonic() - started
        exit_code = proc.poll()
        stopped = _stop(proc, grace_s)
    log_text = Path(log_path).read_text(errors="replace")
    indexed_s = _logged_at(log_text, wall_start)
    mtimes = np.array([p.stat().st_mtime for p in images.rglob("*.png")]) if images.is_dir() else np.zeros(0)
    half, end = wall_start + elapsed / 2, wall_start + elapsed
    steady = int(((mtimes >= half) & (mtimes <= end)).sum())
    in_window = int((mtimes <= end).sum())  # PNGs written during the grace period after SIGINT are left out
    return {
        "started_at": round(wall_start, 3),
        "seconds": round(elapsed, 1),
        "rss_peak_mb": round(peak.get("VmRSS", 0) / MB, 1),
        "rss_before_ray_mb": round(before_ray / MB, 1),
        "rss_growth_mb": round((peak.get("VmRSS", 0) - before_ray) / MB, 1),
        "rss_peak_parts_mb": {k: round(v / MB, 1) for k, v in peak.items() if k != "VmRSS"},
        "rss_at_first_png_mb": round(first_png_rss / MB, 1) if first_png_s is not None else None,
        "ray_started_s": round(ray_started_s, 1) if ray_started_s is not None else None,
        "indexed_s": indexed_s,
        "first_png_s": round(first_png_s, 1) if first_png_s is not None else None,
        "pngs": in_window,
        "pngs_after_window": int(len(mtimes)) - in_window,
        "steady_rows_per_s": round(steady / (elapsed / 2), 3) if elapsed > 0 else None,
        "rows_per_s_after_first_png": (round(in_window / (elapsed - first_png_s), 3)
                                       if first_png_s is not None and elapsed - first_png_s > 1 else None),
        "exit_code": exit_code,  # None: still running when the window closed (the usual case)
        "stopped_by": stopped,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def _logged_at(log_text: str, wall_start: float) -> float | None:
    """Seconds from start to the driver's "manifest ...: N rows in G row groups" log line (its local time)."""
    for line in log_text.splitlines():
        if _INDEXED.search(line):
            stamp = line[:23]
            try:
                logged = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000
            except ValueError:
                return None
            return round(logged - wall_start, 1)
    return None


def code_digest() -> str:
    """A short digest of the job's own modules as they are on disk when a size starts (a working tree moves)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("job/*.py"), root / "stages.py", root / "actor.py"]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# -- the whole benchmark ----------------------------------------------------------------------------------------------

def run_sizes(sizes: list[int], work: Path, model: str, seconds: float, files: int, row_group_rows: int,
              images: int, grace_s: float, job_args: tuple[str, ...] = JOB_ARGS,
              entry: str = ENTRY) -> list[dict[str, Any]]:
    results = []
    for rows in sizes:
        manifest = work / f"manifest-{rows}"
        group_rows = min(row_group_rows, max(-(-rows // files), 1))
        made = write_manifest(manifest, rows, files, group_rows, images)
        out = work / f"out-{rows}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        command = job_command(str(manifest), str(out), model, job_args, entry)
        print(f"[scale] {rows} rows: manifest in {made['seconds']:.1f}s; running for {seconds:.0f}s", flush=True)
        figures = run_job_for(command, out, seconds, work / f"job-{rows}.log", grace_s=grace_s)
        results.append({"rows": rows, "code": code_digest(), "manifest_files": made["files"],
                        "row_group_rows": group_rows,
                        "manifest_seconds": made["seconds"], "command": command, **figures})
        print(f"[scale] {rows} rows: {json.dumps(figures)}", flush=True)
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    head = ("| rows | driver RSS before Ray (MB) | driver peak RSS (MB) | growth (MB) | id index done (s) "
            "| first PNG (s) | steady rows/s | PNGs in window | load avg (1 min, before) |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        cells = [f"{r['rows']:,}", r["rss_before_ray_mb"], r["rss_peak_mb"], r["rss_growth_mb"],
                 r["indexed_s"] if r["indexed_s"] is not None else "-",
                 r["first_png_s"] if r["first_png_s"] is not None else "none", r["steady_rows_per_s"], r["pngs"],
                 r["load_average_before"][0]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10000,100000,1000000", help="manifest sizes, comma-separated")
    p.add_argument("--seconds", type=float, default=90.0, help="how long each job runs before it is stopped")
    p.add_argument("--work", default="/tmp/ddim-scale", help="manifests, outputs and job logs go here")
    p.add_argument("--model", help="model folder (default: a tiny model built under --work)")
    p.add_argument("--files", type=int, default=4, help="Parquet files per manifest")
    p.add_argument("--row-group-rows", type=int, default=65536)
    p.add_argument("--images", type=int, default=16, help="distinct PNGs the rows point at")
    p.add_argument("--grace", type=float, default=20.0, help="seconds after SIGINT before SIGKILL")
    p.add_argument("--json", default="scale.json", help="results JSON (the Markdown table goes next to it)")
    p.add_argument("--job-args", default=" ".join(JOB_ARGS), help="extra options for ddim-edit run")
    p.add_argument("--entry", default=ENTRY, help="the job's entry point: a module and its arguments (run with -m) or "
                                                   "a script ending in .py taking ddim-edit run's options")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = args.model
    else:
        from ddim_worker.tiny_model import make_model

        model = str(make_model(work / "tiny-model"))
    sizes = [int(s) for s in args.rows.split(",") if s.strip()]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = run_sizes(sizes, work, model, args.seconds, args.files, args.row_group_rows, args.images, args.grace,
                        tuple(args.job_args.split()), args.entry)
    record = {"date": started, "host_cpus": os.cpu_count(), "seconds_per_size": args.seconds, "entry": args.entry,
              "job_args": args.job_args, "columns": COLUMNS, "images": args.images, "results": results}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(results)
    Path(args.json).with_suffix(".md").write_text(table)
    print(table)
    return 0
