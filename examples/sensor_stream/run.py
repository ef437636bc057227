"""Sensor-stream example: 16 machines over ZeroMQ, one controller batching them, faults detected.

``python -m examples.sensor_stream.run [--duration 10] [--seed 0] [--json]``

- The controller (this process) is built from ``deploy.toml`` with its three ZeroMQ
  endpoints moved to free loopback ports, and runs its 5 ms loop: each cycle it takes the
  newest frame of every machine from its SUB socket, runs all 16 through the engine in one
  batched step (batch-invariant: a machine's decision does not depend on the others) and
  publishes one decision per machine.
- The gateway (``gateway.py``, a separate process) publishes 16 x 400 frames/s of vibration
  features with faults injected at seeded times, collects the decisions and scores them.

The loop stops when the gateway has sent its last frame. Printed: per machine the injected fault, the
detection delay, the diagnosed kind, false alarms and accuracy; then the totals and the
controller's cycle figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
log = logging.getLogger(__name__)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound briefly and released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def load_config(package: str | Path | None = None, ports: list[int] | None = None, loop: dict | None = None):
    """``deploy.toml`` with the ZeroMQ endpoints on ``ports`` (sensors, decisions, control;
    default: free ones), optionally another package and ``[loop]`` keys replaced."""
    try:
        import tomllib
    except ModuleNotFoundError:                               # Python 3.10
        import tomli as tomllib
    from sdk.service.config import DeployConfig

    path = HERE / "deploy.toml"
    raw = tomllib.loads(path.read_text())
    ports = ports or free_ports(3)
    for key, port in zip(("sensors", "decisions", "control"), ports):
        raw["zmq"][key] = f"tcp://127.0.0.1:{port}"
    if package is not None:
        raw["model"]["path"] = str(Path(package).resolve())
    raw["loop"].update(loop or {})
    return DeployConfig.from_dict(raw, base_dir=HERE, source=path)


def run(duration_s: float = 10.0, *, seed: int = 0, rate_hz: float = 400.0, package: str | Path | None = None,
        threshold: float = 0.5) -> dict:
    """Run controller and gateway; returns the gateway's report with ``controller`` figures added."""
    from sdk.service.controller import Controller

    cfg = load_config(package)
    streams = cfg.model.streams
    with Controller(cfg) as ctrl:
        cmd = [sys.executable, "-m", "examples.sensor_stream.gateway", "--sensors", cfg.zmq["sensors"],
               "--decisions", cfg.zmq["decisions"], "--streams", str(streams), "--rate", str(rate_hz),
               "--duration", str(duration_s), "--seed", str(seed), "--threshold", str(threshold)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        gateway = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        result: dict = {}

        def collect() -> None:
            for line in gateway.stdout:
                if '"event": "sent"' in line:
                    ctrl.stop()                  # the last frame is out: stop before the streams go stale
                else:
                    result["stdout"] = line
            gateway.wait()
            ctrl.stop()

        collector = threading.Thread(target=collect, name="gateway-wait", daemon=True)
        collector.start()
        try:
            # The loop ends when the gateway has sent its last frame; the bound (the gateway
            # waits up to 60 s for our subscription) is a safety net, not the plan.
            stats = ctrl.run(duration_s + 90.0)
            collector.join(timeout=60.0)         # the gateway drains, scores and reports
        finally:
            if gateway.poll() is None:
                gateway.terminate()
            collector.join(timeout=10.0)
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()
    if gateway.returncode != 0 or not result.get("stdout"):
        raise RuntimeError(f"the gateway failed (exit code {gateway.returncode}); see its log above")
    report = json.loads(result["stdout"])
    zmq = stats["bridges"]["zmq"]
    report["controller"] = {
        "period_ms": cfg.loop.period_ms, "streams": streams, "cycles": stats["cycles"],
        "deadline_misses": stats["deadline_misses"], "failsafe_cycles": stats["failsafe_cycles"],
        "latency_us": stats["latency_us"], "infer_us": stats["phases_us"]["infer"],
        "frames_received": zmq["frames"], "decisions_published": zmq["published"],
        "bad_frames": zmq["bad"], "bridge_errors": zmq["errors"],
        "invalid_inputs": {k: v for k, v in stats["invalid_inputs"].items() if v},
        "watchdog": {k: v for k, v in stats["watchdog"].items() if k != "last_error"},
    }
    return report


def render(report: dict) -> None:
    """Print the per-machine table and the totals."""
    print(f"{'stream':7}{'fault':11}{'delay ms':>9}  {'diagnosed':11}{'false alarms':>13}{'accuracy':>10}"
          f"{'decisions':>11}{'fail-safe':>10}")
    for r in report["streams"]:
        delay = "-" if r["fault"] is None else ("missed" if r["delay_ms"] is None else f"{r['delay_ms']:.1f}")
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        print(f"{r['stream']:7}{r['fault'] or 'healthy':11}{delay:>9}  {r['diagnosed'] or '-':11}"
              f"{r['false_alarms']:>13}{acc:>10}{r['decisions']:>11}{r['failsafe']:>10}")
    s, c = report["summary"], report["controller"]
    delay = s["delay_ms"]
    print(f"\nfaults detected {s['detected']}/{s['faulted']}, diagnosed right {s['diagnosed_right']}/{s['faulted']}, "
          f"false alarms {s['false_alarms']}, accuracy mean {s['accuracy_mean']} (min {s['accuracy_min']}; "
          f"alarm = a score >= {s['threshold']}, first {s['grace_ms']:.0f} ms after onset not scored)")
    if delay:
        print(f"detection delay: median {delay['median']:.1f} ms, max {delay['max']:.1f} ms "
              "(fault onset at the sensor to the alarming decision received)")
    lat, inf = c["latency_us"], c["infer_us"]
    print(f"sensors: {report['frames_sent']} frames sent ({report['sensor_rate_per_s']:.0f}/s), "
          f"{c['frames_received']} received by the controller, {report['frames_skipped']} skipped by a late gateway")
    wd = c["watchdog"]
    print(f"controller: {c['streams']} streams every {c['period_ms']:g} ms, {c['cycles']} cycles, "
          f"{c['decisions_published']} decisions published, deadline misses {c['deadline_misses']}")
    print(f"fail-safe cycles {c['failsafe_cycles']}: inference over budget {wd['timeouts']}, still busy "
          f"{wd['busy_cycles']}, invalid inputs {c['invalid_inputs'] or 'none'}")
    print(f"cycle latency us: p50 {lat['p50']:.0f}  p99 {lat['p99']:.0f}  max {lat['max']:.0f}; "
          f"batched inference us: p50 {inf['p50']:.0f}  p99 {inf['p99']:.0f}")


def main(argv: list[str] | None = None) -> int:
    """Command line: run the example and print its figures (``--json`` for the raw report)."""
    p = argparse.ArgumentParser(prog="python -m examples.sensor_stream.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sensor data")
    p.add_argument("--seed", type=int, default=0, help="machines, faults and onsets")
    p.add_argument("--rate", type=float, default=400.0, help="sensor frames per second per machine")
    p.add_argument("--package", type=Path, default=None, help="another package than the bundled one")
    p.add_argument("--threshold", type=float, default=0.5, help="a fault score at least this alarms (default 0.5)")
    p.add_argument("--engine-threads", type=int, default=1,
                   help="Numba threads for the engine (default 1: the gateway needs the other core)")
    p.add_argument("--json", action="store_true", help="print the gateway's report and the controller's figures as JSON")
    args = p.parse_args(argv)
    os.environ["NUMBA_NUM_THREADS"] = str(args.engine_threads)   # read when numba is first imported
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = run(args.duration, seed=args.seed, rate_hz=args.rate, package=args.package, threshold=args.threshold)
    if args.json:
        print(json.dumps(report))
    else:
        render(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
