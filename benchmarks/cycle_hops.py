"""Count the function hops of one control cycle: a PLC's register write to the register holding
the decision, Modbus server mode, with the bundled factory policy.

A profiler records every call into the project's own Python files (``sdk/``, ``runtime/``,
``plc_bridge/``) on the path: the Modbus I/O thread answering the PLC's write of the inputs,
the next control cycle from its start to its return (the loop thread and the inference
thread), and the Modbus I/O thread answering the PLC's read of the decision's registers.
Numba kernels are compiled code and do not show. Prints the hops (distinct functions) in
order with their files, the count, the files and the hops that cross a file.

    python benchmarks/cycle_hops.py [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROJECT = tuple(str(ROOT / d) + "/" for d in ("sdk", "runtime", "plc_bridge"))
SKIP = ("logging", "metrics.py")        # counters and logging are not the data path
INPUTS = ["level", "temperature", "level_sp", "temp_sp", "level_err", "temp_err", "inflow_temp",
          "valve_pos", "heater_pos", "auto"]
VALUES = [0.5, 40.0, 0.55, 42.0, 0.05, 2.0, 20.0, 0.5, 0.3, 1.0]


def deploy(folder: Path) -> Path:
    text = (ROOT / "sdk" / "demo" / "deploy.toml").read_text()
    text = text[:text.index("[modbus]")].replace('path = "model"', f'path = "{ROOT / "sdk" / "demo" / "model"}"')
    text = re.sub(r"stale_ms = \d+", "stale_ms = 2000", text)
    text += '\n[modbus]\nmode = "server"\nhost = "127.0.0.1"\nport = 0\n'
    for i, name in enumerate(INPUTS):
        text += f'[[modbus.map]]\nsignal = "{name}"\ntable = "holding"\naddress = {2 * i}\ntype = "float32"\n'
    text += '[[modbus.map]]\nsignal = "valve"\ntable = "holding"\naddress = 100\ntype = "float32"\n'
    path = folder / "deploy.toml"
    path.write_text(text)
    return path


class Tracer:
    """Calls into project files, per thread, while ``armed``."""

    def __init__(self):
        self.armed = False
        self.calls: list[tuple[str, str, str, str]] = []     # thread, caller file, callee file, function

    def __call__(self, frame, event, arg):
        if event != "call" or not self.armed:
            return
        code = frame.f_code
        path = code.co_filename
        if not path.startswith(PROJECT):
            return
        back = frame.f_back
        caller = back.f_code.co_filename if back is not None else ""
        self.calls.append((threading.current_thread().name, _short(caller), _short(path), code.co_name))


def _short(path: str) -> str:
    return path[len(str(ROOT)) + 1:] if path.startswith(str(ROOT)) else "(library)"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    from pymodbus.client import ModbusTcpClient

    from sdk.service.controller import Controller

    tracer = Tracer()
    threading.setprofile(tracer)
    with tempfile.TemporaryDirectory() as tmp:
        ctrl = Controller.from_config(deploy(Path(tmp)))
        runner = threading.Thread(target=ctrl.run, kwargs={"duration_s": 120}, daemon=True)
        runner.start()
        bridge = ctrl.bridge("modbus")
        while not bridge.health()["running"] or not bridge.port:
            time.sleep(0.05)
        client = ModbusTcpClient("127.0.0.1", port=bridge.port)
        client.connect()
        regs = []
        for v in VALUES:
            regs += client.convert_to_registers(v, client.DATATYPE.FLOAT32)
        for _ in range(100):                               # the stream runs
            client.write_registers(0, regs, device_id=1)
            time.sleep(0.02)
        cycles = ctrl.stats()["cycles"]
        while ctrl.stats()["cycles"] == cycles:            # just after a cycle: the next one is ours
            time.sleep(0.001)
        tracer.armed = True
        client.write_registers(0, regs, device_id=1)
        cycles = ctrl.stats()["cycles"]
        tracer.armed = False
        while ctrl.stats()["cycles"] < cycles + 1:
            time.sleep(0.001)
        # the one cycle after the write: trace it on its own
        done = ctrl.stats()["cycles"]
        tracer.armed = True
        while ctrl.stats()["cycles"] < done + 1:
            time.sleep(0.0005)                             # a spinning thread would starve the loop of the GIL
        tracer.armed = False
        write_calls, tracer.calls = tracer.calls, []
        tracer.armed = True
        client.read_holding_registers(100, count=2, device_id=1)
        tracer.armed = False
        ctrl.stop()
        runner.join(30)
        ctrl.close()
        client.close()
    threading.setprofile(None)
    calls = [c for c in write_calls + tracer.calls if not c[0].startswith("MainThread")]
    # keep one cycle: the loop thread's calls from its first _loop_cycle to the next
    # one cycle: the loop thread's calls from its first _loop_cycle until the outputs went out
    # (the accounting and the recording after that are not on the path), and that cycle's inference
    calls_on_path, in_cycle, seen_cycle = [], False, 0
    for c in calls:
        if c[3] == "_loop_cycle":
            seen_cycle += 1
            in_cycle = seen_cycle == 1
        if c[3] == "account_cycle":
            in_cycle = False
        if any(s in c[2] for s in SKIP):
            continue
        if c[0].startswith("modbus") or in_cycle or c[0] == "r1edge-infer" and seen_cycle == 1:
            calls_on_path.append(c)
    # a hop: a distinct function on the path (a per-signal helper called ten times is one hop)
    hops, seen = [], set()
    for c in calls_on_path:
        key = (c[2], c[3])
        if key not in seen:
            seen.add(key)
            hops.append(c)
    files = sorted({c[2] for c in hops})
    between = sum(1 for c in hops if c[1] != c[2])
    report = {"calls": len(calls_on_path), "hops": len(hops), "between_files": between, "files": files,
              "threads": sorted({c[0] for c in hops}),
              "path": [f"{c[0]}: {c[2]}:{c[3]}" for c in hops]}
    print("\n".join(report["path"]))
    print(f"calls {len(calls_on_path)}, hops (distinct functions) {len(hops)}, between files {between}, "
          f"files {len(files)}: {', '.join(files)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
