"""The report: counts that must hold whatever the speed (``checks``), ratios against their ``targets``, the
environment it names (versions, load average), and the Markdown rendering of the JSON report."""

from __future__ import annotations

import platform
from typing import Any

import torch

from ddim_worker.bench.config import TARGETS, BenchConfig
from ddim_worker.bench.textbook import textbook_passes_per_edit


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda or "none",
           "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"}
    for name in ("diffusers", "transformers", "ray", "numpy", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def checks(report: dict, cfg: BenchConfig) -> dict[str, Any]:
    """Counts that must hold whatever the speed: passes per edit, inversions, cache hits."""
    n, s = cfg.steps, cfg.start_step
    grouping, job = report["grouping"], report["job"]
    out: dict[str, Any] = {
        "unet_passes_per_edit_is_2(n-s)_in_every_config": all(
            v == 2 * (n - s) for v in report["unet_passes_per_edit_by_config"].values()),
        "textbook_passes_per_edit_is_(n-2)+(n-s)": report["textbook_passes_per_edit"] == textbook_passes_per_edit(n, s),
        "cache_hit_rerun_passes_per_edit_is_n-s": report["cache"]["warm"]["unet_passes_per_edit"] == n - s
        and report["cache"]["warm"]["cache_hits"] == report["cache"]["warm"]["rows"],
        "grouped_inversions": grouping["grouped"]["inversions"],
        "grouped_rows_inverted": grouping["grouped"]["rows_inverted"],
        "ungrouped_inversions": grouping["ungrouped"]["inversions"],
        "grouped_passes_are_(n-s)(1+K)_per_image": grouping["grouped"]["unet_passes"]
        == grouping["expected_passes"]["grouped"],
    }
    if "grouped" in job:
        out["job_grouped_inversions"] = job["grouped"]["inversions"]
        out["job_grouped_rows_inverted_in_results"] = job["grouped"]["results_rows_inverted"]
        out["job_warm_cache_hits"] = job["warm"]["cache_hits"]
        out["job_warm_inversions"] = job["warm"]["inversions"]
        out["job_all_ok"] = all(job[k]["counts"]["ok"] == job[k]["rows"] for k in ("cold", "warm", "grouped"))
    return out


def targets(report: dict) -> dict[str, dict]:
    """Each ratio against its target (``config.TARGETS``); grouping must beat 1."""
    out = {}
    for key, target in TARGETS.items():
        value = report.get(key)
        out[key] = {"value": value, "target": target, "met": value is not None and value >= target}
    out["grouped_vs_ungrouped"] = {"value": report["grouped_vs_ungrouped"], "target": 1.0,
                                   "met": (report["grouped_vs_ungrouped"] or 0) > 1.0}
    return out


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def render_markdown(report: dict) -> str:
    """The benchmark's report as Markdown: settings, targets, the engine's table, grouping, the job, FLOPs."""
    lines = _header_lines(report)
    for section in (_target_lines, _engine_lines, _grouping_lines, _job_lines, _flops_lines):
        lines += section(report)
    return "\n".join(lines)


def _header_lines(report: dict) -> list[str]:
    cfg = report["settings"]
    n, s = cfg["steps"], cfg["start_step"]
    lines = [
        f"### `--arch {cfg['arch']}` on {report['device']}",
        "",
        f"- device: **{report['device']}**; dtype {report['dtype']}; torch threads {cfg['threads']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- model: {cfg['arch']} ({report['model']['unet_parameters'] / 1e6:.1f} M UNet parameters, random weights),"
        f" {cfg['size']} px; n = {n}, s = {s}, guidance {cfg['guidance']}, inversion guidance "
        f"{cfg['inversion_guidance']}",
        f"- rows: {cfg['rows']} distinct images x 1 edit at batch {cfg['batch_size']} (main); other batch sizes on "
        f"two batches each; fast-path variants on the first {cfg['variant_rows']} in one batch (compare with `batch "
        f"{min(cfg['variant_rows'], cfg['batch_size'])}`); textbook loop on "
        f"{cfg['textbook_rows']}; grouping {cfg['group_images']} images x {cfg['group_prompts']} prompts; Ray job on "
        f"{cfg['job_rows']} (and the 4 x 4 manifest)",
        f"- peak {_f(report['peak_tflops'], 4)} TFLOP/s ({report['peak_source']}); ceiling "
        f"{_f(report['ceiling_tflops'], 4)} TFLOP/s ({report['ceiling_source']}); GEMM measured here "
        f"{_f(report['matmul_tflops'], 4)} TFLOP/s",
        f"- benchmark wall time {report['wall_seconds']} s; load average (1, 5, 15 min) before "
        f"{report.get('load_average', {}).get('before')}, after {report.get('load_average', {}).get('after')}",
        "",
        "| ratio | value | target | met |",
        "|---|---|---|---|",
    ]
    return lines


def _target_lines(report: dict) -> list[str]:
    lines: list[str] = []
    names = {"engine_vs_textbook": "engine / textbook loop (edits/s)",
             "job_vs_engine": "Ray job (steady state) / engine in-process",
             "warm_vs_cold": "cache-hit rerun / cold (edits/s)",
             "grouped_vs_ungrouped": "4 x 4 grouped / ungrouped (edits/s)"}
    for key, t in report["targets"].items():
        lines.append(f"| {names[key]} | {_f(t['value'], 2)}x | >= {t['target']}x | {'yes' if t['met'] else 'NO'} |")
    return lines


def _engine_lines(report: dict) -> list[str]:
    cfg = report["settings"]
    n, s = cfg["steps"], cfg["start_step"]
    lines: list[str] = []
    lines += [
        "",
        f"Engine (main): **{_f(report['edits_per_s'])} edits/s**, {_f(report['unet_passes_per_s'], 1)} UNet passes/s "
        f"({_f(report['unet_samples_per_s'], 1)} UNet samples/s with CFG), {_f(report['unet_passes_per_edit'], 1)} "
        f"passes per edit (2 (n - s) = {2 * (n - s)}; textbook {_f(report['textbook_passes_per_edit'], 1)}), "
        f"{_f(report['tflops'], 4)} TFLOP/s, MFU {_pct(report['mfu'])} of peak, {_pct(report['mfu_vs_ceiling'])} of "
        f"ceiling.",
        "",
        "| configuration | dtype | batch | rows | edits/s | s/edit | edits/s, all batches | UNet passes/s | "
        "passes/edit | TFLOP/s | MFU | MFU vs ceiling | peak mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    records = report["engine"] + [report["textbook"], report["cache"]["warm"], report["grouping"]["grouped"],
                                  report["grouping"]["ungrouped"]]
    for r in records:
        mem = r.get("peak_memory_bytes")
        lines.append(
            f"| {r['name']} | {r.get('dtype', '')} | {r['batch_size']} | {r['rows']} | {_f(r['edits_per_s'])} | "
            f"{_f(r['seconds_per_edit'], 2)} | {_f(r['edits_per_s_all'])} | {_f(r['unet_passes_per_s'], 1)} | "
            f"{_f(r['unet_passes_per_edit'], 1)} | "
            f"{_f(r.get('tflops'), 4)} | {_pct(r.get('mfu'))} | {_pct(r.get('mfu_vs_ceiling'))} | "
            f"{f'{mem / 2**30:.1f} GiB' if mem else 'n/a'} |")
    return lines


def _grouping_lines(report: dict) -> list[str]:
    lines: list[str] = []
    g = report["grouping"]
    lines += [
        "",
        f"One inversion per image ({g['images']} images x {g['prompts']} prompts, batch {g['prompts']}, the first "
        f"{g['rows_measured']} rows of each order): grouped "
        f"{g['grouped']['inversions']} inversions, {g['grouped']['unet_passes']} UNet passes "
        f"(expected {g['expected_passes']['grouped']}); ungrouped {g['ungrouped']['inversions']} inversions, "
        f"{g['ungrouped']['unet_passes']} passes (expected {g['expected_passes']['ungrouped']}).",
    ]
    return lines


def _job_lines(report: dict) -> list[str]:
    lines: list[str] = []
    job = report["job"]
    if "cold" in job:
        lines += [
            "",
            f"Ray job (1 engine actor with {job['cpus_per_actor']} "
            f"{'CPUs' if report['device_info']['type'] == 'cpu' else 'GPU'}; reference: in-process "
            f"`{job['reference']}`). Steady state: batch size / the shortest interval between "
            "the ends (last PNG written) of two consecutive batches; mean: the rows after the first batch / the time "
            "from its last PNG to the last PNG. Ray and actor start-up fall outside both.",
            "",
            "| job run | rows | batch | wall s | rows/s incl. start-up | steady rows/s | steady, mean | start-up s | "
            "inversions | cache hits | ok |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key in ("cold", "warm", "grouped"):
            r = job[key]
            lines.append(f"| {key} | {r['rows']} | {r['batch_size']} | {_f(r['wall_seconds'], 1)} | "
                         f"{_f(r['rows_per_second'])} | {_f(r['steady_rows_per_s'])} | "
                         f"{_f(r['steady_rows_per_s_all'])} | {_f(r['startup_seconds'], 1)} | "
                         f"{r['inversions']} | {r['cache_hits']} | {r['counts']['ok']} |")
        lines += ["", f"job / engine: {_f(job['job_vs_engine'], 2)}x at steady state (engine measured just before "
                      f"the job: {_f(job['reference_edits_per_s'])} edits/s; against `main`, measured at the start of "
                      f"the run: {_f(job['job_vs_main'], 2)}x), {_f(job['job_vs_engine_end_to_end'], 2)}x end to end "
                      "(with Ray and actor start-up); job "
                      f"cache-hit rerun / cold {_f(job['warm_vs_cold'], 2)}x. The 4 x 4 job is there for its counts "
                      "(inversions in `job.json` and the results)."]
    else:
        lines += ["", f"Ray job: skipped ({job.get('skipped')})."]
    return lines


def _flops_lines(report: dict) -> list[str]:
    lines: list[str] = []
    fl = report["flops"]
    off = report["offload"]
    lines += [
        "",
        f"FLOPs (FlopCounterMode): UNet {fl['unet_batch1'] / 1e9:.2f} GFLOP per sample, {fl['unet_cfg'] / 1e9:.2f} "
        f"per CFG pass; VAE encode {fl['vae_encode'] / 1e9:.2f}, decode {fl['vae_decode'] / 1e9:.2f}; text encoder "
        f"{fl['text_encoder'] / 1e9:.3f} GFLOP per prompt. Per edit: engine {fl['per_edit']['engine'] / 1e12:.4f} "
        f"TFLOP, cache hit {fl['per_edit']['engine_cache_hit'] / 1e12:.4f}, textbook "
        f"{fl['per_edit']['textbook'] / 1e12:.4f}.",
        "",
        f"Off the critical path: VAE decode {_f(off['vae_decode_s_per_row'], 4)} s/row and PNG encode "
        f"{_f(off['png_encode_s_per_row'], 4)} s/row, {_pct(off['share_of_row'])} of a row's in-process time "
        "(the job encodes PNGs in its write stage, overlapped with the next batch; the decode still runs in the engine).",
    ]
    if report.get("compile_seconds") is not None:
        lines.append(f"\n`torch.compile` of the UNet: {report['compile_seconds']:.1f} s (warm-up of the main batch "
                     "shape), not counted in edits/s.")
    if report.get("auto_batch_size"):
        lines.append(f"\nBatch size from free memory (`fastpath.auto_batch_size`): {report['auto_batch_size']}.")
    if report.get("pinned"):
        p = report["pinned"]
        lines.append(f"\nHost-to-device copy of a batch ({p['bytes'] / 2**20:.0f} MiB): pageable "
                     f"{p['pageable_gb_per_s']:.1f} GB/s, pinned (pin + copy) {p['pinned_gb_per_s']:.1f} GB/s, "
                     f"pinned buffer reused {p['pinned_reused_gb_per_s']:.1f} GB/s.")
    lines += ["", "Checks: " + ", ".join(f"{k} = {v}" for k, v in report["checks"].items()), ""]
    return lines
