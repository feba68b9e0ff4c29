"""Pack benchmark: ``ddim-edit pack`` on generated outputs, the driver's peak RSS at 1 k and 100 k rows.

    python jobs/pack_benchmark.py --rows 1000,100000 --json docs/pack-cpu.json

The benchmark lives in ``ddim_worker.bench.pack`` (``--help`` says what each figure means; ``docs/benchmarks.md``
shows a run); this script only runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/pack_benchmark.py` from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_worker.bench.pack import main

if __name__ == "__main__":
    sys.exit(main())
