"""The benchmark's settings: ``BenchConfig``, its per-device defaults, the acceptance targets and the command line.

The edit settings (n, s, guidance, seed) and the engine's attention kernel default to ``ddim_worker.core.settings``'s
(the textbook's); only the benchmark's own knobs (rows, batch sizes, what to run) are set here.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import ddim_worker
from ddim_worker.core import fastpath
from ddim_worker.core.models import choose_device
from ddim_worker.core.settings import DEFAULTS, ENGINE_DEFAULTS, EditSettings
from ddim_worker.tiny_model import ARCHS

#: The folder that holds the ``ddim_worker`` package: the checkout when run from source. The Ray job's workers get it
#: on their ``PYTHONPATH``; built models go under its ``models/`` in a checkout, else under ``./models``.
PACKAGE_PARENT = Path(ddim_worker.__file__).resolve().parents[1]

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
    dtype: str = ENGINE_DEFAULTS.dtype
    size: int | None = None  # default: the arch's size (tiny 64, small 128, sd15 512)
    steps: int = DEFAULTS.num_steps
    start_step: int = DEFAULTS.start_step
    guidance: float = DEFAULTS.guidance_scale
    inversion_guidance: float = DEFAULTS.inversion_guidance
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
    attention: str = ENGINE_DEFAULTS.attention
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
    seed: int = DEFAULTS.seed

    def resolved(self) -> BenchConfig:
        """Fill in the device-dependent defaults."""
        device = choose_device(self.device)
        defaults = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
        cfg = replace(self, device=str(device))
        for name, value in defaults.items():
            if getattr(cfg, name) is None:
                cfg = replace(cfg, **{name: value})
        if cfg.size is None:
            cfg = replace(cfg, size=model_size(cfg.model) or ARCHS[cfg.arch]["size"])
        if cfg.threads is None:
            cfg = replace(cfg, threads=available_cores())
        if cfg.channels_last is None:
            cfg = replace(cfg, channels_last=device.type == "cuda")
        cfg = replace(cfg, variant_rows=min(cfg.variant_rows, cfg.rows), textbook_rows=min(cfg.textbook_rows, cfg.rows))
        if not 0 <= cfg.start_step <= cfg.steps - 3:
            raise ValueError(f"the textbook loop needs start_step <= steps - 3 (it keeps steps - 2 latents), got "
                             f"steps={cfg.steps} start_step={cfg.start_step}")
        if cfg.attention not in fastpath.ATTENTION:
            raise ValueError(f"--attention must be one of {fastpath.ATTENTION}")
        cfg.edit_settings()  # the one validator of edit settings
        return cfg

    def edit_settings(self) -> EditSettings:
        """The settings every benchmark row is edited with (the defaults but for n, s, guidance and seed)."""
        return DEFAULTS.replace(num_steps=self.steps, start_step=self.start_step, guidance_scale=self.guidance,
                                inversion_guidance=self.inversion_guidance, seed=self.seed)

    def model_folder(self) -> Path:
        """Where ``--arch`` is built: ``--model-dir``, else ``models/`` of the checkout (or of the working folder)."""
        if self.model_dir:
            return Path(self.model_dir) / f"bench-{self.arch}"
        root = PACKAGE_PARENT if (PACKAGE_PARENT / "pyproject.toml").exists() else Path.cwd()
        return root / "models" / f"bench-{self.arch}"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def model_size(model: str | None) -> int | None:
    """The working size a model built by ``tiny_model.make_model`` records, if ``model`` is one."""
    if not model:
        return None
    meta = Path(model) / "ddim_edit_arch.json"
    return int(json.loads(meta.read_text())["size"]) if meta.exists() else None


# -- command line -----------------------------------------------------------------------------------------------

def _batch_sizes(text: str) -> list:
    return [item if item == "auto" else int(item) for item in text.split(",") if item]


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    import ddim_worker.bench

    d = BenchConfig  # the defaults, as the dataclass declares them
    p = argparse.ArgumentParser(prog="benchmark", description=ddim_worker.bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=d.arch, choices=sorted(ARCHS), help="model to build (random weights)")
    p.add_argument("--model", default=None, help="an existing diffusers SD 1.x folder instead of building --arch")
    p.add_argument("--model-dir", default=None, help="where built models are kept (default: models/bench-ARCH)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=d.dtype, help="auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--size", type=int, default=None, help="working size in px (default: the arch's)")
    p.add_argument("--steps", "--num-steps", dest="steps", type=int, default=d.steps,
                   help=f"n (default {d.steps}, the textbook's)")
    p.add_argument("--start-step", type=int, default=d.start_step, help=f"s (default {d.start_step}, the textbook's)")
    p.add_argument("--guidance", "--guidance-scale", dest="guidance", type=float, default=d.guidance,
                   help=f"guidance while sampling (default {d.guidance})")
    p.add_argument("--inversion-guidance", type=float, default=d.inversion_guidance,
                   help=f"guidance while inverting (default {d.inversion_guidance})")
    p.add_argument("--rows", type=int, default=None, help="distinct images of the main measurement (CPU 16, CUDA 32)")
    p.add_argument("--batch-size", type=int, default=None, help="main batch size, also the job's (CPU 8, CUDA 16)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                   help="batch sizes swept, e.g. 1,2,4 or 1,4,8,16,auto (auto: from free GPU memory)")
    p.add_argument("--variant-rows", type=int, default=None,
                   help="rows of the fast-path variants, one batch (CPU 4, CUDA 16); batch sizes run two batches each")
    p.add_argument("--textbook-rows", type=int, default=None, help="rows of the textbook loop (CPU 2, CUDA 4)")
    p.add_argument("--job-rows", type=int, default=None, help="rows through the Ray job (CPU 24, CUDA 48)")
    p.add_argument("--group-images", type=int, default=d.group_images)
    p.add_argument("--group-prompts", type=int, default=d.group_prompts)
    p.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray job part (no Ray import)")
    p.add_argument("--no-variants", dest="variants", action="store_false", help="skip the fast-path on/off runs")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last UNet/VAE weights in the main configuration (default: on for CUDA, off for CPU)")
    p.add_argument("--attention", default=d.attention, choices=fastpath.ATTENTION)
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
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)
    return BenchConfig(**vars(args))
