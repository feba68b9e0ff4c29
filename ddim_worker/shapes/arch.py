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


def vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary in miniature: the byte alphabet (alone and with ``</w>``), one merge chain per scene
    word, so each scene word is one whole token, then ``<|startoftext|>`` and ``<|endoftext|>``."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen = set(vocab)
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            left, right = symbols[0], symbols[1]
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            merged = left + right
            if merged not in seen:
                vocab.append(merged)
                seen.add(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


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
