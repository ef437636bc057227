"""The plant side of the sensor-stream example: a vibration gateway for 16 machines.

It publishes one sensor frame per machine every ``1/rate`` seconds to the controller's
``sensors`` endpoint (ZeroMQ, the schema of ``plc_bridge.messages``), listens to the
controller's ``decisions`` endpoint, and, knowing when each fault was injected, scores the
decisions per stream when the run ends:

- detection delay: from the first frame carrying the fault to the first decision that
  alarms (a fault score of at least ``threshold`` with status ``ok``), both in wall-clock
  time, so it includes the network, the controller's wait for its next cycle, inference
  and the publication of the decision (gateway and controller read one clock: same host);
- false alarms: decisions that switch the alarm on while the machine is healthy (before
  the onset, or on a machine without fault); one alarm that stays on counts once, and so
  does one that chatters (an alarming decision less than ``chatter_ms``, 100 ms, after the
  last alarming one continues that alarm);
- accuracy: the share of decisions whose alarm state matches the truth, leaving out
  decisions within ``grace_ms`` after the onset (the detection window);
- diagnosis: the fault kind with the highest mean score over the alarmed decisions.

Only decisions stamped up to the last frame's time are scored (after it the streams go
quiet and the controller rightly fails safe); the gateway keeps listening ``drain_s``
longer for decisions still on their way.

One thread does everything: send the frames that are due, then wait for decisions until
the next frame is due. ``python -m examples.sensor_stream.gateway --help``. It writes one
JSON object per line to stdout (logs go to stderr): ``{"event": "sent", ...}`` as soon as
the last frame is out (``run.py`` stops the controller then, before the streams go
stale), and the report when scoring is done.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from typing import Callable

import numpy as np

from plc_bridge.zmq_bridge import DecisionSubscriber, SensorPublisher

from .machines import FAULTS, FEATURES, HEALTHY, Fleet, demo_schedule

log = logging.getLogger(__name__)

MAX_BEHIND = 4          # frames; a gateway further behind its schedule skips ahead


def stream_names(n: int) -> list[str]:
    """Stream names of the machines: ``m01``, ``m02``, ..."""
    return [f"m{i + 1:02d}" for i in range(n)]


def run_gateway(sensors: str, decisions: str, *, streams: int = 16, rate_hz: float = 400.0,
                duration_s: float = 10.0, seed: int = 0, threshold: float = 0.5, grace_ms: float = 200.0,
                ready_timeout_s: float = 60.0, drain_s: float = 0.3,
                on_sent: Callable[[int], None] | None = None) -> dict:
    """Publish ``duration_s`` of frames for ``streams`` machines, collect the decisions, score them.

    Waits up to ``ready_timeout_s`` for the controller's subscription before starting the
    clock. ``on_sent(frames)`` is called once the last frame is out. Returns the report (see
    the module docstring; :func:`score` for its fields).
    """
    names = stream_names(streams)
    kind, onset_s = demo_schedule(streams, duration_s, seed)
    fleet = Fleet(kind, onset_s, rate_hz=rate_hz, seed=seed)
    period_ns = int(round(1e9 / rate_hz))
    n_frames = int(round(duration_s * rate_hz))
    onset_frame = np.where(kind == HEALTHY, -1, np.ceil(onset_s * rate_hz - 1e-9)).astype(np.int64)
    index = {s: i for i, s in enumerate(names)}
    got: list[list[tuple]] = [[] for _ in names]
    pub = SensorPublisher(sensors, hwm=100_000)
    sub = DecisionSubscriber(decisions)
    try:
        if not pub.wait_ready(ready_timeout_s):
            raise TimeoutError(f"no subscription from the controller at {sensors} within {ready_timeout_s} s")
        wall_offset = time.time_ns() - time.monotonic_ns()
        t0 = time.monotonic_ns() + 50_000_000
        sent = skipped = 0
        frame = 0
        data_end = t0 + n_frames * period_ns
        end = data_end + int(drain_s * 1e9)
        while True:
            now = time.monotonic_ns()
            if frame < n_frames and now >= t0 + frame * period_ns:
                behind = (now - t0) // period_ns - frame
                if behind > MAX_BEHIND:                # stalled: skip ahead instead of bursting
                    for _ in range(min(int(behind), n_frames - frame)):
                        fleet.step()
                        frame += 1
                        skipped += 1
                    continue
                values, _ = fleet.step()
                t_ns = t0 + frame * period_ns + wall_offset
                for i, name in enumerate(names):
                    pub.send(name, frame, dict(zip(FEATURES, values[i].tolist())), t_ns=t_ns)
                sent += 1
                frame += 1
                continue
            if now >= end:
                break
            if frame == n_frames and on_sent is not None:
                on_sent(sent * streams)
                on_sent = None
            due = t0 + frame * period_ns if frame < n_frames else end
            d = sub.recv(timeout_ms=max(1, math.ceil((due - now) / 1e6)))
            # Decisions stamped after the last frame are about a stream gone quiet: not scored.
            if d is not None and d["stream"] in index and d["t_ns"] - wall_offset <= data_end:
                o = d["outputs"]
                got[index[d["stream"]]].append((d["t_ns"], d["status"], [o.get(f, math.nan) for f in FAULTS]))
        onset_wall = np.where(onset_frame < 0, -1, t0 + onset_frame * period_ns + wall_offset)
        report = score(names, kind, onset_wall, got, threshold=threshold, grace_ms=grace_ms)
        report.update({"rate_hz": rate_hz, "duration_s": duration_s, "seed": seed, "frames_sent": sent * streams,
                       "frames_skipped": skipped * streams, "sensor_rate_per_s": sent * streams / duration_s})
        return report
    finally:
        pub.close()
        sub.close()


def _alarm_starts(t: np.ndarray, ok: np.ndarray, alarm: np.ndarray, chatter_ms: float) -> np.ndarray:
    """Where a new alarm starts: an alarming decision whose previous judged decision did not
    alarm, unless it comes less than ``chatter_ms`` after the last alarming decision (a score
    hovering at the threshold is one chattering alarm, not several). A fail-safe decision is
    no judgement: an alarm on both sides of one is one alarm."""
    starts = np.zeros(len(t), bool)
    was_on, last_on_ns = False, None
    for k in np.flatnonzero(ok):
        if alarm[k]:
            starts[k] = not was_on and (last_on_ns is None or t[k] - last_on_ns >= chatter_ms * 1e6)
            last_on_ns = t[k]
        was_on = bool(alarm[k])
    return starts


def score(names: list[str], kind: np.ndarray, onset_wall_ns: np.ndarray, decisions: list[list[tuple]], *,
          threshold: float = 0.5, grace_ms: float = 200.0, chatter_ms: float = 100.0) -> dict:
    """Score each stream's decisions ``[(t_ns, status, [score per fault kind])]`` against
    its truth (``kind``, ``onset_wall_ns``; -1 for healthy). See the module docstring.

    Returns ``{"streams": [...], "summary": {...}}``; a fault never alarmed has
    ``delay_ms`` None and counts as missed.
    """
    rows = []
    for i, name in enumerate(names):
        d = decisions[i]
        truth = FAULTS[kind[i]] if kind[i] != HEALTHY else None
        row = {"stream": name, "fault": truth, "decisions": len(d), "failsafe": 0, "delay_ms": None,
               "diagnosed": None, "false_alarms": 0, "accuracy": None}
        if not d:
            rows.append(row)
            continue
        t = np.array([x[0] for x in d], dtype=np.int64)
        ok = np.array([x[1] == "ok" for x in d])
        s = np.array([x[2] for x in d], dtype=np.float64)
        alarm = ok & (np.nanmax(s, axis=1) >= threshold)
        row["failsafe"] = int((~ok).sum())
        onset = onset_wall_ns[i]
        faulty = (t >= onset) if onset >= 0 else np.zeros(len(t), bool)
        row["false_alarms"] = int((_alarm_starts(t, ok, alarm, chatter_ms) & ~faulty).sum())
        if onset >= 0:
            hits = np.flatnonzero(alarm & faulty)
            if len(hits):
                row["delay_ms"] = round((t[hits[0]] - onset) / 1e6, 1)
                row["diagnosed"] = FAULTS[int(np.argmax(s[alarm & faulty].mean(axis=0)))]
        scored = ok & ~(faulty & (t < onset + grace_ms * 1e6))
        if scored.any():
            row["accuracy"] = round(float((alarm[scored] == faulty[scored]).mean()), 4)
        rows.append(row)
    faulted = [r for r in rows if r["fault"]]
    delays = [r["delay_ms"] for r in faulted if r["delay_ms"] is not None]
    acc = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    summary = {
        "faulted": len(faulted), "detected": len(delays),
        "diagnosed_right": sum(r["diagnosed"] == r["fault"] for r in faulted),
        "false_alarms": sum(r["false_alarms"] for r in rows),
        "delay_ms": {"median": float(np.median(delays)), "max": float(max(delays))} if delays else None,
        "accuracy_mean": round(float(np.mean(acc)), 4) if acc else None,
        "accuracy_min": min(acc) if acc else None,
        "decisions": sum(r["decisions"] for r in rows),
        "failsafe_decisions": sum(r["failsafe"] for r in rows),
        "threshold": threshold, "grace_ms": grace_ms, "chatter_ms": chatter_ms,
    }
    return {"streams": rows, "summary": summary}


def _print_sent(frames: int) -> None:
    print(json.dumps({"event": "sent", "frames": frames}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the gateway against a controller and print its report as JSON."""
    p = argparse.ArgumentParser(prog="python -m examples.sensor_stream.gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--sensors", required=True, help="the controller's sensors endpoint (we connect)")
    p.add_argument("--decisions", required=True, help="the controller's decisions endpoint (we subscribe)")
    p.add_argument("--streams", type=int, default=16, help="machines, one stream each (default 16)")
    p.add_argument("--rate", type=float, default=400.0, help="frames per second per stream")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of frames")
    p.add_argument("--seed", type=int, default=0, help="machines, faults and onsets (default 0)")
    p.add_argument("--threshold", type=float, default=0.5, help="a fault score at least this alarms (default 0.5)")
    p.add_argument("--grace-ms", type=float, default=200.0,
                   help="decisions this long after a fault's onset are not scored for accuracy (default 200)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    report = run_gateway(args.sensors, args.decisions, streams=args.streams, rate_hz=args.rate,
                         duration_s=args.duration, seed=args.seed, threshold=args.threshold,
                         grace_ms=args.grace_ms, on_sent=_print_sent)
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
