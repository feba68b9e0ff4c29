"""CLIP scores of candidate edits, as InstructPix2Pix filtered its generated pairs.

Per candidate: the *directional* similarity (the image's change, edited minus input embedding, against the text's
change, edit minus source prompt embedding), the *image* similarity of the edited image to the input (the edit kept
the picture), and the *text* similarity of the edited image to the edit prompt (the edit shows what it names). A
``transformers`` ``CLIPModel`` and ``CLIPProcessor`` from one folder (``from_pretrained``: a local folder or a Hub id;
the job copies ``s3://`` folders first), run batched on the engine actor's device. No Ray, no storage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ddim_worker.core.candidates import Scores

class ScorerLoadError(RuntimeError):
    """The scorer cannot be loaded where the actors load it; the message says why, in one line."""


def projected(output: object) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output whose ``pooler_output`` holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


class ClipScorer:
    """Loads a CLIP model once; :meth:`score` scores a batch of candidates."""

    def __init__(self, path: str, device: str | torch.device = "cpu", revision: str | None = None):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, revision=revision).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path, revision=revision)
        except Exception as exc:  # noqa: BLE001 - one line for the job's error
            raise ScorerLoadError(f"cannot load scorer {path!r}: {type(exc).__name__}: {exc}") from exc
        self.device = torch.device(device)

    @torch.inference_mode()
    def _images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        pixels = self.processor(images=[np.asarray(im) for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.model.dtype)
        return torch.nn.functional.normalize(projected(self.model.get_image_features(pixel_values=pixels)).float(),
                                             dim=-1)

    @torch.inference_mode()
    def _texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return torch.nn.functional.normalize(projected(self.model.get_text_features(**tokens)).float(), dim=-1)

    def score(self, inputs: Sequence[np.ndarray], edited: Sequence[np.ndarray], source_prompts: Sequence[str],
              edit_prompts: Sequence[str]) -> list[Scores]:
        """One :class:`Scores` per candidate (``inputs[i]`` the image candidate ``i`` edited, uint8 (H, W, 3))."""
        if not len(edited):
            return []
        # an image's candidates (and its other edit prompts) share one input: embed each distinct input once
        keys = [np.ascontiguousarray(im).tobytes() for im in inputs]
        distinct = {key: k for k, key in enumerate(dict.fromkeys(keys))}
        firsts = {key: im for key, im in zip(keys, inputs)}
        embedded = self._images([firsts[key] for key in distinct])
        before, after = embedded[[distinct[key] for key in keys]], self._images(edited)
        unique = sorted(set(source_prompts) | set(edit_prompts))
        text = dict(zip(unique, self._texts(unique)))
        source = torch.stack([text[p] for p in source_prompts])
        target = torch.stack([text[p] for p in edit_prompts])
        direction = torch.nn.functional.cosine_similarity(after - before, target - source, dim=-1)
        image = (before * after).sum(-1)
        caption = (after * target).sum(-1)
        return [Scores(float(d), float(i), float(c)) for d, i, c in zip(direction, image, caption)]
