"""Every edit setting, defined once: name, default, type, range and meaning.

``EditSettings`` is what one row is edited with. The command line (``--num-steps``), the manifest's per-row columns
(``num_steps``), configuration files (``num_steps:`` or ``num-steps:``), the engine, the benchmark and the docs all
read these fields and their metadata; :func:`validate` is the one validator. A job's own options (model, output,
limits, performance) live in ``ddim_worker.job.config`` and are declared the same way, with :func:`option`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ddim_worker.core.inversion import parse_method


#: With a mask, sampling starts this fraction of the start step deeper in: start step 20 of 50 samples the masked
#: region from level 15. On 96 of the shapes benchmark's background edits at start step 20 the masked edit reached the
#: new background in 0.92 of the scenes from level 20 and in 0.96 from level 15 (a plain edit: 0.93 and 0.96).
START_FRACTION = 0.75


def sampling_start(start_step: int) -> int:
    """The level a masked edit (``--mask auto``) samples from, for a row's start step (``core.masks``)."""
    return int(start_step * START_FRACTION)


class SettingError(ValueError):
    """A setting with a wrong type or outside its range; the message names the setting and what it accepts."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.name = name


def option(default: Any = dataclasses.MISSING, help: str = "", *, group: str = "job",  # noqa: A002 - argparse's word
           minimum: float | None = None, maximum: float | None = None, below: str | None = None,
           choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = (), flag: str | None = None,
           metavar: str | None = None, per_row: bool = False, default_factory: Any = dataclasses.MISSING,
           when_named: Any = None) -> Any:
    """A dataclass field that carries its meaning: help text, ``--help`` group, range, old flag names.

    ``below`` names another field the value must stay under (``start_step`` < ``num_steps``). ``per_row`` marks the
    settings a manifest may override row by row. ``flag`` overrides the flag spelled from the name. ``when_named``
    is the value a flag given without one takes (``--cross-replace`` alone: the recommended fraction).
    """
    meta = {"help": help, "group": group, "minimum": minimum, "maximum": maximum, "below": below, "choices": choices,
            "aliases": aliases, "flag": flag, "metavar": metavar, "per_row": per_row, "when_named": when_named}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


#: What ``--cross-replace`` / ``--self-replace`` given without a value mean: the recommended attention control
#: (docs/quality.md, the shapes benchmark's colour and shape edits).
CONTROL_WHEN_NAMED = {"cross_replace": 0.8, "self_replace": 1.0}

#: ``control_rules``: ``reference`` (google/prompt-to-prompt's definitions) or ``every-layer`` (ours before;
#: ``core.attention_control`` says what each means).
REFERENCE_RULES, EVERY_LAYER_RULES = "reference", "every-layer"
CONTROL_RULES = (REFERENCE_RULES, EVERY_LAYER_RULES)

#: ``mask``: ``none`` edits the whole image; ``auto`` finds what the edit prompt changes and keeps the rest.
MASK_MODES = ("none", "auto")


@dataclass(frozen=True)
class EditSettings:
    """The settings of one edit. Defaults are the textbook's (SD 1.5, 50 steps, start step 10, CFG 3.5 both ways)."""

    num_steps: int = option(50, "DDIM steps n of the schedule", group="edit", minimum=1, maximum=1000,
                            aliases=("--steps",), per_row=True)
    start_step: int = option(10, "start step s: inversion stops at level tau[s] and sampling runs over tau[s:] "
                                 "(larger s: a smaller edit)", group="edit", minimum=0, below="num_steps",
                             per_row=True)
    guidance_scale: float = option(3.5, "classifier-free guidance scale while sampling with the edit prompt (1: off)",
                                   group="edit", minimum=0, maximum=100, aliases=("--guidance",), per_row=True)
    inversion_guidance: float = option(3.5, "classifier-free guidance scale while inverting with the source prompt "
                                            "(1: off, half the UNet work)", group="edit", minimum=0, maximum=100,
                                       per_row=True)
    eta: float = option(0.0, "DDIM eta while sampling: 0 is deterministic DDIM, 1 DDPM-like (seeded noise)",
                        group="edit", minimum=0, maximum=1, per_row=True)
    seed: int = option(0, "seed of the eta noise, the noise inversion and a sampled VAE latent", group="edit",
                       minimum=0, maximum=2**63 - 1, per_row=True)
    negative_prompt: str = option("", "unconditional prompt of classifier-free guidance", group="edit", per_row=True)
    inversion: str = option("ddim", "inversion method: ddim | pnp (PnP Inversion as published: ddim's trajectory, "
                                    "a source branch held on it while sampling) | direct (pnp, and the source's "
                                    "correction added to the edit too: the paper's add-source ablation) | "
                                    "negative-prompt | "
                                    "fixed-point:K | null-text:ITERS | noise (img2img baseline)", group="edit",
                            per_row=True)
    cross_replace: float = option(0.0, "Prompt-to-Prompt: for this fraction of the sampled steps (n - s) the edit "
                                       "takes its cross-attention maps from a source branch sampled beside it (0: "
                                       f"off; the flag alone: {CONTROL_WHEN_NAMED['cross_replace']})", group="edit",
                                  minimum=0, maximum=1, per_row=True,
                                  when_named=CONTROL_WHEN_NAMED["cross_replace"])
    self_replace: float = option(0.0, "Prompt-to-Prompt: for this fraction of the sampled steps the edit's "
                                      "self-attention uses the source branch's queries and keys (0: off; the flag "
                                      f"alone: {CONTROL_WHEN_NAMED['self_replace']})", group="edit", minimum=0,
                                 maximum=1, per_row=True, when_named=CONTROL_WHEN_NAMED["self_replace"])
    edit_word_weight: float = option(1.0, "Prompt-to-Prompt reweighting: the attention on the edit prompt's new "
                                          "words is scaled by this while cross-attention maps are replaced (1: off)",
                                     group="edit", minimum=0, maximum=10, per_row=True)
    mask: str = option("none", "none, or auto: a mask of what the edit changes, from the prompts; outside it the "
                               "latents are blended back to the inverted trajectory at every step, and the mask is "
                               "written beside the image (the flag alone: auto)", group="edit",
                       choices=MASK_MODES, per_row=True, when_named="auto")

    control_rules: str = option(REFERENCE_RULES, "how Prompt-to-Prompt's fractions become steps and where "
                                                 "self-attention is replaced: reference (google/prompt-to-prompt: "
                                                 "cross maps for int(f(m+1)) of the m sampled steps, self-attention "
                                                 "for int(fm) and only in layers of at most 16x16 tokens) | "
                                                 "every-layer (floor(fm) both, self-attention in every layer)",
                                group="edit", choices=CONTROL_RULES, per_row=True)

    candidates: int = option(1, "edits made of the row (one inversion, one source branch): each draws its "
                                "attention control from --sample-cross-replace / --sample-self-replace, and the "
                                "scorer keeps the best that passes (needs --scorer when over 1)", group="candidates",
                             minimum=1, maximum=64, per_row=True)
    sample_cross_replace: str = option("", "A:B: each candidate draws its cross_replace uniformly from [A, B] "
                                           "(seeded from the row; empty: the row's cross_replace)",
                                       group="candidates", per_row=True, metavar="A:B")
    sample_self_replace: str = option("", "A:B: each candidate draws its self_replace uniformly from [A, B] "
                                          "(empty: the row's self_replace)", group="candidates", per_row=True,
                                      metavar="A:B")

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes: Any) -> EditSettings:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)




def _type_name(kind: Any) -> str:
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(kind, str(kind))


def coerce(name: str, kind: Any, value: Any) -> Any:
    """``value`` as ``kind`` (int, float, str, bool), accepting what Parquet, YAML and the command line give.

    Integral floats and numeric strings become ints; booleans are never numbers; NaN and infinities are refused.
    """
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise SettingError(name, f"must be true or false, got {value!r}")
    if kind is str:
        if not isinstance(value, str):
            raise SettingError(name, f"must be text, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or value is None:
        raise SettingError(name, f"must be {_type_name(kind)}, got {value!r}")
    if hasattr(value, "item"):  # NumPy scalars from Ray batches
        value = value.item()
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SettingError(name, f"must be {_type_name(kind)}, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise SettingError(name, f"must be {_type_name(kind)}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise SettingError(name, f"must be finite, got {value!r}")
    if kind is int:
        if value != int(value):
            raise SettingError(name, f"must be an integer, got {value!r}")
        return int(value)
    return float(value)


def check_range(obj: Any, spec: dataclasses.Field) -> None:
    """The range written in a field's metadata (minimum, maximum, below another field, choices)."""
    meta, value = spec.metadata, getattr(obj, spec.name)
    if value is None:
        return
    lo, hi, below, choices = meta.get("minimum"), meta.get("maximum"), meta.get("below"), meta.get("choices")
    if below is not None:
        limit = getattr(obj, below)
        if not (lo if lo is not None else -math.inf) <= value < limit:
            raise SettingError(spec.name, f"must be in [{lo}, {below}={limit}), got {value}")
    elif (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise SettingError(spec.name, f"must be in {span}, got {value}")
    if choices is not None and value not in choices:
        raise SettingError(spec.name, f"must be one of {', '.join(choices)}, got {value!r}")


def field_kind(spec: dataclasses.Field) -> Any:
    """The scalar type a field holds (``int`` for ``int | None``); ``dict`` for mappings."""
    text = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str), ("dict", dict)):
        if text.split("|")[0].strip() == name:
            return kind
    raise TypeError(f"field {spec.name} has unsupported type {spec.type!r}")


def validate(settings: EditSettings) -> EditSettings:
    """The one validator of edit settings: types, ranges, the inversion method. Raises :class:`SettingError`."""
    for spec in dataclasses.fields(settings):
        value = getattr(settings, spec.name)
        checked = coerce(spec.name, field_kind(spec), value)
        if checked != value or type(checked) is not type(value):
            object.__setattr__(settings, spec.name, checked)  # frozen: normalise 3.0 -> 3, "1" -> 1.0 in place
    for spec in dataclasses.fields(settings):
        check_range(settings, spec)
    try:
        method = parse_method(settings.inversion)
    except ValueError as exc:
        raise SettingError("inversion", f"is not valid: {exc}") from None
    object.__setattr__(settings, "inversion", str(method))  # one spelling: " ddim " -> "ddim"
    for name in ("sample_cross_replace", "sample_self_replace"):
        span = parse_span(name, getattr(settings, name))
        object.__setattr__(settings, name, "" if span is None else f"{span[0]:g}:{span[1]:g}")
    if settings.mask == "auto" and method.name == "noise":
        raise SettingError("mask", "auto blends back to the inverted trajectory at every level, and inversion "
                                   "'noise' has none: use it with ddim, pnp, direct, fixed-point or null-text")
    return settings


def parse_span(name: str, text: str) -> tuple[float, float] | None:
    """A candidate range ``A:B`` (0 <= A <= B <= 1) as (A, B); empty text: None (no draw)."""
    if not text.strip():
        return None
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise SettingError(name, f"must be A:B with two numbers, got {text!r}") from None
    if not 0 <= low <= high <= 1:
        raise SettingError(name, f"must be A:B with 0 <= A <= B <= 1, got {text!r}")
    return low, high


#: The per-row setting names, in declaration order (also the manifest's setting columns and the results' columns).
SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EditSettings))



def from_values(values: Mapping[str, Any], defaults: EditSettings | None = None) -> EditSettings:
    """Settings from a manifest row or a config: the given values where present, ``defaults`` where missing or null.

    Null means "the default": ``None`` and NaN (how Parquet and Ray give a missing number).
    """
    defaults = DEFAULTS if defaults is None else defaults
    chosen = {}
    for name in SETTING_NAMES:
        value = values.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        chosen[name] = value
    return dataclasses.replace(defaults, **chosen)


#: Engine rows per call when ``--batch-size`` is not given (on a GPU: when no engine GPU says how much memory it
#: has free): enough to keep a GPU busy at 512 px in bf16, small enough for a CPU run to show progress.
DEFAULT_BATCH_SIZE = {"cuda": 8, "cpu": 4}

#: The dtypes a user may name; ``auto`` is bf16 on CUDA (fp16 where bf16 is missing) and fp32 on CPU.
DTYPE_NAMES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs (not what it computes per row): working size, precision, batching, kernels."""

    size: int = option(512, "square working size in pixels (a multiple of 8): images are resized on the shorter "
                            "side and centre-cropped", group="model", minimum=8, maximum=4096)
    dtype: str = option("auto", "auto (bf16, or fp16, on CUDA; fp32 on CPU), fp32, fp16 or bf16", group="model",
                        choices=DTYPE_NAMES)
    batch_size: int | None = option(None, "rows per engine call (default: on a GPU from its free memory, else "
                                          f"{DEFAULT_BATCH_SIZE['cpu']})", group="performance", minimum=1,
                                    maximum=4096)
    calls_per_task: int = option(4, "engine calls an actor edits per task: the job packs whole images into tasks "
                                    "whose sampling calls fill, and a task's unique inversions fill calls of their "
                                    "own", group="performance", minimum=1, maximum=64)
    attention: str = option("sdpa", "attention kernel: sdpa (fused) or math (explicit matmul + softmax)",
                            group="performance", choices=("sdpa", "math"))
    channels_last: bool = option(False, "NHWC convolutions in the UNet and the VAE", group="performance")
    compile_unet: bool = option(False, "torch.compile the UNet in each engine actor (compiled at the first batch)",
                                group="performance", aliases=("--compile",))

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is not None:
                object.__setattr__(self, spec.name, coerce(spec.name, field_kind(spec), value))
            check_range(self, spec)
        if self.size % 8:
            raise SettingError("size", f"must be a multiple of 8 (the VAE downsamples by 8), got {self.size}")

    def replace(self, **changes: Any) -> EngineSettings:
        return dataclasses.replace(self, **changes)


DEFAULTS = EditSettings()
ENGINE_DEFAULTS = EngineSettings()
