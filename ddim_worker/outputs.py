"""Every path a job writes under ``--output``, in one place.

    OUTPUT/
      images/<id>.png              the edited image (written last: its presence means the row is done)
      inputs/<id>.png              the preprocessed input the engine saw
      reconstructions/<id>.png     the inversion resampled with the source prompt (--measure-fidelity)
      masks/<id>.png               what the edit changed, 255 inside (--mask auto)
      latents/<xx>/<digest>.safetensors   cached inversion trajectories (unless --latent-cache points elsewhere)
      results/ok-*.parquet, retry-*.parquet   the results table as shards: one row per manifest row
      failed.parquet               the failed rows' manifest rows, to rerun only them
      job.json                     counts, timings, versions and the effective configuration
      report.html, report-N.html, contact-sheet.png
"""

from __future__ import annotations

from dataclasses import dataclass

from ddim_worker.storage import join_uri

#: Image folders by what they hold (the report shows them side by side).
IMAGE_FOLDERS = {"input": "inputs", "edited": "images", "reconstruction": "reconstructions", "mask": "masks"}
REPORT_NAME = "report.html"
CONTACT_SHEET_NAME = "contact-sheet.png"


@dataclass(frozen=True)
class OutputLayout:
    """The object names of one job's outputs; ``latent_cache`` overrides where trajectories are cached."""

    root: str
    latent_cache: str | None = None

    def folder(self, kind: str) -> str:
        """``images``, ``inputs`` or ``reconstructions`` folder, by kind (``edited``, ``input``, ``reconstruction``)."""
        return join_uri(self.root, IMAGE_FOLDERS[kind])

    def image(self, kind: str, row_id: str) -> str:
        return join_uri(self.folder(kind), f"{row_id}.png")

    def edited(self, row_id: str) -> str:
        return self.image("edited", row_id)

    @property
    def latents(self) -> str:
        return self.latent_cache or join_uri(self.root, "latents")

    @property
    def results_folder(self) -> str:
        return join_uri(self.root, "results")

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


def report_page_name(number: int) -> str:
    return REPORT_NAME if number == 1 else REPORT_NAME.replace(".html", f"-{number}.html")
