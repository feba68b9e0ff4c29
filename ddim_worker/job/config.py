"""The job's configuration: every option of ``ddim-edit run`` declared once, with its default, range and help.

A ``JobConfig`` holds the job's own options plus the per-row :class:`EditSettings` defaults and the
:class:`EngineSettings`. Its flat form (:meth:`JobConfig.flat`) is what ``--print-config`` prints, what a ``--config``
file holds and what ``job.json`` records, so a job can be rerun from its own record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ddim_worker.core.candidates import Thresholds
from ddim_worker.core.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from ddim_worker.job.sizes import DEFAULT_MAX_SHARD_SIZE, parse_size
from ddim_worker.manifest import DEFAULT_MAX_PROMPT_CHARS
from ddim_worker.core.settings import (
    EditSettings,
    EngineSettings,
    SettingError,
    check_range,
    coerce,
    field_kind,
    option,
)
from ddim_worker.url_policy import FetchPolicy

#: The maintained copy of Stable Diffusion 1.5 on the Hugging Face Hub (the original repository was removed in 2024).
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


_FETCH = FetchPolicy()  # the fetch limits' defaults live with the policy that enforces them
THRESHOLDS = Thresholds()  # the scorer's defaults live with the filter that applies them

#: The nested settings objects and the names of their fields in the flat form.
NESTED = {"edit": EditSettings, "engine": EngineSettings}

#: Options that act once, on the run that is given them: ``job.json`` does not record them, so a rerun from it
#: (``--config OUT/job.json``) never deletes results or breaks a lease by surprise.
ONE_SHOT = ("overwrite", "break_lease", "prune_stale")


@dataclass
class JobConfig:
    manifest: str = option(None, "Parquet file, folder or glob (local path or any fsspec URL)", group="job")
    output: str = option(None, "output prefix: local path, s3://bucket/prefix or any fsspec URL", group="job")
    model: str = option(DEFAULT_MODEL, "diffusers folder, Hugging Face Hub id or s3:// folder of an SD 1.x model",
                        group="model")
    revision: str | None = option(None, "Hub revision of --model (branch, tag or commit)", group="model")
    variant: str | None = option(None, "weights variant of --model, e.g. fp16 (diffusers' variant=)", group="model")
    edit: EditSettings = field(default_factory=EditSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    columns: str | None = option(None, "map your manifest's columns onto ours: image_url=URL,source_prompt=TEXT",
                                 group="job")
    limit: int | None = option(None, "only the first N manifest rows", group="job", minimum=1)
    overwrite: bool = option(False, "redo rows whose outputs exist (default: resume, skipping them)", group="job")
    break_lease: bool = option(False, "take the output's lease even from a run that seems alive (it must be dead: "
                                      "two runs on one output duplicate work)", group="job")
    prune_stale: bool = option(False, "delete the result rows of ids the manifest no longer has (default: keep "
                                      "them, and count them in job.json)", group="job")
    address: str | None = option(None, "Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)",
                                 group="job")
    actors: int | None = option(None, "engine actors (default: from the cluster: its GPUs / --gpus-per-actor, growing "
                                      "and shrinking with it; one per node on a CPU-only cluster)", group="job",
                                minimum=1)
    gpus_per_actor: float | None = option(None, "GPUs per engine actor (default: 1 when the Ray cluster has GPUs, "
                                                "else 0)", group="job", minimum=0)
    cpus_per_actor: float = option(1.0, "CPUs per engine actor on CPU-only clusters (its torch threads)",
                                   group="job", minimum=0)
    engine_resources: dict = option(help='custom Ray resources per engine actor, JSON, e.g. '
                                         '{"accelerator_type:A100": 0.01}', group="job", default_factory=dict)
    max_attempts: int = option(3, "times the driver re-runs unfinished rows after Ray aborts the dataset (lost "
                                  "node)", group="job", minimum=1)
    max_failed_fraction: float | None = option(None, "stop early when more than this fraction of computed rows "
                                                     "fail (default: never)", group="job", minimum=0, maximum=1)
    results_shard_rows: int = option(256, "rows per results shard (results/*.parquet); the driver sees progress "
                                          "shard by shard", group="job", minimum=1)
    embed_images: bool = option(False, "add edited_image to the results: the edited PNG as a Hugging Face Image "
                                       "value, so datasets.load_dataset gives the edited dataset", group="job")
    measure_fidelity: bool = option(False, "resample each inversion with its source prompt: PSNR / SSIM / latent "
                                           "MSE per row (n - s more UNet passes)", group="job")
    scorer: str | None = option(None, "CLIP model (transformers folder, Hub id or s3:// folder) that scores each "
                                      "row's candidates; rows whose best candidate misses a threshold end "
                                      "filtered (kept in the results, not in the dataset)", group="candidates")
    min_direction: float = option(THRESHOLDS.direction, "least CLIP directional similarity (image change vs "
                                                        "prompt change) of a kept edit", group="candidates",
                                  minimum=-1, maximum=1)
    min_image_similarity: float = option(THRESHOLDS.image_similarity, "least CLIP similarity of a kept edit to "
                                                                      "its input image", group="candidates",
                                         minimum=-1, maximum=1)
    min_text_similarity: float = option(THRESHOLDS.text_similarity, "least CLIP similarity of a kept edit to its "
                                                                    "edit prompt", group="candidates", minimum=-1,
                                        maximum=1)
    keep_candidates: bool = option(False, "also write every candidate of a row with more than one: its image as "
                                          "candidates/<p>/<id>.c<k>.png (its own id) and its draws and scores in "
                                          "the results' all_candidates column, for filtering later", group="candidates")
    report: bool = option(True, "write report.html and contact-sheet.png at the end", group="job")
    pack: bool = option(True, "pack the edited dataset into OUTPUT/dataset at the end of a finished run (parquet "
                              "shards + dataset card; `ddim-edit pack OUTPUT` does it later)", group="storage")
    max_shard_size: str = option(DEFAULT_MAX_SHARD_SIZE, "largest packed dataset file: 100KB, 500MB, 2GB or a "
                                                         "number of bytes (as datasets' max_shard_size)",
                                 group="storage", metavar="SIZE")
    save_images: bool = option(True, "write images/<p>/<id>.png for every row (off: only the packed dataset and the "
                                     "report's sample hold the edited images)", group="storage")
    save_inputs: bool = option(False, "write inputs/<p>/<id>.png, the preprocessed input, for every row (off: only "
                                      "for the report's sample)", group="storage")
    latent_cache: str | None = option(None, "latent cache prefix, shareable between jobs, or off (default: "
                                            "OUTPUT/latents)",
                                      group="storage")
    storage_options: dict = option(help="fsspec options as JSON, e.g. S3 endpoint and keys", group="storage",
                                   default_factory=dict)
    allow_private_network: bool = option(False, "let image URLs reach loopback / private / link-local addresses "
                                                "(off: SSRF protection)", group="limits")
    respect_opt_outs: bool = option(True, "refuse images whose response says X-Robots-Tag noai, noimageai, noindex "
                                          "or noimageindex (the row ends opted_out), as img2dataset does",
                                    group="limits")
    allow_local_files: bool = option(False, "let image paths reach local files outside the manifest's folder",
                                     group="limits")
    allow_prefix: str | None = option(None, "object-store prefixes image URLs may read besides the manifest's own "
                                            "bucket, comma-separated (e.g. s3://images/,gs://other/)",
                                      group="limits")
    fetch_concurrency: int = option(_FETCH.concurrency, "images one fetch task downloads at once", group="limits",
                                    minimum=1, maximum=256)
    fetch_deadline: float = option(_FETCH.deadline_s, "seconds an image may take in all (redirects and retries "
                                                      "included)", group="limits", minimum=0.001)
    fetch_timeout: float = option(_FETCH.timeout_s, "seconds per connect and per read of an image", group="limits",
                                  minimum=0.001)
    fetch_retries: int = option(_FETCH.retries, "retries of a transient fetch error (5xx, 429, reset, timeout)",
                                group="limits", minimum=0, maximum=20)
    max_download_bytes: int = option(_FETCH.max_bytes, "largest image download, bytes", group="limits", minimum=1)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "largest decoded image, pixels (decompression bombs are refused "
                                                 "before decoding)", group="limits", minimum=1)
    min_image_side: int = option(DEFAULT_MIN_SIDE, "smallest image side, pixels", group="limits", minimum=1)
    max_prompt_chars: int = option(DEFAULT_MAX_PROMPT_CHARS, "longest prompt, characters (CLIP reads 77 tokens)",
                                   group="limits", minimum=1)

    def __post_init__(self) -> None:
        if isinstance(self.allow_prefix, (list, tuple)):  # a YAML list of prefixes
            self.allow_prefix = ",".join(str(p) for p in self.allow_prefix)
        for spec in own_fields():
            value = getattr(self, spec.name)
            if value is None:
                continue
            kind = field_kind(spec)
            if kind is dict:
                if not isinstance(value, dict):
                    raise SettingError(spec.name, f"must be a mapping (JSON object), got {value!r}")
                continue
            setattr(self, spec.name, coerce(spec.name, kind, value))
            check_range(self, spec)
        if self.edit.candidates > 1 and not self.scorer:
            raise SettingError("candidates", f"is {self.edit.candidates}: choosing among candidates needs a scorer "
                                             "(--scorer MODEL)")
        try:
            parse_size(self.max_shard_size)
        except ValueError as exc:
            raise SettingError("max_shard_size", str(exc)) from None

    # -- derived values --------------------------------------------------------------------------------------
    def policy(self) -> FetchPolicy:
        prefixes = tuple(p.strip() for p in (self.allow_prefix or "").split(",") if p.strip())
        return dataclasses.replace(_FETCH, allow_private_network=self.allow_private_network,
                                   allow_local_files=self.allow_local_files, timeout_s=self.fetch_timeout,
                                   retries=self.fetch_retries, max_bytes=self.max_download_bytes,
                                   concurrency=self.fetch_concurrency, deadline_s=self.fetch_deadline,
                                   allowed_prefixes=prefixes,
                                   disallowed_directives=_FETCH.disallowed_directives if self.respect_opt_outs
                                   else ())

    def thresholds(self) -> Thresholds:
        return Thresholds(self.min_direction, self.min_image_similarity, self.min_text_similarity)

    # -- the flat form ---------------------------------------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """Every option by its long flag's name (underscores): what ``--print-config`` and ``job.json`` show."""
        out: dict[str, Any] = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if spec.name in NESTED:
                out.update(dataclasses.asdict(value))
            else:
                out[spec.name] = value
        return out

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> JobConfig:
        """The inverse of :meth:`flat`: unknown names are an error that lists the known ones."""
        known = all_fields()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingError(unknown[0], f"is not an option; options are: {', '.join(known)}")
        nested = {name: kind(**{f.name: values[f.name] for f in dataclasses.fields(kind) if f.name in values})
                  for name, kind in NESTED.items()}
        own = {f.name: values[f.name] for f in own_fields() if f.name in values}
        return cls(**own, **nested)


def own_fields() -> list[dataclasses.Field]:
    """The job's own options (not the nested edit and engine settings)."""
    return [f for f in dataclasses.fields(JobConfig) if f.name not in NESTED]


def all_fields() -> dict[str, dataclasses.Field]:
    """Every option by name, in ``--help`` order of declaration: job's own, then edit, then engine settings."""
    out = {f.name: f for f in own_fields()}
    for kind in NESTED.values():
        out.update({f.name: f for f in dataclasses.fields(kind)})
    return out
