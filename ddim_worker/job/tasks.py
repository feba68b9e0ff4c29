"""Work over small descriptors (manifest row groups, results shards, data files), on the cluster or in this process.

One home for the two questions every pass over an output asks: is Ray running (then the work goes to Ray tasks, and
the driver keeps only what they hand back), and how is a list of descriptors made into a Ray dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: Blocks of descriptors, at most: enough for every core of a large cluster to work at once.
MAX_READ_BLOCKS = 4096

#: Items a task takes per call in ``map_chunks`` (shards are hundreds of rows: a few per task amortise its start).
ITEMS_PER_TASK = 16


def ray_running() -> bool:
    """Whether this process is connected to Ray (a driver is; tests and tools may not be)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def descriptor_dataset(items: list[dict[str, Any]]) -> Any:
    """A Ray dataset of ``items``, one block each up to ``MAX_READ_BLOCKS``: every item is its own task's work."""
    import ray

    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), MAX_READ_BLOCKS)))


def map_chunks(fn: Callable[..., dict[str, np.ndarray]], items: list[dict[str, Any]], use_ray: bool | None = None,
               per_task: int = ITEMS_PER_TASK, local_below: int = 0, **kwargs: Any) -> list[dict[str, np.ndarray]]:
    """``fn`` over ``items`` in chunks of ``per_task`` (each chunk a dict of 1-D object arrays), on Ray tasks or in
    this process. ``use_ray`` None: on Ray when it runs and there are more than ``local_below`` items (a pass over a
    few costs more on Ray than it saves). Items hold text, numbers and lists of numbers (what Ray Data carries)."""
    if not items:
        return []
    if use_ray is None:
        use_ray = len(items) > local_below and ray_running()
    chunks = [items[i:i + per_task] for i in range(0, len(items), per_task)]
    batches = [{k: objects([item[k] for item in chunk]) for k in chunk[0]} for chunk in chunks]
    if not use_ray:
        return [fn(batch, **kwargs) for batch in batches]
    ds = descriptor_dataset([{k: list(v) for k, v in batch.items()} for batch in batches])
    ds = ds.map_batches(_unpack_chunk, fn_kwargs={"fn": fn, "kwargs": kwargs}, batch_size=1, batch_format="numpy")
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))


def _unpack_chunk(batch: dict[str, np.ndarray], fn: Callable, kwargs: dict) -> dict[str, np.ndarray]:
    return fn({k: objects(list(batch[k][0])) for k in batch}, **kwargs)


def objects(values: list) -> np.ndarray:
    """A 1-D object array of ``values`` (``np.array`` would make equal-length lists a 2-D array)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out
