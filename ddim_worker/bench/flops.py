"""FLOPs and peaks: what one edit costs in FLOPs, the device's peak and a GEMM ceiling, and hence TFLOP/s and MFU."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from ddim_worker.bench.config import available_cores
from ddim_worker.bench.textbook import textbook_passes_per_edit
from ddim_worker.bench.timers import sync

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


def lookup_tflops(table: list[tuple[str, dict[str, float]]], name: str, dtype: str) -> float | None:
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
    sync(device)
    reps, started = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0 or device.type != "cuda":
            sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return 2 * n**3 * reps / elapsed / 1e12


def peak_tflops(device: torch.device, device_name: str, dtype: str, threads: int,
                given: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from): ``given`` (``--peak-tflops``), the data-sheet table on CUDA, an estimate
    on CPUs."""
    if given:
        return given, "--peak-tflops"
    if device.type == "cuda":
        peak = lookup_tflops(PEAK_TFLOPS, device_name, dtype)
        return peak, "data sheet (dense)" if peak else "unknown device: pass --peak-tflops"
    return cpu_peak_tflops(threads)


def ceiling_tflops(device: torch.device, device_name: str, dtype: str, matmul: float,
                   given: float | None = None) -> tuple[float, str]:
    """(ceiling TFLOP/s, where it comes from): ``given`` (``--ceiling-tflops``), the measured-ceiling table, or the
    GEMM ``matmul`` measured in this run."""
    if given:
        return given, "--ceiling-tflops"
    known = lookup_tflops(CEILING_TFLOPS, device_name, dtype) if device.type == "cuda" else None
    if known:
        return known, "measured GEMM ceiling (table)"
    return matmul, f"GEMM measured in this run ({'8192' if device.type == 'cuda' else '2048'}^3)"


class Accounting:
    """Adds achieved TFLOP/s and MFU to a timing record, from the work it counted."""

    def __init__(self, flops: dict[str, int], per_edit: dict[str, int], peak: float | None, ceiling: float | None):
        self.flops, self.per_edit, self.peak, self.ceiling = flops, per_edit, peak, ceiling

    def __call__(self, record: dict) -> dict:
        """Its UNet passes (CFG-doubled), one VAE encode per inversion from x0, one decode per row (the textbook: its
        own per-edit FLOPs, prompt encodings included)."""
        flops = self.flops
        if record["name"] == "textbook loop":
            done = self.per_edit["textbook"] * record["rows"]
        else:
            done = (record["unet_passes"] * flops["unet_cfg"] + record["inversions"] * flops["vae_encode"]
                    + record["rows"] * flops["vae_decode"])
        record["flops_per_edit"] = done / record["rows"]
        record["tflops"] = record["flops_per_edit"] * record["edits_per_s"] / 1e12
        record["mfu"] = record["tflops"] / self.peak if self.peak else None
        record["mfu_vs_ceiling"] = record["tflops"] / self.ceiling if self.ceiling else None
        return record


def describe_device(device: torch.device, threads: int) -> tuple[str, dict]:
    """(name, details) of the device: the name the peak tables are looked up by, and what the report records."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        return name, {"type": "cuda", "name": name, "memory_bytes": int(props.total_memory),
                      "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"}
    info = cpu_info()
    cores = available_cores()
    name = f"{info['model']} ({cores} cores, {threads} torch threads)"
    return name, {"type": "cpu", "name": info["model"], "cores": cores, "threads": threads, "mhz": info["mhz"],
                  "isa": sorted(info["flags"] & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})}
