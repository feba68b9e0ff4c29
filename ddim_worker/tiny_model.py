"""Build Stable-Diffusion-shaped pipelines with random weights, locally, for tests, the demo and the benchmark.

No weights can be downloaded where this project is tested, so this builds the same component classes SD 1.x ships
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer, DDIMScheduler with SD 1.5's config), saves them
with ``save_pretrained`` and everything else loads them back through ``from_pretrained``: the real loading path.

Architectures:
- ``tiny``: seconds on a CPU; 8x VAE downsampling like SD, so 64 px images give 8x8 latents.
- ``small``: a mid-size model for CPU benchmarks where the UNet dominates the time.
- ``sd15``: the exact SD 1.5 UNet / VAE / CLIP ViT-L text encoder shapes (same FLOPs as the real model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

#: Stable Diffusion 1.5's scheduler config, as shipped in its ``scheduler/scheduler_config.json``.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# Words the generated tokenizer knows whole; anything else falls back to byte-level pieces, as CLIP's does.
_TOKENIZER_WORDS = (
    "a an the of on in with and photo photograph picture painting drawing face puppy dog cat old grey gray grass "
    "beach sunset winter summer red blue green yellow black white sky tree house car bird horse flower city street "
    "mountain river snow rain sunglasses smiling portrait colorful watercolor oil acrylic sketch cartoon style "
    "checkerboard stripes circle square gradient pattern noise blurry ugly"
).split()

ARCHS: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet": dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            sample_size=8,
        ),
        "vae": dict(
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        ),
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                     projection_dim=32),
        "size": 64,
    },
    "small": {
        "unet": dict(
            block_out_channels=(64, 128, 256),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128,
            attention_head_dim=8,
            norm_num_groups=32,
            sample_size=16,
        ),
        "vae": dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=128,
        ),
        "text": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                     projection_dim=128),
        "size": 128,
    },
    "sd15": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            sample_size=64,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            sample_size=512,
        ),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     projection_dim=768),
        "size": 512,
    },
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table (the tokenizer's base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(words: tuple[str, ...] = _TOKENIZER_WORDS) -> tuple[dict[str, int], list[str]]:
    """The vocabulary and merges of a small CLIP BPE tokenizer, generated here rather than downloaded.

    The vocabulary is CLIP's layout in miniature: every byte character alone and with the end-of-word mark ``</w>``,
    one merge chain per known word, then ``<|startoftext|>`` and ``<|endoftext|>`` last.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen = set(vocab)
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            left, right = symbols[0], symbols[1]
            merged = left + right
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            if merged not in seen:
                vocab.append(merged)
                seen.add(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_pipeline(arch: str = "tiny", seed: int = 0):
    """A ``StableDiffusionPipeline`` of the given architecture with seeded random weights (fp32, CPU)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    spec = ARCHS[arch]
    vocab, merges = clip_vocab_and_merges()
    vocab_size = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token="<|endoftext|>", model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
        **spec["vae"],
    )
    text_config = CLIPTextConfig(
        vocab_size=vocab_size if arch != "sd15" else max(vocab_size, 49408),
        max_position_embeddings=77,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        hidden_act="quick_gelu",
        **spec["text"],
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_model(path: str | os.PathLike, arch: str = "tiny", seed: int = 0) -> Path:
    """Build and ``save_pretrained`` a random-weight pipeline at ``path`` (skipped if one is already there)."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    pipe = build_pipeline(arch, seed)
    tmp = path.with_name(path.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "ddim_edit_arch.json").write_text(json.dumps({"arch": arch, "seed": seed, "size": ARCHS[arch]["size"]}))
    os.replace(tmp, path)
    return path


#: A CLIP shaped like the tiny pipelines: 64 px images in 8 px patches, two layers a tower, 32-wide projections.
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def build_clip_scorer(seed: int = 0, image_size: int = 64, projection_dim: int = 32,
                      tower: dict[str, int] | None = None) -> tuple[Any, Any]:
    """A ``CLIPModel`` with seeded random weights and its ``CLIPProcessor`` (this module's generated tokenizer), in
    the exact transformers format a ``--scorer`` folder holds (``tower``: both towers' sizes, default ``TINY_CLIP``)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    try:  # transformers 5 without torchvision: the PIL image processor (the one CLIPImageProcessor falls back to)
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token="<|endoftext|>",
                              model_max_length=77)
    special = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
               (("bos_token_id", "<|startoftext|>"), ("eos_token_id", "<|endoftext|>"),
                ("pad_token_id", "<|endoftext|>"))}
    tower = tower or TINY_CLIP
    text = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, **special, **tower)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=8, **tower)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    images = ImageProcessor(size={"shortest_edge": image_size},
                            crop_size={"height": image_size, "width": image_size})
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def make_scorer(path: str | os.PathLike, seed: int = 0) -> Path:
    """``save_pretrained`` a random-weight CLIP scorer at ``path`` (skipped if one is already there)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    model, processor = build_clip_scorer(seed)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, path)
    return path
