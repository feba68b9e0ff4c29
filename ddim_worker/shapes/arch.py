"""The shapes model's architecture: component configs in Stable Diffusion 1.x's diffusers classes, and its tokenizer."""

from __future__ import annotations

from typing import Any

from ddim_worker.shapes.scenes import WORDS

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers' name for the number of heads
    norm_num_groups=8,
)

TEXT_CONFIG: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                                   projection_dim=64, max_position_embeddings=77, hidden_act="quick_gelu")


def vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary in miniature (``tiny_model.clip_vocab_and_merges``) whose merges make each scene word
    one whole token."""
    from ddim_worker.tiny_model import clip_vocab_and_merges

    return clip_vocab_and_merges(tuple(words))


def make_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token="<|endoftext|>",
                         model_max_length=77)


def build_components(seed: int = 0):
    """Fresh (vae, unet, text_encoder, tokenizer), seeded."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.convert_tokens_to_ids(
        "<|startoftext|>"), eos_token_id=eos, pad_token_id=eos, **TEXT_CONFIG))
    return vae, unet, text, tokenizer
