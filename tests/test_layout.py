"""The house rules, read from the source (imports parsed, not grepped).

- One-way imports: sdk -> runtime, sdk -> plc_bridge; runtime never imports sdk or plc_bridge;
  plc_bridge never imports runtime or torch; runtime.control (loop, safety, recorder) never
  imports torch.
- No import circles between the product's modules (imports inside functions count too: a lazy
  import is still a dependency).
- No module imports another module's private (underscore) names.
- No module over 800 lines (the exceptions below say why), no folder over 30% of the product.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdk", "runtime", "plc_bridge")
FORBIDDEN = {"runtime": {"sdk", "plc_bridge"}, "plc_bridge": {"sdk", "runtime", "torch"},
             "runtime.control": {"torch", "sdk", "plc_bridge"}}
MAX_MODULE_LINES = 800
#: modules allowed past MAX_MODULE_LINES, and why
LONG_MODULES: dict[str, str] = {}
MAX_FOLDER_SHARE = 0.30


def _modules() -> dict[str, Path]:
    """Every product module by dotted name (a package by its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for every import in a module, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def _edges(name: str, path: Path) -> set[str]:
    """The product modules ``name`` imports: a submodule named in ``from pkg import sub`` counts
    as that submodule, anything else as the module it comes from."""
    out = set()
    for module, names, _ in _imports(name, path):
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        if subs:
            out.update(subs)
        if module in MODULES and len(subs) < len(names or [None]):
            out.add(module)
    out.discard(name)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_upstream(package):
    bad = {}
    for name, path in MODULES.items():
        if name == package or name.startswith(package + "."):
            hits = sorted({m.split(".")[0] for m, _, _ in _imports(name, path)} & FORBIDDEN[package])
            if hits:
                bad[name] = hits
    assert not bad


def test_no_import_circles():
    graph = {name: _edges(name, path) for name, path in MODULES.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:                 # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_import_graph_resolves_submodules_and_relative_imports():
    """The graph the circle check walks sees ``from pkg import sub`` and relative imports."""
    assert "runtime.model.transformer" in _edges("runtime.cpu.engine", MODULES["runtime.cpu.engine"])
    assert "plc_bridge.bridge" in _edges("plc_bridge.modbus", MODULES["plc_bridge.modbus"])


def test_no_private_names_from_other_modules():
    """What one module needs from another is public there (a leading underscore means "this
    module's own"): no ``from m import _x`` and no ``m._x`` in the product."""
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for module, names, line in _imports(name, path):
            if module.split(".")[0] not in PACKAGES or module == name:
                continue
            bad.extend(f"{path.relative_to(ROOT)}:{line} {module}.{n}" for n in names
                       if n.startswith("_") and not n.startswith("__"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.name != name:
                        aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
    assert not bad


def test_tests_benchmarks_and_examples_import_no_private_names():
    bad = []
    for top in ("tests", "benchmarks", "examples"):
        for path in (ROOT / top).rglob("*.py"):
            for module, names, line in _imports("", path):
                if module.split(".")[0] in (*PACKAGES, "tests"):
                    bad += [f"{path.relative_to(ROOT)}:{line} {module}.{n}" for n in names
                            if n.startswith("_") and not n.startswith("__")]
    assert not bad


def test_module_and_folder_sizes():
    lines = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    long = {f"{MODULES[n].relative_to(ROOT)}": k for n, k in lines.items() if k > MAX_MODULE_LINES}
    assert set(long) <= set(LONG_MODULES), f"modules over {MAX_MODULE_LINES} lines: {long}"
    total = sum(lines.values())
    folders: dict[Path, int] = {}
    for name, k in lines.items():
        folders[MODULES[name].parent] = folders.get(MODULES[name].parent, 0) + k
    big = {str(f.relative_to(ROOT)): round(k / total, 3) for f, k in folders.items() if k > MAX_FOLDER_SHARE * total}
    assert not big, f"folders over {MAX_FOLDER_SHARE:.0%} of {total} product lines: {big}"


def test_plc_bridge_runs_without_torch_loaded():
    code = "import sys, plc_bridge.modbus, plc_bridge.zmq_bridge, plc_bridge.opcua; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_control_side_runs_without_torch_loaded():
    code = ("import sys, runtime.control.loop, runtime.control.safety, runtime.control.recorder; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
