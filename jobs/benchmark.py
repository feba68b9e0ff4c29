"""Benchmark of ddim-edit on one device: the engine, the Ray job and the textbook loop side by side, in one run.

    python jobs/benchmark.py --arch small --device cpu --json bench.json        # this repository's CPU numbers
    python jobs/benchmark.py --arch sd15 --device cuda --no-ray --json bench.json  # a GPU box without Ray

The benchmark lives in ``ddim_worker.bench`` (``python jobs/benchmark.py --help`` explains what it measures;
``docs/benchmarks.md`` shows a run); this script only runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/benchmark.py` from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_worker.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
