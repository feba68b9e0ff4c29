"""The latent cache: inversion trajectories as safetensors, keyed by everything that determines them.

A later edit of the same image and source prompt, with any edit prompt, reads the stored level instead of inverting;
a deeper start step continues from the deepest stored level and the object is rewritten with the longer trajectory.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddim_worker import storage
from ddim_worker.core.inversion_key import FORMAT_VERSION, CacheKey  # noqa: F401 - the key is defined with the inversion key
from ddim_worker.core.sampler import Trajectory


#: Hex digits of an entry's digest that name its folder: 4,096 folders, about 250 entries each per million images.
PREFIX_DIGITS = 3


def cache_uri(cache_root: str, key: CacheKey) -> str:
    """Named by the hash of everything the trajectory depends on: two jobs that write one entry write the same
    trajectory (whole objects: a reader sees one of them, never a mix), so a cache shared between jobs is safe."""
    digest = key.digest()
    return storage.join_uri(cache_root, digest[:PREFIX_DIGITS], f"{digest}.safetensors")


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
