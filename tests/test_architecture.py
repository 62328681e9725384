"""The code's shape, as docs/architecture.md states it: layers, no import circles, lint-clean."""

import ast
import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featurecache"

DOC = PACKAGE.parent / "docs" / "architecture.md"


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _names(cell: str) -> list:
    return re.findall(r"`([^`]+)`", cell)


def _documented_rows() -> dict:
    """Module or pattern -> layer, from the module table of docs/architecture.md (``heads/trained.py`` ->
    ``heads.trained``; ``heads/*.py`` -> ``heads.*``, the layer of a package's modules without a row)."""
    layers = {}
    for line in DOC.read_text().splitlines():
        cells = _cells(line)
        if len(cells) == 3 and cells[0].isdigit() and cells[1].startswith("`") and cells[1].endswith(".py`"):
            layers[cells[1].strip("`")[:-3].replace("/", ".")] = int(cells[0])
    return layers


def _documented_layers() -> dict:
    """Module -> layer: its own row, else the first pattern row that matches it."""
    rows = _documented_rows()
    layers = {m: n for m, n in rows.items() if "*" not in m}
    patterns = [(p, n) for p, n in rows.items() if "*" in p]
    for m in set(_imports()) - set(layers):
        layers.update(next(({m: n} for p, n in patterns if fnmatch.fnmatchcase(m, p)), {}))
    return layers


def _forbidden_edges() -> list:
    """``(from patterns, to patterns)`` rows of the forbidden-edges table of docs/architecture.md."""
    text = DOC.read_text().split("## Forbidden edges", 1)[1].split("\n## ", 1)[0]
    rows = [_cells(line) for line in text.splitlines() if line.startswith("| `")]
    return [(_names(r[0]), _names(r[1])) for r in rows]


def _matches(module: str, patterns: list) -> bool:
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


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
    layer = _documented_layers()
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


def test_the_documented_layers_are_the_coarse_ones_and_name_only_real_modules():
    rows = _documented_rows()
    assert set(rows.values()) == set(range(1, 8))
    named = {m for m in rows if "*" not in m}
    assert named <= set(_imports()) | {"heads.__init__"}, f"rows naming no module: {named - set(_imports())}"
    assert set(_documented_layers()) == set(_imports()) | {"heads.__init__"}


def test_no_forbidden_edge():
    graph = _imports()
    rules = _forbidden_edges()
    assert len(rules) >= 4 and all(sources and targets for sources, targets in rules)
    found = [(m, t) for sources, targets in rules for m, ts in graph.items() if _matches(m, sources)
             for t in ts if _matches(t, targets)]
    assert not found, found


def test_every_forbidden_edge_names_real_modules():
    """A misspelt module would make its rule vacuous: every pattern of the table matches a module."""
    existing = set(_imports())
    patterns = [p for sources, targets in _forbidden_edges() for p in sources + targets]
    assert [p for p in patterns if not _matches_any(p, existing)] == []


def _matches_any(pattern: str, modules: set) -> bool:
    return any(fnmatch.fnmatchcase(m, pattern) for m in modules)


def test_only_the_command_line_imports_click():
    users = [_name(p) for p in PACKAGE.rglob("*.py") if "import click" in p.read_text()]
    assert users == ["cli"]


def test_the_registry_and_the_command_line_load_without_torch():
    code = ("import sys, featurecache.cli, featurecache.cache, featurecache.heads.registry; "
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
