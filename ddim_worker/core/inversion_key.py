"""The one definition of "the same inversion": rows with equal keys invert to one trajectory.

Every use derives from :class:`InversionKey`: the job's sort order (``job.source.inversion_order``), the engine's
batch grouping (``EditRow.inversion_key``), source-branch sharing (``source_key``) and the latent-cache key
(``cache_key``). ``ddim`` and ``direct`` invert alike (``InversionMethod.trajectory``), so their rows of one image sort
together, are inverted once and share one cache entry and one source branch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any

from ddim_worker.core.inversion import parse_method

#: The latent cache's format: 2, levels stored in the engine's dtype (bf16 on a GPU: half the bytes of fp32), under
#: 3-hex-digit prefix folders. Part of every entry's digest, so entries of another format are never read.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class CacheKey:
    """Everything an inversion trajectory depends on."""

    image_sha256: str  # of the preprocessed pixels, so two URLs of the same picture share an entry
    source_prompt: str
    negative_prompt: str
    model_fingerprint: str
    num_steps: int
    inversion_guidance: float
    size: int
    dtype: str
    method: str

    def digest(self) -> str:
        payload = json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:40]


#: Field separator of the sort text: never in a URL or digest, unlikely in a prompt.
SEPARATOR = "\x1f"


def trajectory_name(inversion: Any) -> str:
    """The trajectory a method spelling inverts to (``direct`` -> ``ddim``); an unparsable spelling stays itself (its
    row fails validation, but it still needs a place in the sort order)."""
    try:
        return parse_method(str(inversion)).trajectory
    except ValueError:
        return str(inversion)


@dataclass(frozen=True)
class InversionKey:
    """Everything a trajectory depends on besides the model, size and dtype."""

    image: str  # the image's identity where the key is made: its pixels' digest, or its URL before fetching
    source_prompt: str
    negative_prompt: str
    num_steps: int
    inversion_guidance: float
    trajectory: str  # ``InversionMethod.trajectory``: ddim and direct are one
    seed: int | None = None  # ``noise`` draws seeded noise: its rows share only with equal seeds

    @classmethod
    def of(cls, image: str, source_prompt: str, negative_prompt: str | None, num_steps: Any,
           inversion_guidance: Any, inversion: Any, seed: Any = None) -> InversionKey:
        """The key of one row's settings (``negative_prompt`` None: empty)."""
        trajectory = trajectory_name(inversion)
        return cls(str(image), str(source_prompt), negative_prompt or "", int(num_steps), float(inversion_guidance),
                   trajectory, int(seed) if trajectory == "noise" and seed is not None else None)

    def sort_text(self) -> str:
        """The job's sort order: rows with equal keys end up next to each other, in one engine batch."""
        return SEPARATOR.join(str(v) for v in (self.image, self.source_prompt, self.negative_prompt, self.num_steps,
                                               self.inversion_guidance, self.trajectory, self.seed))

    def cache_key(self, model_fingerprint: str, size: int, dtype: str, guidance_scale: float) -> CacheKey:
        """The latent-cache key (``image`` must be the preprocessed pixels' digest): the key plus the model, size and
        dtype; null-text's stored embeddings hold for one sampling guidance scale, so its method string names it."""
        method = parse_method(self.trajectory).cache_key(guidance_scale) if self.trajectory != "noise" else "noise"
        return CacheKey(image_sha256=self.image, source_prompt=self.source_prompt,
                        negative_prompt=self.negative_prompt, model_fingerprint=model_fingerprint,
                        num_steps=self.num_steps, inversion_guidance=self.inversion_guidance, size=size, dtype=dtype,
                        method=method)

    def source_key(self, guidance_scale: float, unconditional_prompt: str, direct: bool,
                   seed: int | None) -> Hashable:
        """Rows with equal source keys share one source branch: one trajectory, sampled alike with the source
        prompt (``seed`` only where eta > 0 draws noise)."""
        return (self, float(guidance_scale), unconditional_prompt, bool(direct), seed)
