"""A faithful port of the textbook's DDIM-inversion loop: the benchmark's baseline (``engine_vs_textbook``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ddim_worker.core.settings import DEFAULTS

#: The textbook's guidance scales while sampling and while inverting: the edit defaults are the textbook's
#: (``ddim_worker.core.settings``), so they are read from there.
TEXTBOOK_GUIDANCE = DEFAULTS.guidance_scale
TEXTBOOK_INVERSION_GUIDANCE = DEFAULTS.inversion_guidance


class TextbookEditor:
    """The textbook's ``sample`` / ``invert`` / ``edit`` (the Hugging Face diffusion course's DDIM-inversion notebook,
    as ``/work/shared/reference/textbook-ddim-tutorial.txt`` reproduces it), kept as the benchmark's baseline.

    Ported line by line, with its costs: one image at a time, the pipeline in float32, the prompts re-encoded with
    classifier-free guidance at every ``sample`` / ``invert`` call, the inversion run all the way (``steps - 2`` UNet
    calls, every latent kept) and sampling started one level off (from ``inverted_latents[-(start_step + 1)]``), an
    ``.item()`` sync per step. The only changes do not change the work: ``pipe.encode_prompt`` for the deprecated
    ``pipe._encode_prompt`` (the same text-encoder calls), ``decode_latents`` written out (it is deprecated), the VAE
    sample drawn with a seeded generator (the textbook's is unseeded), and no ``tqdm``.
    """

    def __init__(self, pipe: Any, device: torch.device):
        self.pipe = pipe
        self.device = device
        self.unet_calls = 0
        self.text_encodings = 0
        pipe.unet.register_forward_pre_hook(self._count_unet)

    def _count_unet(self, module: Any, args: Any) -> None:
        self.unet_calls += 1

    def _encode_prompt(self, prompt: str, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                       negative_prompt: str) -> torch.Tensor:
        """``pipe._encode_prompt``: [negative; prompt] embeddings, from the same ``encode_prompt`` it wraps."""
        prompt_embeds, negative_embeds = self.pipe.encode_prompt(
            prompt, self.device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt)
        self.text_encodings += 2 if do_classifier_free_guidance else 1
        return torch.cat([negative_embeds, prompt_embeds]) if do_classifier_free_guidance else prompt_embeds

    def _decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """``pipe.decode_latents`` as diffusers implements it (deprecated there, so written out here)."""
        latents = 1 / self.pipe.vae.config.scaling_factor * latents
        image = self.pipe.vae.decode(latents, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        return image.cpu().permute(0, 2, 3, 1).float().numpy()

    @torch.no_grad()
    def sample(self, prompt: str, start_step: int = 0, start_latents: torch.Tensor | None = None,
               guidance_scale: float = TEXTBOOK_GUIDANCE,
               num_inference_steps: int = 30, num_images_per_prompt: int = 1,
               do_classifier_free_guidance: bool = True, negative_prompt: str = "") -> list[Image.Image]:
        pipe, device = self.pipe, self.device
        text_embeddings = self._encode_prompt(prompt, num_images_per_prompt, do_classifier_free_guidance,
                                              negative_prompt)
        pipe.scheduler.set_timesteps(num_inference_steps, device=device)
        if start_latents is None:
            side = pipe.unet.config.sample_size
            start_latents = torch.randn(1, 4, side, side, device=device)
            start_latents *= pipe.scheduler.init_noise_sigma
        latents = start_latents.clone()
        for i in range(start_step, num_inference_steps):
            t = pipe.scheduler.timesteps[i]
            latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = pipe.scheduler.scale_model_input(latent_model_input, t)
            noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            prev_t = max(1, t.item() - (1000 // num_inference_steps))  # t-1
            alpha_t = pipe.scheduler.alphas_cumprod[t.item()]
            alpha_t_prev = pipe.scheduler.alphas_cumprod[prev_t]
            predicted_x0 = (latents - (1 - alpha_t).sqrt() * noise_pred) / alpha_t.sqrt()
            direction_pointing_to_xt = (1 - alpha_t_prev).sqrt() * noise_pred
            latents = alpha_t_prev.sqrt() * predicted_x0 + direction_pointing_to_xt
        images = self._decode_latents(latents)
        return [Image.fromarray((image * 255).round().astype("uint8")) for image in images]  # numpy_to_pil

    @torch.no_grad()
    def invert(self, start_latents: torch.Tensor, prompt: str, guidance_scale: float = TEXTBOOK_INVERSION_GUIDANCE,
               num_inference_steps: int = 80, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
               negative_prompt: str = "") -> torch.Tensor:
        pipe, device = self.pipe, self.device
        text_embeddings = self._encode_prompt(prompt, num_images_per_prompt, do_classifier_free_guidance,
                                              negative_prompt)
        latents = start_latents.clone()
        intermediate_latents = []
        pipe.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = reversed(pipe.scheduler.timesteps)
        for i in range(1, num_inference_steps):
            if i >= num_inference_steps - 1:  # the textbook skips the final iteration
                continue
            t = timesteps[i]
            latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = pipe.scheduler.scale_model_input(latent_model_input, t)
            noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            current_t = max(0, t.item() - (1000 // num_inference_steps))  # t
            next_t = t.item()  # min(999, t.item() + (1000//num_inference_steps)) # t+1
            alpha_t = pipe.scheduler.alphas_cumprod[current_t]
            alpha_t_next = pipe.scheduler.alphas_cumprod[next_t]
            latents = (latents - (1 - alpha_t).sqrt() * noise_pred) * (alpha_t_next.sqrt() / alpha_t.sqrt()) + (
                1 - alpha_t_next).sqrt() * noise_pred
            intermediate_latents.append(latents)
        return torch.cat(intermediate_latents)

    def edit(self, input_image: Image.Image | np.ndarray, input_image_prompt: str, edit_prompt: str,
             num_steps: int = 100, start_step: int = 30, guidance_scale: float = TEXTBOOK_GUIDANCE,
             generator: torch.Generator | None = None) -> Image.Image:
        pipe, device = self.pipe, self.device
        pixels = torch.from_numpy(np.asarray(input_image, dtype=np.uint8)).permute(2, 0, 1).float() / 255  # to_tensor
        with torch.no_grad():
            latent = pipe.vae.encode(pixels.unsqueeze(0).to(device) * 2 - 1)
        l = 0.18215 * latent.latent_dist.sample(generator)  # noqa: E741 - the textbook's name
        inverted_latents = self.invert(l, input_image_prompt, num_inference_steps=num_steps)
        final_im = self.sample(edit_prompt, start_latents=inverted_latents[-(start_step + 1)][None],
                               start_step=start_step, num_inference_steps=num_steps, guidance_scale=guidance_scale)[0]
        return final_im


def textbook_passes_per_edit(num_steps: int, start_step: int) -> int:
    """UNet calls (each CFG-doubled) of one textbook edit: ``steps - 2`` inverting, ``steps - start`` sampling."""
    return (num_steps - 2) + (num_steps - start_step)
