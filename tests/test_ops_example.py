"""examples/ops on a laptop: the README's commands, as written, against a copy of the folder.

The copy gets free loopback ports for OPC UA and metrics (the only change); then the README's
block runs in bash: certificates, a trusted client, a user, the feeder (an OPC UA PLC over
Basic256Sha256 SignAndEncrypt with a user name) and ``r1edge run`` for 15 s. The controller must
end healthy with the feeder's inputs, the feeder must have seen it drive the tank, and the
flight recording must replay bit for bit."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "examples" / "ops" / "README.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _laptop_block() -> str:
    text = README.read_text().split("## On a laptop", 1)[1]
    return text.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_ops_example_runs_on_a_laptop_as_documented(tmp_path):
    shutil.copytree(ROOT / "examples" / "ops", tmp_path / "examples" / "ops", symlinks=False,
                    ignore=shutil.ignore_patterns("pki", "clients", "users.toml", "recordings", "__pycache__"))
    deploy = tmp_path / "examples" / "ops" / "deploy.toml"
    text = deploy.read_text()
    assert "/opt" not in text and "/var" not in text and not re.search(r"^cpu\s*=", text, re.M)
    opcua, metrics = _free_port(), _free_port()
    text = text.replace("127.0.0.1:4840", f"127.0.0.1:{opcua}").replace("127.0.0.1:9108", f"127.0.0.1:{metrics}")
    deploy.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", _laptop_block()], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=540)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "feeder: connected" in out and "Basic256Sha256" in out, out
    statuses = re.search(r"feeder: (\d+) cycles of 20 ms, statuses (\{.*?\})", out)
    assert statuses, out
    seen = eval(statuses.group(2), {})                            # a dict of str -> int, printed by the feeder
    assert seen.get("ok", 0) > 0, out                            # the controller drove the tank
    assert "healthy" in out, out
    replay = subprocess.run([str(Path(sys.executable).parent / "r1edge"), "replay", "recordings"],
                            cwd=tmp_path / "examples" / "ops", env=env, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr
