"""The spine's shape (ARCHITECTURE.md), checked on the source: no import cycle (function-level
imports included), lower layers never import upper ones, one interceptor, one grid."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mixdq_jax", "pallas_kernels", "weights_convert")

# Bottom to top; a module may import only from its own rank or below.
RANKS = {
    "pallas_kernels": 0,
    "weights_convert": 0,
    "mixdq_jax.models": 0,
    "mixdq_jax.schedulers": 0,
    "mixdq_jax.tokenizer": 0,
    "mixdq_jax.metrics": 0,
    "mixdq_jax.official_format": 0,
    "mixdq_jax.io_utils": 0,
    "mixdq_jax.rundir": 0,
    "mixdq_jax.compile_events": 0,
    "mixdq_jax.hub": 0,  # hub ids -> a local snapshot (weights_convert resolves through it)
    "mixdq_jax.quant": 1,
    "mixdq_jax.pipeline": 2,
    "mixdq_jax.batch_render": 2,  # many configurations through one compiled sampling program
    "mixdq_jax.testbed": 0,  # data, judge, vocab, model (and a light package init)
    "mixdq_jax.testbed.train": 1,
    "mixdq_jax.loader": 3,
    "mixdq_jax.calibrate": 4,
    "mixdq_jax.sensitivity": 4,
    "mixdq_jax.allocation": 4,
    "mixdq_jax.deploy": 4,
    "mixdq_jax.reconstruction": 4,
    "mixdq_jax.api": 5,
    "mixdq_jax.any_model": 5,  # MixDQ on any Flax model: quant + allocation behind one entry
    "mixdq_jax.methods": 5,  # allocators, refiners, formats, the method registry
    "mixdq_jax.recipe": 5,
    "mixdq_jax.testbed.evaluate": 5,
    "mixdq_jax.evaluation": 5,
    "mixdq_jax.inspection": 5,  # what an export or a run directory holds (reads deploy's files)
    "mixdq_jax.study": 6,
    "mixdq_jax.cli": 7,
    "mixdq_jax": 8,  # the package's lazy re-exports
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> project modules it imports anywhere in its body."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod and not mod.startswith(target + "."):
                    edges[mod].add(target)
    return edges


def _rank(mod: str) -> int | None:
    for prefix in sorted(RANKS, key=len, reverse=True):
        if mod == prefix or mod.startswith(prefix + ".") and prefix != "mixdq_jax":
            return RANKS[prefix]
    return None


def test_no_import_cycles():
    edges = _imports(_modules())
    # a package importing its own submodules (re-exports) is not a cycle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, cycles[:3]


def test_lower_layers_never_import_upper_ones():
    bad = []
    for mod, targets in _imports(_modules()).items():
        r = _rank(mod)
        for t in targets:
            rt = _rank(t)
            if r is not None and rt is not None and rt > r:
                bad.append(f"{mod} (rank {r}) imports {t} (rank {rt})")
    assert not bad, bad


def test_every_module_has_a_rank():
    assert [m for m in _modules() if _rank(m) is None] == []


def test_one_interceptor_and_one_grid():
    sources = {m: p.read_text() for m, p in _modules().items()}
    interceptors = [m for m, s in sources.items() if "intercept_methods(" in s]
    assert interceptors == ["mixdq_jax.quant.intercept"]
    assert sources["mixdq_jax.quant.intercept"].count("intercept_methods(") == 1
    grids = [m for m, s in sources.items() if "MIN_SCALE =" in s or "MIN_SCALE=" in s]
    assert grids == ["pallas_kernels.grid"]
    scales = [m for m, s in sources.items() if "MIN_SCALE)" in s]
    assert scales == ["pallas_kernels.grid"]
