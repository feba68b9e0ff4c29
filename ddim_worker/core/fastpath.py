"""Fast-path switches for the engine's pipeline, each reversible so the benchmark can measure it on and off.

- attention kernel: ``sdpa`` (diffusers' ``AttnProcessor2_0``, ``F.scaled_dot_product_attention``: flash /
  memory-efficient kernels on CUDA, the fused CPU kernel on CPU) or ``math`` / ``eager`` (``AttnProcessor``: explicit
  ``baddbmm`` + softmax + ``bmm``, materialising the (tokens x tokens) score matrix);
- memory format: ``channels_last`` conv weights for the UNet and the VAE (cuDNN / oneDNN pick NHWC kernels, and the
  activations follow the weights' format);
- ``torch.compile`` of the UNet, in place (``Module.compile``), so every holder of ``pipe.unet`` (the engine's
  ``GuidedUNet``) runs the compiled forward;

plus two helpers the engine and the job can use: :func:`auto_batch_size` (rows per engine call from free GPU memory)
and :func:`pinned_to_device` (host-to-device copies through pinned memory).

Nothing here imports Ray; diffusers is imported only when an attention processor is set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: Attention implementations :func:`set_attention` knows. ``eager`` is another name for ``math``.
ATTENTION = ("sdpa", "math", "eager")

GiB = 2**30

#: Peak activation memory of one row at 512 px in a 16-bit dtype (bf16 / fp16), in bytes. A row is one edit inside a
#: batched engine call: the UNet runs it twice (classifier-free guidance) and the VAE decodes it at full resolution,
#: which dominates (its last up blocks hold several 128- and 256-channel 512 x 512 activations at once). Calibrated
#: with the sd15 shapes at 512 px in fp32 on CPU: the peak resident memory of an edit grew by 0.62 GiB from one row to
#: two (4.67 -> 5.29 GiB above the loaded model), i.e. ~0.31 GiB per row in 16-bit. We count 0.75 GiB, 2.4x that, as
#: head-room for the CUDA caching allocator's fragmentation and cuDNN workspaces. The benchmark records
#: ``torch.cuda.max_memory_allocated`` at each batch size, so the estimate can be checked on the GPU.
ROW_BYTES_512_16BIT = int(0.75 * GiB)

#: A row of a call under attention control (Prompt-to-Prompt), over a plain row: 1.02. Measured with the sd15 shapes
#: at 512 px in fp32 on CPU (``python jobs/control_memory.py``, docs/control-memory-cpu.json): one guided UNet call's
#: peak resident memory grew by 0.250 GiB per plain row and 0.254 GiB per controlled row (word swap, and refinement
#: with reweighting alike), 2 -> 4 rows. Self-attention control runs the plain kernel on the source's queries and
#: keys, so it forms no (HW)^2 map (that would be 1 GiB per row at 64 x 64 latents in fp32); the refinement's
#: cross-attention maps have 77 keys. A source branch is a row of its call like any other: a controlled call of B
#: rows edits fewer images' rows, not more memory per row.
CONTROL_ROW_FACTOR = 1.02

#: Free memory left untouched by :func:`auto_batch_size`: 10 % plus 2 GiB for the CUDA context, cuDNN / cuBLAS
#: workspaces and whatever else shares the device.
RESERVE_FRACTION = 0.10
RESERVE_BYTES = 2 * GiB

#: Batches larger than this stop paying off on current GPUs (an H100 is saturated by ~16 rows of SD 1.5 at 512 px,
#: i.e. 32 UNet samples per call) and make the job's progress coarse.
MAX_AUTO_BATCH = 32


def set_attention(pipe: Any, attention: str = "sdpa") -> None:
    """Use ``F.scaled_dot_product_attention`` (``sdpa``) or the explicit matmul/softmax path (``math``/``eager``)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for module in (pipe.unet, getattr(pipe, "vae", None)):
        if module is not None and hasattr(module, "set_attn_processor"):
            module.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


def set_channels_last(pipe: Any, enabled: bool = True) -> None:
    """Put the UNet's and the VAE's conv weights in channels_last (NHWC) or back in the default (NCHW) format."""
    memory_format = torch.channels_last if enabled else torch.contiguous_format
    for module in (pipe.unet, getattr(pipe, "vae", None)):
        if module is not None:
            module.to(memory_format=memory_format)


def set_compile(pipe: Any, enabled: bool = True, mode: str | None = None, dynamic: bool = False) -> None:
    """``torch.compile`` the UNet's forward in place (``Module.compile``), or drop the compiled forward again.

    In place, so ``pipe.unet`` stays the same object: the engine's ``GuidedUNet`` and its ``.dtype`` / ``.device``
    keep working. ``dynamic=False`` compiles once per batch shape; the first call at each shape pays the compile;
    ``None`` compiles a second, dynamic graph when a second shape comes. Switching off keeps the compiled forward, so
    switching on again (same mode) costs nothing.
    """
    unet = pipe.unet
    if enabled == is_compiled(pipe):
        return
    if enabled:
        stashed = getattr(unet, "_ddim_edit_compiled", None)
        if stashed is not None and stashed[0] == (mode, dynamic):
            unet._compiled_call_impl = stashed[1]  # switched back on: the graphs already built are reused
        else:
            unet.compile(mode=mode, dynamic=dynamic)
            unet._ddim_edit_compiled = ((mode, dynamic), unet._compiled_call_impl)
    else:
        unet._compiled_call_impl = None  # what ``Module.compile`` sets; None is the eager forward


def is_compiled(pipe: Any) -> bool:
    return getattr(pipe.unet, "_compiled_call_impl", None) is not None


def apply_fast_path(pipe: Any, *, channels_last: bool, compile_unet: bool, attention: str = "sdpa",
                    compile_mode: str | None = None, compile_dynamic: bool | None = False) -> dict[str, Any]:
    """Set attention, memory format and compilation on ``pipe`` (in place) and return what was set.

    Call it again with other values to switch a setting off: every switch is reversible (a compiled UNet switched off
    and on again reuses its graphs). ``compile_dynamic=None`` lets torch.compile mark the batch dimension dynamic
    after a second batch shape, instead of compiling once per shape. The dtype is not switched
    here (it is chosen when the pipeline is loaded: ``EditEngine.from_pretrained(dtype=...)``).
    """
    set_attention(pipe, attention)
    set_channels_last(pipe, channels_last)
    set_compile(pipe, compile_unet, mode=compile_mode, dynamic=compile_dynamic)
    return {"attention": attention, "channels_last": bool(channels_last), "compile_unet": bool(compile_unet),
            "compile_mode": compile_mode if compile_unet else None,
            "compile_dynamic": compile_dynamic if compile_unet else False}


def row_bytes(size: int, dtype: torch.dtype, control: bool = False) -> int:
    """Estimated peak activation bytes of one row at ``size`` px in ``dtype`` (see ``ROW_BYTES_512_16BIT``), of a
    call under attention control with ``control`` (``CONTROL_ROW_FACTOR``).

    Activations scale with the pixel count and with the element size.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    factor = CONTROL_ROW_FACTOR if control else 1.0
    return int(ROW_BYTES_512_16BIT * factor * (size / 512) ** 2 * itemsize / 2)


def auto_batch_size(free_bytes: int, size: int, dtype: torch.dtype, max_batch: int = MAX_AUTO_BATCH,
                    control: bool = False) -> int:
    """Rows per engine call that fit in ``free_bytes`` of device memory (after the weights are loaded).

    ``(free - 10 % - 2 GiB) // row_bytes(size, dtype)``, clamped to ``[1, max_batch]`` and rounded down to a power of
    two (so the few shapes a job sees are the ones benchmarked and, with ``torch.compile``, compiled). Examples:
    80 GB H100 with SD 1.5 loaded in bf16 (~75 GB free) at 512 px -> 32 (capped); a 24 GB card (~21 GB free) -> 16;
    the same card in fp32 -> 8; 8 GB free -> 4.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    usable = free_bytes * (1 - RESERVE_FRACTION) - RESERVE_BYTES
    rows = int(usable // row_bytes(size, dtype, control)) if usable > 0 else 0
    rows = max(1, min(int(max_batch), rows))
    return 1 << (rows.bit_length() - 1)


#: Bytes of an SD 1.x pipeline's weights in a 16-bit dtype (UNet 860 M + VAE 84 M + CLIP-L text 123 M parameters).
SD1_WEIGHTS_16BIT = int(2.2 * GiB)


def batch_size_before_load(free_bytes: int, size: int, dtype: torch.dtype, max_batch: int = MAX_AUTO_BATCH,
                           control: bool = False) -> int:
    """:func:`auto_batch_size` for a device whose ``free_bytes`` were measured before an SD 1.x pipeline is loaded
    on it (a job sizes its batches before its engine actors start): the weights come off first."""
    weights = int(SD1_WEIGHTS_16BIT * torch.empty((), dtype=dtype).element_size() / 2)
    return auto_batch_size(free_bytes - weights, size, dtype, max_batch, control)


def free_device_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``); None on other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def pinned_to_device(array: np.ndarray | torch.Tensor, device: torch.device | str,
                     non_blocking: bool = True) -> torch.Tensor:
    """A host array on ``device``: through page-locked (pinned) memory and an asynchronous copy on CUDA.

    Pinned memory lets the copy run by DMA without a staging copy and, with ``non_blocking``, overlap with work
    already queued on the stream. PyTorch's caching host allocator keeps the pinned buffer alive until the copy is
    done, so the host tensor may be dropped at once. On other devices this is a plain ``.to(device)``.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=non_blocking)
