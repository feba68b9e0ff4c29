"""Peak memory of one engine row with and without attention control at SD 1.5's shapes, 512 px (docs/quality.md).

    python jobs/control_memory.py [--size 512] [--branches 2,4] [--json OUT]

The measurement lives in ``ddim_worker.bench.control_memory``; this script only runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_worker.bench.control_memory import main

if __name__ == "__main__":
    sys.exit(main())
