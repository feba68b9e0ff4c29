"""Prompt-to-Prompt attention control (Hertz et al. 2022) as diffusers attention processors.

In a controlled UNet call every edit row reads the attention of its image's *source branch*, a row of the same call
sampled with the source prompt (``call_plan``):

- **cross-attention** (text tokens): the edit's maps are the source's, through the row's token map (word swap or
  refinement, ``token_alignment``), optionally with the edit words reweighted; the edit's values are kept, so the
  new words say *what* and the source's maps say *where*. A word swap without reweighting is
  ``softmax(Q_src K_src^T) V_edit``, the plain kernel on gathered queries and keys; a refinement or a reweighting
  forms the maps (B x heads x HW x 77, small: 77 keys) and mixes them token by token;
- **self-attention**: ``softmax(Q_src K_src^T / sqrt(d)) V_edit``: one attention call with the source's queries and
  keys and the edit's values. It goes through the same kernel as the plain layer (``F.scaled_dot_product_attention``
  for ``AttnProcessor2_0``), so the (HW)^2 probabilities are never formed where that kernel does not form them.

Control runs for the first ``cross_replace`` / ``self_replace`` fraction of the m = n - s sampled steps, on the text
half of a guided call only (the unconditional half runs plain, as in Prompt-to-Prompt). How a fraction becomes steps
and which layers self-attention control reaches are the row's ``control_rules``: ``reference`` (the default) as
google/prompt-to-prompt defines them: cross-attention maps for the first int(f * (m + 1)) steps (its word-alpha table
has m + 1 entries), self-attention for the first int(f * m), and self-attention only in layers of at most 16 x 16
tokens; ``every-layer`` as this project defined them before: floor(f * m) steps both, self-attention in every layer
(at 512 px that adds the 64 x 64 and 32 x 32 layers, which pin the layout far harder). The processors are
installed for one UNet call and removed after it (``controlled_attention``), and a row that reads nothing gets the
plain layer's bytes: rows with and without control share a call.

Pitfall: diffusers' default ``AttnProcessor2_0`` never forms the probabilities, so control needs processors of its
own; ``unet.set_attn_processor(dict)`` pops from the dict it is given (pass a copy).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ddim_worker.core.settings import EVERY_LAYER_RULES, REFERENCE_RULES
from ddim_worker.core.token_alignment import WORD_SWAP, TokenMap


#: Under the reference rules self-attention is replaced only in layers of at most this many tokens (16 x 16).
REFERENCE_SELF_TOKENS = 16 * 16


def replaced_steps(fraction: float, sampled_steps: int) -> int:
    """How many of the sampled steps a fraction covers (the first ones): floor, robust to 0.8 * 30 = 24.000...04."""
    return int(math.floor(float(fraction) * sampled_steps + 1e-9))


def cross_steps(fraction: float, sampled_steps: int, rules: str) -> int:
    """The first sampled steps whose cross-attention maps are replaced. The reference indexes a table of m + 1
    entries by step (``get_time_words_attention_alpha``): int(f * (m + 1)), which is one more than floor(f * m) for
    12 steps at 0.8 (int(10.4) = 10 against 9)."""
    if rules == REFERENCE_RULES:
        return min(sampled_steps, int(float(fraction) * (sampled_steps + 1)))
    return replaced_steps(fraction, sampled_steps)


def self_steps(fraction: float, sampled_steps: int, rules: str) -> int:
    """The first sampled steps whose self-attention is replaced: the reference's int(f * m), else floor(f * m)."""
    if rules == REFERENCE_RULES:
        return int(float(fraction) * sampled_steps)
    return replaced_steps(fraction, sampled_steps)


@dataclass(frozen=True)
class RowControl:
    """One edit row's attention control: fractions of the sampled steps, its token map, the edit words' weight."""

    cross_replace: float  # cross-attention maps from the source for this fraction of the sampled steps
    self_replace: float  # self-attention maps (queries and keys) from the source for this fraction
    tokens: TokenMap
    edit_word_weight: float = 1.0  # the edit words' attention is scaled by this while cross maps are replaced
    rules: str = REFERENCE_RULES  # control_rules: how fractions become steps, which layers self control reaches

    @property
    def active(self) -> bool:
        return self.cross_replace > 0 or self.self_replace > 0


@dataclass(frozen=True)
class StepControl:
    """Which branch each branch of a call reads at one step (branch units: one entry per branch of the call)."""

    self_source: tuple[int, ...]  # whose queries and keys a branch's self-attention uses (itself: plain)
    cross_source: tuple[int | None, ...]  # whose cross-attention maps it uses (None: its own, plain)
    tokens: tuple[TokenMap | None, ...]
    weights: tuple[float, ...]
    every_layer: tuple[bool, ...] = ()  # per branch: self control reaches layers over REFERENCE_SELF_TOKENS too

    def over_unet_batch(self, size: int, guided: bool, length: int, device: torch.device) -> UnetControl:
        """The control of each UNet row: branches padded to ``size``, the text half only when guided."""
        offset = size if guided else 0
        rows = size + offset
        self_source = list(range(rows))
        self_source_large = list(range(rows))
        every_layer = self.every_layer or (False,) * len(self.self_source)
        for j, (own_self, large) in enumerate(zip(self.self_source, every_layer)):
            if large:
                self_source_large[offset + j] = offset + own_self
        cross_source = list(range(rows))
        explicit_rows = [False] * rows
        mapper = [list(range(length)) for _ in range(rows)]
        alphas = [[1.0] * length for _ in range(rows)]
        weights = [[1.0] * length for _ in range(rows)]
        for j, (own_self, own_cross, tokens, weight) in enumerate(zip(self.self_source, self.cross_source,
                                                                       self.tokens, self.weights)):
            r = offset + j
            self_source[r] = offset + own_self
            if own_cross is None or tokens is None:
                continue
            cross_source[r] = offset + own_cross
            mapper[r] = list(tokens.mapper[:length])
            alphas[r] = [1.0 if a else 0.0 for a in tokens.aligned[:length]]
            weights[r] = [weight if c else 1.0 for c in tokens.changed[:length]]
            explicit_rows[r] = tokens.kind != WORD_SWAP or any(w != 1.0 for w in weights[r])

        def tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        own = list(range(rows))
        gathered = [r if explicit else source for r, (source, explicit) in enumerate(zip(cross_source, explicit_rows))]
        return UnetControl(tensor(self_source, torch.long), tensor(gathered, torch.long),
                           tensor(cross_source, torch.long), tensor(explicit_rows, torch.bool),
                           tensor(mapper, torch.long), tensor(alphas, torch.float32),
                           tensor(weights, torch.float32), has_self=self_source != own,
                           has_cross=cross_source != own, has_explicit=any(explicit_rows),
                           self_source_large=tensor(self_source_large, torch.long),
                           has_self_large=self_source_large != own)


@dataclass(frozen=True)
class CallControl:
    """The attention control of one sampling call, for all of its steps (branch units)."""

    sources: tuple[int | None, ...]  # per branch: the index of the source branch it reads (None: none)
    controls: tuple[RowControl | None, ...]  # per branch: its row's control (None: plain, or a source branch)
    sampled_steps: int  # n - s: the fractions are of these

    def at(self, step: int) -> StepControl | None:
        """The control at sampled step ``step`` (0 = the first sampled step), None when nothing is replaced."""
        self_source, cross_source, tokens, weights, every_layer = [], [], [], [], []
        m = self.sampled_steps
        for j, (source, control) in enumerate(zip(self.sources, self.controls)):
            use_self = control is not None and source is not None and \
                step < self_steps(control.self_replace, m, control.rules)
            use_cross = control is not None and source is not None and \
                step < cross_steps(control.cross_replace, m, control.rules)
            self_source.append(source if use_self else j)
            cross_source.append(source if use_cross else None)
            tokens.append(control.tokens if use_cross else None)
            weights.append(control.edit_word_weight if use_cross else 1.0)
            every_layer.append(use_self and control.rules == EVERY_LAYER_RULES)
        if all(s == j for j, s in enumerate(self_source)) and all(c is None for c in cross_source):
            return None
        return StepControl(tuple(self_source), tuple(cross_source), tuple(tokens), tuple(weights), tuple(every_layer))


@dataclass(frozen=True)
class UnetControl:
    """A step's control over the rows of the UNet batch (both CFG halves, padding): what the processors read."""

    self_source: torch.Tensor  # (R,) long: the row whose queries and keys each row's self-attention uses
    cross_gathered: torch.Tensor  # (R,) long: the row whose queries and keys each row's cross-attention uses
    cross_source: torch.Tensor  # (R,) long: the row whose cross-attention maps each row reads (itself: none)
    explicit_rows: torch.Tensor  # (R,) bool: rows whose maps are mixed token by token (refinement, reweighting)
    mapper: torch.Tensor  # (R, L) long: token j reads the source's token mapper[j]
    alphas: torch.Tensor  # (R, L) 1 where token j's map is replaced, 0 where the row keeps its own
    weights: torch.Tensor  # (R, L) reweighting of token j's attention
    has_self: bool  # some row reads another row's queries and keys
    has_cross: bool  # some row reads another row's cross-attention maps
    has_explicit: bool  # some row needs its maps formed
    self_source_large: torch.Tensor | None = None  # (R,) long: self_source in layers over REFERENCE_SELF_TOKENS
    has_self_large: bool = False

    def self_sources(self, tokens: int) -> tuple[torch.Tensor, bool]:
        """The self-attention sources of a layer of ``tokens`` tokens, and whether any row reads another's."""
        if tokens <= REFERENCE_SELF_TOKENS or self.self_source_large is None:
            return self.self_source, self.has_self
        return self.self_source_large, self.has_self_large


def _math_attention(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``AttnProcessor``'s attention, (B, N, C) in and out: baddbmm + softmax + bmm."""
    query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
    probs = attn.get_attention_scores(query, key, None)
    return attn.batch_to_head_dim(torch.bmm(probs, value))


def _sdpa_attention(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``AttnProcessor2_0``'s attention, (B, N, C) in and out: one fused ``scaled_dot_product_attention`` call."""
    batch_size = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)


class ControlledAttnProcessor:
    """One UNet attention layer under control; the layer's own processor (``base``) runs whatever is not controlled.

    Mirrors ``AttnProcessor2_0`` (``sdpa``) or ``AttnProcessor`` (``math``) step for step, so a row that reads itself
    gets exactly the plain layer's bytes.
    """

    def __init__(self, base: Any):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if type(base) not in (AttnProcessor, AttnProcessor2_0):
            raise ValueError(f"attention control needs diffusers' AttnProcessor2_0 (sdpa) or AttnProcessor (math) "
                             f"on the UNet, found {type(base).__name__}")
        self.base = base
        self.kernel = _sdpa_attention if type(base) is AttnProcessor2_0 else _math_attention

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 control: UnetControl | None = None) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        if control is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self_source, has_self = control.self_sources(hidden_states.shape[1])
        if not (control.has_cross if is_cross else has_self):
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None or attn.spatial_norm is not None or hidden_states.ndim != 3 or \
                attn.norm_q is not None or attn.norm_k is not None:
            raise ValueError("attention control supports Stable Diffusion 1.x's UNet attention layers (no mask, "
                             "spatial norm or query/key norm)")
        if not is_cross:
            return self._gathered(attn, hidden_states, None, self_source)
        out = self._gathered(attn, hidden_states, encoder_hidden_states, control.cross_gathered)
        if control.has_explicit:
            mixed = self._cross_mixed(attn, hidden_states, encoder_hidden_states, control)
            out = torch.where(control.explicit_rows.view(-1, 1, 1), mixed, out)
        return out

    def _project(self, attn: Any, hidden_states: torch.Tensor,
                 context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(residual, query, key, value), each (B, N, C), as the plain processors compute them."""
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if context is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        return residual, query, attn.to_k(context), attn.to_v(context)

    @staticmethod
    def _finish(attn: Any, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _gathered(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None,
                  source: torch.Tensor) -> torch.Tensor:
        """softmax(Q_src K_src^T) V_own: each row's attention with its source row's queries and keys and its own
        values, in the plain layer's kernel (a row whose source is itself gets the plain layer's bytes)."""
        residual, query, key, value = self._project(attn, hidden_states, context)
        query, key = query[source], key[source]  # (B, N, C); a row reading itself reads an equal copy
        return self._finish(attn, self.kernel(attn, query, key, value), residual)

    def _cross_mixed(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor,
                     control: UnetControl) -> torch.Tensor:
        """Cross-attention with the maps replaced: the source's map of the token each token reads (where aligned),
        its own elsewhere, scaled by the token weights; then the row's own values."""
        residual, query, key, value = self._project(attn, hidden_states, context)
        batch, tokens = query.shape[0], key.shape[1]
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), None)
        probs = probs.view(batch, attn.heads, -1, tokens)  # (B, heads, HW, L)
        index = control.mapper[:, None, None, :tokens].expand(-1, attn.heads, probs.shape[2], -1)
        borrowed = torch.gather(probs[control.cross_source], 3, index)
        alphas = control.alphas[:, None, None, :tokens].to(probs.dtype)
        probs = (borrowed * alphas + probs * (1 - alphas)) * control.weights[:, None, None, :tokens].to(probs.dtype)
        out = torch.bmm(probs.reshape(batch * attn.heads, -1, tokens), attn.head_to_batch_dim(value))
        return self._finish(attn, attn.batch_to_head_dim(out), residual)


@contextmanager
def controlled_attention(unet: Any) -> Iterator[None]:
    """Every attention layer of ``unet`` under a ``ControlledAttnProcessor`` for the duration of one call; the
    layer's processors are put back after it (whatever ``fastpath.set_attention`` chose)."""
    saved = unet.attn_processors
    unet.set_attn_processor({name: ControlledAttnProcessor(p) for name, p in saved.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(saved))  # a copy: set_attn_processor pops from it


def step_control(call_sources: Sequence[int | None], controls: Sequence[RowControl | None],
                 sampled_steps: int) -> CallControl | None:
    """A call's control, or None when no branch of it is controlled."""
    if not any(c is not None and c.active and s is not None for s, c in zip(call_sources, controls)):
        return None
    return CallControl(tuple(call_sources), tuple(controls), sampled_steps)
