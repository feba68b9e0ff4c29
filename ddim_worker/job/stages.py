"""The job's CPU stages as plain batch functions (dict of NumPy arrays in and out), testable without Ray.

``prepare_batch`` fetches, decodes and preprocesses images and looks up the latent cache, so the engine actors never
wait on the network; ``write_images`` encodes PNGs and writes images and new latents; ``write_results`` writes the
finished rows as a results shard and hands the driver a small summary. None of them ever raises for one row: a row
that fails gets ``status = failed`` with a stable ``error_code``, and its neighbours go on.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ddim_worker import latent_cache, storage

from ddim_worker.columns import (
    ENGINE,
    PREPARE,
    RESULT_SETTING_FIELDS,
    SCORE_FIELDS,
    WRITE,
    RowSchema,
    current,
    results_columns,
    score_values,
    setting_value,
)
from ddim_worker.failpoints import failpoint
from ddim_worker.fetch import Fetcher, ensure_worker_logging, shared_fetcher
from ddim_worker.core.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageError,
    decode_image,
    encode_mask_png,
    encode_png,
    preprocess,
    read_png_text,
)
from ddim_worker.manifest import ManifestFiles, id_hash
from ddim_worker.outputs import OutputLayout, candidate_id
from ddim_worker.rows import EDITED, FAILED, FILTERED, OK, PENDING, RowError, is_missing, text_or_none
from ddim_worker.url_policy import FetchError, FetchPolicy


@dataclass(frozen=True)
class StageContext:
    """What the CPU stages need to know about the job; built once by the driver and shipped to every task."""

    layout: OutputLayout
    manifest: ManifestFiles | None
    model: str
    model_fingerprint: str
    dtype: str  # the dtype the engine is expected to run (the actors report the one they ran)
    size: int
    storage_options: dict = field(default_factory=dict)
    policy: FetchPolicy = FetchPolicy()
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    resume: bool = True  # a row whose PNG exists is done (a run killed before its results shard was written)
    generation: str = ""
    carried: pa.Schema = field(default_factory=lambda: pa.schema([]))
    results_schema: pa.Schema | None = None
    embed_images: bool = False  # the edited PNG goes into the results shards (edited_image)
    save_images: bool = True  # images/<p>/<id>.png for every row (off: only for the report's sample)
    save_inputs: bool = False  # inputs/<p>/<id>.png for every row (off: only for the report's sample)
    image_sample: float = 1.0  # the fraction of ids (by hash) whose input and edited images are kept for the report
    stop_marker: str | None = None  # once this object exists (the driver stopped early), no more shards are written
    run_id: str | None = None  # the run's lease: a task writes results only while ``lease.json`` names this run
    schema: RowSchema = field(default_factory=current)  # the row schema the driver planned with, for every task

    def may_write_results(self) -> bool:
        """Whether this run may still write results shards: not stopped early, and still the lease's holder (a run
        that lost its output to another run writes nothing more, whatever its driver knows yet)."""
        if self.stop_marker and storage.exists(self.stop_marker, self.storage_options):
            return False
        if self.run_id is None:
            return True
        from ddim_worker.job.lease import holder

        return holder(self.layout.lease, self.storage_options) == self.run_id

    def image_uri(self, row_id: str) -> str:
        return self.layout.edited(row_id)

    def in_image_sample(self, row_id: str) -> bool:
        return in_sample(row_id, self.image_sample)


def in_sample(row_id: str, fraction: float) -> bool:
    """Whether an id is in the sample of ``fraction`` of all ids, by its hash: the same ids every run and stage, so
    the report finds the images the write stage kept for it without listing anything."""
    return fraction >= 1.0 or id_hash(str(row_id)) < fraction * 2**64


def text_column(values: list) -> np.ndarray:
    """A text column in flight: "" for missing values, never None (see ``columns.Column.empty``)."""
    return np.array([text_or_none(v) or "" for v in values], dtype=object)


def _fail(out: dict[str, list], i: int, code: str, message: str) -> None:
    out["status"][i], out["error_code"][i], out["error"][i] = FAILED, code, message


def _embedded(row: dict) -> bytes | None:
    data = row.get("embedded_image")
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) and len(data) else None


def _fetcher(ctx: StageContext) -> Fetcher:
    """This process's fetcher for the job (one pooled HTTP session, reused batch after batch)."""
    base = ctx.manifest
    return shared_fetcher(ctx.policy, ctx.storage_options, base_uri=base.base_uri if base else None,
                          base_dir=base.base_uri if base and base.is_local else None)


def cache_key(ctx: StageContext, pixels: np.ndarray, row: dict, dtype: str | None = None) -> latent_cache.CacheKey:
    """The row's latent-cache key, derived from its one inversion key (``inversion_key.InversionKey``)."""
    from ddim_worker.core.inversion_key import InversionKey

    key = InversionKey.of(hashlib.sha256(pixels.tobytes()).hexdigest(), row["source_prompt"], row["negative_prompt"],
                          row["num_steps"], row["inversion_guidance"], row["inversion"], row.get("seed"))
    return key.cache_key(ctx.model_fingerprint, ctx.size, dtype or ctx.dtype, float(row["guidance_scale"]))


def prepare_batch(batch: dict[str, np.ndarray], ctx: StageContext) -> dict[str, np.ndarray]:
    """Fetch (concurrently) + decode + preprocess each row's image and read its cached trajectory, if any.

    A row whose edited PNG already exists (an earlier run was killed after writing it, before its results shard)
    is marked done without fetching anything: it is recorded, not recomputed.
    """
    ensure_worker_logging()
    batch = ctx.schema.restore_nulls(batch)
    n = len(batch["id"])
    names = [k for k in batch if k != "embedded_image"]
    out: dict[str, list] = {
        "status": list(batch["status"]), "error_code": list(batch["error_code"]), "error": list(batch["error"]),
        "cache_uri": [None] * n, "cache_blob": [b""] * n, "prepare_seconds": [0.0] * n, "recovered": [False] * n,
        "recovered_dtype": [None] * n,
    }
    rows = [{name: batch[name][i] for name in batch} for i in range(n)]
    todo = []
    for i, row in enumerate(rows):
        if (out["status"][i] or PENDING) != PENDING:
            continue
        found = recoverable_png(row, ctx) if ctx.resume else None
        if found is not None:
            out["status"][i], out["recovered"][i], out["recovered_dtype"][i] = found.status, True, found.dtype or ""
        else:
            todo.append(i)
    started = time.perf_counter()
    fetch = [i for i in todo if _embedded(rows[i]) is None]
    urls = [text_or_none(rows[i].get("image_url")) for i in fetch]
    for i, url in zip(fetch, urls):
        if url is None:  # parsing fails such rows first; a null must never become the file name "nan"
            _fail(out, i, "missing_image", "the row names no image")
    fetch = [i for i, url in zip(fetch, urls) if url is not None]
    todo = [i for i in todo if out["status"][i] == PENDING]
    fetched = dict(zip(fetch, _fetcher(ctx).fetch_all([text_or_none(rows[i].get("image_url")) for i in fetch])))
    fetch_seconds = (time.perf_counter() - started) / max(len(todo), 1)
    pixels = np.zeros((n, ctx.size, ctx.size, 3), dtype=np.uint8)
    for i in todo:
        started = time.perf_counter()
        try:
            data = fetched[i] if i in fetched else _embedded(rows[i])
            if isinstance(data, Exception):
                raise data
            image = decode_image(data, max_pixels=ctx.max_pixels, min_side=ctx.min_side)
            pixels[i] = preprocess(image, ctx.size)
            # The key names the trajectory even with the cache off: an engine actor keeps its last ones by it.
            out["cache_uri"][i] = latent_cache.cache_uri(ctx.layout.latents, cache_key(ctx, pixels[i], rows[i]))
            if ctx.layout.caches_latents:
                try:
                    out["cache_blob"][i] = storage.read_bytes(out["cache_uri"][i], ctx.storage_options)
                except (FileNotFoundError, OSError):
                    pass  # a miss: the actor inverts
        except (FetchError, ImageError, RowError) as exc:
            _fail(out, i, exc.code, getattr(exc, "message", None) or str(exc))
        except Exception as exc:  # noqa: BLE001 - any other surprise still fails only this row
            _fail(out, i, "fetch_failed", f"{type(exc).__name__}: {exc}")
        out["prepare_seconds"][i] = fetch_seconds + time.perf_counter() - started
    result = {name: batch[name] for name in names}
    text = ctx.schema.text_columns
    result.update({k: text_column(v) if k in text else np.array(v, dtype=object) for k, v in out.items()})
    result["prepare_seconds"] = np.array(out["prepare_seconds"], dtype=np.float64)
    result["recovered"] = np.array(out["recovered"], dtype=bool)
    result["pixels"] = pixels
    return result


@dataclass(frozen=True)
class RecoverablePng:
    """An edited PNG an earlier run wrote for this very row; ``dtype`` is the one its engine ran (its settings
    chunk's ``dtype=``; None in a PNG that does not say)."""

    dtype: str | None
    status: str = OK  # what the run that wrote it recorded: ok, or filtered (its ``ddim_edit:status`` chunk)


def recoverable_png(row: dict, ctx: StageContext) -> RecoverablePng | None:
    """This row's edited PNG if it already exists and was made from this very row (an earlier run wrote it and was
    killed before its results shard), else None. Its own text chunks must name the row's input digest (id, image,
    prompts and every setting), the model's fingerprint and the working size; a PNG made otherwise is recomputed,
    never recorded with settings it was not made with."""
    try:
        data = storage.read_bytes(ctx.image_uri(str(row["id"])), ctx.storage_options)
    except (FileNotFoundError, OSError):
        return None
    try:
        text = read_png_text(data)
    except ImageError:
        return None
    model = text.get("ddim_edit:model", "")
    settings = text.get("ddim_edit:settings", "").split()
    if (text.get("ddim_edit:input") == text_or_none(row.get("input_digest"))
            and text.get("ddim_edit:id") == str(row["id"])
            and model.endswith(f"({ctx.model_fingerprint})")
            and f"size={ctx.size}" in settings):
        dtypes = [part.partition("=")[2] for part in settings if part.startswith("dtype=")]
        status = FILTERED if text.get("ddim_edit:status") == FILTERED else OK
        return RecoverablePng(dtypes[-1] if dtypes and dtypes[-1] else None, status)
    return None


#: What a recovered row records that only its engine run knew: left null (the PNG and the files beside it do not
#: say), along with its pass and sample counts (0: this run ran nothing for it).
ENGINE_ONLY = ("latent_mse", "attention_control")


def recovered_outputs(row: dict, ctx: StageContext, dtype: str) -> tuple[dict[str, str | None], dict[str, float]]:
    """The uris and fidelity figures of a recovered row, from the files its killed run left beside its PNG.

    Each of the input, reconstruction and mask PNGs is recorded when it exists. The cached trajectory's uri needs the
    preprocessed input's digest, so it is found only when the input PNG was saved (``--save-inputs`` or the
    report's sample; it is lossless) and its entry exists under the PNG's dtype. PSNR and SSIM are measured again
    from the input and reconstruction PNGs when both exist; ``latent_mse`` and ``attention_control`` came from the
    engine alone and stay null (``ENGINE_ONLY``).
    """
    rid, options = str(row["id"]), ctx.storage_options
    uris: dict[str, str | None] = {}
    for kind, column in (("input", "input_uri"), ("reconstruction", "reconstruction_uri"), ("mask", "mask_uri")):
        uri = ctx.layout.image(kind, rid)
        uris[column] = uri if storage.exists(uri, options) else None
    pictures = {}
    for column in ("input_uri", "reconstruction_uri"):
        if uris[column]:
            try:
                pictures[column] = np.asarray(decode_image(storage.read_bytes(uris[column], options)))
            except (ImageError, OSError):
                uris[column] = None  # unreadable: not recorded as this row's
    uris["latent_uri"] = None
    if ctx.layout.caches_latents and "input_uri" in pictures:
        uri = latent_cache.cache_uri(ctx.layout.latents, cache_key(ctx, pictures["input_uri"], row, dtype))
        uris["latent_uri"] = uri if storage.exists(uri, options) else None
    figures: dict[str, float] = {}
    if len(pictures) == 2 and pictures["input_uri"].shape == pictures["reconstruction_uri"].shape:
        from ddim_worker.core import metrics  # torch: loaded by the tasks that measure fidelity, not by every task

        figures = {"psnr": metrics.psnr(pictures["input_uri"], pictures["reconstruction_uri"]),
                   "ssim": metrics.ssim(pictures["input_uri"], pictures["reconstruction_uri"])}
    return uris, figures


#: The settings a PNG's ``ddim_edit:settings`` text lists (the prompts have chunks of their own).
SETTINGS_IN_PNG = tuple(name for name in RESULT_SETTING_FIELDS if name != "negative_prompt")


def png_text(row: dict, ctx: StageContext, dtype: str | None = None) -> dict[str, str]:
    """What a PNG says about how it was made (tEXt chunks): prompts, settings, model, the dtype the engine ran."""
    return {
        "ddim_edit:id": str(row["id"]),
        "ddim_edit:source_prompt": str(row["source_prompt"]),
        "ddim_edit:edit_prompt": str(row["edit_prompt"]),
        "ddim_edit:negative_prompt": str(row["negative_prompt"] or ""),
        "ddim_edit:settings": " ".join([*(f"{name}={setting_value(name, row[name])}" for name in SETTINGS_IN_PNG),
                                        f"size={ctx.size}", f"dtype={dtype or ctx.dtype}"]),
        "ddim_edit:model": f"{ctx.model} ({ctx.model_fingerprint})",
        "ddim_edit:input": str(row.get("input_digest") or ""),
        **_candidate_text(row),
    }


def _candidate_text(row: dict) -> dict[str, str]:
    """The chunks of a row with candidates or a scorer: which candidate, its draws, its scores, the verdict."""
    scored = not is_missing(row.get("score"))
    if not scored and int(setting_value("candidates", row["candidates"])) == 1:
        return {}
    text = {"ddim_edit:candidate": " ".join(f"{name}={row[column]}" for name, column in (
        ("candidate", "candidate"), ("cross_replace", "candidate_cross_replace"),
        ("self_replace", "candidate_self_replace")) if not is_missing(row.get(column)))}
    if scored:
        text["ddim_edit:scores"] = " ".join(f"{name}={float(row[name]):.4f}" for name in SCORE_FIELDS)
        text["ddim_edit:status"] = OK if _passed(row) else FILTERED
    return text


def write_images(batch: dict[str, np.ndarray], ctx: StageContext) -> dict[str, np.ndarray]:
    """Write each edited row's new latents, its side images and its PNG; the PNG last, so its presence means "done".

    What is written follows the storage switches: the edited PNG with ``--save-images`` (or for the report's sample),
    the input with ``--save-inputs`` (or for the report's sample), the latents unless ``--latent-cache off``. The PNG
    bytes go on to the results shard when it embeds them (``--embed-images``, or ``--no-save-images``: the packed
    dataset then takes them from there).
    """
    batch = ctx.schema.restore_nulls(batch)
    writes = _Writes(batch, ctx)
    for i in range(writes.n):
        started = time.perf_counter()
        row = {name: batch[name][i] for name in batch}
        if writes.status[i] in EDITED and row.get("recovered"):
            writes.recovered(i, row)
            continue
        if (writes.status[i] or PENDING) == PENDING:
            writes.write(i, row)
            writes.write_seconds[i] = time.perf_counter() - started
    return writes.columns()


def _passed(row: dict) -> bool:
    """The scorer's verdict on an edited row (true where nothing was scored)."""
    value = row.get("passed")
    return True if value is None else bool(value)


class _Writes:
    """What the write stage records of a batch: its own columns (uris and bytes of what it wrote, the PNG), and what
    it corrects of the engine's for a recovered row (its dtype is its PNG's, its fidelity what its files say, its
    attention control unknown)."""

    def __init__(self, batch: dict[str, np.ndarray], ctx: StageContext):
        self.batch, self.ctx, self.n = batch, ctx, len(batch["id"])
        n = self.n
        self.status, self.code, self.error = (list(batch[k]) for k in ("status", "error_code", "error"))
        outputs = ctx.schema.where(stage=WRITE, results=True)
        self.uris: dict[str, list] = {c.name: [None] * n for c in outputs if pa.types.is_string(c.type)}
        self.sizes = {c.name: np.zeros(n, np.int64) for c in outputs if pa.types.is_integer(c.type)}
        self.pngs = [b""] * n
        self.write_seconds = np.zeros(n)
        self.dtypes = list(batch["engine_dtype"]) if "engine_dtype" in batch else [ctx.dtype] * n
        self.fidelity = {name: np.array(batch[name], np.float64) if name in batch else np.full(n, np.nan)
                         for name in ("psnr", "ssim")}
        self.controls = list(batch["attention_control"]) if "attention_control" in batch else [None] * n
        self.candidates = [""] * n  # --keep-candidates: each row's candidates as JSON text (lists travel so)

    def recovered(self, i: int, row: dict) -> None:
        """A row recorded from the PNG a killed run left: its files are found, nothing is written."""
        ctx, rid = self.ctx, str(row["id"])
        self.uris["output_uri"][i] = ctx.image_uri(rid)
        png = storage.read_bytes(self.uris["output_uri"][i], ctx.storage_options) if ctx.embed_images else b""
        self.pngs[i], self.sizes["image_bytes"][i] = png, len(png)
        self.dtypes[i] = text_or_none(row.get("recovered_dtype")) or ctx.dtype
        found, figures = recovered_outputs(row, ctx, self.dtypes[i])
        for column, uri in found.items():
            self.uris[column][i] = uri
        for name, value in figures.items():
            self.fidelity[name][i] = value
        self.controls[i] = None

    def write(self, i: int, row: dict) -> None:
        """An edited row's files; a failed write fails this row only."""
        try:
            self._write(i, row, str(row.get("engine_dtype") or self.ctx.dtype))
            self.status[i] = OK if _passed(row) else FILTERED
        except Exception as exc:  # noqa: BLE001 - a failed write fails this row only
            self.status[i], self.code[i], self.error[i] = FAILED, "write_failed", f"{type(exc).__name__}: {exc}"
            for column in self.uris:
                self.uris[column][i] = None
            self.candidates[i] = ""

    def _write(self, i: int, row: dict, dtype: str) -> None:
        ctx, rid, uris, sizes = self.ctx, str(row["id"]), self.uris, self.sizes
        blob = row.get("trajectory_blob")
        if ctx.layout.caches_latents and blob is not None and len(blob):
            uris["latent_uri"][i] = latent_cache.cache_uri(ctx.layout.latents,
                                                           cache_key(ctx, np.asarray(row["pixels"]), row, dtype))
            storage.write_bytes(uris["latent_uri"][i], bytes(blob), ctx.storage_options)
            sizes["latent_bytes"][i] = len(blob)
        elif ctx.layout.caches_latents and row.get("cache_uri"):
            uris["latent_uri"][i] = str(row["cache_uri"])
        sampled = ctx.in_image_sample(rid)
        for kind, key, column in (("input", "pixels", "input_uri"),
                                  ("reconstruction", "reconstruction", "reconstruction_uri")):
            if row.get(key) is not None and (kind == "reconstruction" or ctx.save_inputs or sampled):
                self._put(i, column, ctx.layout.image(kind, rid), encode_png(np.asarray(row[key])))
        if row.get("has_mask"):  # what the edit changed (mask auto), for dataset builders
            self._put(i, "mask_uri", ctx.layout.image("mask", rid), encode_mask_png(np.asarray(row["mask_pixels"])))
        kept = row.get("candidate_images")
        if kept is not None and len(kept):
            self.candidates[i] = json.dumps(self._write_candidates(i, row, pickle.loads(bytes(kept)), dtype))
        png = encode_png(np.asarray(row["edited"]), png_text(row, ctx, dtype))
        sizes["image_bytes"][i] = len(png)
        if ctx.save_images or sampled:
            uris["output_uri"][i] = ctx.image_uri(rid)
            storage.write_bytes(uris["output_uri"][i], png, ctx.storage_options)
            failpoint("image_written")
        if ctx.embed_images:
            self.pngs[i] = png

    def _write_candidates(self, i: int, row: dict, kept: list, dtype: str) -> list[dict]:
        """Every candidate's PNG under its own id (its chunks say which candidate, its draws, scores and verdict);
        their records for the results' ``all_candidates`` column."""
        records = []
        for c in kept:
            scores = score_values(c.scores)
            own = {**row, "candidate": c.candidate, "candidate_cross_replace": c.cross_replace,
                   "candidate_self_replace": c.self_replace, "passed": c.passed, **scores}
            cid = candidate_id(str(row["id"]), c.candidate)
            uri = self.ctx.layout.candidate(str(row["id"]), c.candidate)
            png = encode_png(np.asarray(c.image), png_text(own, self.ctx, dtype))
            storage.write_bytes(uri, png, self.ctx.storage_options)
            self.sizes["input_bytes"][i] += len(png)
            records.append({"candidate": c.candidate, "id": cid, "uri": uri, "cross_replace": c.cross_replace,
                            "self_replace": c.self_replace, **scores, "passed": bool(c.passed)})
        return records

    def _put(self, i: int, column: str, uri: str, data: bytes) -> None:
        """A side image (input, reconstruction, mask): written, its uri recorded, its bytes counted."""
        self.uris[column][i] = uri
        storage.write_bytes(uri, data, self.ctx.storage_options)
        self.sizes["input_bytes"][i] += len(data)

    def columns(self) -> dict[str, np.ndarray]:
        """The batch without its payloads, with what was written."""
        dropped = {*self.ctx.schema.payloads(PREPARE, ENGINE), "recovered_dtype"}
        result = {k: v for k, v in self.batch.items() if k not in dropped}
        result.update(engine_dtype=np.array(self.dtypes, dtype=object), attention_control=text_column(self.controls),
                      **self.fidelity)
        result.update(status=text_column(self.status), error_code=text_column(self.code),
                      error=text_column(self.error), **{c: text_column(v) for c, v in self.uris.items()},
                      **self.sizes, png=np.array([p or b"" for p in self.pngs], dtype=object),
                      write_seconds=self.write_seconds, all_candidates=text_column(self.candidates))
        return result


def write_results(batch: dict[str, np.ndarray], ctx: StageContext) -> dict[str, np.ndarray]:
    """Write these finished rows as a results shard (ok rows and rows to retry apart) and summarise them."""
    from ddim_worker.job.shards import (
        EDITED_IMAGE,
        keys_digest,
        table_keys,
        write_shard,
    )
    from ddim_worker.job.source import carried_table

    batch = ctx.schema.restore_nulls(batch)
    n = len(batch["id"])
    rows = results_columns(batch, n, ctx.dtype, ctx.schema, ctx.generation)
    table = pa.table({f.name: pa.array(rows[f.name], type=f.type) for f in ctx.results_schema
                      if f.name in rows})
    carried = carried_table(list(batch["carried"]), ctx.carried)
    for column in carried.column_names:
        table = table.append_column(carried.schema.field(column), carried.column(column))
    if ctx.embed_images:
        images = [{"bytes": bytes(p), "path": f"{rid}.png"} if s == OK and p is not None and len(p) else None
                  for p, s, rid in zip(batch["png"], rows["status"], rows["id"])]
        table = table.append_column(EDITED_IMAGE, pa.array(images, type=EDITED_IMAGE.type))
    table = table.cast(ctx.results_schema)
    summary_fields = ctx.schema.summary_fields
    # While the shard is written a token says so: a driver that stops early waits for tokens, not a fixed time.
    token = ctx.layout.inflight(ctx.generation, keys_digest(table_keys(table)))
    storage.write_bytes(token, b"", ctx.storage_options)
    try:
        if not ctx.may_write_results():
            return {name: np.zeros(0, dtype=object) for name in summary_fields}  # the driver records them as not run
        written = write_shard(ctx.layout, table, ctx.generation, ctx.storage_options)
        failpoint("results_written")
    finally:
        storage.remove(token, ctx.storage_options)
    summary = {name: np.array(rows[name], dtype=object) for name in summary_fields if name in rows}
    summary["recovered"] = np.array(rows["recovered"], dtype=bool)
    summary["results_bytes"] = np.full(n, sum(size for _, size in written) / max(n, 1))
    return summary
