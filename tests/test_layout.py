"""Data flows one way: the core never imports the CNN/transformer sides or the app layer.

Imports are read with `ast` (module level and inside functions alike: a lazy import is still a
dependency), so the test needs no import of the package and sees every edge. The package's
`__init__` is the public facade (it re-exports CNN helpers such as `ptq`), not part of the core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The shared core: formats, math, layers, policy, cost, Shapley engine, allocation, registry.
CORE = ("errors", "fileio", "blockformats", "spec", "primitives", "observers", "modules",
        "apply", "policy", "cost", "shapley", "alloc", "strategy")
# What the core must not reach: the two model families, backends/export, and the app layer.
DOWNSTREAM = ("cnn", "transformer", "backends", "export", "compare", "report", "cli",
              "workflows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every smpq module `path` imports; `from a import b` counts as both `a` and `a.b`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m == "smpq" or m.startswith("smpq.")}


GRAPH = {_module_name(p): _imports(p) for p in sorted(SRC.joinpath("smpq").rglob("*.py"))}


def _within(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == f"smpq.{r}" or module.startswith(f"smpq.{r}.") for r in roots)


def _offending(sources: tuple[str, ...], targets: tuple[str, ...]) -> list[str]:
    return sorted(f"{src} -> {dst}" for src, deps in GRAPH.items() if _within(src, sources)
                  for dst in deps if _within(dst, targets))


def test_reader_sees_known_edges():
    """Guards the checks below against passing because the reader found nothing."""
    assert {"smpq.spec", "smpq.alloc", "smpq.alloc.milp", "smpq.cnn.train"} <= GRAPH.keys()
    assert "smpq.spec" in GRAPH["smpq.primitives"]
    assert "smpq.backends" in GRAPH["smpq.transformer.scores"]  # inside the package
    assert "smpq.cnn.train" in GRAPH["smpq.cnn.pipeline"]
    assert any(d.startswith("smpq.workflows") for d in GRAPH["smpq.cli"])  # a lazy import


def test_core_imports_nothing_downstream():
    assert _offending(CORE, DOWNSTREAM) == []


@pytest.mark.parametrize("side, other", [("cnn", "transformer"), ("transformer", "cnn")])
def test_model_families_do_not_import_each_other(side, other):
    assert _offending((side,), (other,)) == []


def test_nothing_imports_the_cli():
    assert [f"{src} -> {dst}" for src, deps in GRAPH.items() for dst in deps
            if _within(dst, ("cli",)) and src != "smpq.cli"] == []
