"""Ledger scan benchmark: the bytes ``ledger.scan`` reads of shards that embed their PNGs, against their size.

    python jobs/ledger_scan_benchmark.py --rows 10000 --output /tmp/ddim-edit-ledger-scan-bench

The benchmark lives in ``ddim_worker.bench.ledger_scan`` (``--help`` says what each figure means;
``docs/benchmarks.md`` shows a run); this script only runs it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/ledger_scan_benchmark.py` from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_worker.bench.ledger_scan import main

if __name__ == "__main__":
    # The figures are printed and written by now. Leave without the interpreter's teardown: once in a while Arrow's
    # I/O threads are still being destroyed then and the C++ runtime aborts ("terminate called without an active
    # exception", exit -6) after a run that succeeded.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
