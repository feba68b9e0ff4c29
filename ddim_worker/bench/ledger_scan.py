"""Ledger scan benchmark: the bytes a ``ledger.scan`` reads from shards that embed their PNGs (``--no-save-images``).

    python jobs/ledger_scan_benchmark.py --rows 10000 --output /tmp/ledger-scan-bench
    python jobs/ledger_scan_benchmark.py --rows 10000 --output s3://bucket/bench --storage-options '{"key": ...}'

It writes the ledger such a run leaves: results shards of ``--shard-rows`` rows (the job's ``--results-shard-rows``
default), ``ok`` rows with the ``edited_image`` struct column ``{bytes, path}`` holding a distinct, noisy PNG of
``--image-side`` pixels each (Parquet cannot fold them into each other, as it cannot fold real edits); then it runs
``ledger.scan(..., use_ray=False)`` in this process and counts the bytes its files handed to the Parquet reader
(``storage.BYTES_READ``). Figures: ``bytes_read``, ``shard_bytes`` (the shards' total size), their ``ratio``,
``reads`` (read calls: ranged GETs on an object store), ``scan_seconds``, and the mean PNG size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

from ddim_worker import storage
from ddim_worker.core.images import encode_png
from ddim_worker.job import ledger, shards
from ddim_worker.outputs import OutputLayout
from ddim_worker.columns import RESULTS_SCHEMA
from ddim_worker.synthetic import picture_array

SHARD_ROWS = 256  # JobConfig.results_shard_rows' default
GENERATION = "r000001-a01"


def edited_png(i: int, side: int) -> bytes:
    """A distinct PNG per row that compresses about as well as a photograph: a picture plus noise."""
    rng = np.random.default_rng(i)
    noisy = picture_array(i % 97, side).astype(np.int16) + rng.normal(0, 12, (side, side, 3)).astype(np.int16)
    return encode_png(np.clip(noisy, 0, 255).astype(np.uint8))


def shard_table(start: int, stop: int, side: int) -> pa.Table:
    """Rows ``start``-``stop`` as the job writes them with ``--no-save-images``: no ``output_uri``, the PNG inline."""
    schema = shards.results_schema(pa.schema([]), embed_images=True)
    rows = []
    for i in range(start, stop):
        rid = f"row-{i:07d}"
        png = edited_png(i, side)
        rows.append({"id": rid, "image_url": f"s3://inputs/{rid}.jpg", "source_prompt": "a photo of a cat",
                     "edit_prompt": "a photo of a dog", "status": "ok", "output_uri": None, "image_bytes": len(png),
                     "manifest_row": i, "generation": GENERATION, "input_digest": f"{i:016x}", "num_steps": 50,
                     "start_step": 10, "guidance_scale": 3.5, "inversion_guidance": 1.0, "eta": 0.0, "seed": i,
                     "negative_prompt": "", "inversion": "ddim", "dtype": "float16",
                     "edited_image": {"bytes": png, "path": f"{rid}.png"}})
    fields = [*RESULTS_SCHEMA, shards.EDITED_IMAGE]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields)).cast(schema)


def make_ledger(output: str, rows: int, storage_options: dict | None, side: int = 64,
                shard_rows: int = SHARD_ROWS) -> dict[str, int]:
    """Write a ledger of ``rows`` ok rows with embedded PNGs under ``output`` (earlier shards there are removed)."""
    layout = OutputLayout(output)
    shards.remove_all(layout, storage_options)
    count, image_bytes = 0, 0
    for start in range(0, rows, shard_rows):
        table = shard_table(start, min(start + shard_rows, rows), side)
        image_bytes += sum(table.column("image_bytes").to_pylist())
        count += len(shards.write_shard(layout, table, GENERATION, storage_options))
    return {"shards": count, "png_bytes_mean": image_bytes // max(rows, 1)}


def shard_bytes(layout: OutputLayout, storage_options: dict | None) -> int:
    """The total size of the ledger's shards, as the store lists them."""
    fs, path = storage.filesystem(layout.results_folder, storage_options)
    names = {s.name for s in shards.list_shards(layout, storage_options)}
    return sum(int(e["size"]) for e in fs.ls(path, detail=True, refresh=True) if e["name"].rsplit("/", 1)[-1] in names)


def measure(output: str, storage_options: dict | None) -> dict[str, Any]:
    """Scan the ledger under ``output`` in this process; what it read against what the shards hold."""
    layout = OutputLayout(output)
    total = shard_bytes(layout, storage_options)
    storage.BYTES_READ.reset()
    started = time.monotonic()
    index = ledger.scan(layout, storage_options, use_ray=False)
    seconds = time.monotonic() - started
    read, reads = storage.BYTES_READ.reset()
    return {"rows": index.rows, "shards": len(index.shards), "bytes_read": read, "shard_bytes": total,
            "ratio": round(read / max(total, 1), 5), "reads": reads, "scan_seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--output", default="/tmp/ddim-edit-ledger-scan-bench", help="a local folder or s3://...")
    parser.add_argument("--storage-options", default="{}", help="fsspec options as JSON (s3: endpoint, keys)")
    parser.add_argument("--image-side", type=int, default=64, help="the PNGs' width and height")
    parser.add_argument("--shard-rows", type=int, default=SHARD_ROWS)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    options = json.loads(args.storage_options) or None
    made = time.monotonic()
    facts = make_ledger(args.output, args.rows, options, args.image_side, args.shard_rows)
    figures = {"output": args.output, "rows_made": args.rows, "image_side": args.image_side,
               "shard_rows": args.shard_rows, **facts, "make_seconds": round(time.monotonic() - made, 1),
               **measure(args.output, options)}
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
