"""``ddim-edit pack OUTPUT``: pack (again) the edited dataset of an earlier run, from its ``job.json`` and ledger.

The run's recorded configuration says which manifest the dataset follows (one row per ``ok`` manifest row); the
packing itself is the one a finished run does (``job.pack``), on the cluster, under the output's lease.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ddim_worker import storage
from ddim_worker.job import cluster, ledger
from ddim_worker.job.config import JobConfig
from ddim_worker.job.driver import JobError, index_manifest, take_lease
from ddim_worker.job.pack import PackError, card_facts, pack
from ddim_worker.job.sizes import parse_size
from ddim_worker.job.source import SourceContext, plan_source
from ddim_worker.manifest import ManifestError, parse_column_map
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import FAILED, FILTERED, SKIPPED

log = logging.getLogger("ddim_edit.job")


def pack_output(output: str, storage_options: dict | None = None, max_shard_size: str | None = None,
                address: str | None = None) -> dict[str, Any]:
    """Pack ``output``'s dataset; returns what ``job.json`` then records under ``dataset``. Raises ``JobError``."""
    options = storage_options or {}
    layout = OutputLayout(output)
    try:
        record = json.loads(storage.read_bytes(layout.job_record, options))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise JobError(f"{layout.job_record} cannot be read ({type(exc).__name__}): pack needs a run's output") \
            from None
    if record.get("state") not in ("finished", "stopped", "incomplete"):
        raise JobError(f"the last run on {output} did not finish (state {record.get('state')!r}): rerun it first")
    config = JobConfig.from_flat({**record.get("config", {}), "output": output, "storage_options": options,
                                  **({"address": address} if address else {})})
    size = parse_size(max_shard_size or config.max_shard_size)
    lease = take_lease(config, layout, interrupt=False)
    try:
        try:
            # the whole manifest, whatever --limit the last run had: a dataset follows every row
            source = plan_source(config.manifest, parse_column_map(config.columns), options, None)
        except (ManifestError, OSError) as exc:
            raise JobError(f"cannot read the run's manifest {config.manifest}: {exc}") from None
        cluster.init_ray(config)
        manifest = index_manifest(SourceContext(source, config.edit, config.max_prompt_chars))
        index = ledger.scan(layout, options)
        unique = manifest.unique_keys()
        counts = index.counts(unique)
        card = card_facts(config, model_revision=record.get("model_revision"),
                          fingerprint=record.get("model_fingerprint"), dtype=record.get("dtype"),
                          failed=counts[FAILED], skipped=counts[SKIPPED], filtered=counts[FILTERED],
                          scorer_fingerprint=(record.get("scorer") or {}).get("fingerprint"),
                          command=record.get("command", ""),
                          version=record.get("versions", {}).get("ddim-edit", ""))
        try:
            result = pack(layout, unique, options, size, card, index, guard=lambda: _check(lease))
        except (PackError, OSError) as exc:
            raise JobError(f"cannot pack the edited dataset under {layout.dataset_folder}: {exc}") from None
        record["dataset"] = result.as_dict()
        _check(lease)
        storage.write_bytes(layout.job_record, json.dumps(record, indent=2, default=str).encode(), options)
        return record["dataset"]
    finally:
        lease.release()


def _check(lease: Any) -> None:
    if (reason := lease.lost_reason()) is not None:
        raise JobError(f"stopped packing {lease.uri}: {reason}")


def main(argv: list[str] | None = None) -> int:
    """``ddim-edit pack OUTPUT``: exit 0 packed, 2 cannot pack (one line on stderr)."""
    parser = argparse.ArgumentParser(prog="ddim-edit pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="a run's --output (local path or fsspec URL)")
    parser.add_argument("--max-shard-size", default=None, metavar="SIZE",
                        help="largest data file: 100KB, 500MB, 2GB or bytes (default: the run's, else 500MB)")
    parser.add_argument("--storage-options", default="{}", metavar="JSON", help="fsspec options as JSON")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a new local Ray)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.max_shard_size is not None:
            parse_size(args.max_shard_size)
        result = pack_output(args.output, json.loads(args.storage_options), args.max_shard_size, args.address)
    except (JobError, ValueError) as exc:
        print(f"ddim-edit: error: {exc}", file=sys.stderr)
        return 2
    state = "unchanged" if result["unchanged"] else "packed"
    print(f"ddim-edit: {state}: {result['rows']} rows in {result['files']} files, {result['bytes']:,} bytes; "
          f"card {result['card']}")
    return 0
