"""A trajectory as safetensors bytes and back: the latent cache's entries and the blobs the engine actors hand the
write stage. Pure bytes, no storage: where an entry lives is ``ddim_worker.latent_cache``."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddim_worker.core.inversion_key import FORMAT_VERSION
from ddim_worker.core.sampler import Trajectory


def encode_trajectory_blob(trajectory: Trajectory) -> bytes:
    """One row's trajectory (latents (L, 1, C, h, w) or (L, C, h, w)) as safetensors bytes, labelled by timestep, in
    the dtype the engine gave it (the engine rounds a trajectory to its own dtype before it samples from it, so the
    stored levels are exactly what a fresh inversion would sample from)."""
    latents = trajectory.latents
    if latents.dim() == 5:
        latents = latents[:, 0]
    tensors = {f"t{t}" if t >= 0 else "x0": latents[i].contiguous() for i, t in enumerate(trajectory.timesteps)}
    for name, value in trajectory.extras.items():  # e.g. null-text embeddings, (S, 1, L, D) -> (S, L, D)
        tensors[f"extra:{name}"] = (value[:, 0] if value.dim() == 4 else value).contiguous()
    metadata = {"timesteps": json.dumps(trajectory.timesteps), "format": str(FORMAT_VERSION)}
    return save_safetensors(tensors, metadata=metadata)


def decode_trajectory(data: bytes) -> Trajectory:
    """Back to a one-row ``Trajectory`` with latents (L, 1, C, h, w)."""
    tensors = load_safetensors(data)
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    timesteps = json.loads(metadata["timesteps"])
    latents = torch.stack([tensors[f"t{t}" if t >= 0 else "x0"] for t in timesteps])[:, None]
    extras = {k.removeprefix("extra:"): v[:, None] for k, v in tensors.items() if k.startswith("extra:")}
    return Trajectory(timesteps, latents, extras)
