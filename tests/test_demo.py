"""``r1edge demo`` end to end, and the controller against a PLC that dies and comes back.

Proves: a shortened demo (the bundled pruned int8 MoE policy over Modbus TCP against the
plant simulator in its own process), scored from t = 0, tracks within ``MAX_RATIO`` of the
expert controller and far below no control, starts without moving the actuators, never moves
an output it drives faster than its rate limit, explains every fail-safe cycle, writes its plot
and a flight recording that replays bit for bit, also with two CPU-burning processes beside it;
and when the PLC process is SIGKILLed mid-run the controller fails safe within the heartbeat
timeout, then recovers when the PLC restarts on the same port, ramping back at the rate limit
(recorded outputs).
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.control.recorder import RecordingReader
from sdk import cli
from sdk.service.config import DeployConfig
from sdk.service.controller import Controller
from sdk.service.replay import replay
from sdk.demo import (EXAMPLE, MAX_FAILSAFE_FRACTION, MAX_RATIO, MAX_VS_NO_CONTROL, PlantProcess, demo_config,
                      find_example, free_port, output_steps, run_demo, wait_for_plc)

CHECKS = {"tracking_within_max_ratio": True, "far_below_no_control": True, "bumpless_start": True,
          "outputs_within_rate_limit": True, "every_failsafe_cycle_explained": True,
          "failsafe_and_misses_within_1pct": True, "replay_bit_exact": True, "completed": True}


def _wait(cond, timeout_s: float, poll_s: float = 0.005) -> float | None:
    """Poll ``cond`` until true; the monotonic time it first held, or None on timeout."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return time.monotonic()
        time.sleep(poll_s)
    return None


TRACKING_CHECKS = ("tracking_within_max_ratio", "far_below_no_control")


LOAD_CHECKS = TRACKING_CHECKS + ("failsafe_and_misses_within_1pct",)


def _assert_passes(s: dict, *, busy: bool = False) -> None:
    """Every pass condition of the demo. ``busy`` (a machine made busy on purpose): stalls put
    cycles into fail-safe (the PLC's inputs go stale, inference misses its budget), and on a
    machine loaded beyond what the demo is for, the fail-safe and the ramp back can cost an 8 s
    run more tracking than the bounds allow (seen: 1.75x the expert after 3 fail-safe cycles), or
    more than 1% of the cycles; the demo must then fail, saying so. So on a busy machine the
    checks that depend on the load must agree with the figures they judge and with the verdict
    (tracking may fail only when a cycle failed safe), and every other check must hold. The
    tracking bound itself is asserted deterministically in simulated time (``tests/test_bumpless.py``)."""
    checks, t = s["checks"], s["tracking"]
    ratio, vs_none = t["moe"]["score"] / t["expert"]["score"], t["moe"]["score"] / t["no_control"]["score"]
    assert ratio == pytest.approx(s["ratio_vs_expert"], rel=1e-3)
    assert vs_none == pytest.approx(s["ratio_vs_no_control"], rel=1e-3)
    assert checks["tracking_within_max_ratio"] == (s["ratio_vs_expert"] <= MAX_RATIO)
    assert checks["far_below_no_control"] == (s["ratio_vs_no_control"] <= MAX_VS_NO_CONTROL)
    bound = MAX_FAILSAFE_FRACTION * max(s["cycles"], 1)
    assert checks["failsafe_and_misses_within_1pct"] == (s["failsafe_cycles"] <= bound and s["deadline_misses"] <= bound)
    assert s["ok"] == all(checks.values())
    judged = {k: CHECKS[k] for k in CHECKS if not (busy and k in LOAD_CHECKS)}
    assert {k: checks[k] for k in judged} == judged, {k: s[k] for k in ("checks", "failsafe_events", "deadline_misses",
                                                                         "realtime")}
    if busy and not s["failsafe_cycles"]:
        assert all(checks[k] for k in TRACKING_CHECKS), s["checks"]      # nothing failed safe: nothing to excuse
    if not busy:
        assert s["ok"]
        assert s["ratio_vs_expert"] <= MAX_RATIO and s["ratio_vs_no_control"] <= MAX_VS_NO_CONTROL
        assert s["tracking"]["moe"]["score"] < s["tracking"]["no_control"]["score"]
        assert s["failsafe_cycles"] <= bound
    assert len({e["cycle"] for e in s["failsafe_events"]}) == s["failsafe_cycles"]
    assert all(e["cause"] and e["detail"] for e in s["failsafe_events"])
    assert s["replay"]["identical"] and s["replay"]["model_outputs_compared"] > 0
    assert s["scored_s"][0] == 0.0 and s["first_write_s"] is not None
    assert all(v <= s["step_limit"][k] for k, v in s["start_step"].items())
    assert all(v <= s["step_limit"][k] * (1 + 1e-9) for k, v in s["output_steps"]["largest"].items())


def test_short_demo_tracks_like_the_expert_and_replays_bit_exactly(tmp_path):
    s = run_demo(duration_s=8.0, out=tmp_path / "demo", seed=1)
    _assert_passes(s)
    assert s["held_cycles"] == 0
    assert 300 <= s["cycles"] <= 401                      # 8 s at 50 Hz, less skipped ticks
    assert s["replay"]["model_outputs_compared"] + s["failsafe_cycles"] >= s["cycles"]
    assert s["latency_us"]["p50"] > 0 and s["latency_us"]["max"] >= s["latency_us"]["p99"]
    png = tmp_path / "demo" / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert (tmp_path / "demo" / "plant.npz").is_file()


def test_demo_beside_two_cpu_burning_processes_keeps_its_guarantees_and_judges_itself(tmp_path):
    """A machine with other work going on: two processes spin on the two cores for the whole
    run. Stalls may put cycles into fail-safe; the demo explains each one, starts bumplessly,
    keeps every output it drives within the rate limit, replays bit for bit, and its verdict
    follows from its figures (it passes on a machine where stalls stay rare)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        s = run_demo(duration_s=8.0, out=tmp_path / "demo", seed=1)
    finally:
        for p in burners:
            p.kill()
            p.wait(10)
    _assert_passes(s, busy=True)
    # Real-time scheduling is applied exactly where this machine permits it (asked independently).
    permitted = subprocess.run([sys.executable, "-c", "import os; os.sched_setscheduler(0, os.SCHED_FIFO, "
                                "os.sched_param(10))"], capture_output=True, timeout=60).returncode == 0
    assert s["realtime"]["sched_fifo"]["applied"] is permitted, s["realtime"]


def test_killed_plc_fails_safe_within_the_heartbeat_timeout_and_recovers(tmp_path):
    port = free_port()
    config = demo_config(port, tmp_path / "rec")
    timeout_s = config.modbus["heartbeat"]["timeout_ms"] / 1e3
    period_s = config.loop.period_ms / 1e3
    failsafe = [o.failsafe for o in config.outputs]
    ctrl = Controller(config)
    plants = [PlantProcess(port, seed=2, stderr_path=tmp_path / "plant.log")]
    runner = threading.Thread(target=ctrl.run, kwargs={"duration_s": 60.0}, daemon=True)
    try:
        plants[0].start()
        wait_for_plc(ctrl)
        runner.start()
        assert _wait(lambda: "main" in ctrl.slots and ctrl.status()["status"] == "ok", 5.0)
        time.sleep(1.2)                                       # past the loop's warm-up (gc.freeze at cycle 20)
        stats = ctrl.stats()
        assert stats["failsafe_cycles"] == 0, (stats["failsafe_cycles_by_reason"], stats["deadline_misses"],
                                               stats["watchdog"], stats["lateness_us"])

        t_kill = time.monotonic()
        plants[0].kill()
        t_ctrl = _wait(lambda: ctrl.status()["status"] == "failsafe", 3.0)
        t_bridge = _wait(lambda: ctrl.bridge("modbus").health()["failsafe"], 3.0)
        assert t_ctrl is not None and t_bridge is not None
        # inputs go stale first (stale_ms); the bridge trips on the heartbeat at the next publish
        assert t_ctrl - t_kill <= timeout_s + 2 * period_s, t_ctrl - t_kill
        assert t_bridge - t_kill <= timeout_s + 3 * period_s, t_bridge - t_kill
        assert ctrl.status()["reason"] == "invalid_input"
        assert list(ctrl.cycle.out[0]) == failsafe
        time.sleep(0.3)
        assert ctrl.status()["status"] == "failsafe"         # stays safe while the PLC is gone

        plants.append(PlantProcess(port, seed=2, log_path=tmp_path / "plant2.npz",
                                   stderr_path=tmp_path / "plant.log").start())
        t_back = _wait(lambda: ctrl.status()["status"] == "ok" and not ctrl.bridge("modbus").health()["failsafe"], 15.0)
        assert t_back is not None, ctrl.bridge("modbus").health()
        cycles = ctrl.counters["failsafe_cycles"]
        time.sleep(0.5)
        assert ctrl.status()["status"] == "ok" and ctrl.counters["failsafe_cycles"] == cycles
        health = ctrl.bridge("modbus").health()
        assert health["connected"] and health["heartbeat_ok"] and health["reconnects"] >= 1
        plants[1].stop()                                      # SIGTERM: the PLC writes its log
        with np.load(tmp_path / "plant2.npz") as log:
            t, held, valve = log["t"], log["held"], log["valve_cmd"]
        # the restarted PLC got fresh commands from the policy again (not the fail-safe 0)
        recent = t >= t[-1] - 0.4
        assert not held[recent].any() and (valve[recent] > 0.05).all()
    finally:
        ctrl.stop()
        runner.join(30)
        ctrl.close()
        for plant in plants:
            plant.kill()
    assert not runner.is_alive()
    # Back from the PLC's death (more than a window of stale inputs: a warm-up from the first
    # valid frame), every output the controller drove moved at most max_rate x period a cycle.
    steps = output_steps(tmp_path / "rec")
    assert steps["ok"] and steps["policy_cycles"] > 0, steps
    starts = [e for rec in RecordingReader(tmp_path / "rec") if rec.get("type") == "cycle"
              for e in rec["streams"] if e.get("pre")]
    assert len(starts) == 2
    assert replay(tmp_path / "rec")["identical"]


ROOT = Path(__file__).resolve().parents[1]


def test_demo_finds_its_example_and_cli_reports_a_bad_duration(capsys):
    assert find_example() == EXAMPLE
    assert cli.main(["demo", "--duration", "1", "--json"]) == 2
    assert "duration must be at least 2 s" in capsys.readouterr().err
    # seed 0's first setpoint step comes at 5.5 s: a 5 s run has nothing to score
    assert cli.main(["demo", "--duration", "5", "--json"]) == 2
    assert "too short to score plant seed 0: its first setpoint step comes at 5.5 s" in capsys.readouterr().err


def test_demo_says_what_is_missing(tmp_path):
    from sdk.demo import DemoError

    with pytest.raises(DemoError, match="deploy.toml: missing"):
        find_example(tmp_path)


def test_the_example_paths_of_a_clone_are_the_shipped_files():
    example = ROOT / "examples" / "factory_loop"
    assert (example / "deploy.toml").resolve() == EXAMPLE / "deploy.toml"
    assert (example / "model").resolve() == EXAMPLE / "model"
    assert DeployConfig.load(example / "deploy.toml").model.path == EXAMPLE / "model"
