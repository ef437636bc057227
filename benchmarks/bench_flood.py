"""Floods beside the control loop: what a flooding peer costs the loop, with and without it,
in one run.

One function per kind of flood (``FLOODS``); each returns its runs side by side, each run
with the loop's ``cycles``, ``deadline_misses``, ``skipped_ticks`` and ``failsafe_cycles``
(counted after a warm-up, so start-up is not charged to the flood) and what the flood got.

Modbus (:func:`flood_modbus`): the demo deployment (``sdk/demo/deploy.toml``: its model,
50 Hz loop, inputs and outputs) with the Modbus bridge in server mode. A PLC process feeds
the heated tank (``sdk.demo.plant.Plant``, stepped with the decisions it reads back) every
period and keeps the heartbeat. Runs: ``baseline`` (the PLC alone); ``flood`` (a second
client in its own process pipelines well-formed reads of the output registers as fast as the
bridge answers them, with the bridge's default per-connection budget,
``[modbus] max_request_rate = 1000``); ``flood_unlimited`` (the same with the budget lifted
to 1,000,000/s, to show what the budget buys). Flooder and PLC are separate processes, so
only the bridge competes with the loop for the controller's GIL and cores.

ZeroMQ (:func:`flood_zmq`): the same model and loop with the ZeroMQ bridge. A feeder process
sends the stream ``main`` one valid frame a period; a flood process sends garbage sensor
frames (undecodable bytes, wrong schema, an unknown signal, a list) as fast as one publisher
can. Runs: ``baseline`` (the feeder alone); ``flood`` (with the bridge's default receive
budget, ``[zmq] max_frames_per_s = 10000``); ``flood_unlimited`` (the budget lifted to
10,000,000/s). ``flood/s`` is the frames the bridge took and refused a second; ``throttled``
the 10 ms windows whose budget ran out. The feeder's frames the bridge accepted are in
``good_frames``: a flood must not drown them.

Usage: ``.venv/bin/python benchmarks/bench_flood.py [--seconds 20] [--floods modbus,zmq] [--json OUT]``
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "sdk" / "demo"
PERIOD_S = 0.02
INPUT_NAMES = ("level", "temperature", "level_sp", "temp_sp", "level_err", "temp_err", "inflow_temp",
               "valve_pos", "heater_pos")
OUTPUT_ADDRESS, HEARTBEAT_ADDRESS = 40, 100


# ------------------------------------------------------------------------------------- Modbus
def demo_server_config(folder: Path, max_request_rate: float) -> Path:
    """The demo deployment with its ``[modbus]`` section replaced by a server-mode one (inputs in
    holding registers 0.., ``auto`` at coil 0, valve and heater at holding 40 and 42)."""
    text = (DEMO / "deploy.toml").read_text()
    text = text[:text.index("\n[modbus]")].replace('path = "model"', f'path = "{DEMO / "model"}"')
    lines = ["", "[modbus]", 'mode = "server"', 'host = "127.0.0.1"', "port = 0",
             f"max_request_rate = {max_request_rate:g}",
             f"heartbeat = {{ address = {HEARTBEAT_ADDRESS}, timeout_ms = 500 }}"]
    entries = [(name, "holding", 2 * i) for i, name in enumerate(INPUT_NAMES)]
    entries += [("valve", "holding", OUTPUT_ADDRESS), ("heater", "holding", OUTPUT_ADDRESS + 2)]
    for name, table, address in entries:
        lines += ["", "[[modbus.map]]", f'signal = "{name}"', f'table = "{table}"', f"address = {address}",
                  'type = "float32"']
    lines += ["", "[[modbus.map]]", 'signal = "auto"', 'table = "coil"', "address = 0", ""]
    path = folder / "deploy.toml"
    path.write_text(text + "\n".join(lines))
    return path


def _exchange(sock: socket.socket, tid: int, pdu: bytes) -> bytes:
    sock.sendall(struct.pack(">HHHB", tid & 0xFFFF, 0, len(pdu) + 1, 1) + pdu)
    head = _recv(sock, 7)
    return _recv(sock, struct.unpack(">HHHB", head)[2] - 1)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def plc_process(port: int, seconds: float, seed: int = 0) -> None:
    """The PLC: every 20 ms, step the tank with the decisions read back, write the measurements
    and a new heartbeat (separate process; raw MBAP over a socket)."""
    sys.path.insert(0, str(ROOT))
    from sdk.demo.plant import Plant

    plant = Plant(seed)
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        _feed(sock, plant, seconds)
    except OSError:                                                       # the bridge stopped
        pass
    sock.close()


def _feed(sock: socket.socket, plant, seconds: float) -> None:
    _exchange(sock, 0, struct.pack(">BHH", 5, 0, 0xFF00))                # auto
    valve = heater = 0.0
    tick, t_end = 0, time.monotonic() + seconds
    next_t = time.monotonic()
    while time.monotonic() < t_end:
        plant.step(PERIOD_S, valve, heater)
        meas = plant.measure()
        words = struct.pack(">9f", *(meas[n] for n in INPUT_NAMES))
        _exchange(sock, tick, struct.pack(">BHHB", 16, 0, 18, 36) + words)
        _exchange(sock, tick, struct.pack(">BHH", 6, HEARTBEAT_ADDRESS, tick & 0xFFFF))
        reply = _exchange(sock, tick, struct.pack(">BHH", 3, OUTPUT_ADDRESS, 4))
        if reply[0] == 3:
            valve, heater = struct.unpack(">2f", reply[2:10])
        tick += 1
        next_t += PERIOD_S
        time.sleep(max(next_t - time.monotonic(), 0.0))


def modbus_flooder_process(port: int, seconds: float, counts) -> None:
    """A second client: pipelined reads of the output registers, 64 per send, as fast as they
    are answered; ``counts[0]`` = answers received."""
    request = b"".join(struct.pack(">HHHBBHH", i, 0, 6, 1, 3, OUTPUT_ADDRESS, 4) for i in range(64))
    answer_size = 64 * (7 + 2 + 8)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end:
            sock.sendall(request)
            _recv(sock, answer_size)
            counts[0] += 64
    except OSError:
        pass
    sock.close()


@contextlib.contextmanager
def _running(config: Path):
    """``(controller, processes)``: the controller built from ``config`` runs its loop in a
    thread; on exit every process started into the list is killed, the loop stopped and the
    controller closed."""
    from sdk.service.controller import Controller

    ctrl = Controller.from_config(config)
    runner = threading.Thread(target=ctrl.run, daemon=True)
    runner.start()
    procs: list = []
    try:
        yield ctrl, procs
    finally:
        for proc in procs:
            proc.kill()
            proc.join(10)
        ctrl.stop()
        runner.join(30)
        ctrl.close()


def _start(procs: list, ctx, target, *args) -> None:
    """Start ``target(*args)`` in a daemon process of ``ctx`` kept in ``procs``."""
    procs.append(ctx.Process(target=target, args=args, daemon=True))
    procs[-1].start()


def _run_modbus(max_request_rate: float, seconds: float, warmup_s: float, flood: bool) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        with _running(demo_server_config(Path(tmp), max_request_rate)) as (ctrl, procs):
            bridge = ctrl.bridge("modbus")
            _wait(lambda: bridge.health()["running"] and bridge.port, "the Modbus server")
            _start(procs, ctx, plc_process, bridge.port, 3600.0)
            _wait(lambda: bridge.health()["heartbeat_ok"], "the PLC's heartbeat")
            counts = ctx.Array("q", 1)
            if flood:
                _start(procs, ctx, modbus_flooder_process, bridge.port, 3600.0, counts)
                _wait(lambda: counts[0] > 0, "the flood's first answers")
            time.sleep(warmup_s)
            before, answered = ctrl.stats(), counts[0]
            time.sleep(seconds)
            after, answered = ctrl.stats(), counts[0] - answered
    out = loop_delta(before, after)
    out["flood_answers_per_s"] = round(answered / seconds)
    out["bridge_throttled"] = after["bridges"]["modbus"]["throttled"] - before["bridges"]["modbus"]["throttled"]
    return out


def loop_delta(before: dict, after: dict) -> dict:
    """The loop's figures between two ``Controller.stats()`` snapshots: cycles, misses, skipped
    ticks and fail-safe cycles (with their reasons) counted in between, and the latency after."""
    out = {k: after[k] - before[k] for k in ("cycles", "deadline_misses", "skipped_ticks", "failsafe_cycles")}
    out["failsafe_by_reason"] = {k: v - before["failsafe_cycles_by_reason"].get(k, 0)
                                 for k, v in after["failsafe_cycles_by_reason"].items()
                                 if v - before["failsafe_cycles_by_reason"].get(k, 0)}
    out["latency_us"] = {k: after["latency_us"].get(k) for k in ("p50", "p99", "max")}
    return out


def _wait(ready, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no sign of {what} within {timeout_s:g} s")
        time.sleep(0.01)


def flood_modbus(seconds: float, warmup_s: float = 3.0) -> dict:
    """The Modbus flood: ``baseline``, ``flood`` (default budget), ``flood_unlimited``."""
    return {"baseline": _run_modbus(1000, seconds, warmup_s, flood=False),
            "flood": _run_modbus(1000, seconds, warmup_s, flood=True),
            "flood_unlimited": _run_modbus(1e6, seconds, warmup_s, flood=True)}


# --------------------------------------------------------------------------------------- ZeroMQ
GOOD = {"level": 0.5, "temperature": 40.0, "level_sp": 0.55, "temp_sp": 42.0, "level_err": 0.05,
        "temp_err": 2.0, "inflow_temp": 20.0, "valve_pos": 0.5, "heater_pos": 0.3, "auto": 1.0}


def zmq_feeder_process(endpoint: str, period_s: float) -> None:
    """One valid frame for ``main`` each period."""
    sys.path.insert(0, str(ROOT))
    from plc_bridge.zmq_clients import SensorPublisher

    with SensorPublisher(endpoint) as pub:
        pub.wait_ready(10)
        seq, nxt = 0, time.monotonic()
        while True:
            pub.send("main", seq, GOOD)
            seq += 1
            nxt += period_s
            time.sleep(max(0.0, nxt - time.monotonic()))


def zmq_flooder_process(endpoint: str) -> None:
    """Garbage sensor frames at a publisher's full speed (dropped at the high-water mark when
    the bridge does not take them)."""
    sys.path.insert(0, str(ROOT))
    import msgpack

    from plc_bridge.zmq_clients import SensorPublisher

    junk = [os.urandom(48), b"\xc1" * 16, msgpack.packb({"v": 1, "stream": "main", "seq": "x"}),
            msgpack.packb({"v": 1, "stream": "flood", "seq": 1, "t_ns": 1, "values": {"nope": 1.0}}),
            msgpack.packb([1, 2, 3])]
    with SensorPublisher(endpoint, hwm=100_000) as pub:
        pub.wait_ready(10)
        while True:
            for data in junk:
                pub.send_bytes(data)


def demo_zmq_config(folder: Path, max_frames_per_s: int) -> Path:
    """The demo deployment with its ``[modbus]`` section replaced by a ``[zmq]`` one."""
    text = (DEMO / "deploy.toml").read_text()
    text = text[:text.index("\n[modbus]")].replace('path = "model"', f'path = "{DEMO / "model"}"')
    text += ('\n[zmq]\nsensors = "tcp://127.0.0.1:*"\ndecisions = "tcp://127.0.0.1:*"\n'
             f'control = "tcp://127.0.0.1:*"\nmax_frames_per_s = {max_frames_per_s}\n')
    path = folder / "deploy.toml"
    path.write_text(text)
    return path


def _run_zmq(max_frames_per_s: int, seconds: float, warmup_s: float, flood: bool) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        with _running(demo_zmq_config(Path(tmp), max_frames_per_s)) as (ctrl, procs):
            bridge = ctrl.bridge("zmq")
            _wait(lambda: len(bridge.endpoints) == 3, "the ZeroMQ bridge")
            endpoint = bridge.endpoints["sensors"]
            _start(procs, ctx, zmq_feeder_process, endpoint, PERIOD_S)
            _wait(lambda: "main" in ctrl.slots and ctrl.status()["status"] == "ok", "the stream main")
            if flood:
                _start(procs, ctx, zmq_flooder_process, endpoint)
                _wait(lambda: sum(bridge.health()["bad"].values()) > 0, "the flood's first frames")
            time.sleep(warmup_s)
            before, h0 = ctrl.stats(), bridge.health()
            time.sleep(seconds)
            after, h1 = ctrl.stats(), bridge.health()
    out = loop_delta(before, after)
    out["flood_answers_per_s"] = round((sum(h1["bad"].values()) - sum(h0["bad"].values())) / seconds)
    out["good_frames"] = h1["frames"] - h0["frames"]
    out["bridge_throttled"] = h1["throttled_windows"] - h0["throttled_windows"]
    return out


def flood_zmq(seconds: float, warmup_s: float = 3.0) -> dict:
    """The ZeroMQ flood: ``baseline``, ``flood`` (default budget), ``flood_unlimited``."""
    return {"baseline": _run_zmq(10_000, seconds, warmup_s, flood=False),
            "flood": _run_zmq(10_000, seconds, warmup_s, flood=True),
            "flood_unlimited": _run_zmq(10_000_000, seconds, warmup_s, flood=True)}


FLOODS = {"modbus": flood_modbus, "zmq": flood_zmq}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run (default 20)")
    ap.add_argument("--floods", default=",".join(FLOODS), help=f"comma-separated, of: {', '.join(FLOODS)}")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    report = {"load_avg_start": os.getloadavg(), "seconds": args.seconds, "floods": {}}
    for name in args.floods.split(","):
        report["floods"][name] = FLOODS[name](args.seconds)
    report["load_avg_end"] = os.getloadavg()
    print(f"load average at start {report['load_avg_start'][0]:.2f}, at end {report['load_avg_end'][0]:.2f}")
    for name, runs in report["floods"].items():
        print(f"\n{name}: {'run':<16}{'cycles':>8}{'misses':>8}{'skipped':>9}{'failsafe':>9}{'p99 us':>9}"
              f"{'flood/s':>10}{'throttled':>10}")
        for run, r in runs.items():
            print(f"{'':<{len(name) + 2}}{run:<16}{r['cycles']:>8}{r['deadline_misses']:>8}{r['skipped_ticks']:>9}"
                  f"{r['failsafe_cycles']:>9}{r['latency_us']['p99'] or 0:>9.0f}{r['flood_answers_per_s']:>10}"
                  f"{r['bridge_throttled']:>10}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
