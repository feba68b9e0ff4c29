"""The latent cache: inversion trajectories as safetensors, keyed by everything that determines them.

A later edit of the same image and source prompt, with any edit prompt, reads the stored level instead of inverting;
a deeper start step continues from the deepest stored level and the object is rewritten with the longer trajectory.
Where an entry lives is decided here; what its bytes hold is ``core.trajectory_codec`` (torch), so the CPU stages that
only name entries never load torch.
"""

from __future__ import annotations

from ddim_worker import storage
from ddim_worker.core.inversion_key import CacheKey


#: Hex digits of an entry's digest that name its folder: 4,096 folders, about 250 entries each per million images.
PREFIX_DIGITS = 3


def cache_uri(cache_root: str, key: CacheKey) -> str:
    """Named by the hash of everything the trajectory depends on: two jobs that write one entry write the same
    trajectory (whole objects: a reader sees one of them, never a mix), so a cache shared between jobs is safe."""
    digest = key.digest()
    return storage.join_uri(cache_root, digest[:PREFIX_DIGITS], f"{digest}.safetensors")
