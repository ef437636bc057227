"""The command line's own surface: ``--version``, clean ``--help`` text, and commands that need no
model starting without torch.

Each command runs in a fresh interpreter through ``sdk.cli.main`` (what the ``r1edge`` console
script calls), which then reports whether ``torch`` (or Numba) was ever imported.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs `r1edge ARGS...` in-process, then prints the heavy modules that were imported as JSON on the
# last line of stdout (stderr keeps the command's own errors).
WRAPPER = """
import contextlib, io, json, sys
from sdk.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        rc = main(sys.argv[1:])
    except SystemExit as exc:
        rc = exc.code
print(out.getvalue())
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "numba", "transformers") if m in sys.modules)}))
"""


def _cli(*args: str, stdin: str = "") -> tuple[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", WRAPPER, *args], input=stdin, capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    *out, last = res.stdout.rstrip("\n").split("\n")
    return "\n".join(out), json.loads(last)


@pytest.mark.parametrize("args", [
    ["--help"],
    ["plan", "deepseek-r1", "--json"],
    ["plan", "deepseek-r1", "--devices", "8", "--gpu-mem-gb", "141"],
    ["plan", "examples/factory_loop/model", "--json"],
    ["keys", "{tmp}/keys"],
    ["opcua-user", "{tmp}/users.toml", "operator", "--password-stdin"],
    ["opcua-user", "--help"],
    ["opcua-cert", "{tmp}/pki"],
    ["modbus-cert", "{tmp}/mpki", "--server", "localhost", "--client", "scada=operator"],
], ids=["help", "plan", "plan-devices", "plan-package", "keys", "opcua-user", "opcua-user-help", "opcua-cert",
        "modbus-cert"])
def test_commands_that_need_no_model_do_not_import_torch(args, tmp_path):
    out, info = _cli(*(a.format(tmp=tmp_path) for a in args), stdin="a long enough password\n")
    assert info["rc"] == 0, out
    assert info["heavy"] == [], f"r1edge {' '.join(args)} imported {info['heavy']}"
    if args[:2] == ["plan", "deepseek-r1"] and "--json" in args:
        report = json.loads(out)
        assert report["params_total"] > 600e9 and report["fits"] is False      # real R1 on one 80 GB GPU
    if args[:2] == ["plan", "examples/factory_loop/model"]:
        assert json.loads(out)["fits"] is True                                 # a package: its own config
    if args[0] == "keys":
        assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["server.key", "server.key_secret"]
    if args[:1] == ["opcua-user"] and "--help" not in args:
        assert 'operator' in (tmp_path / "users.toml").read_text()


def test_plan_of_the_cpu_engine_needs_no_torch():
    """Sizing the CPU engine reads its buffer shapes and int8 layout (Numba modules), never torch."""
    out, info = _cli("plan", "examples/factory_loop/model", "--engine", "cpu", "--json")
    assert info["rc"] == 0 and "torch" not in info["heavy"], info
    assert json.loads(out)["fits"] is True


def test_import_sdk_is_lazy_and_public_names_resolve():
    """``import sdk`` alone loads no torch; each public name still resolves to the real object."""
    code = ("import sys, sdk; before = 'torch' in sys.modules\n"
            "from sdk.tools.compress import compress\n"
            "from sdk.service.controller import Controller\n"
            "from sdk.tools.loading import load_model\n"
            "from sdk.tools.text import TextGenerator, load_tokenizer\n"
            "assert sdk.compress is compress and sdk.Controller is Controller and sdk.load_model is load_model\n"
            "assert sdk.TextGenerator is TextGenerator and sdk.load_tokenizer is load_tokenizer\n"
            "assert callable(sdk.demo.run_demo) and set(sdk.__all__) <= set(dir(sdk))\n"
            "try:\n    sdk.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n"
            "print(before)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    res = subprocess.run([sys.executable, "-m", "sdk.cli", "--version"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert res.returncode == 0
    assert res.stdout.strip() == f"r1edge {version('r1edge')}"


def test_help_text_has_no_rest_markup():
    """Every command's ``--help`` reads as plain text: no reST literals, roles or references."""
    from sdk.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a.choices, dict))       # the subcommands
    texts = {"r1edge": parser.format_help()}
    texts.update({f"r1edge {name}": p.format_help() for name, p in sub.choices.items()})
    assert len(texts) >= 14
    for name, text in texts.items():
        assert not re.search(r"``|:(func|class|meth|mod|attr):`", text), f"{name} --help:\n{text}"


def test_progress_says_the_stage_and_its_seconds_while_the_body_runs(caplog):
    """A silent stage (Numba compiling on a first run) logs its name and elapsed seconds every
    ``every_s``; the clock is injected, so the seconds are exact."""
    import itertools
    import logging
    import threading

    from sdk.service.engines import progress

    ticks = itertools.count(0.0, 5.0)               # t0 = 0, then 5, 10, 15 ... one per beat
    log = logging.getLogger("test.progress")
    three = threading.Event()

    class Count(logging.Handler):
        def emit(self, record):
            if sum(r.getMessage().startswith("engine: building ...") for r in caplog.records) >= 3:
                three.set()
    log.addHandler(Count())
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with progress("engine: building", every_s=0.01, log=log, clock=lambda: next(ticks)):
            assert three.wait(30)
        n = len(caplog.records)
        time.sleep(0.05)
        assert len(caplog.records) == n                       # silent once the body is done
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["engine: building ... 5 s", "engine: building ... 10 s", "engine: building ... 15 s"]


def test_engine_build_reports_its_stage_while_it_builds(caplog):
    """``build_engine_logged`` (what ``r1edge run`` and ``r1edge demo`` build the engine with)
    says what it starts, reports progress while it builds, and says when it is ready."""
    import logging

    from sdk.service.config import DeployConfig
    from sdk.service.engines import build_engine_logged

    cfg = DeployConfig.load(ROOT / "examples" / "factory_loop" / "deploy.toml")
    with caplog.at_level(logging.INFO, logger="sdk.service.engines"):
        engine = build_engine_logged(cfg.model.path, cfg, 1, "", every_s=0.001)
    lines = [r.getMessage() for r in caplog.records if r.name == "sdk.service.engines"]
    assert lines[0].startswith("engine: loading") and lines[-1].startswith("engine ready in")
    beats = [line for line in lines if re.fullmatch(r"engine: building \.\.\. \d+ s", line)]
    assert beats, lines
    assert engine.output_names == [o.name for o in cfg.outputs]

