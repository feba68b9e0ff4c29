"""The benchmark (``ddim_worker.bench``, run by ``jobs/benchmark.py``) with the tiny model and tiny settings: every
key, every count, no speed targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddim_worker.bench import config, flops, jobs, textbook
from ddim_worker.synthetic import pictures

REPO = Path(__file__).resolve().parents[1]

# n = 8, s = 3: the textbook does (n - 2) + (n - s) = 11 passes per edit, the engine 2 (n - s) = 10.
N, S = 8, 3

KEYS = ("edits_per_s", "unet_passes_per_s", "engine_vs_textbook", "job_vs_engine", "warm_vs_cold",
        "grouped_vs_ungrouped", "unet_passes_per_edit", "tflops", "mfu", "mfu_vs_ceiling", "device", "dtype",
        "versions", "settings", "peak_tflops", "ceiling_tflops", "flops", "engine", "textbook", "cache", "grouping",
        "job", "checks", "targets")


def test_textbook_pass_count():
    assert textbook.textbook_passes_per_edit(50, 10) == 88  # 48 inverting (all the way, last step skipped) + 40
    assert textbook.textbook_passes_per_edit(N, S) == 11 > 2 * (N - S)


def test_benchmark_tiny_without_ray(tiny_model_path, tmp_path):
    """The whole benchmark but the job, in a process where Ray cannot be imported (the GPU box has no Ray): every
    key of the JSON, and the counts that hold whatever the speed."""
    out = tmp_path / "bench.json"
    argv = ["--arch", "tiny", "--model", str(tiny_model_path), "--device", "cpu", "--no-ray", "--steps", str(N),
            "--start-step", str(S), "--rows", "2", "--batch-size", "2", "--batch-sizes", "1,2", "--variant-rows", "2",
            "--textbook-rows", "1", "--json", str(out)]
    code = ("import runpy, sys; sys.modules['ray'] = None\n"  # `import ray` raises ImportError
            f"sys.argv = ['jobs/benchmark.py', *{argv!r}]\n"  # the script, as the docs run it
            "try:\n    runpy.run_path('jobs/benchmark.py', run_name='__main__')\n"
            "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
            "assert sys.modules['ray'] is None\n"
            "assert not any(name == 'jobs' or name.startswith('jobs.') for name in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(KEYS) <= set(report), set(KEYS) - set(report)
    assert out.with_suffix(".md").read_text().startswith("### `--arch tiny` on ")
    assert report["job"] == {"skipped": "--no-ray"} and report["job_vs_engine"] is None

    # UNet passes per edit = 2 (n - s) in the benchmark's own count, for every configuration.
    assert report["unet_passes_per_edit"] == 2 * (N - S)
    by_config = report["unet_passes_per_edit_by_config"]
    assert {"main", "batch 1", "channels_last on", "attention math", "CFG split in 2 calls"} <= set(by_config)
    assert all(v == 2 * (N - S) for v in by_config.values()), by_config
    split = next(r for r in report["engine"] if r["name"] == "CFG split in 2 calls")
    assert split["unet_calls"] == 2 * (split["rows"] // split["batch_size"]) * 2 * (N - S)  # two calls per step
    # The textbook port really does more: it inverts all the way (n - 2 calls) and samples n - s.
    assert report["textbook"]["unet_passes_per_edit"] == (N - 2) + (N - S) > report["unet_passes_per_edit"]
    assert report["textbook"]["text_encodings_per_edit"] == 4  # prompt + negative, re-encoded at each call
    # Cache-hit rerun: sampling only.
    assert report["cache"]["warm"]["unet_passes_per_edit"] == N - S
    assert report["cache"]["warm"]["cache_hits"] == 2
    # The first two batches of 4 images x 4 prompts: 2 inversions when an image's rows share a batch (2 images),
    # 8 when they are spread out (8 rows, each its own image in its batch).
    grouping = report["grouping"]
    assert grouping["grouped"]["inversions"] == 2 and grouping["grouped"]["rows_inverted"] == 2
    assert grouping["ungrouped"]["inversions"] == 8
    assert grouping["grouped"]["unet_passes"] == 2 * (N - S) + 8 * (N - S) == grouping["expected_passes"]["grouped"]
    assert report["checks"]["unet_passes_per_edit_is_2(n-s)_in_every_config"]
    # Ratios and MFU are numbers; their values depend on the machine and are not checked here.
    for key in ("engine_vs_textbook", "warm_vs_cold", "grouped_vs_ungrouped", "tflops", "mfu", "mfu_vs_ceiling"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["flops"]["unet_cfg"] == 2 * report["flops"]["unet_batch1"] > 0
    assert report["device_info"]["type"] == "cpu" and report["device"]
    assert set(report["targets"]) == {"engine_vs_textbook", "job_vs_engine", "warm_vs_cold", "grouped_vs_ungrouped"}


@pytest.mark.usefixtures("ray_session")
def test_job_part(tiny_model_path, tmp_path):
    """The job part on the shared Ray instance: the main rows, and the 4 x 4 manifest, whose job.json and results
    count 4 inversions, not 16. (The benchmark also runs a cache-hit rerun through the job; left out here to keep
    the test under a minute: each job starts its own engine actor.)"""
    cfg = config.BenchConfig(arch="tiny", model=str(tiny_model_path), device="cpu", steps=N, start_step=S, rows=4,
                                job_rows=4, batch_size=2, threads=min(2, torch.get_num_threads())).resolved()
    images = pictures(4, cfg.size)
    fast = {"attention": "sdpa", "channels_last": False, "compile_unet": False}
    job = jobs.run_jobs(cfg, str(tiny_model_path), images, tmp_path, fast, parts=("cold", "grouped"))
    assert "warm" not in job
    for key in ("cold", "grouped"):
        assert job[key]["counts"] == {"ok": job[key]["rows"], "filtered": 0, "failed": 0, "skipped": 0}, job[key]
        # 2 batches of 2 (cold) and 4 of 4 (grouped): a steady-state rate from the PNGs after the first batch.
        assert job[key]["steady_rows_per_s"] > 0
    assert job["cold"]["inversions"] == 4 and job["cold"]["unet_passes"] == 4 * 2 * (N - S)
    assert job["grouped"]["rows"] == 16
    assert job["grouped"]["inversions"] == 4 and job["grouped"]["results_rows_inverted"] == 4
    assert job["grouped"]["results_inversion_passes"] == 4 * (N - S)
    assert job["grouped"]["unet_passes"] == 4 * (N - S) + 16 * (N - S)


def test_steady_rate_from_png_times(tmp_path):
    for i, t in enumerate([100.0, 100.1, 110.0, 110.2, 120.0, 120.1]):
        path = tmp_path / f"r{i}.png"
        path.write_bytes(b"")
        os.utime(path, (t, t))
    # Batches end at 100.1, 110.2 and 120.1: intervals 10.1 and 9.9 s; mean: 4 rows after the first batch in 20 s.
    best, mean = jobs.steady_rows_per_s(tmp_path, 2)
    assert best == pytest.approx(2 / 9.9) and mean == pytest.approx(4 / 20.0)
    assert jobs.steady_rows_per_s(tmp_path, 4) == pytest.approx((2 / 9.9, 2 / 9.9))  # a partial last batch
    assert jobs.steady_rows_per_s(tmp_path, 6) == (None, None)  # one batch: no steady state


def test_peaks_and_cpu_estimate():
    assert flops.lookup_tflops(flops.PEAK_TFLOPS, "NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert flops.lookup_tflops(flops.PEAK_TFLOPS, "NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert flops.lookup_tflops(flops.CEILING_TFLOPS, "NVIDIA H100 80GB HBM3", "bfloat16") == 798.0
    assert flops.lookup_tflops(flops.PEAK_TFLOPS, "NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    peak, how = flops.cpu_peak_tflops(2, {"flags": {"avx2", "fma"}, "mhz": 2500.0})
    assert peak == pytest.approx(2 * 2.5e9 * 32 / 1e12) and "AVX2" in how
