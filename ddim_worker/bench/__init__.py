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

Modules: ``config`` (settings, device defaults, targets, command line), ``inputs`` (images, prompts, rows),
``textbook`` (the textbook loop's port), ``flops`` (FLOP counts, peaks, ceilings, MFU), ``timers`` (timing the
engine and the textbook loop), ``variants`` (fast-path switches flipped), ``jobs`` (the Ray job at steady state),
``report`` (checks, targets, Markdown), ``run`` (the whole run and ``main``).
"""
