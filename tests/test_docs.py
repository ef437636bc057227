"""The documentation: the MkDocs site builds with ``--strict`` (a broken link, a missing page or a
page left out of the nav fails), the README stays a front door, and every command shown in a
fenced block is either run by a test (named below, and the test must exist) or marked
``# illustrative``."""
from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").glob("*/README.md"))]

# Each command shown in the docs (as written, less a leading ".venv/bin/" and a trailing comment)
# -> the test that runs it ("file::function"; a file alone for CI's own entry point).
TESTED = {
    "bash scripts/bootstrap.sh && python -m pytest": ".ci/run",
    "bash scripts/bootstrap.sh && r1edge demo": "tests/test_wheel.py::test_installed_r1edge_demo_passes_outside_the_source_tree",
    "r1edge plan deepseek-r1 --devices 8 --gpu-mem-gb 141 --quant int8":
        "tests/test_plan.py::test_readme_shows_what_the_planner_prints",
    "r1edge plan deepseek-r1 --devices 8 --gpu-mem-gb 80 --quant int8":
        "tests/test_plan.py::test_readme_shows_what_the_planner_prints",
    "r1edge generate examples/advisor/model --chat --schema examples/advisor/decision.json --max-think-tokens 64 "
    "--max-new-tokens 112 --window 512 --prompt \"level 0.41 m, spread 0.010, setpoint 0.41, error +0.00; valve 0.61, "
    "+10% over a sound tank; temperature 48.7 C, setpoint 48.7, error +0.0; heater 0.49, +0% over a sound element; "
    "inflow 12.0 C.\"":
        "tests/test_docs.py::test_generate_with_a_schema_file_as_documented",
    "python -m examples.sensor_stream.run": "tests/test_examples.py::test_sensor_stream_detects_injected_faults",
    "python -m examples.perception_hook.hook": "tests/test_examples.py::test_perception_hook_runs_as_documented",
    "cd examples/ops": "tests/test_ops_example.py::test_the_ops_example_runs_on_a_laptop_as_documented",
    "r1edge opcua-cert pki": "tests/test_ops_example.py::test_the_ops_example_runs_on_a_laptop_as_documented",
    "r1edge opcua-cert clients --name feeder --client && mkdir -p pki/trusted && cp clients/feeder.der pki/trusted/":
        "tests/test_ops_example.py::test_the_ops_example_runs_on_a_laptop_as_documented",
    "printf 'operator-password\\n' | r1edge opcua-user users.toml operator --password-stdin":
        "tests/test_ops_example.py::test_the_ops_example_runs_on_a_laptop_as_documented",
    "python feeder.py --seconds 20 &": "tests/test_ops_example.py::test_the_ops_example_runs_on_a_laptop_as_documented",
    "r1edge run deploy.toml --duration 15": "tests/test_ops_example.py::test_the_ops_example_runs_on_a_laptop_as_documented",
    "wait": "tests/test_ops_example.py::test_the_ops_example_runs_on_a_laptop_as_documented",
    'rm -rf signed-model && cp -rL model signed-model':
        "tests/test_ops_example.py::test_the_locked_down_deployment_runs_as_documented",
    'r1edge keys keys --signing --name release':
        "tests/test_ops_example.py::test_the_locked_down_deployment_runs_as_documented",
    'r1edge sign signed-model --key keys/release.pem --identity "release 2026-12"':
        "tests/test_ops_example.py::test_the_locked_down_deployment_runs_as_documented",
    'r1edge modbus-cert tls --server localhost,127.0.0.1 --client plc=operator --client hmi=viewer':
        "tests/test_ops_example.py::test_the_locked_down_deployment_runs_as_documented",
    'r1edge keys zmq && r1edge keys zmq-clients --name console && mkdir -p zmq/allowed && cp zmq-clients/console.key zmq/allowed/':
        "tests/test_ops_example.py::test_the_locked_down_deployment_runs_as_documented",
    'r1edge opcua-cert pki && r1edge opcua-cert clients --name scada --client && mkdir -p pki/trusted && cp clients/scada.der pki/trusted/':
        "tests/test_ops_example.py::test_the_locked_down_deployment_runs_as_documented",
    "printf 'scada-password\\n' | r1edge opcua-user users.toml scada --role viewer --password-stdin":
        "tests/test_ops_example.py::test_the_locked_down_deployment_runs_as_documented",
    'r1edge run locked-down.toml --duration 30':
        "tests/test_ops_example.py::test_the_locked_down_deployment_runs_as_documented",
}
SHELL = ("bash", "sh", "shell", "console")


def _blocks(path: Path):
    """(language, body lines) of every fenced block of a page."""
    lines, out, lang, body = path.read_text().split("\n"), [], None, []
    for line in lines:
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                out.append((lang, body))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path}: a fenced block is not closed"
    return out


def _commands(lang: str, body: list[str]) -> list[str]:
    """The commands of a shell block: one per line (continuations joined), comments dropped."""
    text = "\n".join(body).replace("\\\n", " ")
    cmds = []
    for line in text.split("\n"):
        if lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            cmds.append(re.sub(r"(^|&& )\.venv/bin/", r"\1", re.sub(r"\s+", " ", line)))
    return cmds


def shown_commands():
    """Every command of every shell block that is not marked illustrative: (page, command)."""
    for page in PAGES:
        for lang, body in _blocks(page):
            assert lang, f"{page.relative_to(ROOT)}: a fenced block without a language"
            if lang in SHELL and not (body and body[0].startswith("# illustrative")):
                for cmd in _commands(lang, body):
                    yield page.relative_to(ROOT), cmd


def _defined(test_id: str) -> bool:
    path, _, func = test_id.partition("::")
    if not func:
        return (ROOT / path).is_file()
    tree = ast.parse((ROOT / path).read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body)


def test_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link or anchor, a missing page, a nav entry without its
    file, a page outside the nav or a failed API reference fails the build."""
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout + res.stderr
    site = tmp_path / "site"
    assert (site / "index.html").is_file() and (site / "architecture" / "index.html").is_file()
    api = (site / "api" / "controller" / "index.html").read_text()
    assert "from_config" in api and "stats" in api                      # generated from the docstrings


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 400
    for cmd in ("bash scripts/bootstrap.sh && .venv/bin/r1edge demo",
                "bash scripts/bootstrap.sh && .venv/bin/python -m pytest"):
        assert f"```bash\n{cmd}\n```" in readme
    assert "bash scripts/bootstrap.sh && .venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        assert target.startswith("http") or (ROOT / target).exists(), f"README links to a missing {target}"
    assert "docs/security/" in readme and "(docs/demo.png)" in readme


def test_each_example_has_its_readme_on_the_site():
    for example in sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir() and not p.name.startswith("_")):
        if example.name == "__pycache__":
            continue
        readme = example / "README.md"
        assert readme.is_file(), f"{example.name} has no README.md"
        slug = example.name.replace("_", "-")
        page = ROOT / "docs" / "examples" / f"{slug}.md"
        assert f'--8<-- "examples/{example.name}/README.md"' in page.read_text()


def test_every_command_shown_is_run_by_a_test_or_marked_illustrative():
    for test_id in set(TESTED.values()):
        assert _defined(test_id), f"{test_id}: no such test"
    untested = sorted({f"{page}: {cmd}" for page, cmd in shown_commands() if cmd not in TESTED})
    assert not untested, "commands shown in the docs that no test runs (mark them # illustrative):\n" + \
        "\n".join(untested)


def test_generate_with_a_schema_file_as_documented(capsys):
    """The text-generation page's command, as written, answers a decision within its schema."""
    from sdk.cli import main

    page = ROOT / "docs" / "models" / "text-generation.md"
    cmd = next(c for p, c in shown_commands() if p == page.relative_to(ROOT) and c.startswith("r1edge generate"))
    args = shlex.split(cmd)[1:]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        assert main(args) == 0                                   # the answer finished
    out = capsys.readouterr().out
    decision = json.loads(out.split("decision: ", 1)[1].splitlines()[0])
    schema = json.loads((ROOT / "examples" / "advisor" / "decision.json").read_text())["properties"]
    assert set(decision) == set(schema)
    assert decision["diagnosis"] in schema["diagnosis"]["enum"]
    for name in ("level_sp", "temp_sp"):
        spec = schema[name]
        assert spec["minimum"] <= decision[name] <= spec["maximum"]
        assert abs(decision[name] / spec["multipleOf"] - round(decision[name] / spec["multipleOf"])) < 1e-6
    shown = page.read_text().split("decision: ", 1)[1].splitlines()[0]
    assert json.loads(shown) == decision                          # what the page prints is what it prints
