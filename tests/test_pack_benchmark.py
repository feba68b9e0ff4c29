"""The pack benchmark's pieces: a generated finished output, and `ddim-edit pack` on it as the benchmark runs it."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from ddim_worker.bench.pack import make_output, markdown, measure


def test_a_generated_output_packs_through_the_cli(tmp_path):
    out = make_output(tmp_path / "b", 300)
    assert len(list((out / "images").rglob("*.png"))) == 300 and len(list((out / "results").glob("ok-*"))) == 2
    figures = measure(out, "100KB", tmp_path / "pack.log")
    assert figures["exit_code"] == 0, (tmp_path / "pack.log").read_text()[-3000:]
    assert figures["rows"] == 300 and figures["files"] >= 7 and figures["rss_peak_mb"] > 100
    data = sorted((out / "dataset" / "data").rglob("train-*.parquet"))  # one packing's folder: data/<version>/
    assert len(data) == figures["files"] and sum(pq.read_metadata(f).num_rows for f in data) == 300
    assert pq.read_table(data[0]).column_names[:2] == ["edited_image", "id"] and "aesthetic" in pq.read_schema(data[0]).names
    assert json.loads((out / "job.json").read_text())["dataset"]["rows"] == 300
    assert "| 300 |" in markdown([{"rows_made": 300, **figures}])
