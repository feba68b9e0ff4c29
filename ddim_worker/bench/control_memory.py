"""Peak memory of one engine row with and without attention control, at SD 1.5's shapes (``tiny_model`` ``sd15``).

One guided UNet call at a time, on the engine's own call path (``GuidedUNet`` with the step's ``StepControl``): P
branches = one source branch and P - 1 edit branches reading it (Prompt-to-Prompt at its first sampled step, self-
and cross-attention both replaced), or P plain rows. Peak memory is the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each call) above what it held before the call: on a
CPU, what the call itself allocated at its worst moment. glibc's allocator must hand every large block back to the
system when it is freed (``MALLOC_MMAP_THRESHOLD_=131072``, set by :func:`main` for a child process), or freed
memory kept for reuse hides a later call's peak. A row's bytes are the difference between the largest and the
smallest call, per branch; the control's own bytes the difference between a controlled and a plain call.

    python jobs/control_memory.py [--size 512] [--branches 2,4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ddim_worker.bench.procfs import read_status

GiB = 2**30

#: Modes: plain rows; word swap (the plain kernel on gathered queries and keys); refinement with reweighting (the
#: cross-attention maps formed, 77 keys, and mixed token by token).
MODES = ("plain", "word-swap", "refine+reweight")


def peak_above(fn: Any) -> tuple[int, float]:
    """(bytes of peak RSS above the RSS before ``fn()``, seconds): Linux only."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = read_status(fields=("VmRSS",))["VmRSS"]
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    return read_status(fields=("VmHWM",))["VmHWM"] - before, seconds


def measure(size: int = 512, branches: tuple[int, ...] = (2, 4), threads: int = 2) -> dict:
    import torch

    from ddim_worker.core.attention_control import RowControl, step_control
    from ddim_worker.core.engine import EditEngine
    from ddim_worker.tiny_model import build_pipeline
    from ddim_worker.core.token_alignment import align_tokens

    torch.set_num_threads(threads)
    engine = EditEngine(build_pipeline("sd15"), size=size)  # fp32 on CPU, the engine's plain SDPA attention
    tokenizer = engine.pipe.tokenizer
    source, edits = "a photo of a cat", {"word-swap": "a photo of a dog", "refine+reweight": "a photo of a big dog"}
    latent = size // engine.pipe.vae_scale_factor
    with torch.inference_mode():  # warm-up: kernels, one-time buffers
        engine.denoiser(torch.zeros(1, 4, latent, latent), 1, engine.conditioning([source], [""], [3.5]))
    results: dict[str, dict[int, dict]] = {}
    for mode in MODES:
        results[mode] = {}
        for p in branches:
            x = torch.randn(p, 4, latent, latent, generator=torch.Generator().manual_seed(p))
            prompts = [source] + [edits.get(mode, source)] * (p - 1)
            cond = engine.conditioning(prompts, [""] * p, [3.5] * p)
            if mode != "plain":
                ids = [tokenizer(t, truncation=True, max_length=77).input_ids for t in (source, prompts[1])]
                control = RowControl(1.0, 1.0, align_tokens(ids[0], ids[1], 77),
                                     2.0 if mode == "refine+reweight" else 1.0)
                call = step_control([None] + [0] * (p - 1), [None] + [control] * (p - 1), sampled_steps=1)
                cond = cond.with_control(call.at(0))
            t = engine.schedule(50).timesteps[20]
            with torch.inference_mode():
                peak, seconds = peak_above(lambda: engine.denoiser(x, t, cond))
            results[mode][p] = {"peak_bytes": peak, "seconds": seconds}
            print(f"{mode:16s} {p} branches ({2 * p} UNet samples): peak +{peak / GiB:.2f} GiB, {seconds:.1f} s",
                  flush=True)
    low, high = branches[0], branches[-1]
    per_row = {mode: (r[high]["peak_bytes"] - r[low]["peak_bytes"]) / (high - low) for mode, r in results.items()}
    return {"size": size, "dtype": "float32", "device": "cpu", "threads": threads, "branches": list(branches),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "calls": {m: {str(p): v for p, v in r.items()} for m, r in results.items()},
            "per_row_bytes": per_row,
            "control_over_plain": {m: per_row[m] / per_row["plain"] for m in MODES}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--branches", default="2,4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # glibc reads it at start: run again in a child
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        return subprocess.run([sys.executable, "-m", "ddim_worker.bench.control_memory", *(argv or sys.argv[1:])],
                              env=env).returncode
    report = measure(args.size, tuple(int(b) for b in args.branches.split(",")), args.threads)
    for mode, value in report["per_row_bytes"].items():
        print(f"per row, {mode}: {value / GiB:.3f} GiB ({report['control_over_plain'][mode]:.2f}x plain)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
