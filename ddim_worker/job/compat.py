"""One schema per output: everything a rerun writes into an existing output matches what is there.

Results shards of two schemas do not load as one dataset (``datasets`` refuses parquet files whose schemas differ),
and rows made by another model or at another size would sit beside the others as if they were the same edits. So a
rerun whose options would change the results' schema or the meaning of finished rows is refused before Ray starts,
naming the option; ``--overwrite`` redoes the output instead. Edit settings are not in this list: a row whose
settings change is redone under its id (see ``ledger``), which keeps the schema.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.job.config import JobConfig
from ddim_worker.job.shards import list_shards, shard_uris
from ddim_worker.outputs import OutputLayout

#: Options that decide the results' columns (``--no-save-images`` embeds the PNGs, as ``--embed-images`` does).
SCHEMA_OPTIONS = ("embed_images", "save_images")
#: Options that decide what a finished row's image is (the model is compared by its fingerprint).
MEANING_OPTIONS = ("size", "dtype", "variant")


class IncompatibleOutput(ValueError):
    """A rerun would mix two schemas or two meanings in one output (one line, naming the option)."""


def _flag(name: str, value: Any) -> str:
    dashed = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{dashed}" if value else f"--no-{dashed}"
    return f"--{dashed} {value}"


def identity(config: JobConfig, fingerprint: str) -> dict[str, Any]:
    """What the results under an output are made with: the options above and the model's fingerprint."""
    flat = config.flat()
    return {"options": {name: flat.get(name) for name in SCHEMA_OPTIONS + MEANING_OPTIONS},
            "model": config.model, "model_fingerprint": fingerprint}


def record_identity(config: JobConfig, layout: OutputLayout, fingerprint: str) -> None:
    """Written by a run that passed ``check_compatible``, before it writes any result: ``results/_made_with.json``
    (Parquet readers skip names starting with ``_``)."""
    storage.write_bytes(layout.results_identity, json.dumps(identity(config, fingerprint), indent=2).encode(),
                        config.storage_options)


def check_compatible(config: JobConfig, layout: OutputLayout, fingerprint: str, schema: pa.Schema) -> None:
    """Raise ``IncompatibleOutput`` when this run would write other results than the output holds."""
    if config.overwrite:
        return
    shards = sorted(list_shards(layout, config.storage_options), key=lambda s: s.name)
    if not shards:
        return
    try:
        previous = json.loads(storage.read_bytes(layout.results_identity, config.storage_options))
    except (FileNotFoundError, OSError, ValueError):
        previous = {}
    before = previous.get("options", {})
    now = config.flat()
    hint = "rerun with the same value, or add --overwrite to redo the whole output"
    for name in SCHEMA_OPTIONS + MEANING_OPTIONS:
        if name in before and before[name] != now.get(name):
            raise IncompatibleOutput(
                f"{_flag(name, now.get(name))} differs from the run that wrote {layout.results_folder} "
                f"({_flag(name, before[name])}): {hint}")
    if previous.get("model_fingerprint") and previous["model_fingerprint"] != fingerprint:
        raise IncompatibleOutput(
            f"--model {config.model} is not the model the results under {layout.results_folder} were made with "
            f"({previous.get('model')}, fingerprint {previous['model_fingerprint']}, now {fingerprint}): {hint}")
    fs, path = storage.filesystem(shard_uris(layout, [shards[-1]])[0], config.storage_options)
    with fs.open(path, "rb") as handle:  # the footer only
        there = pq.ParquetFile(handle).schema_arrow.remove_metadata()
    mine = schema.remove_metadata()
    if there.equals(mine):
        return
    for f in mine:
        if f.name not in there.names:
            raise IncompatibleOutput(f"this run would add column {f.name!r} to the results under "
                                     f"{layout.results_folder}, which lack it (another manifest, or options, than the "
                                     f"run that wrote them): {hint}")
        if not there.field(f.name).type.equals(f.type):
            raise IncompatibleOutput(f"column {f.name!r} would be {f.type} in this run's results but is "
                                     f"{there.field(f.name).type} under {layout.results_folder}: {hint}")
    missing = [name for name in there.names if name not in mine.names]
    raise IncompatibleOutput(f"the results under {layout.results_folder} have column {missing[0]!r}, which this "
                             f"run would not write (another manifest, or options, than the run that wrote them): "
                             f"{hint}")
