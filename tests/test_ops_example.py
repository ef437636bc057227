"""examples/ops on a laptop: the README's commands, as written, against a copy of the folder.

The copy gets free loopback ports for OPC UA and metrics (the only change); then the README's
block runs in bash: certificates, a trusted client, a user, the feeder (an OPC UA PLC over
Basic256Sha256 SignAndEncrypt with a user name) and ``r1edge run`` for 15 s. The controller must
end healthy with the feeder's inputs, the feeder must have seen it drive the tank, and the
flight recording must replay bit for bit."""
from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
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
    seen = ast.literal_eval(statuses.group(2))                   # a dict of str -> int, printed by the feeder
    assert seen.get("ok", 0) > 0, out                            # the controller drove the tank
    assert "healthy" in out, out
    replay = subprocess.run([str(Path(sys.executable).parent / "r1edge"), "replay", "recordings"],
                            cwd=tmp_path / "examples" / "ops", env=env, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr


def _locked_down_block() -> str:
    text = README.read_text().split("## Locked down", 1)[1]
    return text.split("```bash\n", 1)[1].split("```", 1)[0]


INPUTS = [0.5, 40.0, 0.5, 40.0, 0.0, 0.0, 15.0]      # level, temperature, their setpoints and errors, inflow


def _plc(port: int, tls: Path, stop: threading.Event, seen: dict) -> None:
    """A PLC over Modbus/TCP Security (Python's ssl, frames packed by hand): writes the inputs
    and the heartbeat every 20 ms and reads the decisions; after 50 reads, a viewer reads and
    tries a write, once."""
    from tests.test_modbus_tls import request

    def connect(name: str):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(tls / "ca.pem")
        ctx.load_cert_chain(tls / f"{name}.pem", tls / f"{name}.key")
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost")

    sock, tid, beat = None, 0, 0
    while not stop.is_set():
        try:
            if sock is None:
                sock = connect("plc")
            tid, beat = (tid + 1) % 65536, (beat + 1) % 65536
            values = struct.pack(">7f", *INPUTS)
            seen["writes"].append(request(sock, tid, struct.pack(">BHHB", 16, 0, 14, 28) + values))
            request(sock, tid, struct.pack(">BHH", 6, 100, beat))
            seen["reads"].append(request(sock, tid, struct.pack(">BHH", 4, 0, 4)))
            if len(seen["reads"]) == 50:
                with connect("hmi") as viewer:
                    seen["viewer_read"] = request(viewer, 1, struct.pack(">BHH", 4, 0, 4))
                    seen["viewer_write"] = request(viewer, 2, struct.pack(">BHHB", 16, 0, 2, 4)
                                                   + struct.pack(">f", 0.9))
        except OSError:
            sock = None                                   # the controller is not listening yet
        time.sleep(0.02)
    if sock is not None:
        sock.close()


def test_the_locked_down_deployment_runs_as_documented(tmp_path):
    """The README's "Locked down" block, as written (free ports, a 12 s run), with a TLS PLC
    holding the operator's certificate: the signed package loads, the run ends healthy with
    decisions the PLC read, a viewer reads and its write gets exception 01; a changed package
    is then refused (exit 2)."""
    shutil.copytree(ROOT / "examples" / "ops", tmp_path / "examples" / "ops", symlinks=False,
                    ignore=shutil.ignore_patterns("pki", "clients", "users.toml", "recordings", "__pycache__",
                                                  "signed-model", "keys", "tls", "zmq", "zmq-clients"))
    ops = tmp_path / "examples" / "ops"
    deploy = ops / "locked-down.toml"
    text = deploy.read_text()
    ports = {old: _free_port() for old in ("8802", "5556", "5557", "5558", "4840", "9108")}
    for old, new in ports.items():
        text = re.sub(rf"(127\.0\.0\.1:|port = ){old}\b", rf"\g<1>{new}", text)
    deploy.write_text(text)
    block = _locked_down_block().replace("--duration 30", "--duration 12")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    stop, seen = threading.Event(), {"writes": [], "reads": []}
    plc = threading.Thread(target=_plc, args=(ports["8802"], ops / "tls", stop, seen), daemon=True)
    plc.start()
    try:
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=540)
    finally:
        stop.set()
        plc.join(30)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "healthy" in out, out
    assert seen["writes"] and all(w[0] == 16 for w in seen["writes"]), out
    decisions = [struct.unpack(">2f", r[2:10]) for r in seen["reads"] if r[0] == 4]
    assert any(d != (0.0, 0.0) for d in decisions), out               # the model drove the outputs
    assert seen["viewer_read"][0] == 4
    assert seen["viewer_write"] == bytes([0x90, 0x01])                 # illegal function: not the viewer's to write
    (ops / "signed-model" / "manifest.json").write_text((ops / "signed-model" / "manifest.json").read_text() + " ")
    refused = subprocess.run(["r1edge", "run", "locked-down.toml", "--duration", "1"], cwd=ops, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "signed-model" in refused.stdout + refused.stderr
