"""Scale benchmark: the real ``ddim-edit run`` on generated LAION-style manifests, driver RSS and time to first PNG.

    python jobs/scale_benchmark.py --rows 10000,100000,1000000 --seconds 90 --json docs/scale-cpu.json
    python jobs/scale_benchmark.py --rows 2000,400000 --seconds 90 --json /tmp/acceptance.json

The benchmark lives in ``ddim_worker.bench.scale`` (``--help`` says what each figure means; ``docs/benchmarks.md``
shows a run); this script only runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/scale_benchmark.py` from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_worker.bench.scale import main

if __name__ == "__main__":
    sys.exit(main())
