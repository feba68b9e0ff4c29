"""The whole benchmark run (``run_benchmark``) and its command line (``main``, what ``jobs/benchmark.py`` runs)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim_worker.core import fastpath
from ddim_worker.bench import flops as fl
from ddim_worker.bench.config import BenchConfig, parse_args
from ddim_worker.bench.inputs import RERUN_PROMPTS, group_rows, make_images, make_rows
from ddim_worker.bench.jobs import run_jobs
from ddim_worker.bench.procfs import load_average
from ddim_worker.bench.report import checks, ratio, render_markdown, targets, versions
from ddim_worker.bench.textbook import TextbookEditor
from ddim_worker.bench.timers import EngineTimer, TextbookTimer, dtype_name, time_edits, time_offload, time_pinned
from ddim_worker.bench.variants import measure_variants
from ddim_worker.core.denoiser import GuidedUNet
from ddim_worker.core.engine import EditEngine, EditOutput, EditRow
from ddim_worker.core.models import choose_dtype, load_pipeline
from ddim_worker.tiny_model import make_model

log = logging.getLogger("ddim_edit.benchmark")


class Recorder:
    """Finishes timing records (TFLOP/s and MFU added) and keeps the engine configurations' records in order."""

    def __init__(self, accounting: fl.Accounting):
        self.accounting = accounting
        self.engine_records: list[dict] = []

    def measure(self, name: str, eng: EditEngine, rows: list[EditRow], batch: int, counter: GuidedUNet | None = None,
                **info: Any) -> tuple[dict, list[EditOutput]]:
        """Time ``rows`` on ``eng`` after a warm-up; an engine configuration of the report."""
        record, outputs = time_edits(eng, rows, batch, name, counter, dtype=dtype_name(eng.dtype), **info)
        self.engine_records.append(self.accounting(record))
        return record, outputs

    def record(self, timer: EngineTimer | TextbookTimer, engine_list: bool = True) -> dict:
        rec = self.accounting(timer.record())
        if engine_list:
            self.engine_records.append(rec)
        return rec


def _side_by_side(cfg: BenchConfig, engine: EditEngine, model: str, rows: list[EditRow], main_fast: dict,
                  rec: Recorder) -> tuple[dict, dict, dict, list[EditOutput]]:
    """Main, cache-hit rerun and textbook loop, interleaved batch by batch so that all three see the same machine (a
    burst of other work on shared cores hits them alike): the main configuration on all rows; the cache-hit rerun of
    each of its batches right after it (new edit prompts, that batch's trajectories); the textbook loop, one edit per
    batch. Returns (main, warm, textbook) records and main's outputs."""
    device, dname, B = engine.device, dtype_name(engine.dtype), cfg.batch_size
    editor = TextbookEditor(load_pipeline(model, device, torch.float32), device)  # fp32, no fast path: as it loads
    main_timer = EngineTimer(engine, rows, B, "main", dtype=dname, **main_fast).warm_up()
    warm_timer = EngineTimer(engine, rows, B, "cache-hit rerun", dtype=dname)  # same shapes: warmed up by main
    warm_timer.pending = []  # its batches are built from main's outputs
    book_timer = TextbookTimer(editor, rows[:cfg.textbook_rows], cfg.seed).warm_up()
    done = 0
    while not main_timer.done:
        chunk = main_timer.pending[0]
        outputs = main_timer.step()
        if not book_timer.done:
            book_timer.step()
        warm_timer.step([replace(r, edit_prompt=RERUN_PROMPTS[(done + j) % len(RERUN_PROMPTS)], cached=out.trajectory)
                         for j, (r, out) in enumerate(zip(chunk, outputs))])
        done += len(chunk)
    while not book_timer.done:
        book_timer.step()
    main = rec.record(main_timer)
    warm = rec.record(warm_timer, engine_list=False)
    textbook = rec.record(book_timer, engine_list=False)
    del editor
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return main, warm, textbook, main_timer.outputs


def _grouping(cfg: BenchConfig, engine: EditEngine, images: list[np.ndarray], rec: Recorder) -> tuple[dict, dict]:
    """One inversion per image: 4 x 4 rows with each image's rows in one batch vs spread out, interleaved. Two batches
    of each (the rate is per edit, so the first two batches of the 4 x 4 rows say it; the Ray job runs the whole
    4 x 4 manifest for its counts)."""
    G, dname = cfg.group_prompts, dtype_name(engine.dtype)
    timers = [EngineTimer(engine, group_rows(images, cfg, grouped=grouped)[:2 * G], G, name, dtype=dname).warm_up()
              for name, grouped in (("grouped", True), ("ungrouped", False))]
    while not all(timer.done for timer in timers):
        for timer in timers:
            if not timer.done:
                timer.step()
    grouped, ungrouped = (rec.record(timer, engine_list=False) for timer in timers)
    return grouped, ungrouped


def _batch_sizes(cfg: BenchConfig, engine: EditEngine, rows: list[EditRow], dtype: torch.dtype, main_fast: dict,
                 rec: Recorder) -> int | None:
    """The main configuration at the other batch sizes, two batches each; returns the batch size chosen from free
    memory (CUDA), or None."""
    auto_batch = None
    free = fastpath.free_device_bytes(engine.device)
    if free is not None:
        auto_batch = fastpath.auto_batch_size(free, cfg.size, dtype)
    for bs in cfg.batch_sizes:
        if bs == "auto":
            if auto_batch is None:
                continue
            name, bs = f"batch auto ({auto_batch})", auto_batch
        else:
            name = f"batch {bs}"
        if bs == cfg.batch_size or bs > len(rows):
            continue
        rec.measure(name, engine, rows[:min(2 * bs, len(rows) // bs * bs)], bs, **main_fast)  # two batches if there are
    return auto_batch


def _job_part(cfg: BenchConfig, engine: EditEngine, model: str, rows: list[EditRow], images: list[np.ndarray],
              work: Path, main: dict, main_fast: dict, rec: Recorder) -> dict[str, Any]:
    """The Ray job, and right before it its in-process reference: the main configuration (the job's actors run its
    fast path) on two batches. Measured adjacent to the job (not at the start of the run) so that a change in the
    machine's speed over the run does not enter the ratio."""
    if not cfg.ray:
        return {"skipped": "--no-ray"}
    B = cfg.batch_size
    reference_name = "just before the job"
    reference, _ = rec.measure(reference_name, engine, rows[:2 * B], B, **main_fast)
    job = run_jobs(cfg, model, images, work, main_fast)
    if "cold" in job:
        job["reference"] = reference_name
        job["reference_edits_per_s"] = reference["edits_per_s"]
        job["job_vs_engine"] = ratio(job["cold"]["steady_rows_per_s"], reference["edits_per_s"])
        job["job_vs_engine_mean"] = ratio(job["cold"]["steady_rows_per_s_all"], reference["edits_per_s"])
        job["job_vs_main"] = ratio(job["cold"]["steady_rows_per_s"], main["edits_per_s"])
        job["job_vs_engine_end_to_end"] = ratio(job["cold"]["rows_per_second"], reference["edits_per_s"])
        job["warm_vs_cold"] = ratio(job["warm"]["steady_rows_per_s"], job["cold"]["steady_rows_per_s"])
    return job


def _model_and_device(cfg: BenchConfig) -> dict[str, Any]:
    """The model (built locally with random weights: the arch's shapes and FLOPs, loaded the real way), the engine,
    the device, FLOPs per edit, peak and ceiling, and the main configuration's fast path."""
    device = torch.device(cfg.device)
    dtype = choose_dtype(cfg.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    model = cfg.model or str(make_model(cfg.model_folder(), cfg.arch))
    build_s = time.perf_counter() - started
    engine = EditEngine.from_pretrained(model, device=str(device), dtype=cfg.dtype, size=cfg.size)
    device_name, device_info = fl.describe_device(device, cfg.threads)
    dname = dtype_name(dtype)
    log.info("device %s, dtype %s, model %s (%s, %d px), n=%d s=%d", device_name, dname, model, cfg.arch, cfg.size,
             cfg.steps, cfg.start_step)
    # FLOPs (before any compile), peak, ceiling.
    flops = fl.count_flops(engine.pipe, cfg.size)
    per_edit = fl.flops_per_edit(flops, cfg.steps, cfg.start_step)
    peak, peak_source = fl.peak_tflops(device, device_name, dname, cfg.threads, cfg.peak_tflops)
    matmul = fl.measure_matmul_tflops(device, dtype)
    ceiling, ceiling_source = fl.ceiling_tflops(device, device_name, dname, matmul, cfg.ceiling_tflops)
    if cfg.compile:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    # dynamic=None: a second batch shape gets one dynamic graph instead of a compile per shape.
    main_fast = fastpath.apply_fast_path(engine.pipe, channels_last=cfg.channels_last, compile_unet=cfg.compile,
                                         attention=cfg.attention, compile_mode=cfg.compile_mode,
                                         compile_dynamic=None)
    return dict(device=device, dtype=dtype, model=model, build_s=build_s, engine=engine, device_name=device_name,
                device_info=device_info, dname=dname, flops=flops, per_edit=per_edit, peak=peak,
                peak_source=peak_source, matmul=matmul, ceiling=ceiling, ceiling_source=ceiling_source,
                main_fast=main_fast, rec=Recorder(fl.Accounting(flops, per_edit, peak, ceiling)))


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run every measurement and return the report (also written as JSON / Markdown by ``main``)."""
    cfg = cfg.resolved()
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="ddim-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run_started = time.perf_counter()
    load_before = load_average()
    m = _model_and_device(cfg)
    engine, rec, main_fast = m["engine"], m["rec"], m["main_fast"]
    images = make_images(max(cfg.rows, cfg.job_rows, cfg.group_images), cfg.size, cfg.seed)
    rows = make_rows(images[:cfg.rows], cfg)

    # 1. Main, cache-hit rerun and textbook loop side by side.
    m["main"], m["warm"], m["textbook"], main_outputs = _side_by_side(cfg, engine, m["model"], rows, main_fast, rec)
    # 2. One inversion per image.
    m["grouped"], m["ungrouped"] = _grouping(cfg, engine, images, rec)
    # 3. Batch sizes.
    m["auto_batch"] = _batch_sizes(cfg, engine, rows, m["dtype"], main_fast, rec)
    # 4. Each fast-path switch flipped from the main configuration.
    measure_variants(cfg, engine, rows[:cfg.variant_rows], m["model"], m["dtype"], main_fast, rec.measure)

    offload = time_offload(engine, main_outputs, cfg.batch_size)
    offload["engine_s_per_row"] = m["main"]["seconds_per_edit"]
    offload["share_of_row"] = (offload["vae_decode_s_per_row"] + offload["png_encode_s_per_row"]) / (
        m["main"]["seconds_per_edit"] + offload["png_encode_s_per_row"])
    m["offload"], m["pinned"] = offload, time_pinned(m["device"], cfg.size, cfg.batch_size)
    # 5. The Ray job.
    m["job"] = _job_part(cfg, engine, m["model"], rows, images, work, m["main"], main_fast, rec)

    report = _report(cfg, m)
    report["checks"] = checks(report, cfg)
    report["targets"] = targets(report)
    report["wall_seconds"] = round(time.perf_counter() - run_started, 1)
    # Other work on the machine skews CPU timings: the 1-minute load average before and after the run says if any ran.
    report["load_average"] = {"before": load_before, "after": load_average()}
    if not cfg.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _report(cfg: BenchConfig, m: dict[str, Any]) -> dict[str, Any]:
    """The report's figures from the measurements ``m`` (``run_benchmark``'s)."""
    main, warm, textbook, grouped, ungrouped = m["main"], m["warm"], m["textbook"], m["grouped"], m["ungrouped"]
    n, s = cfg.steps, cfg.start_step
    expected = 2 * (n - s)
    return {
        "device": m["device_name"],
        "device_info": m["device_info"],
        "dtype": m["dname"],
        "versions": versions(),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("json_path", "markdown_path")},
        "model": {"arch": cfg.arch, "path": m["model"], "size": cfg.size, "build_seconds": round(m["build_s"], 2),
                  "unet_parameters": sum(p.numel() for p in m["engine"].pipe.unet.parameters())},
        "edits_per_s": main["edits_per_s"],
        "unet_passes_per_s": main["unet_passes_per_s"],
        "unet_samples_per_s": main["unet_samples_per_s"],
        "unet_passes_per_edit": main["unet_passes_per_edit"],
        "unet_passes_per_edit_expected": expected,
        "unet_passes_per_edit_by_config": {r["name"]: r["unet_passes_per_edit"] for r in m["rec"].engine_records},
        "textbook_passes_per_edit": textbook["unet_passes_per_edit"],
        "engine_vs_textbook": ratio(main["edits_per_s"], textbook["edits_per_s"]),
        "job_vs_engine": m["job"].get("job_vs_engine"),
        "warm_vs_cold": ratio(warm["edits_per_s"], main["edits_per_s"]),
        "grouped_vs_ungrouped": ratio(grouped["edits_per_s"], ungrouped["edits_per_s"]),
        "tflops": main["tflops"],
        "mfu": main["mfu"],
        "mfu_vs_ceiling": main["mfu_vs_ceiling"],
        "peak_tflops": m["peak"],
        "peak_source": m["peak_source"],
        "ceiling_tflops": m["ceiling"],
        "ceiling_source": m["ceiling_source"],
        "matmul_tflops": m["matmul"],
        "flops": {**m["flops"], "per_edit": m["per_edit"]},
        "compile_seconds": main["warmup_seconds"] if cfg.compile else None,
        "auto_batch_size": m["auto_batch"],
        "engine": m["rec"].engine_records,
        "textbook": textbook,
        "cache": {"cold": main, "warm": warm},
        # measured: the first two batches of each order (grouped: 2 whole images; ungrouped: 2 rows per image)
        "grouping": {"grouped": grouped, "ungrouped": ungrouped, "images": cfg.group_images,
                     "prompts": cfg.group_prompts, "rows_measured": 2 * cfg.group_prompts,
                     "expected_passes": {"grouped": 2 * (n - s) * (1 + cfg.group_prompts),
                                         "ungrouped": 2 * cfg.group_prompts * expected}},
        "offload": m["offload"],
        "pinned": m["pinned"],
        "job": m["job"],
        "wall_seconds": None,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    cfg = parse_args(argv)
    report = run_benchmark(cfg)
    markdown = render_markdown(report)
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps(report, indent=2, default=str))
    markdown_path = cfg.markdown_path or (str(Path(cfg.json_path).with_suffix(".md")) if cfg.json_path else None)
    if markdown_path:
        Path(markdown_path).write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
