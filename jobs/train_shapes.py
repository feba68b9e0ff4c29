"""Train the shapes model (see ddim_worker/shapes/train.py and docs/shapes-model.md).

    python jobs/train_shapes.py PATH [--work DIR] [--threads 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from ddim_worker.shapes.train import main

    sys.exit(main())
