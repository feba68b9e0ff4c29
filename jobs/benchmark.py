"""Benchmark of ddim-edit on one device, with a locally built model (no download), side by side in one run.

    python jobs/benchmark.py --arch small --device cpu --json bench.json        # this repository's CPU numbers
    python jobs/benchmark.py --arch sd15 --device cuda --no-ray --json bench.json  # a GPU box without Ray

What it measures (``docs/benchmarks.md`` shows a run and explains each number):

- the engine in-process (``EditEngine.edit``): edits/s and UNet passes/s at several batch sizes, and with each fast-path
  switch flipped from the main configuration (channels_last, attention kernel, CFG batched in one call or split in
  two; on CUDA also the dtype and ``torch.compile``; the batch size chosen from free memory);
- a faithful port of the textbook loop (``TextbookEditor``: inverts all the way, off-by-one start, fp32, batch 1,
  prompts re-encoded for every image) on the same images and prompts -> ``engine_vs_textbook``;
- a cache-hit rerun: the same images with new edit prompts and the trajectories of the cold run -> ``warm_vs_cold``;
- one inversion per image: 4 images x 4 edit prompts in shared batches vs the same 16 rows spread so no batch shares
  an image -> ``grouped_vs_ungrouped`` (4 inversions instead of 16);
- the same rows through the full Ray job (manifest of local PNGs, fetch, engine actor, PNG and latent writes) at steady
  state -> ``job_vs_engine``; a cache-hit rerun through the job with a shared latent cache; the 4 x 4 manifest through
  the job (4 inversions in ``job.json`` and the results);
- FLOPs, counted once with ``torch.utils.flop_counter.FlopCounterMode``, hence achieved TFLOP/s and MFU against the
  device's peak (``--peak-tflops``, a table of known GPUs, or an estimate for CPUs) and against a ceiling
  (``--ceiling-tflops``, a known measured GEMM ceiling, or a GEMM measured here).

It writes a JSON (``--json``) and a Markdown report (``--markdown``, default next to the JSON; always printed) that name
the device, dtype, versions and settings. Ray is imported only for the job part; ``--no-ray`` (or no Ray installed)
skips it, so the engine benchmark runs where only torch, transformers and diffusers are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python jobs/benchmark.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from ddim_worker import fastpath
from ddim_worker.denoiser import Conditioning, GuidedUNet
from ddim_worker.engine import EditEngine, EditOutput, EditRow
from ddim_worker.models import choose_device, choose_dtype, load_pipeline
from ddim_worker.tiny_model import ARCHS, make_model

log = logging.getLogger("ddim_edit.benchmark")

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Dense (no sparsity) peak TFLOP/s by device-name substring, first match wins, per compute dtype. From the vendors'
#: data sheets: H100 SXM5 989.4 bf16/fp16, 66.9 fp32 (non-tensor); H100 PCIe 756 / 51.2; H100 NVL 835 / 60;
#: H200 = H100 SXM; A100 312 / 19.5; L4 121 / 30.3. ``--peak-tflops`` overrides.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.2}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
]

#: Measured dense GEMM ceilings (what a large bf16 matmul actually reaches), used as the default ``--ceiling-tflops``
#: where known; elsewhere the benchmark measures one (``matmul_tflops``). The H100 SXM figure is the project's measured
#: 798 TFLOP/s (bf16 8192^3 GEMM) against the 989 TFLOP/s spec.
CEILING_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {}),
    ("H100 NVL", {}),
    ("H100", {"bfloat16": 798.0, "float16": 798.0}),
]

#: The prompts of the benchmark's rows. Words the tiny tokenizer knows whole, like the textbook's examples.
SOURCE_PROMPT = "a photo of a puppy on the grass"
EDIT_PROMPTS = ["a photo of a cat on the grass", "a photo of an old grey dog on the grass",
                "a watercolor painting of a puppy on the grass", "a photo of a puppy on the snow"]
RERUN_PROMPTS = ["a photo of a black cat on the grass", "a sketch of a puppy on the grass",
                 "a photo of a puppy on the beach", "an oil painting of a puppy on the grass"]

#: Per-device defaults: rows of the main measurement (distinct images, one edit each), its batch size, the batch sizes
#: swept, rows for the other configurations (a prefix of the main rows), rows of the textbook loop, rows of the job
#: (three batches: the first carries the start-up, the two intervals after it are the steady state).
DEVICE_DEFAULTS = {
    "cpu": dict(rows=16, batch_size=8, batch_sizes=[1, 4, 8], variant_rows=4, textbook_rows=2, job_rows=24),
    "cuda": dict(rows=32, batch_size=16, batch_sizes=[1, 4, 8, 16, "auto"], variant_rows=16, textbook_rows=4,
                 job_rows=48),
}

#: Acceptance targets checked on every run (CPU figures from the issue; they are reported on every device).
TARGETS = {"engine_vs_textbook": 2.0, "job_vs_engine": 0.85, "warm_vs_cold": 1.8}


@dataclass
class BenchConfig:
    arch: str = "small"
    device: str = "auto"
    dtype: str = "auto"
    size: int | None = None  # default: the arch's size (tiny 64, small 128, sd15 512)
    steps: int = 50
    start_step: int = 10
    guidance: float = 3.5
    inversion_guidance: float = 3.5
    rows: int | None = None
    batch_size: int | None = None
    batch_sizes: list | None = None  # ints and "auto" (CUDA: from free memory)
    variant_rows: int | None = None
    textbook_rows: int | None = None
    job_rows: int | None = None
    group_images: int = 4
    group_prompts: int = 4
    ray: bool = True
    variants: bool = True
    channels_last: bool | None = None  # None: on for CUDA, off for CPU (where it measured no faster, see the docs)
    attention: str = "sdpa"
    compile: bool = False
    compile_mode: str | None = None
    threads: int | None = None
    peak_tflops: float | None = None
    ceiling_tflops: float | None = None
    model: str | None = None  # an existing pipeline folder; default: build ``arch`` under ``model_dir``
    model_dir: str | None = None
    work_dir: str | None = None
    json_path: str | None = None
    markdown_path: str | None = None
    seed: int = 0

    def resolved(self) -> BenchConfig:
        """Fill in the device-dependent defaults."""
        device = choose_device(self.device)
        defaults = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
        cfg = replace(self, device=str(device))
        for name, value in defaults.items():
            if getattr(cfg, name) is None:
                cfg = replace(cfg, **{name: value})
        if cfg.size is None:
            cfg = replace(cfg, size=_model_size(cfg.model) or ARCHS[cfg.arch]["size"])
        if cfg.threads is None:
            cfg = replace(cfg, threads=_available_cores())
        if cfg.channels_last is None:
            cfg = replace(cfg, channels_last=device.type == "cuda")
        cfg = replace(cfg, variant_rows=min(cfg.variant_rows, cfg.rows), textbook_rows=min(cfg.textbook_rows, cfg.rows))
        if not 0 <= cfg.start_step <= cfg.steps - 3:
            raise ValueError(f"the textbook loop needs start_step <= steps - 3 (it keeps steps - 2 latents), got "
                             f"steps={cfg.steps} start_step={cfg.start_step}")
        if cfg.attention not in fastpath.ATTENTION:
            raise ValueError(f"--attention must be one of {fastpath.ATTENTION}")
        return cfg


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _model_size(model: str | None) -> int | None:
    if not model:
        return None
    meta = Path(model) / "ddim_edit_arch.json"
    return int(json.loads(meta.read_text())["size"]) if meta.exists() else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- inputs -------------------------------------------------------------------------------------------------------

def make_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct, deterministic pictures (gradients, a disc, stripes): uint8 (size, size, 3)."""
    images = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        rng = np.random.default_rng(seed * 1000 + i)
        c = rng.uniform(0.2, 1.0, (3, 3))
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
        stripes = (np.sin((xx + yy) * rng.uniform(8, 24)) > 0)[..., None]
        base = np.stack([xx * c[0, 0] + yy * c[0, 1], yy * c[1, 0], (1 - xx * yy) * c[2, 2]], -1)
        pixels = np.where(disc, c[1], base) * np.where(stripes, 1.0, 0.85)
        images.append((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return images


def make_rows(images: list[np.ndarray], cfg: BenchConfig, prompts: list[str] = EDIT_PROMPTS) -> list[EditRow]:
    """One edit per image, prompts in turn."""
    return [EditRow(image=image, source_prompt=SOURCE_PROMPT, edit_prompt=prompts[i % len(prompts)],
                    num_steps=cfg.steps, start_step=cfg.start_step, guidance_scale=cfg.guidance,
                    inversion_guidance=cfg.inversion_guidance, seed=cfg.seed)
            for i, image in enumerate(images)]


def group_rows(images: list[np.ndarray], cfg: BenchConfig, grouped: bool) -> list[EditRow]:
    """``group_images`` images x ``group_prompts`` edit prompts. Grouped: image-major, so each batch of
    ``group_prompts`` rows is one image (one inversion); ungrouped: prompt-major, so no batch shares an image."""
    pairs = [(i, k) for i in range(cfg.group_images) for k in range(cfg.group_prompts)]
    if not grouped:
        pairs.sort(key=lambda p: (p[1], p[0]))
    prompts = (EDIT_PROMPTS + RERUN_PROMPTS)
    return [EditRow(image=images[i], source_prompt=SOURCE_PROMPT, edit_prompt=prompts[k % len(prompts)],
                    num_steps=cfg.steps, start_step=cfg.start_step, guidance_scale=cfg.guidance,
                    inversion_guidance=cfg.inversion_guidance, seed=cfg.seed) for i, k in pairs]


# -- the textbook loop, ported faithfully -----------------------------------------------------------------------

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
               guidance_scale: float = 3.5, num_inference_steps: int = 30, num_images_per_prompt: int = 1,
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
    def invert(self, start_latents: torch.Tensor, prompt: str, guidance_scale: float = 3.5,
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
             num_steps: int = 100, start_step: int = 30, guidance_scale: float = 3.5,
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


# -- the CFG "off" switch ---------------------------------------------------------------------------------------

class TwoCallCFG(GuidedUNet):
    """Classifier-free guidance as two UNet calls per step (unconditional, then text): the "off" measurement of the
    engine's one doubled call. Counts like ``GuidedUNet``: ``row_passes`` are guided evaluations of a row."""

    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning) -> torch.Tensor:
        if not cond.guided:
            return super().__call__(x, t, cond)
        dtype = self.unet.dtype
        model_input = x.to(dtype)
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps_uncond = self.unet(model_input, timestep, encoder_hidden_states=cond.uncond.to(dtype),
                               return_dict=False)[0].float()
        eps_text = self.unet(model_input, timestep, encoder_hidden_states=cond.text.to(dtype),
                             return_dict=False)[0].float()
        self.calls += 2
        self.row_passes += x.shape[0]
        self.batch_sizes += [x.shape[0], x.shape[0]]
        w = cond.guidance.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)
        return (eps_uncond + w * (eps_text - eps_uncond)).to(x.dtype)


# -- FLOPs, peaks, ceilings -------------------------------------------------------------------------------------

def count_flops(pipe: Any, size: int) -> dict[str, int]:
    """FLOPs of one UNet call (batch 1 and the CFG-doubled batch 2), one VAE encode and decode (one image) and one
    text-encoder call (one prompt), counted with ``FlopCounterMode`` (matmuls, convolutions and attention; a
    multiply-add is 2 FLOPs; norms and pointwise ops are not counted, as usual for MFU). Attention runs through the
    math SDPA backend while counting, so it is counted on every device (the fused CPU kernel has no FLOP formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    device, dtype = unet.device, unet.dtype
    side = size // pipe.vae_scale_factor
    channels = unet.config.in_channels
    width = unet.config.cross_attention_dim
    tokens = pipe.tokenizer.model_max_length

    def count(fn: Any) -> int:
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), counter:
            fn()
        return int(counter.get_total_flops())

    def unet_call(batch: int) -> Any:
        return lambda: unet(torch.zeros(batch, channels, side, side, device=device, dtype=dtype),
                            torch.full((batch,), 500, device=device, dtype=torch.long),
                            encoder_hidden_states=torch.zeros(batch, tokens, width, device=device, dtype=dtype),
                            return_dict=False)

    return {
        "unet_batch1": count(unet_call(1)),
        "unet_cfg": count(unet_call(2)),
        "vae_encode": count(lambda: vae.encode(torch.zeros(1, 3, size, size, device=device, dtype=vae.dtype))),
        "vae_decode": count(lambda: vae.decode(torch.zeros(1, vae.config.latent_channels, side, side, device=device,
                                                            dtype=vae.dtype))),
        "text_encoder": count(lambda: pipe.text_encoder(torch.zeros(1, tokens, dtype=torch.long, device=device))),
    }


def flops_per_edit(flops: dict[str, int], num_steps: int, start_step: int) -> dict[str, int]:
    """Engine: 2 (n - s) CFG-doubled UNet calls + VAE encode + decode (prompts are encoded once per distinct string,
    so they are left out). Textbook: (n - 2) + (n - s) UNet calls, the same VAE work, and 4 prompt encodings."""
    vae = flops["vae_encode"] + flops["vae_decode"]
    return {
        "engine": 2 * (num_steps - start_step) * flops["unet_cfg"] + vae,
        "engine_cache_hit": (num_steps - start_step) * flops["unet_cfg"] + flops["vae_decode"],
        "textbook": textbook_passes_per_edit(num_steps, start_step) * flops["unet_cfg"] + vae
                    + 4 * flops["text_encoder"],
    }


def _lookup(table: list[tuple[str, dict[str, float]]], name: str, dtype: str) -> float | None:
    for key, values in table:
        if key.lower() in name.lower():
            return values.get(dtype)
    return None


def cpu_info() -> dict[str, Any]:
    """Model name, MHz and the SIMD flags that set the FP32 FLOPs per cycle, from ``/proc/cpuinfo``."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "mhz": None, "flags": set()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            info["model"] = value
        elif key == "cpu MHz":
            info["mhz"] = max(info["mhz"] or 0.0, float(value))
        elif key == "flags":
            info["flags"] = set(value.split())
    try:  # the maximum (turbo) frequency where the kernel exposes it
        info["mhz"] = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
        info["mhz_source"] = "cpuinfo_max_freq"
    except (OSError, ValueError):
        info["mhz_source"] = "/proc/cpuinfo cpu MHz (nominal; turbo may be higher)"
    return info


def cpu_peak_tflops(threads: int, info: dict[str, Any] | None = None) -> tuple[float | None, str]:
    """FP32 peak estimate: cores x GHz x FLOPs per cycle per core, the last from the widest FMA the CPU has
    (AVX-512: 2 x 16-lane FMA = 64; AVX2 + FMA: 2 x 8-lane = 32; AVX: 16; else 8)."""
    info = info or cpu_info()
    flags, mhz = info["flags"], info["mhz"]
    if not mhz:
        return None, "unknown CPU frequency: pass --peak-tflops"
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512 (2 FMA units assumed)"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2 + FMA (2 x 256-bit FMA)"
    elif "avx" in flags:
        per_cycle, isa = 16, "AVX"
    else:
        per_cycle, isa = 8, "SSE"
    peak = threads * mhz * 1e6 * per_cycle / 1e12
    return peak, f"estimate: {threads} cores x {mhz / 1000:.2f} GHz x {per_cycle} FP32 FLOPs/cycle ({isa})"


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """A square GEMM's achieved TFLOP/s on this device and dtype: the practical ceiling MFU is also quoted against."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, started = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0 or device.type != "cuda":
            _sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return 2 * n**3 * reps / elapsed / 1e12


# -- timing the engine ------------------------------------------------------------------------------------------

def _chunks(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def warm_up(engine: EditEngine, rows: list[EditRow], batch_size: int) -> float:
    """Run each distinct batch shape once with 2 steps (kernels chosen, threads spun up, compiled graphs built);
    returns the seconds it took (the compile time, with ``torch.compile``)."""
    chunks = _chunks(rows, batch_size)
    shapes = [chunks[0]] + ([chunks[-1]] if len(chunks[-1]) != len(chunks[0]) else [])
    started = time.perf_counter()
    for chunk in shapes:
        engine.edit([replace(r, num_steps=2, start_step=1, cached=None) for r in chunk])
    _sync(engine.device)
    return time.perf_counter() - started


def _rates(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(best, overall) rows/s: the fastest full-size batch, and all rows over all the time.

    This machine's cores may be shared: a burst of other work slows whichever batch it hits. The fastest batch is the
    least disturbed, so every rate and ratio the benchmark reports uses it (the job's too: its fastest interval
    between two batches); the overall rates are in the JSON as ``*_all`` (and equal the best on a quiet machine)."""
    full = max(sizes)
    best = max(n / t for n, t in zip(sizes, seconds) if n == full)
    return best, sum(sizes) / sum(seconds)


class EngineTimer:
    """Times ``engine.edit`` batch by batch and counts what each batch did (UNet calls and passes, inversions, cache
    hits). Counts are taken per batch, so timers that share an engine can be interleaved (``step`` by ``step``)."""

    def __init__(self, engine: EditEngine, rows: list[EditRow], batch_size: int, name: str,
                 counter: GuidedUNet | None = None, **info: Any):
        self.engine, self.batch_size, self.name, self.info = engine, batch_size, name, info
        self.counter = counter or engine.guided_unet
        self.rows = rows
        self.pending = _chunks(rows, batch_size)
        self.outputs: list[EditOutput] = []
        self.sizes: list[int] = []
        self.times: list[float] = []
        self.calls = self.passes = self.samples = self.inversions = 0
        self.peak_memory = 0
        self.warm_s = 0.0

    def warm_up(self) -> EngineTimer:
        self.warm_s = warm_up(self.engine, self.rows, self.batch_size)
        return self

    @property
    def done(self) -> bool:
        return not self.pending

    def step(self, chunk: list[EditRow] | None = None) -> list[EditOutput]:
        """Edit the next batch (or ``chunk``, for rows built from another timer's outputs), timed."""
        chunk = self.pending.pop(0) if chunk is None else chunk
        counter, engine, device = self.counter, self.engine, self.engine.device
        calls, passes, sizes, inversions = (counter.calls, counter.row_passes, len(counter.batch_sizes),
                                            engine.stats.inversions)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        started = time.perf_counter()
        outputs = engine.edit(chunk)
        _sync(device)
        self.times.append(time.perf_counter() - started)
        self.sizes.append(len(chunk))
        self.calls += counter.calls - calls
        self.passes += counter.row_passes - passes
        self.samples += sum(counter.batch_sizes[sizes:])
        self.inversions += engine.stats.inversions - inversions
        if device.type == "cuda":
            self.peak_memory = max(self.peak_memory, int(torch.cuda.max_memory_allocated(device)))
        self.outputs.extend(outputs)
        return outputs

    def run(self) -> EngineTimer:
        while not self.done:
            self.step()
        return self

    def record(self) -> dict:
        best, overall = _rates(self.sizes, self.times)
        rows = sum(self.sizes)
        record = {
            "name": self.name, "batch_size": self.batch_size, "rows": rows, "seconds": round(sum(self.times), 4),
            "batch_seconds": [round(t, 4) for t in self.times],
            "edits_per_s": best,
            "edits_per_s_all": overall,
            "seconds_per_edit": 1 / best,
            "unet_calls": self.calls,
            "unet_passes": self.passes,  # guided (CFG) evaluations of one row: 2 (n - s) per edit
            "unet_samples": self.samples,  # rows through the UNet (2 per pass with CFG)
            "unet_passes_per_edit": self.passes / rows,
            "unet_passes_per_s": best * self.passes / rows,
            "unet_samples_per_s": best * self.samples / rows,
            "inversions": self.inversions,
            "rows_inverted": sum(1 for o in self.outputs if o.inversion_passes > 0),
            "inversion_passes": sum(o.inversion_passes for o in self.outputs),
            "sampling_passes": sum(o.sampling_passes for o in self.outputs),
            "cache_hits": sum(1 for o in self.outputs if o.cache_hit),
            "warmup_seconds": round(self.warm_s, 3),
            **self.info,
        }
        if self.peak_memory:
            record["peak_memory_bytes"] = self.peak_memory
        log.info("%-30s batch %-3d %2d rows: %7.3f edits/s (all batches %.3f)  %8.2f UNet passes/s  %5.1f "
                 "passes/edit", self.name, self.batch_size, rows, best, overall, record["unet_passes_per_s"],
                 record["unet_passes_per_edit"])
        return record


def time_edits(engine: EditEngine, rows: list[EditRow], batch_size: int, name: str,
               counter: GuidedUNet | None = None, **info: Any) -> tuple[dict, list[EditOutput]]:
    """Edit ``rows`` in batches of ``batch_size`` after a warm-up; edits/s, UNet passes and what the rows report."""
    timer = EngineTimer(engine, rows, batch_size, name, counter, **info).warm_up().run()
    return timer.record(), timer.outputs


class TextbookTimer:
    """Times the textbook loop edit by edit (it has no batches), counting its UNet calls and prompt encodings."""

    def __init__(self, editor: TextbookEditor, rows: list[EditRow], seed: int = 0):
        self.editor, self.rows, self.seed = editor, rows, seed
        self.pending = list(rows)
        self.generator = torch.Generator(device=editor.device)
        self.times: list[float] = []
        self.calls = self.encodings = 0

    def warm_up(self) -> TextbookTimer:
        """One short edit (kernels chosen, threads spun up), as for the engine."""
        row = self.rows[0]
        self.editor.edit(row.image, row.source_prompt, row.edit_prompt, num_steps=4, start_step=1,
                         guidance_scale=row.guidance_scale, generator=self.generator.manual_seed(self.seed))
        return self

    @property
    def done(self) -> bool:
        return not self.pending

    def step(self) -> None:
        row, editor = self.pending.pop(0), self.editor
        calls, encodings = editor.unet_calls, editor.text_encodings
        _sync(editor.device)
        started = time.perf_counter()
        editor.edit(row.image, row.source_prompt, row.edit_prompt, num_steps=row.num_steps, start_step=row.start_step,
                    guidance_scale=row.guidance_scale, generator=self.generator.manual_seed(row.seed))
        _sync(editor.device)
        self.times.append(time.perf_counter() - started)
        self.calls += editor.unet_calls - calls
        self.encodings += editor.text_encodings - encodings

    def record(self) -> dict:
        best, overall = _rates([1] * len(self.times), self.times)
        rows, passes = len(self.times), self.calls  # batch 1: each call is one CFG-doubled pass of one row
        record = {
            "name": "textbook loop", "batch_size": 1, "rows": rows, "seconds": round(sum(self.times), 4),
            "batch_seconds": [round(t, 4) for t in self.times],
            "edits_per_s": best, "edits_per_s_all": overall, "seconds_per_edit": 1 / best,
            "unet_calls": passes, "unet_passes": passes, "unet_samples": 2 * passes,
            "unet_passes_per_edit": passes / rows, "unet_passes_per_s": best * passes / rows,
            "unet_samples_per_s": best * 2 * passes / rows,
            "text_encodings_per_edit": self.encodings / rows,
            "dtype": _dtype_name(self.editor.pipe.unet.dtype),
        }
        log.info("%-30s batch 1   %2d rows: %7.3f edits/s (all %.3f)  %8.2f UNet passes/s  %5.1f passes/edit",
                 "textbook loop", rows, best, overall, record["unet_passes_per_s"], record["unet_passes_per_edit"])
        return record


def time_offload(engine: EditEngine, outputs: list[EditOutput], batch_size: int) -> dict:
    """What the job takes off the engine's critical path: PNG encoding (the job's write stage, overlapped with the
    next batch by Ray Data) and what it could: the VAE decode (still inside ``engine.edit``)."""
    from ddim_worker.images import encode_png

    side = engine.size // engine.pipe.vae_scale_factor
    latents = torch.zeros(batch_size, 4, side, side, device=engine.device)
    engine.decode(latents)  # warm-up
    _sync(engine.device)
    started = time.perf_counter()
    engine.decode(latents)
    _sync(engine.device)
    decode_s = (time.perf_counter() - started) / batch_size
    started = time.perf_counter()
    for out in outputs[:batch_size]:
        encode_png(out.image, {"ddim_edit:id": "x", "ddim_edit:edit_prompt": "benchmark"})
    png_s = (time.perf_counter() - started) / len(outputs[:batch_size])
    return {"vae_decode_s_per_row": decode_s, "png_encode_s_per_row": png_s}


def time_pinned(device: torch.device, size: int, batch_size: int, reps: int = 10) -> dict | None:
    """Host-to-device copies of a batch of preprocessed images (float32, as ``engine.preprocess`` makes them and
    ``encode_images`` copies them) from pageable vs pinned memory."""
    if device.type != "cuda":
        return None
    host = torch.rand(batch_size, 3, size, size)
    out = {"bytes": host.numel() * host.element_size()}
    for name, copy in (("pageable", lambda: host.to(device)),
                       ("pinned", lambda: fastpath.pinned_to_device(host, device))):
        copy()
        _sync(device)
        started = time.perf_counter()
        for _ in range(reps):
            copy()
        _sync(device)
        seconds = (time.perf_counter() - started) / reps
        out[f"{name}_s"] = seconds
        out[f"{name}_gb_per_s"] = out["bytes"] / seconds / 1e9
    pinned_host = host.pin_memory()  # the buffer reused, as a job's pinned staging buffer would be
    started = time.perf_counter()
    for _ in range(reps):
        pinned_host.to(device, non_blocking=True)
    _sync(device)
    out["pinned_reused_s"] = (time.perf_counter() - started) / reps
    out["pinned_reused_gb_per_s"] = out["bytes"] / out["pinned_reused_s"] / 1e9
    return out


# -- the Ray job ------------------------------------------------------------------------------------------------

def _png_mtimes(folder: Path) -> list[float]:
    return sorted(p.stat().st_mtime for p in folder.glob("*.png"))


def steady_rows_per_s(folder: Path, batch_size: int) -> tuple[float, float] | tuple[None, None]:
    """(best, mean) rows/s once the pipeline is full, from the PNGs' modification times.

    Batch k ends when its last PNG is written; the interval between the ends of two consecutive batches is what one
    batch costs with fetching, the engine and writing overlapped. Mean: the rows after the first batch over the time
    from the first batch's last PNG to the last PNG. Best: the batch size over the shortest interval (as for the
    in-process engine, the least disturbed batch). Actor start, model load and the first batch's warm-up fall
    outside both."""
    mtimes = _png_mtimes(folder)
    if len(mtimes) <= batch_size:
        return None, None
    span = mtimes[-1] - mtimes[batch_size - 1]
    ends = [mtimes[min(i, len(mtimes)) - 1] for i in range(batch_size, len(mtimes) + batch_size, batch_size)]
    sizes = [min(batch_size, len(mtimes) - i) for i in range(batch_size, len(mtimes), batch_size)]
    intervals = [b - a for a, b in zip(ends, ends[1:])]
    if span <= 0 or min(intervals) <= 0:
        return None, None
    best, _ = _rates(sizes, intervals)
    return best, (len(mtimes) - batch_size) / span


def _write_manifest(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _read_results(output: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(output / "results" / "results.parquet").to_pylist()


JOB_PARTS = ("cold", "warm", "grouped")


def run_jobs(cfg: BenchConfig, model: str, images: list[np.ndarray], work: Path, fast_path: dict,
             parts: tuple[str, ...] = JOB_PARTS) -> dict:
    """The benchmark's rows through ``jobs.edit.run_job`` on one local Ray instance (started here if none is):
    ``cold`` (the main rows), ``warm`` (the same images with new edit prompts, reading the latent cache ``cold``
    wrote) and ``grouped`` (the 4 x 4 manifest, its own latent cache)."""
    if "warm" in parts and "cold" not in parts:
        raise ValueError("the warm job reads the latent cache the cold job writes")
    try:
        import ray
    except ImportError:
        return {"skipped": "ray is not installed"}
    from jobs.edit import JobConfig, run_job

    root = work / "job"
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
    device = torch.device(cfg.device)
    cpus_per_actor = cfg.threads if device.type == "cpu" else 1
    started_ray = False
    if not ray.is_initialized():
        # Workers import ddim_worker from this checkout. The engine actor gets every core's thread (as the in-process
        # engine does); 2 logical CPUs more let the fetch (0.5 CPU) and write (1 CPU) stages run beside it.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        # Ray starts its workers at niceness 15, below every other process: on a CPU box whose cores are shared
        # (this one is), the engine actor then waits behind anything else while the in-process engine it is compared
        # with does not. Run them at the driver's priority, as Ray's own job supervisor does for job drivers.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=cpus_per_actor + 2, num_gpus=1 if device.type == "cuda" else 0,
                 include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 object_store_memory=1 << 30)
        started_ray = True
    # The job's actors run the main configuration's fast path (JobConfig passes it on to EditActor).
    job_fast_path = {k: fast_path[k] for k in ("channels_last", "attention", "compile_unet")}
    base = dict(model=model, size=cfg.size, steps=cfg.steps, start_step=cfg.start_step, guidance=cfg.guidance,
                inversion_guidance=cfg.inversion_guidance, batch_size=cfg.batch_size, actors=1,
                gpus_per_actor=1.0 if device.type == "cuda" else 0.0, cpus_per_actor=float(cpus_per_actor),
                dtype=cfg.dtype, seed=cfg.seed, overwrite=True, **job_fast_path)

    def one(name: str, rows: list[dict], latent_cache: Path, batch_size: int) -> dict:
        manifest = _write_manifest(rows, root / f"manifest-{name}.parquet")
        output = root / f"out-{name}"
        summary = run_job(JobConfig(manifest=str(manifest), output=str(output), latent_cache=str(latent_cache),
                                    **{**base, "batch_size": batch_size}))
        results = _read_results(output)
        steady, steady_mean = steady_rows_per_s(output / "images", batch_size)
        record = {
            "name": name, "rows": len(rows), "batch_size": batch_size,
            "wall_seconds": summary["wall_seconds"], "rows_per_second": summary["rows_per_second"],
            "steady_rows_per_s": steady, "steady_rows_per_s_all": steady_mean,
            "startup_seconds": (summary["wall_seconds"] - len(rows) / steady_mean) if steady_mean else None,
            "counts": summary["counts"], "computed": summary["computed"], "inversions": summary["inversions"],
            "cache_hits": summary["cache_hits"], "unet_passes": summary["unet_passes"],
            "results_rows_inverted": sum(1 for r in results if (r.get("inversion_passes") or 0) > 0),
            "results_inversion_passes": sum(int(r.get("inversion_passes") or 0) for r in results),
            "results_cache_hits": sum(1 for r in results if r.get("cache_hit")),
        }
        log.info("job %-8s %2d rows batch %d: %.1fs wall (%.3f rows/s with start-up), steady %s rows/s, "
                 "%d inversions, %d cache hits", name, len(rows), batch_size, record["wall_seconds"],
                 record["rows_per_second"] or 0, f"{steady:.3f}" if steady else "n/a", record["inversions"],
                 record["cache_hits"])
        return record

    def manifest_rows(pairs: list[tuple[int, str]], prefix: str) -> list[dict]:
        return [{"id": f"{prefix}{n}-img{i}", "image_url": f"images/img{i}.png", "source_prompt": SOURCE_PROMPT,
                 "edit_prompt": prompt} for n, (i, prompt) in enumerate(pairs)]

    out: dict[str, Any] = {"fast_path_in_job": job_fast_path, "cpus_per_actor": cpus_per_actor,
                           "ray_cpus": cpus_per_actor + 2 if started_ray else None}
    try:
        shared_cache = root / "latents-shared"
        if "cold" in parts:
            out["cold"] = one("cold", manifest_rows(
                [(i, EDIT_PROMPTS[i % len(EDIT_PROMPTS)]) for i in range(cfg.job_rows)], "c"), shared_cache,
                cfg.batch_size)
        if "warm" in parts:
            out["warm"] = one("warm", manifest_rows(
                # two batches: the rerun is fast, and its ratio to cold is measured in-process too
                [(i, RERUN_PROMPTS[i % len(RERUN_PROMPTS)]) for i in range(min(cfg.job_rows, 2 * cfg.batch_size))],
                "w"), shared_cache,
                cfg.batch_size)
        if "grouped" in parts:
            prompts = EDIT_PROMPTS + RERUN_PROMPTS
            pairs = [(i, prompts[k % len(prompts)]) for i in range(cfg.group_images)
                     for k in range(cfg.group_prompts)]
            # At the job's batch size when whole images fit in it (each batch then holds whole images: the driver
            # orders rows that share an inversion next to each other), else one image per batch.
            group_batch = cfg.batch_size if cfg.batch_size % cfg.group_prompts == 0 else cfg.group_prompts
            out["grouped"] = one("grouped", manifest_rows(pairs, "g"), root / "latents-grouped", group_batch)
    finally:
        if started_ray:
            ray.shutdown()
    return out


# -- the whole run ----------------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda or "none",
           "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"}
    for name in ("diffusers", "transformers", "ray", "numpy", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe_device(device: torch.device, threads: int) -> tuple[str, dict]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        return name, {"type": "cuda", "name": name, "memory_bytes": int(props.total_memory),
                      "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"}
    info = cpu_info()
    cores = _available_cores()
    name = f"{info['model']} ({cores} cores, {threads} torch threads)"
    return name, {"type": "cpu", "name": info["model"], "cores": cores, "threads": threads, "mhz": info["mhz"],
                  "isa": sorted(info["flags"] & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run every measurement and return the report (also written as JSON / Markdown by ``main``)."""
    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    dtype = choose_dtype(cfg.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="ddim-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run_started = time.perf_counter()
    load_before = _loadavg()

    # The model: built locally with random weights (same shapes and FLOPs as the arch), loaded the real way.
    started = time.perf_counter()
    model = cfg.model or str(make_model(Path(cfg.model_dir or REPO_ROOT / "models") / f"bench-{cfg.arch}", cfg.arch))
    build_s = time.perf_counter() - started
    engine = EditEngine.from_pretrained(model, device=str(device), dtype=cfg.dtype, size=cfg.size)
    device_name, device_info = describe_device(device, cfg.threads)
    log.info("device %s, dtype %s, model %s (%s, %d px), n=%d s=%d", device_name, _dtype_name(dtype), model, cfg.arch,
             cfg.size, cfg.steps, cfg.start_step)

    # FLOPs (before any compile), peak, ceiling.
    flops = count_flops(engine.pipe, cfg.size)
    per_edit = flops_per_edit(flops, cfg.steps, cfg.start_step)
    dname = _dtype_name(dtype)
    if cfg.peak_tflops:
        peak, peak_source = cfg.peak_tflops, "--peak-tflops"
    elif device.type == "cuda":
        peak = _lookup(PEAK_TFLOPS, device_name, dname)
        peak_source = "data sheet (dense)" if peak else "unknown device: pass --peak-tflops"
    else:
        peak, peak_source = cpu_peak_tflops(cfg.threads)
    matmul = measure_matmul_tflops(device, dtype)
    if cfg.ceiling_tflops:
        ceiling, ceiling_source = cfg.ceiling_tflops, "--ceiling-tflops"
    elif device.type == "cuda" and _lookup(CEILING_TFLOPS, device_name, dname):
        ceiling, ceiling_source = _lookup(CEILING_TFLOPS, device_name, dname), "measured GEMM ceiling (table)"
    else:
        ceiling, ceiling_source = matmul, f"GEMM measured in this run ({'8192' if device.type == 'cuda' else '2048'}^3)"

    if cfg.compile:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    # dynamic=None: a second batch shape gets one dynamic graph instead of a compile per shape.
    main_fast = fastpath.apply_fast_path(engine.pipe, channels_last=cfg.channels_last, compile_unet=cfg.compile,
                                         attention=cfg.attention, compile_mode=cfg.compile_mode,
                                         compile_dynamic=None)
    images = make_images(max(cfg.rows, cfg.job_rows, cfg.group_images), cfg.size, cfg.seed)
    rows = make_rows(images[:cfg.rows], cfg)
    variant_rows = rows[:cfg.variant_rows]
    B = cfg.batch_size

    def tflops(record: dict) -> None:
        """Achieved TFLOP/s from the work the record counted: its UNet passes (CFG-doubled), one VAE encode per
        inversion from x0, one decode per row (the textbook: its own per-edit FLOPs, prompt encodings included)."""
        if record["name"] == "textbook loop":
            done = per_edit["textbook"] * record["rows"]
        else:
            done = (record["unet_passes"] * flops["unet_cfg"] + record["inversions"] * flops["vae_encode"]
                    + record["rows"] * flops["vae_decode"])
        record["flops_per_edit"] = done / record["rows"]
        record["tflops"] = record["flops_per_edit"] * record["edits_per_s"] / 1e12
        record["mfu"] = record["tflops"] / peak if peak else None
        record["mfu_vs_ceiling"] = record["tflops"] / ceiling if ceiling else None

    engine_records: list[dict] = []

    def measure(name: str, eng: EditEngine, the_rows: list[EditRow], batch: int, counter: GuidedUNet | None = None,
                **info: Any) -> tuple[dict, list[EditOutput]]:
        record, outputs = time_edits(eng, the_rows, batch, name, counter, dtype=_dtype_name(eng.dtype), **info)
        tflops(record)
        engine_records.append(record)
        return record, outputs

    def record(timer: EngineTimer | TextbookTimer, engine_list: bool = True) -> dict:
        rec = timer.record()
        tflops(rec)
        if engine_list:
            engine_records.append(rec)
        return rec

    # 1. Side by side, interleaved batch by batch so that all three see the same machine (a burst of other work on
    #    shared cores hits them alike): the main configuration on all rows; the cache-hit rerun of each of its
    #    batches right after it (new edit prompts, that batch's trajectories); the textbook loop, one edit per batch.
    editor = TextbookEditor(load_pipeline(model, device, torch.float32), device)  # fp32, no fast path: as it loads
    main_timer = EngineTimer(engine, rows, B, "main", dtype=dname, **main_fast).warm_up()
    warm_timer = EngineTimer(engine, rows, B, "cache-hit rerun", dtype=dname)  # same shapes: warmed up by main
    warm_timer.pending = []  # its batches are built from main's outputs
    book_timer = TextbookTimer(editor, rows[:cfg.textbook_rows], cfg.seed).warm_up()
    done = 0
    while not main_timer.done:
        chunk = main_timer.pending[0]
        outputs = main_timer.step()
        if not book_timer.done:
            book_timer.step()
        warm_timer.step([replace(r, edit_prompt=RERUN_PROMPTS[(done + j) % len(RERUN_PROMPTS)], cached=out.trajectory)
                         for j, (r, out) in enumerate(zip(chunk, outputs))])
        done += len(chunk)
    while not book_timer.done:
        book_timer.step()
    main = record(main_timer)
    main_outputs = main_timer.outputs
    compile_seconds = main["warmup_seconds"] if cfg.compile else None
    warm = record(warm_timer, engine_list=False)
    textbook = record(book_timer, engine_list=False)
    del editor
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. One inversion per image: 4 x 4 rows with each image's rows in one batch vs spread out, interleaved.
    #    Two batches of each (the rate is per edit, so the first two batches of the 4 x 4 rows say it; the Ray job
    #    below runs the whole 4 x 4 manifest for its counts).
    G = cfg.group_prompts
    grouped_timer = EngineTimer(engine, group_rows(images, cfg, grouped=True)[:2 * G], G, "grouped",
                                dtype=dname).warm_up()
    ungrouped_timer = EngineTimer(engine, group_rows(images, cfg, grouped=False)[:2 * G], G, "ungrouped",
                                  dtype=dname).warm_up()
    while not (grouped_timer.done and ungrouped_timer.done):
        for timer in (grouped_timer, ungrouped_timer):
            if not timer.done:
                timer.step()
    grouped = record(grouped_timer, engine_list=False)
    ungrouped = record(ungrouped_timer, engine_list=False)

    # 3. Batch sizes.
    auto_batch = None
    free = fastpath.free_device_bytes(device)
    if free is not None:
        auto_batch = fastpath.auto_batch_size(free, cfg.size, dtype)
    for bs in cfg.batch_sizes:
        if bs == "auto":
            if auto_batch is None:
                continue
            bs_name, bs = f"batch auto ({auto_batch})", auto_batch
        else:
            bs_name = f"batch {bs}"
        if bs == B or bs > len(rows):
            continue
        measure(bs_name, engine, rows[:min(2 * bs, len(rows) // bs * bs)], bs, **main_fast)  # two batches if there are

    # 4. Each fast-path switch flipped from the main configuration.
    _variants(cfg, engine, variant_rows, model, dtype, main_fast, measure)

    offload = time_offload(engine, main_outputs, B)
    offload["engine_s_per_row"] = main["seconds_per_edit"]
    offload["share_of_row"] = (offload["vae_decode_s_per_row"] + offload["png_encode_s_per_row"]) / (
        main["seconds_per_edit"] + offload["png_encode_s_per_row"])
    pinned = time_pinned(device, cfg.size, B)

    # 5. The Ray job, and right before it its in-process reference: the main configuration (the job's actors run
    #    its fast path) on two batches. Measured adjacent to the job (not at the start of the run) so that a change
    #    in the machine's speed over the run does not enter the ratio.
    job: dict[str, Any] = {"skipped": "--no-ray"}
    if cfg.ray:
        reference_name = "just before the job"
        reference, _ = measure(reference_name, engine, rows[:2 * B], B, **main_fast)
        job = run_jobs(cfg, model, images, work, main_fast)
    if "cold" in job:
        job["reference"] = reference_name
        job["reference_edits_per_s"] = reference["edits_per_s"]
        job["job_vs_engine"] = _ratio(job["cold"]["steady_rows_per_s"], reference["edits_per_s"])
        job["job_vs_engine_mean"] = _ratio(job["cold"]["steady_rows_per_s_all"], reference["edits_per_s"])
        job["job_vs_main"] = _ratio(job["cold"]["steady_rows_per_s"], main["edits_per_s"])
        job["job_vs_engine_end_to_end"] = _ratio(job["cold"]["rows_per_second"], reference["edits_per_s"])
        job["warm_vs_cold"] = _ratio(job["warm"]["steady_rows_per_s"], job["cold"]["steady_rows_per_s"])

    n, s = cfg.steps, cfg.start_step
    expected = 2 * (n - s)
    report: dict[str, Any] = {
        "device": device_name,
        "device_info": device_info,
        "dtype": dname,
        "versions": _versions(),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("json_path", "markdown_path")},
        "model": {"arch": cfg.arch, "path": model, "size": cfg.size, "build_seconds": round(build_s, 2),
                  "unet_parameters": sum(p.numel() for p in engine.pipe.unet.parameters())},
        "edits_per_s": main["edits_per_s"],
        "unet_passes_per_s": main["unet_passes_per_s"],
        "unet_samples_per_s": main["unet_samples_per_s"],
        "unet_passes_per_edit": main["unet_passes_per_edit"],
        "unet_passes_per_edit_expected": expected,
        "unet_passes_per_edit_by_config": {r["name"]: r["unet_passes_per_edit"] for r in engine_records},
        "textbook_passes_per_edit": textbook["unet_passes_per_edit"],
        "engine_vs_textbook": _ratio(main["edits_per_s"], textbook["edits_per_s"]),
        "job_vs_engine": job.get("job_vs_engine"),
        "warm_vs_cold": _ratio(warm["edits_per_s"], main["edits_per_s"]),
        "grouped_vs_ungrouped": _ratio(grouped["edits_per_s"], ungrouped["edits_per_s"]),
        "tflops": main["tflops"],
        "mfu": main["mfu"],
        "mfu_vs_ceiling": main["mfu_vs_ceiling"],
        "peak_tflops": peak,
        "peak_source": peak_source,
        "ceiling_tflops": ceiling,
        "ceiling_source": ceiling_source,
        "matmul_tflops": matmul,
        "flops": {**flops, "per_edit": per_edit},
        "compile_seconds": compile_seconds,
        "auto_batch_size": auto_batch,
        "engine": engine_records,
        "textbook": textbook,
        "cache": {"cold": main, "warm": warm},
        # measured: the first two batches of each order (grouped: 2 whole images; ungrouped: 2 rows per image)
        "grouping": {"grouped": grouped, "ungrouped": ungrouped, "images": cfg.group_images,
                     "prompts": cfg.group_prompts, "rows_measured": 2 * cfg.group_prompts,
                     "expected_passes": {"grouped": 2 * (n - s) * (1 + cfg.group_prompts),
                                         "ungrouped": 2 * cfg.group_prompts * expected}},
        "offload": offload,
        "pinned": pinned,
        "job": job,
        "wall_seconds": None,
    }
    report["checks"] = _checks(report, cfg)
    report["targets"] = targets(report)
    report["wall_seconds"] = round(time.perf_counter() - run_started, 1)
    # Other work on the machine skews CPU timings: the 1-minute load average before and after the run says if any ran.
    report["load_average"] = {"before": load_before, "after": _loadavg()}
    if not cfg.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _fast_args(fast: dict) -> dict:
    return dict(channels_last=fast["channels_last"], compile_unet=fast["compile_unet"], attention=fast["attention"],
                compile_mode=fast.get("compile_mode"), compile_dynamic=fast.get("compile_dynamic", False))


def _variants(cfg: BenchConfig, engine: EditEngine, variant_rows: list[EditRow], model: str, dtype: torch.dtype,
              main_fast: dict, measure: Any) -> None:
    """Measure each fast-path switch flipped from the main configuration, on ``variant_rows`` in one batch (compare
    with the batch-size line of that many rows)."""
    device = engine.device
    B = min(cfg.batch_size, len(variant_rows))

    def apply(fast: dict) -> dict:
        return fastpath.apply_fast_path(engine.pipe, **_fast_args(fast))

    keys = ("attention", "channels_last", "compile_unet")
    measured = [dict(main_fast)]
    if not cfg.variants:
        return

    def flipped(**change: Any) -> None:
        fast = {**main_fast, **change}
        if any(all(fast[k] == m[k] for k in keys) for m in measured):
            return  # the main configuration itself
        label = ", ".join(f"{k} {'on' if v is True else 'off' if v is False else v}" for k, v in change.items())
        measure(label, engine, variant_rows, B, **apply(fast))
        measured.append(fast)
        apply(main_fast)

    flipped(channels_last=not main_fast["channels_last"])
    flipped(attention="math" if main_fast["attention"] == "sdpa" else "sdpa")
    if main_fast["compile_unet"]:
        flipped(compile_unet=False)

    # CFG as two UNet calls per step instead of one doubled call.
    split = TwoCallCFG(engine.pipe.unet)
    split_engine = EditEngine(engine.pipe, size=engine.size, denoiser=split, fingerprint=engine.fingerprint)
    measure("CFG split in 2 calls", split_engine, variant_rows, B, counter=split, **main_fast)

    # Other dtypes (CUDA): each its own pipeline, with the main fast path but eager (compiling again costs minutes).
    if device.type == "cuda":
        for other in (torch.bfloat16, torch.float16, torch.float32):
            if other == dtype or (other == torch.bfloat16 and not torch.cuda.is_bf16_supported()):
                continue
            eng = EditEngine.from_pretrained(model, device=str(device), dtype=_dtype_name(other), size=engine.size)
            fast = fastpath.apply_fast_path(eng.pipe, channels_last=main_fast["channels_last"], compile_unet=False,
                                            attention=main_fast["attention"])
            measure(f"dtype {_dtype_name(other)}", eng, variant_rows, B, **fast)
            del eng
            torch.cuda.empty_cache()


def _checks(report: dict, cfg: BenchConfig) -> dict[str, Any]:
    """Counts that must hold whatever the speed: passes per edit, inversions, cache hits."""
    n, s = cfg.steps, cfg.start_step
    grouping, job = report["grouping"], report["job"]
    checks: dict[str, Any] = {
        "unet_passes_per_edit_is_2(n-s)_in_every_config": all(
            v == 2 * (n - s) for v in report["unet_passes_per_edit_by_config"].values()),
        "textbook_passes_per_edit_is_(n-2)+(n-s)": report["textbook_passes_per_edit"] == textbook_passes_per_edit(n, s),
        "cache_hit_rerun_passes_per_edit_is_n-s": report["cache"]["warm"]["unet_passes_per_edit"] == n - s
        and report["cache"]["warm"]["cache_hits"] == report["cache"]["warm"]["rows"],
        "grouped_inversions": grouping["grouped"]["inversions"],
        "grouped_rows_inverted": grouping["grouped"]["rows_inverted"],
        "ungrouped_inversions": grouping["ungrouped"]["inversions"],
        "grouped_passes_are_(n-s)(1+K)_per_image": grouping["grouped"]["unet_passes"]
        == grouping["expected_passes"]["grouped"],
    }
    if "grouped" in job:
        checks["job_grouped_inversions"] = job["grouped"]["inversions"]
        checks["job_grouped_rows_inverted_in_results"] = job["grouped"]["results_rows_inverted"]
        checks["job_warm_cache_hits"] = job["warm"]["cache_hits"]
        checks["job_warm_inversions"] = job["warm"]["inversions"]
        checks["job_all_ok"] = all(job[k]["counts"]["ok"] == job[k]["rows"] for k in ("cold", "warm", "grouped"))
    return checks


def targets(report: dict) -> dict[str, dict]:
    out = {}
    for key, target in TARGETS.items():
        value = report.get(key)
        out[key] = {"value": value, "target": target, "met": value is not None and value >= target}
    out["grouped_vs_ungrouped"] = {"value": report["grouped_vs_ungrouped"], "target": 1.0,
                                   "met": (report["grouped_vs_ungrouped"] or 0) > 1.0}
    return out


# -- the report -------------------------------------------------------------------------------------------------

def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def render_markdown(report: dict) -> str:
    cfg = report["settings"]
    n, s = cfg["steps"], cfg["start_step"]
    lines = [
        f"### `--arch {cfg['arch']}` on {report['device']}",
        "",
        f"- device: **{report['device']}**; dtype {report['dtype']}; torch threads {cfg['threads']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- model: {cfg['arch']} ({report['model']['unet_parameters'] / 1e6:.1f} M UNet parameters, random weights),"
        f" {cfg['size']} px; n = {n}, s = {s}, guidance {cfg['guidance']}, inversion guidance "
        f"{cfg['inversion_guidance']}",
        f"- rows: {cfg['rows']} distinct images x 1 edit at batch {cfg['batch_size']} (main); other batch sizes on "
        f"two batches each; fast-path variants on the first {cfg['variant_rows']} in one batch (compare with `batch "
        f"{min(cfg['variant_rows'], cfg['batch_size'])}`); textbook loop on "
        f"{cfg['textbook_rows']}; grouping {cfg['group_images']} images x {cfg['group_prompts']} prompts; Ray job on "
        f"{cfg['job_rows']} (and the 4 x 4 manifest)",
        f"- peak {_f(report['peak_tflops'], 4)} TFLOP/s ({report['peak_source']}); ceiling "
        f"{_f(report['ceiling_tflops'], 4)} TFLOP/s ({report['ceiling_source']}); GEMM measured here "
        f"{_f(report['matmul_tflops'], 4)} TFLOP/s",
        f"- benchmark wall time {report['wall_seconds']} s; load average (1, 5, 15 min) before "
        f"{report.get('load_average', {}).get('before')}, after {report.get('load_average', {}).get('after')}",
        "",
        "| ratio | value | target | met |",
        "|---|---|---|---|",
    ]
    names = {"engine_vs_textbook": "engine / textbook loop (edits/s)",
             "job_vs_engine": "Ray job (steady state) / engine in-process",
             "warm_vs_cold": "cache-hit rerun / cold (edits/s)",
             "grouped_vs_ungrouped": "4 x 4 grouped / ungrouped (edits/s)"}
    for key, t in report["targets"].items():
        lines.append(f"| {names[key]} | {_f(t['value'], 2)}x | >= {t['target']}x | {'yes' if t['met'] else 'NO'} |")
    lines += [
        "",
        f"Engine (main): **{_f(report['edits_per_s'])} edits/s**, {_f(report['unet_passes_per_s'], 1)} UNet passes/s "
        f"({_f(report['unet_samples_per_s'], 1)} UNet samples/s with CFG), {_f(report['unet_passes_per_edit'], 1)} "
        f"passes per edit (2 (n - s) = {2 * (n - s)}; textbook {_f(report['textbook_passes_per_edit'], 1)}), "
        f"{_f(report['tflops'], 4)} TFLOP/s, MFU {_pct(report['mfu'])} of peak, {_pct(report['mfu_vs_ceiling'])} of "
        f"ceiling.",
        "",
        "| configuration | dtype | batch | rows | edits/s | s/edit | edits/s, all batches | UNet passes/s | "
        "passes/edit | TFLOP/s | MFU | MFU vs ceiling | peak mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    records = report["engine"] + [report["textbook"], report["cache"]["warm"], report["grouping"]["grouped"],
                                  report["grouping"]["ungrouped"]]
    for r in records:
        mem = r.get("peak_memory_bytes")
        lines.append(
            f"| {r['name']} | {r.get('dtype', '')} | {r['batch_size']} | {r['rows']} | {_f(r['edits_per_s'])} | "
            f"{_f(r['seconds_per_edit'], 2)} | {_f(r['edits_per_s_all'])} | {_f(r['unet_passes_per_s'], 1)} | "
            f"{_f(r['unet_passes_per_edit'], 1)} | "
            f"{_f(r.get('tflops'), 4)} | {_pct(r.get('mfu'))} | {_pct(r.get('mfu_vs_ceiling'))} | "
            f"{f'{mem / 2**30:.1f} GiB' if mem else 'n/a'} |")
    g = report["grouping"]
    lines += [
        "",
        f"One inversion per image ({g['images']} images x {g['prompts']} prompts, batch {g['prompts']}, the first "
        f"{g['rows_measured']} rows of each order): grouped "
        f"{g['grouped']['inversions']} inversions, {g['grouped']['unet_passes']} UNet passes "
        f"(expected {g['expected_passes']['grouped']}); ungrouped {g['ungrouped']['inversions']} inversions, "
        f"{g['ungrouped']['unet_passes']} passes (expected {g['expected_passes']['ungrouped']}).",
    ]
    job = report["job"]
    if "cold" in job:
        lines += [
            "",
            f"Ray job (1 engine actor with {job['cpus_per_actor']} "
            f"{'CPUs' if report['device_info']['type'] == 'cpu' else 'GPU'}; reference: in-process "
            f"`{job['reference']}`). Steady state: batch size / the shortest interval between "
            "the ends (last PNG written) of two consecutive batches; mean: the rows after the first batch / the time "
            "from its last PNG to the last PNG. Ray and actor start-up fall outside both.",
            "",
            "| job run | rows | batch | wall s | rows/s incl. start-up | steady rows/s | steady, mean | start-up s | "
            "inversions | cache hits | ok |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key in ("cold", "warm", "grouped"):
            r = job[key]
            lines.append(f"| {key} | {r['rows']} | {r['batch_size']} | {_f(r['wall_seconds'], 1)} | "
                         f"{_f(r['rows_per_second'])} | {_f(r['steady_rows_per_s'])} | "
                         f"{_f(r['steady_rows_per_s_all'])} | {_f(r['startup_seconds'], 1)} | "
                         f"{r['inversions']} | {r['cache_hits']} | {r['counts']['ok']} |")
        lines += ["", f"job / engine: {_f(job['job_vs_engine'], 2)}x at steady state (engine measured just before "
                      f"the job: {_f(job['reference_edits_per_s'])} edits/s; against `main`, measured at the start of "
                      f"the run: {_f(job['job_vs_main'], 2)}x), {_f(job['job_vs_engine_end_to_end'], 2)}x end to end "
                      "(with Ray and actor start-up); job "
                      f"cache-hit rerun / cold {_f(job['warm_vs_cold'], 2)}x. The 4 x 4 job is there for its counts "
                      "(inversions in `job.json` and the results)."]
    else:
        lines += ["", f"Ray job: skipped ({job.get('skipped')})."]
    fl = report["flops"]
    off = report["offload"]
    lines += [
        "",
        f"FLOPs (FlopCounterMode): UNet {fl['unet_batch1'] / 1e9:.2f} GFLOP per sample, {fl['unet_cfg'] / 1e9:.2f} "
        f"per CFG pass; VAE encode {fl['vae_encode'] / 1e9:.2f}, decode {fl['vae_decode'] / 1e9:.2f}; text encoder "
        f"{fl['text_encoder'] / 1e9:.3f} GFLOP per prompt. Per edit: engine {fl['per_edit']['engine'] / 1e12:.4f} "
        f"TFLOP, cache hit {fl['per_edit']['engine_cache_hit'] / 1e12:.4f}, textbook "
        f"{fl['per_edit']['textbook'] / 1e12:.4f}.",
        "",
        f"Off the critical path: VAE decode {_f(off['vae_decode_s_per_row'], 4)} s/row and PNG encode "
        f"{_f(off['png_encode_s_per_row'], 4)} s/row, {_pct(off['share_of_row'])} of a row's in-process time "
        "(the job encodes PNGs in its write stage, overlapped with the next batch; the decode still runs in the engine).",
    ]
    if report.get("compile_seconds") is not None:
        lines.append(f"\n`torch.compile` of the UNet: {report['compile_seconds']:.1f} s (warm-up of the main batch "
                     "shape), not counted in edits/s.")
    if report.get("auto_batch_size"):
        lines.append(f"\nBatch size from free memory (`fastpath.auto_batch_size`): {report['auto_batch_size']}.")
    if report.get("pinned"):
        p = report["pinned"]
        lines.append(f"\nHost-to-device copy of a batch ({p['bytes'] / 2**20:.0f} MiB): pageable "
                     f"{p['pageable_gb_per_s']:.1f} GB/s, pinned (pin + copy) {p['pinned_gb_per_s']:.1f} GB/s, "
                     f"pinned buffer reused {p['pinned_reused_gb_per_s']:.1f} GB/s.")
    lines += ["", "Checks: " + ", ".join(f"{k} = {v}" for k, v in report["checks"].items()), ""]
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------------------

def _batch_sizes(text: str) -> list:
    return [item if item == "auto" else int(item) for item in text.split(",") if item]


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="small", choices=sorted(ARCHS), help="model to build (random weights)")
    p.add_argument("--model", default=None, help="an existing diffusers SD 1.x folder instead of building --arch")
    p.add_argument("--model-dir", default=None, help="where built models are kept (default: models/bench-ARCH)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--size", type=int, default=None, help="working size in px (default: the arch's)")
    p.add_argument("--steps", type=int, default=50, help="n (default 50, the textbook's)")
    p.add_argument("--start-step", type=int, default=10, help="s (default 10, the textbook's)")
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--inversion-guidance", type=float, default=3.5)
    p.add_argument("--rows", type=int, default=None, help="distinct images of the main measurement (CPU 16, CUDA 32)")
    p.add_argument("--batch-size", type=int, default=None, help="main batch size, also the job's (CPU 8, CUDA 16)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                   help="batch sizes swept, e.g. 1,2,4 or 1,4,8,16,auto (auto: from free GPU memory)")
    p.add_argument("--variant-rows", type=int, default=None,
                   help="rows of the fast-path variants, one batch (CPU 4, CUDA 16); batch sizes run two batches each")
    p.add_argument("--textbook-rows", type=int, default=None, help="rows of the textbook loop (CPU 2, CUDA 4)")
    p.add_argument("--job-rows", type=int, default=None, help="rows through the Ray job (CPU 24, CUDA 48)")
    p.add_argument("--group-images", type=int, default=4)
    p.add_argument("--group-prompts", type=int, default=4)
    p.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray job part (no Ray import)")
    p.add_argument("--no-variants", dest="variants", action="store_false", help="skip the fast-path on/off runs")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last UNet/VAE weights in the main configuration (default: on for CUDA, off for CPU)")
    p.add_argument("--attention", default="sdpa", choices=fastpath.ATTENTION)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile time reported apart)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: the cores available)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s in the compute dtype")
    p.add_argument("--ceiling-tflops", type=float, default=None,
                   help="a measured GEMM ceiling in TFLOP/s (default: known table, else measured here)")
    p.add_argument("--work-dir", default=None, help="keep the job's manifests and outputs here (default: temp)")
    p.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here")
    p.add_argument("--markdown", dest="markdown_path", default=None,
                   help="write the Markdown report here (default: the JSON path with .md)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return BenchConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    cfg = parse_args(argv)
    report = run_benchmark(cfg)
    markdown = render_markdown(report)
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps(report, indent=2, default=str))
    markdown_path = cfg.markdown_path or (str(Path(cfg.json_path).with_suffix(".md")) if cfg.json_path else None)
    if markdown_path:
        Path(markdown_path).write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
