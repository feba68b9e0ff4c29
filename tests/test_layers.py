"""The package's layers, read from the source (function-local imports included): one direction, no circle, an
editing core with no Ray and no storage, modules small enough to read."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddim_worker"

#: The editing core (``ddim_worker/core/``): the maths, the model adapter, the plan and its executor, the methods.
#: No Ray, no storage, no job: it imports nothing of the package outside its folder.
CORE = "ddim_worker.core"
#: Modules the core must hold, whatever else moves: a check that the folder is the core, not an empty shell.
CORE_MODULES = ("schedule", "sampler", "inversion", "inversion_key", "denoiser", "call_plan", "engine", "edit_types",
                "model_adapter", "loops", "group_plan", "group_state", "group_run", "inversion_steps", "mask_step",
                "sampling_steps", "attention_control", "token_alignment", "trajectory_guides", "masks", "regions",
                "null_text", "metrics", "images", "settings", "fastpath", "models")
#: What the core must never import (directly or inside a function).
NOT_IN_CORE = ("ddim_worker.job", "ddim_worker.storage", "ddim_worker.fetch", "ddim_worker.latent_cache",
               "ddim_worker.columns", "ddim_worker.rows", "ddim_worker.manifest", "ddim_worker.model_source", "ray",
               "s3fs", "fsspec", "boto3", "botocore", "requests", "urllib3")
#: The job layer: only the applications on top (the CLI, benchmarks, the shapes model's tools) may import it.
JOB = "ddim_worker.job"
APPS = ("ddim_worker.cli", "ddim_worker.bench", "ddim_worker.shapes")

MAX_FUNCTION_LINES, MAX_CLASS_LINES = 70, 300


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


@functools.lru_cache(maxsize=None)
def _imports(name: str, path: Path) -> frozenset[str]:
    """Every module ``name`` imports, anywhere in its source (relative imports resolved)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(found)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path) if m in modules and m != name} for name, path in modules.items()}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, cycles


def test_the_core_has_no_ray_no_storage_and_no_job():
    modules = _modules()
    core = {n: p for n, p in modules.items() if _under(n, CORE)}
    names = set(core)
    assert {f"{CORE}.{m}" for m in CORE_MODULES} <= names, sorted({f"{CORE}.{m}" for m in CORE_MODULES} - names)
    bad = {n: sorted(i for i in _imports(n, p) if any(_under(i, x) for x in NOT_IN_CORE)) for n, p in core.items()}
    assert not {n: b for n, b in bad.items() if b}
    # and the core imports nothing of the package outside itself: it is the bottom layer
    graph = _graph()
    upward = {n: sorted(i for i in graph[n] if not _under(i, CORE) and i != "ddim_worker") for n in core}
    assert not {n: u for n, u in upward.items() if u}


def test_only_the_applications_import_the_job():
    graph = _graph()
    importers = {n: sorted(i for i in imports if _under(i, JOB))
                 for n, imports in graph.items() if not _under(n, JOB) and not any(_under(n, a) for a in APPS)}
    assert not {n: i for n, i in importers.items() if i}, "below the job layer, nothing imports it"
    assert not any(_under(i, JOB) for i in graph["ddim_worker.report"])


def test_the_package_never_imports_the_scripts():
    assert not {n for n, p in _modules().items() if any(_under(i, "jobs") for i in _imports(n, p))}


def test_functions_and_classes_are_small():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_the_driver_starts_without_torch():
    """The driver (a CPU head node's process) names the engine actor's class without importing torch, diffusers or
    transformers: the actor imports them in its own process."""
    code = ("import sys, ddim_worker.cli, ddim_worker.job.driver, ddim_worker.job.pipeline, ddim_worker.job.actor; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
