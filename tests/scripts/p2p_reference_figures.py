"""Prompt-to-Prompt reference figures: what google/prompt-to-prompt's word swap gives on the shapes model.

    python tests/scripts/p2p_reference_figures.py --reference /path/to/google/prompt-to-prompt

writes ``tests/data/p2p_reference.npz`` (each case's final latents, the source branch's and the edit's) and
``tests/data/p2p_reference.json`` (the cases, the machine, the reference's commit). ``tests/test_p2p_parity.py``
compares our engine with them. Run once; the figures are committed, the reference's code is not.

What runs is the reference's own code where it can run under today's diffusers: ``ptp_utils.diffusion_step`` (one
guided step, then the controller's ``step_callback``), ``ptp_utils.register_attention_control`` (its attention
forward: explicit probabilities, ``controller(attn, is_cross, place_in_unet)``, then the values),
``ptp_utils.get_time_words_attention_alpha`` (the cross-attention step table) and
``seq_aligner.get_replacement_mapper`` (the word-swap token map). Two things are adapted, not changed: diffusers'
``Attention`` layers are presented under the class name and method names the reference looks for
(``CrossAttention``, ``reshape_heads_to_batch_dim``), and its ``forward(x, context, mask)`` is called with today's
keywords. The controller (``AttentionControl`` / ``AttentionControlEdit`` / ``AttentionReplace``) lives in the
reference's notebook ``prompt-to-prompt_stable.ipynb``, which cannot be imported; ``ReferenceWordSwap`` below
restates its cells' logic line for line (the cond half only, the layer count that advances the step, self-attention
from the source for ``int(num_steps * f)`` steps in layers of at most 16 x 16 tokens, cross maps through the alpha
table and the mapper).

The start latent is our engine's inverted x_T of the case's image (start step 0, so both sample every step of the
same DDIM schedule from the same latent); both use the same prompt embeddings (``pipe.encode_prompt``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ddim_worker.core.engine import EditEngine, EditRow  # noqa: E402
from ddim_worker.shapes import scenes as S  # noqa: E402

DATA = REPO / "tests" / "data"

#: (name, engine size, steps, cross fraction, self fraction, scene seed). ``rounding``: 12 steps at 0.8, where the
#: reference's int(0.8 * 13) = 10 cross steps differ from floor(0.8 * 12) = 9. ``layers``: the shapes model at
#: 256 px (32 x 32 latents: 1024-token layers), where the reference leaves the largest layers' self-attention alone.
CASES = [("rounding", 64, 12, 0.8, 0.4, 5), ("layers", 256, 10, 0.6, 0.6, 7)]
GUIDANCE = 3.5


def case_rows(size: int, steps: int, cross: float, self_: float, seed: int, rules: str) -> tuple[EditRow, str, str]:
    """The case's row (start step 0, inversion unguided) and its two prompts (a colour word swap)."""
    scene = S.random_scene(np.random.default_rng(seed), renderer="pil")
    edit = scene.with_(colour="blue" if scene.colour != "blue" else "red").caption
    row = EditRow(S.render(scene), scene.caption, edit, num_steps=steps, start_step=0, guidance_scale=GUIDANCE,
                  inversion_guidance=1.0, cross_replace=cross, self_replace=self_, control_rules=rules)
    return row, scene.caption, edit


def _import_reference(path: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """ptp_utils and seq_aligner from a checkout; their display-only imports (cv2, IPython, tqdm.notebook) are
    stood in for when missing: nothing used here calls them."""
    for name in ("cv2", "IPython", "IPython.display"):
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.display = print  # type: ignore[attr-defined]
            sys.modules[name] = module
    sys.path.insert(0, str(path))
    return importlib.import_module("ptp_utils"), importlib.import_module("seq_aligner")


def _present_attention_as_the_reference_expects(unet: torch.nn.Module) -> None:
    """diffusers' ``Attention`` under the names ptp_utils looks for (class ``CrossAttention``, the old reshapes)."""
    from diffusers.models.attention_processor import Attention

    class CrossAttention(Attention):
        def reshape_heads_to_batch_dim(self, x: torch.Tensor) -> torch.Tensor:
            return self.head_to_batch_dim(x)

        def reshape_batch_dim_to_heads(self, x: torch.Tensor) -> torch.Tensor:
            return self.batch_to_head_dim(x)

    for module in unet.modules():
        if type(module) is Attention:
            module.__class__ = CrossAttention


def _call_with_todays_keywords(unet: torch.nn.Module) -> None:
    """The registered ``forward(x, context=None, mask=None)`` called as diffusers' blocks call a layer now."""
    for module in unet.modules():
        if type(module).__name__ == "CrossAttention" and "forward" in vars(module):
            registered = module.forward

            def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, _f=registered, **_):
                return _f(hidden_states, encoder_hidden_states, attention_mask)

            module.forward = forward


class ReferenceWordSwap:
    """``AttentionReplace(prompts, num_steps, cross_replace_steps, self_replace_steps)`` of the reference notebook,
    restated (no attention store, no local blend: neither changes a word swap's latents)."""

    def __init__(self, prompts: list[str], num_steps: int, cross: float, self_: float, tokenizer, ptp_utils,
                 seq_aligner) -> None:
        self.cur_step, self.cur_att_layer, self.num_att_layers = 0, 0, -1
        self.batch_size = len(prompts)
        self.cross_replace_alpha = ptp_utils.get_time_words_attention_alpha(prompts, num_steps, cross, tokenizer)
        self.num_self_replace = int(num_steps * 0), int(num_steps * self_)
        self.mapper = seq_aligner.get_replacement_mapper(prompts, tokenizer)
        self.last_latents: torch.Tensor | None = None

    def step_callback(self, x_t: torch.Tensor) -> torch.Tensor:
        self.last_latents = x_t
        return x_t

    def __call__(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        h = attn.shape[0]
        attn[h // 2:] = self.forward(attn[h // 2:], is_cross)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
        return attn

    def forward(self, attn: torch.Tensor, is_cross: bool) -> torch.Tensor:
        if is_cross or (self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]):
            h = attn.shape[0] // self.batch_size
            attn = attn.reshape(self.batch_size, h, *attn.shape[1:])
            attn_base, attn_replace = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step].to(attn.dtype)
                swapped = torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper.to(attn.dtype))
                attn[1:] = swapped * alpha_words + (1 - alpha_words) * attn_replace
            elif attn_replace.shape[2] <= 16 ** 2:
                attn[1:] = attn_base.unsqueeze(0).expand(attn_replace.shape[0], *attn_base.shape)
            attn = attn.reshape(self.batch_size * h, *attn.shape[2:])
        return attn


def reference_latents(pipe, ptp_utils, seq_aligner, prompts: list[str], x_t: torch.Tensor, steps: int,
                      cross: float, self_: float) -> np.ndarray:
    """The reference's word swap sampled from ``x_t``: (2, C, h, w), the source branch then the edit."""
    from diffusers import DDIMScheduler

    controller = ReferenceWordSwap(prompts, steps, cross, self_, pipe.tokenizer, ptp_utils, seq_aligner)
    ptp_utils.register_attention_control(pipe, controller)
    _call_with_todays_keywords(pipe.unet)
    text = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    uncond = pipe.encode_prompt([""] * len(prompts), "cpu", 1, False)[0]
    context = torch.cat([uncond, text])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(steps)
    latents = x_t.expand(len(prompts), *x_t.shape[1:]).clone()
    with torch.inference_mode():
        for t in pipe.scheduler.timesteps:
            latents = ptp_utils.diffusion_step(pipe, controller, latents, context, t, GUIDANCE, low_resource=False)
    return latents.float().numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of google/prompt-to-prompt")
    parser.add_argument("--commit", default=None, help="the reference's commit (default: asked of its checkout)")
    parser.add_argument("--model", type=Path, default=None, help="the shapes model (default: made in a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ptp_utils, seq_aligner = _import_reference(args.reference)
    if args.model is None:
        import tempfile

        from ddim_worker.shapes.model import make_shapes_model

        args.model = make_shapes_model(Path(tempfile.mkdtemp()) / "shapes")
    arrays, cases = {}, {}
    for name, size, steps, cross, self_, seed in CASES:
        engine = EditEngine.from_pretrained(str(args.model), size=size)
        row, source, edit = case_rows(size, steps, cross, self_, seed, "reference")
        out = engine.edit([row])[0]
        x_t = out.trajectory.latents[-1][:1]
        pipe = EditEngine.from_pretrained(str(args.model), size=size).pipe  # a UNet of its own to register on
        _present_attention_as_the_reference_expects(pipe.unet)
        reference = reference_latents(pipe, ptp_utils, seq_aligner, [source, edit], x_t, steps, cross, self_)
        arrays[f"{name}:x_t"] = x_t[0].float().numpy()
        arrays[f"{name}:reference"] = reference
        ours = out.latent.float().numpy()
        cases[name] = {"size": size, "num_steps": steps, "cross_replace": cross, "self_replace": self_,
                       "scene_seed": seed, "source_prompt": source, "edit_prompt": edit, "guidance_scale": GUIDANCE,
                       "ours_max_abs_diff_at_recording": float(np.abs(ours - reference[1]).max())}
        print(name, cases[name])
    commit = args.commit or subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    np.savez_compressed(DATA / "p2p_reference.npz", **arrays)
    (DATA / "p2p_reference.json").write_text(json.dumps({
        "reference": "google/prompt-to-prompt", "commit": commit or None, "torch": torch.__version__,
        "threads": 1, "cases": cases}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
