"""``benchmarks/soak.py``: its schedule, its measurement of each fault, and its fault proxy.

The soak itself runs for minutes (a benchmark, run by hand); here, fast:
- the schedule is a pure function of (minutes, seed), every fault once per minute, within
  its bounds, in time order without overlap, and ``--minutes 10`` takes the same path;
- the figures of a fault are read from a real flight recording (written with the
  recorder) of a scripted cycle stream: a detected fault with its reason, time to fail-safe,
  time back to auto, ramp and cycles lost; and the failures the soak must report: a fault
  whose fail-safe never shows (undetected), a loop that never comes back, an output that
  steps past its rate limit on the way back, a fault that began outside auto (not judged),
  a flood that costs more than 1% of its cycles or is not counted;
- the fault proxy between a real plant server and a real Modbus client really answers
  short, with NaN and out-of-range values, freezes the PLC's registers, drops connections,
  and counts the fail-safe writes it forwards;
- a 12 s soak of the real thing with one NaN burst: seen, fail-safe values at the PLC, back
  in auto, the recording replayed bit for bit.
"""
from __future__ import annotations

import importlib.util
import math
import struct
import time
from pathlib import Path

import pytest

from runtime.control.recorder import FlightRecorder
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

PERIOD_NS = 20_000_000
LIMITS = [["valve", 0.0, 1.0, 2.0, 0.0, None], ["heater", 0.0, 1.0, 2.0, 0.0, None]]


# ----------------------------------------------------------------------------- schedule

def test_schedule_is_seeded_and_covers_every_fault_per_minute():
    one = soak.schedule(1, 0)
    assert sorted(p["kind"] for p in one) == sorted(soak.KINDS)
    assert one == soak.schedule(1, 0)
    assert one != soak.schedule(1, 1)
    ten = soak.schedule(10, 7)
    assert len(ten) == 10 * len(soak.KINDS)
    for r in range(10):
        assert sorted(p["kind"] for p in ten if p["round"] == r) == sorted(soak.KINDS)
    for plan, minutes in ((one, 1), (ten, 10)):
        ends = 0.0
        for p in plan:
            _, lo, hi = soak.KINDS[p["kind"]]
            assert p["at_s"] >= max(ends, soak.LEAD_S)
            assert lo <= p["duration_s"] <= hi and p["duration_s"] < p["slot_s"]
            ends = p["at_s"] + p["slot_s"]
        assert ends <= minutes * 60 - soak.TAIL_S + 1e-6
    assert all(p["duration_s"] == 2.0 for p in ten if p["kind"] == "pause")
    with pytest.raises(ValueError):
        soak.schedule(0.1, 0)


# ----------------------------------------------------------------------------- measurement

def _record(tmp_path: Path, spans: list[tuple[float, str, str, str]], *, until_s: float = 10.0,
            skip: tuple[float, float] | None = None, jump_at: float | None = None) -> dict:
    """A recording of the main stream, one cycle per 20 ms up to ``until_s``: by default ok in
    auto with the policy asking 0.6 for both outputs; ``spans`` (from_s, status, why, mode)
    set the status from that time on (fail-safe outputs are 0, the outputs then ramp back at
    2 /s); ``skip``: ticks with no cycle; ``jump_at``: the outputs jump to the policy's."""
    rec = FlightRecorder(tmp_path / "rec", {"period_ns": PERIOD_NS, "output_limits": LIMITS})
    out, t0 = 0.6, 1_000_000_000_000
    for k in range(int(until_s / 0.02)):
        t_s = k * 0.02
        if skip and skip[0] <= t_s < skip[1]:
            continue
        status, why, mode = "ok", "", "auto"
        for start, s, w, m in spans:
            if t_s >= start - 1e-9:
                status, why, mode = s, w, m
        if status == "failsafe":
            out = 0.0
        elif jump_at is not None and abs(t_s - jump_at) < 1e-9:
            out = 0.6
        else:
            out = min(0.6, out + 2.0 * 0.02)
        entry = {"s": "main", "st": status, "why": why, "mode": mode, "out": [out, out],
                 "y": None if status == "failsafe" else [0.6, 0.6]}
        if why == "invalid_input":
            entry["bad"] = {"level": "nan"}
        rec.append({"type": "cycle", "seq": k, "t_ns": t0 + int(round(t_s * 1e9)), "streams": [entry]})
    rec.close()
    cycles = soak.cycles_from_recording(tmp_path / "rec")
    cycles["t0"] = t0
    return cycles


def _inj(cycles: dict, start_s: float, end_s: float, next_s: float, kind: str = "kill", **extra) -> dict:
    t0 = cycles["t0"]
    return {"kind": kind, "t_start_ns": t0 + int(start_s * 1e9), "t_end_ns": t0 + int(end_s * 1e9),
            "t_next_ns": t0 + int(next_s * 1e9), **extra}


def test_a_detected_fault_and_its_figures(tmp_path):
    # fault 2.0-3.0 s; fail-safe (nan) from 2.1 s, warm-up from 3.2 s, auto from 3.3 s
    cycles = _record(tmp_path, [(2.1, "failsafe", "invalid_input", "auto"), (3.2, "ok", "", "warmup"),
                                (3.3, "ok", "", "auto")])
    row = soak.measure_fault(_inj(cycles, 2.0, 3.0, 8.0, "nan", plc={"failsafe_writes": 40, "writes_at_end": 50}),
                             cycles)
    assert row["detected"] and row["reasons"] == ["invalid_input(level:nan)"]
    assert row["to_failsafe_ms"] == pytest.approx(100.0, abs=0.1)
    assert row["back_to_auto_s"] == pytest.approx(0.3, abs=1e-6)
    assert row["cycles_lost"] == pytest.approx((3.3 - 2.1) / 0.02)
    assert row["failsafe_cycles"] == pytest.approx(55)
    assert row["ramp_within_rate"] is True
    assert row["ramp_s"] == pytest.approx(0.18, abs=1e-6)      # 0 -> 0.6 at 2 /s from 3.2 s: done at 3.48 s
    assert row["ok"] is True and row["why"] == ""


def test_a_fault_whose_failsafe_never_shows_is_reported_undetected(tmp_path):
    cycles = _record(tmp_path, [])
    row = soak.measure_fault(_inj(cycles, 2.0, 3.0, 8.0, "short"), cycles)
    assert row["detected"] is False and row["reasons"] == [] and row["to_failsafe_ms"] is None
    assert row["ok"] is False and "not detected" in row["why"]
    # the fail-safe of a later fault is not this one's
    cycles = _record(tmp_path / "b", [(5.0, "failsafe", "heartbeat", "auto")])
    row = soak.measure_fault(_inj(cycles, 2.0, 3.0, 8.0, "frozen"), cycles)
    assert row["detected"] is False and row["ok"] is False


def test_a_loop_that_never_comes_back_fails(tmp_path):
    cycles = _record(tmp_path, [(2.2, "failsafe", "invalid_input", "auto")])
    row = soak.measure_fault(_inj(cycles, 2.0, 3.0, 8.0, "short"), cycles)
    assert row["detected"] and row["back_to_auto_s"] is None and row["cycles_lost"] is None
    assert row["ok"] is False and "never back" in row["why"]


def test_a_step_past_the_rate_limit_on_the_way_back_fails(tmp_path):
    cycles = _record(tmp_path, [(2.1, "failsafe", "heartbeat", "auto"), (3.2, "ok", "", "auto")], jump_at=3.3)
    row = soak.measure_fault(_inj(cycles, 2.0, 3.0, 8.0, "pause"), cycles)
    assert row["detected"] and row["ramp_within_rate"] is False
    assert row["ok"] is False and "rate limit" in row["why"]


def test_skipped_ticks_count_as_lost_and_a_fault_outside_auto_is_not_judged(tmp_path):
    cycles = _record(tmp_path, [(2.1, "failsafe", "heartbeat", "auto"), (3.0, "ok", "", "auto")],
                     skip=(2.5, 2.6))
    row = soak.measure_fault(_inj(cycles, 2.0, 2.8, 8.0, "kill"), cycles)
    assert row["skipped_ticks"] == 5
    assert row["cycles_lost"] == pytest.approx((3.0 - 2.1) / 0.02)   # 40 fail-safe cycles + 5 skipped ticks
    cycles = _record(tmp_path / "b", [(1.0, "failsafe", "heartbeat", "auto")])
    row = soak.measure_fault(_inj(cycles, 2.0, 3.0, 8.0, "kill"), cycles)
    assert row["in_auto_at_start"] is False and row["ok"] is None
    assert row["detected"] is None and row["to_failsafe_ms"] is None


def test_a_flood_is_judged_by_what_it_costs_and_must_be_counted(tmp_path):
    cycles = _record(tmp_path, [])
    counted = {"zmq.bad.decode": 1000}
    row = soak.measure_fault(_inj(cycles, 2.0, 4.0, 8.0, "flood", counted=counted,
                                  window={"cycles": 100, "failsafe_cycles": 0, "deadline_misses": 1}), cycles)
    assert row["ok"] is True
    row = soak.measure_fault(_inj(cycles, 2.0, 4.0, 8.0, "flood", counted=counted,
                                  window={"cycles": 100, "failsafe_cycles": 1, "deadline_misses": 1}), cycles)
    assert row["ok"] is False and "fail-safe cycles and deadline misses" in row["why"]
    row = soak.measure_fault(_inj(cycles, 2.0, 4.0, 8.0, "flood", counted={"zmq.frames": 10},
                                  window={"cycles": 100, "failsafe_cycles": 0, "deadline_misses": 0}), cycles)
    assert row["ok"] is False and "counted none" in row["why"]


def test_counted_delta_keeps_what_grew():
    a = {"bad": {"decode": 1}, "errors": {}, "reconnects": 2, "io_us": {"p50": 5.0}, "running": True}
    b = {"bad": {"decode": 4, "size": 1}, "errors": {"io_errors": 1}, "reconnects": 2, "io_us": {"p50": 9.0},
         "running": False}
    assert soak.counted_delta(a, b) == {"bad.decode": 3, "bad.size": 1, "errors.io_errors": 1}


# ----------------------------------------------------------------------------- the proxy

def test_the_fault_proxy_really_misbehaves():
    from pymodbus.client import ModbusTcpClient

    from sdk.demo import free_port
    from sdk.demo import plant as P

    server = P.PlantServer(seed=3, port=0).start()
    port = free_port()
    proxy = soak.Child(["--role", "proxy", "--port", str(port), "--plc-port", str(server.port), "--seed", "0"],
                       "proxy: listening", 20.0)
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0)
    n_in = 2 * len(P.INPUT_REGISTERS)

    def floats(rr):
        return struct.unpack(f">{len(rr.registers) // 2}f", struct.pack(f">{len(rr.registers)}H", *rr.registers))
    try:
        assert client.connect()
        rr = client.read_input_registers(0, count=n_in, device_id=1)
        assert not rr.isError() and len(rr.registers) == n_in and all(map(math.isfinite, floats(rr)))
        assert proxy.ask("mode nan") == {"mode": "nan"}          # answered once in force
        assert math.isnan(floats(client.read_input_registers(0, count=n_in, device_id=1))[0])
        proxy.ask("mode range")
        assert floats(client.read_input_registers(0, count=n_in, device_id=1))[1] == 500.0
        proxy.ask("mode pass")
        client.write_registers(0, [0, 0, 0, 0], device_id=1)          # valve 0.0, heater 0.0
        client.write_registers(0, list(struct.unpack(">4H", struct.pack(">ff", 0.5, 0.0))), device_id=1)
        counts = proxy.ask("stats")
        assert counts["writes"] == 2 and counts["failsafe_writes"] == 1
        hb = [client.read_holding_registers(P.HEARTBEAT_ADDRESS, count=1, device_id=1).registers[0]]
        proxy.ask("mode frozen")                                     # the PLC's scan stops
        for _ in range(3):
            time.sleep(0.05)                                         # the plant ticks every 10 ms
            hb.append(client.read_holding_registers(P.HEARTBEAT_ADDRESS, count=1, device_id=1).registers[0])
        assert hb[1:] == [hb[0]] * 3
        proxy.ask("mode pass")                                       # the scan goes on: polled, as
        def heartbeat():                                             # a loaded machine may lag
            return client.read_holding_registers(P.HEARTBEAT_ADDRESS, count=1, device_id=1).registers[0]
        assert wait_for(lambda: heartbeat() != hb[0], timeout=5.0)
        proxy.ask("mode short")
        try:
            rr = client.read_input_registers(0, count=n_in, device_id=1)
            short = rr.isError() or len(rr.registers) < n_in
        except Exception:                                            # the client may refuse it outright
            short = True
        assert short and proxy.ask("stats")["mangled"] >= 1
        proxy.ask("mode drop")
        client.close()
        with pytest.raises(Exception):
            client.connect()
            client.read_input_registers(0, count=n_in, device_id=1)
        assert proxy.ask("stats")["dropped"] >= 1
    finally:
        client.close()
        proxy.close()
        server.stop()


# ----------------------------------------------------------------------------- end to end

def test_a_short_soak_end_to_end(tmp_path):
    """The real thing for 12 s: plant process, proxy process, controller with its recorder; one
    NaN burst, seen in the recording, fail-safe values at the PLC, back in auto, and the
    recording replayed bit for bit."""
    plan = [{"kind": "nan", "round": 0, "at_s": 4.0, "duration_s": 0.5, "slot_s": 6.0}]
    s = soak.run_soak(12 / 60, seed=2, workdir=tmp_path, plan=plan)
    (row,) = s["faults"]
    assert row["kind"] == "nan" and row["duration_s"] >= 0.5
    assert "invalid_input(level:nan)" in row["reasons"]
    assert row["back_to_auto_s"] is not None and row["cycles_lost"] > 0
    assert row["plc"]["failsafe_writes"] > 0 and row["plc"]["writes_at_end"] > 0
    o = s["overall"]
    assert o["replay"]["identical"] and o["replay"]["cycles"] == o["cycles"] > 0
    assert o["rss"]["samples"] > 0 and o["modbus_at_end"]["connected"] is True
