"""jobs/benchmark.py with the tiny model and tiny settings: every key, every count, no speed targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import benchmark

REPO = Path(__file__).resolve().parents[1]

# n = 8, s = 3: the textbook does (n - 2) + (n - s) = 11 passes per edit, the engine 2 (n - s) = 10.
N, S = 8, 3

KEYS = ("edits_per_s", "unet_passes_per_s", "engine_vs_textbook", "job_vs_engine", "warm_vs_cold",
        "grouped_vs_ungrouped", "unet_passes_per_edit", "tflops", "mfu", "mfu_vs_ceiling", "device", "dtype",
        "versions", "settings", "peak_tflops", "ceiling_tflops", "flops", "engine", "textbook", "cache", "grouping",
        "job", "checks", "targets")


def test_textbook_pass_count():
    assert benchmark.textbook_passes_per_edit(50, 10) == 88  # 48 inverting (all the way, last step skipped) + 40
    assert benchmark.textbook_passes_per_edit(N, S) == 11 > 2 * (N - S)


@pytest.mark.usefixtures("ray_session")
def test_benchmark_tiny_end_to_end(tiny_model_path, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--arch", "tiny", "--model", str(tiny_model_path), "--device", "cpu", "--steps", str(N),
            "--start-step", str(S), "--rows", "2", "--batch-size", "2", "--batch-sizes", "1,2", "--variant-rows", "2",
            "--textbook-rows", "1", "--threads", str(min(2, torch.get_num_threads())), "--work-dir",
            str(tmp_path / "work"), "--json", str(out)]
    threads = torch.get_num_threads()
    try:
        assert benchmark.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert set(KEYS) <= set(report), set(KEYS) - set(report)
    assert Path(str(out.with_suffix(".md"))).read_text().startswith("### `--arch tiny` on ")

    # UNet passes per edit = 2 (n - s) in the benchmark's own count, for every configuration.
    assert report["unet_passes_per_edit"] == 2 * (N - S)
    by_config = report["unet_passes_per_edit_by_config"]
    assert {"main", "batch 1", "attention math", "CFG split in 2 calls"} <= set(by_config)
    assert all(v == 2 * (N - S) for v in by_config.values()), by_config
    split = next(r for r in report["engine"] if r["name"] == "CFG split in 2 calls")
    assert split["unet_calls"] == 2 * (split["rows"] // split["batch_size"]) * 2 * (N - S)  # two calls per step
    # The textbook port really does more: it inverts all the way (n - 2 calls) and samples n - s.
    assert report["textbook"]["unet_passes_per_edit"] == (N - 2) + (N - S) > report["unet_passes_per_edit"]
    assert report["textbook"]["text_encodings_per_edit"] == 4  # prompts re-encoded at each call, with CFG
    # Cache-hit rerun: sampling only.
    assert report["cache"]["warm"]["unet_passes_per_edit"] == N - S
    assert report["cache"]["warm"]["cache_hits"] == 2
    # 4 images x 4 prompts: 4 inversions grouped, 16 spread out; in-process and in the job (job.json and results).
    grouping = report["grouping"]
    assert grouping["grouped"]["inversions"] == 4 and grouping["grouped"]["rows_inverted"] == 4
    assert grouping["ungrouped"]["inversions"] == 16
    assert grouping["grouped"]["unet_passes"] == 4 * (N - S) + 16 * (N - S)
    job = report["job"]
    assert job["grouped"]["inversions"] == 4 and job["grouped"]["results_rows_inverted"] == 4
    assert job["warm"]["cache_hits"] == 2 and job["warm"]["inversions"] == 0
    assert all(job[k]["counts"]["ok"] == job[k]["rows"] for k in ("cold", "warm", "grouped"))
    checks = report["checks"]
    assert checks["unet_passes_per_edit_is_2(n-s)_in_every_config"] and checks["job_all_ok"]
    # Ratios and MFU are numbers (their values depend on the machine; not checked here).
    for key in ("engine_vs_textbook", "job_vs_engine", "warm_vs_cold", "grouped_vs_ungrouped", "tflops", "mfu"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["flops"]["unet_cfg"] == 2 * report["flops"]["unet_batch1"] > 0
    assert report["device_info"]["type"] == "cpu" and report["device"]


def test_engine_and_benchmark_run_without_ray(tiny_model_path, tmp_path):
    """The GPU box has no Ray: the engine and `benchmark.py --no-ray` must import and run with Ray unimportable."""
    code = (
        "import sys; sys.modules['ray'] = None\n"  # `import ray` raises ImportError
        "from jobs import benchmark\n"
        f"benchmark.main(['--arch', 'tiny', '--model', {str(tiny_model_path)!r}, '--device', 'cpu', '--no-ray',"
        " '--no-variants', '--steps', '4', '--start-step', '1', '--rows', '1', '--batch-size', '1',"
        " '--batch-sizes', '1', '--textbook-rows', '1', '--group-images', '2', '--group-prompts', '2',"
        f" '--json', {str(tmp_path / 'b.json')!r}])\n"
        "assert sys.modules['ray'] is None\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["job"] == {"skipped": "--no-ray"} and report["job_vs_engine"] is None
    assert report["unet_passes_per_edit"] == 2 * (4 - 1)
    assert report["grouping"]["grouped"]["inversions"] == 2


def test_steady_rate_from_png_times(tmp_path):
    for i, t in enumerate([100.0, 100.1, 110.0, 110.2, 120.0, 120.1]):
        path = tmp_path / f"r{i}.png"
        path.write_bytes(b"")
        os.utime(path, (t, t))
    # 4 rows after the first batch of 2, from 100.1 to 120.1.
    assert benchmark.steady_rows_per_s(tmp_path, 2) == pytest.approx(4 / 20.0)
    assert benchmark.steady_rows_per_s(tmp_path, 6) is None


def test_peaks_and_cpu_estimate():
    assert benchmark._lookup(benchmark.PEAK_TFLOPS, "NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert benchmark._lookup(benchmark.PEAK_TFLOPS, "NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert benchmark._lookup(benchmark.CEILING_TFLOPS, "NVIDIA H100 80GB HBM3", "bfloat16") == 798.0
    assert benchmark._lookup(benchmark.PEAK_TFLOPS, "NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    peak, how = benchmark.cpu_peak_tflops(2, {"flags": {"avx2", "fma"}, "mhz": 2500.0})
    assert peak == pytest.approx(2 * 2.5e9 * 32 / 1e12) and "AVX2" in how
