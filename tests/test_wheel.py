"""The wheel: built from the checkout and installed into a fresh virtual environment.

Proves: the wheel holds the three packages and the demo's files (plant, expert,
``deploy.toml`` and the sealed model package) and nothing else; installed on its own, away
from any source tree, ``r1edge inspect`` reads the bundled model from the package data and
``r1edge demo`` runs and passes.

Offline: the wheel is built without build isolation, and the fresh environment gets it with
``--no-deps`` and sees the test environment's packages through a path line in a ``.pth``
file. Such a line only adds the directory to ``sys.path``; the ``.pth`` files in it (among
them the editable install of r1edge) are not processed, so ``sdk`` comes from the wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "sdk", "runtime", "plc_bridge")   # what the build reads


def _run(*cmd, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` with no PYTHONPATH; fails the test, showing its output, unless it exits 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the checkout's sources (no build/ left in the checkout)."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", tmp / "dist",
         src, cwd=tmp, timeout=300)
    (path,) = (tmp / "dist").glob("r1edge-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> dict[str, Path]:
    """A fresh virtual environment with the wheel installed: its ``python``, ``r1edge`` and ``site``."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root.parent, timeout=120)
    python = root / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                     cwd=root, timeout=60).stdout.strip())
    (site / "test-env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel,
         cwd=root, timeout=300)
    return {"python": python, "r1edge": root / "bin" / "r1edge", "site": site}


def test_the_wheel_holds_the_packages_and_the_demo_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"sdk", "runtime", "plc_bridge", "r1edge-0.1.0.dist-info"}
    model = ROOT / "sdk" / "demo" / "model"
    shipped = {f"sdk/demo/{f}" for f in ("__init__.py", "plant.py", "expert.py", "deploy.toml")}
    shipped |= {f"sdk/demo/model/{f.name}" for f in model.iterdir()}
    assert shipped <= names, sorted(shipped - names)


def test_installed_packages_come_from_the_wheel(venv, tmp_path):
    code = "import json, sdk, runtime, plc_bridge; print(json.dumps([m.__file__ for m in (sdk, runtime, plc_bridge)]))"
    files = json.loads(_run(venv["python"], "-c", code, cwd=tmp_path, timeout=120).stdout)
    assert all(Path(f).is_relative_to(venv["site"]) for f in files), files


def test_installed_r1edge_inspects_the_bundled_model(venv, tmp_path):
    model = venv["site"] / "sdk" / "demo" / "model"
    report = json.loads(_run(venv["r1edge"], "inspect", model, "--json", cwd=tmp_path, timeout=120).stdout)
    assert report["quant"] == "w8a8-int8" and report["experts_per_layer"] == [4, 4]
    assert report["io"]["outputs"] == ["valve", "heater"]


def test_installed_r1edge_demo_passes_outside_the_source_tree(venv, tmp_path):
    # 8 s on seed 1, as in test_demo: shorter runs score little beyond the start-up ramp
    res = _run(venv["r1edge"], "demo", "--duration", "8", "--seed", "1", "--out", tmp_path / "demo", "--json",
               cwd=tmp_path, timeout=300)
    summary = json.loads(res.stdout)
    assert summary["ok"], summary["checks"]
    assert Path(summary["package"]).is_relative_to(venv["site"])
