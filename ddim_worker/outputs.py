"""Every path a job writes under ``--output``, in one place.

    OUTPUT/
      images/<p>/<id>.png          the edited image (--save-images, the default; written last: its presence means the
                                   row is done); <p> is a prefix folder of the id (see ``prefix``)
      inputs/<p>/<id>.png          the preprocessed input the engine saw (--save-inputs; else only the report's sample)
      reconstructions/<p>/<id>.png the inversion resampled with the source prompt (--measure-fidelity)
      masks/<p>/<id>.png           what the edit changed, 255 inside (--mask auto)
      candidates/<p>/<id>.c<k>.png every candidate k of a row (--keep-candidates): each under its own id
      latents/<xyz>/<digest>.safetensors   cached inversion trajectories (--latent-cache: elsewhere, or off)
      results/ok-*.parquet, retry-*.parquet   the results ledger as shards: one row per manifest row
      results/_made_with.json      the options and model the results are made with (a rerun must match them)
      dataset/README.md            the edited dataset's card: it names the data files of the current packing
      dataset/data/<version>/train-NNNNN-of-MMMMM.parquet   the edited dataset, packed (see ``job.pack``)
      failed.parquet               the failed rows' manifest rows, to rerun only them
      job.json                     counts, timings, bytes, versions and the effective configuration
      report.html, report-N.html, contact-sheet.png
      lease.json                   the run that holds this output now (renewed as its heartbeat); gone when it ends
      run.json                     the number of the latest run on this output (only grows, even with --overwrite)
      .inflight/<generation>-<digest>   a results shard being written (the driver waits for these when it stops)
      .stop-<generation>           written when a run stops early: its tasks write no more shards
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ddim_worker.storage import join_uri

#: Image folders by what they hold (the report shows them side by side).
IMAGE_FOLDERS = {"input": "inputs", "edited": "images", "reconstruction": "reconstructions", "mask": "masks"}
#: --keep-candidates: every candidate of a row, under its own id (not a report column: a row has K of them).
CANDIDATES_FOLDER = "candidates"
REPORT_NAME = "report.html"
CONTACT_SHEET_NAME = "contact-sheet.png"

#: Hex digits of an id's hash that name its prefix folder: 16^3 = 4,096 folders, so 4 M rows put about 1,000 files in
#: each and the folder itself holds 4,096 entries (object stores, file systems and the Hugging Face Hub all slow
#: down, or refuse, past about 10,000 entries a folder).
PREFIX_DIGITS = 3

#: ``--latent-cache off``: no trajectory is read or written (a rerun still skips finished rows: the ledger does that).
LATENT_CACHE_OFF = "off"


def candidate_id(row_id: str, candidate: int) -> str:
    """A kept candidate's own id (``--keep-candidates``): the row's id and its index, ``<id>.c<k>``."""
    return f"{row_id}.c{int(candidate)}"


def prefix(row_id: str) -> str:
    """The prefix folder of a per-row file: the first hex digits of a hash of the id (ids spread evenly whatever
    they look like: ``img-000001``, ``img-000002``... would all land in one folder if cut from the id itself)."""
    return hashlib.sha256(row_id.encode()).hexdigest()[:PREFIX_DIGITS]


@dataclass(frozen=True)
class OutputLayout:
    """The object names of one job's outputs; ``latent_cache`` overrides where trajectories are cached."""

    root: str
    latent_cache: str | None = None

    def folder(self, kind: str) -> str:
        """``images``, ``inputs`` or ``reconstructions`` folder, by kind (``edited``, ``input``, ``reconstruction``)."""
        return join_uri(self.root, IMAGE_FOLDERS[kind])

    def image(self, kind: str, row_id: str) -> str:
        return join_uri(self.root, self.relative_image(kind, row_id))

    @staticmethod
    def relative_image(kind: str, row_id: str) -> str:
        """``images/<p>/<id>.png``: where a row's image of ``kind`` lives, relative to the output (the report links)."""
        return f"{IMAGE_FOLDERS[kind]}/{prefix(row_id)}/{row_id}.png"

    def candidate(self, row_id: str, candidate: int) -> str:
        """``candidates/<p>/<id>.c<k>.png``: candidate k of a row (``--keep-candidates``), filed by the row's id."""
        return join_uri(self.root, f"{CANDIDATES_FOLDER}/{prefix(row_id)}/{candidate_id(row_id, candidate)}.png")

    def edited(self, row_id: str) -> str:
        return self.image("edited", row_id)

    @property
    def caches_latents(self) -> bool:
        return self.latent_cache != LATENT_CACHE_OFF

    @property
    def latents(self) -> str:
        """The latent cache's prefix (meaningless with ``--latent-cache off``: see ``caches_latents``)."""
        if not self.caches_latents or not self.latent_cache:
            return join_uri(self.root, "latents")
        return self.latent_cache

    @property
    def dataset_folder(self) -> str:
        return join_uri(self.root, "dataset")

    @property
    def dataset_data(self) -> str:
        return join_uri(self.root, "dataset", "data")

    def dataset_version(self, version: str) -> str:
        """``dataset/data/<version>``: one packing's data files (a new packing never writes over the current one)."""
        return join_uri(self.dataset_data, version)

    @property
    def results_folder(self) -> str:
        return join_uri(self.root, "results")

    @property
    def results_identity(self) -> str:
        """``results/_made_with.json``: the options and model the results are made with (one schema per output)."""
        return join_uri(self.root, "results", "_made_with.json")

    @property
    def failed_manifest(self) -> str:
        return join_uri(self.root, "failed.parquet")

    @property
    def job_record(self) -> str:
        return join_uri(self.root, "job.json")

    def report_page(self, number: int) -> str:
        """Report page ``number`` (1-based): ``report.html``, ``report-2.html``, ..."""
        return join_uri(self.root, report_page_name(number))

    @property
    def contact_sheet(self) -> str:
        return join_uri(self.root, CONTACT_SHEET_NAME)

    @property
    def lease(self) -> str:
        return join_uri(self.root, "lease.json")

    @property
    def run_counter(self) -> str:
        return join_uri(self.root, "run.json")

    @property
    def inflight_folder(self) -> str:
        return join_uri(self.root, ".inflight")

    def inflight(self, generation: str, digest: str) -> str:
        return join_uri(self.inflight_folder, f"{generation}-{digest}")

    def stop_marker(self, generation: str) -> str:
        return join_uri(self.root, f"{STOP_MARKER_PREFIX}{generation}")


#: ``.stop-<generation>``: the name of a stop marker under the output.
STOP_MARKER_PREFIX = ".stop-"


def report_page_name(number: int) -> str:
    return REPORT_NAME if number == 1 else REPORT_NAME.replace(".html", f"-{number}.html")
