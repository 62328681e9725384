"""The code's shape, as docs/architecture.md states it: layers, no import circles, lint-clean."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featurecache"

#: docs/architecture.md: a module may import modules of its own or a lower layer only.
LAYERS = [
    {"errors", "distributed", "resources", "metrics", "overlay", "outputs", "prefetch"},
    {"__init__", "images", "datasets", "patches", "summary", "plots"},
    {"cache.format", "cache.files"},
    {"cache.table", "cache.base"},
    {"cache.reader", "cache.memory", "cache.assemble"},
    {"cache.writer"},
    {"cache.__init__", "backbones"},
    {"runtimes"},
    {"extract"},
    {"heads.pooling", "heads.background"},
    {"heads.registry"},
    {"heads.trained"},
    {"heads._sources", "heads._torch", "heads.dataset"},
    {"heads.patch", "heads.mil"},
    {"heads.image"},
    {"heads.fusion"},
    {"heads.auto"},
    {"train"},
    {"evaluate", "localize"},
    {"ablate", "predict"},
    {"demo"},
    {"cli"},
    {"__main__"},
]
ESTIMATOR_MODULES = {"heads.patch", "heads.image", "heads.mil", "heads._sources", "heads._torch"}


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _imports() -> dict:
    """Module -> featurecache modules it imports (anywhere in the file)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _name(path)
        if name == "heads.__init__":
            continue  # names are resolved on first use, from strings
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featurecache"):
                target = node.module[len("featurecache."):] if node.module != "featurecache" else "__init__"
                found.add(target + ".__init__" if (PACKAGE / target).is_dir() else target)
            elif isinstance(node, ast.Import):
                found |= {a.name[len("featurecache."):] for a in node.names if a.name.startswith("featurecache.")}
        graph[name] = found
    return graph


def test_every_module_has_a_layer_and_imports_downwards():
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    graph = _imports()
    assert set(graph) <= set(layer), f"modules without a layer in docs/architecture.md: {set(graph) - set(layer)}"
    upward = [(m, t) for m, targets in graph.items() for t in targets if layer[t] > layer[m]]
    assert not upward, upward


def test_no_import_circles():
    graph = _imports()
    state: dict = {}

    def visit(m, stack):
        state[m] = "open"
        for t in graph.get(m, ()):
            if state.get(t) == "open":
                raise AssertionError(" -> ".join(stack + [m, t]))
            if t not in state:
                visit(t, stack + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])


def test_evaluation_and_ablation_know_no_estimator():
    graph = _imports()
    for m in ("evaluate", "ablate"):
        assert not graph[m] & ESTIMATOR_MODULES, (m, graph[m] & ESTIMATOR_MODULES)


def test_only_the_command_line_imports_click():
    users = [_name(p) for p in PACKAGE.rglob("*.py") if "import click" in p.read_text()]
    assert users == ["cli"]


def test_the_registry_and_the_command_line_load_without_torch():
    code = ("import sys, featurecache.cli, featurecache.heads.registry; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_lint_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    root = PACKAGE.parent
    out = subprocess.run([ruff, "check", "featurecache", "tests", "examples", "benchmarks"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
