"""The edit benchmark of the shipped shapes model (docs/quality.md): every inversion method over start steps and
guidance scales on held-out colour edits, plus text-to-image colour match and DDIM reconstruction; with ``--kinds``,
colour, shape and background edits per way of keeping the rest (attention control, direct inversion, masks).

    python jobs/edit_quality.py [--model M] [--count 24] [--checks] [--json OUT]   (default: the shipped model)
    python jobs/edit_quality.py --kinds colour,shape,background [--json OUT]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from ddim_worker.shapes import edit_bench
    from ddim_worker.shapes.model import make_shapes_model

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv:
        return edit_bench.main(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return edit_bench.main(["--model", str(make_shapes_model(Path(tmp) / "shapes")), *argv])


if __name__ == "__main__":
    sys.exit(main())
