"""The ddim-edit batch job, as the script ``ray job submit`` runs; the same as ``ddim-edit run``.

    ray job submit --working-dir . -- python jobs/edit.py MANIFEST --output URI [...]

Everything lives in the package (``ddim_worker.job``); this file only makes the checkout importable and calls it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/edit.py` from a checkout (e.g. ray job submit --working-dir .)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_worker.job.driver import main

if __name__ == "__main__":
    sys.exit(main())
