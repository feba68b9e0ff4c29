"""One inversion per image in the job: an augmentation manifest against distinct images (``ddim_worker.bench.grouping``)."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_worker.bench.grouping import main

if __name__ == "__main__":
    sys.exit(main())
