"""The scale benchmark's pieces: the generated manifest's shape, and the subprocess sampling and stopping."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq

from ddim_worker.bench.scale import COLUMNS, job_command, markdown, run_job_for, write_manifest
from ddim_worker.job.source import plan_source
from ddim_worker.manifest import parse_column_map


def test_manifest_is_laion_style_shards_with_images_beside_it(tmp_path):
    made = write_manifest(tmp_path / "m", 1000, files=4, row_group_rows=100, images=5)
    assert made["rows"] == 1000 and made["files"] == 4
    files = sorted((tmp_path / "m").glob("part-*.parquet"))
    assert len(files) == 4
    assert all(pq.ParquetFile(f).metadata.num_row_groups == 3 for f in files)  # 250 rows each, groups of 100
    table = pq.read_table(files)
    assert table.column_names == ["URL", "TEXT", "target", "key", "score"] and table.num_rows == 1000
    urls = set(table["URL"].to_pylist())
    assert len(urls) == 5 and all((tmp_path / "m" / u).is_file() for u in urls)  # relative to the manifest folder
    assert len(set(table["target"].to_pylist())) == 1000  # unique edits: unique content-hash ids
    assert len(set(table["key"].to_pylist())) == 1000
    assert len(set(table["TEXT"].to_pylist())) <= 5 * 4
    # the job's own planning reads it with the benchmark's column mapping, extra columns carried
    source = plan_source(str(tmp_path / "m"), parse_column_map(COLUMNS))
    assert source.total_rows == 1000 and len(source.groups) == 12
    assert set(source.carried) == {"key", "score"}
    again = write_manifest(tmp_path / "m", 1000, files=4, row_group_rows=100, images=5)
    assert again["reused"]


_FAKE_JOB = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, lambda *a: sys.exit(130))
ballast = bytearray(50_000_000)
for i in range(len(ballast) // 4096):
    ballast[i * 4096] = 1
images = Path(sys.argv[1]) / "images"
images.mkdir(parents=True)
for i in range(1000):
    (images / f"{i}.png").write_bytes(b"x")
    time.sleep(0.05)
"""


def test_run_job_for_samples_rss_finds_pngs_and_stops_the_job(tmp_path):
    out = tmp_path / "out"
    figures = run_job_for([sys.executable, "-c", _FAKE_JOB, str(out)], out, seconds=3, log_path=tmp_path / "log",
                          sample_s=0.1, grace_s=5)
    assert figures["stopped_by"] == "sigint" and figures["exit_code"] is None
    assert figures["rss_peak_mb"] > 50 and figures["first_png_s"] is not None and figures["first_png_s"] < 3
    assert figures["pngs"] > 5 and figures["steady_rows_per_s"] > 1
    assert figures["ray_started_s"] is None  # no child process: no Ray
    assert "| 100 |" in markdown([{"rows": 100, **figures}])


def test_job_command_is_the_real_cli():
    command = job_command("M", "OUT", "MODEL")
    assert command[1:5] == ["-m", "ddim_worker.cli", "run", "M"] and "--no-report" in command
    assert Path(command[0]).name.startswith("python")
