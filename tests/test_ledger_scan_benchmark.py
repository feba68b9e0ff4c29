"""A ledger scan reads the key columns of shards that embed their PNGs, not the PNGs: under 5% of the shards' bytes,
on local disk and on a real S3 server; and the benchmark that measures it, through its command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ddim_worker import storage
from ddim_worker.bench.ledger_scan import make_ledger, measure
from ddim_worker.job import ledger
from ddim_worker.outputs import OutputLayout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[str, dict | None]:
    if request.param == "local":
        return str(tmp_path / "out"), None
    s3_server = request.getfixturevalue("s3_server")
    return s3_server.make_bucket("ledger-scan") + f"/{tmp_path.name}", s3_server.storage_options


def test_a_scan_of_shards_with_embedded_pngs_reads_under_5_percent_of_them(output):
    out, options = output
    made = make_ledger(out, 500, options)
    assert made["shards"] == 2 and made["png_bytes_mean"] > 5000  # PNGs that do not compress away
    figures = measure(out, options)
    assert figures["rows"] == 500 and figures["shards"] == 2
    assert 0 < figures["bytes_read"] < 0.05 * figures["shard_bytes"], figures
    index = ledger.scan(OutputLayout(out), options, use_ray=False)
    assert index.winner.all() and len(index.done().hashes) == 500  # what was read is what the ledger needs
    storage.BYTES_READ.reset()
    rows = ledger.sample_rows(OutputLayout(out), index, options, 1.0)  # the report's rows leave the PNGs too
    assert len(rows) == 500 and "edited_image" not in rows[0]
    assert storage.BYTES_READ.reset()[0] < 0.1 * figures["shard_bytes"]


def test_the_benchmark_command_line_on_a_tiny_ledger(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "ledger_scan_benchmark.py"), "--rows", "20",
                           "--shard-rows", "8", "--image-side", "32", "--output", str(tmp_path / "out"),
                           "--json", str(tmp_path / "figures.json")],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert json.loads(proc.stdout) == figures
    assert figures["rows"] == 20 and figures["shards"] == 3 and figures["image_side"] == 32
    assert figures["bytes_read"] == figures["shard_bytes"] and figures["reads"] == 3  # small shards: read whole
    assert len(list((tmp_path / "out" / "results").glob("ok-r000001-a01-*.parquet"))) == 3
