"""ZeroMQ flood beside a good stream: does the loop stay on time?

The bundled factory policy runs at its 50 Hz with a ``[zmq]`` bridge. A feeder process sends
the stream ``main`` one valid frame a period; a flood process sends garbage sensor frames
(undecodable, wrong schema, unknown streams) as fast as one ZeroMQ publisher can. The same run
has two phases of ``--seconds`` each, without and with the flood, and reports per phase the
cycles, deadline misses, skipped ticks, the cycles in which ``main`` failed safe, the frames
accepted and refused by the bridge, and the flood's send rate. The target: misses, skipped
ticks and fail-safe cycles with the flood exceed those without by at most 1% of the cycles.

    python benchmarks/bench_flood_zmq.py --seconds 30 --json flood_zmq.json

Figures depend on the machine: report the load average printed with them.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOOD = {"level": 0.5, "temperature": 40.0, "level_sp": 0.55, "temp_sp": 42.0, "level_err": 0.05,
        "temp_err": 2.0, "inflow_temp": 20.0, "valve_pos": 0.5, "heater_pos": 0.3, "auto": 1.0}


def feeder(endpoint: str, period_s: float, stop) -> None:
    """One valid frame for ``main`` each period (a process of its own)."""
    from plc_bridge.zmq_bridge import SensorPublisher

    with SensorPublisher(endpoint) as pub:
        pub.wait_ready(10)
        seq, nxt = 0, time.monotonic()
        while not stop.is_set():
            pub.send("main", seq, GOOD)
            seq += 1
            nxt += period_s
            time.sleep(max(0.0, nxt - time.monotonic()))


def flood(endpoint: str, stop, sent) -> None:
    """Garbage frames at a publisher's full speed (a process of its own); ``sent`` gets the count."""
    import msgpack

    from plc_bridge.zmq_bridge import SensorPublisher

    junk = [os.urandom(48), b"\xc1" * 16, msgpack.packb({"v": 1, "stream": "main", "seq": "x"}),
            msgpack.packb({"v": 1, "stream": "flood", "seq": 1, "t_ns": 1, "values": {"nope": 1.0}}),
            msgpack.packb([1, 2, 3])]
    n = 0
    with SensorPublisher(endpoint, hwm=100_000) as pub:
        pub.wait_ready(10)
        while not stop.is_set():
            for data in junk:
                pub.send_bytes(data)
            n += len(junk)
    sent.value = n


def deploy_file(folder: Path) -> Path:
    text = (ROOT / "sdk" / "demo" / "deploy.toml").read_text()
    text = text[:text.index("[modbus]")].replace('path = "model"', f'path = "{ROOT / "sdk" / "demo" / "model"}"')
    text = re.sub(r"\[loop\]\n", "[loop]\nmax_failsafe_fraction = 1.0\n", text, count=1)
    text += ('\n[zmq]\nsensors = "tcp://127.0.0.1:*"\ndecisions = "tcp://127.0.0.1:*"\n'
             'control = "tcp://127.0.0.1:*"\n')
    path = folder / "deploy.toml"
    path.write_text(text)
    return path


def snapshot(ctrl) -> dict:
    s = ctrl.stats()
    z = s["bridges"]["zmq"]
    return {"cycles": s["cycles"], "deadline_misses": s["deadline_misses"], "skipped_ticks": s["skipped_ticks"],
            "failsafe_cycles": s["failsafe_cycles"], "frames": z["frames"], "refused": sum(z["bad"].values()),
            "throttled_windows": z.get("throttled_windows", 0)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    from sdk.service.controller import Controller

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        ctrl = Controller.from_config(deploy_file(Path(tmp)))
        runner = threading.Thread(target=ctrl.run, kwargs={"duration_s": 4 * args.seconds + 60}, daemon=True)
        runner.start()
        while len(ctrl.bridge("zmq").endpoints) < 3:
            time.sleep(0.05)
        endpoint = ctrl.bridge("zmq").endpoints["sensors"]
        stop_feed, stop_flood = ctx.Event(), ctx.Event()
        sent = ctx.Value("q", 0)
        feed = ctx.Process(target=feeder, args=(endpoint, ctrl.period_s, stop_feed), daemon=True)
        feed.start()
        while "main" not in ctrl.slots or ctrl.status()["status"] != "ok":
            time.sleep(0.05)
        time.sleep(2.0)
        phases = {}
        a = snapshot(ctrl)
        time.sleep(args.seconds)
        b = snapshot(ctrl)
        phases["without_flood"] = {k: b[k] - a[k] for k in a}
        flooder = ctx.Process(target=flood, args=(endpoint, stop_flood, sent), daemon=True)
        flooder.start()
        time.sleep(1.0)
        a = snapshot(ctrl)
        t0 = time.monotonic()
        time.sleep(args.seconds)
        b = snapshot(ctrl)
        stop_flood.set()
        flooder.join(10)
        elapsed = time.monotonic() - t0 + 1.0
        phases["with_flood"] = {k: b[k] - a[k] for k in a}
        phases["with_flood"]["flood_frames_per_s"] = sent.value / elapsed
        stop_feed.set()
        feed.join(10)
        ctrl.stop()
        runner.join(30)
        ctrl.close()
    w, wo = phases["with_flood"], phases["without_flood"]
    extra = {k: (w[k] / max(w["cycles"], 1) - wo[k] / max(wo["cycles"], 1))
             for k in ("deadline_misses", "skipped_ticks", "failsafe_cycles")}
    report = {"seconds": args.seconds, "loadavg": os.getloadavg(), "phases": phases,
              "extra_fraction_of_cycles": extra, "within_1_percent": all(v <= 0.01 for v in extra.values())}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
