"""Fault-injection soak: the demo plant and its policy, run for real under a fault schedule.

    python benchmarks/soak.py --minutes N [--seed S] [--json] [--realtime]

The heated-tank PLC (``sdk/demo/plant.py``) runs as its own process; the controller of the
demo's ``deploy.toml`` runs in this process in Modbus client mode, with the flight recorder
on and a ``[zmq]`` section added (its SUB endpoint takes the flood). Between them sits a
Modbus TCP fault proxy, a process of its own (``--role proxy``): it forwards every request
to the PLC and, when told, answers short, with garbage, drops the connection, puts NaN or an
out-of-range value into the measurements, answers late, or freezes the PLC's register image.
The faults, spread over the N minutes in a schedule fixed by ``--seed`` (each round of 60 s
runs every fault once, in a seeded order, with seeded durations): ``kill`` (the PLC process
SIGKILLed and started again), ``pause`` (SIGSTOP for 2 s), ``short`` (reads answered one
register or bit short, byte count consistent), ``garbage`` (random answers), ``drop``
(connections closed at each request), ``nan`` / ``range`` (``level`` NaN, ``temperature``
500 degC), ``slow`` (answers 150 ms late: stale inputs), ``frozen`` (the PLC's registers and
heartbeat stop changing), ``flood`` (garbage and well-formed ZeroMQ frames at full speed
from another process). docs/faults/soak.md describes each.

Not exercised: the idle-connection squat (a server-mode fault; the demo polls its PLC).
Per fault, from the flight recording: detected (the fail-safe reasons seen), time to
fail-safe, time back to auto and the ramp at the rate limit, cycles lost, what the bridges
counted; overall: misses, skipped ticks, RSS growth, the replay bit for bit. How to read the
table: docs/faults/soak.md. Every phase has a time bound; exit status 0 only when every fault
passed and the replay is identical.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import math
import os
import random
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LEAD_S, TAIL_S = 4.0, 4.0            # steady running before the first fault and after the last
STABLE_CYCLES = 10                   # ok-in-auto cycles in a row that make a return
GRACE_S = 0.5                        # a fail-safe this soon after a fault's end still counts for it
FLOOD_FRACTION = 0.01                # a flood may cost at most this fraction of its cycles
SLOW_S = 0.15                        # the "slow" fault's delay, over the demo's stale_ms of 100
#: kind -> (slot weight, shortest and longest duration in s); "pause" is always 2 s
KINDS = {"kill": (2.0, 1.0, 2.0), "pause": (1.0, 2.0, 2.0), "short": (1.0, 1.0, 2.0),
         "garbage": (1.0, 1.0, 2.0), "drop": (1.0, 1.0, 2.0), "nan": (1.0, 0.3, 1.0),
         "range": (1.0, 0.3, 1.0), "slow": (1.0, 1.0, 2.0), "frozen": (1.0, 1.5, 2.5),
         "flood": (1.0, 2.0, 4.0)}
PROXY_MODES = ("short", "garbage", "drop", "nan", "range", "slow", "frozen")
_MBAP = struct.Struct(">HHHB")
_F32 = struct.Struct(">f")


# ----------------------------------------------------------------------------- the schedule

def schedule(minutes: float, seed: int) -> list[dict]:
    """The fault schedule of a run: ``[{"kind", "round", "at_s", "duration_s", "slot_s"}]`` in
    time order, ``at_s`` from the loop's start. One round per minute (at least one), each
    running every kind once in a seeded order; slots are shared out by weight over the run
    less ``LEAD_S`` and ``TAIL_S``; durations are seeded within each kind's bounds and kept
    under half the slot (the rest is for the recovery). A pure function of its arguments."""
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    rng = random.Random(seed)
    rounds = max(1, int(round(minutes)))
    unit = (minutes * 60.0 - LEAD_S - TAIL_S) / (rounds * sum(w for w, _, _ in KINDS.values()))
    if unit < 2.5:
        raise ValueError(f"--minutes {minutes}: too short for every fault (a slot of {unit:.1f} s)")
    out, t = [], LEAD_S
    for r in range(rounds):
        kinds = sorted(KINDS)
        rng.shuffle(kinds)
        for kind in kinds:
            weight, lo, hi = KINDS[kind]
            slot = unit * weight
            duration = lo if kind == "pause" else min(rng.uniform(lo, hi), max(lo, 0.45 * slot))
            jitter = rng.uniform(0.0, 0.1 * unit)
            out.append({"kind": kind, "round": r, "at_s": round(t + jitter, 3), "duration_s": round(duration, 3),
                        "slot_s": round(slot - jitter, 3)})
            t += slot
    return out


# ----------------------------------------------------------------------------- measurement

def cycles_from_recording(path: str | Path) -> dict:
    """The main stream's cycles from a flight recording: ``t_ns``, ``st``, ``why`` (with the
    invalid inputs, e.g. ``invalid_input(level:nan)``), ``mode``, ``out``, ``y``, plus the
    header's ``period_ns`` and ``limits`` (name, min, max, max_rate per output)."""
    from runtime.control.recorder import RecordingReader

    c = {"t_ns": [], "st": [], "why": [], "mode": [], "out": [], "y": [], "period_ns": None, "limits": []}
    for rec in RecordingReader(path):
        if rec.get("type") == "header":
            c["period_ns"] = rec["period_ns"]
            c["limits"] = [lim[:4] for lim in rec["output_limits"]]
        elif rec.get("type") == "cycle":
            for st in (st for st in rec["streams"] if st["s"] == "main"):
                why = st["why"] + (f"({_bad_inputs(st['bad'])})" if st.get("bad") else "")
                for key, value in (("t_ns", rec["t_ns"]), ("st", st["st"]), ("why", why),
                                   ("mode", st.get("mode", "auto")), ("out", st["out"]), ("y", st.get("y"))):
                    c[key].append(value)
    return c


def _bad_inputs(bad: dict) -> str:
    """``{input: why}`` shortly: ``level:nan``, or ``stale x9`` where more than two share a why."""
    by_why: dict[str, list[str]] = {}
    for name, why in sorted(bad.items()):
        by_why.setdefault(why, []).append(name)
    return ",".join(f"{why} x{len(names)}" if len(names) > 2 else ",".join(f"{n}:{why}" for n in names)
                    for why, names in sorted(by_why.items()))


def _gaps(t: list[int], ids: list[int], period: int | None) -> int:
    """Ticks skipped between the consecutive cycles ``ids`` (times ``t``, period ``period`` ns)."""
    return sum(max(0, round((t[i] - t[j]) / period) - 1) for j, i in zip(ids, ids[1:])) if period else 0


def _ramp_done(out, y, limits) -> bool:
    """The outputs are the policy's own (clamped) outputs: the rate limit no longer binds."""
    if y is None:
        return False
    return all(abs(o - min(max(v, lo), hi)) <= 1e-6 for o, v, (_, lo, hi, _r) in zip(out, y, limits))


def measure_fault(inj: dict, cycles: dict) -> dict:
    """The figures of one injected fault from the cycles of the main stream.

    ``inj``: ``kind``, ``t_start_ns`` / ``t_end_ns`` (when the fault began and was cleared),
    ``t_next_ns`` (the next fault's start or the run's end), and optionally ``counted`` (what the
    bridges counted meanwhile), ``window`` (deadline misses and fail-safe cycles counted by the
    controller during it), ``plc`` (fail-safe values and writes the PLC received).
    Returns the row: detection, timings, cycles lost, ``ok`` and ``why`` when not ok."""
    t, st, mode = cycles["t_ns"], cycles["st"], cycles["mode"]
    period = cycles["period_ns"]
    t0, t1, tn = inj["t_start_ns"], inj["t_end_ns"], inj["t_next_ns"]
    idx = [i for i in range(len(t)) if t0 <= t[i] < tn]
    before = [i for i in range(len(t)) if t[i] < t0]
    in_auto = bool(before) and st[before[-1]] == "ok" and mode[before[-1]] == "auto"
    detect_until = t1 + int(GRACE_S * 1e9)
    fs = [i for i in idx if st[i] == "failsafe" and t[i] <= detect_until]
    reasons = sorted({cycles["why"][i] for i in fs})
    row = {"kind": inj["kind"], "round": inj.get("round"), "at_s": inj.get("at_s"),
           "duration_s": round((t1 - t0) / 1e9, 3), "in_auto_at_start": in_auto, "cycles": len(idx),
           "detected": bool(fs) if in_auto else None, "reasons": reasons,      # None: already failed safe
           "to_failsafe_ms": round((t[fs[0]] - t0) / 1e6, 1) if fs and in_auto else None,
           "back_to_auto_s": None, "ramp_s": None, "ramp_within_rate": None, "cycles_lost": None,
           "skipped_ticks": 0, "failsafe_cycles": sum(st[i] == "failsafe" for i in idx),
           "counted": inj.get("counted", {}), "bridges_at_end": inj.get("bridges_at_end", {}),
           "window": inj.get("window", {}), "plc": inj.get("plc", {})}
    row["skipped_ticks"] = _gaps(t, before[-1:] + idx, period)
    # back in auto: after the fault's end and its last fail-safe, the first ok-and-auto cycle
    # that STABLE_CYCLES more follow (a lone ok cycle amid fail-safes is not a return)
    good = [st[i] == "ok" and mode[i] == "auto" for i in range(len(t))]
    start = max([i for i in fs if t[i] >= t1] + [i for i in idx if t[i] < t1][-1:], default=None)
    back = None
    for k, i in enumerate(idx):
        if t[i] < t1 or (start is not None and i <= start) or not good[i]:
            continue
        run = idx[k:k + STABLE_CYCLES + 1]
        if all(good[j] for j in run) and (len(run) == STABLE_CYCLES + 1 or run[-1] == idx[-1]):
            back = i
            break
    if back is not None:
        # cycles lost: not ok-in-auto between the fault's start and the return, plus ticks skipped
        upto = [i for i in idx if i <= back]
        row["back_to_auto_s"] = round(max(t[back] - t1, 0) / 1e9, 3)
        row["cycles_lost"] = (sum(st[i] != "ok" or mode[i] != "auto" for i in upto)
                              + _gaps(t, before[-1:] + upto, period))
        limits = cycles["limits"]
        done = next((i for i in range(back, idx[-1] + 1)
                     if _ramp_done(cycles["out"][i], cycles["y"][i], limits)), None)
        # every step the controller drove from the last fail-safe to the ramp's end (or the
        # window's) within max_rate: fail-safe steps are immediate, manual ones the operator's
        steps_ok = True
        for i in range((start if start is not None else back) + 1, (done if done is not None else idx[-1]) + 1):
            if st[i] == "failsafe" or st[i - 1] == "failsafe" or mode[i] == "manual" or not period:
                continue
            dt = (t[i] - t[i - 1]) / 1e9
            for a, b, (_, _lo, _hi, rate) in zip(cycles["out"][i - 1], cycles["out"][i], limits):
                if rate and abs(b - a) > rate * dt * (1 + 1e-6) + 1e-9:
                    steps_ok = False
        row["ramp_within_rate"] = steps_ok
        row["ramp_s"] = None if done is None else round((t[done] - t[back]) / 1e9, 3)
    row["ok"], row["why"] = _verdict(row)
    return row


def _verdict(row: dict) -> tuple[bool | None, str]:
    """Pass, fail (with the reason) or None (not judged: the loop was not in auto at the start)."""
    if row["kind"] == "flood":
        w = row["window"]
        n = max(w.get("cycles", row["cycles"]), 1)
        lost = w.get("failsafe_cycles", row["failsafe_cycles"]) + w.get("deadline_misses", 0)
        if not row["in_auto_at_start"]:
            return None, "not in auto when it began"
        if lost > FLOOD_FRACTION * n:
            return False, f"{lost} fail-safe cycles and deadline misses in {n} cycles (> {FLOOD_FRACTION:.0%})"
        if not any(k.startswith("zmq.bad") for k in row["counted"]):
            return False, "the ZeroMQ bridge counted none of the flood as bad"
        if row["back_to_auto_s"] is None:
            return False, "not in auto after it"
        return True, ""
    if not row["in_auto_at_start"]:
        return None, "not in auto when it began (an earlier fault not recovered)"
    if not row["detected"]:
        return False, "no fail-safe: fault not detected"
    if row["back_to_auto_s"] is None:
        return False, "never back to auto before the next fault"
    if row["ramp_within_rate"] is False:
        return False, "an output stepped faster than its rate limit on the way back"
    plc = row["plc"]
    if plc.get("writes_at_end") == 0:
        return False, "the PLC received no writes in the last second before the next fault"
    if plc.get("failsafe_writes") == 0 and row["kind"] in ("nan", "range", "frozen"):
        return False, "the PLC never received the fail-safe values"
    return True, ""


def counted_delta(a: dict, b: dict) -> dict:
    """The numeric leaves of two bridge-health snapshots that grew, as ``{"bridge.key.sub": +n}``."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{prefix}{k}", v
    before = dict(flat(a))
    skip = ("io_us", "publish_us", "published", "heartbeat_age_ms", "reconnect_delay_ms", "clients", "peers")
    return {k: v - before.get(k, 0) for k, v in flat(b) if v > before.get(k, 0) and not any(s in k for s in skip)}


# ----------------------------------------------------------------------------- the fault proxy

class FaultProxy:
    """Modbus TCP between the controller and the PLC: forwards each request and its answer,
    and misbehaves as ``mode`` says (one of ``PROXY_MODES``, or "pass"). Counts requests,
    writes to the command registers and writes of all-zero commands (the fail-safe values)."""

    def __init__(self, listen_port: int, plc_port: int, seed: int):
        self.listen_port, self.plc_port = listen_port, plc_port
        self.mode = "pass"
        self.rng = random.Random(seed)
        self.counts = {"requests": 0, "writes": 0, "failsafe_writes": 0, "mangled": 0, "dropped": 0}
        self.frozen: dict[bytes, bytes] = {}

    async def serve(self) -> None:
        """Serve until the process ends."""
        server = await asyncio.start_server(self._client, "127.0.0.1", self.listen_port)
        print(f"proxy: listening on 127.0.0.1:{self.listen_port}", flush=True)
        async with server:
            await server.serve_forever()

    async def _client(self, reader, writer) -> None:
        up_w = None
        try:
            if self.mode == "drop":
                self.counts["dropped"] += 1
                return
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.plc_port), 2.0)
            while True:
                head = await reader.readexactly(7)
                tid, _pid, length, _unit = _MBAP.unpack(head)
                req = head + await reader.readexactly(max(length - 1, 0))
                self.counts["requests"] += 1
                self._note_write(req)
                mode = self.mode
                if mode == "drop":
                    self.counts["dropped"] += 1
                    return
                key = req[7:]
                if mode == "frozen" and req[7] in (1, 2, 3, 4) and key in self.frozen:
                    writer.write(req[:2] + self.frozen[key][2:])
                    await writer.drain()
                    continue
                up_w.write(req)
                await up_w.drain()
                rhead = await asyncio.wait_for(up_r.readexactly(7), 5.0)
                resp = rhead + await asyncio.wait_for(up_r.readexactly(max(_MBAP.unpack(rhead)[2] - 1, 0)), 5.0)
                if mode == "pass" and req[7] in (1, 2, 3, 4):
                    self.frozen[key] = resp
                if mode not in ("pass", "frozen"):
                    resp = self._mangle(mode, req, resp)
                if mode == "slow":
                    await asyncio.sleep(SLOW_S)
                writer.write(resp)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError):
            pass
        finally:
            for w in (writer, up_w):
                if w is not None:
                    w.close()

    def _note_write(self, req: bytes) -> None:
        if len(req) >= 20 and req[7] == 16 and struct.unpack(">H", req[8:10])[0] == 0:
            self.counts["writes"] += 1
            valve, heater = struct.unpack(">ff", req[13:21]) if len(req) >= 21 else (None, None)
            if valve == 0.0 and heater == 0.0:
                self.counts["failsafe_writes"] += 1

    def _mangle(self, mode: str, req: bytes, resp: bytes) -> bytes:
        fc, pdu = req[7], resp[7:]
        out = pdu
        if mode == "short" and fc in (1, 2, 3, 4) and len(pdu) >= 2 and pdu[0] == fc and pdu[1] > 0:
            n = max(pdu[1] - (2 if fc in (3, 4) else 1), 0)
            out = bytes((fc, n)) + pdu[2:2 + n]
        elif mode == "garbage":
            choice = self.rng.randrange(3)
            junk = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 24)))
            if choice == 2:
                self.counts["mangled"] += 1
                return junk                                   # not even framed
            out = (bytes((fc,)) if choice == 0 else b"") + junk
        elif mode in ("nan", "range") and fc == 4 and struct.unpack(">H", req[8:10])[0] == 0 and len(pdu) >= 10:
            data = bytearray(pdu)
            if mode == "nan":
                data[2:6] = _F32.pack(math.nan)               # level
            else:
                data[6:10] = _F32.pack(500.0)                 # temperature, range 0..100
            out = bytes(data)
        if out is not pdu:
            self.counts["mangled"] += 1
        return resp[:4] + struct.pack(">H", len(out) + 1) + resp[6:7] + out


def proxy_main(listen_port: int, plc_port: int, seed: int) -> int:
    """``--role proxy``: serve, taking "mode NAME" and "stats" lines on stdin. Each is
    answered with one JSON line on stdout once in force: the mode set, or the counts."""
    proxy = FaultProxy(listen_port, plc_port, seed)

    def commands() -> None:
        for line in sys.stdin:
            word = line.split()
            if word[:1] == ["mode"] and len(word) == 2:
                proxy.mode = word[1]
                print(json.dumps({"mode": proxy.mode}), flush=True)
            elif word[:1] == ["stats"]:
                print(json.dumps(proxy.counts), flush=True)
        os._exit(0)                                           # stdin closed: the soak is gone
    threading.Thread(target=commands, daemon=True).start()
    asyncio.run(proxy.serve())
    return 0


def flood_main(endpoint: str, seconds: float, seed: int) -> int:
    """``--role flood``: garbage and well-formed sensor frames at full speed into ``endpoint``
    for ``seconds``; prints the count sent."""
    import msgpack
    import zmq

    rng = random.Random(seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    frames = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(64)]
    frames += [msgpack.packb({"v": 1, "stream": f"flood-{k % 4}", "seq": k, "t_ns": time.monotonic_ns(),
                              "values": {"level": rng.uniform(-1, 2), "temperature": rng.uniform(0, 99)}})
               for k in range(64)]
    frames += [msgpack.packb({"v": 1, "stream": "main", "seq": "x", "values": {"level": "high"}}),
               msgpack.packb([1, 2, 3]), msgpack.packb({"v": 2})]
    time.sleep(0.2)                                           # the subscription reaches us
    print("flood: sending", flush=True)
    sent, n, end = 0, len(frames), time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(256):
            try:
                sock.send(frames[sent % n], zmq.NOBLOCK)
            except zmq.Again:
                pass
            sent += 1
    print(json.dumps({"sent": sent}), flush=True)
    sock.close()
    ctx.term()
    return 0


# ----------------------------------------------------------------------------- the run

class Child:
    """A helper process of this script (``--role ...``) with a line protocol on its pipes."""

    def __init__(self, args: list[str], ready: str, timeout_s: float = 20.0, log: Path | None = None):
        self._err = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True)
        line = self.readline(timeout_s)
        if ready not in line:
            self.close()
            raise RuntimeError(f"{' '.join(args[:2])}: not ready within {timeout_s:.0f} s (got {line!r})")

    def readline(self, timeout_s: float) -> str:
        """The next line on its stdout, or "" after ``timeout_s``."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            return self.proc.stdout.readline() if sel.select(timeout_s) else ""

    def ask(self, line: str, timeout_s: float = 5.0) -> dict:
        """Send a command and wait for its JSON answer ({} if none came within ``timeout_s``): a
        proxy answers "mode NAME" with ``{"mode": NAME}`` once the mode is in force, and "stats"
        with its counts. Answers to earlier commands that came too late are skipped."""
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return {}
        word = line.split()
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                answer = json.loads(self.readline(left) or "null")
            except json.JSONDecodeError:
                continue
            if answer is None:
                return {}
            if not isinstance(answer, dict):
                continue
            if word[:1] == ["mode"] and answer.get("mode") == word[-1]:
                return answer
            if word[:1] != ["mode"] and "mode" not in answer:
                return answer
        return {}

    def close(self, timeout_s: float = 5.0) -> None:
        """Close its stdin, wait a little, then kill it."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout_s)
        except (subprocess.TimeoutExpired, OSError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        if self._err is not subprocess.DEVNULL:
            self._err.close()


def soak_config(example: Path, proxy_port: int, zmq_ports: list[int], recording: Path, realtime: bool):
    """The demo's deployment, polling the PLC through the proxy, with ``[zmq]`` and a recorder
    large enough to keep the whole run."""
    try:
        import tomllib
    except ModuleNotFoundError:                               # Python 3.10
        import tomli as tomllib
    from sdk.service.config import DeployConfig

    path = example / "deploy.toml"
    raw = tomllib.loads(path.read_text())
    raw["modbus"]["port"] = proxy_port
    raw["zmq"] = {k: f"tcp://127.0.0.1:{p}" for k, p in zip(("sensors", "decisions", "control"), zmq_ports)}
    raw["recorder"] = {"path": str(recording), "max_bytes": 256 << 20, "keep": 64}
    raw["loop"]["realtime"] = bool(realtime)
    return DeployConfig.from_dict(raw, base_dir=example, source=path)


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class LogCounter(logging.Handler):
    """Counts the log records at WARNING and above, by logger: what an operator's log got."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.name] = self.counts.get(record.name, 0) + 1


class Injector(threading.Thread):
    """Runs the schedule against the live loop: injects each fault, clears it, and notes what
    the bridges, the controller and the PLC (through the proxy) counted meanwhile."""

    def __init__(self, plan, ctrl, plant_factory, proxy: Child, zmq_endpoint, seed, workdir):
        super().__init__(name="soak-injector", daemon=True)
        self.plan, self.ctrl, self.t0_ns = plan, ctrl, None       # t0: the loop's first cycle
        self.plant_factory, self.proxy, self.zmq_endpoint = plant_factory, proxy, zmq_endpoint
        self.seed, self.workdir, self.plant = seed, workdir, None
        self.done = threading.Event()
        self.injections: list[dict] = []
        self.flood: Child | None = None

    def _wait_until(self, at_s: float) -> bool:
        """Sleep until ``at_s`` after the start; False when the run is over."""
        return not self.done.wait(max(0.0, self.t0_ns / 1e9 + at_s - time.monotonic()))

    def _snapshot(self) -> dict:
        c = self.ctrl
        return {"health": {b.name: b.health() for b in c.bridges},
                "window": {"cycles": c.counters["cycles"], "deadline_misses": c.counters["deadline_misses"],
                           "failsafe_cycles": c.counters["failsafe_cycles"], "skipped_ticks": c.loop.skipped_ticks}}

    def run(self) -> None:
        while self.ctrl.counters["cycles"] == 0:      # the schedule counts from the loop's first cycle
            if self.done.wait(0.005):
                return
        self.t0_ns = time.monotonic_ns()
        for item in self.plan:
            if not self._wait_until(item["at_s"]):
                return
            inj = dict(item)
            self.injections.append(inj)
            try:
                self._inject(inj)
            except Exception as exc:                      # reported in the fault's row, never silent
                inj["error"] = f"{type(exc).__name__}: {exc}"
                inj.setdefault("t_start_ns", time.monotonic_ns())
                inj.setdefault("t_end_ns", time.monotonic_ns())
            end_s = item["at_s"] + item["slot_s"]
            mid = self.proxy.ask("stats") if self._wait_until(max(end_s - 1.0, (inj["t_end_ns"] - self.t0_ns) / 1e9)) \
                else {}
            self._wait_until(end_s - 0.05)
            last = self.proxy.ask("stats")
            if mid and last:
                inj.setdefault("plc", {})["writes_at_end"] = last["writes"] - mid["writes"]
            after, h0 = self._snapshot(), inj.pop("_h0", {})
            inj["bridges_at_end"] = {b: {k: h.get(k) for k in ("running", "connected")}
                                     for b, h in after["health"].items()}
            inj["counted"] = {f"{b}.{k}": v for b in after["health"]
                              for k, v in counted_delta(h0.get(b, {}), after["health"][b]).items()}

    def _inject(self, inj: dict) -> None:
        kind, d = inj["kind"], inj["duration_s"]
        inj["_h0"] = self._snapshot()["health"]
        before, p0 = self._snapshot()["window"], self.proxy.ask("stats")
        inj["t_start_ns"] = time.monotonic_ns()
        if kind == "kill":
            self.plant.kill()
            self.done.wait(d)
            self.plant = self.plant_factory().start()
        elif kind == "pause":
            os.kill(self.plant.proc.pid, signal.SIGSTOP)
            try:
                self.done.wait(d)
            finally:
                os.kill(self.plant.proc.pid, signal.SIGCONT)
        elif kind in PROXY_MODES:
            self.proxy.ask(f"mode {kind}")
            try:
                self.done.wait(d)
            finally:
                self.proxy.ask("mode pass")
        elif kind == "flood":
            self.flood = Child(["--role", "flood", "--endpoint", self.zmq_endpoint, "--seconds", str(d),
                                "--seed", str(self.seed + inj["round"])], "flood: sending", 20.0,
                               self.workdir / "flood.log")
            inj["t_start_ns"] = time.monotonic_ns()
            try:
                inj["sent"] = json.loads(self.flood.readline(d + 10.0) or "{}").get("sent")
            finally:
                self.flood.close()
                self.flood = None
        inj["t_end_ns"] = time.monotonic_ns()
        after, p1 = self._snapshot()["window"], self.proxy.ask("stats")
        inj["window"] = {k: after[k] - before[k] for k in after}
        inj["plc"] = {"failsafe_writes": p1.get("failsafe_writes", 0) - p0.get("failsafe_writes", 0),
                      "writes": p1.get("writes", 0) - p0.get("writes", 0)} if p0 and p1 else {}

    def abort(self) -> None:
        """End the schedule: wake the thread, let a paused PLC go, stop a flood."""
        self.done.set()
        if self.plant is not None and self.plant.running:
            os.kill(self.plant.proc.pid, signal.SIGCONT)
        if self.flood is not None:
            self.flood.proc.kill()


def run_soak(minutes: float, seed: int = 0, *, realtime: bool = False, workdir: Path | None = None,
             kinds: list[str] | None = None, plan: list[dict] | None = None) -> dict:
    """Run the soak (module docstring); returns the summary: ``faults`` (one row per injected
    fault), ``by_kind``, ``overall`` and ``ok``. ``kinds``: only these faults (default all);
    ``plan``: this schedule instead of :func:`schedule`'s (same items)."""
    sys.path.insert(0, str(ROOT))
    from runtime.control.loop import monotonic_ns
    from sdk.demo import PlantProcess, find_example, free_port, wait_for_plc
    from sdk.service.controller import Controller
    from sdk.service.replay import replay

    plan = [p for p in plan or schedule(minutes, seed) if kinds is None or p["kind"] in kinds]
    say = functools.partial(print, file=sys.stderr, flush=True)   # progress; stdout has the result
    duration_s = minutes * 60.0
    work = Path(workdir or tempfile.mkdtemp(prefix="r1edge-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    recording = work / "recording"
    for f in recording.glob("*.r1rec") if recording.is_dir() else ():
        f.unlink()
    example = find_example()
    plc_port, proxy_port, *zmq_ports = (free_port() for _ in range(5))
    config = soak_config(example, proxy_port, zmq_ports, recording, realtime)
    load_start = os.getloadavg()
    say(f"soak: building the controller ({len(plan)} faults over {minutes:g} min follow; work dir {work})")
    t_build = time.monotonic()
    ctrl = Controller(config)
    build_s = time.monotonic() - t_build

    def plant_factory():
        return PlantProcess(plc_port, seed, stderr_path=work / "plant.log")
    plant, proxy, injector, logs = plant_factory(), None, None, LogCounter()
    logging.getLogger().addHandler(logs)
    rss: list[tuple[float, int]] = []
    bridges_seen: dict = {}
    try:
        plant.start()
        proxy = Child(["--role", "proxy", "--port", str(proxy_port), "--plc-port", str(plc_port),
                       "--seed", str(seed)], "proxy: listening", 20.0, work / "proxy.log")
        wait_for_plc(ctrl, 20.0)
        injector = Injector(plan, ctrl, plant_factory, proxy, f"tcp://127.0.0.1:{zmq_ports[0]}", seed, work)
        injector.plant = plant
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.wait(1.0):
                if injector.t0_ns is not None:
                    rss.append((round((monotonic_ns() - injector.t0_ns) / 1e9, 1), rss_bytes()))
                bridges_seen.update({b.name: b.health() for b in ctrl.bridges})
        sampler = threading.Thread(target=sample, name="soak-rss", daemon=True)
        injector.start()
        sampler.start()
        guard = threading.Timer(duration_s + 60.0, ctrl.stop)    # the loop never outlives its time
        guard.start()
        say(f"soak: running {duration_s:.0f} s")
        try:
            stats = ctrl.run(duration_s)
        finally:
            guard.cancel()
            t_end = monotonic_ns()
            injector.abort()
            injector.join(30.0)
            sampler_stop.set()
            sampler.join(5.0)
    finally:
        if injector is not None:
            injector.abort()
            plant = injector.plant or plant
        plant.kill()
        if proxy is not None:
            proxy.close()
        ctrl.close()
        logging.getLogger().removeHandler(logs)
    cycles = cycles_from_recording(recording)
    rows = []
    injs = [i for i in injector.injections if "t_start_ns" in i]
    for k, inj in enumerate(injs):
        inj["t_next_ns"] = injs[k + 1]["t_start_ns"] if k + 1 < len(injs) else t_end
        inj["at_s"] = round((inj["t_start_ns"] - injector.t0_ns) / 1e9, 2)
        row = measure_fault(inj, cycles)
        if "error" in inj:
            row["ok"], row["why"] = False, f"injection failed: {inj['error']}"
        if inj.get("sent") is not None:
            row["sent"] = inj["sent"]
        rows.append(row)
    say(f"soak: replaying {len(cycles['t_ns'])} cycles")
    t_replay = time.monotonic()
    rep = replay(recording)
    replay_s = time.monotonic() - t_replay
    after_warm = [b for s, b in rss if s >= LEAD_S] or [b for _, b in rss]
    modbus = bridges_seen.get("modbus", {})               # the last sample while the loop ran
    overall = {
        "minutes": minutes, "seed": seed, "cycles": stats["cycles"], "deadline_misses": stats["deadline_misses"],
        "skipped_ticks": stats["skipped_ticks"], "failsafe_cycles": stats["failsafe_cycles"],
        "failsafe_cycles_by_reason": {k: v for k, v in stats["failsafe_cycles_by_reason"].items() if v},
        "latency_us": stats["latency_us"],
        "rss": {"first_bytes": after_warm[0] if after_warm else None,
                "last_bytes": after_warm[-1] if after_warm else None,
                "max_bytes": max(after_warm, default=None), "samples": len(after_warm),
                "growth_bytes": after_warm[-1] - after_warm[0] if after_warm else None},
        "replay": {k: rep[k] for k in ("identical", "cycles", "model_outputs_compared", "final_outputs_compared",
                                       "mismatches", "first_mismatch")},
        "log_records": dict(sorted(logs.counts.items())),
        "seconds": {"controller_build": round(build_s, 1), "replay": round(replay_s, 1)},
        "modbus_at_end": {k: modbus.get(k) for k in ("running", "connected", "reconnects", "errors", "bad")},
        "faults_injected": len(rows), "faults_passed": sum(r["ok"] is True for r in rows),
        "faults_failed": sum(r["ok"] is False for r in rows), "faults_not_judged": sum(r["ok"] is None for r in rows),
        "not_exercised": {"squat": "the demo's Modbus is client mode: r1edge has no Modbus server here to squat"},
        "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg(), "cpus": os.cpu_count(),
        "workdir": str(work), "recording": str(recording),
    }
    ok = overall["faults_failed"] == 0 and overall["faults_not_judged"] == 0 and rep["identical"] \
        and rep["cycles"] == stats["cycles"]
    return {"ok": ok, "faults": rows, "by_kind": by_kind(rows), "overall": overall}


def by_kind(rows: list[dict]) -> dict:
    """Rows summed up per fault kind: count, passed, detected, reasons, worst timings, lost cycles."""
    out = {}
    for kind in KINDS:
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        def worst(key):
            return max((r[key] for r in rs if r[key] is not None), default=None)
        out[kind] = {"n": len(rs), "passed": sum(r["ok"] is True for r in rs),
                     "detected": sum(r["detected"] is True for r in rs),
                     "reasons": sorted({x for r in rs for x in r["reasons"]}),
                     "to_failsafe_ms_max": worst("to_failsafe_ms"), "back_to_auto_s_max": worst("back_to_auto_s"),
                     "ramp_s_max": worst("ramp_s"),
                     "never_back": sum(r["back_to_auto_s"] is None for r in rs),
                     "cycles_lost": sum(r["cycles_lost"] or 0 for r in rs),
                     "failures": sorted({r["why"] for r in rs if r["ok"] is False})}
    return out


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(s: dict) -> None:
    """Print the soak's tables for people."""
    o = s["overall"]
    print(f"r1edge soak: {o['minutes']:g} min, seed {o['seed']}, {o['faults_injected']} faults; "
          f"{o['cpus']} CPUs, load average {o['load_avg_at_start'][0]:.2f} at start, "
          f"{o['load_avg_at_end'][0]:.2f} at end")
    print(f"\n{'at s':>7} {'fault':8} {'dur s':>5} {'detected by':34} {'to fs ms':>8} {'auto s':>6} "
          f"{'ramp s':>6} {'lost':>5}  verdict")
    for r in s["faults"]:
        reasons = ",".join(r["reasons"]) or ("-" if r["kind"] == "flood" else "NOT DETECTED")
        reasons = reasons if r["in_auto_at_start"] else "(before it) " + reasons
        verdict = {True: "ok", False: "FAIL", None: "n/a"}[r["ok"]] + (f" ({r['why']})" if r["why"] else "")
        print(f"{r['at_s']:7.1f} {r['kind']:8} {r['duration_s']:5.1f} {reasons[:34]:34} "
              f"{_f(r['to_failsafe_ms'], '8.0f'):>8} {_f(r['back_to_auto_s'], '6.2f'):>6} "
              f"{_f(r['ramp_s'], '6.2f'):>6} {_f(r['cycles_lost'], '5d'):>5}  {verdict}")
        down = [f"{b} {'not running' if not h['running'] else 'not connected'}"
                for b, h in r["bridges_at_end"].items()
                if h["running"] is False or (b == "modbus" and not h["connected"])]
        if down:
            print(f"{'':16}at the slot's end: {', '.join(down)}")
        if r["counted"]:
            print(f"{'':16}counted: " + ", ".join(f"{k} +{v:g}" for k, v in sorted(r["counted"].items())[:6])
                  + (f" (flood sent {r['sent']} frames)" if r.get("sent") else ""))
    print(f"\n{'fault':8} {'n':>3} {'pass':>4} {'det':>4} {'max to fs ms':>12} {'max auto s':>10} "
          f"{'never':>5} {'lost':>6}  reasons")
    for kind, k in s["by_kind"].items():
        print(f"{kind:8} {k['n']:3d} {k['passed']:4d} {k['detected']:4d} {_f(k['to_failsafe_ms_max'], '12.0f'):>12} "
              f"{_f(k['back_to_auto_s_max'], '10.2f'):>10} {k['never_back']:5d} {k['cycles_lost']:6d}  "
              f"{', '.join(k['reasons']) or '-'}")
    rss, rep, lat = o["rss"], o["replay"], o["latency_us"]
    print(f"\ncycles {o['cycles']}  deadline misses {o['deadline_misses']}  skipped ticks {o['skipped_ticks']}  "
          f"fail-safe cycles {o['failsafe_cycles']} {o['failsafe_cycles_by_reason']}")
    print(f"latency p50 {lat['p50']:.0f} us  p99 {lat['p99']:.0f} us  max {lat['max']:.0f} us")
    if rss["first_bytes"]:
        print(f"RSS {rss['first_bytes'] / 2**20:.1f} MiB -> {rss['last_bytes'] / 2**20:.1f} MiB "
              f"(growth {rss['growth_bytes'] / 2**10:+.0f} KiB, max {rss['max_bytes'] / 2**20:.1f} MiB, "
              f"{rss['samples']} samples)")
    m = o["modbus_at_end"]
    print(f"modbus bridge (last sample while the loop ran): running {m['running']} connected {m['connected']} "
          f"reconnects {m['reconnects']} errors {m['errors']}")
    print(f"replay {'bit-exact' if rep['identical'] else 'MISMATCH'}: {rep['cycles']} cycles, "
          f"{rep['model_outputs_compared']} model and {rep['final_outputs_compared']} final outputs compared")
    print(f"log records at WARNING and above: {sum(o['log_records'].values())} {o['log_records']}")
    print(f"controller built in {o['seconds']['controller_build']:.0f} s, replay took {o['seconds']['replay']:.0f} s")
    print(f"not exercised: squat ({o['not_exercised']['squat']})")
    print(f"faults passed {o['faults_passed']}/{o['faults_injected']}, failed {o['faults_failed']}, "
          f"not judged {o['faults_not_judged']}")
    print("PASS" if s["ok"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="length of the run (one round of faults a minute)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the schedule, the plant and the junk")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    ap.add_argument("--realtime", action="store_true", help="ask for SCHED_FIFO etc. for the loop")
    ap.add_argument("--faults", default=None, help="comma-separated subset of the fault kinds")
    ap.add_argument("--out", type=Path, default=None, help="working directory (recording, logs)")
    ap.add_argument("--role", choices=("proxy", "flood"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--plc-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "proxy":
        return proxy_main(args.port, args.plc_port, args.seed)
    if args.role == "flood":
        return flood_main(args.endpoint, args.seconds, args.seed)
    kinds = None
    if args.faults:
        kinds = [k.strip() for k in args.faults.split(",")]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            ap.error(f"--faults: unknown {', '.join(unknown)} (known: {', '.join(KINDS)})")
    try:
        schedule(args.minutes, args.seed)
    except ValueError as exc:
        ap.error(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = run_soak(args.minutes, args.seed, realtime=args.realtime, workdir=args.out, kinds=kinds)
    if args.json:
        print(json.dumps(s, default=str))
    else:
        render(s)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
