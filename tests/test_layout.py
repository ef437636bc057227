"""The one-way import rule: sdk -> runtime, sdk -> plc_bridge; never the other way round."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"runtime": {"sdk", "plc_bridge"}, "plc_bridge": {"sdk", "runtime", "torch"}}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_upstream(package):
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package])
           for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_plc_bridge_runs_without_torch_loaded():
    code = "import sys, plc_bridge.modbus, plc_bridge.zmq_bridge; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def _module_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every absolute ``import``/``from ... import`` in ``path``,
    those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


PRODUCT = ("runtime", "sdk", "plc_bridge")


def test_no_module_imports_another_modules_private_names():
    """Across the product, tests, benchmarks and examples: what one module needs from another
    is public there (a leading underscore means "this module's own")."""
    bad = []
    for top in (*PRODUCT, "tests", "benchmarks", "examples"):
        for path in (ROOT / top).rglob("*.py"):
            for module, names in _module_imports(path):
                if module.split(".")[0] in (*PRODUCT, "tests") and module != _module_name(path):
                    bad += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in names
                            if n.startswith("_") and not n.startswith("__")]
    assert not bad


@pytest.mark.parametrize("package", ["runtime", "sdk/tools"])
def test_no_import_circles(package):
    """No module of ``package`` reaches itself again through the modules it imports (imports
    inside functions count: they are the same dependency, only deferred)."""
    modules = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for module, names in _module_imports(path):
            for target in [module] + [f"{module}.{n}" for n in names]:
                if target in modules and target != name:
                    deps.add(target)
        graph[name] = deps
    circles = []

    def visit(node, trail):
        for nxt in sorted(graph[node]):
            if nxt == trail[0]:
                circles.append(" -> ".join(trail + [nxt]))
            elif nxt not in trail and nxt > trail[0]:
                visit(nxt, trail + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not circles
